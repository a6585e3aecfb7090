//! The signed body of a transfer receipt: what the recipient signs and the registry checks,
//! computed from the receipt's fields alike on both sides (the rule is stated in
//! `proto/dsrelay/v1/transfer.proto`, `TransferReceipt.signature`). The body is not carried:
//! each side rebuilds it from the fields, so a changed field breaks the signature.
//!
//! Two versions: a receipt naming its sender (`TransferReceipt.sender`) is signed over
//! version 2, which carries it; one that names none over version 1, byte for byte the body
//! recipients signed before the field existed, so their receipts still verify.

use anyhow::Result;
use dsrelay_proto::v1::TransferReceipt;
use serde::Serialize;

use crate::signing::{to_canonical_json, KeyRing, Signed, SigningKey, VerifyError};

/// The body's fields; serialized as canonical JSON, so the keys come out sorted.
#[derive(Serialize)]
struct Body<'a> {
    bytes: u64,
    files: u32,
    manifest_sha256: &'a str,
    received_at_ms: i64,
    recipient: &'a str,
    request_id: &'a str,
    /// Left out of version 1: its bytes must stay what older recipients signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    sender: Option<&'a str>,
    subprocessor: &'a str,
    version: u32,
}

/// The canonical JSON `receipt`'s signature covers: version 2, with `"sender"`, when the
/// receipt names its sender, else version 1.
pub fn signed_body(receipt: &TransferReceipt) -> Result<Vec<u8>> {
    let received_at_ms = receipt.received_at.as_ref().map_or(0, |t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos) / 1_000_000)
    });
    let sender = (!receipt.sender.is_empty()).then_some(receipt.sender.as_str());
    to_canonical_json(&Body {
        bytes: receipt.bytes,
        files: receipt.files,
        manifest_sha256: &receipt.manifest_sha256,
        received_at_ms,
        recipient: &receipt.recipient,
        request_id: &receipt.request_id,
        sender,
        subprocessor: &receipt.subprocessor,
        version: if sender.is_some() { 2 } else { 1 },
    })
}

/// `receipt` with its `signature` and `key_id` set by `key`.
pub fn sign(mut receipt: TransferReceipt, key: &SigningKey) -> Result<TransferReceipt> {
    let signed = key.sign(signed_body(&receipt)?);
    receipt.signature = signed.signature;
    receipt.key_id = signed.key_id;
    Ok(receipt)
}

/// Whether `receipt` names a sender other than `identity`, the certificate identity of the
/// processor presenting it (`None` when that identity is not known): transfer.proto's rule,
/// which the processor, the registry's Acknowledge and its check of a processor's answers
/// all apply. An empty sender (a recipient that names none) passes.
pub fn names_other_sender(receipt: &TransferReceipt, identity: Option<&str>) -> bool {
    !receipt.sender.is_empty() && identity != Some(receipt.sender.as_str())
}

/// Whether `receipt`'s signature has the form transfer.proto states: none with no key id, or
/// 64 bytes with a key id `sha256:` and 64 lowercase hex digits. The registry refuses any
/// other, and the processor does not take one from a recipient.
pub fn signature_well_formed(receipt: &TransferReceipt) -> bool {
    let signed = !receipt.signature.is_empty() || !receipt.key_id.is_empty();
    !signed || (receipt.signature.len() == 64 && crate::signing::is_key_id(&receipt.key_id))
}

/// Whether `receipt.received_at` (when set) is in whole milliseconds, as the signed body
/// holds it: a finer or denormalised time would be stored and shown as other than what the
/// recipient signed.
pub fn received_in_whole_ms(receipt: &TransferReceipt) -> bool {
    receipt
        .received_at
        .as_ref()
        .is_none_or(|t| (0..1_000_000_000).contains(&t.nanos) && t.nanos % 1_000_000 == 0)
}

/// Why `receipt`'s signature does not hold under `keys`, if it does not: unsigned, signed
/// with a key outside the ring, or not over these fields.
pub fn verify(receipt: &TransferReceipt, keys: &KeyRing) -> Result<(), String> {
    if receipt.signature.is_empty() {
        return Err("is not signed by the recipient".into());
    }
    let body = signed_body(receipt).map_err(|e| format!("has no signable body: {e}"))?;
    let doc = Signed {
        body,
        signature: receipt.signature.clone(),
        key_id: receipt.key_id.clone(),
    };
    match keys.verify(&doc) {
        Ok(_) => Ok(()),
        // Named by the configured key only: the key id the receipt gives is the sender's text.
        Err(VerifyError::WrongKey { .. }) => Err(format!(
            "is not signed with the recipient's public_key {} or one of its \
             previous_public_keys",
            keys.current().key_id()
        )),
        Err(_) => Err("has a signature that does not match its fields".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsrelay_proto::prost_types::Timestamp;

    fn receipt() -> TransferReceipt {
        TransferReceipt {
            request_id: "r-1".into(),
            subprocessor: "crm".into(),
            manifest_sha256: "ab".repeat(32),
            bytes: 3,
            files: 1,
            received_at: Some(Timestamp {
                seconds: 1_796_558_400,
                nanos: 123_456_789,
            }),
            recipient: "new-bookkeeper".into(),
            ..Default::default()
        }
    }

    /// The body is pinned: a recipient in another language must produce these bytes.
    #[test]
    fn the_signed_body_is_canonical_json_of_the_receipt_s_fields() {
        let body = String::from_utf8(signed_body(&receipt()).unwrap()).unwrap();
        assert_eq!(
            body,
            format!(
                "{{\"bytes\":3,\"files\":1,\"manifest_sha256\":\"{}\",\
                 \"received_at_ms\":1796558400123,\"recipient\":\"new-bookkeeper\",\
                 \"request_id\":\"r-1\",\"subprocessor\":\"crm\",\"version\":1}}",
                "ab".repeat(32)
            )
        );
    }

    /// A receipt naming its sender is signed over version 2, which carries it between
    /// `request_id` and `subprocessor` (keys sorted); pinned like version 1.
    #[test]
    fn a_receipt_naming_its_sender_has_a_version_2_body() {
        let named = TransferReceipt {
            sender: "spiffe://example.org/processor/payroll-bureau".into(),
            ..receipt()
        };
        let body = String::from_utf8(signed_body(&named).unwrap()).unwrap();
        assert_eq!(
            body,
            format!(
                "{{\"bytes\":3,\"files\":1,\"manifest_sha256\":\"{}\",\
                 \"received_at_ms\":1796558400123,\"recipient\":\"new-bookkeeper\",\
                 \"request_id\":\"r-1\",\
                 \"sender\":\"spiffe://example.org/processor/payroll-bureau\",\
                 \"subprocessor\":\"crm\",\"version\":2}}",
                "ab".repeat(32)
            )
        );
    }

    /// The sender is signed: a version 2 receipt given another sender, or none (which
    /// would make it a version 1 body), no longer verifies; a version 1 receipt (a recipient
    /// that names no sender) still does.
    #[test]
    fn a_version_2_signature_covers_the_sender() {
        let key = SigningKey::generate();
        let ring = KeyRing::new(key.public_key(), vec![]).unwrap();
        let named = TransferReceipt {
            sender: "spiffe://example.org/processor/payroll-bureau".into(),
            ..receipt()
        };
        let signed = sign(named, &key).unwrap();
        assert_eq!(verify(&signed, &ring), Ok(()));
        for other in ["spiffe://example.org/processor/other-bureau", ""] {
            let changed = TransferReceipt {
                sender: other.into(),
                ..signed.clone()
            };
            let why = verify(&changed, &ring).unwrap_err();
            assert!(why.contains("does not match"), "{other:?}: {why}");
        }
        assert_eq!(verify(&sign(receipt(), &key).unwrap(), &ring), Ok(()));
    }

    /// A signed receipt verifies under its key; a changed field, an unsigned receipt and
    /// another key do not, each saying why.
    #[test]
    fn a_receipt_verifies_only_as_its_recipient_signed_it() {
        let key = SigningKey::generate();
        let ring = KeyRing::new(key.public_key(), vec![]).unwrap();
        let signed = sign(receipt(), &key).unwrap();
        assert_eq!(verify(&signed, &ring), Ok(()));
        let mut changed = signed.clone();
        changed.recipient = "evil-recipient".into();
        assert!(verify(&changed, &ring)
            .unwrap_err()
            .contains("does not match"));
        assert!(verify(&receipt(), &ring)
            .unwrap_err()
            .contains("not signed"));
        let other = sign(receipt(), &SigningKey::generate()).unwrap();
        assert!(verify(&other, &ring).unwrap_err().contains("public_key"));
    }
}
