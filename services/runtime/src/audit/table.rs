//! The `audit_log` table, which the registry and the processor each keep in their own store
//! with the same columns: appending the next entry, and reading the head, one entry's hash
//! and a page of entries.
//!
//! Appending reads the last entry and writes the next, so appenders must take turns: the
//! caller's transaction holds the service's chain lock (on PostgreSQL an advisory lock taken
//! before any row lock; on SQLite the one writer connection) before it calls [`append`].

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
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let (seq, prev_hash) = match last {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, GENESIS_HASH.to_string()),
    };
    let mut entry = Entry {
        seq: u64::try_from(seq).context("audit seq")?,
        occurred_at: new.occurred_at,
        request_id: new.request_id,
        event_type: new.event_type,
        actor: new.actor,
        detail: new.detail,
        prev_hash,
        hash: String::new(),
    };
    entry.hash = entry.compute_hash();
    sqlx::query(
        "INSERT INTO audit_log (seq, occurred_at, request_id, event_type, actor, detail, \
         prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(seq)
    .bind(entry.occurred_at)
    .bind(entry.request_id)
    .bind(i64::from(entry.event_type))
    .bind(entry.actor)
    .bind(entry.detail)
    .bind(entry.prev_hash)
    .bind(entry.hash)
    .execute(&mut *conn)
    .await?;
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
