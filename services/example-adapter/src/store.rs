//! The adapter's durable state over SQLite or PostgreSQL: the subscribers, and one row per
//! task with the answer given, which makes Execute idempotent per `task_id`.
//!
//! Execute first claims the task id (`INSERT ... ON CONFLICT DO NOTHING`) and then does the
//! work and stores the answer, all in one transaction: a concurrent call with the same id
//! waits for the claim to commit, finds the row and replays the answer, so the work is done
//! once. Delayed erasures are finished by [`Store::finish`], which claims the ACCEPTED →
//! COMPLETED change with a conditional update before deleting anything. A completed export
//! keeps only the ids of the subscribers and kept billing records it covers, for
//! [`Store::export_page`].
//!
//! Bulk jobs (ExecuteBulk, a contract end's steps) are rows of the same table, kind
//! CONTRACT_END, with their controller and operation, claimed the same way: the set-based
//! work and the stored answer commit together. A completed bulk export keeps only its
//! controller and the arrival clock it counted at (`arrived_upto`, see migration 0007); its
//! pages read that controller's subscribers, deliveries and billing records live, up to
//! that clock, and the erasure after its return ([`Store::execute_bulk`]) finds it by key.
//!
//! An erasure (or bulk erasure) answered RETAINED keeps its date in `retain_until` and, for
//! Execute's, the billing record ids kept in `retained_ids`. A retention run is a new task
//! whose key names that date (see [`crate::retention`]); [`Store::execute`] looks up the
//! answer it follows before doing the work, in the claiming transaction.

use anyhow::{anyhow, Context};
use dsrelay_proto::millis_from_timestamp;
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{
    BulkOperation, ExecuteBulkRequest, ExecuteBulkResponse, ExecuteOutcome, ExecuteRequest,
    ExecuteResponse, RequestKind,
};
use dsrelay_runtime::store::Db;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::export::{self, is_export, Covered, Page, Position, RecordTooLarge};
use crate::newsletter::{self, Subscriber, SUBSCRIBER_COLUMNS};
use crate::retention::{BillingKind, BillingRecord, RetentionRun, BILLING_COLUMNS};

/// The migrations for each backend, embedded at build time (the second seeds subscribers).
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
/// See [`SQLITE_MIGRATIONS`].
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Why a store call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The task id names another task (other caller, request or kind).
    #[error("{0}")]
    Conflict(String),
    /// No such task (for this caller).
    #[error("{0}")]
    NotFound(String),
    /// The call does not apply to this task.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The page token is not one of this task's; the text says what is wrong with it.
    #[error("{0}")]
    InvalidToken(String),
    /// A database fault.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Unexpected(e.into())
    }
}

/// One stored task.
#[derive(Debug, Clone)]
struct TaskRow {
    task_id: String,
    caller: String,
    request_id: String,
    kind: i64,
    outcome: i64,
    response: Vec<u8>,
    confirm_at: Option<i64>,
    /// The controller the task or job was for; `None` for tasks from before controllers.
    controller: Option<String>,
    /// The BulkOperation number of a bulk job; `None` for Execute's tasks.
    operation: Option<i64>,
}

impl TaskRow {
    fn from_row(r: &AnyRow) -> sqlx::Result<Self> {
        Ok(Self {
            task_id: r.try_get("task_id")?,
            caller: r.try_get("caller")?,
            request_id: r.try_get("request_id")?,
            kind: r.try_get("kind")?,
            outcome: r.try_get("outcome")?,
            response: r.try_get("response")?,
            confirm_at: r.try_get("confirm_at")?,
            controller: r.try_get("controller")?,
            operation: r.try_get("operation")?,
        })
    }

    fn is_bulk(&self) -> bool {
        self.kind == RequestKind::ContractEnd as i64
    }

    fn decode_bulk(&self) -> Result<ExecuteBulkResponse, StoreError> {
        ExecuteBulkResponse::decode(self.response.as_slice())
            .with_context(|| format!("decoding the stored answer of bulk job {}", self.task_id))
            .map_err(StoreError::Unexpected)
    }

    fn decode(&self) -> Result<ExecuteResponse, StoreError> {
        ExecuteResponse::decode(self.response.as_slice())
            .with_context(|| format!("decoding the stored answer of task {}", self.task_id))
            .map_err(StoreError::Unexpected)
    }
}

const TASK_COLUMNS: &str =
    "task_id, caller, request_id, kind, outcome, response, confirm_at, controller, operation";

fn kind_name(kind: i64) -> &'static str {
    i32::try_from(kind)
        .ok()
        .and_then(|k| RequestKind::try_from(k).ok())
        .map(|k| k.as_str_name().trim_start_matches("REQUEST_KIND_"))
        .unwrap_or("UNKNOWN")
}

/// The subscribers and task outcomes.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

impl Store {
    /// Connects to `url`, applies the migrations (seeding the subscribers on first start).
    pub async fn open(url: &str) -> anyhow::Result<Self> {
        let db = Db::connect(url).await?;
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS).await?;
        Ok(Self { db })
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Every subscriber, by id.
    pub async fn subscribers(&self) -> anyhow::Result<Vec<Subscriber>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers ORDER BY id"
        ))
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .iter()
            .map(Subscriber::from_row)
            .collect::<sqlx::Result<_>>()?)
    }

    /// The first subscriber with `email` (compared lowercased), of any controller, if any.
    pub async fn subscriber(&self, email: &str) -> anyhow::Result<Option<Subscriber>> {
        let row = sqlx::query(&format!(
            "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE email = $1 ORDER BY id LIMIT 1"
        ))
        .bind(email.trim().to_lowercase())
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.as_ref().map(Subscriber::from_row).transpose()?)
    }

    /// The e-mail addresses of `controller`'s subscribers, in id order.
    pub async fn emails_of(&self, controller: &str) -> anyhow::Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT email FROM subscribers WHERE controller = $1 ORDER BY id")
                .bind(controller)
                .fetch_all(&self.db.pool)
                .await?,
        )
    }

    /// Subscribes `email` (lowercased) with `name` as a subscriber of `controller`; returns
    /// its id. For tests and tools: the newsletter's own sign-up is not part of the example.
    pub async fn add_subscriber(
        &self,
        controller: &str,
        email: &str,
        name: &str,
    ) -> anyhow::Result<i64> {
        let email = email.trim().to_lowercase();
        sqlx::query("INSERT INTO subscribers (controller, email, name) VALUES ($1, $2, $3)")
            .bind(controller)
            .bind(&email)
            .bind(name)
            .execute(&self.db.pool)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT id FROM subscribers WHERE controller = $1 AND email = $2")
                .bind(controller)
                .bind(&email)
                .fetch_one(&self.db.pool)
                .await?,
        )
    }

    /// Gives the subscribers stored without a controller (from before subscribers had one,
    /// and the seed) to `controller`, and the billing records stored without one (written for
    /// such a subscriber) to their subscriber's controller, or to `controller` when detached;
    /// returns how many subscribers and how many billing records, in one transaction.
    ///
    /// The rows moved, and the deliveries of the subscribers moved, get a new arrival marker
    /// (see migration 0007): to the controller they are new, and an export of it made before
    /// did not return them, so the erasure after that export's return must refuse them. The
    /// marker is taken as an insert takes it, holding the clock's lock until the commit, and
    /// before any row is touched, in the order an erasure locks.
    pub async fn assign_unowned(&self, controller: &str) -> anyhow::Result<(u64, u64)> {
        let mut tx = self.db.pool.begin().await?;
        let marker: i64 = sqlx::query_scalar(
            "UPDATE arrival_clock SET last = last + 1 WHERE id = 1 RETURNING last",
        )
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE deliveries SET arrival = $1 WHERE subscriber_id IN \
             (SELECT id FROM subscribers WHERE controller = '')",
        )
        .bind(marker)
        .execute(&mut *tx)
        .await?;
        let subscribers = sqlx::query(
            "UPDATE subscribers SET controller = $1, arrival = $2 WHERE controller = ''",
        )
        .bind(controller)
        .bind(marker)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let billing = sqlx::query(
            "UPDATE billing_records SET controller = COALESCE((SELECT s.controller FROM \
             subscribers s WHERE s.id = billing_records.subscriber_id AND s.controller <> ''), \
             $1), arrival = $2 WHERE controller = ''",
        )
        .bind(controller)
        .bind(marker)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if subscribers + billing == 0 {
            // Nothing moved: the clock keeps its value.
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok((subscribers, billing))
    }

    async fn load(&self, task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM adapter_tasks WHERE task_id = $1"
        ))
        .bind(task_id)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.as_ref().map(TaskRow::from_row).transpose()?)
    }

    /// Runs `req` for `caller` once per task id; a repeated call gets the first answer (or
    /// the task's progress since), unless that was FAILED: then it runs again.
    pub async fn execute(
        &self,
        caller: &str,
        req: &ExecuteRequest,
        now: i64,
        confirm_delay_ms: u64,
    ) -> Result<ExecuteResponse, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        // A FAILED or REFUSED answer is not repeated (adapter.proto): the call after it, an
        // operator's retry once the cause was fixed, is done again as a new one. Only the
        // same task's (a task_id reused otherwise is still refused by `replay`); a FAILED or
        // REFUSED task did nothing, so nothing else refers to its row.
        sqlx::query(
            "DELETE FROM adapter_tasks WHERE task_id = $1 AND caller = $2 AND request_id = $3 \
             AND kind = $4 AND outcome IN ($5, $7) AND (controller IS NULL OR controller = $6)",
        )
        .bind(&req.task_id)
        .bind(caller)
        .bind(&req.request_id)
        .bind(i64::from(req.kind))
        .bind(ExecuteOutcome::Failed as i64)
        .bind(&req.controller)
        .bind(ExecuteOutcome::Refused as i64)
        .execute(&mut *tx)
        .await?;
        let claimed = sqlx::query(
            "INSERT INTO adapter_tasks (task_id, caller, request_id, kind, outcome, response, \
             created_at, updated_at, controller) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (task_id) DO NOTHING",
        )
        .bind(&req.task_id)
        .bind(caller)
        .bind(&req.request_id)
        .bind(i64::from(req.kind))
        .bind(ExecuteOutcome::Unspecified as i64)
        .bind(Vec::<u8>::new())
        .bind(now)
        .bind(now)
        .bind(&req.controller)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            return self.replay(caller, req, now).await;
        }
        let followed = if req.kind == RequestKind::Erasure as i32 {
            let lineage = Lineage {
                caller,
                request_id: &req.request_id,
                kind: RequestKind::Erasure,
                controller: &req.controller,
            };
            followed(&mut tx, &req.task_id, lineage).await?
        } else {
            None
        };
        let cutoff = followed.as_ref().map_or(now, |f| now.max(f.until_ms));
        let kept = followed.as_ref().map(|f| f.kept.as_slice());
        let work = newsletter::execute(&mut tx, req, confirm_delay_ms, cutoff, kept).await?;
        let pending = work.pending.as_deref().map(join_ids);
        let exported = work.exported.as_deref().map(join_ids);
        let exported_kept = work.exported_kept.as_deref().map(join_ids);
        let confirm_at = work
            .pending
            .as_ref()
            .map(|_| now.saturating_add(i64::try_from(confirm_delay_ms).unwrap_or(i64::MAX)));
        sqlx::query(
            "UPDATE adapter_tasks SET outcome = $1, response = $2, pending_ids = $3, \
             confirm_at = $4, updated_at = $5, export_ids = $7, retained_ids = $8, \
             retain_until = $9, export_billing_ids = $10 WHERE task_id = $6",
        )
        .bind(i64::from(work.response.outcome))
        .bind(work.response.encode_to_vec())
        .bind(pending)
        .bind(confirm_at)
        .bind(now)
        .bind(&req.task_id)
        .bind(exported)
        .bind(work.retained.as_deref().map(join_ids))
        .bind(
            work.response
                .retain_until
                .as_ref()
                .map(millis_from_timestamp),
        )
        .bind(exported_kept)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(work.response)
    }

    async fn replay(
        &self,
        caller: &str,
        req: &ExecuteRequest,
        now: i64,
    ) -> Result<ExecuteResponse, StoreError> {
        let row = self.load(&req.task_id).await?.ok_or_else(|| {
            StoreError::Unexpected(anyhow!("task {} was claimed but is gone", req.task_id))
        })?;
        if row.caller != caller {
            return Err(StoreError::Conflict(format!(
                "task_id {} is already used by another caller",
                req.task_id
            )));
        }
        if row.request_id != req.request_id || row.kind != i64::from(req.kind) {
            return Err(StoreError::Conflict(format!(
                "task_id {} was used for request {} ({}); a task id names one task",
                req.task_id,
                row.request_id,
                kind_name(row.kind)
            )));
        }
        if row
            .controller
            .as_ref()
            .is_some_and(|c| *c != req.controller)
        {
            return Err(StoreError::Conflict(format!(
                "task_id {} was used for another controller; a task id names one task",
                req.task_id
            )));
        }
        // A completed export answers as before; its pages read the data live.
        self.current(row, now).await
    }

    /// The answer for a stored task now: a delayed erasure whose time has come is finished
    /// first.
    async fn current(&self, row: TaskRow, now: i64) -> Result<ExecuteResponse, StoreError> {
        if row.outcome == ExecuteOutcome::Accepted as i64
            && row.confirm_at.is_some_and(|at| at <= now)
        {
            if let Some(done) = self.finish(&row.task_id, now).await? {
                return Ok(done);
            }
            // Finished concurrently: read what was stored.
            if let Some(again) = self.load(&row.task_id).await? {
                return again.decode();
            }
        }
        row.decode()
    }

    /// GetTaskStatus: the current answer of `caller`'s task `task_id`.
    pub async fn status(
        &self,
        caller: &str,
        task_id: &str,
        now: i64,
    ) -> Result<ExecuteResponse, StoreError> {
        let row = self
            .load(task_id)
            .await?
            .filter(|r| r.caller == caller)
            .ok_or_else(|| StoreError::NotFound(format!("no task {task_id}")))?;
        if is_export(row.kind) {
            return Err(StoreError::FailedPrecondition(format!(
                "task {task_id} is an export, which completes in Execute; its data is read \
                 with GetExportPage"
            )));
        }
        if row.is_bulk() {
            return Err(StoreError::FailedPrecondition(format!(
                "{task_id} is a bulk job; ask GetBulkStatus"
            )));
        }
        self.current(row, now).await
    }

    /// Runs the bulk job `req` (validated) for `caller` once per job id; a repeated call gets
    /// the first answer, unless that was FAILED: then it runs again. The work is set-based and done in the claiming transaction, so the
    /// answer is final (never ACCEPTED). An ERASE that follows a return and would erase what
    /// was never returned (see `newsletter::count_bulk`) is refused (FailedPrecondition)
    /// with nothing done or stored.
    pub async fn execute_bulk(
        &self,
        caller: &str,
        req: &ExecuteBulkRequest,
        now: i64,
    ) -> Result<ExecuteBulkResponse, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        // As in `execute`: a FAILED job is done again. Its work is one transaction, so a
        // FAILED job did nothing and the new run's counts are the whole job's.
        sqlx::query(
            "DELETE FROM adapter_tasks WHERE task_id = $1 AND caller = $2 AND request_id = $3 \
             AND kind = $4 AND controller = $5 AND operation = $6 AND outcome = $7",
        )
        .bind(&req.job_id)
        .bind(caller)
        .bind(&req.request_id)
        .bind(RequestKind::ContractEnd as i64)
        .bind(&req.controller)
        .bind(i64::from(req.operation))
        .bind(ExecuteOutcome::Failed as i64)
        .execute(&mut *tx)
        .await?;
        let claimed = sqlx::query(
            "INSERT INTO adapter_tasks (task_id, caller, request_id, kind, outcome, response, \
             created_at, updated_at, controller, operation) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (task_id) DO NOTHING",
        )
        .bind(&req.job_id)
        .bind(caller)
        .bind(&req.request_id)
        .bind(RequestKind::ContractEnd as i64)
        .bind(ExecuteOutcome::Unspecified as i64)
        .bind(Vec::<u8>::new())
        .bind(now)
        .bind(now)
        .bind(&req.controller)
        .bind(i64::from(req.operation))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            let row = self.load(&req.job_id).await?.ok_or_else(|| {
                StoreError::Unexpected(anyhow!("job {} was claimed but is gone", req.job_id))
            })?;
            let same = row.caller == caller
                && row.is_bulk()
                && row.request_id == req.request_id
                && row.controller.as_deref() == Some(req.controller.as_str())
                && row.operation == Some(i64::from(req.operation));
            if !same {
                return Err(StoreError::Conflict(format!(
                    "job_id {} already names another task or bulk job; a job id names one job",
                    req.job_id
                )));
            }
            return row.decode_bulk();
        }
        let export_upto = export_upto(&mut tx, caller, req).await?;
        // Refused unstored: nothing was done under the job id.
        let held = match newsletter::count_bulk(&mut tx, req, export_upto).await? {
            Ok(held) => held,
            Err(refusal) => {
                tx.rollback().await?;
                return Err(StoreError::FailedPrecondition(refusal));
            }
        };
        let lineage = Lineage {
            caller,
            request_id: &req.request_id,
            kind: RequestKind::ContractEnd,
            controller: &req.controller,
        };
        let cutoff = match followed(&mut tx, &req.job_id, lineage).await? {
            Some(f) if req.operation == BulkOperation::Erase as i32 => now.max(f.until_ms),
            _ => now,
        };
        let arrived_upto = held.arrived_upto;
        let response = newsletter::bulk(&mut tx, req, held, cutoff).await?;
        sqlx::query(
            "UPDATE adapter_tasks SET outcome = $1, response = $2, updated_at = $3, \
             retain_until = $5, arrived_upto = $6 WHERE task_id = $4",
        )
        .bind(i64::from(response.outcome))
        .bind(response.encode_to_vec())
        .bind(now)
        .bind(&req.job_id)
        .bind(response.retain_until.as_ref().map(millis_from_timestamp))
        .bind(arrived_upto)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(response)
    }

    /// GetBulkStatus: the answer of `caller`'s bulk job `job_id`.
    pub async fn bulk_status(
        &self,
        caller: &str,
        job_id: &str,
    ) -> Result<ExecuteBulkResponse, StoreError> {
        self.load(job_id)
            .await?
            .filter(|r| r.caller == caller && r.is_bulk())
            .ok_or_else(|| StoreError::NotFound(format!("no bulk job {job_id}")))?
            .decode_bulk()
    }

    /// Carries out the accepted erasure `task_id` if its time has come and nobody else did:
    /// deletes the subscribers and stores COMPLETED (RETAINED when billing records released
    /// after `now` are kept). `None` when there was nothing to do.
    pub async fn finish(
        &self,
        task_id: &str,
        now: i64,
    ) -> Result<Option<ExecuteResponse>, StoreError> {
        let mut tx = self.db.pool.begin().await?;
        let claimed = sqlx::query(
            "UPDATE adapter_tasks SET outcome = $1, updated_at = $2 WHERE task_id = $3 \
             AND outcome = $4 AND confirm_at <= $5",
        )
        .bind(ExecuteOutcome::Completed as i64)
        .bind(now)
        .bind(task_id)
        .bind(ExecuteOutcome::Accepted as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if claimed == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        let row =
            sqlx::query("SELECT pending_ids, retained_ids FROM adapter_tasks WHERE task_id = $1")
                .bind(task_id)
                .fetch_one(&mut *tx)
                .await?;
        let pending: Option<String> = row.try_get("pending_ids")?;
        let ids: Vec<i64> = split_ids(&pending.unwrap_or_default())
            .with_context(|| format!("reading the pending ids of task {task_id}"))?;
        // Those an earlier erasure of the subject kept, found when this one was accepted.
        let earlier: Option<String> = row.try_get("retained_ids")?;
        let earlier: Vec<i64> = split_ids(&earlier.unwrap_or_default())
            .with_context(|| format!("reading the earlier kept ids of task {task_id}"))?;
        let mut work = newsletter::erase(&mut tx, &ids, &earlier, now).await?;
        if let Some(evidence) = work.response.evidence.as_mut() {
            evidence
                .note
                .push_str(" (accepted earlier, carried out now)");
        }
        let response = work.response;
        sqlx::query(
            "UPDATE adapter_tasks SET outcome = $1, response = $2, pending_ids = NULL, \
             confirm_at = NULL, retained_ids = $3, retain_until = $4 WHERE task_id = $5",
        )
        .bind(i64::from(response.outcome))
        .bind(response.encode_to_vec())
        .bind(work.retained.as_deref().map(join_ids))
        .bind(response.retain_until.as_ref().map(millis_from_timestamp))
        .bind(task_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            task_id,
            outcome = response.outcome,
            "delayed erasure carried out"
        );
        Ok(Some(response))
    }

    /// GetExportPage: the page at `page_token` of `caller`'s completed export `task_id`, of
    /// whole records up to `max_bytes` together.
    pub async fn export_page(
        &self,
        caller: &str,
        task_id: &str,
        page_token: &str,
        max_bytes: usize,
    ) -> Result<(Vec<Vec<u8>>, String), StoreError> {
        let row = sqlx::query(
            "SELECT caller, kind, outcome, export_ids, export_billing_ids, controller, operation, \
             arrived_upto FROM adapter_tasks WHERE task_id = $1",
        )
        .bind(task_id)
        .fetch_optional(&self.db.pool)
        .await?
        .filter(|r| r.try_get::<String, _>("caller").ok().as_deref() == Some(caller))
        .ok_or_else(|| StoreError::NotFound(format!("no task {task_id}")))?;
        let kind: i64 = row.try_get("kind")?;
        let outcome: i64 = row.try_get("outcome")?;
        let ids: Option<String> = row.try_get("export_ids")?;
        let kept: Option<String> = row.try_get("export_billing_ids")?;
        let controller: Option<String> = row.try_get("controller")?;
        let operation: Option<i64> = row.try_get("operation")?;
        let arrived_upto: Option<i64> = row.try_get("arrived_upto")?;
        let completed = outcome == ExecuteOutcome::Completed as i64;
        let covered = match (ids, controller) {
            (Some(ids), _) if is_export(kind) && completed => Covered::Subject {
                subscribers: split_ids(&ids)
                    .with_context(|| format!("reading the export ids of {task_id}"))?,
                // None for exports from before kept records were exported.
                kept: split_ids(&kept.unwrap_or_default())
                    .with_context(|| format!("reading the export billing ids of {task_id}"))?,
            },
            (_, Some(controller))
                if kind == RequestKind::ContractEnd as i64
                    && operation == Some(BulkOperation::Export as i64)
                    && completed =>
            {
                Covered::Controller {
                    controller,
                    arrived_upto,
                }
            }
            _ => {
                return Err(StoreError::FailedPrecondition(format!(
                    "task {task_id} has no paged export (it is {} and not a completed export)",
                    kind_name(kind)
                )))
            }
        };
        let position = export::decode_token(task_id, page_token).map_err(|e| {
            StoreError::InvalidToken(match e {
                export::TokenError::Malformed => "is not a page token of this adapter".into(),
                export::TokenError::OtherTask => {
                    format!("was issued for another task than {task_id}")
                }
            })
        })?;
        let mut conn = self.db.pool.acquire().await?;
        match export::read_page(&mut conn, &covered, position, max_bytes).await? {
            Ok(Page { records, next }) => Ok((
                records,
                next.map(|p: Position| export::encode_token(task_id, p))
                    .unwrap_or_default(),
            )),
            Err(RecordTooLarge(size)) => Err(StoreError::FailedPrecondition(format!(
                "the next record is {size} bytes, more than max_bytes {max_bytes}"
            ))),
        }
    }

    /// Adds `n` deliveries (issues `Issue 1` to `Issue n`) to the subscriber with `email`, in
    /// batches; for tests that need an export of many pages. Returns how many were added (0
    /// when there is no such subscriber).
    pub async fn add_deliveries(&self, email: &str, n: usize) -> anyhow::Result<usize> {
        let Some(subscriber) = self.subscriber(email).await? else {
            return Ok(0);
        };
        let mut tx = self.db.pool.begin().await?;
        let mut done = 0;
        while done < n {
            let count = (n - done).min(500);
            let values: Vec<String> = (0..count)
                .map(|i| {
                    let p = i * 4;
                    format!("(${}, ${}, ${}, ${})", p + 1, p + 2, p + 3, p + 4)
                })
                .collect();
            let sql = format!(
                "INSERT INTO deliveries (subscriber_id, issue, sent_at, opened) VALUES {}",
                values.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for i in done..done + count {
                query = query
                    .bind(subscriber.id)
                    .bind(format!("Issue {}", i + 1))
                    .bind(1_700_000_000_000_i64 + i as i64 * 604_800_000)
                    .bind((i % 3 == 0) as i64);
            }
            query.execute(&mut *tx).await?;
            done += count;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// Bills the subscriber with `email` (the first, as [`Store::subscriber`] finds it): a
    /// record of `kind` numbered `reference` for `amount_cents`, booked at `booked_at_ms`,
    /// kept as the law says. Returns its id. For tests and tools: the newsletter's own
    /// billing is not part of the example.
    pub async fn add_billing_record(
        &self,
        email: &str,
        kind: BillingKind,
        reference: &str,
        amount_cents: i64,
        booked_at_ms: i64,
    ) -> anyhow::Result<i64> {
        let subscriber = self
            .subscriber(email)
            .await?
            .with_context(|| format!("no subscriber {email} to bill"))?;
        let kept_until = kind
            .kept_until(booked_at_ms)
            .with_context(|| format!("{booked_at_ms} ms is no booking date"))?;
        Ok(sqlx::query_scalar(
            "INSERT INTO billing_records (controller, subscriber_id, kind, reference, buyer, \
             buyer_email, amount_cents, booked_at, kept_until) \
             SELECT controller, id, $1, $2, name || ' <' || email || '>', email, $3, $4, $5 \
             FROM subscribers WHERE id = $6 RETURNING id",
        )
        .bind(kind.as_str())
        .bind(reference)
        .bind(amount_cents)
        .bind(booked_at_ms)
        .bind(kept_until)
        .bind(subscriber.id)
        .fetch_one(&self.db.pool)
        .await?)
    }

    /// Bills the seeded subscriber Erik Lindqvist (in Sweden) the paid edition at `now_ms`: an
    /// invoice and the sale's VAT One-Stop Shop record, so that erasing him shows data kept
    /// in stages. Returns how many records were added: none when he has billing records
    /// already or is no subscriber any more, so a restart bills nobody twice.
    pub async fn bill_seeded_subscriber(&self, now_ms: i64) -> anyhow::Result<usize> {
        const ERIK: &str = "erik.lindqvist@example.se";
        let Some(erik) = self.subscriber(ERIK).await? else {
            return Ok(0);
        };
        let billed: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM billing_records WHERE subscriber_id = $1")
                .bind(erik.id)
                .fetch_one(&self.db.pool)
                .await?;
        if billed > 0 {
            return Ok(0);
        }
        let reference = format!("INV-DEMO-{now_ms}");
        for kind in [BillingKind::Invoice, BillingKind::OssSale] {
            self.add_billing_record(ERIK, kind, &reference, 1290, now_ms)
                .await?;
        }
        Ok(2)
    }

    /// Every billing record, by id.
    pub async fn billing_records(&self) -> anyhow::Result<Vec<BillingRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {BILLING_COLUMNS} FROM billing_records ORDER BY id"
        ))
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .iter()
            .map(BillingRecord::from_row)
            .collect::<sqlx::Result<_>>()?)
    }

    /// Finishes every accepted erasure whose time has come; returns how many.
    pub async fn finish_due(&self, now: i64) -> Result<usize, StoreError> {
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT task_id FROM adapter_tasks WHERE outcome = $1 AND confirm_at <= $2",
        )
        .bind(ExecuteOutcome::Accepted as i64)
        .bind(now)
        .fetch_all(&self.db.pool)
        .await?;
        let mut done = 0;
        for task_id in due {
            if self.finish(&task_id, now).await?.is_some() {
                done += 1;
            }
        }
        Ok(done)
    }
}

/// What a retention run shares with the answer it follows: the caller, request, kind and
/// controller.
#[derive(Debug, Clone, Copy)]
struct Lineage<'a> {
    caller: &'a str,
    request_id: &'a str,
    kind: RequestKind,
    controller: &'a str,
}

/// The earlier answer a retention run follows.
#[derive(Debug)]
struct Followed {
    /// The date that answer gave, which the run's key names.
    until_ms: i64,
    /// The billing record ids it kept (none for a bulk job, which keeps its controller's).
    kept: Vec<i64>,
}

/// The answer the task or job `key` follows, when `key` is a retention run's: a RETAINED
/// answer of the same `lineage` until the date the key names, under a key of the same task.
/// `None` for any other key, and for a date this adapter never answered.
async fn followed(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    key: &str,
    lineage: Lineage<'_>,
) -> Result<Option<Followed>, StoreError> {
    let Some(run) = RetentionRun::parse(key) else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT task_id, retained_ids FROM adapter_tasks WHERE caller = $1 AND request_id = $2 \
         AND kind = $3 AND controller = $4 AND outcome = $5 AND retain_until = $6",
    )
    .bind(lineage.caller)
    .bind(lineage.request_id)
    .bind(lineage.kind as i64)
    .bind(lineage.controller)
    .bind(ExecuteOutcome::Retained as i64)
    .bind(run.until_ms)
    .fetch_all(&mut **tx)
    .await?;
    for row in &rows {
        let task_id: String = row.try_get("task_id")?;
        if !run.follows(&task_id) {
            continue;
        }
        let kept: Option<String> = row.try_get("retained_ids")?;
        let kept = split_ids(&kept.unwrap_or_default())
            .with_context(|| format!("reading the retained ids of task {task_id}"))?;
        return Ok(Some(Followed {
            until_ms: run.until_ms,
            kept,
        }));
    }
    Ok(None)
}

/// The `arrived_upto` of the contract end's export that the ERASE `req` follows, when `req`
/// follows a return ([`newsletter::follows_return`]) and the export is a completed EXPORT
/// job of the same caller, request and controller under the key the erasure's names (the
/// erasure's key is the export's with the suffix `#erase`, see `ExecuteBulkRequest.job_id`).
/// `None` otherwise, and for an export from before migration 0007.
async fn export_upto(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    caller: &str,
    req: &ExecuteBulkRequest,
) -> Result<Option<i64>, StoreError> {
    let Some(export_key) = req.job_id.strip_suffix("#erase") else {
        return Ok(None);
    };
    if !newsletter::follows_return(req) {
        return Ok(None);
    }
    let upto: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT arrived_upto FROM adapter_tasks WHERE task_id = $1 AND caller = $2 \
         AND request_id = $3 AND kind = $4 AND controller = $5 AND operation = $6 \
         AND outcome = $7",
    )
    .bind(export_key)
    .bind(caller)
    .bind(&req.request_id)
    .bind(RequestKind::ContractEnd as i64)
    .bind(&req.controller)
    .bind(BulkOperation::Export as i64)
    .bind(ExecuteOutcome::Completed as i64)
    .fetch_optional(&mut **tx)
    .await?;
    if upto.is_none() {
        tracing::warn!(
            job_id = %req.job_id,
            export_job_id = export_key,
            "no completed export of this contract end under the erasure's key less #erase: \
             the erasure's return check compares totals"
        );
    }
    Ok(upto.flatten())
}

/// Row ids (of subscribers or billing records) as stored in a text column.
fn join_ids(ids: &[i64]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The reverse of [`join_ids`].
fn split_ids(ids: &str) -> Result<Vec<i64>, std::num::ParseIntError> {
    ids.split(',')
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}
