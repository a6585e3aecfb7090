//! The processor's durable state: requests, tasks and the acknowledgement outbox. A task's
//! state change and the acknowledgement reporting it are written in one transaction.

use anyhow::Result;
use dsrelay_proto::v1::{Acknowledgement, DeliverRequest, Evidence, TaskState, TaskStatus};
use dsrelay_proto::{prost::Message, timestamp_from_millis};
use dsrelay_runtime::store::{Backend, Db};
use dsrelay_runtime::trace_context;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

/// The migrations for each backend, embedded at build time.
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
/// See [`SQLITE_MIGRATIONS`].
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Identifies one task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKey {
    /// The controller that delivered the request.
    pub controller: String,
    /// The registry's request id.
    pub request_id: String,
    /// The subprocessor.
    pub subprocessor: String,
}

/// A task as stored.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Which task.
    pub key: TaskKey,
    /// Current state.
    pub state: TaskState,
    /// Sequence of the last acknowledgement queued.
    pub sequence: i64,
    /// Connector attempts so far.
    pub attempts: i64,
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
    /// Retain-until (ms).
    pub retain_until: Option<i64>,
    /// Last change (ms).
    pub updated_at: i64,
    /// The holder's reference for work it accepted but has not confirmed.
    pub handle: Option<String>,
}

impl TaskRow {
    fn from_row(r: &AnyRow) -> sqlx::Result<Self> {
        Ok(Self {
            key: TaskKey {
                controller: r.try_get("controller")?,
                request_id: r.try_get("request_id")?,
                subprocessor: r.try_get("subprocessor")?,
            },
            state: TaskState::try_from(r.try_get::<i64, _>("state")? as i32)
                .unwrap_or(TaskState::Unspecified),
            sequence: r.try_get("sequence")?,
            attempts: r.try_get("attempts")?,
            records_affected: r.try_get("records_affected")?,
            confirmed: r.try_get::<i64, _>("confirmed")? != 0,
            note: r.try_get("note")?,
            reason: r.try_get("reason")?,
            legal_basis: r.try_get("legal_basis")?,
            retain_until: r.try_get("retain_until")?,
            updated_at: r.try_get("updated_at")?,
            handle: r.try_get("handle")?,
        })
    }

    /// The wire view (processor left for the registry to fill in).
    pub fn to_status(&self) -> TaskStatus {
        TaskStatus {
            processor: String::new(),
            subprocessor: self.key.subprocessor.clone(),
            state: self.state as i32,
            sequence: self.sequence.max(0) as u64,
            evidence: Some(Evidence {
                records_affected: self.records_affected,
                note: self.note.clone(),
                confirmed: self.confirmed,
            }),
            reason: self.reason.clone(),
            legal_basis: self.legal_basis.clone(),
            retain_until: self.retain_until.map(timestamp_from_millis),
            updated_at: Some(timestamp_from_millis(self.updated_at)),
        }
    }
}

const TASK_COLUMNS: &str = "controller, request_id, subprocessor, state, sequence, attempts, \
    records_affected, confirmed, note, reason, legal_basis, retain_until, updated_at, handle";

/// A claimed task with its request.
#[derive(Debug, Clone)]
pub struct TaskJob {
    /// The task.
    pub task: TaskRow,
    /// The request as delivered; `None` for a tombstone.
    pub request: Option<DeliverRequest>,
    /// The request's due date (ms).
    pub due_at: i64,
    /// W3C traceparent of the Deliver call that brought the request.
    pub traceparent: Option<String>,
}

/// Tasks joined with their requests, as the operator API shows them.
const MANUAL_SELECT: &str = "SELECT t.controller, t.request_id, t.subprocessor, t.state, \
    t.sequence, t.attempts, t.records_affected, t.confirmed, t.note, t.reason, t.legal_basis, \
    t.retain_until, t.updated_at, t.handle, r.body, r.due_at FROM tasks t JOIN requests r \
    ON r.controller = t.controller AND r.request_id = t.request_id";

/// A task waiting for an operator, with its request.
#[derive(Debug, Clone)]
pub struct ManualRow {
    /// The task.
    pub task: TaskRow,
    /// The request as delivered.
    pub request: Option<DeliverRequest>,
    /// The request's due date (ms).
    pub due_at: i64,
}

/// A claimed acknowledgement.
#[derive(Debug, Clone)]
pub struct AckJob {
    /// Outbox row id.
    pub id: i64,
    /// The controller to send it to.
    pub controller: String,
    /// Attempts so far.
    pub attempts: i64,
    /// The acknowledgement.
    pub ack: Acknowledgement,
}

/// The new state of a task and what goes with it.
#[derive(Debug, Clone, Default)]
pub struct Transition {
    /// New state.
    pub state: i32,
    /// Records affected.
    pub records_affected: i64,
    /// Whether the holder confirmed.
    pub confirmed: bool,
    /// Evidence note.
    pub note: String,
    /// Reason.
    pub reason: String,
    /// Legal basis for RETAINED.
    pub legal_basis: String,
    /// Retain-until (ms).
    pub retain_until: Option<i64>,
    /// When the runner should look at the task again (ms); `None` means now.
    pub next_attempt_at: Option<i64>,
    /// The holder's reference for accepted, unconfirmed work.
    pub handle: Option<String>,
    /// The subject's data as JSON, for export kinds.
    pub export_json: Option<String>,
    /// W3C traceparent of the step that made the change, carried in its acknowledgement.
    pub traceparent: Option<String>,
    /// Keep the task reserved until then (ms): for a step after which the same runner goes
    /// on working on the task. `None` releases it.
    pub hold_until: Option<i64>,
}

/// Never: for tasks only an operator moves on.
pub const NEVER: i64 = i64::MAX;

/// What Deliver found.
#[derive(Debug)]
pub enum Accepted {
    /// Stored now, with these tasks.
    New(Vec<TaskRow>),
    /// Delivered before; the tasks as they stand.
    Duplicate(Vec<TaskRow>),
}

/// The processor store.
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

    /// Stores a delivered request and one PENDING task per subprocessor, or reports the
    /// existing ones when it was delivered (or cancelled) before.
    pub async fn accept(
        &self,
        controller: &str,
        req: &DeliverRequest,
        subprocessors: &[String],
        traceparent: Option<&str>,
        now: i64,
    ) -> Result<Accepted> {
        let mut tx = self.db.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO requests (controller, request_id, kind, body, received_at, due_at, \
             accepted_at, traceparent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT DO NOTHING",
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
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(Accepted::Duplicate(
                self.tasks(controller, &req.request_id).await?,
            ));
        }
        for s in subprocessors {
            sqlx::query(
                "INSERT INTO tasks (controller, request_id, subprocessor, state, sequence, \
                 next_attempt_at, updated_at) VALUES ($1, $2, $3, $4, 1, $5, $5)",
            )
            .bind(controller)
            .bind(&req.request_id)
            .bind(s)
            .bind(TaskState::Pending as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Accepted::New(
            self.tasks(controller, &req.request_id).await?,
        ))
    }

    /// Whether the controller delivered (or cancelled) this request.
    pub async fn request_exists(&self, controller: &str, request_id: &str) -> Result<bool> {
        Ok(
            sqlx::query("SELECT 1 AS one FROM requests WHERE controller = $1 AND request_id = $2")
                .bind(controller)
                .bind(request_id)
                .fetch_optional(&self.db.pool)
                .await?
                .is_some(),
        )
    }

    /// A request's tasks.
    pub async fn tasks(&self, controller: &str, request_id: &str) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE controller = $1 AND request_id = $2 \
             ORDER BY subprocessor"
        ))
        .bind(controller)
        .bind(request_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(TaskRow::from_row)
            .collect::<sqlx::Result<_>>()
            .map_err(Into::into)
    }

    /// Cancels a request's unfinished tasks; writes a tombstone when the request is unknown,
    /// so a delivery that arrives later creates no tasks.
    pub async fn cancel(
        &self,
        controller: &str,
        request_id: &str,
        reason: &str,
        now: i64,
    ) -> Result<Vec<TaskRow>> {
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "INSERT INTO requests (controller, request_id, kind, body, received_at, due_at, \
             accepted_at, cancelled_at, cancel_reason) VALUES ($1, $2, 0, NULL, $3, $3, $3, $3, $4) \
             ON CONFLICT (controller, request_id) DO UPDATE SET \
             cancelled_at = COALESCE(requests.cancelled_at, excluded.cancelled_at), \
             cancel_reason = COALESCE(requests.cancel_reason, excluded.cancel_reason)",
        )
        .bind(controller)
        .bind(request_id)
        .bind(now)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        let open = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE controller = $1 AND request_id = $2 \
             AND state IN ($3, $4, $5)"
        ))
        .bind(controller)
        .bind(request_id)
        .bind(TaskState::Pending as i64)
        .bind(TaskState::InProgress as i64)
        .bind(TaskState::WaitingForOperator as i64)
        .fetch_all(&mut *tx)
        .await?;
        for r in &open {
            let t = TaskRow::from_row(r)?;
            transition(
                &mut tx,
                &t.key,
                t.sequence,
                &Transition {
                    state: TaskState::Cancelled as i32,
                    reason: format!("cancelled: {reason}"),
                    ..Default::default()
                },
                now,
                t.attempts,
            )
            .await?;
        }
        tx.commit().await?;
        self.tasks(controller, request_id).await
    }

    /// Reserves runnable tasks (PENDING; IN_PROGRESS waiting for a retry or a confirmation;
    /// RETAINED whose date has come) for `lease_ms`
    /// and counts the attempt each claim starts.
    pub async fn claim_tasks(&self, now: i64, limit: i64, lease_ms: i64) -> Result<Vec<TaskJob>> {
        let lock = match self.db.backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE OF t SKIP LOCKED",
        };
        let mut tx = self.db.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT t.controller, t.request_id, t.subprocessor, t.state, t.sequence, t.attempts, \
             t.records_affected, t.confirmed, t.note, t.reason, t.legal_basis, t.retain_until, \
             t.updated_at, t.handle, r.body, r.due_at, r.traceparent FROM tasks t JOIN requests r \
             ON r.controller = t.controller AND r.request_id = t.request_id \
             WHERE t.state IN ({pending}, {in_progress}, {retained}) \
             AND t.next_attempt_at <= $1 AND t.lease_until <= $1 \
             ORDER BY t.next_attempt_at LIMIT $2{lock}",
            // Literals, not parameters: only then can the planner use the partial index
            // `tasks_runnable` (WHERE state IN (1, 2, 5)) instead of scanning every task.
            pending = TaskState::Pending as i32,
            in_progress = TaskState::InProgress as i32,
            retained = TaskState::Retained as i32,
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut task = TaskRow::from_row(r)?;
            // Claiming starts an attempt: a run cut off by a crash still counts.
            task.attempts += 1;
            let body: Option<Vec<u8>> = r.try_get("body")?;
            sqlx::query(
                "UPDATE tasks SET lease_until = $1, attempts = attempts + 1 WHERE controller = $2 \
                 AND request_id = $3 AND subprocessor = $4",
            )
            .bind(now + lease_ms)
            .bind(&task.key.controller)
            .bind(&task.key.request_id)
            .bind(&task.key.subprocessor)
            .execute(&mut *tx)
            .await?;
            jobs.push(TaskJob {
                task,
                request: body.and_then(|b| DeliverRequest::decode(b.as_slice()).ok()),
                due_at: r.try_get("due_at")?,
                traceparent: r.try_get("traceparent")?,
            });
        }
        tx.commit().await?;
        Ok(jobs)
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
        let mut tx = self.db.pool.begin().await?;
        let seq = transition(&mut tx, key, expected_sequence, t, now, attempts).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Records a transient failure: the task stays where it is and is retried at `next_at`.
    pub async fn retry_later(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        error: &str,
        next_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE tasks SET next_attempt_at = $1, lease_until = 0, \
             last_error = $2 WHERE controller = $3 AND request_id = $4 AND subprocessor = $5 \
             AND sequence = $6",
        )
        .bind(next_at)
        .bind(error)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Tasks waiting for an operator, oldest first.
    pub async fn manual_tasks(
        &self,
        subprocessor: Option<&str>,
        states: &[TaskState],
        limit: i64,
    ) -> Result<Vec<ManualRow>> {
        // Task states are our own enum values, so they are written into the SQL (and a
        // partial index can serve the query).
        let wanted: Vec<String> = if states.is_empty() {
            vec![(TaskState::WaitingForOperator as i32).to_string()]
        } else {
            states.iter().map(|s| (*s as i32).to_string()).collect()
        };
        let rows = sqlx::query(&format!(
            "{MANUAL_SELECT} WHERE t.state IN ({}) AND ($1 = '' OR t.subprocessor = $1) \
             ORDER BY t.updated_at LIMIT $2",
            wanted.join(", ")
        ))
        .bind(subprocessor.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter().map(manual_row).collect()
    }

    /// One task with its request, for the operator API.
    pub async fn manual_task(&self, key: &TaskKey) -> Result<Option<ManualRow>> {
        let row = sqlx::query(&format!(
            "{MANUAL_SELECT} WHERE t.controller = $1 AND t.request_id = $2 \
             AND t.subprocessor = $3"
        ))
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .fetch_optional(&self.db.pool)
        .await?;
        row.as_ref().map(manual_row).transpose()
    }

    /// Keeps a claimed task reserved while its connector runs longer than one lease.
    pub async fn extend_lease(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        until: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE tasks SET lease_until = $1 WHERE controller = $2 AND request_id = $3 \
             AND subprocessor = $4 AND sequence = $5 AND lease_until > 0",
        )
        .bind(until)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Looks at a task again at `next_at` without changing its state (a holder that has not
    /// confirmed yet). Nothing is acknowledged: nothing changed.
    pub async fn reschedule(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        next_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE tasks SET next_attempt_at = $1, lease_until = 0 WHERE controller = $2 \
             AND request_id = $3 AND subprocessor = $4 AND sequence = $5",
        )
        .bind(next_at)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Reserves up to `limit` queued acknowledgements for `lease_ms`, oldest first.
    pub async fn claim_acks(&self, now: i64, limit: i64, lease_ms: i64) -> Result<Vec<AckJob>> {
        let mut tx = self.db.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT id, controller, attempts, payload FROM ack_outbox WHERE sent_at IS NULL \
             AND next_attempt_at <= $1 AND lease_until <= $1 ORDER BY id LIMIT $2{}",
            self.db.skip_locked()
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.try_get("id")?;
            let payload: Vec<u8> = r.try_get("payload")?;
            sqlx::query("UPDATE ack_outbox SET lease_until = $1 WHERE id = $2")
                .bind(now + lease_ms)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            jobs.push(AckJob {
                id,
                controller: r.try_get("controller")?,
                attempts: r.try_get("attempts")?,
                ack: Acknowledgement::decode(payload.as_slice())?,
            });
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

fn manual_row(r: &AnyRow) -> Result<ManualRow> {
    let body: Option<Vec<u8>> = r.try_get("body")?;
    Ok(ManualRow {
        task: TaskRow::from_row(r)?,
        request: body.and_then(|b| DeliverRequest::decode(b.as_slice()).ok()),
        due_at: r.try_get("due_at")?,
    })
}

async fn transition(
    tx: &mut Transaction<'static, Any>,
    key: &TaskKey,
    expected_sequence: i64,
    t: &Transition,
    now: i64,
    attempts: i64,
) -> Result<Option<i64>> {
    let next = expected_sequence + 1;
    let changed = sqlx::query(
        "UPDATE tasks SET state = $1, sequence = $2, records_affected = $3, confirmed = $4, \
         note = $5, reason = $6, legal_basis = $7, retain_until = $8, updated_at = $9, \
         attempts = $10, lease_until = $18, next_attempt_at = $15, handle = $16, \
         export_json = COALESCE($17, export_json) \
         WHERE controller = $11 AND request_id = $12 AND subprocessor = $13 AND sequence = $14",
    )
    .bind(i64::from(t.state))
    .bind(next)
    .bind(t.records_affected)
    .bind(i64::from(t.confirmed))
    .bind(&t.note)
    .bind(&t.reason)
    .bind(&t.legal_basis)
    .bind(t.retain_until)
    .bind(now)
    .bind(attempts)
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .bind(expected_sequence)
    .bind(t.next_attempt_at.unwrap_or(now))
    .bind(t.handle.clone())
    .bind(t.export_json.clone())
    .bind(t.hold_until.unwrap_or(0))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Ok(None);
    }
    let ack = Acknowledgement {
        request_id: key.request_id.clone(),
        subprocessor: key.subprocessor.clone(),
        sequence: next as u64,
        state: t.state,
        evidence: Some(Evidence {
            records_affected: t.records_affected,
            note: t.note.clone(),
            confirmed: t.confirmed,
        }),
        reason: t.reason.clone(),
        legal_basis: t.legal_basis.clone(),
        retain_until: t.retain_until.map(timestamp_from_millis),
        occurred_at: Some(timestamp_from_millis(now)),
        attempt: attempts.clamp(0, i64::from(u32::MAX)) as u32,
        // The span the change happens in (a task step, a cancellation) is where the
        // registry's handling of the acknowledgement hangs in the trace.
        traceparent: t
            .traceparent
            .clone()
            .or_else(|| trace_context::traceparent_of(&tracing::Span::current()))
            .unwrap_or_default(),
    };
    sqlx::query(
        "INSERT INTO ack_outbox (controller, request_id, subprocessor, sequence, payload, \
         next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .bind(next)
    .bind(ack.encode_to_vec())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(Some(next))
}
