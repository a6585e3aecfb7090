//! Whether a holder has any task left that will call it: what decides if the processor's
//! unreachable mark of a holder ([`crate::breaker`]) still has a task to probe the holder,
//! or no task is left to try it and the mark is dropped.
//!
//! A task counts when the runner's claim would take it (the state and cancellation filter of
//! `tasks::claim_tasks_sql`) and its next step calls the holder, now or later:
//! - PENDING or IN_PROGRESS and waiting on the holder itself: a single task, or a contract
//!   end returning or deleting, put off by a retry's backoff, a wait for the mark, or work
//!   the holder accepted and is still to confirm. It counts whenever its next try comes: a
//!   task whose own backoff outlasts the mark still waits for the holder;
//! - any claimable task due now (`next_attempt_at` passed): a RETAINED task whose date has
//!   come, a contract end whose start or grace end has come. One whose date is still ahead
//!   waits for that date, not for the holder, and does not count until then.
//!
//! Tasks the runner leaves alone (`next_attempt_at` at [`NEVER`]: an export handed to the
//! uploader, a task awaiting its operator) and final ones do not count. A contract end that
//! will not go on whose holder is still to discard what its export recorded there
//! (`holder_discard_at`) counts too, whenever that call is due: the forget worker's sweep
//! calls the holder for it ([`crate::holder_discard`]).

use anyhow::Result;
use dsrelay_proto::v1::{ContractPhase, TaskState};

use super::rows::state_value;
use super::Store;
use crate::task_machine::NEVER;

impl Store {
    /// Whether any task of `subprocessor` is left that will call its holder at `now` (ms, the
    /// processor's clock, which `next_attempt_at` is set by): one the runner claims whose next
    /// step calls the holder (waiting on the holder itself whenever its next try comes, or
    /// due now), or a contract end whose holder is still to discard what its export recorded
    /// there. Read on the reader pool: what committed decides.
    pub async fn tasks_left_to_try(&self, subprocessor: &str, now: i64) -> Result<bool> {
        let runnable = sqlx::query(&tasks_left_sql())
            .bind(subprocessor)
            .bind(now)
            .fetch_optional(&self.db.reader)
            .await?;
        if runnable.is_some() {
            return Ok(true);
        }
        let discard = sqlx::query(
            "SELECT 1 AS one FROM tasks WHERE holder_discard_at IS NOT NULL \
             AND subprocessor = $1 LIMIT 1",
        )
        .bind(subprocessor)
        .fetch_optional(&self.db.reader)
        .await?;
        Ok(discard.is_some())
    }
}

/// The tasks of `$1` left to call their holder at `$2` (see the module's doc).
fn tasks_left_sql() -> String {
    format!(
        "SELECT 1 AS one FROM tasks t JOIN requests r ON r.controller = t.controller \
         AND r.request_id = t.request_id \
         WHERE t.subprocessor = $1 AND t.state IN ({pending}, {in_progress}, {retained}) \
         AND t.next_attempt_at < {NEVER} \
         AND (r.cancelled_at IS NULL OR t.cancel_requested_at IS NOT NULL \
         OR t.state = {retained} OR t.retain_until IS NOT NULL \
         OR t.contract_phase = {deleting}) \
         AND (t.next_attempt_at <= $2 OR (t.state IN ({pending}, {in_progress}) \
         AND t.contract_phase NOT IN ({scheduled}, {awaiting}))) \
         LIMIT 1",
        // Literals, as in the claim, so that the planner may use the partial index
        // `tasks_runnable`.
        pending = state_value(TaskState::Pending),
        in_progress = state_value(TaskState::InProgress),
        retained = state_value(TaskState::Retained),
        deleting = ContractPhase::Deleting as i32,
        scheduled = ContractPhase::Scheduled as i32,
        awaiting = ContractPhase::AwaitingConfirmation as i32,
    )
}
