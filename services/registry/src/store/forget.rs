//! Forgetting a finished request: its raw identities, body and the free text kept with it
//! are removed once its dispute window has passed; the keyed identity hashes stay.

use anyhow::Result;
use dsrelay_proto::v1::{EventType, RequestState};

use super::events::{insert_event, EventDetail};
use super::rows::Operation;
use super::Store;
use crate::fold::request_is_terminal;

/// The request states after which a request may be forgotten: the terminal ones.
/// PARTIALLY_COMPLETED is not among them (a holder still keeps data under a legal
/// obligation, and the request may still change).
const FORGETTABLE: [RequestState; 3] = [
    RequestState::Completed,
    RequestState::Failed,
    RequestState::Cancelled,
];

impl Store {
    /// Requests not forgotten yet that finished (a terminal state) at or before `cutoff`
    /// (ms), oldest first.
    pub async fn requests_to_forget(&self, cutoff: i64, limit: i64) -> Result<Vec<String>> {
        let states = FORGETTABLE
            .iter()
            .map(|s| (*s as i32).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(sqlx::query_scalar(&format!(
            "SELECT id FROM requests WHERE forgotten_at IS NULL AND finished_at IS NOT NULL \
             AND finished_at <= $1 AND state IN ({states}) ORDER BY finished_at LIMIT $2"
        ))
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// Removes the request's raw identities and body, the free text that may name its
    /// subject (task notes and reasons, cancel and extension reasons, delivery errors, event
    /// messages), and records an IDENTITIES_FORGOTTEN event. A Deliver still pending (only
    /// possible for a cancelled request) is given up: it could carry no identities any more.
    /// Returns false, changing nothing, when the request is not terminal, finished after
    /// `cutoff`, or was forgotten already.
    pub async fn forget_request(
        &self,
        id: &str,
        cutoff: i64,
        now: i64,
        message: &str,
    ) -> Result<bool> {
        let mut tx = self.begin_audited().await?;
        let Some(state) = tx.request_state(id, true).await? else {
            tx.rollback().await?;
            return Ok(false);
        };
        let changed = sqlx::query(
            "UPDATE requests SET body = NULL, cancel_reason = NULL, extension_reasons = '[]', \
             forgotten_at = $1, updated_at = $1 \
             WHERE id = $2 AND forgotten_at IS NULL AND finished_at IS NOT NULL \
             AND finished_at <= $3",
        )
        .bind(now)
        .bind(id)
        .bind(cutoff)
        .execute(tx.conn())
        .await?
        .rows_affected();
        if changed == 0 || !request_is_terminal(state) {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("UPDATE tasks SET note = '', reason = '' WHERE request_id = $1")
            .bind(id)
            .execute(tx.conn())
            .await?;
        sqlx::query("UPDATE deliveries SET last_error = NULL WHERE request_id = $1")
            .bind(id)
            .execute(tx.conn())
            .await?;
        sqlx::query(
            "UPDATE deliveries SET done_at = $1, \
             last_error = 'not delivered: the request was cancelled and forgotten' \
             WHERE request_id = $2 AND op = $3 AND done_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .bind(Operation::Deliver.as_str())
        .execute(tx.conn())
        .await?;
        // These events' messages repeat reasons, notes and errors; the others are the
        // registry's own words. The audit trail keeps its own copy of each message
        // (`detail`), which this does not touch, so the chain still verifies.
        let free_text = [
            EventType::DeliveryFailed,
            EventType::TaskUpdated,
            EventType::DeadlineExtended,
            EventType::Cancelled,
        ]
        .iter()
        .map(|t| (*t as i32).to_string())
        .collect::<Vec<_>>()
        .join(", ");
        sqlx::query(&format!(
            "UPDATE events SET message = '' WHERE request_id = $1 AND type IN ({free_text})"
        ))
        .bind(id)
        .execute(tx.conn())
        .await?;
        insert_event(
            &mut tx,
            id,
            EventType::IdentitiesForgotten,
            now,
            state,
            EventDetail {
                actor: "registry".into(),
                message: message.to_string(),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// After forgetting on SQLite, moves every page out of the write-ahead log and empties
    /// it, so the old versions of the rewritten pages (which still hold what was forgotten)
    /// leave the disk; `secure_delete` (set on every connection) zeroes freed space in the
    /// database file itself. PostgreSQL keeps old row versions until VACUUM reclaims them.
    /// Returns false when a reader kept part of the log in use: call again later.
    pub async fn scrub_log(&self) -> Result<bool> {
        if self.db.backend != dsrelay_runtime::store::Backend::Sqlite {
            return Ok(true);
        }
        // One row: (busy, frames in the log, frames checkpointed); busy is 1 when a reader
        // or writer stopped it from finishing.
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.db.pool)
            .await?;
        Ok(busy == 0)
    }
}
