//! An erasure kept in part under a legal obligation (RETAINED) at a holder where a contract
//! end of the same controller then deletes all of the controller's data and keeps, stripped
//! of the columns the erasure's identities match, what an obligation keeps (RETAINED too),
//! through the processor's real store (SQLite, and PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server) and runner. At the erasure's date the holder
//! would find nothing of the subject and answer "nothing left to erase": the erasure follows
//! the contract end's task instead, never calling the holder, and stays RETAINED until the
//! contract end's date; no COMPLETED certificate is signed while the rows are kept. Once the
//! contract end's own retention run erased them, the erasure completes, naming it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use dsrelay_connectors::{
    BoxFuture, BulkJob, Connector, ConnectorError, ErasedCount, Outcome, Phase, Task,
};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    Acknowledgement, ContractEnd, ContractEndChoice, ContractPhase, DeliverRequest, RequestKind,
    RequestParameters, TaskState,
};

use crate::app::Shared;
use crate::certificates::CertificateBody;
use crate::store::{TaskJob, TaskRow};
use crate::App;

const BASIS: &str = "Kirjanpitolaki 2:10 §";
/// How long after its first run the erasure's invoices are kept (ms).
const ERASURE_KEEPS: i64 = 5_000;
/// How long after its deletion the contract end's ledger rows are kept (ms).
const CONTRACT_END_KEEPS: i64 = 20_000;

/// What the holder does, shared with the test.
#[derive(Default)]
struct Ledger {
    /// The contract end's deletion stripped the kept rows of their match columns.
    stripped: AtomicBool,
    /// The contract end's retention run erased the kept rows.
    erased: AtomicBool,
    /// Retention runs of the erasure that reached the holder.
    erasure_runs: AtomicUsize,
    /// The contract end's deletion keeps nothing (COMPLETED at once, nothing stripped).
    keeps_nothing: bool,
}

/// A holder like the `sql` connector: an erasure keeps the invoices; its retention run finds
/// nothing once the match columns are stripped and answers COMPLETED "nothing left". A
/// contract end's deletion keeps the ledger rows, stripped; its retention run erases them.
struct Holder(Arc<Ledger>);

impl Connector for Holder {
    fn kind_name(&self) -> &'static str {
        "ledger"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        let outcome = match task.phase {
            Phase::RetentionExpired { .. } => {
                self.0.erasure_runs.fetch_add(1, Ordering::SeqCst);
                match self.0.stripped.load(Ordering::SeqCst) {
                    true => Outcome::Completed {
                        records_affected: 0,
                        note: "nothing left to erase".into(),
                        files: Vec::new(),
                        erased: Vec::new(),
                    },
                    false => Outcome::Completed {
                        records_affected: 2,
                        note: "invoices erased".into(),
                        files: Vec::new(),
                        erased: erased("invoices", 2),
                    },
                }
            }
            _ => Outcome::Retained {
                legal_basis: BASIS.into(),
                until_ms: task.now_ms + ERASURE_KEEPS,
                records_affected: 4,
                note: "customer erased, invoices kept".into(),
                erased: erased("customers", 4),
            },
        };
        Box::pin(async move { Ok(outcome) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        let outcome = match job.phase {
            Phase::RetentionExpired { .. } => {
                self.0.erased.store(true, Ordering::SeqCst);
                Outcome::Completed {
                    records_affected: 3,
                    note: "ledger rows erased".into(),
                    files: Vec::new(),
                    erased: erased("ledger", 3),
                }
            }
            _ if self.0.keeps_nothing => Outcome::Completed {
                records_affected: 9,
                note: "customers erased".into(),
                files: Vec::new(),
                erased: erased("customers", 9),
            },
            _ => {
                self.0.stripped.store(true, Ordering::SeqCst);
                Outcome::Retained {
                    legal_basis: BASIS.into(),
                    until_ms: job.now_ms + CONTRACT_END_KEEPS,
                    records_affected: 9,
                    note: "customers erased, ledger rows kept and stripped".into(),
                    erased: erased("customers", 9),
                }
            }
        };
        Box::pin(async move { Ok(outcome) })
    }
}

fn erased(target: &str, count: i64) -> Vec<ErasedCount> {
    vec![ErasedCount {
        target: target.into(),
        action: "deleted".into(),
        count,
    }]
}

async fn claim(shared: &Shared) -> Vec<TaskJob> {
    let lease_ms = shared.config.tasks.lease_ms as i64;
    (shared.store)
        .claim_tasks(shared.clock.now_ms(), 10, lease_ms)
        .await
        .expect("claim")
}

/// The claimed job of request `request_id`, out of `jobs`.
fn job_of(jobs: &mut Vec<TaskJob>, request_id: &str) -> TaskJob {
    let i = (jobs.iter())
        .position(|j| j.task.key.request_id == request_id)
        .unwrap_or_else(|| panic!("no job of {request_id}"));
    jobs.remove(i)
}

async fn task(shared: &Shared, request_id: &str) -> TaskRow {
    let tasks = shared.store.tasks("acme", request_id).await.expect("tasks");
    tasks.into_iter().next().expect("a task")
}

/// The erasure's acknowledgements, in order.
async fn acks(shared: &Shared) -> Vec<Acknowledgement> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE request_id = 'r-1' ORDER BY sequence",
    )
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("acks");
    (payloads.iter())
        .map(|p| Acknowledgement::decode(p.as_slice()).expect("ack"))
        .collect()
}

/// The certificates issued for `request_id`, in order.
async fn certificates(shared: &Shared, request_id: &str) -> Vec<(String, CertificateBody)> {
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT id, body FROM certificates WHERE request_id = $1 ORDER BY sequence")
            .bind(request_id)
            .fetch_all(&shared.store.db().pool)
            .await
            .expect("certificates");
    (rows.into_iter())
        .map(|(id, b)| (id, serde_json::from_slice(&b).expect("certificate body")))
        .collect()
}

async fn an_erasure_follows_the_contract_end_that_keeps_its_rest(
    database_url: &str,
    dir: &std::path::Path,
) {
    let ledger = Arc::new(Ledger::default());
    let holder = Arc::new(Holder(ledger.clone())) as Arc<dyn Connector>;
    let config = crate::contract_tests::config(dir, database_url, &["acme"]);
    let app = App::with_connectors(config, [("crm".to_string(), holder)].into())
        .await
        .expect("app");
    let shared = app.shared();
    let t0 = shared.clock.now_ms();
    let crm = ["crm".to_string()];

    // The erasure keeps the invoices until t0 + 5 s.
    let erasure = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(t0 + 600_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &erasure, &crm, None, t0)
        .await
        .expect("accept erasure");
    let job = job_of(&mut claim(&shared).await, "r-1");
    crate::runner::run_task(&shared, job)
        .await
        .expect("erasure");
    let kept = task(&shared, "r-1").await;
    assert_eq!(kept.state, TaskState::Retained);
    assert!(kept.retain_until >= Some(t0 + ERASURE_KEEPS), "{kept:?}");

    // The contract ends with deletion: the controller's data goes, the ledger rows are kept
    // (stripped) until t0 + 20 s.
    let contract_end = DeliverRequest {
        request_id: "ce-1".into(),
        kind: RequestKind::ContractEnd as i32,
        parameters: Some(RequestParameters {
            contract_end: Some(ContractEnd {
                choice: ContractEndChoice::Delete as i32,
                effective_at: Some(timestamp_from_millis(t0)),
                grace_ends_at: Some(timestamp_from_millis(t0)),
                return_confirmed: false,
                transfer_recipient: String::new(),
            }),
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(t0 + 600_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &contract_end, &crm, None, t0)
        .await
        .expect("accept contract end");
    let job = job_of(&mut claim(&shared).await, "ce-1");
    crate::runner::run_task(&shared, job)
        .await
        .expect("contract end");
    let deleted = task(&shared, "ce-1").await;
    assert_eq!(
        (deleted.state, deleted.phase),
        (TaskState::Retained, ContractPhase::Done)
    );
    let ce_until = deleted.retain_until.expect("the contract end's date");
    assert!(ce_until >= t0 + CONTRACT_END_KEEPS);
    assert!(ledger.stripped.load(Ordering::SeqCst));

    // The erasure's date: it stays RETAINED until the contract end's, without asking the
    // holder (which would find nothing and say so).
    shared.clock.advance(ERASURE_KEEPS + 1_000);
    let job = job_of(&mut claim(&shared).await, "r-1");
    crate::runner::run_task(&shared, job)
        .await
        .expect("erasure's retention run");
    let waiting = task(&shared, "r-1").await;
    assert_eq!(
        (
            waiting.state,
            waiting.retain_until,
            waiting.records_affected
        ),
        (TaskState::Retained, Some(ce_until), 4),
        "{waiting:?}"
    );
    assert_eq!(ledger.erasure_runs.load(Ordering::SeqCst), 0);
    assert_eq!(waiting.legal_basis, BASIS);
    assert!(
        waiting.note.contains("contract end ce-1's retention"),
        "{waiting:?}"
    );
    let ack = acks(&shared).await.pop().expect("an acknowledgement");
    assert_eq!(ack.state(), TaskState::Retained);
    assert_eq!(ack.retain_until, Some(timestamp_from_millis(ce_until)));
    assert_eq!(ack.legal_basis, BASIS);
    let issued = certificates(&shared, "r-1").await;
    assert!(
        issued.iter().all(|(_, c)| c.task_state == "RETAINED"),
        "{:?}",
        issued
            .iter()
            .map(|(_, c)| &c.task_state)
            .collect::<Vec<_>>()
    );
    // Nothing is due before the contract end's date.
    assert!(claim(&shared).await.is_empty());

    // The contract end's date: the erasure, run first, finds its retention run due and
    // waits for it, still without asking the holder.
    shared.clock.advance(CONTRACT_END_KEEPS);
    let mut jobs = claim(&shared).await;
    let erasure_job = job_of(&mut jobs, "r-1");
    let contract_job = job_of(&mut jobs, "ce-1");
    crate::runner::run_task(&shared, erasure_job)
        .await
        .expect("erasure's second run");
    let waiting = task(&shared, "r-1").await;
    assert_eq!(waiting.state, TaskState::Retained, "{waiting:?}");
    assert!(
        waiting.reason.contains("waits for it") && waiting.reason.contains("ce-1"),
        "{waiting:?}"
    );
    assert_eq!(ledger.erasure_runs.load(Ordering::SeqCst), 0);
    let before = acks(&shared).await.len();

    // The contract end erases the ledger rows at its date.
    crate::runner::run_task(&shared, contract_job)
        .await
        .expect("contract end's retention run");
    assert!(ledger.erased.load(Ordering::SeqCst));
    assert_eq!(task(&shared, "ce-1").await.state, TaskState::Completed);
    let (last_ce_certificate, _) = certificates(&shared, "ce-1")
        .await
        .pop()
        .expect("a contract end certificate");

    // The erasure's next look completes it, naming the contract end, counting nothing more.
    shared
        .clock
        .advance(shared.config.tasks.confirm_interval_ms as i64 + 1);
    let job = job_of(&mut claim(&shared).await, "r-1");
    crate::runner::run_task(&shared, job)
        .await
        .expect("erasure's last run");
    assert_eq!(ledger.erasure_runs.load(Ordering::SeqCst), 0);
    let done = task(&shared, "r-1").await;
    assert_eq!(
        (done.state, done.records_affected),
        (TaskState::Completed, 4),
        "{done:?}"
    );
    assert!(done.note.contains("contract end ce-1"), "{done:?}");
    assert!(done.note.contains(&last_ce_certificate), "{done:?}");
    let acks = acks(&shared).await;
    assert_eq!(acks.len(), before + 1, "one acknowledgement: the COMPLETED");
    assert_eq!(acks.last().map(|a| a.state()), Some(TaskState::Completed));
    let issued = certificates(&shared, "r-1").await;
    let (last_id, last) = issued.last().expect("certificates");
    assert_eq!(last.task_state, "COMPLETED");
    assert_eq!(last.records_affected, 4);
    assert!(last.retained.is_empty(), "{last:?}");
    assert!(last.erased.is_empty(), "{last:?}");
    let (earlier_id, earlier) = &issued[issued.len() - 2];
    assert_eq!(earlier.task_state, "RETAINED");
    assert_eq!(last.follows.as_ref(), Some(earlier_id));
    assert_ne!(last_id, earlier_id);
}

/// A contract end whose deletion at the holder ended before the erasure arrived did not strip
/// what the erasure found: the erasure's retention run asks the holder, as without one.
async fn a_contract_end_over_before_the_erasure_arrived_is_not_followed(
    database_url: &str,
    dir: &std::path::Path,
) {
    let ledger = Arc::new(Ledger {
        keeps_nothing: true,
        ..Default::default()
    });
    let holder = Arc::new(Holder(ledger.clone())) as Arc<dyn Connector>;
    let config = crate::contract_tests::config(dir, database_url, &["acme"]);
    let app = App::with_connectors(config, [("crm".to_string(), holder)].into())
        .await
        .expect("app");
    let shared = app.shared();
    let t0 = shared.clock.now_ms();
    let crm = ["crm".to_string()];
    let contract_end = DeliverRequest {
        request_id: "ce-1".into(),
        kind: RequestKind::ContractEnd as i32,
        parameters: Some(RequestParameters {
            contract_end: Some(ContractEnd {
                choice: ContractEndChoice::Delete as i32,
                effective_at: Some(timestamp_from_millis(t0)),
                grace_ends_at: Some(timestamp_from_millis(t0)),
                return_confirmed: false,
                transfer_recipient: String::new(),
            }),
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(t0 + 600_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &contract_end, &crm, None, t0)
        .await
        .expect("accept contract end");
    let job = job_of(&mut claim(&shared).await, "ce-1");
    crate::runner::run_task(&shared, job)
        .await
        .expect("contract end");
    assert_eq!(task(&shared, "ce-1").await.state, TaskState::Completed);

    shared.clock.advance(1_000);
    let now = shared.clock.now_ms();
    let erasure = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &erasure, &crm, None, now)
        .await
        .expect("accept erasure");
    let job = job_of(&mut claim(&shared).await, "r-1");
    crate::runner::run_task(&shared, job)
        .await
        .expect("erasure");
    assert_eq!(task(&shared, "r-1").await.state, TaskState::Retained);

    shared.clock.advance(ERASURE_KEEPS + 1_000);
    let job = job_of(&mut claim(&shared).await, "r-1");
    crate::runner::run_task(&shared, job)
        .await
        .expect("erasure's retention run");
    assert_eq!(ledger.erasure_runs.load(Ordering::SeqCst), 1);
    let done = task(&shared, "r-1").await;
    assert_eq!(
        (done.state, done.records_affected, done.note.as_str()),
        (TaskState::Completed, 6, "invoices erased"),
        "{done:?}"
    );
}

on_both!(
    an_erasure_follows_the_contract_end_that_keeps_its_rest,
    a_contract_end_over_before_the_erasure_arrived_is_not_followed
);
