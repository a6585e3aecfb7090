//! An operator's retry (RetryTask) of a FAILED contract end task, through the processor's
//! real store and runner (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a
//! server): the task resumes in the phase it failed in, acknowledged IN_PROGRESS with the
//! operator's note as its reason, and runs on to its end. Before, RetryTask refused every
//! contract end task, and one that failed could never finish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_connectors::{
    BoxFuture, BulkJob, BulkOp, BulkProgress, Connector, ConnectorError, ErasedCount, Outcome,
    Phase, Task,
};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    Acknowledgement, ContractEnd, ContractEndChoice, ContractPhase, DeliverRequest, RequestKind,
    RequestParameters, TaskState,
};

use crate::app::Shared;
use crate::store::{retry_refusal, Retried, TaskKey};
use crate::task_machine::{decide, Context, Decision, Event};
use crate::App;

const NOTE: &str = "contacts table restored";

/// What the erasure's first call reports before it fails.
const HALFWAY: BulkProgress = BulkProgress {
    subjects_done: 10,
    subjects_total: 40,
    records_done: 25,
    records_total: 100,
    erased: Vec::new(),
};

/// What each call of the holder was handed.
#[derive(Debug, Clone, PartialEq)]
struct Call {
    op: BulkOp,
    phase: Phase,
    recorded: BulkProgress,
    interrupted: bool,
}

/// Fails its first call for good (an erasure after reporting [`HALFWAY`]), then does the
/// work: an export finds nothing held, an erasure counts all 100 records, those of the
/// failed call among them (as a connector resuming from the recorded progress does).
#[derive(Default)]
struct FailsFirst {
    calls: AtomicUsize,
    seen: Mutex<Vec<Call>>,
}

impl Connector for FailsFirst {
    fn kind_name(&self) -> &'static str {
        "fails-first"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            self.seen.lock().expect("seen").push(Call {
                op: job.op,
                phase: job.phase.clone(),
                recorded: job.recorded_progress.clone(),
                interrupted: job.interrupted,
            });
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                if job.op == BulkOp::Erase {
                    job.progress.report(HALFWAY);
                    // Long enough for the runner to record it (every 20 ms here).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                return Err(ConnectorError::Permanent(
                    "relation \"contacts\" does not exist".into(),
                ));
            }
            Ok(match job.op {
                BulkOp::Export => Outcome::NotFound {
                    note: "nothing held".into(),
                },
                BulkOp::Erase => {
                    job.progress.report(BulkProgress {
                        subjects_done: 40,
                        records_done: 100,
                        ..HALFWAY
                    });
                    Outcome::Completed {
                        records_affected: 100,
                        note: "erased the controller's data".into(),
                        files: Vec::new(),
                        erased: vec![ErasedCount {
                            target: "customers".into(),
                            action: "deleted".into(),
                            count: 40,
                        }],
                    }
                }
            })
        })
    }
}

/// A processor in `dir` on `database_url` whose subprocessor `crm` is `holder`, with contract
/// end `id` accepted: `choice`, effective now, due in a minute.
pub(crate) async fn with_contract_end(
    dir: &std::path::Path,
    database_url: &str,
    holder: Arc<dyn Connector>,
    id: &str,
    choice: ContractEndChoice,
) -> App {
    let connectors = HashMap::from([("crm".to_string(), holder)]);
    let config = crate::contract_tests::config(dir, database_url, &["acme"]);
    let app = App::with_connectors(config, connectors).await.expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: id.into(),
        kind: RequestKind::ContractEnd as i32,
        parameters: Some(RequestParameters {
            contract_end: Some(ContractEnd {
                choice: choice as i32,
                effective_at: Some(timestamp_from_millis(now)),
                grace_ends_at: Some(timestamp_from_millis(now)),
                return_confirmed: false,
                transfer_recipient: String::new(),
            }),
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(now + 60_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    app
}

pub(crate) fn key(id: &str) -> TaskKey {
    TaskKey {
        controller: "acme".into(),
        request_id: id.into(),
        subprocessor: "crm".into(),
    }
}

/// Claims and runs what is due now; how many tasks ran.
pub(crate) async fn step_now(shared: &Arc<Shared>) -> usize {
    let jobs = (shared.store)
        .claim_tasks(shared.clock.now_ms(), 10, 30_000)
        .await
        .expect("claim");
    let n = jobs.len();
    for job in jobs {
        crate::runner::run_task(shared, job).await.expect("step");
    }
    n
}

/// The acknowledgements queued for `id`, in order.
pub(crate) async fn acks(shared: &Shared, id: &str) -> Vec<Acknowledgement> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE request_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("acks");
    payloads
        .iter()
        .map(|p| Acknowledgement::decode(p.as_slice()).expect("ack"))
        .collect()
}

/// `id`'s uploads as `(retired)` flags.
async fn uploads(shared: &Shared, id: &str) -> Vec<bool> {
    let rows: Vec<Option<i64>> =
        sqlx::query_scalar("SELECT done_at FROM uploads WHERE request_id = $1")
            .bind(id)
            .fetch_all(&shared.store.db().pool)
            .await
            .expect("uploads");
    rows.into_iter().map(|d| d.is_some()).collect()
}

/// What ListManualTasks would say of the FAILED task `id` (its `retry_refusal`), then the
/// operator's retry of it, as RetryTask records it.
pub(crate) async fn retry(shared: &Shared, id: &str) -> crate::store::ManualRow {
    let key = key(id);
    let row = (shared.store.manual_task(&key).await)
        .expect("read")
        .expect("the task");
    assert_eq!(row.task.state, TaskState::Failed, "{row:?}");
    let standings = (shared.store.retry_standings(std::slice::from_ref(&row)))
        .await
        .expect("standings");
    assert_eq!(retry_refusal(&standings[&key], true), None);
    let now = shared.clock.now_ms();
    let event = Event::OperatorRetry {
        note: NOTE,
        by: "ops",
    };
    let t = match decide(&row.task.current(), event, &Context::at(now)) {
        Decision::Move(t) => t,
        other => panic!("{other:?}"),
    };
    match (shared.store)
        .retry_task(&key, row.task.sequence, &t, now, "ops", true)
        .await
        .expect("retry")
    {
        Retried::Retried(row) => *row,
        other => panic!("{other:?}"),
    }
}

/// A contract end whose erasure failed for good after erasing part resumes its erasure:
/// IN_PROGRESS in DELETING with the counts recorded (acknowledged so, the operator's note as
/// its reason), the holder handed that progress to count on from, and COMPLETED with the
/// holder's count, the first call's records counted once.
async fn a_failed_erasure_is_resumed(database_url: &str, dir: &std::path::Path) {
    let holder = Arc::new(FailsFirst::default());
    let app = with_contract_end(
        dir,
        database_url,
        holder.clone(),
        "ce-del",
        ContractEndChoice::Delete,
    )
    .await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let failed = acks(&shared, "ce-del").await;
    let last = failed.last().expect("acks");
    assert_eq!(last.state(), TaskState::Failed, "{failed:#?}");
    let p = last.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Deleting);
    assert_eq!((p.records_done, p.records_total), (25, 100), "{p:?}");

    let row = retry(&shared, "ce-del").await;
    assert_eq!(row.task.state, TaskState::InProgress);
    assert_eq!(row.task.phase, ContractPhase::Deleting);
    assert_eq!(row.task.counts, HALFWAY);
    assert_eq!(row.task.attempts, 0);
    let retried = acks(&shared, "ce-del").await;
    assert_eq!(retried.len(), failed.len() + 1);
    let ack = retried.last().expect("acks");
    assert_eq!(ack.state(), TaskState::InProgress);
    assert_eq!(ack.reason, format!("retried by ops: {NOTE}"));
    let p = ack.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Deleting);
    assert_eq!(p.records_done, 25);

    assert_eq!(step_now(&shared).await, 1);
    let seen = holder.seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[1],
        Call {
            op: BulkOp::Erase,
            phase: Phase::Start,
            recorded: HALFWAY,
            interrupted: false,
        }
    );
    let done = acks(&shared, "ce-del").await;
    let last = done.last().expect("acks");
    assert_eq!(last.state(), TaskState::Completed, "{done:#?}");
    let p = last.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Done);
    assert_eq!(p.records_done, 100);
    let evidence = last.evidence.as_ref().expect("evidence");
    assert_eq!(evidence.records_affected, 100);
    assert!(last.certificate.is_some(), "{last:?}");
}

on_both!(a_failed_erasure_is_resumed);

/// A RETURN_THEN_DELETE whose export failed for good exports again from the start: the failed
/// run's retired upload goes, the counts start from zero, and the new export's part is
/// queued for the registry, the task staying RETURNING until it is there.
async fn a_failed_return_exports_again(database_url: &str, dir: &std::path::Path) {
    let holder = Arc::new(FailsFirst::default());
    let app = with_contract_end(
        dir,
        database_url,
        holder.clone(),
        "ce-ret",
        ContractEndChoice::ReturnThenDelete,
    )
    .await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let failed = acks(&shared, "ce-ret").await;
    let last = failed.last().expect("acks");
    assert_eq!(last.state(), TaskState::Failed, "{failed:#?}");
    assert_eq!(
        last.progress.expect("progress").phase(),
        ContractPhase::Returning
    );
    assert_eq!(
        uploads(&shared, "ce-ret").await,
        [true],
        "its retired upload"
    );

    let row = retry(&shared, "ce-ret").await;
    assert_eq!(row.task.state, TaskState::InProgress);
    assert_eq!(row.task.phase, ContractPhase::Returning);
    assert_eq!(row.task.counts, BulkProgress::default());
    assert!(uploads(&shared, "ce-ret").await.is_empty());
    let ack = acks(&shared, "ce-ret").await.pop().expect("acks");
    assert_eq!(ack.state(), TaskState::InProgress);
    assert_eq!(ack.reason, format!("retried by ops: {NOTE}"));
    assert_eq!(
        ack.progress.expect("progress").phase(),
        ContractPhase::Returning
    );

    assert_eq!(step_now(&shared).await, 1);
    let seen = holder.seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[1].op, &seen[1].phase),
        (BulkOp::Export, &Phase::Start)
    );
    let row = (shared.store.manual_task(&key("ce-ret")).await)
        .expect("read")
        .expect("the task");
    assert_eq!(row.task.state, TaskState::InProgress, "{row:?}");
    assert_eq!(row.task.phase, ContractPhase::Returning);
    assert_eq!(uploads(&shared, "ce-ret").await, [false], "a live upload");
}

on_both!(a_failed_return_exports_again);

/// A contract end task that failed at its start (its terms missing), before its holder was
/// called, is PENDING again in SCHEDULED, and the claim starts it as the terms then say.
async fn a_task_failed_at_its_start_starts_again(database_url: &str, dir: &std::path::Path) {
    let holder = Arc::new(FailsFirst::default());
    // Its one failure is spent elsewhere: this test is about the start.
    holder.calls.store(1, Ordering::SeqCst);
    let app = with_contract_end(
        dir,
        database_url,
        holder.clone(),
        "ce-sch",
        ContractEndChoice::Delete,
    )
    .await;
    let shared = app.shared();
    let move_terms = |from: &'static str, to: &'static str| {
        let pool = shared.store.db().pool.clone();
        async move {
            sqlx::query("UPDATE contract_ends SET request_id = $1 WHERE request_id = $2")
                .bind(to)
                .bind(from)
                .execute(&pool)
                .await
                .expect("move terms");
        }
    };
    move_terms("ce-sch", "elsewhere").await;
    assert_eq!(step_now(&shared).await, 1);
    let failed = acks(&shared, "ce-sch").await;
    let last = failed.last().expect("acks");
    assert_eq!(last.state(), TaskState::Failed, "{failed:#?}");
    assert!(last.reason.contains("terms are missing"), "{}", last.reason);
    move_terms("elsewhere", "ce-sch").await;

    let row = retry(&shared, "ce-sch").await;
    assert_eq!(row.task.state, TaskState::Pending);
    assert_eq!(row.task.phase, ContractPhase::Scheduled);
    let ack = acks(&shared, "ce-sch").await.pop().expect("acks");
    assert_eq!(ack.state(), TaskState::Pending);
    assert_eq!(ack.reason, format!("retried by ops: {NOTE}"));

    assert_eq!(step_now(&shared).await, 1);
    let done = acks(&shared, "ce-sch").await.pop().expect("acks");
    assert_eq!(done.state(), TaskState::Completed, "{done:?}");
    assert!(holder.seen.lock().expect("seen").len() == 1);
}

on_both!(a_task_failed_at_its_start_starts_again);
