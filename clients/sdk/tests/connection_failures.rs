//! How the SDK's calls and streams end when the connection to the registry fails: a call
//! past its deadline, a client certificate the registry refuses, a registry killed under a
//! watch or a download. Real servers on 127.0.0.1 over mutual TLS with a development PKI.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dsrelay_sdk::proto::package_chunk::Item;
use dsrelay_sdk::proto::package_service_server::{PackageService, PackageServiceServer};
use dsrelay_sdk::proto::request_service_server::{RequestService, RequestServiceServer};
use dsrelay_sdk::proto::{
    AuditCheckpoints, AuditEntries, CancelRequest, Chain, DeadLetteredDeliveries,
    DownloadPackageRequest, EventList, ExtendDeadlineRequest, GetChainRequest, GetPackageRequest,
    GetRequest, ListAuditCheckpointsRequest, ListAuditEntriesRequest,
    ListDeadLetteredDeliveriesRequest, ListEventsRequest, ListRequestsRequest,
    ListRequestsResponse, PackageChunk, PackageInfo, Request, RequestEvent, RequeueDeliveryRequest,
    SubmitRequest, SubmitResponse, WatchRequest,
};
use dsrelay_sdk::runtime::pki::{dev_identity, DevCa, DevPki};
use dsrelay_sdk::runtime::tls::TlsFiles;
use dsrelay_sdk::tonic::{self, Code, Request as Call, Response, Status};
use dsrelay_sdk::{ConnectionSettings, DownloadEvent, RegistryClient, SubmitBuilder};
use futures::{Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a test waits for something that should come at once, so that a failure does not
/// hang the suite.
const PATIENCE: Duration = Duration::from_secs(30);

/// The event the stand-in's watches send before nothing more.
const EVENT_ID: u64 = 7;

/// A registry that answers Watch with one event and GetPackage/DownloadPackage with a
/// manifest, then keeps its streams open; nothing else.
struct StandIn;

fn unanswered<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this stand-in"))
}

type Open<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `first`, then nothing, with the stream left open.
fn then_nothing<T: Send + 'static>(first: T) -> Open<T> {
    futures::stream::iter([Ok(first)])
        .chain(futures::stream::pending())
        .boxed()
}

#[tonic::async_trait]
impl RequestService for StandIn {
    async fn submit(&self, _: Call<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        unanswered()
    }
    async fn get(&self, _: Call<GetRequest>) -> Result<Response<Request>, Status> {
        unanswered()
    }
    async fn list(
        &self,
        _: Call<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        Ok(Response::new(ListRequestsResponse::default()))
    }
    type WatchStream = Open<RequestEvent>;
    async fn watch(&self, call: Call<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(then_nothing(RequestEvent {
            event_id: EVENT_ID,
            request_id: call.into_inner().request_id,
            ..Default::default()
        })))
    }
    async fn cancel(&self, _: Call<CancelRequest>) -> Result<Response<Request>, Status> {
        unanswered()
    }
    async fn extend_deadline(
        &self,
        _: Call<ExtendDeadlineRequest>,
    ) -> Result<Response<Request>, Status> {
        unanswered()
    }
    async fn get_chain(&self, _: Call<GetChainRequest>) -> Result<Response<Chain>, Status> {
        unanswered()
    }
    async fn list_events(&self, _: Call<ListEventsRequest>) -> Result<Response<EventList>, Status> {
        unanswered()
    }
    async fn list_audit_entries(
        &self,
        _: Call<ListAuditEntriesRequest>,
    ) -> Result<Response<AuditEntries>, Status> {
        unanswered()
    }
    async fn list_audit_checkpoints(
        &self,
        _: Call<ListAuditCheckpointsRequest>,
    ) -> Result<Response<AuditCheckpoints>, Status> {
        unanswered()
    }
    async fn list_dead_lettered_deliveries(
        &self,
        _: Call<ListDeadLetteredDeliveriesRequest>,
    ) -> Result<Response<DeadLetteredDeliveries>, Status> {
        unanswered()
    }
    async fn requeue_delivery(
        &self,
        _: Call<RequeueDeliveryRequest>,
    ) -> Result<Response<Request>, Status> {
        unanswered()
    }
}

fn manifest() -> PackageInfo {
    PackageInfo {
        request_id: "r-1".into(),
        complete: true,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl PackageService for StandIn {
    async fn get_package(
        &self,
        _: Call<GetPackageRequest>,
    ) -> Result<Response<PackageInfo>, Status> {
        Ok(Response::new(manifest()))
    }
    type DownloadPackageStream = Open<PackageChunk>;
    async fn download_package(
        &self,
        _: Call<DownloadPackageRequest>,
    ) -> Result<Response<Self::DownloadPackageStream>, Status> {
        Ok(Response::new(then_nothing(PackageChunk {
            item: Some(Item::Info(manifest())),
        })))
    }
}

/// A development PKI in a folder of its own.
struct Pki {
    _dir: tempfile::TempDir,
    pki: DevPki,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = DevPki::ensure(dir.path()).expect("dev pki");
        Self { _dir: dir, pki }
    }

    /// Settings for partner crm (unless `tls` says otherwise) at `port` on localhost.
    fn settings(&self, port: u16, tls: Option<TlsFiles>) -> ConnectionSettings {
        ConnectionSettings {
            endpoint: format!("https://localhost:{port}"),
            tls: tls.unwrap_or_else(|| self.pki.files("partner-crm")),
            server_identity: dev_identity("registry", "controller"),
        }
    }
}

/// The stand-in served on 127.0.0.1 with the registry's certificate; its port.
async fn serve_stand_in(pki: &DevPki) -> u16 {
    let tls = pki.files("registry").server_config().expect("registry tls");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let server = dsrelay_sdk::runtime::server::builder(tls)
        .expect("server")
        .add_service(RequestServiceServer::new(StandIn))
        .add_service(PackageServiceServer::new(StandIn))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    port
}

/// A TCP relay to `target` whose connections [`Relay::kill`] cuts, as killing the server
/// would.
struct Relay {
    port: u16,
    connections: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let port = listener.local_addr().expect("address").port();
        let connections = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let relayed = connections.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                relayed.lock().expect("relay lock").spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Self {
            port,
            connections,
            accepting,
        }
    }

    fn kill(&self) {
        self.accepting.abort();
        self.connections.lock().expect("relay lock").abort_all();
    }
}

async fn next<T>(stream: &mut (impl Stream<Item = T> + Unpin)) -> Option<T> {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("the stream goes on or ends at once")
}

/// A registry that takes the connection and the call but never answers: the call ends at its
/// deadline with DEADLINE_EXCEEDED, not a connection error, saying it may have been done.
#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded() {
    let pki = Pki::new();
    let config = pki
        .pki
        .files("registry")
        .rustls_server_config()
        .expect("registry tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            if let Ok(stream) = acceptor.accept(socket).await {
                held.push(stream);
            }
        }
    });
    let client = RegistryClient::connect(&pki.settings(port, None))
        .expect("connect")
        .with_timeout(Some(Duration::from_secs(2)));
    let request = SubmitBuilder::erasure()
        .email("maija@example.fi")
        .idempotency_key("k-1")
        .build();
    let status = tokio::time::timeout(PATIENCE, client.submit(request))
        .await
        .expect("the call ends at its deadline")
        .unwrap_err();
    silent.abort();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(!dsrelay_sdk::is_connection_error(&status), "{status:?}");
    assert!(dsrelay_sdk::timed_out(&status), "{status:?}");
    assert!(!dsrelay_sdk::closed_by_peer(&status), "{status:?}");
    let message = status.message();
    assert!(message.contains("no answer came"), "{message}");
    assert!(message.contains("may have been done"), "{message}");
    assert!(message.contains("same idempotency key"), "{message}");
}

/// A partner certificate of another development CA (of the same name): the registry closes
/// the connection, which the calls and a watch answer with UNAVAILABLE saying what to check.
#[tokio::test]
async fn a_refused_client_certificate_is_unavailable_with_what_to_check() {
    let pki = Pki::new();
    let port = serve_stand_in(&pki.pki).await;
    let rogue = DevCa::generate("dsrelay development CA").expect("rogue ca");
    let leaf = rogue
        .issue("dsrelay rogue party", &dev_identity("partner", "crm"))
        .expect("rogue leaf");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("rogue.pem"), leaf.cert_pem).expect("cert");
    std::fs::write(dir.path().join("rogue.key"), leaf.key_pem).expect("key");
    let files = TlsFiles::new(
        pki.pki.ca(),
        dir.path().join("rogue.pem"),
        dir.path().join("rogue.key"),
    );
    let client = RegistryClient::connect(&pki.settings(port, Some(files))).expect("connect");

    let check = |what: &str, status: &Status| {
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
        assert!(
            dsrelay_sdk::is_connection_error(status),
            "{what}: {status:?}"
        );
        assert!(dsrelay_sdk::closed_by_peer(status), "{what}: {status:?}");
        assert!(dsrelay_sdk::is_explained(status), "{what}: {status:?}");
        assert!(!dsrelay_sdk::is_lost_stream(status), "{what}: {status:?}");
        let message = status.message();
        for part in [
            "the connection closed before the registry answered",
            "a registry that refuses this client's certificate",
            "issued by the CA the registry trusts",
            "revocation list",
        ] {
            assert!(message.contains(part), "{what}: {part:?} in {message}");
        }
    };
    let listed = tokio::time::timeout(PATIENCE, client.list(ListRequestsRequest::default()))
        .await
        .expect("the refusal is prompt");
    check("list", &listed.unwrap_err());
    let package = tokio::time::timeout(PATIENCE, client.get_package("r-1"))
        .await
        .expect("the refusal is prompt");
    check("get_package", &package.unwrap_err());
    let mut watch = Box::pin(client.watch("r-1", 0));
    let opened = next(&mut watch).await.expect("one item");
    check("watch", &opened.unwrap_err());
    assert!(next(&mut watch).await.is_none());

    // The registry's own partner certificate, for contrast.
    let client = RegistryClient::connect(&pki.settings(port, None)).expect("connect");
    tokio::time::timeout(PATIENCE, client.list(ListRequestsRequest::default()))
        .await
        .expect("the answer is prompt")
        .expect("crm's own certificate is served");
}

/// A registry killed under a watch: the stream ends with UNAVAILABLE naming the
/// `after_event_id` to follow on with, still a connection error.
#[tokio::test]
async fn a_watch_cut_by_a_killed_registry_ends_with_unavailable() {
    let pki = Pki::new();
    let relay = Relay::start(serve_stand_in(&pki.pki).await).await;
    let client = RegistryClient::connect(&pki.settings(relay.port, None)).expect("connect");
    let mut watch = Box::pin(client.watch("r-1", 3));
    let event = next(&mut watch)
        .await
        .expect("an event")
        .expect("the event");
    assert_eq!(event.event_id, EVENT_ID);
    relay.kill();
    let status = next(&mut watch)
        .await
        .expect("an error item")
        .expect_err("the connection is lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(dsrelay_sdk::is_connection_error(&status), "{status:?}");
    assert!(!dsrelay_sdk::closed_by_peer(&status), "{status:?}");
    let message = status.message();
    assert!(
        message.contains("the connection to the registry was lost during the watch"),
        "{message}"
    );
    assert!(
        message.contains(&format!("after_event_id {EVENT_ID}")),
        "{message}"
    );
    assert!(next(&mut watch).await.is_none(), "nothing after the error");
}

/// A registry killed under a download: the stream ends with UNAVAILABLE saying to download
/// again, still a connection error.
#[tokio::test]
async fn a_download_cut_by_a_killed_registry_ends_with_unavailable() {
    let pki = Pki::new();
    let relay = Relay::start(serve_stand_in(&pki.pki).await).await;
    let client = RegistryClient::connect(&pki.settings(relay.port, None)).expect("connect");
    let mut download = Box::pin(client.download_package("r-1"));
    let first = next(&mut download).await.expect("the manifest");
    assert!(matches!(first, Ok(DownloadEvent::Manifest(_))), "{first:?}");
    relay.kill();
    let status = next(&mut download)
        .await
        .expect("an error item")
        .expect_err("the connection is lost");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(dsrelay_sdk::is_connection_error(&status), "{status:?}");
    let message = status.message();
    assert!(
        message.contains("the connection to the registry was lost during the download"),
        "{message}"
    );
    assert!(message.contains("call download_package again"), "{message}");
    assert!(dsrelay_sdk::is_lost_stream(&status), "{status:?}");
    assert!(
        next(&mut download).await.is_none(),
        "nothing after the error"
    );
}
