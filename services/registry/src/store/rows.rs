//! Rows as read from the tables, decoded by `sqlx::FromRow`, and the conversions from stored
//! values to the enums the store decides with.
//!
//! A request's kind and state are decoded into their enums when a row is read (a value no
//! enum knows fails the read); an event's type and states, which the API hands on unchanged,
//! stay the `i32` the wire carries.

use std::fmt;
use std::str::FromStr;

use dsrelay_proto::v1::{RequestKind, RequestState, TaskState, TaskStatus};

use crate::fold::request_is_open;

/// What an outbox row asks of a processor. Stored as text (`deliver`, `cancel`, `update`,
/// `extend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Deliver the request.
    Deliver,
    /// Cancel a request delivered (or possibly being delivered) before.
    Cancel,
    /// Send a contract end's terms as they stand (`ProcessorService.UpdateContractEnd`):
    /// one row per contract end, re-armed by every change of its terms.
    Update,
    /// Send the request's due date as it stands (`ProcessorService.ExtendDueDate`): one row
    /// per processor the request is delivered to, re-armed by every extension.
    Extend,
}

impl Operation {
    /// The stored text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Deliver => "deliver",
            Self::Cancel => "cancel",
            Self::Update => "update",
            Self::Extend => "extend",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An outbox row whose operation this registry does not know (written by a newer version).
#[derive(Debug, thiserror::Error)]
#[error("unknown outbox operation {0:?}")]
pub struct UnknownOperation(String);

impl FromStr for Operation {
    type Err = UnknownOperation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deliver" => Ok(Self::Deliver),
            "cancel" => Ok(Self::Cancel),
            "update" => Ok(Self::Update),
            "extend" => Ok(Self::Extend),
            other => Err(UnknownOperation(other.to_string())),
        }
    }
}

impl TryFrom<String> for Operation {
    type Error = UnknownOperation;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A stored request state; a value this build does not know reads as `UNSPECIFIED`.
pub(super) fn request_state(v: i32) -> RequestState {
    RequestState::try_from(v).unwrap_or(RequestState::Unspecified)
}

/// A stored task state; a value this build does not know reads as `UNSPECIFIED`.
pub(super) fn task_state(v: i32) -> TaskState {
    TaskState::try_from(v).unwrap_or(TaskState::Unspecified)
}

/// The columns of [`RequestRow`], for `SELECT`s `FROM requests` (unaliased: `answered_at`
/// names `requests.id`). `answered_at` is the first event that carries COMPLETED (4) or
/// PARTIALLY_COMPLETED (5) as the request's new state: a STATE_CHANGED (5), or the SUBMITTED
/// (1) of a request no processor held data of. No column keeps it: `finished_at` moves to
/// when a retention run completes the request, years after the subject was answered.
pub(super) const REQUEST_COLUMNS: &str = "id, partner, idempotency_key, body, kind, state, \
    received_at, due_at, extension_months, extension_reasons, trace_id, cancel_reason, \
    updated_at, finished_at, (SELECT MIN(e.occurred_at) FROM events e \
    WHERE e.request_id = requests.id AND e.type IN (1, 5) AND e.request_state IN (4, 5)) \
    AS answered_at";

/// A request as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RequestRow {
    /// Request id.
    pub id: String,
    /// Submitting partner.
    pub partner: String,
    /// The partner's idempotency key.
    pub idempotency_key: String,
    /// The encoded SubmitRequest; `None` once identities are forgotten.
    pub body: Option<Vec<u8>>,
    /// Request kind.
    #[sqlx(try_from = "i32")]
    pub kind: RequestKind,
    /// Folded state.
    #[sqlx(try_from = "i32")]
    pub state: RequestState,
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
    /// When the row last changed (ms): receipt, state, due date, forgetting.
    pub updated_at: i64,
    /// When it last reached COMPLETED, FAILED or CANCELLED (ms); `None` in any other state.
    pub finished_at: Option<i64>,
    /// When it first reached COMPLETED or PARTIALLY_COMPLETED (ms), from its events: when
    /// the subject could be answered.
    pub answered_at: Option<i64>,
}

impl RequestRow {
    /// Whether the due date has passed while the controller still owes an answer.
    pub fn overdue(&self, now: i64) -> bool {
        self.due_at < now && request_is_open(self.state)
    }

    /// Whether the subject was answered after the due date as it stands.
    pub fn answered_late(&self) -> bool {
        self.answered_at.is_some_and(|at| at > self.due_at)
    }
}

/// A delivery row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    /// Processor name.
    pub processor: String,
    /// What the row sends.
    #[sqlx(try_from = "String")]
    pub op: Operation,
    /// Attempts so far.
    pub attempts: i64,
    /// Next attempt (ms).
    pub next_attempt_at: i64,
    /// Last failure.
    pub last_error: Option<String>,
    /// When the processor accepted (ms).
    pub done_at: Option<i64>,
    /// When it was dead-lettered after repeated refusal (ms).
    pub dead_lettered_at: Option<i64>,
    /// When the request's cancellation (or forgetting) took it off the outbox before an
    /// acceptance was recorded (ms); `done_at` is set then too, but nothing was delivered.
    pub withdrawn_at: Option<i64>,
}

/// A claimed outbox row with what is needed to send it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryJob {
    /// Request id.
    pub request_id: String,
    /// Processor name.
    pub processor: String,
    /// What to ask of the processor.
    #[sqlx(try_from = "String")]
    pub op: Operation,
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
    /// The request's kind (proto enum value).
    pub kind: i64,
    /// A contract end's terms as stored when the row was claimed, right before it is sent
    /// (the `contracts` row, not the request's body, which forgetting removes); `None` for
    /// every other kind.
    #[sqlx(flatten)]
    pub terms: ContractTerms,
    /// The token of this claim's lease, the row's own: the outcome and release of the row
    /// made for this claim match it, and change nothing once another claim took the row.
    pub lease_owner: String,
}

/// A contract end's terms as the outbox reads them with a claimed row; every field is
/// `None` when the request is not a contract end.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct ContractTerms {
    /// ContractEndChoice (proto enum value).
    pub contract_choice: Option<i64>,
    /// Effective date (ms).
    pub contract_effective_at: Option<i64>,
    /// End of the grace period (ms).
    pub contract_grace_ends_at: Option<i64>,
    /// 1 once the return was confirmed.
    pub contract_return_confirmed: Option<i64>,
    /// The transfer recipient the data is returned to; empty for a package.
    pub contract_transfer_recipient: Option<String>,
    /// The terms' version (see the `contracts` table).
    pub contract_version: Option<i64>,
}

impl ContractTerms {
    /// The terms as the protocol carries them, when the request is a contract end.
    pub fn contract_end(&self) -> Option<dsrelay_proto::v1::ContractEnd> {
        Some(dsrelay_proto::v1::ContractEnd {
            choice: i32::try_from(self.contract_choice?).unwrap_or_default(),
            effective_at: Some(dsrelay_proto::timestamp_from_millis(
                self.contract_effective_at?,
            )),
            grace_ends_at: Some(dsrelay_proto::timestamp_from_millis(
                self.contract_grace_ends_at?,
            )),
            return_confirmed: self.contract_return_confirmed? != 0,
            transfer_recipient: self.contract_transfer_recipient.clone().unwrap_or_default(),
        })
    }
}

/// A stored event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    /// Increasing id.
    pub id: i64,
    /// Event type (proto enum value).
    #[sqlx(rename = "type")]
    pub event_type: i32,
    /// When (ms).
    pub occurred_at: i64,
    /// The request's state when the event was recorded (proto enum value): the new state
    /// for STATE_CHANGED, the state before the event's change for the others.
    pub request_state: i32,
    /// Processor concerned.
    pub processor: String,
    /// Subprocessor concerned.
    pub subprocessor: String,
    /// Task state after the event (proto enum value, as the processor reported it).
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
    /// An encoded ContractProgress, for a CONTRACT_END task's update.
    pub progress: Option<Vec<u8>>,
}

/// A processor's last reported subprocessor list.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct ChainRow {
    /// The encoded SubprocessorList, if it ever answered.
    pub subprocessors: Option<Vec<u8>>,
    /// When it last answered (ms).
    pub reported_at: Option<i64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// The columns of [`TaskRow`], for `SELECT`s.
pub(super) const TASK_COLUMNS: &str = "processor, subprocessor, state, sequence, \
    records_affected, confirmed, note, reason, legal_basis, retain_until, updated_at, \
    transfer_receipt, progress";

/// A task as stored; the API sees it as a [`TaskStatus`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct TaskRow {
    processor: String,
    subprocessor: String,
    /// As the processor reported it (proto enum value).
    state: i32,
    sequence: i64,
    records_affected: i64,
    /// 0 or 1: both backends store it as an integer, which `bool` does not decode from.
    confirmed: i64,
    note: String,
    reason: String,
    legal_basis: String,
    retain_until: Option<i64>,
    updated_at: i64,
    /// An encoded TransferReceipt: a COMPLETED TRANSFER task's, or a contract end task's
    /// returned to a transfer recipient.
    transfer_receipt: Option<Vec<u8>>,
    /// An encoded ContractProgress, for a CONTRACT_END task.
    progress: Option<Vec<u8>>,
}

impl From<TaskRow> for TaskStatus {
    fn from(r: TaskRow) -> Self {
        Self {
            processor: r.processor,
            subprocessor: r.subprocessor,
            state: r.state,
            sequence: r.sequence.max(0) as u64,
            evidence: Some(dsrelay_proto::v1::Evidence {
                records_affected: r.records_affected,
                note: r.note,
                confirmed: r.confirmed != 0,
                // Written by this registry from a decoded message: it decodes again.
                transfer_receipt: r.transfer_receipt.and_then(|b| {
                    <dsrelay_proto::v1::TransferReceipt as dsrelay_proto::prost::Message>::decode(
                        b.as_slice(),
                    )
                    .ok()
                }),
            }),
            reason: r.reason,
            legal_basis: r.legal_basis,
            retain_until: r.retain_until.map(dsrelay_proto::timestamp_from_millis),
            updated_at: Some(dsrelay_proto::timestamp_from_millis(r.updated_at)),
            // Written by this registry from a decoded message: it decodes again.
            progress: r.progress.and_then(|b| {
                <dsrelay_proto::v1::ContractProgress as dsrelay_proto::prost::Message>::decode(
                    b.as_slice(),
                )
                .ok()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_read_back_as_stored() {
        for op in [
            Operation::Deliver,
            Operation::Cancel,
            Operation::Update,
            Operation::Extend,
        ] {
            assert_eq!(op.as_str().parse::<Operation>().unwrap(), op);
            assert_eq!(op.to_string(), op.as_str());
        }
        assert!("redeliver".parse::<Operation>().is_err());
    }

    /// The numbers `REQUEST_COLUMNS` writes out are the enums' own.
    #[test]
    fn the_answer_is_read_from_the_events_that_give_it() {
        use dsrelay_proto::v1::EventType;
        let clause = format!(
            "e.type IN ({}, {}) AND e.request_state IN ({}, {})",
            EventType::Submitted as i32,
            EventType::StateChanged as i32,
            RequestState::Completed as i32,
            RequestState::PartiallyCompleted as i32
        );
        assert!(REQUEST_COLUMNS.contains(&clause), "{REQUEST_COLUMNS}");
    }

    #[test]
    fn unknown_states_read_as_unspecified() {
        assert_eq!(request_state(999), RequestState::Unspecified);
        assert_eq!(task_state(999), TaskState::Unspecified);
        assert_eq!(
            request_state(RequestState::Completed as i32),
            RequestState::Completed
        );
    }
}
