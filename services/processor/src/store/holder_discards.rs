//! Contract end tasks whose holder is still to discard what their export recorded there
//! (`holder_discard_at`): marked by the step that cancels one after its export began
//! (`tasks::StepWrite`) and by forgetting a request with one that failed after it did
//! (`forget`); the forget worker's sweep calls the holder (`crate::holder_discard`) and
//! clears the mark once the call succeeded, or moves it to the call's retry.

use anyhow::Result;
use dsrelay_proto::v1::TaskState;

use super::rows::TaskKey;
use super::Store;

/// A task whose holder is to discard what its contract end's export recorded there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderDiscard {
    /// The task.
    pub key: TaskKey,
    /// When the call became due (ms): it is matched when the mark is cleared or moved, so
    /// that a replica that made the call too, or a newer mark, is not overwritten.
    pub due_at: i64,
    /// Calls that failed so far.
    pub failures: i64,
}

#[derive(sqlx::FromRow)]
struct DiscardRecord {
    controller: String,
    request_id: String,
    subprocessor: String,
    holder_discard_at: i64,
    holder_discard_failures: i64,
}

impl Store {
    /// Up to `limit` tasks whose holder's discard call is due at `now`, the longest due
    /// first. A CANCELLED task's call with no failure counted waits `settle_ms` (the tasks'
    /// lease) past its time (its mark's, or the one an unreachable holder moved it to): the
    /// cancellation may have come while a runner whose lease had lapsed was still in the
    /// export call, whose transaction commits what it returned only when the call ends, and
    /// a runner drops its call within a lease of losing it. A discard before that commit
    /// would leave the returned records at the holder for good (and on SQLite wait on the
    /// export's write lock).
    pub async fn holder_discards_due(
        &self,
        now: i64,
        settle_ms: i64,
        limit: i64,
    ) -> Result<Vec<HolderDiscard>> {
        let rows: Vec<DiscardRecord> = sqlx::query_as(&format!(
            "SELECT controller, request_id, subprocessor, holder_discard_at, \
             holder_discard_failures FROM tasks WHERE holder_discard_at IS NOT NULL \
             AND holder_discard_at <= CASE WHEN holder_discard_failures = 0 AND state = $3 \
             THEN $1 - $4 ELSE $1 END ORDER BY holder_discard_at, controller{b}, \
             request_id{b}, subprocessor{b} LIMIT $2",
            b = self.db.backend.bytewise()
        ))
        .bind(now)
        .bind(limit)
        .bind(i64::from(TaskState::Cancelled as i32))
        .bind(settle_ms)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| HolderDiscard {
                key: TaskKey {
                    controller: r.controller,
                    request_id: r.request_id,
                    subprocessor: r.subprocessor,
                },
                due_at: r.holder_discard_at,
                failures: r.holder_discard_failures,
            })
            .collect())
    }

    /// The holder discarded what `d`'s export recorded: the mark is cleared. False when it
    /// had moved meanwhile (another replica's sweep).
    pub async fn holder_discarded(&self, d: &HolderDiscard) -> Result<bool> {
        self.move_holder_discard(d, None, false).await
    }

    /// `d`'s call is due again at `at`: after a failure (`failed`, counted) or because its
    /// holder is marked unreachable (not counted). False when the mark had moved meanwhile.
    pub async fn holder_discard_later(
        &self,
        d: &HolderDiscard,
        at: i64,
        failed: bool,
    ) -> Result<bool> {
        self.move_holder_discard(d, Some(at), failed).await
    }

    async fn move_holder_discard(
        &self,
        d: &HolderDiscard,
        at: Option<i64>,
        failed: bool,
    ) -> Result<bool> {
        let failures = match at {
            None => 0,
            Some(_) => d.failures.saturating_add(i64::from(failed)),
        };
        let done = sqlx::query(
            "UPDATE tasks SET holder_discard_at = $1, holder_discard_failures = $2 \
             WHERE controller = $3 AND request_id = $4 AND subprocessor = $5 \
             AND holder_discard_at = $6",
        )
        .bind(at)
        .bind(failures)
        .bind(&d.key.controller)
        .bind(&d.key.request_id)
        .bind(&d.key.subprocessor)
        .bind(d.due_at)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
