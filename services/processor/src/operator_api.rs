//! The processor's operator API: people confirm or refuse tasks of manual connectors, run a
//! failed or refused task again once its cause is fixed, see and requeue acknowledgements
//! their registry kept rejecting (dead letters), and read the processor's audit trail and
//! its signed checkpoints.

use std::sync::Arc;

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::processor_operator_service_server::ProcessorOperatorService;
use dsrelay_proto::v1::{
    CompleteManualTaskRequest, ContractEndList, DeadLetter, DeadLetterList, Evidence,
    ListContractEndsRequest, ListDeadLettersRequest, ListManualTasksRequest,
    ListProcessorAuditCheckpointsRequest, ListProcessorAuditEntriesRequest, ManualTask,
    ManualTaskList, ProcessorAuditCheckpoint, ProcessorAuditCheckpoints, ProcessorAuditEntries,
    ProcessorAuditEntry, ProcessorContractEnd, RefuseManualTaskRequest, RequeueDeadLetterRequest,
    RequeueDeadLetterResponse, RetryTaskRequest, TaskRef, TaskState,
};
use dsrelay_runtime::audit::checkpoint::Checkpoint;
use dsrelay_runtime::grpc::Authorizer;
use dsrelay_runtime::identity::{identity_in_text, text_violation, FieldViolation};
use dsrelay_runtime::names::{unknown_name, PartyKind};
use tonic::{Request, Response, Status};

use crate::api::ApiError;
use crate::app::Shared;
use dsrelay_connectors::ExportedFile;

use crate::store::{retry_refusal, ManualCursor, ManualRow, Retried, RetryRefusal, TaskKey};
use crate::task_machine::{decide, Context, Decision, Event};

/// The ProcessorOperatorService implementation.
#[derive(Clone)]
pub(crate) struct OperatorApi {
    shared: Arc<Shared>,
    /// The operators, by certificate identity, which also names them (one role).
    operators: Arc<Authorizer<()>>,
    /// The controllers, who may fetch the audit checkpoints (hashes only) and nothing else
    /// here: the entries name every controller's requests.
    controllers: Arc<Authorizer<()>>,
}

/// How much longer than the service's `call_limit_ms` an operator's confirmation or refusal
/// holds its task: the call is ended at its limit, so its hold never runs out while it can
/// still record; one that a dead replica or a dropped call left runs out after this.
const OPERATOR_HOLD_MARGIN_MS: i64 = 10_000;

/// An operator's hold on a task: released when the call ends, or, if the call is dropped
/// before it could release it, by a task of its own.
struct OperatorHold {
    store: crate::store::Store,
    key: TaskKey,
    token: Option<String>,
}

impl OperatorHold {
    async fn release(mut self) {
        if let Some(token) = self.token.take() {
            if let Err(e) = self.store.release_operator_hold(&self.key, &token).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "releasing an operator's hold on a task failed; it runs out by itself"
                );
            }
        }
    }
}

impl Drop for OperatorHold {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            let (store, key) = (self.store.clone(), self.key.clone());
            tokio::spawn(async move {
                let _ = store.release_operator_hold(&key, &token).await;
            });
        }
    }
}

impl OperatorApi {
    /// Handlers over `shared`.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let operators = Authorizer::new(
            shared
                .config
                .operators
                .iter()
                .map(|identity| (identity.clone(), (), identity.clone())),
            "is not an operator of this processor",
        );
        let controllers = Authorizer::new(
            shared
                .config
                .controllers
                .iter()
                .map(|c| (c.identity.clone(), (), c.identity.clone())),
            "is neither an operator nor a controller of this processor",
        );
        Self {
            shared,
            operators: Arc::new(operators),
            controllers: Arc::new(controllers),
        }
    }

    /// The operator calling, by identity, or PERMISSION_DENIED.
    fn operator<T>(&self, req: &Request<T>) -> Result<String, ApiError> {
        Ok(self.operators.caller(req)?.name)
    }

    /// An operator or a controller calling, by identity, or PERMISSION_DENIED: those who may
    /// hold the processor to its checkpoints.
    fn checkpoint_reader<T>(&self, req: &Request<T>) -> Result<String, ApiError> {
        match self.operators.caller(req) {
            Ok(operator) => Ok(operator.name),
            Err(_) => Ok(self.controllers.caller(req)?.name),
        }
    }

    /// Writes `returned-by-hand.json` into the task's export folder: who returned the data by
    /// hand (a contract end's to the controller, a subject's to them or to their recipient),
    /// when, how many records, and the operator's note.
    async fn write_return_record(
        &self,
        key: &TaskKey,
        records_affected: i64,
        note: &str,
        by: &str,
        now: i64,
    ) -> Result<ExportedFile, ApiError> {
        let held = self
            .shared
            .config
            .subprocessors
            .iter()
            .find(|s| s.name == key.subprocessor)
            .map_or(&[][..], |s| &s.categories[..]);
        let sink = crate::exports::sink(&self.shared.config.data_dir, key, held, &[]);
        let unexpected = |e: String| ApiError::unexpected(anyhow::anyhow!(e));
        crate::exports::reset(&sink).await.map_err(|e| {
            unexpected(format!(
                "preparing the export folder {}: {e}",
                sink.dir().display()
            ))
        })?;
        let returned_at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let record = serde_json::json!({
            "controller": key.controller,
            "request_id": key.request_id,
            "subprocessor": key.subprocessor,
            "returned_by_hand": true,
            "returned_by": by,
            "returned_at": returned_at,
            "records": records_affected,
            "note": note,
        });
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| unexpected(e.to_string()))?;
        let mut out = sink
            .file("returned-by-hand.json", dsrelay_connectors::export::JSON)
            .await
            .map_err(|e| unexpected(e.to_string()))?;
        out.write(&bytes)
            .await
            .map_err(|e| unexpected(e.to_string()))?;
        out.finish().await.map_err(|e| unexpected(e.to_string()))
    }

    /// Whether `subprocessor` is configured here (a task outlives its removal).
    fn configured(&self, subprocessor: &str) -> bool {
        (self.shared.config.subprocessors.iter()).any(|s| s.name == subprocessor)
    }

    /// [`ProcessorOperatorService::retry_task`] of `key`'s task, with the operator's `note`.
    async fn retry(&self, key: &TaskKey, note: &str, by: &str) -> Result<ManualTask, ApiError> {
        let store = &self.shared.store;
        let named = format!("{}/{}/{}", key.controller, key.request_id, key.subprocessor);
        let row = store
            .manual_task(key)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no task {named}")))?;
        no_identity_in(&row, "note", note)?;
        let precondition = |why: String| Err(ApiError::failed_precondition(why));
        let event = Event::OperatorRetry { note, by };
        let now = self.shared.clock.now_ms();
        let transition = match decide(&row.task.current(), event, &Context::at(now)) {
            Decision::Move(t) => t,
            Decision::Reject(why) => return precondition(format!("task {named}: {why}")),
            other => {
                return Err(ApiError::unexpected(anyhow::anyhow!(
                    "unexpected decision {}",
                    other.name()
                )))
            }
        };
        let configured = self.configured(&key.subprocessor);
        let retried = match store
            .retry_task(key, row.task.sequence, &transition, now, by, configured)
            .await?
        {
            Retried::Retried(row) => row,
            Retried::Refused(refusal) => {
                return precondition(format!(
                    "task {named}: {}",
                    refusal_words(refusal, &key.subprocessor)
                ))
            }
            Retried::Changed => {
                return Err(ApiError::aborted(
                    "the task changed meanwhile (retried by someone else); list again",
                ))
            }
        };
        tracing::info!(
            request_id = %key.request_id,
            subprocessor = %key.subprocessor,
            operator = by,
            state = row.task.state.as_str_name(),
            "failed or refused task retried by an operator"
        );
        self.shared.ack_wakeup.notify_one();
        self.shared.task_wakeup.notify_one();
        Ok(to_proto(*retried))
    }

    async fn finish(
        &self,
        task: Option<TaskRef>,
        event: Event<'_>,
        by: &str,
    ) -> Result<ManualTask, ApiError> {
        let key = task_key(task)?;
        // Until the transition is committed the task is held, in the store, so that two
        // operators acting on it at once (on this replica or on another sharing the store and
        // the data folder) cannot both write its return record: the second would replace the
        // file whose size and SHA-256 the first one's transition recorded, and the upload of
        // a record that no longer matches would fail a return that was done.
        let store = &self.shared.store;
        let hold_ms = i64::try_from(self.shared.config.service.call_limit_ms)
            .unwrap_or(i64::MAX)
            .saturating_add(OPERATOR_HOLD_MARGIN_MS);
        let Some(token) = store.hold_for_operator(&key, hold_ms).await? else {
            return Err(match store.manual_task(&key).await? {
                None => ApiError::not_found(format!(
                    "no task {}/{}/{}",
                    key.controller, key.request_id, key.subprocessor
                )),
                Some(_) => ApiError::aborted(
                    "another operator is confirming or refusing this task right now; list \
                     again in a moment",
                ),
            });
        };
        let hold = OperatorHold {
            store: store.clone(),
            key: key.clone(),
            token: Some(token),
        };
        let finished = self.finish_held(&key, event, by).await;
        hold.release().await;
        finished
    }

    /// [`OperatorApi::finish`] once the task is held.
    async fn finish_held(
        &self,
        key: &TaskKey,
        event: Event<'_>,
        by: &str,
    ) -> Result<ManualTask, ApiError> {
        let store = &self.shared.store;
        let row = store.manual_task(key).await?.ok_or_else(|| {
            ApiError::not_found(format!(
                "no task {}/{}/{}",
                key.controller, key.request_id, key.subprocessor
            ))
        })?;
        // The evidence or reason travels to the controller and stays in its trail until the
        // request is forgotten: checked before anything (the return record) is written.
        let (field, text) = match &event {
            Event::OperatorComplete { note, .. } => ("evidence_note", *note),
            Event::OperatorRefuse { reason, .. } => ("reason", *reason),
            _ => ("", ""),
        };
        no_identity_in(&row, field, text)?;
        let now = self.shared.clock.now_ms();
        // Whether the request asks for the data itself; a forgotten body is of a request
        // long finished, which has no task waiting for an operator.
        let exports = row
            .request
            .as_ref()
            .is_some_and(|r| crate::exports::exports(r.kind()));
        // A return done by hand (a contract end's, or a return of data or transfer) leaves a
        // record, which travels as the part.
        let record = match (&event, row.task.phase, row.task.state) {
            (
                Event::OperatorComplete {
                    not_found,
                    records_affected,
                    note,
                    by,
                    ..
                },
                phase,
                TaskState::WaitingForOperator,
            ) if crate::task_machine::returned_by_hand(phase, exports, *not_found) => Some(
                self.write_return_record(key, *records_affected, note, by, now)
                    .await?,
            ),
            _ => None,
        };
        let event = match event {
            Event::OperatorComplete {
                not_found,
                records_affected,
                note,
                by,
                ..
            } => Event::OperatorComplete {
                not_found,
                records_affected,
                note,
                by,
                exports,
                record: record.as_ref(),
            },
            Event::OperatorRefuse { reason, by, .. } => Event::OperatorRefuse {
                reason,
                by,
                exports,
            },
            other => other,
        };
        let transition = match decide(&row.task.current(), event, &Context::at(now)) {
            Decision::Move(t) => t,
            Decision::Reject(why) => return Err(ApiError::failed_precondition(why)),
            other => {
                return Err(ApiError::unexpected(anyhow::anyhow!(
                    "unexpected decision {}",
                    other.name()
                )))
            }
        };
        let (sequence, attempts) = (row.task.sequence, row.task.attempts);
        let moved = store
            .operator_transition(key, sequence, &transition, now, attempts, by)
            .await?;
        if moved.is_none() {
            return Err(ApiError::aborted(
                "the task changed meanwhile (cancelled, or confirmed by someone else); list again",
            ));
        }
        tracing::info!(
            request_id = %key.request_id,
            subprocessor = %key.subprocessor,
            operator = by,
            state = transition.state.as_str_name(),
            "manual task confirmed by an operator"
        );
        self.shared.ack_wakeup.notify_one();
        if transition.discard_export {
            crate::forget::remove_discarded_export(&self.shared, key).await;
        }
        let row = store.manual_task(key).await?.ok_or_else(|| {
            ApiError::unexpected(anyhow::anyhow!(
                "task {}/{}/{} vanished after its transition",
                key.controller,
                key.request_id,
                key.subprocessor
            ))
        })?;
        Ok(to_proto(row))
    }
}

/// Refuses an operator's `text` (in `field`) that holds one of `row`'s request's identities:
/// it travels to the controller and stays in its trail until the request is forgotten.
fn no_identity_in(row: &ManualRow, field: &str, text: &str) -> Result<(), ApiError> {
    let Some(identities) = row.request.as_ref().map(|r| &r.identities[..]) else {
        return Ok(());
    };
    match identity_in_text(identities, text) {
        Some(kind) => Err(ApiError::invalid([FieldViolation::new(
            field,
            format!(
                "contains the subject's {kind}, one of the request's identities: it is kept \
                 and shown to the controller, so leave the subject's identities out (the task \
                 already says whom it is about)"
            ),
        )])),
        None => Ok(()),
    }
}

fn task_key(task: Option<TaskRef>) -> Result<TaskKey, ApiError> {
    let t = task.ok_or_else(|| ApiError::invalid([FieldViolation::new("task", "is required")]))?;
    ApiError::ensure_valid(
        [
            ("task.controller", &t.controller),
            ("task.request_id", &t.request_id),
            ("task.subprocessor", &t.subprocessor),
        ]
        .into_iter()
        .filter_map(|(field, value)| text_violation(field, value, 128, true)),
    )?;
    Ok(TaskKey {
        controller: t.controller,
        request_id: t.request_id,
        subprocessor: t.subprocessor,
    })
}

/// Why RetryTask does not take a task: the reason ListManualTasks lists as the task's
/// `retry_refusal`, and RetryTask's refusal gives after the task's name.
fn refusal_words(refusal: RetryRefusal, subprocessor: &str) -> String {
    match refusal {
        RetryRefusal::Forgotten => "its request was forgotten (its identities removed after \
            forget_after_days), so there is nothing to run it with: the controller submits a \
            new request"
            .into(),
        RetryRefusal::Unconfigured => format!(
            "subprocessor {subprocessor} is no longer configured here, so it has no holder to \
             run on"
        ),
        RetryRefusal::Cancelled => {
            "the controller cancelled its request: it is not run again".into()
        }
        RetryRefusal::WasRetained => "it failed in a retention run (its data had been \
            RETAINED, and its request answered): it is not retried, as that would reopen the \
            answered request; the controller submits a new erasure"
            .into(),
    }
}

/// A required note or reason of an operator.
fn note_violation(field: &str, value: &str) -> Option<FieldViolation> {
    text_violation(field, value, 4096, true)
}

/// The most one page of ListManualTasks takes, well below the 4 MiB a client decodes by
/// default: a task can carry 32 corrections of 1 KiB, notes, a reason and the holder's last
/// error.
const MAX_MANUAL_PAGE_BYTES: usize = 3 << 20;

/// The first `limit` of `rows` that fit in `max_bytes` (at least one), each with its
/// `retry_refusal`, and where the page ended when more follow.
fn manual_page(
    rows: Vec<(ManualRow, String)>,
    limit: usize,
    max_bytes: usize,
) -> (Vec<ManualTask>, Option<ManualCursor>) {
    use dsrelay_proto::prost::Message;
    let mut tasks = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    let total = rows.len();
    for (row, retry_refusal) in rows {
        if tasks.len() == limit {
            break;
        }
        let cursor = ManualCursor {
            updated_at: row.task.updated_at,
            key: row.task.key.clone(),
        };
        let task = ManualTask {
            retry_refusal,
            ..to_proto(row)
        };
        // A field's tag and length come on top of the task's own bytes.
        let size = task.encoded_len() + 8;
        if !tasks.is_empty() && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        tasks.push(task);
        last = Some(cursor);
    }
    let more = tasks.len() < total;
    (tasks, last.filter(|_| more))
}

/// A page's end as a token: the change time, then the key's parts as hex (so no separator
/// can appear inside one).
fn page_token(c: &ManualCursor) -> String {
    format!(
        "{}.{}.{}.{}",
        c.updated_at,
        hex::encode(&c.key.controller),
        hex::encode(&c.key.request_id),
        hex::encode(&c.key.subprocessor)
    )
}

fn parse_page_token(token: &str) -> Option<ManualCursor> {
    let mut parts = token.split('.');
    let updated_at = parts.next()?.parse().ok()?;
    // No key this service gives holds a control character; PostgreSQL refuses a NUL in text
    // (22021), which must be the caller's INVALID_ARGUMENT, not a database failure.
    let mut text = || {
        String::from_utf8(hex::decode(parts.next()?).ok()?)
            .ok()
            .filter(|t| !t.chars().any(char::is_control))
    };
    let key = TaskKey {
        controller: text()?,
        request_id: text()?,
        subprocessor: text()?,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(ManualCursor { updated_at, key })
}

fn to_proto(r: ManualRow) -> ManualTask {
    let body = r.request.unwrap_or_default();
    ManualTask {
        task: Some(TaskRef {
            controller: r.task.key.controller.clone(),
            request_id: r.task.key.request_id.clone(),
            subprocessor: r.task.key.subprocessor.clone(),
        }),
        kind: body.kind,
        identities: body.identities,
        scope: body.scope,
        parameters: body.parameters,
        state: r.task.state as i32,
        // Only the manual connector hands a task to an operator, and its note then is the
        // work order: its kind's lead and the configured text (`dsrelay_connectors::manual`).
        // Any other note is evidence, or what a holder said, and stays in `evidence`.
        instructions: if r.task.state == TaskState::WaitingForOperator {
            r.task.note.clone()
        } else {
            String::new()
        },
        waiting_since: r.waiting_since.map(timestamp_from_millis),
        due_at: Some(timestamp_from_millis(r.due_at)),
        evidence: Some(Evidence {
            records_affected: r.task.records_affected,
            note: r.task.note,
            confirmed: r.task.confirmed,
            transfer_receipt: r.task.transfer_receipt,
        }),
        reason: r.task.reason,
        attempts: r.task.attempts.clamp(0, i64::from(u32::MAX)) as u32,
        last_error: r.last_error,
        // Only a listing says it: see `list_manual_tasks`.
        retry_refusal: String::new(),
        holder_called_at: r.task.call_started_at.map(timestamp_from_millis),
    }
}

/// A page size of the audit RPCs: 1..=1000, 0 meaning 500.
fn audit_page_size(page_size: u32) -> Result<u32, ApiError> {
    match page_size {
        0 => Ok(500),
        n @ 1..=1000 => Ok(n),
        _ => Err(ApiError::invalid([FieldViolation::new(
            "page_size",
            "must be 0 (default 500) to 1000",
        )])),
    }
}

#[tonic::async_trait]
impl ProcessorOperatorService for OperatorApi {
    async fn list_audit_entries(
        &self,
        req: Request<ListProcessorAuditEntriesRequest>,
    ) -> Result<Response<ProcessorAuditEntries>, Status> {
        self.operator(&req)?;
        let r = req.into_inner();
        let page_size = audit_page_size(r.page_size)?;
        let mut entries = self
            .shared
            .store
            .audit_entries(r.after_seq, i64::from(page_size) + 1)
            .await
            .map_err(ApiError::from)?;
        let next_after_seq = if entries.len() > page_size as usize {
            entries.truncate(page_size as usize);
            entries.last().map_or(0, |e| e.seq)
        } else {
            0
        };
        Ok(Response::new(ProcessorAuditEntries {
            entries: entries
                .into_iter()
                .map(|e| ProcessorAuditEntry {
                    seq: e.seq,
                    occurred_at: Some(timestamp_from_millis(e.occurred_at)),
                    request_id: e.request_id,
                    event: e.event_type,
                    actor: e.actor,
                    detail: e.detail,
                    prev_hash: e.prev_hash,
                    hash: e.hash,
                })
                .collect(),
            next_after_seq,
        }))
    }

    async fn list_audit_checkpoints(
        &self,
        req: Request<ListProcessorAuditCheckpointsRequest>,
    ) -> Result<Response<ProcessorAuditCheckpoints>, Status> {
        self.checkpoint_reader(&req)?;
        let r = req.into_inner();
        let page_size = audit_page_size(r.page_size)? as usize;
        let Some(checkpointer) = &self.shared.checkpoints else {
            return Err(ApiError::failed_precondition(
                "this processor signs no audit checkpoints (audit.checkpoints = false)",
            )
            .into());
        };
        let (page, more) = checkpointer
            .page(r.after_seq, page_size)
            .await
            .map_err(|e| ApiError::data_loss(format!("the checkpoint file: {e:#}")))?;
        let next_after_seq = match page.last() {
            Some(last) if more => {
                Checkpoint::read_unchecked(last)
                    .map_err(ApiError::unexpected)?
                    .seq
            }
            _ => 0,
        };
        let key = checkpointer.public_key();
        Ok(Response::new(ProcessorAuditCheckpoints {
            checkpoints: page
                .into_iter()
                .map(|s| ProcessorAuditCheckpoint {
                    // Checkpoints are signed as UTF-8 JSON text; lossless here.
                    body: String::from_utf8_lossy(&s.body).into_owned(),
                    signature: s.signature,
                    key_id: s.key_id,
                })
                .collect(),
            next_after_seq,
            public_key: key.to_base64(),
            key_id: key.key_id(),
        }))
    }

    async fn list_contract_ends(
        &self,
        req: Request<ListContractEndsRequest>,
    ) -> Result<Response<ContractEndList>, Status> {
        self.operator(&req)?;
        let r = req.into_inner();
        ApiError::ensure_valid(text_violation("controller", &r.controller, 256, false))?;
        let rows = self
            .shared
            .store
            .contract_ends(&r.controller)
            .await
            .map_err(ApiError::from)?;
        if rows.is_empty() {
            let configured: Vec<&str> = (self.shared.config.controllers.iter())
                .map(|c| c.name.as_str())
                .collect();
            if let Some(message) = unknown_name(PartyKind::Controller, &r.controller, &configured) {
                return Err(ApiError::not_found(message).into());
            }
        }
        Ok(Response::new(ContractEndList {
            contract_ends: rows
                .into_iter()
                .map(|c| ProcessorContractEnd {
                    contract_end: Some(crate::store::terms_to_proto(
                        &c.terms,
                        &c.transfer_recipient,
                    )),
                    tasks: c.tasks.iter().map(|t| t.to_status()).collect(),
                    received_at: Some(timestamp_from_millis(c.received_at)),
                    controller: c.controller,
                    request_id: c.request_id,
                })
                .collect(),
        }))
    }

    async fn list_manual_tasks(
        &self,
        req: Request<ListManualTasksRequest>,
    ) -> Result<Response<ManualTaskList>, Status> {
        self.operator(&req)?;
        let r = req.into_inner();
        let mut violations = Vec::new();
        let limit = match r.limit {
            0 => 100,
            n @ 1..=500 => n,
            _ => {
                violations.push(FieldViolation::new(
                    "limit",
                    "must be 0 (default 100) to 500",
                ));
                100
            }
        };
        // Any name, since tasks outlive a subprocessor's removal from the configuration;
        // held to the rules of every text all the same.
        violations.extend(text_violation("subprocessor", &r.subprocessor, 128, false));
        let mut states = Vec::new();
        for (i, s) in r.states.iter().enumerate() {
            match TaskState::try_from(*s) {
                Ok(TaskState::Unspecified) | Err(_) => violations.push(FieldViolation::new(
                    format!("states[{i}]"),
                    format!("{s} is not a task state"),
                )),
                Ok(state) if !states.contains(&state) => states.push(state),
                Ok(_) => {}
            }
        }
        let after = match r.page_token.as_str() {
            "" => None,
            token => match parse_page_token(token) {
                Some(c) => Some(c),
                None => {
                    violations.push(FieldViolation::new(
                        "page_token",
                        "is not a token this processor gave: pass the next_page_token of the \
                         page before, or nothing for the first page",
                    ));
                    None
                }
            },
        };
        ApiError::ensure_valid(violations)?;
        // One more than the page, to know whether another follows.
        let rows = self
            .shared
            .store
            .manual_tasks(
                (!r.subprocessor.is_empty()).then_some(r.subprocessor.as_str()),
                &states,
                after.as_ref(),
                i64::from(limit) + 1,
            )
            .await
            .map_err(ApiError::from)?;
        // RetryTask's own rule, on what it reads, read for the whole page at once.
        let standings = (self.shared.store.retry_standings(&rows).await).map_err(ApiError::from)?;
        let rows = rows
            .into_iter()
            .map(|row| {
                let refusal = (standings.get(&row.task.key))
                    .and_then(|s| retry_refusal(s, self.configured(&row.task.key.subprocessor)))
                    .map(|r| refusal_words(r, &row.task.key.subprocessor))
                    .unwrap_or_default();
                (row, refusal)
            })
            .collect();
        let (tasks, last) = manual_page(rows, limit as usize, MAX_MANUAL_PAGE_BYTES);
        Ok(Response::new(ManualTaskList {
            tasks,
            next_page_token: last.map(|c| page_token(&c)).unwrap_or_default(),
        }))
    }

    async fn complete_manual_task(
        &self,
        req: Request<CompleteManualTaskRequest>,
    ) -> Result<Response<ManualTask>, Status> {
        let by = self.operator(&req)?;
        let r = req.into_inner();
        let negative = (r.records_affected < 0)
            .then(|| FieldViolation::new("records_affected", "must not be negative"));
        ApiError::ensure_valid(
            note_violation("evidence_note", &r.evidence_note)
                .into_iter()
                .chain(negative),
        )?;
        let event = Event::OperatorComplete {
            not_found: r.not_found,
            records_affected: r.records_affected,
            note: &r.evidence_note,
            by: &by,
            // Filled in by `finish`, which reads the request.
            exports: false,
            record: None,
        };
        Ok(Response::new(self.finish(r.task, event, &by).await?))
    }

    async fn refuse_manual_task(
        &self,
        req: Request<RefuseManualTaskRequest>,
    ) -> Result<Response<ManualTask>, Status> {
        let by = self.operator(&req)?;
        let r = req.into_inner();
        ApiError::ensure_valid(note_violation("reason", &r.reason))?;
        let event = Event::OperatorRefuse {
            reason: &r.reason,
            by: &by,
            // Filled in by `finish`, which reads the request.
            exports: false,
        };
        Ok(Response::new(self.finish(r.task, event, &by).await?))
    }

    async fn retry_task(
        &self,
        req: Request<RetryTaskRequest>,
    ) -> Result<Response<ManualTask>, Status> {
        let by = self.operator(&req)?;
        let r = req.into_inner();
        ApiError::ensure_valid(note_violation("note", &r.note))?;
        let key = task_key(r.task)?;
        Ok(Response::new(self.retry(&key, &r.note, &by).await?))
    }

    async fn list_dead_letters(
        &self,
        req: Request<ListDeadLettersRequest>,
    ) -> Result<Response<DeadLetterList>, Status> {
        self.operator(&req)?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n @ 1..=500 => n,
            _ => {
                return Err(ApiError::invalid([FieldViolation::new(
                    "limit",
                    "must be 0 (default 100) to 500",
                )])
                .into())
            }
        };
        if r.after_id < 0 {
            return Err(ApiError::invalid([FieldViolation::new(
                "after_id",
                "must be 0 (from the oldest) or the last id of the page before",
            )])
            .into());
        }
        let mut rows = self
            .shared
            .store
            .dead_letters(i64::from(limit) + 1, r.after_id)
            .await
            .map_err(ApiError::from)?;
        let truncated = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok(Response::new(DeadLetterList {
            truncated,
            dead_letters: rows
                .into_iter()
                .map(|d| DeadLetter {
                    id: d.id,
                    task: Some(TaskRef {
                        controller: d.controller,
                        request_id: d.request_id,
                        subprocessor: d.subprocessor,
                    }),
                    sequence: d.sequence.max(0) as u64,
                    rejections: d.rejections.clamp(0, i64::from(u32::MAX)) as u32,
                    last_rejection: d.last_rejection,
                    rejected_at: Some(timestamp_from_millis(d.rejected_at)),
                    dead_lettered_at: Some(timestamp_from_millis(d.dead_lettered_at)),
                    superseded_at: d.superseded_at.map(timestamp_from_millis),
                    carries_certificate: d.carries_certificate,
                })
                .collect(),
        }))
    }

    async fn requeue_dead_letter(
        &self,
        req: Request<RequeueDeadLetterRequest>,
    ) -> Result<Response<RequeueDeadLetterResponse>, Status> {
        let by = self.operator(&req)?;
        let id = req.into_inner().id;
        if id <= 0 {
            return Err(ApiError::invalid([FieldViolation::new(
                "id",
                "is required (a dead letter's id from ListDeadLetters)",
            )])
            .into());
        }
        let requeued = self
            .shared
            .store
            .requeue_dead_letter(id, &by, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?;
        if !requeued {
            return Err(ApiError::not_found(format!("no dead letter {id}")).into());
        }
        tracing::info!(id, operator = by, "dead-lettered acknowledgement requeued");
        self.shared.ack_wakeup.notify_one();
        Ok(Response::new(RequeueDeadLetterResponse {}))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use dsrelay_connectors::BulkProgress;
    use dsrelay_proto::v1::ContractPhase;

    use super::*;
    use crate::store::TaskRow;

    fn row(i: usize, note_bytes: usize) -> ManualRow {
        ManualRow {
            task: TaskRow {
                key: TaskKey {
                    controller: "controller".into(),
                    request_id: format!("r-{i}"),
                    subprocessor: "archive.é".into(),
                },
                state: TaskState::WaitingForOperator,
                sequence: 1,
                attempts: 1,
                records_affected: 0,
                confirmed: false,
                note: "n".repeat(note_bytes),
                reason: String::new(),
                legal_basis: String::new(),
                retain_until: None,
                updated_at: 1_000 + i as i64,
                handle: None,
                transfer_receipt: None,
                phase: ContractPhase::Unspecified,
                counts: BulkProgress::default(),
                scheduled_at: None,
                cancel_requested_at: None,
                call_started_at: None,
            },
            request: None,
            due_at: 0,
            last_error: String::new(),
            waiting_since: Some(1_000 + i as i64),
        }
    }

    fn ids(tasks: &[ManualTask]) -> Vec<String> {
        tasks
            .iter()
            .map(|t| t.task.as_ref().unwrap().request_id.clone())
            .collect()
    }

    /// [`manual_page`] of `rows`, none refused a retry.
    fn paged(
        rows: Vec<ManualRow>,
        limit: usize,
        max_bytes: usize,
    ) -> (Vec<ManualTask>, Option<ManualCursor>) {
        let rows = rows.into_iter().map(|r| (r, String::new())).collect();
        manual_page(rows, limit, max_bytes)
    }

    #[test]
    fn a_page_ends_at_its_limit_or_its_bytes_and_says_where() {
        // Limit 2 of 3 rows: two tasks, and the second is where the next page starts.
        let (tasks, last) = paged((0..3).map(|i| row(i, 10)).collect(), 2, 1 << 20);
        assert_eq!(ids(&tasks), ["r-0", "r-1"]);
        assert_eq!(last.unwrap().key.request_id, "r-1");
        // All rows there are: no next page.
        let (tasks, last) = paged((0..2).map(|i| row(i, 10)).collect(), 2, 1 << 20);
        assert_eq!(tasks.len(), 2);
        assert!(last.is_none());
        // Large tasks end the page before the limit, within the bytes (each about 8 KB:
        // the note goes out as the instructions and as the evidence).
        let rows: Vec<ManualRow> = (0..10).map(|i| row(i, 4000)).collect();
        let (tasks, last) = paged(rows, 100, 20_000);
        assert_eq!(ids(&tasks), ["r-0", "r-1"]);
        assert_eq!(last.unwrap().key.request_id, "r-1");
        // One task larger than the bytes still goes alone, so paging never stalls.
        let (tasks, last) = paged(vec![row(0, 20_000), row(1, 10)], 100, 10_000);
        assert_eq!(ids(&tasks), ["r-0"]);
        assert_eq!(last.unwrap().key.request_id, "r-0");
    }

    #[test]
    fn page_tokens_round_trip_and_others_are_refused() {
        let cursor = ManualCursor {
            updated_at: 1_234,
            key: row(7, 0).task.key,
        };
        let token = page_token(&cursor);
        assert_eq!(parse_page_token(&token), Some(cursor));
        for bad in [
            "",
            "x",
            "1.2.3",
            "1.zz.00.00",
            "1.00.00.00.00",
            "a.00.00.00",
        ] {
            assert_eq!(parse_page_token(bad), None, "{bad:?}");
        }
        // Hex of bytes that are not UTF-8.
        assert_eq!(parse_page_token("1.ff.00.00"), None);
        // A NUL (or any control character) in a part: no key has one.
        for bad in ["1.00.6162.6162", "1.6162.610a.6162", "1.6162.6162.7f"] {
            assert_eq!(parse_page_token(bad), None, "{bad:?}");
        }
    }

    /// What the holder in [`a_retried_task_shows_the_holder_s_words_and_its_attempts`] says,
    /// quoting the subject as a holder's error may.
    const LOCKED: &str = "database is locked while erasing lokari.testi@example.fi";

    /// A holder that answers every call as its function says.
    struct Answers(
        fn(
            &dsrelay_connectors::Task,
        ) -> Result<dsrelay_connectors::Outcome, dsrelay_connectors::ConnectorError>,
    );

    impl dsrelay_connectors::Connector for Answers {
        fn kind_name(&self) -> &'static str {
            "answers"
        }

        fn supports(&self, _kind: dsrelay_proto::v1::RequestKind) -> bool {
            true
        }

        fn run<'a>(
            &'a self,
            task: &'a dsrelay_connectors::Task,
        ) -> dsrelay_connectors::BoxFuture<
            'a,
            Result<dsrelay_connectors::Outcome, dsrelay_connectors::ConnectorError>,
        > {
            let answer = (self.0)(task);
            Box::pin(async move { answer })
        }
    }

    /// A holder whose every call fails transiently, as a locked database would.
    const LOCKED_HOLDER: Answers =
        Answers(|_| Err(dsrelay_connectors::ConnectorError::Transient(LOCKED.into())));

    /// A processor whose subprocessor `crm` is [`LOCKED_HOLDER`] and whose operator is the
    /// development PKI's.
    pub(crate) fn config(dir: &std::path::Path, database_url: &str) -> crate::Config {
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.join("pki")).expect("dev pki");
        let tls = pki.files("processor");
        let text = format!(
            "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
             operators = [{:?}]\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [audit]\ncheckpoint_key = {:?}\ncheckpoint_file = {:?}\n\
             [[subprocessors]]\nname = \"crm\"\ncategories = [\"contact\"]\n\
             connector = {{ type = \"noop\" }}\n\
             [[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/0\"\n\
             registry_endpoint = \"https://localhost:1\"\n",
            dir.join("data"),
            dsrelay_runtime::pki::dev_identity("operator", "ops"),
            tls.ca,
            tls.cert,
            tls.key,
            pki.signing_key("processor"),
            dir.join("audit/checkpoints.jsonl"),
        );
        let file = dir.join("processor.toml");
        std::fs::write(&file, text).expect("config file");
        crate::Config::load_from(Some(&file), Vec::new()).expect("config")
    }

    /// A processor ([`config`]) whose subprocessor `crm` is `holder`, with controller
    /// `acme`'s erasure `request_id` accepted, due in 30 days.
    async fn with_erasure(
        dir: &std::path::Path,
        database_url: &str,
        holder: Answers,
        request_id: &str,
    ) -> crate::App {
        use dsrelay_proto::v1::{DeliverRequest, RequestKind};
        let connectors = std::collections::HashMap::from([(
            "crm".to_string(),
            Arc::new(holder) as Arc<dyn dsrelay_connectors::Connector>,
        )]);
        let app = crate::App::with_connectors(config(dir, database_url), connectors)
            .await
            .expect("app");
        let shared = app.shared();
        let now = shared.clock.now_ms();
        let req = DeliverRequest {
            request_id: request_id.into(),
            kind: RequestKind::Erasure as i32,
            due_at: Some(timestamp_from_millis(now + 30 * 86_400_000)),
            ..Default::default()
        };
        (shared.store)
            .accept("acme", &req, &["crm".to_string()], None, now)
            .await
            .expect("accept");
        app
    }

    /// The operator API of `shared` served on 127.0.0.1 over the development PKI in `dir`,
    /// a client of it as the operator, and what stops the server once sent.
    pub(crate) async fn serve(
        shared: &Arc<Shared>,
        dir: &std::path::Path,
    ) -> (
        dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient<
            tonic::transport::Channel,
        >,
        tokio::sync::oneshot::Sender<()>,
    ) {
        use dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient;
        use dsrelay_proto::v1::processor_operator_service_server::ProcessorOperatorServiceServer;

        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.join("pki")).expect("dev pki");
        let server_tls = pki.files("processor").server_config().expect("server tls");
        let router = dsrelay_runtime::server::builder(server_tls)
            .expect("server")
            .add_service(ProcessorOperatorServiceServer::new(OperatorApi::new(
                shared.clone(),
            )));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
            let _ = stopped.await;
        }));
        let client_tls = pki.files("operator").client_config().expect("client tls");
        let channel = dsrelay_runtime::tls::channel(
            &format!("https://localhost:{port}"),
            Some(dsrelay_runtime::pki::dev_identity(
                "processor",
                "payroll-bureau",
            )),
            &client_tls,
        )
        .expect("channel");
        (ProcessorOperatorServiceClient::new(channel), stop)
    }

    /// A task whose holder keeps failing transiently stays IN_PROGRESS; before its last
    /// error was listed, an operator saw no reason for it anywhere but in the database.
    async fn a_retried_task_shows_the_holder_s_words_and_its_attempts(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        let app = with_erasure(dir, database_url, LOCKED_HOLDER, "r-locked").await;
        let shared = app.shared();
        let now = shared.clock.now_ms();
        let jobs = (shared.store.claim_tasks(now + 10, 10, 30_000))
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 1);
        for job in jobs {
            crate::runner::run_task(&shared, job).await.expect("step");
        }

        let (mut client, stop) = serve(&shared, dir).await;
        let list = |states: Vec<TaskState>| ListManualTasksRequest {
            states: states.into_iter().map(|s| s as i32).collect(),
            ..Default::default()
        };
        let listed = client
            .list_manual_tasks(list(vec![TaskState::InProgress]))
            .await
            .expect("list")
            .into_inner();
        let _ = stop.send(());
        assert_eq!(ids(&listed.tasks), ["r-locked"]);
        let task = &listed.tasks[0];
        assert_eq!(task.state, TaskState::InProgress as i32, "{task:?}");
        assert_eq!(task.attempts, 1, "{task:?}");
        assert!(task.last_error.contains(LOCKED), "{task:?}");
        // Its first failed attempt was acknowledged, saying so (task_machine::retry).
        assert!(
            task.reason
                .starts_with("erasure at subprocessor crm: attempt 1 failed at "),
            "{task:?}"
        );
    }

    on_both!(a_retried_task_shows_the_holder_s_words_and_its_attempts);

    /// Claims and runs `shared`'s tasks due an hour from now, the clock moved there first.
    async fn an_hour_later(shared: &Arc<Shared>) -> usize {
        shared.clock.advance(3_600_000);
        let jobs = (shared.store.claim_tasks(shared.clock.now_ms(), 10, 30_000))
            .await
            .expect("claim");
        let n = jobs.len();
        for job in jobs {
            crate::runner::run_task(shared, job).await.expect("step");
        }
        n
    }

    /// The one task listed in `state`.
    async fn listed(shared: &Arc<Shared>, dir: &std::path::Path, state: TaskState) -> ManualTask {
        let (mut client, stop) = serve(shared, dir).await;
        let listed = client
            .list_manual_tasks(ListManualTasksRequest {
                states: vec![state as i32],
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        let _ = stop.send(());
        assert_eq!(listed.tasks.len(), 1, "{listed:?}");
        listed.tasks.into_iter().next().expect("one task")
    }

    /// A task retried while its holder keeps failing has no instructions (no connector
    /// configuration gives any but the manual one's), and waits since its first failed
    /// attempt, however many acknowledged and unacknowledged retries follow. Before, its
    /// instructions were its failure's reason, and `waiting_since` the time of its last
    /// change.
    async fn a_retried_task_waits_since_its_first_failure(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        let app = with_erasure(dir, database_url, LOCKED_HOLDER, "r-waits").await;
        let shared = app.shared();
        // The clock runs: the first failure is recorded between these two readings.
        let before = shared.clock.now_ms() + 3_600_000;
        assert_eq!(an_hour_later(&shared).await, 1);
        let first = before..=shared.clock.now_ms();
        // Attempts 2 (acknowledged) and 3 (only put off).
        assert_eq!(an_hour_later(&shared).await, 1);
        assert_eq!(an_hour_later(&shared).await, 1);
        let task = listed(&shared, dir, TaskState::InProgress).await;
        assert_eq!(task.attempts, 3, "{task:?}");
        assert!(!task.reason.is_empty(), "{task:?}");
        assert_eq!(task.instructions, "", "{task:?}");
        assert!(waited_since(&task, first), "{task:?}");
    }

    /// Whether `task` waits since a time in `range` (ms).
    fn waited_since(task: &ManualTask, range: std::ops::RangeInclusive<i64>) -> bool {
        task.waiting_since
            .as_ref()
            .is_some_and(|t| range.contains(&(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)))
    }

    /// What the manual connector hands an operator.
    const WORK_ORDER: &str = "ERASURE: delete the subject's data held here. Here: cabinet B2";

    /// A task handed to its operator shows the work order as its instructions and waits
    /// since the hand-over; confirmed, it waits no more and has none.
    async fn a_task_for_its_operator_shows_its_work_order_since_the_hand_over(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        let by_hand = Answers(|_| {
            Ok(dsrelay_connectors::Outcome::WaitingForOperator {
                note: WORK_ORDER.into(),
            })
        });
        let app = with_erasure(dir, database_url, by_hand, "r-by-hand").await;
        let shared = app.shared();
        let before = shared.clock.now_ms() + 3_600_000;
        assert_eq!(an_hour_later(&shared).await, 1);
        let handed_over = before..=shared.clock.now_ms();
        shared.clock.advance(60_000);
        let task = listed(&shared, dir, TaskState::WaitingForOperator).await;
        assert_eq!(task.instructions, WORK_ORDER, "{task:?}");
        assert!(waited_since(&task, handed_over), "{task:?}");
        let (mut client, stop) = serve(&shared, dir).await;
        client
            .complete_manual_task(CompleteManualTaskRequest {
                task: task.task.clone(),
                not_found: false,
                records_affected: 2,
                evidence_note: "shredded folder 17".into(),
            })
            .await
            .expect("complete");
        let _ = stop.send(());
        let task = listed(&shared, dir, TaskState::Completed).await;
        assert_eq!(task.instructions, "", "{task:?}");
        assert_eq!(task.waiting_since, None, "{task:?}");
        let note = task.evidence.map(|e| e.note).unwrap_or_default();
        assert!(note.starts_with("shredded folder 17"), "{note}");
    }

    on_both!(
        a_retried_task_waits_since_its_first_failure,
        a_task_for_its_operator_shows_its_work_order_since_the_hand_over,
    );

    /// Keeps the subject's invoices until the call's own time (so the retention run is due
    /// at once), then fails that run for good.
    const FAILS_ITS_RETENTION_RUN: Answers = Answers(|task| {
        use dsrelay_connectors::{ConnectorError, Outcome, Phase};
        match task.phase {
            Phase::Start => Ok(Outcome::Retained {
                legal_basis: "Kirjanpitolaki 2:10 §".into(),
                until_ms: task.now_ms,
                records_affected: 5,
                note: "deleted 5 rows, invoices kept".into(),
                erased: Vec::new(),
            }),
            _ => Err(ConnectorError::Permanent("invoices table is gone".into())),
        }
    });

    /// A task that failed in its retention run is not retried: its request was answered
    /// (PARTIALLY_COMPLETED at the registry), and a retry would reopen it to be cancelled,
    /// with the erasure of data past its date. (A task that failed outright is retried: the
    /// end-to-end test of RetryTask.)
    async fn a_task_that_failed_in_its_retention_run_is_not_retried(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        let app = with_erasure(dir, database_url, FAILS_ITS_RETENTION_RUN, "r-retained").await;
        let shared = app.shared();
        let api = OperatorApi::new(shared.clone());
        let now = shared.clock.now_ms();
        let key = TaskKey {
            controller: "acme".into(),
            request_id: "r-retained".into(),
            subprocessor: "crm".into(),
        };
        let mut states = Vec::new();
        for step in 1..=2 {
            let jobs = (shared.store.claim_tasks(now + step * 1_000, 10, 30_000))
                .await
                .expect("claim");
            assert_eq!(jobs.len(), 1, "step {step}");
            for job in jobs {
                crate::runner::run_task(&shared, job).await.expect("step");
            }
            let row = shared.store.manual_task(&key).await.expect("read");
            states.push(row.expect("the task").task.state);
        }
        assert_eq!(states, [TaskState::Retained, TaskState::Failed]);

        let err = api.retry(&key, "invoices restored", "ops").await;
        let status = Status::from(err.expect_err("a failed retention run"));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains("failed in a retention run"),
            "{status:?}"
        );
        let row = shared.store.manual_task(&key).await.expect("read");
        assert_eq!(row.expect("the task").task.state, TaskState::Failed);
    }

    on_both!(a_task_that_failed_in_its_retention_run_is_not_retried);

    /// Fails every call for good.
    const FAILS_FOR_GOOD: Answers = Answers(|_| {
        Err(dsrelay_connectors::ConnectorError::Permanent(
            "table gone".into(),
        ))
    });

    /// A listing of FAILED tasks says of each whether RetryTask takes it, and why not in
    /// RetryTask's own words; before, an operator learnt it only by trying. A return of data
    /// is retried: its failed run's retired upload goes, so that the new export's is queued
    /// and the sweep of retired exports leaves the folder alone.
    async fn failed_tasks_are_listed_with_why_a_retry_is_refused(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        use dsrelay_proto::v1::{DeliverRequest, RequestKind};
        let app = with_erasure(dir, database_url, FAILS_FOR_GOOD, "r-erasure").await;
        let shared = app.shared();
        let api = OperatorApi::new(shared.clone());
        let now = shared.clock.now_ms();
        for (request_id, kind) in [
            ("r-return", RequestKind::ReturnOfData),
            ("r-cancelled", RequestKind::Erasure),
        ] {
            let req = DeliverRequest {
                request_id: request_id.into(),
                kind: kind as i32,
                due_at: Some(timestamp_from_millis(now + 30 * 86_400_000)),
                ..Default::default()
            };
            (shared.store)
                .accept("acme", &req, &["crm".to_string()], None, now)
                .await
                .expect("accept");
        }
        let jobs = (shared.store.claim_tasks(now + 10, 10, 30_000))
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 3);
        for job in jobs {
            crate::runner::run_task(&shared, job).await.expect("step");
        }
        (shared.store)
            .cancel("acme", "r-cancelled", "withdrawn", now + 20)
            .await
            .expect("cancel");

        let (mut client, stop) = serve(&shared, dir).await;
        let list = |state: TaskState| ListManualTasksRequest {
            states: vec![state as i32],
            ..Default::default()
        };
        let listed = client
            .list_manual_tasks(list(TaskState::Failed))
            .await
            .expect("list")
            .into_inner();
        let mut refusals: Vec<(String, String)> = (listed.tasks.iter())
            .map(|t| {
                let id = t.task.as_ref().expect("task").request_id.clone();
                (id, t.retry_refusal.clone())
            })
            .collect();
        refusals.sort();
        let failed: Vec<&str> = refusals.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            failed,
            ["r-cancelled", "r-erasure", "r-return"],
            "{listed:?}"
        );
        let refusal = |id: &str| &refusals.iter().find(|(i, _)| i == id).expect(id).1;
        assert!(
            refusal("r-cancelled").contains("the controller cancelled its request"),
            "{refusals:?}"
        );
        assert_eq!(refusal("r-erasure"), "", "{refusals:?}");
        assert_eq!(refusal("r-return"), "", "{refusals:?}");
        // The failed run's upload, retired (its folder removed): a new export would not be
        // queued beside it.
        let uploads = || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM uploads WHERE request_id = 'r-return' \
                 AND done_at IS NOT NULL",
            )
            .fetch_one(&shared.store.db().pool)
            .await
            .expect("count");
            n
        };
        assert_eq!(uploads().await, 1);

        // RetryTask refuses the same tasks, saying the same, and takes the one listed so.
        for (id, listed) in &refusals {
            let key = TaskKey {
                controller: "acme".into(),
                request_id: id.clone(),
                subprocessor: "crm".into(),
            };
            let retried = api.retry(&key, "table restored", "ops").await;
            if listed.is_empty() {
                let task = retried.expect("a retry");
                assert_eq!(task.state, TaskState::InProgress as i32, "{task:?}");
                continue;
            }
            let status = Status::from(retried.expect_err("a refusal"));
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            assert_eq!(status.message(), format!("task acme/{id}/crm: {listed}"));
        }
        // A task in another state has nothing to say.
        let listed = client
            .list_manual_tasks(list(TaskState::InProgress))
            .await
            .expect("list")
            .into_inner();
        let _ = stop.send(());
        let mut in_progress = ids(&listed.tasks);
        in_progress.sort();
        assert_eq!(in_progress, ["r-erasure", "r-return"]);
        assert!(
            listed.tasks.iter().all(|t| t.retry_refusal.is_empty()),
            "{listed:?}"
        );
        assert_eq!(uploads().await, 0, "the retry dropped the retired upload");
    }

    on_both!(failed_tasks_are_listed_with_why_a_retry_is_refused);

    /// A task whose holder was called and has not answered lists when it was called, so an
    /// operator sees a long call; once the answer is recorded, it lists none. Before, such
    /// a task showed nothing at all until the holder answered.
    async fn a_holder_call_not_answered_yet_is_listed(database_url: &str, dir: &std::path::Path) {
        let app = with_erasure(dir, database_url, FAILS_FOR_GOOD, "r-1").await;
        let shared = app.shared();
        let now = shared.clock.now_ms();
        let mut jobs = (shared.store.claim_tasks(now + 10, 10, 30_000))
            .await
            .expect("claim");
        let job = jobs.pop().expect("the task");
        let noted = (shared.store)
            .call_started(&job.task.key, job.task.sequence, &job.lease_owner, now + 20)
            .await
            .expect("note the call");
        assert!(noted);
        let (client, stop) = serve(&shared, dir).await;
        let list = |states: Vec<TaskState>| {
            let req = ListManualTasksRequest {
                states: states.into_iter().map(|s| s as i32).collect(),
                ..Default::default()
            };
            let mut client = client.clone();
            async move {
                client
                    .list_manual_tasks(req)
                    .await
                    .expect("list")
                    .into_inner()
            }
        };
        let listed = list(vec![TaskState::Pending]).await;
        assert_eq!(ids(&listed.tasks), ["r-1"]);
        assert_eq!(
            listed.tasks[0].holder_called_at,
            Some(timestamp_from_millis(now + 20)),
            "{listed:?}"
        );
        crate::runner::run_task(&shared, job).await.expect("step");
        let listed = list(vec![TaskState::Failed]).await;
        let _ = stop.send(());
        assert_eq!(ids(&listed.tasks), ["r-1"]);
        assert_eq!(listed.tasks[0].holder_called_at, None, "{listed:?}");
    }

    on_both!(a_holder_call_not_answered_yet_is_listed);

    /// A subprocessor no longer configured and a request forgotten are refused in so many
    /// words, by the one rule; the first reason that holds is given.
    #[test]
    fn the_retry_rule_gives_the_first_reason_that_holds() {
        use crate::store::RetryStanding;
        use dsrelay_proto::v1::RequestKind;
        let erasure = RetryStanding {
            kind: Some(RequestKind::Erasure),
            ..Default::default()
        };
        assert_eq!(retry_refusal(&erasure, true), None);
        assert_eq!(
            retry_refusal(&erasure, false),
            Some(RetryRefusal::Unconfigured)
        );
        let forgotten = RetryStanding {
            forgotten: true,
            cancelled: true,
            ..erasure
        };
        assert_eq!(
            retry_refusal(&forgotten, false),
            Some(RetryRefusal::Forgotten)
        );
        // A contract end is refused only for what refuses any other kind.
        let contract_end = RetryStanding {
            kind: Some(RequestKind::ContractEnd),
            ..Default::default()
        };
        assert_eq!(
            retry_refusal(&contract_end, false),
            Some(RetryRefusal::Unconfigured)
        );
        let cancelled = RetryStanding {
            cancelled: true,
            was_retained: true,
            ..contract_end
        };
        assert_eq!(
            retry_refusal(&cancelled, true),
            Some(RetryRefusal::Cancelled)
        );
        for kind in [
            RequestKind::ReturnOfData,
            RequestKind::Transfer,
            RequestKind::ContractEnd,
        ] {
            let export = RetryStanding {
                kind: Some(kind),
                ..Default::default()
            };
            assert_eq!(retry_refusal(&export, true), None, "{kind:?}");
        }
        let retained = RetryStanding {
            was_retained: true,
            ..erasure
        };
        assert_eq!(
            retry_refusal(&retained, true),
            Some(RetryRefusal::WasRetained)
        );
        assert!(refusal_words(RetryRefusal::Unconfigured, "crm")
            .starts_with("subprocessor crm is no longer configured here"));
    }
}
