//! The `audit_log` table, which the registry and the processor each keep in their own store
//! with the same columns: appending the next entry, and reading the head, one entry's hash
//! and a page of entries.
//!
//! Chaining an entry reads the last entry and writes the next, so chainers must take turns.
//! How a change's entries reach the chain depends on the backend:
//!
//! - **SQLite:** the one writer connection already holds every transaction apart, so
//!   [`append_all`] chains the entries in the change's own transaction.
//! - **PostgreSQL:** replicas and concurrent transactions write at once, and a chain lock taken
//!   by every transaction that records an entry would make them all commit one at a time.
//!   Instead [`append_all`] queues the entries in `audit_pending`, in the change's own
//!   transaction and without a lock, so the change and its entries commit together or not at
//!   all; [`chain_pending`] then moves what has been committed to the chain in batches, one
//!   transaction each, holding the service's chain lock (a transaction-scoped advisory lock
//!   that only chainers take). Every service runs [`run_chainer`], and its stores precede
//!   every read of the trail's entries or head ([`entries`], [`head`]) with a
//!   [`chain_pending`], so an answer includes every entry committed before it was asked.
//!   ([`hash_of`] is asked only for entries that a checkpoint signed, chained by then.)
//!
//! The price on PostgreSQL: an entry is in the chain, and so tamper-evident, from its
//! chaining on, [`CHAIN_INTERVAL`] at most after its commit when the service runs; until then
//! it sits in `audit_pending`, which refuses UPDATE but not the chainer's DELETE.

use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::{AnyConnection, AnyPool};
use tokio::sync::watch;

use super::{Entry, GENESIS_HASH};
use crate::store::{Backend, Db};

/// How often [`run_chainer`] moves committed entries from `audit_pending` to the chain.
pub const CHAIN_INTERVAL: Duration = Duration::from_millis(50);

/// Entries [`chain_pending`] chains per transaction.
const CHAIN_BATCH: i64 = 1000;

/// What an entry says; its seq and hashes come from the chain.
pub struct NewEntry {
    /// When it happened (milliseconds since the epoch, the service's clock).
    pub occurred_at: i64,
    /// The request it concerns.
    pub request_id: String,
    /// The service's event type number.
    pub event_type: i32,
    /// Who acted.
    pub actor: String,
    /// What happened, in words; never personal data.
    pub detail: String,
}

/// Appends `new` in the caller's transaction (see [`append_all`]).
pub async fn append(conn: &mut AnyConnection, new: NewEntry) -> Result<()> {
    append_all(conn, vec![new]).await
}

/// Parameters per row of [`chain`]'s INSERTs.
const PARAMS_PER_ROW: usize = 8;

/// Parameters per row of [`queue`]'s INSERTs.
const PENDING_PARAMS_PER_ROW: usize = 5;

/// Records `entries`, in order, in the caller's transaction: on SQLite chained at once, on
/// PostgreSQL queued for [`chain_pending`] (see the module documentation). Either way they
/// commit or roll back with the caller's change.
pub async fn append_all(conn: &mut AnyConnection, entries: Vec<NewEntry>) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    match Backend::of_connection(conn) {
        Backend::Sqlite => chain(conn, entries).await,
        Backend::Postgres => queue(conn, entries).await,
    }
}

/// Chains `entries` in the caller's transaction, in order, each to the one before (the first
/// to the trail's last entry): one read of the head, then multi-row INSERTs. The caller must
/// be the only chainer until it commits.
async fn chain(conn: &mut AnyConnection, entries: Vec<NewEntry>) -> Result<()> {
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let (mut seq, mut prev_hash) = match last {
        Some((seq, hash)) => (u64::try_from(seq).context("audit seq")?, hash),
        None => (0, GENESIS_HASH.to_string()),
    };
    let mut chained = Vec::with_capacity(entries.len());
    for new in entries {
        seq += 1;
        let mut entry = Entry {
            seq,
            occurred_at: new.occurred_at,
            request_id: new.request_id,
            event_type: new.event_type,
            actor: new.actor,
            detail: new.detail,
            prev_hash: std::mem::take(&mut prev_hash),
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
        prev_hash = entry.hash.clone();
        chained.push(entry);
    }
    let rows = Backend::of_connection(conn).rows_per_statement(PARAMS_PER_ROW);
    for chunk in chained.chunks(rows) {
        let mut sql = String::from(
            "INSERT INTO audit_log (seq, occurred_at, request_id, event_type, actor, detail, \
             prev_hash, hash) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * PARAMS_PER_ROW;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&crate::store::values_row(b + 1..=b + PARAMS_PER_ROW));
        }
        let sql = Backend::of_connection(conn).numbered(&sql);
        let mut q = sqlx::query(&sql);
        for e in chunk {
            q = q
                .bind(i64::try_from(e.seq).context("audit seq")?)
                .bind(e.occurred_at)
                .bind(e.request_id.clone())
                .bind(i64::from(e.event_type))
                .bind(e.actor.clone())
                .bind(e.detail.clone())
                .bind(e.prev_hash.clone())
                .bind(e.hash.clone());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Queues `entries` in `audit_pending`, in order, in the caller's transaction.
async fn queue(conn: &mut AnyConnection, entries: Vec<NewEntry>) -> Result<()> {
    let rows = Backend::of_connection(conn).rows_per_statement(PENDING_PARAMS_PER_ROW);
    for chunk in entries.chunks(rows) {
        let mut sql = String::from(
            "INSERT INTO audit_pending (occurred_at, request_id, event_type, actor, detail) \
             VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * PENDING_PARAMS_PER_ROW;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&crate::store::values_row(
                b + 1..=b + PENDING_PARAMS_PER_ROW,
            ));
        }
        let mut q = sqlx::query(&sql);
        for e in chunk {
            q = q
                .bind(e.occurred_at)
                .bind(e.request_id.clone())
                .bind(i64::from(e.event_type))
                .bind(e.actor.clone())
                .bind(e.detail.clone());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Moves every entry committed to `audit_pending` before the call to the chain, oldest
/// queued first, in transactions of up to `CHAIN_BATCH` entries that each hold the chain
/// lock `lock_key` (the service's own); returns how many it chained. Nothing is queued on
/// SQLite, where it does nothing.
pub async fn chain_pending(db: &Db, lock_key: i64) -> Result<usize> {
    if db.backend == Backend::Sqlite {
        return Ok(0);
    }
    let mut chained = 0;
    loop {
        let mut tx = db.pool.begin().await?;
        if let Some(lock) = db.backend.transaction_lock() {
            sqlx::query(lock)
                .bind(lock_key)
                .fetch_one(&mut *tx)
                .await
                .context("taking the audit chain lock")?;
        }
        // Only committed rows are seen, and only those are deleted below (by id: a lower id
        // that commits after this read is left for the next batch, never deleted unchained).
        let pending: Vec<(i64, i64, String, i64, String, String)> = sqlx::query_as(
            "SELECT id, occurred_at, request_id, event_type, actor, detail \
             FROM audit_pending ORDER BY id LIMIT $1",
        )
        .bind(CHAIN_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if pending.is_empty() {
            tx.rollback().await?;
            return Ok(chained);
        }
        let n = pending.len();
        let mut ids = Vec::with_capacity(n);
        let mut entries = Vec::with_capacity(n);
        for (id, occurred_at, request_id, event_type, actor, detail) in pending {
            ids.push(id);
            entries.push(NewEntry {
                occurred_at,
                request_id,
                event_type: i32::try_from(event_type).context("audit event type")?,
                actor,
                detail,
            });
        }
        chain(&mut tx, entries).await?;
        for chunk in ids.chunks(db.backend.rows_per_statement(1)) {
            let sql = format!(
                "DELETE FROM audit_pending WHERE id IN ({})",
                crate::store::placeholders(1, chunk.len())
            );
            let sql = db.backend.numbered(&sql);
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        chained += n;
        if n < CHAIN_BATCH as usize {
            return Ok(chained);
        }
    }
}

/// Chains what is committed to `audit_pending` every [`CHAIN_INTERVAL`] until `stop` turns
/// true (see the module documentation); returns at once on SQLite.
pub async fn run_chainer(db: Db, lock_key: i64, mut stop: watch::Receiver<bool>) {
    if db.backend == Backend::Sqlite {
        return;
    }
    // A database that refuses at once (a login refused, a permission taken away) would
    // otherwise fail every round, 20 times a second: a run of failures is logged when it
    // begins and when it ends, and retried with a growing pause meanwhile.
    let mut failing: Option<(std::time::Instant, u32)> = None;
    loop {
        if *stop.borrow() {
            // What committed last is chained now rather than at the next start.
            if let Err(e) = chain_pending(&db, lock_key).await {
                tracing::warn!(error = format!("{e:#}"), "chaining audit entries failed");
            }
            return;
        }
        match chain_pending(&db, lock_key).await {
            Ok(n) => {
                if let Some((since, failures)) = failing.take() {
                    tracing::info!(
                        failures,
                        after_ms = since.elapsed().as_millis() as u64,
                        "chaining audit entries works again"
                    );
                }
                if n > 0 {
                    tracing::trace!(entries = n, "audit entries chained");
                }
            }
            Err(e) => match &mut failing {
                None => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "chaining audit entries failed; retried with a growing pause (up to \
                         {} s), logged again when it works",
                        CHAIN_PAUSE_MAX.as_secs()
                    );
                    failing = Some((std::time::Instant::now(), 1));
                }
                Some((_, failures)) => {
                    *failures = failures.saturating_add(1);
                    tracing::debug!(error = format!("{e:#}"), "chaining audit entries failed");
                }
            },
        }
        let pause = failing.map_or(CHAIN_INTERVAL, |(_, failures)| chain_pause(failures));
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The longest pause between rounds while chaining fails.
const CHAIN_PAUSE_MAX: Duration = Duration::from_secs(5);

/// The pause after `failures` failed rounds in a row: [`CHAIN_INTERVAL`] doubled with each,
/// up to [`CHAIN_PAUSE_MAX`].
fn chain_pause(failures: u32) -> Duration {
    CHAIN_INTERVAL
        .saturating_mul(1 << failures.min(10))
        .min(CHAIN_PAUSE_MAX)
}

/// Up to `limit` entries after `after_seq`, oldest first.
pub async fn entries(pool: &AnyPool, after_seq: u64, limit: i64) -> Result<Vec<Entry>> {
    Ok(sqlx::query_as(
        "SELECT seq, occurred_at, request_id, event_type, actor, detail, prev_hash, hash \
         FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The last entry (seq and hash), if any: what a checkpoint signs.
pub async fn head(pool: &AnyPool) -> Result<Option<(u64, String)>> {
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(pool)
            .await?;
    row.map(|(seq, hash)| Ok((u64::try_from(seq).context("audit seq")?, hash)))
        .transpose()
}

/// The stored hash of entry `seq`, if there is one.
pub async fn hash_of(pool: &AnyPool, seq: u64) -> Result<Option<String>> {
    let seq = i64::try_from(seq).context("audit seq")?;
    Ok(
        sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = $1")
            .bind(seq)
            .fetch_optional(pool)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Backend, Db};
    use sqlx::Executor as _;

    #[test]
    fn the_pause_grows_while_chaining_fails_up_to_its_limit() {
        assert_eq!(chain_pause(1), CHAIN_INTERVAL * 2);
        assert_eq!(chain_pause(2), CHAIN_INTERVAL * 4);
        assert_eq!(chain_pause(40), CHAIN_PAUSE_MAX);
    }

    /// A database that refuses every round (here: no table to chain from) is logged once
    /// when the failures begin, not every round, and once when chaining works again.
    #[tokio::test]
    async fn a_run_of_failures_is_logged_when_it_begins_and_when_it_ends() {
        let logs = crate::testing::captured_logs();
        crate::testing::on_postgres("chainer", |url, _dir| async move {
            let db = Db::connect(&url).await.unwrap();
            let (stop, stopped) = watch::channel(false);
            let chainer = tokio::spawn(run_chainer(db.clone(), 7, stopped));
            let lines = |text: &str| {
                let all = logs.text();
                all.lines().filter(|l| l.contains(text)).count()
            };
            let waited = tokio::time::timeout(Duration::from_secs(60), async {
                while lines("\"chaining audit entries failed\"") < 3 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            assert!(waited.is_ok(), "{}", logs.text());
            assert_eq!(
                lines("chaining audit entries failed; retried"),
                1,
                "{}",
                logs.text()
            );
            db.pool
                .execute(
                    "CREATE TABLE audit_pending (id BIGSERIAL PRIMARY KEY, occurred_at BIGINT \
                     NOT NULL, request_id TEXT NOT NULL, event_type BIGINT NOT NULL, actor \
                     TEXT NOT NULL, detail TEXT NOT NULL)",
                )
                .await
                .unwrap();
            let waited = tokio::time::timeout(Duration::from_secs(60), async {
                while lines("chaining audit entries works again") == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            assert!(waited.is_ok(), "{}", logs.text());
            assert_eq!(
                lines("chaining audit entries failed; retried"),
                1,
                "{}",
                logs.text()
            );
            stop.send(true).unwrap();
            chainer.await.unwrap();
            db.close().await;
        })
        .await;
    }

    /// A batch longer than one statement's rows (SQLite's parameter budget) is one chain:
    /// each entry linked to the one before across the statements, and to what was there.
    #[tokio::test]
    async fn entries_appended_over_several_statements_form_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("a.db").display());
        let db = Db::connect(&url).await.unwrap();
        db.pool
            .execute(
                "CREATE TABLE audit_log (seq BIGINT PRIMARY KEY, occurred_at BIGINT NOT NULL, \
                 request_id TEXT NOT NULL, event_type BIGINT NOT NULL, actor TEXT NOT NULL, \
                 detail TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
            )
            .await
            .unwrap();
        let new = |i: i64| NewEntry {
            occurred_at: 1_000 + i,
            request_id: format!("r{i}"),
            event_type: 1,
            actor: "crm".into(),
            detail: format!("entry {i}"),
        };
        let per_statement = Backend::Sqlite.rows_per_statement(PARAMS_PER_ROW);
        let mut conn = db.pool.acquire().await.unwrap();
        append(&mut conn, new(0)).await.unwrap();
        let batch = (1..=(2 * per_statement as i64 + 3)).map(new).collect();
        append_all(&mut conn, batch).await.unwrap();
        drop(conn);
        let all = entries(&db.pool, 0, 10_000).await.unwrap();
        assert_eq!(all.len(), 2 * per_statement + 4);
        crate::audit::verify(&all).expect("one intact chain");
        assert_eq!(
            head(&db.pool).await.unwrap().map(|h| h.0),
            Some(all.len() as u64)
        );
    }
}
