//! `dsrctl receipt get` and `dsrctl receipt verify`: transfer recipients' signed receipts.
//!
//! A receipt's signature covers a body rebuilt from its fields
//! (`dsrelay_runtime::transfer_receipt::signed_body`), not carried with it, so the file
//! `get` writes ([`ReceiptFile`]) holds every field that body is built from, the signature
//! (base64) and its key id. `verify` rebuilds the receipt from such a file and checks it
//! offline against the recipient's public key, as the registry does: a receipt naming its
//! sender over the version 2 body, one naming none (an older recipient's) over version 1.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use dsrelay_proto::prost_types::Timestamp;
use dsrelay_proto::v1::TransferReceipt;
use dsrelay_runtime::signing::{KeyRing, PublicKey};
use dsrelay_runtime::transfer_receipt;
use serde::{Deserialize, Serialize};

use crate::cli::{OutputFormat, ReceiptGetArgs, ReceiptVerifyArgs};
use crate::commands::{Io, Registry};
use crate::table::clean;
use crate::Failure;

/// The file form of a [`TransferReceipt`]: its fields under their proto names, the
/// signature as base64 and `received_at` as RFC 3339 to the nanosecond (null when unset), so
/// the receipt is rebuilt exactly. `sender` is left out when empty, so the file of a receipt
/// signed over the version 1 body reads as it did before the field existed, and such a file
/// (written by an older dsrctl, say) reads with an empty sender. Unknown fields are refused:
/// a document of another kind (`dsrctl get --json`'s, say) is not taken for a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReceiptFile {
    request_id: String,
    subprocessor: String,
    recipient: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    sender: String,
    bytes: u64,
    files: u32,
    manifest_sha256: String,
    received_at: Option<String>,
    key_id: String,
    signature: String,
}

impl ReceiptFile {
    fn from_proto(r: &TransferReceipt) -> anyhow::Result<Self> {
        let received_at = match &r.received_at {
            None => None,
            Some(t) => {
                let at = u32::try_from(t.nanos)
                    .ok()
                    .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
                    .ok_or_else(|| anyhow!("received_at {t:?} is no point in time"))?;
                Some(at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
            }
        };
        Ok(Self {
            request_id: r.request_id.clone(),
            subprocessor: r.subprocessor.clone(),
            recipient: r.recipient.clone(),
            sender: r.sender.clone(),
            bytes: r.bytes,
            files: r.files,
            manifest_sha256: r.manifest_sha256.clone(),
            received_at,
            key_id: r.key_id.clone(),
            signature: BASE64.encode(&r.signature),
        })
    }

    fn to_proto(&self) -> anyhow::Result<TransferReceipt> {
        let received_at = match &self.received_at {
            None => None,
            Some(text) => {
                let at = DateTime::parse_from_rfc3339(text)
                    .with_context(|| format!("received_at {text:?} is not RFC 3339"))?
                    .with_timezone(&Utc);
                Some(Timestamp {
                    seconds: at.timestamp(),
                    nanos: i32::try_from(at.timestamp_subsec_nanos())
                        .context("received_at's nanoseconds")?,
                })
            }
        };
        Ok(TransferReceipt {
            request_id: self.request_id.clone(),
            subprocessor: self.subprocessor.clone(),
            manifest_sha256: self.manifest_sha256.clone(),
            bytes: self.bytes,
            files: self.files,
            received_at,
            recipient: self.recipient.clone(),
            signature: BASE64
                .decode(self.signature.as_bytes())
                .context("signature is not base64")?,
            key_id: self.key_id.clone(),
            sender: self.sender.clone(),
        })
    }
}

/// Fetches the request, picks the one task with a receipt (narrowed by `--processor` and
/// `--subprocessor`) and writes its receipt to `--out`. Refuses (exit 1, no file) an
/// unsigned receipt: it attests nothing anyone can check.
pub(crate) async fn get(
    registry: &Registry,
    args: &ReceiptGetArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let request = registry
        .client
        .get(args.id.as_str())
        .await
        .map_err(|s| registry.failed(s))?;
    let wanted = |name: &str, filter: &Option<String>| filter.as_deref().is_none_or(|f| f == name);
    let found: Vec<(&str, &str, &TransferReceipt)> = request
        .tasks
        .iter()
        .filter(|t| wanted(&t.processor, &args.processor))
        .filter(|t| wanted(&t.subprocessor, &args.subprocessor))
        .filter_map(|t| {
            let receipt = t.evidence.as_ref()?.transfer_receipt.as_ref()?;
            Some((t.processor.as_str(), t.subprocessor.as_str(), receipt))
        })
        .collect();
    let tasks: BTreeSet<(&str, &str)> = found.iter().map(|(p, s, _)| (*p, *s)).collect();
    if tasks.len() > 1 {
        let names: Vec<String> = tasks.iter().map(|(p, s)| format!("{p}/{s}")).collect();
        return Err(Failure::Usage(format!(
            "receipts of {} tasks match ({}); name one with --processor and --subprocessor",
            tasks.len(),
            names.join(", ")
        )));
    }
    let Some((processor, subprocessor, receipt)) = found.first() else {
        return Err(Failure::Receipt(anyhow!(
            "request {} has no transfer receipt{}",
            args.id,
            match (&args.processor, &args.subprocessor) {
                (None, None) => String::new(),
                (p, s) => format!(
                    " from {}/{}",
                    p.as_deref().unwrap_or("*"),
                    s.as_deref().unwrap_or("*")
                ),
            }
        )));
    };
    if receipt.signature.is_empty() {
        return Err(Failure::Receipt(anyhow!(
            "the receipt of {processor}/{subprocessor} is not signed by the recipient (the \
             registry keeps a signature only when its [[recipients]] entry has a public_key \
             that verified it, and drops it when the request is forgotten); it attests \
             nothing that can be checked"
        )));
    }
    let file = ReceiptFile::from_proto(receipt).map_err(Failure::Receipt)?;
    let text = serde_json::to_string_pretty(&file).map_err(|e| Failure::Receipt(e.into()))? + "\n";
    std::fs::write(&args.out, text)
        .with_context(|| format!("writing {}", args.out.display()))
        .map_err(Failure::Receipt)?;
    match io.format {
        OutputFormat::Json => {
            let summary = serde_json::json!({
                "request_id": receipt.request_id,
                "processor": processor,
                "subprocessor": subprocessor,
                "recipient": receipt.recipient,
                "sender": receipt.sender,
                "key_id": receipt.key_id,
                "file": args.out.display().to_string(),
            });
            writeln!(io.out, "{summary}")?;
        }
        OutputFormat::Table => writeln!(
            io.out,
            "receipt of {}/{} by recipient {}{} (signed with key {}) written to {}",
            clean(processor),
            clean(subprocessor),
            clean(&receipt.recipient),
            sent_by(&receipt.sender),
            clean(&receipt.key_id),
            args.out.display()
        )?,
    }
    Ok(0)
}

/// Checks a receipt file against a public key, with no server; exit 1 when it is unsigned or
/// does not verify. `key` is the `--public-key` flag (or `--key`): here the recipient's
/// public key, not a TLS key.
pub(crate) fn verify(
    args: &ReceiptVerifyArgs,
    key: Option<&Path>,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let key = super::certificate::public_key_arg(key, "recipient")?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))
        .map_err(Failure::Setup)?;
    let receipt = read(&text)
        .with_context(|| args.file.display().to_string())
        .map_err(Failure::Receipt)?;
    check(&receipt, &key)
        .map_err(|e| Failure::Receipt(anyhow!("{} does not verify: {e}", args.file.display())))?;
    let attested = Attested::of(&receipt);
    match io.format {
        OutputFormat::Json => {
            let out = serde_json::json!({
                "verified": true,
                "key_id": receipt.key_id,
                "receipt": attested,
            });
            writeln!(io.out, "{out}")?;
        }
        OutputFormat::Table => write!(
            io.out,
            "verified: signed by key {}\n{}",
            clean(&receipt.key_id),
            attested.describe()
        )?,
    }
    Ok(0)
}

/// `, sent by <sender>` for a receipt that names its sender; nothing for one that does not.
fn sent_by(sender: &str) -> String {
    if sender.is_empty() {
        return String::new();
    }
    format!(", sent by {}", clean(sender))
}

/// The receipt a file written by `receipt get` holds.
fn read(text: &str) -> anyhow::Result<TransferReceipt> {
    let file: ReceiptFile = serde_json::from_str(text).context(
        "not a transfer receipt file as `dsrctl receipt get` writes it (request_id, \
         subprocessor, recipient, sender when the receipt names it, bytes, files, \
         manifest_sha256, received_at, key_id, signature)",
    )?;
    file.to_proto()
}

/// Why `receipt` does not hold as signed by `key`, if it does not: the check the registry
/// makes (`transfer_receipt::verify`), worded for a key given on the command line.
fn check(receipt: &TransferReceipt, key: &PublicKey) -> Result<(), String> {
    if receipt.signature.is_empty() {
        return Err("the receipt is not signed by the recipient: it attests nothing".into());
    }
    let ring = KeyRing::new(key.clone(), Vec::new()).map_err(|e| e.to_string())?;
    transfer_receipt::verify(receipt, &ring).map_err(|why| {
        if receipt.key_id == key.key_id() {
            format!("the receipt {why}")
        } else {
            format!(
                "the receipt is signed with key {}, not with the given public key {}",
                clean(&receipt.key_id),
                key.key_id()
            )
        }
    })
}

/// What a verified receipt attests: its signed fields, `received_at` to the millisecond as
/// the signature covers it, and `sender` empty when the receipt names none.
#[derive(Debug, Serialize)]
struct Attested {
    request_id: String,
    subprocessor: String,
    recipient: String,
    sender: String,
    bytes: u64,
    files: u32,
    manifest_sha256: String,
    received_at: Option<String>,
    key_id: String,
}

impl Attested {
    fn of(r: &TransferReceipt) -> Self {
        // The millisecond the body carries (`received_at_ms`): anything finer is unsigned.
        let received_at = r.received_at.as_ref().and_then(|t| {
            let ms = t
                .seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos) / 1_000_000);
            DateTime::from_timestamp_millis(ms)
                .map(|at| at.to_rfc3339_opts(SecondsFormat::Millis, true))
        });
        Self {
            request_id: r.request_id.clone(),
            subprocessor: r.subprocessor.clone(),
            recipient: r.recipient.clone(),
            sender: r.sender.clone(),
            bytes: r.bytes,
            files: r.files,
            manifest_sha256: r.manifest_sha256.clone(),
            received_at,
            key_id: r.key_id.clone(),
        }
    }

    /// One line per fact.
    fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "request          {}", clean(&self.request_id));
        let _ = writeln!(s, "subprocessor     {}", clean(&self.subprocessor));
        let _ = writeln!(s, "recipient        {}", clean(&self.recipient));
        let sender = match self.sender.as_str() {
            "" => "(not named by the recipient)".to_string(),
            named => clean(named),
        };
        let _ = writeln!(s, "sender           {sender}");
        let _ = writeln!(s, "bytes            {}", self.bytes);
        let _ = writeln!(s, "files            {}", self.files);
        let _ = writeln!(s, "manifest sha256  {}", clean(&self.manifest_sha256));
        let at = self.received_at.as_deref().unwrap_or("(not given)");
        let _ = writeln!(s, "received at      {at}");
        let _ = writeln!(s, "key id           {}", clean(&self.key_id));
        s
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_runtime::signing::SigningKey;

    use super::*;

    fn receipt() -> TransferReceipt {
        TransferReceipt {
            request_id: "r-1".into(),
            subprocessor: "accounting".into(),
            manifest_sha256: "ab".repeat(32),
            bytes: 1234,
            files: 2,
            received_at: Some(Timestamp {
                seconds: 1_796_558_400,
                nanos: 123_000_000,
            }),
            recipient: "new-bookkeeper".into(),
            ..Default::default()
        }
    }

    const SENDER: &str = "spiffe://dsrelay.dev/processor/payroll-bureau";

    fn file_of(r: &TransferReceipt) -> String {
        serde_json::to_string_pretty(&ReceiptFile::from_proto(r).unwrap()).unwrap()
    }

    /// The file holds every field of the receipt: read back, it is the same receipt, and
    /// so its signature still verifies.
    #[test]
    fn a_receipt_file_rebuilds_the_receipt_exactly() {
        let key = SigningKey::generate();
        let signed = transfer_receipt::sign(receipt(), &key).unwrap();
        let text = file_of(&signed);
        assert_eq!(read(&text).unwrap(), signed);
        assert_eq!(check(&signed, &key.public_key()), Ok(()));
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(file["received_at"], "2026-12-06T12:00:00.123Z");
        assert_eq!(file["key_id"], key.public_key().key_id().as_str());
        // Nanoseconds past the millisecond survive too, though the signature ignores them.
        let mut fine = signed.clone();
        fine.received_at.as_mut().unwrap().nanos = 123_456_789;
        assert_eq!(read(&file_of(&fine)).unwrap(), fine);
        let mut unset = signed;
        unset.received_at = None;
        assert_eq!(read(&file_of(&unset)).unwrap(), unset);
    }

    /// A changed field, another key and a missing signature each fail, saying which.
    #[test]
    fn only_the_recipient_s_signature_over_these_fields_verifies() {
        let key = SigningKey::generate();
        let signed = transfer_receipt::sign(receipt(), &key).unwrap();
        let mut changed = signed.clone();
        changed.bytes += 1;
        let why = check(&changed, &key.public_key()).unwrap_err();
        assert!(why.contains("does not match its fields"), "{why}");

        let other = SigningKey::generate().public_key();
        let why = check(&signed, &other).unwrap_err();
        assert!(
            why.contains(&format!("not with the given public key {}", other.key_id())),
            "{why}"
        );

        let why = check(&receipt(), &key.public_key()).unwrap_err();
        assert!(why.contains("not signed"), "{why}");
    }

    /// What `dsrctl get --json` prints, or any other document, is not read as a receipt.
    #[test]
    fn only_a_receipt_file_is_read() {
        let key = SigningKey::generate();
        let signed = transfer_receipt::sign(receipt(), &key).unwrap();
        let mut file: serde_json::Value = serde_json::from_str(&file_of(&signed)).unwrap();
        file["processor"] = "payroll-bureau".into();
        let err = read(&file.to_string()).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
        let err = read(r#"{"request_id":"r-1","state":"COMPLETED"}"#).unwrap_err();
        assert!(format!("{err:#}").contains("dsrctl receipt get"), "{err:#}");
    }

    /// The attested time is the millisecond the signature covers.
    #[test]
    fn what_a_receipt_attests_reads_one_fact_a_line() {
        let mut r = receipt();
        r.received_at.as_mut().unwrap().nanos = 123_456_789;
        r.key_id = format!("sha256:{}", "cd".repeat(32));
        let text = Attested::of(&r).describe();
        assert_eq!(
            text,
            format!(
                "request          r-1\n\
                 subprocessor     accounting\n\
                 recipient        new-bookkeeper\n\
                 sender           (not named by the recipient)\n\
                 bytes            1234\n\
                 files            2\n\
                 manifest sha256  {}\n\
                 received at      2026-12-06T12:00:00.123Z\n\
                 key id           sha256:{}\n",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
        r.received_at = None;
        assert!(Attested::of(&r)
            .describe()
            .contains("received at      (not given)\n"));
        r.sender = SENDER.into();
        assert!(Attested::of(&r).describe().contains(&format!(
            "recipient        new-bookkeeper\nsender           {SENDER}\n"
        )));
    }

    /// A receipt naming its sender (signed over the version 2 body) goes to a file that
    /// names it and back, and verifies; given another sender, or none, it does not. A
    /// receipt naming none (version 1) writes no `sender`, and a file without one, as older
    /// dsrctl wrote them, reads and verifies.
    #[test]
    fn both_versions_of_the_signed_body_verify() {
        let key = SigningKey::generate();
        let named = transfer_receipt::sign(
            TransferReceipt {
                sender: SENDER.into(),
                ..receipt()
            },
            &key,
        )
        .unwrap();
        let text = file_of(&named);
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(file["sender"], SENDER);
        assert_eq!(read(&text).unwrap(), named);
        assert_eq!(check(&named, &key.public_key()), Ok(()));
        for other in ["spiffe://dsrelay.dev/processor/other-bureau", ""] {
            let mut changed = file.clone();
            changed["sender"] = other.into();
            let why = check(&read(&changed.to_string()).unwrap(), &key.public_key()).unwrap_err();
            assert!(
                why.contains("does not match its fields"),
                "{other:?}: {why}"
            );
        }

        let unnamed = transfer_receipt::sign(receipt(), &key).unwrap();
        let text = file_of(&unnamed);
        assert!(!text.contains("sender"), "{text}");
        assert_eq!(read(&text).unwrap(), unnamed);
        assert_eq!(check(&unnamed, &key.public_key()), Ok(()));
    }
}
