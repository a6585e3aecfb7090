//! The delivery outbox: claiming due rows under a lease, recording a processor's acceptance
//! (with the tasks it reported) or a failed attempt, releasing a claim the dispatcher gave up,
//! and finding delivered requests that have been quiet too long, for the reconciler to ask
//! about.
//!
//! A claim writes a new random lease token ([`DeliveryJob::lease_owner`]) and sets the lease
//! on the database's clock ([`Backend::now_ms`](dsrelay_runtime::store::Backend::now_ms)), so
//! replicas agree on when a lease ends whatever their own clocks say. Outcomes and releases
//! match the token: a dispatcher whose lease ran out and was taken by another claim records
//! nothing over the new holder's. Due dates (`next_attempt_at`) stay on the registry's clock.

use std::collections::BTreeSet;

use anyhow::Result;
use dsrelay_proto::v1::{EventType, RequestState, TaskStatus};
use dsrelay_runtime::store::{execute_each, lookups};

use super::acknowledgements::{apply_accepted, lock_states, Accepted};
use super::events::{insert_event, EventDetail};
use super::forget::FORGOTTEN_ERROR;
use super::{DeliveryJob, Operation, Store, Tx};

/// A delivery row as a claim wrote it (lease token set), with its request and terms.
#[derive(sqlx::FromRow)]
struct ClaimedDelivery {
    #[sqlx(flatten)]
    job: DeliveryJob,
    /// For putting the claimed rows back in the order they were picked in.
    next_attempt_at: i64,
}

impl Store {
    /// Reserves up to `limit` outbox rows due at `now` (the registry's clock) for `lease_ms`
    /// of the database's clock, each row under a new lease token of its own, so that
    /// concurrent dispatchers (in this process or in other replicas) never send the same row
    /// at once. One statement however many rows it takes; the most overdue come first.
    pub async fn claim_deliveries(
        &self,
        now: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<DeliveryJob>> {
        let backend = self.db.backend;
        let db_now = backend.now_ms();
        // One statement whatever `limit` is (see dsrelay_runtime::store's "Claims").
        let mut rows: Vec<ClaimedDelivery> = sqlx::query_as(&format!(
            "WITH picked AS MATERIALIZED (SELECT d.request_id, d.processor, d.op \
             FROM deliveries d JOIN requests r ON r.id = d.request_id \
             WHERE d.done_at IS NULL AND d.dead_lettered_at IS NULL \
             AND d.next_attempt_at <= $1 AND d.lease_until <= {db_now} \
             AND d.op IN ($6, $7, $8, $9) \
             AND (d.op NOT IN ($3, $9) OR EXISTS (SELECT 1 FROM deliveries x \
             WHERE x.request_id = d.request_id AND x.processor = d.processor \
             AND x.op = $4 AND x.done_at IS NOT NULL)) \
             ORDER BY d.next_attempt_at LIMIT $2{lock}) \
             UPDATE deliveries SET lease_until = {db_now} + $5, lease_owner = {token} \
             WHERE (request_id, processor, op) IN (SELECT request_id, processor, op FROM picked) \
             RETURNING request_id, processor, op, attempts, next_attempt_at, lease_owner, \
             {request}, {contract}",
            lock = backend.skip_locked_of("d"),
            token = backend.random_token(),
            request = lookups(
                "requests r",
                "r.id = deliveries.request_id",
                &[
                    ("r.body", "body"),
                    ("r.received_at", "received_at"),
                    ("r.due_at", "due_at"),
                    ("r.trace_id", "trace_id"),
                    ("r.cancel_reason", "cancel_reason"),
                    ("r.traceparent", "traceparent"),
                    ("CAST(r.kind AS BIGINT)", "kind"),
                ],
            ),
            contract = lookups(
                "contracts c",
                "c.request_id = deliveries.request_id",
                &[
                    ("CAST(c.choice AS BIGINT)", "contract_choice"),
                    ("c.effective_at", "contract_effective_at"),
                    ("c.grace_ends_at", "contract_grace_ends_at"),
                    (
                        "CAST(c.return_confirmed AS BIGINT)",
                        "contract_return_confirmed"
                    ),
                    ("c.transfer_recipient", "contract_transfer_recipient"),
                    ("c.version", "contract_version"),
                ],
            ),
        ))
        .bind(now)
        .bind(limit)
        // An update waits for its contract end's delivery, which carries the terms as they
        // stand when it is sent: the processor cannot take an update before. So does an
        // extension ($9) for its request's delivery, which carries the due date likewise.
        .bind(Operation::Update.as_str())
        .bind(Operation::Deliver.as_str())
        .bind(lease_ms)
        // Only what this build can send: a row of an operation it does not know (a newer
        // version's, left after a rollback) would fail the whole claim, every time, and stop
        // every delivery behind it; it waits for a version that knows it instead.
        .bind(Operation::Deliver.as_str())
        .bind(Operation::Cancel.as_str())
        .bind(Operation::Update.as_str())
        .bind(Operation::Extend.as_str())
        .fetch_all(&self.db.claimer)
        .await?;
        // The most overdue first, as picked.
        rows.sort_by_key(|r| r.next_attempt_at);
        Ok(rows.into_iter().map(|r| r.job).collect())
    }

    /// Records that a processor durably accepted a delivery (or cancellation, a contract
    /// end's update or a due date's extension), with the tasks it reported, and refolds the
    /// request. An update is marked sent only when the terms it carried are still the latest,
    /// an extension only when the due date it carried still is; otherwise the row stays
    /// armed and is sent again with the new ones. Answers whether `job`'s claim still
    /// held the row: when another claim took it, nothing is recorded.
    pub async fn delivery_succeeded(
        &self,
        job: &DeliveryJob,
        tasks: &[TaskStatus],
        now: i64,
    ) -> Result<bool> {
        let held = self.deliveries_succeeded(&[(job, tasks)], now).await?;
        Ok(held.first().copied().unwrap_or(false))
    }

    /// [`Store::delivery_succeeded`] for several attempts at once, in one transaction: the
    /// requests locked, the rows marked (`mark_delivered`), then `apply_accepted` (what
    /// the answers reported, the touched requests folded, the events written together).
    /// Answers, in `done`'s order, whether each claim still held its row; a row another claim
    /// took records nothing, the others still do.
    pub async fn deliveries_succeeded(
        &self,
        done: &[(&DeliveryJob, &[TaskStatus])],
        now: i64,
    ) -> Result<Vec<bool>> {
        let mut tx = self.begin().await?;
        // The requests first, as a cancellation (which then ends their deliveries) locks them;
        // their states read with the lock serve the fold below, and whether each is forgotten
        // how the reported tasks are written.
        let ids: Vec<&str> = done
            .iter()
            .map(|(job, _)| job.request_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let locked = lock_states(&mut tx, &ids).await?;
        let jobs: Vec<&DeliveryJob> = done.iter().map(|(job, _)| *job).collect();
        let mut held = mark_delivered(&mut tx, &jobs, now).await?;
        // A Deliver a cancellation withdrew while this call was in flight: the processor
        // accepted it all the same, so it counts, and its tasks are folded in (the request
        // stays CANCELLED unless the cancellation turns out to have stopped nothing).
        let mut late = BTreeSet::new();
        for (i, job) in jobs.iter().enumerate() {
            if !held[i]
                && job.op == Operation::Deliver
                && end_withdrawn_claim(&mut tx, job, true).await?
            {
                held[i] = true;
                late.insert(i);
            }
        }
        let accepted: Vec<Accepted<'_>> = done
            .iter()
            .enumerate()
            .zip(&held)
            .filter(|(_, held)| **held)
            .map(|((i, (job, tasks)), _)| {
                let mut delivered = delivered_detail(job, tasks.len());
                if late.contains(&i) {
                    delivered
                        .message
                        .push_str(", its answer arriving after the cancellation");
                }
                Accepted {
                    request_id: &job.request_id,
                    processor: &job.processor,
                    tasks,
                    delivered,
                }
            })
            .collect();
        apply_accepted(&mut tx, &accepted, locked, now).await?;
        tx.commit().await?;
        Ok(held)
    }

    /// Records a failed attempt and when to try again. `refused` carries
    /// `delivery.max_refusals` when the processor refused the call with an answer retrying
    /// cannot change: that refusal is counted, and the one that reaches the limit
    /// dead-letters the row (no longer claimed) and tells the request's events. Nothing is
    /// recorded when another claim took the row. For a request forgotten already (a Cancel
    /// still sent after it) the error is written as forgetting leaves it: the row says
    /// `FORGOTTEN_ERROR` and the events show the registry's words without the error.
    pub async fn delivery_failed(
        &self,
        job: &DeliveryJob,
        error: &str,
        next_attempt_at: i64,
        now: i64,
        refused: Option<u32>,
    ) -> Result<FailureRecorded> {
        let mut tx = self.begin().await?;
        // Locked first, as forgetting locks it before it clears the deliveries' errors: a
        // forgetting under way is waited for and seen here, and one that comes later finds
        // this attempt's error and events to clear.
        let (state, forgotten) = lock_states(&mut tx, &[job.request_id.as_str()])
            .await?
            .of(&job.request_id);
        // The processor's answer may name the subject: once the request is forgotten, the
        // row keeps the registry's words and the answer stays only as the audit's hash.
        let kept_error = if forgotten { FORGOTTEN_ERROR } else { error };
        let dead: Option<Option<i64>> = sqlx::query_scalar(
            "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = $1, \
             lease_until = 0, lease_owner = NULL, last_error = $2, refusals = refusals + $6, \
             dead_lettered_at = CASE WHEN $6 = 1 AND refusals + 1 >= $7 THEN $8 ELSE NULL END \
             WHERE request_id = $3 AND processor = $4 AND op = $5 AND done_at IS NULL \
             AND lease_owner = $9 RETURNING dead_lettered_at",
        )
        .bind(next_attempt_at)
        .bind(kept_error)
        .bind(&job.request_id)
        .bind(&job.processor)
        .bind(job.op.as_str())
        .bind(i64::from(refused.is_some()))
        .bind(i64::from(refused.unwrap_or(u32::MAX)))
        .bind(now)
        .bind(&job.lease_owner)
        .fetch_optional(tx.conn())
        .await?;
        let Some(dead) = dead else {
            // A Deliver a cancellation withdrew while this call was in flight: it is no
            // longer in flight (see `Store::cancellation_settled`).
            if job.op == Operation::Deliver && end_withdrawn_claim(&mut tx, job, false).await? {
                tx.commit().await?;
                return Ok(FailureRecorded::Withdrawn);
            }
            return Ok(FailureRecorded::LeaseLost);
        };
        let dead_lettered = dead.is_some();
        insert_event(
            &mut tx,
            &job.request_id,
            EventType::DeliveryFailed,
            now,
            state,
            EventDetail {
                processor: job.processor.clone(),
                attempt: job.attempts + 1,
                message: format!("{} to {} failed", job.op, job.processor),
                free_text: error.to_string(),
                forgotten,
                ..Default::default()
            },
        )
        .await?;
        if dead_lettered {
            insert_event(
                &mut tx,
                &job.request_id,
                EventType::DeliveryDeadLettered,
                now,
                state,
                EventDetail {
                    processor: job.processor.clone(),
                    attempt: job.attempts + 1,
                    // The processor's answer is free text: the audit trail keeps only its
                    // keyed hash, as for DELIVERY_FAILED, and forgetting clears it.
                    message: format!(
                        "{} to {} dead-lettered after {} refusals, no longer sent",
                        job.op,
                        job.processor,
                        refused.unwrap_or_default()
                    ),
                    free_text: error.to_string(),
                    forgotten,
                    ..Default::default()
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(if dead_lettered {
            FailureRecorded::DeadLettered
        } else {
            FailureRecorded::Retrying
        })
    }

    /// Gives up the claim of `job` that the dispatcher abandoned (the registry is stopping):
    /// the token is cleared and the lease ended, so another replica sends the row at once
    /// instead of waiting for the lease to run out. Answers whether the claim still held it.
    pub async fn release_delivery(&self, job: &DeliveryJob) -> Result<bool> {
        let released = sqlx::query(
            "UPDATE deliveries SET lease_until = 0, lease_owner = NULL \
             WHERE request_id = $1 AND processor = $2 AND op = $3 AND lease_owner = $4 \
             AND done_at IS NULL",
        )
        .bind(&job.request_id)
        .bind(&job.processor)
        .bind(job.op.as_str())
        .bind(&job.lease_owner)
        .execute(&self.db.pool)
        .await?;
        Ok(released.rows_affected() > 0)
    }

    /// Outbox rows still to send, leased or not (dead-lettered ones excluded): what a stopping
    /// registry leaves queued.
    pub async fn unsent_delivery_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM deliveries WHERE done_at IS NULL AND dead_lettered_at IS NULL",
        )
        .fetch_one(&self.db.reader)
        .await?)
    }

    /// Dead-lettered outbox rows, the oldest dead-lettered first, at most `limit`.
    pub async fn dead_lettered_deliveries(
        &self,
        limit: i64,
        after: Option<&DeadLetterCursor>,
    ) -> Result<Vec<DeadLetteredRow>> {
        // Row values compared in the order listed: a page continues exactly after the last
        // row of the one before, whatever was requeued or dead-lettered meanwhile.
        let (at, request_id, processor, op) = match after {
            Some(c) => (
                c.dead_lettered_at,
                c.request_id.as_str(),
                c.processor.as_str(),
                c.op.as_str(),
            ),
            None => (i64::MIN, "", "", ""),
        };
        Ok(sqlx::query_as(
            "SELECT request_id, processor, op, CAST(attempts AS BIGINT) AS attempts, \
             CAST(refusals AS BIGINT) AS refusals, last_error, dead_lettered_at \
             FROM deliveries WHERE dead_lettered_at IS NOT NULL AND done_at IS NULL \
             AND (dead_lettered_at, request_id, processor, op) > ($2, $3, $4, $5) \
             ORDER BY dead_lettered_at, request_id, processor, op LIMIT $1",
        )
        .bind(limit)
        .bind(at)
        .bind(request_id)
        .bind(processor)
        .bind(op)
        .fetch_all(&self.db.reader)
        .await?)
    }

    /// Re-arms every dead-lettered row of `request_id` to `processor`: due at `now`, its
    /// refusals back at zero, so it takes `delivery.max_refusals` new refusals to park it
    /// again. Records who did it in the request's events and the audit trail.
    pub async fn requeue_deliveries(
        &self,
        request_id: &str,
        processor: &str,
        operator: &str,
        now: i64,
    ) -> Result<RequeueOutcome> {
        let mut tx = self.begin().await?;
        let requeued = sqlx::query(
            "UPDATE deliveries SET dead_lettered_at = NULL, refusals = 0, next_attempt_at = $1, \
             lease_until = 0 WHERE request_id = $2 AND processor = $3 \
             AND dead_lettered_at IS NOT NULL AND done_at IS NULL",
        )
        .bind(now)
        .bind(request_id)
        .bind(processor)
        .execute(tx.conn())
        .await?
        .rows_affected();
        if requeued == 0 {
            // The state named is the delivery's own: a cancellation, update or extension
            // on its way after it is not what the operator asked about.
            let delivery: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
                "SELECT done_at, withdrawn_at FROM deliveries \
                 WHERE request_id = $1 AND processor = $2 AND op = $3",
            )
            .bind(request_id)
            .bind(processor)
            .bind(Operation::Deliver.as_str())
            .fetch_optional(tx.conn())
            .await?;
            return Ok(match delivery {
                None => RequeueOutcome::NoDelivery,
                Some((None, _)) => RequeueOutcome::NotDeadLettered("PENDING"),
                Some((Some(_), Some(_))) => RequeueOutcome::NotDeadLettered("CANCELLED"),
                Some((Some(_), None)) => RequeueOutcome::NotDeadLettered("DELIVERED"),
            });
        }
        let state = tx.current_state(request_id).await?;
        insert_event(
            &mut tx,
            request_id,
            EventType::DeliveryRequeued,
            now,
            state,
            EventDetail {
                actor: operator.to_string(),
                processor: processor.to_string(),
                message: format!(
                    "{requeued} dead-lettered delivery row(s) to {processor} requeued by \
                     {operator}"
                ),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(RequeueOutcome::Requeued(requeued))
    }

    /// Requests still moving at their processors (DISPATCHED, IN_PROGRESS, or
    /// PARTIALLY_COMPLETED while retained data waits for its date) not checked or acknowledged
    /// since `cutoff`, with the processors that accepted them: candidates for a status check,
    /// one row per (request, processor). At most `limit` requests, the longest unchecked
    /// first, each with every processor that accepted it in adjacent rows: the limit never
    /// leaves out some of a request's processors, whose checks decide together when it is
    /// checked next (see `reconciler::run`).
    pub async fn quiet_requests(&self, cutoff: i64, limit: i64) -> Result<Vec<(String, String)>> {
        // The limit counts requests, not rows; a request no processor has accepted yet has
        // no one to ask and would only take a place.
        let sql = self.db.backend.numbered(
            "SELECT r.id, d.processor FROM (SELECT q.id, q.checked_at FROM requests q \
             WHERE q.state IN ($2, $3, $4) AND q.checked_at < $5 AND EXISTS (SELECT 1 \
             FROM deliveries e WHERE e.request_id = q.id AND e.op = $1 \
             AND e.done_at IS NOT NULL) ORDER BY q.checked_at, q.id LIMIT $6) r \
             JOIN deliveries d ON d.request_id = r.id AND d.op = $1 AND d.done_at IS NOT NULL \
             ORDER BY r.checked_at, r.id, d.processor",
        );
        Ok(sqlx::query_as(&sql)
            .bind(Operation::Deliver.as_str())
            .bind(RequestState::Dispatched as i64)
            .bind(RequestState::InProgress as i64)
            .bind(RequestState::PartiallyCompleted as i64)
            .bind(cutoff)
            .bind(limit)
            .fetch_all(&self.db.pool)
            .await?)
    }
}

impl Store {
    /// A status check of `request_id` that got no answer (its processor unreachable, or no
    /// longer configured) counts as a check made at `now`: the request goes behind every
    /// other quiet one, so requests of processors that answer are still asked about.
    pub async fn status_check_unanswered(&self, request_id: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE requests SET checked_at = $1 WHERE id = $2 AND checked_at < $1")
            .bind(now)
            .bind(request_id)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }
}

/// Where a page of dead-lettered rows ends: the last row's sort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCursor {
    /// When it was dead-lettered (ms).
    pub dead_lettered_at: i64,
    /// Its request.
    pub request_id: String,
    /// Its processor.
    pub processor: String,
    /// Its operation, as stored.
    pub op: String,
}

/// A dead-lettered outbox row, for operators.
#[derive(Debug, sqlx::FromRow)]
pub struct DeadLetteredRow {
    /// The request.
    pub request_id: String,
    /// The processor that kept refusing it.
    pub processor: String,
    /// `deliver`, `cancel`, `update` or `extend`, as stored.
    pub op: String,
    /// Calls made, refused or not.
    pub attempts: i64,
    /// Refusals counted towards `delivery.max_refusals`.
    pub refusals: i64,
    /// The processor's last answer.
    pub last_error: Option<String>,
    /// When it was dead-lettered (ms).
    pub dead_lettered_at: i64,
}

/// What [`Store::delivery_failed`] recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureRecorded {
    /// The attempt was counted and the row is sent again when due.
    Retrying,
    /// That refusal reached `delivery.max_refusals`: the row is no longer sent.
    DeadLettered,
    /// Another claim took the row: nothing was recorded.
    LeaseLost,
    /// A cancellation withdrew the Deliver while it was in flight: the attempt ended it.
    Withdrawn,
}

/// What [`Store::requeue_deliveries`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum RequeueOutcome {
    /// This many rows were re-armed.
    Requeued(u64),
    /// The request has no delivery to that processor (or does not exist).
    NoDelivery,
    /// None of the pair's rows is dead-lettered; the state they are in instead.
    NotDeadLettered(&'static str),
}

/// A contract end's terms in the registry's words, for events: `: DELETE`.
pub(crate) fn describe_terms(t: &dsrelay_proto::v1::ContractEnd) -> String {
    let choice = dsrelay_proto::v1::ContractEndChoice::try_from(t.choice)
        .map(|c| c.as_str_name().trim_start_matches("CONTRACT_END_CHOICE_"))
        .unwrap_or("?");
    let to = if t.transfer_recipient.is_empty() {
        String::new()
    } else {
        format!(" to {}", t.transfer_recipient)
    };
    if t.return_confirmed {
        format!(": {choice}{to}, return confirmed")
    } else {
        format!(": {choice}{to}")
    }
}

/// Marks each of `jobs`' rows accepted, if its claim still holds it (see
/// [`Store::delivery_succeeded`]); answers, in order, whether it did. A row's own UPDATE
/// each (a multi-row UPDATE ... FROM (VALUES ...) measured slower on SQLite, see
/// `docs/benchmarks.md`), all in one call on SQLite ([`execute_each`]).
async fn mark_delivered(tx: &mut Tx, jobs: &[&DeliveryJob], now: i64) -> Result<Vec<bool>> {
    let backend = tx.backend;
    let changed = execute_each(
        tx.conn(),
        backend,
        // An update or extension is done only if what it carried is still current.
        &format!(
            "UPDATE deliveries SET done_at = CASE \
             WHEN op = '{update}' AND NOT EXISTS (SELECT 1 FROM contracts c \
             WHERE c.request_id = $2 AND c.version = $5) THEN NULL \
             WHEN op = '{extend}' AND NOT EXISTS (SELECT 1 FROM requests r \
             WHERE r.id = $2 AND r.due_at = $7) THEN NULL ELSE $1 END, \
             attempts = attempts + 1, lease_until = 0, lease_owner = NULL, last_error = NULL \
             WHERE request_id = $2 AND processor = $3 AND op = $4 AND done_at IS NULL \
             AND lease_owner = $6",
            update = Operation::Update.as_str(),
            extend = Operation::Extend.as_str(),
        ),
        7,
        jobs,
        |query, job| {
            query
                .bind(now)
                .bind(&job.request_id)
                .bind(&job.processor)
                .bind(job.op.as_str())
                .bind(job.terms.contract_version.unwrap_or_default())
                .bind(&job.lease_owner)
                .bind(job.due_at)
        },
    )
    .await?;
    Ok(changed.into_iter().map(|n| n > 0).collect())
}

/// Ends `job`'s in-flight claim of its Deliver row, which a cancellation withdrew while the
/// call was on its way (the claim still holds it): the attempt is counted, and with
/// `accepted` (the processor accepted it all the same) the row reads accepted. Answers
/// whether the claim still held a withdrawn row.
async fn end_withdrawn_claim(tx: &mut Tx, job: &DeliveryJob, accepted: bool) -> Result<bool> {
    let accept = if accepted {
        "withdrawn_at = NULL, last_error = NULL, "
    } else {
        ""
    };
    Ok(sqlx::query(&format!(
        "UPDATE deliveries SET {accept}attempts = attempts + 1, lease_until = 0, \
         lease_owner = NULL WHERE request_id = $1 AND processor = $2 AND op = $3 \
         AND withdrawn_at IS NOT NULL AND lease_owner = $4"
    ))
    .bind(&job.request_id)
    .bind(&job.processor)
    .bind(Operation::Deliver.as_str())
    .bind(&job.lease_owner)
    .execute(tx.conn())
    .await?
    .rows_affected()
        > 0)
}

/// The DELIVERED event's words for an accepted `job` whose answer reported `tasks` tasks.
fn delivered_detail(job: &DeliveryJob, tasks: usize) -> EventDetail {
    let message = match job.op {
        Operation::Deliver => format!("accepted by {} with {tasks} task(s)", job.processor),
        Operation::Cancel => format!("cancellation accepted by {}", job.processor),
        Operation::Extend => format!(
            "due date {} accepted by {}",
            dsrelay_runtime::clock::date_label(job.due_at),
            job.processor
        ),
        Operation::Update => format!(
            "contract terms accepted by {}{}",
            job.processor,
            job.terms
                .contract_end()
                .map(|t| describe_terms(&t))
                .unwrap_or_default()
        ),
    };
    EventDetail {
        processor: job.processor.clone(),
        attempt: job.attempts + 1,
        message,
        ..Default::default()
    }
}
