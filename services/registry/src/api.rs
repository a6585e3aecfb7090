//! The registry's gRPC handlers: the partner API and the acknowledgement API.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::acknowledgement_service_server::AcknowledgementService;
use dsrelay_proto::v1::request_service_server::RequestService;
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, CancelRequest, Chain, ChainProcessor, Delivery,
    DeliveryState, EventList, ExtendDeadlineRequest, GetChainRequest, GetRequest,
    ListEventsRequest, ListRequestsRequest, ListRequestsResponse, Request, RequestEvent,
    RequestKind, RequestState, SubmitRequest, SubmitResponse, SubprocessorList, WatchRequest,
};
use dsrelay_proto::{prost::Message, timestamp_from_millis};
use dsrelay_runtime::identity::{keyed_hash, request_id_violation, FieldViolation};
use dsrelay_runtime::trace_context;
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Response, Status};
use tracing::Instrument;

use crate::app::Shared;
use crate::auth::Caller;
use crate::deadline::{due_at, MAX_EXTENSION_MONTHS};
use crate::error::ApiError;
use crate::fold::request_is_terminal;
use crate::store::{
    AckOutcome, CancelOutcome, Inserted, ListFilter, NewRequest, RequestRow, TaskUpdate,
};
use crate::validate::{text_violation, validate_submit, MAX_TEXT};

/// At most this many acknowledgements in one call.
pub const MAX_ACKS_PER_CALL: usize = 500;

/// Implements both registry services over the shared state.
#[derive(Clone)]
pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    /// Handlers over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn partner_api_caller<T>(&self, req: &tonic::Request<T>) -> Result<Caller, ApiError> {
        match self.shared.auth.caller(req)? {
            Caller::Processor(name) => Err(ApiError::PermissionDenied(format!(
                "processor {name} may only call the acknowledgement API"
            ))),
            other => Ok(other),
        }
    }

    /// Loads a request the caller may see; another partner's request is NOT_FOUND.
    async fn visible(&self, caller: &Caller, id: &str) -> Result<RequestRow, ApiError> {
        check_id(id)?;
        let row = self
            .shared
            .store
            .request(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(id.to_string()))?;
        match caller {
            Caller::Partner(p) if *p != row.partner => Err(ApiError::NotFound(id.to_string())),
            _ => Ok(row),
        }
    }

    async fn view(&self, row: RequestRow) -> Result<Request, ApiError> {
        let deliveries = self.shared.store.deliveries(&row.id).await?;
        let tasks = self.shared.store.tasks(&row.id).await?;
        Ok(to_view(row, deliveries, tasks, self.shared.clock.now_ms()))
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    match request_id_violation("request_id", id) {
        Some(v) => Err(ApiError::Invalid(vec![v])),
        None => Ok(()),
    }
}

fn check_text(field: &str, value: &str) -> Result<(), ApiError> {
    match text_violation(field, value, MAX_TEXT, true) {
        Some(v) => Err(ApiError::Invalid(vec![v])),
        None => Ok(()),
    }
}

/// The trace id of an incoming W3C `traceparent`, so a partner's trace is continued.
fn incoming_trace_id<T>(req: &tonic::Request<T>) -> Option<String> {
    let tp = req.metadata().get("traceparent")?.to_str().ok()?;
    trace_context::trace_id_from_traceparent(tp)
}

pub(crate) fn to_view(
    row: RequestRow,
    deliveries: Vec<crate::store::DeliveryRow>,
    tasks: Vec<dsrelay_proto::v1::TaskStatus>,
    now: i64,
) -> Request {
    let body = row
        .body
        .as_deref()
        .and_then(|b| SubmitRequest::decode(b).ok());
    let overdue = row.overdue(now);
    let extension_reasons = serde_json::from_str(&row.extension_reasons).unwrap_or_default();
    let (identities, scope, parameters, note) = match &body {
        Some(b) => (
            b.identities.clone(),
            b.scope.clone(),
            b.parameters.clone(),
            b.note.clone(),
        ),
        None => (Vec::new(), None, None, String::new()),
    };
    Request {
        request_id: row.id,
        partner: row.partner,
        kind: row.kind,
        state: row.state,
        identities,
        scope,
        parameters,
        idempotency_key: row.idempotency_key,
        note,
        received_at: Some(timestamp_from_millis(row.received_at)),
        due_at: Some(timestamp_from_millis(row.due_at)),
        overdue,
        extension_reasons,
        trace_id: row.trace_id,
        deliveries: deliveries
            .into_iter()
            .map(|d| Delivery {
                processor: d.processor,
                state: if d.done_at.is_some() {
                    DeliveryState::Delivered
                } else {
                    DeliveryState::Pending
                } as i32,
                attempts: d.attempts.clamp(0, i64::from(u32::MAX)) as u32,
                last_error: d.last_error.unwrap_or_default(),
                next_attempt_at: d
                    .done_at
                    .is_none()
                    .then(|| timestamp_from_millis(d.next_attempt_at)),
                delivered_at: d.done_at.map(timestamp_from_millis),
            })
            .collect(),
        tasks,
        updated_at: Some(timestamp_from_millis(row.updated_at)),
        cancel_reason: row.cancel_reason.unwrap_or_default(),
        identities_forgotten: body.is_none(),
    }
}

fn event_to_proto(request_id: &str, e: &crate::store::EventRow) -> RequestEvent {
    let task = (!e.subprocessor.is_empty()).then(|| dsrelay_proto::v1::TaskStatus {
        processor: e.processor.clone(),
        subprocessor: e.subprocessor.clone(),
        state: e.task_state,
        sequence: e.sequence.max(0) as u64,
        updated_at: Some(timestamp_from_millis(e.occurred_at)),
        ..Default::default()
    });
    RequestEvent {
        event_id: e.id.max(0) as u64,
        request_id: request_id.to_string(),
        r#type: e.event_type,
        occurred_at: Some(timestamp_from_millis(e.occurred_at)),
        request_state: e.request_state,
        processor: e.processor.clone(),
        task,
        message: e.message.clone(),
        attempt: e.attempt.clamp(0, i64::from(u32::MAX)) as u32,
        trace_id: e.trace_id.clone().unwrap_or_default(),
        span_id: e.span_id.clone().unwrap_or_default(),
    }
}

impl Api {
    async fn submit_traced(
        &self,
        req: tonic::Request<SubmitRequest>,
        span: tracing::Span,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let trace_id = trace_context::trace_id_of(&span)
            .or_else(|| incoming_trace_id(&req))
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let traceparent = trace_context::traceparent_of(&span);
        span.record("trace_id", trace_id.as_str());

        let body = req.into_inner();
        let config = &self.shared.config;
        let violations = validate_submit(&body, &config.known_categories());
        if !violations.is_empty() {
            return Err(ApiError::Invalid(violations).into());
        }
        let wanted: Vec<&str> = body
            .scope
            .as_ref()
            .map(|s| s.data_categories.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let processors: Vec<String> = config
            .processors
            .iter()
            .filter(|p| {
                wanted.is_empty() || p.categories.iter().any(|c| wanted.contains(&c.as_str()))
            })
            .map(|p| p.name.clone())
            .collect();
        let encoded = body.encode_to_vec();
        let received_at = self.shared.clock.now_ms();
        let id = uuid::Uuid::now_v7().to_string();
        let hashes: Vec<String> = body
            .identities
            .iter()
            .map(|i| keyed_hash(&self.shared.identity_hash_key, i))
            .collect();
        let new = NewRequest {
            id: id.clone(),
            partner: caller.name().to_string(),
            idempotency_key: body.idempotency_key.clone(),
            body_hash: hex::encode(Sha256::digest(&encoded)),
            body: encoded,
            identity_hashes: serde_json::to_string(&hashes)
                .map_err(|e| ApiError::Unexpected(e.into()))?,
            kind: body.kind,
            received_at,
            due_at: due_at(received_at, 0),
            trace_id,
            traceparent,
            processors: processors.clone(),
        };
        span.record("partner", caller.name());
        // What the answer needs of a new request is known already: no read-back on the
        // intake path.
        let new_id = new.id.clone();
        let new_state = if processors.is_empty() {
            RequestState::Completed
        } else {
            RequestState::Received
        };
        let (new_due, new_trace) = (new.due_at, new.trace_id.clone());
        let inserted = self
            .shared
            .intake
            .submit(new)
            .await
            .map_err(ApiError::from)?;
        let (request_id, state, due, trace_id, routed_to, deduplicated) = match inserted {
            Inserted::New => {
                self.shared.dispatch_wakeup.notify_one();
                self.shared.publish(&new_id);
                (new_id, new_state as i32, new_due, new_trace, processors, false)
            }
            Inserted::Existing(existing) => {
                let row = self
                    .shared
                    .store
                    .request(&existing)
                    .await
                    .map_err(ApiError::from)?
                    .ok_or_else(|| {
                        ApiError::Unexpected(anyhow::anyhow!("request {existing} vanished"))
                    })?;
                let routed = self
                    .shared
                    .store
                    .deliveries(&existing)
                    .await
                    .map_err(ApiError::from)?
                    .into_iter()
                    .map(|d| d.processor)
                    .collect();
                (existing, row.state, row.due_at, row.trace_id, routed, true)
            }
            Inserted::Conflict(existing) => {
                return Err(ApiError::Conflict(format!(
                    "idempotency_key {:?} was already used for request {existing} with a different body; use a new key for a new request",
                    body.idempotency_key
                ))
                .into())
            }
        };
        span.record("request_id", request_id.as_str());
        tracing::info!(
            request_id = %request_id,
            kind = RequestKind::try_from(body.kind).map(|k| k.as_str_name()).unwrap_or("?"),
            deduplicated,
            routed = routed_to.len(),
            "request submitted"
        );
        Ok(Response::new(SubmitResponse {
            request_id,
            state,
            due_at: Some(timestamp_from_millis(due)),
            trace_id,
            deduplicated,
            routed_to,
        }))
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<RequestEvent, Status>> + Send>>;

#[tonic::async_trait]
impl RequestService for Api {
    async fn submit(
        &self,
        req: tonic::Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        // The intake span continues a partner's trace when it sends one.
        let span = tracing::info_span!(
            "intake",
            request_id = tracing::field::Empty,
            partner = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        trace_context::set_parent(&span, trace_context::extract(req.metadata()));
        self.submit_traced(req, span.clone()).instrument(span).await
    }

    async fn get(&self, req: tonic::Request<GetRequest>) -> Result<Response<Request>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let row = self.visible(&caller, &req.get_ref().request_id).await?;
        Ok(Response::new(self.view(row).await?))
    }

    async fn list(
        &self,
        req: tonic::Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let r = req.into_inner();
        let mut violations = Vec::new();
        let page_size = match r.page_size {
            0 => 50,
            n @ 1..=500 => n,
            _ => {
                violations.push(FieldViolation::new(
                    "page_size",
                    "must be 0 (default 50) to 500",
                ));
                50
            }
        };
        if r.states.len() > 16 {
            violations.push(FieldViolation::new(
                "states[16]",
                "at most 16 states may be given",
            ));
        }
        for (i, s) in r.states.iter().enumerate().take(16) {
            if RequestState::try_from(*s).unwrap_or(RequestState::Unspecified)
                == RequestState::Unspecified
            {
                violations.push(FieldViolation::new(
                    format!("states[{i}]"),
                    format!("{s} is not a request state"),
                ));
            }
        }
        if RequestKind::try_from(r.kind).is_err() {
            violations.push(FieldViolation::new(
                "kind",
                format!("{} is not a request kind", r.kind),
            ));
        }
        let before = if r.page_token.is_empty() {
            None
        } else {
            match r
                .page_token
                .split_once('_')
                .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.to_string())))
            {
                Some(p) => Some(p),
                None => {
                    violations.push(FieldViolation::new(
                        "page_token",
                        "is not a token from a previous page",
                    ));
                    None
                }
            }
        };
        if !violations.is_empty() {
            return Err(ApiError::Invalid(violations).into());
        }
        let filter = ListFilter {
            partner: match &caller {
                Caller::Partner(p) => Some(p.clone()),
                _ => None,
            },
            states: r.states.clone(),
            kind: (r.kind != 0).then_some(r.kind),
            overdue_only: r.overdue_only,
            before,
            limit: i64::from(page_size) + 1,
        };
        let mut rows = self
            .shared
            .store
            .list(&filter, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if rows.len() > page_size as usize {
            rows.truncate(page_size as usize);
            rows.last()
                .map(|l| format!("{}_{}", l.received_at, l.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let mut requests = Vec::with_capacity(rows.len());
        for row in rows {
            requests.push(self.view(row).await?);
        }
        Ok(Response::new(ListRequestsResponse {
            requests,
            next_page_token,
        }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: tonic::Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let r = req.into_inner();
        let row = self.visible(&caller, &r.request_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let shared = self.shared.clone();
        let mut wake = shared.events.subscribe();
        let id = row.id;
        tokio::spawn(async move {
            // Ids are not assumed to commit in order (PostgreSQL sequences don't), so every
            // poll reads the request's events and sends the ones not yet sent.
            let mut sent = std::collections::BTreeSet::new();
            loop {
                let events = match shared.store.events(&id).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "reading events failed: {e}"
                            ))))
                            .await;
                        return;
                    }
                };
                let mut terminal = false;
                for e in events.iter().filter(|e| e.id as u64 > r.after_event_id) {
                    if !sent.insert(e.id) {
                        continue;
                    }
                    if tx.send(Ok(event_to_proto(&id, e))).await.is_err() {
                        return;
                    }
                }
                if let Some(last) = events.last() {
                    terminal = request_is_terminal(
                        RequestState::try_from(last.request_state)
                            .unwrap_or(RequestState::Unspecified),
                    );
                }
                if terminal && !r.follow_after_terminal {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = wake.recv() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(
        &self,
        req: tonic::Request<CancelRequest>,
    ) -> Result<Response<Request>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let r = req.into_inner();
        let row = self.visible(&caller, &r.request_id).await?;
        check_text("reason", &r.reason)?;
        match self
            .shared
            .store
            .cancel(&row.id, &r.reason, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?
        {
            CancelOutcome::Cancelled => {
                tracing::info!(request_id = %row.id, by = caller.name(), "request cancelled");
                self.shared.dispatch_wakeup.notify_one();
                self.shared.publish(&row.id);
            }
            CancelOutcome::NotFound => return Err(ApiError::NotFound(row.id).into()),
            CancelOutcome::NotCancellable(state) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "request {} is {} and can no longer be cancelled",
                    row.id,
                    state.as_str_name().trim_start_matches("REQUEST_STATE_")
                ))
                .into())
            }
        }
        let row = self.visible(&caller, &row.id).await?;
        Ok(Response::new(self.view(row).await?))
    }

    async fn list_events(
        &self,
        req: tonic::Request<ListEventsRequest>,
    ) -> Result<Response<EventList>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let row = self.visible(&caller, &req.get_ref().request_id).await?;
        let id = row.id.clone();
        let events = self
            .shared
            .store
            .events(&id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(EventList {
            request: Some(self.view(row).await?),
            events: events.iter().map(|e| event_to_proto(&id, e)).collect(),
        }))
    }

    async fn get_chain(
        &self,
        req: tonic::Request<GetChainRequest>,
    ) -> Result<Response<Chain>, Status> {
        self.partner_api_caller(&req)?;
        let mut processors = Vec::new();
        for p in &self.shared.config.processors {
            let row = self
                .shared
                .store
                .chain(&p.name)
                .await
                .map_err(ApiError::from)?;
            let subprocessors = row
                .subprocessors
                .as_deref()
                .and_then(|b| SubprocessorList::decode(b).ok())
                .map(|l| l.subprocessors)
                .unwrap_or_default();
            processors.push(ChainProcessor {
                name: p.name.clone(),
                endpoint: p.endpoint.clone(),
                data_categories: p.categories.clone(),
                subprocessors,
                reported_at: row.reported_at.map(timestamp_from_millis),
                last_error: row.last_error.unwrap_or_default(),
            });
        }
        Ok(Response::new(Chain { processors }))
    }

    async fn extend_deadline(
        &self,
        req: tonic::Request<ExtendDeadlineRequest>,
    ) -> Result<Response<Request>, Status> {
        let caller = self.partner_api_caller(&req)?;
        if !matches!(caller, Caller::Operator(_)) {
            return Err(
                ApiError::PermissionDenied("only operators may extend a due date".into()).into(),
            );
        }
        let r = req.into_inner();
        let row = self.visible(&caller, &r.request_id).await?;
        check_text("reason", &r.reason)?;
        let used = (row.extension_months.max(0) as u32).min(MAX_EXTENSION_MONTHS);
        let left = MAX_EXTENSION_MONTHS - used;
        if r.months == 0 || r.months > left {
            let rule = if left == 0 {
                format!(
                    "no extension is left: the due date was already extended by {used} months, \
                     the most GDPR art. 12(3) allows"
                )
            } else {
                format!(
                    "must be 1 to {left} (GDPR art. 12(3) allows two months in all; {used} used)"
                )
            };
            return Err(ApiError::Invalid(vec![FieldViolation::new("months", rule)]).into());
        }
        if matches!(
            row.state(),
            RequestState::Completed | RequestState::Cancelled
        ) {
            return Err(
                ApiError::FailedPrecondition(format!("request {} has finished", row.id)).into(),
            );
        }
        self.shared
            .store
            .extend(&row, r.months, &r.reason, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?;
        self.shared.publish(&row.id);
        let row = self.visible(&caller, &row.id).await?;
        Ok(Response::new(self.view(row).await?))
    }

    async fn list_audit_entries(
        &self,
        req: tonic::Request<dsrelay_proto::v1::ListAuditEntriesRequest>,
    ) -> Result<Response<dsrelay_proto::v1::AuditEntries>, Status> {
        use dsrelay_proto::v1::{AuditEntries, AuditEntry};
        let caller = self.partner_api_caller(&req)?;
        if !matches!(caller, Caller::Operator(_)) {
            return Err(ApiError::PermissionDenied(
                "only operators may read the audit trail".into(),
            )
            .into());
        }
        let r = req.into_inner();
        let page_size = match r.page_size {
            0 => 500,
            n @ 1..=1000 => n,
            _ => {
                return Err(ApiError::Invalid(vec![FieldViolation::new(
                    "page_size",
                    "must be 0 (default 500) to 1000",
                )])
                .into())
            }
        };
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
        let entries = entries
            .into_iter()
            .map(|e| AuditEntry {
                seq: e.seq,
                occurred_at: Some(timestamp_from_millis(e.occurred_at)),
                request_id: e.request_id,
                event_type: e.event_type,
                actor: e.actor,
                detail: e.detail,
                prev_hash: e.prev_hash,
                hash: e.hash,
            })
            .collect();
        Ok(Response::new(AuditEntries {
            entries,
            next_after_seq,
        }))
    }
}

#[tonic::async_trait]
impl AcknowledgementService for Api {
    #[tracing::instrument(skip_all, fields(processor, count))]
    async fn acknowledge(
        &self,
        req: tonic::Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        let processor = match self.shared.auth.caller(&req)? {
            Caller::Processor(name) => name,
            other => {
                return Err(ApiError::PermissionDenied(format!(
                    "{} is not a processor and may not acknowledge tasks",
                    other.name()
                ))
                .into())
            }
        };
        let acks = req.into_inner().acknowledgements;
        tracing::Span::current()
            .record("processor", processor.as_str())
            .record("count", acks.len());
        let mut violations = Vec::new();
        if acks.is_empty() || acks.len() > MAX_ACKS_PER_CALL {
            violations.push(FieldViolation::new(
                "acknowledgements",
                format!("send 1 to {MAX_ACKS_PER_CALL} per call"),
            ));
        }
        for (i, a) in acks.iter().enumerate().take(MAX_ACKS_PER_CALL) {
            violations.extend(request_id_violation(
                &format!("acknowledgements[{i}].request_id"),
                &a.request_id,
            ));
            if a.subprocessor.is_empty() || a.subprocessor.len() > 128 {
                violations.push(FieldViolation::new(
                    format!("acknowledgements[{i}].subprocessor"),
                    "must be 1 to 128 bytes",
                ));
            }
            if a.sequence == 0 || a.sequence > i64::MAX as u64 {
                violations.push(FieldViolation::new(
                    format!("acknowledgements[{i}].sequence"),
                    "must start at 1",
                ));
            }
            if dsrelay_proto::v1::TaskState::try_from(a.state).unwrap_or_default()
                == dsrelay_proto::v1::TaskState::Unspecified
            {
                violations.push(FieldViolation::new(
                    format!("acknowledgements[{i}].state"),
                    "must be a task state",
                ));
            }
            violations.extend(text_violation(
                &format!("acknowledgements[{i}].subprocessor"),
                &a.subprocessor,
                128,
                false,
            ));
            violations.extend(text_violation(
                &format!("acknowledgements[{i}].reason"),
                &a.reason,
                4096,
                false,
            ));
            violations.extend(text_violation(
                &format!("acknowledgements[{i}].legal_basis"),
                &a.legal_basis,
                1024,
                false,
            ));
            if let Some(e) = &a.evidence {
                violations.extend(text_violation(
                    &format!("acknowledgements[{i}].evidence.note"),
                    &e.note,
                    4096,
                    false,
                ));
            }
        }
        if !violations.is_empty() {
            return Err(ApiError::Invalid(violations).into());
        }
        let updates: Vec<TaskUpdate> = acks.iter().map(TaskUpdate::from).collect();
        match self
            .shared
            .store
            .apply_acks(&processor, &updates, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?
        {
            AckOutcome::Applied {
                applied,
                duplicates,
            } => {
                // Each acknowledgement joins the trace of the task step that sent it.
                for (a, u) in acks.iter().zip(&updates) {
                    if a.traceparent.is_empty() {
                        continue;
                    }
                    let span = tracing::info_span!(
                        "acknowledgement",
                        request_id = %u.request_id,
                        processor = %processor,
                        subprocessor = %u.subprocessor,
                        sequence = u.sequence,
                    );
                    trace_context::set_parent(
                        &span,
                        trace_context::from_traceparent(&a.traceparent),
                    );
                    span.in_scope(|| tracing::debug!("acknowledgement recorded"));
                }
                let occurred: Vec<Option<i64>> = acks
                    .iter()
                    .map(|a| {
                        a.occurred_at
                            .as_ref()
                            .map(dsrelay_proto::millis_from_timestamp)
                    })
                    .collect();
                self.shared.metrics.acknowledged(
                    &processor,
                    &occurred,
                    applied,
                    duplicates,
                    self.shared.clock.now_ms(),
                );
                for id in updates
                    .iter()
                    .map(|u| &u.request_id)
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    self.shared.publish(id);
                }
                tracing::debug!(applied, duplicates, "acknowledgements applied");
                Ok(Response::new(AcknowledgeResponse {
                    applied,
                    duplicates,
                }))
            }
            AckOutcome::NotRouted { request_id } => Err(ApiError::PermissionDenied(format!(
                "request {request_id} was not delivered to processor {processor}"
            ))
            .into()),
        }
    }
}
