//! What the store hands out, and the raw rows they are read from: numbers in the database
//! become enums and flags here, at the row boundary, and nowhere else.

use std::sync::atomic::{AtomicI64, Ordering};

use dsrelay_connectors::{BulkProgress, ErasedCount};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    Acknowledgement, ContractPhase, ContractProgress, DeliverRequest, Evidence, RequestKind,
    TaskState, TaskStatus, TransferReceipt,
};

use crate::task_machine::{progress_proto, Current};

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
    /// The holder's calls so far. A claim counts one (so that a call cut off by a crash
    /// counts), and a claim that ends without a call (a wait while the holder is
    /// unreachable, a contract end's wake-up after its return arrived) takes it back when its
    /// step is recorded.
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
    /// The recipient's receipt, once a TRANSFER task's part arrived.
    pub transfer_receipt: Option<TransferReceipt>,
    /// A contract end task's phase; UNSPECIFIED for every other kind.
    pub phase: ContractPhase,
    /// A contract end task's counts in its phase.
    pub counts: BulkProgress,
    /// A SCHEDULED contract end task's start (ms).
    pub scheduled_at: Option<i64>,
    /// When the request was cancelled while the holder worked on this task (ms): its outcome
    /// is recorded as what the holder did, saying the cancellation came too late.
    pub cancel_requested_at: Option<i64>,
    /// When the runner last called the holder without yet recording the answer (ms): set
    /// at a claim, the call was cut off and the holder may have done the work.
    pub call_started_at: Option<i64>,
}

impl TaskRow {
    /// The task as the state machine sees it.
    pub fn current(&self) -> Current<'_> {
        Current {
            subprocessor: &self.key.subprocessor,
            state: self.state,
            handle: self.handle.as_deref(),
            records_affected: self.records_affected,
            attempts: self.attempts,
            phase: self.phase,
            cancel_requested: self.cancel_requested_at.is_some(),
            retain_until: self.retain_until,
            legal_basis: &self.legal_basis,
            reason: &self.reason,
            call_started: self.call_started_at.is_some(),
        }
    }

    /// A contract end task's progress; `None` for every other kind.
    pub fn progress(&self) -> Option<ContractProgress> {
        (self.phase != ContractPhase::Unspecified)
            .then(|| progress_proto(self.phase, &self.counts, self.scheduled_at, self.state))
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
                transfer_receipt: self.transfer_receipt.clone(),
            }),
            reason: self.reason.clone(),
            legal_basis: retained_only(self.state, &self.legal_basis),
            retain_until: retained_only(self.state, &self.retain_until).map(timestamp_from_millis),
            updated_at: Some(timestamp_from_millis(self.updated_at)),
            progress: self.progress(),
        }
    }
}

/// `value` (a task's legal basis or retain-until) as reported for a task in `state`: the
/// protocol carries them for RETAINED only. A retention run awaiting the holder's
/// confirmation keeps them in its row (IN_PROGRESS) without reporting them.
pub(super) fn retained_only<T: Clone + Default>(state: TaskState, value: &T) -> T {
    if state == TaskState::Retained {
        value.clone()
    } else {
        T::default()
    }
}

/// A claimed task with its request.
#[derive(Debug)]
pub struct TaskJob {
    /// The task.
    pub task: TaskRow,
    /// The request as delivered; `None` for a tombstone.
    pub request: Option<DeliverRequest>,
    /// The request's due date (ms).
    pub due_at: i64,
    /// W3C traceparent of the Deliver call that brought the request.
    pub traceparent: Option<String>,
    /// The token of this claim's lease: renewals, transitions and postponements of the task
    /// made for this claim match it, and fail once another claim took the task.
    pub lease_owner: String,
    /// When the task is due as this claim last knew it (ms): as the claim found it, then as
    /// each step of the claim wrote it ([`TaskJob::moved`]). A postponement for this claim
    /// leaves a time set by anyone else meanwhile alone
    /// ([`Store::postpone`](super::Store::postpone)). Atomic because the runner holds the job
    /// by shared reference across its steps.
    pub next_attempt_at: AtomicI64,
}

impl TaskJob {
    /// When the task is due as this claim last wrote or found it (ms).
    pub fn due_as_known(&self) -> i64 {
        self.next_attempt_at.load(Ordering::Relaxed)
    }

    /// Notes that a step of this claim wrote `next_attempt_at`: its own later postponement
    /// must not take that for a time set by someone else (it would leave the step's time,
    /// often "now", and the retry would come with no backoff).
    pub fn moved(&self, next_attempt_at: i64) {
        self.next_attempt_at
            .store(next_attempt_at, Ordering::Relaxed);
    }
}

/// A task with its request, as the operator API shows it.
#[derive(Debug, Clone)]
pub struct ManualRow {
    /// The task.
    pub task: TaskRow,
    /// The request as delivered.
    pub request: Option<DeliverRequest>,
    /// The request's due date (ms).
    pub due_at: i64,
    /// The words of the last attempt that failed and was retried; empty when none did (or
    /// the request was forgotten).
    pub last_error: String,
    /// When the task's current wait began (ms; migration 0028 says which steps set and
    /// clear it); `None` while it does not wait.
    pub waiting_since: Option<i64>,
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
    /// The lease token its claim (or the step that handed it over) wrote: what this
    /// sender's failure, rejection and release match, so that once its lease ran out and
    /// another claim took the row, they leave the new holder's attempt alone.
    pub lease_owner: String,
}

/// The value a task state is stored as.
pub(super) fn state_value(state: TaskState) -> i64 {
    i64::from(state as i32)
}

/// The columns of [`TaskRecord`].
pub(super) const TASK_COLUMNS: &str = "controller, request_id, subprocessor, state, sequence, \
    attempts, records_affected, confirmed, note, reason, legal_basis, retain_until, updated_at, \
    handle, transfer_receipt, contract_phase, subjects_done, subjects_total, records_done, \
    records_total, scheduled_at, cancel_requested_at, call_started_at, erased_done";

/// A `tasks` row as stored.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct TaskRecord {
    controller: String,
    request_id: String,
    subprocessor: String,
    state: i64,
    sequence: i64,
    attempts: i64,
    records_affected: i64,
    confirmed: i64,
    note: String,
    reason: String,
    legal_basis: String,
    retain_until: Option<i64>,
    updated_at: i64,
    handle: Option<String>,
    transfer_receipt: Option<Vec<u8>>,
    contract_phase: i64,
    subjects_done: i64,
    subjects_total: i64,
    records_done: i64,
    records_total: i64,
    scheduled_at: Option<i64>,
    cancel_requested_at: Option<i64>,
    call_started_at: Option<i64>,
    erased_done: Option<String>,
}

impl From<TaskRecord> for TaskRow {
    fn from(r: TaskRecord) -> Self {
        Self {
            key: TaskKey {
                controller: r.controller,
                request_id: r.request_id,
                subprocessor: r.subprocessor,
            },
            state: i32::try_from(r.state)
                .ok()
                .and_then(|s| TaskState::try_from(s).ok())
                .unwrap_or(TaskState::Unspecified),
            sequence: r.sequence,
            attempts: r.attempts,
            records_affected: r.records_affected,
            confirmed: r.confirmed != 0,
            note: r.note,
            reason: r.reason,
            legal_basis: r.legal_basis,
            retain_until: r.retain_until,
            updated_at: r.updated_at,
            handle: r.handle,
            // A receipt that no longer decodes is shown as none rather than failing the read.
            transfer_receipt: r
                .transfer_receipt
                .and_then(|b| TransferReceipt::decode(b.as_slice()).ok()),
            phase: i32::try_from(r.contract_phase)
                .ok()
                .and_then(|p| ContractPhase::try_from(p).ok())
                .unwrap_or(ContractPhase::Unspecified),
            counts: BulkProgress {
                subjects_done: count(r.subjects_done),
                subjects_total: count(r.subjects_total),
                records_done: count(r.records_done),
                records_total: count(r.records_total),
                erased: erased_done(r.erased_done.as_deref()),
            },
            scheduled_at: r.scheduled_at,
            cancel_requested_at: r.cancel_requested_at,
            call_started_at: r.call_started_at,
        }
    }
}

/// The request kind a stored number stands for; UNSPECIFIED for one that names none.
pub(super) fn request_kind(v: i64) -> RequestKind {
    i32::try_from(v)
        .ok()
        .and_then(|k| RequestKind::try_from(k).ok())
        .unwrap_or(RequestKind::Unspecified)
}

/// A task row with its request's kind: the columns of [`TaskRecord`] and `kind`.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct KindedRecord {
    #[sqlx(flatten)]
    pub(super) task: TaskRecord,
    /// `None` when the request has no row.
    kind: Option<i64>,
}

impl KindedRecord {
    /// The request's kind; UNSPECIFIED when it has no row.
    pub(super) fn kind(&self) -> RequestKind {
        self.kind.map_or(RequestKind::Unspecified, request_kind)
    }
}

/// A task's stored counts by place (`erased_done`, a JSON array): none when NULL, and when
/// it does not read (the certificate then names the records those counts leave out).
pub(super) fn erased_done(stored: Option<&str>) -> Vec<ErasedCount> {
    stored
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

/// Counts by place as `erased_done` stores them.
pub(super) fn stored_erased(erased: &[ErasedCount]) -> Result<String, serde_json::Error> {
    serde_json::to_string(erased)
}

/// A stored count (BIGINT) as the wire's unsigned count.
pub(super) fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A count as stored (BIGINT).
pub(super) fn stored_count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Tasks joined with their requests, as the operator API reads them: the columns of
/// [`OperatorRecord`]. Callers add the WHERE clause.
pub(super) const JOINED_SELECT: &str = "SELECT t.controller, t.request_id, t.subprocessor, \
    t.state, t.sequence, t.attempts, t.records_affected, t.confirmed, t.note, t.reason, \
    t.legal_basis, t.retain_until, t.updated_at, t.handle, t.transfer_receipt, t.contract_phase, \
    t.subjects_done, t.subjects_total, t.records_done, t.records_total, t.scheduled_at, \
    t.cancel_requested_at, t.call_started_at, t.erased_done, r.body, r.due_at, r.traceparent, \
    t.last_error, t.waiting_since \
    FROM tasks t JOIN requests r ON r.controller = t.controller AND r.request_id = t.request_id";

/// A task row with the columns of its request that the runner and operators need.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct JoinedRecord {
    #[sqlx(flatten)]
    pub(super) task: TaskRecord,
    body: Option<Vec<u8>>,
    due_at: i64,
    traceparent: Option<String>,
}

impl JoinedRecord {
    fn request(&self) -> Option<DeliverRequest> {
        // A body that no longer decodes is treated like a tombstone: the task fails with why.
        self.body
            .as_deref()
            .and_then(|b| DeliverRequest::decode(b).ok())
    }
}

/// A task row as a claim wrote it (attempt counted, lease token set), with its request's
/// columns.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct ClaimedRecord {
    #[sqlx(flatten)]
    joined: JoinedRecord,
    /// For putting the claimed rows back in the order they were picked in.
    pub(super) next_attempt_at: i64,
    /// The token the claim wrote.
    lease_owner: String,
}

impl From<ClaimedRecord> for TaskJob {
    fn from(r: ClaimedRecord) -> Self {
        Self {
            request: r.joined.request(),
            due_at: r.joined.due_at,
            traceparent: r.joined.traceparent,
            task: r.joined.task.into(),
            lease_owner: r.lease_owner,
            next_attempt_at: AtomicI64::new(r.next_attempt_at),
        }
    }
}

/// A task row with its request's columns and the task's last error, which only operators
/// are shown.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct OperatorRecord {
    #[sqlx(flatten)]
    joined: JoinedRecord,
    last_error: Option<String>,
    waiting_since: Option<i64>,
}

impl From<OperatorRecord> for ManualRow {
    fn from(r: OperatorRecord) -> Self {
        Self {
            request: r.joined.request(),
            due_at: r.joined.due_at,
            task: r.joined.task.into(),
            last_error: r.last_error.unwrap_or_default(),
            waiting_since: r.waiting_since,
        }
    }
}

/// An `ack_outbox` row as claimed.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct AckRecord {
    pub(super) id: i64,
    controller: String,
    attempts: i64,
    payload: Vec<u8>,
    pub(super) lease_owner: Option<String>,
}

impl TryFrom<AckRecord> for AckJob {
    type Error = dsrelay_proto::prost::DecodeError;

    fn try_from(r: AckRecord) -> Result<Self, Self::Error> {
        Ok(Self {
            ack: Acknowledgement::decode(r.payload.as_slice())?,
            id: r.id,
            controller: r.controller,
            attempts: r.attempts,
            lease_owner: r.lease_owner.unwrap_or_default(),
        })
    }
}
