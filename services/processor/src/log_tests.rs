//! Logs never hold what a holder or the registry says, which may quote the subject: through
//! the real processor (its store on SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL`
//! names a server, its runner, its acknowledgement sender, and the adapter connector built
//! from its configuration) with an adapter and a controller's registry served here over
//! mutual TLS with the development PKI's certificates. The adapter's Describe fails and its
//! Execute fails twice, the registry's first Acknowledge fails, each answer quoting the
//! subject's address. The log lines show each by its code, length and keyed hash; the task's
//! last error keeps the holder's words.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::acknowledgement_service_server::{
    AcknowledgementService, AcknowledgementServiceServer,
};
use dsrelay_proto::v1::subprocessor_adapter_server::{
    SubprocessorAdapter, SubprocessorAdapterServer,
};
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Acknowledgement, DeliverRequest, DescribeRequest,
    DescribeResponse, Evidence, ExecuteBulkRequest, ExecuteBulkResponse, ExecuteOutcome,
    ExecuteRequest, ExecuteResponse, ExportPage, GetBulkStatusRequest, GetExportPageRequest,
    GetTaskStatusRequest, IdentityEncoding, IdentityType, RequestKind, SubjectIdentity, TaskState,
};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::testing::{captured_logs, CapturedLogs};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::{App, Config};

/// The subject's address, which the answers quote; no other test uses it.
const ADDRESS: &str = "paavo.lokitesti@example.fi";
/// What of it no log line may hold.
const LOCAL_PART: &str = "paavo.lokitesti";
/// Execute calls the adapter fails before it completes.
const FAILED_CALLS: usize = 2;

/// An adapter whose failures quote the subject's address: Describe fails for good, Execute
/// fails [`FAILED_CALLS`] times as a locked row would, then completes.
#[derive(Clone, Default)]
struct Adapter {
    executed: Arc<AtomicUsize>,
    /// Refuse every Execute for good (PERMISSION_DENIED), as an adapter whose
    /// `allowed_identities` leave the processor out does.
    deny: bool,
}

#[tonic::async_trait]
impl SubprocessorAdapter for Adapter {
    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        Err(Status::internal(format!(
            "the catalogue broke reading {ADDRESS}"
        )))
    }

    async fn execute(
        &self,
        _: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        if self.deny {
            return Err(Status::permission_denied(format!(
                "this processor may not touch the data of {ADDRESS}"
            )));
        }
        if self.executed.fetch_add(1, Ordering::SeqCst) < FAILED_CALLS {
            return Err(Status::unavailable(format!(
                "the row of {ADDRESS} is locked"
            )));
        }
        Ok(Response::new(ExecuteResponse {
            outcome: ExecuteOutcome::Completed as i32,
            evidence: Some(Evidence {
                records_affected: 1,
                note: "erased".into(),
                confirmed: true,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn get_task_status(
        &self,
        _: Request<GetTaskStatusRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn execute_bulk(
        &self,
        _: Request<ExecuteBulkRequest>,
    ) -> Result<Response<ExecuteBulkResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_bulk_status(
        &self,
        _: Request<GetBulkStatusRequest>,
    ) -> Result<Response<ExecuteBulkResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_export_page(
        &self,
        _: Request<GetExportPageRequest>,
    ) -> Result<Response<ExportPage>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// The controller's registry as far as acknowledgements go: its first answer is an error
/// quoting the subject's address; then it stores what it is sent.
#[derive(Clone, Default)]
struct Registry {
    calls: Arc<AtomicUsize>,
    acks: Arc<Mutex<Vec<Acknowledgement>>>,
}

#[tonic::async_trait]
impl AcknowledgementService for Registry {
    async fn acknowledge(
        &self,
        req: Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(Status::unavailable(format!(
                "no acknowledgements about {ADDRESS} today"
            )));
        }
        let acks = req.into_inner().acknowledgements;
        let applied = acks.len() as u32;
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(acks);
        Ok(Response::new(AcknowledgeResponse {
            applied,
            ..Default::default()
        }))
    }
}

impl Registry {
    fn completed(&self) -> bool {
        self.got(TaskState::Completed)
    }

    fn got(&self, state: TaskState) -> bool {
        self.acks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|a| a.state() == state)
    }
}

/// Serves `router` on a free port of 127.0.0.1; send on the sender to stop it.
async fn serve(
    router: tonic::transport::server::Router<dsrelay_runtime::server::Layers>,
) -> (u16, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
        let _ = stopped.await;
    }));
    (port, stop)
}

/// A processor on `database_url` whose one subprocessor is the adapter on `adapter`, and whose
/// controller's registry is on `registry`; failed steps are retried within tens of ms.
fn config(dir: &std::path::Path, database_url: &str, adapter: u16, registry: u16) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let tls = pki.files("processor");
    let text = format!(
        "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [audit]\ncheckpoint_key = {:?}\ncheckpoint_file = {:?}\n\
         [tasks]\npoll_interval_ms = 20\nbackoff = {{ initial_ms = 20, max_ms = 100 }}\n\
         [acks]\npoll_interval_ms = 20\nbackoff = {{ initial_ms = 20, max_ms = 100 }}\n\
         [[subprocessors]]\nname = \"newsletter\"\ncategories = [\"contact\"]\n\
         connector = {{ type = \"adapter\", endpoint = \"https://localhost:{adapter}\", \
         identity = {:?}, tls = {{ ca = {:?}, cert = {:?}, key = {:?} }} }}\n\
         [[controllers]]\nname = \"acme\"\nidentity = {:?}\n\
         registry_endpoint = \"https://127.0.0.1:{registry}\"\n",
        dir.join("data"),
        tls.ca,
        tls.cert,
        tls.key,
        pki.signing_key("processor"),
        dir.join("audit/checkpoints.jsonl"),
        dev_identity("adapter", "example"),
        tls.ca,
        tls.cert,
        tls.key,
        dev_identity("registry", "controller"),
    );
    let file = dir.join("processor.toml");
    std::fs::write(&file, text).expect("config file");
    Config::load_from(Some(&file), Vec::new()).expect("config")
}

/// The captured lines whose message starts with `message`, logged about `request_id` (in
/// one of its spans) when one is given.
fn logged(logs: &CapturedLogs, message: &str, request_id: Option<&str>) -> Vec<Value> {
    logs.text()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .filter(|l| {
            request_id.is_none_or(|id| {
                l["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["request_id"] == id))
            })
        })
        .collect()
}

/// The adapter's and the registry's answers quote the subject's address; before the log
/// lines withheld them, "connector failed; will retry" carried `adapter Execute at …:
/// Unavailable: the row of paavo.lokitesti@example.fi is locked`, "adapter Describe failed"
/// and "sending acknowledgements failed" the address too.
async fn holders_and_registries_stay_out_of_the_logs(database_url: &str, dir: &std::path::Path) {
    let logs = captured_logs();
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let adapter = Adapter::default();
    let (adapter_port, stop_adapter) = serve(
        dsrelay_runtime::server::builder(pki.files("adapter").server_config().expect("tls"))
            .expect("server")
            .add_service(SubprocessorAdapterServer::new(adapter.clone())),
    )
    .await;
    let registry = Registry::default();
    let (registry_port, stop_registry) = serve(
        dsrelay_runtime::server::builder(pki.files("registry").server_config().expect("tls"))
            .expect("server")
            .add_service(AcknowledgementServiceServer::new(registry.clone())),
    )
    .await;
    let app = App::build(config(dir, database_url, adapter_port, registry_port))
        .await
        .expect("app");
    let shared = app.shared();
    let id = format!("log-{:016x}", fastrand::u64(..));
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: id.clone(),
        kind: RequestKind::Erasure as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: ADDRESS.into(),
            label: String::new(),
        }],
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["newsletter".to_string()], None, now)
        .await
        .expect("accept");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let run = tokio::spawn(app.run_with_admin(listener, None, async move {
        let _ = shutdown_rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !registry.completed() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registry got no COMPLETED:\n{}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.send(()).expect("run waits for shutdown");
    run.await.expect("joined").expect("run");
    let _ = stop_adapter.send(());
    let _ = stop_registry.send(());

    // Where the log lines point, the holder's words are whole.
    let last_error: Option<String> = sqlx::query_scalar("SELECT last_error FROM tasks")
        .fetch_one(&shared.store.db().pool)
        .await
        .expect("the one task");
    let last_error = last_error.unwrap_or_default();
    assert!(last_error.contains(ADDRESS), "{last_error}");

    let text = logs.text();
    let leak = text.lines().find(|l| l.contains(LOCAL_PART));
    assert!(
        leak.is_none(),
        "a log line quotes a holder or registry: {leak:?}"
    );
    let retried = logged(&logs, "connector failed; will retry", Some(&id));
    assert_eq!(retried.len(), FAILED_CALLS, "{retried:#?}");
    let framing = format!("adapter Execute at https://localhost:{adapter_port}: Unavailable: ");
    let withheld = format!(
        "{framing}{} bytes withheld, keyed hash ",
        last_error.len() - framing.len()
    );
    for line in &retried {
        let error = line["fields"]["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(&withheld), "{line}");
    }
    let described = logged(&logs, "adapter Describe failed", Some(&id));
    assert_eq!(described.len(), 1, "{described:#?}");
    assert_eq!(
        described[0]["fields"]["code"], "Internal",
        "{}",
        described[0]
    );
    let error = described[0]["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("permanent, ") && error.ends_with(" bytes withheld"),
        "{error}"
    );
    let sending = logged(&logs, "sending acknowledgements failed", None);
    assert!(
        sending.iter().any(|l| l["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("Unavailable: ") && e.contains("withheld"))),
        "{sending:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_and_registries_stay_out_of_the_logs_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    holders_and_registries_stay_out_of_the_logs(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_and_registries_stay_out_of_the_logs_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        holders_and_registries_stay_out_of_the_logs(&u, &d).await
    })
    .await;
}

/// A task that fails for good runs again only on an operator's retry, so it is logged at
/// WARN, once, with the reason withheld and the commands that show it and retry the task.
/// Before, it was logged only as `task step done state="TASK_STATE_FAILED"` at INFO, with no
/// reason and nothing saying what to do.
async fn a_task_that_fails_for_good_is_logged_with_what_to_run(
    database_url: &str,
    dir: &std::path::Path,
) {
    let logs = captured_logs();
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let adapter = Adapter {
        deny: true,
        ..Default::default()
    };
    let (adapter_port, stop_adapter) = serve(
        dsrelay_runtime::server::builder(pki.files("adapter").server_config().expect("tls"))
            .expect("server")
            .add_service(SubprocessorAdapterServer::new(adapter.clone())),
    )
    .await;
    let registry = Registry::default();
    let (registry_port, stop_registry) = serve(
        dsrelay_runtime::server::builder(pki.files("registry").server_config().expect("tls"))
            .expect("server")
            .add_service(AcknowledgementServiceServer::new(registry.clone())),
    )
    .await;
    let app = App::build(config(dir, database_url, adapter_port, registry_port))
        .await
        .expect("app");
    let shared = app.shared();
    let id = format!("fail-{:016x}", fastrand::u64(..));
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: id.clone(),
        kind: RequestKind::Erasure as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: ADDRESS.into(),
            label: String::new(),
        }],
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["newsletter".to_string()], None, now)
        .await
        .expect("accept");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let run = tokio::spawn(app.run_with_admin(listener, None, async move {
        let _ = shutdown_rx.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !registry.got(TaskState::Failed) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registry got no FAILED:\n{}",
            logs.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.send(()).expect("run waits for shutdown");
    run.await.expect("joined").expect("run");
    let _ = stop_adapter.send(());
    let _ = stop_registry.send(());

    let reason: String = sqlx::query_scalar("SELECT reason FROM tasks")
        .fetch_one(&shared.store.db().pool)
        .await
        .expect("the one task");
    assert!(reason.contains(ADDRESS), "{reason}");
    let text = logs.text();
    let leak = text.lines().find(|l| l.contains(LOCAL_PART));
    assert!(leak.is_none(), "a log line quotes the holder: {leak:?}");
    let failed = logged(&logs, "task failed; it runs again only when", Some(&id));
    assert_eq!(failed.len(), 1, "{failed:#?}\n{text}");
    let line = &failed[0];
    assert_eq!(line["level"], "WARN", "{line}");
    let fields = &line["fields"];
    assert_eq!(fields["subprocessor"], "newsletter", "{line}");
    assert_eq!(fields["request_id"], id.as_str(), "{line}");
    let withheld = format!("{} bytes withheld, keyed hash ", reason.len());
    let shown = fields["reason"].as_str().unwrap_or_default();
    assert!(shown.starts_with(&withheld), "{line}");
    assert_eq!(
        fields["read_with"], "dsrctl tasks list --state failed --output json",
        "{line}"
    );
    let retry = fields["retry_with"].as_str().unwrap_or_default();
    assert!(
        retry.starts_with(&format!("dsrctl tasks retry acme {id} newsletter --note ")),
        "{line}"
    );
    assert!(
        logged(&logs, "connector failed; will retry", Some(&id)).is_empty(),
        "a permanent failure is not retried:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_fails_for_good_is_logged_with_what_to_run_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    a_task_that_fails_for_good_is_logged_with_what_to_run(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_fails_for_good_is_logged_with_what_to_run_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_task_that_fails_for_good_is_logged_with_what_to_run(&u, &d).await
    })
    .await;
}
