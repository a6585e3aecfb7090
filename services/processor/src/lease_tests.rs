//! Lost leases, through the processor's real store (SQLite, and PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server) and runner: two claims of one task, the
//! first's lease run out while its connector is held at a barrier. The first's outcome is
//! never recorded over the second's, whichever way the first learns of the loss. Leases are
//! on the database's clock, so they run out by waiting, never by moving the processor's
//! clock: the first claim takes a short lease and the test waits it out. The second call is
//! told the first was cut off before its answer was recorded (`Task::interrupted`), and so is
//! a contract end's erasure resumed after a cut-off call (`BulkJob::interrupted`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_connectors::{
    BoxFuture, BulkJob, BulkProgress, Connector, ConnectorError, ErasedCount, Outcome, Task,
};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    Acknowledgement, ContractEnd, ContractEndChoice, ContractPhase, DeliverRequest, RequestKind,
    RequestParameters, TaskState,
};
use dsrelay_runtime::pki::DevPki;
use tokio::sync::{mpsc, oneshot};

use crate::app::Shared;
use crate::store::{TaskJob, Transition};
use crate::task_machine::ContractStep;
use crate::{App, Config};

/// Holds each call until the test releases it: every call reports itself on `entered` with
/// the sender that lets it finish (COMPLETED, with the call's number as its note).
struct Barrier {
    entered: mpsc::UnboundedSender<oneshot::Sender<()>>,
    calls: AtomicUsize,
    /// Each call's [`Task::interrupted`], in order.
    interrupted: std::sync::Mutex<Vec<bool>>,
}

impl Connector for Barrier {
    fn kind_name(&self) -> &'static str {
        "barrier"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.interrupted
                .lock()
                .expect("interrupted")
                .push(task.interrupted);
            let (release, released) = oneshot::channel();
            self.entered
                .send(release)
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            released
                .await
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            Ok(Outcome::Completed {
                records_affected: 1,
                note: format!("call {n}"),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }
}

fn config(dir: &std::path::Path, database_url: &str, lease_ms: u64) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let checkpoint_key = pki.signing_key("processor");
    let checkpoint_file = dir.join("audit/checkpoints.jsonl");
    let tls = pki.files("processor");
    let text = format!(
        "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [audit]\ncheckpoint_key = {checkpoint_key:?}\ncheckpoint_file = {checkpoint_file:?}\n\
         [tasks]\nlease_ms = {lease_ms}\n[contracts]\nprogress_interval_ms = 10\n\
         [[subprocessors]]\nname = \"crm\"\ncategories = [\"contact\"]\n\
         connector = {{ type = \"noop\" }}\n\
         [[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/0\"\n\
         registry_endpoint = \"https://localhost:1\"\n",
        dir.join("data"),
        tls.ca,
        tls.cert,
        tls.key,
    );
    let file = dir.join("processor.toml");
    std::fs::write(&file, text).expect("config file");
    Config::load_from(Some(&file), Vec::new()).expect("config")
}

struct Setup {
    app: App,
    entered: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    barrier: Arc<Barrier>,
}

async fn setup(database_url: &str, dir: &std::path::Path, lease_ms: u64) -> Setup {
    let (barrier, entered) = Barrier::new();
    let app = barrier.app(config(dir, database_url, lease_ms)).await;
    accept_started(&app.shared(), "r-1", RequestKind::Erasure).await;
    Setup {
        app,
        entered,
        barrier,
    }
}

impl Barrier {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
        let (tx, entered) = mpsc::unbounded_channel();
        let barrier = Arc::new(Barrier {
            entered: tx,
            calls: AtomicUsize::new(0),
            interrupted: Default::default(),
        });
        (barrier, entered)
    }

    /// The processor of `config`, with this barrier as its subprocessor `crm`.
    async fn app(self: &Arc<Self>, config: Config) -> App {
        let connectors = HashMap::from([("crm".to_string(), self.clone() as Arc<dyn Connector>)]);
        App::with_connectors(config, connectors).await.expect("app")
    }
}

/// Accepts request `id` of `kind` for `crm` and moves its task to IN_PROGRESS, released, as
/// after a retry: a claim then runs it under the claim's own lease, which the tests choose
/// (a PENDING task's start would hold it for `tasks.lease_ms`).
async fn accept_started(shared: &Shared, id: &str, kind: RequestKind) {
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: id.into(),
        kind: kind as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let task = &shared.store.tasks("acme", id).await.expect("tasks")[0];
    let started = Transition {
        state: TaskState::InProgress,
        ..Default::default()
    };
    shared
        .store
        .transition(&task.key, task.sequence, &started, now, 0)
        .await
        .expect("start")
        .expect("started");
}

/// Accepts `r-1`, a contract end of `choice` effective now, for `crm`, and moves its task
/// to `phase`, released; answers its sequence.
async fn accept_contract_end(
    shared: &Shared,
    choice: ContractEndChoice,
    phase: ContractPhase,
) -> i64 {
    let now = shared.clock.now_ms();
    deliver_contract_end(shared, choice).await;
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    let moved = Transition {
        state: TaskState::InProgress,
        contract: Some(ContractStep {
            phase,
            progress: None,
            scheduled_at: None,
        }),
        ..Default::default()
    };
    shared
        .store
        .transition(&task.key, task.sequence, &moved, now, 0)
        .await
        .expect("move")
        .expect("moved")
}

/// Accepts `r-1`, a contract end of `choice` effective now, for `crm`: its task is PENDING.
async fn deliver_contract_end(shared: &Shared, choice: ContractEndChoice) {
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::ContractEnd as i32,
        parameters: Some(RequestParameters {
            contract_end: Some(ContractEnd {
                choice: choice as i32,
                effective_at: Some(timestamp_from_millis(now)),
                grace_ends_at: Some(timestamp_from_millis(now + 1_000)),
                return_confirmed: false,
                transfer_recipient: String::new(),
            }),
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
}

/// Claims the task for `lease_ms` (the runner renews it on `tasks.lease_ms`).
async fn claim_one(shared: &Arc<Shared>, lease_ms: i64) -> TaskJob {
    let mut jobs = shared
        .store
        .claim_tasks(shared.clock.now_ms(), 10, lease_ms)
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 1, "one task to claim");
    jobs.pop().expect("a job")
}

fn start(shared: &Arc<Shared>, job: TaskJob) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let shared = shared.clone();
    tokio::spawn(async move { crate::runner::run_task(&shared, job).await })
}

async fn next_call(
    entered: &mut mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) -> oneshot::Sender<()> {
    tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the connector is called")
        .expect("a call")
}

/// The acknowledgements queued for the task, in order.
async fn acks(shared: &Shared) -> Vec<Acknowledgement> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE request_id = $1 ORDER BY sequence",
    )
    .bind("r-1")
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("acks");
    payloads
        .iter()
        .map(|p| Acknowledgement::decode(p.as_slice()).expect("ack"))
        .collect()
}

fn completed(acks: &[Acknowledgement]) -> Vec<&Acknowledgement> {
    acks.iter()
        .filter(|a| a.state() == TaskState::Completed)
        .collect()
}

/// The first runner's connector returns after its lease ran out and a second claim took the
/// task (its renewals are a third of a minute apart, far off): the transition matches the
/// lease token and records nothing; the second runner's outcome is the one acknowledged.
async fn late_outcome_is_not_recorded(database_url: &str, dir: &std::path::Path) {
    let Setup {
        app,
        mut entered,
        barrier,
    } = setup(database_url, dir, 60_000).await;
    let shared = app.shared();
    let first = start(&shared, claim_one(&shared, 200).await);
    let release_first = next_call(&mut entered).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = start(&shared, claim_one(&shared, 60_000).await);
    let release_second = next_call(&mut entered).await;

    release_first.send(()).expect("first call waits");
    first.await.expect("first runner").expect("first step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::InProgress, "{task:?}");
    assert!(completed(&acks(&shared).await).is_empty());

    release_second.send(()).expect("second call waits");
    second.await.expect("second runner").expect("second step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
    let acks = acks(&shared).await;
    let done = completed(&acks);
    assert_eq!(done.len(), 1, "{acks:#?}");
    assert_eq!(done[0].evidence.as_ref().expect("evidence").note, "call 2");
    assert_eq!(barrier.calls.load(Ordering::SeqCst), 2);
    // The second call knew the first was cut off; the recorded outcome clears the note.
    assert_eq!(
        *barrier.interrupted.lock().expect("interrupted"),
        [false, true]
    );
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.call_started_at, None, "{task:?}");
}

/// The first runner renews every third of `tasks.lease_ms` (300 ms), but its claim's lease
/// (50 ms) ran out before the first renewal and another claim took the task: the renewal
/// matches nothing, so it abandons the step without waiting for its connector, which never
/// returns.
async fn lost_renewal_abandons_the_step(database_url: &str, dir: &std::path::Path) {
    let Setup {
        app,
        mut entered,
        barrier,
    } = setup(database_url, dir, 900).await;
    let shared = app.shared();
    let first = start(&shared, claim_one(&shared, 50).await);
    let _held_forever = next_call(&mut entered).await;

    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = start(&shared, claim_one(&shared, 900).await);
    let release_second = next_call(&mut entered).await;

    tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("the first runner gives up its step")
        .expect("first runner")
        .expect("first step");
    assert!(completed(&acks(&shared).await).is_empty());

    release_second.send(()).expect("second call waits");
    second.await.expect("second runner").expect("second step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
    let acks = acks(&shared).await;
    assert_eq!(completed(&acks).len(), 1, "{acks:#?}");
    assert_eq!(barrier.calls.load(Ordering::SeqCst), 2);
}

/// The store's side of a lease: only the claim's token, on a lease not yet run out by the
/// database's clock, extends, moves or postpones the task; the processor's clock moved
/// far ahead frees no lease.
async fn the_store_matches_the_lease_token(database_url: &str, dir: &std::path::Path) {
    let Setup { app, .. } = setup(database_url, dir, 1_000).await;
    let shared = app.shared();
    let store = &shared.store;
    let now = shared.clock.now_ms();
    let first = store.claim_tasks(now, 10, 300).await.expect("claim");
    let first = &first[0];
    let (key, seq, mine) = (&first.task.key, first.task.sequence, &first.lease_owner);
    assert!(!mine.is_empty());
    assert!(!store
        .extend_lease(key, seq, "someone else", 300)
        .await
        .expect("extend"));
    assert!(!store
        .extend_lease(key, seq + 1, mine, 300)
        .await
        .expect("extend"));
    assert!(store
        .extend_lease(key, seq, mine, 300)
        .await
        .expect("extend"));
    // Still held, however far the processor's clock moves.
    shared.clock.advance(3_600_000);
    assert!(store
        .claim_tasks(shared.clock.now_ms(), 10, 1_000)
        .await
        .expect("claim")
        .is_empty());

    tokio::time::sleep(Duration::from_millis(400)).await;
    // Run out: not revived, though no one took it yet.
    assert!(!store
        .extend_lease(key, seq, mine, 300)
        .await
        .expect("extend"));
    let second = store.claim_tasks(now, 10, 60_000).await.expect("claim");
    let theirs = &second[0].lease_owner;
    assert_ne!(theirs, mine);
    assert!(!store
        .extend_lease(key, seq, mine, 300)
        .await
        .expect("extend"));
    let step = Transition {
        state: TaskState::Completed,
        records_affected: 1,
        ..Default::default()
    };
    assert_eq!(
        store
            .transition_leased(key, seq, mine, &step, now, 1, None, false)
            .await
            .expect("transition"),
        None
    );
    assert!(!store
        .postpone(
            key,
            seq,
            mine,
            0,
            now + 5_000,
            Some("late"),
            false,
            false,
            now
        )
        .await
        .expect("postpone"));
    let task = &store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!((task.state, task.sequence), (TaskState::InProgress, seq));
    assert!(store
        .extend_lease(key, seq, theirs, 300)
        .await
        .expect("extend"));
    assert_eq!(
        store
            .transition_leased(key, seq, theirs, &step, now, 2, None, false)
            .await
            .expect("transition"),
        Some(seq + 1)
    );
}

/// A contract end's bulk step held until the test lets it go: each call reports itself on
/// `entered`; `report` makes it report progress, `finish` makes it complete.
struct BulkBarrier {
    entered: mpsc::UnboundedSender<HeldBulk>,
}

/// One held bulk step, as the test drives it.
struct HeldBulk {
    report: oneshot::Sender<()>,
    finish: oneshot::Sender<()>,
}

impl Connector for BulkBarrier {
    fn kind_name(&self) -> &'static str {
        "bulk barrier"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let (report, reported) = oneshot::channel();
            let (finish, finished) = oneshot::channel();
            self.entered
                .send(HeldBulk { report, finish })
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            if reported.await.is_ok() {
                job.progress.report(BulkProgress {
                    subjects_done: 5,
                    subjects_total: 10,
                    records_done: 5,
                    records_total: 10,
                    erased: Vec::new(),
                });
            }
            finished
                .await
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            Ok(Outcome::Completed {
                records_affected: 10,
                note: "erased".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }
}

/// A contract end cancelled once it is deleting keeps its state (the erasure reports what it
/// did) and is still claimed, so its erasure goes on after a failed attempt, a lost lease or
/// a restart; it used to be left IN_PROGRESS for good, its data partly erased.
async fn a_cancelled_contract_end_that_is_deleting_is_still_claimed(
    database_url: &str,
    dir: &std::path::Path,
) {
    let (tx, _entered) = mpsc::unbounded_channel();
    let connectors = HashMap::from([(
        "crm".to_string(),
        Arc::new(BulkBarrier { entered: tx }) as Arc<dyn Connector>,
    )]);
    let app = App::with_connectors(config(dir, database_url, 60_000), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    accept_contract_end(&shared, ContractEndChoice::Delete, ContractPhase::Deleting).await;
    let now = shared.clock.now_ms();
    shared
        .store
        .cancel("acme", "r-1", "the controller changed its mind", now)
        .await
        .expect("cancel");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.state, task.phase, task.cancel_requested_at),
        (TaskState::InProgress, ContractPhase::Deleting, None),
        "{task:?}"
    );
    let job = claim_one(&shared, 60_000).await;
    assert_eq!(job.task.phase, ContractPhase::Deleting);
}

/// New terms that wake a task while a claim of it decides without them are not overwritten
/// by that claim's postponement: a return confirmed just after the runner found it
/// unconfirmed used to leave the task asleep until its due date, its data never deleted.
async fn a_wake_up_during_a_claim_is_kept(database_url: &str, dir: &std::path::Path) {
    let (tx, _entered) = mpsc::unbounded_channel();
    let connectors = HashMap::from([(
        "crm".to_string(),
        Arc::new(BulkBarrier { entered: tx }) as Arc<dyn Connector>,
    )]);
    let app = App::with_connectors(config(dir, database_url, 60_000), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    let choice = ContractEndChoice::ReturnThenDelete;
    let seq = accept_contract_end(&shared, choice, ContractPhase::AwaitingConfirmation).await;
    let job = claim_one(&shared, 60_000).await;
    // The controller confirms the return while the claim decides on the terms it read.
    let mut terms = job
        .request
        .as_ref()
        .and_then(|r| r.parameters.as_ref())
        .and_then(|p| p.contract_end.clone())
        .expect("the delivered terms");
    terms.return_confirmed = true;
    let later = shared.clock.now_ms() + 1;
    shared
        .store
        .update_contract_end("acme", "r-1", &terms, None, later)
        .await
        .expect("confirm");
    // The claim's own decision: wait for a confirmation, for ever.
    let key = &job.task.key;
    assert!(shared
        .store
        .postpone(
            key,
            seq,
            &job.lease_owner,
            job.due_as_known(),
            i64::MAX,
            None,
            false,
            false,
            shared.clock.now_ms(),
        )
        .await
        .expect("postpone"));
    let job = claim_one(&shared, 60_000).await;
    assert_eq!(job.task.phase, ContractPhase::AwaitingConfirmation);
}

/// Fails every call as a holder that is down does.
struct Down;

impl Connector for Down {
    fn kind_name(&self) -> &'static str {
        "down"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Transient("the holder is down".into())) })
    }
}

/// A claim's own start step is no time set by someone else: the retry after a transient
/// failure of a PENDING task's first call waits its backoff. The postponement used to take
/// the start's due time ("now") for a wake-up and keep it, so the task was claimed again at
/// once, the holder called again with no backoff.
async fn a_retry_after_the_first_call_waits_its_backoff(database_url: &str, dir: &std::path::Path) {
    let connectors = HashMap::from([("crm".to_string(), Arc::new(Down) as Arc<dyn Connector>)]);
    let app = App::with_connectors(config(dir, database_url, 60_000), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let job = claim_one(&shared, 60_000).await;
    assert_eq!(job.task.state, TaskState::Pending);
    crate::runner::run_task(&shared, job).await.expect("run");
    let after = shared.clock.now_ms();
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::InProgress, "{task:?}");
    let due: i64 = sqlx::query_scalar("SELECT next_attempt_at FROM tasks WHERE request_id = $1")
        .bind("r-1")
        .fetch_one(&shared.store.db().pool)
        .await
        .expect("due");
    assert!(
        due > after,
        "the retry is due at {due}, not after the failure at {after}"
    );
    let again = shared
        .store
        .claim_tasks(after, 10, 60_000)
        .await
        .expect("claim");
    assert!(again.is_empty(), "claimed again at once: {again:?}");
}

/// A bulk step whose lease was taken by another claim reports progress before it learns of
/// the loss (its renewals are far off): the progress is not recorded, so the sequence stays
/// where the new holder's step expects it and its erasure is the one acknowledged.
async fn lost_progress_is_not_recorded(database_url: &str, dir: &std::path::Path) {
    let (tx, mut entered) = mpsc::unbounded_channel();
    let connectors = HashMap::from([(
        "crm".to_string(),
        Arc::new(BulkBarrier { entered: tx }) as Arc<dyn Connector>,
    )]);
    let app = App::with_connectors(config(dir, database_url, 60_000), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    // Deleting and released, so each claim runs it under the lease the test gives it.
    let seq =
        accept_contract_end(&shared, ContractEndChoice::Delete, ContractPhase::Deleting).await;

    let first = start(&shared, claim_one(&shared, 50).await);
    let held_first = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the first bulk step runs")
        .expect("held");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = start(&shared, claim_one(&shared, 60_000).await);
    let held_second = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the second bulk step runs")
        .expect("held");

    held_first.report.send(()).expect("first step waits");
    // Many progress ticks (10 ms apart) of the first runner.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.sequence, task.counts.subjects_done),
        (seq, 0),
        "{task:?}"
    );

    drop(held_second.report);
    held_second.finish.send(()).expect("second step waits");
    second.await.expect("second runner").expect("second step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
    let acks = acks(&shared).await;
    assert!(
        acks.iter()
            .all(|a| a.progress.as_ref().is_none_or(|p| p.subjects_done == 0)),
        "{acks:#?}"
    );
    assert_eq!(completed(&acks).len(), 1, "{acks:#?}");
    drop(held_first.finish);
    first.abort();
}

/// A holder whose erasure, like Mailchimp's deletion of an audience, answers differently once
/// the data is gone: the first call reports its count (3 members), deletes and never answers
/// (the test cuts it off); a later call finds nothing, and fails for good ("nothing was done")
/// unless told an earlier call was cut off, when it answers with the count recorded.
struct Vanishing {
    entered: mpsc::UnboundedSender<()>,
    deleted: AtomicBool,
    /// Each call's [`BulkJob::interrupted`] and [`BulkJob::recorded_progress`], in order.
    calls: std::sync::Mutex<Vec<(bool, BulkProgress)>>,
}

/// `done` of `total` members, as subjects and records alike.
fn members(done: u64, total: u64) -> BulkProgress {
    BulkProgress {
        subjects_done: done,
        subjects_total: total,
        records_done: done,
        records_total: total,
        erased: Vec::new(),
    }
}

impl Connector for Vanishing {
    fn kind_name(&self) -> &'static str {
        "vanishing"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .expect("calls")
                .push((job.interrupted, job.recorded_progress.clone()));
            if !self.deleted.swap(true, Ordering::SeqCst) {
                job.progress.report(members(0, 3));
                let _ = self.entered.send(());
                std::future::pending::<()>().await;
            }
            if !job.interrupted {
                return Err(ConnectorError::Permanent(
                    "the audience was not found; nothing was done".into(),
                ));
            }
            let n = job.recorded_progress.subjects_total;
            job.progress.report(members(n, n));
            Ok(Outcome::Completed {
                records_affected: n as i64,
                note: "deleted by the call that was cut off".into(),
                files: Vec::new(),
                erased: vec![ErasedCount {
                    target: "audience".into(),
                    action: "deleted".into(),
                    count: n as i64,
                }],
            })
        })
    }
}

/// How the first call of an erasure is cut off before its answer is recorded.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The process dies (SIGKILL): the step stops where it is, and its lease runs out.
    Crash,
    /// The shutdown grace ends: the step is abandoned and its lease released.
    Shutdown,
}

/// A contract end's erasure cut off after its holder did the work is resumed with care: the
/// call was noted, so the next claim's is told so ([`BulkJob::interrupted`]) with the count
/// the first reported, and the task is COMPLETED with it. Unnoted, the resumed call met a
/// holder that no longer found the data and the task was FAILED, "nothing was done".
async fn a_cut_off_bulk_erasure_is_resumed_with_care(
    database_url: &str,
    dir: &std::path::Path,
    cut: Cut,
) {
    let (tx, mut entered) = mpsc::unbounded_channel();
    let holder = Arc::new(Vanishing {
        entered: tx,
        deleted: AtomicBool::new(false),
        calls: Default::default(),
    });
    let connectors = HashMap::from([("crm".to_string(), holder.clone() as Arc<dyn Connector>)]);
    // Leases of 300 ms, renewed every 100 ms while the runner lives.
    let app = App::with_connectors(config(dir, database_url, 300), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    deliver_contract_end(&shared, ContractEndChoice::Delete).await;

    let first = start(&shared, claim_one(&shared, 300).await);
    tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the erasure is called")
        .expect("a call");
    // The count the holder reported is recorded while it works (every 10 ms here).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
        if task.counts == members(0, 3) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{task:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match cut {
        Cut::Crash => {
            first.abort();
            let _ = first.await;
            // Past the lease, on the database's clock.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        Cut::Shutdown => {
            shared.abandon.send_replace(true);
            first.await.expect("first runner").expect("first step");
            shared.abandon.send_replace(false);
        }
    }
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.state, task.phase),
        (TaskState::InProgress, ContractPhase::Deleting),
        "{task:?}"
    );
    assert!(
        task.call_started_at.is_some(),
        "the cut-off call stays noted"
    );

    // A claim between whose step fails before the holder is called (what the return left
    // cannot be removed: a file stands where its folder goes) keeps the note.
    let in_the_way = crate::exports::task_dir(&shared.config.data_dir, &task.key);
    std::fs::create_dir_all(in_the_way.parent().expect("parent")).expect("folder");
    std::fs::write(&in_the_way, b"not a folder").expect("file");
    let job = claim_one(&shared, 60_000).await;
    crate::runner::run_task(&shared, job).await.expect("step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::InProgress, "{task:?}");
    assert!(task.call_started_at.is_some(), "{task:?}");
    assert_eq!(holder.calls.lock().expect("calls").len(), 1, "not called");
    std::fs::remove_file(&in_the_way).expect("out of the way");
    // Past the retry's backoff and the holder's marked unavailability.
    shared.clock.advance(10_000);

    let job = claim_one(&shared, 60_000).await;
    crate::runner::run_task(&shared, job).await.expect("step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.state, task.records_affected, task.phase),
        (TaskState::Completed, 3, ContractPhase::Done),
        "{task:?}"
    );
    assert_eq!(task.call_started_at, None, "the answer clears the note");
    assert_eq!(
        *holder.calls.lock().expect("calls"),
        [(false, BulkProgress::default()), (true, members(0, 3))]
    );
    let acks = acks(&shared).await;
    let done = completed(&acks);
    assert_eq!(done.len(), 1, "{acks:#?}");
    assert_eq!(
        done[0]
            .evidence
            .as_ref()
            .expect("evidence")
            .records_affected,
        3
    );
}

/// Exports beyond `tasks.export_concurrency` (1 here) wait for a slot, and their leases are
/// renewed while they wait; work that exports nothing does not wait for one.
async fn exports_wait_for_a_slot_holding_their_leases(database_url: &str, dir: &std::path::Path) {
    let lease_ms = 600;
    let (barrier, mut entered) = Barrier::new();
    let mut config = config(dir, database_url, lease_ms);
    config.tasks.export_concurrency = 1;
    let app = barrier.app(config).await;
    let shared = app.shared();
    let mut jobs = HashMap::new();
    for (id, kind) in [
        ("export-1", RequestKind::ReturnOfData),
        ("export-2", RequestKind::ReturnOfData),
        ("erasure", RequestKind::Erasure),
    ] {
        accept_started(&shared, id, kind).await;
        jobs.insert(id, claim_one(&shared, lease_ms as i64).await);
    }
    let first = start(&shared, jobs.remove("export-1").expect("job"));
    let release_first = next_call(&mut entered).await;
    let second = start(&shared, jobs.remove("export-2").expect("job"));
    let erasure = start(&shared, jobs.remove("erasure").expect("job"));
    let release_erasure = next_call(&mut entered).await;
    assert_eq!(
        barrier.calls.load(Ordering::SeqCst),
        2,
        "the erasure took no slot"
    );

    // Three leases' worth of waiting: the second export is not called, and no claim can
    // take its task, since its runner renews the lease while it waits.
    tokio::time::sleep(Duration::from_millis(3 * lease_ms)).await;
    assert_eq!(
        barrier.calls.load(Ordering::SeqCst),
        2,
        "one export at a time"
    );
    let taken = shared
        .store
        .claim_tasks(shared.clock.now_ms(), 10, 60_000)
        .await
        .expect("claim");
    assert!(
        taken.is_empty(),
        "a waiting export kept its lease: {taken:?}"
    );

    release_first.send(()).expect("first call waits");
    let release_second = next_call(&mut entered).await;
    assert_eq!(barrier.calls.load(Ordering::SeqCst), 3);
    release_second.send(()).expect("second call waits");
    release_erasure.send(()).expect("erasure waits");
    for runner in [first, second, erasure] {
        runner.await.expect("runner").expect("step");
    }
    // No call was cut off and resumed: each ran once, under its own claim.
    assert_eq!(
        *barrier.interrupted.lock().expect("interrupted"),
        [false, false, false]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_wait_for_a_slot_holding_their_leases_on_sqlite() {
    on_sqlite(|u, d| async move { exports_wait_for_a_slot_holding_their_leases(&u, &d).await })
        .await;
}

/// A contract end's export waits for a slot like any other (all of them taken by the test
/// here), its lease renewed by the bulk step's loop meanwhile; its holder is called once a
/// slot is free.
async fn a_contract_end_export_waits_for_a_slot(database_url: &str, dir: &std::path::Path) {
    let lease_ms = 600;
    let (tx, mut entered) = mpsc::unbounded_channel();
    let connectors = HashMap::from([(
        "crm".to_string(),
        Arc::new(BulkBarrier { entered: tx }) as Arc<dyn Connector>,
    )]);
    let app = App::with_connectors(config(dir, database_url, lease_ms), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    accept_contract_end(
        &shared,
        ContractEndChoice::ReturnThenDelete,
        ContractPhase::Returning,
    )
    .await;
    let slots = shared
        .config
        .tasks
        .export_concurrency
        .try_into()
        .expect("slots");
    let taken = shared
        .export_slots
        .acquire_many(slots)
        .await
        .expect("every slot");

    let runner = start(&shared, claim_one(&shared, lease_ms as i64).await);
    tokio::time::sleep(Duration::from_millis(3 * lease_ms)).await;
    assert!(entered.try_recv().is_err(), "the export waits for a slot");
    let claimed = shared
        .store
        .claim_tasks(shared.clock.now_ms(), 10, 60_000)
        .await
        .expect("claim");
    assert!(
        claimed.is_empty(),
        "a waiting export kept its lease: {claimed:?}"
    );

    drop(taken);
    let held = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the export runs once a slot is free")
        .expect("held");
    drop(held.report);
    held.finish.send(()).expect("step waits");
    runner.await.expect("runner").expect("step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_end_export_waits_for_a_slot_on_sqlite() {
    on_sqlite(|u, d| async move { a_contract_end_export_waits_for_a_slot(&u, &d).await }).await;
}

async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    test(url, dir.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_late_outcome_is_not_recorded_on_sqlite() {
    on_sqlite(|u, d| async move { late_outcome_is_not_recorded(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_late_outcome_is_not_recorded_on_postgres() {
    crate::test_postgres::on_postgres(
        |u, d| async move { late_outcome_is_not_recorded(&u, &d).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_lost_renewal_abandons_the_step_on_sqlite() {
    on_sqlite(|u, d| async move { lost_renewal_abandons_the_step(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_lost_renewal_abandons_the_step_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        lost_renewal_abandons_the_step(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_the_store_matches_the_lease_token_on_sqlite() {
    on_sqlite(|u, d| async move { the_store_matches_the_lease_token(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_the_store_matches_the_lease_token_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        the_store_matches_the_lease_token(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_cancelled_contract_end_that_is_deleting_is_still_claimed_on_sqlite() {
    on_sqlite(|u, d| async move {
        a_cancelled_contract_end_that_is_deleting_is_still_claimed(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_cancelled_contract_end_that_is_deleting_is_still_claimed_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_cancelled_contract_end_that_is_deleting_is_still_claimed(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_wake_up_during_a_claim_is_kept_on_sqlite() {
    on_sqlite(|u, d| async move { a_wake_up_during_a_claim_is_kept(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_wake_up_during_a_claim_is_kept_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_wake_up_during_a_claim_is_kept(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_lost_progress_is_not_recorded_on_sqlite() {
    on_sqlite(|u, d| async move { lost_progress_is_not_recorded(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_lost_progress_is_not_recorded_on_postgres() {
    crate::test_postgres::on_postgres(
        |u, d| async move { lost_progress_is_not_recorded(&u, &d).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_retry_after_the_first_call_waits_its_backoff_on_sqlite() {
    on_sqlite(|u, d| async move { a_retry_after_the_first_call_waits_its_backoff(&u, &d).await })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_retry_after_the_first_call_waits_its_backoff_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_retry_after_the_first_call_waits_its_backoff(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_crashed_bulk_erasure_is_resumed_with_care_on_sqlite() {
    on_sqlite(|u, d| async move {
        a_cut_off_bulk_erasure_is_resumed_with_care(&u, &d, Cut::Crash).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_crashed_bulk_erasure_is_resumed_with_care_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_cut_off_bulk_erasure_is_resumed_with_care(&u, &d, Cut::Crash).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_bulk_erasure_abandoned_at_shutdown_is_resumed_with_care_on_sqlite() {
    on_sqlite(|u, d| async move {
        a_cut_off_bulk_erasure_is_resumed_with_care(&u, &d, Cut::Shutdown).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_a_bulk_erasure_abandoned_at_shutdown_is_resumed_with_care_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_cut_off_bulk_erasure_is_resumed_with_care(&u, &d, Cut::Shutdown).await
    })
    .await;
}
