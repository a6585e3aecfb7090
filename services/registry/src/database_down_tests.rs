//! A partner's call while the registry's PostgreSQL server cannot be reached: the answer is
//! UNAVAILABLE saying so, well within the SDK's default deadline, not a deadline that ran
//! out at the same moment as the wait for a connection.

use std::time::Duration;

use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{GetRequest, RequestKind};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup};

/// Forwards connections to the database server until [`Forwarder::cut`], which closes the
/// connections and the port, as a server that went away does.
struct Forwarder {
    port: u16,
    running: JoinSet<()>,
}

impl Forwarder {
    async fn to(server: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut running = JoinSet::new();
        running.spawn(async move {
            let mut pipes = JoinSet::new();
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                let server = server.clone();
                pipes.spawn(async move {
                    let mut outbound = TcpStream::connect(&server).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Self { port, running }
    }

    /// Aborting the accepting task drops the listener and, with its set, every pipe.
    async fn cut(mut self) {
        self.running.shutdown().await;
    }
}

/// `url` with its `host:port` replaced by `127.0.0.1:port`, and the `host:port` it had.
fn through(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (credentials, rest) = rest.rsplit_once('@').unwrap();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let server = rest[..end].to_string();
    (
        format!("{scheme}://{credentials}@127.0.0.1:{port}{}", &rest[end..]),
        server,
    )
}

#[tokio::test]
async fn a_call_while_the_database_is_down_is_unavailable_before_the_callers_deadline() {
    on_postgres(|url, dir| async move {
        let (_, server) = through(&url, 0);
        let forwarder = Forwarder::to(server).await;
        let (url, _) = through(&url, forwarder.port);
        let registry = Registry::start(&dir, &url, Setup::default()).await;
        let id = registry.submit(RequestKind::Erasure, "k-1").await;
        forwarder.cut().await;
        // Past the idle time after which the pool checks a connection before handing it
        // out: the check fails, and the call waits for a new connection.
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let mut call = tonic::Request::new(GetRequest { request_id: id });
        // The SDK's and dsrctl's default deadline.
        call.set_timeout(Duration::from_secs(30));
        let status = RequestServiceClient::new(registry.channel("partner-crm"))
            .get(call)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("could not reach its database"),
            "{status:?}"
        );
        // Not stopped: its workers would first wait out their own connections.
        drop(registry);
    })
    .await;
}
