//! Graceful shutdown. The registry's dispatcher, in process against a processor the test
//! plays: a Deliver that answers within the grace is recorded, one still waiting at its end
//! is dropped and its lease released. Then both services as separate processes, each sent
//! SIGTERM with work in flight at a slow holder: each exits 0 within its grace and the
//! margin, says so in its log, and after a restart every request completes with each
//! acknowledgement applied once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_proto::v1::processor_service_server::{ProcessorService, ProcessorServiceServer};
use dsrelay_proto::v1::{
    CancelDeliveryRequest, DeliverRequest, DeliverResponse, ExtendDueDateRequest, GetStatusRequest,
    ListSubprocessorsRequest, RequestState, Scope, SubprocessorList, TaskList, TaskState,
    TaskStatus, UpdateContractEndRequest,
};
use dsrelay_runtime::host::SHUTDOWN_MARGIN;
use dsrelay_runtime::pki::DevPki;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::harness::{
    count, erasure, in_state, spawn_pair, wait_until, Backend, Mode, PairOptions, Role, PROCESSOR,
};

const GRACE_MS: u64 = 1_000;
const LONG: Duration = Duration::from_secs(60);

/// A processor whose Deliver calls each wait until the test lets them go (answering with one
/// PENDING task then); a call the test never lets go waits until the registry drops it.
/// GetStatus never answers.
#[derive(Clone)]
struct HeldProcessor {
    entered: mpsc::UnboundedSender<(String, oneshot::Sender<()>)>,
    /// Request ids whose Deliver was answered.
    answered: Arc<Mutex<Vec<String>>>,
    /// Told of every GetStatus call.
    asked: mpsc::UnboundedSender<String>,
}

#[tonic::async_trait]
impl ProcessorService for HeldProcessor {
    async fn deliver(
        &self,
        req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let id = req.into_inner().request_id;
        let (release, released) = oneshot::channel();
        self.entered
            .send((id.clone(), release))
            .map_err(|_| Status::unavailable("test ended"))?;
        released
            .await
            .map_err(|_| Status::unavailable("test let go"))?;
        self.answered.lock().unwrap().push(id.clone());
        Ok(Response::new(DeliverResponse {
            tasks: vec![TaskStatus {
                processor: PROCESSOR.into(),
                subprocessor: "accounting".into(),
                state: TaskState::Pending as i32,
                // As the processor reports a task it just created.
                sequence: 1,
                ..Default::default()
            }],
            duplicate: false,
        }))
    }

    async fn cancel(
        &self,
        _req: Request<CancelDeliveryRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_status(
        &self,
        req: Request<GetStatusRequest>,
    ) -> Result<Response<TaskList>, Status> {
        let _ = self.asked.send(req.into_inner().request_id);
        std::future::pending().await
    }

    async fn list_subprocessors(
        &self,
        _req: Request<ListSubprocessorsRequest>,
    ) -> Result<Response<SubprocessorList>, Status> {
        Ok(Response::new(SubprocessorList::default()))
    }

    async fn update_contract_end(
        &self,
        _req: Request<UpdateContractEndRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn extend_due_date(
        &self,
        _req: Request<ExtendDueDateRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

fn serve(processor: HeldProcessor, listener: TcpListener, pki: &DevPki) {
    let tls = pki.files("processor").server_config().expect("server tls");
    let router = dsrelay_runtime::server::builder(tls)
        .expect("server")
        .add_service(ProcessorServiceServer::new(processor));
    tokio::spawn(dsrelay_runtime::server::serve(
        router,
        listener,
        std::future::pending(),
    ));
}

/// One delivery row, as `(done, leased_by_someone, attempts)`.
async fn delivery(url: &str, id: &str) -> (bool, bool, i64) {
    let done = count(
        url,
        &format!(
            "SELECT COUNT(*) FROM deliveries WHERE request_id = '{id}' AND done_at IS NOT NULL"
        ),
    )
    .await;
    let leased = count(
        url,
        &format!(
            "SELECT COUNT(*) FROM deliveries WHERE request_id = '{id}' \
             AND (lease_owner IS NOT NULL OR lease_until <> 0)"
        ),
    )
    .await;
    let attempts = count(
        url,
        &format!("SELECT CAST(attempts AS BIGINT) FROM deliveries WHERE request_id = '{id}'"),
    )
    .await;
    (done == 1, leased == 1, attempts)
}

async fn dispatcher_finishes_or_releases(backend: Backend) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let Some(mut pair) = spawn_pair(PairOptions {
        backend,
        down: vec![Role::Processor],
        processor_endpoint: Some(listener.local_addr().expect("addr")),
        shutdown_grace_ms: Some(GRACE_MS),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let processor = HeldProcessor {
        entered: entered_tx,
        answered: Arc::default(),
        asked: mpsc::unbounded_channel().0,
    };
    serve(processor.clone(), listener, pair.pki());
    let mut crm = pair.crm();
    let mut ids = Vec::new();
    for mail in ["fast@example.fi", "slow@example.fi"] {
        ids.push(
            crm.submit(erasure(mail))
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    let mut held = std::collections::HashMap::new();
    while held.len() < 2 {
        let (id, release) = tokio::time::timeout(LONG, entered.recv())
            .await
            .expect("both deliveries reach the processor")
            .expect("the processor runs");
        held.insert(id, release);
    }
    let (fast, slow) = (&ids[0], &ids[1]);
    let release_fast = held.remove(fast).expect("the fast one was called");
    let _never = held.remove(slow).expect("the slow one was called");

    let began = std::time::Instant::now();
    let stopping = tokio::spawn(async move {
        pair.registry.stop().await;
        pair
    });
    // Within the grace the fast call answers; the slow one never does.
    tokio::time::sleep(Duration::from_millis(200)).await;
    release_fast.send(()).expect("the fast call still waits");
    let pair = stopping.await.expect("stopping");
    let took = began.elapsed();
    let grace = Duration::from_millis(GRACE_MS);
    assert!(took >= grace, "the slow call got the grace: {took:?}");
    assert!(
        took < grace + SHUTDOWN_MARGIN,
        "stopped within the grace and the margin: {took:?}"
    );
    assert_eq!(*processor.answered.lock().unwrap(), vec![fast.clone()]);
    let url = pair.registry.database_url();
    assert_eq!(
        delivery(url, fast).await,
        (true, false, 1),
        "the answer that came within the grace was recorded"
    );
    assert_eq!(
        delivery(url, slow).await,
        (false, false, 0),
        "the dropped call recorded nothing and its lease was released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_dispatcher_finishes_or_releases_sqlite() {
    dispatcher_finishes_or_releases(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_dispatcher_finishes_or_releases_postgres() {
    dispatcher_finishes_or_releases(Backend::Postgres).await;
}

/// The reconciler waiting for a processor's status answer stops at once when shutdown begins:
/// with nothing else in flight the registry stops well within its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_status_check() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut pair = spawn_pair(PairOptions {
        down: vec![Role::Processor],
        processor_endpoint: Some(listener.local_addr().expect("addr")),
        shutdown_grace_ms: Some(GRACE_MS),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let (asked_tx, mut asked) = mpsc::unbounded_channel();
    serve(
        HeldProcessor {
            entered: entered_tx,
            answered: Arc::default(),
            asked: asked_tx,
        },
        listener,
        pair.pki(),
    );
    let id = pair
        .crm()
        .submit(erasure("quiet@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let (_, release) = tokio::time::timeout(LONG, entered.recv())
        .await
        .expect("delivered")
        .expect("the processor runs");
    release.send(()).expect("the call waits");
    // No acknowledgement comes: the reconciler asks, and gets no answer.
    let asked_about = tokio::time::timeout(LONG, asked.recv())
        .await
        .expect("the reconciler asks")
        .expect("the processor runs");
    assert_eq!(asked_about, id);
    let began = std::time::Instant::now();
    pair.registry.stop().await;
    let took = began.elapsed();
    assert!(
        took < Duration::from_millis(GRACE_MS),
        "the status check did not hold the shutdown: {took:?}"
    );
}

/// The `key=value` field of the last log line that contains `line`, e.g. `released=3`, its
/// colours taken out.
fn field(log: &str, line: &str, key: &str) -> Option<i64> {
    let line = log.lines().rev().find(|l| l.contains(line))?;
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence runs to its final letter (`\x1b[2m`).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let line = plain.as_str();
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit() && c != '-')
        .next()?
        .parse()
        .ok()
}

async fn sigterm_with_work_in_flight(backend: Backend) {
    let Some(mut pair) = spawn_pair(PairOptions {
        backend,
        mode: Mode::Processes,
        // Each holder call takes longer than the grace.
        mail_delay_ms: 4_000,
        shutdown_grace_ms: Some(GRACE_MS),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let limit = Duration::from_millis(GRACE_MS) + SHUTDOWN_MARGIN + Duration::from_millis(500);
    let mut crm = pair.crm();
    let submit = |mail: &str| {
        let mut req = erasure(mail);
        req.scope = Some(Scope {
            data_categories: vec!["marketing".into()],
        });
        req
    };
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            crm.submit(submit(&format!("sigterm{i}@example.fi")))
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    for id in &ids {
        wait_until(&mut crm, id, LONG, |v| {
            v.tasks
                .iter()
                .any(|t| t.state == TaskState::InProgress as i32)
        })
        .await;
    }

    // The processor, with three holder calls in flight.
    let (status, took) = pair.processor.terminate().await;
    let log = pair.processor.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(took < limit, "exited after {took:?}\n{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        !log.contains("did not stop in time"),
        "every worker stopped\n{log}"
    );
    assert_eq!(
        field(&log, "task runner stopped", "released"),
        Some(3),
        "the three calls cut off at the end of the grace released their leases\n{log}"
    );
    assert_eq!(
        field(&log, "task runner stopped", "left_queued"),
        Some(3),
        "{log}"
    );

    // The registry, with a Submit arriving and the processor starting to resume the tasks.
    pair.processor.start().await;
    let late = crm
        .submit(submit("sigterm-late@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    ids.push(late);
    let (status, took) = pair.registry.terminate().await;
    let log = pair.registry.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(took < limit, "exited after {took:?}\n{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("dispatcher stopped"), "{log}");
    assert!(
        !log.contains("did not stop in time"),
        "every worker stopped\n{log}"
    );

    pair.registry.start().await;
    let mut crm = pair.crm();
    for id in &ids {
        let view = wait_until(&mut crm, id, LONG, in_state(RequestState::Completed)).await;
        assert_eq!(view.tasks.len(), 1, "{view:#?}");
        // PENDING (1) → IN_PROGRESS (2) → COMPLETED (3), each applied once.
        assert_eq!(view.tasks[0].sequence, 3, "{view:#?}");
    }
    let registry_db = pair.registry.database_url();
    let tasks = ids.len() as i64;
    assert_eq!(
        count(registry_db, "SELECT COUNT(*) FROM acknowledgements").await,
        2 * tasks,
        "two acknowledgements per task, none twice"
    );
    assert_eq!(
        count(registry_db, "SELECT COUNT(*) FROM events WHERE type = 4").await,
        2 * tasks,
        "one TASK_UPDATED event per acknowledgement"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_sigterm_with_work_in_flight_sqlite() {
    sigterm_with_work_in_flight(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_sigterm_with_work_in_flight_postgres() {
    sigterm_with_work_in_flight(Backend::Postgres).await;
}
