//! Where the export of a RETURN_OF_DATA or TRANSFER task, or of a returning CONTRACT_END task,
//! is written: a folder of its own
//! under the configured `data_dir`, `exports/<controller>/<request_id>/<subprocessor>/`. The
//! connector writes the files there ([`ExportSink`]); the store keeps only their list (name,
//! media type, data categories, size, SHA-256) with the task, never their content.

use std::path::{Path, PathBuf};

use dsrelay_connectors::ExportSink;
use dsrelay_proto::v1::RequestKind;

use crate::store::TaskKey;

/// Whether every task of `kind` writes an export (a CONTRACT_END task writes one only when
/// its terms return the data first; the runner decides that itself).
pub fn exports(kind: RequestKind) -> bool {
    matches!(kind, RequestKind::ReturnOfData | RequestKind::Transfer)
}

/// The folder of `key`'s export under `data_dir`.
pub fn task_dir(data_dir: &Path, key: &TaskKey) -> PathBuf {
    data_dir
        .join("exports")
        .join(component(&key.controller))
        .join(component(&key.request_id))
        .join(component(&key.subprocessor))
}

/// The folder holding every export of one request (all its tasks) under `data_dir`.
pub fn request_dir(data_dir: &Path, controller: &str, request_id: &str) -> PathBuf {
    data_dir
        .join("exports")
        .join(component(controller))
        .join(component(request_id))
}

/// Removes an export folder (`task_dir` or `request_dir`) and everything in it; one that
/// is not there is already gone.
pub async fn remove(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The sink of `key`'s export, labelling files with the categories the subprocessor holds
/// that the request concerns (all it holds when the request names none).
pub fn sink(data_dir: &Path, key: &TaskKey, held: &[String], requested: &[String]) -> ExportSink {
    let categories = held
        .iter()
        .filter(|c| requested.is_empty() || requested.contains(c))
        .cloned()
        .collect();
    ExportSink::new(task_dir(data_dir, key), categories)
}

/// `value` as one safe path component: ASCII letters, digits, `-` and `_` stay, every other
/// byte becomes `%XX`, so that distinct names never share a folder and no name can climb out
/// (`..`, `/`) or hide (a leading `.`).
fn component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        // An empty name would merge the level above with the one below.
        out.push_str("%00");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(controller: &str, request_id: &str, subprocessor: &str) -> TaskKey {
        TaskKey {
            controller: controller.into(),
            request_id: request_id.into(),
            subprocessor: subprocessor.into(),
        }
    }

    #[test]
    fn every_task_gets_its_own_folder_inside_the_data_dir() {
        let base = Path::new("/data");
        assert_eq!(
            task_dir(base, &key("controller", "0190-ab", "accounting")),
            Path::new("/data/exports/controller/0190-ab/accounting")
        );
        let odd = task_dir(base, &key("../..", "a/b", ".hidden"));
        assert_eq!(
            odd,
            Path::new("/data/exports/%2E%2E%2F%2E%2E/a%2Fb/%2Ehidden")
        );
        assert_ne!(
            task_dir(base, &key("a b", "r", "s")),
            task_dir(base, &key("a%20b", "r", "s"))
        );
        assert_eq!(component(""), "%00");
    }

    #[test]
    fn files_carry_the_held_categories_the_request_asks_for() {
        let held = vec!["contact".to_string(), "invoicing".to_string()];
        let k = key("c", "r", "s");
        let all = sink(Path::new("/d"), &k, &held, &[]);
        let some = sink(
            Path::new("/d"),
            &k,
            &held,
            &["invoicing".into(), "x".into()],
        );
        assert_eq!(all.dir(), task_dir(Path::new("/d"), &k));
        assert_eq!(all.categories(), held);
        assert_eq!(some.dir(), task_dir(Path::new("/d"), &k));
        assert_eq!(some.categories(), ["invoicing".to_string()]);
    }
}
