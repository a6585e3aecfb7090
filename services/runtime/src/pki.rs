//! A development PKI: one CA and a certificate for every party, generated with rcgen.
//!
//! Each leaf carries exactly one URI SAN (`spiffe://<trust domain>/<role>/<name>`, the SPIFFE
//! shape), plus `localhost` and `127.0.0.1` so it can also serve. The CA and every leaf get
//! distinct subject names: OpenSSL-based stacks (grpcurl, Python's grpcio) take a leaf whose
//! subject equals its issuer's for self-signed and refuse it.
//!
//! The CA also signs the set's certificate revocation list (`crl.pem`, [`DevPki::revoke`]),
//! which services name in `tls.crls` to shut out a party whose key was lost.
//!
//! Every processor, registry and recipient party also gets an Ed25519 key
//! (`<stem>-signing.key`, mode 0600, and `<stem>-signing.pub.pem` beside it; see
//! [`crate::signing`]): a processor signs its deletion certificates and audit checkpoints
//! with it, a registry its audit checkpoints ([`crate::audit::checkpoint`]), the example
//! recipient its transfer receipts ([`crate::transfer_receipt`]).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

/// The OID of the BasicConstraints extension (2.5.29.19).
const BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];

/// The trust domain used in development identities.
pub const DEV_TRUST_DOMAIN: &str = "dsrelay.dev";

/// The development identity of a party: `spiffe://dsrelay.dev/<role>/<name>`.
pub fn dev_identity(role: &str, name: &str) -> String {
    format!("spiffe://{DEV_TRUST_DOMAIN}/{role}/{name}")
}

/// A PEM certificate and its private key.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

/// A certificate authority held in memory, able to issue leaves.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl DevCa {
    /// Generates a fresh CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "dsrelay development");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Loads a CA written earlier by [`DevPki::ensure`].
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("reading the CA key")?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem).context("reading the CA")?;
        // Re-signing the same parameters with the same key reproduces an issuer that verifies
        // the leaves it signs; the PEM on disk stays the trust anchor.
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a leaf for `uri_identity` usable both as client and as server on localhost.
    pub fn issue(&self, common_name: &str, uri_identity: &str) -> Result<IssuedCert> {
        self.issue_with_dns_names(common_name, uri_identity, &[])
    }

    /// [`DevCa::issue`] with more DNS names the leaf may serve under (host names in a
    /// container network, for example). The identity stays the URI SAN.
    pub fn issue_with_dns_names(
        &self,
        common_name: &str,
        uri_identity: &str,
        dns_names: &[String],
    ) -> Result<IssuedCert> {
        self.issue_with_uris(common_name, &[uri_identity], dns_names)
    }

    /// A leaf with any number of URI SANs (besides localhost and the `dns_names`): for tests
    /// of certificates that carry no identity, or an ambiguous one.
    pub fn issue_with_uris(
        &self,
        common_name: &str,
        uris: &[&str],
        dns_names: &[String],
    ) -> Result<IssuedCert> {
        self.issue_leaf(common_name, uris, dns_names, None)
    }

    /// [`DevCa::issue`] valid from `not_before` to `not_after` only (rcgen's default is a
    /// validity from 1975 to 4096): for certificates that are expired or not valid yet.
    pub fn issue_valid_between(
        &self,
        common_name: &str,
        uri_identity: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert> {
        self.issue_leaf(
            common_name,
            &[uri_identity],
            &[],
            Some((not_before, not_after)),
        )
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        uris: &[&str],
        dns_names: &[String],
        validity: Option<(SystemTime, SystemTime)>,
    ) -> Result<IssuedCert> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "dsrelay development party");
        params.distinguished_name = dn;
        params.subject_alt_names = Vec::new();
        for uri in uris {
            params.subject_alt_names.push(SanType::URI(
                (*uri).try_into().context("identity is not a valid URI")?,
            ));
        }
        params.subject_alt_names.extend([
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ]);
        for name in dns_names {
            rustls_pki_types::DnsName::try_from(name.as_str())
                .map_err(|_| anyhow::anyhow!("{name:?} is not a DNS name"))?;
            params.subject_alt_names.push(SanType::DnsName(
                name.as_str()
                    .try_into()
                    .with_context(|| format!("{name:?} is not a DNS name"))?,
            ));
        }
        // rcgen's `ExplicitNoCa` writes `cA FALSE`, a default value DER forbids encoding, and
        // strict parsers (Python's `cryptography`) refuse such a certificate. The empty
        // sequence says the same in DER: a critical BasicConstraints that is no CA.
        params.is_ca = IsCa::NoCa;
        let mut no_ca = CustomExtension::from_oid_content(BASIC_CONSTRAINTS, vec![0x30, 0x00]);
        no_ca.set_criticality(true);
        params.custom_extensions.push(no_ca);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if let Some((not_before, not_after)) = validity {
            params.not_before = OffsetDateTime::from(not_before);
            params.not_after = OffsetDateTime::from(not_after);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl DevCa {
    /// A revocation list signed by this CA listing `revoked` (serial and when it was
    /// revoked), issued `this_update` and due for renewal at `next_update`. PEM.
    pub fn revocation_list(
        &self,
        revoked: &[Revoked],
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<String> {
        let number = this_update
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let params = CertificateRevocationListParams {
            this_update: OffsetDateTime::from(this_update),
            next_update: OffsetDateTime::from(next_update),
            // Seconds since the epoch grow with every list a CA issues, as the number must.
            crl_number: SerialNumber::from(number.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from(r.serial.clone()),
                    revocation_time: OffsetDateTime::from(r.at),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params
            .signed_by(&self.cert, &self.key)
            .context("signing the revocation list")?
            .pem()?)
    }
}

/// A revoked certificate in a revocation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Its serial number, big-endian without leading zeros.
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub at: SystemTime,
}

/// The serial number of the first certificate in `pem`, big-endian without leading zeros.
pub fn serial_of(pem: &[u8]) -> Result<Vec<u8>> {
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .next()
        .context("no certificate")??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow::anyhow!("reading the certificate: {e}"))?;
    Ok(trimmed(cert.raw_serial()))
}

fn trimmed(serial: &[u8]) -> Vec<u8> {
    let start = serial
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    serial[start..].to_vec()
}

/// The entries of the revocation list in `pem` (the first one in it).
pub fn revoked_in(pem: &[u8]) -> Result<Vec<Revoked>> {
    let der = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(pem)
        .next()
        .context("no revocation list")??;
    let (_, crl) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| anyhow::anyhow!("reading the revocation list: {e}"))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: trimmed(r.raw_serial()),
            at: SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(r.revocation_date.timestamp()).unwrap_or(0)),
        })
        .collect())
}

/// The parties of the development setup: (file stem, role, name).
pub const DEV_PARTIES: &[(&str, &str, &str)] = &[
    ("registry", "registry", "controller"),
    // A second controller served by the same processor (the compose sample's `retailer`).
    ("registry-retailer", "registry", "retailer"),
    ("processor", "processor", "payroll-bureau"),
    ("partner-crm", "partner", "crm"),
    ("partner-webform", "partner", "webform"),
    ("operator", "operator", "ops"),
    ("adapter", "adapter", "example"),
    ("recipient", "recipient", "example"),
];

/// A development PKI on disk: `ca.pem`, `ca.key` and `<stem>.pem` / `<stem>.key` per party.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The folder holding the files.
    pub dir: PathBuf,
}

impl DevPki {
    /// Generates the CA and every party's certificate into `dir` unless `ca.pem` is there.
    pub fn ensure(dir: &Path) -> Result<Self> {
        Self::ensure_with_dns_names(dir, &[])
    }

    /// [`DevPki::ensure`], giving every new leaf these DNS names besides `localhost` (the
    /// services' host names in docker-compose, for example). An existing set is kept as it is.
    pub fn ensure_with_dns_names(dir: &Path, dns_names: &[String]) -> Result<Self> {
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        if pki.dir.join("ca.pem").exists() {
            // A set written before processors signed certificates (or recipients receipts)
            // gets their keys now, and one written before a party was added gets that
            // party's certificate.
            pki.ensure_missing_parties(dns_names)?;
            pki.ensure_signing_keys()?;
            return Ok(pki);
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = DevCa::generate("dsrelay development CA")?;
        write_secret(&pki.dir.join("ca.key"), &ca.key_pem())?;
        for (stem, role, name) in DEV_PARTIES {
            let leaf = ca.issue_with_dns_names(
                &format!("dsrelay {role} {name}"),
                &dev_identity(role, name),
                dns_names,
            )?;
            std::fs::write(pki.cert(stem), &leaf.cert_pem)?;
            write_secret(&pki.key(stem), &leaf.key_pem)?;
        }
        pki.ensure_signing_keys()?;
        // Written last: its presence means the set is complete.
        std::fs::write(pki.ca(), ca.cert_pem())?;
        Ok(pki)
    }

    /// Issues a certificate to every party that has none, with the CA key of the set (left
    /// alone when the set has no CA key: then it was installed for one party).
    fn ensure_missing_parties(&self, dns_names: &[String]) -> Result<()> {
        let missing: Vec<_> = DEV_PARTIES
            .iter()
            .filter(|(stem, _, _)| !self.cert(stem).exists())
            .collect();
        let ca_key = self.dir.join("ca.key");
        if missing.is_empty() || !ca_key.exists() {
            return Ok(());
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        let ca = DevCa::load(&read(&self.ca())?, &read(&ca_key)?)?;
        for (stem, role, name) in missing {
            let leaf = ca.issue_with_dns_names(
                &format!("dsrelay {role} {name}"),
                &dev_identity(role, name),
                dns_names,
            )?;
            write_secret(&self.key(stem), &leaf.key_pem)?;
            std::fs::write(self.cert(stem), &leaf.cert_pem)?;
        }
        Ok(())
    }

    /// Generates the signing key of every processor, registry and recipient party that has
    /// none.
    fn ensure_signing_keys(&self) -> Result<()> {
        for (stem, role, _) in DEV_PARTIES {
            if signs(role) && !self.signing_key(stem).exists() {
                crate::signing::SigningKey::generate().write(&self.signing_key(stem))?;
            }
        }
        Ok(())
    }

    /// Path of a processor's certificate signing key, a registry's checkpoint signing key or
    /// a recipient's receipt signing key (PKCS#8 PEM).
    pub fn signing_key(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}-signing.key"))
    }

    /// Path of the public key of [`DevPki::signing_key`] (SPKI PEM).
    pub fn signing_public_key(&self, stem: &str) -> PathBuf {
        crate::signing::public_key_path(&self.signing_key(stem))
    }

    /// Path of the CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Path of a party's certificate.
    pub fn cert(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.pem"))
    }

    /// Path of a party's key.
    pub fn key(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.key"))
    }

    /// Path of the CA's revocation list, written by [`DevPki::revoke`].
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// Adds the certificates in `certs` (PEM files) to the CA's revocation list, keeping
    /// the entries already there, and writes it anew, due for renewal `valid_for` from now
    /// (no certificates: the list is only renewed, or created empty). The list is written to
    /// a temporary file and renamed over the old one, so a service reloading it never reads
    /// half of it. Returns every entry of the new list.
    pub fn revoke(&self, certs: &[PathBuf], valid_for: Duration) -> Result<Vec<Revoked>> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let ca_key = self.dir.join("ca.key");
        if !ca_key.exists() {
            anyhow::bail!(
                "{} has no CA key: revoke where the CA was created",
                self.dir.display()
            );
        }
        let ca = DevCa::load(
            &String::from_utf8_lossy(&read(&self.ca())?),
            &String::from_utf8_lossy(&read(&ca_key)?),
        )?;
        let mut revoked = if self.crl().exists() {
            revoked_in(&read(&self.crl())?)
                .with_context(|| format!("reading {}", self.crl().display()))?
        } else {
            Vec::new()
        };
        // Whole seconds, as a list records them, so an entry reads back as it was written.
        let now = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            );
        for cert in certs {
            let serial = serial_of(&read(cert)?).with_context(|| cert.display().to_string())?;
            if !revoked.iter().any(|r| r.serial == serial) {
                revoked.push(Revoked { serial, at: now });
            }
        }
        let pem = ca.revocation_list(&revoked, now, now + valid_for)?;
        let partial = self.dir.join("crl.pem.new");
        std::fs::write(&partial, pem).with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, self.crl())
            .with_context(|| format!("writing {}", self.crl().display()))?;
        Ok(revoked)
    }

    /// The TLS file set of a party.
    pub fn files(&self, stem: &str) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles::new(self.ca(), self.cert(stem), self.key(stem))
    }

    /// Copies into `dir` only what the party `stem` needs to run, under the same names: the
    /// CA certificate (never the CA key), its certificate and key, a processor's,
    /// registry's or recipient's signing key and its public key, and for a registry every
    /// processor's public signing key. A service container mounts that folder and nothing
    /// else, so a compromised service holds no other party's key and cannot issue
    /// certificates. Returns the installed set.
    pub fn install(&self, stem: &str, dir: &Path) -> Result<Self> {
        let Some((_, role, _)) = DEV_PARTIES.iter().find(|(s, _, _)| *s == stem) else {
            let known: Vec<&str> = DEV_PARTIES.iter().map(|(s, _, _)| *s).collect();
            anyhow::bail!(
                "{stem:?} is not a party of the development PKI ({})",
                known.join(", ")
            );
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let target = Self {
            dir: dir.to_path_buf(),
        };
        let read = |p: PathBuf| -> Result<String> {
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let public = |from: PathBuf, to: PathBuf| -> Result<()> {
            std::fs::write(&to, read(from)?).with_context(|| format!("writing {}", to.display()))
        };
        public(self.cert(stem), target.cert(stem))?;
        write_secret(&target.key(stem), &read(self.key(stem))?)?;
        if signs(role) {
            write_secret(&target.signing_key(stem), &read(self.signing_key(stem))?)?;
            public(
                self.signing_public_key(stem),
                target.signing_public_key(stem),
            )?;
        }
        if *role == "registry" {
            // It checks the processors' certificates and the recipients' receipts.
            for (other, role, _) in DEV_PARTIES {
                if matches!(*role, "processor" | "recipient") {
                    public(
                        self.signing_public_key(other),
                        target.signing_public_key(other),
                    )?;
                }
            }
        }
        // Last, as in `ensure`: its presence means the set is complete.
        public(self.ca(), target.ca())?;
        Ok(target)
    }
}

/// Whether parties of `role` sign documents: processors their deletion certificates and
/// audit checkpoints, registries their audit checkpoints, recipients their transfer receipts.
fn signs(role: &str) -> bool {
    matches!(role, "processor" | "registry" | "recipient")
}

pub(crate) fn write_secret(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    // Created with mode 0600, never widened then narrowed: a key must not be readable by
    // others even for the moment between writing and a chmod. An existing file keeps the
    // mode it has, so it is narrowed too.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns_names(pem: &[u8]) -> (Option<String>, Vec<String>) {
        use rustls_pki_types::pem::PemObject;
        use x509_parser::extensions::GeneralName;
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect();
        (crate::tls::identity_of(&der), names)
    }

    /// The BasicConstraints extension of the certificate in `pem` as encoded: whether it is
    /// critical, its value's bytes and whether it makes a CA (`None`: there is none).
    fn basic_constraints(pem: &[u8]) -> Option<(bool, Vec<u8>, bool)> {
        let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem)
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca = cert.basic_constraints().unwrap().map(|b| b.value.ca);
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS)?;
        Some((ext.critical, ext.value.to_vec(), ca.unwrap()))
    }

    #[test]
    fn leaves_are_no_ca_in_strict_der() {
        // DER forbids encoding a default value such as `cA FALSE` (BOOLEAN 01 01 00 first in
        // the sequence); Python's `cryptography` refuses a certificate that does.
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let mut leaves: Vec<(String, String)> = DEV_PARTIES
            .iter()
            .map(|(stem, _, _)| {
                let pem = std::fs::read_to_string(pki.cert(stem)).unwrap();
                (stem.to_string(), pem)
            })
            .collect();
        let now = SystemTime::now();
        let expired = ca
            .issue_valid_between("old", &dev_identity("partner", "old"), now, now)
            .unwrap();
        leaves.push(("expired".into(), expired.cert_pem));
        for (name, pem) in leaves {
            let Some((critical, value, is_ca)) = basic_constraints(pem.as_bytes()) else {
                continue;
            };
            assert!(!is_ca, "{name}");
            assert!(critical, "{name}");
            assert_eq!(value[0], 0x30, "{name}: not a sequence");
            assert!(
                !value[2..].starts_with(&[0x01, 0x01, 0x00]),
                "{name}: {value:02x?}"
            );
        }
        // The CA's cA TRUE is no default, and is encoded.
        let (_, _, is_ca) = basic_constraints(std::fs::read(pki.ca()).unwrap().as_slice()).unwrap();
        assert!(is_ca);
    }

    #[test]
    fn revoking_keeps_the_earlier_entries() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let month = Duration::from_secs(30 * 86_400);
        assert!(pki.revoke(&[], month).unwrap().is_empty());
        let crm = serial_of(&std::fs::read(pki.cert("partner-crm")).unwrap()).unwrap();
        let web = serial_of(&std::fs::read(pki.cert("partner-webform")).unwrap()).unwrap();
        let first = pki.revoke(&[pki.cert("partner-crm")], month).unwrap();
        assert_eq!(first.iter().map(|r| &r.serial).collect::<Vec<_>>(), [&crm]);
        // Revoking crm again adds nothing; webform joins it.
        let both = pki
            .revoke(
                &[pki.cert("partner-crm"), pki.cert("partner-webform")],
                month,
            )
            .unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(both[0], first[0]);
        assert_eq!(both[1].serial, web);
        assert_eq!(
            revoked_in(&std::fs::read(pki.crl()).unwrap()).unwrap(),
            both
        );
        assert!(!dir.path().join("crl.pem.new").exists());
    }

    #[test]
    fn extra_dns_names_keep_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            DevPki::ensure_with_dns_names(dir.path(), &["registry".into(), "processor".into()])
                .unwrap();
        let (identity, names) = dns_names(&std::fs::read(pki.cert("registry")).unwrap());
        assert_eq!(identity, Some(dev_identity("registry", "controller")));
        assert_eq!(names, ["localhost", "registry", "processor"]);

        let plain = DevPki::ensure(&dir.path().join("plain")).unwrap();
        let (_, names) = dns_names(&std::fs::read(plain.cert("processor")).unwrap());
        assert_eq!(names, ["localhost"]);
        assert!(
            DevPki::ensure_with_dns_names(&dir.path().join("bad"), &["no spaces".into()]).is_err()
        );
    }

    #[test]
    fn each_processor_registry_and_recipient_gets_a_signing_key_also_in_an_older_set() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let key = crate::signing::SigningKey::load(&pki.signing_key("processor")).unwrap();
        let public = std::fs::read_to_string(pki.signing_public_key("processor")).unwrap();
        assert_eq!(
            crate::signing::PublicKey::parse(&public).unwrap(),
            key.public_key()
        );
        assert!(pki.signing_key("registry").exists());
        assert!(pki.signing_key("registry-retailer").exists());
        let recipient = crate::signing::SigningKey::load(&pki.signing_key("recipient")).unwrap();
        let public = std::fs::read_to_string(pki.signing_public_key("recipient")).unwrap();
        assert_eq!(
            crate::signing::PublicKey::parse(&public).unwrap(),
            recipient.public_key()
        );
        assert!(!pki.signing_key("partner-crm").exists());
        // A set written before processors signed, or before the recipient did.
        for stem in ["processor", "registry", "recipient"] {
            std::fs::remove_file(pki.signing_key(stem)).unwrap();
            std::fs::remove_file(pki.signing_public_key(stem)).unwrap();
        }
        DevPki::ensure(dir.path()).unwrap();
        for stem in ["processor", "registry", "recipient"] {
            assert!(pki.signing_key(stem).exists(), "{stem}");
            assert!(pki.signing_public_key(stem).exists(), "{stem}");
        }
    }

    #[test]
    fn a_party_added_later_gets_its_certificate_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let ca = std::fs::read(pki.ca()).unwrap();
        let crm = std::fs::read(pki.cert("partner-crm")).unwrap();
        // A set written before the second controller existed.
        std::fs::remove_file(pki.cert("registry-retailer")).unwrap();
        std::fs::remove_file(pki.key("registry-retailer")).unwrap();
        DevPki::ensure(dir.path()).unwrap();
        assert_eq!(std::fs::read(pki.ca()).unwrap(), ca);
        assert_eq!(std::fs::read(pki.cert("partner-crm")).unwrap(), crm);
        let files = pki.files("registry-retailer");
        files.client_config().unwrap();
        assert_eq!(
            files.own_identity().unwrap(),
            dev_identity("registry", "retailer")
        );
    }

    #[cfg(unix)]
    #[test]
    fn every_private_key_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let mut keys = vec![dir.path().join("ca.key")];
        for (stem, role, _) in DEV_PARTIES {
            keys.push(pki.key(stem));
            if signs(role) {
                keys.push(pki.signing_key(stem));
            }
        }
        for key in keys {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
        // A key file that existed with a wider mode is narrowed when written again.
        let old = dir.path().join("old.key");
        std::fs::write(&old, "x").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret(&old, "secret").unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "secret");
    }

    #[test]
    fn an_installed_party_gets_its_own_files_and_never_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("all")).unwrap();
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let registry = pki
            .install("registry", &dir.path().join("registry"))
            .unwrap();
        assert_eq!(
            names(&registry.dir),
            [
                "ca.pem",
                "processor-signing.pub.pem",
                "recipient-signing.pub.pem",
                "registry-signing.key",
                "registry-signing.pub.pem",
                "registry.key",
                "registry.pem"
            ]
        );
        let processor = pki
            .install("processor", &dir.path().join("processor"))
            .unwrap();
        assert_eq!(
            names(&processor.dir),
            [
                "ca.pem",
                "processor-signing.key",
                "processor-signing.pub.pem",
                "processor.key",
                "processor.pem"
            ]
        );
        // The copies are the same credentials: a TLS configuration loads from them.
        processor.files("processor").client_config().unwrap();
        assert_eq!(
            processor.files("processor").own_identity().unwrap(),
            dev_identity("processor", "payroll-bureau")
        );
        assert!(pki.install("nobody", &dir.path().join("x")).is_err());
    }
}
