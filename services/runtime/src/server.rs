//! The tonic server every dsrelay service runs: limits and the caller's trace context
//! ([`builder`], with tonic's fixed TLS; [`plain_builder`], for [`serve_tls`]), the
//! reflection services, and serving a router on a listener the caller bound: [`serve_tls`]
//! accepts every connection with the TLS configuration a [`LiveTls`] holds at that moment,
//! so certificates, CA bundle and revocation lists change without a restart; [`serve`]
//! serves the builder's fixed TLS.
//!
//! The caller binds (tests bind `127.0.0.1:0`) and owns shutdown, as in mini-redis.
//! [`crate::host::Host`] puts these together with health checking, the admin port and the
//! workers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, Router, TcpIncoming};
use tonic::transport::{Server, ServerTlsConfig};
use tower::layer::util::{Identity, Stack};

use crate::grpc::TraceContextLayer;
use crate::tls::{LiveTls, HANDSHAKE_TIMEOUT};

/// Largest message either service decodes or encodes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How much a caller may send on one stream before the service has read it (HTTP/2 flow
/// control; hyper's default is 1 MiB). An upload sends 1 MiB chunks: with the default, the
/// processor waited for the registry to read each chunk before it sent the next, and phase 1
/// of the 1 GiB export took about 10 % longer (docs/benchmarks.md, session 20).
const STREAM_WINDOW: u32 = 4 << 20;
/// The same for all of a connection's streams together: what a service holds at most unread
/// for one caller.
const CONNECTION_WINDOW: u32 = 8 << 20;

/// The largest HTTP/2 frame a caller may send (the protocol's default is 16 KiB): a 1 MiB
/// upload chunk then takes 4 frames instead of 64, which cut both ends' CPU for the 1 GiB
/// export by about 3 % in paired runs (session 20).
const MAX_FRAME: u32 = 256 << 10;

/// The layers [`builder`] puts around every service.
pub type Layers = Stack<UnaryLimitLayer, Stack<TraceContextLayer, Identity>>;

/// A server builder with tonic's TLS, the limits every dsrelay service uses, and the layer
/// that continues callers' traces ([`crate::grpc::trace`]). Unary calls run as long as
/// their callers allow.
pub fn builder(tls: ServerTlsConfig) -> Result<Server<Layers>> {
    Ok(limits(
        Server::builder()
            .tls_config(tls)
            .context("configuring TLS")?,
        None,
    ))
}

/// [`builder`] without TLS, for [`serve_tls`], which does the handshakes itself; every
/// unary call is ended after `call_limit` ([`UnaryLimitLayer`]).
pub fn plain_builder(call_limit: Duration) -> Server<Layers> {
    limits(Server::builder(), Some(call_limit))
}

fn limits(server: Server, call_limit: Option<Duration>) -> Server<Layers> {
    server
        .max_concurrent_streams(Some(256))
        .concurrency_limit_per_connection(256)
        .http2_max_pending_accept_reset_streams(Some(64))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(MAX_FRAME))
        .layer(TraceContextLayer)
        .layer(UnaryLimitLayer { limit: call_limit })
}

/// Ends every unary call still running after `limit` (the service's `call_limit_ms`) with
/// DEADLINE_EXCEEDED naming the limit, dropping its handler, so that a stuck handler cannot
/// hold the server's resources forever. A caller's shorter `grpc-timeout` still ends it
/// first (tonic enforces that). Streaming calls are not timed here: their handlers only
/// start the stream, and each stream bounds itself (the registry's Watch by
/// `watch.max_stream_ms`; upload streams by [`next_message_within`]).
#[derive(Debug, Clone, Copy)]
pub struct UnaryLimitLayer {
    limit: Option<Duration>,
}

impl<S> tower::Layer<S> for UnaryLimitLayer {
    type Service = UnaryLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UnaryLimit {
            inner,
            limit: self.limit,
        }
    }
}

/// The service [`UnaryLimitLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct UnaryLimit<S> {
    inner: S,
    limit: Option<Duration>,
}

impl<S, B, R> tower::Service<http::Request<B>> for UnaryLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let limit = self
            .limit
            .filter(|_| unary_methods().contains(request.uri().path()));
        let call = self.inner.call(request);
        let Some(limit) = limit else {
            return Box::pin(call);
        };
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the call ran past this server's limit of {} ms (call_limit_ms) and was \
                     cancelled",
                    limit.as_millis()
                ))
                .into_http()),
            }
        })
    }
}

/// The next message of a client stream, or DEADLINE_EXCEEDED when its caller sends nothing
/// for `idle` (the service's `call_limit_ms`): a caller that opens an upload and then stalls
/// would otherwise hold the handler, its file and its claim on the file for as long as its
/// connection lives, since HTTP/2 keepalive pings are answered by a stalled client too.
pub async fn next_message_within<T>(
    stream: &mut tonic::Streaming<T>,
    idle: Duration,
) -> Result<Option<T>, tonic::Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(message) => message,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "the stream sent nothing for {} ms (call_limit_ms) and was ended; what arrived \
             before is kept: ask for the upload's state and resume from there",
            idle.as_millis()
        ))),
    }
}

/// The paths (`/dsrelay.v1.RequestService/Get`) of every unary method of dsrelay's protocol
/// and of health checking, read from their descriptors once.
fn unary_methods() -> &'static std::collections::HashSet<String> {
    static UNARY: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    UNARY.get_or_init(|| {
        use dsrelay_proto::prost::Message;
        let mut paths = std::collections::HashSet::new();
        for encoded in [
            dsrelay_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            // Compiled into the binary; a set that does not decode leaves its calls untimed.
            let Ok(set) = dsrelay_proto::prost_types::FileDescriptorSet::decode(encoded) else {
                continue;
            };
            for file in &set.file {
                for service in &file.service {
                    for method in &service.method {
                        if !method.client_streaming() && !method.server_streaming() {
                            paths.insert(format!(
                                "/{}.{}/{}",
                                file.package(),
                                service.name(),
                                method.name()
                            ));
                        }
                    }
                }
            }
        }
        paths
    })
}

/// The gRPC reflection service (v1) describing dsrelay's protocol and health checking: all
/// of dsrelay's services, or with `only` (full names, `dsrelay.v1.RequestService`) just
/// those, so that a caller learns nothing of the services it may not call.
pub fn reflection(
    only: Option<&[&str]>,
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    reflection_builder(only)?
        .build_v1()
        .context("building the reflection service")
}

/// The older reflection service (v1alpha), which many tools still speak (grpcurl before
/// 1.9, Python's grpcio-reflection client); `only` as for [`reflection`].
pub fn reflection_v1alpha(
    only: Option<&[&str]>,
) -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    reflection_builder(only)?
        .build_v1alpha()
        .context("building the reflection service")
}

/// The reflection builder over dsrelay's descriptors and health checking's. With `only`, the
/// other services are cut out of dsrelay's file descriptors, so they are neither listed nor
/// found by symbol or file (their messages stay, as the services kept may use them). An entry
/// `dsrelay.v1.RequestService` keeps the whole service; entries
/// `dsrelay.v1.RequestService/Submit` keep the service with only the methods they name, so
/// that a role sees none of the methods it may not call in a service it shares with another.
fn reflection_builder(only: Option<&[&str]>) -> Result<tonic_reflection::server::Builder<'static>> {
    use dsrelay_proto::prost::Message;
    let builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let Some(only) = only else {
        return Ok(builder.register_encoded_file_descriptor_set(dsrelay_proto::FILE_DESCRIPTOR_SET));
    };
    let mut set =
        dsrelay_proto::prost_types::FileDescriptorSet::decode(dsrelay_proto::FILE_DESCRIPTOR_SET)
            .context("reading dsrelay's file descriptors")?;
    for file in &mut set.file {
        let package = file.package().to_string();
        file.service.retain_mut(|s| {
            let name = format!("{package}.{}", s.name());
            if only.contains(&name.as_str()) {
                return true;
            }
            let prefix = format!("{name}/");
            let methods: Vec<&str> = only
                .iter()
                .filter_map(|e| e.strip_prefix(&prefix))
                .collect();
            s.method.retain(|m| methods.contains(&m.name()));
            !s.method.is_empty()
        });
    }
    Ok(builder.register_file_descriptor_set(set))
}

/// How long calls still open when shutdown begins may run on under [`serve`] (the services'
/// hosts use their `shutdown_grace_ms` instead, [`serve_tls`]); then their connections are
/// closed, so a client holding a stream open cannot keep a server from stopping.
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
    serve_incoming(router, incoming, shutdown, DRAIN_GRACE).await
}

/// [`serve`] for a router from [`plain_builder`]: every accepted connection does its TLS
/// handshake (at most [`HANDSHAKE_TIMEOUT`], several at once) with the server
/// configuration `tls` holds at that moment, and only completed handshakes reach tonic,
/// which reads the client's certificates from the stream as it does for its own TLS. Calls
/// still open when shutdown began get `drain` (the service's `shutdown_grace_ms`) to finish,
/// then their connections are dropped.
pub async fn serve_tls(
    router: Router<Layers>,
    listener: TcpListener,
    tls: LiveTls,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> Result<()> {
    serve_incoming(router, TlsIncoming::start(listener, tls), shutdown, drain).await
}

async fn serve_incoming<I, IO, IE>(
    router: Router<Layers>,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> Result<()>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (began, beginning) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = began.send(());
    };
    // tonic's connection tasks outlive the serving future; this closes them when it ends.
    let (close, closing) = tokio::sync::watch::channel(false);
    let incoming = tokio_stream::StreamExt::map(incoming, move |io| {
        io.map(|io| Closable::new(io, closing.clone()))
    });
    let serving = router.serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(serving);
    let drained_or_overdue = async {
        if beginning.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            // Serving ended without a shutdown; the other branch has its result.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = &mut serving => served.context("serving gRPC"),
        () = drained_or_overdue => {
            tracing::warn!(grace = ?drain, "calls still open after shutdown began; closing their connections");
            close.send_replace(true);
            Ok(())
        }
    }
}

/// A served connection whose reads and writes fail once `closing` turns true (or its sender
/// is gone), so that a call still open when the drain ends loses its connection even while
/// the process lives on.
struct Closable<IO> {
    io: IO,
    closed: bool,
    closing: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl<IO> Closable<IO> {
    fn new(io: IO, mut closing: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            io,
            closed: false,
            closing: Box::pin(async move {
                let _ = closing.wait_for(|c| *c).await;
            }),
        }
    }

    /// Whether the connection is closed; otherwise the task is woken when it is.
    fn poll_closed(&mut self, cx: &mut TaskContext<'_>) -> bool {
        if !self.closed && self.closing.as_mut().poll(cx).is_ready() {
            self.closed = true;
        }
        self.closed
    }
}

fn aborted() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "the server stopped and closed this connection",
    )
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Closable<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.poll_closed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Closable<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.poll_closed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        if self.poll_closed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Closable<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Connections whose TLS handshake completed, in the order they completed. The listener
/// and the handshakes in progress live in a task that ends when this stream is dropped
/// (tonic drops it when shutdown begins), so the port stops accepting at once.
struct TlsIncoming {
    done: mpsc::Receiver<TlsStream<TcpStream>>,
    accepting: JoinHandle<()>,
}

impl TlsIncoming {
    fn start(listener: TcpListener, tls: LiveTls) -> Self {
        let (tx, done) = mpsc::channel(16);
        let accepting = tokio::spawn(accept(listener, tls, tx));
        Self { done, accepting }
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.done.poll_recv(cx).map(|s| s.map(Ok))
    }
}

/// Accepts connections and runs their handshakes side by side, so a slow or silent client
/// holds up nobody else.
async fn accept(listener: TcpListener, tls: LiveTls, done: mpsc::Sender<TlsStream<TcpStream>>) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, most likely: let connections close.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Best effort: a socket already closed by the peer fails its handshake next.
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                let done = done.clone();
                handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            // Closed: serving stopped, and the connection goes with it.
                            let _ = done.send(stream).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "tls handshake refused");
                        }
                        Err(_) => {
                            tracing::info!(
                                %peer,
                                timeout = ?HANDSHAKE_TIMEOUT,
                                "tls handshake timed out"
                            );
                        }
                    }
                });
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
        }
    }
}
