//! A SQLite holder file that SQLite opens read-only: the start fails naming it when the
//! connector writes, and a connection opened so while running is opened again after its
//! error, so that a retry after the fix succeeds without a restart.
//!
//! SQLite only: SQLite opens a file it cannot open for writing read-only without a word,
//! which PostgreSQL has no counterpart of.

use std::path::{Path, PathBuf};

use dsrelay_proto::v1::RequestKind;

use super::tests::{email, now, task, MAIJA};
use super::*;

/// A file made unwritable for as long as it lives: immutable (`chattr +i`, which stops root
/// too) where the filesystem and the user's capabilities allow, else without write
/// permission (which stops any other user). Written again when dropped, so that a failed
/// test leaves no immutable file behind.
struct Unwritable(PathBuf);

impl Unwritable {
    fn new(file: &Path) -> Self {
        let immutable = std::process::Command::new("chattr")
            .arg("+i")
            .arg(file)
            .status()
            .is_ok_and(|s| s.success());
        if !immutable {
            let mut perms = std::fs::metadata(file).unwrap().permissions();
            perms.set_readonly(true);
            std::fs::set_permissions(file, perms).unwrap();
        }
        let guard = Self(file.to_path_buf());
        assert!(
            std::fs::OpenOptions::new().write(true).open(file).is_err(),
            "{} could not be made unwritable here (neither chattr +i nor the permissions stop \
             this user)",
            file.display()
        );
        guard
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
        if let Ok(meta) = std::fs::metadata(&self.0) {
            let mut perms = meta.permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            let _ = std::fs::set_permissions(&self.0, perms);
        }
    }
}

/// The sample holder in a fresh folder: the folder, the file and its url.
async fn sample_file() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("accounting.db");
    let url = format!("sqlite://{}", file.display());
    create_sample_accounting_db(&url).await.unwrap();
    // Connected once, so that the file has its receipt table and is in WAL mode, as a
    // holder the processor ran on has.
    close(SqlConnector::connect(sample_config(&url)).await.unwrap()).await;
    (dir, file, url)
}

/// Closes every pool of `connector`, so that no connection of this process holds the file.
async fn close(connector: SqlConnector) {
    for database in connector.db.iter().chain(connector.own.values()) {
        database.db.close().await;
    }
}

/// Closes the idle connections of `pool` one by one; the pool opens new ones when next used.
async fn close_connections(pool: &sqlx::AnyPool) {
    while pool.size() > 0 {
        pool.acquire().await.unwrap().close().await.unwrap();
    }
}

/// The operator's report: an immutable holder file was opened read-only and the processor
/// started without a word, every erasure then failing. Now the start fails naming the file
/// and what to check, whether the file cannot be written or the url asks for read-only.
#[tokio::test]
async fn a_holder_file_opened_read_only_fails_the_start() {
    let (_dir, file, url) = sample_file().await;
    let expected = format!("holder database {} is open read-only", file.display());
    let err = SqlConnector::connect(sample_config(&format!("{url}?mode=ro")))
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains(&expected), "{err}");
    for check in [
        "-wal and -shm",
        "immutable attribute",
        "read-only mount",
        "folder",
    ] {
        assert!(err.contains(check), "{check}: {err}");
    }
    {
        let _unwritable = Unwritable::new(&file);
        let err = SqlConnector::connect(sample_config(&url))
            .await
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains(&expected), "{err}");
    }
    // A controller's own database is checked too.
    let mut config = sample_config(&url);
    config.controllers.insert(
        "acme".into(),
        ControllerScope {
            condition: None,
            url: Some(format!("{url}?mode=ro")),
        },
    );
    let err = format!("{:#}", SqlConnector::connect(config).await.unwrap_err());
    assert!(err.contains(&expected), "{err}");
    // Writable again, it starts.
    close(SqlConnector::connect(sample_config(&url)).await.unwrap()).await;
}

/// A connector that only exports writes nothing, so a read-only holder is all it needs.
#[tokio::test]
async fn a_read_only_holder_of_a_connector_that_only_exports_starts() {
    let (_dir, _file, url) = sample_file().await;
    let mut config = sample_config(&url);
    for table in &mut config.tables {
        table.action = Action::Keep;
        table.anonymize.clear();
        table.retain = None;
        table.rectify.clear();
        table.restrict_column = None;
        table.suppress_column = None;
    }
    assert!(config.supports(RequestKind::ReturnOfData));
    assert!(!WRITING_KINDS.iter().any(|kind| config.supports(*kind)));
    let url = format!("{url}?mode=ro");
    config.url = url.clone();
    SqlConnector::connect(config).await.unwrap();
}

/// Another writer holding the holder's write lock at start does not fail the start: the
/// write cannot be tried then, and the file is not read-only for that.
#[tokio::test]
async fn a_holder_locked_by_another_writer_at_start_still_starts() {
    let (_dir, file, url) = sample_file().await;
    let other = rusqlite::Connection::open(&file).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let connected = SqlConnector::connect(sample_config(&url)).await;
    other.execute_batch("ROLLBACK").unwrap();
    connected.unwrap();
}

/// The operator's report, at run time: the holder's connection was opened while the file
/// could not be written, so every erasure failed with "attempt to write a readonly
/// database", and went on failing after the file was fixed, until a restart. Now the
/// failure closes that connection, and the retry after the fix opens the file again and
/// erases, on the same connector.
#[tokio::test]
async fn an_erasure_retried_after_a_read_only_holder_is_fixed_succeeds() {
    let (_dir, file, url) = sample_file().await;
    let connector = SqlConnector::connect(sample_config(&url)).await.unwrap();
    let db = &connector.db.as_ref().unwrap().db;
    assert_eq!(maijas_contacts(db).await, 2);
    // The connections go, as one does when a check of it fails, so that the next erasure
    // opens the file again, now while it cannot be written: SQLite then opens it read-only.
    // The readers go first and then the writer: SQLite keeps the descriptor of a connection
    // closed while another connection of the process holds the file, and gives it to the
    // next connection that asks for the same access, which would then write through it.
    close_connections(&db.reader).await;
    close_connections(&db.pool).await;
    let erasure = task(
        RequestKind::Erasure,
        vec![email(MAIJA)],
        now(),
        Phase::Start,
    );
    {
        let _unwritable = Unwritable::new(&file);
        for _ in 0..2 {
            let err = connector.run(&erasure).await.unwrap_err();
            let ConnectorError::Permanent(message) = &err else {
                panic!("{err:?}");
            };
            assert!(
                message.contains("attempt to write a readonly database")
                    && message.contains(execute::READ_ONLY_ADVICE),
                "{message}"
            );
        }
    }
    let outcome = connector.run(&erasure).await.unwrap();
    let Outcome::Retained {
        records_affected, ..
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(records_affected, 4);
    let check = Db::connect(&url).await.unwrap();
    assert_eq!(maijas_contacts(&check).await, 0);
    check.close().await;
}

/// The contact rows of Maija's customer row (two in the sample; her erasure deletes them).
async fn maijas_contacts(db: &Db) -> i64 {
    sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM contacts WHERE customer_id = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}
