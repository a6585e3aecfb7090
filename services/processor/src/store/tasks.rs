//! Requests and their tasks: accepting a delivery, cancelling it, claiming runnable tasks
//! and recording each change of state together with its acknowledgement. A claim leases a
//! task under a random token; the runner's renewals, transitions and postponements match
//! it, so once a lease is lost (it ran out and another claim took the task) the old runner
//! changes nothing. Leases are set and compared on the database's clock
//! ([`Backend::now_ms`](dsrelay_runtime::store::Backend::now_ms)); everything else (next attempts, due dates) is on the processor's.

use std::collections::HashMap;

use anyhow::Result;
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    Acknowledgement, ContractPhase, DeliverRequest, Evidence, ProcessorAuditEvent, RequestKind,
    TaskState,
};
use dsrelay_runtime::clock::date_label;
use dsrelay_runtime::signing::Signed;
use dsrelay_runtime::store::{lookups, run_each, Backend};
use dsrelay_runtime::trace_context;
use sha2::{Digest, Sha256};

use super::audit::{self, AuditTx, NewEntry, Record};
use super::certificates::Certifying;
use super::rows::{
    count, retained_only, state_value, stored_count, ClaimedRecord, KindedRecord, ManualRow,
    OperatorRecord, TaskJob, TaskKey, TaskRecord, TaskRow, JOINED_SELECT, TASK_COLUMNS,
};
use super::{acks, Store};
use crate::certificates::Issuer;
use crate::task_machine::{decide, Context, Decision, Event, Transition};

/// Tasks per INSERT of [`Store::accept`]: 8 parameters each, well under both backends'
/// limits.
const TASKS_PER_INSERT: usize = 200;

/// What [`Store::retry_task`] did.
#[derive(Debug)]
pub enum Retried {
    /// The task is IN_PROGRESS again: as the retry recorded it, read in its transaction
    /// (a runner may claim it the moment it commits).
    Retried(Box<ManualRow>),
    /// Nothing: [`retry_refusal`] refused the task, for this reason.
    Refused(RetryRefusal),
    /// Nothing: the task moved on from the sequence the retry was decided at.
    Changed,
}

/// Why an operator's retry does not take a FAILED or REFUSED task ([`retry_refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryRefusal {
    /// The request was forgotten (its body, with the identities, removed), or its body no
    /// longer decodes: there is nothing to run the task with.
    Forgotten,
    /// The task's subprocessor is no longer configured: it has no holder to run on.
    Unconfigured,
    /// The controller cancelled the request.
    Cancelled,
    /// The task had been RETAINED, and failed in a retention run.
    WasRetained,
}

/// What [`retry_refusal`] goes by, of one task and its request, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryStanding {
    /// The request's kind; `None` when its body is gone or no longer decodes.
    pub kind: Option<RequestKind>,
    /// The request is missing, its body removed or it is marked forgotten.
    pub forgotten: bool,
    /// The controller cancelled the request.
    pub cancelled: bool,
    /// An acknowledgement queued for the task said RETAINED.
    pub was_retained: bool,
}

/// Why an operator's retry of a FAILED or REFUSED task standing as `standing`, of a subprocessor
/// `configured` here or not, is refused; `None` when it is taken. The one rule of both
/// [`Store::retry_task`] and ListManualTasks (on what [`Store::retry_standings`] reads), so
/// what an operator is shown is what a retry does. The first reason that holds is given, in
/// the order of [`RetryRefusal`].
pub fn retry_refusal(standing: &RetryStanding, configured: bool) -> Option<RetryRefusal> {
    // Every kind is retried: a contract end task resumes in the phase it failed in
    // (`task_machine::operator_retry`), not from the start.
    if standing.kind.is_none() || standing.forgotten {
        Some(RetryRefusal::Forgotten)
    } else if !configured {
        Some(RetryRefusal::Unconfigured)
    } else if standing.cancelled {
        Some(RetryRefusal::Cancelled)
    } else if standing.was_retained {
        // A task once RETAINED failed in a retention run, after its request was answered:
        // rerun as a new task, it would make the registry reopen that request (open,
        // cancellable), and a cancellation would stop the erasure of data past its date.
        Some(RetryRefusal::WasRetained)
    } else {
        None
    }
}

/// Whether one of the acknowledgement `payloads` queued for a task said RETAINED. Every
/// acknowledgement queued for a task stays until its request is forgotten.
fn any_retained<'p>(payloads: impl IntoIterator<Item = &'p [u8]>) -> bool {
    payloads
        .into_iter()
        .any(|p| Acknowledgement::decode(p).is_ok_and(|a| a.state() == TaskState::Retained))
}

/// What [`Store::extend_due_date`] found.
#[derive(Debug)]
pub enum DueDateExtended {
    /// The caller delivered no such request.
    NotFound,
    /// The request is a contract end, whose due date follows its grace period.
    ContractEnd,
    /// The request's tasks as they now stand.
    Tasks {
        /// Whether the due date moved (a date not later than the stored one changes nothing).
        moved: bool,
        /// Every task of the request.
        tasks: Vec<TaskRow>,
    },
}

/// What Deliver found.
#[derive(Debug)]
pub enum Accepted {
    /// Stored now, with these tasks.
    New(Vec<TaskRow>),
    /// Delivered before; the tasks as they stand.
    Duplicate(Vec<TaskRow>),
}

/// Which tasks the operator API asks for.
enum OperatorFilter<'a> {
    /// One task.
    One(&'a TaskKey),
    /// Tasks in `states` (of one subprocessor, or all), oldest change first, after `after`.
    InStates {
        subprocessor: Option<&'a str>,
        states: &'a [TaskState],
        after: Option<&'a ManualCursor>,
        limit: i64,
    },
}

/// The columns of a request that [`RetryStanding`] takes, as [`RequestStanding`] reads them.
const REQUEST_STANDING: &str = "SELECT controller, request_id, body, cancelled_at, \
    CASE WHEN body IS NULL OR forgotten_at IS NOT NULL THEN 1 ELSE 0 END AS forgotten \
    FROM requests";

/// A request's row as [`REQUEST_STANDING`] reads it.
#[derive(Debug, sqlx::FromRow)]
struct RequestStanding {
    controller: String,
    request_id: String,
    body: Option<Vec<u8>>,
    cancelled_at: Option<i64>,
    forgotten: i64,
}

impl RequestStanding {
    /// The kind its body says; `None` when the body is gone or no longer decodes, as
    /// [`ManualRow::request`] is.
    fn kind(&self) -> Option<RequestKind> {
        let body = self.body.as_deref()?;
        DeliverRequest::decode(body).ok().map(|r| r.kind())
    }
}

/// Where a page of [`Store::manual_tasks`] ended: the last task's change time and key, the
/// order the tasks come in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualCursor {
    /// The task's `updated_at` (ms).
    pub updated_at: i64,
    /// The task.
    pub key: TaskKey,
}

/// Stores, in `tx`, a delivered request and one PENDING task per subprocessor, or reports
/// the existing ones when it was delivered (or cancelled) before, then or earlier in `tx`.
/// A contract end's terms are stored with it, and its tasks are SCHEDULED for their start.
/// Answers the audit entry a new request needs (the caller appends it, with the others of
/// its batch). See [`Store::accept`].
pub(super) async fn accept_in(
    tx: &mut AuditTx,
    controller: &str,
    req: &DeliverRequest,
    subprocessors: &[String],
    traceparent: Option<&str>,
    now: i64,
) -> Result<(Accepted, Option<NewEntry>)> {
    let backend = Backend::of_connection(tx);
    let recipient = req.recipient.as_ref();
    let inserted = sqlx::query(
        "INSERT INTO requests (controller, request_id, kind, body, received_at, due_at, \
         accepted_at, traceparent, recipient_name, recipient_endpoint, recipient_identity, \
         recipient_public_keys) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT DO NOTHING",
    )
    .bind(controller)
    .bind(&req.request_id)
    .bind(i64::from(req.kind))
    .bind(req.encode_to_vec())
    .bind(
        req.received_at
            .as_ref()
            .map(dsrelay_proto::millis_from_timestamp)
            .unwrap_or(now),
    )
    .bind(
        req.due_at
            .as_ref()
            .map(dsrelay_proto::millis_from_timestamp)
            .unwrap_or(i64::MAX),
    )
    .bind(now)
    .bind(traceparent)
    .bind(recipient.map(|r| r.name.clone()))
    .bind(recipient.map(|r| r.endpoint.clone()))
    .bind(recipient.map(|r| r.identity.clone()))
    .bind(recipient.map(|r| r.public_keys.join(" ")))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        // Nothing of it was written here: the tasks as they stand, read in `tx` so that
        // a second delivery in the same batch sees what the first one wrote.
        let tasks = read_tasks(&mut **tx, controller, &req.request_id).await?;
        return Ok((Accepted::Duplicate(tasks), None));
    }
    let terms = (req.kind == RequestKind::ContractEnd as i32)
        .then(|| {
            req.parameters
                .as_ref()
                .and_then(|p| p.contract_end.as_ref())
                .and_then(|c| super::contracts::terms_of(c, None))
        })
        .flatten();
    if let Some(t) = &terms {
        super::contracts::insert(tx, controller, req, t, now).await?;
    }
    let (phase, starts_at) = match &terms {
        Some(t) => (ContractPhase::Scheduled, Some(t.starts_at())),
        None => (ContractPhase::Unspecified, None),
    };
    // One statement for all the tasks, answering the rows as stored (defaults included),
    // so nothing is read back after the commit.
    let mut tasks: Vec<TaskRow> = Vec::with_capacity(subprocessors.len());
    for chunk in subprocessors.chunks(TASKS_PER_INSERT) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| {
                let b = 8 * i;
                format!(
                    "(${}, ${}, ${}, ${}, 1, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO tasks (controller, request_id, subprocessor, state, sequence, \
             next_attempt_at, updated_at, contract_phase, scheduled_at) VALUES {} \
             RETURNING {TASK_COLUMNS}",
            rows.join(", ")
        );
        let sql = backend.numbered(&sql);
        let mut q = sqlx::query_as::<_, TaskRecord>(&sql);
        for s in chunk {
            q = q
                .bind(controller)
                .bind(&req.request_id)
                .bind(s)
                .bind(state_value(TaskState::Pending))
                .bind(starts_at.unwrap_or(now))
                .bind(now)
                .bind(i64::from(phase as i32))
                .bind(starts_at);
        }
        tasks.extend(q.fetch_all(&mut **tx).await?.into_iter().map(TaskRow::from));
    }
    // As [`Store::tasks`] lists them.
    tasks.sort_by(|a, b| a.key.subprocessor.cmp(&b.key.subprocessor));
    let kind = RequestKind::try_from(req.kind)
        .map_or_else(|_| req.kind.to_string(), |k| k.as_str_name().to_string());
    let detail = if subprocessors.is_empty() {
        format!("{kind} accepted, no subprocessor holds its categories")
    } else {
        format!("{kind} accepted, tasks for {}", subprocessors.join(", "))
    };
    let record = Record {
        controller,
        request_id: &req.request_id,
        actor: controller,
        detail,
    };
    let entry = audit::entry(ProcessorAuditEvent::RequestAccepted, now, record);
    Ok((Accepted::New(tasks), Some(entry)))
}

/// A request's tasks, by subprocessor, read through `db` ([`Store::tasks`]' reader, or a
/// transaction that must see its own writes).
async fn read_tasks<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    controller: &str,
    request_id: &str,
) -> Result<Vec<TaskRow>> {
    let rows: Vec<TaskRecord> = sqlx::query_as(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE controller = $1 AND request_id = $2 \
         ORDER BY subprocessor"
    ))
    .bind(controller)
    .bind(request_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(TaskRow::from).collect())
}

/// The claim of due tasks: `$1` the processor's clock, `$2` how many, `$3` the lease (ms).
fn claim_tasks_sql(backend: Backend) -> String {
    let db_now = backend.now_ms();
    format!(
        "WITH picked AS MATERIALIZED (SELECT t.controller, t.request_id, t.subprocessor \
             FROM tasks t JOIN requests r ON r.controller = t.controller \
             AND r.request_id = t.request_id \
             WHERE t.state IN ({pending}, {in_progress}, {retained}) \
             AND t.next_attempt_at <= $1 AND t.lease_until <= {db_now} \
             AND (r.cancelled_at IS NULL OR t.cancel_requested_at IS NOT NULL \
             OR t.state = {retained} OR t.retain_until IS NOT NULL \
             OR t.contract_phase = {deleting}) \
             ORDER BY t.next_attempt_at LIMIT $2{lock}) \
             UPDATE tasks SET lease_until = {db_now} + $3, attempts = attempts + 1, \
             lease_owner = {token} \
             WHERE (controller, request_id, subprocessor) IN \
             (SELECT controller, request_id, subprocessor FROM picked) \
             RETURNING {TASK_COLUMNS}, next_attempt_at, lease_owner, {request}",
        // Literals, not parameters: only then can the planner use the partial index
        // `tasks_runnable` (WHERE state IN (1, 2, 5)) instead of scanning every task.
        pending = state_value(TaskState::Pending),
        in_progress = state_value(TaskState::InProgress),
        retained = state_value(TaskState::Retained),
        deleting = ContractPhase::Deleting as i32,
        lock = backend.skip_locked_of("t"),
        token = backend.random_token(),
        request = lookups(
            "requests r",
            "r.controller = tasks.controller AND r.request_id = tasks.request_id",
            &[
                ("r.body", "body"),
                ("r.due_at", "due_at"),
                ("r.traceparent", "traceparent"),
            ],
        ),
    )
}

impl Store {
    /// Whether the controller delivered (or cancelled) this request.
    pub async fn request_exists(&self, controller: &str, request_id: &str) -> Result<bool> {
        Ok(
            sqlx::query("SELECT 1 AS one FROM requests WHERE controller = $1 AND request_id = $2")
                .bind(controller)
                .bind(request_id)
                .fetch_optional(&self.db.reader)
                .await?
                .is_some(),
        )
    }

    /// A request's tasks.
    pub async fn tasks(&self, controller: &str, request_id: &str) -> Result<Vec<TaskRow>> {
        read_tasks(&self.db.reader, controller, request_id).await
    }

    /// Moves the request's due date to `due_at` if that is later than the stored one (never
    /// earlier), with an audit entry when it moved; tasks and uploads read the due date from
    /// the request at each step, so their next retry already sees it. Answers the tasks as
    /// they now stand.
    pub async fn extend_due_date(
        &self,
        controller: &str,
        request_id: &str,
        due_at: i64,
        now: i64,
    ) -> Result<DueDateExtended> {
        let mut tx = self.begin_audited().await?;
        // Read under the write that follows: on PostgreSQL the row is locked, on SQLite
        // the transaction's first write holds every other writer off.
        let stored: Option<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT kind, due_at FROM requests WHERE controller = $1 AND request_id = $2{}",
            self.db.backend.lock_rows()
        ))
        .bind(controller)
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((kind, old)) = stored else {
            return Ok(DueDateExtended::NotFound);
        };
        if kind == RequestKind::ContractEnd as i64 {
            return Ok(DueDateExtended::ContractEnd);
        }
        let moved = due_at > old;
        if moved {
            sqlx::query(
                "UPDATE requests SET due_at = $1 WHERE controller = $2 AND request_id = $3",
            )
            .bind(due_at)
            .bind(controller)
            .bind(request_id)
            .execute(&mut *tx)
            .await?;
            let record = Record {
                controller,
                request_id,
                actor: controller,
                detail: format!(
                    "due date moved from {} to {}",
                    date_label(old),
                    date_label(due_at)
                ),
            };
            audit::append(&mut tx, ProcessorAuditEvent::DueDateExtended, now, record).await?;
        }
        let tasks = read_tasks(&mut *tx, controller, request_id).await?;
        tx.commit().await?;
        Ok(DueDateExtended::Tasks { moved, tasks })
    }

    /// Cancels a request's tasks as the state machine says: those not started, or between
    /// attempts, become CANCELLED (an export task's folder recorded for removal,
    /// [`Transition::discard_export`]); those whose holder is working (under a runner's
    /// lease, with accepted work awaiting confirmation, or called with no answer recorded:
    /// a call cut off by a shutdown or a crash, which the next claim makes again), and those
    /// whose export a sender holds on its way (a contract end's only when it goes to a
    /// transfer recipient), keep their state and are marked (`cancel_requested_at` and a
    /// reason saying so), so that what the holder did, or what arrived, is what they report. Writes a tombstone when the request is unknown,
    /// so a delivery that arrives later creates no tasks. Answers the tasks as they now
    /// stand.
    pub async fn cancel(
        &self,
        controller: &str,
        request_id: &str,
        reason: &str,
        now: i64,
    ) -> Result<Vec<TaskRow>> {
        let db_now = self.db.backend.now_ms();
        let mut tx = self.begin_audited().await?;
        // Only the first cancellation of a request is an entry, not the registry's retries
        // of it. The write itself tells which one is first, even when cancellations run
        // side by side (replicas on PostgreSQL): marking a known request as cancelled locks
        // its row, so a concurrent one finds it cancelled; the tombstone of an unknown
        // request is inserted by one, and the others' inserts find it there.
        // A request forgotten already (finished, then a late cancellation) gets no reason:
        // it is free text from outside, which forgetting removed for good.
        let marked = sqlx::query(
            "UPDATE requests SET cancelled_at = $1, \
             cancel_reason = CASE WHEN forgotten_at IS NULL \
             THEN COALESCE(cancel_reason, $2) END \
             WHERE controller = $3 AND request_id = $4 AND cancelled_at IS NULL",
        )
        .bind(now)
        .bind(reason)
        .bind(controller)
        .bind(request_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let first = if marked > 0 {
            Some("cancelled")
        } else {
            let tombstone = sqlx::query(
                "INSERT INTO requests (controller, request_id, kind, body, received_at, \
                 due_at, accepted_at, cancelled_at, cancel_reason) \
                 VALUES ($1, $2, 0, NULL, $3, $3, $3, $3, $4) \
                 ON CONFLICT (controller, request_id) DO NOTHING",
            )
            .bind(controller)
            .bind(request_id)
            .bind(now)
            .bind(reason)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            (tombstone > 0).then_some("cancelled before its delivery arrived")
        };
        if let Some(known) = first {
            let reason = tx.text(reason);
            let detail = if reason.is_empty() {
                known.to_string()
            } else {
                format!("{known}, reason {reason}")
            };
            let record = Record {
                controller,
                request_id,
                actor: controller,
                detail,
            };
            audit::append(&mut tx, ProcessorAuditEvent::RequestCancelled, now, record).await?;
        }
        // Locked: a runner's start or outcome committing meanwhile is read, not overwritten
        // (on SQLite the transaction's first write already holds every other writer off).
        let leases: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT subprocessor, CAST(CASE WHEN lease_until > {db_now} THEN 1 ELSE 0 END \
             AS BIGINT) AS leased FROM tasks WHERE controller = $1 AND request_id = $2 \
             ORDER BY subprocessor{}{}",
            self.db.backend.bytewise(),
            self.db.backend.lock_rows()
        ))
        .bind(controller)
        .bind(request_id)
        .fetch_all(&mut *tx)
        .await?;
        // A task whose export is on its way (its upload claimed) is as busy as one whose
        // holder works: the destination may hold the data by the time the sender records it.
        // The uploads are locked too, after their tasks (the order an upload's outcome
        // takes them in), and every one not retired, not only those leased: on PostgreSQL a
        // claim committing meanwhile is then waited for and its lease read, where a plain
        // read would miss it and cancel a task whose sender goes on to deliver. A claim
        // coming after this lock skips the rows, and once it gets them it finds the task
        // cancelled and sends nothing. A contract end's return going to a transfer recipient
        // is told apart: that one is marked rather than cancelled ([`Event::Cancel`]).
        let sending: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
            "SELECT subprocessor, CAST(CASE WHEN lease_until > {db_now} THEN 1 ELSE 0 END \
             AS BIGINT) AS leased, CAST(CASE WHEN EXISTS (SELECT 1 FROM contract_ends c \
             WHERE c.controller = uploads.controller AND c.request_id = uploads.request_id \
             AND c.transfer_recipient <> '') THEN 1 ELSE 0 END AS BIGINT) AS to_recipient \
             FROM uploads WHERE controller = $1 AND request_id = $2 \
             AND done_at IS NULL ORDER BY subprocessor{}{}",
            self.db.backend.bytewise(),
            self.db.backend.lock_rows()
        ))
        .bind(controller)
        .bind(request_id)
        .fetch_all(&mut *tx)
        .await?;
        let rows: Vec<KindedRecord> = sqlx::query_as(&format!(
            "SELECT {TASK_COLUMNS}, {kind} FROM tasks WHERE controller = $1 AND request_id = $2",
            kind = lookups(
                "requests r",
                "r.controller = tasks.controller AND r.request_id = tasks.request_id",
                &[("r.kind", "kind")],
            ),
        ))
        .bind(controller)
        .bind(request_id)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            // An export task's folder may hold what an attempt wrote: cancelled, it goes.
            let exports = crate::exports::exports(row.kind());
            let task = TaskRow::from(row.task);
            let ours = |s: &str| s == task.key.subprocessor;
            let sent: Vec<_> = (sending.iter())
                .filter(|(s, l, _)| ours(s) && *l != 0)
                .collect();
            let leased = !sent.is_empty() || leases.iter().any(|(s, l)| ours(s) && *l != 0);
            let event = Event::Cancel {
                reason,
                leased,
                exports,
                transferring: sent.iter().any(|(_, _, r)| *r != 0),
            };
            match decide(&task.current(), event, &Context::at(now)) {
                Decision::Move(t) => {
                    let issuer = self.issuer.as_deref();
                    certified_transition(
                        &mut tx,
                        issuer,
                        &task.key,
                        task.sequence,
                        &t,
                        now,
                        task.attempts,
                    )
                    .await?;
                }
                // The sequence stays: the runner's renewals and outcome still match it.
                Decision::Mark { reason } => {
                    let key = &task.key;
                    sqlx::query(
                        "UPDATE tasks SET cancel_requested_at = $1, reason = $2 \
                         WHERE controller = $3 AND request_id = $4 AND subprocessor = $5 \
                         AND sequence = $6",
                    )
                    .bind(now)
                    .bind(crate::text::fit(&reason, crate::text::MAX_REASON).as_ref())
                    .bind(&key.controller)
                    .bind(&key.request_id)
                    .bind(&key.subprocessor)
                    .bind(task.sequence)
                    .execute(&mut *tx)
                    .await?;
                }
                _ => {}
            }
        }
        tx.commit().await?;
        self.tasks(controller, request_id).await
    }

    /// Reserves runnable tasks (PENDING; IN_PROGRESS waiting for a retry or a confirmation;
    /// RETAINED whose date has come) for `lease_ms` and counts the attempt each claim starts.
    /// Of a cancelled request, only tasks whose holder was working when the cancellation came
    /// are taken (marked: to learn what it did, a cut-off call made again), a contract end's
    /// tasks that were deleting (their erasure goes on and reports what it did), and
    /// RETAINED ones at their date, or whose retention run awaits the holder's confirmation
    /// (the erasure was done but for what the law kept, which goes when it may); the others
    /// are never started.
    /// Each claim writes a new random lease token into every task it takes, one per task
    /// ([`TaskJob::lease_owner`]), so a runner whose lease ran out no longer matches once
    /// another claim took the task. The claim is one statement however many tasks it takes;
    /// they come back the most overdue first.
    ///
    /// `now` (the processor's clock, the one tests move) decides which tasks are due; the
    /// lease is set and compared on the database's clock ([`Backend::now_ms`](dsrelay_runtime::store::Backend::now_ms)), as renewals
    /// ([`Store::extend_lease`]) are, so replicas agree on when a lease ends whatever their
    /// own clocks say.
    pub async fn claim_tasks(&self, now: i64, limit: i64, lease_ms: i64) -> Result<Vec<TaskJob>> {
        // One statement whatever `limit` is (see dsrelay_runtime::store's "Claims").
        let mut rows: Vec<ClaimedRecord> = sqlx::query_as(&claim_tasks_sql(self.db.backend))
            .bind(now)
            .bind(limit)
            .bind(lease_ms)
            .fetch_all(&self.db.claimer)
            .await?;
        // Claiming starts an attempt (`attempts` as returned counts it): a run cut off by a
        // crash still counts; a claim that ends without calling the holder takes it back
        // (`postpone`'s `no_call`, or the step the runner writes). The most overdue first,
        // as picked.
        rows.sort_by_key(|r| r.next_attempt_at);
        Ok(rows.into_iter().map(TaskJob::from).collect())
    }

    /// Moves a task to a new state and queues the acknowledgement, if the task is still at
    /// `expected_sequence` (a cancellation in between wins). Returns the new sequence.
    pub async fn transition(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        t: &Transition,
        now: i64,
        attempts: i64,
    ) -> Result<Option<i64>> {
        self.operator_transition(key, expected_sequence, t, now, attempts, "")
            .await
    }

    /// [`Store::transition`] made by the operator `by` (empty: the processor's own), whom
    /// the audit entry names as its actor.
    pub async fn operator_transition(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        t: &Transition,
        now: i64,
        attempts: i64,
        by: &str,
    ) -> Result<Option<i64>> {
        let mut tx = self.begin_audited().await?;
        let issuer = self.issuer.as_deref();
        let step = Step {
            expected_sequence,
            lease_owner: None,
            by,
            call_started_at: None,
            unless_cancelled: false,
        };
        let seq = step_transition(&mut tx, issuer, key, step, t, now, attempts).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Records an operator's retry `t` of `key`'s FAILED or REFUSED task at `expected_sequence`, by `by`
    /// (`Event::OperatorRetry`): the step with its acknowledgement and audit entry, its
    /// attempts counted from 0 and the failed run's last error cleared; unless
    /// [`retry_refusal`] refuses it (`configured`: whether its subprocessor is configured
    /// here). The request's row is locked first (PostgreSQL) and checked in the same
    /// transaction, so a cancellation or the forget worker committing meanwhile is seen.
    pub async fn retry_task(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        t: &Transition,
        now: i64,
        by: &str,
        configured: bool,
    ) -> Result<Retried> {
        let mut tx = self.begin_audited().await?;
        super::lock_requests(&mut tx, &[(&key.controller, &key.request_id)]).await?;
        let request: Option<RequestStanding> = sqlx::query_as(&format!(
            "{REQUEST_STANDING} WHERE controller = $1 AND request_id = $2"
        ))
        .bind(&key.controller)
        .bind(&key.request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let reported: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT payload FROM ack_outbox WHERE controller = $1 AND request_id = $2 \
             AND subprocessor = $3",
        )
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .fetch_all(&mut *tx)
        .await?;
        let standing = RetryStanding {
            kind: request.as_ref().and_then(RequestStanding::kind),
            forgotten: request.as_ref().is_none_or(|r| r.forgotten != 0),
            cancelled: request.as_ref().is_some_and(|r| r.cancelled_at.is_some()),
            was_retained: any_retained(reported.iter().map(Vec::as_slice)),
        };
        if let Some(refused) = retry_refusal(&standing, configured) {
            tx.rollback().await?;
            return Ok(Retried::Refused(refused));
        }
        let step = Step {
            expected_sequence,
            lease_owner: None,
            by,
            call_started_at: None,
            unless_cancelled: true,
        };
        let issuer = self.issuer.as_deref();
        if step_transition(&mut tx, issuer, key, step, t, now, 0)
            .await?
            .is_none()
        {
            tx.rollback().await?;
            return Ok(Retried::Changed);
        }
        // A return of data, a transfer or a contract end's return (retried in RETURNING)
        // exports again, into its emptied folder, and queues a new upload: the failed run's
        // upload (retired, so a new one would not be queued beside it) goes, and with it the
        // sweep's claim on the folder the new export writes (`Store::export_still_retired`).
        // The destination takes the new files in place of whatever the failed run sent of
        // its part, which it never closed. A contract end task resumed in a later phase
        // keeps its delivered return's upload: it exports nothing again.
        let exports_again = t
            .contract
            .as_ref()
            .is_none_or(|c| c.phase == ContractPhase::Returning);
        sqlx::query(
            "UPDATE tasks SET last_error = NULL, \
             export_files = CASE WHEN $1 = 1 THEN NULL ELSE export_files END \
             WHERE controller = $2 AND request_id = $3 AND subprocessor = $4",
        )
        .bind(i64::from(exports_again))
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .execute(&mut *tx)
        .await?;
        if exports_again {
            sqlx::query(
                "DELETE FROM uploads WHERE controller = $1 AND request_id = $2 \
                 AND subprocessor = $3",
            )
            .bind(&key.controller)
            .bind(&key.request_id)
            .bind(&key.subprocessor)
            .execute(&mut *tx)
            .await?;
        }
        let row: OperatorRecord = sqlx::query_as(&format!(
            "{JOINED_SELECT} WHERE t.controller = $1 AND t.request_id = $2 \
             AND t.subprocessor = $3"
        ))
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Retried::Retried(Box::new(ManualRow::from(row))))
    }

    /// Leaves a task of the claim `lease_owner` in its state and looks at it again at
    /// `next_at`, releasing it; nothing is acknowledged, since nothing the controller sees
    /// changed (a wait the registry is told of is a step instead: see
    /// `task_machine::holder_down`). `error` (a transient failure, an unreachable holder) is
    /// kept for operators; `None` keeps the last one. Answers whether the claim still held
    /// the task (another claim's lease is left alone) and, when `unless_cancelled`, no
    /// cancellation had marked it.
    ///
    /// `claimed_at` is when the task was due as the claim last knew it: as the claim found
    /// it, or as the claim's own last step wrote it ([`TaskJob::due_as_known`]). A time set
    /// since by someone else (new contract terms waking a task that waits for them, a due
    /// date extended) stays: the claim decided without what came, and the task is looked at
    /// again when that says.
    ///
    /// `no_call`: the claim called no holder (it waits for one marked unreachable, or for a
    /// contract end's start), so it is no attempt: the count its claim added is taken back,
    /// and a note of an earlier call cut off ([`TaskRow::call_started_at`]) stays: the call
    /// that follows is still made as interrupted, and a cancellation meanwhile still waits
    /// for what the cut-off call did. Otherwise the note is cleared: the call answered.
    ///
    /// The task waits from `now` on, unless it was waiting already (`waiting_since`).
    #[allow(clippy::too_many_arguments)]
    pub async fn postpone(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        lease_owner: &str,
        claimed_at: i64,
        next_at: i64,
        error: Option<&str>,
        unless_cancelled: bool,
        no_call: bool,
        now: i64,
    ) -> Result<bool> {
        let unmarked = if unless_cancelled {
            " AND cancel_requested_at IS NULL"
        } else {
            ""
        };
        let done = sqlx::query(&format!(
            "UPDATE tasks SET next_attempt_at = CASE WHEN next_attempt_at = $8 THEN $1 \
             ELSE next_attempt_at END, lease_until = 0, \
             call_started_at = CASE WHEN $9 = 1 THEN call_started_at END, \
             attempts = CASE WHEN $9 = 1 AND attempts > 0 THEN attempts - 1 ELSE attempts END, \
             waiting_since = COALESCE(waiting_since, $10), \
             last_error = COALESCE($2, last_error) WHERE controller = $3 AND request_id = $4 \
             AND subprocessor = $5 AND sequence = $6 AND lease_owner = $7{unmarked}"
        ))
        .bind(next_at)
        .bind(error)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .bind(lease_owner)
        .bind(claimed_at)
        .bind(i64::from(no_call))
        .bind(now)
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        Ok(done > 0)
    }

    /// Keeps a task claimed by `lease_owner` reserved for `lease_ms` more from now (the
    /// database's clock, as for claims) while its connector runs longer than one lease.
    /// Answers whether it did: not when the task changed, another claim took it, or the lease
    /// had already ended (another replica may claim it any moment, so it is not revived).
    pub async fn extend_lease(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        lease_owner: &str,
        lease_ms: i64,
    ) -> Result<bool> {
        let db_now = self.db.backend.now_ms();
        let done = sqlx::query(&format!(
            "UPDATE tasks SET lease_until = {db_now} + $1 WHERE controller = $2 \
             AND request_id = $3 AND subprocessor = $4 AND sequence = $5 AND lease_owner = $6 \
             AND lease_until > {db_now}"
        ))
        .bind(lease_ms)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .bind(lease_owner)
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        Ok(done > 0)
    }

    /// Gives up the claim `lease_owner` of a task whose step was abandoned (the service is
    /// stopping): the owner token is cleared and the lease ended on the database's clock, so
    /// another runner claims the task at once. `call_started_at` stays, so that claim resumes
    /// the cut-off call with care. Answers whether the claim still held the task (a task
    /// another claim took is left alone).
    pub async fn release_lease(&self, key: &TaskKey, lease_owner: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET lease_owner = NULL, lease_until = 0 WHERE controller = $1 \
             AND request_id = $2 AND subprocessor = $3 AND lease_owner = $4",
        )
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(lease_owner)
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        Ok(done > 0)
    }

    /// Holds `key`'s task for an operator's confirmation or refusal for `hold_ms` of the
    /// database's clock, under a new random token, unless another operator's call holds it
    /// now (on this replica or another). Answers the token, or `None` when the task is held
    /// already or does not exist.
    pub async fn hold_for_operator(&self, key: &TaskKey, hold_ms: i64) -> Result<Option<String>> {
        let backend = self.db.backend;
        let db_now = backend.now_ms();
        let held: Option<String> = sqlx::query_scalar(&format!(
            "UPDATE tasks SET operator_hold_until = {db_now} + $1, \
             operator_hold_by = {token} WHERE controller = $2 AND request_id = $3 \
             AND subprocessor = $4 AND operator_hold_until <= {db_now} \
             RETURNING operator_hold_by",
            token = backend.random_token(),
        ))
        .bind(hold_ms)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(held)
    }

    /// Ends the operator's hold `token` on `key`'s task (another's is left alone).
    pub async fn release_operator_hold(&self, key: &TaskKey, token: &str) -> Result<()> {
        sqlx::query(
            "UPDATE tasks SET operator_hold_until = 0, operator_hold_by = NULL \
             WHERE controller = $1 AND request_id = $2 AND subprocessor = $3 \
             AND operator_hold_by = $4",
        )
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(token)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// How many tasks a runner could claim now or later (pending, in progress, retained),
    /// leased or not: what a stopping processor leaves queued.
    pub async fn runnable_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE state IN ({}, {}, {})",
            state_value(TaskState::Pending),
            state_value(TaskState::InProgress),
            state_value(TaskState::Retained),
        ))
        .fetch_one(&self.db.reader)
        .await?)
    }

    /// Notes, for the claim `lease_owner`, that its holder is being called at `now`: until
    /// the step records the answer (or postpones the task), a later claim knows the call was
    /// cut off ([`TaskRow::call_started_at`]). Answers whether the claim still held the task.
    /// A call that directly follows the step starting the task is noted by that step instead
    /// ([`Store::transition_leased`]), sparing a statement.
    pub async fn call_started(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        lease_owner: &str,
        now: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET call_started_at = $1 WHERE controller = $2 AND request_id = $3 \
             AND subprocessor = $4 AND sequence = $5 AND lease_owner = $6",
        )
        .bind(now)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .bind(lease_owner)
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        Ok(done > 0)
    }

    /// Tasks in `states` (WAITING_FOR_OPERATOR when empty), oldest change first (ties in
    /// key order), those after `after` only.
    pub async fn manual_tasks(
        &self,
        subprocessor: Option<&str>,
        states: &[TaskState],
        after: Option<&ManualCursor>,
        limit: i64,
    ) -> Result<Vec<ManualRow>> {
        self.for_operators(OperatorFilter::InStates {
            subprocessor,
            states,
            after,
            limit,
        })
        .await
    }

    /// One task with its request, for the operator API.
    pub async fn manual_task(&self, key: &TaskKey) -> Result<Option<ManualRow>> {
        Ok(self.for_operators(OperatorFilter::One(key)).await?.pop())
    }

    /// What [`retry_refusal`] goes by, of each FAILED or REFUSED task of `rows` (as [`Store::manual_tasks`]
    /// read them: their kind from the request read with them), in two queries whatever their
    /// number: one of their requests, one of their acknowledgements. Read after `rows`, so a
    /// request cancelled or forgotten meanwhile is seen as such.
    pub async fn retry_standings(
        &self,
        rows: &[ManualRow],
    ) -> Result<HashMap<TaskKey, RetryStanding>> {
        let failed: Vec<&ManualRow> = rows
            .iter()
            .filter(|r| matches!(r.task.state, TaskState::Failed | TaskState::Refused))
            .collect();
        if failed.is_empty() {
            return Ok(HashMap::new());
        }
        let requests: Vec<(&str, &str)> = failed
            .iter()
            .map(|r| {
                (
                    r.task.key.controller.as_str(),
                    r.task.key.request_id.as_str(),
                )
            })
            .collect();
        let (params, matching) = super::requests_matching(&requests, "");
        let sql = format!("{REQUEST_STANDING} WHERE {matching}");
        let mut q = sqlx::query_as::<_, RequestStanding>(&sql);
        for param in &params {
            q = q.bind(*param);
        }
        let stood: HashMap<(String, String), RequestStanding> = q
            .fetch_all(&self.db.reader)
            .await?
            .into_iter()
            .map(|r| ((r.controller.clone(), r.request_id.clone()), r))
            .collect();
        let sql = format!(
            "SELECT controller, request_id, subprocessor, payload FROM ack_outbox WHERE {matching}"
        );
        let mut q = sqlx::query_as::<_, (String, String, String, Vec<u8>)>(&sql);
        for param in &params {
            q = q.bind(*param);
        }
        let mut reported: HashMap<TaskKey, Vec<Vec<u8>>> = HashMap::new();
        for (controller, request_id, subprocessor, payload) in q.fetch_all(&self.db.reader).await? {
            let key = TaskKey {
                controller,
                request_id,
                subprocessor,
            };
            reported.entry(key).or_default().push(payload);
        }
        Ok(failed
            .into_iter()
            .map(|r| {
                let key = &r.task.key;
                let request = stood.get(&(key.controller.clone(), key.request_id.clone()));
                let payloads = reported.get(key).map(Vec::as_slice).unwrap_or_default();
                let standing = RetryStanding {
                    // As the row's own body decodes, as the retry's decodes it.
                    kind: r.request.as_ref().map(|b| b.kind()),
                    forgotten: request.is_none_or(|r| r.forgotten != 0),
                    cancelled: request.is_some_and(|r| r.cancelled_at.is_some()),
                    was_retained: any_retained(payloads.iter().map(Vec::as_slice)),
                };
                (key.clone(), standing)
            })
            .collect())
    }

    async fn for_operators(&self, filter: OperatorFilter<'_>) -> Result<Vec<ManualRow>> {
        let rows: Vec<OperatorRecord> = match filter {
            OperatorFilter::One(key) => {
                sqlx::query_as(&format!(
                    "{JOINED_SELECT} WHERE t.controller = $1 AND t.request_id = $2 \
                     AND t.subprocessor = $3"
                ))
                .bind(&key.controller)
                .bind(&key.request_id)
                .bind(&key.subprocessor)
                .fetch_all(&self.db.reader)
                .await?
            }
            OperatorFilter::InStates {
                subprocessor,
                states,
                after,
                limit,
            } => {
                // Task states are our own enum values, so they are written into the SQL (and
                // a partial index can serve the query).
                let wanted: Vec<String> = if states.is_empty() {
                    vec![state_value(TaskState::WaitingForOperator).to_string()]
                } else {
                    states.iter().map(|s| state_value(*s).to_string()).collect()
                };
                // Keyed on the order itself, so a page goes on where the last one ended
                // whatever changed meanwhile.
                let after_clause = match after {
                    Some(_) => {
                        "AND (t.updated_at, t.controller, t.request_id, t.subprocessor) \
                         > ($3, $4, $5, $6) "
                    }
                    None => "",
                };
                let sql = format!(
                    "{JOINED_SELECT} WHERE t.state IN ({}) \
                     AND ($1 = '' OR t.subprocessor = $1) {after_clause}\
                     ORDER BY t.updated_at, t.controller, t.request_id, t.subprocessor \
                     LIMIT $2",
                    wanted.join(", ")
                );
                let mut q = sqlx::query_as(&sql)
                    .bind(subprocessor.unwrap_or(""))
                    .bind(limit);
                if let Some(c) = after {
                    q = q
                        .bind(c.updated_at)
                        .bind(&c.key.controller)
                        .bind(&c.key.request_id)
                        .bind(&c.key.subprocessor);
                }
                q.fetch_all(&self.db.reader).await?
            }
        };
        Ok(rows.into_iter().map(ManualRow::from).collect())
    }
}

/// Records `t` and queues its acknowledgement, if the task is still at `expected_sequence`;
/// issues no certificate (for steps that never certify an erasure).
pub(super) async fn transition(
    tx: &mut AuditTx,
    key: &TaskKey,
    expected_sequence: i64,
    t: &Transition,
    now: i64,
    attempts: i64,
) -> Result<Option<i64>> {
    certified_transition(tx, None, key, expected_sequence, t, now, attempts).await
}

/// [`transition`] of an outcome decided on a task no cancellation had marked: nothing moves
/// either once one did, so that the outcome is decided again as the cancellation's.
pub(super) async fn transition_unless_marked(
    tx: &mut AuditTx,
    key: &TaskKey,
    expected_sequence: i64,
    t: &Transition,
    now: i64,
    attempts: i64,
) -> Result<Option<i64>> {
    let step = Step {
        expected_sequence,
        lease_owner: None,
        by: "",
        call_started_at: None,
        unless_cancelled: true,
    };
    step_transition(tx, None, key, step, t, now, attempts).await
}

/// [`transition`], issuing with `issuer` the deletion certificate of an erasure step and
/// sending it with the acknowledgement.
async fn certified_transition(
    tx: &mut AuditTx,
    issuer: Option<&Issuer>,
    key: &TaskKey,
    expected_sequence: i64,
    t: &Transition,
    now: i64,
    attempts: i64,
) -> Result<Option<i64>> {
    let step = Step {
        expected_sequence,
        lease_owner: None,
        by: "",
        call_started_at: None,
        unless_cancelled: false,
    };
    step_transition(tx, issuer, key, step, t, now, attempts).await
}

/// Which change a step records, and for whom.
pub(super) struct Step<'a> {
    /// The task's sequence the step was decided from; a task that moved on is left alone.
    pub(super) expected_sequence: i64,
    /// Only while this claim holds the task, when given.
    pub(super) lease_owner: Option<&'a str>,
    /// The operator who made the change, for the audit entry; empty for the processor's own.
    pub(super) by: &'a str,
    /// When the holder is called right after the change is recorded: noted with it
    /// (`call_started_at`), as [`Store::call_started`] would, so that a claim after a crash
    /// knows the call may have been cut off. `None` clears the note (the change records an
    /// answer, or no call follows).
    pub(super) call_started_at: Option<i64>,
    /// Only while no cancellation marked the task (`cancel_requested_at`): for an outcome
    /// decided as if none came, which must be decided again when one did.
    pub(super) unless_cancelled: bool,
}

/// [`certified_transition`] as `step` says, with its audit entry.
async fn step_transition(
    tx: &mut AuditTx,
    issuer: Option<&Issuer>,
    key: &TaskKey,
    step: Step<'_>,
    t: &Transition,
    now: i64,
    attempts: i64,
) -> Result<Option<i64>> {
    // The span the change happens in (a task step, a cancellation) is where the registry's
    // handling of the acknowledgement hangs in the trace.
    let traceparent = trace_context::traceparent_of(&tracing::Span::current()).unwrap_or_default();
    if super::certificates::may_issue(issuer, t) {
        let request = (key.controller.as_str(), key.request_id.as_str());
        super::lock_requests(tx, &[request]).await?;
    }
    let Some(prepared) = prepare_step(tx, issuer, key, step, t, now, attempts, traceparent).await?
    else {
        return Ok(None);
    };
    let next = prepared.sequence;
    acks::queue_all(tx, std::slice::from_ref(&prepared.ack), None).await?;
    audit::append_all(tx, vec![prepared.entry]).await?;
    Ok(Some(next))
}

/// A step written to its task row, whose acknowledgement and audit entry are still to be
/// written in the same transaction (several steps' together, by [`Store::record_steps`]).
pub(super) struct PreparedStep {
    /// The task's new sequence.
    pub(super) sequence: i64,
    /// The acknowledgement to queue.
    pub(super) ack: acks::NewAck,
    /// The audit entry.
    pub(super) entry: audit::NewEntry,
}

/// Writes `t` to the task row as `step` says (with the certificate it issues and the upload
/// it queues) and prepares its acknowledgement, carrying `traceparent`, and its audit entry;
/// `None` when the task is no longer at the step's sequence (or claim). A step that may issue
/// a certificate must have locked its request's row first
/// ([`super::lock_requests`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn prepare_step(
    tx: &mut AuditTx,
    issuer: Option<&Issuer>,
    key: &TaskKey,
    step: Step<'_>,
    t: &Transition,
    now: i64,
    attempts: i64,
    traceparent: String,
) -> Result<Option<PreparedStep>> {
    let write = StepWrite::new(tx, key, &step, t, now, attempts)?;
    let backend = Backend::of_connection(tx);
    let ran = run_each(
        tx,
        backend,
        std::slice::from_ref(&write),
        StepWrite::sql,
        StepWrite::bind,
    )
    .await?;
    let Some(row) = ran
        .into_iter()
        .next()
        .and_then(|r| r.rows.into_iter().next())
    else {
        return Ok(None);
    };
    let certificate = super::certificates::issue_all(tx, issuer, &[write.certifying(key)])
        .await?
        .pop()
        .flatten();
    finish_step(tx, key, &step, &write, row, certificate, traceparent)
        .await
        .map(Some)
}

/// A step's UPDATE of its task row, with every value it binds, so that several steps' can go
/// to the database in one call ([`run_each`]).
pub(super) struct StepWrite {
    /// The transition as fitted to the registry's limits: what the row and the
    /// acknowledgement say.
    pub(super) t: Transition,
    sql: String,
    params: usize,
    next: i64,
    now: i64,
    attempts: i64,
    expected_sequence: i64,
    controller: String,
    request_id: String,
    subprocessor: String,
    export_files: Option<String>,
    transfer_receipt: Option<Vec<u8>>,
    phase: Option<i64>,
    counts: [Option<i64>; 4],
    /// The counts by place, when `counts` are written (bound last).
    erased_done: Option<String>,
    scheduled_at: Option<i64>,
    call_started_at: Option<i64>,
    lease_owner: Option<String>,
}

impl StepWrite {
    /// The UPDATE of `key`'s row that records `t` as `step` says.
    pub(super) fn new(
        conn: &sqlx::AnyConnection,
        key: &TaskKey,
        step: &Step<'_>,
        t: &Transition,
        now: i64,
        attempts: i64,
    ) -> Result<Self> {
        // Every step's texts pass here on their way to the task row and the acknowledgement,
        // so this is where they are fitted: the registry rejects an acknowledgement over its
        // limits.
        let t = t.fitted();
        let contract = t.contract.clone();
        let counts = contract.as_ref().and_then(|c| c.progress.as_ref());
        // A parameter only when it is matched: `$27 IS NULL` leaves PostgreSQL guessing its
        // type.
        let held = if step.lease_owner.is_some() {
            " AND lease_owner = $27"
        } else {
            ""
        };
        let unmarked = if step.unless_cancelled {
            " AND cancel_requested_at IS NULL"
        } else {
            ""
        };
        let mut params = if step.lease_owner.is_some() { 27 } else { 26 };
        // A give-up at the due date holds only while no extension moved that date past it.
        let due = if t.due_by.is_some() {
            params += 1;
            format!(
                " AND (SELECT r.due_at FROM requests r WHERE r.controller = $11 \
                 AND r.request_id = $12) <= ${params}"
            )
        } else {
            String::new()
        };
        // Last, after the optional ones: written with the other counts, kept without them.
        params += 1;
        let erased = params;
        let db_now = super::db_now_in(conn);
        // A contract end whose export began left at its holder what the export recorded for
        // the erasure after it; cancelled, that erasure never comes: the forget worker's
        // sweep has the holder discard it (`crate::holder_discard`), due from now.
        let discard = if t.state == TaskState::Cancelled {
            ", holder_discard_at = CASE WHEN export_started_at IS NOT NULL \
             THEN COALESCE(holder_discard_at, $9) ELSE holder_discard_at END"
        } else {
            ""
        };
        // A step that ends without an outcome leaves the task waiting: for its operator, a
        // retry (or an unreachable holder: `error`), or a time it is looked at again. A new
        // hand-over to the operator begins a new wait; the other waits go on from the first.
        let waiting = match t.state {
            TaskState::WaitingForOperator => format!(
                "waiting_since = CASE WHEN state <> {} THEN $9 ELSE COALESCE(waiting_since, $9) \
                 END",
                TaskState::WaitingForOperator as i32
            ),
            TaskState::Pending | TaskState::InProgress
                if t.error.is_some() || t.next_attempt_at.is_some_and(|at| at > now) =>
            {
                "waiting_since = COALESCE(waiting_since, $9)".to_string()
            }
            _ => "waiting_since = NULL".to_string(),
        };
        // A contract end's new phase counts its own attempts: the claim whose step starts it
        // and goes on to call the holder (`$18`, the hold) makes its first, a step that leaves
        // the task to a later claim none. Carried over, the erasure after a return read
        // "attempt 8" at its first failure, with the eighth attempt's backoff.
        let sql = format!(
            "UPDATE tasks SET state = $1, sequence = $2, records_affected = $3, confirmed = $4, \
             note = $5, reason = $6, legal_basis = $7, retain_until = $8, updated_at = $9, \
             attempts = CASE WHEN $20 IS NOT NULL AND $20 <> contract_phase \
             THEN CASE WHEN $18 > 0 THEN 1 ELSE 0 END ELSE $10 END, \
             lease_until = CASE WHEN $18 > 0 THEN {db_now} + $18 ELSE 0 END, \
             next_attempt_at = $15, handle = $16, \
             export_files = COALESCE($17, export_files), \
             transfer_receipt = COALESCE($19, transfer_receipt), \
             contract_phase = COALESCE($20, contract_phase), \
             subjects_done = COALESCE($21, subjects_done), \
             subjects_total = COALESCE($22, subjects_total), \
             records_done = COALESCE($23, records_done), \
             records_total = COALESCE($24, records_total), \
             scheduled_at = COALESCE($25, scheduled_at), call_started_at = $26, \
             erased_done = COALESCE(${erased}, erased_done){discard}, {waiting} \
             WHERE controller = $11 AND request_id = $12 AND subprocessor = $13 AND sequence = $14\
             {held}{unmarked}{due} RETURNING contract_phase, subjects_done, subjects_total, records_done, \
             records_total, scheduled_at, attempts",
        );
        Ok(Self {
            sql,
            params,
            next: step.expected_sequence + 1,
            now,
            attempts,
            expected_sequence: step.expected_sequence,
            controller: key.controller.clone(),
            request_id: key.request_id.clone(),
            subprocessor: key.subprocessor.clone(),
            export_files: t
                .export_files
                .as_ref()
                .map(serde_json::to_string)
                .transpose()?,
            transfer_receipt: t.transfer_receipt.as_ref().map(Message::encode_to_vec),
            phase: contract.as_ref().map(|c| i64::from(c.phase as i32)),
            counts: [
                counts.map(|p| stored_count(p.subjects_done)),
                counts.map(|p| stored_count(p.subjects_total)),
                counts.map(|p| stored_count(p.records_done)),
                counts.map(|p| stored_count(p.records_total)),
            ],
            erased_done: counts
                .map(|p| super::rows::stored_erased(&p.erased))
                .transpose()?,
            scheduled_at: contract.as_ref().and_then(|c| c.scheduled_at),
            call_started_at: step.call_started_at,
            lease_owner: step.lease_owner.map(str::to_string),
            t,
        })
    }

    /// What [`super::certificates::issue_all`] needs of it, for `key`'s task.
    pub(super) fn certifying<'a>(&'a self, key: &'a TaskKey) -> Certifying<'a> {
        Certifying {
            key,
            sequence: self.next,
            t: &self.t,
            now: self.now,
        }
    }

    /// Its text and how many parameters it binds.
    pub(super) fn sql(&self) -> (&str, usize) {
        (&self.sql, self.params)
    }

    /// Binds its values, in the order of its parameters.
    pub(super) fn bind<'q>(
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        w: &'q Self,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        let t = &w.t;
        let query = query
            .bind(state_value(t.state))
            .bind(w.next)
            .bind(t.records_affected)
            .bind(i64::from(t.confirmed))
            .bind(&t.note)
            .bind(&t.reason)
            .bind(&t.legal_basis)
            .bind(t.retain_until)
            .bind(w.now)
            .bind(w.attempts)
            .bind(&w.controller)
            .bind(&w.request_id)
            .bind(&w.subprocessor)
            .bind(w.expected_sequence)
            .bind(t.next_attempt_at.unwrap_or(w.now))
            .bind(t.handle.as_deref())
            .bind(w.export_files.as_deref())
            .bind(t.hold_ms.unwrap_or(0))
            .bind(w.transfer_receipt.as_deref())
            .bind(w.phase)
            .bind(w.counts[0])
            .bind(w.counts[1])
            .bind(w.counts[2])
            .bind(w.counts[3])
            .bind(w.scheduled_at)
            .bind(w.call_started_at);
        let query = match &w.lease_owner {
            Some(owner) => query.bind(owner.as_str()),
            None => query,
        };
        let query = match t.due_by {
            Some(by) => query.bind(by),
            None => query,
        };
        query.bind(w.erased_done.as_deref())
    }
}

/// The rest of a step whose row `write` wrote: the upload it queues, its acknowledgement
/// (with `certificate`, issued by [`super::certificates::issue_all`] once every step of the
/// transaction is written) and audit entry. `row` is what the UPDATE returned.
pub(super) async fn finish_step(
    tx: &mut AuditTx,
    key: &TaskKey,
    step: &Step<'_>,
    write: &StepWrite,
    row: sqlx::any::AnyRow,
    certificate: Option<Signed>,
    traceparent: String,
) -> Result<PreparedStep> {
    // The attempts as written: a new phase's count, not the caller's.
    type Written = (i64, i64, i64, i64, i64, Option<i64>, i64);
    let written: Written = sqlx::FromRow::from_row(&row)?;
    let (phase, subjects_done, subjects_total, records_done, records_total, scheduled_at) = (
        written.0, written.1, written.2, written.3, written.4, written.5,
    );
    let attempts = written.6;
    let (t, next, now, by) = (&write.t, write.next, write.now, step.by);
    // Every acknowledgement of a contract end task carries its progress as recorded now.
    let progress = i32::try_from(phase)
        .ok()
        .and_then(|p| ContractPhase::try_from(p).ok())
        .filter(|p| *p != ContractPhase::Unspecified)
        .map(|p| {
            crate::task_machine::progress_proto(
                p,
                &dsrelay_connectors::BulkProgress::counts(
                    count(subjects_done),
                    count(subjects_total),
                    count(records_done),
                    count(records_total),
                ),
                scheduled_at,
                t.state,
            )
        });
    let ack = Acknowledgement {
        request_id: key.request_id.clone(),
        subprocessor: key.subprocessor.clone(),
        sequence: next as u64,
        state: t.state as i32,
        evidence: Some(Evidence {
            records_affected: t.records_affected,
            note: t.note.clone(),
            confirmed: t.confirmed,
            transfer_receipt: t.transfer_receipt.clone(),
        }),
        reason: t.reason.clone(),
        legal_basis: retained_only(t.state, &t.legal_basis),
        retain_until: retained_only(t.state, &t.retain_until).map(timestamp_from_millis),
        occurred_at: Some(timestamp_from_millis(now)),
        attempt: attempts.clamp(0, i64::from(u32::MAX)) as u32,
        traceparent,
        certificate: certificate.as_ref().map(crate::certificates::to_proto),
        progress,
    };
    if t.upload {
        super::uploads::queue(tx, key, now).await?;
    }
    if t.discard_export {
        super::uploads::retire_unsent(tx, key, now).await?;
    }
    let detail = step_detail(tx, key, next, t, progress.as_ref(), certificate.as_ref());
    let record = Record {
        controller: &key.controller,
        request_id: &key.request_id,
        actor: by,
        detail,
    };
    Ok(PreparedStep {
        sequence: next,
        ack: acks::NewAck {
            key: key.clone(),
            sequence: next,
            ack,
            at: now,
        },
        entry: audit::entry(ProcessorAuditEvent::TaskRecorded, now, record),
    })
}

/// A step's audit detail: the subprocessor, the change number, the state, the counts, the
/// certificate's digest; free text only as its keyed hash.
fn step_detail(
    tx: &AuditTx,
    key: &TaskKey,
    sequence: i64,
    t: &Transition,
    progress: Option<&dsrelay_proto::v1::ContractProgress>,
    certificate: Option<&dsrelay_runtime::signing::Signed>,
) -> String {
    let mut parts = vec![
        format!("subprocessor {}", key.subprocessor),
        format!("change {sequence}"),
        t.state.as_str_name().to_string(),
    ];
    if t.records_affected != 0 {
        parts.push(format!("records {}", t.records_affected));
    }
    if t.confirmed {
        parts.push("confirmed by the holder".into());
    }
    if let Some(until) = t.retain_until {
        parts.push(format!(
            "erasure run due {}",
            crate::certificates::rfc3339(until)
        ));
    }
    if let Some(p) = progress {
        let phase = ContractPhase::try_from(p.phase)
            .map_or_else(|_| p.phase.to_string(), |p| p.as_str_name().to_string());
        parts.push(format!(
            "{phase}, subjects {}/{}, records {}/{}",
            p.subjects_done, p.subjects_total, p.records_done, p.records_total
        ));
    }
    if let Some(files) = &t.export_files {
        let bytes: u64 = files.iter().map(|f| f.size).sum();
        parts.push(format!("export of {} files, {bytes} bytes", files.len()));
    }
    if let Some(c) = certificate {
        parts.push(format!(
            "certificate sha256:{}",
            hex::encode(Sha256::digest(&c.body))
        ));
    }
    for (name, text) in [
        ("note", &t.note),
        ("reason", &t.reason),
        ("legal basis", &t.legal_basis),
    ] {
        if !text.is_empty() {
            parts.push(format!("{name} {}", tx.text(text)));
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{DeliverRequest, RequestKind};
    use dsrelay_runtime::store::Db;

    use crate::store::{Store, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    /// A claim walks the queue's partial index in the order it picks and stops at its
    /// limit, whatever the planner knows of the table: on a database never analyzed (a new
    /// deployment before autovacuum's first pass) PostgreSQL otherwise picked a bitmap scan
    /// of every index entry then a sort, so that each claim read the whole backlog, and
    /// every dead entry the backlog's updates had left.
    #[tokio::test]
    async fn a_claim_walks_the_runnable_index_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            let db = Db::connect(&url).await.expect("connect");
            db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
                .await
                .expect("migrate");
            let setting = |pool: sqlx::AnyPool| async move {
                sqlx::query_scalar::<_, String>("SHOW enable_bitmapscan")
                    .fetch_one(&pool)
                    .await
                    .expect("show")
            };
            assert_eq!(setting(db.claimer.clone()).await, "off");
            assert_eq!(
                setting(db.pool.clone()).await,
                "on",
                "only claims are steered"
            );
            let plan: Vec<String> =
                sqlx::query_scalar(&format!("EXPLAIN {}", super::claim_tasks_sql(db.backend)))
                    .bind(1_i64)
                    .bind(64_i64)
                    .bind(30_000_i64)
                    .fetch_all(&db.claimer)
                    .await
                    .expect("explain");
            let plan = plan.join("\n");
            assert!(
                plan.contains("Index Scan using tasks_runnable on tasks t"),
                "{plan}"
            );
            assert!(
                !plan.contains("Bitmap") && !plan.contains("Seq Scan"),
                "{plan}"
            );
            db.close().await;
        })
        .await;
    }

    /// A pooled connection is not pinged each time it is taken, only after it sat idle a
    /// while: one the server ended meanwhile is then replaced, not handed to its caller.
    #[tokio::test]
    async fn a_connection_ended_while_idle_is_replaced_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            let db = Db::connect(&url).await.expect("connect");
            let pid = || async {
                sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                    .fetch_one(&db.pool)
                    .await
            };
            let first = pid().await.expect("pid");
            let other = Db::connect(&url).await.expect("connect");
            let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                .bind(first)
                .fetch_one(&other.pool)
                .await
                .expect("terminate");
            assert!(ended);
            other.close().await;
            // Past the idle time after which a connection is checked when taken.
            tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
            let second = pid().await.expect("a fresh connection answers");
            assert_ne!(first, second);
            db.close().await;
        })
        .await;
    }

    /// On a database whose collation does not sort by bytes (ICU's root locale puts
    /// `a-mail` before `B-crm`; bytes put `B` first), a cancellation still locks a request's
    /// tasks in byte order, the order in which a batch of steps writes them. A step batch
    /// holding the first task while the cancellation waits for it can take the second,
    /// where locking in the collation's order would make the two wait for each other (and
    /// PostgreSQL abort one).
    #[tokio::test]
    async fn a_cancellation_locks_tasks_in_the_order_steps_write_them_on_postgres() {
        let icu = " TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'und'";
        crate::test_postgres::on_postgres_created_with(icu, |url, _| async move {
            let db = Db::connect(&url).await.expect("connect");
            db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
                .await
                .expect("migrate");
            let store = Store::new(db, b"test key");
            let collated: Vec<String> = sqlx::query_scalar(
                "SELECT s FROM (VALUES ('B-crm'), ('a-mail')) AS v (s) ORDER BY s",
            )
            .fetch_all(&store.db.pool)
            .await
            .expect("collation");
            assert_eq!(
                collated,
                ["a-mail", "B-crm"],
                "the database sorts by its collation"
            );
            let req = DeliverRequest {
                request_id: "r-1".into(),
                kind: RequestKind::Erasure as i32,
                ..Default::default()
            };
            store
                .accept("acme", &req, &["B-crm".into(), "a-mail".into()], None, 1)
                .await
                .expect("accept");
            let step = |subprocessor: &'static str| {
                sqlx::query(
                    "UPDATE tasks SET sequence = sequence + 1 WHERE controller = 'acme' \
                     AND request_id = 'r-1' AND subprocessor = $1",
                )
                .bind(subprocessor)
            };
            // A batch of steps, in byte order: its first task written, not committed.
            let mut steps = store.db.pool.begin().await.expect("begin");
            sqlx::query("SET LOCAL lock_timeout = '5s'")
                .execute(&mut *steps)
                .await
                .expect("lock timeout");
            step("B-crm")
                .execute(&mut *steps)
                .await
                .expect("first step");
            let cancel = {
                let store = store.clone();
                tokio::spawn(async move { store.cancel("acme", "r-1", "", 2).await })
            };
            crate::test_postgres::until_waiting_for_a_lock(&store.db.pool).await;
            step("a-mail")
                .execute(&mut *steps)
                .await
                .expect("the second step is not held up by the waiting cancellation");
            steps.commit().await.expect("commit");
            let tasks = cancel
                .await
                .expect("joined")
                .expect("the cancellation goes through once the steps commit");
            assert_eq!(tasks.len(), 2);
            store.db.pool.close().await;
        })
        .await;
    }
}
