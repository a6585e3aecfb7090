//! `dsrctl tasks`: operators at a processor list, confirm and refuse manual tasks, and list
//! and requeue dead-lettered acknowledgements.

use std::collections::HashSet;

use dsrelay_sdk::proto::processor_operator_service_client::ProcessorOperatorServiceClient;
use dsrelay_sdk::proto::{
    CompleteManualTaskRequest, DeadLetter, DeadLetterList, IdentityEncoding,
    ListDeadLettersRequest, ListManualTasksRequest, ManualTask, ManualTaskList,
    RefuseManualTaskRequest, RequestKind, RequeueDeadLetterRequest, RetryTaskRequest,
    SubjectIdentity, TaskRef, TaskState,
};
use dsrelay_sdk::ConnectionSettings;
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::{ProcessorArgs, TaskRefArgs, TasksCommand};
use crate::commands::Io;
use crate::output::{emit, kind_name, task_state_name, CorrectionView, Render, Time};
use crate::table::{clean, clipped, Table};
use crate::Failure;

/// The development processor's identity, expected when no other is given and the
/// development PKI is in use.
const DEV_PROCESSOR_IDENTITY: &str = "spiffe://dsrelay.dev/processor/payroll-bureau";

/// How many characters of a task's reason or last error the table shows: a holder's words
/// say what failed within a line or two, and the table has many columns besides; `--output
/// json` shows them whole.
const WHY_CHARS: usize = 160;

#[derive(Debug, Serialize)]
struct TaskView {
    controller: String,
    request_id: String,
    subprocessor: String,
    kind: String,
    state: String,
    identities: Vec<String>,
    /// True when the task concerns all of the subject's data: `data_categories` is empty.
    all_data: bool,
    data_categories: Vec<String>,
    /// The work order of a rectification: the operator enters these values by hand.
    corrections: Vec<CorrectionView>,
    lift_restriction: bool,
    transfer_recipient: String,
    contract_end: Option<ContractEndView>,
    instructions: String,
    reason: String,
    /// The holder's or connector's words from the last attempt that failed and was retried.
    last_error: String,
    attempts: u32,
    /// Whether `dsrctl tasks retry` would take the task, as the processor listed it: set on
    /// a FAILED or REFUSED task of `tasks list` only (null otherwise).
    retryable: Option<bool>,
    /// Why `dsrctl tasks retry` would refuse the task, in the refusal's words; empty unless
    /// `retryable` is false.
    retry_refusal: String,
    /// When the holder was called in a call whose answer is not recorded yet (one under
    /// way, or cut off by a restart and made again at the next claim); null when none is.
    holder_called_at: Option<Time>,
    waiting_since: Option<Time>,
    due_at: Option<Time>,
}

/// A contract end's terms, as a manual contract end task carries them.
#[derive(Debug, Serialize)]
struct ContractEndView {
    choice: String,
    effective_at: Option<Time>,
    grace_ends_at: Option<Time>,
    return_confirmed: bool,
    transfer_recipient: String,
}

impl TaskView {
    /// Which data, for the table: a task limited to categories must not read as all data.
    fn scope_cell(&self) -> String {
        if self.all_data {
            "all data".into()
        } else {
            self.data_categories.join(", ")
        }
    }

    /// The kind's parameters, for the table, values as entered, as `dsrctl get` shows them
    /// (`--output json` has each apart, for a value holding a separator).
    fn parameters_cell(&self) -> String {
        let mut parts = Vec::new();
        if !self.corrections.is_empty() {
            let corrections: Vec<String> = self.corrections.iter().map(|c| c.cell()).collect();
            parts.push(format!("correct {}", corrections.join(", ")));
        }
        // False means "set" only on a restriction; on other kinds it says nothing.
        if self.kind == kind_name(RequestKind::Restriction as i32) || self.lift_restriction {
            let verb = if self.lift_restriction { "lift" } else { "set" };
            parts.push(format!("{verb} restriction"));
        }
        if !self.transfer_recipient.is_empty() {
            parts.push(format!("to recipient {}", self.transfer_recipient));
        }
        if let Some(c) = &self.contract_end {
            let mut terms = format!("contract end {}", c.choice);
            if let Some(at) = c.effective_at {
                terms.push_str(&format!(", effective {at}"));
            }
            if let Some(at) = c.grace_ends_at {
                terms.push_str(&format!(", grace ends {at}"));
            }
            if c.return_confirmed {
                terms.push_str(", return confirmed");
            }
            if !c.transfer_recipient.is_empty() {
                terms.push_str(&format!(", to recipient {}", c.transfer_recipient));
            }
            parts.push(terms);
        }
        parts.join("; ")
    }

    /// `t` as ListManualTasks listed it: a FAILED or REFUSED task says whether a retry is
    /// taken.
    fn listed(t: &ManualTask) -> Self {
        let mut view = Self::from(t);
        if t.state == TaskState::Failed as i32 || t.state == TaskState::Refused as i32 {
            view.retryable = Some(t.retry_refusal.is_empty());
        }
        view
    }

    /// Whether a retry is taken, for the table: empty unless the task FAILED.
    fn retry_cell(&self) -> &'static str {
        match self.retryable {
            Some(true) => "yes",
            Some(false) => "no",
            None => "",
        }
    }

    /// Why the task is where it is, for the table, cut to [`WHY_CHARS`]: its reason (a
    /// failed or refused task's), or else the last error of one still being tried, after
    /// when its holder was called if that call has not answered (a long call shows only
    /// so). A task in another state may keep the last error of a retry that came before
    /// its outcome, which would read as the reason for it; `--output json` has it.
    fn why_cell(&self) -> String {
        let retried = ["PENDING", "IN_PROGRESS"].contains(&self.state.as_str());
        let mut why = Vec::new();
        if let Some(at) = self.holder_called_at.filter(|_| self.reason.is_empty()) {
            // Either a call still under way or one a restart cut off: the processor cannot tell
            // them apart until the lease of the call's claim (`tasks.lease_ms`) ends.
            why.push(format!(
                "holder called {at}, no answer recorded yet (made again if a restart cut it \
                 off, once its claim's lease ends)"
            ));
        }
        if !self.reason.is_empty() {
            why.push(clean(&self.reason));
        } else if retried && !self.last_error.is_empty() {
            why.push(format!("last error: {}", clean(&self.last_error)));
        }
        clipped(&why.join("; "), WHY_CHARS)
    }
}

/// `email=maija@example.fi`; with what an identity of type other is and how a value that is
/// not the raw one is encoded (`email (sha256)=…`, `other (loyalty-card)=…`), so that a hash
/// does not pass for the value and the operator knows what to look up.
fn identity(i: &SubjectIdentity) -> String {
    let name = |name: &str, prefix: &str| name.trim_start_matches(prefix).to_lowercase();
    let ty = crate::output::identity_type_name(i.r#type).to_lowercase();
    let mut about = Vec::new();
    if !i.label.is_empty() {
        about.push(i.label.clone());
    }
    match IdentityEncoding::try_from(i.encoding) {
        Ok(IdentityEncoding::Raw) => {}
        Ok(e) => about.push(name(e.as_str_name(), "IDENTITY_ENCODING_")),
        Err(_) => about.push(format!("encoding {}", i.encoding)),
    }
    if about.is_empty() {
        format!("{ty}={}", i.value)
    } else {
        format!("{ty} ({})={}", about.join(", "), i.value)
    }
}

impl From<&ManualTask> for TaskView {
    fn from(t: &ManualTask) -> Self {
        let r = t.task.clone().unwrap_or_default();
        let data_categories = (t.scope.as_ref())
            .map(|s| s.data_categories.clone())
            .unwrap_or_default();
        let params = t.parameters.clone().unwrap_or_default();
        Self {
            controller: r.controller,
            request_id: r.request_id,
            subprocessor: r.subprocessor,
            kind: kind_name(t.kind),
            state: task_state_name(t.state),
            identities: t.identities.iter().map(identity).collect(),
            all_data: data_categories.is_empty(),
            data_categories,
            corrections: CorrectionView::list(params.corrections),
            lift_restriction: params.lift_restriction,
            transfer_recipient: params.transfer_recipient,
            contract_end: params.contract_end.map(|c| ContractEndView {
                choice: crate::commands::contracts::choice_name(c.choice),
                effective_at: Time::from_proto(c.effective_at.as_ref()),
                grace_ends_at: Time::from_proto(c.grace_ends_at.as_ref()),
                return_confirmed: c.return_confirmed,
                transfer_recipient: c.transfer_recipient,
            }),
            instructions: t.instructions.clone(),
            reason: t.reason.clone(),
            last_error: t.last_error.clone(),
            attempts: t.attempts,
            // The processor says it in a listing only: see `TaskView::listed`.
            retryable: None,
            retry_refusal: t.retry_refusal.clone(),
            holder_called_at: Time::from_proto(t.holder_called_at.as_ref()),
            waiting_since: Time::from_proto(t.waiting_since.as_ref()),
            due_at: Time::from_proto(t.due_at.as_ref()),
        }
    }
}

#[derive(Debug, Serialize)]
struct TaskListView {
    tasks: Vec<TaskView>,
    /// The states asked for, as `--state` names them; empty: those waiting for an operator.
    #[serde(skip)]
    states: Vec<String>,
}

impl Render for TaskListView {
    fn to_table(&self) -> String {
        if self.tasks.is_empty() {
            return match &self.states[..] {
                [] => "no tasks wait for an operator\n".into(),
                [state] => format!("no tasks in state {state}\n"),
                [first @ .., last] => {
                    format!("no tasks in states {} or {last}\n", first.join(", "))
                }
            };
        }
        let mut t = Table::new([
            "CONTROLLER",
            "REQUEST",
            "SUBPROCESSOR",
            "KIND",
            "STATE",
            "ATTEMPTS",
            "RETRY",
            "DUE",
            "SUBJECT",
            "SCOPE",
            "PARAMETERS",
            "INSTRUCTIONS",
            "WHY",
        ]);
        for v in &self.tasks {
            t.row([
                clean(&v.controller),
                clean(&v.request_id),
                clean(&v.subprocessor),
                v.kind.clone(),
                v.state.clone(),
                v.attempts.to_string(),
                v.retry_cell().into(),
                v.due_at.map(|d| d.to_string()).unwrap_or_default(),
                clean(&v.identities.join("; ")),
                clean(&v.scope_cell()),
                clean(&v.parameters_cell()),
                clean(&v.instructions),
                v.why_cell(),
            ]);
        }
        let mut out = t.render();
        // Below the table, whole: the refusal says what the operator does instead.
        let refused: Vec<&TaskView> = (self.tasks.iter())
            .filter(|v| v.retryable == Some(false))
            .collect();
        if !refused.is_empty() {
            out.push('\n');
        }
        for v in refused {
            out.push_str(&format!(
                "{}/{}/{}: retry: no — {}\n",
                clean(&v.controller),
                clean(&v.request_id),
                clean(&v.subprocessor),
                clean(&v.retry_refusal)
            ));
        }
        out
    }
}

impl Render for TaskView {
    fn to_table(&self) -> String {
        format!(
            "{}/{}/{}: {}\n",
            clean(&self.controller),
            clean(&self.request_id),
            clean(&self.subprocessor),
            self.state
        )
    }
}

#[derive(Debug, Serialize)]
struct DeadLetterView {
    id: i64,
    controller: String,
    request_id: String,
    subprocessor: String,
    sequence: u64,
    rejections: u32,
    last_rejection: String,
    rejected_at: Option<Time>,
    dead_lettered_at: Option<Time>,
    /// When, after the letter was parked, the registry came to hold this task's state at this
    /// sequence or later (the processor answered its GetStatus with it, or it accepted a later
    /// acknowledgement of the task): requeueing it is not needed.
    superseded_at: Option<Time>,
    /// It carries a deletion certificate the registry gets only with it: never superseded,
    /// it needs a requeue once the registry is fixed.
    carries_certificate: bool,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(d: &DeadLetter) -> Self {
        let r = d.task.clone().unwrap_or_default();
        Self {
            id: d.id,
            controller: r.controller,
            request_id: r.request_id,
            subprocessor: r.subprocessor,
            sequence: d.sequence,
            rejections: d.rejections,
            last_rejection: d.last_rejection.clone(),
            rejected_at: Time::from_proto(d.rejected_at.as_ref()),
            dead_lettered_at: Time::from_proto(d.dead_lettered_at.as_ref()),
            superseded_at: Time::from_proto(d.superseded_at.as_ref()),
            carries_certificate: d.carries_certificate,
        }
    }
}

#[derive(Debug, Serialize)]
struct DeadLetterListView {
    dead_letters: Vec<DeadLetterView>,
}

impl Render for DeadLetterListView {
    fn to_table(&self) -> String {
        if self.dead_letters.is_empty() {
            return "no dead-lettered acknowledgements\n".into();
        }
        let mut t = Table::new([
            "ID",
            "CONTROLLER",
            "REQUEST",
            "SUBPROCESSOR",
            "SEQ",
            "REJECTIONS",
            "SINCE",
            "SUPERSEDED",
            "CERTIFICATE",
            "LAST REJECTION",
        ]);
        for v in &self.dead_letters {
            t.row([
                v.id.to_string(),
                clean(&v.controller),
                clean(&v.request_id),
                clean(&v.subprocessor),
                v.sequence.to_string(),
                v.rejections.to_string(),
                v.dead_lettered_at
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
                // Empty: still needs an operator; a time: the registry has read the state.
                v.superseded_at.map(|d| d.to_string()).unwrap_or_default(),
                // Only the acknowledgement brings the registry its certificate.
                if v.carries_certificate {
                    "yes, requeue".to_string()
                } else {
                    String::new()
                },
                clean(&v.last_rejection),
            ]);
        }
        t.render()
    }
}

#[derive(Debug, Serialize)]
struct RequeuedView {
    requeued: i64,
}

impl Render for RequeuedView {
    fn to_table(&self) -> String {
        format!("dead letter {} requeued\n", self.requeued)
    }
}

/// A channel to the processor `args` names, with the TLS files of `settings` (from
/// [`crate::settings::resolve_for_processor`]: its registry identity may be empty).
pub(super) fn connect(
    args: &ProcessorArgs,
    settings: &ConnectionSettings,
) -> Result<Channel, Failure> {
    let tls = settings.tls.client_config().map_err(Failure::Setup)?;
    let identity = args.processor_identity.clone().or_else(|| {
        // The development PKI's processor, when the registry is also the development one.
        (settings.server_identity == "spiffe://dsrelay.dev/registry/controller")
            .then(|| DEV_PROCESSOR_IDENTITY.to_string())
    });
    let Some(identity) = identity else {
        return Err(Failure::Setup(anyhow::anyhow!(
            "no processor identity: give --processor-identity, the identity the processor's \
             certificate carries (only the development PKI implies one, \
             {DEV_PROCESSOR_IDENTITY})"
        )));
    };
    dsrelay_runtime::tls::channel(&args.processor, Some(identity), &tls).map_err(Failure::Setup)
}

/// A task state as `--state` names it (`in-progress`).
fn state_flag(state: i32) -> String {
    task_state_name(state).to_lowercase().replace('_', "-")
}

fn task_ref(t: &TaskRefArgs) -> Option<TaskRef> {
    Some(TaskRef {
        controller: t.controller.clone(),
        request_id: t.request_id.clone(),
        subprocessor: t.subprocessor.clone(),
    })
}

fn failed(status: tonic::Status, endpoint: &str) -> Failure {
    Failure::Rpc {
        status,
        endpoint: endpoint.to_string(),
        server: "processor",
    }
}

/// Every dead letter at the processor at `endpoint`, a page at a time: `page(after_id)` asks
/// for the page after `after_id`.
///
/// Each page must end past the one before: a processor that answered `truncated` with a page
/// that does not (or with no dead letters at all) would have us ask the same thing forever,
/// growing the list each time.
async fn all_dead_letters<F, Fut>(endpoint: &str, mut page: F) -> Result<Vec<DeadLetter>, Failure>
where
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Result<DeadLetterList, tonic::Status>>,
{
    let mut dead_letters = Vec::new();
    let mut after_id = 0;
    loop {
        let answer = page(after_id).await.map_err(|s| failed(s, endpoint))?;
        let last = answer.dead_letters.last().map(|d| d.id);
        dead_letters.extend(answer.dead_letters);
        if !answer.truncated {
            return Ok(dead_letters);
        }
        match last {
            Some(last) if last > after_id => after_id = last,
            Some(last) => {
                return Err(Failure::BadAnswer(format!(
                    "the processor at {endpoint} answered the page after dead letter {after_id} \
                     with one ending at id {last}, not past it, and said more follow; \
                     stopping, as asking again would never end"
                )))
            }
            None => {
                return Err(Failure::BadAnswer(format!(
                    "the processor at {endpoint} answered the page after dead letter {after_id} \
                     with no dead letters, and said more follow; stopping, as asking again \
                     would never end"
                )))
            }
        }
    }
}

/// Every manual task at the processor at `endpoint`, a page at a time: `page(token)` asks
/// for the page `token` names (empty: the first).
///
/// A processor that names a page this listing followed already (not only the last, as in
/// A, B, A) would have us ask forever, growing the list each time.
async fn all_tasks<F, Fut>(endpoint: &str, mut page: F) -> Result<Vec<ManualTask>, Failure>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<ManualTaskList, tonic::Status>>,
{
    let mut tasks = Vec::new();
    let mut seen = HashSet::new();
    let mut token = String::new();
    loop {
        let answer = page(token).await.map_err(|s| failed(s, endpoint))?;
        tasks.extend(answer.tasks);
        if answer.next_page_token.is_empty() {
            return Ok(tasks);
        }
        if !seen.insert(answer.next_page_token.clone()) {
            return Err(Failure::BadAnswer(format!(
                "the processor at {endpoint} named page token {:?} as the next page, which \
                 this listing had already followed; stopping, as asking again would never end",
                answer.next_page_token
            )));
        }
        token = answer.next_page_token;
    }
}

/// Runs a `tasks` subcommand.
pub(crate) async fn run(
    cmd: &TasksCommand,
    settings: &ConnectionSettings,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    match cmd {
        TasksCommand::List {
            processor,
            subprocessor,
            states,
        } => {
            let mut wanted = Vec::new();
            for name in states {
                let proto = format!(
                    "TASK_STATE_{}",
                    name.trim().to_uppercase().replace('-', "_")
                );
                match dsrelay_sdk::proto::TaskState::from_str_name(&proto) {
                    Some(s) if s != dsrelay_sdk::proto::TaskState::Unspecified => {
                        if !wanted.contains(&(s as i32)) {
                            wanted.push(s as i32);
                        }
                    }
                    _ => {
                        return Err(Failure::Usage(format!(
                            "--state {name:?} is not a task state (pending, in-progress, \
                             completed, not-found, retained, refused, failed, \
                             waiting-for-operator, cancelled)"
                        )))
                    }
                }
            }
            let client = ProcessorOperatorServiceClient::new(connect(processor, settings)?);
            // Every page: the processor ends one at 100 tasks or fewer when they are large.
            let tasks = all_tasks(&processor.processor, |page_token| {
                let mut client = client.clone();
                let request = ListManualTasksRequest {
                    subprocessor: subprocessor.clone().unwrap_or_default(),
                    limit: 0,
                    states: wanted.clone(),
                    page_token,
                };
                async move {
                    client
                        .list_manual_tasks(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
            let view = TaskListView {
                tasks: tasks.iter().map(TaskView::listed).collect(),
                states: wanted.iter().map(|&s| state_flag(s)).collect(),
            };
            emit(io.out, io.format, &view, false)?;
        }
        TasksCommand::Complete {
            processor,
            task,
            evidence,
            records,
            not_found,
        } => {
            let mut client = ProcessorOperatorServiceClient::new(connect(processor, settings)?);
            let done = client
                .complete_manual_task(CompleteManualTaskRequest {
                    task: task_ref(task),
                    not_found: *not_found,
                    records_affected: *records,
                    evidence_note: evidence.clone(),
                })
                .await
                .map_err(|s| failed(s, &processor.processor))?
                .into_inner();
            emit(io.out, io.format, &TaskView::from(&done), false)?;
        }
        TasksCommand::Refuse {
            processor,
            task,
            reason,
        } => {
            let mut client = ProcessorOperatorServiceClient::new(connect(processor, settings)?);
            let done = client
                .refuse_manual_task(RefuseManualTaskRequest {
                    task: task_ref(task),
                    reason: reason.clone(),
                })
                .await
                .map_err(|s| failed(s, &processor.processor))?
                .into_inner();
            emit(io.out, io.format, &TaskView::from(&done), false)?;
        }
        TasksCommand::Retry {
            processor,
            task,
            note,
        } => {
            let mut client = ProcessorOperatorServiceClient::new(connect(processor, settings)?);
            let retried = client
                .retry_task(RetryTaskRequest {
                    task: task_ref(task),
                    note: note.clone(),
                })
                .await
                .map_err(|s| failed(s, &processor.processor))?
                .into_inner();
            emit(io.out, io.format, &TaskView::from(&retried), false)?;
        }
        TasksCommand::DeadLetters { processor } => {
            let client = ProcessorOperatorServiceClient::new(connect(processor, settings)?);
            let dead_letters = all_dead_letters(&processor.processor, |after_id| {
                let mut client = client.clone();
                async move {
                    client
                        .list_dead_letters(ListDeadLettersRequest {
                            limit: 500,
                            after_id,
                        })
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .await?;
            let view = DeadLetterListView {
                dead_letters: dead_letters.iter().map(DeadLetterView::from).collect(),
            };
            emit(io.out, io.format, &view, false)?;
        }
        TasksCommand::Requeue { processor, id } => {
            let mut client = ProcessorOperatorServiceClient::new(connect(processor, settings)?);
            client
                .requeue_dead_letter(RequeueDeadLetterRequest { id: *id })
                .await
                .map_err(|s| failed(s, &processor.processor))?;
            emit(io.out, io.format, &RequeuedView { requeued: *id }, false)?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// The parameters read as the operator enters them, as the request's own table shows
    /// them: no debug quoting, no escaped characters, control characters as spaces.
    #[test]
    fn parameters_are_printed_as_entered() {
        use dsrelay_sdk::proto::{ContractEnd, FieldCorrection, RequestParameters};
        let correction = |field: &str, new_value: &str| FieldCorrection {
            field: field.into(),
            new_value: new_value.into(),
        };
        let task = |kind: RequestKind, parameters: RequestParameters| {
            TaskView::from(&ManualTask {
                kind: kind as i32,
                parameters: Some(parameters),
                ..Default::default()
            })
        };
        let rectify = task(
            RequestKind::Rectification,
            RequestParameters {
                corrections: vec![
                    correction("surname", "Mäkinen-\"Ö\" \\ jr"),
                    correction("address", "Kotikatu 7\nB 12"),
                ],
                ..Default::default()
            },
        );
        assert_eq!(
            rectify.parameters_cell(),
            "correct surname = Mäkinen-\"Ö\" \\ jr, address = Kotikatu 7 B 12"
        );
        let transfer = task(
            RequestKind::Transfer,
            RequestParameters {
                transfer_recipient: "successor-bureau".into(),
                ..Default::default()
            },
        );
        assert_eq!(transfer.parameters_cell(), "to recipient successor-bureau");
        let contract_end = task(
            RequestKind::ContractEnd,
            RequestParameters {
                contract_end: Some(ContractEnd {
                    transfer_recipient: "successor-bureau".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert!(
            (contract_end.parameters_cell()).ends_with(", to recipient successor-bureau"),
            "{}",
            contract_end.parameters_cell()
        );
    }

    fn page(ids: &[i64], truncated: bool) -> DeadLetterList {
        DeadLetterList {
            dead_letters: ids
                .iter()
                .map(|&id| DeadLetter {
                    id,
                    ..Default::default()
                })
                .collect(),
            truncated,
        }
    }

    /// Lists with a processor that answers `answer(after_id)`, recording what was asked;
    /// past 10 calls it answers ABORTED, so a listing that never ends fails instead of
    /// hanging the test.
    async fn list(
        answer: impl Fn(i64) -> DeadLetterList,
    ) -> (Result<Vec<DeadLetter>, Failure>, Vec<i64>) {
        let asked = RefCell::new(Vec::new());
        let result = all_dead_letters("https://processor:50052", |after_id| {
            asked.borrow_mut().push(after_id);
            let calls = asked.borrow().len();
            let answer = if calls > 10 {
                Err(tonic::Status::aborted("asked more than 10 times"))
            } else {
                Ok(answer(after_id))
            };
            std::future::ready(answer)
        })
        .await;
        (result, asked.into_inner())
    }

    #[tokio::test]
    async fn dead_letter_pages_are_read_until_not_truncated() {
        let (result, asked) = list(|after_id| match after_id {
            0 => page(&[1, 2], true),
            _ => page(&[5], false),
        })
        .await;
        let ids: Vec<i64> = result.unwrap().iter().map(|d| d.id).collect();
        assert_eq!(ids, [1, 2, 5]);
        assert_eq!(asked, [0, 2]);
    }

    /// A superseded dead letter shows when the registry came to hold its task's state, in the
    /// table and in JSON; one not superseded shows nothing there.
    #[test]
    fn a_superseded_dead_letter_is_marked() {
        let at = |seconds| Some(dsrelay_proto::prost_types::Timestamp { seconds, nanos: 0 });
        let letters = [
            DeadLetter {
                id: 1,
                dead_lettered_at: at(1_700_000_000),
                superseded_at: at(1_700_000_600),
                ..Default::default()
            },
            DeadLetter {
                id: 2,
                dead_lettered_at: at(1_700_000_000),
                ..Default::default()
            },
        ];
        let view = DeadLetterListView {
            dead_letters: letters.iter().map(DeadLetterView::from).collect(),
        };
        let table = view.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("SUPERSEDED"), "{table}");
        assert!(lines[1].contains("2023-11-14T22:23:20Z"), "{table}");
        assert!(!lines[2].contains("2023-11-14T22:23:20Z"), "{table}");
        let json = serde_json::to_value(&view).expect("json");
        let superseded: Vec<&serde_json::Value> = json["dead_letters"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|d| &d["superseded_at"])
            .collect();
        assert_eq!(
            superseded,
            [
                &serde_json::json!("2023-11-14T22:23:20Z"),
                &serde_json::Value::Null
            ]
        );
    }

    /// A dead letter carrying a deletion certificate says so, in the table (asking for a
    /// requeue) and in JSON; one without says nothing there.
    #[test]
    fn a_dead_letter_with_a_certificate_is_marked() {
        let letters = [
            DeadLetter {
                id: 1,
                carries_certificate: true,
                ..Default::default()
            },
            DeadLetter {
                id: 2,
                ..Default::default()
            },
        ];
        let view = DeadLetterListView {
            dead_letters: letters.iter().map(DeadLetterView::from).collect(),
        };
        let table = view.to_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("CERTIFICATE"), "{table}");
        assert!(lines[1].contains("yes, requeue"), "{table}");
        assert!(!lines[2].contains("yes"), "{table}");
        let json = serde_json::to_value(&view).expect("json");
        let marks: Vec<&serde_json::Value> = json["dead_letters"]
            .as_array()
            .expect("a list")
            .iter()
            .map(|d| &d["carries_certificate"])
            .collect();
        assert_eq!(marks, [&serde_json::json!(true), &serde_json::json!(false)]);
    }

    #[tokio::test]
    async fn a_truncated_page_that_does_not_advance_is_an_error() {
        for repeat in [2, 1] {
            let (result, asked) = list(|after_id| match after_id {
                0 => page(&[1, 2], true),
                _ => page(&[repeat], true),
            })
            .await;
            let failure = result.unwrap_err();
            assert!(matches!(failure, Failure::BadAnswer(_)), "{failure:?}");
            assert_eq!(failure.exit_code(), crate::EXIT_FAILURE);
            let message = failure.message();
            assert!(
                message.contains("https://processor:50052")
                    && message.contains(&format!(
                        "after dead letter 2 with one ending at id {repeat}"
                    )),
                "{message}"
            );
            assert_eq!(asked, [0, 2]);
        }
    }

    /// Lists tasks with a processor that names `next(token)` as the page after `token`;
    /// returns the outcome and the tokens asked for. Past 10 calls it answers ABORTED, so a
    /// listing that never ends fails instead of hanging the test.
    async fn list_tasks(
        next: impl Fn(&str) -> &'static str,
    ) -> (Result<Vec<ManualTask>, Failure>, Vec<String>) {
        let asked = RefCell::new(Vec::new());
        let result = all_tasks("https://processor:50052", |token| {
            asked.borrow_mut().push(token.clone());
            let answer = if asked.borrow().len() > 10 {
                Err(tonic::Status::aborted("asked more than 10 times"))
            } else {
                Ok(ManualTaskList {
                    tasks: vec![ManualTask {
                        instructions: format!("task after {token:?}"),
                        ..Default::default()
                    }],
                    next_page_token: next(&token).into(),
                })
            };
            std::future::ready(answer)
        })
        .await;
        (result, asked.into_inner())
    }

    #[tokio::test]
    async fn task_pages_are_read_until_no_token_follows() {
        let (result, asked) = list_tasks(|t| match t {
            "" => "A",
            "A" => "B",
            _ => "",
        })
        .await;
        assert_eq!(result.unwrap().len(), 3);
        assert_eq!(asked, ["", "A", "B"]);
    }

    #[tokio::test]
    async fn a_task_page_token_followed_before_is_a_bad_answer() {
        // The same token again, and a cycle A, B, A.
        for (next, pages) in [
            (&(|_: &str| "A") as &dyn Fn(&str) -> &'static str, 1),
            (&|t: &str| if t == "A" { "B" } else { "A" }, 2),
        ] {
            let (result, asked) = list_tasks(next).await;
            let failure = result.unwrap_err();
            assert!(matches!(failure, Failure::BadAnswer(_)), "{failure:?}");
            assert_eq!(failure.exit_code(), crate::EXIT_FAILURE);
            let message = failure.message();
            assert!(
                message.contains("https://processor:50052")
                    && message.contains("page token \"A\"")
                    && message.contains("already followed"),
                "{message}"
            );
            assert_eq!(asked.len(), pages + 1, "{asked:?}");
        }
    }

    #[tokio::test]
    async fn an_empty_truncated_page_is_an_error() {
        let (result, asked) = list(|_| page(&[], true)).await;
        let message = result.unwrap_err().message();
        assert!(
            message.contains("after dead letter 0 with no dead letters"),
            "{message}"
        );
        assert_eq!(asked, [0]);
    }
}
