//! For the services' own tests (feature `test-support`): each test that needs PostgreSQL runs
//! in a fresh database on the server that `DSRELAY_TEST_POSTGRES_URL` names. Without that
//! server such a test is skipped locally but fails in CI, so that CI cannot pass without
//! having run on PostgreSQL.

/// Runs `test` with the URL of a fresh database (named `<service>_<random>`) and a fresh
/// folder.
pub async fn on_postgres<F, Fut>(service: &str, test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    on_postgres_created_with(service, "", test).await
}

/// [`on_postgres`] with `options` appended to the `CREATE DATABASE` (a collation, say).
pub async fn on_postgres_created_with<F, Fut>(service: &str, options: &str, test: F)
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
}
