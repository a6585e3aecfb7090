//! The registry's own tests on PostgreSQL ([`dsrelay_runtime::testing`]), in databases
//! named `registry_…`.

/// Runs `test` with the URL of a fresh database and a fresh folder.
pub(crate) async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    dsrelay_runtime::testing::on_postgres("registry", test).await
}
