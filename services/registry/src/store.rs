//! The registry's durable state: requests, the delivery outbox, tasks, acknowledgements,
//! events and the audit trail (one hash-chained entry per event, see
//! [`dsrelay_runtime::audit`]). Every change that must be seen together is written in one
//! transaction.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use dsrelay_proto::v1::{Acknowledgement, EventType, RequestState, TaskState, TaskStatus};
use dsrelay_runtime::audit;
use dsrelay_runtime::store::{Backend, Db};
use dsrelay_runtime::trace_context;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::fold::{fold, request_can_be_overdue, request_is_terminal};

/// The migrations for each backend, embedded at build time.
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
/// See [`SQLITE_MIGRATIONS`].
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Outbox operation: deliver a request.
pub const OP_DELIVER: &str = "deliver";
/// Outbox operation: cancel a delivered request.
pub const OP_CANCEL: &str = "cancel";

/// A request as stored.
#[derive(Debug, Clone)]
pub struct RequestRow {
    /// Request id.
    pub id: String,
    /// Submitting partner.
    pub partner: String,
    /// The partner's idempotency key.
    pub idempotency_key: String,
    /// The encoded SubmitRequest; `None` once identities are forgotten.
    pub body: Option<Vec<u8>>,
    /// Request kind (proto enum value).
    pub kind: i32,
    /// Folded state (proto enum value).
    pub state: i32,
    /// Received (ms).
    pub received_at: i64,
    /// Due (ms).
    pub due_at: i64,
    /// Months added to the due date so far.
    pub extension_months: i64,
    /// Reasons for extensions, JSON array.
    pub extension_reasons: String,
    /// W3C trace id.
    pub trace_id: String,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
    /// Last change (ms).
    pub updated_at: i64,
}

impl RequestRow {
    fn from_row(r: &AnyRow) -> sqlx::Result<Self> {
        Ok(Self {
            id: r.try_get("id")?,
            partner: r.try_get("partner")?,
            idempotency_key: r.try_get("idempotency_key")?,
            body: r.try_get("body")?,
            kind: r.try_get::<i64, _>("kind")? as i32,
            state: r.try_get::<i64, _>("state")? as i32,
            received_at: r.try_get("received_at")?,
            due_at: r.try_get("due_at")?,
            extension_months: r.try_get("extension_months")?,
            extension_reasons: r.try_get("extension_reasons")?,
            trace_id: r.try_get("trace_id")?,
            cancel_reason: r.try_get("cancel_reason")?,
            updated_at: r.try_get("updated_at")?,
        })
    }

    /// The state as an enum.
    pub fn state(&self) -> RequestState {
        RequestState::try_from(self.state).unwrap_or(RequestState::Unspecified)
    }

    /// Whether the due date has passed while the controller still owes an answer.
    pub fn overdue(&self, now: i64) -> bool {
        self.due_at < now && request_can_be_overdue(self.state())
    }
}

const REQUEST_COLUMNS: &str = "id, partner, idempotency_key, body, kind, state, received_at, \
    due_at, extension_months, extension_reasons, trace_id, cancel_reason, updated_at";

/// A delivery row as stored.
#[derive(Debug, Clone)]
pub struct DeliveryRow {
    /// Processor name.
    pub processor: String,
    /// Attempts so far.
    pub attempts: i64,
    /// Next attempt (ms).
    pub next_attempt_at: i64,
    /// Last failure.
    pub last_error: Option<String>,
    /// When the processor accepted (ms).
    pub done_at: Option<i64>,
}

/// A claimed outbox row with what is needed to send it.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    /// Request id.
    pub request_id: String,
    /// Processor name.
    pub processor: String,
    /// [`OP_DELIVER`] or [`OP_CANCEL`].
    pub op: String,
    /// Attempts made before this one.
    pub attempts: i64,
    /// The encoded SubmitRequest.
    pub body: Option<Vec<u8>>,
    /// Received (ms).
    pub received_at: i64,
    /// Due (ms).
    pub due_at: i64,
    /// W3C trace id.
    pub trace_id: String,
    /// Why it was cancelled (for cancel jobs).
    pub cancel_reason: Option<String>,
    /// W3C traceparent of the request's intake span.
    pub traceparent: Option<String>,
}

/// A stored event.
#[derive(Debug, Clone)]
pub struct EventRow {
    /// Increasing id.
    pub id: i64,
    /// Event type (proto enum value).
    pub event_type: i32,
    /// When (ms).
    pub occurred_at: i64,
    /// Request state after the event.
    pub request_state: i32,
    /// Processor concerned.
    pub processor: String,
    /// Subprocessor concerned.
    pub subprocessor: String,
    /// Task state after the event.
    pub task_state: i32,
    /// Task sequence.
    pub sequence: i64,
    /// Delivery attempt.
    pub attempt: i64,
    /// Description.
    pub message: String,
    /// The trace it happened in.
    pub trace_id: Option<String>,
    /// The span it happened in, when traced.
    pub span_id: Option<String>,
}

/// What a Submit's insert found.
#[derive(Debug)]
pub enum Inserted {
    /// Stored as new.
    New,
    /// The same key and body were submitted before, as this request.
    Existing(String),
    /// The same key was used before with another body, for this request.
    Conflict(String),
}

/// A new request to store.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// Request id.
    pub id: String,
    /// Partner name.
    pub partner: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// SHA-256 of the encoded body.
    pub body_hash: String,
    /// Encoded SubmitRequest.
    pub body: Vec<u8>,
    /// JSON array of keyed identity hashes.
    pub identity_hashes: String,
    /// Kind.
    pub kind: i32,
    /// Received (ms).
    pub received_at: i64,
    /// Due (ms).
    pub due_at: i64,
    /// W3C trace id.
    pub trace_id: String,
    /// W3C traceparent of the intake span, when tracing.
    pub traceparent: Option<String>,
    /// Processors to deliver to.
    pub processors: Vec<String>,
}

/// Filters for listing.
#[derive(Debug, Default)]
pub struct ListFilter {
    /// Only this partner's requests.
    pub partner: Option<String>,
    /// Only these states.
    pub states: Vec<i32>,
    /// Only this kind.
    pub kind: Option<i32>,
    /// Only overdue ones.
    pub overdue_only: bool,
    /// Only those older than this (received_at, id) position.
    pub before: Option<(i64, String)>,
    /// At most this many.
    pub limit: i64,
}

enum Bind {
    I64(i64),
    Text(String),
}

/// The registry store.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

impl Store {
    /// Wraps a migrated database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Stores a new request with its outbox rows, or finds the one its idempotency key names.
    pub async fn insert_request(&self, r: &NewRequest) -> Result<Inserted> {
        for _ in 0..2 {
            let mut tx = self.db.pool.begin().await?;
            lock_audit(&mut tx).await?;
            match insert_one(&mut tx, r).await? {
                Some(outcome) => {
                    tx.commit().await?;
                    return Ok(outcome);
                }
                // A concurrent Submit with the same key won the race: look again.
                None => continue,
            }
        }
        anyhow::bail!("idempotency key race did not settle")
    }

    /// Stores several requests in ONE transaction, so concurrent Submits share a commit (and
    /// its fsync). Answers in order. If the shared transaction cannot be used (a race on an
    /// idempotency key with another replica), each request is stored on its own instead.
    pub async fn insert_requests(&self, rs: &[NewRequest]) -> Result<Vec<Inserted>> {
        if rs.len() == 1 {
            return Ok(vec![self.insert_request(&rs[0]).await?]);
        }
        let mut tx = self.db.pool.begin().await?;
        lock_audit(&mut tx).await?;
        let mut out = Vec::with_capacity(rs.len());
        for r in rs {
            match insert_one(&mut tx, r).await {
                Ok(Some(outcome)) => out.push(outcome),
                Ok(None) | Err(_) => {
                    drop(tx);
                    let mut one_by_one = Vec::with_capacity(rs.len());
                    for r in rs {
                        one_by_one.push(self.insert_request(r).await?);
                    }
                    return Ok(one_by_one);
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    /// One request, if it exists.
    pub async fn request(&self, id: &str) -> Result<Option<RequestRow>> {
        let row = sqlx::query(&format!(
            "SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.db.pool)
        .await?;
        row.as_ref()
            .map(RequestRow::from_row)
            .transpose()
            .map_err(Into::into)
    }

    /// A request's deliveries (not cancellations), by processor name.
    pub async fn deliveries(&self, id: &str) -> Result<Vec<DeliveryRow>> {
        let rows = sqlx::query(
            "SELECT processor, attempts, next_attempt_at, last_error, done_at FROM deliveries \
             WHERE request_id = $1 AND op = $2 ORDER BY processor",
        )
        .bind(id)
        .bind(OP_DELIVER)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryRow {
                    processor: r.try_get("processor")?,
                    attempts: r.try_get("attempts")?,
                    next_attempt_at: r.try_get("next_attempt_at")?,
                    last_error: r.try_get("last_error")?,
                    done_at: r.try_get("done_at")?,
                })
            })
            .collect()
    }

    /// A request's tasks.
    pub async fn tasks(&self, id: &str) -> Result<Vec<TaskStatus>> {
        let rows = sqlx::query(
            "SELECT processor, subprocessor, state, sequence, records_affected, confirmed, note, \
             reason, legal_basis, retain_until, updated_at FROM tasks WHERE request_id = $1 \
             ORDER BY processor, subprocessor",
        )
        .bind(id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TaskStatus {
                    processor: r.try_get("processor")?,
                    subprocessor: r.try_get("subprocessor")?,
                    state: r.try_get::<i64, _>("state")? as i32,
                    sequence: r.try_get::<i64, _>("sequence")?.max(0) as u64,
                    evidence: Some(dsrelay_proto::v1::Evidence {
                        records_affected: r.try_get("records_affected")?,
                        note: r.try_get("note")?,
                        confirmed: r.try_get::<i64, _>("confirmed")? != 0,
                    }),
                    reason: r.try_get("reason")?,
                    legal_basis: r.try_get("legal_basis")?,
                    retain_until: r
                        .try_get::<Option<i64>, _>("retain_until")?
                        .map(dsrelay_proto::timestamp_from_millis),
                    updated_at: Some(dsrelay_proto::timestamp_from_millis(
                        r.try_get("updated_at")?,
                    )),
                })
            })
            .collect()
    }

    /// Requests matching `f`, newest first.
    pub async fn list(&self, f: &ListFilter, now: i64) -> Result<Vec<RequestRow>> {
        let mut sql = format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE 1 = 1");
        let mut binds = Vec::new();
        let param = |b: Bind, binds: &mut Vec<Bind>| {
            binds.push(b);
            format!("${}", binds.len())
        };
        if let Some(p) = &f.partner {
            let n = param(Bind::Text(p.clone()), &mut binds);
            sql.push_str(&format!(" AND partner = {n}"));
        }
        if !f.states.is_empty() {
            let list: Vec<String> = f
                .states
                .iter()
                .map(|s| param(Bind::I64(i64::from(*s)), &mut binds))
                .collect();
            sql.push_str(&format!(" AND state IN ({})", list.join(", ")));
        }
        if let Some(k) = f.kind {
            let n = param(Bind::I64(i64::from(k)), &mut binds);
            sql.push_str(&format!(" AND kind = {n}"));
        }
        if f.overdue_only {
            let n = param(Bind::I64(now), &mut binds);
            sql.push_str(&format!(
                " AND due_at < {n} AND state IN ({}, {}, {}, {})",
                RequestState::Received as i32,
                RequestState::Dispatched as i32,
                RequestState::InProgress as i32,
                RequestState::Failed as i32
            ));
        }
        if let Some((at, id)) = &f.before {
            let a = param(Bind::I64(*at), &mut binds);
            let a2 = param(Bind::I64(*at), &mut binds);
            let i = param(Bind::Text(id.clone()), &mut binds);
            sql.push_str(&format!(
                " AND (received_at < {a} OR (received_at = {a2} AND id < {i}))"
            ));
        }
        let n = param(Bind::I64(f.limit), &mut binds);
        sql.push_str(&format!(" ORDER BY received_at DESC, id DESC LIMIT {n}"));
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = match b {
                Bind::I64(v) => q.bind(v),
                Bind::Text(v) => q.bind(v),
            };
        }
        let rows = q.fetch_all(&self.db.pool).await?;
        rows.iter()
            .map(RequestRow::from_row)
            .collect::<sqlx::Result<_>>()
            .map_err(Into::into)
    }

    /// Every event of a request, oldest first.
    pub async fn events(&self, id: &str) -> Result<Vec<EventRow>> {
        let rows = sqlx::query(
            "SELECT id, type, occurred_at, request_state, processor, subprocessor, task_state, \
             sequence, attempt, message, trace_id, span_id FROM events WHERE request_id = $1 \
             ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    id: r.try_get("id")?,
                    event_type: r.try_get::<i64, _>("type")? as i32,
                    occurred_at: r.try_get("occurred_at")?,
                    request_state: r.try_get::<i64, _>("request_state")? as i32,
                    processor: r.try_get("processor")?,
                    subprocessor: r.try_get("subprocessor")?,
                    task_state: r.try_get::<i64, _>("task_state")? as i32,
                    sequence: r.try_get("sequence")?,
                    attempt: r.try_get("attempt")?,
                    message: r.try_get("message")?,
                    trace_id: r.try_get("trace_id")?,
                    span_id: r.try_get("span_id")?,
                })
            })
            .collect()
    }

    /// Up to `limit` audit trail entries after `after_seq`, oldest first.
    pub async fn audit_entries(&self, after_seq: u64, limit: i64) -> Result<Vec<audit::Entry>> {
        let rows = sqlx::query(
            "SELECT seq, occurred_at, request_id, event_type, actor, detail, prev_hash, hash \
             FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(audit::Entry {
                    seq: r.try_get::<i64, _>("seq")?.max(0) as u64,
                    occurred_at: r.try_get("occurred_at")?,
                    request_id: r.try_get("request_id")?,
                    event_type: r.try_get::<i64, _>("event_type")? as i32,
                    actor: r.try_get("actor")?,
                    detail: r.try_get("detail")?,
                    prev_hash: r.try_get("prev_hash")?,
                    hash: r.try_get("hash")?,
                })
            })
            .collect()
    }

    /// Reserves up to `limit` due outbox rows for `lease_ms`, so that concurrent dispatchers
    /// (in this process or in other replicas) never send the same row at once.
    pub async fn claim_deliveries(
        &self,
        now: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<DeliveryJob>> {
        let lock = match self.db.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE OF d SKIP LOCKED",
        };
        let mut tx = self.db.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT d.request_id, d.processor, d.op, d.attempts, r.body, r.received_at, \
             r.due_at, r.trace_id, r.cancel_reason, r.traceparent FROM deliveries d \
             JOIN requests r ON r.id = d.request_id \
             WHERE d.done_at IS NULL AND d.next_attempt_at <= $1 AND d.lease_until <= $1 \
             ORDER BY d.next_attempt_at LIMIT $2{lock}"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for r in &rows {
            let job = DeliveryJob {
                request_id: r.try_get("request_id")?,
                processor: r.try_get("processor")?,
                op: r.try_get("op")?,
                attempts: r.try_get("attempts")?,
                body: r.try_get("body")?,
                received_at: r.try_get("received_at")?,
                due_at: r.try_get("due_at")?,
                trace_id: r.try_get("trace_id")?,
                cancel_reason: r.try_get("cancel_reason")?,
                traceparent: r.try_get("traceparent")?,
            };
            sqlx::query(
                "UPDATE deliveries SET lease_until = $1 \
                 WHERE request_id = $2 AND processor = $3 AND op = $4",
            )
            .bind(now + lease_ms)
            .bind(&job.request_id)
            .bind(&job.processor)
            .bind(&job.op)
            .execute(&mut *tx)
            .await?;
            jobs.push(job);
        }
        tx.commit().await?;
        Ok(jobs)
    }

    /// Records that a processor durably accepted a delivery (or cancellation), with the tasks
    /// it reported, and refolds the request.
    pub async fn delivery_succeeded(
        &self,
        job: &DeliveryJob,
        tasks: &[TaskStatus],
        now: i64,
    ) -> Result<()> {
        let mut tx = self.db.pool.begin().await?;
        lock_audit(&mut tx).await?;
        let updated = sqlx::query(
            "UPDATE deliveries SET done_at = $1, attempts = attempts + 1, lease_until = 0, \
             last_error = NULL WHERE request_id = $2 AND processor = $3 AND op = $4 \
             AND done_at IS NULL",
        )
        .bind(now)
        .bind(&job.request_id)
        .bind(&job.processor)
        .bind(&job.op)
        .execute(&mut *tx)
        .await?;
        for t in tasks {
            upsert_task(
                &mut tx,
                &job.request_id,
                &job.processor,
                &TaskUpdate::from(t),
                now,
            )
            .await?;
        }
        if updated.rows_affected() > 0 {
            let state = current_state(&mut tx, &job.request_id).await?;
            let message = if job.op == OP_DELIVER {
                format!("accepted by {} with {} task(s)", job.processor, tasks.len())
            } else {
                format!("cancellation accepted by {}", job.processor)
            };
            insert_event(
                &mut tx,
                &job.request_id,
                EventType::Delivered,
                now,
                state,
                EventDetail {
                    processor: job.processor.clone(),
                    attempt: job.attempts + 1,
                    message,
                    ..Default::default()
                },
            )
            .await?;
        }
        refold(&mut tx, &job.request_id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a failed attempt and when to try again.
    pub async fn delivery_failed(
        &self,
        job: &DeliveryJob,
        error: &str,
        next_attempt_at: i64,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.db.pool.begin().await?;
        lock_audit(&mut tx).await?;
        sqlx::query(
            "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = $1, \
             lease_until = 0, last_error = $2 WHERE request_id = $3 AND processor = $4 \
             AND op = $5 AND done_at IS NULL",
        )
        .bind(next_attempt_at)
        .bind(error)
        .bind(&job.request_id)
        .bind(&job.processor)
        .bind(&job.op)
        .execute(&mut *tx)
        .await?;
        let state = current_state(&mut tx, &job.request_id).await?;
        insert_event(
            &mut tx,
            &job.request_id,
            EventType::DeliveryFailed,
            now,
            state,
            EventDetail {
                processor: job.processor.clone(),
                attempt: job.attempts + 1,
                message: format!("{} to {} failed: {error}", job.op, job.processor),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies acknowledgements from `processor` in one transaction. Returns (applied,
    /// duplicates), or `Err(Some(request_id))` when an acknowledgement concerns a request
    /// that was never routed to this processor (nothing is applied then).
    pub async fn apply_acks(
        &self,
        processor: &str,
        acks: &[TaskUpdate],
        now: i64,
    ) -> Result<std::result::Result<(u32, u32), String>> {
        let mut tx = self.db.pool.begin().await?;
        lock_audit(&mut tx).await?;
        let mut applied = 0;
        let mut duplicates = 0;
        let mut touched = BTreeSet::new();
        // Acknowledgements come in batches, several per request: check each request's routing
        // once.
        let mut routed_ok = BTreeSet::new();
        for ack in acks {
            if routed_ok.contains(&ack.request_id) {
                // Routed: checked for an earlier acknowledgement of this batch.
            } else if sqlx::query(
                "SELECT 1 AS one FROM deliveries WHERE request_id = $1 AND processor = $2 \
                 AND op = $3",
            )
            .bind(&ack.request_id)
            .bind(processor)
            .bind(OP_DELIVER)
            .fetch_optional(&mut *tx)
            .await?
            .is_some()
            {
                routed_ok.insert(ack.request_id.clone());
            } else {
                tx.rollback().await?;
                return Ok(Err(ack.request_id.clone()));
            }
            let new = sqlx::query(
                "INSERT INTO acknowledgements (request_id, processor, subprocessor, sequence, \
                 state, received_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            )
            .bind(&ack.request_id)
            .bind(processor)
            .bind(&ack.subprocessor)
            .bind(ack.sequence)
            .bind(i64::from(ack.state))
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if new == 0 {
                duplicates += 1;
                continue;
            }
            applied += 1;
            if upsert_task(&mut tx, &ack.request_id, processor, ack, now).await? {
                let state = current_state(&mut tx, &ack.request_id).await?;
                insert_event(
                    &mut tx,
                    &ack.request_id,
                    EventType::TaskUpdated,
                    now,
                    state,
                    EventDetail {
                        actor: String::new(),
                        processor: processor.to_string(),
                        subprocessor: ack.subprocessor.clone(),
                        task_state: ack.state,
                        sequence: ack.sequence,
                        attempt: ack.attempt,
                        message: ack.describe(),
                    },
                )
                .await?;
            }
            touched.insert(ack.request_id.clone());
        }
        for id in &touched {
            refold(&mut tx, id, now).await?;
            sqlx::query("UPDATE requests SET checked_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Ok((applied, duplicates)))
    }

    /// Folds a processor's reported task list (from reconciliation) like acknowledgements
    /// whose sequence numbers are newer than ours.
    pub async fn reconcile(
        &self,
        request_id: &str,
        processor: &str,
        tasks: &[TaskStatus],
        now: i64,
    ) -> Result<usize> {
        let mut tx = self.db.pool.begin().await?;
        lock_audit(&mut tx).await?;
        let mut changed = 0;
        for t in tasks {
            let mut update = TaskUpdate::from(t);
            update.request_id = request_id.to_string();
            if upsert_task(&mut tx, request_id, processor, &update, now).await? {
                changed += 1;
                let state = current_state(&mut tx, request_id).await?;
                insert_event(
                    &mut tx,
                    request_id,
                    EventType::TaskUpdated,
                    now,
                    state,
                    EventDetail {
                        actor: String::new(),
                        processor: processor.to_string(),
                        subprocessor: update.subprocessor.clone(),
                        task_state: update.state,
                        sequence: update.sequence,
                        attempt: 0,
                        message: format!("{} (reconciled)", update.describe()),
                    },
                )
                .await?;
            }
        }
        refold(&mut tx, request_id, now).await?;
        sqlx::query("UPDATE requests SET checked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(request_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// Open requests with no acknowledgement since `cutoff`, with the processors that accepted
    /// them: candidates for a status check.
    pub async fn quiet_requests(&self, cutoff: i64, limit: i64) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT r.id, d.processor FROM requests r JOIN deliveries d \
             ON d.request_id = r.id AND d.op = $1 AND d.done_at IS NOT NULL \
             WHERE r.state IN ($2, $3, $4) AND r.checked_at < $5 \
             ORDER BY r.checked_at LIMIT $6",
        )
        .bind(OP_DELIVER)
        .bind(RequestState::Dispatched as i64)
        .bind(RequestState::InProgress as i64)
        .bind(RequestState::PartiallyCompleted as i64)
        .bind(cutoff)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("processor")?)))
            .collect()
    }

    /// Cancels a request: no further deliveries, and a cancellation queued for every
    /// processor. Returns the state it was in, or `None` if it does not exist.
    pub async fn cancel(&self, id: &str, reason: &str, now: i64) -> Result<CancelOutcome> {
        let mut tx = self.db.pool.begin().await?;
        lock_audit(&mut tx).await?;
        let Some(state) = state_of(&mut tx, id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if !matches!(
            state,
            RequestState::Received
                | RequestState::Dispatched
                | RequestState::InProgress
                | RequestState::Failed
        ) {
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
        .execute(&mut *tx)
        .await?;
        // Undelivered requests are not sent any more; every processor (even one whose
        // delivery may be in flight right now) is told to cancel, and keeps a tombstone.
        sqlx::query(
            "UPDATE deliveries SET done_at = $1, last_error = 'cancelled before delivery' \
             WHERE request_id = $2 AND op = $3 AND done_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .bind(OP_DELIVER)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO deliveries (request_id, processor, op, next_attempt_at) \
             SELECT request_id, processor, $1, $2 FROM deliveries WHERE request_id = $3 \
             AND op = $4 ON CONFLICT DO NOTHING",
        )
        .bind(OP_CANCEL)
        .bind(now)
        .bind(id)
        .bind(OP_DELIVER)
        .execute(&mut *tx)
        .await?;
        insert_event(
            &mut tx,
            id,
            EventType::Cancelled,
            now,
            RequestState::Cancelled as i32,
            EventDetail {
                message: format!("cancelled: {reason}"),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled)
    }

    /// Extends the due date by `months`, keeping the reason.
    pub async fn extend(
        &self,
        row: &RequestRow,
        months: u32,
        reason: &str,
        now: i64,
    ) -> Result<()> {
        let total = row.extension_months as u32 + months;
        let mut reasons: Vec<String> =
            serde_json::from_str(&row.extension_reasons).unwrap_or_default();
        reasons.push(reason.to_string());
        let due = crate::deadline::due_at(row.received_at, total);
        let mut tx = self.db.pool.begin().await?;
        lock_audit(&mut tx).await?;
        sqlx::query(
            "UPDATE requests SET extension_months = $1, extension_reasons = $2, due_at = $3, \
             updated_at = $4 WHERE id = $5 AND extension_months = $6",
        )
        .bind(i64::from(total))
        .bind(serde_json::to_string(&reasons).context("encoding reasons")?)
        .bind(due)
        .bind(now)
        .bind(&row.id)
        .bind(row.extension_months)
        .execute(&mut *tx)
        .await?;
        insert_event(
            &mut tx,
            &row.id,
            EventType::DeadlineExtended,
            now,
            row.state,
            EventDetail {
                message: format!("due date extended by {months} month(s): {reason}"),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// A processor's last reported subprocessor list.
#[derive(Debug, Clone, Default)]
pub struct ChainRow {
    /// The encoded SubprocessorList, if it ever answered.
    pub subprocessors: Option<Vec<u8>>,
    /// When it last answered (ms).
    pub reported_at: Option<i64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl Store {
    /// Records a processor's answer to ListSubprocessors (or why asking failed, keeping the
    /// last good answer).
    pub async fn record_chain(
        &self,
        processor: &str,
        result: std::result::Result<Vec<u8>, String>,
        now: i64,
    ) -> Result<()> {
        match result {
            Ok(list) => {
                sqlx::query(
                    "INSERT INTO processor_chain (processor, subprocessors, reported_at, \
                     last_error, checked_at) VALUES ($1, $2, $3, NULL, $3) \
                     ON CONFLICT (processor) DO UPDATE SET subprocessors = excluded.subprocessors, \
                     reported_at = excluded.reported_at, last_error = NULL, \
                     checked_at = excluded.checked_at",
                )
                .bind(processor)
                .bind(list)
                .bind(now)
                .execute(&self.db.pool)
                .await?;
            }
            Err(error) => {
                sqlx::query(
                    "INSERT INTO processor_chain (processor, last_error, checked_at) \
                     VALUES ($1, $2, $3) ON CONFLICT (processor) DO UPDATE SET \
                     last_error = excluded.last_error, checked_at = excluded.checked_at",
                )
                .bind(processor)
                .bind(error)
                .bind(now)
                .execute(&self.db.pool)
                .await?;
            }
        }
        Ok(())
    }

    /// The last reported chain entry of a processor.
    pub async fn chain(&self, processor: &str) -> Result<ChainRow> {
        let row = sqlx::query(
            "SELECT subprocessors, reported_at, last_error FROM processor_chain \
             WHERE processor = $1",
        )
        .bind(processor)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(match row {
            Some(r) => ChainRow {
                subprocessors: r.try_get("subprocessors")?,
                reported_at: r.try_get("reported_at")?,
                last_error: r.try_get("last_error")?,
            },
            None => ChainRow::default(),
        })
    }
}

/// What [`Store::cancel`] found.
#[derive(Debug)]
pub enum CancelOutcome {
    /// Cancelled now.
    Cancelled,
    /// No such request.
    NotFound,
    /// Its state does not allow cancelling.
    NotCancellable(RequestState),
}

/// A task state change, from an acknowledgement or a status report.
#[derive(Debug, Clone, Default)]
pub struct TaskUpdate {
    /// Request id.
    pub request_id: String,
    /// Subprocessor.
    pub subprocessor: String,
    /// Sequence number.
    pub sequence: i64,
    /// New state.
    pub state: i32,
    /// Records affected.
    pub records_affected: i64,
    /// Whether the holder confirmed.
    pub confirmed: bool,
    /// Evidence note.
    pub note: String,
    /// Reason for REFUSED / FAILED.
    pub reason: String,
    /// Legal basis for RETAINED.
    pub legal_basis: String,
    /// Retain-until for RETAINED (ms).
    pub retain_until: Option<i64>,
    /// Connector attempt.
    pub attempt: i64,
    /// W3C traceparent of the processor's task step, when it traces.
    pub traceparent: String,
}

impl TaskUpdate {
    fn describe(&self) -> String {
        let state = TaskState::try_from(self.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("TASK_STATE_")
                    .to_string()
            })
            .unwrap_or_else(|_| self.state.to_string());
        let mut s = format!("{} #{}: {state}", self.subprocessor, self.sequence);
        if self.records_affected > 0 {
            s.push_str(&format!(", {} record(s)", self.records_affected));
        }
        if !self.reason.is_empty() {
            s.push_str(&format!(", {}", self.reason));
        }
        if !self.legal_basis.is_empty() {
            s.push_str(&format!(", retained under {}", self.legal_basis));
        }
        s
    }
}

impl From<&Acknowledgement> for TaskUpdate {
    fn from(a: &Acknowledgement) -> Self {
        let ev = a.evidence.clone().unwrap_or_default();
        Self {
            request_id: a.request_id.clone(),
            subprocessor: a.subprocessor.clone(),
            sequence: a.sequence.min(i64::MAX as u64) as i64,
            state: a.state,
            records_affected: ev.records_affected,
            confirmed: ev.confirmed,
            note: ev.note,
            reason: a.reason.clone(),
            legal_basis: a.legal_basis.clone(),
            retain_until: a
                .retain_until
                .as_ref()
                .map(dsrelay_proto::millis_from_timestamp),
            attempt: i64::from(a.attempt),
            traceparent: a.traceparent.clone(),
        }
    }
}

impl From<&TaskStatus> for TaskUpdate {
    fn from(t: &TaskStatus) -> Self {
        let ev = t.evidence.clone().unwrap_or_default();
        Self {
            request_id: String::new(),
            subprocessor: t.subprocessor.clone(),
            sequence: t.sequence.min(i64::MAX as u64) as i64,
            state: t.state,
            records_affected: ev.records_affected,
            confirmed: ev.confirmed,
            note: ev.note,
            reason: t.reason.clone(),
            legal_basis: t.legal_basis.clone(),
            retain_until: t
                .retain_until
                .as_ref()
                .map(dsrelay_proto::millis_from_timestamp),
            attempt: 0,
            traceparent: String::new(),
        }
    }
}

/// Stores one request with its outbox rows and first event in `tx`, or finds the request
/// its idempotency key names. `None` when the insert lost a race on the key (the caller
/// looks again in a new transaction).
async fn insert_one(
    tx: &mut Transaction<'static, Any>,
    r: &NewRequest,
) -> Result<Option<Inserted>> {
    let existing = sqlx::query(
        "SELECT id, body_hash FROM requests WHERE partner = $1 AND idempotency_key = $2",
    )
    .bind(&r.partner)
    .bind(&r.idempotency_key)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(row) = existing {
        let id: String = row.try_get("id")?;
        let hash: String = row.try_get("body_hash")?;
        return Ok(Some(if hash == r.body_hash {
            Inserted::Existing(id)
        } else {
            Inserted::Conflict(id)
        }));
    }
    let state = if r.processors.is_empty() {
        RequestState::Completed
    } else {
        RequestState::Received
    } as i64;
    let inserted = sqlx::query(
        "INSERT INTO requests (id, partner, idempotency_key, body_hash, body, \
         identity_hashes, kind, state, received_at, due_at, trace_id, updated_at, \
         checked_at, finished_at, traceparent) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $9, $9, $12, $13)",
    )
    .bind(&r.id)
    .bind(&r.partner)
    .bind(&r.idempotency_key)
    .bind(&r.body_hash)
    .bind(r.body.clone())
    .bind(&r.identity_hashes)
    .bind(i64::from(r.kind))
    .bind(state)
    .bind(r.received_at)
    .bind(r.due_at)
    .bind(&r.trace_id)
    .bind(r.processors.is_empty().then_some(r.received_at))
    .bind(r.traceparent.clone())
    .execute(&mut **tx)
    .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    for p in &r.processors {
        sqlx::query(
            "INSERT INTO deliveries (request_id, processor, op, next_attempt_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&r.id)
        .bind(p)
        .bind(OP_DELIVER)
        .bind(r.received_at)
        .execute(&mut **tx)
        .await?;
    }
    let message = if r.processors.is_empty() {
        "accepted; no processor holds data in its scope".to_string()
    } else {
        format!("accepted; routed to {}", r.processors.join(", "))
    };
    insert_event(
        tx,
        &r.id,
        EventType::Submitted,
        r.received_at,
        state as i32,
        EventDetail {
            actor: r.partner.clone(),
            message,
            ..Default::default()
        },
    )
    .await?;
    Ok(Some(Inserted::New))
}

/// Inserts the task or moves it forward; returns whether anything changed. A report older
/// than what we have never moves a task back.
async fn upsert_task(
    tx: &mut Transaction<'static, Any>,
    request_id: &str,
    processor: &str,
    t: &TaskUpdate,
    now: i64,
) -> Result<bool> {
    let n = sqlx::query(
        "INSERT INTO tasks (request_id, processor, subprocessor, state, sequence, \
         records_affected, confirmed, note, reason, legal_basis, retain_until, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (request_id, processor, subprocessor) DO UPDATE SET \
         state = excluded.state, sequence = excluded.sequence, \
         records_affected = excluded.records_affected, confirmed = excluded.confirmed, \
         note = excluded.note, reason = excluded.reason, legal_basis = excluded.legal_basis, \
         retain_until = excluded.retain_until, updated_at = excluded.updated_at \
         WHERE tasks.sequence < excluded.sequence",
    )
    .bind(request_id)
    .bind(processor)
    .bind(&t.subprocessor)
    .bind(i64::from(t.state))
    .bind(t.sequence)
    .bind(t.records_affected)
    .bind(i64::from(t.confirmed))
    .bind(&t.note)
    .bind(&t.reason)
    .bind(&t.legal_basis)
    .bind(t.retain_until)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n > 0)
}

async fn state_of(tx: &mut Transaction<'static, Any>, id: &str) -> Result<Option<RequestState>> {
    let row = sqlx::query("SELECT state FROM requests WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match row {
        Some(r) => Some(
            RequestState::try_from(r.try_get::<i64, _>("state")? as i32)
                .unwrap_or(RequestState::Unspecified),
        ),
        None => None,
    })
}

async fn current_state(tx: &mut Transaction<'static, Any>, id: &str) -> Result<i32> {
    Ok(state_of(tx, id).await?.unwrap_or(RequestState::Unspecified) as i32)
}

/// Recomputes a request's state from its deliveries and tasks; records a change.
async fn refold(tx: &mut Transaction<'static, Any>, id: &str, now: i64) -> Result<()> {
    // Two processors' acknowledgements for one request may be applied by concurrent
    // transactions; each must fold with the other's tasks in view, so the request row is
    // locked first (PostgreSQL; SQLite has one writer).
    if tx.backend_name() == "PostgreSQL" {
        sqlx::query("SELECT id FROM requests WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    }
    let Some(old) = state_of(tx, id).await? else {
        return Ok(());
    };
    let delivered: Vec<bool> =
        sqlx::query("SELECT done_at, last_error FROM deliveries WHERE request_id = $1 AND op = $2")
            .bind(id)
            .bind(OP_DELIVER)
            .fetch_all(&mut **tx)
            .await?
            .iter()
            .map(|r| r.try_get::<Option<i64>, _>("done_at").map(|d| d.is_some()))
            .collect::<sqlx::Result<_>>()?;
    let tasks: Vec<TaskState> = sqlx::query("SELECT state FROM tasks WHERE request_id = $1")
        .bind(id)
        .fetch_all(&mut **tx)
        .await?
        .iter()
        .map(|r| {
            r.try_get::<i64, _>("state")
                .map(|s| TaskState::try_from(s as i32).unwrap_or(TaskState::Unspecified))
        })
        .collect::<sqlx::Result<_>>()?;
    let new = fold(old == RequestState::Cancelled, &delivered, &tasks);
    if new == old {
        return Ok(());
    }
    let finished = request_is_terminal(new).then_some(now);
    sqlx::query(
        "UPDATE requests SET state = $1, updated_at = $2, finished_at = COALESCE($3, finished_at) \
         WHERE id = $4",
    )
    .bind(new as i64)
    .bind(now)
    .bind(finished)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    insert_event(
        tx,
        id,
        EventType::StateChanged,
        now,
        new as i32,
        EventDetail {
            message: format!(
                "{} -> {}",
                old.as_str_name().trim_start_matches("REQUEST_STATE_"),
                new.as_str_name().trim_start_matches("REQUEST_STATE_")
            ),
            ..Default::default()
        },
    )
    .await?;
    Ok(())
}

#[derive(Default)]
struct EventDetail {
    /// Who acted, for the audit trail, when not `processor` (the submitting partner).
    actor: String,
    processor: String,
    subprocessor: String,
    task_state: i32,
    sequence: i64,
    attempt: i64,
    message: String,
}

async fn insert_event(
    tx: &mut Transaction<'static, Any>,
    request_id: &str,
    event_type: EventType,
    at: i64,
    request_state: i32,
    d: EventDetail,
) -> Result<()> {
    let actor = if d.actor.is_empty() {
        d.processor.clone()
    } else {
        d.actor
    };
    append_audit(tx, request_id, event_type, at, actor, d.message.clone()).await?;
    // The span the event happened in; without a tracer, the request's own trace id.
    let traced = trace_context::traceparent_of(&tracing::Span::current());
    let mut parts = traced.as_deref().unwrap_or("").split('-').skip(1);
    let (trace_id, span_id) = (
        parts.next().map(str::to_string),
        parts.next().map(str::to_string),
    );
    sqlx::query(
        "INSERT INTO events (request_id, type, occurred_at, request_state, processor, \
         subprocessor, task_state, sequence, attempt, message, trace_id, span_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
         COALESCE($11, (SELECT trace_id FROM requests WHERE id = $1)), $12)",
    )
    .bind(request_id)
    .bind(event_type as i64)
    .bind(at)
    .bind(i64::from(request_state))
    .bind(d.processor)
    .bind(d.subprocessor)
    .bind(i64::from(d.task_state))
    .bind(d.sequence)
    .bind(d.attempt)
    .bind(d.message)
    .bind(trace_id)
    .bind(span_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Key of the PostgreSQL advisory lock that serializes audit appenders ("dsrelay" + 1).
const AUDIT_LOCK_KEY: i64 = 0x6473_7265_6c61_7901;

/// On PostgreSQL, takes the audit trail's append lock until the transaction ends (again if
/// already held: it is re-entrant). Every transaction that records events takes it first,
/// before any row lock, so that they all lock in the same order and never deadlock; as a
/// result they commit one at a time. SQLite has one writer anyway.
async fn lock_audit(tx: &mut Transaction<'static, Any>) -> Result<()> {
    if tx.backend_name() == "PostgreSQL" {
        sqlx::query("SELECT pg_advisory_xact_lock($1)::text AS locked")
            .bind(AUDIT_LOCK_KEY)
            .fetch_one(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Appends one entry to the audit trail: the last entry's seq + 1, chained to its hash.
async fn append_audit(
    tx: &mut Transaction<'static, Any>,
    request_id: &str,
    event_type: EventType,
    at: i64,
    actor: String,
    detail: String,
) -> Result<()> {
    lock_audit(tx).await?;
    let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut **tx)
        .await?;
    let (seq, prev_hash) = match last {
        Some(r) => (r.try_get::<i64, _>("seq")? + 1, r.try_get("hash")?),
        None => (1, audit::GENESIS_HASH.to_string()),
    };
    let mut entry = audit::Entry {
        seq: u64::try_from(seq).context("audit seq")?,
        occurred_at: at,
        request_id: request_id.to_string(),
        event_type: event_type as i32,
        actor,
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
