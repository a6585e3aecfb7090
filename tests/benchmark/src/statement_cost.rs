//! `dsrelay-bench statement-cost`: what one keyed single-row UPDATE costs through the driver
//! the services use (sqlx's `Any` on SQLite, one writer connection, WAL, synchronous=FULL,
//! as `Db::connect` opens it), written three ways inside one transaction of `n` rows:
//!
//! - `per row`: one statement per row, as the stores write a batch of steps or accepted
//!   deliveries today; every statement is one hand-off to sqlx's SQLite thread and back;
//! - `one text`: the same statements joined into one text, run by one call (SQLite runs
//!   them one after the other; one hand-off for all), which only SQLite allows with bound
//!   parameters;
//! - `multi-row`: one `WITH v (...) AS (VALUES ...) UPDATE ... FROM v` (the form measured
//!   slower in session 10), its parameters numbered `$N`;
//! - `multi-row ?`: the same statement as [`Backend::numbered`] writes it for SQLite (`?`).
//!
//! It prints the CPU of this process (the caller and sqlx's thread) and the wall time per row
//! and per transaction. Figures only; nothing is asserted but that every UPDATE found its row.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use dsrelay_runtime::store::{values_row, Backend, Db};
use sqlx::Executor;

/// The options of `dsrelay-bench statement-cost`.
#[derive(clap::Args, Debug)]
pub(crate) struct StatementCostArgs {
    /// Rows per transaction, comma-separated: a number, or `a-b` for a size drawn anew for
    /// every transaction (each size is a statement text of its own to the one-text and
    /// multi-row forms, as the stores' batches are).
    #[arg(long, default_value = "1,8,64,100,1-64", value_delimiter = ',')]
    rows: Vec<String>,
    /// Rows written per form and size (rounded up to whole transactions).
    #[arg(long, default_value_t = 20_000)]
    total: usize,
}

/// Rows in the table, each updated in turn.
const TABLE_ROWS: usize = 10_000;

/// The three forms.
#[derive(Clone, Copy, Debug)]
enum Form {
    PerRow,
    OneText,
    MultiRow,
    MultiRowPositional,
}

impl Form {
    fn name(self) -> &'static str {
        match self {
            Form::PerRow => "per row",
            Form::OneText => "one text",
            Form::MultiRow => "multi-row",
            Form::MultiRowPositional => "multi-row ?",
        }
    }
}

const UPDATE_ONE: &str = "UPDATE t SET state = $1, note = $2, updated_at = $3 WHERE id = $4";

pub(crate) async fn run(args: &StatementCostArgs) -> Result<()> {
    let sizes: Vec<(usize, usize)> = args
        .rows
        .iter()
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Ok((a.trim().parse()?, b.trim().parse()?))
        })
        .collect::<Result<_, std::num::ParseIntError>>()
        .context("--rows takes numbers or ranges a-b")?;
    ensure!(
        sizes.iter().all(|&(a, b)| 1 <= a && a <= b && b <= 100) && args.total >= 1,
        "--rows must each be 1 to 100 (a range a-b with a <= b), --total at least 1"
    );
    let dir = tempfile::tempdir().context("creating a temporary folder")?;
    let url = format!("sqlite://{}", dir.path().join("cost.db").display());
    let db = Db::connect(&url).await?;
    db.pool
        .execute(
            "CREATE TABLE t (id TEXT PRIMARY KEY, state INTEGER NOT NULL, note TEXT NOT NULL, \
             updated_at INTEGER NOT NULL)",
        )
        .await?;
    let mut tx = db.pool.begin().await?;
    for i in 0..TABLE_ROWS {
        sqlx::query("INSERT INTO t (id, state, note, updated_at) VALUES ($1, 0, '', 0)")
            .bind(key(i))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    println!(
        "statement cost: keyed single-row UPDATEs on SQLite through sqlx Any (WAL, \
         synchronous=FULL, one connection), {} rows per form and size",
        args.total
    );
    println!(
        "{:>5}  {:<11}  {:>12}  {:>12}  {:>14}",
        "rows", "form", "CPU µs/row", "wall µs/row", "wall µs/commit"
    );
    let mut next = 0usize;
    for (spec, &(lo, hi)) in args.rows.iter().zip(&sizes) {
        for form in [
            Form::PerRow,
            Form::OneText,
            Form::MultiRow,
            Form::MultiRowPositional,
        ] {
            let mut rng = fastrand::Rng::with_seed(7);
            let (mut txs, mut written) = (0usize, 0usize);
            let cpu0 = own_cpu_secs();
            let t0 = Instant::now();
            while written < args.total {
                let n = rng.usize(lo..=hi);
                txs += 1;
                written += n;
                let ids: Vec<String> = (0..n).map(|j| key((next + j) % TABLE_ROWS)).collect();
                next += n;
                let updated = write(&db, form, &ids, next as i64).await?;
                ensure!(
                    updated == n as u64,
                    "{} updated {updated} rows of {n}",
                    form.name()
                );
            }
            let wall = t0.elapsed().as_secs_f64();
            let cpu = own_cpu_secs() - cpu0;
            let rows = written as f64;
            println!(
                "{spec:>5}  {:<11}  {:>12.1}  {:>12.1}  {:>14.0}",
                form.name(),
                cpu * 1e6 / rows,
                wall * 1e6 / rows,
                wall * 1e6 / txs as f64
            );
        }
    }
    db.pool.close().await;
    Ok(())
}

fn key(i: usize) -> String {
    format!("task-{i:08}")
}

/// Writes one transaction of `ids` in `form`; the rows it updated.
async fn write(db: &Db, form: Form, ids: &[String], at: i64) -> Result<u64> {
    let mut tx = db.pool.begin().await?;
    let mut updated = 0;
    match form {
        Form::PerRow => {
            for id in ids {
                updated += sqlx::query(UPDATE_ONE)
                    .bind(2_i64)
                    .bind("a note of a few words")
                    .bind(at)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        Form::OneText => {
            let sql: String = (0..ids.len())
                .map(|i| {
                    let b = 4 * i;
                    format!(
                        "UPDATE t SET state = ${}, note = ${}, updated_at = ${} WHERE id = ${};",
                        b + 1,
                        b + 2,
                        b + 3,
                        b + 4
                    )
                })
                .collect();
            let mut q = sqlx::query(&sql);
            for id in ids {
                q = q
                    .bind(2_i64)
                    .bind("a note of a few words")
                    .bind(at)
                    .bind(id);
            }
            updated = q.execute(&mut *tx).await?.rows_affected();
        }
        Form::MultiRow | Form::MultiRowPositional => {
            let rows: Vec<String> = (0..ids.len())
                .map(|i| values_row(4 * i + 1..=4 * i + 4))
                .collect();
            let sql = format!(
                "WITH v (state, note, updated_at, id) AS (VALUES {}) \
                 UPDATE t SET state = v.state, note = v.note, updated_at = v.updated_at \
                 FROM v WHERE t.id = v.id",
                rows.join(", ")
            );
            let sql = match form {
                Form::MultiRowPositional => Backend::Sqlite.numbered(&sql),
                _ => sql.as_str().into(),
            };
            let mut q = sqlx::query(&sql);
            for id in ids {
                q = q
                    .bind(2_i64)
                    .bind("a note of a few words")
                    .bind(at)
                    .bind(id);
            }
            updated = q.execute(&mut *tx).await?.rows_affected();
        }
    }
    tx.commit().await?;
    Ok(updated)
}

/// This process's CPU time so far (user + system, all threads), in seconds.
fn own_cpu_secs() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let rest = stat[stat.rfind(')')? + 1..].to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    ticks as f64 / 100.0
}
