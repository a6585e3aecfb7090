//! The delivery outbox (the `uploads` table): a RETURN_OF_DATA, TRANSFER or CONTRACT_END
//! task whose export is written queues one delivery, in the transaction that records the
//! export; the upload worker claims it, sends the files to the registry or the recipient
//! and, in one transaction, retires it and moves the task on (or records the failed attempt
//! and when the next one comes). An export task that ends without a delivery gets an upload
//! retired unsent (`retire_unsent`), so that its folder is swept like a retired one's.

use anyhow::Result;
use dsrelay_connectors::ExportedFile;
use dsrelay_proto::v1::{ProcessorAuditEvent, RequestKind, TransferRecipient};
use dsrelay_runtime::store::lookups;
use sqlx::AnyConnection;

use super::rows::{request_kind, TaskKey, TaskRecord, TaskRow, TASK_COLUMNS};
use super::Store;
use crate::task_machine::Transition;

/// A claimed upload.
#[derive(Debug, Clone)]
pub struct UploadJob {
    /// The task whose export it is.
    pub key: TaskKey,
    /// The claim's lease token: this sender's failures, retries, renewals and release
    /// match it, so once another claim took the upload they change nothing.
    pub lease_owner: String,
    /// Attempts so far, this one included.
    pub attempts: i64,
    /// The export's files as the connector wrote them.
    pub files: Vec<ExportedFile>,
    /// The request's kind: a RETURN_OF_DATA goes to the registry, a TRANSFER to `recipient`.
    pub kind: RequestKind,
    /// The request's due date (ms): failed deliveries are retried until then.
    pub due_at: i64,
    /// Where a TRANSFER, or a contract end returned to a recipient, goes, as the registry
    /// named it on delivery (or on a contract end's last update).
    pub recipient: Option<TransferRecipient>,
    /// A CONTRACT_END whose terms return the data to a transfer recipient: its name (empty
    /// for a return to the registry and on every other kind).
    pub contract_recipient: String,
    /// When the claim was asked for, on this process's monotonic clock: the lease the claim
    /// set runs `lease_ms` from a moment no earlier, so a sender counting from here never
    /// believes it holds the upload longer than it does.
    pub claimed_at: std::time::Instant,
}

impl UploadJob {
    /// Whether the export goes to a transfer recipient rather than to the registry, and the
    /// name the request gives it.
    pub fn recipient_name(&self) -> Option<&str> {
        if self.kind == RequestKind::Transfer {
            return Some(self.recipient.as_ref().map_or("", |r| r.name.as_str()));
        }
        (!self.contract_recipient.is_empty()).then_some(self.contract_recipient.as_str())
    }

    /// This job's claim.
    pub fn claim(&self) -> UploadClaim<'_> {
        UploadClaim {
            key: &self.key,
            lease_owner: &self.lease_owner,
        }
    }
}

/// A claim on an upload: the upload, and the lease token the claim wrote.
#[derive(Debug, Clone, Copy)]
pub struct UploadClaim<'a> {
    /// The task whose export it is.
    pub key: &'a TaskKey,
    /// [`UploadJob::lease_owner`].
    pub lease_owner: &'a str,
}

/// Where an export went, for the audit trail.
#[derive(Debug, Clone, Copy)]
pub struct Delivered<'a> {
    /// The transfer recipient, by the registry's name for it; `None` for the registry.
    pub recipient: Option<&'a str>,
    /// How many files.
    pub files: usize,
    /// How many bytes in all.
    pub bytes: u64,
}

/// What [`Store::upload_finished`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadFinish {
    /// The upload is retired, and the task moved to this sequence (`None`: no move asked).
    Retired {
        /// The task's new sequence.
        sequence: Option<i64>,
    },
    /// Another uploader retired it first, or (for an outcome other than a delivery) another
    /// claim holds it now; nothing was written.
    RetiredAlready,
    /// The task is no longer at the sequence the move was decided on; nothing was written.
    TaskChanged,
}

/// When a failed upload is tried again, and why it failed (kept for operators).
#[derive(Debug, Clone, Copy)]
pub struct NextAttempt<'a> {
    /// When (ms).
    pub at: i64,
    /// What went wrong.
    pub error: &'a str,
}

#[derive(sqlx::FromRow)]
struct UploadRecord {
    controller: String,
    request_id: String,
    subprocessor: String,
    attempts: i64,
    next_attempt_at: i64,
    lease_owner: String,
    export_files: Option<String>,
    kind: i64,
    due_at: i64,
    recipient_name: Option<String>,
    recipient_endpoint: Option<String>,
    recipient_identity: Option<String>,
    recipient_public_keys: Option<String>,
    contract_recipient: Option<String>,
}

/// Queues the upload of `key`'s export inside the transaction that records it.
pub(super) async fn queue(tx: &mut AnyConnection, key: &TaskKey, now: i64) -> Result<()> {
    insert(tx, key, now, None).await
}

/// Records, inside the transaction of the step that ends `key`'s export task without a
/// delivery (its export written but cancelled, or failed, refused, found nothing), an upload
/// retired unsent: the sweep of retired exports (`Store::retired_exports_left`) then removes
/// whatever the connector wrote into the task's folder, should the caller's own removal
/// not happen (a crash right after the commit). An upload the task already has is left as
/// it is: a retired one is swept already, and one still to be sent is retired by its sender,
/// which finds the task finished.
pub(super) async fn retire_unsent(tx: &mut AnyConnection, key: &TaskKey, now: i64) -> Result<()> {
    insert(tx, key, now, Some(now)).await
}

/// Gives `key`'s export an upload due at `now`, retired at `done_at` (`None`: still to be
/// sent), unless it has one already.
async fn insert(
    tx: &mut AnyConnection,
    key: &TaskKey,
    now: i64,
    done_at: Option<i64>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO uploads (controller, request_id, subprocessor, next_attempt_at, done_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .bind(now)
    .bind(done_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl Store {
    /// Reserves up to `limit` uploads due at `now` (the processor's clock) for `lease_ms`,
    /// each under a new lease token of its own ([`UploadJob::lease_owner`]), counting the
    /// attempt each starts, in one statement, the most overdue first. The lease
    /// is set and compared on the database's clock
    /// ([`Backend::now_ms`](dsrelay_runtime::store::Backend::now_ms)), so replicas agree on
    /// when it ends.
    pub async fn claim_uploads(
        &self,
        now: i64,
        limit: i64,
        lease_ms: i64,
    ) -> Result<Vec<UploadJob>> {
        let backend = self.db.backend;
        let db_now = backend.now_ms();
        let claimed_at = std::time::Instant::now();
        // One statement whatever `limit` is (see dsrelay_runtime::store's "Claims").
        let mut rows: Vec<UploadRecord> = sqlx::query_as(&format!(
            "WITH picked AS MATERIALIZED (SELECT u.controller, u.request_id, u.subprocessor \
             FROM uploads u JOIN tasks t ON t.controller = u.controller \
             AND t.request_id = u.request_id AND t.subprocessor = u.subprocessor \
             JOIN requests r ON r.controller = u.controller AND r.request_id = u.request_id \
             WHERE u.done_at IS NULL AND u.next_attempt_at <= $1 AND u.lease_until <= {db_now} \
             ORDER BY u.next_attempt_at LIMIT $2{lock}) \
             UPDATE uploads SET lease_until = {db_now} + $3, attempts = attempts + 1, \
             lease_owner = {token} \
             WHERE (controller, request_id, subprocessor) IN \
             (SELECT controller, request_id, subprocessor FROM picked) \
             RETURNING controller, request_id, subprocessor, attempts, next_attempt_at, \
             lease_owner, {task}, {request}, {contract}",
            lock = backend.skip_locked_of("u"),
            token = backend.random_token(),
            task = lookups(
                "tasks t",
                "t.controller = uploads.controller AND t.request_id = uploads.request_id \
                 AND t.subprocessor = uploads.subprocessor",
                &[("t.export_files", "export_files")],
            ),
            request = lookups(
                "requests r",
                "r.controller = uploads.controller AND r.request_id = uploads.request_id",
                &[
                    ("r.kind", "kind"),
                    ("r.due_at", "due_at"),
                    ("r.recipient_name", "recipient_name"),
                    ("r.recipient_endpoint", "recipient_endpoint"),
                    ("r.recipient_identity", "recipient_identity"),
                    ("r.recipient_public_keys", "recipient_public_keys"),
                ],
            ),
            contract = lookups(
                "contract_ends c",
                "c.controller = uploads.controller AND c.request_id = uploads.request_id",
                &[("c.transfer_recipient", "contract_recipient")],
            ),
        ))
        .bind(now)
        .bind(limit)
        .bind(lease_ms)
        .fetch_all(&self.db.claimer)
        .await?;
        // The most overdue first, as picked.
        rows.sort_by_key(|r| r.next_attempt_at);
        let mut jobs = Vec::with_capacity(rows.len());
        for r in rows {
            let files = match r.export_files.as_deref() {
                Some(json) => serde_json::from_str(json)?,
                None => Vec::new(),
            };
            let recipient = match (r.recipient_name, r.recipient_endpoint, r.recipient_identity) {
                (Some(name), Some(endpoint), Some(identity)) => Some(TransferRecipient {
                    name,
                    endpoint,
                    identity,
                    public_keys: r
                        .recipient_public_keys
                        .as_deref()
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_string)
                        .collect(),
                }),
                _ => None,
            };
            jobs.push(UploadJob {
                key: TaskKey {
                    controller: r.controller,
                    request_id: r.request_id,
                    subprocessor: r.subprocessor,
                },
                lease_owner: r.lease_owner,
                // As written by the claim: this attempt is counted.
                attempts: r.attempts,
                files,
                kind: request_kind(r.kind),
                due_at: r.due_at,
                recipient,
                contract_recipient: r.contract_recipient.unwrap_or_default(),
                claimed_at,
            });
        }
        Ok(jobs)
    }

    /// One task as it stands.
    pub async fn task(&self, key: &TaskKey) -> Result<Option<TaskRow>> {
        let row: Option<TaskRecord> = sqlx::query_as(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE controller = $1 AND request_id = $2 \
             AND subprocessor = $3"
        ))
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.map(TaskRow::from))
    }

    /// Retires an upload and, in the same transaction, records `t` (the task delivered or
    /// undeliverable) if the task is still at `expected_sequence`, and, when the export was
    /// `delivered`, an audit entry saying where. Two uploaders may finish the same upload
    /// (the first one's lease ran out while it was still sending): only the first records
    /// anything, so the trail says once that the export was delivered. When `t` finds the
    /// task moved on (another uploader's failed attempt counted meanwhile), or is a give-up
    /// at a due date an extension has moved since ([`Transition::due_by`]), nothing is
    /// written: the upload stays, to be decided again on the task as it stands, rather than
    /// retired with its task left IN_PROGRESS for good. An outcome other than a delivery
    /// (the export undeliverable, or given up at the due date) is recorded only by the
    /// claim `lease_owner` still holding the upload: a sender whose lease ran out does not
    /// fail what the current holder may still deliver. A delivery is a fact whoever made it.
    pub async fn upload_finished(
        &self,
        claim: UploadClaim<'_>,
        expected_sequence: i64,
        t: Option<&Transition>,
        delivered: Option<&Delivered<'_>>,
        now: i64,
        attempts: i64,
    ) -> Result<UploadFinish> {
        let at = (expected_sequence, now, attempts);
        self.finish_upload(claim, at, t, delivered, false).await
    }

    /// [`Store::upload_finished`] of an outcome decided on a task no cancellation had
    /// marked: once one did, nothing is written either ([`UploadFinish::TaskChanged`]), so
    /// that the outcome is decided again as the cancellation's (a delivery too late to stop).
    pub async fn upload_finished_unless_marked(
        &self,
        claim: UploadClaim<'_>,
        expected_sequence: i64,
        t: Option<&Transition>,
        delivered: Option<&Delivered<'_>>,
        now: i64,
        attempts: i64,
    ) -> Result<UploadFinish> {
        let at = (expected_sequence, now, attempts);
        self.finish_upload(claim, at, t, delivered, true).await
    }

    /// [`Store::upload_finished`]; `at` is the expected sequence, the time and the attempts.
    async fn finish_upload(
        &self,
        claim: UploadClaim<'_>,
        (expected_sequence, now, attempts): (i64, i64, i64),
        t: Option<&Transition>,
        delivered: Option<&Delivered<'_>>,
        unless_marked: bool,
    ) -> Result<UploadFinish> {
        let UploadClaim { key, lease_owner } = claim;
        let mut tx = self.begin_audited().await?;
        if let Some(d) = delivered {
            // Where a subject had their data transferred is theirs to tell: the entry, which
            // forgetting never changes, names the recipient only by its keyed hash.
            let to = match d.recipient {
                Some(name) => format!("recipient {}", tx.text(name)),
                None => "the registry".to_string(),
            };
            let record = super::audit::Record {
                controller: &key.controller,
                request_id: &key.request_id,
                actor: "",
                detail: format!(
                    "subprocessor {}, export of {} files, {} bytes, delivered to {to}",
                    key.subprocessor, d.files, d.bytes
                ),
            };
            super::audit::append(&mut tx, ProcessorAuditEvent::ExportDelivered, now, record)
                .await?;
        }
        // A return's wait for the confirmation is written only while the terms still hold
        // the grace end it was decided with: a new one committed since the uploader read the
        // terms rescheduled only the tasks already waiting. Locked, so that one coming now
        // waits for this and then finds the task waiting.
        let waits_for = t
            .and_then(|t| t.contract.as_ref())
            .filter(|c| c.phase == dsrelay_proto::v1::ContractPhase::AwaitingConfirmation);
        if let Some(grace) = waits_for.and_then(|c| c.scheduled_at) {
            let held: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT grace_ends_at FROM contract_ends WHERE controller = $1 \
                 AND request_id = $2{}",
                self.db.backend.lock_rows()
            ))
            .bind(&key.controller)
            .bind(&key.request_id)
            .fetch_optional(&mut *tx)
            .await?;
            if held.is_some_and(|held| held != grace) {
                tx.rollback().await?;
                return Ok(UploadFinish::TaskChanged);
            }
        }
        // The task before the upload, as `upload_failed` locks them; all of it is rolled
        // back below if another uploader retired the upload first.
        let moved = match t {
            Some(t) => {
                let moved = if unless_marked {
                    super::tasks::transition_unless_marked(
                        &mut tx,
                        key,
                        expected_sequence,
                        t,
                        now,
                        attempts,
                    )
                    .await?
                } else {
                    super::tasks::transition(&mut tx, key, expected_sequence, t, now, attempts)
                        .await?
                };
                if moved.is_none() {
                    tx.rollback().await?;
                    return Ok(UploadFinish::TaskChanged);
                }
                moved
            }
            None => None,
        };
        let retired = sqlx::query(
            "UPDATE uploads SET done_at = $1, lease_until = 0, lease_owner = NULL \
             WHERE controller = $2 AND request_id = $3 AND subprocessor = $4 \
             AND done_at IS NULL AND ($5 = 1 OR lease_owner = $6)",
        )
        .bind(now)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(i64::from(delivered.is_some()))
        .bind(lease_owner)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if retired == 0 {
            tx.rollback().await?;
            return Ok(UploadFinish::RetiredAlready);
        }
        tx.commit().await?;
        Ok(UploadFinish::Retired { sequence: moved })
    }

    /// Tries an upload of the claim `lease_owner` again at `next.at`, keeping why it failed
    /// for operators, and in the same transaction records `t` (the task's note saying what
    /// is missing) if the task is still at `expected_sequence`. Returns the task's new
    /// sequence, or `None` when it changed meanwhile. Nothing at all is written once another
    /// claim holds the upload: that sender's attempt is the one that counts.
    pub async fn upload_failed(
        &self,
        claim: UploadClaim<'_>,
        expected_sequence: i64,
        t: &Transition,
        next: NextAttempt<'_>,
        now: i64,
        attempts: i64,
    ) -> Result<Option<i64>> {
        let at = (expected_sequence, now, attempts);
        Ok(self
            .note_failure(claim, at, t, next, false)
            .await?
            .flatten())
    }

    /// [`Store::upload_failed`] of a failure decided on a task no cancellation had marked:
    /// once one did, nothing is written and `None` is answered, so that the failure is
    /// decided again as the cancellation's (the return CANCELLED, not retried nor FAILED);
    /// otherwise `Some` of what [`Store::upload_failed`] answers.
    pub async fn upload_failed_unless_marked(
        &self,
        claim: UploadClaim<'_>,
        expected_sequence: i64,
        t: &Transition,
        next: NextAttempt<'_>,
        now: i64,
        attempts: i64,
    ) -> Result<Option<Option<i64>>> {
        let at = (expected_sequence, now, attempts);
        self.note_failure(claim, at, t, next, true).await
    }

    /// [`Store::upload_failed_unless_marked`], guarded by the mark only when `unless_marked`;
    /// `at` is the expected sequence, the time and the attempts.
    async fn note_failure(
        &self,
        claim: UploadClaim<'_>,
        (expected_sequence, now, attempts): (i64, i64, i64),
        t: &Transition,
        next: NextAttempt<'_>,
        unless_marked: bool,
    ) -> Result<Option<Option<i64>>> {
        let UploadClaim { key, lease_owner } = claim;
        let mut tx = self.begin_audited().await?;
        // The task before the upload, as `upload_finished` locks them.
        let moved = if unless_marked {
            let moved = super::tasks::transition_unless_marked(
                &mut tx,
                key,
                expected_sequence,
                t,
                now,
                attempts,
            )
            .await?;
            // A task moved on by another step keeps its retry as before; only a mark asks for
            // the failure to be decided again.
            if moved.is_none() && marked(&mut tx, key).await? {
                tx.rollback().await?;
                return Ok(None);
            }
            moved
        } else {
            super::tasks::transition(&mut tx, key, expected_sequence, t, now, attempts).await?
        };
        if !schedule_retry(&mut *tx, key, lease_owner, next).await? {
            tx.rollback().await?;
            return Ok(Some(None));
        }
        tx.commit().await?;
        Ok(Some(moved))
    }

    /// Records `t` (the task's note saying an attempt after a failed one got through) while
    /// the claim `lease_owner` still holds the upload and no cancellation marked the task,
    /// if the task is still at `expected_sequence`; the upload itself is left as it is.
    /// Returns the task's new sequence, or `None` when nothing was written: another claim
    /// holds the upload (its note is its own), or the task changed or was marked.
    pub async fn upload_under_way(
        &self,
        claim: UploadClaim<'_>,
        expected_sequence: i64,
        t: &Transition,
        now: i64,
        attempts: i64,
    ) -> Result<Option<i64>> {
        let UploadClaim { key, lease_owner } = claim;
        let mut tx = self.begin_audited().await?;
        // The task before the upload, as `upload_failed` locks them.
        let moved = super::tasks::transition_unless_marked(
            &mut tx,
            key,
            expected_sequence,
            t,
            now,
            attempts,
        )
        .await?;
        if moved.is_none() {
            tx.rollback().await?;
            return Ok(None);
        }
        // Locks the upload's row and tells whether this claim still holds it.
        let held = sqlx::query(
            "UPDATE uploads SET lease_owner = lease_owner WHERE controller = $1 \
             AND request_id = $2 AND subprocessor = $3 AND done_at IS NULL AND lease_owner = $4",
        )
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(lease_owner)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if held == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Schedules the next attempt of an upload of the claim `lease_owner` whose failure the
    /// controller is not told of; nothing once another claim holds it.
    pub async fn upload_retry_later(
        &self,
        claim: UploadClaim<'_>,
        next: NextAttempt<'_>,
    ) -> Result<()> {
        schedule_retry(&self.db.pool, claim.key, claim.lease_owner, next).await?;
        Ok(())
    }

    /// Keeps an upload of the claim `lease_owner` reserved for `lease_ms` more from now (the
    /// database's clock) while its files are still being sent. Answers whether the claim
    /// still held it: once another claim took it, or its lease ran out, this sender should
    /// stop. A lease that ran out is not taken back even where no claim took the upload
    /// since: a cancellation meanwhile read the upload as idle and cancelled its task, and
    /// this sender must not go on to deliver.
    pub async fn extend_upload_lease(&self, claim: UploadClaim<'_>, lease_ms: i64) -> Result<bool> {
        let UploadClaim { key, lease_owner } = claim;
        let db_now = self.db.backend.now_ms();
        let held = sqlx::query(&format!(
            "UPDATE uploads SET lease_until = {db_now} + $1 WHERE controller = $2 \
             AND request_id = $3 AND subprocessor = $4 AND done_at IS NULL \
             AND lease_owner = $5 AND lease_until > {db_now}"
        ))
        .bind(lease_ms)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(lease_owner)
        .execute(&self.db.pool)
        .await?
        .rows_affected();
        Ok(held > 0)
    }
}

impl Store {
    /// Up to `limit` retired uploads whose export files have not been recorded removed,
    /// the longest retired first, after the first `skip` of them.
    pub async fn retired_exports_left(&self, limit: i64, skip: i64) -> Result<Vec<TaskKey>> {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT controller, request_id, subprocessor FROM uploads \
             WHERE done_at IS NOT NULL AND files_removed_at IS NULL \
             ORDER BY done_at, controller, request_id, subprocessor LIMIT $1 OFFSET $2",
        )
        .bind(limit)
        .bind(skip)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(controller, request_id, subprocessor)| TaskKey {
                controller,
                request_id,
                subprocessor,
            })
            .collect())
    }

    /// Whether `key`'s upload is still retired with its files not recorded removed, as
    /// [`Store::retired_exports_left`] listed it: read again just before the sweep removes
    /// the folder, since an operator's retry (`Store::retry_task`) drops the retired upload
    /// and its task's new export then writes into that folder.
    pub async fn export_still_retired(&self, key: &TaskKey) -> Result<bool> {
        Ok(sqlx::query(
            "SELECT 1 AS one FROM uploads WHERE controller = $1 AND request_id = $2 \
             AND subprocessor = $3 AND done_at IS NOT NULL AND files_removed_at IS NULL",
        )
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .fetch_optional(&self.db.pool)
        .await?
        .is_some())
    }

    /// Records that `key`'s retired upload left no files behind.
    pub async fn export_files_removed(&self, key: &TaskKey, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE uploads SET files_removed_at = $1 WHERE controller = $2 \
             AND request_id = $3 AND subprocessor = $4 AND done_at IS NOT NULL",
        )
        .bind(now)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    /// Ends the lease of the claim `lease_owner` on an upload whose sending was abandoned
    /// (the service is stopping), so another replica or the next start resumes it at once;
    /// the attempt it started stays counted. Nothing once another claim holds it.
    pub async fn release_upload(&self, claim: UploadClaim<'_>) -> Result<()> {
        let UploadClaim { key, lease_owner } = claim;
        sqlx::query(
            "UPDATE uploads SET lease_until = 0, lease_owner = NULL WHERE controller = $1 \
             AND request_id = $2 AND subprocessor = $3 AND done_at IS NULL \
             AND lease_owner = $4",
        )
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(lease_owner)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }
}

/// Whether a cancellation marked `key`'s task (`cancel_requested_at`).
async fn marked(tx: &mut super::audit::AuditTx, key: &TaskKey) -> Result<bool> {
    Ok(sqlx::query(
        "SELECT 1 AS one FROM tasks WHERE controller = $1 AND request_id = $2 \
         AND subprocessor = $3 AND cancel_requested_at IS NOT NULL",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .fetch_optional(&mut **tx)
    .await?
    .is_some())
}

/// Releases an upload of the claim `lease_owner` until `next.at`, keeping why it failed;
/// answers whether the claim still held it (nothing is written otherwise).
async fn schedule_retry<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    key: &TaskKey,
    lease_owner: &str,
    next: NextAttempt<'_>,
) -> Result<bool> {
    let held = sqlx::query(
        "UPDATE uploads SET next_attempt_at = $1, lease_until = 0, lease_owner = NULL, \
         last_error = $2 WHERE controller = $3 AND request_id = $4 AND subprocessor = $5 \
         AND done_at IS NULL AND lease_owner = $6",
    )
    .bind(next.at)
    .bind(next.error)
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .bind(lease_owner)
    .execute(db)
    .await?
    .rows_affected();
    Ok(held > 0)
}

#[cfg(test)]
pub(crate) mod tests {
    use dsrelay_proto::v1::{DeliverRequest, RequestKind, TaskState};
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::store::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    /// The claim `lease_owner` on `key`'s upload.
    pub(crate) fn sender<'a>(key: &'a TaskKey, lease_owner: &'a str) -> UploadClaim<'a> {
        UploadClaim { key, lease_owner }
    }

    /// An upload delivered by one uploader while another's failed attempt moved the task
    /// (the first's lease ran out while it was still sending) retires nothing, so the task is
    /// not left IN_PROGRESS with no upload to finish it; decided again on the task as it
    /// stands, it is retired with the task COMPLETED.
    async fn a_delivery_decided_on_a_stale_task_is_decided_again(url: &str) {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        let req = DeliverRequest {
            request_id: "r-1".into(),
            kind: RequestKind::ReturnOfData as i32,
            ..Default::default()
        };
        store
            .accept("acme", &req, &["crm".into()], None, 1)
            .await
            .expect("accept");
        let key = TaskKey {
            controller: "acme".into(),
            request_id: "r-1".into(),
            subprocessor: "crm".into(),
        };
        let exported = Transition {
            state: TaskState::InProgress,
            note: "exported; uploading".into(),
            ..Default::default()
        };
        let s = store
            .transition(&key, 1, &exported, 2, 1)
            .await
            .expect("step")
            .expect("moved");
        let mut conn = store.db.pool.acquire().await.expect("connection");
        queue(&mut conn, &key, 2).await.expect("queue the upload");
        drop(conn);
        // Another uploader's failed attempt is counted on the task meanwhile.
        let failed_once = Transition {
            state: TaskState::InProgress,
            note: "exported; uploading (attempt 1 failed)".into(),
            ..Default::default()
        };
        let now_at = store
            .transition(&key, s, &failed_once, 3, 1)
            .await
            .expect("step")
            .expect("moved");
        let delivered = Transition {
            state: TaskState::Completed,
            confirmed: true,
            ..Default::default()
        };
        let to = Delivered {
            recipient: None,
            files: 1,
            bytes: 10,
        };
        assert_eq!(
            store
                .upload_finished(
                    sender(&key, "a sender"),
                    s,
                    Some(&delivered),
                    Some(&to),
                    4,
                    1
                )
                .await
                .expect("finish"),
            UploadFinish::TaskChanged
        );
        let pending: (Option<i64>,) = sqlx::query_as("SELECT done_at FROM uploads")
            .fetch_one(&store.db.pool)
            .await
            .expect("upload");
        assert_eq!(pending.0, None, "the upload stays to be decided again");
        assert_eq!(
            store
                .upload_finished(
                    sender(&key, "a sender"),
                    now_at,
                    Some(&delivered),
                    Some(&to),
                    5,
                    1
                )
                .await
                .expect("finish"),
            UploadFinish::Retired {
                sequence: Some(now_at + 1)
            }
        );
        let task = store.task(&key).await.expect("task").expect("row");
        assert_eq!(task.state, TaskState::Completed);
        store.db.pool.close().await;
    }

    #[tokio::test]
    async fn a_delivery_decided_on_a_stale_task_is_decided_again_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        a_delivery_decided_on_a_stale_task_is_decided_again(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn a_delivery_decided_on_a_stale_task_is_decided_again_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            a_delivery_decided_on_a_stale_task_is_decided_again(&u).await
        })
        .await;
    }

    /// A return's wait for the confirmation decided with a grace end the terms no longer hold
    /// (a new one committed after the uploader read them) is not written: decided again with
    /// the new one, it is. Before, the stale grace end stayed the task's scheduled time.
    async fn a_wait_decided_with_an_old_grace_end_is_decided_again(url: &str) {
        use dsrelay_proto::v1::{ContractEnd, ContractEndChoice, ContractPhase, RequestParameters};
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        let (old_grace, new_grace) = (900_000_i64, 1_800_000_i64);
        let req = DeliverRequest {
            request_id: "r-1".into(),
            kind: RequestKind::ContractEnd as i32,
            parameters: Some(RequestParameters {
                contract_end: Some(ContractEnd {
                    choice: ContractEndChoice::ReturnThenDelete as i32,
                    effective_at: Some(dsrelay_proto::timestamp_from_millis(1)),
                    grace_ends_at: Some(dsrelay_proto::timestamp_from_millis(old_grace)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            due_at: Some(dsrelay_proto::timestamp_from_millis(old_grace)),
            ..Default::default()
        };
        store
            .accept("acme", &req, &["crm".into()], None, 1)
            .await
            .expect("accept");
        let key = TaskKey {
            controller: "acme".into(),
            request_id: "r-1".into(),
            subprocessor: "crm".into(),
        };
        let s = store.task(&key).await.expect("task").expect("row").sequence;
        let mut conn = store.db.pool.acquire().await.expect("connection");
        queue(&mut conn, &key, 2).await.expect("queue the upload");
        drop(conn);
        sqlx::query("UPDATE contract_ends SET grace_ends_at = $1")
            .bind(new_grace)
            .execute(&store.db.pool)
            .await
            .expect("a new grace end");
        let waiting = |grace| Transition {
            state: TaskState::InProgress,
            confirmed: true,
            note: "returned; waiting".into(),
            contract: Some(crate::task_machine::ContractStep {
                phase: ContractPhase::AwaitingConfirmation,
                progress: None,
                scheduled_at: Some(grace),
            }),
            ..Default::default()
        };
        let to = Delivered {
            recipient: None,
            files: 1,
            bytes: 10,
        };
        let claim = sender(&key, "a sender");
        let stale = waiting(old_grace);
        assert_eq!(
            (store.upload_finished(claim, s, Some(&stale), Some(&to), 4, 1))
                .await
                .expect("finish"),
            UploadFinish::TaskChanged
        );
        let task = store.task(&key).await.expect("task").expect("row");
        assert_eq!(task.sequence, s, "{task:?}");
        let fresh = waiting(new_grace);
        let claim = sender(&key, "a sender");
        assert_eq!(
            (store.upload_finished(claim, s, Some(&fresh), Some(&to), 5, 1))
                .await
                .expect("finish"),
            UploadFinish::Retired {
                sequence: Some(s + 1)
            }
        );
        let task = store.task(&key).await.expect("task").expect("row");
        assert_eq!(task.scheduled_at, Some(new_grace), "{task:?}");
        store.db.pool.close().await;
    }

    #[tokio::test]
    async fn a_wait_decided_with_an_old_grace_end_is_decided_again_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        a_wait_decided_with_an_old_grace_end_is_decided_again(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn a_wait_decided_with_an_old_grace_end_is_decided_again_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            a_wait_decided_with_an_old_grace_end_is_decided_again(&u).await
        })
        .await;
    }

    /// A delivery decided on a task no cancellation had marked is not recorded once one did
    /// (a Cancel taken while the part was being closed): it is decided again, as too late to
    /// stop, rather than recorded as if no cancellation came.
    async fn a_delivery_decided_before_a_mark_is_decided_again(url: &str) {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        let req = DeliverRequest {
            request_id: "r-1".into(),
            kind: RequestKind::Transfer as i32,
            ..Default::default()
        };
        (store.accept("acme", &req, &["crm".into()], None, 1))
            .await
            .expect("accept");
        let key = TaskKey {
            controller: "acme".into(),
            request_id: "r-1".into(),
            subprocessor: "crm".into(),
        };
        let exported = Transition {
            state: TaskState::InProgress,
            note: "exported; transferring".into(),
            ..Default::default()
        };
        let s = (store.transition(&key, 1, &exported, 2, 1))
            .await
            .expect("step")
            .expect("moved");
        let mut conn = store.db.pool.acquire().await.expect("connection");
        queue(&mut conn, &key, 2).await.expect("queue the upload");
        drop(conn);
        // The cancellation marks the task, its sequence unchanged.
        sqlx::query("UPDATE tasks SET cancel_requested_at = 3")
            .execute(&store.db.pool)
            .await
            .expect("mark");
        let delivered = Transition {
            state: TaskState::Completed,
            confirmed: true,
            ..Default::default()
        };
        let to = Delivered {
            recipient: Some("new-bookkeeper"),
            files: 1,
            bytes: 10,
        };
        let claim = sender(&key, "a sender");
        let unmarked = store
            .upload_finished_unless_marked(claim, s, Some(&delivered), Some(&to), 4, 1)
            .await
            .expect("finish");
        assert_eq!(unmarked, UploadFinish::TaskChanged);
        let task = store.task(&key).await.expect("task").expect("row");
        assert_eq!(task.state, TaskState::InProgress);
        let too_late = Transition {
            note: "delivered: the cancellation came too late".into(),
            ..delivered
        };
        let marked = store
            .upload_finished(claim, s, Some(&too_late), Some(&to), 5, 1)
            .await
            .expect("finish");
        assert_eq!(
            marked,
            UploadFinish::Retired {
                sequence: Some(s + 1)
            }
        );
        let task = store.task(&key).await.expect("task").expect("row");
        assert_eq!(task.note, "delivered: the cancellation came too late");
        store.db.pool.close().await;
    }

    #[tokio::test]
    async fn a_delivery_decided_before_a_mark_is_decided_again_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/p.db", dir.path().display());
        a_delivery_decided_before_a_mark_is_decided_again(&url).await;
    }

    #[tokio::test]
    async fn a_delivery_decided_before_a_mark_is_decided_again_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            a_delivery_decided_before_a_mark_is_decided_again(&u).await
        })
        .await;
    }

    /// A sender whose lease ran out while it sent, and whose upload another claim took,
    /// records nothing: not its failed attempt over the task, not a retry that would free
    /// the upload while the new holder sends, not a failure at the due date, and its renewal
    /// and release leave the new holder's lease alone. The new holder's own failure counts.
    async fn a_sender_that_lost_its_lease_records_nothing(url: &str) {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        let req = DeliverRequest {
            request_id: "r-2".into(),
            kind: RequestKind::ReturnOfData as i32,
            due_at: Some(dsrelay_proto::timestamp_from_millis(i64::MAX / 2)),
            ..Default::default()
        };
        store
            .accept("acme", &req, &["crm".into()], None, 1)
            .await
            .expect("accept");
        let key = TaskKey {
            controller: "acme".into(),
            request_id: "r-2".into(),
            subprocessor: "crm".into(),
        };
        let exported = Transition {
            state: TaskState::InProgress,
            note: "exported; uploading".into(),
            ..Default::default()
        };
        let s = store
            .transition(&key, 1, &exported, 2, 1)
            .await
            .expect("step")
            .expect("moved");
        let mut conn = store.db.pool.acquire().await.expect("connection");
        queue(&mut conn, &key, 2).await.expect("queue the upload");
        drop(conn);

        // The first sender's lease runs out at once, and it cannot take it back even before
        // another claim comes (a cancellation may have read the upload as idle meanwhile);
        // the second claim takes the upload.
        let first = store.claim_uploads(10, 1, -1).await.expect("claim");
        assert_eq!(first.len(), 1);
        assert!(!store
            .extend_upload_lease(sender(&key, &first[0].lease_owner), 600_000)
            .await
            .expect("extend"));
        let second = store.claim_uploads(10, 1, 600_000).await.expect("claim");
        assert_eq!(second.len(), 1, "the expired lease is claimed again");
        let (stale, holder) = (&first[0].lease_owner, &second[0].lease_owner);
        assert_ne!(stale, holder);

        let failed = Transition {
            state: TaskState::InProgress,
            note: "sending: attempt 1 failed".into(),
            ..Default::default()
        };
        let next = NextAttempt {
            at: 20,
            error: "unreachable",
        };
        assert_eq!(
            store
                .upload_failed(sender(&key, stale), s, &failed, next, 3, 1)
                .await
                .expect("failed"),
            None
        );
        store
            .upload_retry_later(sender(&key, stale), next)
            .await
            .expect("retry later");
        assert!(!store
            .extend_upload_lease(sender(&key, stale), 600_000)
            .await
            .expect("extend"));
        store
            .release_upload(sender(&key, stale))
            .await
            .expect("release");
        let gave_up = Transition {
            state: TaskState::Failed,
            reason: "gave up at the due date".into(),
            ..Default::default()
        };
        assert_eq!(
            store
                .upload_finished(sender(&key, stale), s, Some(&gave_up), None, 4, 1)
                .await
                .expect("finish"),
            UploadFinish::RetiredAlready
        );
        let task = store.task(&key).await.expect("task").expect("row");
        assert_eq!((task.state, task.sequence), (TaskState::InProgress, s));
        let row: (Option<String>, Option<i64>, Option<String>) =
            sqlx::query_as("SELECT lease_owner, done_at, last_error FROM uploads")
                .fetch_one(&store.db.pool)
                .await
                .expect("upload");
        assert_eq!(row, (Some(holder.clone()), None, None));
        assert!(
            store
                .claim_uploads(30, 1, 600_000)
                .await
                .expect("claim")
                .is_empty(),
            "the holder's lease still stands"
        );

        // The holder's own failure is recorded, and frees the upload for its retry.
        assert!(store
            .extend_upload_lease(sender(&key, holder), 600_000)
            .await
            .expect("extend"));
        assert_eq!(
            store
                .upload_failed(sender(&key, holder), s, &failed, next, 5, 1)
                .await
                .expect("failed"),
            Some(s + 1)
        );
        store.db.pool.close().await;
    }

    #[tokio::test]
    async fn a_sender_that_lost_its_lease_records_nothing_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        a_sender_that_lost_its_lease_records_nothing(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn a_sender_that_lost_its_lease_records_nothing_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            a_sender_that_lost_its_lease_records_nothing(&u).await
        })
        .await;
    }

    /// The sweep of retired exports reads an upload again before it removes the folder: one
    /// an operator's retry dropped after the sweep listed it (its task's new export writes
    /// into the folder now), or whose files are recorded removed, is no longer retired.
    async fn an_export_is_swept_only_while_its_upload_is_retired(url: &str) {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        let key = |request_id: &str| TaskKey {
            controller: "acme".into(),
            request_id: request_id.into(),
            subprocessor: "crm".into(),
        };
        let mut conn = store.db.pool.acquire().await.expect("conn");
        for id in ["r-1", "r-2", "r-3"] {
            retire_unsent(&mut conn, &key(id), 5).await.expect("retire");
        }
        drop(conn);
        let listed = store.retired_exports_left(10, 0).await.expect("list");
        assert_eq!(listed.len(), 3);
        store
            .export_files_removed(&key("r-2"), 6)
            .await
            .expect("removed");
        sqlx::query("DELETE FROM uploads WHERE request_id = 'r-3'")
            .execute(&store.db.pool)
            .await
            .expect("a retry's delete");
        let mut still = Vec::new();
        for k in &listed {
            if store.export_still_retired(k).await.expect("read") {
                still.push(k.request_id.as_str());
            }
        }
        assert_eq!(still, ["r-1"]);
        store.db.pool.close().await;
    }

    #[tokio::test]
    async fn an_export_is_swept_only_while_its_upload_is_retired_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/p.db", dir.path().display());
        an_export_is_swept_only_while_its_upload_is_retired(&url).await;
    }

    #[tokio::test]
    async fn an_export_is_swept_only_while_its_upload_is_retired_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            an_export_is_swept_only_while_its_upload_is_retired(&u).await
        })
        .await;
    }
}
