//! Logs are structured (JSON on request), carry the request and trace ids in every line
//! about a request, and never the subject's raw identities.

use std::time::Duration;

use dsrelay_proto::v1::{IdentityEncoding, IdentityType, RequestState, SubjectIdentity};
use serde_json::Value;

use crate::harness::{erasure, in_state, spawn_pair, wait_until, Mode, PairOptions};

/// Spans opened for work on one request.
const REQUEST_SPANS: &[&str] = &["intake", "deliver", "accept", "task", "connector"];

fn lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_request_and_never_the_subject() {
    let pair = spawn_pair(PairOptions {
        mode: Mode::Processes,
        log_json: true,
        rust_log: Some("debug,h2=info,hyper=info,tower=info,rustls=info".into()),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.crm();
    let mut req = erasure("teemu.testaaja@example.fi");
    req.identities.push(SubjectIdentity {
        r#type: IdentityType::Phone as i32,
        encoding: IdentityEncoding::Raw as i32,
        value: "+358405556666".into(),
        label: String::new(),
    });
    req.identities.push(SubjectIdentity {
        r#type: IdentityType::NationalId as i32,
        encoding: IdentityEncoding::Raw as i32,
        value: "111280-917A".into(),
        label: String::new(),
    });
    let r = crm.submit(req).await.expect("submit").into_inner();
    wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    // Let the last lines reach the files.
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (service, log) in [
        ("registry", pair.registry.log()),
        ("processor", pair.processor.log()),
    ] {
        for secret in [
            "teemu.testaaja",
            "+358405556666",
            "358405556666",
            "111280-917A",
        ] {
            let hit = log.lines().find(|l| l.contains(secret));
            assert!(
                hit.is_none(),
                "{service} logged a raw identity ({secret}): {hit:?}"
            );
        }
        let parsed = lines(&log);
        let mut about_request = 0;
        for line in &parsed {
            let spans = line["spans"].as_array().cloned().unwrap_or_default();
            let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
            if !names.iter().any(|n| REQUEST_SPANS.contains(n)) {
                continue;
            }
            about_request += 1;
            let field = |key: &str| {
                spans
                    .iter()
                    .find_map(|s| s[key].as_str().map(str::to_string))
            };
            assert_eq!(
                field("request_id").as_deref(),
                Some(r.request_id.as_str()),
                "{service}: {line}"
            );
            assert_eq!(
                field("trace_id").as_deref(),
                Some(r.trace_id.as_str()),
                "{service}: {line}"
            );
        }
        assert!(
            about_request > 0,
            "{service} logged nothing about the request:\n{log}"
        );
    }
    // The pair's mail-marketing holder is the noop connector, whose COMPLETED only means it
    // holds nothing: the processor says so when it starts.
    let processor = pair.processor.log();
    let warned = lines(&processor).into_iter().any(|l| {
        l["level"] == "WARN"
            && l["fields"]["subprocessor"] == "mail-marketing"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("noop connector"))
    });
    assert!(warned, "no warning about the noop holder:\n{processor}");
}
