//! Mutual TLS with rustls: server configuration, client channels that check the server's
//! identity, and the peer identity of a call.
//!
//! An identity is the certificate's one URI SAN (SPIFFE style, `spiffe://<trust
//! domain>/<role>/<name>`). A certificate with no URI SAN, with several, or that is a CA
//! certificate has no identity: DNS names say which host serves, not which party it is, so
//! they never stand in for one. Roles are assigned to identities in each service's
//! configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, Endpoint, Identity, ServerTlsConfig, Uri};

/// Where a party's CA, certificate and key are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA bundle (PEM) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This party's certificate chain (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Resolves relative paths against `base` (the folder of the config file).
    pub fn relative_to(mut self, base: &Path) -> Self {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        self
    }

    fn read(path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    }

    /// Server TLS that requires a client certificate chaining to `ca`.
    pub fn server_config(&self) -> Result<ServerTlsConfig> {
        let identity = Identity::from_pem(Self::read(&self.cert)?, Self::read(&self.key)?);
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(Self::read(&self.ca)?))
            .timeout(Duration::from_secs(10)))
    }

    /// A rustls client configuration presenting this party's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&Self::read(&self.ca)?) {
            roots.add(cert.context("parsing the CA bundle")?)?;
        }
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&Self::read(&self.cert)?)
                .collect::<Result<_, _>>()
                .context("parsing the certificate")?;
        let key = PrivateKeyDer::from_pem_slice(&Self::read(&self.key)?).map_err(|e| match e {
            pem::Error::NoItemsFound => anyhow!("no private key in {}", self.key.display()),
            e => anyhow!("parsing the private key {}: {e}", self.key.display()),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
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
///
/// The TLS handshake is done here rather than by tonic so that the server's identity can be
/// checked and TCP_NODELAY set on every connection.
pub fn channel(
    endpoint: &str,
    expected_identity: Option<String>,
    tls: &rustls::ClientConfig,
) -> Result<Channel> {
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
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls.clone()));
    // tonic sees plain http; the service below supplies the TLS stream.
    let plain = Endpoint::from_shared(format!("http://{host}:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let make = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
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
