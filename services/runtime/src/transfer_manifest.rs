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

    #[test]
    fn non_ascii_is_raw_utf8_and_only_controls_are_escaped() {
        // The bytes a recipient in another language must produce (transfer.proto): non-ASCII
        // as its UTF-8, `/` and DEL as they are, \b \t \n \f \r short, other controls as
        // lowercase \u00XX.
        let f = ExportFileHeader {
            request_id: "r\u{e9}".into(),
            subprocessor: "crm".into(),
            name: "a/b.json".into(),
            media_type: "text/csv".into(),
            categories: vec![
                "Gesundheitsdaten f\u{fc}r \u{c4}rzte".into(),
                "\u{1f600}\t\n\u{1}\u{1f}\u{7f}\\\u{8}\u{c}\r".into(),
            ],
            size: 0,
            sha256: "00".repeat(32),
        };
        let mut expected = Vec::new();
        expected.extend_from_slice(b"{\"request_id\":\"r\xc3\xa9\",\"subprocessor\":\"crm\",");
        expected
            .extend_from_slice(b"\"files\":[{\"name\":\"a/b.json\",\"media_type\":\"text/csv\",");
        expected
            .extend_from_slice(b"\"categories\":[\"Gesundheitsdaten f\xc3\xbcr \xc3\x84rzte\",");
        expected.extend_from_slice(b"\"\xf0\x9f\x98\x80\\t\\n\\u0001\\u001f\x7f\\\\\\b\\f\\r\"],");
        expected.extend_from_slice(b"\"size\":0,\"sha256\":\"");
        expected.extend_from_slice("00".repeat(32).as_bytes());
        expected.extend_from_slice(b"\"}]}");
        assert_eq!(
            String::from_utf8_lossy(&canonical_json("r\u{e9}", "crm", &[f])),
            String::from_utf8_lossy(&expected)
        );
    }
}
