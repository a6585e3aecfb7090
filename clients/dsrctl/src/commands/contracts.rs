//! `dsrctl contracts`: operators end a contract with a processor, follow it (a table, or live
//! progress bars per subprocessor), make the deferred choice, confirm the returned package,
//! and see what a processor has scheduled.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use dsrelay_sdk::proto::processor_operator_service_client::ProcessorOperatorServiceClient;
#[cfg(test)]
use dsrelay_sdk::proto::Chain;
use dsrelay_sdk::proto::{
    Contract, ContractEnd, ContractEndChoice, ContractPhase, GetChainRequest,
    ListContractEndsRequest, ProcessorContractEnd, RequestState, TaskState, TaskStatus,
};
use dsrelay_sdk::{ConnectionSettings, EffectiveAt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cli::{ChosenArg, ContractChoiceArg, ContractsCommand};
use crate::commands::{Hint, Io, Registry};
use crate::output::{
    calls_table, emit, erasure_run_cell, state_name, task_state_name, DeliveryView, Render,
    StatusCheckView, Time,
};
use crate::table::{clean, clipped, Table};
use crate::Failure;

/// How often `show --watch` asks the registry.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The longest wait of `show --watch` between attempts to reach a registry it cannot reach:
/// the waits double from [`WATCH_INTERVAL`] up to this, so that a watch through a grace
/// period of months outlasts any restart without calling a registry that is down every
/// second.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(60);

/// The wait before the next attempt after `failed` polls in a row could not reach the
/// registry.
fn reconnect_wait(failed: u32) -> Duration {
    let doubled = WATCH_INTERVAL.saturating_mul(1 << failed.saturating_sub(1).min(16));
    doubled.min(MAX_RECONNECT_WAIT)
}

/// How many characters of a part's reason the table shows: a connector's reason names
/// the table and the GRANT it needs within a few hundred, and a registry keeps up to 4096
/// bytes, which `--output json` shows whole.
const REASON_CHARS: usize = 400;

fn choice(c: ContractChoiceArg) -> ContractEndChoice {
    match c {
        ContractChoiceArg::Delete => ContractEndChoice::Delete,
        ContractChoiceArg::ReturnThenDelete => ContractEndChoice::ReturnThenDelete,
        ContractChoiceArg::None => ContractEndChoice::None,
    }
}

/// The choice `contracts choose` sends: NONE is what it replaces, so it takes no `none`.
fn chosen(c: ChosenArg) -> ContractEndChoice {
    match c {
        ChosenArg::Delete => ContractEndChoice::Delete,
        ChosenArg::ReturnThenDelete => ContractEndChoice::ReturnThenDelete,
    }
}

pub(crate) fn choice_name(v: i32) -> String {
    ContractEndChoice::try_from(v)
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("CONTRACT_END_CHOICE_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("UNKNOWN({v})"))
}

fn phase_name(v: i32) -> String {
    ContractPhase::try_from(v)
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("CONTRACT_PHASE_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("UNKNOWN({v})"))
}

/// `done/total`; `done/unknown` for a total the holder could not count (sent as 0), the one
/// form every view gives it (JSON: `null`).
fn count(done: u64, total: u64) -> String {
    if total == 0 {
        format!("{done}/unknown")
    } else {
        format!("{done}/{total}")
    }
}

/// A count's total in JSON: `null` when unknown (sent as 0).
fn total_or_null<S: serde::Serializer>(total: &u64, s: S) -> Result<S::Ok, S::Error> {
    match total {
        0 => s.serialize_none(),
        n => s.serialize_some(n),
    }
}

/// The terms as shown.
#[derive(Debug, Serialize)]
struct TermsView {
    choice: String,
    effective_at: Option<Time>,
    grace_ends_at: Option<Time>,
    return_confirmed: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    transfer_recipient: String,
}

impl From<Option<&ContractEnd>> for TermsView {
    fn from(t: Option<&ContractEnd>) -> Self {
        let t = t.cloned().unwrap_or_default();
        Self {
            choice: choice_name(t.choice),
            effective_at: Time::from_proto(t.effective_at.as_ref()),
            grace_ends_at: Time::from_proto(t.grace_ends_at.as_ref()),
            return_confirmed: t.return_confirmed,
            transfer_recipient: t.transfer_recipient,
        }
    }
}

/// One subprocessor's part of a contract end.
#[derive(Debug, Serialize)]
struct PartView {
    processor: String,
    subprocessor: String,
    state: String,
    /// The part's current phase, for every part: for one that ended before DONE (cancelled,
    /// failed, refused), the phase it stopped in.
    phase: Option<String>,
    /// Whether it ended before DONE: its phase is where it stopped, and nothing is scheduled.
    #[serde(skip)]
    stopped: bool,
    subjects_done: u64,
    #[serde(serialize_with = "total_or_null")]
    subjects_total: u64,
    /// Records handled in the phase: while DELETING and at DONE, whatever the erasure did
    /// with each (deleted, anonymized or kept), so not a count of records erased.
    records_done: u64,
    #[serde(serialize_with = "total_or_null")]
    records_total: u64,
    /// The part was RETAINED: some of its records are kept.
    #[serde(skip)]
    kept: bool,
    /// The part is at DELETING or DONE, where the records counted are those handled.
    #[serde(skip)]
    erasing: bool,
    scheduled_at: Option<Time>,
    retain_until: Option<Time>,
    /// Why the part failed or was refused, as the processor said it.
    #[serde(skip_serializing_if = "String::is_empty")]
    reason: String,
    /// The transfer recipient's receipt for this part, when the data went to one.
    #[serde(skip_serializing_if = "Option::is_none")]
    receipt: Option<ReceiptView>,
}

/// A transfer recipient's receipt for one part, as shown.
#[derive(Debug, Serialize)]
struct ReceiptView {
    recipient: String,
    /// The certificate identity of the processor that sent the part, as the recipient saw
    /// it; empty when the recipient did not name it.
    sender: String,
    manifest_sha256: String,
    bytes: u64,
    received_at: Option<Time>,
}

impl From<&TaskStatus> for PartView {
    fn from(t: &TaskStatus) -> Self {
        let p = t.progress.unwrap_or_default();
        let stopped = matches!(
            TaskState::try_from(t.state),
            Ok(TaskState::Cancelled | TaskState::Failed | TaskState::Refused)
        );
        let erasing = t.progress.is_some_and(|p| {
            p.phase == ContractPhase::Deleting as i32 || p.phase == ContractPhase::Done as i32
        });
        Self {
            processor: t.processor.clone(),
            subprocessor: t.subprocessor.clone(),
            state: task_state_name(t.state),
            phase: t.progress.map(|p| phase_name(p.phase)),
            stopped,
            subjects_done: p.subjects_done,
            subjects_total: p.subjects_total,
            records_done: p.records_done,
            records_total: p.records_total,
            kept: TaskState::try_from(t.state) == Ok(TaskState::Retained),
            erasing: erasing && !stopped,
            // A processor that predates leaving the date out of an ended task still sends it.
            scheduled_at: Time::from_proto(p.scheduled_at.as_ref()).filter(|_| !stopped),
            retain_until: Time::from_proto(t.retain_until.as_ref()),
            reason: t.reason.clone(),
            receipt: t
                .evidence
                .as_ref()
                .and_then(|e| e.transfer_receipt.as_ref())
                .map(|r| ReceiptView {
                    recipient: r.recipient.clone(),
                    sender: r.sender.clone(),
                    manifest_sha256: r.manifest_sha256.clone(),
                    bytes: r.bytes,
                    received_at: Time::from_proto(r.received_at.as_ref()),
                }),
        }
    }
}

impl PartView {
    /// The records for a table cell: done of the total; while erasing, `handled` (a holder's
    /// erasure counts every record it went through, the ones it kept too), and for a part
    /// RETAINED `some kept` (its deletion certificate says what was done where).
    fn records(&self) -> String {
        let n = count(self.records_done, self.records_total);
        match (self.erasing, self.kept) {
            (false, _) => n,
            (true, false) => format!("{n} handled"),
            (true, true) => format!("{n} handled, some kept"),
        }
    }

    /// The phase for a table cell: the state for a part without one; for a part that
    /// ended before DONE, where it stopped (`not started` for one still SCHEDULED).
    fn phase_cell(&self) -> String {
        match (&self.phase, self.stopped) {
            (None, _) => self.state.clone(),
            (Some(p), true) if p == "SCHEDULED" => "not started".into(),
            (Some(p), true) => format!("stopped in {p}"),
            (Some(p), false) => p.clone(),
        }
    }

    /// A progress bar's words: `subjects 10/40; records 25/100; DELETING`, the counts as the
    /// tables give them.
    fn bar_message(&self) -> String {
        format!(
            "subjects {}; records {}; {}",
            count(self.subjects_done, self.subjects_total),
            self.records(),
            self.status()
        )
    }

    /// The phase, or for a part that ended before DONE its state and where it stopped
    /// (`CANCELLED (not started)`).
    fn status(&self) -> String {
        if self.stopped {
            format!("{} ({})", self.state, self.phase_cell())
        } else {
            self.phase_cell()
        }
    }

    /// `accounting DELETING 10/40 subjects, records 25/100 handled`, for a table cell;
    /// `accounting CANCELLED (not started)` for a part that ended before DONE.
    fn summary(&self) -> String {
        if self.stopped {
            return format!("{} {}", self.subprocessor, self.status());
        }
        let phase = self.phase_cell();
        let mut s = format!(
            "{} {phase} {} subjects",
            self.subprocessor,
            count(self.subjects_done, self.subjects_total)
        );
        if self.erasing {
            s.push_str(&format!(", records {}", self.records()));
        }
        if let Some(at) = self.scheduled_at {
            s.push_str(&format!(" at {at}"));
        }
        s
    }
}

/// A contract end as shown.
#[derive(Debug, Serialize)]
struct ContractView {
    contract_id: String,
    processor: String,
    #[serde(flatten)]
    terms: TermsView,
    state: String,
    created_at: Option<Time>,
    updated_at: Option<Time>,
    trace_id: String,
    deduplicated: bool,
    /// The processor's answer when it refused the terms as they stand.
    #[serde(skip_serializing_if = "String::is_empty")]
    terms_refused: String,
    /// The key dsrctl chose, shown so a retry can reuse it.
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<String>,
    tasks: Vec<PartView>,
    /// The registry's calls to the processor: its Deliver, then the terms as they stand, a
    /// cancellation, a due date. Until one is DELIVERED the processor works under what it
    /// was sent before. Empty in a listing, which the registry gives without them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deliveries: Vec<DeliveryView>,
    /// Set when the processor deleted (or is deleting) returned data that was never
    /// confirmed: what [`unconfirmed_return`] says.
    #[serde(skip_serializing_if = "Option::is_none")]
    return_unconfirmed: Option<String>,
    /// The registry's last failed status check of the processor (GetChain), while none
    /// answered since: set by `show` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    processor_status_check: Option<StatusCheckView>,
}

/// The words on a contract end whose returned data the processor deleted, or began to,
/// with no confirmation: `not confirmed; deleted at the end of the grace period (T)`, naming
/// the subprocessors when not all of them got there. `None` unless the terms are RETURN_THEN_DELETE, no
/// confirmation is recorded, the processor has not refused the terms (a refused choice may
/// mean it deleted at the grace end with nothing returned) and a part reached DELETING or
/// DONE. Those together allow no other reading: the processor deletes returned data only
/// on a confirmation it got from the registry, or, without one, once the grace period ends.
pub(crate) fn unconfirmed_return(c: &Contract) -> Option<String> {
    let terms = c.contract_end.as_ref()?;
    if terms.choice != ContractEndChoice::ReturnThenDelete as i32
        || terms.return_confirmed
        || !c.terms_refused.is_empty()
    {
        return None;
    }
    let deleting: Vec<PartView> = (c.tasks.iter())
        .filter(|t| {
            t.progress.is_some_and(|p| {
                p.phase == ContractPhase::Deleting as i32 || p.phase == ContractPhase::Done as i32
            })
        })
        .map(PartView::from)
        .collect();
    if deleting.is_empty() {
        return None;
    }
    // DONE and not stopped: COMPLETED, or RETAINED with what the law keeps.
    let done = (deleting.iter()).all(|p| p.phase.as_deref() == Some("DONE") && !p.stopped);
    let what = if done { "deleted" } else { "deletion started" };
    let when = cell(Time::from_proto(terms.grace_ends_at.as_ref()));
    let mut line = format!("not confirmed; {what} at the end of the grace period ({when})");
    if deleting.len() < c.tasks.len() {
        let names: Vec<&str> = deleting.iter().map(|p| p.subprocessor.as_str()).collect();
        line.push_str(&format!(": {}", names.join(", ")));
    }
    Some(line)
}

impl From<&Contract> for ContractView {
    fn from(c: &Contract) -> Self {
        Self {
            contract_id: c.contract_id.clone(),
            processor: c.processor.clone(),
            terms: TermsView::from(c.contract_end.as_ref()),
            state: state_name(c.state),
            created_at: Time::from_proto(c.created_at.as_ref()),
            updated_at: Time::from_proto(c.updated_at.as_ref()),
            trace_id: c.trace_id.clone(),
            deduplicated: c.deduplicated,
            terms_refused: c.terms_refused.clone(),
            idempotency_key: None,
            tasks: c.tasks.iter().map(PartView::from).collect(),
            deliveries: c.deliveries.iter().map(DeliveryView::from).collect(),
            return_unconfirmed: unconfirmed_return(c),
            processor_status_check: None,
        }
    }
}

fn cell(t: Option<Time>) -> String {
    t.map(|t| t.to_string()).unwrap_or_default()
}

/// The rows a contract end's table starts with: which one, and its terms.
fn terms_table(contract_id: &str, processor: &str, terms: &TermsView) -> Table {
    let mut t = Table::headless();
    t.row(["contract", &clean(contract_id)]);
    t.row(["processor", &clean(processor)]);
    t.row(["choice", &terms.choice]);
    t.row(["effective", &cell(terms.effective_at)]);
    t.row(["grace ends", &cell(terms.grace_ends_at)]);
    if !terms.transfer_recipient.is_empty() {
        t.row(["returned to", &clean(&terms.transfer_recipient)]);
    }
    t
}

impl Render for ContractView {
    fn to_table(&self) -> String {
        let mut t = terms_table(&self.contract_id, &self.processor, &self.terms);
        t.row(["return confirmed", &self.terms.return_confirmed.to_string()]);
        // Once the parts are COMPLETED or RETAINED their reasons are the outcome's: only
        // this still says the data went without a confirmation.
        if let Some(r) = &self.return_unconfirmed {
            t.row(["return", &clean(r)]);
        }
        if !self.terms_refused.is_empty() {
            t.row(["refused by the processor", &clean(&self.terms_refused)]);
        }
        t.row(["state", &self.state]);
        // The parts show the processor's last report, which a processor that is down does
        // not update: this is the registry's sign that it no longer answers.
        if let Some(check) = &self.processor_status_check {
            t.row(["processor status check".to_string(), check.cell()]);
        }
        t.row(["created", &cell(self.created_at)]);
        t.row(["trace", &clean(&self.trace_id)]);
        if self.deduplicated {
            t.row(["deduplicated", "true"]);
        }
        if let Some(k) = &self.idempotency_key {
            t.row(["idempotency key", &clean(k)]);
        }
        let mut out = t.render();
        if !self.tasks.is_empty() {
            let mut parts = Table::new([
                "SUBPROCESSOR",
                "STATE",
                "PHASE",
                "SUBJECTS",
                "RECORDS",
                "SCHEDULED",
                // The processor erases what was released then and, while anything is still
                // kept, reports RETAINED again with the following date.
                "NEXT ERASURE RUN",
            ]);
            for p in &self.tasks {
                parts.row([
                    clean(&p.subprocessor),
                    p.state.clone(),
                    p.phase.as_ref().map(|_| p.phase_cell()).unwrap_or_default(),
                    count(p.subjects_done, p.subjects_total),
                    p.records(),
                    cell(p.scheduled_at),
                    erasure_run_cell(&cell(p.retain_until)),
                ]);
            }
            out.push('\n');
            out.push_str(&parts.render());
            let reasons: Vec<&PartView> =
                self.tasks.iter().filter(|p| !p.reason.is_empty()).collect();
            if !reasons.is_empty() {
                out.push('\n');
            }
            for p in reasons {
                out.push_str(&format!(
                    "{}: {}\n",
                    clean(&p.subprocessor),
                    clean(&clipped(&p.reason, REASON_CHARS))
                ));
            }
            let receipts: Vec<&PartView> =
                self.tasks.iter().filter(|p| p.receipt.is_some()).collect();
            if !receipts.is_empty() {
                let mut table = Table::new([
                    "SUBPROCESSOR",
                    "RECIPIENT",
                    "MANIFEST SHA-256",
                    "BYTES",
                    "RECEIVED",
                    "SENDER",
                ]);
                for p in receipts {
                    let Some(r) = &p.receipt else { continue };
                    table.row([
                        clean(&p.subprocessor),
                        clean(&r.recipient),
                        clean(&r.manifest_sha256),
                        r.bytes.to_string(),
                        cell(r.received_at),
                        clean(&r.sender),
                    ]);
                }
                out.push('\n');
                out.push_str(&table.render());
            }
        }
        // Shown while one has not got through: what the parts show is then what the
        // processor does under what it was sent before.
        if (self.deliveries.iter()).any(|d| d.state != "DELIVERED") {
            out.push('\n');
            out.push_str(&calls_table(&self.deliveries));
        }
        out
    }
}

/// What `contracts choose` prints: the contract end as the registry holds it once the choice
/// is stored, but not its parts. What the registry holds of them is the processor's last
/// report, made under the terms before the choice: parts SCHEDULED for the end of the grace
/// period, which the processor moves to the new start once it has the choice (or refuses
/// it, too late there), so no part shown here could be trusted.
#[derive(Debug, Serialize)]
struct ChosenView {
    contract_id: String,
    processor: String,
    #[serde(flatten)]
    terms: TermsView,
    state: String,
    updated_at: Option<Time>,
    trace_id: String,
    /// Where the parts are, in place of them: for the table only, JSON leaves the parts out.
    #[serde(skip)]
    parts: String,
}

impl ChosenView {
    fn new(c: &Contract, hint: &Hint) -> Self {
        Self {
            contract_id: c.contract_id.clone(),
            processor: c.processor.clone(),
            terms: TermsView::from(c.contract_end.as_ref()),
            state: state_name(c.state),
            updated_at: Time::from_proto(c.updated_at.as_ref()),
            trace_id: c.trace_id.clone(),
            parts: format!(
                "the processor moves each subprocessor's part to the new start once it has the \
                 choice, or refuses it for a part already started; {} shows them once it has \
                 reported (--watch follows them)",
                hint.command(&["contracts", "show", &c.contract_id])
            ),
        }
    }
}

impl Render for ChosenView {
    fn to_table(&self) -> String {
        let mut t = terms_table(&self.contract_id, &self.processor, &self.terms);
        t.row(["state", &self.state]);
        t.row(["trace", &clean(&self.trace_id)]);
        format!("{}\n{}\n", t.render(), clean(&self.parts))
    }
}

#[derive(Debug, Serialize)]
struct ContractListView {
    contracts: Vec<ContractView>,
}

impl Render for ContractListView {
    fn to_table(&self) -> String {
        if self.contracts.is_empty() {
            return "no contract ends\n".into();
        }
        let mut t = Table::new([
            "ID",
            "PROCESSOR",
            "CHOICE",
            "EFFECTIVE",
            "GRACE ENDS",
            "STATE",
            "SUBPROCESSORS",
        ]);
        let mut refused = false;
        for c in &self.contracts {
            let parts: Vec<String> = c.tasks.iter().map(PartView::summary).collect();
            // The choice the table shows is the one asked for, which a processor that
            // refused it does not carry out: the state alone reads as if it did.
            let choice = if c.terms_refused.is_empty() {
                c.terms.choice.clone()
            } else {
                refused = true;
                format!("{} {REFUSED_MARK}", c.terms.choice)
            };
            t.row([
                clean(&c.contract_id),
                clean(&c.processor),
                choice,
                cell(c.terms.effective_at),
                cell(c.terms.grace_ends_at),
                c.state.clone(),
                clean(&parts.join("; ")),
            ]);
        }
        let mut out = t.render();
        if refused {
            out.push_str(&format!(
                "\n{REFUSED_MARK}: the choice was refused by the processor; `dsrctl contracts \
                 show ID` says why\n"
            ));
        }
        out
    }
}

/// What `contracts list` adds to a choice the processor refused (`terms_refused`).
const REFUSED_MARK: &str = "(refused)";

/// A contract end as the processor holds it.
#[derive(Debug, Serialize)]
struct ScheduledView {
    controller: String,
    request_id: String,
    #[serde(flatten)]
    terms: TermsView,
    received_at: Option<Time>,
    tasks: Vec<PartView>,
}

impl From<&ProcessorContractEnd> for ScheduledView {
    fn from(c: &ProcessorContractEnd) -> Self {
        Self {
            controller: c.controller.clone(),
            request_id: c.request_id.clone(),
            terms: TermsView::from(c.contract_end.as_ref()),
            received_at: Time::from_proto(c.received_at.as_ref()),
            tasks: c.tasks.iter().map(PartView::from).collect(),
        }
    }
}

#[derive(Debug, Serialize)]
struct ScheduledListView {
    contract_ends: Vec<ScheduledView>,
}

impl Render for ScheduledListView {
    fn to_table(&self) -> String {
        if self.contract_ends.is_empty() {
            return "no contract ends at this processor\n".into();
        }
        let mut t = Table::new([
            "CONTROLLER",
            "REQUEST",
            "CHOICE",
            "EFFECTIVE",
            "GRACE ENDS",
            "SUBPROCESSOR",
            "STATE",
            "PHASE",
            "SCHEDULED",
            "SUBJECTS",
            "RECORDS",
        ]);
        for c in &self.contract_ends {
            for p in &c.tasks {
                t.row([
                    clean(&c.controller),
                    clean(&c.request_id),
                    c.terms.choice.clone(),
                    cell(c.terms.effective_at),
                    cell(c.terms.grace_ends_at),
                    clean(&p.subprocessor),
                    p.state.clone(),
                    p.phase_cell(),
                    cell(p.scheduled_at),
                    count(p.subjects_done, p.subjects_total),
                    p.records(),
                ]);
            }
        }
        t.render()
    }
}

/// The SHA-256 of `dir/manifest.json`, once every file it lists is checked again: the
/// processor deletes the data on this confirmation, so a folder missing a file, or holding
/// one changed since, must not give it.
fn manifest_digest(dir: &Path, id: &str, hint: &Hint) -> Result<String, Failure> {
    let download = hint.command(&["download", id, "--out", "DIR"]);
    let path = dir.join(crate::unpack::MANIFEST_NAME);
    // Its manifest.json missing is a file of the package missing, as any other is.
    let bytes = std::fs::read(&path).map_err(|e| {
        Failure::Package(anyhow::anyhow!(
            "--package {}: cannot read {} ({e}), which dsrctl download --out writes once \
             every file verified; download the package there first ({download})",
            dir.display(),
            path.display()
        ))
    })?;
    // Another request's package would be refused by the registry only as a digest that
    // differs; say which it is.
    if let Some(theirs) = crate::unpack::manifest_request_id(&bytes).filter(|r| r != id) {
        return Err(Failure::Usage(format!(
            "--package {} holds the package of request {theirs}, not of contract end {id}: \
             download {id}'s package ({download}) and confirm with that",
            dir.display()
        )));
    }
    crate::unpack::check_folder(dir, &bytes).map_err(|problems| {
        Failure::Package(anyhow::anyhow!(
            "--package {} is not the package its manifest lists, so the return is not \
             confirmed: {problems}; download the package again into a new folder \
             ({download})",
            dir.display()
        ))
    })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// What is wrong with confirming the return of contract end `id` (terms `terms`) with a
/// package (`package`: `--package` or `--manifest-sha256` given) or without, in the user's
/// words; `None` when it matches the terms, or when the terms return nothing to confirm
/// (the registry's answer says why).
fn confirm_mismatch(id: &str, terms: &ContractEnd, package: bool, hint: &Hint) -> Option<String> {
    if terms.choice != ContractEndChoice::ReturnThenDelete as i32 {
        return None;
    }
    let recipient = clean(&terms.transfer_recipient);
    match (recipient.is_empty(), package) {
        (false, true) => Some(format!(
            "contract end {id} returns the data to the transfer recipient {recipient}, not as \
             a package, so there is no package to confirm it with: once {recipient} has \
             received every part, confirm with `{}` alone (the registry checks \
             {recipient}'s receipts)",
            hint.command(&["contracts", "confirm", id])
        )),
        (true, false) => Some(format!(
            "contract end {id} returns the data as a package: download it ({}), check it, \
             then confirm with `{}`",
            hint.command(&["download", id, "--out", "DIR"]),
            hint.command(&["contracts", "confirm", id, "--package", "DIR"])
        )),
        _ => None,
    }
}

/// Runs a `contracts` subcommand against the registry (all but `scheduled`).
pub(crate) async fn run(
    registry: &Registry,
    cmd: &ContractsCommand,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let client = &registry.client;
    let contract = match cmd {
        ContractsCommand::End {
            processor,
            choice: c,
            effective_at,
            now,
            idempotency_key,
            transfer_recipient,
        } => {
            let effective = match (effective_at, now) {
                (_, true) => EffectiveAt::Now,
                (Some(at), false) => EffectiveAt::At(at.timestamp_millis()),
                (None, false) => {
                    return Err(Failure::Usage("give --effective-at TIME or --now".into()))
                }
            };
            let key = idempotency_key
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let answer = client
                .end_contract_to(
                    processor.as_str(),
                    choice(*c),
                    transfer_recipient.clone().unwrap_or_default(),
                    effective,
                    key.as_str(),
                )
                .await
                .map_err(|s| registry.failed(s))?;
            let mut view = ContractView::from(&answer);
            view.idempotency_key = idempotency_key.is_none().then_some(key);
            emit(io.out, io.format, &view, false)?;
            return Ok(0);
        }
        ContractsCommand::List { processor } => {
            let list = client
                .list_contracts(processor.clone().unwrap_or_default())
                .await
                .map_err(|s| registry.failed(s))?;
            let view = ContractListView {
                contracts: list.iter().map(ContractView::from).collect(),
            };
            emit(io.out, io.format, &view, false)?;
            return Ok(0);
        }
        ContractsCommand::Show { id, watch: false } => {
            let contract = client
                .get_contract(id.as_str())
                .await
                .map_err(|s| registry.failed(s))?;
            let mut view = ContractView::from(&contract);
            view.processor_status_check = status_check(registry, &contract.processor).await;
            emit(io.out, io.format, &view, false)?;
            return Ok(0);
        }
        ContractsCommand::Show { id, watch: true } => return watch(registry, id, io).await,
        ContractsCommand::Choose {
            id,
            choice: c,
            transfer_recipient,
        } => {
            let answer = client
                .choose_contract_end_to(
                    id.as_str(),
                    chosen(*c),
                    transfer_recipient.clone().unwrap_or_default(),
                )
                .await
                .map_err(|s| registry.failed(s))?;
            let view = ChosenView::new(&answer, &registry.hint);
            emit(io.out, io.format, &view, false)?;
            return Ok(0);
        }
        ContractsCommand::Confirm {
            id,
            manifest_sha256,
            package,
        } => {
            let given = manifest_sha256.is_some() || package.is_some();
            // Asked first, as nothing else gives the terms before ConfirmReturn is sent: a
            // return to a transfer recipient has no package, a return as a package needs one,
            // and ConfirmReturn refuses either mismatch only by the name of its field (and
            // only after a folder given for a return without a package was checked).
            let terms = client
                .get_contract(id.as_str())
                .await
                .map_err(|s| registry.failed(s))?
                .contract_end
                .unwrap_or_default();
            if let Some(m) = confirm_mismatch(id, &terms, given, &registry.hint) {
                return Err(Failure::Usage(m));
            }
            let digest = match (manifest_sha256, package) {
                (Some(hex), _) => hex.clone(),
                (None, Some(dir)) => manifest_digest(dir, id, &registry.hint)?,
                // A return to a transfer recipient: the registry checks the receipts instead.
                (None, None) => String::new(),
            };
            client.confirm_return(id.as_str(), digest).await
        }
        ContractsCommand::Scheduled { .. } => {
            return Err(Failure::Usage(
                "contracts scheduled asks the processor, not the registry".into(),
            ))
        }
    }
    .map_err(|s| registry.failed(s))?;
    emit(io.out, io.format, &ContractView::from(&contract), false)?;
    Ok(0)
}

/// The registry's last failed status check of `processor` (what `dsrctl chain` shows); none
/// when the last answered, or when the chain cannot be read: it only adds to what `show`
/// prints, which stands without it.
async fn status_check(registry: &Registry, processor: &str) -> Option<StatusCheckView> {
    let chain = (registry.client.raw())
        .get_chain(GetChainRequest {})
        .await
        .ok()?
        .into_inner();
    StatusCheckView::of(&chain, processor)
}

/// `dsrctl contracts scheduled`: the processor's view (its operator API).
pub(crate) async fn scheduled(
    cmd: &ContractsCommand,
    settings: &ConnectionSettings,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let ContractsCommand::Scheduled {
        processor,
        controller,
    } = cmd
    else {
        return Err(Failure::Usage(
            "only contracts scheduled asks the processor".into(),
        ));
    };
    let mut client =
        ProcessorOperatorServiceClient::new(super::tasks::connect(processor, settings)?);
    let list = client
        .list_contract_ends(ListContractEndsRequest {
            controller: controller.clone().unwrap_or_default(),
        })
        .await
        .map_err(|status| Failure::Rpc {
            status,
            endpoint: processor.processor.clone(),
            server: "processor",
        })?
        .into_inner();
    let view = ScheduledListView {
        contract_ends: list.contract_ends.iter().map(ScheduledView::from).collect(),
    };
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}

/// Whether a contract end in `state` has done what it will do: ended, or PARTIALLY_COMPLETED,
/// whose holders keep only what the law makes them keep until dates often years away (the
/// registry takes it as finished too, for the next contract end with the processor).
fn finished(state: i32) -> bool {
    matches!(
        RequestState::try_from(state),
        Ok(RequestState::Completed
            | RequestState::PartiallyCompleted
            | RequestState::Failed
            | RequestState::Cancelled)
    )
}

/// Whether a contract end in `state` went through: everything done, or all but what the law
/// keeps.
fn went_through(state: i32) -> bool {
    matches!(
        RequestState::try_from(state),
        Ok(RequestState::Completed | RequestState::PartiallyCompleted)
    )
}

/// The bars of `show --watch`, one per subprocessor, on stderr when it is a terminal.
struct Bars {
    multi: MultiProgress,
    bars: Vec<(String, ProgressBar)>,
}

impl Bars {
    fn new() -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            bars: Vec::new(),
        }
    }

    /// Whether anyone sees the bars.
    fn drawn(&self) -> bool {
        !self.multi.is_hidden()
    }

    /// Moves each subprocessor's bar to what `c` says (subjects done of the total; records
    /// and the phase in its message).
    fn show(&mut self, c: &Contract) {
        for t in &c.tasks {
            let part = PartView::from(t);
            let bar = match self.bars.iter().find(|(s, _)| *s == part.subprocessor) {
                Some((_, b)) => b.clone(),
                None => {
                    let b = self.multi.add(ProgressBar::new(0));
                    if let Ok(style) = ProgressStyle::with_template("{prefix:>16} {wide_bar} {msg}")
                    {
                        b.set_style(style);
                    }
                    b.set_prefix(clean(&part.subprocessor));
                    self.bars.push((part.subprocessor.clone(), b.clone()));
                    b
                }
            };
            // An unknown total leaves the bar empty rather than full at what was done.
            match part.subjects_total {
                0 => bar.unset_length(),
                total => bar.set_length(total.max(part.subjects_done)),
            }
            bar.set_position(part.subjects_done);
            bar.set_message(part.bar_message());
        }
    }

    /// Prints `line` on stderr, above the bars when they are drawn.
    fn note(&self, line: &str, io: &mut Io<'_>) -> std::io::Result<()> {
        if self.drawn() {
            self.multi.println(line)
        } else {
            writeln!(io.err, "{line}")
        }
    }

    fn finish(self) {
        for (_, b) in self.bars {
            b.finish();
        }
    }
}

/// Prints one table view of a watch, after a blank line when one was printed before.
fn print_view(io: &mut Io<'_>, c: &Contract, first: bool) -> std::io::Result<()> {
    if !first {
        io.out.write_all(b"\n")?;
    }
    emit(io.out, io.format, &ContractView::from(c), false)
}

/// `show --watch`: polls GetContract until the contract end finishes ([`finished`]) or
/// Ctrl-C, drawing progress; then prints it. Exits 0 only if it went through (COMPLETED or
/// PARTIALLY_COMPLETED). For table output without the bars (stderr not a terminal) the view
/// is printed at once and again each time it changes, since a contract end may take its
/// grace period. JSON output is one document, the last view, so that a script reads it
/// whole.
///
/// A poll that cannot reach the registry (after a first that did) is tried again, after
/// waits growing to [`MAX_RECONNECT_WAIT`], with a note on stderr: a registry restarted
/// during a grace period does not end the watch. Any other error does.
async fn watch(registry: &Registry, id: &str, io: &mut Io<'_>) -> Result<u8, Failure> {
    let mut bars = Bars::new();
    let print_changes = !bars.drawn() && io.format == crate::cli::OutputFormat::Table;
    let mut printed: Option<Contract> = None;
    let mut seen: Option<Contract> = None;
    let mut unreachable = 0;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let last = loop {
        let c = match registry.client.get_contract(id).await {
            Ok(c) => c,
            Err(status) if seen.is_some() && super::watch::worth_resuming(&status) => {
                unreachable += 1;
                let wait = reconnect_wait(unreachable);
                let failure = registry.failed(status).message();
                let why = failure.strip_prefix("error: ").unwrap_or(&failure);
                let note = format!(
                    "note: {why}; asking again in {} s (Ctrl-C stops the watch)",
                    wait.as_secs()
                );
                bars.note(&note, io)?;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = &mut interrupted => break seen.unwrap_or_default(),
                }
            }
            Err(status) => return Err(registry.failed(status)),
        };
        if unreachable > 0 {
            unreachable = 0;
            bars.note("note: the registry answers again", io)?;
        }
        seen = Some(c.clone());
        bars.show(&c);
        if finished(c.state) {
            break c;
        }
        if print_changes && printed.as_ref() != Some(&c) {
            let shown = print_view(io, &c, printed.is_none());
            if shown.is_err() {
                // Nobody reads any more: the contract end did not finish while watched.
                return super::verdict(shown, crate::EXIT_FAILURE);
            }
            printed = Some(c.clone());
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = &mut interrupted => break c,
        }
    };
    bars.finish();
    let code = if went_through(last.state) {
        0
    } else {
        crate::EXIT_FAILURE
    };
    let shown = match &printed {
        // Interrupted with this view printed last.
        Some(p) if *p == last => Ok(()),
        _ if print_changes => print_view(io, &last, printed.is_none()),
        _ => emit(io.out, io.format, &ContractView::from(&last), false),
    };
    super::verdict(shown, code)
}

#[cfg(test)]
mod tests {
    use dsrelay_sdk::proto::ContractProgress;

    use super::*;

    /// A registry named with --endpoint, which the commands suggested must name too.
    fn elsewhere() -> Hint {
        Hint::new(&crate::cli::ConnectionArgs {
            endpoint: Some("https://registry.example:50051".into()),
            ..Default::default()
        })
    }

    /// The commands a refused confirmation suggests run as printed: `download` with the
    /// `--out` it requires, each with the registry the user named.
    #[test]
    fn a_refused_confirmation_suggests_commands_that_reach_the_same_registry() {
        let at = "--endpoint https://registry.example:50051";
        let dir = tempfile::tempdir().unwrap();
        // Its manifest.json missing is a file of the package missing: exit 1.
        let Err(Failure::Package(e)) = manifest_digest(dir.path(), "c-1", &elsewhere()) else {
            panic!("a folder without a manifest gave a digest");
        };
        let m = e.to_string();
        assert!(
            m.contains(&format!("(dsrctl download c-1 --out DIR {at})")),
            "{m}"
        );
        let package = ContractEnd {
            choice: ContractEndChoice::ReturnThenDelete as i32,
            ..Default::default()
        };
        let m = confirm_mismatch("c-1", &package, false, &elsewhere()).unwrap();
        for words in [
            format!("download it (dsrctl download c-1 --out DIR {at})"),
            format!("`dsrctl contracts confirm c-1 --package DIR {at}`"),
        ] {
            assert!(m.contains(&words), "{words:?} in {m}");
        }
        let transfer = ContractEnd {
            transfer_recipient: "successor".into(),
            ..package
        };
        let m = confirm_mismatch("c-1", &transfer, true, &elsewhere()).unwrap();
        assert!(
            m.contains(&format!("`dsrctl contracts confirm c-1 {at}` alone")),
            "{m}"
        );
    }

    #[test]
    fn the_digest_is_that_of_the_folders_manifest() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            manifest_digest(dir.path(), "c-1", &Hint::default()),
            Err(Failure::Package(e)) if e.to_string().contains("dsrctl download c-1 --out DIR")
        ));
        let data = b"id,name\n1,Maija\n";
        let file = serde_json::json!({
            "path": "p/s/a.csv",
            "size": data.len(),
            "sha256": hex::encode(Sha256::digest(data)),
        });
        let manifest =
            serde_json::to_vec(&serde_json::json!({"request_id": "c-1", "files": [file]})).unwrap();
        std::fs::write(dir.path().join("manifest.json"), &manifest).unwrap();
        std::fs::create_dir_all(dir.path().join("p/s")).unwrap();
        std::fs::write(dir.path().join("p/s/a.csv"), data).unwrap();
        assert_eq!(
            manifest_digest(dir.path(), "c-1", &Hint::default()).unwrap(),
            hex::encode(Sha256::digest(&manifest))
        );
        // Another request's package is named as such, before the registry would refuse
        // its digest as one that differs.
        let Err(Failure::Usage(m)) = manifest_digest(dir.path(), "c-2", &Hint::default()) else {
            panic!("a digest of another request's package");
        };
        assert!(
            m.contains("holds the package of request c-1, not of contract end c-2"),
            "{m}"
        );
    }

    #[test]
    fn a_folder_that_is_not_what_its_manifest_lists_gives_no_digest() {
        let dir = tempfile::tempdir().unwrap();
        let listed = |path: &str, data: &[u8]| {
            serde_json::json!({
                "path": path,
                "size": data.len(),
                "sha256": hex::encode(Sha256::digest(data)),
            })
        };
        let manifest = serde_json::json!({"files": [
            listed("same.csv", b"a,b\n"),
            listed("gone.csv", b"x"),
            listed("changed.csv", b"hello"),
            listed("longer.csv", b"hi"),
            listed("../outside.csv", b""),
        ]});
        std::fs::write(
            dir.path().join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        for (path, data) in [
            ("same.csv", &b"a,b\n"[..]),
            ("changed.csv", b"HELLO"),
            ("longer.csv", b"hi there"),
        ] {
            std::fs::write(dir.path().join(path), data).unwrap();
        }
        let Err(failure) = manifest_digest(dir.path(), "c-1", &Hint::default()) else {
            panic!("a digest for a folder that differs from its manifest");
        };
        assert_eq!(failure.exit_code(), crate::EXIT_FAILURE);
        let message = failure.message();
        for expected in [
            "gone.csv: missing",
            "changed.csv: SHA-256 is ",
            "longer.csv: more than the 2 bytes in the manifest",
            "../outside.csv: the path has a \"..\" component",
        ] {
            assert!(message.contains(expected), "{expected:?} in {message}");
        }
        assert!(!message.contains("same.csv"), "{message}");

        std::fs::write(dir.path().join("manifest.json"), b"{}").unwrap();
        let message = manifest_digest(dir.path(), "c-1", &Hint::default())
            .unwrap_err()
            .message();
        assert!(message.contains("not a package's manifest"), "{message}");
    }

    #[test]
    fn a_part_shows_its_phase_and_counts() {
        let task = TaskStatus {
            subprocessor: "accounting".into(),
            state: TaskState::InProgress as i32,
            progress: Some(ContractProgress {
                phase: ContractPhase::Deleting as i32,
                subjects_done: 3,
                subjects_total: 10,
                records_done: 7,
                records_total: 0,
                scheduled_at: None,
            }),
            ..Default::default()
        };
        let part = PartView::from(&task);
        assert_eq!(
            part.summary(),
            "accounting DELETING 3/10 subjects, records 7/unknown handled"
        );
        assert_eq!(part.records(), "7/unknown handled");
        let c = Contract {
            contract_id: "c1".into(),
            processor: "payroll".into(),
            contract_end: Some(ContractEnd {
                choice: ContractEndChoice::Delete as i32,
                ..Default::default()
            }),
            state: RequestState::InProgress as i32,
            tasks: vec![task],
            ..Default::default()
        };
        let table = ContractView::from(&c).to_table();
        let row = table
            .lines()
            .find(|l| l.starts_with("accounting"))
            .expect("a row");
        for word in ["IN_PROGRESS", "DELETING", "3/10", "7/unknown"] {
            assert!(row.contains(word), "{word} in {row}");
        }
        assert!(finished(RequestState::Completed as i32));
        // Its holders keep what the law makes them keep, for years: the watch ends.
        assert!(finished(RequestState::PartiallyCompleted as i32));
        assert!(went_through(RequestState::PartiallyCompleted as i32));
        assert!(!finished(RequestState::InProgress as i32));
        assert!(
            finished(RequestState::Failed as i32) && !went_through(RequestState::Failed as i32)
        );
    }

    fn done_part(state: TaskState, records_done: u64, records_total: u64) -> TaskStatus {
        TaskStatus {
            subprocessor: "accounting".into(),
            state: state as i32,
            progress: Some(ContractProgress {
                phase: ContractPhase::Done as i32,
                subjects_done: 4,
                subjects_total: 4,
                records_done,
                records_total,
                scheduled_at: None,
            }),
            ..Default::default()
        }
    }

    /// An erasure counts every record it went through, the ones it kept too: no view reads
    /// its count as records erased, and a RETAINED part says that some are kept.
    #[test]
    fn an_erasing_part_counts_records_handled_not_erased() {
        let kept = done_part(TaskState::Retained, 26, 26);
        let c = Contract {
            contract_id: "c1".into(),
            state: RequestState::PartiallyCompleted as i32,
            tasks: vec![kept.clone()],
            ..Default::default()
        };
        let view = ContractView::from(&c);
        let table = view.to_table();
        let row = (table.lines())
            .find(|l| l.starts_with("accounting"))
            .expect("a row");
        assert!(row.contains("26/26 handled, some kept"), "{row}");
        let list = ContractListView {
            contracts: vec![ContractView::from(&c)],
        }
        .to_table();
        assert!(list.contains("records 26/26 handled, some kept"), "{list}");
        let bar = view.tasks[0].bar_message();
        assert!(bar.contains("records 26/26 handled, some kept"), "{bar}");
        let scheduled = ScheduledListView {
            contract_ends: vec![ScheduledView::from(&ProcessorContractEnd {
                controller: "controller".into(),
                request_id: "c1".into(),
                tasks: vec![kept],
                ..Default::default()
            })],
        };
        let table = scheduled.to_table();
        assert!(table.contains("26/26 handled, some kept"), "{table}");

        for (task, cell) in [
            (done_part(TaskState::Completed, 26, 26), "26/26 handled"),
            (
                done_part(TaskState::Retained, 7, 0),
                "7/unknown handled, some kept",
            ),
        ] {
            assert_eq!(PartView::from(&task).records(), cell);
        }
        let phase = |phase: ContractPhase, state: TaskState| TaskStatus {
            state: state as i32,
            progress: Some(ContractProgress {
                phase: phase as i32,
                records_done: 5,
                records_total: 26,
                ..Default::default()
            }),
            ..Default::default()
        };
        let deleting = phase(ContractPhase::Deleting, TaskState::InProgress);
        assert_eq!(PartView::from(&deleting).records(), "5/26 handled");
        // Exported records are what they say.
        let returning = phase(ContractPhase::Returning, TaskState::InProgress);
        assert_eq!(PartView::from(&returning).records(), "5/26");
        // A part that stopped there handled nothing more.
        let failed = phase(ContractPhase::Deleting, TaskState::Failed);
        assert_eq!(PartView::from(&failed).records(), "5/26");
    }

    /// What `contracts choose` prints holds no part: the registry's are the processor's last
    /// report, scheduled under the terms before the choice.
    #[test]
    fn a_choice_shows_no_part_scheduled_before_it() {
        let at = dsrelay_proto::timestamp_from_millis(1_798_761_600_000);
        let date = cell(Time::from_proto(Some(&at)));
        let c = Contract {
            contract_id: "c1".into(),
            contract_end: Some(ContractEnd {
                choice: ContractEndChoice::Delete as i32,
                grace_ends_at: Some(at),
                ..Default::default()
            }),
            state: RequestState::Dispatched as i32,
            tasks: vec![TaskStatus {
                subprocessor: "accounting".into(),
                state: TaskState::Pending as i32,
                progress: Some(ContractProgress {
                    phase: ContractPhase::Scheduled as i32,
                    scheduled_at: Some(at),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let view = ChosenView::new(&c, &elsewhere());
        let table = view.to_table();
        let dated: Vec<&str> = table.lines().filter(|l| l.contains(&date)).collect();
        assert_eq!(dated.len(), 1, "{table}");
        assert!(dated[0].starts_with("grace ends"), "{table}");
        assert!(!table.contains("accounting"), "{table}");
        let show = "dsrctl contracts show c1 --endpoint https://registry.example:50051 shows";
        assert!(table.contains(show), "{table}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["choice"], "DELETE", "{json}");
        assert!(json.get("tasks").is_none(), "{json}");
        assert!(json.get("parts").is_none(), "{json}");
    }

    /// A total of 0 is unknown, and reads the same in every view: `N/unknown`, JSON `null`.
    #[test]
    fn an_unknown_total_reads_alike_in_every_view() {
        let task = TaskStatus {
            subprocessor: "accounting".into(),
            state: TaskState::InProgress as i32,
            progress: Some(ContractProgress {
                phase: ContractPhase::Deleting as i32,
                subjects_done: 3,
                subjects_total: 0,
                records_done: 7,
                records_total: 0,
                scheduled_at: None,
            }),
            ..Default::default()
        };
        let c = Contract {
            contract_id: "c1".into(),
            state: RequestState::InProgress as i32,
            tasks: vec![task.clone()],
            ..Default::default()
        };
        let view = ContractView::from(&c);
        let part = &view.tasks[0];
        assert_eq!(
            part.bar_message(),
            "subjects 3/unknown; records 7/unknown handled; DELETING"
        );
        assert_eq!(
            part.summary(),
            "accounting DELETING 3/unknown subjects, records 7/unknown handled"
        );
        let table = view.to_table();
        let row = (table.lines())
            .find(|l| l.starts_with("accounting"))
            .expect("a row");
        assert!(
            row.contains("3/unknown") && row.contains("7/unknown"),
            "{row}"
        );
        let scheduled = ScheduledListView {
            contract_ends: vec![ScheduledView::from(&ProcessorContractEnd {
                tasks: vec![task],
                ..Default::default()
            })],
        }
        .to_table();
        assert!(scheduled.contains("7/unknown"), "{scheduled}");
        let json = serde_json::to_value(&view).expect("json");
        let part = &json["tasks"][0];
        assert!(
            part["subjects_total"].is_null() && part["records_total"].is_null(),
            "{json}"
        );
        assert_eq!(part["records_done"], 7, "{json}");
    }

    /// A contract end whose choice the processor refused is marked in the list, as `show`
    /// says it: the choice alone reads as carried out. JSON has `terms_refused`, as `show`.
    #[test]
    fn a_refused_choice_is_marked_in_the_list() {
        let refused = Contract {
            contract_id: "c1".into(),
            state: RequestState::PartiallyCompleted as i32,
            contract_end: Some(ContractEnd {
                choice: ContractEndChoice::ReturnThenDelete as i32,
                ..Default::default()
            }),
            terms_refused: "too late: the data was deleted".into(),
            ..Default::default()
        };
        let kept = Contract {
            contract_id: "c2".into(),
            terms_refused: String::new(),
            ..refused.clone()
        };
        let list = ContractListView {
            contracts: vec![ContractView::from(&refused), ContractView::from(&kept)],
        };
        let table = list.to_table();
        let row = |id: &str| {
            table
                .lines()
                .find(|l| l.starts_with(id))
                .unwrap_or_else(|| panic!("{id} in {table}"))
                .to_string()
        };
        assert!(
            row("c1").contains("RETURN_THEN_DELETE (refused)"),
            "{table}"
        );
        assert!(!row("c2").contains("(refused)"), "{table}");
        assert!(
            table.contains("(refused): the choice was refused by the processor")
                && table.contains("dsrctl contracts show ID"),
            "{table}"
        );
        let json = serde_json::to_value(&list).expect("json");
        assert_eq!(
            json["contracts"][0]["terms_refused"], "too late: the data was deleted",
            "{json}"
        );
        assert_eq!(
            json["contracts"][0]["choice"], "RETURN_THEN_DELETE",
            "{json}"
        );
        assert!(
            json["contracts"][1].get("terms_refused").is_none(),
            "{json}"
        );
        let alone = ContractListView {
            contracts: vec![ContractView::from(&kept)],
        };
        assert!(
            !alone.to_table().contains("refused"),
            "{}",
            alone.to_table()
        );
    }

    /// A part cancelled while SCHEDULED, as a processor that still sent the date reports it.
    fn cancelled_before_it_started() -> (TaskStatus, String) {
        let at = dsrelay_proto::timestamp_from_millis(1_798_761_600_000);
        let date = cell(Time::from_proto(Some(&at)));
        let task = TaskStatus {
            subprocessor: "accounting".into(),
            state: TaskState::Cancelled as i32,
            progress: Some(ContractProgress {
                phase: ContractPhase::Scheduled as i32,
                scheduled_at: Some(at),
                ..Default::default()
            }),
            ..Default::default()
        };
        (task, date)
    }

    #[test]
    fn a_part_that_ended_is_not_shown_as_scheduled() {
        let (task, date) = cancelled_before_it_started();
        assert!(!date.is_empty());
        let list = ScheduledListView {
            contract_ends: vec![ScheduledView::from(&ProcessorContractEnd {
                controller: "controller".into(),
                request_id: "c1".into(),
                tasks: vec![task.clone()],
                ..Default::default()
            })],
        };
        let table = list.to_table();
        let header = table.lines().next().expect("a header");
        assert!(header.contains("STATE"), "{table}");
        let row = table.lines().nth(1).expect("a row");
        assert!(
            row.contains("CANCELLED") && row.contains("not started"),
            "{row}"
        );
        assert!(!row.contains("SCHEDULED") && !row.contains(&date), "{row}");
        let json = serde_json::to_value(&list).expect("json");
        let part = &json["contract_ends"][0]["tasks"][0];
        assert_eq!(part["state"], "CANCELLED", "{json}");
        assert!(part["scheduled_at"].is_null(), "{json}");

        let c = Contract {
            contract_id: "c1".into(),
            state: RequestState::Cancelled as i32,
            tasks: vec![task],
            ..Default::default()
        };
        let view = ContractView::from(&c);
        assert_eq!(
            view.tasks[0].summary(),
            "accounting CANCELLED (not started)"
        );
        let table = view.to_table();
        let row = table
            .lines()
            .find(|l| l.starts_with("accounting"))
            .expect("a row");
        assert!(!row.contains("SCHEDULED") && !row.contains(&date), "{row}");
    }

    #[test]
    fn a_retained_part_shows_its_next_erasure_run() {
        let c = Contract {
            contract_id: "c1".into(),
            state: RequestState::PartiallyCompleted as i32,
            tasks: vec![TaskStatus {
                subprocessor: "accounting".into(),
                state: TaskState::Retained as i32,
                retain_until: Some(dsrelay_proto::timestamp_from_millis(1_798_761_600_000)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let table = ContractView::from(&c).to_table();
        assert!(table.contains("NEXT ERASURE RUN"), "{table}");
        assert!(!table.contains("RETAINED UNTIL"), "{table}");
    }

    /// A part returned to a transfer recipient lists its receipt with the processor that
    /// sent it, as the recipient named it; in JSON too.
    #[test]
    fn a_receipt_shows_its_sender() {
        let sender = "spiffe://dsrelay.dev/processor/payroll-bureau";
        let c = Contract {
            contract_id: "c1".into(),
            state: RequestState::InProgress as i32,
            tasks: vec![TaskStatus {
                subprocessor: "accounting".into(),
                state: TaskState::InProgress as i32,
                evidence: Some(dsrelay_sdk::proto::Evidence {
                    transfer_receipt: Some(dsrelay_sdk::proto::TransferReceipt {
                        recipient: "new-bookkeeper".into(),
                        manifest_sha256: "ab".repeat(32),
                        bytes: 12,
                        sender: sender.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let view = ContractView::from(&c);
        let table = view.to_table();
        assert!(table.contains("SENDER"), "{table}");
        let row = table
            .lines()
            .find(|l| l.contains(&"ab".repeat(32)))
            .expect("a receipt row");
        assert!(row.ends_with(sender), "{table}");
        let v = serde_json::to_value(&view).unwrap();
        assert_eq!(v["tasks"][0]["receipt"]["sender"], sender, "{v}");
    }

    /// A date passed is a run the processor started (or one due), worded as `get` and
    /// `trace` word it.
    #[test]
    fn a_past_erasure_run_awaits_the_holders_confirmation() {
        let c = Contract {
            contract_id: "c1".into(),
            state: RequestState::PartiallyCompleted as i32,
            tasks: vec![TaskStatus {
                subprocessor: "accounting".into(),
                state: TaskState::Retained as i32,
                retain_until: Some(dsrelay_proto::timestamp_from_millis(1_577_836_800_000)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let table = ContractView::from(&c).to_table();
        let row = table
            .lines()
            .find(|l| l.starts_with("accounting"))
            .expect("a row");
        assert!(
            row.contains("2020-01-01T00:00:00Z, awaiting the holder's confirmation"),
            "{table}"
        );
    }

    /// A part that failed says why, as `get` does: clipped in the table, whole in JSON.
    #[test]
    fn a_failed_part_shows_its_reason() {
        let reason = format!(
            "the connector's user may not write the receipts table{}: GRANT SELECT, INSERT ON \
             dsrelay_erasure_receipts TO <user>",
            " (really)".repeat(100)
        );
        let c = Contract {
            contract_id: "c1".into(),
            state: RequestState::Failed as i32,
            tasks: vec![
                TaskStatus {
                    subprocessor: "accounting".into(),
                    state: TaskState::Failed as i32,
                    reason: reason.clone(),
                    progress: Some(ContractProgress {
                        phase: ContractPhase::Returning as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                TaskStatus {
                    subprocessor: "newsletter".into(),
                    state: TaskState::Refused as i32,
                    reason: "no such list".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let view = ContractView::from(&c);
        let table = view.to_table();
        assert!(
            table.contains("accounting: the connector's user may not write the receipts table"),
            "{table}"
        );
        assert!(table.contains("newsletter: no such list\n"), "{table}");
        let line = (table.lines())
            .find(|l| l.starts_with("accounting: "))
            .expect("the reason's line");
        assert!(line.chars().count() < reason.len(), "{line}");
        assert!(line.ends_with("(--output json has it whole)"), "{line}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["tasks"][0]["reason"], reason.as_str(), "{json}");
        assert_eq!(json["tasks"][1]["reason"], "no such list", "{json}");
    }

    /// A return confirmed by nobody and deleted at the end of the grace period says so in
    /// `show`, once the parts are RETAINED or COMPLETED too, whose reasons are then their
    /// outcome's. Before, `show` printed only "return confirmed false" beside parts DONE.
    #[test]
    fn a_deletion_without_a_confirmation_of_the_return_says_so() {
        let terms = ContractEnd {
            choice: ContractEndChoice::ReturnThenDelete as i32,
            grace_ends_at: Some(dsrelay_proto::prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 0,
            }),
            ..Default::default()
        };
        let mut mail = done_part(TaskState::Completed, 3, 3);
        mail.subprocessor = "mail-marketing".into();
        let c = Contract {
            contract_id: "c1".into(),
            contract_end: Some(terms.clone()),
            state: RequestState::PartiallyCompleted as i32,
            tasks: vec![done_part(TaskState::Retained, 26, 26), mail],
            ..Default::default()
        };
        let line = "not confirmed; deleted at the end of the grace period (2026-01-01T00:00:00Z)";
        let view = ContractView::from(&c);
        let table = view.to_table();
        let row = (table.lines())
            .find(|l| l.starts_with("return ") && !l.starts_with("return confirmed"))
            .expect("the return's row");
        assert!(row.ends_with(line), "{table}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["return_unconfirmed"], line, "{json}");

        // One part deleting, one whose return failed: the deletion started, for that one.
        let mut failed = c.clone();
        failed.tasks[0].state = TaskState::InProgress as i32;
        if let Some(p) = failed.tasks[0].progress.as_mut() {
            p.phase = ContractPhase::Deleting as i32;
        }
        failed.tasks[1].state = TaskState::Failed as i32;
        if let Some(p) = failed.tasks[1].progress.as_mut() {
            p.phase = ContractPhase::Returning as i32;
        }
        assert_eq!(
            unconfirmed_return(&failed).as_deref(),
            Some(
                "not confirmed; deletion started at the end of the grace period \
                 (2026-01-01T00:00:00Z): accounting"
            )
        );

        // Nothing to say: confirmed; refused terms (a choice too late may have returned
        // nothing); another choice; parts still awaiting the confirmation.
        let mut confirmed = c.clone();
        confirmed.contract_end = Some(ContractEnd {
            return_confirmed: true,
            ..terms.clone()
        });
        let refused = Contract {
            terms_refused: "deleting the controller's data has started".into(),
            ..c.clone()
        };
        let deleted = Contract {
            contract_end: Some(ContractEnd {
                choice: ContractEndChoice::Delete as i32,
                ..terms
            }),
            ..c.clone()
        };
        let mut awaiting = c.clone();
        for t in &mut awaiting.tasks {
            t.state = TaskState::InProgress as i32;
            if let Some(p) = t.progress.as_mut() {
                p.phase = ContractPhase::AwaitingConfirmation as i32;
            }
        }
        for c in [confirmed, refused, deleted, awaiting] {
            assert_eq!(unconfirmed_return(&c), None, "{c:?}");
            let table = ContractView::from(&c).to_table();
            assert!(!table.contains("not confirmed"), "{table}");
        }
    }

    /// `show` gives the registry's last failed status check of the contract end's processor,
    /// as `dsrctl chain` does: a processor that is down sends no report, and the parts alone
    /// show the last one as if it stood. Before, `show` gave no sign of it.
    #[test]
    fn show_gives_the_processors_failed_status_check() {
        use dsrelay_sdk::proto::ChainProcessor;
        let chain = Chain {
            processors: vec![
                ChainProcessor {
                    name: "other".into(),
                    status_check_error: "request r-2: Unavailable: elsewhere".into(),
                    ..Default::default()
                },
                ChainProcessor {
                    name: "payroll-bureau".into(),
                    status_check_error: "request c1: Unavailable: connection refused".into(),
                    status_check_failed_at: Some(dsrelay_proto::prost_types::Timestamp {
                        seconds: 1_767_225_600,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
            ],
        };
        let c = Contract {
            contract_id: "c1".into(),
            processor: "payroll-bureau".into(),
            state: RequestState::InProgress as i32,
            ..Default::default()
        };
        let mut view = ContractView::from(&c);
        view.processor_status_check = StatusCheckView::of(&chain, &c.processor);
        let table = view.to_table();
        let row = (table.lines())
            .find(|l| l.starts_with("processor status check"))
            .expect("the check's row");
        assert!(
            row.ends_with(
                "failed at 2026-01-01T00:00:00Z: request c1: Unavailable: connection refused"
            ),
            "{table}"
        );
        assert!(!table.contains("elsewhere"), "{table}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(
            json["processor_status_check"]["failed_at"], "2026-01-01T00:00:00Z",
            "{json}"
        );
        // One that answered since, or a processor the chain does not name: no row.
        assert!(StatusCheckView::of(&chain, "elsewhere").is_none());
        let mut answered = chain.clone();
        answered.processors[1].status_check_error.clear();
        assert!(StatusCheckView::of(&answered, "payroll-bureau").is_none());
        assert!(!ContractView::from(&c).to_table().contains("status check"));
    }
}
