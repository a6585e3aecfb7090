//! An operator's retry (RetryTask) of a task its holder REFUSED, through the processor's real
//! store and runner (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server)
//! and its operator API served over mutual TLS: a refusal is often fixed at the holder (its
//! configuration, an identity it can match by), after which the operator runs the task
//! again, its holder called under the same task key. Before, RetryTask answered "only a
//! FAILED task is retried", and the request stayed FAILED (overdue past its date, not
//! cancellable) for good.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dsrelay_connectors::{BoxFuture, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    DeliverRequest, ListManualTasksRequest, RequestKind, RetryTaskRequest, TaskRef, TaskState,
};

use crate::app::Shared;
use crate::contract_retry_tests::acks;
use crate::store::TaskKey;
use crate::App;

/// The example adapter's refusal of an erasure by customer number.
const REFUSAL: &str = "finds subscribers only by e-mail address or phone number";
const NOTE: &str = "the holder now matches customer numbers";

/// Refuses every task until `fixed`, then erases; records the task key of every call.
#[derive(Default)]
struct RefusesUntilFixed {
    fixed: AtomicBool,
    keys: Mutex<Vec<String>>,
}

impl Connector for RefusesUntilFixed {
    fn kind_name(&self) -> &'static str {
        "refuses-until-fixed"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            self.keys.lock().expect("keys").push(task.task_id.clone());
            Ok(if self.fixed.load(Ordering::SeqCst) {
                Outcome::Completed {
                    records_affected: 1,
                    note: "subscriber erased".into(),
                    files: Vec::new(),
                    erased: Vec::new(),
                }
            } else {
                Outcome::Refused {
                    reason: REFUSAL.into(),
                }
            })
        })
    }
}

fn key(id: &str) -> TaskKey {
    TaskKey {
        controller: "acme".into(),
        request_id: id.into(),
        subprocessor: "crm".into(),
    }
}

/// Claims and runs what is due now; how many tasks ran.
async fn step_now(shared: &Arc<Shared>) -> usize {
    let jobs = (shared.store)
        .claim_tasks(shared.clock.now_ms() + 10, 10, 30_000)
        .await
        .expect("claim");
    let n = jobs.len();
    for job in jobs {
        crate::runner::run_task(shared, job).await.expect("step");
    }
    n
}

async fn state_of(shared: &Shared, id: &str) -> TaskState {
    let row = (shared.store.manual_task(&key(id)).await)
        .expect("read")
        .expect("the task");
    row.task.state
}

/// The holder refuses two erasures; the controller cancels one. Listed, the other REFUSED
/// task can be retried and the cancelled one cannot, in RetryTask's words; RetryTask takes
/// the first (IN_PROGRESS, acknowledged with the operator's note as its reason), the fixed
/// holder is called under the same key and erases, and the task ends COMPLETED.
async fn a_refused_task_is_retried_once_its_holder_is_fixed(
    database_url: &str,
    dir: &std::path::Path,
) {
    let holder = Arc::new(RefusesUntilFixed::default());
    let connectors = HashMap::from([("crm".to_string(), holder.clone() as Arc<dyn Connector>)]);
    let config = crate::operator_api::tests::config(dir, database_url);
    let app = App::with_connectors(config, connectors).await.expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    for id in ["r-refused", "r-cancelled"] {
        let req = DeliverRequest {
            request_id: id.into(),
            kind: RequestKind::Erasure as i32,
            due_at: Some(timestamp_from_millis(now + 30 * 86_400_000)),
            ..Default::default()
        };
        (shared.store)
            .accept("acme", &req, &["crm".to_string()], None, now)
            .await
            .expect("accept");
    }
    assert_eq!(step_now(&shared).await, 2);
    for id in ["r-refused", "r-cancelled"] {
        assert_eq!(state_of(&shared, id).await, TaskState::Refused);
        let last = acks(&shared, id).await.pop().expect("acks");
        assert_eq!(
            (last.state(), last.reason.as_str()),
            (TaskState::Refused, REFUSAL)
        );
    }
    (shared.store)
        .cancel("acme", "r-cancelled", "withdrawn", now + 20)
        .await
        .expect("cancel");

    let (mut client, stop) = crate::operator_api::tests::serve(&shared, dir).await;
    let listed = client
        .list_manual_tasks(ListManualTasksRequest {
            states: vec![TaskState::Refused as i32],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let refusal = |id: &str| {
        let task = (listed.tasks.iter())
            .find(|t| t.task.as_ref().is_some_and(|r| r.request_id == id))
            .unwrap_or_else(|| panic!("{id} not listed: {listed:?}"));
        assert_eq!(task.state, TaskState::Refused as i32);
        task.retry_refusal.clone()
    };
    assert_eq!(refusal("r-refused"), "", "{listed:?}");
    let cancelled = refusal("r-cancelled");
    assert!(
        cancelled.contains("the controller cancelled its request"),
        "{cancelled}"
    );

    let retry = |id: &str| RetryTaskRequest {
        task: Some(TaskRef {
            controller: "acme".into(),
            request_id: id.into(),
            subprocessor: "crm".into(),
        }),
        note: NOTE.into(),
    };
    let status = client
        .retry_task(retry("r-cancelled"))
        .await
        .expect_err("a cancelled request's task");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.message(),
        format!("task acme/r-cancelled/crm: {cancelled}")
    );

    holder.fixed.store(true, Ordering::SeqCst);
    let retried = client
        .retry_task(retry("r-refused"))
        .await
        .expect("a retry of the refused task")
        .into_inner();
    let _ = stop.send(());
    let by = dsrelay_runtime::pki::dev_identity("operator", "ops");
    let retried_reason = format!("retried by {by}: {NOTE}");
    assert_eq!(retried.state, TaskState::InProgress as i32, "{retried:?}");
    assert_eq!(retried.reason, retried_reason);
    let ack = acks(&shared, "r-refused").await.pop().expect("acks");
    assert_eq!(ack.state(), TaskState::InProgress);
    assert_eq!(ack.reason, retried_reason);

    assert_eq!(step_now(&shared).await, 1);
    assert_eq!(state_of(&shared, "r-refused").await, TaskState::Completed);
    let done = acks(&shared, "r-refused").await.pop().expect("acks");
    assert_eq!(done.state(), TaskState::Completed, "{done:?}");
    assert_eq!(done.evidence.expect("evidence").records_affected, 1);
    assert_eq!(state_of(&shared, "r-cancelled").await, TaskState::Refused);
    // The holder was called again under the refused call's key.
    let keys = holder.keys.lock().expect("keys").clone();
    let refused_keys: Vec<&String> = keys.iter().filter(|k| k.contains("r-refused")).collect();
    assert_eq!(refused_keys.len(), 2, "{keys:?}");
    assert_eq!(refused_keys[0], refused_keys[1]);
}

on_both!(a_refused_task_is_retried_once_its_holder_is_fixed);
