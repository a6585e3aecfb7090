//! Changes a partner or operator makes to a request: cancelling it (which queues a
//! cancellation for every processor it was routed to) and extending its due date.

use anyhow::{Context, Result};
use dsrelay_proto::v1::{EventType, RequestState};

use super::events::{insert_event, EventDetail};
use super::{Operation, RequestRow, Store};
use crate::fold::OPEN_STATES;

/// What [`Store::cancel`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled now.
    Cancelled,
    /// No such request.
    NotFound,
    /// Its state does not allow cancelling.
    NotCancellable(RequestState),
}

impl Store {
    /// Cancels a request: no further deliveries, and a cancellation queued for every
    /// processor.
    pub async fn cancel(&self, id: &str, reason: &str, now: i64) -> Result<CancelOutcome> {
        let mut tx = self.begin().await?;
        // Locked: an acknowledgement that finishes the request meanwhile is waited for and
        // seen, never overwritten with CANCELLED.
        let Some(state) = tx.request_state(id, true).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if !crate::fold::request_is_open(state) {
            return Ok(CancelOutcome::NotCancellable(state));
        }
        sqlx::query(
            "UPDATE requests SET state = $1, cancel_reason = $2, updated_at = $3, \
             finished_at = $3 WHERE id = $4",
        )
        .bind(RequestState::Cancelled as i64)
        .bind(reason)
        .bind(now)
        .bind(id)
        .execute(tx.conn())
        .await?;
        // Undelivered requests are not sent any more; every processor (even one whose
        // delivery may be in flight right now) is told to cancel, and keeps a tombstone. Nor
        // are a contract end's changed terms sent to a processor told to cancel.
        sqlx::query(
            "UPDATE deliveries SET done_at = $1, withdrawn_at = $1, \
             last_error = 'cancelled before delivery' \
             WHERE request_id = $2 AND op IN ($3, $4) AND done_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .bind(Operation::Deliver.as_str())
        .bind(Operation::Update.as_str())
        .execute(tx.conn())
        .await?;
        sqlx::query(
            "INSERT INTO deliveries (request_id, processor, op, next_attempt_at) \
             SELECT request_id, processor, $1, $2 FROM deliveries WHERE request_id = $3 \
             AND op = $4 ON CONFLICT DO NOTHING",
        )
        .bind(Operation::Cancel.as_str())
        .bind(now)
        .bind(id)
        .bind(Operation::Deliver.as_str())
        .execute(tx.conn())
        .await?;
        insert_event(
            &mut tx,
            id,
            EventType::Cancelled,
            now,
            RequestState::Cancelled,
            EventDetail {
                message: "cancelled".into(),
                free_text: reason.to_string(),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled)
    }

    /// Extends the due date by `months`, keeping the reason, if the request is as `row` read
    /// it (no extension made since, still open: [`OPEN_STATES`]); answers whether it did.
    /// Nothing is written otherwise, so a concurrent extension is never lost under an answer
    /// of success.
    pub async fn extend(
        &self,
        row: &RequestRow,
        months: u32,
        reason: &str,
        now: i64,
    ) -> Result<bool> {
        let total = row.extension_months as u32 + months;
        let mut reasons: Vec<String> =
            serde_json::from_str(&row.extension_reasons).unwrap_or_default();
        reasons.push(reason.to_string());
        let due = crate::deadline::due_at(row.received_at, total);
        let mut tx = self.begin().await?;
        let updated = sqlx::query(
            "UPDATE requests SET extension_months = $1, extension_reasons = $2, due_at = $3, \
             updated_at = $4 WHERE id = $5 AND extension_months = $6 \
             AND state IN ($7, $8, $9, $10)",
        )
        .bind(i64::from(total))
        .bind(serde_json::to_string(&reasons).context("encoding reasons")?)
        .bind(due)
        .bind(now)
        .bind(&row.id)
        .bind(row.extension_months)
        .bind(OPEN_STATES[0] as i64)
        .bind(OPEN_STATES[1] as i64)
        .bind(OPEN_STATES[2] as i64)
        .bind(OPEN_STATES[3] as i64)
        .execute(tx.conn())
        .await?
        .rows_affected();
        if updated == 0 {
            return Ok(false);
        }
        insert_event(
            &mut tx,
            &row.id,
            EventType::DeadlineExtended,
            now,
            row.state,
            EventDetail {
                message: format!("due date extended by {months} month(s)"),
                free_text: reason.to_string(),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}
