//! The tonic server every dsrelay service runs: mTLS, limits and the caller's trace context
//! ([`builder`]), the reflection services, and serving a router on a listener the caller bound
//! ([`serve`]).
//!
//! The caller binds (tests bind `127.0.0.1:0`) and owns shutdown, as in mini-redis.
//! [`crate::host::Host`] puts these together with health checking, the admin port and the
//! workers.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Server, ServerTlsConfig};
use tower::layer::util::{Identity, Stack};

use crate::grpc::TraceContextLayer;

/// Largest message either service decodes or encodes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The layers [`builder`] puts around every service.
pub type Layers = Stack<TraceContextLayer, Identity>;

/// A server builder with TLS, the limits every dsrelay service uses, and the layer that
/// continues callers' traces ([`crate::grpc::trace`]).
pub fn builder(tls: ServerTlsConfig) -> Result<Server<Layers>> {
    Ok(Server::builder()
        .tls_config(tls)
        .context("configuring TLS")?
        .max_concurrent_streams(Some(256))
        .concurrency_limit_per_connection(256)
        .http2_max_pending_accept_reset_streams(Some(64))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(TraceContextLayer))
}

/// The gRPC reflection service (v1) describing dsrelay's protocol and health checking.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dsrelay_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")
}

/// The older reflection service (v1alpha), which many tools still speak (grpcurl before
/// 1.9, Python's grpcio-reflection client).
pub fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dsrelay_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")
}

/// How long calls still open when shutdown begins may run on; then their connections are
/// closed, so a client holding a stream open cannot keep a service from stopping.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown` resolves, with TCP_NODELAY on every accepted
/// socket (tonic sets it only on listeners it binds itself; without it p99 latency suffers
/// delayed-ACK stalls). After `shutdown` no call is accepted; calls in flight get
/// [`DRAIN_GRACE`] to finish, then their connections are dropped.
pub async fn serve(
    router: Router<Layers>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (began, beginning) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = began.send(());
    };
    let serving = router.serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(serving);
    let drained_or_overdue = async {
        if beginning.await.is_ok() {
            tokio::time::sleep(DRAIN_GRACE).await;
        } else {
            // Serving ended without a shutdown; the other branch has its result.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = &mut serving => served.context("serving gRPC"),
        () = drained_or_overdue => {
            tracing::warn!(grace = ?DRAIN_GRACE, "calls still open after shutdown began; closing their connections");
            Ok(())
        }
    }
}
