//! For the services' own tests (feature `test-support`) and this crate's: each test that
//! needs PostgreSQL runs on the server that `DSRELAY_TEST_POSTGRES_URL` names, the services'
//! in a fresh database. Without that server such a test is skipped locally but fails in CI,
//! so that CI cannot pass without having run on PostgreSQL ([`postgres_server`]).

/// The PostgreSQL server of the tests (`DSRELAY_TEST_POSTGRES_URL`). When it is not set:
/// `None`, said on stderr so that a skipped test shows, locally; a panic in CI (`CI=true`),
/// so that CI cannot pass without having run on PostgreSQL.
///
/// # Panics
/// In CI when the variable is not set.
pub fn postgres_server() -> Option<String> {
    let server = std::env::var("DSRELAY_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if server.is_none() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")),
            "PostgreSQL is required in CI: set DSRELAY_TEST_POSTGRES_URL to a server where the \
             tests may CREATE DATABASE"
        );
        eprintln!("SKIPPED on PostgreSQL: DSRELAY_TEST_POSTGRES_URL is not set");
    }
    server
}

/// Runs `test` with the URL of a fresh database (named `<service>_<random>`) and a fresh
/// folder.
pub async fn on_postgres<F, Fut>(service: &str, test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    on_postgres_created_with(service, "", test).await
}

/// [`on_postgres`] with `options` appended to the `CREATE DATABASE` (a collation, say). The
/// database is dropped once the test returns (a long-lived server, as a developer keeps, would
/// otherwise gather one per test run, gigabytes in a day), and kept when it panics, to look
/// at.
pub async fn on_postgres_created_with<F, Fut>(service: &str, options: &str, test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(server) = postgres_server() else {
        return;
    };
    let name = format!("{service}_{:016x}", fastrand::u64(..));
    let admin = crate::store::Db::connect(&server).await.expect("postgres");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"{options}"))
        .execute(&admin.pool)
        .await
        .expect("create database");
    admin.pool.close().await;
    let (base, _) = server.rsplit_once('/').expect("a database in the url");
    let query = server
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    let dir = tempfile::tempdir().expect("tempdir");
    test(format!("{base}/{name}{query}"), dir.path().to_path_buf()).await;
    // FORCE: a pool the test dropped may still be closing its connections.
    let admin = crate::store::Db::connect(&server).await.expect("postgres");
    if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&admin.pool)
        .await
    {
        eprintln!("test database {name} not dropped: {e}");
    }
    admin.pool.close().await;
}

/// Every log line of this process from the first [`captured_logs`] on, as the services write
/// them with `log_json = true` (the crates of dsrelay at DEBUG, others at INFO, the chatty
/// transport crates at WARN), for tests that check what logs hold. Nextest runs each test in
/// a process of its own; under `cargo test` the lines of the other tests of the binary are
/// among them, so a test looks for what only it logs (its request id, an address only it
/// uses).
#[derive(Clone)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// The lines so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// One sink per process: each added line goes at its end.
struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts capturing (on the first call; later calls share it) as the process's subscriber:
/// global, so that lines of every runtime thread are caught, not only the test's own.
///
/// # Panics
/// When another subscriber is the process's already, since its lines would not be caught.
pub fn captured_logs() -> CapturedLogs {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;

    static LOGS: std::sync::OnceLock<CapturedLogs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = std::sync::Arc::default();
        let sink = std::sync::Arc::clone(&buffer);
        let filter = Targets::new()
            .with_default(LevelFilter::INFO)
            .with_target("dsrelay", LevelFilter::DEBUG)
            .with_target("sqlx", LevelFilter::WARN)
            .with_target("h2", LevelFilter::WARN)
            .with_target("hyper", LevelFilter::WARN)
            .with_target("tower", LevelFilter::WARN);
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(move || Sink(std::sync::Arc::clone(&sink)));
        tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
            .expect("no other subscriber is this process's: its lines would not be captured");
        CapturedLogs(buffer)
    })
    .clone()
}
