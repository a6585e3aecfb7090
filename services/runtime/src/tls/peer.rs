//! The client certificate of a served connection, checked on every call against the
//! revocation lists and the clock of that moment, not only at the handshake: a connection
//! outlives both (HTTP/2 keepalive holds it open for as long as the client likes), so a
//! certificate revoked or expired since would otherwise keep its access.
//!
//! [`Revocations`] is built once per load of the TLS files ([`super::LiveTls`]) from the same
//! lists the handshake verifier gets; [`PeerCertificate`] is parsed once per connection. A
//! call's check is then a clock comparison and a hash lookup of the serial.
//!
//! `noting_refused_certificate` names the certificate a handshake was refused for, which
//! rustls does not hand back with its error, so that the refusal's log line can say whose
//! it was.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::{anyhow, Result};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};

/// The serials revoked by each issuer, as the loaded revocation lists say.
#[derive(Debug, Default)]
pub struct Revocations {
    /// By the issuer's distinguished name (DER), as a leaf names its issuer.
    by_issuer: HashMap<Vec<u8>, Listed>,
    /// Whether any list was loaded: without one nothing is checked for revocation, with
    /// some a leaf of an issuer without a list is refused, as the handshake refuses it.
    checked: bool,
    /// `tls.allow_expired_crl`.
    allow_expired: bool,
}

#[derive(Debug, Default)]
struct Listed {
    serials: HashSet<Vec<u8>>,
    /// The latest next-update date of the issuer's lists (Unix seconds, with its text).
    next_update: Option<(i64, String)>,
}

impl Revocations {
    /// The revocations of `crls` (already read and checked for expiry by the loader).
    pub(crate) fn from_lists(
        crls: &[CertificateRevocationListDer<'_>],
        allow_expired: bool,
    ) -> Result<Self> {
        let mut by_issuer: HashMap<Vec<u8>, Listed> = HashMap::new();
        for crl in crls {
            let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
                .map_err(|e| anyhow!("reading a revocation list: {e}"))?;
            let listed = by_issuer
                .entry(parsed.issuer().as_raw().to_vec())
                .or_default();
            listed.serials.extend(
                parsed
                    .iter_revoked_certificates()
                    .map(|r| serial_key(r.raw_serial())),
            );
            if let Some(next) = parsed.next_update() {
                if listed
                    .next_update
                    .as_ref()
                    .is_none_or(|(t, _)| *t < next.timestamp())
                {
                    listed.next_update = Some((next.timestamp(), next.to_string()));
                }
            }
        }
        Ok(Self {
            by_issuer,
            checked: !crls.is_empty(),
            allow_expired,
        })
    }
}

/// A serial as compared: the integer's bytes without the leading zero DER adds to keep it
/// positive, whichever way the certificate's and the list's encoders wrote it.
fn serial_key(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

/// Why a call was refused for its connection's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRefusal {
    /// A short fixed name of the reason (`revoked`, `expired`, ...), to count refusals by.
    pub reason: &'static str,
    /// What the caller is told, and what to do about it.
    pub message: String,
}

/// What a connection's client certificate is checked by, parsed once.
#[derive(Debug, Clone)]
pub struct PeerCertificate {
    serial: Vec<u8>,
    issuer: Vec<u8>,
    not_before: (i64, String),
    not_after: (i64, String),
    /// The serial as `dsrctl pki` and the handshake's log show it (hex, colon-separated).
    pub serial_hex: String,
    /// The certificate's identity (its one URI SAN), when it has one.
    pub identity: Option<String>,
    /// The subject's distinguished name.
    pub subject: String,
}

impl PeerCertificate {
    /// Parses a leaf; `None` when it cannot be read (the handshake accepted it, so this
    /// does not happen with a certificate webpki verified).
    pub fn parse(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let validity = cert.validity();
        Some(Self {
            serial: serial_key(cert.raw_serial()),
            issuer: cert.issuer().as_raw().to_vec(),
            not_before: (
                validity.not_before.timestamp(),
                validity.not_before.to_string(),
            ),
            not_after: (
                validity.not_after.timestamp(),
                validity.not_after.to_string(),
            ),
            serial_hex: cert.raw_serial_as_string(),
            identity: super::identity_of(der),
            subject: cert.subject().to_string(),
        })
    }

    /// Who the certificate is, for messages: its identity, or its subject without one.
    pub fn who(&self) -> &str {
        self.identity.as_deref().unwrap_or(&self.subject)
    }

    /// Whether the certificate may still call at `now` under `revocations`.
    pub fn check(
        &self,
        revocations: &Revocations,
        now: SystemTime,
    ) -> Result<(), CertificateRefusal> {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (serial, who) = (&self.serial_hex, self.who());
        if now > self.not_after.0 {
            return Err(CertificateRefusal {
                reason: "expired",
                message: format!(
                    "the client certificate serial {serial} ({who}) expired at {} while its \
                     connection was open; connect again with a current certificate",
                    self.not_after.1
                ),
            });
        }
        if now < self.not_before.0 {
            return Err(CertificateRefusal {
                reason: "not yet valid",
                message: format!(
                    "the client certificate serial {serial} ({who}) is not valid before {}",
                    self.not_before.1
                ),
            });
        }
        if !revocations.checked {
            return Ok(());
        }
        let Some(listed) = revocations.by_issuer.get(&self.issuer) else {
            return Err(CertificateRefusal {
                reason: "revocation status unknown",
                message: format!(
                    "the client certificate serial {serial} ({who}) is from a CA whose \
                     revocation list this service no longer has, so its status is unknown"
                ),
            });
        };
        if listed.serials.contains(&self.serial) {
            return Err(CertificateRefusal {
                reason: "revoked",
                message: format!(
                    "the client certificate serial {serial} ({who}) was revoked; the call is \
                     refused: connect with a new certificate from the CA's operator"
                ),
            });
        }
        match &listed.next_update {
            Some((at, text)) if !revocations.allow_expired && *at < now => {
                Err(CertificateRefusal {
                    reason: "revocation list expired",
                    message: format!(
                        "the revocation list this service holds for the issuer of the client \
                     certificate serial {serial} ({who}) expired at {text}, so its status is \
                     unknown until the service's operator publishes a new one"
                    ),
                })
            }
            _ => Ok(()),
        }
    }
}

tokio::task_local! {
    /// Where a handshake run by [`noting_refused_certificate`] keeps the certificate the
    /// verifier refused.
    static REFUSED: Arc<Mutex<Option<PeerCertificate>>>;
}

/// Runs `handshake` and returns its outcome with the client certificate the verifier
/// refused during it, if it did. rustls's error names the reason only; the verifier runs
/// inside the handshake's poll, so a task-local carries the certificate out.
pub(crate) async fn noting_refused_certificate<T>(
    handshake: impl std::future::Future<Output = T>,
) -> (T, Option<PeerCertificate>) {
    let noted = Arc::new(Mutex::new(None));
    let outcome = REFUSED.scope(noted.clone(), handshake).await;
    let refused = noted.lock().unwrap_or_else(|e| e.into_inner()).take();
    (outcome, refused)
}

/// A client certificate verifier that notes the certificate it refuses (see
/// [`noting_refused_certificate`]) and otherwise leaves every decision to `inner`.
#[derive(Debug)]
pub(crate) struct NotingVerifier(pub(crate) Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for NotingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verdict = self.0.verify_client_cert(end_entity, intermediates, now);
        if verdict.is_err() {
            // Outside a noting handshake (tests' own servers) there is nowhere to note it.
            let _ = REFUSED.try_with(|noted| {
                *noted.lock().unwrap_or_else(|e| e.into_inner()) =
                    PeerCertificate::parse(end_entity.as_ref());
            });
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::DevPki;
    use rustls_pki_types::pem::PemObject;
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86_400);

    fn leaf(pki: &DevPki, stem: &str) -> PeerCertificate {
        let der = CertificateDer::from_pem_file(pki.cert(stem)).unwrap();
        PeerCertificate::parse(der.as_ref()).unwrap()
    }

    fn lists(pki: &DevPki, allow_expired: bool) -> Revocations {
        let crls: Vec<_> = CertificateRevocationListDer::pem_file_iter(pki.crl())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        Revocations::from_lists(&crls, allow_expired).unwrap()
    }

    #[test]
    fn a_listed_serial_an_unknown_issuer_and_the_clock_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let now = SystemTime::now();
        let crm = leaf(&pki, "partner-crm");
        crm.check(&Revocations::default(), now)
            .expect("nothing checked");
        pki.revoke(&[pki.cert("partner-crm")], 30 * DAY).unwrap();
        let revocations = lists(&pki, false);
        let refused = crm.check(&revocations, now).unwrap_err();
        assert_eq!(refused.reason, "revoked");
        assert!(refused.message.contains(&crm.serial_hex), "{refused:?}");
        assert!(refused.message.contains("spiffe://"), "{refused:?}");
        leaf(&pki, "partner-webform")
            .check(&revocations, now)
            .expect("not listed");
        let webform = leaf(&pki, "partner-webform");
        let at = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64);
        let refused = webform
            .check(&Revocations::default(), at(webform.not_after.0 + 1))
            .unwrap_err();
        assert_eq!(refused.reason, "expired", "{refused:?}");
        assert!(refused.message.contains("expired at"), "{refused:?}");
        let refused = webform
            .check(&Revocations::default(), at(webform.not_before.0 - 1))
            .unwrap_err();
        assert_eq!(refused.reason, "not yet valid", "{refused:?}");
        let expired_list = webform.check(&revocations, now + 31 * DAY).unwrap_err();
        assert_eq!(expired_list.reason, "revocation list expired");
        webform
            .check(&lists(&pki, true), now + 31 * DAY)
            .expect("an expired list, allowed");
        let other = Revocations {
            checked: true,
            ..Revocations::default()
        };
        assert_eq!(
            webform.check(&other, now).unwrap_err().reason,
            "revocation status unknown"
        );
    }
}
