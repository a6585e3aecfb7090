//! The canonical manifest of one part of a transfer: what the receipt's `manifest_sha256`
//! is the SHA-256 of, so sender (the processor) and recipient compute the same digest from
//! the same headers (the rule is stated in `proto/dsrelay/v1/transfer.proto`,
//! `TransferReceipt`). It lives here, in one place, because both sides must agree on it byte
//! for byte.

use dsrelay_proto::v1::ExportFileHeader;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The manifest's top level; field order is the canonical key order.
#[derive(Serialize)]
struct Manifest<'a> {
    request_id: &'a str,
    subprocessor: &'a str,
    files: Vec<File<'a>>,
}

/// One file; field order is the canonical key order.
#[derive(Serialize)]
struct File<'a> {
    name: &'a str,
    media_type: &'a str,
    categories: &'a [String],
    size: u64,
    sha256: &'a str,
}

/// The canonical manifest's bytes: compact JSON, keys in the documented order, files in the
/// order given.
pub fn canonical_json(request_id: &str, subprocessor: &str, files: &[ExportFileHeader]) -> Vec<u8> {
    let m = Manifest {
        request_id,
        subprocessor,
        files: files
            .iter()
            .map(|f| File {
                name: &f.name,
                media_type: &f.media_type,
                categories: &f.categories,
                size: f.size,
                sha256: &f.sha256,
            })
            .collect(),
    };
    // Serializing borrowed strings and integers into memory cannot fail.
    serde_json::to_vec(&m).unwrap_or_default()
}

/// SHA-256 of [`canonical_json`], 64 lowercase hex digits.
pub fn sha256(request_id: &str, subprocessor: &str, files: &[ExportFileHeader]) -> String {
    hex::encode(Sha256::digest(canonical_json(
        request_id,
        subprocessor,
        files,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_form_is_pinned() {
        let f = ExportFileHeader {
            request_id: "r1".into(),
            subprocessor: "crm".into(),
            name: "export.json".into(),
            media_type: "application/json".into(),
            categories: vec!["contact".into(), "say \"hi\"".into()],
            size: 12,
            sha256: "ab".repeat(32),
        };
        let json = String::from_utf8(canonical_json("r1", "crm", &[f])).unwrap();
        assert_eq!(
            json,
            format!(
                "{{\"request_id\":\"r1\",\"subprocessor\":\"crm\",\"files\":[{{\"name\":\
                 \"export.json\",\"media_type\":\"application/json\",\"categories\":\
                 [\"contact\",\"say \\\"hi\\\"\"],\"size\":12,\"sha256\":\"{}\"}}]}}",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            sha256("r1", "crm", &[]),
            hex::encode(Sha256::digest(
                br#"{"request_id":"r1","subprocessor":"crm","files":[]}"#
            ))
        );
    }
}
