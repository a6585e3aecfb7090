//! Statements and commits one erasure costs at each service, read from PostgreSQL's own
//! counters (issue 11 point 3).
//!
//! The relay of the main run (one registry, two processors with three `noop` subprocessors
//! each, the same configurations) is started again on a PostgreSQL server of this run's own,
//! found and started as the chaos test's (`chaos::postgres`), with `pg_stat_statements`
//! loaded. Each service has a database of its own, so the extension's per-database counts are
//! that service's. After a warm-up, the counts are read three times: before an idle window,
//! after it, and after a batch of erasures (submitted by the run's callers) has completed and
//! one more second has passed. Per statement text, the batch window's calls less what the
//! idle window's calls (the workers' polls that found nothing) come to over as long a time,
//! divided by the erasures completed, is what one erasure costs. The benchmark's own reads of
//! the registry's `requests` table (`idempotency_key LIKE`) are left out.
//!
//! What is printed per service: statements (everything but BEGIN, COMMIT and ROLLBACK), of
//! which writes (INSERT, UPDATE, DELETE, and statements starting WITH that contain one),
//! rows those writes affected, and commits: the COMMIT statements of explicit transactions.
//! A statement a service runs outside a transaction commits alone and is not among those;
//! such statements are in the list of statements, which names every one.
//!
//! PostgreSQL runs the same statements as SQLite, except for the audit trail: a transaction
//! that records events queues its entries in `audit_pending`, and the service's chainer
//! chains them in batches (advisory lock, head, pending rows, INSERT, DELETE), where SQLite's
//! one writer chains them in the transaction itself.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dsrelay_runtime::pki::DevPki;
use dsrelay_runtime::store::Db;

use crate::chaos::postgres::{find_bin, PgServer};
use crate::load::fixed_count;
use crate::progress;
use crate::relay::{submit, Databases, Relay};

/// The services' databases and the names the report gives them.
const SERVICES: [(&str, &str); 3] = [
    ("registry", "registry"),
    ("processor_a", "processor payroll-bureau"),
    ("processor_b", "processor bench-b"),
];

/// How long the idle window lasts.
const IDLE: Duration = Duration::from_secs(3);

/// What one erasure costs at one service.
#[derive(Debug, Clone)]
pub(crate) struct ServiceCounts {
    /// The service, as the report names it.
    pub(crate) name: String,
    /// Statements other than BEGIN, COMMIT and ROLLBACK, per erasure.
    pub(crate) statements: f64,
    /// Of which INSERT, UPDATE and DELETE, per erasure.
    pub(crate) writes: f64,
    /// Rows those writes affected, per erasure.
    pub(crate) rows_written: f64,
    /// COMMIT statements (explicit transactions committed), per erasure.
    pub(crate) commits: f64,
    /// Time the server's executor spent on this service's statements, per erasure (ms;
    /// `pg_stat_statements.total_exec_time`, which times a COMMIT at about 0: its WAL flush
    /// is not in it).
    pub(crate) exec_ms: f64,
    /// Every statement with its calls and execution time (ms) per erasure, most called
    /// first (BEGIN and COMMIT included), for the report's list.
    pub(crate) each: Vec<(f64, f64, String)>,
}

/// The counts of the run.
#[derive(Debug, Clone)]
pub(crate) struct StatementFigures {
    /// Erasures that completed in the batch.
    pub(crate) erasures: i64,
    /// Per service, in [`SERVICES`] order.
    pub(crate) services: Vec<ServiceCounts>,
}

/// Calls, rows and execution time (ms) of each statement text, per database.
type Snapshot = BTreeMap<String, (i64, i64, f64)>;

/// Runs the counting relay with `erasures` erasures from `concurrency` callers; `None` (with
/// the reason) when no PostgreSQL server binaries are installed or the server cannot load
/// `pg_stat_statements`.
pub(crate) async fn run(
    pki: &DevPki,
    work: &Path,
    channels: usize,
    concurrency: usize,
    erasures: u64,
) -> Result<std::result::Result<StatementFigures, String>> {
    if find_bin().is_none() {
        return Ok(Err(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin".into(),
        ));
    }
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let server = PgServer::start_with(
        work.join("postgres.log"),
        &[
            "shared_preload_libraries=pg_stat_statements",
            "pg_stat_statements.track=all",
            "pg_stat_statements.max=10000",
        ],
    )
    .await?;
    let admin = Db::connect(&server.url("postgres")).await?;
    if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&admin.pool)
        .await
    {
        return Ok(Err(format!("pg_stat_statements is not available: {e}")));
    }
    let dbs = Databases {
        registry: server.create_database("registry").await?,
        processor_a: server.create_database("processor_a").await?,
        processor_b: server.create_database("processor_b").await?,
        export_registry: None,
        export_processor: None,
        contract_registry: None,
        contract_processor: None,
        onehop_registry: None,
        onehop_processor: None,
        onehop_holder: None,
    };
    progress(format!(
        "statements per erasure: the relay on PostgreSQL with pg_stat_statements, {erasures} erasures"
    ));
    let (mut relay, _) = Relay::start(pki, work, &dbs, channels).await?;
    let outcome = count(&admin, &mut relay, concurrency, erasures).await;
    relay.stop().await;
    admin.pool.close().await;
    drop(server);
    outcome.map(Ok)
}

async fn count(
    admin: &Db,
    relay: &mut Relay,
    concurrency: usize,
    erasures: u64,
) -> Result<StatementFigures> {
    let clients = relay.clients.clone();
    let warm = (2 * concurrency) as u64;
    fixed_count(concurrency, warm, move |i| {
        submit(
            clients[i as usize % clients.len()].clone(),
            format!("stw-{i:06}"),
        )
    })
    .await;
    relay
        .wait_finished(
            "stw-",
            warm,
            Duration::from_secs(10),
            Duration::from_secs(30),
            None,
        )
        .await?;
    // Let the last acknowledgements and delivery marks of the warm-up land.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let idle_start = snapshot_all(admin).await?;
    let t0 = Instant::now();
    tokio::time::sleep(IDLE).await;
    let idle_end = snapshot_all(admin).await?;
    let idle_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let clients = relay.clients.clone();
    let batch = fixed_count(concurrency, erasures, move |i| {
        submit(
            clients[i as usize % clients.len()].clone(),
            format!("stc-{i:06}"),
        )
    })
    .await;
    let w = relay
        .wait_finished(
            "stc-",
            batch.ok,
            Duration::from_secs(10),
            Duration::from_secs(120),
            None,
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = snapshot_all(admin).await?;
    let busy_secs = t1.elapsed().as_secs_f64();
    if w.completed == 0 {
        bail!("statements per erasure: none of {erasures} erasures completed");
    }
    let scale = busy_secs / idle_secs;
    let services = SERVICES
        .iter()
        .zip(idle_start.iter().zip(&idle_end).zip(&end))
        .map(|((_, name), ((a, b), c))| per_erasure(name, a, b, c, scale, w.completed))
        .collect();
    Ok(StatementFigures {
        erasures: w.completed,
        services,
    })
}

/// One service's counts per erasure: the batch window (`b` to `c`) less the idle window
/// (`a` to `b`) times `scale`, over `n` erasures.
fn per_erasure(
    name: &str,
    a: &Snapshot,
    b: &Snapshot,
    c: &Snapshot,
    scale: f64,
    n: i64,
) -> ServiceCounts {
    let get = |s: &Snapshot, q: &str| s.get(q).copied().unwrap_or((0, 0, 0.0));
    let n = n as f64;
    let mut out = ServiceCounts {
        name: name.to_string(),
        statements: 0.0,
        writes: 0.0,
        rows_written: 0.0,
        commits: 0.0,
        exec_ms: 0.0,
        each: Vec::new(),
    };
    for query in c.keys() {
        let (ca, ra, ta) = get(a, query);
        let (cb, rb, tb) = get(b, query);
        let (cc, rc, tc) = get(c, query);
        let calls = ((cc - cb) as f64 - (cb - ca) as f64 * scale).max(0.0) / n;
        let rows = ((rc - rb) as f64 - (rb - ra) as f64 * scale).max(0.0) / n;
        let ms = ((tc - tb) - (tb - ta) * scale).max(0.0) / n;
        if calls <= 0.0 {
            continue;
        }
        out.exec_ms += ms;
        match kind(query) {
            Kind::Commit => out.commits += calls,
            Kind::Control => {}
            Kind::Write => {
                out.statements += calls;
                out.writes += calls;
                out.rows_written += rows;
            }
            Kind::Read => out.statements += calls,
        }
        out.each.push((calls, ms, one_line(query)));
    }
    out.each
        .sort_by(|x, y| y.0.total_cmp(&x.0).then(x.2.cmp(&y.2)));
    out
}

#[derive(Debug, PartialEq)]
enum Kind {
    Commit,
    /// BEGIN, ROLLBACK.
    Control,
    Write,
    Read,
}

fn kind(query: &str) -> Kind {
    let q = query.trim_start().to_ascii_uppercase();
    let first = q.split_whitespace().next().unwrap_or("");
    match first {
        "COMMIT" | "END" => Kind::Commit,
        "BEGIN" | "START" | "ROLLBACK" => Kind::Control,
        "INSERT" | "UPDATE" | "DELETE" => Kind::Write,
        "WITH"
            if ["INSERT ", "UPDATE ", "DELETE "]
                .iter()
                .any(|w| q.contains(w)) =>
        {
            Kind::Write
        }
        _ => Kind::Read,
    }
}

/// The statement on one line, at most 160 characters.
fn one_line(query: &str) -> String {
    let s: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 160 {
        format!("{}…", s.chars().take(160).collect::<String>())
    } else {
        s
    }
}

/// The counts of every service's database, in [`SERVICES`] order.
async fn snapshot_all(admin: &Db) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    for (db, _) in SERVICES {
        let rows: Vec<(String, i64, i64, f64)> = sqlx::query_as(
            "SELECT s.query, s.calls, s.rows, s.total_exec_time FROM pg_stat_statements s \
             JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
        )
        .bind(db)
        .fetch_all(&admin.pool)
        .await
        .context("reading pg_stat_statements")?;
        let mut snap = Snapshot::new();
        for (query, calls, rows, ms) in rows {
            if query.contains("idempotency_key LIKE") {
                continue;
            }
            // The same text may stand under several query ids (another user, a top-level
            // call and a nested one): add them up.
            let e = snap.entry(query).or_default();
            e.0 += calls;
            e.1 += rows;
            e.2 += ms;
        }
        out.push(snap);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_told_apart_by_their_first_word() {
        assert_eq!(kind("COMMIT"), Kind::Commit);
        assert_eq!(kind("BEGIN"), Kind::Control);
        assert_eq!(kind("  insert into t values ($1)"), Kind::Write);
        assert_eq!(
            kind("WITH c AS (SELECT 1) UPDATE t SET a = $1"),
            Kind::Write
        );
        assert_eq!(kind("WITH c AS (SELECT 1) SELECT * FROM c"), Kind::Read);
        assert_eq!(kind("SELECT pg_advisory_xact_lock($1)"), Kind::Read);
    }

    #[test]
    fn the_idle_window_is_taken_out_at_its_rate() {
        let snap = |v: &[(&str, i64)]| -> Snapshot {
            v.iter()
                .map(|(q, c)| (q.to_string(), (*c, *c, *c as f64 / 10.0)))
                .collect()
        };
        let a = snap(&[("SELECT poll", 10)]);
        let b = snap(&[("SELECT poll", 20)]);
        let c = snap(&[("SELECT poll", 60), ("INSERT x", 100), ("COMMIT", 50)]);
        // The batch window is twice as long as the idle one: 40 polls, 20 of them idle.
        let s = per_erasure("r", &a, &b, &c, 2.0, 10);
        assert_eq!(s.statements, 2.0 + 10.0);
        assert_eq!(s.writes, 10.0);
        assert_eq!(s.rows_written, 10.0);
        assert_eq!(s.commits, 5.0);
        // Over 10 erasures: 10 ms of INSERT, 5 ms of COMMIT, and of the polls' 4 ms in the
        // batch window the 2 ms beyond the idle rate (1 ms idle, at twice the length).
        assert!(
            (s.exec_ms - (1.0 + 0.5 + 0.2)).abs() < 1e-9,
            "{}",
            s.exec_ms
        );
        assert_eq!(s.each[0], (10.0, 1.0, "INSERT x".to_string()));
    }
}
