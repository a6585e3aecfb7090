//! Connectors: the code that carries out a data-subject request at one holder of the data (a
//! subprocessor's database or service) and reports what it did.
//!
//! Every connector implements [`Connector`]: it says which request kinds it supports and runs
//! a [`Task`] to an [`Outcome`] or a [`ConnectorError`]. The processor turns outcomes into task
//! states and uses the error's kind to choose between retrying with backoff and failing the
//! task for an operator. A connector never reports COMPLETED for work the holder has not
//! confirmed: a holder that only accepted the work answers [`Outcome::Accepted`], and the
//! processor asks again later ([`Phase::Confirm`]).
//!
//! # Layout
//! - [`sql`]: accounting/ERP databases (SQLite, PostgreSQL) by declarative table rules; a
//!   folder: `rules` (configuration and validation), `retention` (the retention calendar),
//!   `plan` (statements from rules and identities), `execute` (running them in a
//!   transaction), `bulk` (a contract end's export and erasure of a controller's rows, in
//!   batches), `sample` (the sample accounting database).
//! - [`mailchimp`]: mail-marketing audiences through the Mailchimp Marketing API v3; a
//!   folder: the connector, `api` (the HTTP calls and their error mapping), `scrub` (keeping
//!   personal data out of echoed errors), `bulk` (a contract end: an audience counted,
//!   exported page by page, deleted) and `mailchimp::fake` (a local Mailchimp API for tests,
//!   public with the `fake-mailchimp` feature).
//! - [`export`]: where RETURN_OF_DATA and TRANSFER exports go: files in the task's folder,
//!   written a piece at a time, each counted and hashed ([`ExportSink`], [`ExportedFile`]).
//! - [`noop`]: holds nothing; confirms after a delay (benchmarks, smoke tests).
//! - [`manual`]: an operator does the work and confirms it (systems without an API).
//! - [`adapter`]: an external adapter (any language) over mutual TLS via the
//!   SubprocessorAdapter API; `adapter::bulk` carries a contract end's steps
//!   (`ExecuteBulk`, `GetBulkStatus`).
//!
//! Every connector may scope its data per controller (a `controllers` entry in its
//! configuration; [`Connector::scoped_controllers`]); a contract end runs through
//! [`Connector::run_bulk`] over all of one controller's data.
//! - `config`: the tagged configuration of every connector ([`ConnectorConfig`]) and
//!   [`build`], which turns one into a running connector.
//!
//! Each module's public items are its configuration; the connectors themselves are built only
//! through [`build`] and used as [`Connector`] trait objects.

use std::future::Future;
use std::pin::Pin;

use dsrelay_proto::v1::{
    IdentityEncoding, IdentityType, RequestKind, RequestParameters, SubjectIdentity,
};

pub mod adapter;
mod config;
pub mod export;
pub mod mailchimp;
pub mod manual;
pub mod noop;
pub mod sql;

pub use config::{build, ConnectorConfig};
pub use export::{Block, ExportSink, ExportedFile, GrowingFile, Growth};

/// A boxed future, so that connectors can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a connector could not finish, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectorError {
    /// A condition that passes by itself (connection refused, database locked, timeout, rate
    /// limit): the caller retries with backoff.
    #[error("{0}")]
    Transient(String),
    /// Like `Transient`, but the holder said when to come back (HTTP 429 or 503 with
    /// Retry-After); the processor waits at least that long.
    #[error("{message}")]
    RetryAfter {
        /// What happened.
        message: String,
        /// How long the holder asked us to wait (ms).
        after_ms: u64,
    },
    /// A condition that will not fix itself (bad configuration, SQL errors): retrying is
    /// pointless, an operator must act. Identities the holder cannot match are no such
    /// condition: only the partner can give others, so the SQL and Mailchimp connectors
    /// answer them [`Outcome::Refused`] ([`Connector::matchable_identities`]).
    #[error("{0}")]
    Permanent(String),
}

impl ConnectorError {
    /// True when retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_) | Self::RetryAfter { .. })
    }

    /// The wait the holder asked for, if it did.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Self::RetryAfter { after_ms, .. } => Some(*after_ms),
            _ => None,
        }
    }

    /// This error as a log line shows it: its kind and length, never its words, which may
    /// quote the holder (an adapter's status message, an API's error body, a database's
    /// error quoting a value) and so name the subject. The processor keeps the words in the
    /// task's last error or reason, which forgetting the request removes.
    pub fn logged(&self) -> LoggedError<'_> {
        LoggedError(self)
    }
}

/// A [`ConnectorError`] as a log line shows it ([`ConnectorError::logged`]).
#[derive(Clone, Copy)]
pub struct LoggedError<'a>(&'a ConnectorError);

impl std::fmt::Display for LoggedError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            ConnectorError::Transient(m) => write!(f, "transient, {} bytes withheld", m.len()),
            ConnectorError::RetryAfter { message, after_ms } => write!(
                f,
                "transient (retry after {after_ms} ms), {} bytes withheld",
                message.len()
            ),
            ConnectorError::Permanent(m) => write!(f, "permanent, {} bytes withheld", m.len()),
        }
    }
}

// A log call's `?field` formats with Debug, which must withhold as much as Display.
impl std::fmt::Debug for LoggedError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Which step of a task's life the connector is asked to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Do the work (first run, or a retry after a transient error).
    Start,
    /// The holder accepted the work earlier under `handle`; ask whether it is done.
    Confirm {
        /// What the connector returned in [`Outcome::Accepted`].
        handle: String,
    },
    /// Data kept under a legal obligation has reached its retain-until date: erase what has
    /// been released since (what is still kept is reported RETAINED with a later date).
    RetentionExpired {
        /// The retain-until date (ms since the epoch) this run is for. Data kept in stages
        /// (RETAINED again until a later date) has a run per date; a holder that answers a
        /// repeated call with its first answer tells the runs apart by it.
        until_ms: i64,
    },
}

impl Phase {
    /// Whether this is a run at a retain-until date ([`Phase::RetentionExpired`]).
    pub fn is_retention_expired(&self) -> bool {
        matches!(self, Self::RetentionExpired { .. })
    }

    /// The phase's name, for log lines and spans. Not its `Debug`: a confirmation's handle
    /// is the holder's text (an adapter's own words, Mailchimp members' hashed addresses).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Confirm { .. } => "confirm",
            Self::RetentionExpired { .. } => "retention_expired",
        }
    }
}

/// One task: one request at one holder.
#[derive(Debug, Clone)]
pub struct Task {
    /// Unique per task and stable across retries: the holder's idempotency key.
    pub task_id: String,
    /// The controller's request id.
    pub request_id: String,
    /// The controller the request came from (the processor's name for it). A connector whose
    /// configuration scopes data per controller touches only this controller's data.
    pub controller: String,
    /// What the subject asked for.
    pub kind: RequestKind,
    /// How to find the subject.
    pub identities: Vec<SubjectIdentity>,
    /// The data categories the request concerns; empty means all.
    pub categories: Vec<String>,
    /// Kind-specific parameters (corrections, restriction lift, transfer recipient).
    pub parameters: RequestParameters,
    /// When the controller must answer (ms since the epoch).
    pub due_at_ms: i64,
    /// The processor's clock (ms since the epoch); connectors use it instead of reading the
    /// system clock, so that tests can move time.
    pub now_ms: i64,
    /// Which step to take.
    pub phase: Phase,
    /// An earlier call for this task was cut off before its answer was recorded (the
    /// processor stopped, or lost the task's lease, while the holder worked): the holder may
    /// have done the work already. A connector whose repeated call answers differently once
    /// the work is done (Mailchimp's delete-permanent answers 404) confirms by reading
    /// instead of concluding from that answer.
    pub interrupted: bool,
    /// Where the export goes, for RETURN_OF_DATA and TRANSFER tasks: the processor gives
    /// each such task a folder of its own, emptied before every run.
    pub export: Option<ExportSink>,
}

impl Task {
    /// The sink of an export task; a permanent error when the caller gave none.
    pub fn export_sink(&self) -> Result<&ExportSink, ConnectorError> {
        self.export.as_ref().ok_or_else(|| {
            ConnectorError::Permanent(format!(
                "no export folder was given for a {} task",
                kind_label(self.kind)
            ))
        })
    }
}

/// One step of a contract end at one holder: all of one controller's data, not one subject's.
#[derive(Debug, Clone)]
pub struct BulkJob {
    /// Unique per contract-end task and step (an erasure's differs from the export before
    /// it) and stable across retries: the holder's idempotency key.
    pub job_id: String,
    /// The registry's request id of the CONTRACT_END.
    pub request_id: String,
    /// The controller whose data it is (the processor's name for it). The connector touches
    /// only the data its configuration scopes to this controller.
    pub controller: String,
    /// What to do with the controller's data.
    pub op: BulkOp,
    /// Which step to take: `Start`, `Confirm` for work the holder accepted earlier, or
    /// `RetentionExpired` (with [`BulkOp::Erase`]) when data kept under a legal obligation has
    /// reached its date.
    pub phase: Phase,
    /// When the controller must have an answer (ms since the epoch).
    pub due_at_ms: i64,
    /// The processor's clock (ms since the epoch), as in [`Task::now_ms`].
    pub now_ms: i64,
    /// An earlier call of this erasure was cut off before its answer was recorded (the
    /// processor stopped, crashed or lost the task's lease while the holder worked), as in
    /// [`Task::interrupted`]: the holder may have done the work already. A connector whose
    /// repeated erasure answers differently once the data is gone (Mailchimp's audience
    /// answers 404) takes that answer as the earlier call's work. Exports are run again
    /// whole, so the processor never sets it for them.
    pub interrupted: bool,
    /// The progress the processor recorded for this step before this call: the last an
    /// earlier call reported (cut off or not), all zero when none was. A connector answering
    /// for an earlier call's work (`interrupted`) counts it from here, or says it cannot.
    /// Its [`BulkProgress::erased`] the processor adds to the `erased` of an erasure's
    /// [`Phase::Start`] answer for the certificate: such an answer lists what this call
    /// erased, or, when the connector's answer is the whole step's (a repeated job's),
    /// what it lists beyond these ([`BulkJob::beyond_recorded`]).
    pub recorded_progress: BulkProgress,
    /// For [`BulkOp::Export`]: the task's export folder, emptied before every run.
    pub export: Option<ExportSink>,
    /// Where the connector reports how far it has got while it runs.
    pub progress: ProgressReporter,
    /// For the erasure that follows a return (RETURN_THEN_DELETE, also to a transfer
    /// recipient), at [`Phase::Start`]: the export's last progress as the processor recorded
    /// it, its done counts being what was returned (all zero for a return done by hand).
    /// Before erasing anything the connector counts what it holds of the controller now, as
    /// its export counts ([`check_returned`]): holding more subjects or records than were
    /// returned, it erases nothing and answers a permanent error saying how many more it
    /// holds; holding as many or fewer, it records that it passed the check
    /// ([`ProgressReporter::record_now`]) and erases. The check compares totals, not which
    /// records are held: records that arrived after the export pass it when as many were
    /// deleted meanwhile (one subject erased, another signed up), and records that arrive
    /// after the check, while the erasure runs, are erased too; neither was returned. A
    /// connector that can ask its holder what changed since a time also checks arrivals
    /// since [`BulkJob::returned_since_ms`] (Mailchimp does), which the totals miss.
    /// `None` means no check: a DELETE or a
    /// contract end without a choice (nothing was returned), a retention run, a
    /// confirmation, or an erasure an earlier call of which passed the check (the processor
    /// holds progress of this erasure: it may have erased part already, so fewer records now
    /// say nothing, and it is not stopped half done).
    pub returned: Option<BulkProgress>,
    /// When the export whose counts [`BulkJob::returned`] holds started (its last
    /// [`Phase::Start`] call, by the processor's clock, ms since the epoch; confirmation polls
    /// do not move it): what changed at the holder after it was not returned. The last start
    /// is the returned snapshot's because the connectors that read this run their export
    /// again whole on every start. `None` when `returned` is `None` or the start was not
    /// recorded.
    pub returned_since_ms: Option<i64>,
}

impl BulkJob {
    /// What `answer` (the step's whole `erased`, an earlier call's work included) lists
    /// beyond what the processor recorded of the step before this call
    /// ([`BulkJob::recorded_progress`]), per target and action, for an erasure's
    /// [`Phase::Start`] call, to which the processor adds what it recorded: the certificate
    /// then lists the larger of the two, neither twice. `answer` as it is for other calls,
    /// whose `erased` the processor takes alone.
    pub fn beyond_recorded(&self, answer: Vec<ErasedCount>) -> Vec<ErasedCount> {
        let recorded = &self.recorded_progress.erased;
        if self.op != BulkOp::Erase || self.phase != Phase::Start || recorded.is_empty() {
            return answer;
        }
        answer
            .into_iter()
            .filter_map(|mut e| {
                let before = (recorded.iter())
                    .filter(|r| r.target == e.target && r.action == e.action)
                    .map(|r| r.count)
                    .fold(0i64, i64::saturating_add);
                e.count = e.count.saturating_sub(before);
                (e.count > 0).then_some(e)
            })
            .collect()
    }
}

/// The check of an erasure that follows a return ([`BulkJob::returned`]): `held` is what
/// `holder` holds of `controller` now, counted as its export counts (subjects and records
/// in `subjects_total` and `records_total`); `returned` the export's last progress, whose
/// done counts were returned. A permanent error when more subjects or records are held
/// than were returned: at least that many arrived after the export and would be erased
/// unreturned. As many or fewer pass: what went in between was not lost to the controller
/// by the erasure. Totals do not say which records are held, so arrivals offset by as many
/// deletions pass too.
pub fn check_returned(
    returned: &BulkProgress,
    held: &BulkProgress,
    holder: &str,
    controller: &str,
) -> Result<(), ConnectorError> {
    let records = held.records_total.saturating_sub(returned.records_done);
    let subjects = held.subjects_total.saturating_sub(returned.subjects_done);
    if records == 0 && subjects == 0 {
        return Ok(());
    }
    Err(ConnectorError::Permanent(format!(
        "{holder}: {records} record(s) ({subjects} subject(s)) of controller {controller} \
         arrived after the contract end's export and were never returned, if not more: \
         that many more are held now than were returned (held now: {} record(s) of {} \
         subject(s); returned: {} of {}), and an arrival offset by a deletion does not show \
         in these counts; nothing was erased there. To have them returned before they are \
         deleted, the controller ends the contract again with RETURN_THEN_DELETE; ending it \
         with DELETE erases them without a return",
        held.records_total, held.subjects_total, returned.records_done, returned.subjects_done,
    )))
}

/// What a contract end does with the controller's data at one holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkOp {
    /// Write all of it to the export folder, as a RETURN_OF_DATA export does for one subject.
    Export,
    /// Erase all of it, except what a legal obligation keeps ([`Outcome::Retained`]).
    Erase,
}

/// How far a bulk job has got. Totals of 0 mean the connector cannot count them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkProgress {
    /// Data subjects (top-level records: customers, audience members) done.
    pub subjects_done: u64,
    /// Data subjects of the controller at this holder.
    pub subjects_total: u64,
    /// Records (rows, members, objects) done.
    pub records_done: u64,
    /// Records of the controller at this holder.
    pub records_total: u64,
    /// An erasure's records erased or anonymized so far, per place and action, as in
    /// [`Outcome::Completed`]'s `erased`: counted as far as the done counts are, from the
    /// step's start (a call going on from [`BulkJob::recorded_progress`] goes on from its
    /// counts too), and only once the work is there to stay (a batch once committed).
    /// Empty when the connector does not count them by place (or while nothing is done):
    /// then a certificate cannot list an earlier call's work by table.
    pub erased: Vec<ErasedCount>,
}

impl BulkProgress {
    /// The done and total counts alone, without [`BulkProgress::erased`].
    pub fn counts(
        subjects_done: u64,
        subjects_total: u64,
        records_done: u64,
        records_total: u64,
    ) -> Self {
        Self {
            subjects_done,
            subjects_total,
            records_done,
            records_total,
            erased: Vec::new(),
        }
    }
}

/// `a` and `b` summed per (target, action), in the order first listed.
pub fn sum_erased(a: &[ErasedCount], b: &[ErasedCount]) -> Vec<ErasedCount> {
    let mut sum: Vec<ErasedCount> = Vec::with_capacity(a.len() + b.len());
    for e in a.iter().chain(b) {
        match (sum.iter_mut()).find(|s| s.target == e.target && s.action == e.action) {
            Some(s) => s.count = s.count.saturating_add(e.count),
            None => sum.push(e.clone()),
        }
    }
    sum
}

/// The sending side of a bulk job's progress: the connector reports, the processor reads the
/// latest value whenever it wants to tell the registry. Reporting never blocks.
#[derive(Debug, Clone)]
pub struct ProgressReporter {
    latest: std::sync::Arc<tokio::sync::watch::Sender<BulkProgress>>,
    /// Where [`ProgressReporter::record_now`] asks for a report to be recorded; `None`
    /// when nobody records (a connector's own tests).
    recorder: Option<tokio::sync::mpsc::UnboundedSender<RecordNow>>,
}

/// A connector's request that its latest report be recorded before it goes on
/// ([`ProgressReporter::record_now`]): the recorder answers on `done`, with why not when it
/// could not.
#[derive(Debug)]
pub struct RecordNow {
    /// The progress to record.
    pub progress: BulkProgress,
    /// Where the answer goes.
    pub done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl ProgressReporter {
    /// A reporter and the receiver that sees its latest report.
    pub fn new() -> (Self, tokio::sync::watch::Receiver<BulkProgress>) {
        let (tx, rx) = tokio::sync::watch::channel(BulkProgress::default());
        let reporter = Self {
            latest: std::sync::Arc::new(tx),
            recorder: None,
        };
        (reporter, rx)
    }

    /// A reporter whose [`ProgressReporter::record_now`] waits for the answer to a
    /// [`RecordNow`] sent to the returned receiver, and the receiver of its latest report.
    pub fn recorded() -> (
        Self,
        tokio::sync::watch::Receiver<BulkProgress>,
        tokio::sync::mpsc::UnboundedReceiver<RecordNow>,
    ) {
        let (reporter, seen) = Self::new();
        let (tx, asked) = tokio::sync::mpsc::unbounded_channel();
        let reporter = Self {
            recorder: Some(tx),
            ..reporter
        };
        (reporter, seen, asked)
    }

    /// Replaces the progress with `progress`.
    pub fn report(&self, progress: BulkProgress) {
        self.latest.send_replace(progress);
    }

    /// Reports `progress` and waits until the processor has recorded it with the task, so
    /// that what comes next (an erasure past its check) is known to have started should the
    /// call be cut off. Returns at once when nobody records. A transient error, before the
    /// connector does anything more, when it could not be recorded.
    pub async fn record_now(&self, progress: BulkProgress) -> Result<(), ConnectorError> {
        self.report(progress.clone());
        let Some(recorder) = &self.recorder else {
            return Ok(());
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        let not_recorded = |why: &str| {
            ConnectorError::Transient(format!(
                "the processor did not record the bulk step's progress ({why}); nothing more \
                 was done"
            ))
        };
        recorder
            .send(RecordNow { progress, done })
            .map_err(|_| not_recorded("nobody records it any more"))?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(not_recorded(&why)),
            Err(_) => Err(not_recorded("no answer came")),
        }
    }

    /// The latest progress reported.
    pub fn latest(&self) -> BulkProgress {
        self.latest.borrow().clone()
    }
}

/// What a connector run ended in.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The holder confirmed the work. For RETURN_OF_DATA and TRANSFER, `files` lists what
    /// the connector wrote into the task's [`ExportSink`].
    Completed {
        /// Records erased, exported or changed.
        records_affected: i64,
        /// What was done, without identity values.
        note: String,
        /// The export files written, in the order written; empty for other kinds.
        files: Vec<ExportedFile>,
        /// For ERASURE: what was erased where, as far as the connector can count it (per
        /// table, per audience); empty when it cannot. Deletion certificates list it.
        erased: Vec<ErasedCount>,
    },
    /// The holder confirmed it holds no data on the subject.
    NotFound {
        /// What was searched.
        note: String,
    },
    /// Part of the data is kept under a legal obligation, at least until `until_ms`; what the
    /// obligation does not need was erased or anonymized now.
    Retained {
        /// The law or contract that requires keeping it.
        legal_basis: String,
        /// The next date at which kept data is due to be erased (ms since the epoch): the
        /// processor runs the erasure again then ([`Phase::RetentionExpired`]), which may keep
        /// part again with a later date. Not necessarily the end of the retention.
        until_ms: i64,
        /// Records erased or anonymized now; kept records are not among them (they are
        /// counted by the run that erases them).
        records_affected: i64,
        /// What was done and what is kept, without identity values.
        note: String,
        /// What was erased now, where, as for [`Outcome::Completed`].
        erased: Vec<ErasedCount>,
    },
    /// The holder accepted the work but has not confirmed it; ask again with
    /// [`Phase::Confirm`].
    Accepted {
        /// The holder's reference for the work.
        handle: String,
        /// What the holder said.
        note: String,
    },
    /// A person must do the work and confirm it (manual connector).
    WaitingForOperator {
        /// Instructions for the operator, without identity values.
        note: String,
    },
    /// The holder will not do this (e.g. the connector does not support the kind).
    Refused {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// The outcome with `extra` added to its evidence note (COMPLETED, NOT_FOUND, RETAINED,
    /// ACCEPTED); the others carry no such note and stay as they are.
    pub fn with_note_added(self, extra: &str) -> Self {
        let add = |note: String| match note.is_empty() {
            true => extra.to_string(),
            false => format!("{note}; {extra}"),
        };
        match self {
            Self::Completed {
                records_affected,
                note,
                files,
                erased,
            } => Self::Completed {
                records_affected,
                note: add(note),
                files,
                erased,
            },
            Self::NotFound { note } => Self::NotFound { note: add(note) },
            Self::Retained {
                legal_basis,
                until_ms,
                records_affected,
                note,
                erased,
            } => Self::Retained {
                legal_basis,
                until_ms,
                records_affected,
                note: add(note),
                erased,
            },
            Self::Accepted { handle, note } => Self::Accepted {
                handle,
                note: add(note),
            },
            other => other,
        }
    }
}

/// How many records an erasure removed in one place of a holder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErasedCount {
    /// Where: a table, a mailing list or audience.
    pub target: String,
    /// What was done to the records: `deleted`, `anonymized`, `archived`, ...; or what was
    /// not erased but listed beside it: `kept and stripped` (the SQL connector's rows kept
    /// under an obligation, cleared now of what it does not need) and `kept` (rows kept as
    /// they are: kept under an obligation with nothing cleared by this run, or a contract
    /// end's rows in tables never erased). Those are never in `records_affected`.
    pub action: String,
    /// How many records.
    pub count: i64,
}

/// One table of a tabular holder ([`Connector::held_tables`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldTable {
    /// The table's name, as the holder's rules name it.
    pub name: String,
    /// The data categories its rule names; `None` when it names none, so that it holds
    /// every category of its subprocessor (which the connector does not know: the processor
    /// fills them in).
    pub categories: Option<Vec<String>>,
}

/// A way of reaching one holder of the data.
pub trait Connector: Send + Sync {
    /// A short name of the connector type (`sql`, `noop`, ...), for messages.
    fn kind_name(&self) -> &'static str;

    /// Whether this connector can carry out requests of `kind`. The processor refuses the
    /// others without calling [`Connector::run`]. For `CONTRACT_END`: whether
    /// [`Connector::run_bulk`] can end a contract here.
    fn supports(&self, kind: RequestKind) -> bool;

    /// Takes one step of `task`.
    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>>;

    /// The forms of identity (type, encoding) this holder can find a subject by, as
    /// ListSubprocessors reports them. A connector that lists forms answers a task with no
    /// identity it can search by [`Outcome::Refused`], naming the forms, and leaves the other
    /// identities out of its search. The connector decides, not the processor from this
    /// list: a value of a listed form may still be unusable (an MD5 that is no hash, a phone
    /// number without digits). Empty (the default) when every identity is passed on as given
    /// and the holder decides: an external adapter, a manual holder's operator, the noop
    /// connector.
    fn matchable_identities(&self) -> Vec<(IdentityType, IdentityEncoding)> {
        Vec::new()
    }

    /// The tables this holder keeps the data in, in configuration order, as ListSubprocessors
    /// reports them, each with the data categories its rule names ([`HeldTable`]). Empty (the
    /// default) for a holder that is not tabular: an external adapter, a mail-marketing
    /// audience, a manual holder, the noop connector.
    fn held_tables(&self) -> Vec<HeldTable> {
        Vec::new()
    }

    /// The controllers this connector's configuration scopes its data to, or `None` when its
    /// data is not scoped (then all of it belongs to whichever controller asks).
    fn scoped_controllers(&self) -> Option<Vec<String>> {
        None
    }

    /// Whether the connector hands a request's category scope to the holder, which then
    /// answers for those categories only (the adapter protocol's `ExecuteRequest.scope`).
    /// For the others the processor labels export files with every category the
    /// subprocessor holds, not only the requested ones; such a connector that knows what
    /// each file holds (the `sql` connector, by its tables' `categories`) narrows that label
    /// per file itself ([`ExportSink::narrowed_to`]).
    fn scopes_by_category(&self) -> bool {
        false
    }

    /// Takes one step of a contract end over all of `job.controller`'s data at this holder,
    /// with a few statements or batched calls, never one call per subject. Connectors that
    /// cannot do it refuse.
    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        let _ = job;
        let reason = format!("the {} connector cannot end a contract", self.kind_name());
        Box::pin(async move { Ok(Outcome::Refused { reason }) })
    }

    /// Removes what the steps of a contract end recorded at this holder for the steps after
    /// them, once that contract end will not go on: it was cancelled after its export began,
    /// or it failed for good and was forgotten. `job_id` is the [`BulkJob::job_id`] its
    /// [`BulkOp::Export`] ran under (its erasure's is that plus `#erase`), `controller` the
    /// [`BulkJob::controller`]. The processor calls it until it answers `Ok`, again after an
    /// error, so a second call finding nothing left answers `Ok` too. The SQL connector
    /// deletes the job's rows of its table of returned keys (`<receipts_table>_returned`).
    /// The default records nothing, so it has nothing to remove: `Ok` without a call. An
    /// external adapter that keeps state per job would need a protocol call to be told.
    fn discard_bulk<'a>(
        &'a self,
        controller: &'a str,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ConnectorError>> {
        let _ = (controller, job_id);
        Box::pin(async { Ok(()) })
    }
}

/// The kind's name without the enum prefix, for messages (`ERASURE`).
pub fn kind_label(kind: RequestKind) -> &'static str {
    kind.as_str_name().trim_start_matches("REQUEST_KIND_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_error_shows_its_kind_and_length_only() {
        let quoted = "exporting payments: invalid input syntax: \"maija@example.fi\"";
        for (e, shown) in [
            (
                ConnectorError::Transient(quoted.into()),
                "transient, 60 bytes withheld",
            ),
            (
                ConnectorError::RetryAfter {
                    message: quoted.into(),
                    after_ms: 1000,
                },
                "transient (retry after 1000 ms), 60 bytes withheld",
            ),
            (
                ConnectorError::Permanent(quoted.into()),
                "permanent, 60 bytes withheld",
            ),
        ] {
            assert_eq!(e.logged().to_string(), shown);
            assert_eq!(format!("{:?}", e.logged()), shown);
        }
    }

    #[test]
    fn a_phase_is_named_without_the_holders_handle() {
        let confirm = Phase::Confirm {
            handle: "job for maija@example.fi".into(),
        };
        assert_eq!(confirm.name(), "confirm");
        assert_eq!(Phase::Start.name(), "start");
        assert_eq!(
            Phase::RetentionExpired { until_ms: 1 }.name(),
            "retention_expired"
        );
    }
}
