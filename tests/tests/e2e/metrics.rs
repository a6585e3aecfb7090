//! The admin port: Prometheus metrics and the liveness probe, scraped over plain HTTP from
//! real services after a real erasure; and no admin port unless one is configured.

use std::net::SocketAddr;
use std::time::Duration;

use dsrelay_proto::v1::RequestState;

use crate::harness::{
    count, erasure, in_state, spawn_pair, wait_until, Backend, Mode, PairOptions, Role, PROCESSOR,
};

/// GETs `path` from an admin port; returns (status, content type, body).
async fn get(addr: &str, path: &str) -> (u16, String, String) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, content_type, r.text().await.expect("body"))
}

/// Scrapes `/metrics`, checking the response and the shape of every line.
pub(crate) async fn scrape(addr: &str) -> String {
    let (status, content_type, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let mut typed = std::collections::BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad value in {line:?}"
        );
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "{name} has no # TYPE line");
    }
    body
}

/// The value of one series, written exactly as the exposition writes it.
pub(crate) fn value(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .expect("a number")
}

async fn metrics_after_an_erasure(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        admin: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let registry_admin = pair.registry.admin_addr().expect("admin").to_string();
    let processor_admin = pair.processor.admin_addr().expect("admin").to_string();
    for addr in [&registry_admin, &processor_admin] {
        assert_eq!(get(addr, "/healthz").await.0, 200);
    }
    let before = scrape(&registry_admin).await;
    assert_eq!(
        value(
            &before,
            r#"dsrelay_requests{kind="ERASURE",state="COMPLETED"}"#
        ),
        0.0
    );
    assert_eq!(
        value(
            &before,
            &format!(r#"dsrelay_delivery_attempts_total{{processor="{PROCESSOR}"}}"#)
        ),
        0.0
    );

    let mut crm = pair.client("partner-crm");
    let id = crm
        .submit(erasure("teemu.testaaja@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;

    // The registry: one completed erasure, nothing queued, every acknowledgement measured.
    let r = scrape(&registry_admin).await;
    assert_eq!(
        value(&r, r#"dsrelay_requests{kind="ERASURE",state="COMPLETED"}"#),
        1.0
    );
    assert_eq!(
        value(&r, r#"dsrelay_requests{kind="ERASURE",state="RECEIVED"}"#),
        0.0
    );
    assert_eq!(value(&r, "dsrelay_requests_overdue"), 0.0);
    assert_eq!(value(&r, r#"dsrelay_outbox_depth{op="deliver"}"#), 0.0);
    assert_eq!(value(&r, r#"dsrelay_outbox_depth{op="cancel"}"#), 0.0);
    assert_eq!(
        value(&r, r#"dsrelay_outbox_oldest_age_seconds{op="deliver"}"#),
        0.0
    );
    let attempts = value(
        &r,
        &format!(r#"dsrelay_delivery_attempts_total{{processor="{PROCESSOR}"}}"#),
    );
    let failures = value(
        &r,
        &format!(r#"dsrelay_delivery_failures_total{{processor="{PROCESSOR}"}}"#),
    );
    assert!(attempts >= 1.0, "{r}");
    assert!(failures <= attempts - 1.0, "{r}");
    // Two subprocessors, each IN_PROGRESS then COMPLETED.
    let stored = count(
        pair.registry.database_url(),
        "SELECT CAST(COUNT(*) AS BIGINT) FROM acknowledgements",
    )
    .await;
    assert!(stored >= 4, "{stored} acknowledgements stored");
    assert_eq!(
        value(&r, r#"dsrelay_acknowledgements_total{result="applied"}"#),
        stored as f64
    );
    let latency_count = value(
        &r,
        &format!(r#"dsrelay_acknowledgement_latency_seconds_count{{processor="{PROCESSOR}"}}"#),
    );
    assert!(latency_count >= stored as f64, "{r}");
    assert_eq!(
        value(
            &r,
            &format!(
                r#"dsrelay_acknowledgement_latency_seconds_bucket{{processor="{PROCESSOR}",le="+Inf"}}"#
            )
        ),
        latency_count
    );
    let latency_sum = value(
        &r,
        &format!(r#"dsrelay_acknowledgement_latency_seconds_sum{{processor="{PROCESSOR}"}}"#),
    );
    assert!(
        (0.0..30.0 * latency_count).contains(&latency_sum),
        "{latency_sum}"
    );

    // The processor: both tasks completed, connectors timed, no errors; its acknowledgement
    // outbox drains as soon as the registry's answers are recorded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let p = loop {
        let p = scrape(&processor_admin).await;
        if value(&p, "dsrelay_ack_outbox_depth") == 0.0 {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox not drained:\n{p}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value(&p, "dsrelay_ack_outbox_oldest_age_seconds"), 0.0);
    for s in ["accounting", "mail-marketing"] {
        assert_eq!(
            value(
                &p,
                &format!(r#"dsrelay_tasks{{subprocessor="{s}",state="COMPLETED"}}"#)
            ),
            1.0
        );
        assert_eq!(
            value(
                &p,
                &format!(r#"dsrelay_tasks{{subprocessor="{s}",state="PENDING"}}"#)
            ),
            0.0
        );
        assert!(
            value(
                &p,
                &format!(r#"dsrelay_connector_duration_seconds_count{{subprocessor="{s}"}}"#)
            ) >= 1.0
        );
        for kind in ["transient", "permanent"] {
            assert_eq!(
                value(
                    &p,
                    &format!(
                        r#"dsrelay_connector_errors_total{{subprocessor="{s}",kind="{kind}"}}"#
                    )
                ),
                0.0
            );
        }
    }
    let sent = count(
        pair.processor.database_url(),
        "SELECT CAST(COUNT(*) AS BIGINT) FROM ack_outbox",
    )
    .await;
    assert_eq!(
        sent, stored,
        "every queued acknowledgement reached the registry"
    );
    pair.stop().await;
}

#[tokio::test]
async fn metrics_after_an_erasure_sqlite() {
    metrics_after_an_erasure(Backend::Sqlite).await;
}

#[tokio::test]
async fn metrics_after_an_erasure_postgres() {
    metrics_after_an_erasure(Backend::Postgres).await;
}

/// The ports a process listens on (Linux: its socket inodes matched against /proc/net/tcp*).
#[cfg(target_os = "linux")]
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = std::collections::BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds") {
        let Ok(target) = std::fs::read_link(fd.expect("fd").path()) else {
            continue;
        };
        let t = target.to_string_lossy().to_string();
        if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
            inodes.insert(inode.to_string());
        }
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A = LISTEN), inode
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().expect("port");
                ports.push(u16::from_str_radix(port, 16).expect("hex port"));
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// The registry binary listens on its gRPC port only, unless `admin_listen` is set; then on
/// the admin port too, which answers.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn admin_port_is_off_by_default() {
    // The processor stays down: only the registry's process is looked at.
    let registry_alone = |admin| PairOptions {
        mode: Mode::Processes,
        down: vec![Role::Processor],
        admin,
        ..Default::default()
    };
    let pair = spawn_pair(registry_alone(false))
        .await
        .expect("sqlite pair");
    assert_eq!(pair.registry.admin_addr(), None);
    for f in [pair.registry.config_file(), pair.processor.config_file()] {
        let text = std::fs::read_to_string(f).expect("config file");
        assert!(!text.contains("admin_listen"), "{text}");
    }
    assert_eq!(
        listening_ports(pair.registry.pid().expect("running")),
        vec![pair.registry.addr().port()]
    );
    drop(pair);

    let pair = spawn_pair(registry_alone(true)).await.expect("sqlite pair");
    let admin: SocketAddr = pair.registry.admin_addr().expect("admin");
    let text = std::fs::read_to_string(pair.registry.config_file()).expect("config file");
    assert!(
        text.contains(&format!("admin_listen = \"{admin}\"")),
        "{text}"
    );
    let mut expected = vec![pair.registry.addr().port(), admin.port()];
    expected.sort_unstable();
    assert_eq!(
        listening_ports(pair.registry.pid().expect("running")),
        expected
    );
    let (status, _, body) = get(&admin.to_string(), "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert!(scrape(&admin.to_string())
        .await
        .contains("# TYPE dsrelay_requests gauge"));
}
