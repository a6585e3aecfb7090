//! Signed documents: canonical JSON signed with Ed25519 (`ed25519-dalek`).
//!
//! A document is signed over its exact bytes, which are canonical JSON ([`canonical_json`]):
//! object keys sorted, no whitespace, integers only, strings escaped as RFC 8785 (JCS)
//! prescribes. So whoever holds the document can check it with nothing but the public key,
//! and two signers of the same content produce the same bytes.
//!
//! Keys are files: the private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, mode 0600;
//! written as version 1, read as version 1 or 2), the public key as SPKI PEM
//! (`-----BEGIN PUBLIC KEY-----`) beside it. A public key may also
//! be given as the standard base64 of its 32 raw bytes. A key's id is `sha256:` and the hex
//! SHA-256 of those 32 bytes, so a signed document names the key that checks it.
//!
//! [`Signed`] travels as `{body, signature, key_id}`; its file form ([`Signed::to_file_json`])
//! is a JSON object whose `body` is the signed text itself, `signature` the base64 of the 64
//! signature bytes and `key_id` the key's id.

use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Writes `value` as canonical JSON: keys sorted by their UTF-16 code units, no whitespace,
/// strings escaped as JSON.stringify does. Numbers must be integers: a float has no single
/// canonical text here, and no signed document of ours needs one.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_canonical(value, &mut out)?;
    Ok(out)
}

/// [`canonical_json`] of any serializable value.
pub fn to_canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    canonical_json(&serde_json::to_value(value)?)
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Result<()> {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => {
            // serde_json escapes exactly `"`, `\` and control characters, with the short
            // forms \b \f \n \r \t and lowercase \u00xx otherwise: JCS's rules.
            serde_json::to_writer(&mut *out, value)?;
        }
        Value::Number(n) => {
            if !(n.is_i64() || n.is_u64()) {
                bail!("canonical json takes integers only, not {n}");
            }
            serde_json::to_writer(&mut *out, value)?;
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_canonical(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

/// A document and the signature over its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The signed bytes: canonical JSON.
    pub body: Vec<u8>,
    /// The Ed25519 signature over `body` (64 bytes).
    pub signature: Vec<u8>,
    /// The id of the key that signed it ([`PublicKey::key_id`]).
    pub key_id: String,
}

/// The file form of [`Signed`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedFile {
    body: String,
    signature: String,
    key_id: String,
}

impl Signed {
    /// The file form: `{"body": "<the signed JSON text>", "key_id": "sha256:…",
    /// "signature": "<base64>"}`, pretty-printed (only `body`'s bytes are signed).
    pub fn to_file_json(&self) -> Result<String> {
        let file = SignedFile {
            body: String::from_utf8(self.body.clone()).context("the body is not utf-8")?,
            signature: BASE64.encode(&self.signature),
            key_id: self.key_id.clone(),
        };
        Ok(serde_json::to_string_pretty(&file)? + "\n")
    }

    /// The file form on one line, without a line end: how an append-only file of signed
    /// documents (the audit trail's checkpoints) holds one document per line.
    pub fn to_json_line(&self) -> Result<String> {
        let file = SignedFile {
            body: String::from_utf8(self.body.clone()).context("the body is not utf-8")?,
            signature: BASE64.encode(&self.signature),
            key_id: self.key_id.clone(),
        };
        Ok(serde_json::to_string(&file)?)
    }

    /// Reads the file form written by [`Signed::to_file_json`] or [`Signed::to_json_line`].
    pub fn from_file_json(text: &str) -> Result<Self> {
        let file: SignedFile = serde_json::from_str(text)
            .context("not a signed document (body, signature, key_id)")?;
        Ok(Self {
            body: file.body.into_bytes(),
            signature: BASE64
                .decode(file.signature.as_bytes())
                .context("signature is not base64")?,
            key_id: file.key_id,
        })
    }
}

/// Why a signed document was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Signed with another key than the one it is checked with.
    #[error("signed with key {found}, not with the expected key {expected}")]
    WrongKey {
        /// The key id the document names.
        found: String,
        /// The id of the key it was checked with.
        expected: String,
    },
    /// The signature does not match the body.
    #[error("the signature does not match the document")]
    BadSignature,
    /// The signature is right but the body is not a canonical JSON object.
    #[error("the signed body is not canonical json: {0}")]
    NotCanonical(String),
    /// Signed with a key revoked at or before the time the document was received
    /// ([`KeyRing::verify_received`]): whoever holds the key may have signed it since, and
    /// could write any date inside it.
    #[error(
        "signed with key {key_id}, which was revoked at {revoked_at}, no later than this \
         document was received"
    )]
    Revoked {
        /// The id of the revoked key.
        key_id: String,
        /// When it was revoked, RFC 3339.
        revoked_at: String,
    },
}

/// An Ed25519 private key that signs documents.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public_key().key_id())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self {
            key: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
        }
    }

    /// Reads a PKCS#8 PEM private key: version 1 (the private key alone, as [`Self::to_pem`]
    /// writes it) or version 2 (with the public key, as this crate wrote it before), whose
    /// public key must belong to the private key.
    pub fn from_pem(pem: &str) -> Result<Self> {
        Ok(Self {
            key: ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
                .map_err(|_| anyhow::anyhow!("{}", not_a_signing_key(pem)))?,
        })
    }

    /// Reads the private key file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading the signing key {}", path.display()))?;
        Self::from_pem(&pem).with_context(|| format!("signing key {}", path.display()))
    }

    /// The private key as PKCS#8 version 1 PEM (RFC 8410: the private key alone), the form
    /// OpenSSL 3 and Python's `cryptography` read; ed25519-dalek's own encoding adds the
    /// public key (version 2), which they refuse.
    pub fn to_pem(&self) -> Result<String> {
        let bytes = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        Ok(bytes
            .to_pkcs8_pem(Default::default())
            .map_err(|e| anyhow::anyhow!("encoding the signing key: {e}"))?
            .to_string())
    }

    /// Writes the private key to `path` (mode 0600) and its public key beside it
    /// ([`public_key_path`]).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::pki::write_secret(path, &self.to_pem()?)?;
        let public = public_key_path(path);
        std::fs::write(&public, self.public_key().to_pem()?)
            .with_context(|| format!("writing {}", public.display()))?;
        Ok(())
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
        }
    }

    /// Signs `body` (canonical JSON) as it is.
    pub fn sign(&self, body: Vec<u8>) -> Signed {
        let signature = self.key.sign(&body).to_bytes().to_vec();
        Signed {
            body,
            signature,
            key_id: self.public_key().key_id(),
        }
    }
}

/// The public key file of the private key at `path`: its extension replaced by `pub.pem`
/// (`processor-signing.key` → `processor-signing.pub.pem`).
pub fn public_key_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("pub.pem")
}

/// An Ed25519 public key that checks signed documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// Reads a public key: SPKI PEM, or the standard base64 of its 32 raw bytes.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        if text.starts_with("-----BEGIN") {
            return Ok(Self {
                key: ed25519_dalek::VerifyingKey::from_public_key_pem(text)
                    .map_err(|e| anyhow::anyhow!("not an ed25519 spki pem public key: {e}"))?,
            });
        }
        let raw = BASE64
            .decode(text.as_bytes())
            .context("a public key is spki pem or the base64 of its 32 bytes")?;
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|_| anyhow::anyhow!("an ed25519 public key is 32 bytes"))?;
        Ok(Self {
            key: ed25519_dalek::VerifyingKey::from_bytes(&raw)
                .map_err(|e| anyhow::anyhow!("not an ed25519 public key: {e}"))?,
        })
    }

    /// Reads a public key given as the base64 of its 32 bytes, or else as the path of a file
    /// holding it (PEM or base64).
    pub fn from_config(value: &str) -> Result<Self> {
        if let Ok(key) = Self::parse(value) {
            return Ok(key);
        }
        let text = std::fs::read_to_string(value)
            .with_context(|| format!("reading the public key {value}"))?;
        Self::parse(&text).with_context(|| format!("public key {value}"))
    }

    /// The key as SPKI PEM.
    pub fn to_pem(&self) -> Result<String> {
        self.key
            .to_public_key_pem(Default::default())
            .map_err(|e| anyhow::anyhow!("encoding the public key: {e}"))
    }

    /// The standard base64 of the key's 32 bytes.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.key.as_bytes())
    }

    /// `sha256:` and the hex SHA-256 of the key's 32 bytes.
    pub fn key_id(&self) -> String {
        format!(
            "sha256:{}",
            hex::encode(Sha256::digest(self.key.as_bytes()))
        )
    }

    /// Checks that `doc` was signed by this key and that its body is a canonical JSON
    /// object; returns the body parsed.
    pub fn verify(&self, doc: &Signed) -> Result<Value, VerifyError> {
        let expected = self.key_id();
        if doc.key_id != expected {
            return Err(VerifyError::WrongKey {
                found: doc.key_id.clone(),
                expected,
            });
        }
        let signature =
            Signature::from_slice(&doc.signature).map_err(|_| VerifyError::BadSignature)?;
        self.key
            .verify_strict(&doc.body, &signature)
            .map_err(|_| VerifyError::BadSignature)?;
        let value: Value = serde_json::from_slice(&doc.body)
            .map_err(|e| VerifyError::NotCanonical(e.to_string()))?;
        if !value.is_object() {
            return Err(VerifyError::NotCanonical("not an object".into()));
        }
        match canonical_json(&value) {
            Ok(bytes) if bytes == doc.body => Ok(value),
            Ok(_) => Err(VerifyError::NotCanonical(
                "keys out of order or whitespace".into(),
            )),
            Err(e) => Err(VerifyError::NotCanonical(e.to_string())),
        }
    }
}

/// Whether `key_id` has the form [`PublicKey::key_id`] gives one: `sha256:` and 64
/// lowercase hex digits.
pub fn is_key_id(key_id: &str) -> bool {
    key_id
        .strip_prefix("sha256:")
        .is_some_and(crate::export_files::is_sha256)
}

/// A key taken out of a [`KeyRing`] as of a time (one that leaked, say): what was received
/// before `revoked_at_ms` still verifies under it, nothing received at or after it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The revoked key.
    pub key: PublicKey,
    /// When it was revoked, in milliseconds since the Unix epoch.
    pub revoked_at_ms: i64,
}

impl Revocation {
    /// `revoked_at_ms` as RFC 3339 (UTC), as error messages name it.
    pub fn revoked_at(&self) -> String {
        chrono::DateTime::from_timestamp_millis(self.revoked_at_ms).map_or_else(
            || format!("{} ms since the epoch", self.revoked_at_ms),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        )
    }

    /// Whether the key still verifies a document received at `received_at_ms`.
    pub fn trusts_received(&self, received_at_ms: i64) -> bool {
        received_at_ms < self.revoked_at_ms
    }

    /// The error of a document signed with the key and received too late.
    fn error(&self) -> VerifyError {
        VerifyError::Revoked {
            key_id: self.key.key_id(),
            revoked_at: self.revoked_at(),
        }
    }
}

/// Reads an RFC 3339 time (`2026-11-30T12:00:00Z`, any offset) as milliseconds since the
/// Unix epoch, as a [`Revocation`] holds it.
pub fn parse_revoked_at(text: &str) -> Result<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(text.trim()).with_context(|| {
        format!("{text:?} is not an RFC 3339 time such as 2026-11-30T12:00:00Z")
    })?;
    Ok(t.timestamp_millis())
}

/// The public keys one party's documents are checked with: the key it signs with now, and
/// those it signed with before a rotation, so that what it signed then still verifies. A
/// document is checked with the key its key id names; a key taken out of the ring verifies
/// nothing any more, and a revoked one ([`Revocation`]) only what was received before its
/// revocation ([`KeyRing::verify_received`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRing {
    /// The key it signs with now first, then the earlier ones.
    keys: Vec<PublicKey>,
    /// Keys revoked as of a time.
    revoked: Vec<Revocation>,
}

impl KeyRing {
    /// The ring of `current` and `previous`; refuses a key given twice, naming its place in
    /// `previous` (0-based), since a list that repeats a key is a mistake in the settings.
    pub fn new(current: PublicKey, previous: Vec<PublicKey>) -> Result<Self> {
        let mut keys = vec![current];
        for (i, key) in previous.into_iter().enumerate() {
            if let Some(j) = keys.iter().position(|k| *k == key) {
                let earlier = match j {
                    0 => "the current key".to_string(),
                    j => format!("previous key {}", j - 1),
                };
                anyhow::bail!("previous key {i} is {earlier} again ({})", key.key_id());
            }
            keys.push(key);
        }
        Ok(Self {
            keys,
            revoked: Vec::new(),
        })
    }

    /// The ring with `revoked` added; refuses a revoked key that is also in the ring (a key
    /// cannot be trusted and revoked at once) or revoked twice, naming its place in
    /// `revoked` (0-based).
    pub fn with_revoked(mut self, revoked: Vec<Revocation>) -> Result<Self> {
        for (i, r) in revoked.into_iter().enumerate() {
            if let Some(j) = self.keys.iter().position(|k| *k == r.key) {
                let listed = match j {
                    0 => "the current key".to_string(),
                    j => format!("previous key {}", j - 1),
                };
                anyhow::bail!(
                    "revoked key {i} is {listed} too ({}): a key is either trusted or revoked",
                    r.key.key_id()
                );
            }
            if let Some(j) = self.revoked.iter().position(|k| k.key == r.key) {
                anyhow::bail!(
                    "revoked key {i} is revoked key {j} again ({})",
                    r.key.key_id()
                );
            }
            self.revoked.push(r);
        }
        Ok(self)
    }

    /// The key the party signs with now.
    pub fn current(&self) -> &PublicKey {
        &self.keys[0]
    }

    /// Checks `doc` with the ring's key its key id names ([`PublicKey::verify`]); one signed
    /// with a key outside the ring is [`VerifyError::WrongKey`], expecting the current key.
    /// A revoked key verifies nothing here, since no time of receipt is given: see
    /// [`KeyRing::verify_received`].
    pub fn verify(&self, doc: &Signed) -> Result<Value, VerifyError> {
        match self.keys.iter().find(|k| k.key_id() == doc.key_id) {
            Some(key) => key.verify(doc),
            None => self.current().verify(doc),
        }
    }

    /// [`KeyRing::verify`] of a document the checker received at `received_at_ms` (its own
    /// clock, never a date the document gives): a revoked key verifies it if it was received
    /// before the revocation, and else it is [`VerifyError::Revoked`].
    pub fn verify_received(&self, doc: &Signed, received_at_ms: i64) -> Result<Value, VerifyError> {
        match self.revocation(&doc.key_id) {
            Some(r) if r.trusts_received(received_at_ms) => r.key.verify(doc),
            Some(r) => Err(r.error()),
            None => self.verify(doc),
        }
    }

    /// The ring as it stands at `at_ms`: its keys and those revoked after `at_ms`, with no
    /// revocation left, for checks that take a plain ring (a receipt's, say), and the keys
    /// to hand on at that time.
    pub fn as_of(&self, at_ms: i64) -> KeyRing {
        let still = self.revoked.iter().filter(|r| r.trusts_received(at_ms));
        KeyRing {
            keys: (self.keys.iter().cloned())
                .chain(still.map(|r| r.key.clone()))
                .collect(),
            revoked: Vec::new(),
        }
    }

    /// [`VerifyError::Revoked`] when `key_id` names a key revoked at or before `at_ms`.
    pub fn revoked_error(&self, key_id: &str, at_ms: i64) -> Option<VerifyError> {
        self.revocation(key_id)
            .filter(|r| !r.trusts_received(at_ms))
            .map(Revocation::error)
    }

    /// The revocation of the key `key_id` names, if it is revoked.
    pub fn revocation(&self, key_id: &str) -> Option<&Revocation> {
        self.revoked.iter().find(|r| r.key.key_id() == key_id)
    }

    /// Every key of the ring: the current one first, then the earlier ones (not the revoked).
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The revoked keys.
    pub fn revoked(&self) -> &[Revocation] {
        &self.revoked
    }

    /// Whether `key_id` names a key of the ring (not a revoked one).
    pub fn holds(&self, key_id: &str) -> bool {
        self.keys.iter().any(|k| k.key_id() == key_id)
    }
}

/// What a text that is no Ed25519 private key holds instead, in words: the PKCS#8 parser's
/// own errors name the algorithm it expected, or a "NUL byte" for a file that is no PEM.
fn not_a_signing_key(pem: &str) -> String {
    const NEEDED: &str = "an Ed25519 private key in PKCS#8 PEM (-----BEGIN PRIVATE KEY-----) \
                          is needed, as `dsrctl pki init` writes them (*-signing.key)";
    let label = pem
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"));
    match label {
        None => format!("the file holds no PEM block: {NEEDED}"),
        Some("PRIVATE KEY") => format!(
            "the file holds a PKCS#8 private key of another algorithm (a TLS key, such as \
             P-256 or RSA?), or a damaged one: {NEEDED}"
        ),
        Some(other) => format!("the file holds a PEM {other}, not a private key: {NEEDED}"),
    }
}

#[cfg(test)]
mod tests {
    /// A file that is no Ed25519 key says what it holds instead.
    #[test]
    fn a_file_that_is_no_signing_key_says_what_it_holds() {
        let tls_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let certificate = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        for (text, says) in [
            ("listen = \"127.0.0.1:1\"\n", "holds no PEM block"),
            (
                tls_key.as_str(),
                "a PKCS#8 private key of another algorithm",
            ),
            (certificate, "holds a PEM CERTIFICATE, not a private key"),
        ] {
            let err = super::SigningKey::from_pem(text).err().unwrap().to_string();
            assert!(err.contains(says) && err.contains("Ed25519"), "{err}");
        }
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn a_key_ring_checks_a_document_with_the_key_its_key_id_names() {
        let (old, new, stranger) = (
            SigningKey::generate(),
            SigningKey::generate(),
            SigningKey::generate(),
        );
        let ring = KeyRing::new(new.public_key(), vec![old.public_key()]).unwrap();
        let body = canonical_json(&json!({"a": 1})).unwrap();
        assert!(ring.verify(&old.sign(body.clone())).is_ok());
        assert!(ring.verify(&new.sign(body.clone())).is_ok());
        assert!(ring.holds(&old.public_key().key_id()));
        assert_eq!(
            ring.verify(&stranger.sign(body.clone())),
            Err(VerifyError::WrongKey {
                found: stranger.public_key().key_id(),
                expected: new.public_key().key_id(),
            })
        );
        // A document that names an old key but was signed with another fails its signature.
        let mut forged = stranger.sign(body);
        forged.key_id = old.public_key().key_id();
        assert_eq!(ring.verify(&forged), Err(VerifyError::BadSignature));
        let err = KeyRing::new(new.public_key(), vec![old.public_key(), new.public_key()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("previous key 1 is the current key again"),
            "{err}"
        );
        let err = KeyRing::new(new.public_key(), vec![old.public_key(), old.public_key()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("previous key 1 is previous key 0 again"),
            "{err}"
        );
    }

    /// A revoked key verifies what was received before its revocation and nothing after,
    /// whatever the document says of its own date; it is no key of the ring's to hand on
    /// once revoked.
    #[test]
    fn a_revoked_key_verifies_only_what_was_received_before_its_revocation() {
        let (leaked, new) = (SigningKey::generate(), SigningKey::generate());
        let at = parse_revoked_at("2026-11-30T12:00:00Z").unwrap();
        assert_eq!(at, 1_796_040_000_000);
        let revoked = Revocation {
            key: leaked.public_key(),
            revoked_at_ms: at,
        };
        let ring = KeyRing::new(new.public_key(), vec![])
            .unwrap()
            .with_revoked(vec![revoked.clone()])
            .unwrap();
        // Dated long before the revocation: the holder of a leaked key can write any date.
        let doc = leaked.sign(canonical_json(&json!({"signed_at": "2020-01-01"})).unwrap());
        assert!(ring.verify_received(&doc, at - 1).is_ok());
        let late = VerifyError::Revoked {
            key_id: leaked.public_key().key_id(),
            revoked_at: "2026-11-30T12:00:00Z".into(),
        };
        assert_eq!(ring.verify_received(&doc, at), Err(late.clone()));
        assert_eq!(
            ring.verify_received(&doc, at + 86_400_000),
            Err(late.clone())
        );
        let text = late.to_string();
        assert!(text.contains("revoked at 2026-11-30T12:00:00Z"), "{text}");
        // Without a time of receipt, a revoked key verifies nothing.
        assert!(matches!(
            ring.verify(&doc),
            Err(VerifyError::WrongKey { .. })
        ));
        assert!(!ring.holds(&doc.key_id));
        // The current key is unaffected, whenever received.
        let fresh = new.sign(canonical_json(&json!({"a": 1})).unwrap());
        assert!(ring.verify_received(&fresh, at + 1).is_ok());
        // The ring as of a time holds the revoked key only before its revocation.
        assert!(ring.as_of(at - 1).verify(&doc).is_ok());
        assert_eq!(ring.as_of(at - 1).keys().len(), 2);
        assert_eq!(ring.as_of(at).keys(), &[new.public_key()]);
        assert!(ring.revoked_error(&doc.key_id, at - 1).is_none());
        assert!(ring.revoked_error(&doc.key_id, at).is_some());
        // A key trusted and revoked at once, or revoked twice, is a mistake in the settings.
        let err = KeyRing::new(new.public_key(), vec![leaked.public_key()])
            .unwrap()
            .with_revoked(vec![revoked.clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("revoked key 0 is previous key 0 too"), "{err}");
        let err = (ring.clone().with_revoked(vec![revoked]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("revoked key 0 is revoked key 0 again"),
            "{err}"
        );
        assert!(parse_revoked_at("2026-11-30").is_err());
        assert_eq!(parse_revoked_at("2026-11-30T13:00:00+01:00").unwrap(), at);
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let v = json!({"b": [1, {"z": null, "a": true}], "a": "x\"y\\\n\u{1}é€", "": -3});
        assert_eq!(
            String::from_utf8(canonical_json(&v).unwrap()).unwrap(),
            r#"{"":-3,"a":"x\"y\\\n\u0001é€","b":[1,{"a":true,"z":null}]}"#
        );
        // UTF-16 order, as JCS asks: U+E000 sorts before U+1F600 (a surrogate pair).
        let v = json!({"\u{1F600}": 1, "\u{E000}": 2});
        assert_eq!(
            String::from_utf8(canonical_json(&v).unwrap()).unwrap(),
            "{\"\u{1F600}\":1,\"\u{E000}\":2}"
        );
        assert!(canonical_json(&json!({"a": 1.5})).is_err());
    }

    fn document() -> (SigningKey, Signed) {
        let key = SigningKey::generate();
        let body =
            to_canonical_json(&json!({"kind": "erasure", "count": 3, "note": "ok"})).unwrap();
        let doc = key.sign(body);
        (key, doc)
    }

    #[test]
    fn every_changed_byte_fails_verification() {
        let (key, doc) = document();
        let public = key.public_key();
        assert!(public.verify(&doc).is_ok());
        for i in 0..doc.body.len() {
            let mut bad = doc.clone();
            bad.body[i] ^= 0x01;
            assert!(public.verify(&bad).is_err(), "body byte {i}");
        }
        for i in 0..doc.signature.len() {
            let mut bad = doc.clone();
            bad.signature[i] ^= 0x80;
            assert_eq!(
                public.verify(&bad),
                Err(VerifyError::BadSignature),
                "signature byte {i}"
            );
        }
        let other = SigningKey::generate().public_key();
        assert!(matches!(
            other.verify(&doc),
            Err(VerifyError::WrongKey { .. })
        ));
        // Another key that claims this key's id still fails on the signature.
        let forged = SigningKey::generate().sign(doc.body.clone());
        let forged = Signed {
            key_id: doc.key_id.clone(),
            ..forged
        };
        assert_eq!(public.verify(&forged), Err(VerifyError::BadSignature));
    }

    #[test]
    fn keys_and_documents_survive_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let (key, doc) = document();
        let path = dir.path().join("signing.key");
        key.write(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = SigningKey::load(&path).unwrap();
        assert_eq!(loaded.public_key(), key.public_key());
        let pub_path = public_key_path(&path);
        assert_eq!(pub_path, dir.path().join("signing.pub.pem"));
        let public = PublicKey::from_config(pub_path.to_str().unwrap()).unwrap();
        assert_eq!(public, key.public_key());
        assert_eq!(
            PublicKey::from_config(&key.public_key().to_base64()).unwrap(),
            public
        );
        assert!(PublicKey::from_config("no such key").is_err());
        assert!(PublicKey::parse(&BASE64.encode([1u8; 31])).is_err());

        let text = doc.to_file_json().unwrap();
        let back = Signed::from_file_json(&text).unwrap();
        assert_eq!(back, doc);
        assert!(public.verify(&back).is_ok());
        assert!(Signed::from_file_json("{\"body\": \"{}\"}").is_err());
    }

    /// A key file as this crate wrote it before it wrote version 1: PKCS#8 version 2, with
    /// the public key (`SigningKey::to_pem` of the key whose 32 bytes are all 7).
    const V2_PEM: &str = "-----BEGIN PRIVATE KEY-----
MFECAQEwBQYDK2VwBCIEIAcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcH
gSEA6kpsY+KcUgq+9VB7Ey7F+ZVHdq6+vnuSQh7qaRRG0iw=
-----END PRIVATE KEY-----
";

    /// The DER inside a PEM's base64 lines.
    fn der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        BASE64.decode(body).unwrap()
    }

    #[test]
    fn key_files_are_pkcs8_version_1_and_version_2_files_still_load() {
        let seven = SigningKey {
            key: ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]),
        };
        // RFC 8410 section 10.3: SEQUENCE { INTEGER 0, { id-Ed25519 }, OCTET STRING {
        // OCTET STRING (32 bytes) } }, and nothing after the private key.
        let mut v1 = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        v1.extend_from_slice(&[7u8; 32]);
        let pem = seven.to_pem().unwrap();
        assert_eq!(der(&pem), v1, "{pem}");
        assert_eq!(
            SigningKey::from_pem(&pem).unwrap().public_key(),
            seven.public_key()
        );

        // Version 2 (INTEGER 1, and the public key after the private key) still loads.
        assert_eq!(der(V2_PEM)[2..5], [0x02, 0x01, 0x01]);
        let old = SigningKey::from_pem(V2_PEM).unwrap();
        assert_eq!(old.public_key(), seven.public_key());
        assert_eq!(
            old.public_key().key_id(),
            "sha256:fe812c12f3ab4ce6ac5db69ac352f906cb1b11ef43fb33e252ef7ff552263889"
        );
        let doc = old.sign(b"{}".to_vec());
        assert!(seven.public_key().verify(&doc).is_ok());

        // A version 2 file whose public key is not the private key's is no key.
        let mut mismatched = der(V2_PEM);
        let last = mismatched.len() - 1;
        mismatched[last] ^= 1;
        let mismatched = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            BASE64.encode(mismatched)
        );
        assert!(SigningKey::from_pem(&mismatched).is_err());
    }

    #[test]
    fn a_signed_body_that_is_not_canonical_is_refused() {
        let key = SigningKey::generate();
        let doc = key.sign(b"{\"b\":1, \"a\":2}".to_vec());
        assert!(matches!(
            key.public_key().verify(&doc),
            Err(VerifyError::NotCanonical(_))
        ));
    }
}
