//! The acknowledgement outbox: every state change of a task queues one acknowledgement in
//! the same transaction, and the sender claims, sends and retires them.

use anyhow::Result;
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::Acknowledgement;
use sqlx::{Any, Transaction};

use super::rows::{AckJob, AckRecord, TaskKey};
use super::Store;

/// Queues `ack`, the acknowledgement of `key`'s change number `sequence`, inside the
/// transaction that makes the change.
pub(super) async fn queue(
    tx: &mut Transaction<'static, Any>,
    key: &TaskKey,
    sequence: i64,
    ack: &Acknowledgement,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO ack_outbox (controller, request_id, subprocessor, sequence, payload, \
         next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .bind(sequence)
    .bind(ack.encode_to_vec())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Reserves up to `limit` queued acknowledgements for `lease_ms`, oldest first.
    pub async fn claim_acks(&self, now: i64, limit: i64, lease_ms: i64) -> Result<Vec<AckJob>> {
        let mut tx = self.db.pool.begin().await?;
        let rows: Vec<AckRecord> = sqlx::query_as(&format!(
            "SELECT id, controller, attempts, payload FROM ack_outbox WHERE sent_at IS NULL \
             AND next_attempt_at <= $1 AND lease_until <= $1 ORDER BY id LIMIT $2{}",
            self.db.skip_locked()
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for r in rows {
            sqlx::query("UPDATE ack_outbox SET lease_until = $1 WHERE id = $2")
                .bind(now + lease_ms)
                .bind(r.id)
                .execute(&mut *tx)
                .await?;
            jobs.push(AckJob::try_from(r)?);
        }
        tx.commit().await?;
        Ok(jobs)
    }

    /// Marks acknowledgements as received by the registry.
    pub async fn acks_sent(&self, ids: &[i64], now: i64) -> Result<()> {
        let mut tx = self.db.pool.begin().await?;
        for id in ids {
            sqlx::query("UPDATE ack_outbox SET sent_at = $1, lease_until = 0 WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records a failed send; each acknowledgement is retried at its own backoff.
    pub async fn acks_failed(&self, jobs: &[(i64, i64)], error: &str) -> Result<()> {
        let mut tx = self.db.pool.begin().await?;
        for (id, next_at) in jobs {
            sqlx::query(
                "UPDATE ack_outbox SET attempts = attempts + 1, next_attempt_at = $1, \
                 lease_until = 0, last_error = $2 WHERE id = $3",
            )
            .bind(next_at)
            .bind(error)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
