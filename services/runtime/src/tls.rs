//! Mutual TLS with rustls: server and client configurations (with certificate revocation
//! lists), client channels that check the server's identity, and the peer identity of a call.
//!
//! An identity is the certificate's one URI SAN (SPIFFE style, `spiffe://<trust
//! domain>/<role>/<name>`). A certificate with no URI SAN, with several, or that is a CA
//! certificate has no identity: DNS names say which host serves, not which party it is, so
//! they never stand in for one. Roles are assigned to identities in each service's
//! configuration.
//!
//! Revocation: when [`TlsFiles::crls`] names revocation lists, both directions check the
//! peer's leaf against them (servers the client's, channels the server's); a leaf whose
//! issuer has no list among them is refused, as its status is unknown. An expired list is
//! refused when loaded and fails every handshake (and every call of a served connection)
//! once it expires while loaded, unless [`TlsFiles::allow_expired_crl`] says otherwise.
//!
//! [`LiveTls`] (in [`live`]) holds the configurations a service uses now and swaps them when
//! the files change or on SIGHUP. A served connection's client certificate is checked again
//! on every call ([`peer`]) against the lists and validity of that moment, so a certificate
//! revoked or expired while its connection is open is refused from its next call.
//! Outbound, a [`channel`] opens each new connection with the configuration of that moment,
//! and a [`ReloadingChannel`] (for clients that live as long as the service) also moves its
//! new calls to a new connection after each reload, so that a replaced certificate is
//! presented from the next call rather than when an old connection happens to break.

pub mod live;
pub mod peer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, Endpoint, Identity, ServerTlsConfig, Uri};

pub use live::LiveTls;

/// How long a peer gets to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The default of [`TlsFiles::reload_interval_ms`].
pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 5_000;

fn default_reload_interval_ms() -> u64 {
    DEFAULT_RELOAD_INTERVAL_MS
}

fn is_default_reload_interval(ms: &u64) -> bool {
    *ms == DEFAULT_RELOAD_INTERVAL_MS
}

/// Where a party's CA, certificate, key and revocation lists are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA bundle (PEM) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This party's certificate chain (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM).
    pub key: PathBuf,
    /// Certificate revocation lists (PEM, one or more per file) of the CAs in `ca`: a peer
    /// whose certificate is listed is refused. With none, nothing is checked for revocation;
    /// with some, every CA that issues peers' certificates needs its list here, since a
    /// certificate whose revocation status is unknown is refused too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crls: Vec<PathBuf>,
    /// Accept a revocation list past its next-update date. Off: an expired list fails the
    /// start (or a reload), and handshakes and the calls of served connections fail once a
    /// loaded list expires, so that a revocation published since cannot be missed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_expired_crl: bool,
    /// How often a running service looks at these files' modification times and reloads
    /// them when one changed (SIGHUP reloads at once); 0: only on SIGHUP.
    #[serde(
        default = "default_reload_interval_ms",
        skip_serializing_if = "is_default_reload_interval"
    )]
    pub reload_interval_ms: u64,
}

impl TlsFiles {
    /// The files of a party with no revocation lists, reloaded every
    /// [`DEFAULT_RELOAD_INTERVAL_MS`].
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self {
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
            crls: Vec::new(),
            allow_expired_crl: false,
            reload_interval_ms: DEFAULT_RELOAD_INTERVAL_MS,
        }
    }

    /// Resolves relative paths against `base` (the folder of the config file).
    pub fn relative_to(mut self, base: &Path) -> Self {
        for p in [&mut self.ca, &mut self.cert, &mut self.key]
            .into_iter()
            .chain(self.crls.iter_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        self
    }

    /// Every file these settings name, each with its configuration key.
    pub fn paths(&self) -> Vec<(String, &Path)> {
        let mut paths = vec![
            ("tls.ca".to_string(), self.ca.as_path()),
            ("tls.cert".to_string(), self.cert.as_path()),
            ("tls.key".to_string(), self.key.as_path()),
        ];
        for (i, crl) in self.crls.iter().enumerate() {
            paths.push((format!("tls.crls[{i}]"), crl.as_path()));
        }
        paths
    }

    fn read(path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    }

    /// tonic's server TLS requiring a client certificate chaining to `ca`, for servers that
    /// neither reload nor check revocation (tests' stand-ins, benchmarks): it refuses files
    /// that name revocation lists, which only [`LiveTls`] (what [`crate::host::Host`]
    /// serves with) honours.
    pub fn server_config(&self) -> Result<ServerTlsConfig> {
        if !self.crls.is_empty() {
            bail!("tls.crls: revocation lists are checked by the host's server only");
        }
        let identity = Identity::from_pem(Self::read(&self.cert)?, Self::read(&self.key)?);
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(Self::read(&self.ca)?))
            .timeout(HANDSHAKE_TIMEOUT))
    }

    /// A rustls client configuration presenting this party's certificate and checking the
    /// server's against the CA bundle and the revocation lists.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        self.material()?.client_config()
    }

    /// A rustls server configuration presenting this party's certificate and requiring a
    /// client certificate that chains to the CA bundle and is not revoked.
    pub fn rustls_server_config(&self) -> Result<rustls::ServerConfig> {
        self.material()?.server_config()
    }

    /// Reads and parses every file once.
    fn material(&self) -> Result<Material> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&Self::read(&self.ca)?) {
            let cert =
                cert.with_context(|| format!("parsing the CA bundle {}", self.ca.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("a CA certificate in {}", self.ca.display()))?;
        }
        if roots.is_empty() {
            bail!("no CA certificate in {}", self.ca.display());
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&Self::read(&self.cert)?)
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing the certificate {}", self.cert.display()))?;
        if chain.is_empty() {
            bail!("no certificate in {}", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_slice(&Self::read(&self.key)?).map_err(|e| match e {
            pem::Error::NoItemsFound => anyhow!("no private key in {}", self.key.display()),
            e => anyhow!("parsing the private key {}: {e}", self.key.display()),
        })?;
        let mut crls = Vec::new();
        for path in &self.crls {
            let found: Vec<CertificateRevocationListDer<'static>> =
                CertificateRevocationListDer::pem_slice_iter(&Self::read(path)?)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("parsing the revocation list {}", path.display()))?;
            if found.is_empty() {
                bail!("no revocation list in {}", path.display());
            }
            for crl in &found {
                check_crl(crl, path, self.allow_expired_crl, SystemTime::now())?;
            }
            crls.extend(found);
        }
        Ok(Material {
            roots: Arc::new(roots),
            chain,
            key,
            crls,
            allow_expired_crl: self.allow_expired_crl,
        })
    }

    /// This party's own identity, read from its certificate.
    pub fn own_identity(&self) -> Result<String> {
        let pem = Self::read(&self.cert)?;
        let der = CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| anyhow!("no certificate in {}", self.cert.display()))??;
        checked_identity(&der).map_err(|why| anyhow!("{}: {why}", self.cert.display()))
    }
}

/// Refuses a revocation list that cannot be read or, unless `allow_expired`, whose next
/// update is before `now`: such a list may be missing revocations made since.
fn check_crl(
    crl: &CertificateRevocationListDer<'_>,
    path: &Path,
    allow_expired: bool,
    now: SystemTime,
) -> Result<()> {
    let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
        .map_err(|e| anyhow!("reading the revocation list {}: {e}", path.display()))?;
    if allow_expired {
        return Ok(());
    }
    let Some(next) = parsed.next_update() else {
        return Ok(());
    };
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if next.timestamp() < now {
        bail!(
            "the revocation list {} expired at {next}: publish a new one (dsrctl pki revoke) \
             or set tls.allow_expired_crl",
            path.display()
        );
    }
    Ok(())
}

/// The contents of a party's TLS files, parsed.
struct Material {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    allow_expired_crl: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    /// The revocations of the lists, for the check of every call ([`peer`]).
    fn revocations(&self) -> Result<peer::Revocations> {
        peer::Revocations::from_lists(&self.crls, self.allow_expired_crl)
    }

    fn server_config(&self) -> Result<rustls::ServerConfig> {
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        if !self.crls.is_empty() {
            // Only leaves: the development PKI and most private ones issue from the root, and
            // a CA's own revocation is the business of whoever publishes the bundle.
            verifier = verifier
                .with_crls(self.crls.iter().cloned())
                .only_check_end_entity_revocation();
            if !self.allow_expired_crl {
                verifier = verifier.enforce_revocation_expiration();
            }
        }
        let verifier = verifier
            .build()
            .context("building the client certificate verifier")?;
        let verifier = Arc::new(peer::NotingVerifier(verifier));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the certificate and the private key do not belong together")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut verifier =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider());
        if !self.crls.is_empty() {
            verifier = verifier
                .with_crls(self.crls.iter().cloned())
                .only_check_end_entity_revocation();
            if !self.allow_expired_crl {
                verifier = verifier.enforce_revocation_expiration();
            }
        }
        let verifier = verifier
            .build()
            .context("building the server certificate verifier")?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("the certificate and the private key do not belong together")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The client configuration a channel opens its connections with: fixed, or a service's
/// [`LiveTls`], read again for every new connection so that reloaded files take effect
/// without new channels.
#[derive(Clone)]
pub enum ClientTls {
    /// The same configuration for every connection.
    Fixed(Arc<rustls::ClientConfig>),
    /// Whatever the service's files held when it last loaded them.
    Live(LiveTls),
}

impl ClientTls {
    fn current(&self) -> Arc<rustls::ClientConfig> {
        match self {
            Self::Fixed(c) => c.clone(),
            Self::Live(l) => l.client_config(),
        }
    }

    /// Changes when [`Self::current`] does ([`LiveTls::generation`]); a fixed one never.
    fn generation(&self) -> u64 {
        match self {
            Self::Fixed(_) => 0,
            Self::Live(l) => l.generation(),
        }
    }
}

impl From<&rustls::ClientConfig> for ClientTls {
    fn from(config: &rustls::ClientConfig) -> Self {
        Self::Fixed(Arc::new(config.clone()))
    }
}

impl From<&LiveTls> for ClientTls {
    fn from(live: &LiveTls) -> Self {
        Self::Live(live.clone())
    }
}

impl From<&ClientTls> for ClientTls {
    fn from(tls: &ClientTls) -> Self {
        tls.clone()
    }
}

/// The identity of a certificate (see the module documentation), if it has one.
pub fn identity_of(der: &[u8]) -> Option<String> {
    checked_identity(der).ok()
}

/// The identity of a certificate, or why it has none (for error messages).
pub fn checked_identity(der: &[u8]) -> Result<String, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate cannot be read: {e}"))?;
    if cert.is_ca() {
        return Err("the certificate is a CA certificate, not a party's".into());
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the certificate's subject alternative names cannot be read: {e}"))?
        .ok_or("the certificate has no subject alternative name")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok((*one).to_string()),
        [] => Err("the certificate has no URI SAN (a DNS name is not an identity)".into()),
        many => Err(format!(
            "the certificate has {} URI SANs, and an identity must be exactly one",
            many.len()
        )),
    }
}

/// The verified identity of the caller of a gRPC request, or why it has none.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<String, String> {
    let certs = request
        .peer_certs()
        .ok_or("no client certificate was presented")?;
    let leaf = certs.first().ok_or("no client certificate was presented")?;
    checked_identity(leaf.as_ref())
}

/// How long a channel's connection attempt (TCP connect and TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How soon after a connection attempt ends a call must take its outcome for it to count;
/// a later call throws it away and connects afresh (see [`connect`]). Generous next to the
/// moment a waiting call takes to be woken, short next to the spacing of retries.
const STALE_AFTER: Duration = Duration::from_secs(1);

/// Opens a lazily connecting channel to `endpoint` (`https://host:port`) over mutual TLS,
/// refusing a server whose certificate identity is not `expected_identity` (when given).
/// Each new connection takes the client configuration `tls` holds at that moment, and each
/// attempt to open one gets [`CONNECT_TIMEOUT`].
///
/// The TLS handshake is done here rather than by tonic so that the server's identity can be
/// checked and TCP_NODELAY set on every connection.
pub fn channel(
    endpoint: &str,
    expected_identity: Option<String>,
    tls: impl Into<ClientTls>,
) -> Result<Channel> {
    channel_timing_out(endpoint, expected_identity, tls, CONNECT_TIMEOUT)
}

/// [`channel`] whose connection attempts time out after `connect_timeout`.
fn channel_timing_out(
    endpoint: &str,
    expected_identity: Option<String>,
    tls: impl Into<ClientTls>,
    connect_timeout: Duration,
) -> Result<Channel> {
    let (plain, target) = prepare(endpoint, expected_identity, tls.into(), connect_timeout)?;
    Ok(lazy(&plain, &target))
}

/// Checks `endpoint` and gathers what each of its connections is opened with.
fn prepare(
    endpoint: &str,
    expected_identity: Option<String>,
    tls: ClientTls,
    connect_timeout: Duration,
) -> Result<(Endpoint, Arc<Target>)> {
    let uri: Uri = endpoint
        .parse()
        .with_context(|| format!("endpoint {endpoint:?} is not a URI"))?;
    if uri.scheme_str() != Some("https") {
        bail!("endpoint {endpoint:?} must start with https://");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("endpoint {endpoint:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("endpoint host {host:?} is not a valid server name"))?;
    // An IPv6 literal keeps its brackets in the URI, which would read its colons as a port's.
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    // tonic sees plain http; the service below supplies the TLS stream. No connect timeout
    // of tonic's: its deadline would run from when the attempt was made, not from when a
    // call waits for it (see `connect`), so the attempts time themselves.
    let plain = Endpoint::from_shared(format!("http://{authority}"))
        .with_context(|| format!("endpoint {endpoint:?} is not a valid address"))?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let target = Arc::new(Target {
        host,
        port,
        server_name,
        expected_identity,
        tls,
        timeout: connect_timeout,
    });
    Ok((plain, target))
}

/// A lazily connecting channel whose connections are opened by `target`.
fn lazy(plain: &Endpoint, target: &Arc<Target>) -> Channel {
    let target = target.clone();
    let make = tower::service_fn(move |_: Uri| connect(target.clone()));
    plain.connect_with_connector_lazy(make)
}

/// Opens a [`ReloadingChannel`]: a [`channel`] for clients that live as long as the
/// service, whose new calls move to a new connection once `tls` was reloaded.
pub fn reloading_channel(
    endpoint: &str,
    expected_identity: Option<String>,
    tls: impl Into<ClientTls>,
) -> Result<ReloadingChannel> {
    let tls = tls.into();
    let generation = tls.generation();
    let (plain, target) = prepare(endpoint, expected_identity, tls, CONNECT_TIMEOUT)?;
    let current = lazy(&plain, &target);
    Ok(ReloadingChannel {
        shared: Arc::new(Reconnecting {
            latest: std::sync::Mutex::new((generation, current)),
            plain,
            target,
        }),
        current: None,
    })
}

/// A [`channel`] that follows reloads of its [`ClientTls`].
///
/// A [`Channel`] keeps the HTTP/2 connection it opened for as long as the server keeps it,
/// so a certificate loaded later would reach the server only once that connection broke;
/// a server that refuses the old certificate's calls (revoked, or about to expire) but keeps
/// the connection would refuse every call until the service restarts. The clones share one
/// newest channel and the configuration generation it was made under
/// ([`LiveTls::generation`]; a fixed configuration never changes). A clone holds no channel
/// of its own until it is readied for a call: then it takes the newest one (a short lock),
/// made anew first when the configuration moved on, and keeps it while the generation holds
/// (one atomic load a call). So the services' stored clients, cloned for each call, never pin
/// an old channel: calls already under way on one run to their end, and its connection
/// closes when the last of them is done.
pub struct ReloadingChannel {
    shared: Arc<Reconnecting>,
    /// The channel this clone's calls go over and the generation it was made under; `None`
    /// until the clone is first readied.
    current: Option<(u64, Channel)>,
}

impl Clone for ReloadingChannel {
    /// A clone starts without a channel, so that a client kept for the life of the service
    /// and cloned for each call holds none that a reload has replaced.
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            current: None,
        }
    }
}

/// What the clones of a [`ReloadingChannel`] share.
struct Reconnecting {
    plain: Endpoint,
    target: Arc<Target>,
    /// The newest channel and the generation it was made under.
    latest: std::sync::Mutex<(u64, Channel)>,
}

impl Reconnecting {
    /// The channel for configuration `generation` (or a newer one), made if still missing.
    fn channel_for(&self, generation: u64) -> (u64, Channel) {
        // A panic while holding the lock leaves a whole (generation, channel) pair behind.
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if latest.0 < generation {
            tracing::info!(
                host = %self.target.host,
                port = self.target.port,
                "the tls configuration was reloaded; new calls go over a new connection"
            );
            *latest = (generation, lazy(&self.plain, &self.target));
        }
        latest.clone()
    }
}

impl std::fmt::Debug for ReloadingChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingChannel")
            .field("host", &self.shared.target.host)
            .field("port", &self.shared.target.port)
            .field("generation", &self.current.as_ref().map(|(g, _)| *g))
            .finish_non_exhaustive()
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for ReloadingChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Checked here rather than in `call` so that the channel a call goes to is the one
        // that said it was ready for it.
        let now = self.shared.target.tls.generation();
        let channel = match &mut self.current {
            Some((generation, channel)) if *generation == now => channel,
            current => &mut current.insert(self.shared.channel_for(now)).1,
        };
        tower::Service::poll_ready(channel, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // tower's contract has `call` follow a `poll_ready` that answered ready, which chose
        // the channel (tonic's clients keep it); without one, the newest channel is taken,
        // and its own `call` holds the caller to that contract.
        let (_, channel) = self
            .current
            .get_or_insert_with(|| self.shared.channel_for(self.shared.target.tls.generation()));
        tower::Service::call(channel, request)
    }
}

/// Where a channel's connections go and how they are opened.
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    expected_identity: Option<String>,
    tls: ClientTls,
    timeout: Duration,
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A connection for tonic's channel.
///
/// The channel drives a connection attempt only while a call waits for it. A call given up
/// meanwhile (its caller timed out, or a sibling call's failure ended what both were for)
/// leaves the attempt there unpolled, and the channel hands it to its next call however
/// much later that comes: its timeout had run out long before, or it holds a refusal from
/// when the server was down, or a connection the server has given up on; and calls made
/// together (the uploader's, a file each) would leave an attempt behind at every retry.
/// So each attempt runs in a task of its own to its end, and an outcome that nobody took
/// within [`STALE_AFTER`] of it is thrown away for a new attempt, which this call waits for.
async fn connect(target: Arc<Target>) -> std::io::Result<TokioIo<TlsStream>> {
    loop {
        let attempt = Attempt(tokio::spawn({
            let target = target.clone();
            async move {
                let outcome = match tokio::time::timeout(target.timeout, target.open()).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "connecting to {}:{} took over {:?}",
                            target.host, target.port, target.timeout
                        ),
                    )),
                };
                (outcome, tokio::time::Instant::now())
            }
        }));
        let (outcome, ended) = attempt.await.map_err(std::io::Error::other)?;
        if ended.elapsed() <= STALE_AFTER {
            return outcome.map(TokioIo::new);
        }
        tracing::debug!(
            host = %target.host,
            port = target.port,
            outcome = match &outcome {
                Ok(_) => "connected".to_string(),
                Err(e) => e.to_string(),
            },
            "a connection attempt no call waited for is dropped for a new one"
        );
    }
}

/// A connection attempt's task, ended when the channel drops the attempt.
struct Attempt(tokio::task::JoinHandle<(std::io::Result<TlsStream>, tokio::time::Instant)>);

impl Drop for Attempt {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::future::Future for Attempt {
    type Output =
        Result<(std::io::Result<TlsStream>, tokio::time::Instant), tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl Target {
    /// One TCP connection and TLS handshake, with the server's identity checked.
    async fn open(&self) -> std::io::Result<TlsStream> {
        let connector = tokio_rustls::TlsConnector::from(self.tls.current());
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let stream = connector.connect(self.server_name.clone(), tcp).await?;
        if let Some(expected) = &self.expected_identity {
            let (_, conn) = stream.get_ref();
            let actual = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| identity_of(c.as_ref()));
            if actual.as_deref() != Some(expected.as_str()) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "server identity {} is not the expected {expected}",
                        actual.as_deref().unwrap_or("(none)")
                    ),
                ));
            }
        }
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{DevCa, DevPki};

    const DAY: Duration = Duration::from_secs(86_400);

    /// Runs a handshake between the two configurations in memory; the server's verdict on
    /// the client's certificate or the client's on the server's.
    fn handshake(
        server: rustls::ServerConfig,
        client: rustls::ClientConfig,
    ) -> Result<(), rustls::Error> {
        let mut server = rustls::ServerConnection::new(Arc::new(server))?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client), name)?;
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn revoked_and_unlisted_leaves_are_refused_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        pki.revoke(&[pki.cert("partner-crm")], 30 * DAY).unwrap();
        let mut registry = pki.files("registry");
        registry.crls = vec![pki.crl()];
        let server = || registry.rustls_server_config().unwrap();
        let client = |stem: &str| pki.files(stem).client_config().unwrap();

        handshake(server(), client("partner-webform")).expect("webform is not revoked");
        let err = handshake(server(), client("partner-crm")).unwrap_err();
        assert!(err.to_string().contains("Revoked"), "{err}");

        // A client with the list refuses a server whose certificate is on it.
        let mut crm_as_server = pki.files("partner-crm");
        crm_as_server.crls = vec![pki.crl()];
        let err = handshake(
            pki.files("partner-crm").rustls_server_config().unwrap(),
            crm_as_server.client_config().unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("Revoked"), "{err}");

        // A leaf from a CA in the bundle that has no list here: its status is unknown.
        let other = DevCa::generate("another CA").unwrap();
        let leaf = other
            .issue("other", "spiffe://dsrelay.dev/partner/other")
            .unwrap();
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(
            &bundle,
            std::fs::read_to_string(pki.ca()).unwrap() + &other.cert_pem(),
        )
        .unwrap();
        std::fs::write(dir.path().join("other.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("other.key"), &leaf.key_pem).unwrap();
        let mut with_bundle = registry.clone();
        with_bundle.ca = bundle.clone();
        let from_other = TlsFiles::new(
            &bundle,
            dir.path().join("other.pem"),
            dir.path().join("other.key"),
        );
        let err = handshake(
            with_bundle.rustls_server_config().unwrap(),
            from_other.client_config().unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("UnknownRevocationStatus"), "{err}");
        // Without lists the same leaf is served: the refusal was the list's doing.
        let mut without = with_bundle.clone();
        without.crls.clear();
        handshake(
            without.rustls_server_config().unwrap(),
            from_other.client_config().unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn an_expired_list_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let ca = DevCa::load(
            &std::fs::read_to_string(pki.ca()).unwrap(),
            &std::fs::read_to_string(dir.path().join("ca.key")).unwrap(),
        )
        .unwrap();
        let now = SystemTime::now();
        let stale = ca.revocation_list(&[], now - 2 * DAY, now - DAY).unwrap();
        std::fs::write(pki.crl(), stale).unwrap();
        let mut files = pki.files("registry");
        files.crls = vec![pki.crl()];
        let err = files.client_config().unwrap_err();
        assert!(format!("{err:#}").contains("expired at"), "{err:#}");
        assert!(files.rustls_server_config().is_err());
        files.allow_expired_crl = true;
        handshake(
            files.rustls_server_config().unwrap(),
            pki.files("partner-crm").client_config().unwrap(),
        )
        .expect("an expired list, allowed, still works");
        // A list that expires while loaded fails the handshakes from then on.
        let soon = ca.revocation_list(&[], now - DAY, now + Duration::from_secs(2));
        std::fs::write(pki.crl(), soon.unwrap()).unwrap();
        files.allow_expired_crl = false;
        let server = files.rustls_server_config().unwrap();
        // A new client each time: one resuming its session would skip the certificate checks.
        let client = || pki.files("partner-crm").client_config().unwrap();
        handshake(server.clone(), client()).expect("the list is current");
        std::thread::sleep(Duration::from_secs(3));
        let err = handshake(server, client()).unwrap_err();
        assert!(err.to_string().contains("revocation list expired"), "{err}");
        // tonic's fixed server TLS cannot check lists, so it refuses files that name one.
        let err = files.server_config().unwrap_err();
        assert!(err.to_string().starts_with("tls.crls"), "{err}");
    }

    #[test]
    fn a_failed_reload_keeps_the_configuration_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let live = LiveTls::load(&pki.files("registry")).unwrap();
        let (server, client) = (live.server_config(), live.client_config());
        let key = std::fs::read(pki.key("registry")).unwrap();
        std::fs::write(
            pki.key("registry"),
            std::fs::read(pki.key("processor")).unwrap(),
        )
        .unwrap();
        let err = live.reload().unwrap_err();
        assert!(
            format!("{err:#}").contains("do not belong together"),
            "{err:#}"
        );
        assert!(Arc::ptr_eq(&server, &live.server_config()));
        assert!(Arc::ptr_eq(&client, &live.client_config()));
        std::fs::write(pki.key("registry"), b"not a key").unwrap();
        assert!(live.reload().is_err());
        assert!(Arc::ptr_eq(&server, &live.server_config()));
        std::fs::write(pki.key("registry"), key).unwrap();
        live.reload().unwrap();
        assert!(!Arc::ptr_eq(&server, &live.server_config()));
    }

    /// Two calls at once, as the uploader makes them (a file each): the first failure ends
    /// both, dropping the other call wherever it is.
    async fn two_checks(channel: &Channel) -> Result<(), tonic::Status> {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let check = || {
            let mut client = HealthClient::new(channel.clone());
            async move {
                client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
            }
        };
        futures::future::try_join(check(), check()).await.map(drop)
    }

    #[tokio::test]
    async fn a_channel_connects_to_a_server_that_came_up_after_a_call_was_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let port = {
            let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            free.local_addr().unwrap().port()
        };
        let connect_timeout = Duration::from_millis(300);
        let channel = channel_timing_out(
            &format!("https://localhost:{port}"),
            None,
            &pki.files("processor").client_config().unwrap(),
            connect_timeout,
        )
        .unwrap();
        // Nothing serves yet: the first call's refusal drops the second while its connection
        // attempt is under way (on this one thread the channel takes the second call up
        // before the caller sees the refusal, and resolving `localhost`, as `dev up` writes
        // endpoints, keeps the attempt waiting). The calls waiting for attempts get refusals.
        tokio::time::timeout(Duration::from_secs(20), two_checks(&channel))
            .await
            .expect("the calls end")
            .unwrap_err();
        // Time for the attempt left behind to be refused too, if anything runs it.
        tokio::time::sleep(connect_timeout).await;

        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let server = tonic::transport::Server::builder()
            .tls_config(pki.files("registry").server_config().unwrap())
            .unwrap()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        // The next calls come later than the attempt left behind could have lasted and than
        // its outcome is taken, as the uploader's retries do.
        tokio::time::sleep(STALE_AFTER + connect_timeout).await;
        let answered = tokio::time::timeout(Duration::from_secs(20), two_checks(&channel))
            .await
            .expect("the calls end");
        server.abort();
        answered.expect("the server is up and is reached");
    }

    /// A health server on 127.0.0.1 that counts the connections it accepted.
    async fn counting_server(
        pki: &DevPki,
    ) -> (
        u16,
        Arc<std::sync::atomic::AtomicUsize>,
        tonic_health::server::HealthReporter,
        tokio::task::JoinHandle<()>,
    ) {
        use futures::StreamExt;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepted.clone();
        let incoming =
            tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        let (reporter, health) = tonic_health::server::health_reporter();
        let server = tonic::transport::Server::builder()
            .tls_config(pki.files("registry").server_config().unwrap())
            .unwrap()
            .add_service(health)
            .serve_with_incoming(incoming);
        let server = tokio::spawn(async move {
            let _ = server.await;
        });
        (port, accepted, reporter, server)
    }

    async fn check(client: &mut tonic_health::pb::health_client::HealthClient<ReloadingChannel>) {
        let request = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        tokio::time::timeout(Duration::from_secs(20), client.check(request))
            .await
            .expect("the check ends")
            .expect("the server answers");
    }

    /// The next status a health Watch stream sends.
    async fn next(watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
        tokio::time::timeout(Duration::from_secs(20), watch.message())
            .await
            .expect("the stream answers")
            .expect("the stream goes on")
            .expect("the stream is open")
            .status
    }

    #[tokio::test]
    async fn a_reloading_channel_connects_anew_after_a_reload_and_not_before() {
        use std::sync::atomic::Ordering;
        use tonic_health::pb::health_client::HealthClient;
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let (port, accepted, reporter, server) = counting_server(&pki).await;
        let live = LiveTls::load(&pki.files("processor")).unwrap();
        let channel = reloading_channel(
            &format!("https://localhost:{port}"),
            Some(crate::pki::dev_identity("registry", "controller")),
            &live,
        )
        .unwrap();
        let mut first = HealthClient::new(channel.clone());
        let mut second = HealthClient::new(channel);
        check(&mut first).await;
        check(&mut second).await;
        check(&mut first).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "clones share a connection"
        );

        // A stream open on the old connection goes on after the reload.
        reporter
            .set_service_status("followed", tonic_health::ServingStatus::Serving)
            .await;
        let mut watch = first
            .watch(tonic_health::pb::HealthCheckRequest {
                service: "followed".into(),
            })
            .await
            .unwrap()
            .into_inner();
        use tonic_health::pb::health_check_response::ServingStatus;
        assert_eq!(next(&mut watch).await, ServingStatus::Serving as i32);

        // The same files again: still a reload, whose configuration new calls must use.
        live.reload().unwrap();
        check(&mut second).await;
        check(&mut first).await;
        check(&mut second).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "one new connection for both clones after the reload"
        );
        reporter
            .set_service_status("followed", tonic_health::ServingStatus::NotServing)
            .await;
        assert_eq!(next(&mut watch).await, ServingStatus::NotServing as i32);

        // A fixed configuration never moves to a new connection.
        let fixed = reloading_channel(
            &format!("https://localhost:{port}"),
            None,
            &pki.files("processor").client_config().unwrap(),
        )
        .unwrap();
        let mut fixed = HealthClient::new(fixed);
        check(&mut fixed).await;
        live.reload().unwrap();
        check(&mut fixed).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        server.abort();
    }

    /// An endpoint with an IPv6 literal, `https://[::1]:port`: the channel's URI keeps the
    /// brackets, the connection goes to ::1 and the server's certificate is checked for that
    /// address and the expected identity. It needs ::1 (the loopback of every host with
    /// IPv6, as these machines have), and fails saying so where it cannot be bound.
    #[tokio::test]
    async fn a_channel_reaches_a_server_on_an_ipv6_literal() {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
        };
        use tonic_health::pb::health_client::HealthClient;
        let identity = crate::pki::dev_identity("registry", "controller");
        // The dev leaves serve localhost and 127.0.0.1 only, so a CA and a leaf for ::1 of
        // this test's own, used by both ends.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![
            SanType::URI(identity.as_str().try_into().unwrap()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("leaf.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("leaf.key"), leaf_key.serialize_pem()).unwrap();
        let files = TlsFiles::new(
            dir.path().join("ca.pem"),
            dir.path().join("leaf.pem"),
            dir.path().join("leaf.key"),
        );

        let listener = tokio::net::TcpListener::bind("[::1]:0")
            .await
            .expect("binding [::1]: this test needs IPv6's loopback");
        let port = listener.local_addr().unwrap().port();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let server = tonic::transport::Server::builder()
            .tls_config(files.server_config().unwrap())
            .unwrap()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        let channel = channel(
            &format!("https://[::1]:{port}"),
            Some(identity),
            &files.client_config().unwrap(),
        )
        .expect("a channel to an IPv6 literal");
        let answer = tokio::time::timeout(
            Duration::from_secs(20),
            HealthClient::new(channel).check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .expect("the check ends");
        server.abort();
        answer.expect("the server on ::1 answers");
    }

    #[test]
    fn relative_paths_include_the_lists() {
        let mut files = TlsFiles::new("ca.pem", "/abs/c.pem", "c.key");
        files.crls = vec!["crl.pem".into()];
        let files = files.relative_to(Path::new("/etc/dsrelay"));
        assert_eq!(files.ca, Path::new("/etc/dsrelay/ca.pem"));
        assert_eq!(files.cert, Path::new("/abs/c.pem"));
        assert_eq!(files.crls, [Path::new("/etc/dsrelay/crl.pem")]);
        let keys: Vec<String> = files.paths().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["tls.ca", "tls.cert", "tls.key", "tls.crls[0]"]);
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn an_identity_is_exactly_one_uri_san_of_a_leaf() {
        let ca = DevCa::generate("test CA").unwrap();
        let one = ca.issue("one", "spiffe://dsrelay.dev/partner/crm").unwrap();
        assert_eq!(
            checked_identity(&der(&one.cert_pem)).as_deref(),
            Ok("spiffe://dsrelay.dev/partner/crm")
        );
        let dns_only = ca
            .issue_with_uris("dns", &[], &["crm.example.fi".into()])
            .unwrap();
        let why = checked_identity(&der(&dns_only.cert_pem)).unwrap_err();
        assert!(why.contains("no URI SAN"), "{why}");
        let two = ca
            .issue_with_uris(
                "two",
                &[
                    "spiffe://dsrelay.dev/partner/crm",
                    "spiffe://dsrelay.dev/operator/ops",
                ],
                &[],
            )
            .unwrap();
        let why = checked_identity(&der(&two.cert_pem)).unwrap_err();
        assert!(why.contains("2 URI SANs"), "{why}");
        let why = checked_identity(&der(&ca.cert_pem())).unwrap_err();
        assert!(why.contains("CA certificate"), "{why}");
        assert!(checked_identity(b"not a certificate").is_err());
    }
}
