//! The processor's own tests on PostgreSQL: each runs in a fresh database on the server that
//! `DSRELAY_TEST_POSTGRES_URL` names. Without that server such a test is skipped locally but
//! fails in CI, so that CI cannot pass without having run on PostgreSQL.

/// Runs `test` with the URL of a fresh database and a fresh folder.
pub(crate) async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    on_postgres_created_with("", test).await
}

/// [`on_postgres`] with `options` appended to the `CREATE DATABASE` (a collation, say).
pub(crate) async fn on_postgres_created_with<F, Fut>(options: &str, test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(server) = std::env::var("DSRELAY_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
            panic!(
                "PostgreSQL is required in CI: set DSRELAY_TEST_POSTGRES_URL to a server where \
                 the tests may CREATE DATABASE"
            );
        }
        eprintln!("SKIPPED on PostgreSQL: DSRELAY_TEST_POSTGRES_URL is not set");
        return;
    };
    let name = format!("processor_{:016x}", fastrand::u64(..));
    let admin = dsrelay_runtime::store::Db::connect(&server)
        .await
        .expect("postgres");
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
