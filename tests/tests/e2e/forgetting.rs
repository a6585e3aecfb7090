//! The relay forgets: finished requests past `forget_after_days` leave no raw e-mail address
//! in any file the services wrote (databases with their -wal/-shm files, package and export
//! folders, process logs), only keyed hashes; `Get` says so, and the audit trail still
//! verifies. In process the clocks are moved past the 30-day window; as processes (whose
//! clocks cannot be moved) the window is 0 days, and their log files are scanned too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dsrelay_proto::v1::{
    CancelRequest, EventType, ListEventsRequest, Request, RequestKind, RequestState, Scope,
    SubmitRequest,
};

use crate::harness::dsrctl::dsrctl;
use crate::harness::{
    audit_chained, count, erasure, in_state, spawn_pair, wait_until, Backend, Mode, PairOptions,
    TestPair,
};

/// The sample accounting database's customer 1: her return of data carries her records
/// through the processor's export folder into the registry's package.
const MAIJA: &str = "maija.meikalainen@example.fi";

const DAY_MS: i64 = 86_400_000;

/// Distinctive addresses, mixed case as a partner might send them.
fn addresses(tag: &str) -> Vec<String> {
    ["Forget.Alpha", "forget.bravo", "FORGET.CHARLIE"]
        .iter()
        .map(|local| format!("{local}.{tag}@Forgetting.Example"))
        .collect()
}

/// Every file under `path` (or `path` itself), recursively.
fn files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).expect("read dir") {
            files(&entry.expect("dir entry").path(), out);
        }
    } else if path.exists() {
        out.push(path.to_path_buf());
    }
}

/// The files of the pair's folder the relay wrote: the registry's and processor's SQLite
/// files (with -wal/-shm), the package and export folders and the process logs. Not the
/// holders' databases (the sample accounting database keeps Maija: returning data does not
/// erase it) nor the configuration and PKI.
fn relay_files(pair: &TestPair) -> Vec<PathBuf> {
    let dir = pair.dir();
    let mut out = Vec::new();
    for name in ["registry", "processor"] {
        for suffix in ["db", "db-wal", "db-shm", "db-journal", "log"] {
            files(&dir.join(format!("{name}.{suffix}")), &mut out);
        }
    }
    files(&pair.package_dir(), &mut out);
    files(&dir.join(crate::harness::PROCESSOR_DATA_DIR), &mut out);
    out
}

/// Where in `paths` any of `addresses` occurs in any mix of ASCII case, byte by byte:
/// `(file, address)` per finding.
fn find(paths: &[PathBuf], addresses: &[String]) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    for path in paths {
        let mut bytes = match std::fs::read(path) {
            Ok(b) => b,
            // SQLite removes its -wal and -shm files when the last connection closes.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        bytes.make_ascii_lowercase();
        for a in addresses {
            let needle = a.to_ascii_lowercase().into_bytes();
            if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                found.push((path.clone(), a.clone()));
            }
        }
    }
    found
}

/// Submits an erasure of each address and a return of data for the first and for Maija,
/// in the categories the processor holds; returns the request ids.
async fn submit_all(pair: &TestPair, addresses: &[String]) -> Vec<String> {
    let mut crm = pair.crm();
    let scoped = |a: &str| SubmitRequest {
        scope: Some(Scope {
            data_categories: vec!["contact".into(), "invoicing".into(), "marketing".into()],
        }),
        ..erasure(a)
    };
    let mut bodies: Vec<SubmitRequest> = addresses.iter().map(|a| scoped(a)).collect();
    for a in [addresses[0].as_str(), MAIJA] {
        bodies.push(SubmitRequest {
            kind: RequestKind::ReturnOfData as i32,
            // Submit refuses a note that names the subject; forgetting clears it all the same.
            note: "return of data, ticket 42".into(),
            ..scoped(a)
        });
    }
    let mut ids = Vec::new();
    for body in bodies {
        ids.push(
            crm.submit(body)
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    ids
}

/// Submits an erasure of `address` routed only to the processor that is never up, and
/// cancels it with a reason naming someone by the address `named` (a reason holding the
/// subject's own identities is refused): CANCELLED with its Deliver still pending, and free
/// text that must not outlive the window (nor ever reach the audit trail raw).
async fn submit_cancelled(pair: &TestPair, address: &str, named: &str) -> String {
    let mut crm = pair.crm();
    let id = crm
        .submit(SubmitRequest {
            scope: Some(Scope {
                data_categories: vec!["web-analytics".into()],
            }),
            ..erasure(address)
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    crm.cancel(CancelRequest {
        request_id: id.clone(),
        reason: format!("{named} withdrew the request"),
    })
    .await
    .expect("cancel");
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(10),
        in_state(RequestState::Cancelled),
    )
    .await;
    id
}

/// Waits until every request is COMPLETED.
async fn wait_completed(pair: &TestPair, ids: &[String]) {
    let mut crm = pair.crm();
    for id in ids {
        wait_until(
            &mut crm,
            id,
            Duration::from_secs(30),
            in_state(RequestState::Completed),
        )
        .await;
    }
}

/// Waits until the registry says every request's identities are forgotten, and the
/// processor has forgotten every one it holds; returns the registry's views.
async fn wait_forgotten(pair: &TestPair, ids: &[String], timeout: Duration) -> Vec<Request> {
    let mut crm = pair.crm();
    let mut views = Vec::new();
    for id in ids {
        views.push(wait_until(&mut crm, id, timeout, |r| r.identities_forgotten).await);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let url = pair.processor.database_url().to_string();
    loop {
        let left = count(
            &url,
            "SELECT COUNT(*) FROM requests WHERE forgotten_at IS NULL OR body IS NOT NULL",
        )
        .await;
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} request(s) not forgotten at the processor"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    views
}

/// What `Get` shows of a forgotten request, and its IDENTITIES_FORGOTTEN event.
async fn check_views(pair: &TestPair, views: &[Request]) {
    for v in views {
        assert!(v.identities.is_empty(), "{v:#?}");
        assert!(v.scope.is_none() && v.parameters.is_none(), "{v:#?}");
        assert!(v.note.is_empty() && v.cancel_reason.is_empty(), "{v:#?}");
        assert!(
            [RequestState::Completed, RequestState::Cancelled]
                .map(|s| s as i32)
                .contains(&v.state),
            "{v:#?}"
        );
        let events = pair
            .operator()
            .list_events(ListEventsRequest {
                request_id: v.request_id.clone(),
                ..Default::default()
            })
            .await
            .expect("events")
            .into_inner()
            .events;
        let forgotten: Vec<_> = events
            .iter()
            .filter(|e| e.r#type == EventType::IdentitiesForgotten as i32)
            .collect();
        assert_eq!(forgotten.len(), 1, "{events:#?}");
        assert_eq!(forgotten[0].request_state, v.state);
        // Messages of the registry's own words stay; free text is gone.
        assert!(
            events
                .iter()
                .any(|e| e.r#type == EventType::Submitted as i32
                    && e.message.starts_with("accepted")),
            "{events:#?}"
        );
        for e in &events {
            assert!(!e.message.contains('@'), "{e:#?}");
        }
    }
}

/// `dsrctl audit verify` finds the trail intact.
async fn audit_verifies(pair: &TestPair) {
    let run = dsrctl(pair, "operator", &["audit", "verify"]).await;
    assert!(run.ok().starts_with("audit trail intact"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_addresses_leave_no_byte_in_the_files_on_sqlite() {
    let mut pair = spawn_pair(PairOptions {
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let addresses = addresses("sqlite");
    let mut ids = submit_all(&pair, &addresses).await;
    wait_completed(&pair, &ids).await;
    let cancelled = submit_cancelled(&pair, &addresses[1], &addresses[0]).await;
    let mut all = addresses.clone();
    all.push(MAIJA.into());
    // The cancel reason is in the event until forgotten; the audit entry holds its hash.
    let events = pair
        .operator()
        .list_events(ListEventsRequest {
            request_id: cancelled.clone(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    assert!(
        events
            .iter()
            .any(|e| e.message == format!("cancelled: {} withdrew the request", addresses[0])),
        "{events:#?}"
    );

    // Within the window everything is still there, and the scan sees it.
    let files = relay_files(&pair);
    let found = find(&files, &all);
    for a in &all {
        assert!(
            found.iter().any(|(_, f)| f == a),
            "{a} not found before: {found:?}"
        );
    }
    assert!(
        found
            .iter()
            .any(|(p, f)| f == MAIJA && p.starts_with(pair.package_dir())),
        "Maija's package holds her address: {found:?}"
    );
    let mut crm = pair.crm();
    let view = wait_until(&mut crm, &ids[0], Duration::from_secs(5), |_| true).await;
    assert!(!view.identities_forgotten && !view.identities.is_empty());

    // A day short of the window nothing is forgotten.
    let (registry_clock, processor_clock) = (
        pair.registry.clock().expect("in process"),
        pair.processor.clock().expect("in process"),
    );
    registry_clock.advance(29 * DAY_MS);
    processor_clock.advance(29 * DAY_MS);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let view = wait_until(&mut crm, &ids[0], Duration::from_secs(5), |_| true).await;
    assert!(!view.identities_forgotten, "forgotten within the window");
    assert_eq!(
        count(
            pair.processor.database_url(),
            "SELECT COUNT(*) FROM requests WHERE forgotten_at IS NOT NULL"
        )
        .await,
        0
    );

    // Past the window (and the package retention) everything is forgotten.
    registry_clock.advance(2 * DAY_MS);
    processor_clock.advance(2 * DAY_MS);
    let package = pair.package_dir().join(&ids[4]);
    ids.push(cancelled);
    let views = wait_forgotten(&pair, &ids, Duration::from_secs(20)).await;
    check_views(&pair, &views).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while package.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "package not expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    audit_verifies(&pair).await;
    // The hashes kept are keyed: 64 hex digits each, one per identity.
    assert_eq!(
        count(
            pair.registry.database_url(),
            "SELECT COUNT(*) FROM requests WHERE body IS NULL AND LENGTH(identity_hashes) = 68"
        )
        .await,
        ids.len() as i64
    );
    // The cancelled request's Deliver to the absent processor is given up, not retried
    // with no identities; its Cancel (which carries none) is still retried.
    for (op, pending) in [("deliver", 0), ("cancel", 1)] {
        assert_eq!(
            count(
                pair.registry.database_url(),
                &format!("SELECT COUNT(*) FROM deliveries WHERE done_at IS NULL AND op = '{op}'")
            )
            .await,
            pending,
            "{op}"
        );
    }
    audit_chained(pair.registry.database_url()).await;
    assert_eq!(
        count(
            pair.registry.database_url(),
            "SELECT COUNT(*) FROM audit_log WHERE detail LIKE 'cancelled: text hmac-sha256:%'"
        )
        .await,
        1
    );

    pair.registry.stop().await;
    pair.processor.stop().await;
    // The stopped services' last connections close (and SQLite folds its log into the
    // database file) in the background.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ["registry.db-wal", "processor.db-wal"]
        .iter()
        .any(|f| pair.dir().join(f).exists())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let files = relay_files(&pair);
    assert!(
        files.iter().any(|f| f.ends_with("registry.db")),
        "{files:?}"
    );
    let found = find(&files, &all);
    assert!(found.is_empty(), "raw addresses left on disk: {found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_forget_and_their_logs_hold_no_address() {
    let mut pair = spawn_pair(PairOptions {
        mode: Mode::Processes,
        forget_after_days: 0,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let addresses = addresses("processes");
    let ids = submit_all(&pair, &addresses).await;
    wait_completed(&pair, &ids).await;
    let views = wait_forgotten(&pair, &ids, Duration::from_secs(30)).await;
    check_views(&pair, &views).await;
    audit_verifies(&pair).await;

    pair.registry.stop().await;
    pair.processor.stop().await;
    let files = relay_files(&pair);
    for log in ["registry.log", "processor.log"] {
        let path = pair.dir().join(log);
        assert!(
            std::fs::metadata(&path)
                .map(|m| m.len() > 0)
                .unwrap_or(false),
            "{log} is written"
        );
        assert!(files.contains(&path), "{files:?}");
    }
    // Maija's package keeps her records (and so her address) for `package_ttl_days`, which
    // a process's clock cannot be moved past: only the addresses no holder knows are
    // looked for here; the in-process test above covers the package's expiry.
    let found = find(&files, &addresses);
    assert!(found.is_empty(), "raw addresses left on disk: {found:?}");
}

/// Every text and bytea column of every table of the database at `url` that holds
/// `address` in any case, as `table.column`.
async fn postgres_columns_holding(url: &str, address: &str) -> Vec<String> {
    let db = dsrelay_runtime::store::Db::connect(url)
        .await
        .expect("connect");
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text \
         FROM information_schema.columns WHERE table_schema = current_schema() \
         AND data_type IN ('text', 'character varying', 'bytea', 'json', 'jsonb')",
    )
    .fetch_all(&db.pool)
    .await
    .expect("columns");
    assert!(columns.len() > 10, "{columns:?}");
    let mut holding = Vec::new();
    for (table, column, ty) in columns {
        // bytea is searched as bytes; encoded protobuf keeps the address as UTF-8.
        let test = if ty == "bytea" {
            format!(
                "position(convert_to($1, 'UTF8') in \"{column}\") > 0 \
                 OR position(convert_to($2, 'UTF8') in \"{column}\") > 0 \
                 OR position(convert_to($3, 'UTF8') in \"{column}\") > 0"
            )
        } else {
            format!("lower(\"{column}\"::text) LIKE '%' || $2 || '%'")
        };
        let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM \"{table}\" WHERE {test}"))
            .bind(address)
            .bind(address.to_lowercase())
            .bind(address.to_uppercase())
            .fetch_one(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{table}.{column}: {e}"));
        if n > 0 {
            holding.push(format!("{table}.{column}"));
        }
    }
    db.pool.close().await;
    holding
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgotten_addresses_leave_no_row_on_postgres() {
    let Some(pair) = spawn_pair(PairOptions {
        backend: Backend::Postgres,
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let addresses = addresses("postgres");
    let mut ids = submit_all(&pair, &addresses).await;
    wait_completed(&pair, &ids).await;
    ids.push(submit_cancelled(&pair, &addresses[2], &addresses[0]).await);
    let urls = [
        pair.registry.database_url().to_string(),
        pair.processor.database_url().to_string(),
    ];
    let before = postgres_columns_holding(&urls[0], &addresses[0]).await;
    assert!(
        before.contains(&"requests.body".to_string()),
        "the body holds it before: {before:?}"
    );
    for clock in [pair.registry.clock(), pair.processor.clock()] {
        clock.expect("in process").advance(31 * DAY_MS);
    }
    let views = wait_forgotten(&pair, &ids, Duration::from_secs(20)).await;
    check_views(&pair, &views).await;
    audit_verifies(&pair).await;
    for url in &urls {
        for a in addresses.iter().chain([&MAIJA.to_string()]) {
            let holding = postgres_columns_holding(url, a).await;
            assert!(holding.is_empty(), "{a} left in {holding:?}");
        }
    }
    pair.stop().await;
}

/// A request the processor cannot forget (the path of its export folder is taken by a file,
/// which no deletion of a folder removes) is logged and tried again at every sweep, and never
/// holds back the requests accepted after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_be_forgotten_holds_back_no_other() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let mut crm = pair.crm();
    let mut stuck = Vec::new();
    for address in addresses("stuck") {
        stuck.push(
            crm.submit(erasure(&address))
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    wait_completed(&pair, &stuck).await;
    // Accepted after every stuck one, so the sweep (oldest first) reaches it last.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let free = crm
        .submit(erasure("forget.delta@forgetting.example"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    wait_completed(&pair, std::slice::from_ref(&free)).await;
    let exports = pair
        .dir()
        .join(crate::harness::PROCESSOR_DATA_DIR)
        .join("exports")
        .join(crate::harness::CONTROLLER);
    std::fs::create_dir_all(&exports).expect("exports folder");
    for id in &stuck {
        std::fs::write(exports.join(id), b"not a folder").expect("blocking file");
    }

    pair.registry
        .clock()
        .expect("in process")
        .advance(31 * DAY_MS);
    pair.processor
        .clock()
        .expect("in process")
        .advance(31 * DAY_MS);
    let url = pair.processor.database_url().to_string();
    let forgotten = |id: &str| {
        format!(
            "SELECT COUNT(*) FROM requests WHERE request_id = '{id}' AND forgotten_at IS NOT NULL"
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(&url, &forgotten(&free)).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request behind the stuck ones was never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &stuck {
        assert_eq!(count(&url, &forgotten(id)).await, 0, "{id} was forgotten");
    }
    // Once the obstacle is gone, the next sweep forgets them too.
    for id in &stuck {
        std::fs::remove_file(exports.join(id)).expect("unblock");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for id in &stuck {
        while count(&url, &forgotten(id)).await == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} was not forgotten once it could be"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    pair.stop().await;
}
