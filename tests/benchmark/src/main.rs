//! `dsrelay-bench`: measures the relay against this machine's own limits, in one run.
//!
//! In one run it measures two baselines and the relay, and prints a table of figures with
//! their ratios to the baselines, which it also writes with a description of the machine to
//! `docs/benchmarks.md` (`docs/benchmarks-postgres.md` with `--postgres`):
//!
//! - the bare echo: unary calls per second of a tonic server built like the services (same
//!   mTLS, limits, TCP_NODELAY and one async thread) that serves only the health check, in a
//!   process of its own (this binary's hidden `echo-server` command);
//! - bare durable single-row INSERT commits per second through the services' store handle
//!   (`dsrelay_runtime::store::Db`) on the same store;
//! - the relay: one registry and two processors (three in-process `noop` subprocessors each)
//!   as the release binaries in processes of their own: accepted Submits per second,
//!   completed propagations per second, end-to-end latency at half the completed rate, and
//!   each service's resident memory idle and under load;
//! - one hop of real work (`onehop`): erasures of existing customers through a registry and
//!   one processor whose only subprocessor is the `sql` connector on the sample accounting
//!   schema filled with `--onehop-customers` customers: completed erasures per second (a batch
//!   of `--onehop-erasures` by `--onehop-concurrency` callers), latency p50/p99 at half that rate, CPU per erasure, against a
//!   target of 1,500/s; afterwards every row of the holder's database is checked (erased
//!   customers' rows gone or anonymized, nobody else's touched) and any difference fails the
//!   run;
//! - export streaming (`export`): a return of data of `--export-mib` MiB through a registry
//!   and one processor (the SQL connector on the sample accounting database), from Submit to
//!   the package downloaded and verified, against a bare mTLS server-streaming RPC carrying
//!   the same bytes in 1 MiB messages (this binary's hidden `stream-server` command, built
//!   like the echo server), with the two services' peak resident memory;
//! - contract end (`contract`): all of a controller's data at one SQL subprocessor
//!   (`--contract-subjects` customers of the sample accounting schema) deleted through the
//!   registry and a processor, against the bare statements the rules amount to on a copy of
//!   the same database, with the two services' peak resident memory.
//!
//! Apart from the measuring run, `dsrelay-bench chaos` is the chaos test (see the `chaos`
//! module): erasures under SIGKILLs of the services and of their database, checked against
//! Jepsen's total-queue rule; `scripts/bench.sh --chaos` runs it in full.
//!
//! Run it with `scripts/bench.sh` (which builds the release binaries first, and with
//! `--postgres` starts a throwaway PostgreSQL exactly as `scripts/test.sh` does). Load only
//! ever goes to 127.0.0.1, bounded in count and time.

mod accounting;
mod baseline;
mod chaos;
mod claims;
mod contract;
mod export;
mod load;
mod onehop;
mod relay;
mod report;
mod service;
mod statement_cost;
mod statements;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dsrelay_runtime::pki::DevPki;
use dsrelay_runtime::store::{now_ms, Db};

use crate::load::{
    closed_loop, fixed_count, mib, open_loop, rss_kib, CpuUsage, CpuWindow, LoadResult, RssSampler,
};
use crate::relay::{submit, Databases, Relay, Waited, SUBPROCESSORS};
use crate::report::{number, percentile, Document, Machine, Row, Target, Value};

/// Measures the dsrelay relay against this machine's own limits (bare mTLS gRPC echo, bare
/// durable INSERT commits) and writes the figures to docs/benchmarks.md.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Run on PostgreSQL: the server at $DSRELAY_TEST_POSTGRES_URL (`scripts/bench.sh
    /// --postgres` starts a throwaway one), with fresh databases for each service and the
    /// baseline.
    #[arg(long)]
    postgres: bool,
    /// Run on PostgreSQL at this server URL (implies --postgres).
    #[arg(long, value_name = "URL")]
    postgres_url: Option<String>,
    /// Length of each fixed-time load: the bare echo, the bare INSERTs and the Submits (s).
    #[arg(long, default_value_t = 5)]
    duration_secs: u64,
    /// Length of the open-loop latency load (s).
    #[arg(long, default_value_t = 8)]
    latency_secs: u64,
    /// Concurrent callers of every closed-loop load.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// gRPC channels (connections) the callers share.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Requests in the completed-propagations batch.
    #[arg(long, default_value_t = 2000)]
    batch: u64,
    /// Size of the return-of-data package of the export benchmark (MiB; about, as the
    /// connector's JSON and CSV come out); 0 skips it. The data, the exports and the package
    /// take up to three times this on disk while it runs (2.9 times at 256), and are deleted
    /// right after.
    #[arg(long, default_value_t = 1024)]
    export_mib: u64,
    /// Data subjects (customers with a contact, an invoice and a ledger entry each) of the
    /// contract-end benchmark's SQL subprocessor; 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    contract_subjects: u64,
    /// Customers of the one-hop scenario's SQL subprocessor (the sample accounting schema;
    /// each erasure names a different one, so at least the warm-up, two per caller, plus
    /// --onehop-erasures; what is left goes to its latency load).
    #[arg(long, default_value_t = 10_000)]
    onehop_customers: u64,
    /// Erasures in the one-hop scenario's completed-erasures batch; 0 skips the scenario.
    #[arg(long, default_value_t = 3000)]
    onehop_erasures: u64,
    /// Concurrent callers of the one-hop scenario's warm-up and batch. More than
    /// --concurrency: each caller waits for its Submit's commit before the next, and at 16
    /// those round trips, not the relay, set the batch's pace once the relay completed more
    /// than about 1,200 erasures/s (docs/benchmarks.md, session 27).
    #[arg(long, default_value_t = 64)]
    onehop_concurrency: usize,
    /// Erasures of the statement count: the relay again, on a PostgreSQL server of the run's
    /// own with `pg_stat_statements`, counting the statements and commits one erasure costs
    /// at each service (needs the PostgreSQL server binaries; 0 skips it).
    #[arg(long, default_value_t = 500)]
    count_erasures: u64,
    /// Where to write the report (default docs/benchmarks.md, or docs/benchmarks-postgres.md
    /// with --postgres).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The chaos test: erasures under SIGKILLs of the registry, the processor and (with
    /// --postgres) the database server, then Jepsen's total-queue check; exits non-zero on
    /// FAIL. Writes nothing to docs/.
    Chaos(chaos::ChaosArgs),
    /// How long one claim of many due rows takes at each queue of both services (figures
    /// only). Writes nothing to docs/.
    Claims(claims::ClaimsArgs),
    /// What one keyed single-row UPDATE costs on SQLite through sqlx, one statement per row,
    /// several in one text, or one multi-row statement (figures only). Writes nothing to
    /// docs/.
    StatementCost(statement_cost::StatementCostArgs),
    /// The bare echo server of the baseline (started by the benchmark itself).
    #[command(hide = true)]
    EchoServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Folder of the dev PKI.
        #[arg(long)]
        pki: PathBuf,
    },
    /// The bare streaming server of the export baseline (started by the benchmark itself).
    #[command(hide = true)]
    StreamServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Folder of the dev PKI.
        #[arg(long)]
        pki: PathBuf,
    },
}

fn main() {
    let args = Args::parse();
    // The baseline servers run on the runtime the services run on by default, so that a
    // baseline is what the services' own building blocks do on this machine; the load and
    // the rest of the benchmark keep tokio's default pool.
    let serving_baseline = matches!(
        args.command,
        Some(Command::EchoServer { .. } | Command::StreamServer { .. })
    );
    let runtime = if serving_baseline {
        dsrelay_runtime::host::runtime(dsrelay_runtime::settings::DEFAULT_WORKER_THREADS)
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = runtime.unwrap_or_else(|e| {
        eprintln!("dsrelay-bench: starting the async runtime: {e}");
        std::process::exit(1);
    });
    runtime.block_on(run_command(args));
}

async fn run_command(args: Args) {
    let result = match &args.command {
        Some(Command::EchoServer { listen, pki }) => baseline::serve_echo(*listen, pki).await,
        Some(Command::StreamServer { listen, pki }) => export::serve_stream(*listen, pki).await,
        Some(Command::Claims(claims)) => claims::run(claims).await,
        Some(Command::StatementCost(cost)) => statement_cost::run(cost).await,
        Some(Command::Chaos(chaos)) => {
            tokio::select! {
                r = chaos::run(chaos) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            }
        }
        None => {
            tokio::select! {
                r = run(&args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("dsrelay-bench: {e:#}");
        std::process::exit(1);
    }
}

pub(crate) fn progress(msg: impl AsRef<str>) {
    eprintln!("dsrelay-bench: {}", msg.as_ref());
}

/// A PostgreSQL server on which the run creates (and at the end drops) fresh databases.
struct Postgres {
    server: String,
    created: Vec<String>,
}

impl Postgres {
    async fn fresh_database(&mut self, role: &str) -> Result<String> {
        let name = format!("bench_{:08x}_{role}", fastrand::u32(..));
        let db = Db::connect(&self.server).await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&db.pool)
            .await
            .with_context(|| format!("creating database {name}"))?;
        db.pool.close().await;
        self.created.push(name.clone());
        let (base, query) = match self.server.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (self.server.as_str(), String::new()),
        };
        let (root, _) = base
            .rsplit_once('/')
            .context("the PostgreSQL URL has no /database part")?;
        Ok(format!("{root}/{name}{query}"))
    }

    async fn drop_all(&self) {
        let Ok(db) = Db::connect(&self.server).await else {
            return;
        };
        for name in &self.created {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&db.pool)
                .await;
        }
        db.pool.close().await;
    }
}

/// The PostgreSQL server's main process, when it runs on this machine: the parent of the
/// backend serving a connection.
async fn database_server_pid(url: &str) -> Option<u32> {
    let db = Db::connect(url).await.ok()?;
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&db.pool)
        .await
        .ok()?;
    let server = load::parent_pid(u32::try_from(backend).ok()?);
    db.pool.close().await;
    let server = server?;
    let comm = std::fs::read_to_string(format!("/proc/{server}/comm")).ok()?;
    comm.trim().starts_with("postgres").then_some(server)
}

/// The store's name and version, from the baseline's database.
async fn describe_store(url: &str, postgres: bool) -> String {
    let version = async {
        let db = Db::connect(url).await?;
        let sql = if postgres {
            "SELECT version()"
        } else {
            "SELECT sqlite_version()"
        };
        let v: String = sqlx::query_scalar(sql).fetch_one(&db.pool).await?;
        db.pool.close().await;
        anyhow::Ok(v)
    }
    .await
    .unwrap_or_else(|e| format!("version unknown: {e}"));
    if postgres {
        format!("{version}; a pool of 16 connections per service, and one of 4 for its claims")
    } else {
        format!(
            "SQLite {version}, WAL, synchronous=FULL, one writer connection (and four \
             readers) per service, one file per service"
        )
    }
}

fn rate_note(what: &str, r: &LoadResult) -> Option<String> {
    (r.errors > 0).then(|| {
        format!(
            "{what}: {} of {} calls failed; the first: {}",
            r.errors,
            r.ok + r.errors,
            r.first_error.as_deref().unwrap_or("?")
        )
    })
}

async fn run(args: &Args) -> Result<()> {
    let postgres_url = match (&args.postgres_url, args.postgres) {
        (Some(url), _) => Some(url.clone()),
        (None, true) => match std::env::var("DSRELAY_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ => bail!(
                "--postgres needs a server: set DSRELAY_TEST_POSTGRES_URL or run \
                 `scripts/bench.sh --postgres`, which starts a throwaway one"
            ),
        },
        (None, false) => None,
    };
    let is_pg = postgres_url.is_some();
    if args.concurrency == 0
        || args.onehop_concurrency == 0
        || args.duration_secs == 0
        || args.batch == 0
    {
        bail!(
            "--concurrency, --onehop-concurrency, --duration-secs and --batch must be at least 1"
        );
    }
    let duration = Duration::from_secs(args.duration_secs);
    let c = args.concurrency;
    let work = tempfile::Builder::new()
        .prefix("dsrelay-bench.")
        .tempdir()
        .context("creating a temporary folder")?;
    let pki = DevPki::ensure(&work.path().join("pki"))?;

    let mut pg = postgres_url.map(|server| Postgres {
        server,
        created: Vec::new(),
    });
    let (baseline_url, dbs) = match &mut pg {
        Some(pg) => (
            pg.fresh_database("baseline").await?,
            Databases {
                registry: pg.fresh_database("registry").await?,
                processor_a: pg.fresh_database("processor_a").await?,
                processor_b: pg.fresh_database("processor_b").await?,
                export_registry: Some(pg.fresh_database("export_registry").await?),
                export_processor: Some(pg.fresh_database("export_processor").await?),
                contract_registry: Some(pg.fresh_database("contract_registry").await?),
                contract_processor: Some(pg.fresh_database("contract_processor").await?),
                onehop_registry: Some(pg.fresh_database("onehop_registry").await?),
                onehop_processor: Some(pg.fresh_database("onehop_processor").await?),
                onehop_holder: Some(pg.fresh_database("onehop_holder").await?),
            },
        ),
        None => {
            let f = |n: &str| format!("sqlite://{}/{n}.db", work.path().display());
            (
                f("baseline"),
                Databases {
                    registry: f("registry"),
                    processor_a: f("processor-a"),
                    processor_b: f("processor-b"),
                    export_registry: None,
                    export_processor: None,
                    contract_registry: None,
                    contract_processor: None,
                    onehop_registry: None,
                    onehop_processor: None,
                    onehop_holder: None,
                },
            )
        }
    };
    let outcome = measure(
        args,
        &pki,
        work.path(),
        &baseline_url,
        &dbs,
        is_pg,
        duration,
        c,
    )
    .await;
    if let Some(pg) = &pg {
        pg.drop_all().await;
    }
    let doc = outcome?;
    let table = report::render_table(&doc.rows);
    println!("\n{table}");
    for n in &doc.notes {
        println!("- {n}");
    }
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(if is_pg {
            "docs/benchmarks-postgres.md"
        } else {
            "docs/benchmarks.md"
        })
    });
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let previous = match std::fs::read_to_string(&out) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let text = report::keep_hand_written(&doc.render(), previous.as_deref());
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    progress(format!("wrote {}", out.display()));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &Args,
    pki: &DevPki,
    work: &std::path::Path,
    baseline_url: &str,
    dbs: &Databases,
    is_pg: bool,
    duration: Duration,
    c: usize,
) -> Result<Document> {
    let store = describe_store(baseline_url, is_pg).await;
    let machine = Machine::describe(&store, work);
    let mut notes = Vec::new();

    // Baselines.
    progress(format!(
        "bare echo: {c} callers over {} channels, {} s",
        args.channels, args.duration_secs
    ));
    let echo = baseline::echo(pki, work, c, args.channels, duration).await?;
    notes.extend(rate_note("bare echo", &echo.load));
    progress(format!("  {:.0} calls/s", echo.load.rate()));
    progress(format!(
        "bare INSERT: {c} callers, {} s",
        args.duration_secs
    ));
    let db_server = if is_pg {
        database_server_pid(baseline_url).await
    } else {
        None
    };
    let (inserts, insert_cpu) = baseline::inserts(baseline_url, c, duration, db_server).await?;
    notes.extend(rate_note("bare INSERT", &inserts));
    progress(format!("  {:.0} commits/s", inserts.rate()));

    // The relay.
    progress("starting the registry and two processors");
    let (mut relay, relay_settings) = Relay::start(pki, work, dbs, args.channels).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = relay.pids()?;
    let idle: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let names: Vec<String> = relay.services.iter().map(|s| s.name.clone()).collect();
    let sampler = RssSampler::start(pids.clone());
    let result = relay_load(args, &mut relay, &pids, db_server, duration, c, &mut notes).await;
    let peaks = sampler.finish().await;
    relay.stop().await;
    let figures = result?;

    // One hop of real work, with the relay above stopped.
    let onehop = if args.onehop_erasures > 0 {
        let dir = work.join("onehop");
        let sqlite = |n: &str| format!("sqlite://{}/{n}.db", dir.display());
        let registry_db = dbs
            .onehop_registry
            .clone()
            .unwrap_or_else(|| sqlite("registry"));
        let processor_db = dbs
            .onehop_processor
            .clone()
            .unwrap_or_else(|| sqlite("processor"));
        let f = onehop::run(
            pki,
            &dir,
            &onehop::OnehopLoad {
                customers: args.onehop_customers,
                erasures: args.onehop_erasures,
                concurrency: args.onehop_concurrency,
                channels: args.channels,
                latency_secs: args.latency_secs,
            },
            &onehop::OnehopStores {
                registry: &registry_db,
                processor: &processor_db,
                holder: dbs.onehop_holder.as_deref(),
                db_server,
            },
        )
        .await?;
        progress(format!(
            "  one hop: {:.0} completed erasures/s; {} customers checked erased, the other {} \
             untouched",
            f.completed_rate,
            f.checked_erased,
            f.customers - f.checked_erased as u64
        ));
        notes.extend(f.notes.iter().cloned());
        Some(f)
    } else {
        None
    };

    // Export streaming, with the relay above stopped.
    let exported = if args.export_mib > 0 {
        let dir = work.join("export");
        let sqlite = |n: &str| format!("sqlite://{}/{n}.db", dir.display());
        let registry_db = dbs
            .export_registry
            .clone()
            .unwrap_or_else(|| sqlite("registry"));
        let processor_db = dbs
            .export_processor
            .clone()
            .unwrap_or_else(|| sqlite("processor"));
        let f = export::run(
            pki,
            &dir,
            args.export_mib << 20,
            &registry_db,
            &processor_db,
        )
        .await?;
        progress(format!(
            "  {:.0} MB/s end to end, bare stream {:.0} MB/s",
            export::mb_per_s(f.bytes, f.total_secs),
            export::mb_per_s(f.bytes, f.baseline_secs())
        ));
        Some(f)
    } else {
        None
    };

    // Contract end at scale, with everything above stopped.
    let contract = if args.contract_subjects > 0 {
        let dir = work.join("contract");
        let sqlite = |n: &str| format!("sqlite://{}/{n}.db", dir.display());
        let registry_db = dbs
            .contract_registry
            .clone()
            .unwrap_or_else(|| sqlite("registry"));
        let processor_db = dbs
            .contract_processor
            .clone()
            .unwrap_or_else(|| sqlite("processor"));
        let f = contract::run(
            pki,
            &dir,
            args.contract_subjects,
            &registry_db,
            &processor_db,
        )
        .await?;
        progress(format!(
            "  contract end {:.1} s, bare statements {:.1} s",
            f.relay_secs, f.bare_secs
        ));
        Some(f)
    } else {
        None
    };

    // Statements and commits per erasure, with everything above stopped.
    let counted = if args.count_erasures > 0 {
        let f = statements::run(
            pki,
            &work.join("statements"),
            args.channels,
            c,
            args.count_erasures,
        )
        .await?;
        if let Ok(f) = &f {
            for s in &f.services {
                progress(format!(
                    "  {}: {:.1} statements ({:.1} writes), {:.1} commits per erasure",
                    s.name, s.statements, s.writes, s.commits
                ));
            }
        }
        Some(f)
    } else {
        None
    };

    // The table.
    let insert_rate = inserts.rate();
    let echo_rate = echo.load.rate();
    let mut rows = vec![
        Row::plain(
            "bare echo: unary Check calls over mTLS",
            Value::Num(echo_rate),
            "calls/s",
        ),
        Row::plain(
            "bare INSERT: durable single-row commits",
            Value::Num(insert_rate),
            "commits/s",
        ),
        Row::plain("accepted Submits", Value::Num(figures.submits.rate()), "/s")
            .against("bare INSERT", insert_rate)
            .target(Target::RatioAtLeast(1.0)),
        Row::plain(
            "accepted Submits, against the bare echo",
            Value::Num(figures.submits.rate()),
            "/s",
        )
        .against("bare echo", echo_rate),
    ];
    rows.extend(backlog_rows(&figures.submits, &figures.backlog));
    rows.extend([Row::plain(
        "completed propagations (2 processors × 3 subprocessors)",
        Value::Num(figures.completed_rate),
        "/s",
    )
    .against("bare INSERT", insert_rate)
    .target(Target::RatioAtLeast(0.25))]);
    let single = &figures.idle_latencies;
    let single_value = |v: Option<f64>| match v {
        Some(v) => Value::Num(v),
        None => Value::Missing("no request completed".into()),
    };
    rows.push(
        Row::plain(
            format!(
                "single-request latency on an idle pair, p50 (n = {})",
                single.len()
            ),
            single_value(percentile(single, 50.0)),
            "ms",
        )
        .target(Target::AtMost(10.0)),
    );
    rows.push(Row::plain(
        "single-request latency on an idle pair, max",
        single_value(single.last().copied()),
        "ms",
    ));
    let lat = &figures.latencies;
    let p50 = percentile(lat, 50.0);
    let p99 = percentile(lat, 99.0);
    let lat_value = |v: Option<f64>| match v {
        Some(v) => Value::Num(v),
        None => Value::Missing("no request completed".into()),
    };
    rows.push(Row::plain(
        format!(
            "latency p50, open loop at {}/s (n = {})",
            number(figures.latency_rate),
            lat.len()
        ),
        lat_value(p50),
        "ms",
    ));
    let mut p99_row =
        Row::plain("latency p99", lat_value(p99), "ms").target(Target::RatioAtMost(10.0));
    if let Some(p50) = p50 {
        // A p50 of 0 ms (same millisecond) would make any ratio infinite; 1 ms is the
        // resolution of the timestamps.
        p99_row = p99_row.against("p50", p50.max(1.0));
    }
    rows.push(p99_row);
    rows.push(Row::plain(
        "latency max",
        lat_value(lat.last().copied()),
        "ms",
    ));
    for (name, kib) in names.iter().zip(&idle) {
        rows.push(
            Row::plain(
                format!("resident memory idle: {name}"),
                Value::Num(mib(*kib)),
                "MiB",
            )
            .against("bare echo idle", mib(echo.idle_kib))
            .target(Target::Below(30.0)),
        );
    }
    for (name, kib) in names.iter().zip(&peaks) {
        rows.push(
            Row::plain(
                format!("resident memory peak under load: {name}"),
                Value::Num(mib(*kib)),
                "MiB",
            )
            .against("bare echo under load", mib(echo.peak_kib)),
        );
    }
    let busy = |what: &str, who: &str, u: &CpuUsage| {
        let server = match u.tree_secs {
            Some(_) => format!(", the database server: {:.0} %", 100.0 * u.tree),
            None => String::new(),
        };
        Row::plain(
            format!(
                "machine CPU busy: {what} (of which {who}: {:.0} %{server}; waiting for I/O: \
                 {:.0} %)",
                100.0 * u.watched,
                100.0 * u.iowait
            ),
            Value::Num(100.0 * u.busy),
            "%",
        )
    };
    rows.push(busy("bare echo", "server and callers", &echo.cpu));
    rows.push(busy("bare INSERT", "callers and store", &insert_cpu));
    rows.push(busy(
        "propagation batch",
        "the services",
        &figures.batch_cpu,
    ));
    rows.push(busy("Submit load", "the services", &figures.submit_cpu));
    // CPU per bare INSERT commit: this process (callers, and SQLite when it is the store)
    // plus the database server when there is one.
    let per_commit_ms = (insert_cpu.process_secs.iter().sum::<f64>()
        + insert_cpu.tree_secs.unwrap_or(0.0))
        * 1000.0
        / (inserts.ok.max(1) as f64);
    let completed = figures.batch_completed.max(1) as f64;
    let mut per_propagation: Vec<(String, f64)> = names
        .iter()
        .cloned()
        .zip(
            figures
                .batch_cpu
                .process_secs
                .iter()
                .map(|s| s * 1000.0 / completed),
        )
        .collect();
    if let Some(secs) = figures.batch_cpu.tree_secs {
        per_propagation.push(("database server".into(), secs * 1000.0 / completed));
    }
    for (name, ms) in &per_propagation {
        rows.push(Row::plain(
            format!("CPU per completed propagation: {name}"),
            Value::Num(*ms),
            "ms",
        ));
    }
    let propagation_cpu_ms: f64 = per_propagation.iter().map(|(_, ms)| ms).sum();
    rows.push(
        Row::plain(
            if figures.batch_cpu.tree_secs.is_some() {
                "CPU per completed propagation: the services and the database server"
            } else {
                "CPU per completed propagation: the three services"
            },
            Value::Num(propagation_cpu_ms),
            "ms",
        )
        .against("CPU per bare INSERT commit", per_commit_ms),
    );
    rows.extend(onehop_rows(onehop.as_ref(), insert_rate, per_commit_ms));
    notes.extend(onehop.as_ref().and_then(onehop_explain));
    rows.extend(export_rows(exported.as_ref()));
    notes.extend(exported.as_ref().and_then(export_explain));
    rows.extend(contract_rows(contract.as_ref()));
    rows.extend(statement_rows(counted.as_ref()));
    notes.extend(explain(
        &rows,
        is_pg,
        &figures,
        propagation_cpu_ms,
        per_commit_ms,
    ));

    let mut settings = vec![
        format!(
            "load: {c} concurrent callers over {} mTLS channels; fixed-time loads {} s; \
             completed-propagations batch {} requests; latency load {} s open loop at half the \
             completed rate",
            args.channels, args.duration_secs, args.batch, args.latency_secs
        ),
        "load generator: this benchmark's process, on the same machine as the services \
         (127.0.0.1)"
            .into(),
    ];
    settings.extend(relay_settings);
    if args.onehop_erasures > 0 {
        settings.push(format!(
            "one hop: --onehop-customers {} --onehop-erasures {} --onehop-concurrency {}: one \
             registry and one processor (the release binaries, the relay's poll settings) with \
             one `sql` subprocessor (the sample rules) on the sample accounting schema ({}) \
             holding that many customers, each with a contact, a paid invoice and a ledger \
             entry from 2010; each erasure names a different existing customer by customer \
             number; a warm-up of {}, then the batch by that many callers (closed loop, over \
             the same channels), then an open loop at half the completed rate for the latency \
             duration; afterwards every row of the holder's database checked against the \
             requests",
            args.onehop_customers,
            args.onehop_erasures,
            args.onehop_concurrency,
            if is_pg {
                "a database of its own on the services' PostgreSQL server"
            } else {
                "a SQLite file, WAL, synchronous=FULL"
            },
            onehop::warm_up_count(args.onehop_concurrency)
        ));
    }
    if args.export_mib > 0 {
        settings.push(format!(
            "export: --export-mib {}: one registry and one processor (the release binaries, \
             poll 100 ms) with one `sql` subprocessor on the sample accounting database \
             (SQLite), whose customer 1 was given invoices of a 2000-byte name each until their \
             JSON and CSV export comes to about that size; one RETURN_OF_DATA, timed from \
             Submit to the package downloaded by this process with every file's size and \
             SHA-256 checked against the manifest; phase 1 ends when the processor records the \
             export and queues its upload (the files written and synced, and streamed to the \
             registry while they were written; its uploads row), phase 2 at the request's \
             finished_at at the registry; the \
             bare stream is a tonic server-streaming RPC (this binary's `stream-server`, the \
             services' TLS, limits and runtime of one async thread) sending the same bytes \
             in 1 MiB messages from memory, hashed with SHA-256 by the receiver as the \
             package is, run {} times after the export (a new server each time), its median \
             the baseline; resident memory sampled every 100 ms",
            args.export_mib,
            export::BARE_RUNS
        ));
    }
    if args.contract_subjects > 0 {
        settings.push(format!(
            "contract end: --contract-subjects {}: one registry and one processor (the release \
             binaries) with one `sql` subprocessor on the sample accounting schema (SQLite) \
             holding that many customers, each with a contact, a paid invoice and a ledger \
             entry from 2010 (past every retention period); EndContract with choice DELETE, \
             effective now, timed to the contract end COMPLETED at the registry, and the \
             customers counted afterwards (none may be left); the bare run is the rules' \
             three DELETEs and one UPDATE in one transaction on a file copy of the same \
             database; resident memory sampled every 100 ms",
            args.contract_subjects
        ));
    }
    if args.count_erasures > 0 {
        settings.push(format!(
            "statements per erasure: --count-erasures {}: the relay above (same \
             configurations) started again on a PostgreSQL server of the run's own with \
             `pg_stat_statements`, each service on a database of its own; the erasures \
             submitted by the same callers, counted from after a warm-up to one second after \
             the last completed, less a 3 s idle window's polls at their rate (see \
             `tests/benchmark/src/statements.rs`)",
            args.count_erasures
        ));
    }
    let statement_lists = match &counted {
        Some(Ok(f)) => statement_lists(f),
        _ => Vec::new(),
    };
    let command = std::iter::once("scripts/bench.sh".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(Document {
        title: if is_pg {
            "Benchmarks (PostgreSQL)".into()
        } else {
            "Benchmarks (SQLite, the embedded default)".into()
        },
        command,
        machine,
        settings,
        rows,
        notes,
        statements: statement_lists,
    })
}

/// The rows of the statement count: per service, statements, writes, rows written and
/// commits per erasure.
fn statement_rows(
    f: Option<&std::result::Result<statements::StatementFigures, String>>,
) -> Vec<Row> {
    let Some(f) = f else {
        return Vec::new();
    };
    let f = match f {
        Ok(f) => f,
        Err(why) => {
            return vec![Row::plain(
                "statements per erasure",
                Value::Missing(why.clone()),
                "",
            )]
        }
    };
    let mut rows = Vec::new();
    for s in &f.services {
        let name = &s.name;
        rows.push(Row::plain(
            format!(
                "statements per erasure (PostgreSQL, n = {}): {name}",
                f.erasures
            ),
            Value::Num(s.statements),
            "",
        ));
        rows.push(Row::plain(
            format!("  of which INSERT, UPDATE, DELETE: {name}"),
            Value::Num(s.writes),
            "",
        ));
        rows.push(Row::plain(
            format!("  rows they wrote: {name}"),
            Value::Num(s.rows_written),
            "",
        ));
        rows.push(Row::plain(
            format!("commits (COMMIT of a transaction) per erasure: {name}"),
            Value::Num(s.commits),
            "",
        ));
        rows.push(Row::plain(
            format!("database server time executing them, per erasure: {name}"),
            Value::Num(s.exec_ms),
            "ms",
        ));
    }
    rows
}

/// Each service's statements with their calls per erasure, for the report.
fn statement_lists(f: &statements::StatementFigures) -> Vec<String> {
    let mut out = Vec::new();
    for s in &f.services {
        let mut text = format!(
            "### {}\n\n| per erasure | server ms per erasure | statement |\n| --- | --- | --- |\n",
            s.name
        );
        for (calls, ms, q) in s.each.iter().filter(|(c, _, _)| *c >= 0.005) {
            text.push_str(&format!(
                "| {calls:.2} | {ms:.3} | `{}` |\n",
                q.replace('|', "\\|").replace('`', "'")
            ));
        }
        out.push(text);
    }
    out
}

/// The contract-end benchmark's rows, or one saying it was not run.
fn contract_rows(f: Option<&contract::ContractFigures>) -> Vec<Row> {
    let Some(f) = f else {
        return vec![Row::plain(
            "contract end (against a bare bulk DELETE)",
            Value::Missing("not run: --contract-subjects 0".into()),
            "s",
        )];
    };
    let mut rows = vec![
        Row::plain(
            format!(
                "bare statements: the sample rules' DELETEs and UPDATE over {} customers ({} \
                 rows), one transaction",
                f.subjects, f.records
            ),
            Value::Num(f.bare_secs),
            "s",
        ),
        Row::plain(
            "contract end (DELETE, now): EndContract to COMPLETED at the registry",
            Value::Num(f.relay_secs),
            "s",
        )
        .against("bare statements", f.bare_secs)
        .target(Target::RatioAtMost(2.0)),
    ];
    for (name, kib) in ["registry", "processor"].iter().zip(f.peaks) {
        rows.push(Row::plain(
            format!("resident memory peak during the contract end: {name}"),
            Value::Num(mib(kib)),
            "MiB",
        ));
    }
    rows
}

/// The one-hop target: completed erasures per second.
const ONEHOP_TARGET: f64 = 1500.0;

/// The one-hop scenario's rows, or one saying it was not run.
fn onehop_rows(
    f: Option<&onehop::OnehopFigures>,
    insert_rate: f64,
    per_commit_ms: f64,
) -> Vec<Row> {
    let Some(f) = f else {
        return vec![Row::plain(
            "one hop: completed erasures (1 processor, 1 `sql` subprocessor)",
            Value::Missing("not run: --onehop-erasures 0".into()),
            "/s",
        )];
    };
    let mut rows = vec![Row::plain(
        format!(
            "one hop: completed erasures (1 processor, 1 `sql` subprocessor, {} customers; \
             n = {})",
            f.customers, f.completed
        ),
        Value::Num(f.completed_rate),
        "/s",
    )
    .against("bare INSERT", insert_rate)
    .target(Target::AtLeast(ONEHOP_TARGET))];
    let lat = &f.latencies;
    let lat_value = |v: Option<f64>| match v {
        Some(v) => Value::Num(v),
        None => Value::Missing("no customer left for the latency load".into()),
    };
    rows.push(Row::plain(
        format!(
            "one hop: latency p50, open loop at {}/s (n = {})",
            number(f.latency_rate),
            lat.len()
        ),
        lat_value(percentile(lat, 50.0)),
        "ms",
    ));
    rows.push(Row::plain(
        "one hop: latency p99",
        lat_value(percentile(lat, 99.0)),
        "ms",
    ));
    let u = &f.batch_cpu;
    rows.push(Row::plain(
        format!(
            "one hop: machine CPU busy during the batch (of which the registry and the \
             processor: {:.0} %{}; waiting for I/O: {:.0} %)",
            100.0 * u.watched,
            match u.tree_secs {
                Some(_) => format!(", the database server: {:.0} %", 100.0 * u.tree),
                None => String::new(),
            },
            100.0 * u.iowait
        ),
        Value::Num(100.0 * u.busy),
        "%",
    ));
    let completed = f.completed.max(1) as f64;
    let mut services = 0.0;
    for (name, secs) in ["registry", "processor"].iter().zip(&u.process_secs) {
        let ms = secs * 1000.0 / completed;
        services += ms;
        rows.push(Row::plain(
            format!("one hop: CPU per completed erasure: {name}"),
            Value::Num(ms),
            "ms",
        ));
    }
    rows.push(
        Row::plain(
            "one hop: CPU per completed erasure: the registry and the processor",
            Value::Num(services),
            "ms",
        )
        .against("CPU per bare INSERT commit", per_commit_ms),
    );
    if let Some(secs) = u.tree_secs {
        rows.push(Row::plain(
            "one hop: CPU per completed erasure: the database server (services' stores and \
             the holder)",
            Value::Num(secs * 1000.0 / completed),
            "ms",
        ));
    }
    rows
}

/// Why the one-hop target was missed, as far as the run's figures tell.
fn onehop_explain(f: &onehop::OnehopFigures) -> Option<String> {
    if f.completed_rate >= ONEHOP_TARGET {
        return None;
    }
    let u = &f.batch_cpu;
    let completed = f.completed.max(1) as f64;
    let services: f64 = u.process_secs.iter().sum::<f64>() * 1000.0 / completed;
    let server = u.tree_secs.map_or(0.0, |s| s * 1000.0 / completed);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Some(format!(
        "one hop below {} completed erasures/s ({:.0}/s, {:.0} % short): during the batch the \
         cores were {:.0} % busy ({:.0} % by the registry and the processor{}) and waited for \
         I/O {:.0} % of the time; one erasure cost {} ms of CPU at the registry and the \
         processor{}, so {cores:.0} cores doing nothing else would complete at most {:.0} \
         per second",
        number(ONEHOP_TARGET),
        f.completed_rate,
        100.0 * (1.0 - f.completed_rate / ONEHOP_TARGET),
        100.0 * u.busy,
        100.0 * u.watched,
        match u.tree_secs {
            Some(_) => format!(", {:.0} % by the database server", 100.0 * u.tree),
            None => String::new(),
        },
        100.0 * u.iowait,
        number(services),
        if u.tree_secs.is_some() {
            format!(" and {} ms at the database server", number(server))
        } else {
            String::new()
        },
        cores * 1000.0 / (services + server).max(1e-6)
    ))
}

/// The export benchmark's rows, or one saying it was not run.
fn export_rows(f: Option<&export::ExportFigures>) -> Vec<Row> {
    let Some(f) = f else {
        return vec![Row::plain(
            "export streaming (against bare gRPC streaming)",
            Value::Missing("not run: --export-mib 0".into()),
            "MB/s",
        )];
    };
    let bare = export::mb_per_s(f.bytes, f.baseline_secs());
    let mb = f.bytes as f64 / 1e6;
    let mut rows = vec![
        Row::plain(
            format!(
                "bare stream: {mb:.0} MB server-streamed over mTLS in 1 MiB messages, the \
                 median of {} runs ({} MB/s)",
                f.baseline_runs.len(),
                f.baseline_runs
                    .iter()
                    .map(|secs| number(export::mb_per_s(f.bytes, *secs)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Value::Num(bare),
            "MB/s",
        ),
        Row::plain(
            format!(
                "export streaming: return of data of {mb:.0} MB ({} files), Submit to package \
                 downloaded and verified ({} s)",
                f.files,
                number(f.total_secs)
            ),
            Value::Num(export::mb_per_s(f.bytes, f.total_secs)),
            "MB/s",
        )
        .against("bare stream", bare)
        .target(Target::RatioAtLeast(0.5)),
        Row::plain(
            format!(
                "export phase 1: Submit to the export recorded at the processor (SQL connector \
                 reading rows, JSON and CSV files written and synced, and streamed to the \
                 registry as they were written; {} s)",
                number(f.export_secs)
            ),
            Value::Num(export::mb_per_s(f.bytes, f.export_secs)),
            "MB/s",
        )
        .against("bare stream", bare),
        Row::plain(
            format!(
                "export phase 2: the uploader's GetUploadState per file (and UploadFile for any \
                 file not sent while written), CompletePart, to the request finished ({} s)",
                number(f.upload_secs)
            ),
            Value::Num(export::mb_per_s(f.bytes, f.upload_secs)),
            "MB/s",
        )
        .against("bare stream", bare),
        Row::plain(
            format!(
                "export phase 3: DownloadPackage, every file's size and SHA-256 checked ({} s)",
                number(f.download_secs)
            ),
            Value::Num(export::mb_per_s(f.bytes, f.download_secs)),
            "MB/s",
        )
        .against("bare stream", bare),
    ];
    for (name, kib) in ["registry", "processor"].iter().zip(f.peaks) {
        rows.push(
            Row::plain(
                format!("resident memory peak during the export: {name}"),
                Value::Num(mib(kib)),
                "MiB",
            )
            .against("bare stream server", mib(f.baseline_peak))
            .target(Target::Below(100.0)),
        );
    }
    rows
}

/// Why the export end to end stayed under half the bare stream, from this run's phases.
fn export_explain(f: &export::ExportFigures) -> Option<String> {
    let rate = |secs: f64| export::mb_per_s(f.bytes, secs);
    let (bare, total) = (rate(f.baseline_secs()), rate(f.total_secs));
    if total >= 0.5 * bare {
        return None;
    }
    let download = rate(f.download_secs);
    // End to end within twice the bare stream's time leaves, after the download, this much
    // time for the export and the upload together.
    let left = 2.0 * f.baseline_secs() - f.download_secs;
    let needed = if left > 0.0 {
        format!(
            "so the export and the upload together would have to run at {} MB/s ({:.2}× the \
             bare stream) where they ran at {} MB/s",
            number(rate(left)),
            rate(left) / bare,
            number(rate(f.export_secs + f.upload_secs))
        )
    } else {
        "so nothing would be left for the export and the upload".to_string()
    };
    Some(format!(
        "export end to end below half the bare stream ({:.2}×): the SQL connector's export \
         with its upload running alongside {} MB/s ({:.2}×; reading the rows, encoding JSON and \
         CSV, writing and syncing the files, and at the same time sending the same blocks \
         over TLS, writing and syncing them at the registry, SHA-256 on both ends), \
         closing the part {} MB/s ({:.2}×), then the download {} MB/s ({:.2}×). The download \
         alone is a server stream of the same bytes as the baseline, and a package can be \
         downloaded only once it is stored, {needed}",
        total / bare,
        number(rate(f.export_secs)),
        rate(f.export_secs) / bare,
        number(rate(f.upload_secs)),
        rate(f.upload_secs) / bare,
        number(download),
        download / bare,
    ))
}

/// What the relay's loads measured.
struct RelayFigures {
    submits: LoadResult,
    submit_cpu: CpuUsage,
    backlog: SubmitBacklog,
    batch_completed: i64,
    batch_cpu: CpuUsage,
    completed_rate: f64,
    latency_rate: f64,
    latencies: Vec<f64>,
    latency_unfinished: usize,
    /// Single requests on the idle pair, one at a time (ms, sorted).
    idle_latencies: Vec<f64>,
}

/// What was left of the Submit load's propagation when it ended.
struct SubmitBacklog {
    /// Its requests in a final state when the load ended.
    finished_at_end: i64,
    /// From the end of the load until all of them finished (or the wait gave up).
    drained_secs: f64,
    /// Of its requests, in a final state when the wait ended.
    finished: i64,
    /// Of its requests, COMPLETED when the wait ended.
    completed: i64,
}

/// What the Submit load left to propagate: none when it accepted nothing.
fn backlog_rows(submits: &LoadResult, backlog: &SubmitBacklog) -> Vec<Row> {
    if submits.ok == 0 {
        return Vec::new();
    }
    let all = backlog.finished >= submits.ok as i64;
    let drained = match all {
        true => format!(
            "accepted Submits: all finished, after the load ended ({} COMPLETED)",
            backlog.completed
        ),
        false => format!(
            "accepted Submits: NOT all finished: {} of {} when the wait gave up, after the load \
             ended",
            backlog.finished, submits.ok
        ),
    };
    vec![
        Row::plain(
            format!(
                "accepted Submits: finished when the load ended (of {})",
                submits.ok
            ),
            Value::Num(backlog.finished_at_end as f64),
            "",
        ),
        Row::plain(drained, Value::Num(backlog.drained_secs), "s"),
    ]
}

/// Requests of the single-request latency on an idle pair.
const IDLE_REQUESTS: u64 = 50;

/// How long without any request finishing counts as stuck.
const STALL: Duration = Duration::from_secs(10);

async fn relay_load(
    args: &Args,
    relay: &mut Relay,
    pids: &[u32],
    db_server: Option<u32>,
    duration: Duration,
    c: usize,
    notes: &mut Vec<String>,
) -> Result<RelayFigures> {
    // Warm-up: connects every channel and proves the whole path works before measuring.
    let warm = (2 * c) as u64;
    progress(format!("warm-up: {warm} requests through the relay"));
    let clients = relay.clients.clone();
    let r = fixed_count(c, warm, move |i| {
        submit(
            clients[i as usize % clients.len()].clone(),
            format!("warm-{i:06}"),
        )
    })
    .await;
    if r.errors > 0 {
        bail!(
            "warm-up Submits failed: {}{}",
            r.first_error.unwrap_or_default(),
            relay.log_tails()
        );
    }
    let w = relay
        .wait_finished("warm-", warm, STALL, Duration::from_secs(30), None)
        .await?;
    if w.completed == 0 {
        bail!(
            "warm-up: none of {warm} requests completed: {}{}",
            relay.describe_unfinished("warm-", 3).await,
            relay.log_tails()
        );
    }
    notes.extend(unfinished_note(relay, "warm-up", "warm-", warm, &w).await);

    // Single-request latency on an idle pair: nothing else is running yet.
    progress(format!(
        "idle latency: {IDLE_REQUESTS} requests, one at a time"
    ));
    let idle_latencies = relay.one_at_a_time("idle-", IDLE_REQUESTS).await?;
    if let Some(p50) = percentile(&idle_latencies, 50.0) {
        progress(format!("  p50 {p50:.0} ms"));
    }

    // Completed propagations: a batch as fast as the callers can submit it, until the last
    // one completes.
    progress(format!(
        "completed propagations: a batch of {} requests, {c} callers",
        args.batch
    ));
    let clients = relay.clients.clone();
    let cpu = CpuWindow::start(pids).with_tree(db_server);
    let t0 = now_ms();
    let batch = fixed_count(c, args.batch, move |i| {
        submit(
            clients[i as usize % clients.len()].clone(),
            format!("batch-{i:06}"),
        )
    })
    .await;
    notes.extend(rate_note("batch Submits", &batch));
    let w = relay
        .wait_finished(
            "batch-",
            batch.ok,
            STALL,
            Duration::from_secs(120),
            Some(&cpu),
        )
        .await?;
    notes.extend(unfinished_note(relay, "completed propagations", "batch-", batch.ok, &w).await);
    let batch_cpu = w.cpu.unwrap_or_else(|| cpu.finish());
    let batch_completed = w.completed;
    let last = relay.last_finished_at("batch-").await?.unwrap_or(t0);
    let completed_rate = w.completed as f64 / ((last - t0).max(1) as f64 / 1000.0);
    progress(format!(
        "  {completed_rate:.1} propagations/s ({} in {:.1} s)",
        w.completed,
        (last - t0) as f64 / 1000.0
    ));

    // Latency at half the completed rate, open loop.
    let latency_rate = (completed_rate / 2.0).max(1.0);
    let total = ((latency_rate * args.latency_secs as f64).round() as u64).max(10);
    progress(format!(
        "latency: {total} requests open loop at {latency_rate:.1}/s"
    ));
    let clients = relay.clients.clone();
    let lat = open_loop(latency_rate, total, move |i| {
        submit(
            clients[i as usize % clients.len()].clone(),
            format!("lat-{i:06}"),
        )
    })
    .await;
    notes.extend(rate_note("latency Submits", &lat));
    let w = relay
        .wait_finished("lat-", lat.ok, STALL, Duration::from_secs(60), None)
        .await?;
    notes.extend(unfinished_note(relay, "latency", "lat-", lat.ok, &w).await);
    let mut latencies = relay.latencies_ms("lat-").await?;
    let unfinished = relay.unfinished_ages_ms("lat-", now_ms()).await?;
    let latency_unfinished = unfinished.len();
    if !unfinished.is_empty() {
        notes.push(format!(
            "latency: the {} requests that had not finished count with their age when the wait \
             ended (a lower bound of their latency)",
            unfinished.len()
        ));
        latencies.extend(unfinished);
        latencies.sort_by(f64::total_cmp);
    }
    if let (Some(p50), Some(p99)) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0)) {
        progress(format!("  p50 {p50:.0} ms, p99 {p99:.0} ms"));
    }

    // Accepted Submits, closed loop; what they start propagates meanwhile.
    progress(format!(
        "accepted Submits: {c} callers, {} s",
        args.duration_secs
    ));
    let clients = relay.clients.clone();
    let cpu = CpuWindow::start(pids).with_tree(db_server);
    let submits = closed_loop(c, duration, move |w, n| {
        submit(clients[w % clients.len()].clone(), format!("sub-{w}-{n}"))
    })
    .await;
    let submit_cpu = cpu.finish();
    notes.extend(rate_note("Submits", &submits));
    progress(format!("  {:.0} accepted/s", submits.rate()));
    relay.check_alive()?;
    // With `delivery.yield_to_intake_ms` set the registry's dispatcher gives way to a burst
    // of Submits, and what the load accepted propagates mostly after it. Either way, wait for
    // what is left, so that the report says what accepting at that rate left to do.
    let load_ended = Instant::now();
    let done_at_end = relay.count_finished("sub-").await?;
    progress(format!(
        "  waiting for the {} accepted requests to finish ({done_at_end} finished)",
        submits.ok
    ));
    let w = relay
        .wait_finished("sub-", submits.ok, STALL, Duration::from_secs(600), None)
        .await?;
    let backlog = SubmitBacklog {
        finished_at_end: done_at_end,
        drained_secs: load_ended.elapsed().as_secs_f64(),
        finished: w.finished,
        completed: w.completed,
    };
    notes.extend(unfinished_note(relay, "Submit load", "sub-", submits.ok, &w).await);
    Ok(RelayFigures {
        submits,
        submit_cpu,
        backlog,
        batch_completed,
        batch_cpu,
        completed_rate,
        latency_rate,
        latencies,
        latency_unfinished,
        idle_latencies,
    })
}

/// A note when not all of `expected` requests under `prefix` completed: how many, and what
/// the registry knows of a few of them.
async fn unfinished_note(
    relay: &Relay,
    what: &str,
    prefix: &str,
    expected: u64,
    w: &Waited,
) -> Option<String> {
    let expected = expected as i64;
    if w.completed >= expected {
        return None;
    }
    let mut note = format!(
        "{what}: of {expected} accepted requests {} finished ({} COMPLETED)",
        w.finished, w.completed
    );
    if w.finished < expected {
        note.push_str(&format!(
            "; the other {} {} still unfinished when none had finished for {} s, e.g. {}",
            expected - w.finished,
            if expected - w.finished == 1 {
                "was"
            } else {
                "were"
            },
            STALL.as_secs(),
            relay.describe_unfinished(prefix, 2).await
        ));
    }
    progress(&note);
    Some(note)
}

/// Why targets were missed, as far as this run's figures and the design explain it.
fn explain(
    rows: &[Row],
    is_pg: bool,
    figures: &RelayFigures,
    propagation_cpu_ms: f64,
    commit_cpu_ms: f64,
) -> Vec<String> {
    let missed = |prefix: &str| {
        rows.iter()
            .any(|r| r.figure.starts_with(prefix) && r.met() == Some(false))
    };
    let cpu_cost = format!(
        "one propagation costs {} ms of CPU across the three services{}, {}× the CPU of a \
         bare INSERT commit ({} ms, SQL driver{} included)",
        number(propagation_cpu_ms),
        if is_pg {
            " and the database server"
        } else {
            ""
        },
        number(propagation_cpu_ms / commit_cpu_ms.max(1e-6)),
        number(commit_cpu_ms),
        if is_pg { " and database server" } else { "" },
    );
    let mut out = Vec::new();
    if missed("accepted Submits") {
        let u = &figures.submit_cpu;
        let bound = if u.busy >= 0.85 {
            format!(
                "so the machine ran out of CPU, not of commits (the services used {:.0} % of \
                 it{}, the rest went to the load generator and anything else running); ",
                100.0 * u.watched,
                match u.tree_secs {
                    Some(_) => format!(", the database server {:.0} %", 100.0 * u.tree),
                    None => String::new(),
                }
            )
        } else {
            String::new()
        };
        out.push(format!(
            "accepted Submits below the bare INSERT rate: during the Submit load the cores \
             were {:.0} % busy and waited for I/O {:.0} % of the time, {bound}{} of the load's \
             {} requests finished while it ran (with `delivery.yield_to_intake_ms` set, as \
             the settings say, the registry's dispatcher gives way while Submits queue), the \
             wait for the rest ended {:.1} s after it, and {cpu_cost}. Concurrent \
             Submits share a commit (the registry's intake writer stores all queued Submits \
             in one transaction, each with its events, audit entries and deliveries), and \
             each caller waits for its batch's commit; the registry's one store connection \
             also carries the acknowledgements of what was delivered; {}",
            100.0 * u.busy,
            100.0 * u.iowait,
            figures.backlog.finished_at_end,
            figures.submits.ok,
            figures.backlog.drained_secs,
            if is_pg {
                "on PostgreSQL those transactions commit side by side (no lock is shared by \
                 every transaction that records events: the audit chainer links the entries \
                 afterwards), so the database server's CPU, on the same cores, is what they \
                 share"
            } else {
                "SQLite allows one writer, so that work and intake take turns"
            }
        ));
    }
    if missed("completed propagations") {
        let u = &figures.batch_cpu;
        out.push(format!(
            "completed propagations below a quarter of the bare INSERT rate: during the batch \
             the cores were {:.0} % busy ({:.0} % by the services{}) and waited for I/O {:.0} % \
             of the time; {cpu_cost}; \
             and each request waits for a chain of durable commits in three stores, one \
             after the other (registry: the Submit, the accepted deliveries, the \
             acknowledgement batches; each processor: the accepted Deliver, the IN_PROGRESS \
             and COMPLETED steps of its {SUBPROCESSORS} tasks, the sent marks), which \
             concurrent requests share only where they meet in a batch",
            100.0 * u.busy,
            100.0 * u.watched,
            match u.tree_secs {
                Some(_) => format!(", {:.0} % by the database server", 100.0 * u.tree),
                None => String::new(),
            },
            100.0 * u.iowait,
        ));
    }
    if missed("latency p99") {
        out.push(if figures.latency_unfinished > 0 {
            format!(
                "latency p99 above ten times p50: {} of the {} latency requests never finished \
                 during the run (see above), and they set the p99",
                figures.latency_unfinished,
                figures.latencies.len()
            )
        } else {
            "latency p99 above ten times p50: a request that arrives while its services are \
             committing a batch of earlier deliveries, task steps or acknowledgements waits \
             for the whole batch, and on a small machine the three services and the load \
             generator also wait for a core"
                .into()
        });
    }
    if missed("resident memory idle") {
        out.push(
            "resident memory idle above 30 MiB: compare with the bare echo server's idle \
             figure, which is what tonic, rustls and the runtime take before any dsrelay code"
                .into(),
        );
    }
    out
}
