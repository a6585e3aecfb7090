//! What turned FAILED in a transaction (a task acknowledged FAILED, a request folded to
//! FAILED), gathered while it runs and logged at WARN once it commits: an operator must act,
//! and a line written before the commit could tell of a failure that a rollback undid.
//!
//! The processor's words (a task's reason) may name the data subject, and log lines are never
//! forgotten with the request: they show only a length and a keyed hash of it
//! ([`dsrelay_runtime::log_text::withheld`]).

use anyhow::Result;
use dsrelay_proto::v1::{RequestState, TaskState};
use dsrelay_runtime::log_text::withheld;

use super::acknowledgements::TaskUpdate;
use super::Tx;

/// One thing that turned FAILED in a transaction.
#[derive(Debug)]
pub(super) enum Failed {
    /// A processor reported a task FAILED.
    Task {
        request_id: String,
        processor: String,
        subprocessor: String,
        reason: String,
    },
    /// A request folded to FAILED, with the tasks that made it so (FAILED or REFUSED).
    Request {
        request_id: String,
        /// `(processor, subprocessor)` of each failed or refused task.
        holders: Vec<(String, String)>,
    },
}

/// Notes `update` of `processor`'s task of request `request_id` when it moves its task to FAILED from any other state
/// (`previous`, `None` for a task first heard of), so that a task is logged once per failure,
/// not once per report that repeats it.
pub(super) fn note_task(
    tx: &mut Tx,
    request_id: &str,
    processor: &str,
    previous: Option<i32>,
    update: &TaskUpdate,
) {
    let failed = TaskState::Failed as i32;
    if update.state != failed || previous == Some(failed) {
        return;
    }
    tx.failed.push(Failed::Task {
        request_id: request_id.to_string(),
        processor: processor.to_string(),
        subprocessor: update.subprocessor.clone(),
        reason: update.reason.clone(),
    });
}

/// Notes each of `changed` (request id, new state) that turned FAILED, with its failed and
/// refused tasks as the transaction holds them now (written before the request's state is).
pub(super) async fn note_requests(tx: &mut Tx, changed: &[(&str, RequestState)]) -> Result<()> {
    for (id, _) in changed.iter().filter(|(_, s)| *s == RequestState::Failed) {
        let holders: Vec<(String, String)> = sqlx::query_as(
            "SELECT processor, subprocessor FROM tasks \
             WHERE request_id = $1 AND state IN ($2, $3) ORDER BY processor, subprocessor",
        )
        .bind(*id)
        .bind(TaskState::Failed as i32)
        .bind(TaskState::Refused as i32)
        .fetch_all(tx.conn())
        .await?;
        tx.failed.push(Failed::Request {
            request_id: id.to_string(),
            holders,
        });
    }
    Ok(())
}

/// Logs `failed`, after the transaction that recorded them committed; `key` keys the hashes
/// that stand for the processor's words.
pub(super) fn log(failed: &[Failed], key: &[u8]) {
    for f in failed {
        match f {
            Failed::Task {
                request_id,
                processor,
                subprocessor,
                reason,
            } => tracing::warn!(
                %request_id,
                %processor,
                %subprocessor,
                reason = %withheld(key, reason),
                "task acknowledged FAILED: run `dsrctl get {request_id}` for the processor's \
                 reason; once its cause is fixed, the operator of processor {processor} runs \
                 `dsrctl tasks retry <controller> {request_id} {subprocessor} --note <what was \
                 fixed>`"
            ),
            Failed::Request {
                request_id,
                holders,
            } => {
                let join = |pick: fn(&(String, String)) -> &str| {
                    holders.iter().map(pick).collect::<Vec<_>>().join(", ")
                };
                tracing::warn!(
                    %request_id,
                    processor = %join(|h| h.0.as_str()),
                    subprocessor = %join(|h| h.1.as_str()),
                    "request FAILED: an operator must act; run `dsrctl get {request_id}` to \
                     see which task failed or was refused and why; a FAILED task runs again \
                     when the processor's operator runs `dsrctl tasks retry` for it once its \
                     cause is fixed"
                );
            }
        }
    }
}
