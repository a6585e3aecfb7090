//! `dsrelay-bench chaos`: erasures under SIGKILLs, checked against Jepsen's total-queue rule.
//!
//! One registry and one processor run as real processes (the binaries next to this one),
//! their stores on SQLite files or, with `--postgres`, on a PostgreSQL server the run starts
//! itself ([`postgres`]) so that it can kill that too. The processor's subprocessors are
//! SQLite holders seeded with one row per subject ([`holders`]), whose triggers record every
//! change the SQL connector makes. Several submitters send one erasure per subject, each
//! retried with the same idempotency key until an answer comes back, while a killer SIGKILLs
//! a random target (registry, processor or database) at random moments and starts it again
//! after a short random pause; anything that exits on its own is started again too, and
//! counted. Then the run drains (every accepted request final, within a bound) and checks
//! ([`check`]): every accepted Submit is final, none is lost (its id is known to the
//! registry), none is duplicated (one request per idempotency key, one id per key), each
//! holder's row of each subject was deleted exactly once and no other subject's row was
//! touched, and each task's reported outcome matches the holder's data (a NOT_FOUND from a
//! retry over a row the task's earlier attempt deleted is counted on its own, issue 12
//! point 3; see `--allow-not-found-after-retry`).
//!
//! # Layout
//! - `mod.rs`: the options, the services' configuration, the run and its printed figures
//! - [`submit`]: the submitters
//! - [`cluster`]: the processes under test and the killer
//! - [`postgres`]: the run's own PostgreSQL server
//! - [`holders`]: the subprocessors' databases and their record of effects
//! - [`check`]: the drain and the total-queue check
//!
//! It is a subcommand of `dsrelay-bench` rather than a binary of its own because it needs
//! what the benchmark already has: the services as processes from sibling binaries, their
//! configuration files, the dev PKI and `scripts/bench.sh` to build and run it.

mod check;
mod cluster;
mod holders;
mod postgres;
mod submit;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_runtime::pki::{dev_identity, DevPki};

use crate::export::{processor_toml, SqlSubprocessor};
use crate::progress;
use crate::relay::{registry_toml, write_file};
use crate::service::{channel, free_port, sibling_binary, Service};
use cluster::{killer, Cluster, Target};
use holders::Holder;
use postgres::PgServer;
use submit::submit_all;

/// The subprocessors (holders), each a SQLite database of its own.
const HOLDERS: [&str; 2] = ["holder-a", "holder-b"];
/// The processor's name at the registry (the dev PKI's processor certificate is its).
const PROCESSOR: &str = "payroll-bureau";
/// Leases of claimed work (registry deliveries, processor tasks and acknowledgements): short,
/// so that the work a killed process held is taken up again within seconds.
const LEASE_MS: u64 = 5_000;

/// `dsrelay-bench chaos`'s options.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ChaosArgs {
    /// Erasure requests, one per seeded subject.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// SIGKILLs in all, each of a random target.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Put both services' stores on a PostgreSQL server the run starts (and kills) itself;
    /// needs the server binaries under /usr/lib/postgresql/*/bin.
    #[arg(long)]
    postgres: bool,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 8)]
    submitters: usize,
    /// Submits per second, over all submitters (so that the kills fall under load).
    #[arg(long, default_value_t = 50)]
    rate: u64,
    /// Mean time between one target being up again and the next kill (ms); each gap is
    /// drawn uniformly from a quarter to one and three quarters of it.
    #[arg(long, default_value_t = 1500)]
    kill_gap_ms: u64,
    /// Longest pause between a kill and the restart (ms); each is drawn from 100 ms to this.
    #[arg(long, default_value_t = 1000)]
    max_pause_ms: u64,
    /// Subjects seeded in every holder but never asked for: their rows must stay untouched.
    #[arg(long, default_value_t = 100)]
    unasked: u64,
    /// The longest one Submit is retried before the run counts it as not accepted (s).
    #[arg(long, default_value_t = 120)]
    submit_timeout_secs: u64,
    /// The longest the run waits, after the last kill and Submit, for every accepted request
    /// to be final (s).
    #[arg(long, default_value_t = 300)]
    drain_secs: u64,
    /// Report, but do not fail on, tasks that answered NOT_FOUND on a retry over a row an
    /// earlier attempt of theirs deleted (the processor killed between the holder's commit
    /// and its own): the false outcome of issue 12 point 3, which the SQL connector's
    /// erasure receipts now prevent; kept to compare a build without them. Every other
    /// check still fails the run.
    #[arg(long)]
    allow_not_found_after_retry: bool,
    /// Kill only these targets (default: all of them).
    #[arg(long, value_delimiter = ',', value_parser = ["registry", "processor", "database"])]
    targets: Vec<String>,
    /// Seed of the random moments, targets and pauses (default: drawn, and printed).
    #[arg(long)]
    seed: Option<u64>,
}

/// Runs the chaos test; an error when it fails (after the figures are printed).
pub(crate) async fn run(args: &ChaosArgs) -> Result<()> {
    if args.requests == 0 || args.submitters == 0 || args.rate == 0 {
        bail!("--requests, --submitters and --rate must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let work = tempfile::Builder::new()
        .prefix("dsrelay-chaos.")
        .tempdir()
        .context("creating a temporary folder")?;
    let result = chaos(args, seed, work.path()).await;
    match result {
        Ok(true) => Ok(()),
        Ok(false) => {
            let kept = work.keep();
            bail!(
                "the chaos run failed (seed {seed}); its logs and databases are kept in {}",
                kept.display()
            )
        }
        Err(e) => {
            let kept = work.keep();
            Err(e.context(format!(
                "the chaos run could not finish (seed {seed}); its logs and databases are \
                 kept in {}",
                kept.display()
            )))
        }
    }
}

/// The run in `work`: true when it passed.
async fn chaos(args: &ChaosArgs, seed: u64, work: &Path) -> Result<bool> {
    let pki = DevPki::ensure(&work.join("pki"))?;
    let subjects = args.requests + args.unasked;
    progress(format!(
        "chaos: seed {seed}; seeding {} holders with {subjects} subjects each",
        HOLDERS.len()
    ));
    let mut holders = Vec::new();
    for name in HOLDERS {
        holders.push(Holder::create(work, name, subjects).await?);
    }
    let database = if args.postgres {
        progress("chaos: starting a PostgreSQL server of the run's own");
        Some(PgServer::start(work.join("postgres.log")).await?)
    } else {
        None
    };
    let (registry_db, processor_db) = match &database {
        Some(pg) => (
            pg.create_database("registry").await?,
            pg.create_database("processor").await?,
        ),
        None => (
            format!("sqlite://{}/registry.db", work.display()),
            format!("sqlite://{}/processor.db", work.display()),
        ),
    };

    let registry_port = free_port()?;
    let processor_port = free_port()?;
    let mut registry_text = registry_toml(
        &pki,
        registry_port,
        &registry_db,
        &[(PROCESSOR, processor_port)],
    );
    // `registry_toml` sets the [delivery] poll interval; the lease goes into the same table
    // (not at the end: other tables follow it).
    anyhow::ensure!(
        registry_text.contains("\n[delivery]\n"),
        "the registry configuration has no [delivery] table"
    );
    registry_text = registry_text.replacen(
        "\n[delivery]\n",
        &format!("\n[delivery]\nlease_ms = {LEASE_MS}\n"),
        1,
    );
    let processor_text = processor_toml(
        &pki,
        processor_port,
        &processor_db,
        &work.join("processor-data"),
        registry_port,
        Some(LEASE_MS),
        holders
            .iter()
            .map(|h| SqlSubprocessor {
                name: h.name.clone(),
                categories: &["contact", "invoicing", "marketing"],
                connector: h.connector(),
            })
            .collect(),
    )?;
    let r: dsrelay_registry::Config =
        toml::from_str(&registry_text).context("the registry's chaos configuration")?;
    r.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let p: dsrelay_processor::Config =
        toml::from_str(&processor_text).context("the processor's chaos configuration")?;
    p.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let processor_config = work.join("processor.toml");
    write_file(&processor_config, &processor_text)?;
    let registry_config = work.join("registry.toml");
    write_file(&registry_config, &registry_text)?;

    let mut processor = Service::spawn(
        "processor",
        &sibling_binary("dsrelay-processor")?,
        &["--config".as_ref(), processor_config.as_os_str()],
        work.join("processor.log"),
        "warn",
    )?;
    processor
        .wait_serving(channel(&pki, "processor", processor_port, None)?)
        .await?;
    let expected = Some(dev_identity("registry", "controller"));
    let mut registry = Service::spawn(
        "registry",
        &sibling_binary("dsrelay-registry")?,
        &["--config".as_ref(), registry_config.as_os_str()],
        work.join("registry.log"),
        "warn",
    )?;
    registry
        .wait_serving(channel(&pki, "operator", registry_port, expected.clone())?)
        .await?;
    let clients = (0..args.submitters)
        .map(|_| {
            Ok(RequestServiceClient::new(channel(
                &pki,
                "partner-crm",
                registry_port,
                expected.clone(),
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    let cluster = Cluster {
        registry,
        processor,
        database,
        pki: pki.clone(),
        registry_port,
        processor_port,
    };

    progress(format!(
        "chaos: {} erasures from {} submitters at {}/s; {} kills of {}",
        args.requests,
        args.submitters,
        args.rate,
        args.kills,
        cluster
            .targets()
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let started = Instant::now();
    let kills_done = Arc::new(AtomicU32::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let killer = tokio::spawn(killer(
        cluster,
        args.clone(),
        seed,
        kills_done.clone(),
        stop_rx,
    ));
    let submitted = submit_all(args, clients.clone()).await;
    let accepted = submitted.iter().filter(|s| s.id.is_some()).count();
    progress(format!(
        "chaos: {accepted} of {} Submits accepted in {:.0} s; waiting for the kills to end",
        args.requests,
        started.elapsed().as_secs_f64()
    ));
    while kills_done.load(Ordering::SeqCst) < args.kills && !killer.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress(format!(
        "chaos: kills over after {:.0} s; draining (up to {} s)",
        started.elapsed().as_secs_f64(),
        args.drain_secs
    ));
    let drained = check::drain(
        &clients[0],
        &submitted,
        Duration::from_secs(args.drain_secs),
        &killer,
    )
    .await;
    let _ = stop_tx.send(true);
    let (cluster, kills) = killer
        .await
        .context("the killer panicked")?
        .context("the killer stopped")?;
    let outcome = match drained {
        Ok(()) => {
            check::check(
                &clients[0],
                &submitted,
                &holders,
                args.requests,
                &registry_db,
                &processor_db,
                args.allow_not_found_after_retry,
            )
            .await
        }
        Err(e) => Err(e),
    };
    let tails = cluster.log_tails();
    cluster.stop().await;
    let report = outcome?;
    println!(
        "chaos run: {} store, seed {seed}, {:.0} s",
        if args.postgres {
            "PostgreSQL (its server killed too)"
        } else {
            "SQLite"
        },
        started.elapsed().as_secs_f64()
    );
    let calls: u32 = submitted.iter().map(|s| s.calls).sum();
    let deduplicated = submitted.iter().filter(|s| s.deduplicated).count();
    println!(
        "requests: {} asked, {accepted} accepted; {calls} Submit calls ({} retried, \
         {deduplicated} answered as deduplicated)",
        args.requests,
        calls as usize - submitted.len()
    );
    let per = |m: &HashMap<Target, u32>| {
        [Target::Registry, Target::Processor, Target::Database]
            .iter()
            .filter(|t| args.postgres || **t != Target::Database)
            .map(|t| format!("{} {}", t.name(), m.get(t).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "kills: {} SIGKILLs ({}); exits on their own: {}; starts retried: {}",
        kills.by_target.values().sum::<u32>(),
        per(&kills.by_target),
        per(&kills.own_exits),
        kills.failed_starts
    );
    report.print();
    let asked = args.requests as usize;
    let pass = report.passed() && accepted == asked;
    if accepted != asked {
        println!(
            "not accepted within {} s: {} (first error: {})",
            args.submit_timeout_secs,
            asked - accepted,
            submitted
                .iter()
                .find_map(|s| s.last_error.clone())
                .unwrap_or_default()
        );
    }
    println!("{}", if pass { "PASS" } else { "FAIL" });
    if !pass {
        eprintln!("{tails}");
    }
    Ok(pass)
}
