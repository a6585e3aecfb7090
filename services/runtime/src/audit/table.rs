//! The `audit_log` table, which the registry and the processor each keep in their own store
//! with the same columns: appending the next entry, and reading the head, one entry's hash
//! and a page of entries.
//!
//! Appending reads the last entry and writes the next, so appenders must take turns: the
//! caller's transaction holds the service's chain lock (on PostgreSQL an advisory lock taken
//! before any row lock; on SQLite the one writer connection) before it calls [`append`] or
//! [`append_all`].

use anyhow::{Context, Result};
use sqlx::{AnyConnection, AnyPool};

use super::{Entry, GENESIS_HASH};

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

/// Appends `new` in the caller's transaction as the last entry's seq + 1, chained to its
/// hash (the first entry to [`GENESIS_HASH`]).
pub async fn append(conn: &mut AnyConnection, new: NewEntry) -> Result<()> {
    append_all(conn, vec![new]).await
}

/// Parameters per row of [`append_all`]'s INSERTs.
const PARAMS_PER_ROW: usize = 8;

/// Appends `entries` in the caller's transaction, in order, each chained to the one before
/// (the first to the trail's last entry): one read of the head, then multi-row INSERTs.
pub async fn append_all(conn: &mut AnyConnection, entries: Vec<NewEntry>) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
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
    let rows = crate::store::Backend::of_connection(conn).rows_per_statement(PARAMS_PER_ROW);
    for chunk in chained.chunks(rows) {
        let mut sql = String::from(
            "INSERT INTO audit_log (seq, occurred_at, request_id, event_type, actor, detail, \
             prev_hash, hash) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 8;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&crate::store::values_row(b + 1..=b + 8));
        }
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
