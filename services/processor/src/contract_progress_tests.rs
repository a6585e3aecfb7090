//! A contract end task's progress counts, through the processor's real store and runner
//! (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server): a failed call's
//! last progress is kept with the FAILED task, an erasure resumed after a failure or a
//! cut-off call reports the whole run's counts (or an unknown total where the count misses
//! records it cannot number), a return cancelled before its delivery keeps what its
//! export counted, and a manual holder's return or deletion counts the records its operator
//! confirmed (CompleteManualTask over the real operator API).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_connectors::manual::ManualConfig;
use dsrelay_connectors::{
    BoxFuture, BulkJob, BulkOp, BulkProgress, Connector, ConnectorConfig, ConnectorError,
    ErasedCount, Outcome, Task,
};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient;
use dsrelay_proto::v1::processor_operator_service_server::ProcessorOperatorServiceServer;
use dsrelay_proto::v1::{
    CompleteManualTaskRequest, ContractEnd, ContractEndChoice, ContractPhase, ContractProgress,
    DeliverRequest, ListContractEndsRequest, ManualTask, RequestKind, RequestParameters, TaskRef,
    TaskState, TaskStatus,
};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use tokio::sync::Notify;

use crate::operator_api::OperatorApi;

use crate::contract_retry_tests::{acks, key, retry, step_now, with_contract_end};

/// What the erasure's first call reports before it fails: 25 of the 100 records counted at
/// its start. It erased 30 (12 subjects) by then; the last 5 after its report.
const REPORTED: BulkProgress = BulkProgress {
    subjects_done: 10,
    subjects_total: 40,
    records_done: 25,
    records_total: 100,
    erased: Vec::new(),
};

/// A holder of 40 subjects (100 records) whose erasure's first call erases 12 (30 records),
/// reports [`REPORTED`] and fails for good at once, before the runner's progress interval
/// passed. The next call goes on from the recorded progress as the SQL connector does: that
/// progress plus what is left now (28 subjects, 70 records).
#[derive(Default)]
struct FailsAtOnce {
    calls: AtomicUsize,
}

impl Connector for FailsAtOnce {
    fn kind_name(&self) -> &'static str {
        "fails-at-once"
    }

    fn supports(&self, _kind: dsrelay_proto::v1::RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                job.progress.report(REPORTED);
                return Err(ConnectorError::Permanent(
                    "relation \"contacts\" does not exist".into(),
                ));
            }
            let earlier = &job.recorded_progress;
            let (subjects, records) = (earlier.subjects_done + 28, earlier.records_done + 70);
            job.progress.report(BulkProgress {
                subjects_done: earlier.subjects_done,
                subjects_total: subjects,
                records_done: earlier.records_done,
                records_total: records,
                erased: Vec::new(),
            });
            job.progress.report(BulkProgress {
                subjects_done: subjects,
                subjects_total: subjects,
                records_done: records,
                records_total: records,
                erased: Vec::new(),
            });
            Ok(Outcome::Completed {
                records_affected: i64::try_from(records).expect("count"),
                note: "erased the controller's data".into(),
                files: Vec::new(),
                erased: vec![ErasedCount {
                    target: "customers".into(),
                    action: "deleted".into(),
                    count: i64::try_from(subjects).expect("count"),
                }],
            })
        })
    }
}

/// Runs the one task's step until its holder signals `called`, cuts the call off (as a
/// shutdown does, its answer never recorded), then claims the task again and runs the step
/// that resumes it.
pub(crate) async fn cut_off_then_resumed(shared: &Arc<crate::app::Shared>, called: &Notify) {
    let claim = || async {
        let jobs = (shared.store)
            .claim_tasks(shared.clock.now_ms(), 10, 30_000)
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 1);
        jobs.into_iter().next().expect("job")
    };
    let first = {
        let (shared, job) = (shared.clone(), claim().await);
        tokio::spawn(async move { crate::runner::run_task(&shared, job).await })
    };
    tokio::time::timeout(Duration::from_secs(10), called.notified())
        .await
        .expect("the holder was called");
    shared.abandon.send_replace(true);
    first.await.expect("first runner").expect("first step");
    shared.abandon.send_replace(false);
    crate::runner::run_task(shared, claim().await)
        .await
        .expect("resumed step");
}

/// The signed body of `id`'s last certificate.
pub(crate) async fn last_certificate(shared: &crate::app::Shared, id: &str) -> serde_json::Value {
    let bodies: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT body FROM certificates WHERE request_id = $1 ORDER BY sequence")
            .bind(id)
            .fetch_all(&shared.store.db().pool)
            .await
            .expect("certificates");
    serde_json::from_slice(bodies.last().expect("a certificate")).expect("json")
}

fn counts(p: &ContractProgress) -> (u64, u64, u64, u64) {
    (
        p.subjects_done,
        p.subjects_total,
        p.records_done,
        p.records_total,
    )
}

/// An erasure that fails for good right after reporting progress: the FAILED task keeps
/// that progress (what was done is still done), acknowledged, in its row, and handed to the
/// operator's retry; the retried erasure's counts are the whole run's (the total counted
/// when the deletion began), never only what the resumed call counted, and at its end the
/// certificate says how many records its count may miss.
async fn a_failed_erasure_keeps_and_resumes_its_counts(url: &str, dir: &std::path::Path) {
    let holder = Arc::new(FailsAtOnce::default());
    let app = with_contract_end(dir, url, holder, "ce-p", ContractEndChoice::Delete).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let failed = acks(&shared, "ce-p").await;
    let last = failed.last().expect("acks");
    assert_eq!(last.state(), TaskState::Failed, "{failed:#?}");
    let p = last.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Deleting);
    assert_eq!(counts(&p), (10, 40, 25, 100), "{p:?}");

    let row = retry(&shared, "ce-p").await;
    assert_eq!(row.task.counts, REPORTED);
    assert_eq!(step_now(&shared).await, 1);
    let done = acks(&shared, "ce-p").await;
    let last = done.last().expect("acks");
    assert_eq!(last.state(), TaskState::Completed, "{done:#?}");
    let p = last.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Done);
    // 95 records counted (25 before, 70 after), of the 100 counted when the deletion began:
    // the 5 the failed call erased after its report are not counted, and the total says so.
    assert_eq!(counts(&p), (38, 40, 95, 100), "{p:?}");
    for ack in &done[failed.len()..] {
        let p = ack.progress.expect("progress");
        assert_eq!((p.subjects_total, p.records_total), (40, 100), "{ack:?}");
    }
    let body = last_certificate(&shared, "ce-p").await;
    assert_eq!(body["records_affected"], 95, "{body}");
    assert_eq!(body["uncounted"]["records"], 5, "{body}");
}

on_both!(a_failed_erasure_keeps_and_resumes_its_counts);

/// A holder whose erasure reports its totals as it starts, then fails in a way that may
/// pass, at every attempt (the sql connector with its database locked).
struct LockedAtEveryAttempt;

impl Connector for LockedAtEveryAttempt {
    fn kind_name(&self) -> &'static str {
        "locked"
    }

    fn supports(&self, _kind: dsrelay_proto::v1::RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            job.progress
                .record_now(BulkProgress::counts(0, 6, 0, 26))
                .await?;
            Err(ConnectorError::Transient("database is locked".into()))
        })
    }
}

/// The reason a failed attempt leaves (what failed, at which attempt, when the next comes)
/// stays with the task while the holder only reports again the totals it reported before:
/// that is no progress, and the registry would otherwise show "deleting" with no reason
/// between the attempts whose failure is sent (1, 2, 4, 8, ...).
async fn a_holder_repeating_its_totals_keeps_the_failed_attempts_reason(
    url: &str,
    dir: &std::path::Path,
) {
    let holder = Arc::new(LockedAtEveryAttempt);
    let app = with_contract_end(dir, url, holder, "ce-l", ContractEndChoice::Delete).await;
    let shared = app.shared();
    for attempt in 1..=3 {
        assert_eq!(step_now(&shared).await, 1, "attempt {attempt}");
        let row = (shared.store.manual_task(&key("ce-l")).await)
            .expect("read")
            .expect("the task");
        assert_eq!(row.task.state, TaskState::InProgress, "{row:?}");
        assert!(
            row.task.reason.contains("database is locked"),
            "after attempt {attempt}: {row:?}"
        );
        let last = acks(&shared, "ce-l").await.pop().expect("acks");
        assert!(
            last.reason.contains("database is locked"),
            "the last acknowledgement after attempt {attempt}: {last:?}"
        );
        shared.clock.advance(10_000);
    }
}

on_both!(a_holder_repeating_its_totals_keeps_the_failed_attempts_reason);

/// An erasure whose first call is cut off before it reported anything: what it erased is
/// counted nowhere, so the resumed call's counts are not the whole, and their total is
/// reported as unknown (0), its done count what was counted.
struct CutOffSilent {
    calls: AtomicUsize,
    called: Notify,
}

impl Connector for CutOffSilent {
    fn kind_name(&self) -> &'static str {
        "cut-off-silent"
    }

    fn supports(&self, _kind: dsrelay_proto::v1::RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                self.called.notify_one();
                std::future::pending::<()>().await;
            }
            assert!(job.interrupted);
            let left = BulkProgress {
                subjects_done: 0,
                subjects_total: 20,
                records_done: 0,
                records_total: 50,
                erased: Vec::new(),
            };
            job.progress.report(left.clone());
            job.progress.report(BulkProgress {
                subjects_done: 20,
                records_done: 50,
                ..left
            });
            Ok(Outcome::Completed {
                records_affected: 50,
                note: "erased the rest".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }
}

async fn a_cut_off_erasure_reports_an_unknown_total(url: &str, dir: &std::path::Path) {
    let holder = Arc::new(CutOffSilent {
        calls: AtomicUsize::new(0),
        called: Notify::new(),
    });
    let app = with_contract_end(dir, url, holder.clone(), "ce-c", ContractEndChoice::Delete).await;
    let shared = app.shared();
    cut_off_then_resumed(&shared, &holder.called).await;
    let done = acks(&shared, "ce-c").await;
    let last = done.last().expect("acks");
    assert_eq!(last.state(), TaskState::Completed, "{done:#?}");
    let p = last.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Done);
    assert_eq!(counts(&p), (20, 0, 50, 0), "{p:?}");
    let body = last_certificate(&shared, "ce-c").await;
    assert!(body["uncounted"]["reason"].is_string(), "{body}");
}

on_both!(a_cut_off_erasure_reports_an_unknown_total);

/// A return whose export writes 16 records of 4 subjects.
struct Exports16;

impl Connector for Exports16 {
    fn kind_name(&self) -> &'static str {
        "exports-16"
    }

    fn supports(&self, _kind: dsrelay_proto::v1::RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            assert_eq!(job.op, BulkOp::Export);
            job.progress.report(BulkProgress {
                subjects_done: 4,
                subjects_total: 4,
                records_done: 16,
                records_total: 16,
                erased: Vec::new(),
            });
            Ok(Outcome::Completed {
                records_affected: 16,
                note: "exported 16 records".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }
}

/// The CANCELLED task of a return cancelled once its export was written, before its
/// delivery, says what the export counted: 16 records, in its evidence (which `dsrctl trace`
/// shows) and in its progress.
async fn a_cancelled_return_keeps_its_export_counts(url: &str, dir: &std::path::Path) {
    let holder = Arc::new(Exports16);
    let id = "ce-x";
    let app = with_contract_end(dir, url, holder, id, ContractEndChoice::ReturnThenDelete).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    (shared.store)
        .cancel("acme", id, "withdrawn", shared.clock.now_ms())
        .await
        .expect("cancel");
    let all = acks(&shared, id).await;
    let last = all.last().expect("acks");
    assert_eq!(last.state(), TaskState::Cancelled, "{all:#?}");
    let evidence = last.evidence.as_ref().expect("evidence");
    assert_eq!(evidence.records_affected, 16, "{last:?}");
    let p = last.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Returning);
    assert_eq!(counts(&p), (4, 4, 16, 16), "{p:?}");
    let row = (shared.store.manual_task(&key(id)).await)
        .expect("read")
        .expect("the task");
    assert_eq!(row.task.records_affected, 16, "{row:?}");
}

on_both!(a_cancelled_return_keeps_its_export_counts);

/// A processor as [`with_contract_end`] makes it, with controller `acme`'s contract end `id`
/// (`choice`, effective now) accepted, whose subprocessor `crm` is a manual holder (the real
/// connector, as configured) and whose operator is the development PKI's `ops`, and its
/// operator API served on 127.0.0.1 over TLS: the app, a client of the API as `ops`, and what
/// stops the server once sent.
async fn manual_contract_end(
    url: &str,
    dir: &std::path::Path,
    id: &str,
    choice: ContractEndChoice,
) -> (
    crate::App,
    ProcessorOperatorServiceClient<tonic::transport::Channel>,
    tokio::sync::oneshot::Sender<()>,
) {
    let manual = ConnectorConfig::Manual(ManualConfig::default());
    let holder = dsrelay_connectors::build(&manual).await.expect("manual");
    let mut config = crate::contract_tests::config(dir, url, &["acme"]);
    // The operator API answers only the operators the configuration names.
    config.operators = vec![dev_identity("operator", "ops")];
    let app = crate::App::with_connectors(config, HashMap::from([("crm".to_string(), holder)]))
        .await
        .expect("app");
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
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let server_tls = pki.files("processor").server_config().expect("server tls");
    let router = dsrelay_runtime::server::builder(server_tls)
        .expect("server")
        .add_service(ProcessorOperatorServiceServer::new(OperatorApi::new(
            shared,
        )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
        let _ = stopped.await;
    }));
    let client_tls = pki.files("operator").client_config().expect("client tls");
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{port}"),
        Some(dev_identity("processor", "payroll-bureau")),
        &client_tls,
    )
    .expect("channel");
    (app, ProcessorOperatorServiceClient::new(channel), stop)
}

/// The operator's CompleteManualTask of `id`'s task at `crm`, `records` records.
async fn complete_by_hand(
    client: &mut ProcessorOperatorServiceClient<tonic::transport::Channel>,
    id: &str,
    records: i64,
) -> ManualTask {
    client
        .complete_manual_task(CompleteManualTaskRequest {
            task: Some(TaskRef {
                controller: "acme".into(),
                request_id: id.into(),
                subprocessor: "crm".into(),
            }),
            not_found: false,
            records_affected: records,
            evidence_note: "binders shredded".into(),
        })
        .await
        .expect("CompleteManualTask")
        .into_inner()
}

/// `id`'s task as ListContractEnds answers the operator.
async fn listed(
    client: &mut ProcessorOperatorServiceClient<tonic::transport::Channel>,
    id: &str,
) -> TaskStatus {
    let ends = client
        .list_contract_ends(ListContractEndsRequest {
            controller: "acme".into(),
        })
        .await
        .expect("ListContractEnds")
        .into_inner()
        .contract_ends;
    let end = ends
        .into_iter()
        .find(|e| e.request_id == id)
        .expect("listed");
    end.tasks.into_iter().next().expect("its task")
}

/// A manual holder's contract end deletion, completed by its operator with a count of 12
/// records: the task's progress at DONE says 12 of 12 records (its subjects unknown), as
/// acknowledged to the registry and as ListContractEnds answers, the same count as its
/// evidence and its deletion certificate. Before, the progress stayed at 0 of unknown.
async fn a_deletion_done_by_hand_counts_the_operator_s_records(url: &str, dir: &std::path::Path) {
    let id = "ce-hand";
    let (app, mut client, stop) =
        manual_contract_end(url, dir, id, ContractEndChoice::Delete).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let waiting = listed(&mut client, id).await;
    assert_eq!(
        waiting.state(),
        TaskState::WaitingForOperator,
        "{waiting:?}"
    );
    let p = waiting.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Deleting);
    assert_eq!(counts(&p), (0, 0, 0, 0), "{p:?}");

    let done = complete_by_hand(&mut client, id, 12).await;
    assert_eq!(done.state(), TaskState::Completed, "{done:?}");
    let all = acks(&shared, id).await;
    let last = all.last().expect("acks");
    assert_eq!(last.state(), TaskState::Completed, "{all:#?}");
    assert_eq!(last.evidence.as_ref().map(|e| e.records_affected), Some(12));
    let p = last.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Done);
    assert_eq!(counts(&p), (0, 0, 12, 12), "{p:?}");
    let shown = listed(&mut client, id).await;
    let p = shown.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Done);
    assert_eq!(counts(&p), (0, 0, 12, 12), "{shown:?}");
    let body = last_certificate(&shared, id).await;
    assert_eq!(body["records_affected"], 12, "{body}");
    let _ = stop.send(());
}

on_both!(a_deletion_done_by_hand_counts_the_operator_s_records);

/// A manual holder's return, completed by its operator with a count of 5 records: while its
/// record is delivered the task's progress says 5 of 5 records returned (its subjects
/// unknown), as acknowledged and as ListContractEnds answers.
async fn a_return_done_by_hand_counts_the_operator_s_records(url: &str, dir: &std::path::Path) {
    let id = "ce-back";
    let choice = ContractEndChoice::ReturnThenDelete;
    let (app, mut client, stop) = manual_contract_end(url, dir, id, choice).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let waiting = listed(&mut client, id).await;
    assert_eq!(
        waiting.state(),
        TaskState::WaitingForOperator,
        "{waiting:?}"
    );
    assert_eq!(
        waiting.progress.map(|p| p.phase()),
        Some(ContractPhase::Returning)
    );

    let returned = complete_by_hand(&mut client, id, 5).await;
    assert_eq!(returned.state(), TaskState::InProgress, "{returned:?}");
    let all = acks(&shared, id).await;
    let last = all.last().expect("acks");
    assert_eq!(last.state(), TaskState::InProgress, "{all:#?}");
    let p = last.progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Returning);
    assert_eq!(counts(&p), (0, 0, 5, 5), "{p:?}");
    let shown = listed(&mut client, id).await;
    let p = shown.progress.expect("progress");
    assert_eq!(counts(&p), (0, 0, 5, 5), "{shown:?}");
    let _ = stop.send(());
}

on_both!(a_return_done_by_hand_counts_the_operator_s_records);
