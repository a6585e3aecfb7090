//! The machine's own limits, measured with the services' own building blocks: a bare tonic
//! echo over the same mTLS, and bare durable single-row INSERT commits on the same store.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::store::{now_ms, Db};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::load::{closed_loop, rss_kib, CpuUsage, CpuWindow, LoadResult, RssSampler};
use crate::service::{channel, free_port, sibling_binary, Service};

/// Serves only `grpc.health.v1.Health` with the services' TLS, limits, TCP_NODELAY and
/// runtime (one async thread, their default), as the registry's identity, until SIGINT/SIGTERM.
pub(crate) async fn serve_echo(listen: SocketAddr, pki_dir: &Path) -> Result<()> {
    let pki = DevPki {
        dir: pki_dir.to_path_buf(),
    };
    let (_health, health_service) = tonic_health::server::health_reporter();
    let router = dsrelay_runtime::server::builder(pki.files("registry").server_config()?)?
        .add_service(health_service);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    dsrelay_runtime::server::serve(router, listener, dsrelay_runtime::shutdown_signal()).await
}

/// The bare echo's figures.
pub(crate) struct Echo {
    /// Check calls.
    pub(crate) load: LoadResult,
    /// The echo server's resident memory before the load (KiB).
    pub(crate) idle_kib: u64,
    /// Its peak under the load (KiB).
    pub(crate) peak_kib: u64,
    /// The machine's CPU during the load.
    pub(crate) cpu: CpuUsage,
}

/// Starts the echo server as a process of its own (this binary, `echo-server`), and calls
/// Check from `concurrency` callers over `channels` channels for `duration`.
pub(crate) async fn echo(
    pki: &DevPki,
    work: &Path,
    concurrency: usize,
    channels: usize,
    duration: Duration,
) -> Result<Echo> {
    let port = free_port()?;
    let exe = sibling_binary("dsrelay-bench")?;
    let listen = format!("127.0.0.1:{port}");
    let mut server = Service::spawn(
        "bare echo server",
        &exe,
        &[
            "echo-server".as_ref(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--pki".as_ref(),
            pki.dir.as_os_str(),
        ],
        work.join("echo.log"),
        "warn",
    )?;
    let expected = Some(dev_identity("registry", "controller"));
    server
        .wait_serving(channel(pki, "partner-crm", port, expected.clone())?)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server.pid()?;
    let idle_kib = rss_kib(pid).unwrap_or(0);
    let clients = (0..channels.max(1))
        .map(|_| {
            Ok(HealthClient::new(channel(
                pki,
                "partner-crm",
                port,
                expected.clone(),
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    // Connect every channel before the clock starts.
    for c in &clients {
        c.clone()
            .check(HealthCheckRequest::default())
            .await
            .context("warming up the echo channels")?;
    }
    let sampler = RssSampler::start(vec![pid]);
    let cpu = CpuWindow::start(&[pid, std::process::id()]);
    let load = closed_loop(concurrency, duration, move |worker, _| {
        let mut client = clients[worker % clients.len()].clone();
        async move {
            client
                .check(HealthCheckRequest::default())
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    })
    .await;
    let cpu = cpu.finish();
    let peak_kib = sampler.finish().await.first().copied().unwrap_or(0);
    server.kill().await;
    Ok(Echo {
        load,
        idle_kib,
        peak_kib,
        cpu,
    })
}

/// A payload about the size of a stored erasure request with one e-mail identity.
const PAYLOAD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
                       0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
                       0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Single-row INSERTs, one durable commit each, from `concurrency` callers for `duration`
/// into a fresh table of the database at `url` (connected exactly as the services connect).
/// Also returns the CPU used: this process's (the callers, and SQLite when it is the store)
/// and the database server's (`db_server` and its backends) when there is one.
pub(crate) async fn inserts(
    url: &str,
    concurrency: usize,
    duration: Duration,
    db_server: Option<u32>,
) -> Result<(LoadResult, CpuUsage)> {
    let db = Db::connect(url).await?;
    sqlx::query(
        "CREATE TABLE bench_insert (id TEXT PRIMARY KEY, payload TEXT NOT NULL, \
         created_at BIGINT NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .context("creating the baseline table")?;
    let pool = db.pool.clone();
    let cpu = CpuWindow::start(&[std::process::id()]).with_tree(db_server);
    let result = closed_loop(concurrency, duration, move |worker, n| {
        let pool = pool.clone();
        async move {
            sqlx::query("INSERT INTO bench_insert (id, payload, created_at) VALUES ($1, $2, $3)")
                .bind(format!("{worker}-{n}"))
                .bind(PAYLOAD)
                .bind(now_ms())
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let cpu = cpu.finish();
    db.pool.close().await;
    Ok((result, cpu))
}
