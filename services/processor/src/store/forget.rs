//! Forgetting a finished request: its raw identities, body, the free text kept with it and
//! its tasks, and the acknowledgements already sent, once every task reached a final state
//! and `forget_after_days` have passed; keyed identity hashes stay.

use anyhow::Result;
use dsrelay_proto::v1::TaskState;

use super::rows::state_value;
use super::Store;

/// Task states that never change again. RETAINED is not among them: the holder still keeps
/// data, and the processor needs the identities to erase it when the retention ends.
const FINAL: [TaskState; 5] = [
    TaskState::Completed,
    TaskState::NotFound,
    TaskState::Refused,
    TaskState::Failed,
    TaskState::Cancelled,
];

/// A request the processor may forget, with what it still holds.
#[derive(Debug, sqlx::FromRow)]
pub struct Forgettable {
    /// The controller that delivered it.
    pub controller: String,
    /// The registry's request id.
    pub request_id: String,
    /// The encoded DeliverRequest (the raw identities), if still there.
    pub body: Option<Vec<u8>>,
}

/// The condition, on `requests r`, under which a request may be forgotten with `$1` the
/// cutoff (ms): accepted (or cancelled) by then, every task final since by then, nothing
/// left to send (acknowledgements, uploads).
fn forgettable_where() -> String {
    let finals = FINAL
        .iter()
        .map(|s| state_value(*s).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "r.forgotten_at IS NULL AND r.accepted_at <= $1 \
         AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.controller = r.controller \
           AND t.request_id = r.request_id AND (t.state NOT IN ({finals}) OR t.updated_at > $1)) \
         AND NOT EXISTS (SELECT 1 FROM ack_outbox a WHERE a.controller = r.controller \
           AND a.request_id = r.request_id AND a.sent_at IS NULL) \
         AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.controller = r.controller \
           AND u.request_id = r.request_id AND u.done_at IS NULL)"
    )
}

impl Store {
    /// Requests not forgotten yet whose tasks all reached a final state at or before
    /// `cutoff` (ms) and have nothing left to send.
    pub async fn requests_to_forget(&self, cutoff: i64, limit: i64) -> Result<Vec<Forgettable>> {
        Ok(sqlx::query_as(&format!(
            "SELECT r.controller, r.request_id, r.body FROM requests r WHERE {} \
             ORDER BY r.accepted_at LIMIT $2",
            forgettable_where()
        ))
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?)
    }

    /// Removes the request's body and cancel reason, keeping `identity_hashes` (a JSON
    /// array), and its tasks' notes, reasons, errors, connector handles and export file
    /// lists, and the payloads of its sent acknowledgements (they repeat the notes). Returns
    /// false, changing nothing, when the request no longer qualifies (a task moved, or it
    /// was forgotten already).
    pub async fn forget_request(
        &self,
        r: &Forgettable,
        identity_hashes: &str,
        cutoff: i64,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.db.pool.begin().await?;
        let changed = sqlx::query(&format!(
            "UPDATE requests SET body = NULL, cancel_reason = NULL, identity_hashes = $2, \
             forgotten_at = $3 WHERE controller = $4 AND request_id = $5 AND EXISTS \
             (SELECT 1 FROM requests r WHERE r.controller = $4 AND r.request_id = $5 AND {})",
            forgettable_where()
        ))
        .bind(cutoff)
        .bind(identity_hashes)
        .bind(now)
        .bind(&r.controller)
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "UPDATE tasks SET note = '', reason = '', last_error = NULL, handle = NULL, \
             export_files = NULL WHERE controller = $1 AND request_id = $2",
        )
        .bind(&r.controller)
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE ack_outbox SET payload = $1, last_error = NULL \
             WHERE controller = $2 AND request_id = $3 AND sent_at IS NOT NULL",
        )
        .bind(Vec::<u8>::new())
        .bind(&r.controller)
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE uploads SET last_error = NULL WHERE controller = $1 AND request_id = $2",
        )
        .bind(&r.controller)
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// After forgetting on SQLite, empties the write-ahead log, whose old page versions still
    /// hold what was forgotten (`secure_delete`, set on every connection, zeroes freed space
    /// in the database file). PostgreSQL keeps old row versions until VACUUM reclaims them.
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
