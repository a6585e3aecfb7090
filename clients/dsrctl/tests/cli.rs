//! Runs the `dsrctl` binary: `pki init`, and every RPC command against a stub registry served
//! over mutual TLS with the development PKI, checking output and exit status.
//!
//! The stub answers from canned data; the real registry is exercised by the workspace's
//! end-to-end tests.

use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

use dsrelay_proto::prost_types::Timestamp;
use dsrelay_proto::v1::request_service_server::{RequestService, RequestServiceServer};
use dsrelay_proto::v1::{
    CancelRequest, Delivery, DeliveryState, EventType, ExtendDeadlineRequest, GetRequest,
    ListRequestsRequest, ListRequestsResponse, Request, RequestEvent, RequestKind, RequestState,
    SubmitRequest, SubmitResponse, TaskState, TaskStatus, WatchRequest,
};
use dsrelay_runtime::pki::{dev_identity, DevPki, DEV_PARTIES};
use dsrelay_runtime::tls::peer_identity;
use tonic::{Response, Status};

const ENV_NAMES: [&str; 6] = [
    "DSRCTL_ENDPOINT",
    "DSRCTL_CA",
    "DSRCTL_CERT",
    "DSRCTL_KEY",
    "DSRCTL_SERVER_IDENTITY",
    "DSRCTL_CONFIG",
];

/// Runs dsrctl in `cwd` with only the given `DSRCTL_*` variables set.
async fn dsrctl(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsrctl"));
    cmd.current_dir(cwd).args(args);
    for name in ENV_NAMES {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied());
    cmd.output().await.expect("running dsrctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ts(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

#[tokio::test]
async fn pki_init_creates_the_files_and_lists_identities() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(tmp.path(), &[], &["pki", "init", "--dir", "pki"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("created a development PKI"), "{stdout}");
    for file in ["ca.pem", "ca.key"] {
        assert!(tmp.path().join("pki").join(file).is_file(), "{file}");
    }
    for (stem, role, name) in DEV_PARTIES {
        assert!(tmp.path().join(format!("pki/{stem}.pem")).is_file());
        assert!(tmp.path().join(format!("pki/{stem}.key")).is_file());
        assert!(stdout.contains(&dev_identity(role, name)), "{stdout}");
    }

    // A second run keeps the files; JSON output is one document.
    let ca_before = std::fs::read(tmp.path().join("pki/ca.pem")).unwrap();
    let out = dsrctl(
        tmp.path(),
        &[],
        &["pki", "init", "--dir", "pki", "--output", "json"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["created"], false);
    assert_eq!(doc["parties"].as_array().unwrap().len(), DEV_PARTIES.len());
    assert_eq!(
        std::fs::read(tmp.path().join("pki/ca.pem")).unwrap(),
        ca_before
    );
}

/// What the stub saw.
#[derive(Default)]
struct Seen {
    submit: Option<SubmitRequest>,
    caller: Option<String>,
    list: Option<ListRequestsRequest>,
}

#[derive(Clone, Default)]
struct Stub {
    seen: Arc<Mutex<Seen>>,
}

fn sample(id: &str, state: RequestState) -> Request {
    Request {
        request_id: id.into(),
        partner: dev_identity("operator", "ops"),
        kind: RequestKind::Erasure as i32,
        state: state as i32,
        received_at: ts(1_700_000_000),
        due_at: ts(1_702_592_000),
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        deliveries: vec![Delivery {
            processor: "payroll-bureau".into(),
            state: DeliveryState::Delivered as i32,
            attempts: 1,
            ..Default::default()
        }],
        tasks: vec![TaskStatus {
            processor: "payroll-bureau".into(),
            subprocessor: "netvisor".into(),
            state: TaskState::Completed as i32,
            sequence: 2,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn event(id: u64, request: &str, ty: EventType, state: RequestState) -> RequestEvent {
    RequestEvent {
        event_id: id,
        request_id: request.into(),
        r#type: ty as i32,
        occurred_at: ts(1_700_000_000 + id as i64),
        request_state: state as i32,
        processor: "payroll-bureau".into(),
        message: format!("event {id}"),
        ..Default::default()
    }
}

fn known(id: &str) -> Result<(), Status> {
    match id {
        "r-ok" | "r-bad" | "r-open" => Ok(()),
        _ => Err(Status::not_found(format!("request {id} not found"))),
    }
}

#[tonic::async_trait]
impl RequestService for Stub {
    async fn submit(
        &self,
        request: tonic::Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = peer_identity(&request);
        let mut seen = self.seen.lock().unwrap();
        seen.caller = caller;
        seen.submit = Some(request.into_inner());
        Ok(Response::new(SubmitResponse {
            request_id: "r-ok".into(),
            state: RequestState::Received as i32,
            due_at: ts(1_702_592_000),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            deduplicated: false,
            routed_to: vec!["payroll-bureau".into()],
        }))
    }

    async fn get(&self, request: tonic::Request<GetRequest>) -> Result<Response<Request>, Status> {
        let id = request.into_inner().request_id;
        known(&id)?;
        let state = match id.as_str() {
            "r-ok" => RequestState::Completed,
            "r-bad" => RequestState::Failed,
            _ => RequestState::InProgress,
        };
        Ok(Response::new(sample(&id, state)))
    }

    async fn list(
        &self,
        request: tonic::Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let request = request.into_inner();
        // Two pages: the first has a token for the second.
        let (requests, next) = if request.page_token.is_empty() {
            (vec![sample("r-ok", RequestState::Completed)], "page-2")
        } else {
            (vec![sample("r-bad", RequestState::Failed)], "")
        };
        self.seen.lock().unwrap().list = Some(request);
        Ok(Response::new(ListRequestsResponse {
            requests,
            next_page_token: next.into(),
        }))
    }

    type WatchStream = tokio_stream::Iter<std::vec::IntoIter<Result<RequestEvent, Status>>>;

    async fn watch(
        &self,
        request: tonic::Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let id = request.request_id.as_str();
        known(id)?;
        let last = match id {
            "r-ok" => RequestState::Completed,
            "r-bad" => RequestState::Failed,
            // Ends early, with the request still open: dsrctl must ask and exit 1.
            _ => RequestState::InProgress,
        };
        let mut events = vec![
            event(1, id, EventType::Submitted, RequestState::Received),
            event(2, id, EventType::Delivered, RequestState::Dispatched),
            event(3, id, EventType::StateChanged, last),
        ];
        events.retain(|e| e.event_id > request.after_event_id);
        Ok(Response::new(tokio_stream::iter(
            events.into_iter().map(Ok).collect::<Vec<_>>(),
        )))
    }

    async fn cancel(
        &self,
        request: tonic::Request<CancelRequest>,
    ) -> Result<Response<Request>, Status> {
        let request = request.into_inner();
        known(&request.request_id)?;
        if request.request_id == "r-ok" {
            return Err(Status::failed_precondition("request r-ok is COMPLETED"));
        }
        let mut r = sample(&request.request_id, RequestState::Cancelled);
        r.cancel_reason = request.reason;
        Ok(Response::new(r))
    }

    async fn extend_deadline(
        &self,
        request: tonic::Request<ExtendDeadlineRequest>,
    ) -> Result<Response<Request>, Status> {
        let request = request.into_inner();
        known(&request.request_id)?;
        let mut r = sample(&request.request_id, RequestState::InProgress);
        r.extension_reasons = vec![format!("{} month(s): {}", request.months, request.reason)];
        Ok(Response::new(r))
    }
}

/// A stub registry on a free port, serving with the dev PKI's registry certificate.
struct Harness {
    dir: tempfile::TempDir,
    endpoint: String,
    stub: Stub,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join(".dsrelay/pki")).unwrap();
        let tls = pki.files("registry").server_config().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let stub = Stub::default();
        let router = dsrelay_runtime::server::builder(tls)
            .unwrap()
            .add_service(RequestServiceServer::new(stub.clone()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
            let _ = rx.await;
        }));
        Self {
            dir,
            endpoint,
            stub,
            _shutdown: tx,
        }
    }

    /// Runs dsrctl in the harness folder, so it falls back to the dev PKI there.
    async fn run(&self, args: &[&str]) -> Output {
        self.run_with(&[], args).await
    }

    async fn run_with(&self, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut all = vec![("DSRCTL_ENDPOINT", self.endpoint.as_str())];
        all.extend_from_slice(env);
        dsrctl(self.dir.path(), &all, args).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_maps_flags_and_prints_the_answer() {
    let h = Harness::start().await;
    let out = h
        .run(&[
            "submit",
            "--kind",
            "rectification",
            "--email",
            "maija@example.fi",
            "--customer-number",
            "C-1",
            "--category",
            "contact",
            "--correct",
            "phone=+35840",
            "--note",
            "ticket 7",
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "request          r-ok",
        "state            RECEIVED",
        "due              2023-12-14T22:13:20Z",
        "trace id         0af7651916cd43dd8448eb211c80319c",
        "routed to        payroll-bureau",
        "idempotency key  ",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    let seen = h.stub.seen.lock().unwrap();
    // No TLS flags given: dsrctl used the dev PKI's operator certificate.
    assert_eq!(
        seen.caller.as_deref(),
        Some(dev_identity("operator", "ops").as_str())
    );
    let submitted = seen.submit.as_ref().unwrap();
    assert_eq!(submitted.kind, RequestKind::Rectification as i32);
    assert_eq!(submitted.identities.len(), 2);
    assert_eq!(
        submitted.parameters.as_ref().unwrap().corrections[0].field,
        "phone"
    );
    assert!(uuid::Uuid::parse_str(&submitted.idempotency_key).is_ok());
    assert!(
        stdout.contains(&submitted.idempotency_key),
        "the generated key is printed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_list_cancel_extend() {
    let h = Harness::start().await;
    let out = h.run(&["get", "r-ok"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("state       COMPLETED\n"), "{stdout}");
    assert!(stdout.contains("payroll-bureau  DELIVERED  1"), "{stdout}");
    assert!(
        stdout.contains("payroll-bureau  netvisor      COMPLETED  2"),
        "{stdout}"
    );

    let out = h.run(&["get", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: NOT_FOUND: request nope not found\n"
    );

    let out = h
        .run(&[
            "list",
            "--state",
            "failed",
            "--overdue",
            "--limit",
            "1",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["requests"][0]["kind"], "ERASURE");
    assert_eq!(doc["requests"][0]["received_at"], "2023-11-14T22:13:20Z");
    assert_eq!(doc["next_page_token"], "page-2");
    {
        let seen = h.stub.seen.lock().unwrap();
        let list = seen.list.as_ref().unwrap();
        assert_eq!(list.states, [RequestState::Failed as i32]);
        assert!(list.overdue_only);
        assert_eq!(list.page_size, 1);
    }

    let out = h.run(&["list", "--all"]).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("ID     KIND     STATE      RECEIVED"),
        "{stdout}"
    );
    assert!(
        stdout.contains("r-ok") && stdout.contains("r-bad"),
        "{stdout}"
    );
    assert!(!stdout.contains("next page"), "{stdout}");

    let out = h.run(&["cancel", "r-ok", "--reason", "x"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: FAILED_PRECONDITION: request r-ok is COMPLETED\n"
    );
    let out = h.run(&["cancel", "r-open", "--reason", "duplicate"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cancelled   duplicate\n"));

    let out = h
        .run(&["extend", "r-open", "--months", "2", "--reason", "complex"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("extended    2 month(s): complex\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_exit_status_follows_the_final_state() {
    let h = Harness::start().await;
    let out = h.run(&["watch", "r-ok"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .contains("STATE_CHANGED      COMPLETED"),
        "{stdout}"
    );
    assert_eq!(text(&out.stderr), "request r-ok ended COMPLETED\n");

    let out = h.run(&["watch", "r-bad", "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let last: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["request_state"], "FAILED");
    assert_eq!(last["type"], "STATE_CHANGED");

    // Nothing after event 3: the final state comes from Get.
    let out = h.run(&["watch", "r-ok", "--after", "3"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());

    let out = h.run(&["watch", "r-open"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("while request r-open is IN_PROGRESS"));

    let out = h.run(&["watch", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: NOT_FOUND: request nope not found\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_configuration_problems_exit_1() {
    let h = Harness::start().await;

    // Another certificate the dev CA signed is not the registry.
    let out = h
        .run(&[
            "get",
            "r-ok",
            "--server-identity",
            "spiffe://dsrelay.dev/processor/x",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: UNAVAILABLE: cannot reach the registry at"),
        "{stderr}"
    );
    assert!(
        stderr.contains("is not the expected spiffe://dsrelay.dev/processor/x"),
        "{stderr}"
    );

    // Nothing listens on port 1.
    let out = h
        .run(&["get", "r-ok", "--endpoint", "https://127.0.0.1:1"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot reach the registry at https://127.0.0.1:1"));

    let out = h
        .run_with(&[("DSRCTL_CONFIG", "missing.toml")], &["get", "r-ok"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: reading config file"),
        "{}",
        text(&out.stderr)
    );

    // No certificate anywhere and no dev PKI.
    let empty = tempfile::tempdir().unwrap();
    let out = dsrctl(empty.path(), &[], &["get", "r-ok"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("dsrctl pki init"));
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = dsrctl(tmp.path(), &[], &["submit", "--kind", "erasure"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = dsrctl(
        tmp.path(),
        &[],
        &["submit", "--kind", "erasure", "--email", "a@b.fi", "--lift"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: --lift is only for --kind restriction\n"
    );
}
