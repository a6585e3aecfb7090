//! A round of status checks of a request delivered to two processors: its backing off
//! waits for both answers. Through the real registry (its server over mutual TLS with the
//! development PKI's certificates, its store on SQLite or PostgreSQL) and two processor
//! stand-ins served here, each with a certificate of its own identity.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::processor_service_server::{ProcessorService, ProcessorServiceServer};
use dsrelay_proto::v1::{
    CancelDeliveryRequest, DeliverRequest, DeliverResponse, ExtendDueDateRequest, GetStatusRequest,
    ListSubprocessorsRequest, RequestKind, SubprocessorList, TaskList, TaskState, TaskStatus,
    UpdateContractEndRequest,
};
use dsrelay_runtime::pki::{dev_identity, DevCa, DevPki};
use dsrelay_runtime::store::Db;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::test_registry::{self, Setup, PROCESSOR};

/// The second processor, served with a certificate issued here.
const SECOND: &str = "hr-services";

/// The longest a request that found nothing new waits for its next check (a day, the
/// default), so that a request backed off is not checked again in a test's time.
const MAX_BACKOFF_MS: i64 = 86_400_000;

/// A processor that accepts deliveries with one PENDING task, counts the GetStatus calls it
/// gets, and answers them with nothing new, or fails them (UNAVAILABLE) while `fails`.
#[derive(Clone)]
struct StandIn {
    name: &'static str,
    fails: Arc<AtomicBool>,
    asked: Arc<AtomicUsize>,
}

impl StandIn {
    fn new(name: &'static str, fails: bool) -> Self {
        Self {
            name,
            fails: Arc::new(AtomicBool::new(fails)),
            asked: Arc::default(),
        }
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl ProcessorService for StandIn {
    async fn deliver(
        &self,
        _req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        Ok(Response::new(DeliverResponse {
            tasks: vec![TaskStatus {
                processor: self.name.into(),
                subprocessor: "accounting".into(),
                state: TaskState::Pending as i32,
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
        self.asked.fetch_add(1, Ordering::SeqCst);
        if self.fails.load(Ordering::SeqCst) {
            return Err(Status::unavailable("status store offline"));
        }
        Ok(Response::new(TaskList {
            request_id: req.into_inner().request_id,
            tasks: Vec::new(),
        }))
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

/// Serves `service` as [`SECOND`] on a port of 127.0.0.1, with a certificate of its
/// identity issued by the development CA in `pki`: its endpoint, and what stops it.
async fn serve_second(pki: &Path, service: StandIn) -> (String, oneshot::Sender<()>) {
    let read = |name: &str| std::fs::read_to_string(pki.join(name)).expect("pki file");
    let ca = DevCa::load(&read("ca.pem"), &read("ca.key")).expect("dev ca");
    let leaf = ca
        .issue(
            &format!("dsrelay processor {SECOND}"),
            &dev_identity("processor", SECOND),
        )
        .expect("leaf");
    std::fs::write(pki.join(format!("{SECOND}.pem")), leaf.cert_pem).expect("cert");
    std::fs::write(pki.join(format!("{SECOND}.key")), leaf.key_pem).expect("key");
    let tls = DevPki::ensure(pki).expect("dev pki").files(SECOND);
    let router = dsrelay_runtime::server::builder(tls.server_config().expect("server tls"))
        .expect("server")
        .add_routes(Routes::new(ProcessorServiceServer::new(service)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
        let _ = stopped.await;
    }));
    (format!("https://localhost:{port}"), stop)
}

/// A registry on `url` (its files in `dir`) whose processors are `first` (as [`PROCESSOR`])
/// and [`SECOND`] at `second`, with `reconcile` the keys of its `[reconcile]` table.
async fn registry(
    dir: &Path,
    url: &str,
    first: &StandIn,
    second: &str,
    reconcile: &str,
) -> test_registry::Registry {
    let setup = Setup {
        tables: format!(
            "[delivery]\npoll_interval_ms = 20\n\
             backoff = {{ initial_ms = 20, max_ms = 100 }}\n\
             [reconcile]\n{reconcile}\n\
             [[processors]]\nname = \"{SECOND}\"\nendpoint = \"{second}\"\n\
             identity = {:?}\ncategories = [\"contact\"]\n",
            dev_identity("processor", SECOND),
        ),
        ..Setup::default()
    }
    .answered_by(first.clone());
    test_registry::Registry::start(dir, url, setup).await
}

/// Waits up to 20 s for `check` to hold.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stored `checked_at` of request `id`.
async fn checked_at(db: &Db, id: &str) -> i64 {
    let sql = db
        .backend
        .numbered("SELECT checked_at FROM requests WHERE id = $1");
    sqlx::query_scalar(&sql)
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("checked_at")
}

/// A request delivered to both processors that has been unchanged since long ago (so a
/// check that finds nothing new backs it off `MAX_BACKOFF_MS`), then the registry
/// restarted with status checks every 20 ms of every request quiet for 1 ms; whether
/// [`SECOND`]'s checks fail is `second_fails`. The running registry, the stand-ins, the
/// request's id and what stops [`SECOND`].
async fn quiet_at_two(
    dir: &Path,
    url: &str,
    second_fails: bool,
) -> (
    test_registry::Registry,
    StandIn,
    StandIn,
    String,
    oneshot::Sender<()>,
) {
    let pki = dir.join("pki");
    DevPki::ensure(&pki).expect("dev pki");
    let first = StandIn::new(PROCESSOR, false);
    let second = StandIn::new(SECOND, second_fails);
    let (endpoint, stop_second) = serve_second(&pki, second.clone()).await;
    // No round of checks before the request is made old.
    let served = registry(dir, url, &first, &endpoint, "interval_ms = 3600000").await;
    let id = served.submit(RequestKind::Erasure, "two-processors").await;
    eventually("delivered at both processors", || async {
        let request = served.get(&id).await;
        request.deliveries.len() == 2 && request.deliveries.iter().all(|d| d.delivered_at.is_some())
    })
    .await;
    served.stop().await;
    let db = Db::connect(url).await.expect("db");
    sqlx::query("UPDATE requests SET updated_at = 1")
        .execute(&db.pool)
        .await
        .expect("made old");
    db.pool.close().await;
    let reconcile =
        format!("interval_ms = 20\nack_timeout_ms = 1\nmax_backoff_ms = {MAX_BACKOFF_MS}");
    let served = registry(dir, url, &first, &endpoint, &reconcile).await;
    (served, first, second, id, stop_second)
}

/// One processor answers nothing new while the other's checks fail: the failing one is
/// checked again in the next rounds, as the request is not backed off by the other's
/// answer. Before, the answer pushed the request's next check (of both) a day ahead.
async fn a_failed_check_is_not_backed_off_by_the_other_answer(url: &str, dir: &Path) {
    let (served, first, second, _id, stop_second) = quiet_at_two(dir, url, true).await;
    eventually("the failing processor checked in three rounds", || async {
        second.asked() >= 3
    })
    .await;
    assert!(first.asked() >= 1, "{PROCESSOR} was never checked");
    served.stop().await;
    let _ = stop_second.send(());
}

/// Both processors answer nothing new: the request is backed off (its next check a day
/// ahead, as long as it has been unchanged at most), as before.
async fn two_answers_of_nothing_new_back_off(url: &str, dir: &Path) {
    let (served, first, second, id, stop_second) = quiet_at_two(dir, url, false).await;
    eventually("both processors checked", || async {
        first.asked() >= 1 && second.asked() >= 1
    })
    .await;
    let db = Db::connect(url).await.expect("db");
    let now = dsrelay_runtime::store::now_ms();
    eventually("the request backed off", || async {
        checked_at(&db, &id).await > now + MAX_BACKOFF_MS / 2
    })
    .await;
    db.pool.close().await;
    served.stop().await;
    let _ = stop_second.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_check_is_not_backed_off_by_the_other_answer_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_failed_check_is_not_backed_off_by_the_other_answer(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_check_is_not_backed_off_by_the_other_answer_on_postgres() {
    crate::test_postgres::on_postgres(|url, dir| async move {
        a_failed_check_is_not_backed_off_by_the_other_answer(&url, &dir).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_answers_of_nothing_new_back_off_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    two_answers_of_nothing_new_back_off(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_answers_of_nothing_new_back_off_on_postgres() {
    crate::test_postgres::on_postgres(|url, dir| async move {
        two_answers_of_nothing_new_back_off(&url, &dir).await;
    })
    .await;
}

/// A store on `url` with requests `r1` to `r3`, each accepted by `p1` and `p2`, all as quiet
/// as the others (DISPATCHED, checked at the same instant).
async fn three_quiet_at_two(url: &str) -> crate::store::Store {
    use crate::store::{NewRequest, Store, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    let db = Db::connect(url).await.expect("db");
    db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
        .await
        .expect("migrate");
    let store = Store::new(db, b"test key");
    for id in ["r1", "r2", "r3"] {
        store
            .insert_request(&NewRequest {
                id: id.into(),
                partner: "crm".into(),
                idempotency_key: format!("key-{id}"),
                body_hash: format!("hash-{id}"),
                body: b"{}".to_vec(),
                identity_hashes: "[\"h\"]".into(),
                kind: RequestKind::Erasure as i32,
                received_at: 0,
                due_at: 1_000_000,
                trace_id: "0".repeat(32),
                traceparent: None,
                processors: vec!["p1".into(), "p2".into()],
            })
            .await
            .expect("request");
    }
    let db = store.db();
    let sql = db
        .backend
        .numbered("UPDATE requests SET state = $1, checked_at = 5");
    sqlx::query(&sql)
        .bind(dsrelay_proto::v1::RequestState::Dispatched as i64)
        .execute(&db.pool)
        .await
        .expect("dispatched");
    sqlx::query("UPDATE deliveries SET done_at = 5")
        .execute(&db.pool)
        .await
        .expect("delivered");
    store
}

/// The limit of a round's quiet requests counts requests, each with all its processors in
/// adjacent rows, so a round never checks a request at some of its processors only. Before,
/// it counted rows: a limit could end between a request's processors.
async fn a_quiet_request_comes_with_all_its_processors(url: &str) {
    let store = three_quiet_at_two(url).await;
    let rows = |ids: &[&str]| -> Vec<(String, String)> {
        ids.iter()
            .flat_map(|id| [(id.to_string(), "p1".into()), (id.to_string(), "p2".into())])
            .collect()
    };
    assert_eq!(
        store.quiet_requests(10, 1).await.expect("quiet"),
        rows(&["r1"])
    );
    assert_eq!(
        store.quiet_requests(10, 2).await.expect("quiet"),
        rows(&["r1", "r2"])
    );
    assert_eq!(
        store.quiet_requests(10, 100).await.expect("quiet"),
        rows(&["r1", "r2", "r3"])
    );
    assert!(store
        .quiet_requests(5, 100)
        .await
        .expect("quiet")
        .is_empty());
}

#[tokio::test]
async fn a_quiet_request_comes_with_all_its_processors_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_quiet_request_comes_with_all_its_processors(&url).await;
}

#[tokio::test]
async fn a_quiet_request_comes_with_all_its_processors_on_postgres() {
    crate::test_postgres::on_postgres(|url, _dir| async move {
        a_quiet_request_comes_with_all_its_processors(&url).await;
    })
    .await;
}
