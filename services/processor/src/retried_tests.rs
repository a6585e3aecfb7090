//! A single task whose holder is down, through the processor's real store and runner (SQLite,
//! and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server): the failed attempt is
//! acknowledged to the registry as retried, and the holder's words kept for operators.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dsrelay_connectors::{BoxFuture, BulkJob, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{Acknowledgement, DeliverRequest, RequestKind, TaskState};

use crate::store::TaskKey;
use crate::App;

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

/// An erasure whose holder refused the connection is acknowledged IN_PROGRESS with a reason
/// saying so, the holder's words kept as the task's last error; the next attempt completes
/// it. Before, the failure was only postponed: the registry saw nothing until the outcome.
async fn a_failed_attempt_is_acknowledged_as_retried(database_url: &str, dir: &std::path::Path) {
    let connectors = HashMap::from([(
        "crm".to_string(),
        Arc::new(DownOnce::default()) as Arc<dyn Connector>,
    )]);
    let config = crate::contract_tests::config(dir, database_url, &["acme"]);
    let app = App::with_connectors(config, connectors).await.expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-down".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 86_400_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
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
    step().await;
    let acks = queued_acks(&app, "r-down").await;
    assert_eq!(acks.len(), 2, "{acks:#?}");
    let retried = &acks[1];
    assert_eq!(retried.state(), TaskState::InProgress);
    assert!(
        retried
            .reason
            .starts_with("erasure at subprocessor crm: attempt 1 failed at 20")
            && retried
                .reason
                .contains(": connection refused; next attempt at 20"),
        "{}",
        retried.reason
    );
    assert!(
        retried.reason.contains(", retrying until 20"),
        "{}",
        retried.reason
    );
    assert!(retried.progress.is_none());
    let key = TaskKey {
        controller: "acme".into(),
        request_id: "r-down".into(),
        subprocessor: "crm".into(),
    };
    let row = shared.store.manual_task(&key).await.expect("read");
    let row = row.expect("the task");
    assert_eq!(row.last_error, "connection refused");
    assert_eq!(row.task.sequence, retried.sequence as i64);

    shared.clock.advance(10_000);
    step().await;
    let acks = queued_acks(&app, "r-down").await;
    assert_eq!(acks.len(), 3, "{acks:#?}");
    for pair in acks.windows(2) {
        assert_eq!(pair[1].sequence, pair[0].sequence + 1);
    }
    assert_eq!(acks[2].state(), TaskState::Completed);
}

on_both!(a_failed_attempt_is_acknowledged_as_retried);
