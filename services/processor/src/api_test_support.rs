//! Tests' ProcessorService: served over mutual TLS on 127.0.0.1, as the registry reaches it.

use std::sync::Arc;

use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::processor_service_server::ProcessorServiceServer;
use dsrelay_runtime::pki::{dev_identity, DevPki};

use crate::api::Api;
use crate::app::Shared;

/// The ProcessorService of `shared` served on 127.0.0.1 over the development PKI in `dir`,
/// a client of it as the controller's registry, and what stops the server once sent.
pub(crate) async fn serve_processor_api(
    shared: &Arc<Shared>,
    dir: &std::path::Path,
) -> (
    ProcessorServiceClient<tonic::transport::Channel>,
    tokio::sync::oneshot::Sender<()>,
) {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let server_tls = pki.files("processor").server_config().expect("server tls");
    let router = dsrelay_runtime::server::builder(server_tls)
        .expect("server")
        .add_service(ProcessorServiceServer::new(Api::new(shared.clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
        let _ = stopped.await;
    }));
    let client_tls = pki.files("registry").client_config().expect("client tls");
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{port}"),
        Some(dev_identity("processor", "payroll-bureau")),
        &client_tls,
    )
    .expect("channel");
    (ProcessorServiceClient::new(channel), stop)
}
