//! Exports that end without a delivery, through the processor's real store (SQLite, and
//! PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server) and runner: their files do
//! not wait in the data folder for the request to be forgotten. A return of data cancelled
//! while its export is written (too late to stop the holder, so its files are written) is
//! CANCELLED and its folder removed; so is a transfer's export that fails for good after
//! writing part of its files. Each step leaves an upload retired unsent, recorded removed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dsrelay_connectors::{BoxFuture, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{DeliverRequest, RequestKind, TaskState, TransferRecipient};
use dsrelay_runtime::pki::DevPki;
use tokio::sync::{mpsc, oneshot};

use crate::app::Shared;
use crate::{App, Config};

/// Writes one file of the export, then waits until the test lets it go and answers
/// COMPLETED with the file, or fails for good when `fail`.
struct Exporter {
    entered: mpsc::UnboundedSender<oneshot::Sender<()>>,
    fail: bool,
}

impl Connector for Exporter {
    fn kind_name(&self) -> &'static str {
        "exporter"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let sink = task.export_sink()?;
            let mut out = sink
                .file("customers.json", dsrelay_connectors::export::JSON)
                .await?;
            out.write(b"{\"email\":\"subject@example.org\"}").await?;
            let file = out.finish().await?;
            let (release, released) = oneshot::channel();
            self.entered
                .send(release)
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            released
                .await
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            if self.fail {
                return Err(ConnectorError::Permanent("the export broke off".into()));
            }
            Ok(Outcome::Completed {
                records_affected: 1,
                note: "exported".into(),
                files: vec![file],
                erased: Vec::new(),
            })
        })
    }
}

fn config(dir: &std::path::Path, database_url: &str) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let tls = pki.files("processor");
    let checkpoint_key = pki.signing_key("processor");
    let checkpoint_file = dir.join("audit/checkpoints.jsonl");
    let text = format!(
        "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
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

/// A processor whose holder is an [`Exporter`], with one request `r-1` of `kind` delivered.
async fn setup(
    database_url: &str,
    dir: &std::path::Path,
    kind: RequestKind,
    fail: bool,
) -> (App, mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
    let (tx, entered) = mpsc::unbounded_channel();
    let exporter = Arc::new(Exporter { entered: tx, fail });
    let connectors = HashMap::from([("crm".to_string(), exporter as Arc<dyn Connector>)]);
    let app = App::with_connectors(config(dir, database_url), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: kind as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        recipient: (kind == RequestKind::Transfer).then(|| TransferRecipient {
            name: "new-crm".into(),
            endpoint: "https://localhost:1".into(),
            identity: "spiffe://dsrelay.dev/recipient/new-crm".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    (app, entered)
}

/// Runs `r-1`'s task until its holder has written the export and waits; answers the
/// runner and what lets the holder go.
async fn exporting(
    shared: &Arc<Shared>,
    entered: &mut mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    oneshot::Sender<()>,
) {
    let lease_ms = shared.config.tasks.lease_ms as i64;
    let job = shared
        .store
        .claim_tasks(shared.clock.now_ms(), 10, lease_ms)
        .await
        .expect("claim")
        .pop()
        .expect("a job");
    let runner = {
        let shared = shared.clone();
        tokio::spawn(async move { crate::runner::run_task(&shared, job).await })
    };
    let release = tokio::time::timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the holder is called")
        .expect("a call");
    (runner, release)
}

/// The task's export folder.
fn folder(shared: &Shared) -> std::path::PathBuf {
    let key = crate::store::TaskKey {
        controller: "acme".into(),
        request_id: "r-1".into(),
        subprocessor: "crm".into(),
    };
    crate::exports::task_dir(&shared.config.data_dir, &key)
}

/// `r-1`'s upload: whether it is retired, and whether its files are recorded removed.
async fn upload(shared: &Shared) -> Option<(bool, bool)> {
    let row: Option<(Option<i64>, Option<i64>)> =
        sqlx::query_as("SELECT done_at, files_removed_at FROM uploads WHERE request_id = 'r-1'")
            .fetch_optional(&shared.store.db().pool)
            .await
            .expect("upload");
    row.map(|(done, removed)| (done.is_some(), removed.is_some()))
}

async fn cancelled_while_exporting(database_url: &str, dir: &std::path::Path) {
    let (app, mut entered) = setup(database_url, dir, RequestKind::ReturnOfData, false).await;
    let shared = app.shared();
    let (runner, release) = exporting(&shared, &mut entered).await;
    assert!(folder(&shared).join("customers.json").exists());
    let tasks = shared
        .store
        .cancel("acme", "r-1", "withdrawn", shared.clock.now_ms())
        .await
        .expect("cancel");
    assert!(tasks[0].cancel_requested_at.is_some(), "{tasks:?}");
    release.send(()).expect("the call waits");
    runner.await.expect("runner").expect("step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Cancelled, "{task:?}");
    assert!(
        !folder(&shared).exists(),
        "the undelivered export is removed"
    );
    assert_eq!(upload(&shared).await, Some((true, true)));
}

async fn failed_while_exporting(database_url: &str, dir: &std::path::Path) {
    let (app, mut entered) = setup(database_url, dir, RequestKind::Transfer, true).await;
    let shared = app.shared();
    let (runner, release) = exporting(&shared, &mut entered).await;
    assert!(folder(&shared).join("customers.json").exists());
    release.send(()).expect("the call waits");
    runner.await.expect("runner").expect("step");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(task.state, TaskState::Failed, "{task:?}");
    assert!(!folder(&shared).exists(), "the partial export is removed");
    assert_eq!(upload(&shared).await, Some((true, true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_cancelled_while_written_is_removed_on_sqlite() {
    super::cancel_tests::on_sqlite(|u, d| async move { cancelled_while_exporting(&u, &d).await })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_cancelled_while_written_is_removed_on_postgres() {
    crate::test_postgres::on_postgres(
        |u, d| async move { cancelled_while_exporting(&u, &d).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_is_removed_on_sqlite() {
    super::cancel_tests::on_sqlite(|u, d| async move { failed_while_exporting(&u, &d).await })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_is_removed_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move { failed_while_exporting(&u, &d).await })
        .await;
}
