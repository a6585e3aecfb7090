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
//! refused when loaded and fails every handshake once it expires while loaded, unless
//! [`TlsFiles::allow_expired_crl`] says otherwise.
//!
//! [`LiveTls`] (in [`live`]) holds the configurations a service uses now and swaps them when
//! the files change or on SIGHUP.

pub mod live;

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
    /// start (or a reload), and handshakes fail once a loaded list expires, so that a
    /// revocation published since cannot be missed.
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

/// Opens a lazily connecting channel to `endpoint` (`https://host:port`) over mutual TLS,
/// refusing a server whose certificate identity is not `expected_identity` (when given).
/// Each new connection takes the client configuration `tls` holds at that moment.
///
/// The TLS handshake is done here rather than by tonic so that the server's identity can be
/// checked and TCP_NODELAY set on every connection.
pub fn channel(
    endpoint: &str,
    expected_identity: Option<String>,
    tls: impl Into<ClientTls>,
) -> Result<Channel> {
    let tls = tls.into();
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
    // tonic sees plain http; the service below supplies the TLS stream.
    let plain = Endpoint::from_shared(format!("http://{host}:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let make = tower::service_fn(move |_: Uri| {
        let connector = tokio_rustls::TlsConnector::from(tls.current());
        let server_name = server_name.clone();
        let host = host.clone();
        let expected = expected_identity.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = connector.connect(server_name, tcp).await?;
            if let Some(expected) = expected {
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
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(plain.connect_with_connector_lazy(make))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::DevCa;

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
