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

// Removing a folder's emptied parents races with exports creating folders under them: a
// task's export of the same request (or another request's export under the same controller)
// may be making its folder while a removal prunes. The pruning uses `remove_dir`, which
// refuses a folder holding anything, so it takes only a folder that is empty at that very
// moment: it never removes another export's folder or files. What it can do is take a parent
// that a concurrent `create_dir_all` has just made (or found made) and not yet made the next
// folder in: that `create_dir_all` then fails, with NotFound (or AlreadyExists: std's answer
// when a `mkdir` found the folder there and it was gone when checked). So the folder of a
// task's export is created by `reset`, which tries again then; once the task's folder
// exists, it holds its parents in place (they are no longer empty), and its files are
// written into it.

/// Removes a task's export folder (`task_dir`) and everything in it, then its request's
/// folder and its controller's folder if that left them empty; one that is not there is
/// already gone. A parent that does not go (not empty: another export is in it) stays.
pub async fn remove(dir: &Path) -> std::io::Result<()> {
    remove_all(dir).await?;
    remove_emptied(dir.parent(), 2).await;
    Ok(())
}

/// Removes the folder holding every export of one request (`request_dir`) and everything in
/// it, then its controller's folder if that left it empty; one that is not there is already
/// gone.
pub async fn remove_request(
    data_dir: &Path,
    controller: &str,
    request_id: &str,
) -> std::io::Result<()> {
    let dir = request_dir(data_dir, controller, request_id);
    remove_all(&dir).await?;
    remove_emptied(dir.parent(), 1).await;
    Ok(())
}

async fn remove_all(dir: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes `dir` and up to `levels - 1` of its parents, from the bottom, while they are empty
/// (see the comment above [`remove`] for why only empty ones, and why that is safe).
async fn remove_emptied(mut dir: Option<&Path>, levels: usize) {
    for _ in 0..levels {
        let Some(d) = dir else { return };
        match tokio::fs::remove_dir(d).await {
            Ok(()) => {}
            // Gone already, taken by a concurrent removal whose pruning may have stopped
            // here: the parent may be empty now all the same.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Not empty (or not removable): its parents hold it, so they are not empty either.
            Err(_) => return,
        }
        dir = d.parent();
    }
}

/// How many times [`reset`] tries to create a task's folder: each failure needs a concurrent
/// removal to take a parent in the instant between two of its `mkdir`s.
const CREATE_TRIES: usize = 16;

/// Empties `sink`'s folder for a new run ([`ExportSink::reset`]), creating it and its
/// parents, and tries again when a concurrent removal of emptied folders took a parent it
/// had just made (see the comment above [`remove`]); a failure that lasts (a file standing
/// in a folder's place) is answered after the last try at the latest.
pub async fn reset(sink: &ExportSink) -> std::io::Result<()> {
    let mut tries = 1;
    loop {
        match sink.reset().await {
            Err(e) if raced(&e) && tries < CREATE_TRIES => tries += 1,
            other => return other,
        }
    }
}

/// Whether `create_dir_all` may have failed with `e` because a concurrent removal took a
/// folder it had just made (NotFound: the parent of its next `mkdir` is gone) or found made
/// (AlreadyExists: its `mkdir` found the folder there, which was gone when it checked).
fn raced(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::AlreadyExists
    )
}

/// Removes the empty request and controller folders under `data_dir`'s exports, such as
/// earlier versions left behind (they removed an export's own folder, not its emptied
/// parents); answers how many went. Task folders stay (an empty one is an export that has
/// just begun), and so does a folder that is not empty when it is removed; a controller's
/// folder that cannot be read is passed over.
pub fn remove_empty_folders(data_dir: &Path) -> std::io::Result<usize> {
    let controllers = match std::fs::read_dir(data_dir.join("exports")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let folders = |dir: &Path| -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    };
    let mut removed = 0;
    for controller in controllers
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
    {
        for request in folders(&controller) {
            removed += usize::from(std::fs::remove_dir(&request).is_ok());
        }
        removed += usize::from(std::fs::remove_dir(&controller).is_ok());
    }
    Ok(removed)
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

    /// The folder's files and the folders the path passes through under `data`.
    fn tree(data: &Path) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).expect("a folder") {
                let path = e.expect("an entry").path();
                let name = path.strip_prefix(base).expect("inside");
                out.push(name.display().to_string());
                if path.is_dir() {
                    walk(base, &path, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(data, data, &mut out);
        out.sort();
        out
    }

    fn written(data: &Path, key: &TaskKey) {
        let dir = task_dir(data, key);
        std::fs::create_dir_all(&dir).expect("export folder");
        std::fs::write(dir.join("export.json"), b"{}").expect("export file");
    }

    #[tokio::test]
    async fn removing_an_export_removes_the_folders_it_emptied() {
        let data = tempfile::tempdir().expect("tempdir");
        let data = data.path();
        let (a, b, other) = (key("c", "r", "a"), key("c", "r", "b"), key("c", "q", "a"));
        for k in [&a, &b, &other] {
            written(data, k);
        }
        // Another task's export in the request: the request's folder stays.
        remove(&task_dir(data, &a)).await.expect("removed");
        assert_eq!(
            tree(data),
            [
                "exports",
                "exports/c",
                "exports/c/q",
                "exports/c/q/a",
                "exports/c/q/a/export.json",
                "exports/c/r",
                "exports/c/r/b",
                "exports/c/r/b/export.json",
            ]
        );
        // Another request's export under the controller: the controller's folder stays.
        remove(&task_dir(data, &b)).await.expect("removed");
        assert_eq!(
            tree(data),
            [
                "exports",
                "exports/c",
                "exports/c/q",
                "exports/c/q/a",
                "exports/c/q/a/export.json",
            ]
        );
        // The last one: nothing is left but the exports folder.
        remove(&task_dir(data, &other)).await.expect("removed");
        assert_eq!(tree(data), ["exports"]);
        // Gone already: nothing to do, and nothing above the controller goes.
        remove(&task_dir(data, &other)).await.expect("gone");
        assert_eq!(tree(data), ["exports"]);
    }

    #[tokio::test]
    async fn removing_a_request_removes_its_controller_folder_once_empty() {
        let data = tempfile::tempdir().expect("tempdir");
        let data = data.path();
        for k in [key("c", "r", "a"), key("c", "r", "b"), key("c", "q", "a")] {
            written(data, &k);
        }
        remove_request(data, "c", "r").await.expect("removed");
        assert_eq!(
            tree(data),
            [
                "exports",
                "exports/c",
                "exports/c/q",
                "exports/c/q/a",
                "exports/c/q/a/export.json",
            ]
        );
        remove_request(data, "c", "q").await.expect("removed");
        assert_eq!(tree(data), ["exports"]);
        remove_request(data, "c", "q").await.expect("gone");
        assert_eq!(tree(data), ["exports"]);
    }

    /// Exports of several tasks of two requests of one controller, each made and removed
    /// again and again at the same time: the removals prune the folders they empty while the
    /// others create theirs under them, and every creation succeeds all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_removals_of_emptied_folders_do_not_fail_an_export() {
        let data = tempfile::tempdir().expect("tempdir");
        let exports: Vec<_> = (0..8)
            .map(|i| {
                let k = key("c", &format!("r{}", i % 2), &format!("s{i}"));
                let sink = sink(data.path(), &k, &[], &[]);
                tokio::spawn(async move {
                    for _ in 0..500 {
                        reset(&sink).await?;
                        tokio::fs::write(sink.dir().join("export.json"), b"{}").await?;
                        remove(sink.dir()).await?;
                    }
                    std::io::Result::Ok(())
                })
            })
            .collect();
        for export in exports {
            export
                .await
                .expect("the export")
                .expect("every creation succeeds");
        }
        assert_eq!(tree(data.path()), ["exports"]);
    }

    #[test]
    fn empty_folders_left_by_earlier_versions_are_removed() {
        let data = tempfile::tempdir().expect("tempdir");
        let data = data.path();
        assert_eq!(remove_empty_folders(data).expect("no exports folder"), 0);
        written(data, &key("kept", "r", "a"));
        // An export that has just begun: its empty folder stays.
        std::fs::create_dir_all(task_dir(data, &key("begun", "r", "a"))).expect("folder");
        for k in [
            key("kept", "q", "a"),
            key("gone", "r", "a"),
            key("gone", "q", "a"),
        ] {
            std::fs::create_dir_all(task_dir(data, &k).parent().expect("a request"))
                .expect("folder");
        }
        std::fs::create_dir_all(data.join("exports/empty")).expect("folder");
        std::fs::write(data.join("exports/stray"), b"").expect("a file");
        assert_eq!(remove_empty_folders(data).expect("removed"), 5);
        assert_eq!(
            tree(data),
            [
                "exports",
                "exports/begun",
                "exports/begun/r",
                "exports/begun/r/a",
                "exports/kept",
                "exports/kept/r",
                "exports/kept/r/a",
                "exports/kept/r/a/export.json",
                "exports/stray",
            ]
        );
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
