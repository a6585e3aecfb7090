//! What dsrctl prints: small serde views of the proto messages, rendered either as JSON or
//! as text tables.
//!
//! The views exist so JSON output is stable and readable (enums by name without their
//! prefix, timestamps as RFC 3339) rather than prost's integers and `{seconds, nanos}`.

use std::fmt;
use std::io::Write;
use std::sync::LazyLock;

use chrono::{DateTime, SecondsFormat, Utc};
use dsrelay_sdk::proto::{Chain, Delivery, FieldCorrection, TaskStatus};
use dsrelay_sdk::proto::{
    DeliveryState, EventType, IdentityEncoding, IdentityType, Request, RequestEvent, RequestKind,
    RequestState, SubmitResponse, TaskState,
};
use serde::Serialize;

use crate::cli::OutputFormat;
use crate::table::{clean, show_hidden, Table};

/// A point in time: RFC 3339 in UTC, to the second in tables and exact in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Time(DateTime<Utc>);

impl Time {
    /// `None` for an absent timestamp or one outside chrono's range.
    pub(crate) fn from_proto(ts: Option<&dsrelay_proto::prost_types::Timestamp>) -> Option<Self> {
        let ts = ts?;
        let nanos = u32::try_from(ts.nanos).ok()?;
        DateTime::from_timestamp(ts.seconds, nanos).map(Self)
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::Secs, true))
    }
}

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

/// A table cell for a point in time: empty when there is none.
pub(crate) fn time_cell(t: Option<Time>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

/// `3 days`, `1 hour`, `12 minutes`: how long `ms` is, in its largest whole unit.
fn span(ms: i64) -> String {
    let units = [
        (86_400_000, "day"),
        (3_600_000, "hour"),
        (60_000, "minute"),
        (1_000, "second"),
    ];
    for (size, unit) in units {
        let n = ms / size;
        if n >= 1 {
            let s = if n == 1 { "" } else { "s" };
            return format!("{n} {unit}{s}");
        }
    }
    "less than a second".into()
}

/// An enum value's proto name without the type prefix (`ERASURE`); `UNKNOWN(n)` for a value
/// newer than this build, so output never fails on a newer registry.
fn enum_name(name: Option<&'static str>, prefix: &str, raw: i32) -> String {
    match name {
        Some(name) => name.strip_prefix(prefix).unwrap_or(name).to_string(),
        None => format!("UNKNOWN({raw})"),
    }
}

pub(crate) fn kind_name(v: i32) -> String {
    let name = RequestKind::try_from(v).ok().map(|k| k.as_str_name());
    enum_name(name, "REQUEST_KIND_", v)
}

pub(crate) fn state_name(v: i32) -> String {
    let name = RequestState::try_from(v).ok().map(|k| k.as_str_name());
    enum_name(name, "REQUEST_STATE_", v)
}

pub(crate) fn task_state_name(v: i32) -> String {
    let name = TaskState::try_from(v).ok().map(|k| k.as_str_name());
    enum_name(name, "TASK_STATE_", v)
}

pub(crate) fn delivery_state_name(v: i32) -> String {
    let name = DeliveryState::try_from(v).ok().map(|k| k.as_str_name());
    enum_name(name, "DELIVERY_STATE_", v)
}

pub(crate) fn event_type_name(v: i32) -> String {
    let name = EventType::try_from(v).ok().map(|k| k.as_str_name());
    enum_name(name, "EVENT_TYPE_", v)
}

pub(crate) fn processor_audit_event_name(v: i32) -> String {
    let name = dsrelay_sdk::proto::ProcessorAuditEvent::try_from(v)
        .ok()
        .map(|k| k.as_str_name());
    enum_name(name, "PROCESSOR_AUDIT_EVENT_", v)
}

pub(crate) fn identity_type_name(v: i32) -> String {
    let name = IdentityType::try_from(v).ok().map(|k| k.as_str_name());
    enum_name(name, "IDENTITY_TYPE_", v)
}

pub(crate) fn identity_encoding_name(v: i32) -> String {
    let name = IdentityEncoding::try_from(v).ok().map(|k| k.as_str_name());
    enum_name(name, "IDENTITY_ENCODING_", v)
}

/// Result of `submit`.
#[derive(Debug, Serialize)]
pub(crate) struct SubmitView {
    pub(crate) request_id: String,
    pub(crate) state: String,
    pub(crate) due_at: Option<Time>,
    pub(crate) trace_id: String,
    pub(crate) deduplicated: bool,
    pub(crate) routed_to: Vec<String>,
    pub(crate) idempotency_key: String,
}

impl SubmitView {
    pub(crate) fn new(r: &SubmitResponse, idempotency_key: String) -> Self {
        Self {
            request_id: r.request_id.clone(),
            state: state_name(r.state),
            due_at: Time::from_proto(r.due_at.as_ref()),
            trace_id: r.trace_id.clone(),
            deduplicated: r.deduplicated,
            routed_to: r.routed_to.clone(),
            idempotency_key,
        }
    }

    fn table(&self) -> String {
        let mut t = Table::headless();
        t.row(["request", self.request_id.as_str()]);
        t.row(["state", self.state.as_str()]);
        t.row(["due", &time_cell(self.due_at)]);
        t.row(["trace id", self.trace_id.as_str()]);
        t.row(["routed to", &self.routed_to.join(", ")]);
        t.row(["idempotency key", self.idempotency_key.as_str()]);
        if self.deduplicated {
            t.row(["deduplicated", "yes: this key was submitted before"]);
        }
        t.render()
    }
}

/// One identity of a request.
#[derive(Debug, Serialize)]
pub(crate) struct IdentityView {
    #[serde(rename = "type")]
    pub(crate) ty: String,
    pub(crate) encoding: String,
    pub(crate) value: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) label: String,
}

/// A field correction of a RECTIFICATION request.
#[derive(Debug, Serialize)]
pub(crate) struct CorrectionView {
    pub(crate) field: String,
    pub(crate) new_value: String,
}

impl CorrectionView {
    /// The views of a request's or a task's corrections.
    pub(crate) fn list(corrections: Vec<FieldCorrection>) -> Vec<Self> {
        (corrections.into_iter())
            .map(|c| Self {
                field: c.field,
                new_value: c.new_value,
            })
            .collect()
    }

    /// `field = value` for a table: the value as entered, control characters as spaces.
    pub(crate) fn cell(&self) -> String {
        clean(&format!("{} = {}", self.field, self.new_value))
    }
}

/// One delivery.
#[derive(Debug, Serialize)]
pub(crate) struct DeliveryView {
    pub(crate) processor: String,
    /// `deliver`, or the call that follows it: `cancel`, `extend` or `update`.
    pub(crate) operation: String,
    pub(crate) state: String,
    pub(crate) attempts: u32,
    pub(crate) last_error: String,
    pub(crate) next_attempt_at: Option<Time>,
    pub(crate) delivered_at: Option<Time>,
    /// Set when the processor kept refusing it and it is no longer sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dead_lettered_at: Option<Time>,
    /// An `update` or `extend` waiting for its processor's Deliver, not yet through.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) behind_deliver: bool,
}

impl From<&Delivery> for DeliveryView {
    fn from(d: &Delivery) -> Self {
        Self {
            processor: d.processor.clone(),
            operation: d.operation.clone(),
            state: delivery_state_name(d.state),
            attempts: d.attempts,
            last_error: d.last_error.clone(),
            next_attempt_at: Time::from_proto(d.next_attempt_at.as_ref()),
            delivered_at: Time::from_proto(d.delivered_at.as_ref()),
            dead_lettered_at: Time::from_proto(d.dead_lettered_at.as_ref()),
            behind_deliver: d.behind_deliver,
        }
    }
}

impl DeliveryView {
    /// What the call carries, in a table's words.
    pub(crate) fn call(&self) -> String {
        let what = match self.operation.as_str() {
            "deliver" => "the request",
            "cancel" => "its cancellation",
            "extend" => "its due date",
            "update" => "the contract end's terms",
            _ => return self.operation.clone(),
        };
        format!("{} ({what})", self.operation)
    }

    /// The state, and for one waiting for its Deliver, that it does.
    pub(crate) fn state_cell(&self) -> String {
        if self.behind_deliver {
            format!("{} (after the deliver)", self.state)
        } else {
            self.state.clone()
        }
    }

    /// When it got through, was dead-lettered, or is tried next: the one that applies.
    pub(crate) fn when_cell(&self) -> String {
        match (
            self.delivered_at,
            self.dead_lettered_at,
            self.next_attempt_at,
        ) {
            (Some(at), _, _) => format!("delivered {at}"),
            (None, Some(at), _) => format!("dead-lettered {at}"),
            (None, None, Some(at)) => format!("next {at}"),
            (None, None, None) => String::new(),
        }
    }
}

/// The table of `calls` (a request's calls that follow its deliveries, or a contract end's
/// calls), with what each carries.
pub(crate) fn calls_table(calls: &[DeliveryView]) -> String {
    let mut t = Table::new([
        "PROCESSOR",
        "CALL",
        "STATE",
        "ATTEMPTS",
        "WHEN",
        "LAST ERROR",
    ]);
    for d in calls {
        t.row([
            d.processor.clone(),
            d.call(),
            d.state_cell(),
            d.attempts.to_string(),
            d.when_cell(),
            d.last_error.clone(),
        ]);
    }
    t.render()
}

/// One task.
#[derive(Debug, Serialize)]
pub(crate) struct TaskView {
    pub(crate) processor: String,
    pub(crate) subprocessor: String,
    pub(crate) state: String,
    pub(crate) sequence: u64,
    pub(crate) records_affected: Option<i64>,
    pub(crate) evidence_note: String,
    pub(crate) confirmed: bool,
    pub(crate) reason: String,
    pub(crate) legal_basis: String,
    pub(crate) retain_until: Option<Time>,
    pub(crate) updated_at: Option<Time>,
    /// A TRANSFER task's proof that the recipient holds its part.
    pub(crate) transfer_receipt: Option<ReceiptView>,
}

/// A recipient's receipt for one task's part of a transfer.
#[derive(Debug, Serialize)]
pub(crate) struct ReceiptView {
    pub(crate) recipient: String,
    /// The certificate identity of the processor that sent the part, as the recipient saw
    /// it over mutual TLS; empty when the recipient did not name it.
    pub(crate) sender: String,
    pub(crate) bytes: u64,
    pub(crate) files: u32,
    pub(crate) manifest_sha256: String,
    pub(crate) received_at: Option<Time>,
    /// The id of the key the recipient signed the receipt with; empty when unsigned. The
    /// registry takes a receipt of a recipient it has a `public_key` for only as signed.
    pub(crate) key_id: String,
    /// The recipient's signature (base64) over the receipt's signed body
    /// (`dsrelay_runtime::transfer_receipt`); empty when unsigned.
    pub(crate) signature: String,
}

impl From<&TaskStatus> for TaskView {
    fn from(t: &TaskStatus) -> Self {
        Self {
            processor: t.processor.clone(),
            subprocessor: t.subprocessor.clone(),
            state: task_state_name(t.state),
            sequence: t.sequence,
            records_affected: t.evidence.as_ref().map(|e| e.records_affected),
            evidence_note: t
                .evidence
                .as_ref()
                .map(|e| e.note.clone())
                .unwrap_or_default(),
            confirmed: t.evidence.as_ref().is_some_and(|e| e.confirmed),
            reason: t.reason.clone(),
            legal_basis: t.legal_basis.clone(),
            retain_until: Time::from_proto(t.retain_until.as_ref()),
            updated_at: Time::from_proto(t.updated_at.as_ref()),
            transfer_receipt: t
                .evidence
                .as_ref()
                .and_then(|e| e.transfer_receipt.as_ref())
                .map(|r| ReceiptView {
                    recipient: r.recipient.clone(),
                    sender: r.sender.clone(),
                    bytes: r.bytes,
                    files: r.files,
                    manifest_sha256: r.manifest_sha256.clone(),
                    received_at: Time::from_proto(r.received_at.as_ref()),
                    key_id: r.key_id.clone(),
                    signature: base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        &r.signature,
                    ),
                }),
        }
    }
}

/// A retention as every view words it. `next_run` is `retain_until`, the date the holder's
/// erasure runs again (which may keep part of the data again, with a later date): worded as
/// an end of retention, it misleads whoever plans by it. A date in the past is a run the
/// processor started (the task IN_PROGRESS while the holder has not confirmed it), or
/// one due: it is worded as awaiting the holder's confirmation, not as a run to come.
/// Empty parts are left out.
pub(crate) fn retention_words(legal_basis: &str, next_run: &str) -> String {
    retention_words_at(legal_basis, next_run, Utc::now())
}

/// [`retention_words`] as of `now`.
fn retention_words_at(legal_basis: &str, next_run: &str, now: DateTime<Utc>) -> String {
    let mut parts = Vec::new();
    if !legal_basis.is_empty() {
        parts.push(format!("kept under {legal_basis}"));
    }
    if is_past(next_run, now) {
        parts.push(format!(
            "erasure run of {next_run}, awaiting the holder's confirmation"
        ));
    } else if !next_run.is_empty() {
        parts.push(format!("next erasure run {next_run}"));
    }
    parts.join("; ")
}

/// Whether `next_run` (RFC 3339) is before `now`: a run started or due, not one to come.
fn is_past(next_run: &str, now: DateTime<Utc>) -> bool {
    DateTime::parse_from_rfc3339(next_run).is_ok_and(|at| at < now)
}

/// The date of [`retention_words`] for a cell under a `NEXT ERASURE RUN` heading: the date,
/// and for one passed that the run awaits the holder's confirmation. Empty for none.
pub(crate) fn erasure_run_cell(next_run: &str) -> String {
    erasure_run_cell_at(next_run, Utc::now())
}

/// [`erasure_run_cell`] as of `now`.
fn erasure_run_cell_at(next_run: &str, now: DateTime<Utc>) -> String {
    if is_past(next_run, now) {
        format!("{next_run}, awaiting the holder's confirmation")
    } else {
        next_run.to_string()
    }
}

impl TaskView {
    /// Reason, legal basis and retention date in one cell; tasks rarely have more than one.
    /// A task without a reason shows its note instead: what it waits for, what the operator
    /// must do, or what the holder (or the operator who did it by hand) said it did.
    fn detail(&self) -> String {
        let mut parts = Vec::new();
        if !self.reason.is_empty() {
            parts.push(self.reason.clone());
        } else if !self.evidence_note.is_empty() {
            parts.push(self.evidence_note.clone());
        }
        let retention = retention_words(&self.legal_basis, &time_cell(self.retain_until));
        if !retention.is_empty() {
            parts.push(retention);
        }
        parts.join("; ")
    }
}

/// A failed status check of a processor, as GetChain reports it.
#[derive(Debug, Serialize)]
pub(crate) struct StatusCheckView {
    error: String,
    failed_at: Option<Time>,
}

impl StatusCheckView {
    /// The last failed status check of `processor` in `chain`; none while the last answered.
    pub(crate) fn of(chain: &Chain, processor: &str) -> Option<Self> {
        let p = chain.processors.iter().find(|p| p.name == processor)?;
        (!p.status_check_error.is_empty()).then(|| Self {
            error: p.status_check_error.clone(),
            failed_at: Time::from_proto(p.status_check_failed_at.as_ref()),
        })
    }

    /// `failed at T: why`, for a table cell.
    pub(crate) fn cell(&self) -> String {
        let at = self
            .failed_at
            .map_or_else(String::new, |t| format!(" at {t}"));
        format!("failed{at}: {}", clean(&self.error))
    }
}

/// The last failed status check of a processor a request is routed to.
#[derive(Debug, Serialize)]
pub(crate) struct ProcessorCheckView {
    pub(crate) processor: String,
    #[serde(flatten)]
    pub(crate) check: StatusCheckView,
}

impl ProcessorCheckView {
    /// Those of the processors `request` is routed to whose last status check in `chain`
    /// failed, none answering since.
    pub(crate) fn of_request(chain: &Chain, request: &Request) -> Vec<Self> {
        (request.deliveries.iter())
            .filter_map(|d| {
                StatusCheckView::of(chain, &d.processor).map(|check| Self {
                    processor: d.processor.clone(),
                    check,
                })
            })
            .collect()
    }
}

/// A request as `get`, `list`, `cancel` and `extend` show it.
#[derive(Debug, Serialize)]
pub(crate) struct RequestView {
    pub(crate) request_id: String,
    pub(crate) partner: String,
    pub(crate) kind: String,
    pub(crate) state: String,
    pub(crate) received_at: Option<Time>,
    pub(crate) due_at: Option<Time>,
    pub(crate) overdue: bool,
    /// When the subject could first be answered: the request first COMPLETED or
    /// PARTIALLY_COMPLETED. `overdue` is false from then on.
    pub(crate) answered_at: Option<Time>,
    /// Whether `answered_at` was after the due date (extensions included).
    pub(crate) answered_late: bool,
    /// When it last became COMPLETED, FAILED or CANCELLED.
    pub(crate) finished_at: Option<Time>,
    pub(crate) trace_id: String,
    pub(crate) updated_at: Option<Time>,
    pub(crate) idempotency_key: String,
    pub(crate) note: String,
    pub(crate) data_categories: Vec<String>,
    pub(crate) corrections: Vec<CorrectionView>,
    pub(crate) lift_restriction: bool,
    pub(crate) transfer_recipient: String,
    pub(crate) identities: Vec<IdentityView>,
    pub(crate) identities_forgotten: bool,
    pub(crate) extension_reasons: Vec<String>,
    pub(crate) cancel_reason: String,
    pub(crate) deliveries: Vec<DeliveryView>,
    /// The calls that follow the deliveries: a cancellation, a due date, a contract end's
    /// terms, each until the processor has it.
    pub(crate) follow_up_deliveries: Vec<DeliveryView>,
    pub(crate) tasks: Vec<TaskView>,
    /// A contract end's returned data deleted without a confirmation, in the words of
    /// `commands::contracts::unconfirmed_return`: the request carries no terms, so
    /// only `get` sets it, from the contract end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) return_unconfirmed: Option<String>,
    /// The registry's last failed status check of each processor the request is routed to
    /// (GetChain), while none answered since: set by `get` only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) processor_status_checks: Vec<ProcessorCheckView>,
}

impl From<&Request> for RequestView {
    fn from(r: &Request) -> Self {
        let params = r.parameters.clone().unwrap_or_default();
        Self {
            request_id: r.request_id.clone(),
            partner: r.partner.clone(),
            kind: kind_name(r.kind),
            state: state_name(r.state),
            received_at: Time::from_proto(r.received_at.as_ref()),
            due_at: Time::from_proto(r.due_at.as_ref()),
            overdue: r.overdue,
            answered_at: Time::from_proto(r.answered_at.as_ref()),
            answered_late: r.answered_late,
            finished_at: Time::from_proto(r.finished_at.as_ref()),
            trace_id: r.trace_id.clone(),
            updated_at: Time::from_proto(r.updated_at.as_ref()),
            idempotency_key: r.idempotency_key.clone(),
            note: r.note.clone(),
            data_categories: r
                .scope
                .as_ref()
                .map(|s| s.data_categories.clone())
                .unwrap_or_default(),
            corrections: CorrectionView::list(params.corrections),
            lift_restriction: params.lift_restriction,
            transfer_recipient: params.transfer_recipient,
            identities: r
                .identities
                .iter()
                .map(|i| IdentityView {
                    ty: identity_type_name(i.r#type),
                    encoding: identity_encoding_name(i.encoding),
                    value: i.value.clone(),
                    label: i.label.clone(),
                })
                .collect(),
            identities_forgotten: r.identities_forgotten,
            extension_reasons: r.extension_reasons.clone(),
            cancel_reason: r.cancel_reason.clone(),
            deliveries: r.deliveries.iter().map(DeliveryView::from).collect(),
            follow_up_deliveries: (r.follow_up_deliveries.iter())
                .map(DeliveryView::from)
                .collect(),
            tasks: r.tasks.iter().map(TaskView::from).collect(),
            return_unconfirmed: None,
            processor_status_checks: Vec::new(),
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl RequestView {
    /// When the subject was answered, and how that stood to the due date.
    fn answered_cell(&self, at: Time) -> String {
        match self.due_at {
            Some(due) if self.answered_late => {
                let late = span((at.0 - due.0).num_milliseconds());
                format!("{at} ({late} after the due date)")
            }
            Some(_) => format!("{at} (by the due date)"),
            None => at.to_string(),
        }
    }

    /// Header, deliveries and tasks.
    fn table(&self) -> String {
        let mut h = Table::headless();
        h.row(["request", self.request_id.as_str()]);
        // Only an operator creates a contract end (ContractService.EndContract, never
        // Submit), so its `partner` names that operator; the registry says no more of who
        // submitted a request of another kind.
        let submitter = if self.kind == kind_name(RequestKind::ContractEnd as i32) {
            "operator"
        } else {
            "partner"
        };
        h.row([submitter, self.partner.as_str()]);
        h.row(["kind", self.kind.as_str()]);
        h.row(["state", self.state.as_str()]);
        // The tasks show each processor's last report, which one that is down does not
        // update: this is the registry's sign that it no longer answers.
        for c in &self.processor_status_checks {
            let cell = format!("{}: {}", clean(&c.processor), c.check.cell());
            h.row(["processor status check".to_string(), cell]);
        }
        h.row(["received", &time_cell(self.received_at)]);
        h.row(["due", &time_cell(self.due_at)]);
        h.row(["overdue", yes_no(self.overdue)]);
        // `overdue` is no once the subject is answered, late or not: this still says which.
        if let Some(at) = self.answered_at {
            h.row(["answered".to_string(), self.answered_cell(at)]);
        }
        if let Some(at) = self.finished_at {
            h.row(["finished".to_string(), at.to_string()]);
        }
        h.row(["trace id", self.trace_id.as_str()]);
        // Types only: the values are personal data, and a terminal's scrollback is no place
        // for them. `--output json` has them for whoever really needs them.
        let identities = if self.identities_forgotten {
            "forgotten".to_string()
        } else {
            self.identities
                .iter()
                .map(|i| match (i.encoding.as_str(), i.label.as_str()) {
                    ("RAW", "") => i.ty.clone(),
                    ("RAW", label) => format!("{} ({label})", i.ty),
                    (enc, _) => format!("{} ({enc})", i.ty),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        h.row(["identities", identities.as_str()]);
        // Forgetting empties the stored scope too: an empty list then says nothing of what
        // the request covered.
        let categories = if self.identities_forgotten {
            "forgotten".to_string()
        } else if self.data_categories.is_empty() {
            "all".to_string()
        } else {
            self.data_categories.join(", ")
        };
        h.row(["categories", categories.as_str()]);
        if !self.transfer_recipient.is_empty() {
            h.row(["recipient", self.transfer_recipient.as_str()]);
        }
        if self.lift_restriction {
            h.row(["lift restriction", "yes"]);
        }
        for c in &self.corrections {
            h.row(["correct".to_string(), c.cell()]);
        }
        if !self.note.is_empty() {
            h.row(["note", self.note.as_str()]);
        }
        for reason in &self.extension_reasons {
            h.row(["extended", reason.as_str()]);
        }
        if !self.cancel_reason.is_empty() {
            h.row(["cancelled", self.cancel_reason.as_str()]);
        }
        // The tasks' reasons are their outcome's by now: only this still says it.
        if let Some(r) = &self.return_unconfirmed {
            h.row(["return", r.as_str()]);
        }

        let mut out = h.render();
        out.push_str("\nDeliveries\n");
        if self.deliveries.is_empty() {
            out.push_str("(none)\n");
        } else {
            let mut t = Table::new(["PROCESSOR", "STATE", "ATTEMPTS", "WHEN", "LAST ERROR"]);
            for d in &self.deliveries {
                t.row([
                    d.processor.clone(),
                    d.state.clone(),
                    d.attempts.to_string(),
                    d.when_cell(),
                    d.last_error.clone(),
                ]);
            }
            out.push_str(&t.render());
        }
        // Until the processor has them, it works under what it was sent before.
        if !self.follow_up_deliveries.is_empty() {
            out.push_str("\nCalls that follow\n");
            out.push_str(&calls_table(&self.follow_up_deliveries));
        }
        out.push_str("\nTasks\n");
        if self.tasks.is_empty() {
            out.push_str("(none)\n");
        } else {
            let mut t = Table::new([
                "PROCESSOR",
                "SUBPROCESSOR",
                "STATE",
                "SEQ",
                "RECORDS",
                "DETAIL",
            ]);
            for task in &self.tasks {
                t.row([
                    task.processor.clone(),
                    task.subprocessor.clone(),
                    task.state.clone(),
                    task.sequence.to_string(),
                    task.records_affected
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                    task.detail(),
                ]);
            }
            out.push_str(&t.render());
        }
        let receipts: Vec<&TaskView> = self
            .tasks
            .iter()
            .filter(|t| t.transfer_receipt.is_some())
            .collect();
        if !receipts.is_empty() {
            out.push_str("\nTransfer receipts\n");
            let mut t = Table::new([
                "SUBPROCESSOR",
                "RECIPIENT",
                "BYTES",
                "FILES",
                "MANIFEST SHA-256",
                "RECEIVED",
                "SIGNED",
                "SENDER",
            ]);
            for task in receipts {
                if let Some(r) = &task.transfer_receipt {
                    t.row([
                        task.subprocessor.clone(),
                        r.recipient.clone(),
                        r.bytes.to_string(),
                        r.files.to_string(),
                        r.manifest_sha256.clone(),
                        time_cell(r.received_at),
                        if r.signature.is_empty() { "no" } else { "yes" }.into(),
                        r.sender.clone(),
                    ]);
                }
            }
            out.push_str(&t.render());
        }
        out
    }
}

/// Result of `list`.
#[derive(Debug, Serialize)]
pub(crate) struct ListView {
    pub(crate) requests: Vec<RequestView>,
    pub(crate) next_page_token: String,
}

impl ListView {
    fn table(&self) -> String {
        self.rows() + &self.next_page()
    }

    /// The requests as a table, without the next page's line.
    pub(crate) fn rows(&self) -> String {
        let mut t = Table::new(["ID", "KIND", "STATE", "RECEIVED", "DUE", "OVERDUE"]);
        for r in &self.requests {
            t.row([
                r.request_id.clone(),
                r.kind.clone(),
                r.state.clone(),
                time_cell(r.received_at),
                time_cell(r.due_at),
                yes_no(r.overdue).to_string(),
            ]);
        }
        t.render()
    }

    /// The line naming the next page's token; empty on the last page.
    pub(crate) fn next_page(&self) -> String {
        self.next_page_with("")
    }

    /// [`Self::next_page`] with `flags` (each followed by a space) before the token: those a
    /// page token needs that the command as typed would send otherwise.
    pub(crate) fn next_page_with(&self, flags: &str) -> String {
        if self.next_page_token.is_empty() {
            return String::new();
        }
        format!(
            "next page: {flags}--page-token {}\n",
            clean(&self.next_page_token)
        )
    }
}

/// One event of `watch`.
#[derive(Debug, Serialize)]
pub(crate) struct EventView {
    pub(crate) event_id: u64,
    pub(crate) request_id: String,
    #[serde(rename = "type")]
    pub(crate) ty: String,
    pub(crate) occurred_at: Option<Time>,
    pub(crate) request_state: String,
    pub(crate) processor: String,
    pub(crate) task: Option<TaskView>,
    pub(crate) message: String,
    pub(crate) attempt: u32,
}

impl From<&RequestEvent> for EventView {
    fn from(e: &RequestEvent) -> Self {
        Self {
            event_id: e.event_id,
            request_id: e.request_id.clone(),
            ty: event_type_name(e.r#type),
            occurred_at: Time::from_proto(e.occurred_at.as_ref()),
            request_state: state_name(e.request_state),
            processor: e.processor.clone(),
            task: e.task.as_ref().map(TaskView::from),
            message: e.message.clone(),
            attempt: e.attempt,
        }
    }
}

/// The width of an event line's type column: its widest name, so that a type added to the
/// enum cannot push the columns after it out of line.
static TYPE_WIDTH: LazyLock<usize> = LazyLock::new(|| widest(event_type_name));
/// The same for the request state column.
static STATE_WIDTH: LazyLock<usize> = LazyLock::new(|| widest(state_name));

/// The widest name `name` gives a value its enum knows. Values are numbered from 0 and far
/// below 64; 64 numbers cover them with room to spare.
fn widest(name: fn(i32) -> String) -> usize {
    (0..64)
        .map(name)
        .filter(|n| !n.starts_with("UNKNOWN("))
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
}

impl EventView {
    /// One line, columns padded to fixed widths since later events cannot re-align earlier
    /// lines: time, type, request state, processor[/subprocessor], message.
    fn line(&self) -> String {
        let who = match &self.task {
            Some(task) if !task.subprocessor.is_empty() => {
                let processor = if task.processor.is_empty() {
                    &self.processor
                } else {
                    &task.processor
                };
                format!("{processor}/{}", task.subprocessor)
            }
            _ => self.processor.clone(),
        };
        let mut message = self.message.clone();
        // A PART_STORED event's task only names whose part it is: it has no state to show.
        if let Some(task) = self.task.as_ref().filter(|t| t.state != "UNSPECIFIED") {
            let detail = task.detail();
            let extra = if detail.is_empty() {
                format!("task {}", task.state)
            } else {
                format!("task {} ({detail})", task.state)
            };
            message = if message.is_empty() {
                extra
            } else {
                format!("{message} [{extra}]")
            };
        }
        if self.attempt > 0 && message.is_empty() {
            message = format!("attempt {}", self.attempt);
        }
        let (type_width, state_width) = (*TYPE_WIDTH, *STATE_WIDTH);
        let line = format!(
            "{:<20}  {:<type_width$}  {:<state_width$}  {:<30}  {}",
            time_cell(self.occurred_at),
            self.ty,
            self.request_state,
            if who.is_empty() { "-".to_string() } else { who },
            message
        );
        clean(line.trim_end())
    }
}

/// One party of the development PKI.
#[derive(Debug, Serialize)]
pub(crate) struct PkiPartyView {
    pub(crate) party: String,
    pub(crate) identity: String,
    pub(crate) cert: String,
    pub(crate) key: String,
}

/// Result of `pki init`.
#[derive(Debug, Serialize)]
pub(crate) struct PkiView {
    pub(crate) dir: String,
    pub(crate) created: bool,
    pub(crate) ca: String,
    pub(crate) parties: Vec<PkiPartyView>,
    /// The processors' deletion-certificate signing keys and the registries' audit
    /// checkpoint keys.
    pub(crate) signing_keys: Vec<PkiSigningKeyView>,
    /// The folders given to single parties (`--install`).
    pub(crate) installed: Vec<PkiInstalledView>,
}

/// One party's own folder in `pki init --install`.
#[derive(Debug, Serialize)]
pub(crate) struct PkiInstalledView {
    pub(crate) party: String,
    pub(crate) dir: String,
}

/// One party's signing key in `pki init`.
#[derive(Debug, Serialize)]
pub(crate) struct PkiSigningKeyView {
    pub(crate) party: String,
    /// The private key (PKCS#8 PEM): a processor's `signing_key`, a registry's
    /// `audit.checkpoint_key`.
    pub(crate) key: String,
    /// Its public key (SPKI PEM): the registry's `public_key` for a processor; for a
    /// registry, what `dsrctl audit verify --checkpoint-key` checks its checkpoints with.
    pub(crate) public_key: String,
}

/// Result of `pki revoke`.
#[derive(Debug, Serialize)]
pub(crate) struct CrlView {
    /// The revocation list written.
    pub(crate) crl: String,
    /// When it must be renewed (RFC 3339).
    pub(crate) next_update: String,
    /// Serial numbers (hex) of every certificate it lists.
    pub(crate) revoked: Vec<String>,
}

impl Render for CrlView {
    fn to_table(&self) -> String {
        let mut out = format!("wrote {} (renew before {})\n", self.crl, self.next_update);
        if self.revoked.is_empty() {
            out.push_str("no certificate is revoked\n");
        }
        for serial in &self.revoked {
            out.push_str(&format!("revoked: {serial}\n"));
        }
        out
    }
}

impl PkiView {
    fn table(&self) -> String {
        let mut out = if self.created {
            format!("created a development PKI in {}\n", self.dir)
        } else {
            format!("kept the development PKI already in {}\n", self.dir)
        };
        out.push_str(&format!("ca: {}\n\n", self.ca));
        let mut t = Table::new(["PARTY", "IDENTITY", "CERT", "KEY"]);
        for p in &self.parties {
            t.row([&p.party, &p.identity, &p.cert, &p.key]);
        }
        out.push_str(&t.render());
        for k in &self.signing_keys {
            out.push_str(&format!(
                "\nsigning key of {}: {} (public key: {})\n",
                k.party, k.key, k.public_key
            ));
        }
        for i in &self.installed {
            out.push_str(&format!(
                "\n{}'s own files installed in {}\n",
                i.party, i.dir
            ));
        }
        out
    }
}

/// Something printable as a table or as one JSON document.
pub(crate) trait Render: Serialize {
    /// The text form.
    fn to_table(&self) -> String;
}

impl Render for SubmitView {
    fn to_table(&self) -> String {
        self.table()
    }
}

impl Render for RequestView {
    fn to_table(&self) -> String {
        self.table()
    }
}

impl Render for ListView {
    fn to_table(&self) -> String {
        self.table()
    }
}

impl Render for PkiView {
    fn to_table(&self) -> String {
        self.table()
    }
}

impl Render for EventView {
    fn to_table(&self) -> String {
        let mut line = self.line();
        line.push('\n');
        line
    }
}

/// Prints `value` in `format`: pretty JSON for single results, one compact line per event
/// (`compact`) so a stream stays line-delimited for `jq` and friends.
pub(crate) fn emit<T: Render>(
    out: &mut dyn Write,
    format: OutputFormat,
    value: &T,
    compact: bool,
) -> std::io::Result<()> {
    match format {
        // Cells are cleaned as they are added; this also catches text a view wrote around
        // its tables. JSON keeps the text as the server sent it.
        OutputFormat::Table => out.write_all(show_hidden(&value.to_table()).as_bytes())?,
        OutputFormat::Json => {
            if compact {
                serde_json::to_writer(&mut *out, value)?;
            } else {
                serde_json::to_writer_pretty(&mut *out, value)?;
            }
            out.write_all(b"\n")?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsrelay_proto::prost_types::Timestamp;
    use dsrelay_sdk::proto::{Evidence, RequestParameters, Scope, SubjectIdentity};

    /// `get` of a contract end whose return was deleted unconfirmed says so in its header,
    /// as `contracts show` does. Before, nothing in `get` said it once the tasks ended.
    #[test]
    fn a_contract_end_deleted_without_a_confirmation_says_so() {
        let mut view = RequestView::from(&Request {
            request_id: "c-1".into(),
            kind: RequestKind::ContractEnd as i32,
            ..Default::default()
        });
        assert!(!view.to_table().contains("\nreturn"));
        let line = "not confirmed; deleted at the end of the grace period (2026-01-01T00:00:00Z)";
        view.return_unconfirmed = Some(line.into());
        let table = view.to_table();
        let row = (table.lines())
            .find(|l| l.starts_with("return "))
            .expect("the return's row");
        assert!(row.ends_with(line), "{table}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["return_unconfirmed"], line, "{json}");
    }

    /// Forgetting empties the stored scope: `get` then says the categories were forgotten,
    /// not that the request covered all of them.
    #[test]
    fn a_forgotten_requests_categories_are_not_shown_as_all() {
        let row = |r: &Request| {
            let table = RequestView::from(r).to_table();
            let row = (table.lines())
                .find(|l| l.starts_with("categories "))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "));
            row.unwrap_or_else(|| panic!("no categories row:\n{table}"))
        };
        let mut request = Request {
            request_id: "r-1".into(),
            kind: RequestKind::Erasure as i32,
            ..Default::default()
        };
        assert_eq!(row(&request), "all");
        request.scope = Some(Scope {
            data_categories: vec!["contact".into(), "billing".into()],
        });
        assert_eq!(row(&request), "contact, billing");
        let forgotten = Request {
            identities_forgotten: true,
            scope: None,
            ..request
        };
        assert_eq!(row(&forgotten), "forgotten");
    }

    /// Table output shows format characters wherever the text sits; JSON keeps them.
    #[test]
    fn table_output_shows_format_characters_and_json_keeps_them() {
        let note = "paid\u{202E}5102 ,lirpA";
        let request = Request {
            request_id: "r-\u{200B}1".into(),
            kind: RequestKind::Erasure as i32,
            note: note.into(),
            ..Default::default()
        };
        let view = RequestView::from(&request);
        let mut table = Vec::new();
        emit(&mut table, OutputFormat::Table, &view, false).expect("table");
        let table = String::from_utf8(table).expect("utf-8");
        assert!(table.contains("paid<U+202E>5102 ,lirpA"), "{table}");
        assert!(table.contains("r-<U+200B>1"), "{table}");
        assert!(
            !table.contains('\u{202E}') && !table.contains('\u{200B}'),
            "{table}"
        );
        let mut json = Vec::new();
        emit(&mut json, OutputFormat::Json, &view, false).expect("json");
        let json: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(json["note"], note);
        assert_eq!(json["request_id"], "r-\u{200B}1");
    }

    /// Every event type fits its column, so the columns after it line up whatever the type.
    #[test]
    fn event_lines_line_up_for_every_event_type() {
        let types: Vec<i32> = (0..100)
            .filter(|&v| EventType::try_from(v).is_ok())
            .collect();
        assert!(types.contains(&(EventType::CertificateStored as i32)));
        let mut starts = std::collections::BTreeMap::new();
        for ty in types {
            let event = RequestEvent {
                r#type: ty,
                request_state: RequestState::PartiallyCompleted as i32,
                processor: "payroll-bureau".into(),
                message: "done".into(),
                occurred_at: ts(1_767_225_600),
                ..Default::default()
            };
            let line = EventView::from(&event).line();
            let at = |word: &str| line.find(word).unwrap_or_else(|| panic!("{word}: {line}"));
            let columns = (
                at(" PARTIALLY_COMPLETED"),
                at(" payroll-bureau"),
                at(" done"),
            );
            starts.insert(columns, line);
        }
        assert_eq!(starts.len(), 1, "{starts:#?}");
    }

    fn ts(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    fn sample() -> Request {
        Request {
            request_id: "r-1".into(),
            partner: "spiffe://dsrelay.dev/partner/crm".into(),
            kind: RequestKind::Erasure as i32,
            state: RequestState::PartiallyCompleted as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: "maija@example.fi".into(),
                label: String::new(),
            }],
            scope: Some(Scope {
                data_categories: vec!["contact".into()],
            }),
            parameters: Some(RequestParameters::default()),
            received_at: ts(1_700_000_000),
            due_at: ts(1_702_592_000),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            deliveries: vec![Delivery {
                processor: "payroll-bureau".into(),
                state: DeliveryState::Delivered as i32,
                attempts: 2,
                last_error: "connection refused".into(),
                ..Default::default()
            }],
            tasks: vec![TaskStatus {
                processor: "payroll-bureau".into(),
                subprocessor: "netvisor".into(),
                state: TaskState::Retained as i32,
                sequence: 3,
                evidence: Some(Evidence {
                    records_affected: 4,
                    note: String::new(),
                    confirmed: true,
                    ..Default::default()
                }),
                legal_basis: "Kirjanpitolaki 2:10 §".into(),
                retain_until: ts(1_900_000_000),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_transfer_shows_its_receipt_and_a_waiting_task_its_note() {
        let mut r = sample();
        r.kind = RequestKind::Transfer as i32;
        let receipt = dsrelay_sdk::proto::TransferReceipt {
            request_id: r.request_id.clone(),
            subprocessor: "netvisor".into(),
            manifest_sha256: "ab".repeat(32),
            bytes: 1234,
            files: 2,
            received_at: ts(1_700_000_100),
            recipient: "new-bookkeeper".into(),
            signature: vec![1, 2, 3],
            key_id: format!("sha256:{}", "cd".repeat(32)),
            sender: "spiffe://dsrelay.dev/processor/payroll-bureau".into(),
        };
        r.tasks = vec![
            TaskStatus {
                processor: "payroll-bureau".into(),
                subprocessor: "netvisor".into(),
                state: TaskState::Completed as i32,
                sequence: 4,
                evidence: Some(Evidence {
                    confirmed: true,
                    transfer_receipt: Some(receipt),
                    ..Default::default()
                }),
                ..Default::default()
            },
            TaskStatus {
                processor: "payroll-bureau".into(),
                subprocessor: "newsletter".into(),
                state: TaskState::InProgress as i32,
                sequence: 3,
                evidence: Some(Evidence {
                    note: "sending 1 file(s) (90 bytes) to recipient new-bookkeeper".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ];
        let view = RequestView::from(&r);
        let text = view.table();
        assert!(text.contains("Transfer receipts\n"), "{text}");
        assert!(
            text.contains(&format!(
                "netvisor      new-bookkeeper  1234   2      {}  2023-11-14T22:15:00Z  yes     \
                 spiffe://dsrelay.dev/processor/payroll-bureau",
                "ab".repeat(32)
            )),
            "{text}"
        );
        assert!(
            text.contains("sending 1 file(s) (90 bytes) to recipient new-bookkeeper"),
            "{text}"
        );
        let v = serde_json::to_value(&view).unwrap();
        assert_eq!(
            v["tasks"][0]["transfer_receipt"]["recipient"],
            "new-bookkeeper"
        );
        assert_eq!(v["tasks"][0]["transfer_receipt"]["bytes"], 1234);
        assert_eq!(
            v["tasks"][0]["transfer_receipt"]["sender"],
            "spiffe://dsrelay.dev/processor/payroll-bureau"
        );
        assert_eq!(v["tasks"][0]["transfer_receipt"]["signature"], "AQID");
        assert_eq!(
            v["tasks"][0]["transfer_receipt"]["key_id"],
            format!("sha256:{}", "cd".repeat(32))
        );
        assert!(v["tasks"][1]["transfer_receipt"].is_null());
    }

    /// What the operator must do is the note of a task waiting for one, as `trace` shows it.
    #[test]
    fn a_task_waiting_for_an_operator_shows_its_note() {
        let mut r = sample();
        r.tasks = vec![TaskStatus {
            processor: "payroll-bureau".into(),
            subprocessor: "archive".into(),
            state: TaskState::WaitingForOperator as i32,
            sequence: 2,
            evidence: Some(Evidence {
                note: "shred the paper file in cabinet B2".into(),
                ..Default::default()
            }),
            ..Default::default()
        }];
        let text = RequestView::from(&r).table();
        let row = (text.lines())
            .find(|l| l.contains("WAITING_FOR_OPERATOR"))
            .expect("the task's row");
        assert!(
            row.ends_with("shred the paper file in cabinet B2"),
            "{text}"
        );
    }

    #[test]
    fn json_uses_short_enum_names_and_rfc3339() {
        let v = serde_json::to_value(RequestView::from(&sample())).unwrap();
        assert_eq!(v["kind"], "ERASURE");
        assert_eq!(v["state"], "PARTIALLY_COMPLETED");
        assert_eq!(v["received_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["deliveries"][0]["state"], "DELIVERED");
        assert_eq!(v["tasks"][0]["state"], "RETAINED");
        assert_eq!(v["tasks"][0]["records_affected"], 4);
        assert_eq!(v["identities"][0]["type"], "EMAIL");
        assert_eq!(v["identities"][0]["value"], "maija@example.fi");
    }

    #[test]
    fn a_contract_end_names_the_operator_who_ended_it_as_such() {
        let text = RequestView::from(&sample()).table();
        assert!(
            text.contains("partner     spiffe://dsrelay.dev/partner/crm\n"),
            "{text}"
        );
        let contract_end = Request {
            partner: "ops".into(),
            kind: RequestKind::ContractEnd as i32,
            ..sample()
        };
        let text = RequestView::from(&contract_end).table();
        assert!(text.contains("operator    ops\n"), "{text}");
        assert!(!text.contains("partner"), "{text}");
    }

    #[test]
    fn table_shows_header_deliveries_and_tasks_without_identity_values() {
        let text = RequestView::from(&sample()).table();
        assert!(text.contains("state       PARTIALLY_COMPLETED\n"), "{text}");
        assert!(text.contains("identities  EMAIL\n"), "{text}");
        assert!(!text.contains("maija"), "{text}");
        assert!(
            text.contains("payroll-bureau  DELIVERED  2         -     connection refused"),
            "{text}"
        );
        assert!(
            text.contains(
                "netvisor      RETAINED  3    4        kept under Kirjanpitolaki 2:10 §; \
                 next erasure run 2030-03-17T17:46:40Z"
            ),
            "{text}"
        );
        assert!(!text.contains("until"), "{text}");
    }

    /// A finished task shows what its holder said it did, as one still at work shows what it
    /// waits for; before, a COMPLETED manual task's evidence ("shredded folder 17") showed in
    /// `trace` and the JSON only, its detail `-`.
    #[test]
    fn a_finished_task_shows_its_evidence_note() {
        let mut request = sample();
        request.tasks = vec![TaskStatus {
            processor: "payroll-bureau".into(),
            subprocessor: "archive".into(),
            state: TaskState::Completed as i32,
            sequence: 4,
            evidence: Some(Evidence {
                records_affected: 1,
                note: "shredded folder 17".into(),
                ..Default::default()
            }),
            ..Default::default()
        }];
        let text = RequestView::from(&request).table();
        assert!(
            text.contains("archive       COMPLETED  4    1        shredded folder 17\n"),
            "{text}"
        );
    }

    /// A cancellation the processor has not taken shows under the deliveries, with why;
    /// before, only the Deliver showed, DELIVERED, as if the processor had all it was sent.
    #[test]
    fn calls_that_follow_show_with_what_they_carry() {
        let mut request = sample();
        assert!(!RequestView::from(&request)
            .table()
            .contains("Calls that follow"));
        request.follow_up_deliveries = vec![Delivery {
            processor: "payroll-bureau".into(),
            operation: "cancel".into(),
            state: DeliveryState::Pending as i32,
            attempts: 3,
            last_error: "Unavailable: connection refused".into(),
            next_attempt_at: ts(1_700_000_000),
            ..Default::default()
        }];
        let text = RequestView::from(&request).table();
        assert!(
            text.contains(
                "\nCalls that follow\n\
                 PROCESSOR       CALL                       STATE    ATTEMPTS  \
                 WHEN                       LAST ERROR\n\
                 payroll-bureau  cancel (its cancellation)  PENDING  3         \
                 next 2023-11-14T22:13:20Z  Unavailable: connection refused\n\nTasks\n"
            ),
            "{text}"
        );
        // One waiting for its Deliver says so, and when it was dead-lettered shows too.
        request.follow_up_deliveries[0].operation = "extend".into();
        request.follow_up_deliveries[0].behind_deliver = true;
        request.follow_up_deliveries[0].next_attempt_at = None;
        request.deliveries[0].state = DeliveryState::DeadLettered as i32;
        request.deliveries[0].dead_lettered_at = ts(1_700_000_000);
        let text = RequestView::from(&request).table();
        assert!(
            text.contains("DEAD_LETTERED  2         dead-lettered 2023-11-14T22:13:20Z"),
            "{text}"
        );
        assert!(
            text.contains("extend (its due date)  PENDING (after the deliver)  3  "),
            "{text}"
        );
        let json = serde_json::to_value(RequestView::from(&request)).unwrap();
        assert_eq!(json["follow_up_deliveries"][0]["operation"], "extend");
        assert_eq!(json["follow_up_deliveries"][0]["behind_deliver"], true);
    }

    #[test]
    fn unknown_enum_values_and_bad_timestamps_do_not_fail() {
        assert_eq!(kind_name(99), "UNKNOWN(99)");
        assert_eq!(state_name(0), "UNSPECIFIED");
        let bad = Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(Time::from_proto(Some(&bad)), None);
    }

    #[test]
    fn event_line() {
        let e = RequestEvent {
            event_id: 7,
            request_id: "r-1".into(),
            r#type: EventType::TaskUpdated as i32,
            occurred_at: ts(1_700_000_000),
            request_state: RequestState::InProgress as i32,
            processor: "payroll-bureau".into(),
            task: Some(TaskStatus {
                processor: "payroll-bureau".into(),
                subprocessor: "netvisor".into(),
                state: TaskState::Completed as i32,
                ..Default::default()
            }),
            message: "erased".into(),
            attempt: 0,
            ..Default::default()
        };
        assert_eq!(
            EventView::from(&e).line(),
            "2023-11-14T22:13:20Z  TASK_UPDATED              IN_PROGRESS          \
             payroll-bureau/netvisor         erased [task COMPLETED]"
        );
    }

    /// A RETAINED task's date is when the holder's erasure runs again, not when the
    /// retention ends.
    #[test]
    fn a_retained_event_names_the_next_erasure_run() {
        let e = RequestEvent {
            r#type: EventType::TaskUpdated as i32,
            occurred_at: ts(1_700_000_000),
            request_state: RequestState::InProgress as i32,
            processor: "payroll-bureau".into(),
            task: sample().tasks.pop(),
            ..Default::default()
        };
        assert_eq!(
            EventView::from(&e).line(),
            "2023-11-14T22:13:20Z  TASK_UPDATED              IN_PROGRESS          \
             payroll-bureau/netvisor         task RETAINED (kept under Kirjanpitolaki 2:10 §; \
             next erasure run 2030-03-17T17:46:40Z)"
        );
    }

    /// A date passed is a run under way (or due), not one to come: a task IN_PROGRESS keeps
    /// the date of the run it accepted until the holder confirms it.
    #[test]
    fn a_retention_date_in_the_past_awaits_the_holders_confirmation() {
        let now = DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let basis = "Kirjanpitolaki 2:10 §";
        assert_eq!(
            retention_words_at(basis, "2029-12-31T00:00:00Z", now),
            "kept under Kirjanpitolaki 2:10 §; erasure run of 2029-12-31T00:00:00Z, awaiting \
             the holder's confirmation"
        );
        assert_eq!(
            retention_words_at(basis, "2030-01-02T00:00:00Z", now),
            "kept under Kirjanpitolaki 2:10 §; next erasure run 2030-01-02T00:00:00Z"
        );
        assert_eq!(retention_words_at("", "", now), "");
        assert_eq!(
            erasure_run_cell_at("2029-12-31T00:00:00Z", now),
            "2029-12-31T00:00:00Z, awaiting the holder's confirmation"
        );
        assert_eq!(
            erasure_run_cell_at("2030-01-02T00:00:00Z", now),
            "2030-01-02T00:00:00Z"
        );
        assert_eq!(erasure_run_cell_at("", now), "");
    }

    /// A PART_STORED event names the task whose part was stored, which has no state.
    #[test]
    fn a_stored_part_shows_whose_it_is_without_a_task_state() {
        let e = RequestEvent {
            r#type: EventType::PartStored as i32,
            occurred_at: ts(1_700_000_000),
            request_state: RequestState::InProgress as i32,
            processor: "payroll-bureau".into(),
            task: Some(TaskStatus {
                processor: "payroll-bureau".into(),
                subprocessor: "netvisor".into(),
                ..Default::default()
            }),
            message: "part of netvisor stored: 2 file(s), 90 bytes".into(),
            ..Default::default()
        };
        assert_eq!(
            EventView::from(&e).line(),
            "2023-11-14T22:13:20Z  PART_STORED               IN_PROGRESS          \
             payroll-bureau/netvisor         part of netvisor stored: 2 file(s), 90 bytes"
        );
    }

    /// A request answered after its due date says so, with when, once `overdue` is no
    /// longer set, in `get` and in `list`'s JSON; one answered in time says that. Before,
    /// an answered request showed `overdue no` and no time at all.
    #[test]
    fn a_late_answer_shows_once_the_request_is_no_longer_overdue() {
        let late = Request {
            state: RequestState::Completed as i32,
            due_at: ts(1_700_000_000),
            answered_at: ts(1_700_000_000 + 3 * 86_400 + 3_600),
            answered_late: true,
            finished_at: ts(1_700_000_000 + 3 * 86_400 + 3_600),
            ..sample()
        };
        let text = RequestView::from(&late).table();
        assert!(text.contains("overdue     no\n"), "{text}");
        assert!(
            text.contains(
                "answered    2023-11-17T23:13:20Z (3 days after the due date)\n\
                 finished    2023-11-17T23:13:20Z\n"
            ),
            "{text}"
        );
        let list = ListView {
            requests: vec![RequestView::from(&late)],
            next_page_token: String::new(),
        };
        let json = serde_json::to_value(&list).unwrap();
        assert_eq!(json["requests"][0]["answered_late"], true, "{json:#}");
        assert_eq!(json["requests"][0]["answered_at"], "2023-11-17T23:13:20Z");
        assert_eq!(json["requests"][0]["finished_at"], "2023-11-17T23:13:20Z");

        // An hour late; answered in time and finished years later by a retention run.
        let hour = Request {
            answered_at: ts(1_700_000_000 + 3_600),
            ..late.clone()
        };
        let text = RequestView::from(&hour).table();
        assert!(text.contains("(1 hour after the due date)\n"), "{text}");
        let in_time = Request {
            answered_at: ts(1_699_000_000),
            answered_late: false,
            finished_at: ts(1_900_000_000),
            ..late
        };
        let text = RequestView::from(&in_time).table();
        assert!(
            text.contains(
                "answered    2023-11-03T08:26:40Z (by the due date)\n\
                 finished    2030-03-17T17:46:40Z\n"
            ),
            "{text}"
        );
        // Not answered, not finished: no rows, and JSON says so.
        let text = RequestView::from(&sample()).table();
        assert!(!text.contains("answered"), "{text}");
        assert!(!text.contains("finished"), "{text}");
        let json = serde_json::to_value(RequestView::from(&sample())).unwrap();
        assert_eq!(json["answered_late"], false);
        assert!(json["finished_at"].is_null());
    }

    #[test]
    fn spans_read_in_their_largest_whole_unit() {
        assert_eq!(span(3 * 86_400_000 + 5), "3 days");
        assert_eq!(span(86_400_000), "1 day");
        assert_eq!(span(2 * 3_600_000 + 59_000), "2 hours");
        assert_eq!(span(60_000), "1 minute");
        assert_eq!(span(1_500), "1 second");
        assert_eq!(span(999), "less than a second");
    }

    /// `get` gives the registry's last failed status check of each processor the request is
    /// routed to, as `dsrctl chain` and `contracts show` do: a processor that is down sends
    /// no report, and the tasks alone show its last one as if it stood ("accepted by the
    /// holder, awaiting its confirmation"). Before, `get` gave no sign of it.
    #[test]
    fn get_gives_the_routed_processors_failed_status_checks() {
        use dsrelay_sdk::proto::ChainProcessor;
        let failed = |name: &str, why: &str| ChainProcessor {
            name: name.into(),
            status_check_error: why.into(),
            status_check_failed_at: ts(1_767_225_600),
            ..Default::default()
        };
        let chain = Chain {
            processors: vec![
                failed("elsewhere", "request r-9: Unavailable: not routed here"),
                failed(
                    "payroll-bureau",
                    "request r-1: Unavailable: tcp connect error: Connection refused",
                ),
            ],
        };
        let request = sample();
        let mut view = RequestView::from(&request);
        assert!(!view.table().contains("status check"));
        view.processor_status_checks = ProcessorCheckView::of_request(&chain, &request);
        let text = view.table();
        assert!(
            text.contains(
                "state                   PARTIALLY_COMPLETED\n\
                 processor status check  payroll-bureau: failed at 2026-01-01T00:00:00Z: \
                 request r-1: Unavailable: tcp connect error: Connection refused\n"
            ),
            "{text}"
        );
        assert!(!text.contains("not routed here"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        let checks = &json["processor_status_checks"];
        assert_eq!(checks.as_array().map(Vec::len), Some(1), "{json:#}");
        assert_eq!(checks[0]["processor"], "payroll-bureau");
        assert_eq!(checks[0]["failed_at"], "2026-01-01T00:00:00Z");
        // One that answered since: nothing.
        let mut answered = chain;
        answered.processors[1].status_check_error.clear();
        assert!(ProcessorCheckView::of_request(&answered, &request).is_empty());
        let json = serde_json::to_value(RequestView::from(&request)).unwrap();
        assert!(json.get("processor_status_checks").is_none());
    }
}
