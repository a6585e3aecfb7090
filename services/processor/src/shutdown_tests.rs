//! Graceful shutdown, through the processor's real store (SQLite, and PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server), runner, acknowledgement sender and a
//! controller's registry played by the test over mTLS. Two tasks are at their holders, each
//! held at a barrier, when shutdown begins: the fast one is let go at once and its outcome
//! reaches the registry before `run` returns; the slow one never returns, so at the end of
//! the grace its step is abandoned, nothing recorded for it, and its lease released: another
//! processor claims it at once, though `tasks.lease_ms` is an hour.
//!
//! The same harness shows when acknowledgements leave: a task's IN_PROGRESS goes to the
//! registry with its outcome, in one call, not alone while the holder works.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsrelay_connectors::{BoxFuture, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::acknowledgement_service_server::{
    AcknowledgementService, AcknowledgementServiceServer,
};
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Acknowledgement, DeliverRequest, RequestKind,
    TaskState,
};
use dsrelay_runtime::host::SHUTDOWN_MARGIN;
use dsrelay_runtime::pki::DevPki;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::{App, Config};

const GRACE_MS: u64 = 1_500;

/// Holds each call until the test lets it go (COMPLETED then).
struct Held {
    name: &'static str,
    entered: mpsc::UnboundedSender<(&'static str, oneshot::Sender<()>)>,
}

impl Connector for Held {
    fn kind_name(&self) -> &'static str {
        "held"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let (release, released) = oneshot::channel();
            self.entered
                .send((self.name, release))
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            released
                .await
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            Ok(Outcome::Completed {
                records_affected: 1,
                note: format!("{} done", self.name),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }
}

/// The controller's registry as far as acknowledgements go: it stores what it is sent, call
/// by call.
#[derive(Clone, Default)]
struct Registry(Arc<Mutex<Vec<Vec<Acknowledgement>>>>);

#[tonic::async_trait]
impl AcknowledgementService for Registry {
    async fn acknowledge(
        &self,
        req: Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        let acks = req.into_inner().acknowledgements;
        let applied = acks.len() as u32;
        self.0.lock().expect("acks").push(acks);
        Ok(Response::new(AcknowledgeResponse {
            applied,
            ..Default::default()
        }))
    }
}

impl Registry {
    fn states(&self, subprocessor: &str) -> Vec<TaskState> {
        self.0
            .lock()
            .expect("acks")
            .iter()
            .flatten()
            .filter(|a| a.subprocessor == subprocessor)
            .map(|a| a.state())
            .collect()
    }
}

impl Registry {
    /// The calls so far: per call, each acknowledgement's request and state.
    fn calls(&self) -> Vec<Vec<(String, TaskState)>> {
        self.0
            .lock()
            .expect("acks")
            .iter()
            .map(|call| {
                call.iter()
                    .map(|a| (a.request_id.clone(), a.state()))
                    .collect()
            })
            .collect()
    }
}

fn config(dir: &std::path::Path, database_url: &str, registry: u16) -> Config {
    config_with(dir, database_url, registry, "")
}

/// [`config`] with `acks` as the `[acks]` table's lines.
fn config_with(dir: &std::path::Path, database_url: &str, registry: u16, acks: &str) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let checkpoint_key = pki.signing_key("processor");
    let checkpoint_file = dir.join("audit/checkpoints.jsonl");
    let tls = pki.files("processor");
    let text = format!(
        "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
         shutdown_grace_ms = {GRACE_MS}\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [audit]\ncheckpoint_key = {checkpoint_key:?}\ncheckpoint_file = {checkpoint_file:?}\n\
         [tasks]\nlease_ms = 3600000\n[acks]\n{acks}\n\
         [[subprocessors]]\nname = \"fast\"\ncategories = [\"contact\"]\n\
         connector = {{ type = \"noop\" }}\n\
         [[subprocessors]]\nname = \"slow\"\ncategories = [\"marketing\"]\n\
         connector = {{ type = \"noop\" }}\n\
         [[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/controller\"\n\
         registry_endpoint = \"https://127.0.0.1:{registry}\"\n",
        dir.join("data"),
        tls.ca,
        tls.cert,
        tls.key,
    );
    let file = dir.join("processor.toml");
    std::fs::write(&file, text).expect("config file");
    Config::load_from(Some(&file), Vec::new()).expect("config")
}

/// Serves the fake registry with the development PKI's registry certificate.
async fn serve_registry(dir: &std::path::Path) -> (Registry, u16, oneshot::Sender<()>) {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let registry = Registry::default();
    let tls = pki.files("registry").server_config().expect("registry tls");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = dsrelay_runtime::server::builder(tls)
        .expect("server")
        .add_service(AcknowledgementServiceServer::new(registry.clone()))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async {
                let _ = stopped.await;
            },
        );
    tokio::spawn(server);
    (registry, port, stop)
}

async fn shutdown_mid_call(database_url: &str, dir: &std::path::Path) {
    let (registry, port, stop_registry) = serve_registry(dir).await;
    let (tx, mut entered) = mpsc::unbounded_channel();
    let connectors = |tx: &mpsc::UnboundedSender<_>| {
        HashMap::from([
            (
                "fast".to_string(),
                Arc::new(Held {
                    name: "fast",
                    entered: tx.clone(),
                }) as Arc<dyn Connector>,
            ),
            (
                "slow".to_string(),
                Arc::new(Held {
                    name: "slow",
                    entered: tx.clone(),
                }) as Arc<dyn Connector>,
            ),
        ])
    };
    let app = App::with_connectors(config(dir, database_url, port), connectors(&tx))
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
        .accept(
            "acme",
            &req,
            &["fast".to_string(), "slow".to_string()],
            None,
            now,
        )
        .await
        .expect("accept");

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let run = tokio::spawn(app.run_with_admin(listener, None, async move {
        let _ = shutdown_rx.await;
    }));
    let mut held = HashMap::new();
    for _ in 0..2 {
        let (name, release) = tokio::time::timeout(Duration::from_secs(10), entered.recv())
            .await
            .expect("both holders are called")
            .expect("a call");
        held.insert(name, release);
    }

    let began = Instant::now();
    shutdown.send(()).expect("run waits for shutdown");
    // Shutdown has begun; the fast holder answers during the grace.
    tokio::time::sleep(Duration::from_millis(100)).await;
    held.remove("fast")
        .expect("fast")
        .send(())
        .expect("fast waits");
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("run returns")
        .expect("run task")
        .expect("run");
    let took = began.elapsed();
    let grace = Duration::from_millis(GRACE_MS);
    assert!(took >= grace, "the slow step had its grace: {took:?}");
    assert!(
        took < grace + SHUTDOWN_MARGIN + Duration::from_secs(1),
        "stopped within the grace and the margin: {took:?}"
    );

    // The fast outcome reached the registry before run returned.
    let errors: Vec<Option<String>> = sqlx::query_scalar("SELECT last_error FROM ack_outbox")
        .fetch_all(&shared.store.db().pool)
        .await
        .expect("outbox");
    assert!(
        registry.states("fast").contains(&TaskState::Completed),
        "{:?} {errors:?}",
        registry.states("fast")
    );
    // Nothing was recorded for the abandoned step, and its lease is given up.
    let tasks = shared.store.tasks("acme", "r-1").await.expect("tasks");
    let slow = tasks
        .iter()
        .find(|t| t.key.subprocessor == "slow")
        .expect("slow");
    assert_eq!(slow.state, TaskState::InProgress, "{slow:?}");
    assert!(
        slow.call_started_at.is_some(),
        "the cut-off call stays noted"
    );
    assert!(!registry.states("slow").contains(&TaskState::Completed));
    let owner: Option<String> =
        sqlx::query_scalar("SELECT lease_owner FROM tasks WHERE subprocessor = 'slow'")
            .fetch_one(&shared.store.db().pool)
            .await
            .expect("owner");
    assert_eq!(owner, None);
    drop(held);

    // Another processor on the same database takes the task over at once, though its lease
    // would have lasted an hour.
    let (tx2, mut entered2) = mpsc::unbounded_channel();
    let other = App::with_connectors(config(dir, database_url, port), connectors(&tx2))
        .await
        .expect("second app");
    let other = other.shared();
    let jobs = other
        .store
        .claim_tasks(other.clock.now_ms(), 10, 3_600_000)
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].task.key.subprocessor, "slow");
    assert!(jobs[0].task.call_started_at.is_some(), "resumed with care");
    assert!(entered2.try_recv().is_err());
    let _ = stop_registry.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_fast_steps_and_releases_slow_ones_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    shutdown_mid_call(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_fast_steps_and_releases_slow_ones_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move { shutdown_mid_call(&u, &d).await }).await;
}

/// Accepts `request_id` (one task, of subprocessor "fast") and wakes the runner, as a
/// Deliver does (without waking the acknowledgement sender, which a Deliver also does).
async fn deliver(shared: &crate::app::Shared, request_id: &str) {
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: request_id.into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["fast".to_string()], None, now)
        .await
        .expect("accept");
    shared.task_wakeup.notify_one();
}

/// Waits for the holder's next call; answers what lets it go.
async fn called(
    entered: &mut mpsc::UnboundedReceiver<(&'static str, oneshot::Sender<()>)>,
) -> oneshot::Sender<()> {
    let (_, release) = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the holder is called")
        .expect("a call");
    release
}

/// Waits until the registry has had `n` calls.
async fn calls_reach(registry: &Registry, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.calls().len() < n {
        assert!(Instant::now() < deadline, "{:?}", registry.calls());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The step that starts a task, which the holder's call directly follows, does not wake the
/// acknowledgement sender: its IN_PROGRESS waits for the outcome and both go in one call
/// (the sender polls only once a minute here, so nothing else sends it).
async fn in_progress_goes_with_the_outcome(database_url: &str, dir: &std::path::Path) {
    let (registry, port, stop_registry) = serve_registry(dir).await;
    let (tx, mut entered) = mpsc::unbounded_channel();
    let connectors = HashMap::from([(
        "fast".to_string(),
        Arc::new(Held {
            name: "fast",
            entered: tx,
        }) as Arc<dyn Connector>,
    )]);
    let config = config_with(dir, database_url, port, "poll_interval_ms = 60000");
    let app = App::with_connectors(config, connectors).await.expect("app");
    let shared = app.shared();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let run = tokio::spawn(app.run_with_admin(listener, None, async move {
        let _ = shutdown_rx.await;
    }));
    // A first request, whose acknowledgements leave the sender waiting for the next wake.
    deliver(&shared, "r-1").await;
    called(&mut entered).await.send(()).expect("held");
    calls_reach(&registry, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    deliver(&shared, "r-2").await;
    let release = called(&mut entered).await;
    // IN_PROGRESS is recorded before the call; the sender is given time to (wrongly) send it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks = shared.store.tasks("acme", "r-2").await.expect("tasks");
    assert_eq!(tasks[0].state, TaskState::InProgress);
    assert_eq!(registry.calls().len(), 1, "{:?}", registry.calls());
    release.send(()).expect("held");
    calls_reach(&registry, 2).await;
    assert_eq!(
        registry.calls()[1],
        vec![
            ("r-2".to_string(), TaskState::InProgress),
            ("r-2".to_string(), TaskState::Completed)
        ]
    );
    shutdown.send(()).expect("run waits for shutdown");
    run.await.expect("run task").expect("run");
    let _ = stop_registry.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_goes_with_the_outcome_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    in_progress_goes_with_the_outcome(&url, dir.path()).await;
}
