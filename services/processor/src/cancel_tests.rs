//! Cancellation that tells the truth, through the processor's real store (SQLite, and
//! PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server) and runner, in both orders:
//! cancelled before its holder is called, a task is CANCELLED and the holder never called;
//! cancelled while the holder works (held at a barrier), the task reports what the holder
//! did: the erasure COMPLETED with its evidence and certificate, saying the cancellation came
//! too late. Work started before the cancellation is followed to its end even when its
//! runner went away (also a call cut off by a shutdown, made again), and retained data still
//! goes at its date.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_connectors::{BoxFuture, Connector, ConnectorError, ErasedCount, Outcome, Task};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{Acknowledgement, DeliverRequest, RequestKind, TaskState};
use dsrelay_runtime::pki::DevPki;
use tokio::sync::{mpsc, oneshot};

use crate::app::Shared;
use crate::store::{TaskJob, Transition};
use crate::{App, Config};

/// A holder held until the test lets it go: each call reports itself on `entered` with the
/// sender that lets it finish, then gives `answer` (for [`setup`], an erasure of two rows).
pub(super) struct Barrier {
    entered: mpsc::UnboundedSender<oneshot::Sender<()>>,
    calls: AtomicUsize,
    answer: fn() -> Result<Outcome, ConnectorError>,
    /// Each call's [`Task::interrupted`], in order.
    interrupted: std::sync::Mutex<Vec<bool>>,
}

/// What [`setup`]'s holder answers: two rows erased.
fn erased_two_rows() -> Result<Outcome, ConnectorError> {
    Ok(Outcome::Completed {
        records_affected: 2,
        note: "deleted 2 rows".into(),
        files: Vec::new(),
        erased: vec![ErasedCount {
            target: "customers".into(),
            action: "deleted".into(),
            count: 2,
        }],
    })
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
            self.calls.fetch_add(1, Ordering::SeqCst);
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
            (self.answer)()
        })
    }
}

fn config(dir: &std::path::Path, database_url: &str) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let tls = pki.files("processor");
    let checkpoint_key = pki.signing_key("processor");
    let checkpoint_file = dir.join("audit/checkpoints.jsonl");
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

pub(super) struct Setup {
    pub(super) app: App,
    pub(super) entered: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    pub(super) barrier: Arc<Barrier>,
}

/// A processor with one delivered ERASURE (`r-1`, due in 10 minutes), its task PENDING.
async fn setup(database_url: &str, dir: &std::path::Path) -> Setup {
    setup_answering(database_url, dir, erased_two_rows).await
}

/// [`setup`], its holder giving `answer` once let go.
pub(super) async fn setup_answering(
    database_url: &str,
    dir: &std::path::Path,
    answer: fn() -> Result<Outcome, ConnectorError>,
) -> Setup {
    let (tx, entered) = mpsc::unbounded_channel();
    let barrier = Arc::new(Barrier {
        entered: tx,
        calls: AtomicUsize::new(0),
        answer,
        interrupted: Default::default(),
    });
    let connectors = HashMap::from([("crm".to_string(), barrier.clone() as Arc<dyn Connector>)]);
    let app = App::with_connectors(config(dir, database_url), connectors)
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
    Setup {
        app,
        entered,
        barrier,
    }
}

async fn claim(shared: &Shared) -> Vec<TaskJob> {
    let lease_ms = shared.config.tasks.lease_ms as i64;
    shared
        .store
        .claim_tasks(shared.clock.now_ms(), 10, lease_ms)
        .await
        .expect("claim")
}

async fn cancel(shared: &Shared) -> Vec<crate::store::TaskRow> {
    shared
        .store
        .cancel("acme", "r-1", "withdrawn", shared.clock.now_ms())
        .await
        .expect("cancel")
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

/// Cancelled before any claim: nothing is claimed. Cancelled between a claim and its start:
/// the start matches nothing. Either way the holder is never called.
async fn cancelled_before_the_call(database_url: &str, dir: &std::path::Path) {
    let Setup { app, barrier, .. } = setup(database_url, dir).await;
    let shared = app.shared();
    let tasks = cancel(&shared).await;
    assert_eq!(tasks[0].state, TaskState::Cancelled, "{tasks:?}");
    assert!(claim(&shared).await.is_empty());

    // Another request, claimed first and cancelled before its runner starts it.
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-2".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let mut jobs = claim(&shared).await;
    assert_eq!(jobs.len(), 1);
    let tasks = shared
        .store
        .cancel("acme", "r-2", "withdrawn", now)
        .await
        .expect("cancel");
    assert_eq!(tasks[0].state, TaskState::Cancelled, "{tasks:?}");
    let job = jobs.pop().expect("a job");
    crate::runner::run_task(&shared, job).await.expect("step");
    let tasks = shared.store.tasks("acme", "r-2").await.expect("tasks");
    assert_eq!(tasks[0].state, TaskState::Cancelled, "{tasks:?}");
    assert_eq!(
        barrier.calls.load(Ordering::SeqCst),
        0,
        "the holder is never called"
    );
}

/// Cancelled while the holder erases: Cancel answers the task IN_PROGRESS, marked; when the
/// holder answers, the erasure is COMPLETED with its evidence and certificate, saying the
/// cancellation came too late, and nothing is CANCELLED.
async fn cancelled_while_the_holder_works(database_url: &str, dir: &std::path::Path) {
    let Setup {
        app,
        mut entered,
        barrier,
    } = setup(database_url, dir).await;
    let shared = app.shared();
    let job = claim(&shared).await.pop().expect("a job");
    let runner = {
        let shared = shared.clone();
        tokio::spawn(async move { crate::runner::run_task(&shared, job).await })
    };
    let release = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the holder is called")
        .expect("a call");

    let answered = cancel(&shared).await;
    let task = &answered[0];
    assert_eq!(task.state, TaskState::InProgress, "{task:?}");
    assert!(task.cancel_requested_at.is_some(), "{task:?}");
    assert!(
        task.reason.contains("too late to stop it"),
        "{}",
        task.reason
    );
    assert!(task.reason.contains("withdrawn"), "{}", task.reason);
    let status = task.to_status();
    assert_eq!(status.state(), TaskState::InProgress);
    // Cancelling again changes nothing.
    assert_eq!(cancel(&shared).await[0].sequence, task.sequence);

    release.send(()).expect("the call waits");
    runner.await.expect("runner").expect("step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.state, task.records_affected),
        (TaskState::Completed, 2),
        "{task:?}"
    );
    assert!(task.note.starts_with("deleted 2 rows ("), "{}", task.note);
    let acks = acks(&shared).await;
    assert!(
        acks.iter().all(|a| a.state() != TaskState::Cancelled),
        "{acks:#?}"
    );
    let done = acks.last().expect("acks");
    assert_eq!(done.state(), TaskState::Completed);
    let evidence = done.evidence.as_ref().expect("evidence");
    assert_eq!(evidence.records_affected, 2);
    assert!(
        evidence.note.contains("cancellation came"),
        "{}",
        evidence.note
    );
    assert!(done.reason.contains("too late"), "{}", done.reason);
    assert!(done.certificate.is_some(), "the erasure is certified");
    assert_eq!(barrier.calls.load(Ordering::SeqCst), 1);
    // Finished: nothing of the cancelled request is claimed again.
    assert!(claim(&shared).await.is_empty());
}

/// A marked task whose runner went away (its lease ran out, say in a crash) is claimed
/// again, though its request is cancelled, to learn what the holder did; a RETAINED task of
/// a cancelled request is still claimed at its date, to erase what the law kept.
async fn started_work_is_followed_to_its_end(database_url: &str, dir: &std::path::Path) {
    let Setup {
        app,
        mut entered,
        barrier,
    } = setup(database_url, dir).await;
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
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
    // Claimed by a runner that never comes back. Its lease outlasts the cancellation below
    // even on a loaded machine (at 100 ms it once ran out first, and the cancellation then
    // found no runner to wait for).
    let gone = shared
        .store
        .claim_tasks(now, 10, 1_000)
        .await
        .expect("claim");
    assert_eq!(gone.len(), 1);
    let marked = cancel(&shared).await;
    assert!(marked[0].cancel_requested_at.is_some(), "{marked:?}");
    assert!(claim(&shared).await.is_empty(), "still leased");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let job = claim(&shared).await.pop().expect("claimed again");
    let runner = {
        let shared = shared.clone();
        tokio::spawn(async move { crate::runner::run_task(&shared, job).await })
    };
    let release = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the holder is asked again")
        .expect("a call");
    release.send(()).expect("the call waits");
    runner.await.expect("runner").expect("step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Completed, "{task:?}");
    assert!(task.reason.contains("too late"), "{}", task.reason);
    assert_eq!(barrier.calls.load(Ordering::SeqCst), 1);

    // Another request, its task RETAINED until now, then cancelled.
    let req = DeliverRequest {
        request_id: "r-2".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let task = &shared.store.tasks("acme", "r-2").await.expect("tasks")[0];
    let retained = Transition {
        state: TaskState::Retained,
        legal_basis: "Kirjanpitolaki 2:10".into(),
        retain_until: Some(now),
        next_attempt_at: Some(now),
        ..Default::default()
    };
    shared
        .store
        .transition(&task.key, task.sequence, &retained, now, 1)
        .await
        .expect("retain")
        .expect("retained");
    let tasks = shared
        .store
        .cancel("acme", "r-2", "withdrawn", now)
        .await
        .expect("cancel");
    assert_eq!(tasks[0].state, TaskState::Retained, "{tasks:?}");
    let jobs = claim(&shared).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].task.key.request_id, "r-2");
}

/// A call cut off before its answer was recorded (the processor stopped mid-call and
/// released the lease, as a shutdown does; a crash lets it run out) may have erased the
/// data: a cancellation that comes before the call is made again (here after a claim that
/// only waited for the holder, marked unreachable) marks the task instead of cancelling it,
/// the next claim makes the call again, told it was interrupted, and the task reports what
/// the holder did: COMPLETED with its certificate, never CANCELLED.
async fn a_cut_off_call_is_resumed_not_cancelled(database_url: &str, dir: &std::path::Path) {
    let Setup {
        app,
        mut entered,
        barrier,
    } = setup(database_url, dir).await;
    let shared = app.shared();
    let job = claim(&shared).await.pop().expect("a job");
    let (key, lease_owner) = (job.task.key.clone(), job.lease_owner.clone());
    let runner = {
        let shared = shared.clone();
        tokio::spawn(async move { crate::runner::run_task(&shared, job).await })
    };
    let release = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the holder is called")
        .expect("a call");
    // The service stops: the step is dropped mid-call, its lease released.
    runner.abort();
    assert!(runner.await.is_err(), "the step was dropped");
    drop(release);
    assert!(shared
        .store
        .release_lease(&key, &lease_owner)
        .await
        .expect("release"));
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert!(task.call_started_at.is_some(), "{task:?}");
    // The next claim finds the holder marked unreachable and waits without calling it:
    // the cut-off call is still on record.
    let now = shared.clock.now_ms();
    shared.unavailable_until.unreachable("crm", now + 1_000);
    let job = claim(&shared).await.pop().expect("claimed again");
    crate::runner::run_task(&shared, job).await.expect("wait");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::InProgress, "{task:?}");
    assert!(task.call_started_at.is_some(), "{task:?}");
    shared.unavailable_until.answered("crm");
    shared.clock.advance(1_000);

    let answered = cancel(&shared).await;
    let task = &answered[0];
    assert_eq!(task.state, TaskState::InProgress, "{task:?}");
    assert!(task.cancel_requested_at.is_some(), "{task:?}");

    let job = claim(&shared)
        .await
        .pop()
        .expect("the cut-off call is made again");
    let runner = {
        let shared = shared.clone();
        tokio::spawn(async move { crate::runner::run_task(&shared, job).await })
    };
    let release = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the holder is asked again")
        .expect("a call");
    release.send(()).expect("the call waits");
    runner.await.expect("runner").expect("step");
    assert_eq!(
        *barrier.interrupted.lock().expect("interrupted"),
        [false, true],
        "the second call is told the first was cut off"
    );
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.state, task.records_affected),
        (TaskState::Completed, 2),
        "{task:?}"
    );
    assert!(task.reason.contains("too late"), "{}", task.reason);
    let acks = acks(&shared).await;
    assert!(
        acks.iter().all(|a| a.state() != TaskState::Cancelled),
        "{acks:#?}"
    );
    let done = acks.last().expect("acks");
    assert_eq!(done.state(), TaskState::Completed);
    assert!(done.certificate.is_some(), "the erasure is certified");
    assert!(claim(&shared).await.is_empty());
}

/// An export on its way (its upload claimed by a sender) holds a cancellation off as a
/// working holder does: the task stays IN_PROGRESS, marked, and its sender reports what
/// arrived. An export waiting for its next attempt is cancelled at once.
async fn an_export_on_its_way(database_url: &str, dir: &std::path::Path) {
    let Setup { app, .. } = setup(database_url, dir).await;
    let shared = app.shared();
    let db = &shared.store.db().pool;
    let now = shared.clock.now_ms();
    // The task as its export step leaves it (IN_PROGRESS, no lease of its own), with its
    // upload claimed by a sender (`Store::claim_uploads` sets the lease the same way).
    sqlx::query("UPDATE tasks SET state = $1 WHERE request_id = 'r-1'")
        .bind(TaskState::InProgress as i32)
        .execute(db)
        .await
        .expect("in progress");
    sqlx::query(
        "INSERT INTO uploads (controller, request_id, subprocessor, next_attempt_at, \
         lease_until) VALUES ('acme', 'r-1', 'crm', $1, $2)",
    )
    .bind(now)
    .bind(now + 60_000)
    .execute(db)
    .await
    .expect("an upload on its way");
    let tasks = cancel(&shared).await;
    assert_eq!(tasks[0].state, TaskState::InProgress, "{tasks:?}");
    assert!(tasks[0].cancel_requested_at.is_some(), "{tasks:?}");
    assert!(tasks[0].reason.contains("too late to stop it"), "{tasks:?}");

    // Between attempts nothing is on its way: cancelled.
    let req = DeliverRequest {
        request_id: "r-2".into(),
        kind: RequestKind::ReturnOfData as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    sqlx::query("UPDATE tasks SET state = $1 WHERE request_id = 'r-2'")
        .bind(TaskState::InProgress as i32)
        .execute(db)
        .await
        .expect("in progress");
    sqlx::query(
        "INSERT INTO uploads (controller, request_id, subprocessor, next_attempt_at, \
         lease_until) VALUES ('acme', 'r-2', 'crm', $1, 0)",
    )
    .bind(now + 60_000)
    .execute(db)
    .await
    .expect("an upload waiting");
    let tasks = shared
        .store
        .cancel("acme", "r-2", "withdrawn", now)
        .await
        .expect("cancel");
    assert_eq!(tasks[0].state, TaskState::Cancelled, "{tasks:?}");
}

pub(super) async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    test(url, dir.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_the_call_never_calls_the_holder_on_sqlite() {
    on_sqlite(|u, d| async move { cancelled_before_the_call(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_the_call_never_calls_the_holder_on_postgres() {
    crate::test_postgres::on_postgres(
        |u, d| async move { cancelled_before_the_call(&u, &d).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_the_holder_works_reports_what_it_did_on_sqlite() {
    on_sqlite(|u, d| async move { cancelled_while_the_holder_works(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_the_holder_works_reports_what_it_did_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        cancelled_while_the_holder_works(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_started_work_is_followed_to_its_end_on_sqlite() {
    on_sqlite(|u, d| async move { started_work_is_followed_to_its_end(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_started_work_is_followed_to_its_end_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        started_work_is_followed_to_its_end(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_a_cut_off_call_resumes_it_on_sqlite() {
    on_sqlite(|u, d| async move { a_cut_off_call_is_resumed_not_cancelled(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_a_cut_off_call_resumes_it_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_cut_off_call_is_resumed_not_cancelled(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waits_for_an_export_on_its_way_on_sqlite() {
    on_sqlite(|u, d| async move { an_export_on_its_way(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waits_for_an_export_on_its_way_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move { an_export_on_its_way(&u, &d).await })
        .await;
}

/// On PostgreSQL, a sender's claim that commits while a cancellation reads the request's
/// tasks is waited for, not missed: the cancellation then sees the export on its way and
/// marks the task rather than cancelling it, so a sender that goes on to deliver cannot
/// leave a task CANCELLED whose data arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waits_for_a_claim_committing_meanwhile_on_postgres() {
    crate::test_postgres::on_postgres(|url, dir| async move {
        let Setup { app, .. } = setup(&url, &dir).await;
        let shared = app.shared();
        let db = shared.store.db().pool.clone();
        let now = shared.clock.now_ms();
        sqlx::query("UPDATE tasks SET state = $1 WHERE request_id = 'r-1'")
            .bind(TaskState::InProgress as i32)
            .execute(&db)
            .await
            .expect("in progress");
        sqlx::query(
            "INSERT INTO uploads (controller, request_id, subprocessor, next_attempt_at, \
             lease_until) VALUES ('acme', 'r-1', 'crm', $1, 0)",
        )
        .bind(now)
        .execute(&db)
        .await
        .expect("an upload due");
        // A claim under way: its UPDATE done (as `Store::claim_uploads` writes it), its
        // commit still to come.
        let mut claim = db.begin().await.expect("begin");
        sqlx::query(
            "UPDATE uploads SET lease_until = $1, lease_owner = 'sender', \
             attempts = attempts + 1 WHERE request_id = 'r-1'",
        )
        .bind(now + 600_000)
        .execute(&mut *claim)
        .await
        .expect("claim");
        let cancelling = {
            let shared = app.shared();
            tokio::spawn(async move {
                shared
                    .store
                    .cancel("acme", "r-1", "withdrawn", now)
                    .await
                    .expect("cancel")
            })
        };
        crate::test_postgres::until_waiting_for_a_lock(&db).await;
        claim.commit().await.expect("commit the claim");
        let tasks = cancelling.await.expect("cancel task");
        assert_eq!(tasks[0].state, TaskState::InProgress, "{tasks:?}");
        assert!(tasks[0].cancel_requested_at.is_some(), "{tasks:?}");
        assert!(tasks[0].reason.contains("too late to stop it"), "{tasks:?}");
    })
    .await;
}
