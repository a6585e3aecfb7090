//! The erasure that follows a return is checked against what the return counted, through
//! the processor's real store (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL`
//! names a server) and runner: the counts go with the task when the confirmation releases
//! the erasure, with when the export's last start call began (confirmation polls do not
//! move it), every call gets them until one records that it passed the check, a holder
//! holding more fails the task with its reason, and a DELETE is never checked, nor is the
//! erasure of a return that was not confirmed by the end of the grace period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use dsrelay_connectors::{
    check_returned, BoxFuture, BulkJob, BulkProgress, Connector, ConnectorError, Outcome, Phase,
    Task,
};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    ContractEnd, ContractEndChoice, ContractPhase, DeliverRequest, RequestKind, RequestParameters,
    TaskState,
};
use dsrelay_runtime::clock::Clock;
use dsrelay_runtime::pki::DevPki;

use crate::app::Shared;
use crate::store::Transition;
use crate::task_machine::ContractStep;
use crate::{App, Config};

/// What the return counted in these tests: 3 subjects, 7 records.
const RETURNED: BulkProgress = BulkProgress {
    subjects_done: 3,
    subjects_total: 3,
    records_done: 7,
    records_total: 7,
    erased: Vec::new(),
};

/// What a call of [`Holder`] does.
#[derive(Debug, Clone, Copy)]
enum Call {
    /// Fails transiently before its check.
    FailBeforeCheck,
    /// Reports what it holds (as a count before its check), then fails transiently before
    /// its check.
    ReportThenFail,
    /// Passes its check, records that, then fails transiently (part erased, say).
    PassThenFail,
    /// Checks, records, erases: COMPLETED.
    Finish,
    /// Exports nothing (no files): COMPLETED.
    Export,
    /// Fails transiently, as an export whose holder went away.
    ExportFail,
    /// Accepts the export under handle `job-1`, to be asked again.
    ExportAccepted,
}

/// A holder of `held` (as its export counts), taking its calls from `script` in order and
/// noting each call's [`BulkJob::returned`] and [`BulkJob::returned_since_ms`].
struct Holder {
    held: BulkProgress,
    script: Mutex<Vec<Call>>,
    seen: Mutex<Vec<Option<BulkProgress>>>,
    since_seen: Mutex<Vec<Option<i64>>>,
    /// The processor's clock, when the test gave it: each call notes its time by it.
    clock: OnceLock<Clock>,
    /// Per call: the job's `now_ms` and the processor's clock when the holder was called.
    called: Mutex<Vec<(i64, Option<i64>)>>,
    /// Per call: its phase.
    phases: Mutex<Vec<Phase>>,
}

impl Holder {
    fn new(held: BulkProgress, script: &[Call]) -> Arc<Self> {
        Arc::new(Self {
            held,
            script: Mutex::new(script.iter().rev().copied().collect()),
            seen: Mutex::new(Vec::new()),
            since_seen: Mutex::new(Vec::new()),
            clock: OnceLock::new(),
            called: Mutex::new(Vec::new()),
            phases: Mutex::new(Vec::new()),
        })
    }

    fn seen(&self) -> Vec<Option<BulkProgress>> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Connector for Holder {
    fn kind_name(&self) -> &'static str {
        "holder"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            self.seen.lock().expect("seen").push(job.returned.clone());
            let since = job.returned_since_ms;
            self.since_seen.lock().expect("since").push(since);
            let now = self.clock.get().map(Clock::now_ms);
            self.called.lock().expect("called").push((job.now_ms, now));
            self.phases.lock().expect("phases").push(job.phase.clone());
            let call = self.script.lock().expect("script").pop();
            let call = call.ok_or_else(|| ConnectorError::Permanent("unscripted".into()))?;
            if let Call::Export = call {
                return Ok(Outcome::Completed {
                    records_affected: 0,
                    note: "exported".into(),
                    files: Vec::new(),
                    erased: Vec::new(),
                });
            }
            let transient = || Err(ConnectorError::Transient("the holder went away".into()));
            match call {
                Call::FailBeforeCheck | Call::ExportFail => return transient(),
                Call::ReportThenFail => {
                    job.progress.report(self.held.clone());
                    return transient();
                }
                Call::ExportAccepted => {
                    return Ok(Outcome::Accepted {
                        handle: "job-1".into(),
                        note: "exporting".into(),
                    })
                }
                _ => {}
            }
            if let Some(returned) = &job.returned {
                check_returned(returned, &self.held, "holder crm", &job.controller)?;
            }
            job.progress.record_now(self.held.clone()).await?;
            match call {
                Call::PassThenFail => transient(),
                _ => Ok(Outcome::Completed {
                    records_affected: 7,
                    note: "erased".into(),
                    files: Vec::new(),
                    erased: Vec::new(),
                }),
            }
        })
    }
}

fn config(dir: &std::path::Path, database_url: &str) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let checkpoint_key = pki.signing_key("processor");
    let checkpoint_file = dir.join("audit/checkpoints.jsonl");
    let tls = pki.files("processor");
    let text = format!(
        "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
         signing_key = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [audit]\ncheckpoint_key = {checkpoint_key:?}\ncheckpoint_file = {checkpoint_file:?}\n\
         [[subprocessors]]\nname = \"crm\"\ncategories = [\"contact\"]\n\
         connector = {{ type = \"noop\" }}\n\
         [[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/0\"\n\
         registry_endpoint = \"https://localhost:1\"\n",
        dir.join("data"),
        pki.signing_key("processor"),
        tls.ca,
        tls.cert,
        tls.key,
    );
    let file = dir.join("processor.toml");
    std::fs::write(&file, text).expect("config file");
    Config::load_from(Some(&file), Vec::new()).expect("config")
}

/// The grace period of these tests' contract ends: long enough for a test's steps to run
/// inside it on a slow database.
const GRACE_MS: i64 = 60_000;

fn terms(choice: ContractEndChoice, now: i64, return_confirmed: bool) -> ContractEnd {
    ContractEnd {
        choice: choice as i32,
        effective_at: Some(timestamp_from_millis(now)),
        grace_ends_at: Some(timestamp_from_millis(now + GRACE_MS)),
        return_confirmed,
        transfer_recipient: String::new(),
    }
}

/// A processor whose subprocessor `crm` is `holder`, with contract end `r-1` of `choice`
/// accepted; for RETURN_THEN_DELETE its task is moved to AWAITING_CONFIRMATION with
/// [`RETURNED`] as the export's counts, and the return confirmed ([`return_confirmed`]).
async fn contract_end(
    database_url: &str,
    dir: &std::path::Path,
    holder: Arc<Holder>,
    choice: ContractEndChoice,
) -> (App, Arc<Shared>) {
    let (app, shared, accepted_at) = accepted(database_url, dir, holder, choice).await;
    if choice == ContractEndChoice::ReturnThenDelete {
        return_confirmed(&shared, accepted_at).await;
    }
    (app, shared)
}

/// A processor whose subprocessor `crm` is `holder`, with contract end `r-1` of `choice`
/// accepted; `holder` is given its clock. The third is when it was accepted.
async fn accepted(
    database_url: &str,
    dir: &std::path::Path,
    holder: Arc<Holder>,
    choice: ContractEndChoice,
) -> (App, Arc<Shared>, i64) {
    let clock = holder.clone();
    let connectors = HashMap::from([("crm".to_string(), holder as Arc<dyn Connector>)]);
    let app = App::with_connectors(config(dir, database_url), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    let _ = clock.clock.set(shared.clock.clone());
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::ContractEnd as i32,
        parameters: Some(RequestParameters {
            contract_end: Some(terms(choice, now, false)),
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(now + 30 * 86_400_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    (app, shared, now)
}

/// Moves contract end `r-1`'s RETURN_THEN_DELETE task to AWAITING_CONFIRMATION with
/// [`RETURNED`] as the export's counts, at `now`.
async fn returned(shared: &Arc<Shared>, now: i64) {
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    let returned = Transition {
        state: TaskState::InProgress,
        contract: Some(ContractStep {
            phase: ContractPhase::AwaitingConfirmation,
            progress: Some(RETURNED),
            scheduled_at: None,
        }),
        ..Default::default()
    };
    shared
        .store
        .transition(&task.key, task.sequence, &returned, now, 0)
        .await
        .expect("move")
        .expect("moved");
}

/// Moves contract end `r-1`'s RETURN_THEN_DELETE task to AWAITING_CONFIRMATION with
/// [`RETURNED`] as the export's counts, and confirms the return of the terms it was
/// accepted with at `now`.
async fn return_confirmed(shared: &Arc<Shared>, now: i64) {
    let choice = ContractEndChoice::ReturnThenDelete;
    {
        returned(shared, now).await;
        shared
            .store
            .update_contract_end("acme", "r-1", &terms(choice, now, true), None, now + 1)
            .await
            .expect("confirm");
    }
}

/// Claims what is due by `at` and runs it; how many tasks ran.
async fn step(shared: &Arc<Shared>, at: i64) -> usize {
    let jobs = shared
        .store
        .claim_tasks(at, 10, 30_000)
        .await
        .expect("claim");
    let n = jobs.len();
    for job in jobs {
        crate::runner::run_task(shared, job).await.expect("step");
    }
    n
}

/// Retries get what was returned until a call records that it passed the check; the call
/// after that (a retry, or a resumed call, of an erasure that may have erased part) is not
/// checked again, even though fewer records are held than were returned.
async fn checked_until_a_call_passed(database_url: &str, dir: &std::path::Path) {
    let held = BulkProgress {
        subjects_done: 0,
        subjects_total: 3,
        records_done: 0,
        records_total: 6,
        erased: Vec::new(),
    };
    let script = [Call::FailBeforeCheck, Call::PassThenFail, Call::Finish];
    let holder = Holder::new(held, &script);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared) = contract_end(database_url, dir, holder.clone(), choice).await;
    for _ in script {
        assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
        // Past the backoff, and past the mark of the holder as unreachable.
        shared.clock.advance(3_600_000);
    }
    assert_eq!(holder.seen(), [Some(RETURNED), Some(RETURNED), None]);
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
}

/// A call that reported counts before its check and failed is checked again: its counts,
/// recorded, would tell the next call that a check passed.
async fn counts_from_before_the_check_are_not_recorded(database_url: &str, dir: &std::path::Path) {
    let held = BulkProgress {
        subjects_done: 0,
        subjects_total: 3,
        records_done: 0,
        records_total: 6,
        erased: Vec::new(),
    };
    let script = [Call::ReportThenFail, Call::Finish];
    let holder = Holder::new(held, &script);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared) = contract_end(database_url, dir, holder.clone(), choice).await;
    for _ in script {
        assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
        shared.clock.advance(3_600_000);
    }
    assert_eq!(holder.seen(), [Some(RETURNED), Some(RETURNED)]);
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
}

/// A holder holding more than was returned: the task FAILS with its reason (the data is
/// still there), in phase DELETING, never COMPLETED; its acknowledgement says so.
async fn more_held_than_returned_fails_the_task(database_url: &str, dir: &std::path::Path) {
    let held = BulkProgress {
        subjects_done: 0,
        subjects_total: 3,
        records_done: 0,
        records_total: 8,
        erased: Vec::new(),
    };
    let holder = Holder::new(held, &[Call::Finish]);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared) = contract_end(database_url, dir, holder.clone(), choice).await;
    assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
    assert_eq!(holder.seen(), [Some(RETURNED)]);
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Failed, "{task:?}");
    assert_eq!(task.phase, ContractPhase::Deleting, "{task:?}");
    assert!(
        task.reason.starts_with(
            "holder crm: 1 record(s) (0 subject(s)) of controller acme arrived after the \
             contract end's export"
        ),
        "{}",
        task.reason
    );
    assert!(
        task.reason.contains("nothing was erased there"),
        "{}",
        task.reason
    );
    let status = task.to_status();
    assert_eq!(status.state, TaskState::Failed as i32);
    assert_eq!(status.reason, task.reason);
}

/// A DELETE returned nothing: its erasure is not checked, whatever the holder holds.
async fn a_delete_is_not_checked(database_url: &str, dir: &std::path::Path) {
    let held = BulkProgress {
        subjects_done: 0,
        subjects_total: 30,
        records_done: 0,
        records_total: 80,
        erased: Vec::new(),
    };
    let holder = Holder::new(held, &[Call::Finish]);
    let choice = ContractEndChoice::Delete;
    let (_app, shared) = contract_end(database_url, dir, holder.clone(), choice).await;
    assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
    assert_eq!(holder.seen(), [None]);
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
}

/// The erasure after a confirmed return is handed when the export's call started, by the
/// processor's clock: after the job was built, no later than the holder was called; not
/// the confirmation's time or the erasure's, an hour later.
async fn the_erasure_gets_the_export_start(database_url: &str, dir: &std::path::Path) {
    let held = BulkProgress {
        subjects_done: 0,
        ..RETURNED
    };
    let holder = Holder::new(held, &[Call::Export, Call::Finish]);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared, accepted_at) = accepted(database_url, dir, holder.clone(), choice).await;
    assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.phase, ContractPhase::Returning, "{task:?}");
    shared.clock.advance(3_600_000);
    return_confirmed(&shared, accepted_at).await;
    assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
    assert_eq!(holder.seen(), [None, Some(RETURNED)]);
    let since = holder.since_seen.lock().expect("since").clone();
    let called = holder.called.lock().expect("called").clone();
    let [(export_job_now, Some(export_called)), _] = called[..] else {
        panic!("{called:?}");
    };
    let [None, Some(started)] = since[..] else {
        panic!("{since:?}");
    };
    assert!(
        (export_job_now..=export_called).contains(&started),
        "{started} not within the export call's start {export_job_now}..={export_called}"
    );
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
}

/// A second start of the export (a retry after a transient failure) moves the export's
/// recorded start, and the confirmation poll after it does not: the connectors that read it
/// run the export again whole on every start, so what was returned is the last start's
/// snapshot, and the erasure is handed that start's time.
async fn the_erasure_gets_the_last_export_start(database_url: &str, dir: &std::path::Path) {
    let held = BulkProgress {
        subjects_done: 0,
        ..RETURNED
    };
    let script = [
        Call::ExportFail,
        Call::ExportAccepted,
        Call::Export,
        Call::Finish,
    ];
    let holder = Holder::new(held, &script);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared, accepted_at) = accepted(database_url, dir, holder.clone(), choice).await;
    for _ in 0..3 {
        assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
        // Past the backoff, the mark of the holder as unreachable and the poll interval.
        shared.clock.advance(3_600_000);
    }
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.phase, ContractPhase::Returning, "{task:?}");
    return_confirmed(&shared, accepted_at).await;
    assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
    let phases = holder.phases.lock().expect("phases").clone();
    let confirm = Phase::Confirm {
        handle: "job-1".into(),
    };
    assert_eq!(
        phases,
        [Phase::Start, Phase::Start, confirm, Phase::Start],
        "the export's calls, then the erasure's"
    );
    let since = holder.since_seen.lock().expect("since").clone();
    let called = holder.called.lock().expect("called").clone();
    let [_, (last_now, Some(last_called)), (poll_now, _), _] = called[..] else {
        panic!("{called:?}");
    };
    let [None, None, None, Some(started)] = since[..] else {
        panic!("{since:?}");
    };
    // The poll comes an hour after the second start, so the two windows do not meet.
    assert!(last_called < poll_now, "{called:?}");
    assert!(
        (last_now..=last_called).contains(&started),
        "{started} not within the second export start's {last_now}..={last_called} \
         (calls: {called:?})"
    );
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
}

/// A return the controller never confirmed: the task waits in AWAITING_CONFIRMATION until
/// the grace period ends (no holder called), then deletes all of the data, as a contract end
/// without a choice does then: unchecked (the holder holds more than was returned, which a
/// check would refuse, keeping the data past the grace period), with a certificate, the
/// registry told no confirmation came. Before, the task slept for ever and nothing was
/// deleted.
async fn an_unconfirmed_return_is_deleted_at_the_grace_end(
    database_url: &str,
    dir: &std::path::Path,
) {
    let held = BulkProgress {
        subjects_done: 0,
        subjects_total: 4,
        records_done: 0,
        records_total: 9,
        erased: Vec::new(),
    };
    let holder = Holder::new(held, &[Call::Finish]);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared, accepted_at) = accepted(database_url, dir, holder.clone(), choice).await;
    returned(&shared, accepted_at).await;
    let grace_ends_at = accepted_at + GRACE_MS;
    // Woken once, it sleeps until the grace period ends.
    assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
    assert_eq!(step(&shared, grace_ends_at - 1).await, 0);
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.state, task.phase),
        (TaskState::InProgress, ContractPhase::AwaitingConfirmation),
        "{task:?}"
    );
    assert!(holder.seen().is_empty(), "the holder was called");

    shared.clock.advance(grace_ends_at - shared.clock.now_ms());
    assert_eq!(step(&shared, grace_ends_at).await, 1);
    assert_eq!(holder.seen(), [None], "the erasure is not checked");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.state, task.phase, task.records_affected),
        (TaskState::Completed, ContractPhase::Done, 7),
        "{task:?}"
    );
    let certificates: i64 = sqlx::query_scalar(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM certificates WHERE request_id = 'r-1'",
    )
    .fetch_one(&shared.store.db().pool)
    .await
    .expect("certificates");
    assert_eq!(certificates, 1);
    let reasons: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT payload FROM ack_outbox WHERE request_id = 'r-1'")
            .fetch_all(&shared.store.db().pool)
            .await
            .expect("acks");
    let why = reasons.iter().find_map(|p| {
        let ack = <dsrelay_proto::v1::Acknowledgement as dsrelay_proto::prost::Message>::decode(
            p.as_slice(),
        )
        .expect("ack");
        (ack.progress.map(|p| p.phase()) == Some(ContractPhase::Deleting)).then_some(ack.reason)
    });
    let why = why.expect("the start of the deletion is acknowledged");
    assert!(
        why.starts_with(
            "no confirmation of receipt of the returned data came from the controller by the \
             end of the grace period ("
        ),
        "{why}"
    );
}

/// A task that began waiting for the confirmation before the grace end bounded the wait
/// was put to sleep for ever (`next_attempt_at` = i64::MAX): migration 0024 wakes it at its
/// grace end, as the task machine now schedules it. Without it, an upgrade left every such
/// return undeleted for good.
async fn a_return_waiting_from_before_the_upgrade_wakes_at_the_grace_end(
    database_url: &str,
    dir: &std::path::Path,
) {
    let held = BulkProgress::default();
    let holder = Holder::new(held, &[Call::Finish]);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared, accepted_at) = accepted(database_url, dir, holder, choice).await;
    returned(&shared, accepted_at).await;
    let pool = &shared.store.db().pool;
    // As the earlier release left it.
    sqlx::query("UPDATE tasks SET next_attempt_at = $1 WHERE request_id = 'r-1'")
        .bind(i64::MAX)
        .execute(pool)
        .await
        .expect("asleep");
    let migrations = match shared.store.db().backend {
        dsrelay_runtime::store::Backend::Sqlite => &crate::store::SQLITE_MIGRATIONS,
        dsrelay_runtime::store::Backend::Postgres => &crate::store::POSTGRES_MIGRATIONS,
    };
    let wake = (migrations.iter())
        .find(|m| m.version == 24)
        .expect("migration 0024");
    sqlx::raw_sql(&wake.sql).execute(pool).await.expect("0024");
    let next: i64 =
        sqlx::query_scalar("SELECT next_attempt_at FROM tasks WHERE request_id = 'r-1'")
            .fetch_one(pool)
            .await
            .expect("task");
    assert_eq!(next, accepted_at + GRACE_MS);
}

/// A task that began waiting for the confirmation before this release carries the
/// contract end's start as its scheduled time and the return's attempts: migration 0026
/// gives it the grace end (when it is deleted, confirmed or not) and a fresh count, as the
/// task machine now writes them on entering the phase. Without it, such a return showed the
/// old start as "scheduled" and its erasure's first failure an attempt past the return's.
async fn a_return_waiting_from_before_the_upgrade_is_scheduled_for_the_grace_end(
    database_url: &str,
    dir: &std::path::Path,
) {
    let held = BulkProgress::default();
    let holder = Holder::new(held, &[Call::Finish]);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared, accepted_at) = accepted(database_url, dir, holder, choice).await;
    returned(&shared, accepted_at).await;
    let pool = &shared.store.db().pool;
    // As the earlier release left it.
    sqlx::query("UPDATE tasks SET scheduled_at = $1, attempts = 4 WHERE request_id = 'r-1'")
        .bind(accepted_at)
        .execute(pool)
        .await
        .expect("as before");
    let migrations = match shared.store.db().backend {
        dsrelay_runtime::store::Backend::Sqlite => &crate::store::SQLITE_MIGRATIONS,
        dsrelay_runtime::store::Backend::Postgres => &crate::store::POSTGRES_MIGRATIONS,
    };
    let schedule = (migrations.iter())
        .find(|m| m.version == 26)
        .expect("migration 0026");
    sqlx::raw_sql(&schedule.sql)
        .execute(pool)
        .await
        .expect("0026");
    let (scheduled_at, attempts): (Option<i64>, i64) = sqlx::query_as(
        "SELECT scheduled_at, CAST(attempts AS BIGINT) FROM tasks WHERE request_id = 'r-1'",
    )
    .fetch_one(pool)
    .await
    .expect("task");
    assert_eq!((scheduled_at, attempts), (Some(accepted_at + GRACE_MS), 0));
}

/// The erasure after a confirmed return counts its own attempts: its first failure is
/// attempt 1 (with the first attempt's backoff), its second attempt 2. The return's attempts
/// (three failed export calls and the one that exported) used to carry over, and the
/// erasure's first failure read "attempt 5".
async fn the_erasure_counts_its_attempts_from_one(database_url: &str, dir: &std::path::Path) {
    use crate::task_machine::{decide, Context, Decision, Destination, Event};
    let held = BulkProgress {
        subjects_done: 0,
        ..RETURNED
    };
    let script = [
        Call::ExportFail,
        Call::ExportFail,
        Call::ExportFail,
        Call::Export,
        Call::FailBeforeCheck,
        Call::FailBeforeCheck,
    ];
    let holder = Holder::new(held, &script);
    let choice = ContractEndChoice::ReturnThenDelete;
    let (_app, shared, accepted_at) = accepted(database_url, dir, holder.clone(), choice).await;
    for _ in 0..4 {
        assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
        shared.clock.advance(3_600_000);
    }
    let task = shared
        .store
        .tasks("acme", "r-1")
        .await
        .expect("tasks")
        .remove(0);
    assert_eq!(
        (task.phase, task.attempts),
        (ContractPhase::Returning, 4),
        "{task:?}"
    );
    // As the uploader records the registry's CompletePart: with the task's count.
    let now = shared.clock.now_ms();
    let event = Event::Delivered {
        to: Destination::Registry,
        files: 0,
        bytes: 0,
        receipt: None,
    };
    let Decision::Move(t) = decide(&task.current(), event, &Context::at(now)) else {
        panic!("the delivery moves the task");
    };
    (shared.store)
        .transition(&task.key, task.sequence, &t, now, task.attempts)
        .await
        .expect("delivered")
        .expect("recorded");
    let task = shared
        .store
        .tasks("acme", "r-1")
        .await
        .expect("tasks")
        .remove(0);
    assert_eq!(
        (task.phase, task.attempts),
        (ContractPhase::AwaitingConfirmation, 0),
        "{task:?}"
    );
    (shared.store)
        .update_contract_end("acme", "r-1", &terms(choice, accepted_at, true), None, now)
        .await
        .expect("confirm");
    for attempt in 1..=2 {
        assert_eq!(step(&shared, shared.clock.now_ms() + 10).await, 1);
        let task = shared
            .store
            .tasks("acme", "r-1")
            .await
            .expect("tasks")
            .remove(0);
        assert_eq!(
            (task.phase, task.attempts),
            (ContractPhase::Deleting, attempt),
            "{task:?}"
        );
        assert!(
            task.reason
                .contains(&format!("attempt {attempt} failed at")),
            "{}",
            task.reason
        );
        shared.clock.advance(3_600_000);
    }
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE request_id = 'r-1' ORDER BY sequence",
    )
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("acks");
    let deleting: Vec<u32> = payloads
        .iter()
        .map(|p| {
            <dsrelay_proto::v1::Acknowledgement as dsrelay_proto::prost::Message>::decode(
                p.as_slice(),
            )
            .expect("ack")
        })
        .filter(|a| a.progress.map(|p| p.phase()) == Some(ContractPhase::Deleting))
        .map(|a| a.attempt)
        .collect();
    assert_eq!(deleting, [1, 1, 2], "the start, then each failure");
}

on_both!(
    the_erasure_counts_its_attempts_from_one,
    a_return_waiting_from_before_the_upgrade_wakes_at_the_grace_end,
    a_return_waiting_from_before_the_upgrade_is_scheduled_for_the_grace_end,
    an_unconfirmed_return_is_deleted_at_the_grace_end,
    checked_until_a_call_passed,
    counts_from_before_the_check_are_not_recorded,
    more_held_than_returned_fails_the_task,
    a_delete_is_not_checked,
    the_erasure_gets_the_export_start,
    the_erasure_gets_the_last_export_start,
);
