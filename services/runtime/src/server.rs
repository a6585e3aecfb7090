//! The tonic server every dsrelay service runs: limits and the caller's trace context
//! ([`builder`], with tonic's fixed TLS; [`plain_builder`], for [`serve_tls`]), the
//! reflection services, and serving a router on a listener the caller bound: [`serve_tls`]
//! accepts every connection with the TLS configuration a [`LiveTls`] holds at that moment,
//! so certificates, CA bundle and revocation lists change without a restart, and checks
//! every call's client certificate against the lists and clock of that moment
//! ([`PeerCheckLayer`]); [`serve`] serves the builder's fixed TLS.
//!
//! The caller binds (tests bind `127.0.0.1:0`) and owns shutdown, as in mini-redis.
//! [`crate::host::Host`] puts these together with health checking, the admin port and the
//! workers.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, Router, TcpIncoming};
use tonic::transport::{Server, ServerTlsConfig};
use tower::layer::util::{Identity, Stack};

use crate::grpc::TraceContextLayer;
use crate::tls::peer::PeerCertificate;
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
pub type Layers = Stack<PeerCheckLayer, Stack<UnaryLimitLayer, Stack<TraceContextLayer, Identity>>>;

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
        .layer(PeerCheckLayer)
}

/// Checks every call's client certificate against the revocation lists and the clock of the
/// moment ([`crate::tls::peer`]): a connection lives on after a revocation or an expiry
/// (HTTP/2 keepalive holds it open), and its handshake's verdict would otherwise stand for
/// as long as it does. A refused call gets UNAUTHENTICATED naming the certificate's serial
/// and why, and is logged at warn (rate-limited, [`crate::grpc::auth::log_refusal`]).
/// Streams already open run to their end; the check is at a call's start.
///
/// Only connections accepted by [`serve_tls`] are checked: it registers each with its
/// parsed certificate and its [`LiveTls`] (`served`), found again by the connection's
/// addresses, which tonic hands every call (the router, and with it this layer, is built
/// before `serve_tls` sees the files). [`serve`]'s fixed TLS loads no lists and reloads
/// nothing, so its calls pass unchecked.
#[derive(Debug, Clone, Copy)]
pub struct PeerCheckLayer;

impl<S> tower::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerCheck { inner }
    }
}

/// The service [`PeerCheckLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct PeerCheck<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for PeerCheck<S>
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
        if let Some(refusal) = served::refusal(request.extensions()) {
            return Box::pin(std::future::ready(Ok(tonic::Status::unauthenticated(
                refusal,
            )
            .into_http())));
        }
        Box::pin(self.inner.call(request))
    }
}

/// The connections [`serve_tls`] serves, each with what its calls are checked by.
mod served {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, LazyLock, RwLock};
    use std::time::SystemTime;

    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

    use crate::tls::peer::PeerCertificate;
    use crate::tls::LiveTls;

    /// A connection's local and remote address: unique among the open TCP connections of
    /// the process, whichever of its listeners they came in on.
    type Key = (SocketAddr, SocketAddr);

    struct Served {
        /// `None` only for a certificate x509-parser cannot read after webpki accepted it.
        leaf: Option<PeerCertificate>,
        tls: LiveTls,
    }

    /// Process-wide because the check runs in a layer built before the connection exists;
    /// entries live exactly as long as their connections ([`Registered`]).
    static SERVED: LazyLock<RwLock<HashMap<Key, Arc<Served>>>> = LazyLock::new(Default::default);

    /// A connection's entry, removed when dropped with the connection.
    pub(super) struct Registered(Key);

    impl Drop for Registered {
        fn drop(&mut self) {
            SERVED
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.0);
        }
    }

    /// Registers a connection accepted on `local` from `remote` presenting `leaf` (DER).
    pub(super) fn register(
        local: SocketAddr,
        remote: SocketAddr,
        leaf: Option<&[u8]>,
        tls: LiveTls,
    ) -> Registered {
        let served = Served {
            leaf: leaf.and_then(PeerCertificate::parse),
            tls,
        };
        let key = (local, remote);
        SERVED
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Arc::new(served));
        Registered(key)
    }

    /// Why the call with these extensions is refused for its connection's certificate, or
    /// `None` when it is not (or its connection was not accepted by `serve_tls`).
    pub(super) fn refusal(extensions: &http::Extensions) -> Option<String> {
        let info = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?;
        let tcp = info.get_ref();
        let key = (tcp.local_addr()?, tcp.remote_addr()?);
        let served = SERVED
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()?;
        let peer = key.1;
        let Some(leaf) = &served.leaf else {
            let why = "the client certificate of this connection cannot be read".to_string();
            crate::grpc::auth::log_refusal("unreadable certificate", || {
                tracing::warn!(%peer, reason = "unreadable certificate", "call refused: {why}");
            });
            return Some(why);
        };
        let refused = leaf
            .check(&served.tls.revocations(), SystemTime::now())
            .err()?;
        crate::grpc::auth::log_refusal(refused.reason, || {
            tracing::warn!(
                %peer,
                identity = leaf.identity.as_deref().unwrap_or("(none)"),
                subject = %leaf.subject,
                serial = %leaf.serial_hex,
                reason = refused.reason,
                "call refused: {}",
                refused.message
            );
        });
        Some(refused.message)
    }
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
/// handshake (at most [`HANDSHAKE_TIMEOUT`], [`MAX_HANDSHAKES`] at once) with the server
/// configuration `tls` holds at that moment, and only completed handshakes reach tonic,
/// which reads the client's certificates from the stream as it does for its own TLS; a failed
/// handshake after a quiet 10 s is logged with its details, the others of those 10 s as one
/// line of counts, and so are failures to accept a connection. A connection reaches tonic
/// only once it sent the HTTP/2 preface, within [`PREFACE_TIMEOUT`] of its handshake, and
/// while fewer than [`MAX_CONNECTIONS`] connections are served, fewer than
/// [`MAX_CONNECTIONS_PER_IDENTITY`] of them for its certificate's identity; one beyond
/// either cap is closed after its handshake and logged at warn, rate-limited as the failed
/// handshakes are. A refused handshake's line names the client certificate it refused
/// (identity, subject, serial). Every call on a served connection has its client
/// certificate checked again ([`PeerCheckLayer`]) against the lists `tls` holds at that
/// moment. Calls still open when shutdown began get `drain` (the service's
/// `shutdown_grace_ms`) to finish, then their connections are dropped.
pub async fn serve_tls(
    router: Router<Layers>,
    listener: TcpListener,
    tls: LiveTls,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> Result<()> {
    let incoming = TlsIncoming::start(listener, tls, HandshakeLimits::DEFAULT);
    serve_incoming(router, incoming, shutdown, drain).await
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
            tracing::warn!(
                grace = ?drain,
                "calls still open after shutdown began; closing their connections"
            );
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

/// How many TLS handshakes one listener runs at once; a connection beyond them ends the
/// oldest handshake still running (`accept`). Every one holds a file descriptor for up to
/// [`HANDSHAKE_TIMEOUT`] (and [`PREFACE_TIMEOUT`] more once it completed), so without a cap
/// a host that reaches the port could hold them all by opening connections that send
/// nothing. A partner's handshake lasts a few round trips, and partners open nowhere near
/// this many connections in that time.
pub const MAX_HANDSHAKES: usize = 256;

/// How long after its TLS handshake a connection may take to send the HTTP/2 client preface
/// before it is closed. Until then it holds a place among the [`MAX_HANDSHAKES`]; a client
/// sends the preface as soon as its handshake completes. Without this, a certified host
/// could hold any number of connections that never speak: tonic waits for the preface
/// without a deadline, and HTTP/2 keepalive pings start only after it.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many connections one listener serves at once; one more is closed after its
/// handshake. Every one holds a file descriptor for as long as its client keeps it (keepalive
/// pings keep a silent but answering client), so without a cap any certificate of the
/// shared CA could exhaust the process's descriptors. Partners open a few connections each.
pub const MAX_CONNECTIONS: usize = 4096;

/// How many of the [`MAX_CONNECTIONS`] one certificate identity may hold, so that one party
/// (or one leaked certificate) cannot take them all; certificates without an identity share
/// one such allowance.
pub const MAX_CONNECTIONS_PER_IDENTITY: usize = 512;

/// What an HTTP/2 client sends first (RFC 9113, section 3.4).
const PREFACE_LEN: usize = 24;

/// How often at most a failed handshake, or a failure to accept a connection, is logged; the
/// others in between are counted and their counts logged in one line ([`FailureLog`]).
const HANDSHAKE_LOG_EVERY: Duration = Duration::from_secs(10);

/// The bounds on a listener's handshakes and connections; tests shrink them.
#[derive(Debug, Clone, Copy)]
struct HandshakeLimits {
    /// How many run at once.
    in_progress: usize,
    /// How long each may take.
    timeout: Duration,
    /// How often at most a failed one, a failed accept or a refused connection is logged.
    log_every: Duration,
    /// How long after its handshake a connection may take to send the HTTP/2 preface.
    preface_timeout: Duration,
    /// How many connections are served at once.
    connections: usize,
    /// How many of them one identity may hold.
    per_identity: usize,
}

impl HandshakeLimits {
    const DEFAULT: Self = Self {
        in_progress: MAX_HANDSHAKES,
        timeout: HANDSHAKE_TIMEOUT,
        log_every: HANDSHAKE_LOG_EVERY,
        preface_timeout: PREFACE_TIMEOUT,
        connections: MAX_CONNECTIONS,
        per_identity: MAX_CONNECTIONS_PER_IDENTITY,
    };
}

/// The connections a listener serves, in all and by identity.
struct Connections {
    most: usize,
    per_identity: u32,
    total: std::sync::atomic::AtomicUsize,
    by_identity: crate::slots::KeyedSlots,
}

/// Which cap a connection was refused at, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cap {
    Total(usize),
    PerIdentity(usize),
}

impl Connections {
    fn new(limits: &HandshakeLimits) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            most: limits.connections,
            per_identity: u32::try_from(limits.per_identity).unwrap_or(u32::MAX),
            total: Default::default(),
            by_identity: Default::default(),
        })
    }

    /// A place for one more connection of `identity`, held until the slot is dropped.
    fn admit(self: &std::sync::Arc<Self>, identity: &str) -> Result<Slot, Cap> {
        use std::sync::atomic::Ordering;
        let most = self.most;
        (self.total)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < most).then_some(n + 1)
            })
            .map_err(|_| Cap::Total(most))?;
        let total = Total(self.clone());
        let identity = (self.by_identity)
            .take(identity, self.per_identity)
            .map_err(|_| Cap::PerIdentity(self.per_identity as usize))?;
        Ok(Slot {
            _total: total,
            _identity: identity,
        })
    }
}

/// One connection counted in [`Connections`]' total, until dropped.
struct Total(std::sync::Arc<Connections>);

impl Drop for Total {
    fn drop(&mut self) {
        (self.0.total).fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One connection's place among the [`Connections`], in all and for its identity, given
/// back when the connection is dropped (tonic drops it when the connection ends, or serving
/// does when it stops).
struct Slot {
    _total: Total,
    _identity: crate::slots::KeyedSlot,
}

/// The identity a connection counts against: its client certificate's, or what stands for
/// the lack of one in logs.
fn counted_identity(stream: &TlsStream<TcpStream>) -> String {
    match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        Some(leaf) => crate::tls::identity_of(leaf.as_ref())
            .unwrap_or_else(|| "(a certificate without an identity)".to_string()),
        None => "(no client certificate)".to_string(),
    }
}

/// A connection handed to tonic: the TLS stream, the preface read from it before (given to
/// tonic first, as if unread) and its place among the served connections.
struct Admitted {
    io: TlsStream<TcpStream>,
    preface: [u8; PREFACE_LEN],
    replayed: usize,
    _slot: Slot,
    /// What its calls are checked by ([`PeerCheckLayer`]), for as long as it lives.
    _checked: served::Registered,
}

impl tokio::io::AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.replayed < PREFACE_LEN {
            let n = buf.remaining().min(PREFACE_LEN - self.replayed);
            buf.put_slice(&self.preface[self.replayed..self.replayed + n]);
            self.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Admitted {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Connections whose TLS handshake completed and that sent the HTTP/2 preface, in the order
/// they did. The listener and the handshakes in progress live in a task that ends when this
/// stream is dropped (tonic drops it when shutdown begins), so the port stops accepting at
/// once.
struct TlsIncoming {
    done: mpsc::UnboundedReceiver<Admitted>,
    accepting: JoinHandle<()>,
}

impl TlsIncoming {
    fn start(listener: impl Listener, tls: LiveTls, limits: HandshakeLimits) -> Self {
        // Unbounded so that a completed handshake leaves the handshakes in progress at once
        // rather than wait there, where it could be taken for a stalled one and ended; tonic
        // takes every connection as it comes, so the queue stays short.
        let (tx, done) = mpsc::unbounded_channel();
        let accepting = tokio::spawn(accept(listener, tls, tx, limits));
        Self { done, accepting }
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Stream for TlsIncoming {
    type Item = Result<Admitted, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.done.poll_recv(cx).map(|s| s.map(Ok))
    }
}

/// Where [`accept`] takes its connections from: a [`TcpListener`], or in tests one that
/// fails as a process out of file descriptors does.
trait Listener: Send + Sync + 'static {
    fn accept(&self) -> impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>> + Send;
}

impl Listener for TcpListener {
    fn accept(&self) -> impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

/// Accepts connections and runs their handshakes side by side, so a slow or silent client
/// holds up nobody else, at most `limits.in_progress` at once. A handshake lasts until the
/// connection sent the HTTP/2 preface (at most `limits.preface_timeout` after the TLS
/// handshake), and the connection is then served if the caps on connections
/// ([`Connections`]) leave it a place, which they are asked for right after the TLS
/// handshake, when the client's identity is known.
///
/// At the cap, a new connection ends the oldest handshake still running instead of waiting
/// for a free place or being turned away itself. Waiting (not accepting) or turning away the
/// newest both let a host that opens `in_progress` silent connections every
/// `limits.timeout` (26 a second by default) shut every partner out; ending the oldest
/// makes it open them faster than a partner's handshake completes (some thousands a second
/// for a handshake of 100 ms), and partners' handshakes are the quick ones.
async fn accept(
    listener: impl Listener,
    tls: LiveTls,
    done: mpsc::UnboundedSender<Admitted>,
    limits: HandshakeLimits,
) {
    let connections = Connections::new(&limits);
    let mut handshakes = JoinSet::new();
    // The handshakes in progress, oldest first, each with its peer.
    let mut running: VecDeque<(AbortHandle, SocketAddr)> = VecDeque::new();
    let mut failures = FailureLog::<Failure>::new(limits.log_every);
    // Retried every 50 ms while it lasts: one line each would be 20 a second.
    let mut unaccepted = FailureLog::<NotAccepted>::new(limits.log_every);
    let mut refusals = FailureLog::<OverCap>::new(limits.log_every);
    loop {
        let summary_due = failures.summary_due();
        let unaccepted_due = unaccepted.summary_due();
        let refusals_due = refusals.summary_due();
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        unaccepted.record(Instant::now(), NotAccepted(e));
                        // Out of file descriptors, most likely: let connections close.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if running.len() >= limits.in_progress {
                    // Ended but not yet joined: no longer holding a place, nor to be ended.
                    running.retain(|(h, _)| !h.is_finished());
                }
                if running.len() >= limits.in_progress {
                    if let Some((oldest, oldest_peer)) = running.pop_front() {
                        oldest.abort();
                        let dropped = Failure::Dropped(oldest_peer, limits.in_progress);
                        failures.record(Instant::now(), dropped);
                    }
                }
                // Best effort: a socket already closed by the peer fails its handshake next.
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                let done = done.clone();
                let connections = connections.clone();
                let tls = tls.clone();
                let handshake = handshakes.spawn(async move {
                    // Without it the connection's calls could not be found to be checked.
                    let local = match tcp.local_addr() {
                        Ok(local) => local,
                        Err(e) => return Some(Ended::Failed(Failure::Refused(peer, e, None))),
                    };
                    let handshake = tokio::time::timeout(limits.timeout, acceptor.accept(tcp));
                    let (outcome, refused_cert) =
                        crate::tls::peer::noting_refused_certificate(handshake).await;
                    let mut stream =
                        match outcome {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                let refused = Failure::Refused(peer, e, refused_cert.map(Box::new));
                                return Some(Ended::Failed(refused));
                            }
                            Err(_) => {
                                let timed_out = Failure::TimedOut(peer, limits.timeout);
                                return Some(Ended::Failed(timed_out));
                            }
                        };
                    let identity = counted_identity(&stream);
                    let slot = match connections.admit(&identity) {
                        Ok(slot) => slot,
                        Err(cap) => return Some(Ended::OverCap(OverCap { peer, identity, cap })),
                    };
                    let mut preface = [0u8; PREFACE_LEN];
                    let read = tokio::io::AsyncReadExt::read_exact(&mut stream, &mut preface);
                    match tokio::time::timeout(limits.preface_timeout, read).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(Ended::Failed(Failure::NoPreface(peer, e))),
                        Err(_) => {
                            let e = std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "no HTTP/2 preface within {:?} of the handshake",
                                    limits.preface_timeout
                                ),
                            );
                            return Some(Ended::Failed(Failure::NoPreface(peer, e)));
                        }
                    }
                    let leaf = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let checked = served::register(local, peer, leaf.map(|l| l.as_ref()), tls);
                    let admitted = Admitted {
                        io: stream,
                        preface,
                        replayed: 0,
                        _slot: slot,
                        _checked: checked,
                    };
                    // Closed: serving stopped, and the connection goes with it.
                    let _ = done.send(admitted);
                    None
                });
                running.push_back((handshake, peer));
            }
            Some(joined) = handshakes.join_next_with_id(), if !handshakes.is_empty() => {
                // An ended one was taken out when it was ended; it is no longer there.
                let id = match &joined {
                    Ok((id, _)) => *id,
                    Err(e) => e.id(),
                };
                if let Some(at) = running.iter().position(|(h, _)| h.id() == id) {
                    running.remove(at);
                }
                match joined {
                    Ok((_, Some(Ended::Failed(failure)))) => {
                        failures.record(Instant::now(), failure);
                    }
                    Ok((_, Some(Ended::OverCap(refusal)))) => {
                        refusals.record(Instant::now(), refusal);
                    }
                    _ => {}
                }
            }
            () = sleep_until_some(summary_due) => failures.summarise(Instant::now()),
            () = sleep_until_some(refusals_due) => refusals.summarise(Instant::now()),
            () = sleep_until_some(unaccepted_due) => unaccepted.summarise(Instant::now()),
        }
    }
}

/// Resolves at `deadline`, or never without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Why a connection did not reach tonic.
#[derive(Debug)]
enum Ended {
    Failed(Failure),
    OverCap(OverCap),
}

/// Why a handshake did not reach tonic.
#[derive(Debug)]
enum Failure {
    /// With the client certificate refused, when the verifier refused one.
    Refused(SocketAddr, std::io::Error, Option<Box<PeerCertificate>>),
    TimedOut(SocketAddr, Duration),
    /// Ended for a newer connection, with this many in progress.
    Dropped(SocketAddr, usize),
    /// The TLS handshake completed but the HTTP/2 preface did not come, or not in time.
    NoPreface(SocketAddr, std::io::Error),
}

/// A kind of failure a [`FailureLog`] writes: one as it comes, or the counts of several.
trait Logged {
    /// How many failed, by reason, since the last line about them.
    type Counts: Default + PartialEq;

    fn count(&self, counts: &mut Self::Counts);

    /// The line for this one failure.
    fn log(&self);

    /// The line for the failures counted in the interval `every`.
    fn log_counts(counts: Self::Counts, every: Duration);
}

impl Logged for Failure {
    type Counts = FailureCounts;

    fn count(&self, counts: &mut FailureCounts) {
        match self {
            Failure::Refused(_, e, _) => {
                counts.refused += 1;
                *counts.refused_by_reason.entry(e.to_string()).or_default() += 1;
            }
            Failure::TimedOut(..) => counts.timed_out += 1,
            Failure::Dropped(..) => counts.dropped += 1,
            Failure::NoPreface(..) => counts.no_preface += 1,
        }
    }

    fn log(&self) {
        match self {
            Failure::Refused(peer, e, Some(cert)) => tracing::warn!(
                %peer,
                identity = cert.identity.as_deref().unwrap_or("(none)"),
                subject = %cert.subject,
                serial = %cert.serial_hex,
                error = %e,
                "tls handshake refused"
            ),
            Failure::Refused(peer, e, None) => {
                tracing::warn!(%peer, error = %e, "tls handshake refused");
            }
            Failure::TimedOut(peer, timeout) => {
                tracing::info!(%peer, ?timeout, "tls handshake timed out");
            }
            Failure::Dropped(peer, max) => tracing::info!(
                %peer,
                max,
                "tls handshake ended for a newer connection: too many in progress"
            ),
            Failure::NoPreface(peer, e) => tracing::info!(
                %peer,
                error = %e,
                "tls handshake done but no HTTP/2 preface followed; connection closed"
            ),
        }
    }

    fn log_counts(counts: FailureCounts, every: Duration) {
        let FailureCounts {
            refused,
            refused_by_reason,
            timed_out,
            dropped,
            no_preface,
        } = counts;
        // Refusals are worth an operator's look; timeouts and drops are the internet's noise.
        if refused > 0 {
            tracing::warn!(
                refused,
                reasons = most_first(refused_by_reason),
                timed_out,
                dropped,
                no_preface,
                interval = ?every,
                "tls handshakes failed since the last such line"
            );
        } else {
            tracing::info!(
                refused,
                timed_out,
                dropped,
                no_preface,
                interval = ?every,
                "tls handshakes failed since the last such line"
            );
        }
    }
}

/// `counts` as `a: 3, b: 1`, the most first, with at most [`REFUSALS_NAMED`] named and the
/// others summed into `N more`.
fn most_first(counts: std::collections::BTreeMap<String, u64>) -> String {
    let mut most: Vec<(String, u64)> = counts.into_iter().collect();
    most.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let others = most.len().saturating_sub(REFUSALS_NAMED);
    let mut named: Vec<String> = most
        .iter()
        .take(REFUSALS_NAMED)
        .map(|(what, n)| format!("{what}: {n}"))
        .collect();
    if others > 0 {
        named.push(format!("{others} more"));
    }
    named.join(", ")
}

/// How many handshakes failed, by reason, since the last line about them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct FailureCounts {
    refused: u64,
    /// The refusals by their error (`invalid peer certificate: Revoked`).
    refused_by_reason: std::collections::BTreeMap<String, u64>,
    timed_out: u64,
    dropped: u64,
    no_preface: u64,
}

/// A connection closed after its handshake because a cap on connections was reached.
#[derive(Debug)]
struct OverCap {
    peer: SocketAddr,
    identity: String,
    cap: Cap,
}

/// How many identities the line counting refusals names; the others are summed.
const REFUSALS_NAMED: usize = 5;

impl Logged for OverCap {
    /// Refused connections by identity.
    type Counts = std::collections::BTreeMap<String, u64>;

    fn count(&self, counts: &mut Self::Counts) {
        *counts.entry(self.identity.clone()).or_default() += 1;
    }

    fn log(&self) {
        let (peer, identity) = (self.peer, &self.identity);
        match self.cap {
            Cap::Total(max) => tracing::warn!(
                %peer,
                identity,
                max,
                "connection refused: this listener already serves its most connections"
            ),
            Cap::PerIdentity(max) => tracing::warn!(
                %peer,
                identity,
                max,
                "connection refused: this identity already holds its most connections"
            ),
        }
    }

    fn log_counts(counts: Self::Counts, every: Duration) {
        let refused: u64 = counts.values().sum();
        tracing::warn!(
            refused,
            identities = most_first(counts),
            interval = ?every,
            "connections refused at the connection caps since the last such line"
        );
    }
}

/// The listener could not accept a connection: the process is out of file descriptors,
/// most likely, which the cap on handshakes makes less likely but cannot rule out.
#[derive(Debug)]
struct NotAccepted(std::io::Error);

impl Logged for NotAccepted {
    type Counts = u64;

    fn count(&self, counts: &mut u64) {
        *counts += 1;
    }

    fn log(&self) {
        tracing::warn!(error = %self.0, "accepting a connection failed");
    }

    fn log_counts(failed: u64, every: Duration) {
        tracing::warn!(
            failed,
            interval = ?every,
            "accepting connections failed since the last such line"
        );
    }
}

/// Failures of one kind as few log lines: the first after a quiet `every` with its details,
/// the rest of that interval as counts in one line when it is over. A host that opens connections by the thousand, or a listener retried every 50 ms,
/// otherwise writes a line for each.
struct FailureLog<F: Logged> {
    every: Duration,
    /// Until when failures are only counted; after it the next one is logged as it comes.
    quiet_until: Option<Instant>,
    folded: F::Counts,
    kind: PhantomData<F>,
}

impl<F: Logged> FailureLog<F> {
    fn new(every: Duration) -> Self {
        Self {
            every,
            quiet_until: None,
            folded: F::Counts::default(),
            kind: PhantomData,
        }
    }

    fn is_folding(&self) -> bool {
        self.folded != F::Counts::default()
    }

    fn record(&mut self, now: Instant, failure: F) {
        match self.quiet_until {
            Some(until) if now < until => failure.count(&mut self.folded),
            // The interval's counts are overdue (other work came first): one line for both.
            _ if self.is_folding() => {
                failure.count(&mut self.folded);
                self.summarise(now);
            }
            _ => {
                failure.log();
                self.quiet_until = Some(now + self.every);
            }
        }
    }

    /// When the counts are to be logged, if there are any.
    fn summary_due(&self) -> Option<Instant> {
        self.quiet_until.filter(|_| self.is_folding())
    }

    /// Logs the counts, and counts the failures of another `every` before the next line, so
    /// that a steady flood makes one line per interval.
    fn summarise(&mut self, now: Instant) {
        F::log_counts(std::mem::take(&mut self.folded), self.every);
        self.quiet_until = Some(now + self.every);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    use super::*;
    use crate::pki::DevPki;

    /// Long enough that nothing in a test reaches it.
    const NEVER: Duration = Duration::from_secs(3600);

    /// How long a test waits for what must happen before it fails instead of hanging.
    const GUARD: Duration = Duration::from_secs(20);

    /// Serves health checking with the registry's certificate on a port of 127.0.0.1 until
    /// the test ends; its port and the health reporter, which must live as long.
    async fn serving(
        pki: &DevPki,
        limits: HandshakeLimits,
    ) -> (u16, tonic_health::server::HealthReporter) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (port, serving_on(pki, listener, limits))
    }

    /// [`serving`] on `listener`; the health reporter.
    fn serving_on(
        pki: &DevPki,
        listener: impl Listener,
        limits: HandshakeLimits,
    ) -> tonic_health::server::HealthReporter {
        let tls = LiveTls::load(&pki.files("registry")).unwrap();
        let (reporter, health) = tonic_health::server::health_reporter();
        let router = plain_builder(Duration::from_secs(5)).add_service(health);
        let incoming = TlsIncoming::start(listener, tls, limits);
        tokio::spawn(serve_incoming(
            router,
            incoming,
            std::future::pending(),
            DRAIN_GRACE,
        ));
        reporter
    }

    /// Fails unless a partner's health check on `port` is answered SERVING.
    async fn assert_served(pki: &DevPki, port: u16) {
        let tls = pki.files("operator").client_config().unwrap();
        let channel =
            crate::tls::channel(&format!("https://localhost:{port}"), None, &tls).unwrap();
        let answer = tokio::time::timeout(
            GUARD,
            HealthClient::new(channel).check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .expect("the partner is served")
        .expect("the health check answers");
        assert_eq!(
            answer.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    /// Whether the server closed `tcp` (it sends nothing back to a client that sent nothing).
    async fn closed_by_server(tcp: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(GUARD, tcp.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Whether `tcp` is still open: a read finds nothing to read for a moment. A connection
    /// ended when the others were is closed by then, as those were closed before.
    async fn still_open(tcp: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf))
            .await
            .is_err()
    }

    /// More silent connections than the cap: the oldest are ended at once rather than held
    /// for the handshake timeout, as many as needed to make room and no more, and a partner
    /// that comes after them all is served.
    #[tokio::test]
    async fn silent_connections_beyond_the_cap_end_the_oldest_and_a_partner_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let cap = 4;
        let limits = HandshakeLimits {
            in_progress: cap,
            timeout: NEVER,
            log_every: NEVER,
            ..HandshakeLimits::DEFAULT
        };
        let (port, _reporter) = serving(&pki, limits).await;
        let beyond = 6;
        let mut silent = Vec::new();
        for _ in 0..cap + beyond {
            silent.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }

        assert_served(&pki, port).await;
        // The partner's connection took a place too, so one more silent one went for it.
        let (ended, kept) = silent.split_at_mut(beyond + 1);
        for (i, tcp) in ended.iter_mut().enumerate() {
            assert!(
                closed_by_server(tcp).await,
                "silent connection {i} of {} is closed for a newer one",
                cap + beyond
            );
        }
        for (i, tcp) in kept.iter_mut().enumerate() {
            assert!(
                still_open(tcp).await,
                "silent connection {} of {}, among the newest {} (the cap less the partner's \
                 place), is still open",
                beyond + 1 + i,
                cap + beyond,
                cap - 1
            );
        }
    }

    /// A TLS connection to `port` with the certificate of `who`, its handshake done.
    async fn tls_connection(
        pki: &DevPki,
        who: &str,
        port: u16,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let config = pki.files(who).client_config().unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(GUARD, connector.connect(name, tcp))
            .await
            .expect("the handshake ends")
            .expect("the handshake succeeds")
    }

    /// The HTTP/2 client preface followed by an empty SETTINGS frame: what a client sends
    /// before anything else.
    const PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

    /// A connection of `who` that sent the preface and its settings, if the server serves it
    /// (tonic answers with frames of its own); `None` when the server closes it instead.
    async fn h2_connection(
        pki: &DevPki,
        who: &str,
        port: u16,
    ) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut tls = tls_connection(pki, who, port).await;
        // A refused connection may be closed before this is written; the read tells.
        let _ = tls.write_all(PREFACE_AND_SETTINGS).await;
        let _ = tls.flush().await;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(GUARD, tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Some(tls),
            Ok(_) => None,
            Err(_) => panic!("the server neither answers nor closes a connection of {who}"),
        }
    }

    /// A client that completes its TLS handshake and then sends no HTTP/2 preface, or only
    /// part of it, is closed once the deadline for the preface passes, while partners are
    /// served.
    #[tokio::test]
    async fn a_connection_without_the_http2_preface_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let limits = HandshakeLimits {
            preface_timeout: Duration::from_secs(1),
            ..HandshakeLimits::DEFAULT
        };
        let (port, _reporter) = serving(&pki, limits).await;
        let mut silent = tls_connection(&pki, "operator", port).await;
        let mut partial = tls_connection(&pki, "operator", port).await;
        partial
            .write_all(&PREFACE_AND_SETTINGS[..10])
            .await
            .unwrap();
        partial.flush().await.unwrap();
        assert_served(&pki, port).await;
        assert!(
            closed_by_server(&mut silent).await,
            "a connection that sent nothing after its handshake is closed"
        );
        assert!(
            closed_by_server(&mut partial).await,
            "a connection that sent part of the preface is closed"
        );
        assert_served(&pki, port).await;
    }

    /// Connections beyond the cap of an identity are refused without shutting out another
    /// identity, connections beyond the cap in all are refused too, each refusal is logged at
    /// warn naming the identity, and a place given back serves a fresh client.
    #[tokio::test]
    async fn connections_beyond_the_caps_are_refused_until_others_close() {
        let captured = Captured::default();
        let _logging = captured.start();
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let limits = HandshakeLimits {
            connections: 3,
            per_identity: 2,
            // Every refusal its own line, so that both caps' lines can be read.
            log_every: Duration::ZERO,
            ..HandshakeLimits::DEFAULT
        };
        let (port, _reporter) = serving(&pki, limits).await;
        let operator = pki.files("operator").own_identity().unwrap();
        let processor = pki.files("processor").own_identity().unwrap();

        let first = h2_connection(&pki, "operator", port).await;
        let second = h2_connection(&pki, "operator", port).await;
        assert!(
            first.is_some() && second.is_some(),
            "the operator's first two are served"
        );
        assert!(
            h2_connection(&pki, "operator", port).await.is_none(),
            "the operator's third is refused"
        );
        let third = h2_connection(&pki, "processor", port).await;
        assert!(third.is_some(), "another identity is served besides");
        assert!(
            h2_connection(&pki, "processor", port).await.is_none(),
            "a fourth connection in all is refused"
        );
        let lines = captured
            .wait_for("connection refused", |l| l.len() >= 2)
            .await;
        assert!(
            lines[0].contains("WARN")
                && lines[0].contains("identity already holds")
                && lines[0].contains(&operator),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("WARN")
                && lines[1].contains("listener already serves")
                && lines[1].contains(&processor),
            "{lines:#?}"
        );

        drop(first);
        // The place is given back once the server has seen the connection close.
        tokio::time::timeout(GUARD, async {
            loop {
                let tls = pki.files("processor").client_config().unwrap();
                let channel =
                    crate::tls::channel(&format!("https://localhost:{port}"), None, &tls).unwrap();
                let check = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if check.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a fresh client is served once a connection closed");
    }

    /// Refusals at the caps within one interval are one line with the first's identity and
    /// one with the counts of the others by identity, the most refused first.
    #[test]
    fn refusals_are_counted_by_identity() {
        let captured = Captured::default();
        let _logging = captured.start();
        let every = Duration::from_secs(10);
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let refusal = |identity: &str| OverCap {
            peer,
            identity: identity.to_string(),
            cap: Cap::PerIdentity(2),
        };
        let mut log = FailureLog::<OverCap>::new(every);
        let t0 = Instant::now();
        for identity in [
            "spiffe://a",
            "spiffe://b",
            "spiffe://b",
            "spiffe://a",
            "spiffe://b",
        ] {
            log.record(t0, refusal(identity));
        }
        log.summarise(t0 + every);
        let lines = captured.lines("refused");
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[0].contains("identity=\"spiffe://a\""), "{lines:#?}");
        assert_eq!(field(&lines[1], "refused"), 4, "{lines:#?}");
        assert!(
            lines[1].contains("spiffe://b: 3, spiffe://a: 1"),
            "{lines:#?}"
        );
    }

    /// What the test's log lines say, as they were written.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// Captures the lines logged on this thread until the guard is dropped: the tests'
        /// runtimes have one thread, which the server's tasks run on too.
        fn start(&self) -> tracing::subscriber::DefaultGuard {
            let writer = self.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_default(subscriber)
        }

        /// The lines that contain `about`.
        fn lines(&self, about: &str) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines()
                .filter(|l| l.contains(about))
                .map(str::to_string)
                .collect()
        }

        /// Waits until `enough` holds of the lines that contain `about`, and returns them.
        async fn wait_for(&self, about: &str, enough: impl Fn(&[String]) -> bool) -> Vec<String> {
            tokio::time::timeout(GUARD, async {
                loop {
                    let lines = self.lines(about);
                    if enough(&lines) {
                        return lines;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("awaited lines about {about:?}: {:#?}", self.lines("")))
        }
    }

    /// The number a line gives as `name=N`, or 0 without one.
    fn field(line: &str, name: &str) -> u64 {
        let prefix = format!("{name}=");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or(0)
    }

    /// How many of `lines` are about one failure each (those with `one` in them), and the
    /// sum of the counts `name` of the others.
    fn accounted(lines: &[String], one: &str, name: &str) -> (usize, u64) {
        let single = lines.iter().filter(|l| l.contains(one)).count();
        let counted = lines
            .iter()
            .filter(|l| !l.contains(one))
            .map(|l| field(l, name))
            .sum();
        (single, counted)
    }

    /// Refused handshakes in quick succession are not one line each: the first is logged
    /// with its peer and error, the others counted into a line once the interval is over.
    /// Every refusal is in exactly one line, however the refusals fall into intervals.
    #[tokio::test]
    async fn refused_handshakes_are_logged_once_per_interval_with_a_count() {
        let captured = Captured::default();
        let _logging = captured.start();
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let limits = HandshakeLimits {
            in_progress: MAX_HANDSHAKES,
            timeout: NEVER,
            log_every: Duration::from_millis(500),
            ..HandshakeLimits::DEFAULT
        };
        let (port, _reporter) = serving(&pki, limits).await;
        let refusals = 20;
        for _ in 0..refusals {
            let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            // The server closes the connection once it refused the handshake.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(GUARD, tcp.read_to_end(&mut rest))
                .await
                .expect("the server closes a connection it refused");
        }
        let one = "tls handshake refused";
        let lines = captured
            .wait_for("tls handshake", |lines| {
                let (single, counted) = accounted(lines, one, "refused");
                single as u64 + counted >= refusals
            })
            .await;
        let (single, counted) = accounted(&lines, one, "refused");
        assert_eq!(single as u64 + counted, refusals, "{lines:#?}");
        // One by one, each would be a line; most must have been counted.
        assert!(single * 2 < refusals as usize, "{lines:#?}");
        assert!(lines[0].contains(one), "{lines:#?}");
        assert!(lines[0].contains("peer=127.0.0.1:"), "{lines:#?}");
        assert!(
            lines[1..]
                .iter()
                .all(|l| l.contains(one) || l.contains("timed_out=0 dropped=0")),
            "{lines:#?}"
        );
    }

    /// The shape of [`FailureLog`]'s lines, on a clock of its own: failures within one
    /// interval make two lines, the first and the count of the rest; a steady flood makes
    /// one line per interval; after a quiet interval the next failure is logged as it comes.
    #[test]
    fn failures_make_one_line_per_interval() {
        let captured = Captured::default();
        let _logging = captured.start();
        let every = Duration::from_secs(10);
        let ms = Duration::from_millis;
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let refused = || Failure::Refused(peer, std::io::Error::other("not tls"), None);
        let lines = || captured.lines("tls handshake");
        let mut log = FailureLog::<Failure>::new(every);
        let t0 = Instant::now();

        for i in 0..20 {
            log.record(t0 + ms(10 * i), refused());
        }
        assert_eq!(lines().len(), 1, "{:#?}", lines());
        assert!(lines()[0].contains("tls handshake refused peer=192.0.2.1:4000"));
        assert_eq!(log.summary_due(), Some(t0 + every));
        log.summarise(t0 + every);
        assert_eq!(lines().len(), 2, "{:#?}", lines());
        assert_eq!(field(&lines()[1], "refused"), 19, "{:#?}", lines());

        // One every 100 ms for 30 s: an interval's count comes with the first failure after
        // it when that comes before the timer, or with the timer.
        let flood = t0 + every;
        for i in 1..300 {
            log.record(flood + ms(100 * i), refused());
        }
        assert_eq!(lines().len(), 4, "{:#?}", lines());
        assert_eq!(field(&lines()[2], "refused"), 100, "{:#?}", lines());
        assert_eq!(field(&lines()[3], "refused"), 100, "{:#?}", lines());
        assert_eq!(log.summary_due(), Some(flood + every * 3));
        log.summarise(flood + every * 3);
        assert_eq!(lines().len(), 5, "{:#?}", lines());
        assert_eq!(field(&lines()[4], "refused"), 99, "{:#?}", lines());

        assert_eq!(log.summary_due(), None);
        log.record(flood + every * 5, refused());
        assert_eq!(lines().len(), 6, "{:#?}", lines());
        assert!(
            lines()[5].contains("tls handshake refused"),
            "{:#?}",
            lines()
        );
    }

    /// A listener that fails as one in a process out of file descriptors does while
    /// `failing` is set, counting its failures in `failed`.
    struct Exhausted {
        real: TcpListener,
        failing: Arc<AtomicBool>,
        failed: Arc<AtomicU64>,
    }

    impl Listener for Exhausted {
        async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
            if self.failing.load(Ordering::SeqCst) {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
            }
            self.real.accept().await
        }
    }

    /// A listener that keeps failing (retried every 50 ms) is logged once per interval, the
    /// first failure with its error and the others counted, and connections are served
    /// again once it accepts them.
    #[tokio::test]
    async fn failed_accepts_are_logged_once_per_interval_with_a_count() {
        let captured = Captured::default();
        let _logging = captured.start();
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let real = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = real.local_addr().unwrap().port();
        let failing = Arc::new(AtomicBool::new(true));
        let failed = Arc::new(AtomicU64::new(0));
        let listener = Exhausted {
            real,
            failing: failing.clone(),
            failed: failed.clone(),
        };
        let limits = HandshakeLimits {
            in_progress: MAX_HANDSHAKES,
            timeout: NEVER,
            log_every: Duration::from_millis(500),
            ..HandshakeLimits::DEFAULT
        };
        let _reporter = serving_on(&pki, listener, limits);
        tokio::time::timeout(GUARD, async {
            while failed.load(Ordering::SeqCst) < 10 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the listener is retried");
        failing.store(false, Ordering::SeqCst);
        let failed = failed.load(Ordering::SeqCst);

        let one = "accepting a connection failed";
        let lines = captured
            .wait_for("accepting", |lines| {
                let (single, counted) = accounted(lines, one, "failed");
                single as u64 + counted >= failed
            })
            .await;
        let (single, counted) = accounted(&lines, one, "failed");
        assert_eq!(single as u64 + counted, failed, "{lines:#?}");
        // One by one, each would be a line; most must have been counted.
        assert!(single as u64 * 2 < failed, "{lines:#?}");
        assert!(lines[0].contains(one), "{lines:#?}");
        assert!(lines[0].contains("WARN"), "{lines:#?}");
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE).to_string();
        assert!(lines[0].contains(&emfile), "{lines:#?}");
        assert_served(&pki, port).await;
    }
}
