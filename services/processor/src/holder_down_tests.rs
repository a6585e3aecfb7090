//! A single task whose holder is marked unreachable, through the processor's real store and
//! runner (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server): its waits
//! 1, 2, 4 are acknowledged to the registry with a reason saying why nothing moves, and
//! logged; its attempts stay the calls made, and the holder's answer clears the reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dsrelay_connectors::{BoxFuture, BulkJob, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{Acknowledgement, DeliverRequest, RequestKind, TaskState};
use dsrelay_runtime::clock::date_label;
use dsrelay_runtime::testing::captured_logs;

use crate::store::TaskKey;
use crate::App;

/// What the log line of an acknowledged wait says.
const LOGGED: &str = "task waits for its holder, marked unreachable, without calling it";

/// Refuses the connection on its first call, erases two rows on the next.
#[derive(Default)]
struct DownOnce {
    calls: AtomicUsize,
}

impl Connector for DownOnce {
    fn kind_name(&self) -> &'static str {
        "down-once"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(ConnectorError::Transient("connection refused".into()));
            }
            Ok(Outcome::Completed {
                records_affected: 2,
                note: "deleted 2 rows".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }

    fn run_bulk<'a>(&'a self, _job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("single tasks only".into())) })
    }
}

/// The acknowledgements queued for `request_id`, in order.
async fn queued_acks(app: &App, request_id: &str) -> Vec<Acknowledgement> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE request_id = $1 ORDER BY sequence",
    )
    .bind(request_id)
    .fetch_all(&app.shared().store.db().pool)
    .await
    .expect("acks");
    payloads
        .iter()
        .map(|p| Acknowledgement::decode(p.as_slice()).expect("ack"))
        .collect()
}

/// An erasure whose holder failed once waits while the holder stays marked unreachable (each
/// wait here as if another task's probe had failed again): waits 1, 2 and 4 are acknowledged
/// IN_PROGRESS saying since when and why the holder is unreachable, when the next try comes
/// and until when, each logged once; wait 3 is not. The task's attempts stay 1, the calls
/// made, and its reason at the processor is the registry's. The holder's answer completes it
/// with the reason cleared. Before, the waits were only postponed (the registry saw no
/// reason) and each counted as an attempt.
async fn waits_for_an_unreachable_holder_are_acknowledged(
    database_url: &str,
    dir: &std::path::Path,
) {
    let logs = captured_logs();
    let holder = Arc::new(DownOnce::default());
    let connectors = HashMap::from([("crm".to_string(), holder.clone() as Arc<dyn Connector>)]);
    let config = crate::contract_tests::config(dir, database_url, &["acme"]);
    let app = App::with_connectors(config, connectors).await.expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let due = now + 86_400_000;
    // Under `cargo test` both variants log into the one capture of their process: each
    // counts only the lines of its own request.
    let backend = database_url
        .split_once(':')
        .map_or("db", |(scheme, _)| scheme);
    let request_id = format!("r-wait-{backend}");
    let req = DeliverRequest {
        request_id: request_id.clone(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(due)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let key = TaskKey {
        controller: "acme".into(),
        request_id: request_id.clone(),
        subprocessor: "crm".into(),
    };
    let step = || async {
        let jobs = (shared.store)
            .claim_tasks(shared.clock.now_ms(), 10, 30_000)
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 1);
        for job in jobs {
            crate::runner::run_task(&shared, job).await.expect("step");
        }
    };
    // The first call fails: the holder is marked unreachable since then. The mark takes
    // that instant from the clock during the step, which may be in a later second than a
    // read before it (the reason says it to the second): the label expected is the mark's,
    // checked to lie within the step.
    let before = shared.clock.now_ms();
    step().await;
    let after = shared.clock.now_ms();
    assert_eq!(holder.calls.load(Ordering::SeqCst), 1);
    let mark = shared
        .unavailable_until
        .mark("crm")
        .expect("the holder is marked");
    let since = mark.since;
    assert!(
        (before..=after).contains(&since),
        "{before} <= {since} <= {after}"
    );
    let mut seen = queued_acks(&app, &request_id).await.len();
    for wait in 1..=4 {
        shared.clock.advance(60_000);
        let now = shared.clock.now_ms();
        let until = now + 60_000;
        (shared.unavailable_until).failed("crm", now, until, "connection refused");
        step().await;
        assert_eq!(holder.calls.load(Ordering::SeqCst), 1, "wait {wait}");
        let acks = queued_acks(&app, &request_id).await;
        let new = &acks[seen..];
        seen = acks.len();
        let row = shared.store.manual_task(&key).await.expect("read");
        let row = row.expect("the task");
        assert_eq!(row.task.attempts, 1, "wait {wait}: the calls made");
        assert_eq!(row.task.state, TaskState::InProgress);
        assert!(row.task.call_started_at.is_none(), "{:?}", row.task);
        assert_eq!(row.last_error, "subprocessor crm is unreachable; waiting");
        let logged = logs
            .text()
            .lines()
            .filter(|l| l.contains(LOGGED) && l.contains(request_id.as_str()))
            .count();
        if wait == 3 {
            assert!(new.is_empty(), "wait 3: {new:#?}");
            assert_eq!(logged, 2, "one line per acknowledged wait");
            continue;
        }
        assert_eq!(new.len(), 1, "wait {wait}: {new:#?}");
        let ack = &new[0];
        assert_eq!(ack.state(), TaskState::InProgress);
        assert_eq!(
            ack.reason,
            format!(
                "waiting: subprocessor crm is unreachable since {} (connection refused); next \
                 try at {}, until {}",
                date_label(since),
                date_label(until),
                date_label(due)
            ),
            "wait {wait}"
        );
        assert_eq!(ack.attempt, 1, "wait {wait}");
        // The processor's `tasks list` says what the registry was told.
        assert_eq!(row.task.reason, ack.reason);
        assert_eq!(row.task.sequence, ack.sequence as i64);
        assert_eq!(logged, if wait == 4 { 3 } else { wait }, "wait {wait}");
    }
    // The mark ran out: the task probes the holder, which answers.
    shared.clock.advance(60_000);
    step().await;
    assert_eq!(holder.calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        shared.unavailable_until.mark("crm"),
        None,
        "the answer clears the mark"
    );
    let acks = queued_acks(&app, &request_id).await;
    for pair in acks.windows(2) {
        assert_eq!(pair[1].sequence, pair[0].sequence + 1);
    }
    let done = acks.last().expect("acks");
    assert_eq!(done.state(), TaskState::Completed);
    assert_eq!((done.reason.as_str(), done.attempt), ("", 2));
    let row = shared.store.manual_task(&key).await.expect("read");
    let row = row.expect("the task");
    assert_eq!((row.task.attempts, row.task.reason.as_str()), (2, ""));
}

on_both!(waits_for_an_unreachable_holder_are_acknowledged);
