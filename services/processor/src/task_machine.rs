//! The life of a task as one pure function: from the task as it stands, what just happened
//! and the time, to what the store records next. Nothing here reads a clock, a database or
//! a connector, so every rule is tested alone; the runner, the operator API and
//! cancellation ask [`decide`] and store what it answers.
//!
//! # Rules
//! - claimed, its subprocessor gone or its request body missing → FAILED with why
//! - claimed, a TRANSFER the registry delivered without a recipient (it no longer configures
//!   the one named) → FAILED with why: there is nowhere to send the data
//! - claimed, a kind its connector does not support → REFUSED naming the kind
//! - claimed PENDING → IN_PROGRESS (kept reserved), then run [`Phase::Start`]; claimed
//!   IN_PROGRESS → ask again ([`Phase::Confirm`] with the holder's handle, else
//!   [`Phase::Start`]); claimed RETAINED (its date has come) → [`Phase::RetentionExpired`]
//! - holder marked unreachable → wait for it without calling it, until the mark ends (and no
//!   later than the due date); past the due date it is called anyway. A wait is no attempt
//!   (the claim's count is taken back). Waits 1, 2, 4, 8... of the task
//!   ([`worth_acknowledging`]) stay IN_PROGRESS with a reason saying since when the holder is
//!   unreachable and why, when the next try comes and until when ([`holder_down`]; handle and
//!   count kept), acknowledged as a retry is; the waits in between, a retention run's and a
//!   task marked cancelled are only postponed. The holder's answer, when it comes, replaces
//!   the reason with its outcome's
//! - COMPLETED of a RETURN_OF_DATA or a TRANSFER → stays IN_PROGRESS (confirmed, with its
//!   export files listed) and queues the delivery of the export: to the registry for a
//!   return of data, to the recipient for a transfer. The task is COMPLETED only when the
//!   registry holds the part, or the recipient's receipt came back and matched what was sent
//!   ([`Event::Delivered`], the receipt recorded and acknowledged); an export that cannot be
//!   sent as written (a file vanished or changed, a refusal for good) → FAILED with why
//! - a delivery attempt failed ([`Event::DeliveryFailed`]: destination down, wrong identity,
//!   a refused chunk or receipt) → stays IN_PROGRESS with a note saying what is missing,
//!   when it failed, when the next attempt comes ([`delivery_retry_at`]: after the backoff,
//!   no later than the due date) and until when, acknowledged on attempts 1, 2, 4, 8...
//!   ([`worth_acknowledging`]) and on any attempt whose cause differs from the last one
//!   acknowledged ([`same_cause`]), only retried in between; past the due date → FAILED
//!   with the last reason
//! - a later attempt got through ([`Event::DeliveryUnderWay`]: the destination took a file of
//!   it whole, or the attempt resumes a file the destination holds part of) → the failure's
//!   note replaced, once per attempt, by one saying the delivery is under way (which
//!   attempt, since when, which file from which byte, to whom), acknowledged; nothing
//!   without a failure's note to replace, or on a task marked cancelled
//! - COMPLETED, NOT_FOUND → final and confirmed; RETAINED → sleeps until its date (the
//!   holder's next release, not the end of all retention), then runs again to erase what was
//!   released, RETAINED again with the next date while anything is kept; after a retention
//!   run the records count is cumulative
//! - ACCEPTED → IN_PROGRESS awaiting confirmation, asked again every confirm interval; the
//!   same handle again changes nothing and is not acknowledged. The records counted so far
//!   stay; accepted in a retention run, the task also keeps its legal basis and date (the
//!   data is there until the holder confirms), and the confirmation counts as that run:
//!   its count adds to the earlier ones, and it is asked for however late
//! - a step that ends an export task without delivering it (cancelled, failed, refused, not
//!   found) has its folder removed ([`Transition::discard_export`])
//! - WAITING_FOR_OPERATOR → sleeps until an operator completes or refuses it
//! - a RETAINED erasure whose date has come, at a holder where a contract end of the same
//!   controller has begun deleting ([`Event::Superseded`]): that deletion keeps what an
//!   obligation keeps stripped of the match columns, so the holder finding the subject no
//!   more proves nothing; the erasure follows the contract end's task there without calling
//!   the holder. It is RETAINED with a later date → RETAINED until that date (its own legal
//!   basis kept), the note naming the contract end whose retention keeps the rest;
//!   COMPLETED → COMPLETED, the note naming it (and its last certificate) as what erased the
//!   rest, nothing more counted; still deleting or waiting, due for its own retention run,
//!   or FAILED while deleting → looked at again a confirm interval later (its own date
//!   kept), acknowledged (RETAINED, the note naming the contract end and the state of its
//!   task) only when that note changes; FAILED in its own retention run, which is not
//!   retried → FAILED, saying what the contract end kept may still be held. The holder
//!   must be configured and support the kind (else the claim fails the task as usual). A
//!   retention run's COMPLETED or NOT_FOUND that finds such a deletion begun meanwhile is
//!   decided the same way, what the run erased counted
//! - REFUSED by the holder → REFUSED with its reason
//! - transient error → retry after the backoff (or the holder's Retry-After, if longer),
//!   until the due date; retained data past its date is erased however late. Attempts 1, 2,
//!   4, 8... ([`worth_acknowledging`]) stay IN_PROGRESS with a reason saying what failed, at
//!   which attempt, when the next comes and until when ([`retry`]; handle and count kept),
//!   acknowledged so the registry shows why nothing moves; the attempts in between, a
//!   retention run's and a task marked cancelled are only postponed
//! - transient error past the due date, or a permanent error → FAILED with the reason; a
//!   give-up at the due date holds only while the request's date has not moved past it
//!   ([`Transition::due_by`]): an extension that came during the attempt takes it back
//! - cancelled while PENDING (claimed or not: its start then matches nothing, so the holder
//!   is never called), IN_PROGRESS between attempts, or WAITING_FOR_OPERATOR → CANCELLED;
//!   later states stay as they are
//! - cancelled while the holder works (IN_PROGRESS under a runner's lease, accepted work
//!   awaiting the holder's confirmation, or a call to the holder whose answer was never
//!   recorded, cut off by a shutdown or a crash: the next claim makes it again, as
//!   interrupted) → cancellation requested ([`Decision::Mark`]): the state stays, and what
//!   the holder did is recorded when it answers ([`too_late`]): a final outcome (COMPLETED
//!   with its evidence, NOT_FOUND, RETAINED, REFUSED, FAILED) as it is, saying the
//!   cancellation came too late; accepted work goes on being confirmed; an export written is
//!   not delivered (CANCELLED, its files removed); a transient failure or an operator's
//!   turn → CANCELLED, saying what is known
//! - an operator completes (or finds nothing) or refuses only a task WAITING_FOR_OPERATOR
//! - an operator retries only a FAILED or REFUSED task (RetryTask), a refusal being often
//!   fixable at the holder (its configuration, an identity it can match by): → IN_PROGRESS
//!   with the operator's note as its reason and nothing of the failed or refused run, its
//!   holder called at once ([`Phase::Start`]) under the same task key; a contract end task
//!   resumes in its phase (below)
//!
//! # Contract ends (one task per subprocessor over all of a controller's data)
//! - claimed PENDING (phase SCHEDULED) before its start ([`Terms::starts_at`]: the effective
//!   date, or the end of the grace period while no choice is made) → waits until then
//! - claimed PENDING at its start → IN_PROGRESS (kept reserved) and a bulk step: an export
//!   (phase RETURNING) for RETURN_THEN_DELETE not yet confirmed, else an erasure (DELETING)
//! - the export written → stays IN_PROGRESS (RETURNING) and queues its delivery: to the
//!   registry as the task's part of the package, or to the transfer recipient the terms name;
//!   the registry holds the part, or the recipient's receipt matched → IN_PROGRESS
//!   AWAITING_CONFIRMATION (with the receipt), never COMPLETED: the data is still there.
//!   The uploader schedules it for the end of the grace period, its note naming what the
//!   controller does next ([`awaiting_confirmation`])
//! - AWAITING_CONFIRMATION sleeps until the controller confirms receipt; then → DELETING.
//!   No confirmation by the end of the grace period → DELETING then, as without a choice,
//!   the note saying no confirmation came
//! - the erasure done → COMPLETED (DONE); kept under an obligation → RETAINED (DONE), erased
//!   by the processor itself at its date like a single erasure
//! - refused by the holder, or a permanent error → FAILED with why: the data is not gone;
//!   transient errors → retried until the due date (the latest moment the data may exist),
//!   acknowledged as for a single task, in the step's phase; either keeps the counts the
//!   call reported last (what was done is still done: [`step_counts`]), or those recorded
//!   when it reported nothing
//! - an erasure resumed (after a call cut off, a failure, an operator's retry) reports the
//!   whole step's counts ([`step_counts`]): done from what was recorded on, the total the one
//!   counted when the deletion began, unknown (0) when an earlier call erased uncounted
//! - new terms ([`Event::TermsChanged`]): a SCHEDULED task is rescheduled to the new start
//!   (at once when it has passed); a confirmed return releases AWAITING_CONFIRMATION; an
//!   unconfirmed one waits until the new grace end, scheduled for it
//! - cancelled: tasks not yet deleting are CANCELLED, keeping their counts (an export
//!   written, not delivered, still counts what it exported); once deleting, the erasure
//!   reports what it did (never "cancelled" over work that was done). A return a sender holds
//!   on its way to a transfer recipient is marked instead ([`Decision::Mark`]): the
//!   recipient may close the part before the sender sees the mark. Not delivered (the sender
//!   stopped, or failed) → CANCELLED as an undelivered export; the recipient's receipt came
//!   back → CANCELLED with the receipt, saying the recipient received the data, too late to
//!   stop; never AWAITING_CONFIRMATION nor DELETING, since the contract end was cancelled
//! - an operator completing a manual RETURNING step queues the delivery of its return record
//!   (the task stays RETURNING); once that is delivered it moves to AWAITING_CONFIRMATION.
//!   An operator completing a manual step (RETURNING, or DELETING → COMPLETED DONE) gives its
//!   counts: the records confirmed, done of as many, the subjects unknown ([`operator_counts`])
//! - an operator retries a FAILED or REFUSED task (RetryTask) in the phase it ended in, the
//!   operator's note as its reason, its holder called at once ([`operator_retry`]):
//!   RETURNING → the export runs again from the start (counts from zero, the failed run's
//!   export and upload discarded), then its delivery; DELETING → the erasure runs again from the progress
//!   recorded, which the connector counts on from (never twice); AWAITING_CONFIRMATION →
//!   waits for the confirmation again; SCHEDULED (failed at its start) → PENDING, started as
//!   the terms then say; DONE (failed in a retention run) is not retried

use std::fmt;
use std::ops::ControlFlow;

use dsrelay_connectors::{
    kind_label, sum_erased, BulkOp, BulkProgress, ConnectorError, ErasedCount, ExportedFile,
    Outcome, Phase,
};
use dsrelay_proto::v1::{
    ContractEndChoice, ContractPhase, ContractProgress, RequestKind, TaskState, TransferReceipt,
};
use dsrelay_runtime::clock::date_label;

use crate::certificates::{Erased, Uncounted};

/// Never: for tasks only an operator moves on.
pub(crate) const NEVER: i64 = i64::MAX;

/// The task as it stands, as far as its next state depends on it.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    /// The subprocessor the task is for, named in messages.
    pub subprocessor: &'a str,
    /// Its state.
    pub state: TaskState,
    /// The holder's reference for work it accepted and has not confirmed yet.
    pub handle: Option<&'a str>,
    /// Records reported so far: a retention run adds to them.
    pub records_affected: i64,
    /// Claims so far, this one included (`TaskRow::attempts`, as the claim returns it): the
    /// holder's calls made before it, plus this claim's. The runner takes back the count of a
    /// claim that ends without a call, so a retry's and a give-up's reason say which call.
    pub attempts: i64,
    /// A contract end task's phase; UNSPECIFIED for every other kind.
    pub phase: ContractPhase,
    /// The request was cancelled while the holder worked on this task: its outcome is
    /// recorded as what the holder did, saying the cancellation came too late.
    pub cancel_requested: bool,
    /// When a RETAINED task's erasure runs again (ms): the holder's next release date, not
    /// the end of all retention; its retention run is for that date. Still set on an
    /// IN_PROGRESS task whose retention run awaits the holder's confirmation (the data is
    /// kept until the holder confirms the erasure).
    pub retain_until: Option<i64>,
    /// The legal basis a RETAINED task's data is kept under, kept with it like
    /// `retain_until` while its retention run awaits the holder's confirmation.
    pub legal_basis: &'a str,
    /// The reason recorded last (`TaskRow::reason`): while an export's delivery is retried,
    /// the note of the last failure acknowledged, which tells whether the next failure's
    /// cause is news ([`same_cause`]).
    pub reason: &'a str,
    /// The runner called the holder and recorded no answer yet (`TaskRow::call_started_at`):
    /// the call is under way, or was cut off (a shutdown, a crash, a lost lease) after the
    /// holder may have done the work.
    pub call_started: bool,
}

/// The terms of a contract end as the processor holds them (times in ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// The controller's choice (never UNSPECIFIED once stored).
    pub choice: ContractEndChoice,
    /// When the contract ends.
    pub effective_at: i64,
    /// When the data goes if no choice is made.
    pub grace_ends_at: i64,
    /// RETURN_THEN_DELETE: the controller confirmed receipt of the package.
    pub return_confirmed: bool,
}

impl Terms {
    /// When the first step runs: nothing happens before the effective date, and without a
    /// choice nothing happens before the grace period ends.
    pub fn starts_at(&self) -> i64 {
        if self.choice == ContractEndChoice::None {
            self.grace_ends_at
        } else {
            self.effective_at
        }
    }

    /// The first bulk step: the data goes back first unless the return is already confirmed.
    pub fn first_op(&self) -> BulkOp {
        if self.choice == ContractEndChoice::ReturnThenDelete && !self.return_confirmed {
            BulkOp::Export
        } else {
            BulkOp::Erase
        }
    }
}

/// A contract end task's progress as a step records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractStep {
    /// The new phase.
    pub phase: ContractPhase,
    /// The counts; `None` keeps the recorded ones.
    pub progress: Option<BulkProgress>,
    /// SCHEDULED: when it starts; `None` keeps the recorded time.
    pub scheduled_at: Option<i64>,
}

impl ContractStep {
    /// `phase` with `progress`.
    fn at(phase: ContractPhase, progress: BulkProgress) -> Self {
        Self {
            phase,
            progress: Some(progress),
            scheduled_at: None,
        }
    }

    /// `phase`, keeping the recorded counts.
    fn keep(phase: ContractPhase) -> Self {
        Self {
            phase,
            progress: None,
            scheduled_at: None,
        }
    }
}

/// The counts of a contract end's step an operator did by hand (a manual holder reports no
/// progress of its own): the records the operator confirmed, done of as many, since the count
/// is given once the work is; the subjects unknown (0), which no operator is asked for.
fn operator_counts(records_affected: i64) -> BulkProgress {
    let records = u64::try_from(records_affected).unwrap_or(0);
    BulkProgress::counts(0, 0, records, records)
}

/// The phase a bulk step runs in.
pub(crate) fn phase_of(op: BulkOp) -> ContractPhase {
    match op {
        BulkOp::Export => ContractPhase::Returning,
        BulkOp::Erase => ContractPhase::Deleting,
    }
}

/// The wire form of a task's recorded progress, the task being in `state`; `scheduled_at`
/// only while it is SCHEDULED (when it starts) or AWAITING_CONFIRMATION (the end of the
/// grace period, when the data is deleted, confirmed or not: [`awaiting_confirmation`]) and
/// has not ended: a task cancelled (or failed, or refused) before then keeps the phase and
/// the date in its row, and nothing happens at it.
pub(crate) fn progress_proto(
    phase: ContractPhase,
    p: &BulkProgress,
    scheduled_at: Option<i64>,
    state: TaskState,
) -> ContractProgress {
    ContractProgress {
        phase: phase as i32,
        subjects_done: p.subjects_done,
        subjects_total: p.subjects_total,
        records_done: p.records_done,
        records_total: p.records_total,
        scheduled_at: scheduled_at
            .filter(|_| {
                matches!(
                    phase,
                    ContractPhase::Scheduled | ContractPhase::AwaitingConfirmation
                ) && !is_final(state)
            })
            .map(dsrelay_proto::timestamp_from_millis),
    }
}

/// Per target and action, the larger of `recorded` and `last`, as done counts are kept:
/// a connector's counts by place go on from the recorded ones, and one that reports none
/// (or fewer) leaves those recorded.
fn larger_erased(recorded: &[ErasedCount], mut last: Vec<ErasedCount>) -> Vec<ErasedCount> {
    for r in recorded {
        match (last.iter_mut()).find(|l| l.target == r.target && l.action == r.action) {
            Some(l) => l.count = l.count.max(r.count),
            None => last.push(r.clone()),
        }
    }
    last
}

/// The counts a bulk step's call records as the step's, from the connector's last report
/// (`last`), the progress the task recorded of the step before the call (`recorded`) and
/// whether an earlier call was cut off before its answer was recorded (`cut_off`). Only an
/// erasure's [`Phase::Start`] call goes on from an earlier one: an export runs again whole,
/// and a confirmation or a retention run counts as its holder says.
///
/// An erasure resumed after an earlier call (cut off, or failed) reports the whole step's
/// counts, never only what the resumed call counted as if it were the whole: done is at least
/// what was recorded before, and the total stays the one counted when the deletion began. A
/// connector going on from the recorded progress counts what was left, which misses what the
/// earlier call erased after its last recorded progress: its total would come out below the
/// one counted at the start ([`uncounted`] tells the certificate). When an earlier call was
/// cut off with nothing recorded, what it erased is counted nowhere and no earlier total is
/// known: the totals are reported as unknown (0) once anything is done, and stay so for the
/// calls after (a recorded total of 0 beside a done count is kept); with nothing done yet
/// they are left as counted, so that the recorded progress of a call that passed its check
/// ([`BulkJob::returned`]) is never all zero.
///
/// [`BulkJob::returned`]: dsrelay_connectors::BulkJob::returned
pub(crate) fn step_counts(
    op: BulkOp,
    phase: &Phase,
    (recorded, cut_off): (&BulkProgress, bool),
    last: BulkProgress,
) -> BulkProgress {
    if op != BulkOp::Erase || !matches!(phase, Phase::Start) {
        return last;
    }
    let anything_done = last.records_done > 0 || last.subjects_done > 0;
    if cut_off && *recorded == BulkProgress::default() {
        return match anything_done {
            true => BulkProgress {
                subjects_total: 0,
                records_total: 0,
                ..last
            },
            false => last,
        };
    }
    // A total of 0 beside a done count was reported unknown by an earlier call: it stays so.
    let total = |recorded_done: u64, recorded_total: u64, total: u64| {
        if recorded_total == 0 && recorded_done > 0 {
            0
        } else {
            recorded_total.max(total)
        }
    };
    BulkProgress {
        subjects_done: recorded.subjects_done.max(last.subjects_done),
        subjects_total: total(
            recorded.subjects_done,
            recorded.subjects_total,
            last.subjects_total,
        ),
        records_done: recorded.records_done.max(last.records_done),
        records_total: total(
            recorded.records_done,
            recorded.records_total,
            last.records_total,
        ),
        erased: larger_erased(&recorded.erased, last.erased),
    }
}

/// What the decision may depend on besides the task.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context {
    /// The processor's clock (ms).
    pub now: i64,
    /// The request's due date (ms): retries stop there.
    pub due_at: i64,
    /// How long a claimed task stays reserved (ms).
    pub lease_ms: i64,
    /// How long to wait before asking a holder again for its confirmation (ms).
    pub confirm_interval_ms: i64,
    /// The backoff drawn for this attempt (ms); the caller draws it, so the jitter stays out.
    pub backoff_ms: i64,
}

impl Context {
    /// A context for events that depend on the time alone (cancellation, operators).
    pub(crate) fn at(now: i64) -> Self {
        Self {
            now,
            due_at: i64::MAX,
            lease_ms: 0,
            confirm_interval_ms: 0,
            backoff_ms: 0,
        }
    }
}

/// The connector a claimed task would run through.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Holder {
    /// Its type (`sql`, `adapter`, ...), for messages.
    pub connector: &'static str,
    /// Whether it supports the request's kind.
    pub supports: bool,
}

/// The task of a contract end of a task's controller at the task's holder, once its
/// deletion there has begun (DELETING, or DONE) ([`Store::contract_end_deleting`]): that
/// bulk erasure covers the subject's data, and strips the rows it keeps of the columns a
/// request's identities match.
///
/// [`Store::contract_end_deleting`]: crate::store::Store::contract_end_deleting
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContractEndAt {
    /// The contract end's request id.
    pub request_id: String,
    /// The state of its task at the holder.
    pub state: TaskState,
    /// RETAINED: when its own retention run erases what it keeps (ms).
    pub retain_until: Option<i64>,
    /// The id of the last certificate issued for its task, if any.
    pub certificate: Option<String>,
    /// Its task FAILED after its deletion there was done (its own retention run failed),
    /// which is not retried: it will not erase what it kept.
    pub failed_when_done: bool,
}

/// What happened to a task.
#[derive(Debug)]
pub(crate) enum Event<'a> {
    /// A RETAINED erasure's retention run found a contract end of its controller deleting
    /// at its holder (`by`): the rest of its data is the contract end's to erase.
    Superseded {
        /// The contract end's task at the holder.
        by: &'a ContractEndAt,
        /// What the run's call answered (COMPLETED or NOT_FOUND) when the deletion was found
        /// after it; `None` when found at the claim, with no call made.
        ran: Option<Outcome>,
    },
    /// A runner claimed it. `holder` is `None` when its subprocessor is no longer configured
    /// or the request body is missing.
    Claimed {
        /// The request's kind.
        kind: RequestKind,
        /// The connector it would run through.
        holder: Option<Holder>,
        /// Whether the request names where a transfer goes (only a TRANSFER needs one).
        recipient: bool,
    },
    /// The runner was about to take `phase`, but the holder is marked unreachable until
    /// `until` ([`crate::breaker`]).
    HolderDown {
        /// The step it would take.
        phase: Phase,
        /// When to look at the task again (ms): the mark's end, or shortly while another
        /// task probes the holder.
        until: i64,
        /// Since when the holder has been failing (ms).
        since: i64,
        /// Its last transient error.
        error: &'a str,
        /// The task's waits for the holder, this one included.
        waits: i64,
    },
    /// A runner claimed a contract end task. `terms` is `None` when they are missing.
    ContractClaimed {
        /// The connector it would run through.
        holder: Option<Holder>,
        /// The contract end's terms.
        terms: Option<Terms>,
    },
    /// The connector took bulk step `op` in `phase` and ended in `result`, having reported
    /// `progress` last; `earlier` is the progress recorded of the step before the call.
    BulkRan {
        /// Export or erase.
        op: BulkOp,
        /// The step it took.
        phase: Phase,
        /// What it ended in.
        result: Result<Outcome, ConnectorError>,
        /// The connector's last report; all zero for a failed call that was to check the
        /// holder against the return and recorded nothing (its counts may predate the check).
        progress: BulkProgress,
        /// What the task recorded of this step before the call ([`BulkJob::recorded_progress`]):
        /// an earlier call's last progress, all zero when there was none.
        ///
        /// [`BulkJob::recorded_progress`]: dsrelay_connectors::BulkJob::recorded_progress
        earlier: BulkProgress,
    },
    /// The controller changed a contract end's terms (UpdateContractEnd).
    TermsChanged {
        /// The terms now.
        terms: &'a Terms,
        /// When the task is scheduled to start, as recorded.
        scheduled_at: Option<i64>,
    },
    /// The connector took `phase` and ended in `result`.
    Ran {
        /// The request's kind: what a completed export means depends on it.
        kind: RequestKind,
        /// The step it took.
        phase: Phase,
        /// What it ended in.
        result: Result<Outcome, ConnectorError>,
    },
    /// The controller cancelled the request.
    Cancel {
        /// The controller's reason.
        reason: &'a str,
        /// A runner holds the task's lease: its holder may be working on it right now.
        leased: bool,
        /// The request asks for the data itself (RETURN_OF_DATA, TRANSFER): the task's
        /// folder may hold what an attempt wrote.
        exports: bool,
        /// A sender holds the task's export on its way to a transfer recipient, a third
        /// party: the recipient may hold the data before the sender records it. Only a
        /// contract end's return reads it; `leased` says as much of a TRANSFER's.
        transferring: bool,
    },
    /// An operator did the work of a manual task.
    OperatorComplete {
        /// The subject was not found.
        not_found: bool,
        /// Records the operator changed.
        records_affected: i64,
        /// The operator's evidence.
        note: &'a str,
        /// The operator's identity.
        by: &'a str,
        /// The request asks for the data itself (RETURN_OF_DATA, TRANSFER): done by hand, the
        /// task is delivered as the record of it, never COMPLETED on the operator's word.
        exports: bool,
        /// A return done by hand (a contract end's, or a return of data or transfer): the
        /// record of it the processor wrote into the task's export folder, which goes where
        /// the data was asked to go (the registry, or the recipient) as the task's part.
        record: Option<&'a ExportedFile>,
    },
    /// An operator will not do the work of a manual task.
    OperatorRefuse {
        /// Why.
        reason: &'a str,
        /// The operator's identity.
        by: &'a str,
        /// The request asks for the data itself (RETURN_OF_DATA, TRANSFER): the task's
        /// folder may hold what the holder wrote before it turned to an operator.
        exports: bool,
    },
    /// An operator fixed what made a task fail and asks for it to run again (RetryTask).
    OperatorRetry {
        /// What was fixed.
        note: &'a str,
        /// The operator's identity.
        by: &'a str,
    },
    /// The destination holds the task's part: the registry answered CompletePart, or the
    /// recipient answered CompleteTransfer with a receipt that matches what was sent.
    Delivered {
        /// Where it went.
        to: Destination<'a>,
        /// Files in the part.
        files: usize,
        /// Their bytes.
        bytes: u64,
        /// The recipient's receipt (transfers only).
        receipt: Option<TransferReceipt>,
    },
    /// The export cannot be delivered as written: a file vanished or changed at the
    /// processor, or the destination refused it for good.
    Undeliverable {
        /// Where it was to go.
        to: Destination<'a>,
        /// Why.
        reason: &'a str,
    },
    /// An attempt after a failed one got through to the destination: it took a file of the
    /// attempt whole, or it holds part of one and the attempt resumes it.
    DeliveryUnderWay {
        /// Where it goes.
        to: Destination<'a>,
        /// Files in the export.
        files: usize,
        /// Their bytes.
        bytes: u64,
        /// Delivery attempts so far, this one included.
        attempt: i64,
        /// When the attempt began (ms).
        since: i64,
        /// The file that got through.
        file: &'a str,
        /// The byte the attempt sends it from: what the destination held of it before.
        from: u64,
    },
    /// One attempt to deliver the export failed in a way that may pass (the destination
    /// down or presenting another identity, a refused chunk, a receipt that does not match).
    DeliveryFailed {
        /// Where it was to go.
        to: Destination<'a>,
        /// Files in the export.
        files: usize,
        /// Their bytes.
        bytes: u64,
        /// Delivery attempts so far, this one included.
        attempt: i64,
        /// What went wrong.
        error: &'a str,
    },
}

/// Where an export is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Destination<'a> {
    /// The controller's registry (RETURN_OF_DATA, and a contract end's return).
    Registry,
    /// The recipient of a transfer, by the registry's name for it.
    Recipient(&'a str),
}

impl fmt::Display for Destination<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Registry => f.write_str("the registry"),
            Destination::Recipient(name) => write!(f, "recipient {name}"),
        }
    }
}

/// The new state of a task and what goes with it: what the store records, and the
/// acknowledgement it queues.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transition {
    /// New state.
    pub state: TaskState,
    /// Records affected.
    pub records_affected: i64,
    /// Whether the holder confirmed.
    pub confirmed: bool,
    /// Evidence note.
    pub note: String,
    /// Reason for REFUSED, FAILED and CANCELLED.
    pub reason: String,
    /// Legal basis for RETAINED.
    pub legal_basis: String,
    /// For RETAINED: when the erasure runs again (ms), the holder's next release date.
    pub retain_until: Option<i64>,
    /// When the runner should look at the task again (ms); `None` means now.
    pub next_attempt_at: Option<i64>,
    /// The holder's reference for accepted, unconfirmed work.
    pub handle: Option<String>,
    /// The files an export wrote into the task's folder (metadata only); `None` keeps what
    /// is recorded (no export in this step).
    pub export_files: Option<Vec<ExportedFile>>,
    /// Keep the task reserved for this long (ms) from the moment the step is recorded, by
    /// the database's clock like every lease: for a step after which the same runner goes on
    /// working on the task. `None` releases it.
    pub hold_ms: Option<i64>,
    /// Queue the delivery of the task's export (a RETURN_OF_DATA, TRANSFER or contract end
    /// export written, or a manual return's record).
    pub upload: bool,
    /// What this step erased where, as the connector counted it, and what those counts may
    /// leave out: the deletion certificate of an ERASURE or a contract end lists it. Not
    /// stored with the task.
    pub erased: Erased,
    /// The recipient's receipt, recorded with the task and carried by the acknowledgement;
    /// `None` keeps what is recorded.
    pub transfer_receipt: Option<TransferReceipt>,
    /// A contract end task's phase and progress; `None` keeps what is recorded.
    pub contract: Option<ContractStep>,
    /// The holder's words of a failure the task is retried after (`retry`), recorded as
    /// its `last_error` for operators, as a postponement records them; `None` keeps what is
    /// recorded. Only the runner's steps write it ([`Store::transition_leased`]).
    ///
    /// [`Store::transition_leased`]: crate::store::Store::transition_leased
    pub error: Option<String>,
    /// Recorded only while the request's due date is at most this (ms): a give-up at the due
    /// date, decided with the date the task was claimed with, which an extension arriving
    /// meanwhile (`ExtendDueDate`) takes back. The step then writes nothing, and the caller
    /// tries the task again under the new date.
    pub due_by: Option<i64>,
    /// The step ends an export task without a delivery (cancelled, failed, refused...): what
    /// the connector wrote into the task's folder goes nowhere, so the folder is removed
    /// rather than kept until the request is forgotten. The store records it with the step
    /// (as an upload retired unsent, which the forget worker's sweep of retired exports
    /// removes should the caller not get to it).
    pub discard_export: bool,
}

/// What to do about an event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Record the transition and acknowledge it.
    Move(Transition),
    /// Record `start` first when there is one (and acknowledge it), then call the holder's
    /// bulk step `op` in `phase` (contract ends).
    RunBulk {
        /// The transition before the call.
        start: Option<Transition>,
        /// Export or erase.
        op: BulkOp,
        /// The step to take.
        phase: Phase,
    },
    /// Record `start` first when there is one (and acknowledge it), then call the holder to
    /// take `phase`.
    Run {
        /// The transition before the call.
        start: Option<Transition>,
        /// The step to take.
        phase: Phase,
    },
    /// Keep the state and its sequence (nothing is acknowledged), noting in the task's row
    /// that its request was cancelled while the holder worked: the outcome, when it comes,
    /// is recorded as what the holder did.
    Mark {
        /// The note for the task's row (its reason).
        reason: String,
    },
    /// Nothing the controller sees changed: look at the task again at `at` (ms). `error` is
    /// kept for operators when the task waits because of a failure.
    Later {
        /// When (ms).
        at: i64,
        /// Why, for operators.
        error: Option<String>,
    },
    /// The event does not apply to the task as it stands; nothing to record.
    Ignore,
    /// The event is a mistake in this state (an operator confirming a task that does not
    /// wait for one); why.
    Reject(String),
}

impl Decision {
    /// When a task whose holder's call failed in a way that may pass is tried again, and the
    /// holder's words: a postponement with an error, or a retry acknowledged ([`retry`]).
    pub(crate) fn retried(&self) -> Option<(i64, &str)> {
        match self {
            Self::Later {
                at,
                error: Some(error),
            } => Some((*at, error)),
            Self::Move(t) => Some((t.next_attempt_at?, t.error.as_deref()?)),
            _ => None,
        }
    }

    /// The decision's name, for an error that is logged: its `Debug` holds the texts it
    /// carries (a holder's error, a reason), which may name the subject.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Move(_) => "Move",
            Self::RunBulk { .. } => "RunBulk",
            Self::Run { .. } => "Run",
            Self::Mark { .. } => "Mark",
            Self::Later { .. } => "Later",
            Self::Ignore => "Ignore",
            Self::Reject(_) => "Reject",
        }
    }
}

/// The next step of `task` after `event`.
pub(crate) fn decide(task: &Current<'_>, event: Event<'_>, ctx: &Context) -> Decision {
    let export = exporting(task, &event);
    match decide_event(task, event, ctx) {
        Decision::Move(t) if export && !t.upload && is_final(t.state) => {
            Decision::Move(Transition {
                discard_export: true,
                ..t
            })
        }
        other => other,
    }
}

/// Whether `event` concerns an export of `task`, whose folder under the data folder may hold
/// files (whole or partly written). A delivery's outcome does not count: its upload is
/// retired with it, and the folder of a retired upload is removed already.
fn exporting(task: &Current<'_>, event: &Event<'_>) -> bool {
    let kind_exports = match event {
        Event::Claimed { kind, .. } | Event::Ran { kind, .. } => crate::exports::exports(*kind),
        Event::BulkRan { op, .. } => *op == BulkOp::Export,
        Event::Cancel { exports, .. }
        | Event::OperatorRefuse { exports, .. }
        | Event::OperatorComplete { exports, .. } => *exports,
        Event::Delivered { .. }
        | Event::Undeliverable { .. }
        | Event::DeliveryFailed { .. }
        | Event::DeliveryUnderWay { .. } => return false,
        Event::HolderDown { .. }
        | Event::Superseded { .. }
        | Event::ContractClaimed { .. }
        | Event::TermsChanged { .. }
        | Event::OperatorRetry { .. } => false,
    };
    kind_exports || task.phase == ContractPhase::Returning
}

/// States a task never leaves.
fn is_final(state: TaskState) -> bool {
    crate::store::FINAL.contains(&state)
}

/// [`decide`], before an ended export is marked for removal.
fn decide_event(task: &Current<'_>, event: Event<'_>, ctx: &Context) -> Decision {
    use TaskState::*;
    match event {
        Event::Claimed {
            kind,
            holder,
            recipient,
        } => claimed(task, kind, holder, recipient, ctx),
        Event::ContractClaimed { holder, terms } => contract_claimed(task, holder, terms, ctx),
        Event::Superseded { by, ran } if task.cancel_requested => {
            too_late(task, superseded(task, by, ran, ctx))
        }
        Event::Superseded { by, ran } => superseded(task, by, ran, ctx),
        Event::BulkRan {
            op,
            phase,
            result,
            progress,
            earlier,
        } => bulk_ran(task, op, phase, result, (earlier, progress), ctx),
        Event::TermsChanged {
            terms,
            scheduled_at,
        } => terms_changed(task, terms, scheduled_at, ctx),
        Event::HolderDown {
            phase,
            until,
            since,
            error,
            waits,
        } => holder_down(task, phase, (until, since, error, waits), ctx),
        Event::Ran {
            kind,
            phase,
            result,
        } if task.cancel_requested => too_late(task, ran(task, kind, phase, result, ctx)),
        Event::Ran {
            kind,
            phase,
            result,
        } => ran(task, kind, phase, result, ctx),
        // Once a contract end is deleting, the erasure reports what it did.
        Event::Cancel { .. }
            if matches!(task.phase, ContractPhase::Deleting | ContractPhase::Done) =>
        {
            Decision::Ignore
        }
        Event::Cancel { .. } if task.cancel_requested => Decision::Ignore,
        // The holder is working (or accepted the work, or was called and no answer was
        // recorded: a call cut off by a shutdown or a crash may have done the work): it
        // cannot be called back, so what it did is what the task reports. A cut-off call is
        // made again by the next claim, told it was interrupted.
        Event::Cancel { reason, leased, .. }
            if task.state == InProgress
                && task.phase == ContractPhase::Unspecified
                && (leased || task.handle.is_some() || task.call_started) =>
        {
            Decision::Mark {
                reason: format!(
                    "cancellation requested ({}) while subprocessor {} was working on the \
                     task: too late to stop it; what it did is reported when it answers",
                    clip(reason),
                    task.subprocessor
                ),
            }
        }
        // A contract end's data on its way to its transfer recipient: the part may be closed
        // (CompleteTransfer under way) before the sender sees the mark, and a receipt that
        // comes back is then reported rather than dropped.
        Event::Cancel {
            reason,
            transferring: true,
            ..
        } if task.state == InProgress && task.phase == ContractPhase::Returning => Decision::Mark {
            reason: format!(
                "cancellation requested ({}) while the controller's data was being \
                     returned to its transfer recipient: nothing more is sent and the part is \
                     not closed; if the recipient already received it, that is reported, too \
                     late to stop",
                clip(reason)
            ),
        },
        // What was done stands in the count (a contract end's export written, not delivered).
        Event::Cancel { reason, .. } => match task.state {
            Pending | InProgress | WaitingForOperator => Decision::Move(Transition {
                state: Cancelled,
                records_affected: task.records_affected,
                reason: format!("cancelled: {reason}"),
                ..Default::default()
            }),
            _ => Decision::Ignore,
        },
        Event::OperatorComplete { .. } | Event::OperatorRefuse { .. }
            if task.state != WaitingForOperator =>
        {
            Decision::Reject(format!(
                "the task is {}, not waiting for an operator",
                task.state.as_str_name().trim_start_matches("TASK_STATE_")
            ))
        }
        // A return done by hand is delivered as a record of it, like any part: a contract
        // end's (to the registry, or to its transfer recipient; the controller confirms once
        // every subprocessor's part has arrived), or a return of data's or a transfer's, whose
        // data must reach the registry or the recipient before the task is COMPLETED.
        Event::OperatorComplete {
            not_found,
            exports,
            records_affected,
            note,
            by,
            record,
        } if returned_by_hand(task.phase, exports, not_found) => {
            let returning = task.phase == ContractPhase::Returning;
            match record {
                Some(file) => Decision::Move(Transition {
                    state: InProgress,
                    records_affected,
                    confirmed: true,
                    note: format!(
                        "{note} ({} {by}); the record of {} is delivered as this \
                         subprocessor's part ({}, {})",
                        if returning {
                            "returned by"
                        } else {
                            "done by hand by"
                        },
                        if returning { "the return" } else { "it" },
                        file.name,
                        size_label(file.size)
                    ),
                    next_attempt_at: Some(NEVER),
                    export_files: Some(vec![file.clone()]),
                    upload: true,
                    contract: returning.then(|| {
                        ContractStep::at(
                            ContractPhase::Returning,
                            operator_counts(records_affected),
                        )
                    }),
                    ..Default::default()
                }),
                None => Decision::Reject(
                    "a return done by hand needs the record of it that the processor writes".into(),
                ),
            }
        }
        // A contract end's erasure that found nothing has still left nothing behind.
        Event::OperatorComplete {
            records_affected,
            note,
            by,
            ..
        } if task.phase == ContractPhase::Deleting => Decision::Move(Transition {
            state: Completed,
            records_affected,
            confirmed: true,
            note: format!("{note} (confirmed by {by})"),
            contract: Some(ContractStep::at(
                ContractPhase::Done,
                operator_counts(records_affected),
            )),
            ..Default::default()
        }),
        Event::OperatorComplete {
            not_found,
            records_affected,
            note,
            by,
            ..
        } => Decision::Move(Transition {
            state: if not_found { NotFound } else { Completed },
            records_affected,
            confirmed: true,
            note: format!("{note} (confirmed by {by})"),
            ..Default::default()
        }),
        Event::OperatorRefuse { reason, by, .. } => Decision::Move(Transition {
            state: Refused,
            reason: format!("{reason} (refused by {by})"),
            ..Default::default()
        }),
        Event::OperatorRetry { .. } if !matches!(task.state, Failed | Refused) => {
            Decision::Reject(format!(
                "the task is {}: only a FAILED or REFUSED task is retried",
                task.state.as_str_name().trim_start_matches("TASK_STATE_")
            ))
        }
        Event::OperatorRetry { note, by } => operator_retry(task, note, by),
        // Only the note of an earlier attempt's failure (the reason recorded: nothing else
        // sets one while an export is on its way) is replaced, so an attempt that got through
        // is told once, not per chunk; a task marked cancelled keeps its mark's reason.
        Event::DeliveryUnderWay { .. }
            if task.state != InProgress || task.cancel_requested || task.reason.is_empty() =>
        {
            Decision::Ignore
        }
        Event::DeliveryUnderWay {
            to,
            files,
            bytes,
            attempt,
            since,
            file,
            from,
        } => {
            let how = match from {
                0 => format!("{to} took {file} whole"),
                _ => format!("resuming {file} from byte {from}, which {to} holds"),
            };
            let note = format!(
                "sending {files} file(s) ({}) to {to}: attempt {attempt} under way since {}, \
                 {how}",
                size_label(bytes),
                date_label(since)
            );
            Decision::Move(Transition {
                state: InProgress,
                records_affected: task.records_affected,
                confirmed: true,
                // Also the reason, which held the failure: the registry shows reasons.
                reason: note.clone(),
                note,
                next_attempt_at: Some(NEVER),
                ..Default::default()
            })
        }
        // Only a task still waiting for its delivery moves; a cancelled one stays cancelled.
        Event::Delivered { .. } | Event::Undeliverable { .. } | Event::DeliveryFailed { .. }
            if task.state != InProgress =>
        {
            Decision::Ignore
        }
        // A cancellation that came while the export was on its way: what did not arrive is
        // not sent again, and what arrived is reported, too late to stop.
        Event::Undeliverable { to, .. } | Event::DeliveryFailed { to, .. }
            if task.cancel_requested
                && matches!(
                    task.phase,
                    ContractPhase::Unspecified | ContractPhase::Returning
                ) =>
        {
            Decision::Move(Transition {
                state: Cancelled,
                records_affected: task.records_affected,
                reason: format!(
                    "cancelled: the holder's export was written at the processor and is not \
                     delivered to {to}"
                ),
                ..Default::default()
            })
        }
        Event::Delivered {
            to,
            files,
            bytes,
            receipt,
        } if task.cancel_requested && task.phase == ContractPhase::Unspecified => {
            match delivered(task, to, files, bytes, receipt) {
                Decision::Move(t) => Decision::Move(Transition {
                    note: format!(
                        "{} (the cancellation came while it was being delivered: too late to \
                         stop it)",
                        t.note
                    ),
                    ..t
                }),
                other => other,
            }
        }
        // The recipient closed the part before the sender saw the cancellation: the contract
        // end stops here (cancelled, nothing is deleted), but the receipt says who holds the
        // data now, so it is kept and acknowledged.
        Event::Delivered {
            to,
            files,
            bytes,
            receipt,
        } if task.cancel_requested && task.phase == ContractPhase::Returning => {
            let received = match (&to, &receipt) {
                (Destination::Recipient(_), Some(r)) => format!(
                    "the controller's data was received by {to} ({files} file(s), {}), \
                     receipt over manifest SHA-256 {}",
                    size_label(bytes),
                    r.manifest_sha256
                ),
                _ => format!(
                    "the controller's data was stored at {to} as this subprocessor's part of \
                     the package ({files} file(s), {})",
                    size_label(bytes)
                ),
            };
            Decision::Move(Transition {
                state: Cancelled,
                records_affected: task.records_affected,
                confirmed: true,
                note: format!(
                    "{received} (the cancellation came while it was being delivered: too late \
                     to stop it)"
                ),
                reason: format!(
                    "cancelled while the controller's data was being returned: {received}, \
                     too late to stop; the contract end goes no further and nothing is deleted"
                ),
                transfer_receipt: receipt,
                ..Default::default()
            })
        }
        // A contract end's returned data is still at the holder: it waits for the controller.
        // Returned to a transfer recipient, the recipient's receipt is the proof the
        // controller confirms with, so the acknowledgement carries it.
        Event::Delivered {
            to,
            files,
            bytes,
            receipt,
        } if task.phase == ContractPhase::Returning => {
            let note = match (&to, &receipt) {
                (Destination::Recipient(_), Some(r)) => format!(
                    "the controller's data was returned: received by {to} ({files} file(s), \
                     {}), receipt over manifest SHA-256 {}; waiting for the controller's \
                     confirmation of receipt before deleting",
                    size_label(bytes),
                    r.manifest_sha256
                ),
                _ => format!(
                    "the controller's data was returned: stored at {to} as this \
                     subprocessor's part of the package ({files} file(s), {}); waiting for \
                     the controller's confirmation of receipt before deleting",
                    size_label(bytes)
                ),
            };
            Decision::Move(Transition {
                state: InProgress,
                records_affected: task.records_affected,
                confirmed: true,
                reason: note.clone(),
                note,
                // Looked at once more: a confirmation that came while the part was on its
                // way releases it; otherwise the claim puts it to sleep.
                next_attempt_at: Some(ctx.now),
                transfer_receipt: receipt,
                contract: Some(ContractStep::keep(ContractPhase::AwaitingConfirmation)),
                ..Default::default()
            })
        }
        Event::Delivered {
            to,
            files,
            bytes,
            receipt,
        } => delivered(task, to, files, bytes, receipt),
        Event::Undeliverable { to, reason } => Decision::Move(failed(format!(
            "the export could not be delivered to {to}: {}",
            clip(reason)
        ))),
        Event::DeliveryFailed {
            to,
            files,
            bytes,
            attempt,
            error,
        } => {
            let error = clip(error);
            if ctx.now >= ctx.due_at {
                return Decision::Move(gave_up(
                    format!(
                        "gave up at the due date after {attempt} attempt(s) to deliver the \
                         export to {to}: {error}"
                    ),
                    ctx,
                ));
            }
            let at = delivery_retry_at(ctx);
            let note = format!(
                "sending {files} file(s) ({}) to {to}: attempt {attempt} failed at {}: \
                 {error}; next attempt at {}, retrying until {}",
                size_label(bytes),
                date_label(ctx.now),
                date_label(at),
                date_label(ctx.due_at)
            );
            if !worth_acknowledging(attempt) && same_cause(task.reason, &note) {
                return Decision::Later {
                    at,
                    error: Some(error),
                };
            }
            Decision::Move(Transition {
                state: InProgress,
                records_affected: task.records_affected,
                confirmed: true,
                // Also the reason, the "human note for other states": the registry's event
                // of the change (and so `dsrctl trace`) shows reasons, not evidence notes.
                reason: note.clone(),
                note,
                next_attempt_at: Some(NEVER),
                ..Default::default()
            })
        }
    }
}

/// `t`, a contract end's delivered return that waits for the controller's confirmation
/// ([`Event::Delivered`] in RETURNING), scheduled for the `terms`' grace end: the claim then
/// deletes the data whether the return was confirmed or not, and the wait shows that time as
/// other phases show theirs ([`progress_proto`]). Its note (and reason) also names what the
/// controller does next for contract end `request_id`: download the package and confirm it
/// with its folder, or, returned to a transfer recipient (`to`), confirm once the receipts
/// are in; nothing once the terms say the return was confirmed. Any other transition is
/// answered as it is. The uploader, which holds the terms, applies it: the event carries
/// none.
pub(crate) fn awaiting_confirmation(
    t: Transition,
    request_id: &str,
    to: Destination<'_>,
    terms: &Terms,
) -> Transition {
    let grace_ends_at = terms.grace_ends_at;
    let Some(step) = t
        .contract
        .as_ref()
        .filter(|c| c.phase == ContractPhase::AwaitingConfirmation)
    else {
        return t;
    };
    let next = match to {
        // The claim right after the wait starts deleting: there is nothing left to do.
        _ if terms.return_confirmed => {
            "the controller confirmed receipt already, so the deletion starts next".to_string()
        }
        Destination::Registry => format!(
            "the controller downloads the package (dsrctl download {request_id} --out DIR) \
             and confirms it (dsrctl contracts confirm {request_id} --package DIR)"
        ),
        Destination::Recipient(_) => format!(
            "the controller confirms receipt once every part's receipt is in (dsrctl \
             contracts confirm {request_id})"
        ),
    };
    let note = format!(
        "{}; {next}; the data is deleted at the end of the grace period ({}), confirmed or not",
        t.note,
        date_label(grace_ends_at)
    );
    let contract = Some(ContractStep {
        scheduled_at: Some(grace_ends_at),
        ..step.clone()
    });
    Transition {
        reason: note.clone(),
        note,
        contract,
        ..t
    }
}

/// A return of data's or transfer's export arrived: the task is COMPLETED with the proof.
fn delivered(
    task: &Current<'_>,
    to: Destination<'_>,
    files: usize,
    bytes: u64,
    receipt: Option<TransferReceipt>,
) -> Decision {
    Decision::Move(Transition {
        state: TaskState::Completed,
        records_affected: task.records_affected,
        confirmed: true,
        note: match (&to, &receipt) {
            (Destination::Recipient(_), Some(r)) => format!(
                "export received by {to} ({files} file(s), {bytes} bytes), receipt over \
                 manifest SHA-256 {}",
                r.manifest_sha256
            ),
            _ => format!(
                "export stored at {to} as this subprocessor's part of the package \
                 ({files} file(s), {bytes} bytes)"
            ),
        },
        transfer_receipt: receipt,
        ..Default::default()
    })
}

/// Whether the note of failed delivery attempt `attempt` is sent to the controller: the
/// first, second, fourth, eighth... A destination down for a month is retried tens of
/// thousands of times at the default backoff; one acknowledgement (and registry event) per
/// attempt would bury the request's history, while a doubling gap still says it is being
/// retried and why. Attempts in between are kept for operators (the upload's last error).
pub(crate) fn worth_acknowledging(attempt: i64) -> bool {
    attempt <= 1 || (attempt as u64).is_power_of_two()
}

/// Whether a failed delivery's `note` says what the task's recorded `reason` says (the note
/// of the last failure acknowledged), counts, sizes and times aside: each attempt's number
/// and times differ, and so do the byte counts of an error about a stream that broke
/// elsewhere each time, none of which is news for the controller. A reason that is no such
/// note (the task's before its first failure) never matches. The note is compared as the
/// store records it ([`crate::text::fit`]).
fn same_cause(reason: &str, note: &str) -> bool {
    let shape = |text: &str| {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            match c.is_ascii_digit() {
                true if out.ends_with('#') => {}
                true => out.push('#'),
                false => out.push(c),
            }
        }
        out
    };
    shape(reason) == shape(&crate::text::fit(note, crate::text::MAX_REASON))
}

/// When a failed delivery is tried again: after the backoff drawn, and no later than the due
/// date, so the last attempt (and the failure, if it fails too) comes then.
pub(crate) fn delivery_retry_at(ctx: &Context) -> i64 {
    ctx.now
        .saturating_add(ctx.backoff_ms)
        .min(ctx.due_at.max(ctx.now))
}

/// An error as a note or reason may carry it: the registry takes at most 4096 bytes, and the
/// sentence around it needs room (the whole text is fitted again when it is recorded).
fn clip(error: &str) -> String {
    crate::text::fit(error, 1024).into_owned()
}

impl Transition {
    /// This transition with its texts fitted to the protocol's limits ([`crate::text`]).
    pub(crate) fn fitted(&self) -> Self {
        use crate::text::{fit, MAX_LEGAL_BASIS, MAX_NOTE, MAX_REASON};
        Self {
            note: fit(&self.note, MAX_NOTE).into_owned(),
            reason: fit(&self.reason, MAX_REASON).into_owned(),
            legal_basis: fit(&self.legal_basis, MAX_LEGAL_BASIS).into_owned(),
            ..self.clone()
        }
    }
}

/// `bytes` as a reader sizes it up.
fn size_label(bytes: u64) -> String {
    const KB: f64 = 1000.0;
    let b = bytes as f64;
    if b < KB {
        format!("{bytes} bytes")
    } else if b < KB * KB {
        format!("{:.1} kB", b / KB)
    } else if b < KB * KB * KB {
        format!("{:.1} MB", b / (KB * KB))
    } else {
        format!("{:.1} GB", b / (KB * KB * KB))
    }
}

/// When a task that failed with `error` is tried again: after the backoff drawn, or after the
/// wait the holder asked for when that is longer. The holder counts as unreachable until
/// then too.
pub(crate) fn retry_at(ctx: &Context, error: &ConnectorError) -> i64 {
    let asked = i64::try_from(error.retry_after_ms().unwrap_or(0)).unwrap_or(i64::MAX);
    ctx.now.saturating_add(ctx.backoff_ms.max(asked))
}

/// A connector run's outcome, or what its error decides: a transient error is retried while
/// the phase may be (until the due date, [`retry`]), then fails the task; any other error
/// fails it. `doing` is what the call was doing, as a retry's acknowledgement says it.
fn outcome_or_retry(
    task: &Current<'_>,
    phase: &Phase,
    result: Result<Outcome, ConnectorError>,
    doing: Doing,
    ctx: &Context,
) -> ControlFlow<Decision, Outcome> {
    // A retention run that fails leaves what the earlier runs erased erased: the count says
    // so, as it covers every run. A contract end's progress keeps what the call counted.
    let contract = doing.contract.clone();
    let counted = |t: Transition| Transition {
        records_affected: if in_retention_run(task, phase) {
            task.records_affected
        } else {
            0
        },
        contract,
        ..t
    };
    match result {
        Ok(outcome) => ControlFlow::Continue(outcome),
        Err(e) if e.is_transient() && may_retry(task, phase, ctx) => {
            ControlFlow::Break(retry(task, phase, doing, &e, ctx))
        }
        Err(e) if e.is_transient() => ControlFlow::Break(Decision::Move(counted(gave_up(
            format!(
                "gave up at the due date after {} attempt(s): {e}",
                task.attempts
            ),
            ctx,
        )))),
        Err(e) => ControlFlow::Break(Decision::Move(counted(failed(e.to_string())))),
    }
}

/// What a task's call was doing, in the words of the acknowledgement of its failure
/// ([`retry`]), and a contract end's phase, which that acknowledgement keeps.
struct Doing {
    /// The step, for the controller ("deleting the controller's data").
    what: String,
    /// A contract end's phase, its recorded counts kept; `None` for a single task.
    contract: Option<ContractStep>,
}

impl Doing {
    /// A single task's `phase` of a request of `kind`.
    fn single(kind: RequestKind, phase: &Phase) -> Self {
        let kind = kind_label(kind).to_lowercase().replace('_', " ");
        Self {
            what: match phase {
                Phase::Confirm { .. } => format!("the confirmation of the accepted {kind}"),
                _ => kind,
            },
            contract: None,
        }
    }

    /// A contract end's bulk step `op` in `phase`, whose call counted `counts` last
    /// ([`step_counts`]): a failed call's counts are recorded, what it did being still done,
    /// so that the task says how far it got and a call resuming it counts on from there.
    /// A call that reported nothing keeps the counts recorded. The runner hands no counts
    /// (all zero) of a failed call that was to check the holder against the return and
    /// recorded nothing: it may have reported them before its check passed, which,
    /// recorded, would spare the next call the check ([`BulkJob::recorded_progress`]).
    ///
    /// [`BulkJob::recorded_progress`]: dsrelay_connectors::BulkJob::recorded_progress
    fn bulk(op: BulkOp, phase: &Phase, counts: BulkProgress) -> Self {
        let step = bulk_step(op);
        Self {
            what: match phase {
                Phase::Confirm { .. } => format!("{step} (the holder's confirmation)"),
                _ => step.to_string(),
            },
            contract: Some(match counts == BulkProgress::default() {
                true => ContractStep::keep(phase_of(op)),
                false => ContractStep::at(phase_of(op), counts),
            }),
        }
    }
}

/// A contract end's bulk step `op` in the controller's words, the note of a task doing it.
pub(crate) fn bulk_step(op: BulkOp) -> &'static str {
    match op {
        BulkOp::Export => "returning the controller's data",
        BulkOp::Erase => "deleting the controller's data",
    }
}

/// What a transient failure of the holder's call decides while the task may be retried: the
/// task is looked at again at [`retry_at`]. Attempts 1, 2, 4, 8... ([`worth_acknowledging`],
/// as for failed deliveries) are acknowledged: the task stays IN_PROGRESS (its handle, count
/// and contract phase kept) with a reason saying what failed, at which attempt, when the next
/// one comes and until when it is retried, so that the controller's registry shows why
/// nothing moves; the attempts in between are only postponed, keeping the holder's words for
/// operators. Not acknowledged either: a retention run's (the task stays RETAINED, or awaits
/// its run's confirmation beyond any due date), and a task whose request was cancelled while
/// the holder worked (the failure cancels it, [`too_late`]).
fn retry(
    task: &Current<'_>,
    phase: &Phase,
    doing: Doing,
    error: &ConnectorError,
    ctx: &Context,
) -> Decision {
    let at = retry_at(ctx, error);
    let note = || {
        format!(
            "{} at subprocessor {}: attempt {} failed at {}: {}; next attempt at {}, retrying \
             until {}",
            doing.what,
            task.subprocessor,
            task.attempts,
            date_label(ctx.now),
            clip(&error.to_string()),
            date_label(at),
            date_label(ctx.due_at)
        )
    };
    let retried = Retried {
        count: task.attempts,
        at,
        contract: doing.contract,
        error: error.to_string(),
    };
    acknowledged_or_later(task, phase, retried, note)
}

/// What a task tried again at `at` keeps: the `count`th attempt or wait, a contract end's
/// phase (`None` keeps the recorded one), the words kept for operators.
struct Retried {
    count: i64,
    at: i64,
    contract: Option<ContractStep>,
    error: String,
}

/// A task to be looked at again as `r` says, acknowledged IN_PROGRESS with `note` as its
/// reason when `r.count` is worth it ([`retry`], [`holder_down`]), else only postponed.
fn acknowledged_or_later(
    task: &Current<'_>,
    phase: &Phase,
    r: Retried,
    note: impl FnOnce() -> String,
) -> Decision {
    if in_retention_run(task, phase) || task.cancel_requested || !worth_acknowledging(r.count) {
        return Decision::Later {
            at: r.at,
            error: Some(r.error),
        };
    }
    let note = note();
    Decision::Move(Transition {
        state: TaskState::InProgress,
        records_affected: task.records_affected,
        // Also the reason, as for a failed delivery: `dsrctl get` and `dsrctl contracts show`
        // show reasons (and so do the registry's events, but of a contract end task only
        // when its state or phase changes).
        reason: note.clone(),
        note,
        next_attempt_at: Some(r.at),
        // Accepted work is still the holder's: the next claim asks for its confirmation.
        handle: task.handle.map(str::to_string),
        contract: r.contract,
        error: Some(r.error),
        ..Default::default()
    })
}

/// What a task held back by its holder's unreachable mark decides ([`Event::HolderDown`]:
/// `(until, since, error, waits)`): past the due date the holder is called anyway (a
/// retention run's is never past it); otherwise the task is looked at again at `until`, no
/// later than the due date. Waits 1, 2, 4, 8... are acknowledged like a retry
/// ([`acknowledged_or_later`]), saying since when the holder is unreachable and why, when the
/// next try comes and until when; the phase and counts of a contract end stay as recorded.
fn holder_down(
    task: &Current<'_>,
    phase: Phase,
    (until, since, error, waits): (i64, i64, &str, i64),
    ctx: &Context,
) -> Decision {
    if !may_retry(task, &phase, ctx) {
        return Decision::Run { start: None, phase };
    }
    let at = if in_retention_run(task, &phase) {
        until
    } else {
        until.min(ctx.due_at)
    };
    let why = if error.is_empty() {
        format!(
            "subprocessor {} is unreachable since {}",
            task.subprocessor,
            date_label(since)
        )
    } else {
        format!(
            "subprocessor {} is unreachable since {} ({})",
            task.subprocessor,
            date_label(since),
            clip(error)
        )
    };
    let note = || {
        format!(
            "waiting: {why}; next try at {}, until {}",
            date_label(at),
            date_label(ctx.due_at)
        )
    };
    let waited = Retried {
        count: waits,
        at,
        contract: None,
        // For operators, as every wait has recorded it; the reason acknowledged says more.
        error: format!("subprocessor {} is unreachable; waiting", task.subprocessor),
    };
    acknowledged_or_later(task, &phase, waited, note)
}

/// The run at a RETAINED task's `retain_until`, the holder's next release date (0 for none,
/// which a RETAINED task always has).
fn retention_run(task: &Current<'_>) -> Phase {
    Phase::RetentionExpired {
        until_ms: task.retain_until.unwrap_or(0),
    }
}

/// Whether `phase` belongs to a retention run: the run itself, or the confirmation of work
/// the holder accepted in it (the task, IN_PROGRESS, still holds the date it ran for).
fn in_retention_run(task: &Current<'_>, phase: &Phase) -> bool {
    phase.is_retention_expired()
        || (matches!(phase, Phase::Confirm { .. }) && task.retain_until.is_some())
}

/// The retention a retention run's accepted work keeps until the holder confirms it: the
/// data is still there under it, so certificates issued meanwhile list it, and the
/// confirmation is known as part of the run. `(legal_basis, retain_until)`, empty outside a
/// retention run.
fn kept_while_accepted(task: &Current<'_>, phase: &Phase) -> (String, Option<i64>) {
    if in_retention_run(task, phase) {
        (task.legal_basis.to_string(), task.retain_until)
    } else {
        (String::new(), None)
    }
}

/// A request's due date bounds its retries; retained data past its date is erased however
/// long the holder takes to come back (or to confirm the erasure it accepted).
fn may_retry(task: &Current<'_>, phase: &Phase, ctx: &Context) -> bool {
    ctx.now < ctx.due_at || in_retention_run(task, phase)
}

fn failed(reason: String) -> Transition {
    Transition {
        state: TaskState::Failed,
        reason,
        ..Default::default()
    }
}

/// FAILED because the due date came (`ctx.due_at`, as claimed): recorded only while the
/// request's due date has not moved past now ([`Transition::due_by`]).
fn gave_up(reason: String, ctx: &Context) -> Transition {
    Transition {
        due_by: Some(ctx.now),
        ..failed(reason)
    }
}

/// What a connector's answer decided (`decision`), for a task whose request was cancelled
/// while the holder worked: what the holder did stands, saying the cancellation came too
/// late; nothing more is started for it.
fn too_late(task: &Current<'_>, decision: Decision) -> Decision {
    const LATE: &str = "the cancellation came while the holder was working: too late to stop it";
    let cancelled = |reason: String| {
        Decision::Move(Transition {
            state: TaskState::Cancelled,
            records_affected: task.records_affected,
            reason,
            ..Default::default()
        })
    };
    match decision {
        // An export lies at the processor only: the cancellation stops its delivery.
        Decision::Move(t) if t.upload => cancelled(format!(
            "cancelled: the holder's export was written at the processor and is not delivered \
             ({} file(s))",
            t.export_files.as_ref().map_or(0, Vec::len)
        )),
        Decision::Move(t) if t.state == TaskState::WaitingForOperator => cancelled(
            "cancelled: the task had come to wait for an operator, who did nothing yet".into(),
        ),
        // Accepted work: the holder does it anyway, so its confirmation is still awaited.
        Decision::Move(t) if t.state == TaskState::InProgress => Decision::Move(Transition {
            note: format!("{}; {LATE}: its confirmation is awaited", t.note),
            reason: LATE.into(),
            ..t
        }),
        Decision::Move(t) => Decision::Move(Transition {
            note: if t.note.is_empty() {
                LATE.into()
            } else {
                format!("{} ({LATE})", t.note)
            },
            reason: if t.reason.is_empty() {
                format!("{LATE}; this is what it did")
            } else {
                format!("{} ({LATE})", t.reason)
            },
            ..t
        }),
        // A failure that may pass is not retried for a cancelled request.
        Decision::Later {
            error: Some(error), ..
        } => cancelled(format!(
            "cancelled: the call under way when the cancellation came failed ({}), so \
             whether the holder acted is not known",
            clip(&error)
        )),
        other => other,
    }
}

fn claimed(
    task: &Current<'_>,
    kind: RequestKind,
    holder: Option<Holder>,
    recipient: bool,
    ctx: &Context,
) -> Decision {
    let Some(holder) = holder else {
        return Decision::Move(failed(format!(
            "subprocessor {} is no longer configured or the request body is missing",
            task.subprocessor
        )));
    };
    // Exporting would only leave the data lying at the processor with nowhere to go.
    if kind == RequestKind::Transfer && !recipient {
        return Decision::Move(failed(
            "the transfer came without a recipient: the registry no longer configures the \
             recipient it names, so there is nowhere to send the data"
                .to_string(),
        ));
    }
    // A kind the connector cannot do is answered explicitly, never left hanging.
    if !holder.supports {
        return Decision::Move(Transition {
            state: TaskState::Refused,
            reason: format!(
                "subprocessor {} ({} connector) does not support {}",
                task.subprocessor,
                holder.connector,
                kind_label(kind)
            ),
            ..Default::default()
        });
    }
    let (start, phase) = match (task.state, task.handle) {
        // The runner goes on with the task: keep it reserved, or another claim would run it
        // a second time alongside.
        (TaskState::Pending, _) => (
            Some(Transition {
                state: TaskState::InProgress,
                hold_ms: Some(ctx.lease_ms),
                ..Default::default()
            }),
            Phase::Start,
        ),
        (TaskState::InProgress, Some(handle)) => (
            None,
            Phase::Confirm {
                handle: handle.to_string(),
            },
        ),
        (TaskState::InProgress, None) => (None, Phase::Start),
        (TaskState::Retained, _) => (None, retention_run(task)),
        _ => return Decision::Ignore,
    };
    Decision::Run { start, phase }
}

/// Whether the runner asks the store for a contract end deleting at the holder of a task of
/// a request of `kind` about to take `phase` ([`Event::Superseded`]): an erasure's retention
/// run, or the confirmation of work accepted in one.
pub(crate) fn follows_contract_end(kind: RequestKind, task: &Current<'_>, phase: &Phase) -> bool {
    kind == RequestKind::Erasure && in_retention_run(task, phase)
}

/// The retention run of a RETAINED task, when it is claimed at its date: what the runner
/// asks [`follows_contract_end`] about before the claim is decided.
pub(crate) fn claimed_retention_run(task: &Current<'_>) -> Option<Phase> {
    (task.state == TaskState::Retained).then(|| retention_run(task))
}

/// What a RETAINED erasure's retention run does where a contract end of its controller has
/// begun deleting at its holder (`by`): it follows the contract end's task there rather than
/// the holder, which finds nothing of the rows that deletion kept and stripped. `ran`: the
/// run's own answer, when the deletion was found after the call (what it erased is counted,
/// on top of the earlier runs').
fn superseded(
    task: &Current<'_>,
    by: &ContractEndAt,
    ran: Option<Outcome>,
    ctx: &Context,
) -> Decision {
    let called = ran.is_some();
    let (more, erased) = match ran {
        Some(Outcome::Completed {
            records_affected,
            erased,
            ..
        }) => (records_affected.max(0), Erased::from(erased)),
        _ => (0, Erased::default()),
    };
    let records = task.records_affected.saturating_add(more);
    let this_run = match more {
        0 => format!("this run erased nothing more ({records} record(s) in all)"),
        n => format!("this run erased {n} more record(s) ({records} in all)"),
    };
    let (sub, id) = (task.subprocessor, &by.request_id);
    if by.failed_when_done {
        // Waiting would never end: that contract end's failed retention run is not retried.
        return Decision::Move(Transition {
            records_affected: records,
            erased,
            legal_basis: task.legal_basis.to_string(),
            ..failed(format!(
                "the rest of the subject's data at subprocessor {sub} was contract end {id}'s \
                 to erase, and that contract end's retention run there failed (it is not \
                 retried): what it kept there may still be held; {this_run}"
            ))
        });
    }
    match (by.state, by.retain_until) {
        (TaskState::Completed, _) => {
            let certified = match &by.certificate {
                Some(c) => format!(" (its certificate {c})"),
                None => String::new(),
            };
            Decision::Move(Transition {
                state: TaskState::Completed,
                records_affected: records,
                confirmed: true,
                note: format!(
                    "what subprocessor {sub} kept of the subject under a legal obligation was \
                     kept under contract end {id}'s retention and erased by that contract \
                     end{certified}; {this_run}"
                ),
                erased,
                ..Default::default()
            })
        }
        (TaskState::Retained, Some(until)) if until > ctx.now => {
            let note = format!(
                "the rest of the subject's data at subprocessor {sub} is kept under contract \
                 end {id}'s retention and erased by that contract end at {}",
                date_label(until)
            );
            if !called && task.retain_until == Some(until) && task.reason == note {
                return Decision::Later {
                    at: until,
                    error: None,
                };
            }
            Decision::Move(Transition {
                state: TaskState::Retained,
                records_affected: records,
                confirmed: true,
                // Also the reason: `dsrctl get` shows reasons, and the next run compares it.
                reason: note.clone(),
                note: format!("{note}; {this_run}"),
                erased,
                legal_basis: task.legal_basis.to_string(),
                retain_until: Some(until),
                next_attempt_at: Some(until),
                ..Default::default()
            })
        }
        (state, _) => {
            let at = ctx.now.saturating_add(ctx.confirm_interval_ms.max(1));
            let state = state.as_str_name().trim_start_matches("TASK_STATE_");
            let note = format!(
                "the rest of the subject's data at subprocessor {sub} is contract end {id}'s \
                 to erase, whose deletion there has begun: this erasure waits for it without \
                 calling the holder (that contract end's task is {state})"
            );
            if !called && task.reason == note {
                return Decision::Later { at, error: None };
            }
            Decision::Move(Transition {
                state: TaskState::Retained,
                records_affected: records,
                confirmed: true,
                reason: note.clone(),
                note: format!("{note}; {this_run}"),
                erased,
                legal_basis: task.legal_basis.to_string(),
                // The erasure's own date, as it was: no new date is known while the contract
                // end deletes, and a made-up one would be certified as a retention date.
                retain_until: task.retain_until.or(Some(at)),
                next_attempt_at: Some(at),
                ..Default::default()
            })
        }
    }
}

/// Whether an operator's confirmation of a task in `phase` (of a request that `exports` its
/// data, the subject `not_found` or not) is a return done by hand, delivered as the record of
/// it the processor writes: a contract end's return, or a return of data or transfer that
/// found the subject.
pub(crate) fn returned_by_hand(phase: ContractPhase, exports: bool, not_found: bool) -> bool {
    phase == ContractPhase::Returning || (exports && !not_found)
}

fn ran(
    task: &Current<'_>,
    kind: RequestKind,
    phase: Phase,
    result: Result<Outcome, ConnectorError>,
    ctx: &Context,
) -> Decision {
    // A retained task's evidence counts every run, not only the last (a run's accepted
    // work carries the count to its confirmation).
    let earlier = if in_retention_run(task, &phase) {
        task.records_affected
    } else {
        0
    };
    let doing = Doing::single(kind, &phase);
    let outcome = match outcome_or_retry(task, &phase, result, doing, ctx) {
        ControlFlow::Continue(outcome) => outcome,
        ControlFlow::Break(decision) => return decision,
    };
    Decision::Move(match outcome {
        Outcome::Completed {
            records_affected,
            note,
            files,
            ..
        } if crate::exports::exports(kind) => {
            // The data has not gone where it was asked to go: it lies in the processor's data
            // folder. COMPLETED waits for the upload worker's delivery: to the registry for a
            // return of data, to the recipient for a transfer.
            let bytes: u64 = files.iter().map(|f| f.size).sum();
            let waiting = if kind == RequestKind::ReturnOfData {
                "uploading it to the registry"
            } else {
                "sending it to the recipient"
            };
            Transition {
                state: TaskState::InProgress,
                records_affected: earlier.saturating_add(records_affected),
                confirmed: true,
                note: format!(
                    "{note}; export written at the processor ({} file(s), {bytes} bytes), \
                     {waiting}",
                    files.len()
                ),
                next_attempt_at: Some(NEVER),
                // An empty export is still a part: the registry learns the holder had nothing.
                export_files: Some(files),
                upload: true,
                ..Default::default()
            }
        }
        Outcome::Completed {
            records_affected,
            note,
            files,
            erased,
        } => Transition {
            state: TaskState::Completed,
            records_affected: earlier.saturating_add(records_affected),
            confirmed: true,
            note,
            export_files: (!files.is_empty()).then_some(files),
            erased: erased.into(),
            ..Default::default()
        },
        Outcome::NotFound { note } => Transition {
            state: TaskState::NotFound,
            confirmed: true,
            note,
            ..Default::default()
        },
        // Only what an erasure leaves behind can be retained: a holder that answers another
        // kind so has not done what was asked, and RETAINED would fold the request into
        // "done, except what must be kept" with nothing done.
        Outcome::Retained { legal_basis, .. } if kind != RequestKind::Erasure => failed(format!(
            "subprocessor {} answered the {} with a retention ({}), which only an erasure can \
             have; nothing is known to have been done",
            task.subprocessor,
            kind.as_str_name().trim_start_matches("REQUEST_KIND_"),
            clip(&legal_basis)
        )),
        Outcome::Retained {
            legal_basis,
            until_ms,
            records_affected,
            note,
            erased,
        } => Transition {
            state: TaskState::Retained,
            records_affected: earlier.saturating_add(records_affected),
            confirmed: true,
            note,
            erased: erased.into(),
            legal_basis,
            retain_until: Some(until_ms),
            // Wake up at the holder's next release and erase what it released without being
            // asked; what is still kept then comes back RETAINED with its next date.
            next_attempt_at: Some(until_ms),
            ..Default::default()
        },
        Outcome::Accepted { handle, note } => {
            let next = ctx.now + ctx.confirm_interval_ms;
            if matches!(&phase, Phase::Confirm { handle: h } if *h == handle) {
                // Still not confirmed: nothing changed, so nothing to acknowledge.
                return Decision::Later {
                    at: next,
                    error: None,
                };
            }
            let (legal_basis, retain_until) = kept_while_accepted(task, &phase);
            Transition {
                state: TaskState::InProgress,
                records_affected: task.records_affected,
                confirmed: false,
                note: format!("accepted by the holder, awaiting its confirmation: {note}"),
                legal_basis,
                retain_until,
                next_attempt_at: Some(next),
                handle: Some(handle),
                ..Default::default()
            }
        }
        Outcome::WaitingForOperator { note } => Transition {
            state: TaskState::WaitingForOperator,
            note,
            next_attempt_at: Some(NEVER),
            ..Default::default()
        },
        Outcome::Refused { reason } => Transition {
            state: TaskState::Refused,
            reason,
            ..Default::default()
        },
    })
}

fn contract_claimed(
    task: &Current<'_>,
    holder: Option<Holder>,
    terms: Option<Terms>,
    ctx: &Context,
) -> Decision {
    let (Some(holder), Some(terms)) = (holder, terms) else {
        return Decision::Move(failed(format!(
            "subprocessor {} is no longer configured, or the contract end's terms are missing",
            task.subprocessor
        )));
    };
    if !holder.supports {
        return Decision::Move(Transition {
            state: TaskState::Refused,
            reason: format!(
                "subprocessor {} ({} connector) does not support {}",
                task.subprocessor,
                holder.connector,
                kind_label(RequestKind::ContractEnd)
            ),
            ..Default::default()
        });
    }
    let again = |op| Decision::RunBulk {
        start: None,
        op,
        phase: match task.handle {
            Some(h) => Phase::Confirm {
                handle: h.to_string(),
            },
            None => Phase::Start,
        },
    };
    match (task.state, task.phase) {
        (TaskState::Pending, _) if ctx.now < terms.starts_at() => Decision::Later {
            at: terms.starts_at(),
            error: None,
        },
        (TaskState::Pending, _) => {
            let op = terms.first_op();
            Decision::RunBulk {
                start: Some(Transition {
                    state: TaskState::InProgress,
                    hold_ms: Some(ctx.lease_ms),
                    note: bulk_step(op).into(),
                    contract: Some(ContractStep::at(phase_of(op), BulkProgress::default())),
                    ..Default::default()
                }),
                op,
                phase: Phase::Start,
            }
        }
        (TaskState::InProgress, ContractPhase::Returning) => again(BulkOp::Export),
        (TaskState::InProgress, ContractPhase::Deleting) => again(BulkOp::Erase),
        (TaskState::InProgress, ContractPhase::AwaitingConfirmation) if terms.return_confirmed => {
            let note = "the controller confirmed receipt of the returned data; deleting it";
            start_deleting_returned(task, ctx, note.into(), String::new())
        }
        (TaskState::InProgress, ContractPhase::AwaitingConfirmation)
            if ctx.now < terms.grace_ends_at =>
        {
            Decision::Later {
                at: terms.grace_ends_at,
                error: None,
            }
        }
        // The grace period bounds the wait as it bounds a contract end without a choice: the
        // data may not outlive it because no confirmation came.
        (TaskState::InProgress, ContractPhase::AwaitingConfirmation) => {
            let note = format!(
                "no confirmation of receipt of the returned data came from the controller by \
                 the end of the grace period ({}); deleting the controller's data, as without \
                 a choice",
                date_label(terms.grace_ends_at)
            );
            // Also the reason: the registry's event of the change (and so `dsrctl trace`)
            // shows reasons, and this one says why the data went unconfirmed.
            start_deleting_returned(task, ctx, note.clone(), note)
        }
        (TaskState::Retained, _) => Decision::RunBulk {
            start: None,
            op: BulkOp::Erase,
            phase: retention_run(task),
        },
        _ => Decision::Ignore,
    }
}

/// The erasure of a returned contract end's data, started from AWAITING_CONFIRMATION (on the
/// controller's confirmation, or at the grace end without one), with `note` and `reason`.
fn start_deleting_returned(
    task: &Current<'_>,
    ctx: &Context,
    note: String,
    reason: String,
) -> Decision {
    Decision::RunBulk {
        start: Some(Transition {
            state: TaskState::InProgress,
            records_affected: task.records_affected,
            confirmed: true,
            note,
            reason,
            hold_ms: Some(ctx.lease_ms),
            contract: Some(ContractStep::at(
                ContractPhase::Deleting,
                BulkProgress::default(),
            )),
            ..Default::default()
        }),
        op: BulkOp::Erase,
        phase: Phase::Start,
    }
}

/// An operator's retry of a FAILED or REFUSED task. The operator's words go as the reason,
/// which the registry keeps in the request's trail (a note would last only until the
/// outcome's); the holder is called at once, and nothing of the failed or refused call is
/// kept (no handle, no count).
///
/// A contract end task resumes in the phase it failed in rather than from the start, which
/// would ignore the return, its confirmation or the erasure under way:
/// - SCHEDULED (it failed at its start, before its holder was called): PENDING again, so the
///   claim starts it as it starts any contract end task, by the terms as they then stand;
/// - RETURNING: the export runs again from the start (its counts from zero), and its
///   delivery after it; what the failed run wrote and sent is discarded by the store;
/// - DELETING: the erasure runs again, handed the progress the failed run recorded
///   ([`BulkJob::recorded_progress`]), from which a connector resuming it counts, so that
///   what was erased before is counted once;
/// - AWAITING_CONFIRMATION: waits again for the controller's confirmation (deleting at once
///   when it came, or when the grace period has ended without it);
/// - DONE: it failed in a retention run, which is not retried (as `RetryRefusal::WasRetained`).
///
/// [`BulkJob::recorded_progress`]: dsrelay_connectors::BulkJob::recorded_progress
fn operator_retry(task: &Current<'_>, note: &str, by: &str) -> Decision {
    let reason = format!("retried by {by}: {note}");
    let resumed = |phase, note: &str, progress| {
        Decision::Move(Transition {
            state: TaskState::InProgress,
            reason: reason.clone(),
            note: format!("retried: {note}"),
            contract: Some(ContractStep {
                phase,
                progress,
                scheduled_at: None,
            }),
            ..Default::default()
        })
    };
    match task.phase {
        ContractPhase::Unspecified => Decision::Move(Transition {
            state: TaskState::InProgress,
            reason,
            ..Default::default()
        }),
        ContractPhase::Scheduled => Decision::Move(Transition {
            state: TaskState::Pending,
            reason,
            note: "retried: starting the contract end as its terms say".into(),
            contract: Some(ContractStep::keep(ContractPhase::Scheduled)),
            ..Default::default()
        }),
        ContractPhase::Returning => resumed(
            ContractPhase::Returning,
            "returning the controller's data again, exporting it from the start",
            Some(BulkProgress::default()),
        ),
        ContractPhase::Deleting => resumed(
            ContractPhase::Deleting,
            "deleting the controller's data again, going on from the progress recorded",
            None,
        ),
        ContractPhase::AwaitingConfirmation => resumed(
            ContractPhase::AwaitingConfirmation,
            "waiting again for the controller's confirmation of the returned data",
            None,
        ),
        ContractPhase::Done => Decision::Reject(
            "it failed after its contract end's erasure was done (in a retention run), which \
             is not retried"
                .into(),
        ),
    }
}

/// `progress` is `(earlier, last)`: what the task recorded of the step before the call, and
/// the connector's last report.
///
/// Outside a retention run the count is the connector's alone: one resumed after an earlier
/// call counts that call's work itself (the SQL connector from its recorded progress, the
/// Mailchimp one as the audience's members, an adapter as its job's), so adding `earlier`
/// here would count it twice. Its counts by place are not: an erasure's start call lists
/// what it erased itself, or what it lists beyond the recorded counts by place
/// ([`BulkJob::beyond_recorded`]), and those recorded are added to them, so that the
/// certificate lists the earlier calls' work by table too. What those counts may leave out
/// is told from the totals ([`uncounted`]).
///
/// [`BulkJob::beyond_recorded`]: dsrelay_connectors::BulkJob::beyond_recorded
fn bulk_ran(
    task: &Current<'_>,
    op: BulkOp,
    phase: Phase,
    result: Result<Outcome, ConnectorError>,
    (recorded, progress): (BulkProgress, BulkProgress),
    ctx: &Context,
) -> Decision {
    let earlier = if in_retention_run(task, &phase) {
        task.records_affected
    } else {
        0
    };
    let uncounted = uncounted(task, &phase, &recorded, &progress);
    // An erasure's start call answers for itself ([`BulkJob::recorded_progress`]): what the
    // earlier calls recorded by place is added to it, per target and action.
    let starts = op == BulkOp::Erase && matches!(phase, Phase::Start);
    let erased = |counts: Vec<ErasedCount>| Erased {
        counts: match starts {
            true => sum_erased(&recorded.erased, &counts),
            false => counts,
        },
        uncounted: uncounted.clone(),
    };
    let erased_before = recorded.records_done;
    let progress = step_counts(op, &phase, (&recorded, task.call_started), progress);
    let step = ContractStep::at(phase_of(op), progress.clone());
    let doing = Doing::bulk(op, &phase, progress.clone());
    let outcome = match outcome_or_retry(task, &phase, result, doing, ctx) {
        ControlFlow::Continue(outcome) => outcome,
        ControlFlow::Break(decision) => return decision,
    };
    let exported = |records_affected: i64, note: String, files: Vec<ExportedFile>| {
        let bytes: u64 = files.iter().map(|f| f.size).sum();
        Transition {
            state: TaskState::InProgress,
            records_affected,
            confirmed: true,
            note: format!(
                "{note}; the controller's data exported at the processor ({} file(s), {}), \
                 delivering it as this subprocessor's part of the return",
                files.len(),
                size_label(bytes)
            ),
            next_attempt_at: Some(NEVER),
            export_files: Some(files),
            upload: true,
            contract: Some(step.clone()),
            ..Default::default()
        }
    };
    let done = Some(ContractStep::at(ContractPhase::Done, progress));
    Decision::Move(match (op, outcome) {
        (
            BulkOp::Export,
            Outcome::Completed {
                records_affected,
                note,
                files,
                ..
            },
        ) => exported(records_affected, note, files),
        // Nothing held is still a part: the registry learns the holder had nothing.
        (BulkOp::Export, Outcome::NotFound { note }) => exported(0, note, Vec::new()),
        (BulkOp::Export, Outcome::Retained { .. }) => failed(format!(
            "subprocessor {} answered an export with a retention; nothing was returned",
            task.subprocessor
        )),
        (
            BulkOp::Erase,
            Outcome::Completed {
                records_affected,
                note,
                erased: erased_counts,
                ..
            },
        ) => Transition {
            state: TaskState::Completed,
            records_affected: earlier.saturating_add(records_affected),
            confirmed: true,
            note,
            erased: erased(erased_counts),
            contract: done,
            ..Default::default()
        },
        // The holder holds nothing of the controller, and nothing is known to have been
        // erased there (no retention run's earlier count, no earlier call's recorded or
        // possibly uncounted work): NOT_FOUND, which gets no deletion certificate, as a
        // certificate of zero records would be taken for the holder's proof of deletion.
        (BulkOp::Erase, Outcome::NotFound { note })
            if earlier == 0 && erased_before == 0 && uncounted.is_none() =>
        {
            Transition {
                state: TaskState::NotFound,
                confirmed: true,
                note,
                contract: done,
                ..Default::default()
            }
        }
        (BulkOp::Erase, Outcome::NotFound { note }) => Transition {
            state: TaskState::Completed,
            records_affected: earlier,
            confirmed: true,
            note,
            erased: erased(Vec::new()),
            contract: done,
            ..Default::default()
        },
        (
            BulkOp::Erase,
            Outcome::Retained {
                legal_basis,
                until_ms,
                records_affected,
                note,
                erased: erased_counts,
            },
        ) => Transition {
            state: TaskState::Retained,
            records_affected: earlier.saturating_add(records_affected),
            confirmed: true,
            note,
            erased: erased(erased_counts),
            legal_basis,
            retain_until: Some(until_ms),
            next_attempt_at: Some(until_ms),
            contract: done,
            ..Default::default()
        },
        (_, Outcome::Accepted { handle, note }) => {
            let next = ctx.now + ctx.confirm_interval_ms;
            if matches!(&phase, Phase::Confirm { handle: h } if *h == handle) {
                return Decision::Later {
                    at: next,
                    error: None,
                };
            }
            let (legal_basis, retain_until) = kept_while_accepted(task, &phase);
            Transition {
                state: TaskState::InProgress,
                records_affected: task.records_affected,
                note: format!("accepted by the holder, awaiting its confirmation: {note}"),
                legal_basis,
                retain_until,
                next_attempt_at: Some(next),
                handle: Some(handle),
                contract: Some(step.clone()),
                ..Default::default()
            }
        }
        (_, Outcome::WaitingForOperator { note }) => Transition {
            state: TaskState::WaitingForOperator,
            note,
            next_attempt_at: Some(NEVER),
            contract: Some(step.clone()),
            ..Default::default()
        },
        // The data is still there: not a refusal the controller can leave at that.
        (_, Outcome::Refused { reason }) => failed(format!(
            "subprocessor {} refused to end the contract: {}",
            task.subprocessor,
            clip(&reason)
        )),
    })
}

/// What the counts of an erasure's step (not a confirmation of accepted work, which the
/// holder counts) may leave out, from what the task recorded of the step before the call
/// (`recorded`) and the connector's last report (`last`). A connector counting an earlier
/// call's work from its recorded progress adds what that call recorded as done to the totals
/// it counts now, so its totals come out below the earlier call's by what that call erased
/// after its last recorded progress (give or take what others added or removed meanwhile): a
/// connector that counts everything keeps the totals. A call cut off with no progress
/// recorded leaves nothing to compare: what it erased may not be counted at all, nor by a
/// later call resuming the one that resumed it (whose recorded total is then unknown).
///
/// An earlier call's recorded work is listed by table when its progress came with counts by
/// place ([`BulkProgress::erased`]): [`bulk_ran`] adds them to the finishing call's. When it
/// came without (a connector or an adapter that does not count by place), its done counts
/// are named instead, since the counts by table are then the connector's answer to the call
/// that finished alone, rather than pass those off as the erasure's.
fn uncounted(
    task: &Current<'_>,
    phase: &Phase,
    recorded: &BulkProgress,
    last: &BulkProgress,
) -> Option<Uncounted> {
    if matches!(phase, Phase::Confirm { .. }) {
        return None;
    }
    let records = recorded.records_total.saturating_sub(last.records_total);
    let subjects = recorded.subjects_total.saturating_sub(last.subjects_total);
    let (earlier_records, earlier_subjects) = match recorded.erased.is_empty() {
        true => (recorded.records_done, recorded.subjects_done),
        false => (0, 0),
    };
    let mut reasons = Vec::new();
    if earlier_records > 0 || earlier_subjects > 0 {
        reasons.push(format!(
            "an earlier call of this erasure (cut off, or failed) erased or anonymized \
             {earlier_records} record(s) of {earlier_subjects} subject(s) as far as its \
             progress was recorded, which reported no counts by table: the counts by table are \
             the connector's answer to the call that finished, which need not list that call's \
             records by table"
        ));
    }
    if records > 0 || subjects > 0 {
        reasons.push(format!(
            "an earlier call of this erasure (cut off, or failed) counted {records} more \
             record(s) ({subjects} more subject(s)) than these counts account for: erased by it \
             after its last recorded progress, or added or removed by others meanwhile"
        ));
    } else if task.call_started && *recorded == BulkProgress::default() {
        reasons.push(
            "an earlier call of this erasure was cut off before its answer was recorded, with \
             no progress recorded: what it erased may not be counted"
                .to_string(),
        );
    } else if recorded.records_total == 0 && recorded.records_done > 0 && last.records_total > 0 {
        // An earlier call reported its total unknown ([`step_counts`]): its count missed
        // what a call before it erased.
        reasons.push(
            "an earlier call of this erasure resumed one cut off with no progress recorded: \
             what that one erased may not be counted"
                .to_string(),
        );
    }
    if reasons.is_empty() {
        return None;
    }
    Some(Uncounted {
        reason: reasons.join("; "),
        records,
        subjects,
        earlier_records,
        earlier_subjects,
    })
}

fn terms_changed(
    task: &Current<'_>,
    terms: &Terms,
    scheduled_at: Option<i64>,
    ctx: &Context,
) -> Decision {
    match (task.state, task.phase) {
        (TaskState::Pending, _) => {
            let at = terms.starts_at();
            if scheduled_at == Some(at) {
                return Decision::Ignore;
            }
            let what = match terms.first_op() {
                _ if terms.choice == ContractEndChoice::None => {
                    "deleting the data if no choice is made"
                }
                BulkOp::Export => "returning the data, then deleting it",
                BulkOp::Erase => "deleting the data",
            };
            Decision::Move(Transition {
                state: TaskState::Pending,
                note: format!("scheduled: {what} from {}", date_label(at)),
                next_attempt_at: Some(at),
                contract: Some(ContractStep {
                    phase: ContractPhase::Scheduled,
                    progress: None,
                    scheduled_at: Some(at),
                }),
                ..Default::default()
            })
        }
        (TaskState::InProgress, ContractPhase::AwaitingConfirmation) if terms.return_confirmed => {
            Decision::Later {
                at: ctx.now,
                error: None,
            }
        }
        // A new grace end moves the deletion the wait ends in, and the time it shows.
        (TaskState::InProgress, ContractPhase::AwaitingConfirmation)
            if scheduled_at != Some(terms.grace_ends_at) =>
        {
            let note = format!(
                "waiting for the controller's confirmation of receipt of the returned data; \
                 the grace period now ends {}: the data is deleted then, confirmed or not",
                date_label(terms.grace_ends_at)
            );
            Decision::Move(Transition {
                state: TaskState::InProgress,
                records_affected: task.records_affected,
                confirmed: true,
                reason: note.clone(),
                note,
                next_attempt_at: Some(terms.grace_ends_at),
                contract: Some(ContractStep {
                    phase: ContractPhase::AwaitingConfirmation,
                    progress: None,
                    scheduled_at: Some(terms.grace_ends_at),
                }),
                ..Default::default()
            })
        }
        _ => Decision::Ignore,
    }
}

/// Why new contract end terms cannot replace the stored ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A field of the new terms is wrong whatever the state: (field, rule).
    Invalid(&'static str, String),
    /// The change is no longer possible.
    TooLate(String),
}

/// The terms after the controller's update `wanted` of `stored`; the same terms again are
/// accepted unchanged. `deleting` says whether any task has started deleting.
pub(crate) fn amend(stored: &Terms, wanted: &Terms, deleting: bool) -> Result<Terms, Refusal> {
    if wanted == stored {
        return Ok(*stored);
    }
    if wanted.effective_at != stored.effective_at {
        return Err(Refusal::Invalid(
            "contract_end.effective_at",
            format!(
                "the effective date cannot change (it is {})",
                date_label(stored.effective_at)
            ),
        ));
    }
    if wanted.return_confirmed && wanted.choice != ContractEndChoice::ReturnThenDelete {
        return Err(Refusal::Invalid(
            "contract_end.return_confirmed",
            "only a RETURN_THEN_DELETE contract end has a return to confirm".into(),
        ));
    }
    if wanted.choice != stored.choice && stored.choice != ContractEndChoice::None {
        return Err(Refusal::TooLate(format!(
            "the controller already chose {}",
            stored.choice.as_str_name()
        )));
    }
    if stored.return_confirmed && !wanted.return_confirmed {
        return Err(Refusal::TooLate("the return was already confirmed".into()));
    }
    if deleting && (wanted.choice != stored.choice || wanted.grace_ends_at != stored.grace_ends_at)
    {
        return Err(Refusal::TooLate(
            "deleting the controller's data has started".into(),
        ));
    }
    // Deleting with no confirmation means the grace period ended unconfirmed: a confirmation
    // now would have the return read as confirmed before a deletion that did not wait for it.
    if deleting && wanted.return_confirmed && !stored.return_confirmed {
        return Err(Refusal::TooLate(
            "deleting the controller's data started at the end of the grace period without a \
             confirmation of the return"
                .into(),
        ));
    }
    Ok(*wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState::*;

    const NOW: i64 = 1_000_000;
    const DUE: i64 = 2_000_000;

    fn task(state: TaskState) -> Current<'static> {
        Current {
            subprocessor: "accounting",
            state,
            handle: None,
            records_affected: 3,
            attempts: 4,
            phase: ContractPhase::Unspecified,
            cancel_requested: false,
            retain_until: None,
            legal_basis: "",
            reason: "",
            call_started: false,
        }
    }

    fn ctx() -> Context {
        Context {
            now: NOW,
            due_at: DUE,
            lease_ms: 30_000,
            confirm_interval_ms: 60_000,
            backoff_ms: 500,
        }
    }

    fn past_due() -> Context {
        Context { now: DUE, ..ctx() }
    }

    fn sql() -> Option<Holder> {
        Some(Holder {
            connector: "sql",
            supports: true,
        })
    }

    fn claimed(t: &Current<'_>, holder: Option<Holder>) -> Decision {
        let kind = RequestKind::Erasure;
        let recipient = false;
        decide(
            t,
            Event::Claimed {
                kind,
                holder,
                recipient,
            },
            &ctx(),
        )
    }

    fn ran(t: &Current<'_>, phase: Phase, result: Result<Outcome, ConnectorError>) -> Decision {
        let kind = RequestKind::Erasure;
        decide(
            t,
            Event::Ran {
                kind,
                phase,
                result,
            },
            &ctx(),
        )
    }

    fn moved(d: Decision) -> Transition {
        match d {
            Decision::Move(t) => t,
            other => panic!("expected a move, got {other:?}"),
        }
    }

    #[test]
    fn a_claimed_pending_task_starts_and_stays_reserved() {
        let d = claimed(&task(Pending), sql());
        let start = Transition {
            state: InProgress,
            hold_ms: Some(30_000),
            ..Default::default()
        };
        assert_eq!(
            d,
            Decision::Run {
                start: Some(start),
                phase: Phase::Start
            }
        );
    }

    #[test]
    fn a_claimed_task_takes_the_step_its_state_calls_for() {
        let run = |phase| Decision::Run { start: None, phase };
        assert_eq!(claimed(&task(InProgress), sql()), run(Phase::Start));
        let accepted = Current {
            handle: Some("h-1"),
            ..task(InProgress)
        };
        assert_eq!(
            claimed(&accepted, sql()),
            run(Phase::Confirm {
                handle: "h-1".into()
            })
        );
        // The run is for the task's retain_until: a later stage has a run of its own.
        let kept = Current {
            retain_until: Some(1_900_000_000_000),
            ..task(Retained)
        };
        assert_eq!(
            claimed(&kept, sql()),
            run(Phase::RetentionExpired {
                until_ms: 1_900_000_000_000
            })
        );
        assert_eq!(claimed(&task(Completed), sql()), Decision::Ignore);
    }

    #[test]
    fn a_missing_connector_or_body_fails_the_task() {
        let t = moved(claimed(&task(Pending), None));
        assert_eq!(t.state, Failed);
        assert!(
            t.reason.contains("accounting is no longer configured"),
            "{t:?}"
        );
    }

    #[test]
    fn an_unsupported_kind_is_refused_naming_it() {
        let holder = Some(Holder {
            connector: "adapter",
            supports: false,
        });
        let t = moved(decide(
            &task(Pending),
            Event::Claimed {
                kind: RequestKind::Restriction,
                holder,
                recipient: false,
            },
            &ctx(),
        ));
        assert_eq!(t.state, Refused);
        assert_eq!(
            t.reason,
            "subprocessor accounting (adapter connector) does not support RESTRICTION"
        );
    }

    /// [`Event::HolderDown`] for a holder failing since NOW - 60 s with "connection refused",
    /// at the task's `waits`th wait.
    fn holder_down(t: &Current<'_>, phase: Phase, until: i64, waits: i64, c: &Context) -> Decision {
        let event = Event::HolderDown {
            phase,
            until,
            since: NOW - 60_000,
            error: "connection refused",
            waits,
        };
        decide(t, event, c)
    }

    #[test]
    fn an_unreachable_holder_is_waited_for_until_the_due_date() {
        // A third wait is not acknowledged: only postponed.
        let down =
            |phase, until, ctx: &Context| holder_down(&task(InProgress), phase, until, 3, ctx);
        let note = Some("subprocessor accounting is unreachable; waiting".to_string());
        assert_eq!(
            down(Phase::Start, NOW + 700, &ctx()),
            Decision::Later {
                at: NOW + 700,
                error: note.clone()
            }
        );
        // A mark beyond the due date waits only until the due date; then the task is given
        // its last call.
        assert_eq!(
            down(Phase::Start, DUE + 5_000, &ctx()),
            Decision::Later {
                at: DUE,
                error: note.clone()
            }
        );
        assert_eq!(
            down(Phase::Start, DUE + 5_000, &past_due()),
            Decision::Run {
                start: None,
                phase: Phase::Start
            }
        );
        // Retained data is erased however late: it waits the whole mark.
        assert_eq!(
            down(
                Phase::RetentionExpired { until_ms: 0 },
                DUE + 5_000,
                &past_due()
            ),
            Decision::Later {
                at: DUE + 5_000,
                error: note
            }
        );
    }

    /// Waits 1, 2, 4, 8... for an unreachable holder are acknowledged IN_PROGRESS saying
    /// since when and why it is unreachable, when the next try comes and until when, the
    /// handle kept; the others, a retention run's and a cancelled task's are postponed.
    /// Before, every wait was only postponed: the registry saw no reason.
    #[test]
    fn waits_for_an_unreachable_holder_are_acknowledged_on_the_retry_schedule() {
        let accepted = Current {
            handle: Some("h-1"),
            ..task(InProgress)
        };
        let confirm = || Phase::Confirm {
            handle: "h-1".into(),
        };
        let why = format!(
            "subprocessor accounting is unreachable since {} (connection refused)",
            date_label(NOW - 60_000)
        );
        let kept = "subprocessor accounting is unreachable; waiting";
        for waits in 1..=9 {
            let d = holder_down(&accepted, confirm(), NOW + 700, waits, &ctx());
            if ![1, 2, 4, 8].contains(&waits) {
                assert_eq!(d.retried(), Some((NOW + 700, kept)), "{waits}");
                assert!(matches!(d, Decision::Later { .. }), "{waits}: {d:?}");
                continue;
            }
            let t = moved(d);
            assert_eq!(t.state, InProgress);
            assert_eq!(
                t.reason,
                format!(
                    "waiting: {why}; next try at {}, until {}",
                    date_label(NOW + 700),
                    date_label(DUE)
                )
            );
            assert_eq!(t.note, t.reason);
            assert_eq!(t.records_affected, 3);
            assert_eq!(t.next_attempt_at, Some(NOW + 700));
            assert_eq!(t.handle.as_deref(), Some("h-1"));
            assert_eq!(t.error.as_deref(), Some(kept));
            // A contract end keeps the phase and counts recorded.
            assert_eq!(t.contract, None);
        }
        // Without the holder's words, the reason says when alone.
        let event = Event::HolderDown {
            phase: Phase::Start,
            until: DUE + 5,
            since: NOW,
            error: "",
            waits: 1,
        };
        let t = moved(decide(&task(InProgress), event, &ctx()));
        assert_eq!(
            t.reason,
            format!(
                "waiting: subprocessor accounting is unreachable since {}; next try at {}, \
                 until {}",
                date_label(NOW),
                date_label(DUE),
                date_label(DUE)
            )
        );
        let retained = Current {
            retain_until: Some(DUE),
            ..task(Retained)
        };
        let run = Phase::RetentionExpired { until_ms: DUE };
        let d = holder_down(&retained, run, NOW + 700, 1, &ctx());
        assert!(matches!(d, Decision::Later { .. }), "{d:?}");
        let marked = Current {
            cancel_requested: true,
            ..task(InProgress)
        };
        let d = holder_down(&marked, Phase::Start, NOW + 700, 1, &ctx());
        assert!(matches!(d, Decision::Later { .. }), "{d:?}");
    }

    #[test]
    fn confirmed_outcomes_are_final() {
        let file = ExportedFile {
            name: "customers.csv".into(),
            media_type: "text/csv".into(),
            categories: vec!["contact".into()],
            size: 10,
            sha256: "ab".repeat(32),
        };
        let t = moved(ran(
            &task(InProgress),
            Phase::Start,
            Ok(Outcome::Completed {
                records_affected: 2,
                note: "exported".into(),
                files: vec![file.clone()],
                erased: Vec::new(),
            }),
        ));
        assert_eq!(
            (t.state, t.records_affected, t.confirmed),
            (Completed, 2, true)
        );
        assert_eq!(t.export_files, Some(vec![file]));
        assert_eq!(t.next_attempt_at, None);
        let t = moved(ran(
            &task(InProgress),
            Phase::Start,
            Ok(Outcome::NotFound {
                note: "searched".into(),
            }),
        ));
        assert_eq!(
            (t.state, t.confirmed, t.note.as_str()),
            (NotFound, true, "searched")
        );
    }

    #[test]
    fn retained_data_sleeps_until_its_date_and_counts_every_run() {
        let retained = || {
            Ok(Outcome::Retained {
                legal_basis: "Kirjanpitolaki 2:10".into(),
                until_ms: NOW + 99,
                records_affected: 1,
                note: "kept invoices".into(),
                erased: vec![ErasedCount {
                    target: "contacts".into(),
                    action: "deleted".into(),
                    count: 1,
                }],
            })
        };
        let t = moved(ran(&task(InProgress), Phase::Start, retained()));
        assert_eq!(t.state, Retained);
        assert_eq!(t.records_affected, 1);
        assert_eq!(t.retain_until, Some(NOW + 99));
        assert_eq!(t.next_attempt_at, Some(NOW + 99));
        assert_eq!(t.legal_basis, "Kirjanpitolaki 2:10");
        // What this step erased goes on to the deletion certificate.
        assert_eq!(t.erased.counts.len(), 1);
        // When the date has come, the rest is erased; earlier records still count.
        let t = moved(ran(
            &task(Retained),
            Phase::RetentionExpired { until_ms: 0 },
            Ok(Outcome::Completed {
                records_affected: 2,
                note: "erased the rest".into(),
                files: Vec::new(),
                erased: Vec::new(),
            }),
        ));
        assert_eq!((t.state, t.records_affected), (Completed, 5));
        let t = moved(ran(
            &task(Retained),
            Phase::RetentionExpired { until_ms: 0 },
            retained(),
        ));
        assert_eq!((t.state, t.records_affected), (Retained, 4));
        // A count a holder gives at the very top does not wrap when the runs are added up.
        let mut top = task(Retained);
        top.records_affected = i64::MAX;
        let t = moved(ran(
            &top,
            Phase::RetentionExpired { until_ms: 0 },
            retained(),
        ));
        assert_eq!(t.records_affected, i64::MAX);
    }

    #[test]
    fn a_retention_is_an_answer_to_an_erasure_only() {
        for kind in [
            RequestKind::ReturnOfData,
            RequestKind::Transfer,
            RequestKind::Rectification,
            RequestKind::Restriction,
            RequestKind::Objection,
        ] {
            let d = decide(
                &task(InProgress),
                Event::Ran {
                    kind,
                    phase: Phase::Start,
                    result: Ok(Outcome::Retained {
                        legal_basis: "Kirjanpitolaki 2:10".into(),
                        until_ms: NOW + 99,
                        records_affected: 1,
                        note: "kept invoices".into(),
                        erased: Vec::new(),
                    }),
                },
                &ctx(),
            );
            let t = moved(d);
            assert_eq!(t.state, Failed, "{kind:?}");
            assert!(
                t.reason.contains("only an erasure") && t.reason.contains("Kirjanpitolaki 2:10"),
                "{kind:?}: {}",
                t.reason
            );
        }
    }

    #[test]
    fn an_export_is_not_completed_until_it_is_delivered() {
        let file = ExportedFile {
            name: "customers.json".into(),
            media_type: "application/json".into(),
            categories: vec!["contact".into()],
            size: 120,
            sha256: "cd".repeat(32),
        };
        for kind in [RequestKind::ReturnOfData, RequestKind::Transfer] {
            let exported = Ok(Outcome::Completed {
                records_affected: 3,
                note: "exported".into(),
                files: vec![file.clone()],
                erased: Vec::new(),
            });
            let event = Event::Ran {
                kind,
                phase: Phase::Start,
                result: exported,
            };
            let t = moved(decide(&task(InProgress), event, &ctx()));
            assert_eq!((t.state, t.confirmed), (InProgress, true), "{kind:?}");
            assert_eq!(t.next_attempt_at, Some(NEVER), "not run again");
            assert_eq!(t.export_files, Some(vec![file.clone()]));
            assert!(t.note.contains("1 file(s), 120 bytes"), "{}", t.note);
            // Either is queued for delivery: to the registry, or to the recipient.
            assert!(t.upload, "{kind:?}");
            let to_recipient = kind == RequestKind::Transfer;
            assert_eq!(
                t.note.contains("sending it to the recipient"),
                to_recipient,
                "{}",
                t.note
            );
            assert_eq!(
                t.note.contains("uploading it to the registry"),
                !to_recipient
            );
            // A holder with nothing on the subject has nothing to deliver: that answer is
            // final.
            let nothing = Event::Ran {
                kind,
                phase: Phase::Start,
                result: Ok(Outcome::NotFound {
                    note: "no such customer".into(),
                }),
            };
            assert_eq!(
                moved(decide(&task(InProgress), nothing, &ctx())).state,
                NotFound
            );
        }
    }

    #[test]
    fn a_delivered_export_completes_the_task_and_an_undeliverable_one_fails_it() {
        let delivered = || Event::Delivered {
            to: Destination::Registry,
            files: 2,
            bytes: 300,
            receipt: None,
        };
        let t = moved(decide(&task(InProgress), delivered(), &Context::at(NOW)));
        assert_eq!((t.state, t.confirmed), (Completed, true));
        assert_eq!(t.records_affected, 3, "the export's records stay counted");
        assert!(t.note.contains("stored at the registry"), "{}", t.note);
        assert!(t.note.contains("2 file(s), 300 bytes"), "{}", t.note);
        assert!(!t.upload);
        assert_eq!(t.transfer_receipt, None);
        let gone = Event::Undeliverable {
            to: Destination::Registry,
            reason: "export file a.json vanished",
        };
        let t = moved(decide(&task(InProgress), gone, &Context::at(NOW)));
        assert_eq!(t.state, Failed);
        assert_eq!(
            t.reason,
            "the export could not be delivered to the registry: export file a.json vanished"
        );
        // A task cancelled meanwhile stays cancelled.
        for state in [Cancelled, Failed, Completed] {
            assert_eq!(
                decide(&task(state), delivered(), &Context::at(NOW)),
                Decision::Ignore
            );
        }
    }

    #[test]
    fn a_cancellation_that_came_while_the_export_travelled_stops_what_did_not_arrive() {
        let marked = Current {
            cancel_requested: true,
            ..task(InProgress)
        };
        // Arrived anyway: COMPLETED, saying the cancellation came too late.
        let arrived = Event::Delivered {
            to: Destination::Recipient("new-bookkeeper"),
            files: 2,
            bytes: 300,
            receipt: None,
        };
        let t = moved(decide(&marked, arrived, &ctx()));
        assert_eq!((t.state, t.confirmed), (Completed, true));
        assert!(t.note.contains("new-bookkeeper"), "{}", t.note);
        assert!(t.note.contains("too late to stop it"), "{}", t.note);
        // Not arrived: not sent again, whatever the time left.
        for event in [
            Event::DeliveryFailed {
                to: Destination::Registry,
                files: 2,
                bytes: 300,
                attempt: 1,
                error: "unavailable",
            },
            Event::Undeliverable {
                to: Destination::Registry,
                reason: "refused",
            },
        ] {
            let t = moved(decide(&marked, event, &ctx()));
            assert_eq!(t.state, Cancelled);
            assert!(
                t.reason.contains("not delivered to the registry"),
                "{}",
                t.reason
            );
            assert_eq!(t.records_affected, 3);
        }
    }

    #[test]
    fn a_transfer_without_a_recipient_fails_before_anything_is_exported() {
        let claim = |kind, recipient| {
            decide(
                &task(Pending),
                Event::Claimed {
                    kind,
                    holder: sql(),
                    recipient,
                },
                &ctx(),
            )
        };
        let t = moved(claim(RequestKind::Transfer, false));
        assert_eq!(t.state, Failed);
        assert!(t.reason.contains("without a recipient"), "{}", t.reason);
        assert!(matches!(
            claim(RequestKind::Transfer, true),
            Decision::Run {
                phase: Phase::Start,
                ..
            }
        ));
        // Other kinds never name one.
        assert!(matches!(
            claim(RequestKind::ReturnOfData, false),
            Decision::Run { .. }
        ));
    }

    #[test]
    fn a_transfer_completes_with_its_receipt() {
        let receipt = TransferReceipt {
            request_id: "r1".into(),
            subprocessor: "accounting".into(),
            manifest_sha256: "ef".repeat(32),
            bytes: 300,
            files: 2,
            received_at: None,
            recipient: "new-bookkeeper".into(),
            ..Default::default()
        };
        let t = moved(decide(
            &task(InProgress),
            Event::Delivered {
                to: Destination::Recipient("new-bookkeeper"),
                files: 2,
                bytes: 300,
                receipt: Some(receipt.clone()),
            },
            &Context::at(NOW),
        ));
        assert_eq!((t.state, t.confirmed), (Completed, true));
        assert_eq!(t.transfer_receipt, Some(receipt));
        assert_eq!(
            t.note,
            format!(
                "export received by recipient new-bookkeeper (2 file(s), 300 bytes), receipt \
                 over manifest SHA-256 {}",
                "ef".repeat(32)
            )
        );
    }

    #[test]
    fn a_failed_delivery_says_what_is_missing_until_the_due_date_then_fails() {
        let failed_once = |ctx: &Context, state| {
            decide(
                &task(state),
                Event::DeliveryFailed {
                    to: Destination::Recipient("new-bookkeeper"),
                    files: 3,
                    bytes: 12_400_000,
                    attempt: 4,
                    error: "connection refused",
                },
                ctx,
            )
        };
        let t = moved(failed_once(&ctx(), InProgress));
        assert_eq!((t.state, t.confirmed), (InProgress, true));
        assert_eq!(t.records_affected, 3, "the export's records stay counted");
        assert_eq!(t.next_attempt_at, Some(NEVER), "the runner leaves it alone");
        assert!(!t.upload, "the delivery is queued already");
        assert_eq!(
            t.note,
            "sending 3 file(s) (12.4 MB) to recipient new-bookkeeper: attempt 4 failed at \
             1970-01-01T00:16:40Z: connection refused; next attempt at 1970-01-01T00:16:40Z, \
             retrying until 1970-01-01T00:33:20Z"
        );
        assert_eq!(t.reason, t.note, "the registry's events show reasons");
        // The next attempt comes after the backoff, never after the due date.
        assert_eq!(delivery_retry_at(&ctx()), NOW + 500);
        let close = Context {
            now: DUE - 100,
            ..ctx()
        };
        assert_eq!(delivery_retry_at(&close), DUE);
        // At the due date the last failure is final, whatever it was (a FAILED_PRECONDITION
        // too: no answer is retried past the due date).
        let t = moved(failed_once(&past_due(), InProgress));
        assert_eq!(t.state, Failed);
        assert_eq!(
            t.reason,
            "gave up at the due date after 4 attempt(s) to deliver the export to recipient \
             new-bookkeeper: connection refused"
        );
        assert_eq!(failed_once(&ctx(), Cancelled), Decision::Ignore);
    }

    #[test]
    fn failed_deliveries_are_acknowledged_at_doubling_gaps() {
        // The task's reason is the note of the last failure acknowledged, of the same cause.
        let last = moved(decide(
            &task(InProgress),
            Event::DeliveryFailed {
                to: Destination::Registry,
                files: 1,
                bytes: 10,
                attempt: 2,
                error: "connection refused",
            },
            &Context { now: 7, ..ctx() },
        ));
        let acknowledged = Current {
            reason: &last.reason,
            ..task(InProgress)
        };
        let failed = |attempt, ctx: &Context| {
            decide(
                &acknowledged,
                Event::DeliveryFailed {
                    to: Destination::Registry,
                    files: 1,
                    bytes: 10,
                    attempt,
                    error: "connection refused",
                },
                ctx,
            )
        };
        for attempt in [1, 2, 4, 8, 1024] {
            assert!(
                matches!(failed(attempt, &ctx()), Decision::Move(_)),
                "attempt {attempt} is acknowledged"
            );
        }
        for attempt in [3, 5, 7, 1023] {
            assert_eq!(
                failed(attempt, &ctx()),
                Decision::Later {
                    at: NOW + 500,
                    error: Some("connection refused".into())
                },
                "attempt {attempt} is only retried"
            );
        }
        // At the due date every attempt ends the task, acknowledged.
        assert!(matches!(failed(3, &past_due()), Decision::Move(t) if t.state == Failed));
    }

    /// A failure whose cause differs from the one acknowledged last is acknowledged whatever
    /// its attempt, so the registry never shows a cause that has passed; the same cause
    /// again (its counts and times aside) waits for the next of attempts 1, 2, 4, 8....
    /// Before, attempts 9 to 15 were never acknowledged, whatever they failed with.
    #[test]
    fn a_failed_delivery_is_acknowledged_when_its_cause_changes() {
        let to = Destination::Recipient("new-bookkeeper");
        let fail = |reason: &str, attempt, error: &str, now| {
            let t = Current {
                reason,
                ..task(InProgress)
            };
            let event = Event::DeliveryFailed {
                to,
                files: 8,
                bytes: 6_600_000,
                attempt,
                error,
            };
            decide(&t, event, &Context { now, ..ctx() })
        };
        let wrong = "recipient new-bookkeeper presented identity spiffe://x/other";
        let refused = "transport error: Connection refused (os error 111)";
        let eighth = moved(fail("", 8, wrong, NOW));
        assert!(eighth.reason.contains(wrong), "{}", eighth.reason);
        // Attempt 9 fails otherwise: acknowledged, saying when it failed and when the next
        // attempt comes.
        let ninth = match fail(&eighth.reason, 9, refused, NOW + 60_000) {
            Decision::Move(t) => t,
            other => panic!("a changed cause is acknowledged: {other:?}"),
        };
        assert_eq!(
            ninth.reason,
            format!(
                "sending 8 file(s) (6.6 MB) to recipient new-bookkeeper: attempt 9 failed at \
                 1970-01-01T00:17:40Z: {refused}; next attempt at 1970-01-01T00:17:40Z, \
                 retrying until 1970-01-01T00:33:20Z"
            )
        );
        assert_eq!(
            (ninth.state, ninth.next_attempt_at),
            (InProgress, Some(NEVER))
        );
        // The same cause at attempts 10 to 15, at other times: only retried.
        for attempt in 10..=15 {
            let now = NOW + attempt * 60_000;
            assert_eq!(
                fail(&ninth.reason, attempt, refused, now),
                Decision::Later {
                    at: now + 500,
                    error: Some(refused.into())
                },
                "attempt {attempt}"
            );
        }
        assert!(matches!(
            fail(&ninth.reason, 16, refused, NOW),
            Decision::Move(_)
        ));
        // A stream that breaks at another byte each time is the same cause, not news.
        let broke = |from: u64, stored: u64| {
            format!(
                "sending customers.json (from byte {from}; {stored} bytes stored) at recipient \
                 new-bookkeeper: Unavailable: the stream broke"
            )
        };
        let first = moved(fail("", 4, &broke(0, 1_000), NOW));
        assert!(matches!(
            fail(&first.reason, 5, &broke(1_000, 250_000), NOW + 9_000),
            Decision::Later { .. }
        ));
        // A reason in the words of an earlier version, or of another step, is no such note.
        let old = "sending 8 file(s) (6.6 MB) to recipient new-bookkeeper: attempt 8 failed: \
                   transport error: Connection refused (os error 111); retrying until \
                   1970-01-01T00:33:20Z";
        assert!(matches!(fail(old, 9, refused, NOW), Decision::Move(_)));
        assert!(matches!(
            fail("exported, delivering", 3, refused, NOW),
            Decision::Move(_)
        ));
    }

    #[test]
    fn long_errors_are_clipped_and_sizes_read_well() {
        let long = "é".repeat(2000);
        let c = clip(&long);
        assert!(
            c.len() <= 1024 && c.ends_with(crate::text::CUT_MARKER),
            "{}",
            c.len()
        );
        assert_eq!(clip("short"), "short");
        assert_eq!(size_label(999), "999 bytes");
        assert_eq!(size_label(1500), "1.5 kB");
        assert_eq!(size_label(3_000_000_000), "3.0 GB");
    }

    #[test]
    fn accepted_work_waits_for_its_confirmation() {
        let accepted = || {
            Ok(Outcome::Accepted {
                handle: "h-1".into(),
                note: "queued".into(),
            })
        };
        let t = moved(ran(&task(InProgress), Phase::Start, accepted()));
        assert_eq!(t.state, InProgress);
        assert!(!t.confirmed);
        assert_eq!(t.handle.as_deref(), Some("h-1"));
        assert_eq!(t.next_attempt_at, Some(NOW + 60_000));
        assert!(
            t.note.ends_with("awaiting its confirmation: queued"),
            "{t:?}"
        );
        // Asked again, the same answer changes nothing.
        let confirm = Phase::Confirm {
            handle: "h-1".into(),
        };
        assert_eq!(
            ran(&task(InProgress), confirm, accepted()),
            Decision::Later {
                at: NOW + 60_000,
                error: None
            }
        );
    }

    /// A retention run the holder accepts keeps the count of the earlier runs and the
    /// retention itself (the data is still there) until the holder confirms; the confirmed
    /// count adds to the earlier ones, as the retention run's own answer would, and the
    /// confirmation is asked for however late, like the run.
    #[test]
    fn a_retention_run_accepted_counts_every_run_once_confirmed() {
        let retained = Current {
            records_affected: 5,
            retain_until: Some(NOW - 10),
            legal_basis: "Kirjanpitolaki 2:10",
            ..task(Retained)
        };
        let run = Phase::RetentionExpired { until_ms: NOW - 10 };
        let accepted = Ok(Outcome::Accepted {
            handle: "h-1".into(),
            note: "queued".into(),
        });
        let t = moved(ran(&retained, run, accepted));
        assert_eq!(
            (t.state, t.records_affected, t.handle.as_deref()),
            (InProgress, 5, Some("h-1"))
        );
        assert_eq!(
            (t.legal_basis.as_str(), t.retain_until),
            ("Kirjanpitolaki 2:10", Some(NOW - 10))
        );
        let waiting = Current {
            handle: Some("h-1"),
            ..Current {
                state: InProgress,
                ..retained
            }
        };
        let confirm = || Phase::Confirm {
            handle: "h-1".into(),
        };
        let done = Ok(Outcome::Completed {
            records_affected: 2,
            note: "erased the rest".into(),
            files: Vec::new(),
            erased: Vec::new(),
        });
        let t = moved(ran(&waiting, confirm(), done.clone()));
        assert_eq!((t.state, t.records_affected), (Completed, 7));
        assert_eq!((t.legal_basis.as_str(), t.retain_until), ("", None));
        // Past the request's due date, a transient failure of the confirmation is retried.
        let down = Err(ConnectorError::Transient("connection reset".into()));
        let d = decide(
            &waiting,
            Event::Ran {
                kind: RequestKind::Erasure,
                phase: confirm(),
                result: down,
            },
            &past_due(),
        );
        assert!(matches!(d, Decision::Later { .. }), "{d:?}");
        // Outside a retention run, a confirmation's count is the holder's alone.
        let plain = Current {
            handle: Some("h-1"),
            ..task(InProgress)
        };
        let t = moved(ran(&plain, confirm(), done));
        assert_eq!((t.state, t.records_affected), (Completed, 2));
        let accepted = Ok(Outcome::Accepted {
            handle: "h-2".into(),
            note: "queued".into(),
        });
        let t = moved(ran(&task(InProgress), Phase::Start, accepted));
        assert_eq!((t.legal_basis.as_str(), t.retain_until), ("", None));
    }

    #[test]
    fn manual_work_waits_for_an_operator_and_a_refusal_is_final() {
        let t = moved(ran(
            &task(InProgress),
            Phase::Start,
            Ok(Outcome::WaitingForOperator {
                note: "shred it".into(),
            }),
        ));
        assert_eq!(
            (t.state, t.next_attempt_at),
            (WaitingForOperator, Some(NEVER))
        );
        let t = moved(ran(
            &task(InProgress),
            Phase::Start,
            Ok(Outcome::Refused {
                reason: "no such audience".into(),
            }),
        ));
        assert_eq!((t.state, t.reason.as_str()), (Refused, "no such audience"));
    }

    #[test]
    fn transient_errors_are_retried_with_backoff_until_the_due_date() {
        let down = || Err(ConnectorError::Transient("connection refused".into()));
        let third = Current {
            attempts: 3,
            ..task(InProgress)
        };
        assert_eq!(
            ran(&third, Phase::Start, down()),
            Decision::Later {
                at: NOW + 500,
                error: Some("connection refused".into())
            }
        );
        // The holder's Retry-After wins when it asks for longer, never when shorter.
        let after = |after_ms| {
            Err(ConnectorError::RetryAfter {
                message: "429".into(),
                after_ms,
            })
        };
        let at = |d: Decision| d.retried().expect("retried").0;
        assert_eq!(
            at(ran(&task(InProgress), Phase::Start, after(9_000))),
            NOW + 9_000
        );
        assert_eq!(
            at(ran(&task(InProgress), Phase::Start, after(10))),
            NOW + 500
        );
        // Past the due date the task fails, saying how often it was tried...
        let t = moved(decide(
            &task(InProgress),
            Event::Ran {
                kind: RequestKind::Erasure,
                phase: Phase::Start,
                result: down(),
            },
            &past_due(),
        ));
        assert_eq!(t.state, Failed);
        assert_eq!(
            t.reason,
            "gave up at the due date after 4 attempt(s): connection refused"
        );
        // ...except retained data, which is erased however late.
        let d = decide(
            &task(Retained),
            Event::Ran {
                kind: RequestKind::Erasure,
                phase: Phase::RetentionExpired { until_ms: 0 },
                result: down(),
            },
            &past_due(),
        );
        assert!(
            matches!(d, Decision::Later { at, .. } if at == DUE + 500),
            "{d:?}"
        );
    }

    /// A failure that may pass is acknowledged IN_PROGRESS on attempts 1, 2, 4, 8..., saying
    /// what failed, at which attempt, when the next comes and until when; the holder's words
    /// are kept for operators, and accepted work keeps its handle. Before, every retry was
    /// only postponed: the registry showed the task as it was before the failure.
    #[test]
    fn a_retried_failure_is_acknowledged_at_doubling_gaps() {
        let down = || Err(ConnectorError::Transient("connection refused".into()));
        let attempt = |attempts| Current {
            attempts,
            ..task(InProgress)
        };
        let t = moved(ran(&attempt(1), Phase::Start, down()));
        let said = format!(
            "erasure at subprocessor accounting: attempt 1 failed at {}: connection refused; \
             next attempt at {}, retrying until {}",
            date_label(NOW),
            date_label(NOW + 500),
            date_label(DUE)
        );
        assert_eq!(
            (t.state, t.records_affected, t.confirmed),
            (InProgress, 3, false)
        );
        assert_eq!((t.note.as_str(), t.reason.as_str()), (&*said, &*said));
        assert_eq!(t.next_attempt_at, Some(NOW + 500));
        assert_eq!(t.error.as_deref(), Some("connection refused"));
        assert_eq!((t.hold_ms, t.contract, t.upload), (None, None, false));
        let acknowledged: Vec<i64> = (1..=16)
            .filter(|&n| matches!(ran(&attempt(n), Phase::Start, down()), Decision::Move(_)))
            .collect();
        assert_eq!(acknowledged, [1, 2, 4, 8, 16]);
        // Accepted work is still the holder's: its confirmation is asked for next time.
        let accepted = Current {
            handle: Some("h-1"),
            ..attempt(2)
        };
        let confirm = Phase::Confirm {
            handle: "h-1".into(),
        };
        let t = moved(ran(&accepted, confirm, down()));
        assert_eq!(t.handle.as_deref(), Some("h-1"));
        assert!(
            t.reason
                .starts_with("the confirmation of the accepted erasure at subprocessor"),
            "{}",
            t.reason
        );
        // A claimed PENDING task (its start recorded IN_PROGRESS before the call) alike.
        let pending = Current {
            attempts: 1,
            ..task(Pending)
        };
        assert_eq!(moved(ran(&pending, Phase::Start, down())).state, InProgress);
    }

    /// A contract end's bulk step that failed and is retried is acknowledged in its phase
    /// with the counts its call reported last (what was done is still done); a call that
    /// reported nothing (or whose counts the runner withheld, from before the erasure's
    /// check passed) keeps the recorded counts.
    #[test]
    fn a_retried_bulk_step_is_acknowledged_in_its_phase_with_its_counts_kept() {
        let down = || {
            Err(ConnectorError::Transient(
                "adapter ExecuteBulk: Unavailable".into(),
            ))
        };
        for (op, phase, what) in [
            (BulkOp::Erase, ContractPhase::Deleting, "deleting"),
            (BulkOp::Export, ContractPhase::Returning, "returning"),
        ] {
            let t = Current {
                attempts: 1,
                ..contract_task(InProgress, phase)
            };
            let event = |progress| Event::BulkRan {
                op,
                phase: Phase::Start,
                result: down(),
                progress,
                earlier: BulkProgress::default(),
            };
            let silent = moved(decide(&t, event(BulkProgress::default()), &ctx()));
            assert_eq!(silent.contract, Some(ContractStep::keep(phase)));
            let t = moved(bulk(&t, op, Phase::Start, down()));
            assert_eq!((t.state, t.records_affected), (InProgress, 3));
            let reported = BulkProgress {
                subjects_done: 2,
                subjects_total: 2,
                records_done: 5,
                records_total: 5,
                erased: Vec::new(),
            };
            assert_eq!(t.contract, Some(ContractStep::at(phase, reported)));
            assert_eq!(
                t.reason,
                format!(
                    "{what} the controller's data at subprocessor accounting: attempt 1 failed \
                     at {}: adapter ExecuteBulk: Unavailable; next attempt at {}, retrying \
                     until {}",
                    date_label(NOW),
                    date_label(NOW + 500),
                    date_label(DUE)
                )
            );
            assert_eq!(t.note, t.reason);
            assert!(!t.discard_export && !t.upload && t.export_files.is_none());
        }
        // Attempt 3 is only postponed.
        let third = Current {
            attempts: 3,
            ..contract_task(InProgress, ContractPhase::Deleting)
        };
        let d = bulk(&third, BulkOp::Erase, Phase::Start, down());
        assert!(
            matches!(d, Decision::Later { at, .. } if at == NOW + 500),
            "{d:?}"
        );
        // A retention run stays RETAINED, however often it failed.
        let retained = Current {
            attempts: 1,
            retain_until: Some(NOW - 1),
            ..contract_task(Retained, ContractPhase::Done)
        };
        let run = Phase::RetentionExpired { until_ms: NOW - 1 };
        let d = bulk(&retained, BulkOp::Erase, run, down());
        assert!(matches!(d, Decision::Later { .. }), "{d:?}");
    }

    /// A failure of the call under way when the request was cancelled ends the task, never
    /// acknowledged as retried.
    #[test]
    fn a_failure_of_a_task_marked_cancelled_is_not_acknowledged_as_retried() {
        let marked = Current {
            cancel_requested: true,
            attempts: 1,
            ..task(InProgress)
        };
        let down = Err(ConnectorError::Transient("connection refused".into()));
        let t = moved(ran(&marked, Phase::Start, down));
        assert_eq!(t.state, Cancelled);
        assert_eq!(t.error, None);
    }

    #[test]
    fn a_permanent_error_fails_at_once() {
        // The SQL connector's answer when a rule names a column the table no longer has:
        // only an operator can fix the configuration or the schema.
        let error = "anonymizing invoices: error returned from database: (code: 1) no such \
                     column: no_such_column";
        let t = moved(ran(
            &task(InProgress),
            Phase::Start,
            Err(ConnectorError::Permanent(error.into())),
        ));
        assert_eq!((t.state, t.reason.as_str()), (Failed, error));
        assert_eq!(
            t.records_affected, 0,
            "a first run that failed erased nothing"
        );
    }

    /// A retention run that fails keeps the count of what the earlier runs erased: it covers
    /// every run.
    #[test]
    fn a_failed_retention_run_keeps_the_earlier_count() {
        let retained = Current {
            retain_until: Some(NOW - 1),
            legal_basis: "Kirjanpitolaki 2:10",
            ..task(Retained)
        };
        let t = moved(ran(
            &retained,
            Phase::RetentionExpired { until_ms: NOW - 1 },
            Err(ConnectorError::Permanent("no such table".into())),
        ));
        assert_eq!((t.state, t.records_affected), (Failed, 3));
    }

    #[test]
    fn cancelling_ends_open_tasks_only() {
        let cancel = |state| {
            decide(
                &task(state),
                Event::Cancel {
                    reason: "withdrawn",
                    leased: false,
                    exports: false,
                    transferring: false,
                },
                &Context::at(NOW),
            )
        };
        for state in [Pending, InProgress, WaitingForOperator] {
            let t = moved(cancel(state));
            assert_eq!(
                (t.state, t.reason.as_str()),
                (Cancelled, "cancelled: withdrawn")
            );
        }
        for state in [Completed, NotFound, Retained, Refused, Failed, Cancelled] {
            assert_eq!(cancel(state), Decision::Ignore, "{state:?}");
        }
    }

    #[test]
    fn cancelling_while_the_holder_works_marks_the_task_and_keeps_its_state() {
        let cancel = |t: &Current<'_>, leased| {
            decide(
                t,
                Event::Cancel {
                    reason: "withdrawn",
                    leased,
                    exports: false,
                    transferring: false,
                },
                &Context::at(NOW),
            )
        };
        let accepted = Current {
            handle: Some("h-1"),
            ..task(InProgress)
        };
        for (t, leased) in [(task(InProgress), true), (accepted, false)] {
            match cancel(&t, leased) {
                Decision::Mark { reason } => {
                    assert!(reason.contains("withdrawn"), "{reason}");
                    assert!(reason.contains("too late to stop it"), "{reason}");
                }
                other => panic!("expected a mark, got {other:?}"),
            }
        }
        // A claimed PENDING task has not called its holder: its start will match nothing.
        assert_eq!(moved(cancel(&task(Pending), true)).state, Cancelled);
        let marked = Current {
            cancel_requested: true,
            ..task(InProgress)
        };
        assert_eq!(cancel(&marked, true), Decision::Ignore);
    }

    /// A call whose answer was never recorded (its runner stopped, or crashed, and the lease
    /// was released or ran out) may have done the work: a cancellation before the next claim
    /// marks the task, so that the claim makes the call again and reports what the holder
    /// did, rather than CANCELLED over an erasure that may have happened.
    #[test]
    fn cancelling_after_a_cut_off_call_marks_the_task() {
        let cut_off = Current {
            call_started: true,
            ..task(InProgress)
        };
        let event = Event::Cancel {
            reason: "withdrawn",
            leased: false,
            exports: false,
            transferring: false,
        };
        match decide(&cut_off, event, &Context::at(NOW)) {
            Decision::Mark { reason } => assert!(reason.contains("withdrawn"), "{reason}"),
            other => panic!("expected a mark, got {other:?}"),
        }
    }

    #[test]
    fn a_cancellation_that_came_too_late_reports_what_the_holder_did() {
        let marked = Current {
            cancel_requested: true,
            ..task(InProgress)
        };
        let erased = Ok(Outcome::Completed {
            records_affected: 2,
            note: "deleted 2 rows".into(),
            files: Vec::new(),
            erased: vec![ErasedCount {
                target: "customers".into(),
                action: "deleted".into(),
                count: 2,
            }],
        });
        let t = moved(ran(&marked, Phase::Start, erased));
        assert_eq!((t.state, t.records_affected), (Completed, 2));
        assert_eq!(
            t.erased.counts.len(),
            1,
            "the certificate lists what was erased"
        );
        assert!(
            t.note.starts_with("deleted 2 rows (the cancellation came"),
            "{}",
            t.note
        );
        assert!(t.reason.contains("too late"), "{}", t.reason);

        let gone = Ok(Outcome::NotFound {
            note: "no such subscriber".into(),
        });
        assert_eq!(moved(ran(&marked, Phase::Start, gone)).state, NotFound);
        let refused = Ok(Outcome::Refused {
            reason: "legal hold".into(),
        });
        let t = moved(ran(&marked, Phase::Start, refused));
        assert_eq!(t.state, Refused);
        assert!(t.reason.starts_with("legal hold ("), "{}", t.reason);

        // Accepted work is done anyway: its confirmation is awaited.
        let accepted = Ok(Outcome::Accepted {
            handle: "h-2".into(),
            note: "queued".into(),
        });
        let t = moved(ran(&marked, Phase::Start, accepted));
        assert_eq!((t.state, t.handle.as_deref()), (InProgress, Some("h-2")));
        assert!(t.note.contains("confirmation is awaited"), "{}", t.note);

        // A failure that may pass is not retried; what happened is not known.
        let down = Err(ConnectorError::Transient("connection reset".into()));
        let t = moved(ran(&marked, Phase::Start, down));
        assert_eq!(t.state, Cancelled);
        assert!(t.reason.contains("is not known"), "{}", t.reason);

        // An export written is not delivered.
        let exported = Event::Ran {
            kind: RequestKind::ReturnOfData,
            phase: Phase::Start,
            result: Ok(Outcome::Completed {
                records_affected: 1,
                note: "exported".into(),
                files: Vec::new(),
                erased: Vec::new(),
            }),
        };
        let t = moved(decide(&marked, exported, &ctx()));
        assert_eq!((t.state, t.upload), (Cancelled, false));
    }

    #[test]
    fn operators_finish_only_tasks_waiting_for_them() {
        let complete = |state, not_found| {
            decide(
                &task(state),
                Event::OperatorComplete {
                    not_found,
                    records_affected: 1,
                    note: "shredded",
                    by: "ops",
                    exports: false,
                    record: None,
                },
                &Context::at(NOW),
            )
        };
        let t = moved(complete(WaitingForOperator, false));
        assert_eq!(
            (t.state, t.records_affected, t.confirmed),
            (Completed, 1, true)
        );
        assert_eq!(t.note, "shredded (confirmed by ops)");
        assert_eq!(moved(complete(WaitingForOperator, true)).state, NotFound);
        let refuse = |state| {
            decide(
                &task(state),
                Event::OperatorRefuse {
                    reason: "no folder",
                    by: "ops",
                    exports: false,
                },
                &Context::at(NOW),
            )
        };
        let t = moved(refuse(WaitingForOperator));
        assert_eq!(
            (t.state, t.reason.as_str()),
            (Refused, "no folder (refused by ops)")
        );
        assert_eq!(
            complete(Completed, false),
            Decision::Reject("the task is COMPLETED, not waiting for an operator".into())
        );
        assert_eq!(
            refuse(InProgress),
            Decision::Reject("the task is IN_PROGRESS, not waiting for an operator".into())
        );
    }

    #[test]
    fn an_operator_retries_a_failed_task_as_a_new_one() {
        let retry = |state| {
            let mut failed = task(state);
            failed.handle = Some("h-1");
            failed.records_affected = 4;
            failed.attempts = 7;
            decide(
                &failed,
                Event::OperatorRetry {
                    note: "database restored",
                    by: "ops",
                },
                &Context::at(NOW),
            )
        };
        let t = moved(retry(Failed));
        assert_eq!(
            t,
            Transition {
                state: InProgress,
                reason: "retried by ops: database restored".into(),
                ..Default::default()
            }
        );
        for state in [
            Pending,
            InProgress,
            Completed,
            NotFound,
            Retained,
            Cancelled,
            WaitingForOperator,
        ] {
            let name = state.as_str_name().trim_start_matches("TASK_STATE_");
            assert_eq!(
                retry(state),
                Decision::Reject(format!(
                    "the task is {name}: only a FAILED or REFUSED task is retried"
                ))
            );
        }
    }

    /// A refusal is often fixed at the holder (its configuration, an identity it can match
    /// by): the operator retries a REFUSED task as a FAILED one, the holder's refusal gone
    /// from its reason and nothing of the refused call kept. Before, RetryTask refused it,
    /// and its request stayed FAILED (overdue past its date, not cancellable) for good.
    #[test]
    fn an_operator_retries_a_refused_task_as_a_new_one() {
        let mut refused = task(Refused);
        refused.reason = "finds subscribers only by e-mail address or phone number";
        refused.handle = Some("h-1");
        refused.records_affected = 2;
        refused.attempts = 1;
        let event = Event::OperatorRetry {
            note: "customer numbers matched now",
            by: "ops",
        };
        assert_eq!(
            moved(decide(&refused, event, &Context::at(NOW))),
            Transition {
                state: InProgress,
                reason: "retried by ops: customer numbers matched now".into(),
                ..Default::default()
            }
        );
        // Then the holder is called, as for a new task (no handle kept to confirm).
        assert_eq!(
            claimed(&task(InProgress), sql()),
            Decision::Run {
                start: None,
                phase: Phase::Start
            }
        );
    }

    // Contract ends.

    const EFFECTIVE: i64 = NOW + 1_000;
    const GRACE: i64 = NOW + 500_000;

    fn terms(choice: ContractEndChoice) -> Terms {
        Terms {
            choice,
            effective_at: EFFECTIVE,
            grace_ends_at: GRACE,
            return_confirmed: false,
        }
    }

    fn contract_task(state: TaskState, phase: ContractPhase) -> Current<'static> {
        Current {
            phase,
            ..task(state)
        }
    }

    fn at(now: i64) -> Context {
        Context { now, ..ctx() }
    }

    fn contract_claimed(t: &Current<'_>, terms: Terms, now: i64) -> Decision {
        let event = Event::ContractClaimed {
            holder: sql(),
            terms: Some(terms),
        };
        decide(t, event, &at(now))
    }

    /// A FAILED contract end task is retried in the phase it failed in, not from the start:
    /// the claim after the retry runs that phase's step (or waits for what it waits for).
    /// Before, the retry made it IN_PROGRESS with no phase step, which no claim moved on.
    #[test]
    fn an_operator_retries_a_contract_end_task_in_its_phase() {
        let retry = |phase| {
            let mut failed = contract_task(Failed, phase);
            failed.handle = Some("job-1");
            let event = Event::OperatorRetry {
                note: "database restored",
                by: "ops",
            };
            decide(&failed, event, &Context::at(NOW))
        };
        let reason = "retried by ops: database restored";
        let rtd = terms(ContractEndChoice::ReturnThenDelete);
        // RETURNING: the export again from the start, its counts from zero.
        let t = moved(retry(ContractPhase::Returning));
        assert_eq!((t.state, t.reason.as_str()), (InProgress, reason));
        assert_eq!((t.handle, t.next_attempt_at, t.upload), (None, None, false));
        assert_eq!(
            t.contract,
            Some(ContractStep::at(
                ContractPhase::Returning,
                BulkProgress::default()
            ))
        );
        assert!(!t.discard_export);
        let resumed = contract_task(InProgress, ContractPhase::Returning);
        assert!(matches!(
            contract_claimed(&resumed, rtd, NOW),
            Decision::RunBulk {
                start: None,
                op: BulkOp::Export,
                phase: Phase::Start
            }
        ));
        // DELETING: the erasure again, its recorded progress kept for the holder to count on
        // from.
        let t = moved(retry(ContractPhase::Deleting));
        assert_eq!((t.state, t.reason.as_str()), (InProgress, reason));
        assert_eq!((t.handle, t.records_affected), (None, 0));
        assert_eq!(
            t.contract,
            Some(ContractStep::keep(ContractPhase::Deleting))
        );
        let resumed = contract_task(InProgress, ContractPhase::Deleting);
        assert!(matches!(
            contract_claimed(&resumed, rtd, NOW),
            Decision::RunBulk {
                start: None,
                op: BulkOp::Erase,
                phase: Phase::Start
            }
        ));
        // AWAITING_CONFIRMATION: waits for the confirmation again.
        let t = moved(retry(ContractPhase::AwaitingConfirmation));
        assert_eq!((t.state, t.reason.as_str()), (InProgress, reason));
        assert_eq!(
            t.contract,
            Some(ContractStep::keep(ContractPhase::AwaitingConfirmation))
        );
        // SCHEDULED: PENDING again, started by the claim as the terms say.
        let t = moved(retry(ContractPhase::Scheduled));
        assert_eq!((t.state, t.reason.as_str()), (Pending, reason));
        assert_eq!(t.next_attempt_at, None);
        assert_eq!(
            t.contract,
            Some(ContractStep::keep(ContractPhase::Scheduled))
        );
        // DONE: it failed in a retention run.
        assert!(matches!(retry(ContractPhase::Done), Decision::Reject(_)));
        // A REFUSED one (an operator refused its manual step) resumes in its phase as well.
        let refused = contract_task(Refused, ContractPhase::Deleting);
        let event = Event::OperatorRetry {
            note: "database restored",
            by: "ops",
        };
        let t = moved(decide(&refused, event, &Context::at(NOW)));
        assert_eq!((t.state, t.reason.as_str()), (InProgress, reason));
        assert_eq!(t.contract.map(|c| c.phase), Some(ContractPhase::Deleting));
        // Only a FAILED or REFUSED task.
        let running = contract_task(InProgress, ContractPhase::Deleting);
        let event = Event::OperatorRetry {
            note: "database restored",
            by: "ops",
        };
        assert_eq!(
            decide(&running, event, &Context::at(NOW)),
            Decision::Reject(
                "the task is IN_PROGRESS: only a FAILED or REFUSED task is retried".into()
            )
        );
    }

    /// An erasure resumed counts as the whole step: done never below what was recorded,
    /// the total the one counted when the deletion began; after a call cut off with nothing
    /// recorded the total is unknown (0) once anything is done, and stays so; exports,
    /// confirmations and first calls report as the connector counted.
    #[test]
    fn step_counts_are_the_whole_steps() {
        let p = |sd, st, rd, rt| BulkProgress {
            subjects_done: sd,
            subjects_total: st,
            records_done: rd,
            records_total: rt,
            erased: Vec::new(),
        };
        let none = BulkProgress::default();
        let erase = |recorded: BulkProgress, cut_off, last| {
            step_counts(BulkOp::Erase, &Phase::Start, (&recorded, cut_off), last)
        };
        assert_eq!(erase(none.clone(), false, p(1, 4, 2, 8)), p(1, 4, 2, 8));
        // Resumed from 25/100, the connector counting 25 + 70 left: the total stays 100.
        assert_eq!(
            erase(p(10, 40, 25, 100), false, p(10, 38, 25, 95)),
            p(10, 40, 25, 100)
        );
        assert_eq!(
            erase(p(10, 40, 25, 100), true, p(38, 38, 95, 95)),
            p(38, 40, 95, 100)
        );
        // A connector counting only what it did now: done is never below what was recorded.
        assert_eq!(
            erase(p(10, 40, 25, 100), false, p(3, 30, 5, 75)),
            p(10, 40, 25, 100)
        );
        // Cut off with nothing recorded: unknown totals once anything is done.
        assert_eq!(erase(none.clone(), true, p(0, 20, 0, 50)), p(0, 20, 0, 50));
        assert_eq!(erase(none, true, p(5, 20, 9, 50)), p(5, 0, 9, 0));
        // An unknown total recorded stays unknown.
        assert_eq!(erase(p(5, 0, 9, 0), false, p(5, 20, 9, 41)), p(5, 0, 9, 0));
        let export = step_counts(
            BulkOp::Export,
            &Phase::Start,
            (&p(1, 9, 1, 9), true),
            p(0, 3, 0, 3),
        );
        assert_eq!(export, p(0, 3, 0, 3));
        let confirm = Phase::Confirm { handle: "h".into() };
        let confirmed = step_counts(
            BulkOp::Erase,
            &confirm,
            (&p(1, 9, 1, 9), false),
            p(0, 3, 0, 3),
        );
        assert_eq!(confirmed, p(0, 3, 0, 3));
    }

    fn bulk(
        t: &Current<'_>,
        op: BulkOp,
        phase: Phase,
        result: Result<Outcome, ConnectorError>,
    ) -> Decision {
        let progress = BulkProgress {
            subjects_done: 2,
            subjects_total: 2,
            records_done: 5,
            records_total: 5,
            erased: Vec::new(),
        };
        let event = Event::BulkRan {
            op,
            phase,
            result,
            progress,
            earlier: BulkProgress::default(),
        };
        decide(t, event, &ctx())
    }

    fn completed(records_affected: i64) -> Outcome {
        Outcome::Completed {
            records_affected,
            note: "done".into(),
            files: Vec::new(),
            erased: vec![ErasedCount {
                target: "customers".into(),
                action: "deleted".into(),
                count: 2,
            }],
        }
    }

    #[test]
    fn a_scheduled_contract_end_waits_for_its_start_then_deletes_or_returns() {
        let pending = contract_task(Pending, ContractPhase::Scheduled);
        let delete = terms(ContractEndChoice::Delete);
        // Nothing happens before the effective date.
        assert_eq!(
            contract_claimed(&pending, delete, NOW),
            Decision::Later {
                at: EFFECTIVE,
                error: None
            }
        );
        // Without a choice, nothing happens before the grace period ends.
        let none = terms(ContractEndChoice::None);
        assert_eq!(none.starts_at(), GRACE);
        assert_eq!(
            contract_claimed(&pending, none, EFFECTIVE),
            Decision::Later {
                at: GRACE,
                error: None
            }
        );
        for (t, now, op, phase) in [
            (delete, EFFECTIVE, BulkOp::Erase, ContractPhase::Deleting),
            (none, GRACE, BulkOp::Erase, ContractPhase::Deleting),
            (
                terms(ContractEndChoice::ReturnThenDelete),
                EFFECTIVE,
                BulkOp::Export,
                ContractPhase::Returning,
            ),
        ] {
            match contract_claimed(&pending, t, now) {
                Decision::RunBulk {
                    start: Some(start),
                    op: o,
                    phase: Phase::Start,
                } => {
                    assert_eq!(o, op);
                    assert_eq!(start.state, InProgress);
                    assert_eq!(start.hold_ms, Some(30_000));
                    assert_eq!(
                        start.contract,
                        Some(ContractStep::at(phase, BulkProgress::default()))
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        // A task already running its step takes it again; one with a handle asks for it.
        let deleting = contract_task(InProgress, ContractPhase::Deleting);
        assert_eq!(
            contract_claimed(&deleting, delete, EFFECTIVE),
            Decision::RunBulk {
                start: None,
                op: BulkOp::Erase,
                phase: Phase::Start
            }
        );
        let returning = Current {
            handle: Some("job-7"),
            ..contract_task(InProgress, ContractPhase::Returning)
        };
        assert_eq!(
            contract_claimed(&returning, delete, EFFECTIVE),
            Decision::RunBulk {
                start: None,
                op: BulkOp::Export,
                phase: Phase::Confirm {
                    handle: "job-7".into()
                }
            }
        );
        // Missing terms or holder fail it; a holder that cannot end a contract refuses.
        let d = decide(
            &pending,
            Event::ContractClaimed {
                holder: sql(),
                terms: None,
            },
            &ctx(),
        );
        assert_eq!(moved(d).state, Failed);
        let d = decide(
            &pending,
            Event::ContractClaimed {
                holder: Some(Holder {
                    connector: "mailchimp",
                    supports: false,
                }),
                terms: Some(delete),
            },
            &ctx(),
        );
        let t = moved(d);
        assert_eq!(t.state, Refused);
        assert!(t.reason.contains("CONTRACT_END"), "{}", t.reason);
    }

    #[test]
    fn a_return_received_by_a_recipient_waits_with_its_receipt() {
        let returning = contract_task(InProgress, ContractPhase::Returning);
        let receipt = TransferReceipt {
            request_id: "r".into(),
            subprocessor: "s".into(),
            manifest_sha256: "ab".repeat(32),
            recipient: "successor".into(),
            ..Default::default()
        };
        let t = moved(decide(
            &returning,
            Event::Delivered {
                to: Destination::Recipient("successor"),
                files: 2,
                bytes: 300,
                receipt: Some(receipt.clone()),
            },
            &ctx(),
        ));
        assert_eq!(t.state, InProgress);
        assert_eq!(
            t.contract.map(|c| c.phase),
            Some(ContractPhase::AwaitingConfirmation)
        );
        assert_eq!(t.transfer_receipt, Some(receipt));
        assert!(
            t.note.contains("received by recipient successor"),
            "{}",
            t.note
        );
        assert!(!t.upload && t.erased.counts.is_empty());
    }

    /// A delivered return waits for the confirmation until the grace end, when it is deleted
    /// confirmed or not: that is its scheduled time, and its note says what the controller
    /// does next. Before, AWAITING_CONFIRMATION showed no time ("-") and the note named no
    /// command.
    #[test]
    fn a_return_awaiting_confirmation_is_scheduled_for_the_grace_end() {
        let returning = contract_task(InProgress, ContractPhase::Returning);
        let delivered = |to| {
            let event = Event::Delivered {
                to,
                files: 2,
                bytes: 300,
                receipt: None,
            };
            let terms = terms(ContractEndChoice::ReturnThenDelete);
            awaiting_confirmation(moved(decide(&returning, event, &ctx())), "c-1", to, &terms)
        };
        let t = delivered(Destination::Registry);
        let step = t.contract.clone().expect("a phase");
        assert_eq!(
            (step.phase, step.scheduled_at),
            (ContractPhase::AwaitingConfirmation, Some(GRACE))
        );
        let grace = date_label(GRACE);
        assert!(
            t.note.ends_with(&format!(
                "; the controller downloads the package (dsrctl download c-1 --out DIR) and \
                 confirms it (dsrctl contracts confirm c-1 --package DIR); the data is deleted \
                 at the end of the grace period ({grace}), confirmed or not"
            )),
            "{}",
            t.note
        );
        assert_eq!(t.reason, t.note);
        let p = progress_proto(
            step.phase,
            &BulkProgress::default(),
            step.scheduled_at,
            t.state,
        );
        assert_eq!(
            p.scheduled_at,
            Some(dsrelay_proto::timestamp_from_millis(GRACE))
        );
        let t = delivered(Destination::Recipient("successor"));
        assert!(
            t.note.contains(
                "; the controller confirms receipt once every part's receipt is in (dsrctl \
                 contracts confirm c-1); the data is deleted at the end of the grace period"
            ),
            "{}",
            t.note
        );
        // Any other transition is left as it is.
        let failed = failed("no".into());
        let terms = terms(ContractEndChoice::ReturnThenDelete);
        assert_eq!(
            awaiting_confirmation(failed.clone(), "c-1", Destination::Registry, &terms),
            failed
        );
    }

    /// A return the controller confirmed before its delivery was recorded names no next step
    /// for the controller: the claim right after the wait starts deleting. Before, its note
    /// still told the controller to download the package and confirm it.
    #[test]
    fn a_return_confirmed_already_names_no_next_step() {
        let returning = contract_task(InProgress, ContractPhase::Returning);
        let confirmed = Terms {
            return_confirmed: true,
            ..terms(ContractEndChoice::ReturnThenDelete)
        };
        for to in [Destination::Registry, Destination::Recipient("successor")] {
            let event = Event::Delivered {
                to,
                files: 2,
                bytes: 300,
                receipt: None,
            };
            let t = moved(decide(&returning, event, &ctx()));
            let t = awaiting_confirmation(t, "c-1", to, &confirmed);
            assert!(!t.note.contains("dsrctl"), "{}", t.note);
            assert!(
                t.note.contains(
                    "; the controller confirmed receipt already, so the deletion \
                     starts next; the data is deleted at the end of the grace period"
                ),
                "{}",
                t.note
            );
            let step = t.contract.expect("a phase");
            assert_eq!(step.scheduled_at, Some(GRACE));
        }
    }

    /// A grace end moved while a return waits for its confirmation moves the deletion and the
    /// scheduled time with it; the same grace end again changes nothing. Before, the wait
    /// slept until the old grace end, past a shortened one.
    #[test]
    fn a_new_grace_end_reschedules_a_return_awaiting_confirmation() {
        let waiting = contract_task(InProgress, ContractPhase::AwaitingConfirmation);
        let terms = Terms {
            choice: ContractEndChoice::ReturnThenDelete,
            effective_at: EFFECTIVE,
            grace_ends_at: GRACE - 1_000,
            return_confirmed: false,
        };
        let changed = |scheduled_at| Event::TermsChanged {
            terms: &terms,
            scheduled_at,
        };
        let t = moved(decide(&waiting, changed(Some(GRACE)), &ctx()));
        assert_eq!(t.next_attempt_at, Some(GRACE - 1_000));
        let step = t.contract.expect("a phase");
        assert_eq!(
            (step.phase, step.scheduled_at),
            (ContractPhase::AwaitingConfirmation, Some(GRACE - 1_000))
        );
        assert!(
            t.reason.contains("the grace period now ends"),
            "{}",
            t.reason
        );
        let same = decide(&waiting, changed(Some(GRACE - 1_000)), &ctx());
        assert_eq!(same, Decision::Ignore);
    }

    /// A contract end's return on its way to its transfer recipient is only marked: the part
    /// may be closed before the sender sees the mark. Cancelled outright, a receipt that came
    /// back was dropped and nothing said the recipient held the data.
    #[test]
    fn a_cancel_while_a_return_goes_to_its_recipient_marks_the_task() {
        let returning = contract_task(InProgress, ContractPhase::Returning);
        let cancel = |transferring| Event::Cancel {
            reason: "withdrawn",
            leased: transferring,
            exports: false,
            transferring,
        };
        match decide(&returning, cancel(true), &ctx()) {
            Decision::Mark { reason } => {
                assert!(reason.contains("withdrawn"), "{reason}");
                assert!(reason.contains("transfer recipient"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Waiting for its next attempt, nothing is on its way: cancelled at once.
        let t = moved(decide(&returning, cancel(false), &ctx()));
        assert_eq!(t.state, Cancelled);
        // Marked once, a Cancel sent again changes nothing.
        let marked = Current {
            cancel_requested: true,
            ..returning
        };
        assert_eq!(decide(&marked, cancel(true), &ctx()), Decision::Ignore);
    }

    /// The sender found the mark (or the recipient failed) before the part was closed: the
    /// return is CANCELLED as a transfer's is, not retried, never deleting.
    #[test]
    fn a_marked_return_that_did_not_arrive_is_cancelled() {
        let marked = Current {
            cancel_requested: true,
            ..contract_task(InProgress, ContractPhase::Returning)
        };
        let to = Destination::Recipient("successor");
        for event in [
            Event::DeliveryFailed {
                to,
                files: 2,
                bytes: 300,
                attempt: 1,
                error: "the request was cancelled",
            },
            Event::Undeliverable {
                to,
                reason: "refused",
            },
        ] {
            let t = moved(decide(&marked, event, &ctx()));
            assert_eq!(t.state, Cancelled);
            assert!(
                t.reason.contains("not delivered to recipient successor"),
                "{}",
                t.reason
            );
            assert_eq!(t.records_affected, 3);
            assert_eq!((t.contract, t.upload), (None, false));
        }
    }

    /// The recipient closed the part before the sender saw the mark: CANCELLED (the contract
    /// end goes no further: no confirmation awaited, nothing deleted), keeping the receipt and
    /// saying the recipient holds the data.
    #[test]
    fn a_marked_return_the_recipient_received_is_cancelled_with_its_receipt() {
        let marked = Current {
            cancel_requested: true,
            ..contract_task(InProgress, ContractPhase::Returning)
        };
        let receipt = TransferReceipt {
            request_id: "r".into(),
            subprocessor: "s".into(),
            manifest_sha256: "cd".repeat(32),
            recipient: "successor".into(),
            ..Default::default()
        };
        let t = moved(decide(
            &marked,
            Event::Delivered {
                to: Destination::Recipient("successor"),
                files: 2,
                bytes: 300,
                receipt: Some(receipt.clone()),
            },
            &ctx(),
        ));
        assert_eq!((t.state, t.confirmed), (Cancelled, true));
        assert_eq!(t.transfer_receipt, Some(receipt));
        assert_eq!(t.contract, None, "no AWAITING_CONFIRMATION nor DELETING");
        assert!(!t.upload && t.erased.counts.is_empty());
        for text in [&t.note, &t.reason] {
            assert!(text.contains("received by recipient successor"), "{text}");
            assert!(text.contains(&"cd".repeat(32)), "{text}");
            assert!(text.contains("too late to stop"), "{text}");
        }
        assert!(t.reason.contains("nothing is deleted"), "{}", t.reason);
    }

    #[test]
    fn a_returned_export_waits_for_the_controllers_confirmation_then_deletes() {
        let returning = contract_task(InProgress, ContractPhase::Returning);
        let files = vec![ExportedFile {
            name: "customers.json".into(),
            media_type: "application/json".into(),
            categories: vec!["contact".into()],
            size: 2048,
            sha256: "ab".into(),
        }];
        let outcome = Outcome::Completed {
            records_affected: 5,
            note: "exported".into(),
            files: files.clone(),
            erased: Vec::new(),
        };
        let t = moved(bulk(&returning, BulkOp::Export, Phase::Start, Ok(outcome)));
        assert_eq!(t.state, InProgress);
        assert!(t.upload && t.confirmed);
        assert_eq!(t.export_files, Some(files));
        assert_eq!(t.next_attempt_at, Some(NEVER));
        assert_eq!(t.contract.map(|c| c.phase), Some(ContractPhase::Returning));
        // The registry holds the part: the data is still here, so not COMPLETED.
        let d = decide(
            &returning,
            Event::Delivered {
                to: Destination::Registry,
                files: 1,
                bytes: 2048,
                receipt: None,
            },
            &ctx(),
        );
        let t = moved(d);
        assert_eq!(t.state, InProgress);
        assert_eq!(
            t.contract,
            Some(ContractStep::keep(ContractPhase::AwaitingConfirmation))
        );
        assert!(
            t.note.contains("waiting for the controller's confirmation"),
            "{}",
            t.note
        );
        // Looked at once more, in case the confirmation came while the part was on its way.
        assert_eq!(t.next_attempt_at, Some(NOW));
        // Until the controller confirms it sleeps, no later than the grace period's end; once
        // confirmed it deletes.
        let waiting = contract_task(InProgress, ContractPhase::AwaitingConfirmation);
        let mut rtd = terms(ContractEndChoice::ReturnThenDelete);
        assert_eq!(
            contract_claimed(&waiting, rtd, EFFECTIVE),
            Decision::Later {
                at: GRACE,
                error: None
            }
        );
        rtd.return_confirmed = true;
        assert_eq!(rtd.first_op(), BulkOp::Erase);
        match contract_claimed(&waiting, rtd, EFFECTIVE) {
            Decision::RunBulk {
                start: Some(start),
                op: BulkOp::Erase,
                phase: Phase::Start,
            } => {
                assert_eq!(start.state, InProgress);
                assert_eq!(
                    start.contract.map(|c| c.phase),
                    Some(ContractPhase::Deleting)
                );
            }
            other => panic!("{other:?}"),
        }
        // A confirmation releases the waiting task at once.
        let d = decide(
            &waiting,
            Event::TermsChanged {
                terms: &rtd,
                scheduled_at: None,
            },
            &at(EFFECTIVE),
        );
        assert_eq!(
            d,
            Decision::Later {
                at: EFFECTIVE,
                error: None
            }
        );
        // An export with nothing in it is still a part; a retention answer to one fails.
        let t = moved(bulk(
            &returning,
            BulkOp::Export,
            Phase::Start,
            Ok(Outcome::NotFound {
                note: "none".into(),
            }),
        ));
        assert!(t.upload && t.export_files == Some(Vec::new()));
        let kept = Outcome::Retained {
            legal_basis: "law".into(),
            until_ms: DUE,
            records_affected: 0,
            note: String::new(),
            erased: Vec::new(),
        };
        assert_eq!(
            moved(bulk(&returning, BulkOp::Export, Phase::Start, Ok(kept))).state,
            Failed
        );
    }

    /// A holder that answers a contract end's erasure NOT_FOUND (a no-op stand-in that
    /// holds nothing) ends the task NOT_FOUND, which gets no deletion certificate. Before, it
    /// ended COMPLETED with a certificate stating zero records, which an auditor takes for
    /// the holder's proof of deletion. Where something is known to have been erased (an
    /// earlier call's recorded progress, a retention run's earlier count) it stays COMPLETED.
    #[test]
    fn a_contract_end_erasure_of_nothing_held_is_not_found() {
        let deleting = contract_task(InProgress, ContractPhase::Deleting);
        let none = || {
            Ok(Outcome::NotFound {
                note: "holds no data of controller acme".into(),
            })
        };
        let t = moved(bulk(&deleting, BulkOp::Erase, Phase::Start, none()));
        assert_eq!((t.state, t.records_affected), (NotFound, 0));
        assert_eq!(t.contract.map(|c| c.phase), Some(ContractPhase::Done));
        assert_eq!(
            crate::certificates::certifies(RequestKind::ContractEnd as i64, t.state),
            None
        );
        // An earlier call erased 3 records as far as its progress was recorded.
        let event = Event::BulkRan {
            op: BulkOp::Erase,
            phase: Phase::Start,
            result: none(),
            progress: BulkProgress::default(),
            earlier: BulkProgress {
                records_done: 3,
                records_total: 3,
                ..Default::default()
            },
        };
        let t = moved(decide(&deleting, event, &ctx()));
        assert_eq!(t.state, Completed);
    }

    /// A return never confirmed is deleted at the end of the grace period, as a contract
    /// end without a choice is, saying no confirmation came. Before, the task slept for
    /// ever in AWAITING_CONFIRMATION and the data stayed.
    #[test]
    fn an_unconfirmed_return_is_deleted_when_the_grace_period_ends() {
        let waiting = Current {
            records_affected: 5,
            ..contract_task(InProgress, ContractPhase::AwaitingConfirmation)
        };
        let rtd = terms(ContractEndChoice::ReturnThenDelete);
        assert_eq!(
            contract_claimed(&waiting, rtd, GRACE - 1),
            Decision::Later {
                at: GRACE,
                error: None
            }
        );
        let none = contract_claimed(
            &contract_task(Pending, ContractPhase::Scheduled),
            terms(ContractEndChoice::None),
            GRACE,
        );
        for now in [GRACE, GRACE + 86_400_000] {
            let Decision::RunBulk {
                start: Some(start),
                op,
                phase,
            } = contract_claimed(&waiting, rtd, now)
            else {
                panic!("the grace period ended: the data goes");
            };
            // The step a contract end without a choice takes then.
            let Decision::RunBulk {
                op: none_op,
                phase: none_phase,
                start: Some(none_start),
            } = &none
            else {
                panic!("{none:?}");
            };
            assert_eq!((op, &phase), (*none_op, none_phase));
            assert_eq!(start.contract, none_start.contract);
            assert_eq!(
                (start.state, start.records_affected, start.hold_ms),
                (InProgress, 5, Some(30_000))
            );
            assert_eq!(
                start.note,
                "no confirmation of receipt of the returned data came from the controller by \
                 the end of the grace period (1970-01-01T00:25:00Z); deleting the controller's \
                 data, as without a choice"
            );
            assert_eq!(
                start.reason, start.note,
                "the registry's events show reasons"
            );
        }
        // A confirmation that came in time deletes as before, saying so.
        let confirmed = Terms {
            return_confirmed: true,
            ..rtd
        };
        match contract_claimed(&waiting, confirmed, GRACE + 1) {
            Decision::RunBulk {
                start: Some(start), ..
            } => assert!(
                start.note.starts_with("the controller confirmed"),
                "{start:?}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_finished_erasure_is_done_and_retained_data_is_erased_at_its_date() {
        let deleting = contract_task(InProgress, ContractPhase::Deleting);
        let t = moved(bulk(
            &deleting,
            BulkOp::Erase,
            Phase::Start,
            Ok(completed(5)),
        ));
        assert_eq!(t.state, Completed);
        assert_eq!(t.records_affected, 5);
        assert_eq!(t.erased.counts.len(), 1);
        let done = t.contract.unwrap();
        assert_eq!(done.phase, ContractPhase::Done);
        assert_eq!(done.progress.unwrap().records_done, 5);

        let kept = Outcome::Retained {
            legal_basis: "Kirjanpitolaki 2:10 §".into(),
            until_ms: DUE,
            records_affected: 3,
            note: "invoices kept".into(),
            erased: Vec::new(),
        };
        let t = moved(bulk(&deleting, BulkOp::Erase, Phase::Start, Ok(kept)));
        assert_eq!(t.state, Retained);
        assert_eq!((t.retain_until, t.next_attempt_at), (Some(DUE), Some(DUE)));
        assert_eq!(t.contract.map(|c| c.phase), Some(ContractPhase::Done));
        // At its date the processor erases the rest by itself; the count is cumulative.
        let retained = contract_task(Retained, ContractPhase::Done);
        assert_eq!(
            contract_claimed(&retained, terms(ContractEndChoice::Delete), DUE),
            Decision::RunBulk {
                start: None,
                op: BulkOp::Erase,
                phase: Phase::RetentionExpired { until_ms: 0 }
            }
        );
        let t = moved(bulk(
            &retained,
            BulkOp::Erase,
            Phase::RetentionExpired { until_ms: 0 },
            Ok(completed(2)),
        ));
        assert_eq!((t.state, t.records_affected), (Completed, 5));
    }

    /// An erasure resumed after an earlier call takes the connector's count (which counts
    /// that call's recorded work itself), and its certificate says what the count may miss:
    /// what the totals lost beyond it, or everything when a cut-off call recorded nothing;
    /// and, its progress having come without counts by place, what the earlier call erased
    /// as recorded, which the counts by table do not list.
    #[test]
    fn a_resumed_erasure_says_what_its_count_may_miss() {
        let deleting = contract_task(InProgress, ContractPhase::Deleting);
        let cut_off = Current {
            call_started: true,
            ..deleting
        };
        let resumed = |t: &Current<'_>, earlier: BulkProgress, last: BulkProgress| {
            let event = Event::BulkRan {
                op: BulkOp::Erase,
                phase: Phase::Start,
                result: Ok(completed(190_005)),
                progress: last,
                earlier,
            };
            moved(decide(t, event, &ctx()))
        };
        let at = |done, total| BulkProgress {
            subjects_done: done,
            subjects_total: total,
            records_done: done * 4,
            records_total: total * 4,
            erased: Vec::new(),
        };
        // Recorded 10,000 of 200,005 subjects; 20,000 went; 180,005 were left.
        let t = resumed(&cut_off, at(10_000, 200_005), at(190_005, 190_005));
        assert_eq!(t.records_affected, 190_005);
        let uncounted = t.erased.uncounted.expect("the count may miss some");
        assert_eq!((uncounted.records, uncounted.subjects), (40_000, 10_000));
        assert_eq!(
            (uncounted.earlier_records, uncounted.earlier_subjects),
            (40_000, 10_000)
        );
        assert!(uncounted
            .reason
            .contains("after its last recorded progress"));
        // Its progress was recorded up to the cut: nothing is missing from the totals, but
        // the counts by table are the last call's.
        let t = resumed(&cut_off, at(20_000, 200_005), at(200_005, 200_005));
        let uncounted = t.erased.uncounted.expect("the earlier call's work");
        assert_eq!((uncounted.records, uncounted.subjects), (0, 0));
        assert_eq!(
            (uncounted.earlier_records, uncounted.earlier_subjects),
            (80_000, 20_000)
        );
        assert!(
            uncounted.reason.contains(
                "erased or anonymized 80000 record(s) of 20000 subject(s) as far as its \
                 progress was recorded"
            ),
            "{}",
            uncounted.reason
        );
        // A cut-off call that recorded nothing: how much is missing is not known.
        let t = resumed(&cut_off, BulkProgress::default(), at(180_005, 180_005));
        let uncounted = t.erased.uncounted.expect("unknown");
        assert_eq!((uncounted.records, uncounted.subjects), (0, 0));
        // A first call has nothing earlier to miss.
        let t = resumed(&deleting, BulkProgress::default(), at(5, 5));
        assert_eq!(t.erased.uncounted, None);
    }

    /// An earlier call's progress recorded with counts by place: the certificate lists them
    /// with the finishing call's, summed per target and action, names no earlier records as
    /// left out by table, and still says what the totals lost after the last recorded
    /// progress. The step's recorded counts by place keep the larger of each. A confirmation
    /// (the holder's count of accepted work) is listed as the holder answers it.
    #[test]
    fn a_resumed_erasure_lists_the_earlier_calls_counts_by_place() {
        let deleting = contract_task(InProgress, ContractPhase::Deleting);
        let cut_off = Current {
            call_started: true,
            ..deleting
        };
        let count = |target: &str, action: &str, count| ErasedCount {
            target: target.into(),
            action: action.into(),
            count,
        };
        let at = |done: u64, total: u64, erased: Vec<ErasedCount>| BulkProgress {
            subjects_done: done,
            subjects_total: total,
            records_done: done * 2,
            records_total: total * 2,
            erased,
        };
        let earlier = vec![
            count("customers", "deleted", 8),
            count("contacts", "deleted", 8),
        ];
        let last = vec![
            count("customers", "deleted", 10),
            count("contacts", "deleted", 10),
        ];
        let ran = |t: &Current<'_>, phase: Phase, recorded: BulkProgress, last: BulkProgress| {
            let event = Event::BulkRan {
                op: BulkOp::Erase,
                phase,
                result: Ok(completed(20)),
                progress: last,
                earlier: recorded,
            };
            moved(decide(t, event, &ctx()))
        };
        let t = ran(
            &cut_off,
            Phase::Start,
            at(8, 10, earlier.clone()),
            at(10, 10, last.clone()),
        );
        assert_eq!(
            t.erased.counts,
            vec![
                count("customers", "deleted", 10),
                count("contacts", "deleted", 8)
            ]
        );
        assert_eq!(t.erased.uncounted, None);
        assert_eq!(
            t.contract.expect("step").progress.expect("counts").erased,
            last
        );
        // 2 subjects (4 records) went after the last recorded progress: said, by number.
        let t = ran(
            &cut_off,
            Phase::Start,
            at(8, 12, earlier.clone()),
            at(10, 10, last),
        );
        let uncounted = t.erased.uncounted.expect("the totals lost some");
        assert_eq!((uncounted.records, uncounted.subjects), (4, 2));
        assert_eq!(
            (uncounted.earlier_records, uncounted.earlier_subjects),
            (0, 0)
        );
        assert!(
            !uncounted.reason.contains("by table"),
            "{}",
            uncounted.reason
        );
        // A connector reporting no counts by place: its done counts are named instead.
        let t = ran(
            &cut_off,
            Phase::Start,
            at(8, 10, Vec::new()),
            at(10, 10, Vec::new()),
        );
        assert_eq!(t.erased.counts, vec![count("customers", "deleted", 2)]);
        let uncounted = t.erased.uncounted.expect("not listed by table");
        assert_eq!(
            (uncounted.earlier_records, uncounted.earlier_subjects),
            (16, 8)
        );
        // A confirmation's answer is the holder's count of the work it accepted.
        let confirm = Phase::Confirm { handle: "h".into() };
        let t = ran(
            &deleting,
            confirm,
            at(8, 10, earlier),
            at(10, 10, Vec::new()),
        );
        assert_eq!(t.erased.counts, vec![count("customers", "deleted", 2)]);
    }

    /// A contract end's retention run that the holder accepts keeps the earlier count and
    /// the retention until it confirms; the confirmed count adds to it.
    #[test]
    fn a_contract_end_retention_run_accepted_counts_every_run_once_confirmed() {
        let retained = Current {
            records_affected: 5,
            retain_until: Some(DUE),
            legal_basis: "Kirjanpitolaki 2:10 §",
            ..contract_task(Retained, ContractPhase::Done)
        };
        let accepted = Ok(Outcome::Accepted {
            handle: "h-1".into(),
            note: "queued".into(),
        });
        let run = Phase::RetentionExpired { until_ms: DUE };
        let t = moved(bulk(&retained, BulkOp::Erase, run, accepted));
        assert_eq!((t.state, t.records_affected), (InProgress, 5));
        assert_eq!(
            (t.legal_basis.as_str(), t.retain_until),
            ("Kirjanpitolaki 2:10 §", Some(DUE))
        );
        let waiting = Current {
            state: InProgress,
            phase: ContractPhase::Deleting,
            handle: Some("h-1"),
            ..retained
        };
        let confirm = Phase::Confirm {
            handle: "h-1".into(),
        };
        let t = moved(bulk(&waiting, BulkOp::Erase, confirm, Ok(completed(2))));
        assert_eq!((t.state, t.records_affected), (Completed, 7));
        // A deletion's confirmation outside a retention run counts the holder's alone.
        let deleting = Current {
            handle: Some("h-1"),
            ..contract_task(InProgress, ContractPhase::Deleting)
        };
        let confirm = Phase::Confirm {
            handle: "h-1".into(),
        };
        let t = moved(bulk(&deleting, BulkOp::Erase, confirm, Ok(completed(2))));
        assert_eq!((t.state, t.records_affected), (Completed, 2));
    }

    /// A step that ends an export task without a delivery marks its folder for removal;
    /// one that queues the delivery, or ends a task that exports nothing, does not.
    #[test]
    fn an_export_ended_without_a_delivery_is_discarded() {
        let run = |t: &Current<'_>, kind, result| {
            decide(
                t,
                Event::Ran {
                    kind,
                    phase: Phase::Start,
                    result,
                },
                &ctx(),
            )
        };
        let exported = || {
            Ok(Outcome::Completed {
                records_affected: 1,
                note: "exported".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        };
        let export = RequestKind::ReturnOfData;
        let t = moved(run(&task(InProgress), export, exported()));
        assert_eq!((t.upload, t.discard_export), (true, false));
        // Written, then cancelled: not delivered, and not kept.
        let marked = Current {
            cancel_requested: true,
            ..task(InProgress)
        };
        let t = moved(run(&marked, export, exported()));
        assert_eq!((t.state, t.discard_export), (Cancelled, true));
        let broken = || Err(ConnectorError::Permanent("disk full".into()));
        let t = moved(run(&task(InProgress), RequestKind::Transfer, broken()));
        assert_eq!((t.state, t.discard_export), (Failed, true));
        let t = moved(run(&task(InProgress), RequestKind::Erasure, broken()));
        assert_eq!((t.state, t.discard_export), (Failed, false));
        // Cancelled between attempts, or refused by an operator, what an attempt wrote goes.
        for exports in [true, false] {
            let event = Event::Cancel {
                reason: "withdrawn",
                leased: false,
                exports,
                transferring: false,
            };
            let t = moved(decide(&task(InProgress), event, &ctx()));
            assert_eq!((t.state, t.discard_export), (Cancelled, exports));
            let event = Event::OperatorRefuse {
                reason: "no",
                by: "ops",
                exports,
            };
            let t = moved(decide(&task(WaitingForOperator), event, &ctx()));
            assert_eq!((t.state, t.discard_export), (Refused, exports));
        }
        // A contract end's return fails; its deletion does not export.
        let returning = contract_task(InProgress, ContractPhase::Returning);
        let t = moved(bulk(&returning, BulkOp::Export, Phase::Start, broken()));
        assert_eq!((t.state, t.discard_export), (Failed, true));
        let deleting = contract_task(InProgress, ContractPhase::Deleting);
        let t = moved(bulk(&deleting, BulkOp::Erase, Phase::Start, broken()));
        assert_eq!((t.state, t.discard_export), (Failed, false));
    }

    #[test]
    fn a_refusal_or_permanent_error_fails_a_contract_end_and_transient_ones_retry() {
        let deleting = contract_task(InProgress, ContractPhase::Deleting);
        let t = moved(bulk(
            &deleting,
            BulkOp::Erase,
            Phase::Start,
            Ok(Outcome::Refused {
                reason: "controller globex is not scoped".into(),
            }),
        ));
        assert_eq!(t.state, Failed);
        assert!(t.reason.contains("globex"), "{}", t.reason);
        let t = moved(bulk(
            &deleting,
            BulkOp::Erase,
            Phase::Start,
            Err(ConnectorError::Permanent("no such table".into())),
        ));
        assert_eq!((t.state, t.reason.as_str()), (Failed, "no such table"));
        let d = bulk(
            &deleting,
            BulkOp::Erase,
            Phase::Start,
            Err(ConnectorError::Transient("down".into())),
        );
        assert_eq!(d.retried(), Some((NOW + 500, "down")), "{d:?}");
        let event = Event::BulkRan {
            op: BulkOp::Erase,
            phase: Phase::Start,
            result: Err(ConnectorError::Transient("down".into())),
            progress: BulkProgress::default(),
            earlier: BulkProgress::default(),
        };
        assert_eq!(moved(decide(&deleting, event, &past_due())).state, Failed);
        // Manual holders wait for an operator, in the step's phase.
        let t = moved(bulk(
            &deleting,
            BulkOp::Erase,
            Phase::Start,
            Ok(Outcome::WaitingForOperator {
                note: "shred".into(),
            }),
        ));
        assert_eq!(t.state, WaitingForOperator);
        assert_eq!(t.contract.map(|c| c.phase), Some(ContractPhase::Deleting));
    }

    #[test]
    fn new_terms_reschedule_waiting_tasks_and_are_refused_once_too_late() {
        let pending = contract_task(Pending, ContractPhase::Scheduled);
        let none = terms(ContractEndChoice::None);
        let delete = terms(ContractEndChoice::Delete);
        // Rescheduled to the effective date (at once when it has passed: the runner claims
        // anything due).
        let d = decide(
            &pending,
            Event::TermsChanged {
                terms: &delete,
                scheduled_at: Some(GRACE),
            },
            &at(NOW),
        );
        let t = moved(d);
        assert_eq!((t.state, t.next_attempt_at), (Pending, Some(EFFECTIVE)));
        assert_eq!(t.contract.and_then(|c| c.scheduled_at), Some(EFFECTIVE));
        // The same schedule again changes nothing.
        let same = Event::TermsChanged {
            terms: &none,
            scheduled_at: Some(GRACE),
        };
        assert_eq!(decide(&pending, same, &at(NOW)), Decision::Ignore);

        assert_eq!(amend(&none, &delete, false), Ok(delete));
        assert_eq!(amend(&delete, &delete, true), Ok(delete));
        assert!(matches!(
            amend(&none, &delete, true),
            Err(Refusal::TooLate(why)) if why.contains("deleting")
        ));
        let rtd = terms(ContractEndChoice::ReturnThenDelete);
        assert!(matches!(
            amend(&delete, &rtd, false),
            Err(Refusal::TooLate(_))
        ));
        let confirmed = Terms {
            return_confirmed: true,
            ..rtd
        };
        assert_eq!(amend(&rtd, &confirmed, false), Ok(confirmed));
        assert_eq!(amend(&confirmed, &confirmed, true), Ok(confirmed));
        assert!(matches!(
            amend(&rtd, &confirmed, true),
            Err(Refusal::TooLate(why)) if why.contains("without a confirmation")
        ));
        assert!(matches!(
            amend(&confirmed, &rtd, false),
            Err(Refusal::TooLate(_))
        ));
        let moved_date = Terms {
            effective_at: EFFECTIVE + 1,
            ..none
        };
        assert!(matches!(
            amend(&none, &moved_date, false),
            Err(Refusal::Invalid("contract_end.effective_at", _))
        ));
        let odd = Terms {
            return_confirmed: true,
            ..delete
        };
        assert!(matches!(
            amend(&none, &odd, false),
            Err(Refusal::Invalid("contract_end.return_confirmed", _))
        ));
    }

    #[test]
    fn only_a_scheduled_task_that_has_not_ended_reports_when_it_starts() {
        let at = Some(GRACE);
        let start = |phase, state| progress_proto(phase, &BulkProgress::default(), at, state);
        for state in [Pending, InProgress] {
            let p = start(ContractPhase::Scheduled, state);
            assert_eq!(p.scheduled_at, at.map(dsrelay_proto::timestamp_from_millis));
        }
        // Cancelled (or failed, or refused) before it started: nothing starts at that date.
        for state in [Cancelled, Failed, Refused] {
            let p = start(ContractPhase::Scheduled, state);
            assert_eq!(p.phase, ContractPhase::Scheduled as i32, "{state:?}");
            assert_eq!(p.scheduled_at, None, "{state:?}");
        }
        assert_eq!(
            start(ContractPhase::Deleting, InProgress).scheduled_at,
            None
        );
        // Waiting for the confirmation, the data is deleted at the grace end.
        let p = start(ContractPhase::AwaitingConfirmation, InProgress);
        assert_eq!(p.scheduled_at, at.map(dsrelay_proto::timestamp_from_millis));
        let p = start(ContractPhase::AwaitingConfirmation, Cancelled);
        assert_eq!(p.scheduled_at, None);
    }

    #[test]
    fn cancelling_a_contract_end_stops_it_only_before_deleting() {
        let event = || Event::Cancel {
            reason: "oops",
            leased: true,
            exports: false,
            transferring: false,
        };
        for phase in [
            ContractPhase::Scheduled,
            ContractPhase::Returning,
            ContractPhase::AwaitingConfirmation,
        ] {
            let state = if phase == ContractPhase::Scheduled {
                Pending
            } else {
                InProgress
            };
            let t = moved(decide(&contract_task(state, phase), event(), &ctx()));
            assert_eq!(t.state, Cancelled, "{phase:?}");
        }
        for (state, phase) in [
            (InProgress, ContractPhase::Deleting),
            (WaitingForOperator, ContractPhase::Deleting),
            (Retained, ContractPhase::Done),
        ] {
            let d = decide(&contract_task(state, phase), event(), &ctx());
            assert_eq!(d, Decision::Ignore, "{state:?} {phase:?}");
        }
    }

    #[test]
    fn an_operator_returning_a_manual_part_sends_the_record_of_it_as_the_part() {
        let record = ExportedFile {
            name: "returned-by-hand.json".into(),
            media_type: "application/json".into(),
            size: 321,
            sha256: "ab".repeat(32),
            categories: vec!["archive".into()],
        };
        let complete = |record| Event::OperatorComplete {
            not_found: false,
            records_affected: 4,
            note: "handed over on disk",
            by: "ops",
            exports: false,
            record,
        };
        let returning = contract_task(WaitingForOperator, ContractPhase::Returning);
        let t = moved(decide(&returning, complete(Some(&record)), &ctx()));
        assert_eq!(t.state, InProgress);
        // Still returning until the registry holds the record; then it waits.
        assert_eq!(
            t.contract.as_ref().map(|c| c.phase),
            Some(ContractPhase::Returning)
        );
        assert!(t.upload);
        assert_eq!(t.export_files, Some(vec![record.clone()]));
        assert!(t.note.contains("returned by ops"), "{}", t.note);
        // The records the operator returned are the return's counts, the subjects unknown.
        let counts = |t: &Transition| {
            let p = t.contract.as_ref().and_then(|c| c.progress.clone());
            p.map(|p| {
                (
                    p.subjects_done,
                    p.subjects_total,
                    p.records_done,
                    p.records_total,
                )
            })
        };
        assert_eq!(counts(&t), Some((0, 0, 4, 4)));
        // Without a record nothing could ever be confirmed: refused, not left waiting.
        assert!(matches!(
            decide(&returning, complete(None), &ctx()),
            Decision::Reject(_)
        ));
        let deleting = contract_task(WaitingForOperator, ContractPhase::Deleting);
        let t = moved(decide(&deleting, complete(None), &ctx()));
        assert_eq!(t.state, Completed);
        assert_eq!(counts(&t), Some((0, 0, 4, 4)));
        assert_eq!(t.contract.map(|c| c.phase), Some(ContractPhase::Done));
    }

    #[test]
    fn a_return_of_data_done_by_hand_is_delivered_as_its_record_not_completed() {
        let record = ExportedFile {
            name: "returned-by-hand.json".into(),
            media_type: "application/json".into(),
            size: 210,
            sha256: "cd".repeat(32),
            categories: vec!["archive".into()],
        };
        let complete = |not_found, record| Event::OperatorComplete {
            not_found,
            records_affected: 2,
            note: "posted to the subject",
            by: "ops",
            exports: true,
            record,
        };
        let waiting = task(WaitingForOperator);
        let t = moved(decide(&waiting, complete(false, Some(&record)), &ctx()));
        // IN_PROGRESS until the registry (or the recipient) holds the record.
        assert_eq!((t.state, t.upload), (InProgress, true));
        assert_eq!(t.export_files, Some(vec![record.clone()]));
        assert_eq!(t.next_attempt_at, Some(NEVER));
        assert!(t.note.contains("done by hand by ops"), "{}", t.note);
        // The operator's word alone never makes it COMPLETED.
        assert!(matches!(
            decide(&waiting, complete(false, None), &ctx()),
            Decision::Reject(_)
        ));
        // Nothing held: nothing to deliver.
        let t = moved(decide(&waiting, complete(true, None), &ctx()));
        assert_eq!((t.state, t.upload), (NotFound, false));
    }

    /// A RETAINED erasure at its date, kept under `BASIS` until `NOW - 10`.
    fn kept() -> Current<'static> {
        Current {
            retain_until: Some(NOW - 10),
            legal_basis: "Kirjanpitolaki 2:10 §",
            ..task(Retained)
        }
    }

    fn contract_end(state: TaskState, retain_until: Option<i64>) -> ContractEndAt {
        ContractEndAt {
            request_id: "ce-1".into(),
            state,
            retain_until,
            certificate: Some("cert-9".into()),
            failed_when_done: false,
        }
    }

    /// A contract end that failed in its own retention run, which is not retried, would be
    /// waited for for ever: the erasure fails, saying why.
    #[test]
    fn an_erasure_fails_when_the_contract_end_it_follows_failed_after_deleting() {
        let by = ContractEndAt {
            failed_when_done: true,
            ..contract_end(Failed, None)
        };
        let t = moved(superseded_by(&kept(), &by, None));
        assert_eq!(t.state, Failed, "{t:?}");
        assert_eq!(t.records_affected, 3);
        assert!(t.reason.contains("contract end ce-1"), "{t:?}");
        assert!(t.reason.contains("retention run there failed"), "{t:?}");
    }

    fn superseded_by(t: &Current<'_>, by: &ContractEndAt, ran: Option<Outcome>) -> Decision {
        decide(t, Event::Superseded { by, ran }, &ctx())
    }

    #[test]
    fn only_an_erasures_retention_run_follows_a_contract_end() {
        let run = claimed_retention_run(&kept()).expect("a retention run");
        assert!(follows_contract_end(RequestKind::Erasure, &kept(), &run));
        assert!(!follows_contract_end(
            RequestKind::ContractEnd,
            &kept(),
            &run
        ));
        assert!(!follows_contract_end(
            RequestKind::Erasure,
            &kept(),
            &Phase::Start
        ));
        assert_eq!(claimed_retention_run(&task(InProgress)), None);
        // The confirmation of work accepted in a retention run is part of that run.
        let accepted = Current {
            state: InProgress,
            handle: Some("h-1"),
            ..kept()
        };
        let confirm = Phase::Confirm {
            handle: "h-1".into(),
        };
        assert!(follows_contract_end(
            RequestKind::Erasure,
            &accepted,
            &confirm
        ));
    }

    #[test]
    fn an_erasure_kept_under_a_contract_ends_retention_stays_retained_until_its_date() {
        let by = contract_end(Retained, Some(NOW + 50_000));
        let t = moved(superseded_by(&kept(), &by, None));
        assert_eq!(t.state, Retained);
        assert_eq!(t.retain_until, Some(NOW + 50_000));
        assert_eq!(t.next_attempt_at, Some(NOW + 50_000));
        assert_eq!(t.legal_basis, "Kirjanpitolaki 2:10 §");
        assert_eq!(t.records_affected, 3);
        assert!(t.confirmed);
        assert!(t.note.contains("contract end ce-1's retention"), "{t:?}");
        assert!(t.note.contains("erased nothing more"), "{t:?}");
        assert!(t.reason.contains("contract end ce-1"), "{t:?}");
        // Claimed again with nothing new, it is only put off to the date, not acknowledged.
        let again = Current {
            retain_until: t.retain_until,
            reason: &t.reason,
            ..kept()
        };
        assert_eq!(
            superseded_by(&again, &by, None),
            Decision::Later {
                at: NOW + 50_000,
                error: None
            }
        );
    }

    #[test]
    fn an_erasure_waits_for_a_contract_end_still_deleting_without_calling_the_holder() {
        for state in [InProgress, Pending, WaitingForOperator, Failed] {
            let by = contract_end(state, None);
            let t = moved(superseded_by(&kept(), &by, None));
            assert_eq!(t.state, Retained, "{state:?}");
            assert_eq!(t.next_attempt_at, Some(NOW + 60_000));
            // The erasure's own date stays: no other is known while the contract end deletes.
            assert_eq!(t.retain_until, kept().retain_until);
            assert_eq!(t.legal_basis, "Kirjanpitolaki 2:10 §");
            assert_eq!(t.records_affected, 3);
            let name = state.as_str_name().trim_start_matches("TASK_STATE_");
            assert!(t.reason.contains("waits for it"), "{t:?}");
            assert!(t.reason.contains("contract end ce-1"), "{t:?}");
            assert!(t.reason.ends_with(&format!("task is {name})")), "{t:?}");
            // The same wait again is not acknowledged again.
            let again = Current {
                reason: &t.reason,
                ..kept()
            };
            assert_eq!(
                superseded_by(&again, &by, None),
                Decision::Later {
                    at: NOW + 60_000,
                    error: None
                }
            );
        }
        // A contract end whose own retention run is due is waited for too.
        let due = contract_end(Retained, Some(NOW));
        let t = moved(superseded_by(&kept(), &due, None));
        assert_eq!((t.state, t.next_attempt_at), (Retained, Some(NOW + 60_000)));
        assert!(t.reason.contains("task is RETAINED"), "{t:?}");
    }

    #[test]
    fn an_erasure_completes_once_the_contract_end_erased_the_rest() {
        let by = contract_end(Completed, None);
        let t = moved(superseded_by(&kept(), &by, None));
        assert_eq!(t.state, Completed);
        assert_eq!(t.records_affected, 3);
        assert!(t.confirmed);
        assert_eq!(t.erased, Erased::default());
        assert_eq!((t.legal_basis.as_str(), t.retain_until), ("", None));
        assert!(t.note.contains("contract end ce-1"), "{t:?}");
        assert!(t.note.contains("certificate cert-9"), "{t:?}");
        assert!(t.note.contains("erased nothing more"), "{t:?}");
    }

    #[test]
    fn a_run_that_found_nothing_after_a_contract_end_began_deleting_is_no_proof() {
        let by = contract_end(Retained, Some(NOW + 50_000));
        let nothing = Outcome::Completed {
            records_affected: 2,
            note: "nothing left to erase".into(),
            files: Vec::new(),
            erased: vec![ErasedCount {
                target: "invoices".into(),
                action: "deleted".into(),
                count: 2,
            }],
        };
        let t = moved(superseded_by(&kept(), &by, Some(nothing)));
        assert_eq!(t.state, Retained);
        assert_eq!(t.retain_until, Some(NOW + 50_000));
        assert_eq!(t.records_affected, 5);
        assert_eq!(t.erased.counts.len(), 1);
        assert!(t.note.contains("erased 2 more record(s)"), "{t:?}");
        // Even with the same note recorded, a run that erased something is acknowledged.
        let again = Current {
            retain_until: Some(NOW + 50_000),
            reason: &t.reason,
            ..kept()
        };
        let not_found = Outcome::NotFound {
            note: "no such subject".into(),
        };
        let t = moved(superseded_by(&again, &by, Some(not_found)));
        assert_eq!((t.state, t.records_affected), (Retained, 3));
    }
}
