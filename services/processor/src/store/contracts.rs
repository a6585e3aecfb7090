//! Contract ends: their terms (stored with the delivery, replaced by UpdateContractEnd), the
//! progress acknowledgements of a running bulk step, and the operators' list.

use anyhow::Result;
use dsrelay_connectors::BulkProgress;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    Acknowledgement, ContractEnd, ContractEndChoice, ContractPhase, DeliverRequest, Evidence,
    TaskState, TransferRecipient,
};
use dsrelay_runtime::trace_context;
use sqlx::AnyConnection;

use super::rows::{count, retained_only, stored_count, TaskKey, TaskRecord, TaskRow, TASK_COLUMNS};
use super::{acks, tasks, Store};
use crate::task_machine::{amend, decide, Context, ContractEndAt, Decision, Event, Refusal, Terms};

/// The terms a delivery or update carries, if they are complete; `fallback` fills in the
/// dates an update leaves out.
pub(crate) fn terms_of(c: &ContractEnd, fallback: Option<&Terms>) -> Option<Terms> {
    let choice = ContractEndChoice::try_from(c.choice)
        .ok()
        .filter(|c| *c != ContractEndChoice::Unspecified)?;
    let millis = |t: Option<&dsrelay_proto::prost_types::Timestamp>| {
        t.map(dsrelay_proto::millis_from_timestamp)
    };
    let effective_at = millis(c.effective_at.as_ref()).or(fallback.map(|f| f.effective_at))?;
    let grace_ends_at = millis(c.grace_ends_at.as_ref()).or(fallback.map(|f| f.grace_ends_at))?;
    Some(Terms {
        choice,
        effective_at,
        grace_ends_at,
        return_confirmed: c.return_confirmed,
    })
}

/// The wire form of stored terms with the recipient they return the data to.
pub(crate) fn to_proto(t: &Terms, transfer_recipient: &str) -> ContractEnd {
    ContractEnd {
        choice: t.choice as i32,
        effective_at: Some(timestamp_from_millis(t.effective_at)),
        grace_ends_at: Some(timestamp_from_millis(t.grace_ends_at)),
        return_confirmed: t.return_confirmed,
        transfer_recipient: transfer_recipient.to_string(),
    }
}

/// What became of an update of a contract end's terms.
#[derive(Debug)]
pub enum Updated {
    /// The controller delivered no contract end with that id.
    NotFound,
    /// The update was refused.
    Refused(Refusal),
    /// The terms are as asked (changed or already so); the tasks as they stand.
    Done(Vec<TaskRow>),
}

/// One contract end as the processor holds it.
#[derive(Debug)]
pub struct ContractEndRow {
    /// The controller it is for.
    pub controller: String,
    /// The registry's request id.
    pub request_id: String,
    /// The terms as last delivered or updated.
    pub terms: Terms,
    /// The transfer recipient the data is returned to; empty for the registry.
    pub transfer_recipient: String,
    /// When it was delivered (ms).
    pub received_at: i64,
    /// Its tasks, one per subprocessor.
    pub tasks: Vec<TaskRow>,
}

/// A `contract_ends` row as stored.
#[derive(Debug, sqlx::FromRow)]
struct TermsRecord {
    controller: String,
    request_id: String,
    choice: i64,
    effective_at: i64,
    grace_ends_at: i64,
    return_confirmed: i64,
    received_at: i64,
    transfer_recipient: String,
}

impl TermsRecord {
    fn terms(&self) -> Terms {
        Terms {
            choice: i32::try_from(self.choice)
                .ok()
                .and_then(|c| ContractEndChoice::try_from(c).ok())
                .unwrap_or(ContractEndChoice::Unspecified),
            effective_at: self.effective_at,
            grace_ends_at: self.grace_ends_at,
            return_confirmed: self.return_confirmed != 0,
        }
    }
}

const TERMS_COLUMNS: &str = "controller, request_id, choice, effective_at, grace_ends_at, \
    return_confirmed, received_at, transfer_recipient";

/// New terms in words, for the audit trail.
fn terms_detail(t: &Terms, recipient: &str) -> String {
    let mut detail = format!(
        "terms now {}, effective {}, grace ends {}",
        t.choice.as_str_name(),
        crate::certificates::rfc3339(t.effective_at),
        crate::certificates::rfc3339(t.grace_ends_at)
    );
    if t.return_confirmed {
        detail.push_str(", return confirmed");
    }
    if !recipient.is_empty() {
        detail.push_str(&format!(", returned to {recipient}"));
    }
    detail
}

/// Stores the terms of a contract end delivered now (inside Deliver's transaction), with the
/// transfer recipient they name.
pub(super) async fn insert(
    tx: &mut AnyConnection,
    controller: &str,
    req: &DeliverRequest,
    terms: &Terms,
    now: i64,
) -> Result<()> {
    let recipient = req
        .parameters
        .as_ref()
        .and_then(|p| p.contract_end.as_ref())
        .map(|c| c.transfer_recipient.as_str())
        .unwrap_or_default();
    sqlx::query(
        "INSERT INTO contract_ends (controller, request_id, choice, effective_at, \
         grace_ends_at, return_confirmed, received_at, updated_at, transfer_recipient, \
         return_confirmed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9)",
    )
    .bind(controller)
    .bind(&req.request_id)
    .bind(i64::from(terms.choice as i32))
    .bind(terms.effective_at)
    .bind(terms.grace_ends_at)
    .bind(i64::from(terms.return_confirmed))
    .bind(now)
    .bind(recipient)
    .bind(terms.return_confirmed.then_some(now))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl Store {
    /// The terms of a contract end and the transfer recipient its data is returned to
    /// (empty for the registry), if the controller delivered one with that id.
    pub async fn contract_terms_and_recipient(
        &self,
        controller: &str,
        request_id: &str,
    ) -> Result<Option<(Terms, String)>> {
        let row: Option<TermsRecord> = sqlx::query_as(&format!(
            "SELECT {TERMS_COLUMNS} FROM contract_ends WHERE controller = $1 AND request_id = $2"
        ))
        .bind(controller)
        .bind(request_id)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.map(|r| (r.terms(), r.transfer_recipient)))
    }

    /// Replaces a contract end's terms with `wanted` when the rules allow
    /// (`crate::task_machine::amend`; the transfer recipient changes only with the choice)
    /// and reschedules its tasks as the task machine says, in one transaction. `recipient`,
    /// where to reach the recipient the terms name, replaces the stored one when given.
    pub async fn update_contract_end(
        &self,
        controller: &str,
        request_id: &str,
        wanted: &ContractEnd,
        recipient: Option<&TransferRecipient>,
        now: i64,
    ) -> Result<Updated> {
        let mut tx = self.begin_audited().await?;
        let stored: Option<TermsRecord> = sqlx::query_as(&format!(
            "SELECT {TERMS_COLUMNS} FROM contract_ends WHERE controller = $1 AND request_id = $2{}",
            self.db.backend.lock_rows()
        ))
        .bind(controller)
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(record) = stored else {
            return Ok(Updated::NotFound);
        };
        let stored = record.terms();
        let wanted_name = wanted.transfer_recipient.clone();
        let Some(wanted) = terms_of(wanted, Some(&stored)) else {
            return Ok(Updated::Refused(Refusal::Invalid(
                "contract_end.choice",
                "must be NONE, DELETE or RETURN_THEN_DELETE".into(),
            )));
        };
        // The tasks are locked (on SQLite the one writer holds every other off): whether
        // deleting started decides the update, and a runner's step committing meanwhile (to
        // DELETING, say) must be read, not passed over. The request's row first, as every
        // transaction locking both does (it may be updated below), then the tasks in order.
        super::lock_requests(&mut tx, &[(controller, request_id)]).await?;
        let (lock, bytes) = (self.db.backend.lock_rows(), self.db.backend.bytewise());
        let rows: Vec<TaskRecord> = sqlx::query_as(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE controller = $1 AND request_id = $2 \
             ORDER BY subprocessor{bytes}{lock}"
        ))
        .bind(controller)
        .bind(request_id)
        .fetch_all(&mut *tx)
        .await?;
        let rows: Vec<TaskRow> = rows.into_iter().map(TaskRow::from).collect();
        let deleting = rows
            .iter()
            .any(|t| matches!(t.phase, ContractPhase::Deleting | ContractPhase::Done));
        let terms = match amend(&stored, &wanted, deleting) {
            Ok(t) => t,
            Err(refusal) => return Ok(Updated::Refused(refusal)),
        };
        let new_recipient = wanted_recipient(&record, &stored, &terms, &wanted_name);
        let new_recipient = match new_recipient {
            Ok(r) => r,
            Err(refusal) => return Ok(Updated::Refused(refusal)),
        };
        if let Some(r) = recipient.filter(|r| r.name == new_recipient) {
            sqlx::query(
                "UPDATE requests SET recipient_name = $1, recipient_endpoint = $2, \
                 recipient_identity = $3, recipient_public_keys = $4 \
                 WHERE controller = $5 AND request_id = $6",
            )
            .bind(&r.name)
            .bind(&r.endpoint)
            .bind(&r.identity)
            .bind(r.public_keys.join(" "))
            .bind(controller)
            .bind(request_id)
            .execute(&mut *tx)
            .await?;
        }
        if terms == stored && new_recipient == record.transfer_recipient {
            tx.commit().await?;
            return Ok(Updated::Done(rows));
        }
        sqlx::query(
            "UPDATE contract_ends SET transfer_recipient = $1 WHERE controller = $2 \
             AND request_id = $3",
        )
        .bind(&new_recipient)
        .bind(controller)
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
        // The confirmation's time is kept from the update that first says so: the contract
        // end's certificate states it, and `updated_at` moves with any later change.
        sqlx::query(
            "UPDATE contract_ends SET choice = $1, grace_ends_at = $2, return_confirmed = $3, \
             updated_at = $4, return_confirmed_at = CASE WHEN $3 = 1 AND return_confirmed = 0 \
             THEN $4 ELSE return_confirmed_at END WHERE controller = $5 AND request_id = $6",
        )
        .bind(i64::from(terms.choice as i32))
        .bind(terms.grace_ends_at)
        .bind(i64::from(terms.return_confirmed))
        .bind(now)
        .bind(controller)
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
        let record = super::audit::Record {
            controller,
            request_id,
            actor: controller,
            detail: terms_detail(&terms, &new_recipient),
        };
        let event = dsrelay_proto::v1::ProcessorAuditEvent::ContractEndUpdated;
        super::audit::append(&mut tx, event, now, record).await?;
        for task in &rows {
            let event = Event::TermsChanged {
                terms: &terms,
                scheduled_at: task.scheduled_at,
            };
            match decide(&task.current(), event, &Context::at(now)) {
                Decision::Move(t) => {
                    tasks::transition(&mut tx, &task.key, task.sequence, &t, now, task.attempts)
                        .await?;
                }
                Decision::Later { at, .. } => {
                    sqlx::query(
                        "UPDATE tasks SET next_attempt_at = $1 WHERE controller = $2 \
                         AND request_id = $3 AND subprocessor = $4 AND sequence = $5",
                    )
                    .bind(at)
                    .bind(controller)
                    .bind(request_id)
                    .bind(&task.key.subprocessor)
                    .bind(task.sequence)
                    .execute(&mut *tx)
                    .await?;
                }
                _ => {}
            }
        }
        tx.commit().await?;
        Ok(Updated::Done(self.tasks(controller, request_id).await?))
    }

    /// Records a running bulk step's new progress, the task otherwise unchanged, and queues
    /// its acknowledgement, if the task is still at `expected_sequence`, IN_PROGRESS, and
    /// held by the claim `lease_owner`. Returns the new sequence. A step whose lease was
    /// taken by another claim records nothing: its progress would move the sequence under
    /// the new holder's step, which could then record no outcome. `(phase, step)`: the
    /// step's phase and words; a task whose earlier attempt failed (its reason says so,
    /// `task_machine::retry`) has the reason cleared and `step` as its note again, since a
    /// holder reporting progress answers again.
    pub async fn record_progress(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        lease_owner: &str,
        (phase, step): (ContractPhase, &str),
        p: BulkProgress,
        now: i64,
    ) -> Result<Option<i64>> {
        let mut tx = self.db.pool.begin().await?;
        let row: Option<TaskRecord> = sqlx::query_as(&format!(
            "UPDATE tasks SET sequence = $1, contract_phase = $2, subjects_done = $3, \
             subjects_total = $4, records_done = $5, records_total = $6, updated_at = $7, \
             note = CASE WHEN reason = '' THEN note ELSE $14 END, reason = '', \
             erased_done = $15 \
             WHERE controller = $8 AND request_id = $9 AND subprocessor = $10 \
             AND sequence = $11 AND state = $12 AND lease_owner = $13 RETURNING {TASK_COLUMNS}"
        ))
        .bind(expected_sequence + 1)
        .bind(i64::from(phase as i32))
        .bind(stored_count(p.subjects_done))
        .bind(stored_count(p.subjects_total))
        .bind(stored_count(p.records_done))
        .bind(stored_count(p.records_total))
        .bind(now)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .bind(i64::from(TaskState::InProgress as i32))
        .bind(lease_owner)
        .bind(step)
        .bind(super::rows::stored_erased(&p.erased)?)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row.map(TaskRow::from) else {
            tx.rollback().await?;
            return Ok(None);
        };
        let ack = Acknowledgement {
            request_id: key.request_id.clone(),
            subprocessor: key.subprocessor.clone(),
            sequence: row.sequence as u64,
            state: row.state as i32,
            evidence: Some(Evidence {
                records_affected: row.records_affected,
                note: row.note.clone(),
                confirmed: row.confirmed,
                transfer_receipt: None,
            }),
            reason: row.reason.clone(),
            legal_basis: retained_only(row.state, &row.legal_basis),
            retain_until: retained_only(row.state, &row.retain_until).map(timestamp_from_millis),
            occurred_at: Some(timestamp_from_millis(now)),
            attempt: row.attempts.clamp(0, i64::from(u32::MAX)) as u32,
            traceparent: trace_context::traceparent_of(&tracing::Span::current())
                .unwrap_or_default(),
            certificate: None,
            progress: row.progress(),
        };
        let queued = acks::NewAck {
            key: key.clone(),
            sequence: row.sequence,
            ack,
            at: now,
        };
        acks::queue_all(&mut tx, &[queued], None).await?;
        tx.commit().await?;
        Ok(Some(row.sequence))
    }

    /// Records what the return of `key`'s task counted (`returned`'s done counts), for the
    /// erasure's check ([`dsrelay_connectors::BulkJob::returned`]), if the task still awaits
    /// the controller's confirmation at `expected_sequence` under the claim `lease_owner`.
    /// Written before the erasure's start, which gives the task's counts to the erasure; a
    /// claim cut off between the two writes it again. False when the task changed.
    pub async fn record_returned(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        lease_owner: &str,
        returned: BulkProgress,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET returned_subjects = $1, returned_records = $2 \
             WHERE controller = $3 AND request_id = $4 AND subprocessor = $5 \
             AND sequence = $6 AND contract_phase = $7 AND lease_owner = $8",
        )
        .bind(stored_count(returned.subjects_done))
        .bind(stored_count(returned.records_done))
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .bind(i64::from(ContractPhase::AwaitingConfirmation as i32))
        .bind(lease_owner)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that a start call of `key`'s contract end export begins now (`at`, ms since
    /// the epoch), for the erasure's check ([`dsrelay_connectors::BulkJob::returned_since_ms`]),
    /// if the task is still at `expected_sequence` under the claim `lease_owner`. Each start
    /// overwrites the one before: the connectors that read the time run their export again
    /// whole on every start, so the snapshot returned is the last start's, and an earlier
    /// time would refuse what that run returned. False when the task changed.
    pub async fn record_export_started(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        lease_owner: &str,
        at: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET export_started_at = $1 \
             WHERE controller = $2 AND request_id = $3 AND subprocessor = $4 \
             AND sequence = $5 AND lease_owner = $6",
        )
        .bind(at)
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .bind(expected_sequence)
        .bind(lease_owner)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// What the return of `key`'s task counted ([`Store::record_returned`]), as the export's
    /// done counts (its totals the same), with when the export's last start call began
    /// ([`Store::record_export_started`], `None` when that was not recorded); `None` when
    /// nothing was returned before its erasure.
    pub async fn returned(&self, key: &TaskKey) -> Result<Option<(BulkProgress, Option<i64>)>> {
        let row: Option<(Option<i64>, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT returned_subjects, returned_records, export_started_at FROM tasks \
             WHERE controller = $1 AND request_id = $2 AND subprocessor = $3",
        )
        .bind(&key.controller)
        .bind(&key.request_id)
        .bind(&key.subprocessor)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(match row {
            Some((Some(subjects), Some(records), started)) => Some((
                BulkProgress::counts(
                    count(subjects),
                    count(subjects),
                    count(records),
                    count(records),
                ),
                started,
            )),
            _ => None,
        })
    }

    /// The task of a contract end of `key`'s controller at `key`'s subprocessor whose
    /// deletion there has begun (phase DELETING or DONE), for a RETAINED erasure `key` whose
    /// retention run comes ([`Event::Superseded`]); `None` when there is none. Only tasks
    /// that still keep, still delete, or erased all count: one that ended NOT_FOUND,
    /// REFUSED or CANCELLED stripped nothing. A contract end whose deletion there ended (its
    /// first certificate, or its COMPLETED step when none was issued) before the erasure's
    /// request arrived is left out: the erasure found the subject after it, so what it keeps
    /// is not that contract end's. Of several, one still deleting (or FAILED) comes first,
    /// then one RETAINED, then one COMPLETED; the latest delivered among equals.
    pub(crate) async fn contract_end_deleting(
        &self,
        key: &TaskKey,
    ) -> Result<Option<ContractEndAt>> {
        let rows: Vec<DeletingRecord> = sqlx::query_as(
            "SELECT t.request_id, t.state, t.contract_phase, t.retain_until, t.updated_at, \
             c.received_at, \
             (SELECT MIN(f.issued_at) FROM certificates f WHERE f.controller = t.controller \
              AND f.request_id = t.request_id AND f.subprocessor = t.subprocessor) \
              AS first_certified, \
             (SELECT l.id FROM certificates l WHERE l.controller = t.controller \
              AND l.request_id = t.request_id AND l.subprocessor = t.subprocessor \
              ORDER BY l.sequence DESC LIMIT 1) AS last_certificate, \
             (SELECT r.received_at FROM requests r WHERE r.controller = t.controller \
              AND r.request_id = $3) AS erasure_received \
             FROM tasks t JOIN contract_ends c \
             ON c.controller = t.controller AND c.request_id = t.request_id \
             WHERE t.controller = $1 AND t.subprocessor = $2 \
             AND t.contract_phase IN ($4, $5)",
        )
        .bind(&key.controller)
        .bind(&key.subprocessor)
        .bind(&key.request_id)
        .bind(i64::from(ContractPhase::Deleting as i32))
        .bind(i64::from(ContractPhase::Done as i32))
        .fetch_all(&self.db.pool)
        .await?;
        let rank = |state: TaskState| match state {
            TaskState::Completed => Some(2),
            TaskState::Retained => Some(1),
            TaskState::Pending
            | TaskState::InProgress
            | TaskState::WaitingForOperator
            | TaskState::Failed => Some(0),
            _ => None,
        };
        let found = rows
            .into_iter()
            .filter_map(|r| {
                let state = i32::try_from(r.state)
                    .ok()
                    .and_then(|s| TaskState::try_from(s).ok())
                    .unwrap_or(TaskState::Unspecified);
                let ended = r
                    .first_certified
                    .or((state == TaskState::Completed).then_some(r.updated_at));
                let before = matches!((ended, r.erasure_received), (Some(e), Some(a)) if e < a);
                Some((rank(state).filter(|_| !before)?, -r.received_at, state, r))
            })
            .min_by_key(|(rank, newest, _, r)| (*rank, *newest, r.request_id.clone()));
        Ok(found.map(|(_, _, state, r)| ContractEndAt {
            failed_when_done: state == TaskState::Failed
                && r.contract_phase == i64::from(ContractPhase::Done as i32),
            request_id: r.request_id,
            state,
            retain_until: r.retain_until,
            certificate: r.last_certificate,
        }))
    }

    /// The contract ends delivered here (only `controller`'s unless empty), newest first.
    pub async fn contract_ends(&self, controller: &str) -> Result<Vec<ContractEndRow>> {
        let rows: Vec<TermsRecord> = sqlx::query_as(&format!(
            "SELECT {TERMS_COLUMNS} FROM contract_ends WHERE ($1 = '' OR controller = $1) \
             ORDER BY received_at DESC, request_id DESC"
        ))
        .bind(controller)
        .fetch_all(&self.db.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let tasks = self.tasks(&r.controller, &r.request_id).await?;
            out.push(ContractEndRow {
                terms: r.terms(),
                transfer_recipient: r.transfer_recipient.clone(),
                controller: r.controller,
                request_id: r.request_id,
                received_at: r.received_at,
                tasks,
            });
        }
        Ok(out)
    }
}

/// A contract end task deleting at a holder, as [`Store::contract_end_deleting`] reads it.
#[derive(Debug, sqlx::FromRow)]
struct DeletingRecord {
    request_id: String,
    state: i64,
    contract_phase: i64,
    retain_until: Option<i64>,
    updated_at: i64,
    /// When the contract end was delivered.
    received_at: i64,
    first_certified: Option<i64>,
    last_certificate: Option<String>,
    /// When the erasure's request was delivered.
    erasure_received: Option<i64>,
}

/// The transfer recipient after an update to `terms`: it changes only with the choice (a
/// final choice's recipient is final too), and only RETURN_THEN_DELETE names one.
fn wanted_recipient(
    record: &TermsRecord,
    stored: &Terms,
    terms: &Terms,
    wanted: &str,
) -> Result<String, Refusal> {
    if wanted == record.transfer_recipient {
        return Ok(wanted.to_string());
    }
    if !wanted.is_empty() && terms.choice != ContractEndChoice::ReturnThenDelete {
        return Err(Refusal::Invalid(
            "contract_end.transfer_recipient",
            "only a RETURN_THEN_DELETE contract end returns data to a recipient".into(),
        ));
    }
    if stored.choice != ContractEndChoice::None {
        return Err(Refusal::TooLate(format!(
            "the controller already chose {} and where the data goes",
            stored.choice.as_str_name()
        )));
    }
    Ok(wanted.to_string())
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{RequestKind, RequestParameters};
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::store::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    /// A runner's step starting to delete commits while an update of the terms waits for
    /// the task's row: the update reads the step and is refused as too late, rather than
    /// changing the terms of a deletion under way.
    #[tokio::test]
    async fn an_update_waits_for_a_step_that_starts_deleting_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            let db = Db::connect(&url).await.expect("connect");
            db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
                .await
                .expect("migrate");
            let store = Store::new(db, b"test key");
            let terms = |grace_ends_at: i64| ContractEnd {
                choice: ContractEndChoice::Delete as i32,
                effective_at: Some(timestamp_from_millis(1_000)),
                grace_ends_at: Some(timestamp_from_millis(grace_ends_at)),
                return_confirmed: false,
                transfer_recipient: String::new(),
            };
            let req = DeliverRequest {
                request_id: "ce-1".into(),
                kind: RequestKind::ContractEnd as i32,
                parameters: Some(RequestParameters {
                    contract_end: Some(terms(2_000)),
                    ..Default::default()
                }),
                ..Default::default()
            };
            store
                .accept("acme", &req, &["crm".into()], None, 1)
                .await
                .expect("accept");
            // The runner's step to DELETING, not committed yet.
            let mut step = store.db.pool.begin().await.expect("begin");
            sqlx::query(
                "UPDATE tasks SET sequence = sequence + 1, contract_phase = $1 \
                 WHERE request_id = 'ce-1'",
            )
            .bind(i64::from(ContractPhase::Deleting as i32))
            .execute(&mut *step)
            .await
            .expect("step");
            let update = {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .update_contract_end("acme", "ce-1", &terms(5_000), None, 3)
                        .await
                        .expect("update")
                })
            };
            crate::test_postgres::until_waiting_for_a_lock(&store.db.pool).await;
            step.commit().await.expect("commit");
            let updated = update.await.expect("joined");
            assert!(
                matches!(updated, Updated::Refused(Refusal::TooLate(_))),
                "{updated:?}"
            );
            let (stored, _) = store
                .contract_terms_and_recipient("acme", "ce-1")
                .await
                .expect("terms")
                .expect("stored");
            assert_eq!(stored.grace_ends_at, 2_000);
            store.db.pool.close().await;
        })
        .await;
    }
}
