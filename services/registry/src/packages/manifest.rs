//! `manifest.json`: what a package holds, as deterministic bytes (fields in a fixed order,
//! files sorted by path, no time of reading in it), so the same package always has the same
//! manifest and its SHA-256 names the package.

use chrono::{DateTime, SecondsFormat};
use dsrelay_proto::v1::{ManifestFile, RequestKind, TaskState};
use serde::Serialize;

use crate::store::PackageFile;

#[derive(Serialize)]
struct Manifest<'a> {
    request_id: &'a str,
    kind: &'a str,
    created_at: String,
    files: &'a [Entry],
    /// Left out when empty, so a package whose every holder returned its part keeps the
    /// manifest (and digest) it had before this list existed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_returned: Vec<NotReturned<'a>>,
}

/// A holder whose return ended without its part ([`build`]'s `not_returned`).
#[derive(Serialize)]
struct NotReturned<'a> {
    processor: &'a str,
    subprocessor: &'a str,
    state: &'a str,
}

#[derive(Serialize)]
struct Entry {
    path: String,
    processor: String,
    subprocessor: String,
    categories: Vec<String>,
    media_type: String,
    size: u64,
    sha256: String,
}

/// The manifest of `files` (in any order) as protocol entries in manifest order, and as
/// `manifest.json`. `not_returned` (processor, subprocessor, the task's state) are the
/// holders whose task ended FAILED, REFUSED or CANCELLED without a part: the manifest names
/// them, so that whoever opens the package sees whose data it lacks rather than taking it
/// for all.
pub(crate) fn build(
    request_id: &str,
    kind: RequestKind,
    created_at_ms: i64,
    files: &[PackageFile],
    not_returned: &[(String, String, TaskState)],
) -> (Vec<ManifestFile>, Vec<u8>) {
    let mut entries: Vec<Entry> = files
        .iter()
        .map(|f| Entry {
            path: path(f),
            processor: f.processor.clone(),
            subprocessor: f.subprocessor.clone(),
            // Written by the upload handler from a list of strings; unreadable means none.
            categories: serde_json::from_str(&f.categories).unwrap_or_default(),
            media_type: f.media_type.clone(),
            size: u64::try_from(f.size).unwrap_or(0),
            sha256: f.sha256.clone(),
        })
        .collect();
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let created_at = DateTime::from_timestamp_millis(created_at_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut not_returned: Vec<NotReturned> = not_returned
        .iter()
        .map(|(processor, subprocessor, state)| NotReturned {
            processor,
            subprocessor,
            state: state.as_str_name().trim_start_matches("TASK_STATE_"),
        })
        .collect();
    not_returned.sort_by_key(|n| (n.processor, n.subprocessor));
    let manifest = Manifest {
        request_id,
        kind: kind.as_str_name().trim_start_matches("REQUEST_KIND_"),
        created_at,
        files: &entries,
        not_returned,
    };
    let mut json = serde_json::to_vec_pretty(&manifest).expect("a manifest always encodes");
    json.push(b'\n');
    let files = entries
        .into_iter()
        .map(|e| ManifestFile {
            path: e.path,
            processor: e.processor,
            subprocessor: e.subprocessor,
            categories: e.categories,
            media_type: e.media_type,
            size: e.size,
            sha256: e.sha256,
        })
        .collect();
    (files, json)
}

/// A file's path in the package: `<processor>/<subprocessor>/<name>`.
pub(crate) fn path(f: &PackageFile) -> String {
    format!("{}/{}/{}", f.processor, f.subprocessor, f.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(sub: &str, name: &str) -> PackageFile {
        PackageFile {
            request_id: "r1".into(),
            processor: "payroll".into(),
            subprocessor: sub.into(),
            name: name.into(),
            media_type: "application/json".into(),
            categories: r#"["contact"]"#.into(),
            size: 12,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn the_same_files_in_any_order_give_the_same_bytes() {
        let a = [
            file("newsletter", "export.json"),
            file("accounting", "x.json"),
        ];
        let b = [a[1].clone(), a[0].clone()];
        let (files, json) = build("r1", RequestKind::ReturnOfData, 0, &a, &[]);
        let (_, again) = build("r1", RequestKind::ReturnOfData, 0, &b, &[]);
        assert_eq!(json, again);
        assert_eq!(files[0].path, "payroll/accounting/x.json");
        let text = String::from_utf8(json).unwrap();
        assert!(text.starts_with("{\n  \"request_id\": \"r1\",\n  \"kind\": \"RETURN_OF_DATA\",\n  \"created_at\": \"1970-01-01T00:00:00.000Z\","), "{text}");
        assert!(
            text.contains("\"categories\": [\n        \"contact\"\n      ]"),
            "{text}"
        );
        assert!(!text.contains("not_returned"), "{text}");
    }

    /// A package lacking a holder's part names the holder, in a fixed order.
    #[test]
    fn a_return_that_ended_without_its_part_is_named() {
        let failed = |s: &str, state| ("payroll".to_string(), s.to_string(), state);
        let not_returned = [
            failed("newsletter", TaskState::Refused),
            failed("crm", TaskState::Failed),
        ];
        let files = [file("accounting", "x.json")];
        let (_, json) = build("r1", RequestKind::ReturnOfData, 0, &files, &not_returned);
        let doc: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            doc["not_returned"],
            serde_json::json!([
                {"processor": "payroll", "subprocessor": "crm", "state": "FAILED"},
                {"processor": "payroll", "subprocessor": "newsletter", "state": "REFUSED"},
            ])
        );
        assert_eq!(doc["files"].as_array().unwrap().len(), 1);
    }
}
