//! The processor's own tests on PostgreSQL ([`dsrelay_runtime::testing`]), in databases
//! named `processor_…`.

/// Declares, for each `name` (an `async fn name(database_url: &str, dir: &Path)` of the
/// module), a module `name` with its test on SQLite and its test on PostgreSQL
/// ([`on_postgres`]).
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}/processor.db", dir.path().display());
                super::$name(&url, dir.path()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                crate::test_postgres::on_postgres(|url, dir| async move {
                    super::$name(&url, &dir).await
                })
                .await;
            }
        }
    )*};
}

/// Runs `test` with the URL of a fresh database and a fresh folder.
pub(crate) async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    dsrelay_runtime::testing::on_postgres("processor", test).await
}

/// [`on_postgres`] with `options` appended to the `CREATE DATABASE` (a collation, say).
pub(crate) async fn on_postgres_created_with<F, Fut>(options: &str, test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    dsrelay_runtime::testing::on_postgres_created_with("processor", options, test).await
}

/// Returns once a session on `pool`'s database waits for a lock another one holds: how a
/// test knows the statement it started is blocked behind the transaction it keeps open.
/// Panics when none does within ten seconds (the statement did not wait).
pub(crate) async fn until_waiting_for_a_lock(pool: &sqlx::AnyPool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no session waits for a lock"
        );
        let waiting: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
