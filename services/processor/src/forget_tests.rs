//! The forget worker's sweeps, through the processor's real store (SQLite, and PostgreSQL
//! when `DSRELAY_TEST_POSTGRES_URL` names a server) and data folder: requests that cannot be
//! forgotten do not hold back those behind them, however many come first; and an export
//! that ended without a delivery is removed by the sweep of retired exports when the step's
//! own removal did not happen (a crash right after the step, or a cancellation between
//! attempts, which removes nothing itself), with the request's and controller's folders it
//! emptied; and the empty folders an earlier version left go when the worker starts.

use std::collections::HashMap;

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{DeliverRequest, RequestKind, TaskState};
use dsrelay_runtime::pki::DevPki;

use crate::app::Shared;
use crate::store::{TaskKey, Transition};
use crate::{App, Config};

fn config(dir: &std::path::Path, database_url: &str) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let tls = pki.files("processor");
    let checkpoint_key = pki.signing_key("processor");
    let checkpoint_file = dir.join("audit/checkpoints.jsonl");
    let text = format!(
        "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
         forget_after_days = 0\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [audit]\ncheckpoint_key = {checkpoint_key:?}\ncheckpoint_file = {checkpoint_file:?}\n\
         [[subprocessors]]\nname = \"crm\"\ncategories = [\"contact\"]\n\
         connector = {{ type = \"noop\" }}\n\
         [[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/0\"\n\
         registry_endpoint = \"https://localhost:1\"\n",
        dir.join("data"),
        tls.ca,
        tls.cert,
        tls.key,
    );
    let file = dir.join("processor.toml");
    std::fs::write(&file, text).expect("config file");
    Config::load_from(Some(&file), Vec::new()).expect("config")
}

async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    test(url, dir.path().to_path_buf()).await;
}

async fn app(database_url: &str, dir: &std::path::Path) -> App {
    App::with_connectors(config(dir, database_url), HashMap::new())
        .await
        .expect("app")
}

/// Delivers `id` (of `kind`, at `at`) with one task at `crm`.
async fn deliver(shared: &Shared, id: &str, kind: RequestKind, at: i64) -> TaskKey {
    let req = DeliverRequest {
        request_id: id.into(),
        kind: kind as i32,
        due_at: Some(timestamp_from_millis(at + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, at)
        .await
        .expect("accept");
    TaskKey {
        controller: "acme".into(),
        request_id: id.into(),
        subprocessor: "crm".into(),
    }
}

async fn forgotten(shared: &Shared, id: &str) -> bool {
    let at: Option<i64> =
        sqlx::query_scalar("SELECT forgotten_at FROM requests WHERE request_id = $1")
            .bind(id)
            .fetch_one(&shared.store.db().pool)
            .await
            .expect("request");
    at.is_some()
}

/// A full batch of requests at the head of the queue whose export folder will not go (a
/// file stands where the folder is: removing it fails, also as root), and one behind them
/// that can be forgotten: one sweep forgets it, and leaves the others to the next.
async fn unforgettable_requests_do_not_hold_back_the_rest(url: &str, dir: &std::path::Path) {
    let app = app(url, dir).await;
    let shared = app.shared();
    let stuck = super::BATCH + 5;
    for i in 0..stuck {
        let id = format!("stuck-{i:03}");
        deliver(&shared, &id, RequestKind::Erasure, 1 + i).await;
        let path = crate::exports::request_dir(&shared.config.data_dir, "acme", &id);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("exports folder");
        std::fs::write(&path, b"not a folder").expect("a file in the folder's place");
    }
    deliver(&shared, "behind", RequestKind::Erasure, 1_000).await;
    sqlx::query("UPDATE tasks SET state = $1, updated_at = 2000")
        .bind(TaskState::Completed as i32)
        .execute(&shared.store.db().pool)
        .await
        .expect("all finished");
    let done = super::sweep(&shared).await.expect("sweep");
    assert_eq!(done, 1);
    assert!(forgotten(&shared, "behind").await);
    assert!(!forgotten(&shared, "stuck-000").await);
}

/// A step that ended an export without a delivery, its own removal of the folder missed
/// (the runner crashed right after the commit), and a cancellation between two attempts of
/// another export (the first one's partial files left in its folder): the sweep of retired
/// exports removes both folders and records them removed.
async fn undelivered_exports_are_swept(url: &str, dir: &std::path::Path) {
    let app = app(url, dir).await;
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let written = |key: &TaskKey| {
        let folder = crate::exports::task_dir(&shared.config.data_dir, key);
        std::fs::create_dir_all(&folder).expect("export folder");
        std::fs::write(folder.join("customers.json"), b"{}").expect("an export file");
        folder
    };

    let failed = deliver(&shared, "failed", RequestKind::ReturnOfData, now).await;
    let failed_folder = written(&failed);
    let t = Transition {
        state: TaskState::Failed,
        reason: "the export broke off".into(),
        discard_export: true,
        ..Default::default()
    };
    shared
        .store
        .transition(&failed, 1, &t, now, 1)
        .await
        .expect("step")
        .expect("recorded");

    let cancelled = deliver(&shared, "cancelled", RequestKind::Transfer, now).await;
    let cancelled_folder = written(&cancelled);
    let started = Transition {
        state: TaskState::InProgress,
        ..Default::default()
    };
    shared
        .store
        .transition(&cancelled, 1, &started, now, 1)
        .await
        .expect("step")
        .expect("recorded");
    let tasks = shared
        .store
        .cancel("acme", "cancelled", "withdrawn", now)
        .await
        .expect("cancel");
    assert_eq!(tasks[0].state, TaskState::Cancelled, "{tasks:?}");

    assert!(failed_folder.exists() && cancelled_folder.exists());
    super::remove_retired_exports(&shared).await.expect("sweep");
    assert!(!failed_folder.exists(), "the failed export is removed");
    assert!(
        !cancelled_folder.exists(),
        "the cancelled export is removed"
    );
    // Each was its request's only export, and they were the controller's only requests.
    assert!(
        !shared.config.data_dir.join("exports/acme").exists(),
        "the emptied request and controller folders are removed too"
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM uploads WHERE files_removed_at IS NULL",
    )
    .fetch_one(&shared.store.db().pool)
    .await
    .expect("uploads");
    assert_eq!(left, 0);
}

/// Two exports ended without a delivery, the first in the sweep's order one whose folder
/// will not go (a file stands in its place): the sweep removes the other and records it
/// removed, and leaves the first unrecorded, for the next sweep to try again.
async fn an_export_that_will_not_go_is_left_for_the_next_sweep(url: &str, dir: &std::path::Path) {
    let app = app(url, dir).await;
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let failed = Transition {
        state: TaskState::Failed,
        reason: "the export broke off".into(),
        discard_export: true,
        ..Default::default()
    };
    let mut folders = Vec::new();
    for id in ["a-stuck", "b-removable"] {
        let key = deliver(&shared, id, RequestKind::ReturnOfData, now).await;
        let folder = crate::exports::task_dir(&shared.config.data_dir, &key);
        std::fs::create_dir_all(folder.parent().expect("a parent")).expect("exports folder");
        shared
            .store
            .transition(&key, 1, &failed, now, 1)
            .await
            .expect("step")
            .expect("recorded");
        folders.push(folder);
    }
    std::fs::write(&folders[0], b"not a folder").expect("a file in the folder's place");
    std::fs::create_dir_all(&folders[1]).expect("export folder");
    std::fs::write(folders[1].join("customers.json"), b"{}").expect("an export file");

    super::remove_retired_exports(&shared).await.expect("sweep");
    assert!(folders[0].exists(), "nothing removed it");
    assert!(!folders[1].exists(), "the one behind is removed");
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT request_id FROM uploads WHERE files_removed_at IS NULL ORDER BY request_id",
    )
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("uploads");
    assert_eq!(left, ["a-stuck"]);
}

/// Empty request and controller folders that an earlier version left behind: the worker
/// removes them when it starts, and leaves an export's folder with its files.
async fn empty_export_folders_left_behind_go_at_start(url: &str, dir: &std::path::Path) {
    let app = app(url, dir).await;
    let shared = app.shared();
    let exports = shared.config.data_dir.join("exports");
    let left = [
        exports.join("acme/old-1"),
        exports.join("acme/old-2"),
        exports.join("gone"),
    ];
    for folder in &left {
        std::fs::create_dir_all(folder).expect("a folder left behind");
    }
    let kept = exports.join("other/r/crm");
    std::fs::create_dir_all(&kept).expect("export folder");
    std::fs::write(kept.join("customers.json"), b"{}").expect("an export file");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(super::run(shared.clone(), stopped));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while exports.join("acme").exists() || exports.join("gone").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the folders are still there"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    stop.send(true).expect("the worker listens");
    worker.await.expect("the worker");
    assert!(kept.join("customers.json").exists());
}

#[tokio::test]
async fn empty_export_folders_left_behind_go_at_start_on_sqlite() {
    on_sqlite(|u, d| async move { empty_export_folders_left_behind_go_at_start(&u, &d).await })
        .await;
}

#[tokio::test]
async fn empty_export_folders_left_behind_go_at_start_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        empty_export_folders_left_behind_go_at_start(&u, &d).await
    })
    .await;
}

#[tokio::test]
async fn an_export_that_will_not_go_is_left_for_the_next_sweep_on_sqlite() {
    on_sqlite(
        |u, d| async move { an_export_that_will_not_go_is_left_for_the_next_sweep(&u, &d).await },
    )
    .await;
}

#[tokio::test]
async fn an_export_that_will_not_go_is_left_for_the_next_sweep_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        an_export_that_will_not_go_is_left_for_the_next_sweep(&u, &d).await
    })
    .await;
}

#[tokio::test]
async fn unforgettable_requests_do_not_hold_back_the_rest_on_sqlite() {
    on_sqlite(|u, d| async move { unforgettable_requests_do_not_hold_back_the_rest(&u, &d).await })
        .await;
}

#[tokio::test]
async fn unforgettable_requests_do_not_hold_back_the_rest_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        unforgettable_requests_do_not_hold_back_the_rest(&u, &d).await
    })
    .await;
}

#[tokio::test]
async fn undelivered_exports_are_swept_on_sqlite() {
    on_sqlite(|u, d| async move { undelivered_exports_are_swept(&u, &d).await }).await;
}

#[tokio::test]
async fn undelivered_exports_are_swept_on_postgres() {
    crate::test_postgres::on_postgres(
        |u, d| async move { undelivered_exports_are_swept(&u, &d).await },
    )
    .await;
}
