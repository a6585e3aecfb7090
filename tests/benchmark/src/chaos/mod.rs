//! `dsrelay-bench chaos`: erasures under SIGKILLs, checked against Jepsen's total-queue rule.
//!
//! A registry and a processor run as real processes (the binaries next to this one), their
//! stores on SQLite files or, with `--postgres`, on a PostgreSQL server the run starts
//! itself ([`postgres`]) so that it can kill that too. On PostgreSQL either service may run
//! as several replicas (`--registries`, `--processors`) sharing its identity, configuration
//! and database, each behind a TCP load balancer of the run's own ([`balancer`]) as callers
//! reach replicas in a deployment. The processor's subprocessors are SQLite holders seeded
//! with one row per subject ([`holders`]), whose triggers record every change the SQL
//! connector makes. Several submitters send one erasure per subject, each retried with the
//! same idempotency key until an answer comes back, while a killer SIGKILLs a random target
//! (a replica of the registry or of the processor, or the database) at random moments and
//! starts it again after a short random pause, one at a time; anything that exits on its own
//! is started again too, and counted. Then the run drains (every accepted request final,
//! within a bound) and checks ([`check`]): every accepted Submit is final, none is lost (its
//! id is known to the registry), none is duplicated (one request per idempotency key, one id
//! per key), each holder's row of each subject was deleted exactly once and no other
//! subject's row was touched, each task's reported outcome matches the holder's data (a
//! NOT_FOUND from a retry over a row the task's earlier attempt deleted is counted on its
//! own, issue 12 point 3; see `--allow-not-found-after-retry`), connector calls beyond one
//! per task stay within what the kills can explain, and every acknowledgement the processor
//! sent was received by the registry and applied once.
//!
//! # Layout
//! - `mod.rs`: the options, the services' configuration, the run and its printed figures
//! - [`submit`]: the submitters
//! - [`cluster`]: the processes under test and the killer
//! - [`balancer`]: the load balancers in front of replicas
//! - [`postgres`]: the run's own PostgreSQL server
//! - [`holders`]: the subprocessors' databases and their record of effects
//! - [`check`]: the drain and the total-queue check
//!
//! It is a subcommand of `dsrelay-bench` rather than a binary of its own because it needs
//! what the benchmark already has: the services as processes from sibling binaries, their
//! configuration files, the dev PKI and `scripts/bench.sh` to build and run it.

mod balancer;
mod check;
mod cluster;
mod holders;
pub(crate) mod postgres;
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
use balancer::Balancer;
use cluster::{killer, Cluster, Replica, Target};
use holders::Holder;
use postgres::PgServer;
use submit::submit_all;

/// The subprocessors (holders), each a SQLite database of its own.
const HOLDERS: [&str; 2] = ["holder-a", "holder-b"];
/// The processor's name at the registry (the dev PKI's processor certificate is its).
const PROCESSOR: &str = "payroll-bureau";
/// The name of the registry's audit checkpoint file in [`registry_toml`]'s configuration.
const CHECKPOINTS: &str = "registry-audit-checkpoints.jsonl";
/// The name of the processor's audit checkpoint file in [`processor_toml`]'s configuration.
const PROCESSOR_CHECKPOINTS: &str = "processor-audit-checkpoints.jsonl";
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
    /// Replicas of the processor: processes sharing its identity, configuration and
    /// database, behind a TCP load balancer of the run's own (the registry reaches them
    /// through it). More than one needs `--postgres`.
    #[arg(long, default_value_t = 1)]
    processors: usize,
    /// Replicas of the registry, likewise (the submitters and the processors reach them
    /// through a load balancer). Replicas of either service write their audit checkpoints
    /// to files of their own.
    /// More than one needs `--postgres`.
    #[arg(long, default_value_t = 1)]
    registries: usize,
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
    if args.processors == 0 || args.registries == 0 {
        bail!("--processors and --registries must be at least 1");
    }
    if (args.processors > 1 || args.registries > 1) && !args.postgres {
        bail!(
            "--processors or --registries above 1 need --postgres: replicas share one \
             database, and a SQLite file is one process's"
        );
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

    let registry_ports = (0..args.registries)
        .map(|_| free_port())
        .collect::<Result<Vec<_>>>()?;
    let processor_ports = (0..args.processors)
        .map(|_| free_port())
        .collect::<Result<Vec<_>>>()?;
    // A replicated service is reached through a load balancer, as in a deployment; a single
    // one directly.
    let mut balancers = Vec::new();
    let mut fronts = Vec::new();
    for (target, ports) in [
        (Target::Registry, &registry_ports),
        (Target::Processor, &processor_ports),
    ] {
        if ports.len() == 1 {
            fronts.push(ports[0]);
        } else {
            let b = Balancer::start(ports.clone()).await?;
            fronts.push(b.port);
            balancers.push((target, b));
        }
    }
    let (registry_front, processor_front) = (fronts[0], fronts[1]);

    let mut registry_configs = Vec::new();
    for (i, port) in registry_ports.iter().enumerate() {
        let mut text = registry_toml(&pki, *port, &registry_db, &[(PROCESSOR, processor_front)]);
        // `registry_toml` sets the [delivery] poll interval; the lease goes into the same
        // table (not at the end: other tables follow it).
        anyhow::ensure!(
            text.contains("\n[delivery]\n"),
            "the registry configuration has no [delivery] table"
        );
        text = text.replacen(
            "\n[delivery]\n",
            &format!("\n[delivery]\nlease_ms = {LEASE_MS}\n"),
            1,
        );
        if args.registries > 1 {
            // Each replica signs the chain's head into a file of its own.
            anyhow::ensure!(
                text.contains(CHECKPOINTS),
                "the registry configuration has no checkpoint file"
            );
            text = text.replacen(
                CHECKPOINTS,
                &format!("registry-{i}-audit-checkpoints.jsonl"),
                1,
            );
        }
        let r: dsrelay_registry::Config =
            toml::from_str(&text).context("the registry's chaos configuration")?;
        r.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let file = work.join(format!("registry-{i}.toml"));
        write_file(&file, &text)?;
        registry_configs.push(file);
    }
    let mut processor_configs = Vec::new();
    let mut task_concurrency = 0;
    for (i, port) in processor_ports.iter().enumerate() {
        let mut text = processor_toml(
            &pki,
            *port,
            &processor_db,
            &work.join("processor-data"),
            registry_front,
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
        if args.processors > 1 {
            // Each replica signs its audit trail's head into a file of its own.
            anyhow::ensure!(
                text.contains(PROCESSOR_CHECKPOINTS),
                "the processor configuration has no checkpoint file"
            );
            text = text.replacen(
                PROCESSOR_CHECKPOINTS,
                &format!("processor-{i}-audit-checkpoints.jsonl"),
                1,
            );
        }
        let p: dsrelay_processor::Config =
            toml::from_str(&text).context("the processor's chaos configuration")?;
        p.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        task_concurrency = p.tasks.concurrency;
        let file = work.join(format!("processor-{i}.toml"));
        write_file(&file, &text)?;
        processor_configs.push(file);
    }

    let replica_name = |service: &str, i: usize, n: usize| {
        if n > 1 {
            format!("{service} {i}")
        } else {
            service.to_string()
        }
    };
    let mut processors = Vec::new();
    for (i, (port, config)) in processor_ports.iter().zip(&processor_configs).enumerate() {
        let mut service = Service::spawn(
            &replica_name("processor", i, args.processors),
            &sibling_binary("dsrelay-processor")?,
            &["--config".as_ref(), config.as_os_str()],
            work.join(format!("processor-{i}.log")),
            "warn",
        )?;
        service
            .wait_serving(channel(&pki, "processor", *port, None)?)
            .await?;
        processors.push(Replica {
            service,
            port: *port,
        });
    }
    let expected = Some(dev_identity("registry", "controller"));
    let mut registries = Vec::new();
    for (i, (port, config)) in registry_ports.iter().zip(&registry_configs).enumerate() {
        let mut service = Service::spawn(
            &replica_name("registry", i, args.registries),
            &sibling_binary("dsrelay-registry")?,
            &["--config".as_ref(), config.as_os_str()],
            work.join(format!("registry-{i}.log")),
            "warn",
        )?;
        service
            .wait_serving(channel(&pki, "operator", *port, expected.clone())?)
            .await?;
        registries.push(Replica {
            service,
            port: *port,
        });
    }
    let clients = (0..args.submitters)
        .map(|_| {
            Ok(RequestServiceClient::new(channel(
                &pki,
                "partner-crm",
                registry_front,
                expected.clone(),
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    let cluster = Cluster {
        registries,
        processors,
        database,
        pki: pki.clone(),
        balancers,
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
    let balanced = cluster.balanced();
    cluster.stop().await;
    let mut report = outcome?;
    // A connector call beyond a task's first needs its earlier claim cut off: a processor
    // replica killed (or exiting) cuts off at most its `tasks.concurrency` calls, the
    // database killed (or exiting) at most that many of every replica's.
    let count = |m: &HashMap<Target, u32>, t: Target| i64::from(m.get(&t).copied().unwrap_or(0));
    let processor_stops =
        count(&kills.by_target, Target::Processor) + count(&kills.own_exits, Target::Processor);
    let database_stops =
        count(&kills.by_target, Target::Database) + count(&kills.own_exits, Target::Database);
    let cut_off =
        (processor_stops + database_stops * args.processors as i64) * task_concurrency as i64;
    report.attempts_bound = Some((
        report.tasks + cut_off,
        format!(
            "tasks + ({processor_stops} processor stops + {database_stops} database stops × \
             {} replicas) × {task_concurrency} concurrent tasks",
            args.processors
        ),
    ));
    println!(
        "chaos run: {} store, {} registry and {} processor replicas, seed {seed}, {:.0} s",
        if args.postgres {
            "PostgreSQL (its server killed too)"
        } else {
            "SQLite"
        },
        args.registries,
        args.processors,
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
    for line in balanced {
        println!("{line}");
    }
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
