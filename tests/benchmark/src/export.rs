//! Export streaming: a RETURN_OF_DATA of about `--export-mib` MiB through the real registry
//! and one processor, against a bare tonic server-streaming RPC over the same mTLS carrying
//! the same number of bytes in 1 MiB messages, measured in the same run.
//!
//! The data: the sample accounting database (SQLite, a file in the temporary folder) with
//! invoices added for its customer 1 until their export (the connector writes every invoice
//! as JSON and as CSV) comes to about the asked size. The processor's SQL connector exports
//! them into its data folder, its uploader stores them at the registry in 1 MiB chunks, and
//! this process downloads the package with `PackageService.DownloadPackage` as the partner,
//! checking every file's size and SHA-256 against the manifest. Everything it generated is
//! deleted as soon as the figures are taken.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dsrelay_connectors::sql::{create_sample_accounting_db, sample_config, SqlConnectorConfig};
use dsrelay_connectors::ConnectorConfig;
use dsrelay_proto::v1::package_chunk::Item;
use dsrelay_proto::v1::package_service_client::PackageServiceClient;
use dsrelay_proto::v1::package_service_server::{PackageService, PackageServiceServer};
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    DownloadPackageRequest, GetPackageRequest, IdentityEncoding, IdentityType, PackageChunk,
    PackageFileChunk, PackageInfo, RequestKind, SubjectIdentity, SubmitRequest,
};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::store::{now_ms, Db};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::load::{rss_kib, RssSampler};
use crate::relay::{q, registry_toml, tls_toml, write_file, COMPLETED, POLL_MS};
use crate::service::{channel, free_port, sibling_binary, Service};

/// Bytes per message, of the bare stream and of the registry's download alike.
const CHUNK: u64 = 1 << 20;
/// The sample database's customer 1, whose data the benchmark returns.
const SUBJECT: &str = "maija.meikalainen@example.fi";
const CUSTOMER_ID: i64 = 1;
/// The added invoices' `customer_name`: long, so that each row carries a few KiB.
const NAME_BYTES: usize = 2000;
/// Estimated export bytes per added invoice: the name in both files, plus the other columns,
/// the JSON keys and the separators.
const ROW_BYTES: u64 = 2 * NAME_BYTES as u64 + 230;
/// The longest the return of data may take before the run gives up.
const TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The export scenario's figures.
pub(crate) struct ExportFigures {
    /// Bytes in the downloaded package (all its files).
    pub(crate) bytes: u64,
    /// Files in the package.
    pub(crate) files: usize,
    /// Submit to the package downloaded and verified (s).
    pub(crate) total_secs: f64,
    /// Submit to the export recorded at the processor, its upload queued: the files written,
    /// and streamed to the registry as they were written (s).
    pub(crate) export_secs: f64,
    /// The export recorded to the request finished at the registry, every part stored (s).
    pub(crate) upload_secs: f64,
    /// DownloadPackage opened to the last byte checked (s).
    pub(crate) download_secs: f64,
    /// Every run of the bare stream of the same bytes (s), in the order they ran.
    pub(crate) baseline_runs: Vec<f64>,
    /// Peak resident memory (KiB) of the registry and the processor during the run.
    pub(crate) peaks: [u64; 2],
    /// The bare stream server's peak resident memory (KiB).
    pub(crate) baseline_peak: u64,
}

/// How many times the bare stream runs; its median is the baseline. One run moved between
/// 460 and 620 MB/s from one benchmark to the next on the same machine (docs/benchmarks.md,
/// session 18), as much as a change to the relay would.
pub(crate) const BARE_RUNS: usize = 3;

impl ExportFigures {
    /// The baseline (s): the median of the bare stream's runs.
    pub(crate) fn baseline_secs(&self) -> f64 {
        let mut sorted = self.baseline_runs.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// MB/s (10^6 bytes) of `bytes` in `secs`.
pub(crate) fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

/// Serves a bare `PackageService` whose DownloadPackage streams as many bytes as its
/// `request_id` says, in 1 MiB file chunks, with the services' TLS, limits, TCP_NODELAY
/// and runtime (one async thread, their default), as the registry's identity, until
/// SIGINT/SIGTERM.
pub(crate) async fn serve_stream(listen: SocketAddr, pki_dir: &Path) -> Result<()> {
    let pki = DevPki {
        dir: pki_dir.to_path_buf(),
    };
    let (_health, health_service) = tonic_health::server::health_reporter();
    let router = dsrelay_runtime::server::builder(pki.files("registry").server_config()?)?
        .add_service(health_service)
        .add_service(PackageServiceServer::new(BareStream));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    dsrelay_runtime::server::serve(router, listener, dsrelay_runtime::shutdown_signal()).await
}

/// The bare stream: no store, no files, the same 1 MiB buffer sent again and again.
struct BareStream;

type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<PackageChunk, Status>> + Send>>;

#[tonic::async_trait]
impl PackageService for BareStream {
    async fn get_package(
        &self,
        _req: Request<GetPackageRequest>,
    ) -> Result<Response<PackageInfo>, Status> {
        Err(Status::unimplemented(
            "the bare stream serves only DownloadPackage",
        ))
    }

    type DownloadPackageStream = ChunkStream;

    async fn download_package(
        &self,
        req: Request<DownloadPackageRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let total: u64 = req
            .get_ref()
            .request_id
            .parse()
            .map_err(|_| Status::invalid_argument("request_id: not a byte count"))?;
        let block = vec![b'x'; CHUNK as usize];
        let chunks = (0..total.div_ceil(CHUNK)).map(move |i| {
            let offset = i * CHUNK;
            let len = CHUNK.min(total - offset) as usize;
            Ok(PackageChunk {
                item: Some(Item::File(PackageFileChunk {
                    path: "bare".into(),
                    offset,
                    data: block[..len].to_vec(),
                })),
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

/// Receives a DownloadPackage stream: checks the manifest comes first and every file's size
/// and SHA-256 against it (when there is one). Returns the bytes and files received.
async fn receive(
    mut client: PackageServiceClient<Channel>,
    request_id: String,
    with_manifest: bool,
) -> Result<(u64, usize)> {
    let mut stream = client
        .download_package(DownloadPackageRequest { request_id })
        .await
        .context("opening the download")?
        .into_inner();
    let mut manifest: Option<PackageInfo> = None;
    let mut files: BTreeMap<String, (u64, Sha256)> = BTreeMap::new();
    let mut bytes = 0u64;
    while let Some(message) = stream.message().await.context("downloading")? {
        match message.item {
            Some(Item::Info(info)) if manifest.is_none() && files.is_empty() => {
                manifest = Some(info)
            }
            Some(Item::File(chunk)) if manifest.is_some() || !with_manifest => {
                let (size, hash) = files.entry(chunk.path.clone()).or_default();
                if chunk.offset != *size {
                    bail!(
                        "{}: a chunk at offset {} after {size} bytes",
                        chunk.path,
                        chunk.offset
                    );
                }
                *size += chunk.data.len() as u64;
                bytes += chunk.data.len() as u64;
                hash.update(&chunk.data);
            }
            other => bail!("unexpected message in the download: {other:?}"),
        }
    }
    if let Some(manifest) = manifest {
        if manifest.files.len() != files.len() {
            bail!(
                "the manifest lists {} files, the download carried {}",
                manifest.files.len(),
                files.len()
            );
        }
        for f in &manifest.files {
            let (size, hash) = files
                .remove(&f.path)
                .with_context(|| format!("{}: listed but not downloaded", f.path))?;
            let sha256 = hex::encode(hash.finalize());
            if size != f.size || sha256 != f.sha256 {
                bail!(
                    "{}: downloaded {size} bytes with SHA-256 {sha256}, the manifest says {} \
                     bytes with {}",
                    f.path,
                    f.size,
                    f.sha256
                );
            }
        }
        Ok((bytes, manifest.files.len()))
    } else if with_manifest {
        bail!("the download carried no manifest")
    } else {
        for (_, (_, hash)) in files.iter_mut() {
            // The same work as the relay's receiver: every byte hashed.
            std::hint::black_box(hash.clone().finalize());
        }
        Ok((bytes, files.len()))
    }
}

/// Adds invoices of customer 1 to the sample database at `url` until their export comes to
/// about `target` bytes.
async fn fill(url: &str, target: u64) -> Result<u64> {
    create_sample_accounting_db(url).await?;
    let db = Db::connect(url).await?;
    let rows = target.div_ceil(ROW_BYTES);
    let name: String = "Maija Meikalainen "
        .chars()
        .cycle()
        .take(NAME_BYTES)
        .collect();
    const PER_STATEMENT: u64 = 200;
    let mut next = 0u64;
    while next < rows {
        let mut tx = db.pool.begin().await?;
        for _ in 0..50 {
            let n = PER_STATEMENT.min(rows - next);
            if n == 0 {
                break;
            }
            let values = (0..n)
                .map(|i| {
                    format!(
                        "({}, {CUSTOMER_ID}, $1, $2, {}, '2024-06-01', 'paid')",
                        1_000_000 + next + i,
                        10_000 + (next + i) % 90_000
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            sqlx::query(&format!(
                "INSERT INTO invoices (id, customer_id, customer_name, customer_email, \
                 amount_cents, issued_on, status) VALUES {values}"
            ))
            .bind(&name)
            .bind(SUBJECT)
            .execute(&mut *tx)
            .await
            .context("adding invoices")?;
            next += n;
        }
        tx.commit().await?;
    }
    db.pool.close().await;
    Ok(rows)
}

/// A subprocessor of a benchmark processor: the SQL connector with `connector`.
pub(crate) struct SqlSubprocessor {
    pub(crate) name: String,
    pub(crate) categories: &'static [&'static str],
    pub(crate) connector: SqlConnectorConfig,
}

/// A benchmark processor's configuration: one controller (the registry at
/// `registry_port`), `subprocessors` on the SQL connector, and task and acknowledgement
/// leases of `lease_ms` when given (the processor's default otherwise).
pub(crate) fn processor_toml(
    pki: &DevPki,
    port: u16,
    db: &str,
    data_dir: &Path,
    registry_port: u16,
    lease_ms: Option<u64>,
    subprocessors: Vec<SqlSubprocessor>,
) -> Result<String> {
    let mut s = format!(
        "listen = {}\ndatabase_url = {}\ndata_dir = {}\n\
         identity_hash_key = \"benchmark processor key\"\n{}\n",
        q(format!("127.0.0.1:{port}")),
        q(db),
        q(data_dir.to_string_lossy()),
        crate::relay::processor_signing_toml(pki)
    );
    s.push_str(&tls_toml(&pki.files("processor")));
    s.push_str(&crate::relay::processor_audit_toml(pki, "processor"));
    s.push_str(&format!(
        "\n[[controllers]]\nname = \"controller\"\nidentity = {}\nregistry_endpoint = {}\n",
        q(dev_identity("registry", "controller")),
        q(format!("https://localhost:{registry_port}"))
    ));
    let lease = lease_ms
        .map(|ms| format!("lease_ms = {ms}\n"))
        .unwrap_or_default();
    s.push_str(&format!(
        "\n[tasks]\npoll_interval_ms = {POLL_MS}\n{lease}\n[acks]\npoll_interval_ms = {POLL_MS}\n{lease}"
    ));
    let mut table: toml::Table = toml::from_str(&s).context("the processor's configuration")?;
    let subprocessors = subprocessors
        .into_iter()
        .map(|sp| {
            let mut sub = toml::Table::new();
            sub.insert("name".into(), sp.name.into());
            sub.insert(
                "categories".into(),
                toml::Value::Array(sp.categories.iter().map(|&c| c.into()).collect()),
            );
            sub.insert("country".into(), "FI".into());
            sub.insert(
                "connector".into(),
                toml::Value::try_from(ConnectorConfig::Sql(sp.connector))?,
            );
            Ok(toml::Value::Table(sub))
        })
        .collect::<Result<Vec<_>>>()?;
    table.insert("subprocessors".into(), toml::Value::Array(subprocessors));
    Ok(toml::to_string(&table)?)
}

/// Runs the scenario in `dir` (deleted at the end) with the services' stores at
/// `registry_db` and `processor_db`, then the bare stream of the same bytes.
pub(crate) async fn run(
    pki: &DevPki,
    dir: &Path,
    target: u64,
    registry_db: &str,
    processor_db: &str,
) -> Result<ExportFigures> {
    std::fs::create_dir_all(dir)?;
    let result = scenario(pki, dir, target, registry_db, processor_db).await;
    // The data, the exports and the package are as large as the package: gone at once.
    let _ = std::fs::remove_dir_all(dir);
    let mut figures = result?;
    crate::progress(format!(
        "  bare stream: {} MB over mTLS in 1 MiB messages, {BARE_RUNS} times",
        figures.bytes / 1_000_000
    ));
    for _ in 0..BARE_RUNS {
        let (secs, peak) = bare_stream(pki, dir.parent().unwrap_or(dir), figures.bytes).await?;
        figures.baseline_runs.push(secs);
        figures.baseline_peak = figures.baseline_peak.max(peak);
    }
    Ok(figures)
}

async fn scenario(
    pki: &DevPki,
    dir: &Path,
    target: u64,
    registry_db: &str,
    processor_db: &str,
) -> Result<ExportFigures> {
    let accounting_url = format!("sqlite://{}/accounting.db", dir.display());
    crate::progress(format!(
        "export: adding about {} MiB of invoices to the sample accounting database",
        target >> 20
    ));
    let rows = fill(&accounting_url, target).await?;
    crate::progress(format!("  {rows} invoices added"));

    let (reg_service, proc_service, registry_port) =
        start_pair(pki, dir, registry_db, processor_db, &accounting_url).await?;
    let pids = [reg_service.pid()?, proc_service.pid()?];
    let mut services = [reg_service, proc_service];
    let result = measure(
        pki,
        &mut services,
        pids,
        registry_port,
        registry_db,
        processor_db,
    )
    .await;
    for s in services {
        s.kill().await;
    }
    result
}

/// Starts the release registry and one processor (`payroll-bureau`) in processes of their
/// own, in `dir`, with the SQL connector on the sample accounting database at
/// `accounting_url`, and waits until both serve. Returns them and the registry's port.
pub(crate) async fn start_pair(
    pki: &DevPki,
    dir: &Path,
    registry_db: &str,
    processor_db: &str,
    accounting_url: &str,
) -> Result<(Service, Service, u16)> {
    let registry_port = free_port()?;
    let processor_port = free_port()?;
    let processor = "payroll-bureau";
    let mut registry_text = registry_toml(
        pki,
        registry_port,
        registry_db,
        &[(processor, processor_port)],
    );
    // `registry_toml` ends in the [delivery] table; the package folder is a top-level key.
    registry_text = format!(
        "package_dir = {}\n{registry_text}",
        q(dir.join("packages").to_string_lossy())
    );
    let processor_text = processor_toml(
        pki,
        processor_port,
        processor_db,
        &dir.join("processor-data"),
        registry_port,
        None,
        vec![SqlSubprocessor {
            name: "accounting".into(),
            categories: &["contact", "invoicing"],
            connector: sample_config(accounting_url),
        }],
    )?;
    let r: dsrelay_registry::Config = toml::from_str(&registry_text)?;
    r.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let p: dsrelay_processor::Config = toml::from_str(&processor_text)?;
    p.validate().map_err(|e| anyhow::anyhow!("{e}"))?;

    let config = dir.join("processor.toml");
    write_file(&config, &processor_text)?;
    let mut proc_service = Service::spawn(
        "processor",
        &sibling_binary("dsrelay-processor")?,
        &["--config".as_ref(), config.as_os_str()],
        dir.join("processor.log"),
        "warn",
    )?;
    proc_service
        .wait_serving(channel(pki, "processor", processor_port, None)?)
        .await?;
    let config = dir.join("registry.toml");
    write_file(&config, &registry_text)?;
    let mut reg_service = Service::spawn(
        "registry",
        &sibling_binary("dsrelay-registry")?,
        &["--config".as_ref(), config.as_os_str()],
        dir.join("registry.log"),
        "warn",
    )?;
    let expected = Some(dev_identity("registry", "controller"));
    reg_service
        .wait_serving(channel(pki, "operator", registry_port, expected)?)
        .await?;
    Ok((reg_service, proc_service, registry_port))
}

async fn measure(
    pki: &DevPki,
    services: &mut [Service; 2],
    pids: [u32; 2],
    registry_port: u16,
    registry_db: &str,
    processor_db: &str,
) -> Result<ExportFigures> {
    let logs = |services: &[Service; 2]| -> String {
        services
            .iter()
            .map(|s| format!("\n--- {} log (end) ---\n{}", s.name, s.log_tail()))
            .collect()
    };
    let expected = Some(dev_identity("registry", "controller"));
    let partner = channel(pki, "partner-crm", registry_port, expected)?;
    let db = Db::connect(registry_db).await?;
    let sampler = RssSampler::start(pids.to_vec());

    crate::progress("  return of data: Submit, export, upload, download");
    let t0 = Instant::now();
    let t0_ms = now_ms();
    let request_id = RequestServiceClient::new(partner.clone())
        .submit(SubmitRequest {
            kind: RequestKind::ReturnOfData as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: SUBJECT.into(),
                label: String::new(),
            }],
            idempotency_key: "export-1".into(),
            ..Default::default()
        })
        .await
        .context("submitting the return of data")?
        .into_inner()
        .request_id;
    let stored_ms = loop {
        for s in services.iter_mut() {
            s.check_alive()?;
        }
        let (state, finished): (i64, Option<i64>) =
            sqlx::query_as("SELECT CAST(state AS BIGINT), finished_at FROM requests WHERE id = $1")
                .bind(&request_id)
                .fetch_one(&db.pool)
                .await?;
        if state >= COMPLETED {
            if state != COMPLETED {
                bail!(
                    "the return of data ended in state {state}{}",
                    logs(services)
                );
            }
            break finished.unwrap_or_else(now_ms);
        }
        if t0.elapsed() > TIMEOUT {
            bail!(
                "the return of data did not complete in {} s{}",
                TIMEOUT.as_secs(),
                logs(services)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    db.pool.close().await;
    let d0 = Instant::now();
    let (bytes, files) =
        receive(PackageServiceClient::new(partner), request_id.clone(), true).await?;
    let download_secs = d0.elapsed().as_secs_f64();
    let total_secs = t0.elapsed().as_secs_f64();
    let peaks = sampler.finish().await;
    // The processor deletes an export's files once they are delivered, so the end of the
    // export is read from its upload row: queued (next_attempt_at = now) in the transaction
    // that lists the written files, and left so by a first attempt that succeeds.
    let processor = Db::connect(processor_db).await?;
    let (exported_ms, attempts): (i64, i64) = sqlx::query_as(
        "SELECT next_attempt_at, CAST(attempts AS BIGINT) FROM uploads WHERE request_id = $1",
    )
    .bind(&request_id)
    .fetch_one(&processor.pool)
    .await
    .context("no upload of the export found at the processor")?;
    processor.pool.close().await;
    if attempts != 1 {
        bail!(
            "the upload took {attempts} attempts, so the export's end cannot be told from it{}",
            logs(services)
        );
    }
    let secs = |ms: i64| ms as f64 / 1000.0;
    Ok(ExportFigures {
        bytes,
        files,
        total_secs,
        export_secs: secs(exported_ms - t0_ms),
        upload_secs: secs(stored_ms - exported_ms),
        download_secs,
        baseline_runs: Vec::new(),
        peaks: [peaks[0], peaks[1]],
        baseline_peak: 0,
    })
}

/// Streams `bytes` from the bare stream server (a process of its own, this binary's
/// `stream-server`) and hashes them as the relay's receiver does; returns the seconds and
/// the server's peak resident memory (KiB).
async fn bare_stream(pki: &DevPki, work: &Path, bytes: u64) -> Result<(f64, u64)> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut server = Service::spawn(
        "bare stream server",
        &sibling_binary("dsrelay-bench")?,
        &[
            "stream-server".as_ref(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--pki".as_ref(),
            pki.dir.as_os_str(),
        ],
        work.join("stream.log"),
        "warn",
    )?;
    let expected = Some(dev_identity("registry", "controller"));
    let ch = channel(pki, "partner-crm", port, expected)?;
    server.wait_serving(ch.clone()).await?;
    let pid = server.pid()?;
    let sampler = RssSampler::start(vec![pid]);
    let t0 = Instant::now();
    let result = receive(PackageServiceClient::new(ch), bytes.to_string(), false).await;
    let secs = t0.elapsed().as_secs_f64();
    let peak = sampler
        .finish()
        .await
        .first()
        .copied()
        .or_else(|| rss_kib(pid))
        .unwrap_or(0);
    server.kill().await;
    let (got, _) = result?;
    if got != bytes {
        bail!("the bare stream carried {got} bytes of {bytes}");
    }
    Ok((secs, peak))
}
