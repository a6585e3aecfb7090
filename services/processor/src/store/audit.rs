//! The processor's audit trail: one hash-chained entry ([`dsrelay_runtime::audit`], the
//! registry's format, so one verifier checks both) per change an auditor asks about, written
//! in that change's own transaction. A change not committed leaves no entry; an entry never
//! names a change that did not happen.
//!
//! # One chain across replicas
//!
//! Appending reads the last entry and writes the next, so appenders must take turns. Every
//! transaction that may append is begun by [`Store::begin_audited`], which on PostgreSQL
//! takes a transaction-scoped advisory lock as its very first statement, before any row
//! lock; [`append`] only accepts such a transaction ([`AuditTx`]). So a transaction holding
//! row locks never waits for the chain lock while another holding the chain lock waits for
//! its rows: the only lock ever waited for while holding another is a row lock, taken after
//! the chain lock by everyone. The price is that audited transactions commit one at a time.
//! On SQLite the single writer connection already holds every transaction apart.
//!
//! # No personal data
//!
//! Entries are never changed or removed, not even to forget, so they never hold a subject's
//! identities, and free text that may name one (reasons, notes, legal bases, rejections)
//! stands in them only as `text hmac-sha256:<hex>`, its keyed hash under the processor's
//! `identity_hash_key`.

use std::fmt::Write as _;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use anyhow::{Context, Result};
use dsrelay_proto::v1::ProcessorAuditEvent;
use dsrelay_runtime::audit::{self, Entry};
use dsrelay_runtime::identity::keyed_digest;
use sqlx::{Any, AnyConnection, Transaction};

use super::Store;

/// Key of the advisory lock that serializes the processor's audit appenders ("dsrelay" + 2).
const AUDIT_LOCK_KEY: i64 = 0x6473_7265_6c61_7902;

/// The context of the keyed hashes of free text in audit entries.
const AUDIT_TEXT_DOMAIN: &[u8] = b"dsrelay.processor.audit-text.v1";

/// A transaction that holds the audit trail's append lock from its first statement on: the
/// only kind [`append`] takes. Derefs to its connection, like a [`Transaction`].
pub(crate) struct AuditTx {
    tx: Transaction<'static, Any>,
    text_key: Arc<[u8]>,
}

impl Deref for AuditTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl DerefMut for AuditTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

impl AuditTx {
    /// Commits the change and its entries.
    pub(crate) async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }

    /// Rolls back the change and its entries.
    pub(crate) async fn rollback(self) -> Result<()> {
        Ok(self.tx.rollback().await?)
    }

    /// `text`'s stand-in in an entry: its keyed hash (empty text stays empty).
    pub(crate) fn text(&self, text: &str) -> String {
        if text.is_empty() {
            return String::new();
        }
        let hash = keyed_digest(&self.text_key, AUDIT_TEXT_DOMAIN, text.as_bytes());
        format!("text hmac-sha256:{hash}")
    }
}

/// What an entry says besides its time and type.
pub(crate) struct Record<'a> {
    /// The controller whose request it is (the detail starts with it).
    pub(crate) controller: &'a str,
    /// The request.
    pub(crate) request_id: &'a str,
    /// Who acted: the controller, an operator; empty for the processor's own steps.
    pub(crate) actor: &'a str,
    /// The rest of the detail, in words, free text only through [`AuditTx::text`].
    pub(crate) detail: String,
}

/// Appends one entry in `tx`: the last entry's seq + 1, chained to its hash.
pub(crate) async fn append(
    tx: &mut AuditTx,
    event: ProcessorAuditEvent,
    at: i64,
    r: Record<'_>,
) -> Result<()> {
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?;
    let (seq, prev_hash) = match last {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, audit::GENESIS_HASH.to_string()),
    };
    let mut detail = format!("controller {}", r.controller);
    if !r.detail.is_empty() {
        let _ = write!(detail, ": {}", r.detail);
    }
    let mut entry = Entry {
        seq: u64::try_from(seq).context("audit seq")?,
        occurred_at: at,
        request_id: r.request_id.to_string(),
        event_type: event as i32,
        actor: r.actor.to_string(),
        detail,
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
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Begins a transaction that may append to the audit trail, holding the append lock
    /// from its first statement (see the module documentation).
    pub(crate) async fn begin_audited(&self) -> Result<AuditTx> {
        let mut tx = self.db.pool.begin().await?;
        if let Some(lock) = self.db.backend.transaction_lock() {
            sqlx::query(lock)
                .bind(AUDIT_LOCK_KEY)
                .fetch_one(&mut *tx)
                .await?;
        }
        Ok(AuditTx {
            tx,
            text_key: self.text_key.clone(),
        })
    }

    /// Up to `limit` entries after `after_seq`, oldest first.
    pub async fn audit_entries(&self, after_seq: u64, limit: i64) -> Result<Vec<Entry>> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        Ok(sqlx::query_as(
            "SELECT seq, occurred_at, request_id, event_type, actor, detail, prev_hash, hash \
             FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// The last entry of the audit trail (seq and hash), if any: what a checkpoint signs.
    pub async fn audit_head(&self) -> Result<Option<(u64, String)>> {
        let row: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&self.db.pool)
                .await?;
        row.map(|(seq, hash)| Ok((u64::try_from(seq).context("audit seq")?, hash)))
            .transpose()
    }

    /// The stored hash of audit entry `seq`, if there is one.
    pub async fn audit_hash(&self, seq: u64) -> Result<Option<String>> {
        let seq = i64::try_from(seq).context("audit seq")?;
        Ok(
            sqlx::query_scalar("SELECT hash FROM audit_log WHERE seq = $1")
                .bind(seq)
                .fetch_optional(&self.db.pool)
                .await?,
        )
    }
}

impl dsrelay_runtime::audit::signer::Trail for Store {
    async fn head(&self) -> Result<Option<(u64, String)>> {
        self.audit_head().await
    }

    async fn hash_of(&self, seq: u64) -> Result<Option<String>> {
        self.audit_hash(seq).await
    }
}
