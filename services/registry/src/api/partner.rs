//! The partner API (`RequestService`): partners submit and follow their requests; operators
//! see every request, extend due dates, read the audit trail, and list and requeue
//! dead-lettered deliveries.

use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::request_service_server::RequestService;
use dsrelay_proto::v1::{
    AuditCheckpoints, AuditEntries, CancelRequest, Chain, ChainProcessor, DeadLetteredDeliveries,
    DeadLetteredDelivery, EventList, ExtendDeadlineRequest, GetChainRequest, GetRequest,
    ListAuditCheckpointsRequest, ListAuditEntriesRequest, ListDeadLetteredDeliveriesRequest,
    ListEventsRequest, ListRequestsRequest, ListRequestsResponse, Request, RequestKind,
    RequestState, RequeueDeliveryRequest, SubjectIdentity, SubmitRequest, SubmitResponse,
    SubprocessorList, WatchRequest,
};
use dsrelay_runtime::grpc::CallerTrace;
use dsrelay_runtime::identity::{
    identity_in_note, identity_in_text, keyed_digest, keyed_hash, request_id_violation,
    submit_identity_violations, validate_identities, FieldViolation,
};
use dsrelay_runtime::server::MAX_MESSAGE_BYTES;
use dsrelay_runtime::trace_context;
use tonic::{Code, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::{Caller, Party};
use crate::deadline::{due_at, MAX_EXTENSION_MONTHS};
use crate::error::ApiError;
use crate::store::{
    CancelOutcome, DeadLetterCursor, Inserted, ListFilter, NewRequest, RequestRow, RequeueOutcome,
};
use crate::validate::{list_arguments, page_token, text_violation, validate_submit, ListArguments};

use super::{check_text, not_found, views, watch, Api};

/// The idempotency hash of an encoded Submit body: HMAC-SHA256 under the identity hash key,
/// so that the hash left after the body is forgotten cannot be tested against guessed bodies
/// by anyone without the key. Rows stored before the hash was keyed hold a plain SHA-256:
/// a retry of such a request is answered as a conflict
/// (ALREADY_EXISTS) rather than deduplicated, which is safe (nothing is stored twice).
fn body_hash(key: &[u8], encoded: &[u8]) -> String {
    keyed_digest(key, b"dsrelay.submit-body.v1", encoded)
}

/// Room kept free in a List answer for its framing and the page token.
const LIST_HEADROOM_BYTES: usize = 64 * 1024;

/// What is wrong with asking to extend a due date by `months` when it was already extended by
/// `used` months, if anything: GDPR art. 12(3) allows two months in all
/// ([`MAX_EXTENSION_MONTHS`]), so what may still be added is what the earlier extensions left.
fn months_violation(months: u32, used: u32) -> Option<FieldViolation> {
    let left = MAX_EXTENSION_MONTHS.saturating_sub(used);
    let so_far = match used {
        0 => "the due date has not been extended yet".to_string(),
        1 => "the due date was already extended by 1 month".to_string(),
        n => format!("the due date was already extended by {n} months"),
    };
    let rule = if left == 0 {
        format!(
            "{} asked, no extension is left: {so_far}, the most GDPR art. 12(3) allows",
            month_count(months)
        )
    } else if months == 0 || months > left {
        let may = match left {
            1 => "only 1 month may be added".to_string(),
            n => format!("1 to {n} months may be added"),
        };
        format!(
            "{} asked, {may}: GDPR art. 12(3) allows {MAX_EXTENSION_MONTHS} months in all \
             and {so_far}",
            month_count(months)
        )
    } else {
        return None;
    };
    Some(FieldViolation::new("months", rule))
}

/// `n` months, in words ("1 month", "0 months").
fn month_count(n: u32) -> String {
    match n {
        1 => "1 month".into(),
        n => format!("{n} months"),
    }
}

#[tonic::async_trait]
impl RequestService for Api {
    // The intake span continues a partner's trace when it sends one.
    #[tracing::instrument(name = "intake", skip_all, fields(request_id, partner, trace_id))]
    async fn submit(
        &self,
        req: tonic::Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let span = tracing::Span::current();
        let caller = self.partner_api_caller(&req)?;
        // First, so that a flood costs no store read (not even a retry's look-up).
        if caller.role == Party::Partner {
            self.take_submit_quota(&caller.name)?;
        }
        let trace_id = trace_context::trace_id_of(&span)
            .or_else(|| CallerTrace::of(&req).map(|t| t.trace_id().to_string()))
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let traceparent = trace_context::traceparent_of(&span);
        span.record("trace_id", trace_id.as_str());

        let body = req.into_inner();
        let config = &self.shared.config;
        let violations = validate_submit(
            &body,
            &config.known_categories(),
            &config.known_recipients(),
        );
        let encoded = body.encode_to_vec();
        let hash = body_hash(&self.shared.identity_hash_key, &encoded);
        if !violations.is_empty() {
            // A retry of a request already accepted answers it (a category or recipient it
            // names may have been removed meanwhile).
            if let Some(existing) = self.submitted_before(&caller.name, &body, &hash).await? {
                return Ok(Response::new(existing));
            }
        }
        ApiError::ensure_valid(violations)?;
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
        let received_at = self.shared.clock.now_ms();
        let id = uuid::Uuid::now_v7().to_string();
        let hashes: Vec<String> = body
            .identities
            .iter()
            .map(|i| keyed_hash(&self.shared.identity_hash_key, i))
            .collect();
        let new = NewRequest {
            id: id.clone(),
            partner: caller.name.clone(),
            idempotency_key: body.idempotency_key.clone(),
            body_hash: hash,
            body: encoded,
            identity_hashes: serde_json::to_string(&hashes).map_err(ApiError::unexpected)?,
            kind: body.kind,
            received_at,
            due_at: due_at(received_at, 0),
            trace_id,
            traceparent,
            processors: processors.clone(),
        };
        span.record("partner", caller.name.as_str());
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
        let answer = match inserted {
            Inserted::New => {
                self.shared.dispatch_wakeup.notify_one();
                self.shared.publish(&new_id);
                SubmitResponse {
                    request_id: new_id,
                    state: new_state as i32,
                    due_at: Some(timestamp_from_millis(new_due)),
                    trace_id: new_trace,
                    deduplicated: false,
                    routed_to: processors,
                }
            }
            Inserted::Existing(existing) => {
                let row = self
                    .shared
                    .store
                    .request(&existing)
                    .await
                    .map_err(ApiError::from)?
                    .ok_or_else(|| {
                        ApiError::unexpected(anyhow::anyhow!("request {existing} vanished"))
                    })?;
                self.deduplicated(row).await?
            }
            Inserted::Running(_) => {
                return Err(ApiError::unexpected(anyhow::anyhow!(
                    "a submitted request was taken for a contract end"
                ))
                .into())
            }
            Inserted::Conflict(existing) => {
                return Err(ApiError::already_exists(format!(
                    "idempotency_key {:?} was already used for request {existing} with a different body; use a new key for a new request",
                    body.idempotency_key
                ))
                .into())
            }
        };
        Ok(Response::new(submitted(answer, body.kind)))
    }

    async fn get(&self, req: tonic::Request<GetRequest>) -> Result<Response<Request>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let view = self
            .visible_view(&caller, &req.get_ref().request_id)
            .await?;
        Ok(Response::new(view))
    }

    async fn list(
        &self,
        req: tonic::Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let r = req.into_inner();
        // Every broken rule at once, the identities' with the other arguments'.
        let key = &self.shared.identity_hash_key;
        let (identities, mut violations) = match identity_filter(key, &r) {
            Ok(f) => (f, Vec::new()),
            Err(v) => (IdentityFilter::default(), v),
        };
        let arguments = match list_arguments(&ListRequestsRequest {
            page_token: identities.inner_token.clone(),
            ..r.clone()
        }) {
            Ok(a) => Some(a),
            Err(v) => {
                violations.extend(v);
                None
            }
        };
        let (Some(arguments), true) = (arguments, violations.is_empty()) else {
            return Err(ApiError::invalid(violations).into());
        };
        let ListArguments {
            page_size,
            before,
            filters,
            due_before,
        } = arguments;
        let filter = ListFilter {
            partner: (caller.role == Party::Partner).then(|| caller.name.clone()),
            states: r.states.clone(),
            kind: (r.kind != 0).then_some(r.kind),
            overdue_only: r.overdue_only,
            due_before,
            before,
            limit: i64::from(page_size) + 1,
        };
        let mut rows = self
            .shared
            .store
            .list_about(&filter, &identities.hashes, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let token = |received_at: i64, id: &str| {
            identities.token_prefix.clone() + &page_token(&filters, received_at, id)
        };
        let mut next_page_token = if more {
            rows.last()
                .map(|l| token(l.received_at, &l.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        // A page ends early rather than outgrow what one answer may carry; the token then
        // continues after the last request it holds.
        let budget = MAX_MESSAGE_BYTES - LIST_HEADROOM_BYTES;
        let mut used = 0;
        let mut requests = Vec::with_capacity(rows.len());
        let keys: Vec<(i64, String)> = rows.iter().map(|r| (r.received_at, r.id.clone())).collect();
        for view in self.views(views::Reader::of(&caller), rows).await? {
            let size = view.encoded_len() + 16;
            if used + size > budget && !requests.is_empty() {
                break;
            }
            used += size;
            requests.push(view);
        }
        if requests.len() < keys.len() {
            let (received_at, id) = &keys[requests.len() - 1];
            next_page_token = token(*received_at, id);
        }
        Ok(Response::new(ListRequestsResponse {
            requests,
            next_page_token,
        }))
    }

    type WatchStream = watch::EventStream;

    async fn watch(
        &self,
        req: tonic::Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let r = req.into_inner();
        let row = self.visible(&caller, &r.request_id).await?;
        let stream = watch::events(self.shared.clone(), &caller, row.id, r)?;
        Ok(Response::new(stream))
    }

    async fn cancel(
        &self,
        req: tonic::Request<CancelRequest>,
    ) -> Result<Response<Request>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let r = req.into_inner();
        let row = self.visible(&caller, &r.request_id).await?;
        check_text("reason", &r.reason)?;
        check_reason(
            &caller,
            &row,
            &r.reason,
            "is stored with the request and its events and sent to its processors",
        )?;
        match self
            .shared
            .store
            .cancel_by(&row.id, &r.reason, &caller.name, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?
        {
            CancelOutcome::Cancelled => {
                tracing::info!(request_id = %row.id, by = %caller.name, "request cancelled");
                self.shared.dispatch_wakeup.notify_one();
                self.shared.publish(&row.id);
            }
            CancelOutcome::NotFound => return Err(not_found(&row.id).into()),
            CancelOutcome::NotCancellable(state) => {
                return Err(ApiError::failed_precondition(format!(
                    "request {} is {} and can no longer be cancelled (a request is cancelled \
                     only while a delivery or a task can still be stopped; a contract end's \
                     deletion under way is not)",
                    row.id,
                    state.as_str_name().trim_start_matches("REQUEST_STATE_")
                ))
                .into())
            }
        }
        let row = self.visible(&caller, &row.id).await?;
        Ok(Response::new(
            self.view(views::Reader::of(&caller), row).await?,
        ))
    }

    async fn list_events(
        &self,
        req: tonic::Request<ListEventsRequest>,
    ) -> Result<Response<EventList>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let r = req.into_inner();
        let page_size = match r.page_size {
            0 => EVENTS_PAGE_DEFAULT,
            n @ 1..=EVENTS_PAGE_DEFAULT => n,
            _ => {
                return Err(ApiError::invalid([FieldViolation::new(
                    "page_size",
                    format!("must be 0 (default {EVENTS_PAGE_DEFAULT}) to {EVENTS_PAGE_DEFAULT}"),
                )])
                .into())
            }
        };
        let row = self.visible(&caller, &r.request_id).await?;
        let id = row.id.clone();
        let key = &self.shared.identity_hash_key;
        let after = match r.page_token.as_str() {
            "" => 0,
            token => events_position(key, &id, token).ok_or_else(|| {
                ApiError::invalid([FieldViolation::new(
                    "page_token",
                    format!(
                        "is not a next_page_token ListEvents gave for request {id}: send the \
                         token of this request's previous page, or start again without one"
                    ),
                )])
            })?,
        };
        let mut rows = self
            .shared
            .store
            .events_page(&id, after, i64::from(page_size) + 1)
            .await
            .map_err(ApiError::from)?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let reader = views::Reader::of(&caller);
        let request = self.view(reader, row).await?;
        // A page ends early rather than outgrow what one answer may carry (the request is on
        // every page); it holds one event at least, so that paging always advances.
        let budget =
            (MAX_MESSAGE_BYTES - LIST_HEADROOM_BYTES).saturating_sub(request.encoded_len());
        let mut used = 0;
        let mut events = Vec::with_capacity(rows.len());
        for e in &rows {
            let event = views::event_for(reader, &id, e);
            let size = event.encoded_len() + 16;
            if used + size > budget && !events.is_empty() {
                break;
            }
            used += size;
            events.push(event);
        }
        let next_page_token = match events.len().checked_sub(1).map(|last| &rows[last]) {
            Some(last) if more || events.len() < rows.len() => events_token(key, &id, last.id),
            _ => String::new(),
        };
        Ok(Response::new(EventList {
            request: Some(request),
            events,
            next_page_token,
        }))
    }

    async fn get_chain(
        &self,
        req: tonic::Request<GetChainRequest>,
    ) -> Result<Response<Chain>, Status> {
        let caller = self.partner_api_caller(&req)?;
        // Where the processors listen and why the registry could not reach one are internal
        // network details: operators need them, partners only the chain itself.
        let internal = caller.is(&[Party::Operator]);
        let reader = views::Reader::of(&caller);
        let mut processors = Vec::new();
        for p in &self.shared.config.processors {
            let row = self
                .shared
                .store
                .chain(&p.name)
                .await
                .map_err(ApiError::from)?;
            // Stored as the processor's encoded answer, so every field it reported (its
            // tables too) comes back as it was, for `subprocessor_for` to withhold.
            let subprocessors = row
                .subprocessors
                .as_deref()
                .and_then(|b| SubprocessorList::decode(b).ok())
                .map(|l| l.subprocessors)
                .unwrap_or_default()
                .into_iter()
                .map(|s| views::subprocessor_for(reader, s))
                .collect();
            // For operators only, as `last_error`: the processor's or the connection's words.
            let status_failure = match internal {
                true => (self.shared.store)
                    .status_check_error(&p.name)
                    .await
                    .map_err(ApiError::from)?,
                false => None,
            };
            let (status_check_error, status_check_failed_at) = match status_failure {
                Some((error, at)) => (error, Some(timestamp_from_millis(at))),
                None => (String::new(), None),
            };
            processors.push(ChainProcessor {
                name: p.name.clone(),
                endpoint: if internal {
                    p.endpoint.clone()
                } else {
                    String::new()
                },
                data_categories: p.categories.clone(),
                subprocessors,
                reported_at: row.reported_at.map(timestamp_from_millis),
                last_error: match internal {
                    true => row.last_error.unwrap_or_default(),
                    false => String::new(),
                },
                status_check_error,
                status_check_failed_at,
            });
        }
        Ok(Response::new(Chain { processors }))
    }

    async fn extend_deadline(
        &self,
        req: tonic::Request<ExtendDeadlineRequest>,
    ) -> Result<Response<Request>, Status> {
        let caller = self
            .partner_api_caller(&req)?
            .require(&[Party::Operator], |_| {
                "only operators may extend a due date".into()
            })?;
        let r = req.into_inner();
        let row = self.visible(&caller, &r.request_id).await?;
        check_text("reason", &r.reason)?;
        check_reason(
            &caller,
            &row,
            &r.reason,
            "is stored with the request and its events",
        )?;
        let used = (row.extension_months.max(0) as u32).min(MAX_EXTENSION_MONTHS);
        if let Some(v) = months_violation(r.months, used) {
            return Err(ApiError::invalid([v]).into());
        }
        if row.kind == RequestKind::ContractEnd {
            return Err(ApiError::failed_precondition(format!(
                "request {} is a contract end: its due date follows its grace period \
                 (GDPR art. 12(3) extends a data subject's request), so it cannot be extended",
                row.id
            ))
            .into());
        }
        if !crate::fold::request_is_open(row.state) {
            return Err(ApiError::failed_precondition(format!(
                "request {} is {}: only a request still open (RECEIVED, DISPATCHED, \
                 IN_PROGRESS or FAILED) has a due date to extend",
                row.id,
                row.state.as_str_name().trim_start_matches("REQUEST_STATE_")
            ))
            .into());
        }
        let extended = self
            .shared
            .store
            .extend_by(
                &row,
                r.months,
                &r.reason,
                &caller.name,
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        if !extended {
            return Err(ApiError::aborted(format!(
                "request {} changed while it was being extended (another extension, or it \
                 finished); read it again and retry",
                row.id
            ))
            .into());
        }
        tracing::info!(
            request_id = %row.id,
            by = %caller.name,
            months = r.months,
            "due date extended"
        );
        self.shared.publish(&row.id);
        // The new date goes to the processors now, not at the next poll.
        self.shared.dispatch_wakeup.notify_one();
        let row = self.visible(&caller, &row.id).await?;
        Ok(Response::new(
            self.view(views::Reader::of(&caller), row).await?,
        ))
    }

    async fn list_audit_entries(
        &self,
        req: tonic::Request<ListAuditEntriesRequest>,
    ) -> Result<Response<AuditEntries>, Status> {
        self.partner_api_caller(&req)?
            .require(&[Party::Operator], |_| {
                "only operators may read the audit trail".into()
            })?;
        let r = req.into_inner();
        let page_size = match r.page_size {
            0 => 500,
            n @ 1..=1000 => n,
            _ => {
                return Err(ApiError::invalid([FieldViolation::new(
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
        Ok(Response::new(AuditEntries {
            entries: entries.into_iter().map(views::audit_entry).collect(),
            next_after_seq,
        }))
    }

    async fn list_audit_checkpoints(
        &self,
        req: tonic::Request<ListAuditCheckpointsRequest>,
    ) -> Result<Response<AuditCheckpoints>, Status> {
        Ok(Response::new(self.audit_checkpoints(req).await?))
    }

    async fn list_dead_lettered_deliveries(
        &self,
        req: tonic::Request<ListDeadLetteredDeliveriesRequest>,
    ) -> Result<Response<DeadLetteredDeliveries>, Status> {
        self.partner_api_caller(&req)?
            .require(&[Party::Operator], |_| {
                "only operators may list dead-lettered deliveries".into()
            })?;
        let page_size = match req.get_ref().page_size {
            0 => 100,
            n @ 1..=500 => n,
            _ => {
                return Err(ApiError::invalid([FieldViolation::new(
                    "page_size",
                    "must be 0 (default 100) to 500",
                )])
                .into())
            }
        };
        let after = match req.get_ref().page_token.as_str() {
            "" => None,
            token => Some(dead_letter_cursor(token).ok_or_else(|| {
                ApiError::invalid([FieldViolation::new(
                    "page_token",
                    "is not a next_page_token this registry gave",
                )])
            })?),
        };
        let mut rows = self
            .shared
            .store
            .dead_lettered_deliveries(i64::from(page_size) + 1, after.as_ref())
            .await
            .map_err(ApiError::from)?;
        let truncated = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let next_page_token = match rows.last() {
            Some(last) if truncated => dead_letter_token(&DeadLetterCursor {
                dead_lettered_at: last.dead_lettered_at,
                request_id: last.request_id.clone(),
                processor: last.processor.clone(),
                op: last.op.clone(),
            }),
            _ => String::new(),
        };
        let deliveries = rows
            .into_iter()
            .map(|r| DeadLetteredDelivery {
                request_id: r.request_id,
                processor: r.processor,
                operation: r.op,
                attempts: u32::try_from(r.attempts).unwrap_or(u32::MAX),
                refusals: u32::try_from(r.refusals).unwrap_or(u32::MAX),
                last_error: r.last_error.unwrap_or_default(),
                dead_lettered_at: Some(timestamp_from_millis(r.dead_lettered_at)),
            })
            .collect();
        Ok(Response::new(DeadLetteredDeliveries {
            deliveries,
            truncated,
            next_page_token,
        }))
    }

    async fn requeue_delivery(
        &self,
        req: tonic::Request<RequeueDeliveryRequest>,
    ) -> Result<Response<Request>, Status> {
        let caller = self
            .partner_api_caller(&req)?
            .require(&[Party::Operator], |_| {
                "only operators may requeue a delivery".into()
            })?;
        let r = req.into_inner();
        ApiError::ensure_valid(text_violation("processor", &r.processor, 128, true))?;
        let row = self.visible(&caller, &r.request_id).await?;
        let outcome = self
            .shared
            .store
            .requeue_deliveries(
                &row.id,
                &r.processor,
                &caller.name,
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        match outcome {
            RequeueOutcome::Requeued(n) => {
                tracing::info!(
                    request_id = %row.id,
                    processor = %r.processor,
                    rows = n,
                    "dead-lettered delivery requeued"
                );
            }
            RequeueOutcome::NoDelivery => {
                return Err(ApiError::not_found(format!(
                    "request {} has no delivery to processor {}",
                    row.id, r.processor
                ))
                .into())
            }
            RequeueOutcome::NotDeadLettered(state) => {
                return Err(ApiError::failed_precondition(format!(
                    "the delivery of request {} to processor {} is {state}, not DEAD_LETTERED",
                    row.id, r.processor
                ))
                .into())
            }
        }
        self.shared.dispatch_wakeup.notify_one();
        self.shared.publish(&row.id);
        Ok(Response::new(self.visible_view(&caller, &row.id).await?))
    }
}

/// Logs an answered Submit (new or deduplicated) under the call's span.
fn submitted(answer: SubmitResponse, kind: i32) -> SubmitResponse {
    tracing::Span::current().record("request_id", answer.request_id.as_str());
    tracing::info!(
        request_id = %answer.request_id,
        kind = RequestKind::try_from(kind).map(|k| k.as_str_name()).unwrap_or("?"),
        deduplicated = answer.deduplicated,
        routed = answer.routed_to.len(),
        "request submitted"
    );
    answer
}

impl Api {
    /// Takes a Submit of `partner`'s quota (`[submit_quota]`), or refuses it with
    /// RESOURCE_EXHAUSTED naming the quota's keys, with a `google.rpc.RetryInfo` of the time
    /// until the bucket holds a token; each refusal is counted, and logged at most once a second
    /// per partner ([`crate::quota::WARN_EVERY`]) so that a flood does not flood the log.
    fn take_submit_quota(&self, partner: &str) -> Result<(), Status> {
        let now = std::time::Instant::now();
        let Err(refusal) = self.shared.submit_quotas.take(partner, now) else {
            return Ok(());
        };
        self.shared.metrics.submits_refused.inc(&[partner]);
        let l = &refusal.limits;
        let wait = refusal.retry_after;
        // Up to the second the label names: a retry at that second finds the token.
        let at = (self.shared.clock.now_ms())
            .saturating_add(wait.as_millis() as i64)
            .saturating_add(999)
            / 1000
            * 1000;
        let message = format!(
            "the Submit quota of partner {partner} ({} at once, {}; then {} a second, {}) is \
             used up; nothing was stored: try again in {} (at {})",
            l.burst,
            l.burst_key,
            l.per_second,
            l.per_second_key,
            crate::quota::describe(wait),
            dsrelay_runtime::clock::date_label(at)
        );
        if let Some(refused) = refusal.log {
            // `refused`: this partner's refusals since the last line, this one included.
            tracing::warn!(
                partner,
                refused,
                retry_after_ms = wait.as_millis() as u64,
                "Submit refused: the partner's Submit quota is used up"
            );
        }
        Err(Status::with_error_details(
            Code::ResourceExhausted,
            message,
            ErrorDetails::with_retry_info(Some(wait)),
        ))
    }

    /// The answer to a Submit whose request is stored already: its state, due date, trace
    /// and the processors it was routed to.
    async fn deduplicated(&self, row: RequestRow) -> Result<SubmitResponse, ApiError> {
        let routed_to = self
            .shared
            .store
            .deliveries(&row.id)
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .map(|d| d.processor)
            .collect();
        Ok(SubmitResponse {
            state: row.state as i32,
            due_at: Some(timestamp_from_millis(row.due_at)),
            trace_id: row.trace_id,
            deduplicated: true,
            routed_to,
            request_id: row.id,
        })
    }

    /// The answer to a Submit `partner` made before with the same body under the same key
    /// (`hash` is the body's), if there is one and it is a request (not a contract end).
    async fn submitted_before(
        &self,
        partner: &str,
        body: &SubmitRequest,
        hash: &str,
    ) -> Result<Option<SubmitResponse>, ApiError> {
        let Some(id) = self
            .stored_with_body(partner, &body.idempotency_key, hash)
            .await?
        else {
            return Ok(None);
        };
        let Some(row) = self
            .shared
            .store
            .request(&id)
            .await
            .map_err(ApiError::from)?
        else {
            return Ok(None);
        };
        if row.kind == RequestKind::ContractEnd {
            return Ok(None);
        }
        let answer = self.deduplicated(row).await?;
        Ok(Some(submitted(answer, body.kind)))
    }
}

/// The context of the digest of a List's identities in its page tokens.
const LIST_IDENTITIES_DOMAIN: &[u8] = b"dsrelay.list-identities.v1";

/// What separates the digest of a List's identities from the rest of its page token.
const LIST_IDENTITIES_END: char = '~';

/// A List's identities, checked and hashed, and its page token as the other filters'
/// ([`list_arguments`]) check it.
#[derive(Debug, Default, PartialEq, Eq)]
struct IdentityFilter {
    /// The keyed hashes to look for, as Submit stores them: sorted, each once.
    hashes: Vec<String>,
    /// What this listing's page tokens start with: a digest of `hashes` and
    /// [`LIST_IDENTITIES_END`]; empty without identities. [`list_arguments`] knows only the
    /// other filters, so a token carries the identities in front of what it checks.
    token_prefix: String,
    /// The page token sent, without `token_prefix`.
    inner_token: String,
}

/// List's identities of `r` as [`IdentityFilter`], hashed under `key` as Submit hashes a
/// request's; or every rule they break, held to Submit's rules with the same violations,
/// and a page token of a listing with other identities (or none).
fn identity_filter(
    key: &[u8],
    r: &ListRequestsRequest,
) -> Result<IdentityFilter, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let mut hashes = Vec::new();
    // An empty list is no filter, where Submit requires one identity at least.
    if !r.identities.is_empty() {
        violations.extend(validate_identities(&r.identities));
        violations.extend(submit_identity_violations(&r.identities));
        if violations.is_empty() {
            hashes = r.identities.iter().map(|i| keyed_hash(key, i)).collect();
            hashes.sort_unstable();
            hashes.dedup();
        }
    }
    let token_prefix = if hashes.is_empty() {
        String::new()
    } else {
        let digest = keyed_digest(key, LIST_IDENTITIES_DOMAIN, hashes.join(",").as_bytes());
        format!("{}{LIST_IDENTITIES_END}", &digest[..16])
    };
    // Tokens without identities hold no LIST_IDENTITIES_END (request ids are ours and hold
    // none), so one that holds it is of a listing with identities.
    let (token_identities, inner) = match r.page_token.split_once(LIST_IDENTITIES_END) {
        Some((digest, inner)) => (Some(digest), inner),
        None => (None, r.page_token.as_str()),
    };
    let same = match token_identities {
        Some(digest) => token_prefix.strip_suffix(LIST_IDENTITIES_END) == Some(digest),
        None => token_prefix.is_empty(),
    };
    let mut inner_token = String::new();
    if r.page_token.is_empty() || same {
        inner_token = inner.to_string();
    } else if violations.is_empty() {
        violations.push(FieldViolation::new(
            "page_token",
            "belongs to a List with other filters (identities): send the filters of the page \
             that gave it, or start again without a token",
        ));
    }
    if violations.is_empty() {
        Ok(IdentityFilter {
            hashes,
            token_prefix,
            inner_token,
        })
    } else {
        Err(violations)
    }
}

/// Refuses a Cancel's or ExtendDeadline's `reason` that holds one of the subject's
/// identities as request `row` stores them (a forgotten request has none left to hold), as
/// Submit refuses such a note: the reason is kept apart from the identities, where `kept`
/// says (the refusal quotes it). A partner's reason is read as a note is
/// ([`identity_in_note`]), an operator's as an operator's reason is ([`identity_in_text`]).
fn check_reason(
    caller: &Caller,
    row: &RequestRow,
    reason: &str,
    kept: &str,
) -> Result<(), ApiError> {
    let Some(body) = row
        .body
        .as_deref()
        .and_then(|b| SubmitRequest::decode(b).ok())
    else {
        return Ok(());
    };
    // Only identities that pass validation stand for the subject (see `identity_in_note`).
    let identities: Vec<SubjectIdentity> = body
        .identities
        .into_iter()
        .filter(|i| {
            let one = std::slice::from_ref(i);
            validate_identities(one).is_empty() && submit_identity_violations(one).is_empty()
        })
        .collect();
    let found = match caller.role {
        Party::Partner => identity_in_note(&identities, reason),
        _ => identity_in_text(&identities, reason),
    };
    // Named by kind only: echoing the identity would put it in logs and in the status.
    ApiError::ensure_valid(found.map(|kind| {
        FieldViolation::new(
            "reason",
            format!(
                "contains the subject's {kind}, one of the request's identities: the reason \
                 {kept}, apart from its identities, so leave the subject's identities out \
                 (the request already carries them)"
            ),
        )
    }))
}

/// ListEvents' page size when none is asked for, and the largest: an ordinary request's
/// events fit in one page.
const EVENTS_PAGE_DEFAULT: u32 = 1000;

/// The context of the MAC in ListEvents page tokens.
const EVENTS_TOKEN_DOMAIN: &[u8] = b"dsrelay.events-page.v1";

/// The ListEvents page token continuing after event `after` of request `request_id`:
/// `<after>.<mac>`, the MAC (keyed with `key`, the identity hash key) binding the position to
/// the request, so that a token of another request or one made up is refused rather than
/// taken as a position.
fn events_token(key: &[u8], request_id: &str, after: i64) -> String {
    let mac = keyed_digest(
        key,
        EVENTS_TOKEN_DOMAIN,
        format!("{request_id}:{after}").as_bytes(),
    );
    format!("{after}.{}", &mac[..32])
}

/// The position [`events_token`] put in `token` for request `request_id`; `None` for any
/// other token.
fn events_position(key: &[u8], request_id: &str, token: &str) -> Option<i64> {
    let (after, _) = token.split_once('.')?;
    let after: i64 = after.parse().ok().filter(|a| *a >= 0)?;
    (events_token(key, request_id, after) == token).then_some(after)
}

/// The page token continuing after `c`: `<dead_lettered_at>:<op>:<request_id>:<processor>`
/// (request ids, ours, hold no `:`; the processor's name comes last, whatever it holds).
fn dead_letter_token(c: &DeadLetterCursor) -> String {
    format!(
        "{}:{}:{}:{}",
        c.dead_lettered_at, c.op, c.request_id, c.processor
    )
}

/// The cursor `token` ([`dead_letter_token`]) names; `None` for anything else.
fn dead_letter_cursor(token: &str) -> Option<DeadLetterCursor> {
    let mut parts = token.splitn(4, ':');
    let dead_lettered_at = parts.next()?.parse().ok()?;
    let op = parts.next()?;
    let request_id = parts.next()?;
    let processor = parts.next()?;
    let printable = |s: &str| !s.is_empty() && !s.chars().any(char::is_control);
    (printable(op)
        && request_id_violation("page_token", request_id).is_none()
        && printable(processor))
    .then(|| DeadLetterCursor {
        dead_lettered_at,
        request_id: request_id.to_string(),
        processor: processor.to_string(),
        op: op.to_string(),
    })
}

#[cfg(test)]
mod actor_tests;
#[cfg(test)]
mod chain_tests;
#[cfg(test)]
mod due_list_tests;
#[cfg(test)]
mod identity_list_tests;

#[cfg(test)]
mod dead_letter_token_tests {
    use super::*;

    #[test]
    fn a_dead_letter_page_token_names_the_row_it_follows() {
        let c = DeadLetterCursor {
            dead_lettered_at: 1_800_000_000_123,
            request_id: "0190a0b0-0000-7000-8000-000000000001".into(),
            processor: "payroll:eu".into(),
            op: "deliver".into(),
        };
        assert_eq!(dead_letter_cursor(&dead_letter_token(&c)), Some(c));
        for garbage in [
            "",
            "x",
            "12",
            "12:deliver",
            "12:deliver:id",
            "abc:deliver:id:p",
            "12::id:p",
            "12:deliver:id:",
            "12:deliver:i d\u{1}:p",
        ] {
            assert_eq!(dead_letter_cursor(garbage), None, "{garbage:?}");
        }
    }
}

#[cfg(test)]
mod extension_tests {
    use super::*;

    fn rule(months: u32, used: u32) -> Option<String> {
        months_violation(months, used).map(|v| v.rule)
    }

    #[test]
    fn an_extension_refusal_says_what_was_asked_and_what_is_left() {
        assert_eq!(
            rule(3, 0).as_deref(),
            Some(
                "3 months asked, 1 to 2 months may be added: GDPR art. 12(3) allows 2 months in \
                 all and the due date has not been extended yet"
            )
        );
        assert_eq!(
            rule(0, 0).as_deref(),
            Some(
                "0 months asked, 1 to 2 months may be added: GDPR art. 12(3) allows 2 months in \
                 all and the due date has not been extended yet"
            )
        );
        assert_eq!(
            rule(2, 1).as_deref(),
            Some(
                "2 months asked, only 1 month may be added: GDPR art. 12(3) allows 2 months in \
                 all and the due date was already extended by 1 month"
            )
        );
        assert_eq!(
            rule(1, 2).as_deref(),
            Some(
                "1 month asked, no extension is left: the due date was already extended by 2 \
                 months, the most GDPR art. 12(3) allows"
            )
        );
        assert_eq!(
            rule(3, 1).as_deref(),
            Some(
                "3 months asked, only 1 month may be added: GDPR art. 12(3) allows 2 months in \
                 all and the due date was already extended by 1 month"
            )
        );
        for (months, used) in [(1, 0), (2, 0), (1, 1)] {
            assert_eq!(rule(months, used), None, "{months} after {used}");
        }
    }
}

#[cfg(test)]
mod submit_quota_tests {
    use dsrelay_proto::v1::request_service_client::RequestServiceClient;
    use dsrelay_proto::v1::{IdentityEncoding, IdentityType, SubjectIdentity};
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::test_registry::{Registry, Setup};

    fn erasure(key: &str) -> SubmitRequest {
        SubmitRequest {
            kind: RequestKind::Erasure as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: "maija@example.fi".into(),
                label: String::new(),
            }],
            idempotency_key: key.into(),
            ..Default::default()
        }
    }

    /// With a burst of 3 and one Submit an hour, a partner's 4th Submit is
    /// RESOURCE_EXHAUSTED with a RetryInfo of about an hour and nothing stored; a retry of
    /// an accepted key spends a token too; the other partner and the operator go on
    /// submitting; each refusal is counted by partner on /metrics.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partner_past_its_burst_is_refused_with_a_retry_time_and_nothing_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        let setup = Setup {
            tables: "[submit_quota]\nper_second = 0.0002778\nburst = 3\n".into(),
            more_partners: &["webform"],
            admin: true,
            ..Setup::default()
        };
        let registry = Registry::start(dir.path(), &url, setup).await;
        let mut crm = RequestServiceClient::new(registry.channel("partner-crm"));
        for key in ["k1", "k2", "k3"] {
            crm.submit(erasure(key)).await.expect(key);
        }
        let refused = crm.submit(erasure("k4")).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        let m = refused.message();
        for said in [
            "Submit quota of partner crm",
            "submit_quota.burst",
            "submit_quota.per_second",
            "nothing was stored",
            "try again in ",
        ] {
            assert!(m.contains(said), "{said:?} in {m}");
        }
        let wait = refused
            .get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .expect("a RetryInfo with a delay");
        assert!(
            (3_590..=3_600).contains(&wait.as_secs()),
            "{wait:?}: the time one token takes at 0.0002778 a second"
        );
        // A retry of an accepted key is refused the same way: the quota comes first.
        let again = crm.submit(erasure("k1")).await.unwrap_err();
        assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");

        let mut webform = RequestServiceClient::new(registry.channel("partner-webform"));
        for key in ["k1", "k2", "k3"] {
            webform.submit(erasure(key)).await.expect(key);
        }
        let mut ops = RequestServiceClient::new(registry.channel("operator"));
        for key in ["o1", "o2", "o3", "o4", "o5"] {
            ops.submit(erasure(key)).await.expect(key);
        }

        let db = Db::connect(&url).await.unwrap();
        let stored = |partner: &'static str| {
            let pool = db.pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT CAST(COUNT(*) AS BIGINT) FROM requests WHERE partner = $1",
                )
                .bind(partner)
                .fetch_one(&pool)
                .await
                .unwrap()
            }
        };
        assert_eq!(stored("crm").await, 3);
        assert_eq!(stored("webform").await, 3);
        assert_eq!(stored("ops").await, 5);
        let k4: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM requests WHERE idempotency_key = 'k4'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(k4, 0);

        let metrics = registry.scrape().await;
        for line in [
            "dsrelay_submits_refused_total{partner=\"crm\"} 2",
            "dsrelay_submits_refused_total{partner=\"webform\"} 0",
        ] {
            assert!(metrics.contains(line), "{line} in {metrics}");
        }
        assert!(!metrics.contains("partner=\"ops\""), "{metrics}");
        registry.stop().await;
    }
}

#[cfg(test)]
mod list_events_tests {
    use dsrelay_proto::v1::request_service_client::RequestServiceClient;
    use dsrelay_proto::v1::{EventType, IdentityEncoding, IdentityType, TaskState};
    use dsrelay_runtime::store::Db;
    use tonic::transport::Channel;

    use super::*;
    use crate::test_postgres::on_postgres;
    use crate::test_registry::{Registry, Setup, PROCESSOR};

    /// Progress events recorded on a request: together past one answer's 4 MiB, as 1,500
    /// acknowledgements with 4 KB reasons were.
    const MANY: usize = 1_500;

    /// Records `n` TASK_UPDATED events of over 4 KB on request `id`, straight in the store.
    async fn record_many(url: &str, id: &str, n: usize) {
        let db = Db::connect(url).await.expect("connect");
        let sql = format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
             INSERT INTO events (request_id, type, occurred_at, request_state, processor, \
             subprocessor, task_state, sequence, message) \
             SELECT $1, {}, 1000 + i, {}, '{PROCESSOR}', 'crm', {}, i, $2 || CAST(i AS TEXT) \
             FROM n",
            EventType::TaskUpdated as i32,
            RequestState::InProgress as i32,
            TaskState::InProgress as i32,
        );
        sqlx::query(&sql)
            .bind(id)
            .bind("x".repeat(4200))
            .execute(&db.pool)
            .await
            .expect("insert events");
    }

    /// The ids of request `id`'s events in the store, in order.
    async fn stored_ids(db: &Db, id: &str) -> Vec<u64> {
        let ids: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM events WHERE request_id = $1 ORDER BY id")
                .bind(id)
                .fetch_all(&db.pool)
                .await
                .expect("ids");
        ids.into_iter().map(|i| i as u64).collect()
    }

    async fn page(
        client: &mut RequestServiceClient<Channel>,
        id: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<EventList, Status> {
        client
            .list_events(ListEventsRequest {
                request_id: id.into(),
                page_size,
                page_token: page_token.into(),
            })
            .await
            .map(Response::into_inner)
    }

    /// Every event of request `id`, following the tokens; the pages' sizes.
    async fn all_pages(
        client: &mut RequestServiceClient<Channel>,
        id: &str,
        page_size: u32,
    ) -> (Vec<u64>, Vec<usize>) {
        let (mut ids, mut sizes, mut token) = (Vec::new(), Vec::new(), String::new());
        loop {
            let list = page(client, id, page_size, &token).await.expect("page");
            assert!(
                list.encoded_len() <= MAX_MESSAGE_BYTES,
                "{}",
                list.encoded_len()
            );
            assert_eq!(
                list.request.as_ref().map(|r| r.request_id.as_str()),
                Some(id)
            );
            sizes.push(list.events.len());
            ids.extend(list.events.iter().map(|e| e.event_id));
            if list.next_page_token.is_empty() {
                return (ids, sizes);
            }
            assert!(sizes.len() < 100, "pages do not end");
            token = list.next_page_token;
        }
    }

    /// A request whose events pass one answer's 4 MiB is listed whole by following
    /// `next_page_token`, each page within the limit and oldest first, by its partner and
    /// by an operator, with the default page size and a small one; an ordinary request's
    /// events come in one answer. Before, ListEvents answered OUT_OF_RANGE (encoded message
    /// too large), and nothing listed the request's events again.
    async fn events_past_one_answer_are_listed_by_pages(url: &str, dir: &std::path::Path) {
        let registry = Registry::start(dir, url, Setup::default()).await;
        let id = registry.submit(RequestKind::Erasure, "paged").await;
        let ordinary = registry.submit(RequestKind::Erasure, "ordinary").await;
        let mut ops = RequestServiceClient::new(registry.channel("operator"));
        let one = page(&mut ops, &ordinary, 0, "").await.expect("ordinary");
        assert!(!one.events.is_empty(), "{one:?}");
        assert_eq!(one.next_page_token, "");

        let before = page(&mut ops, &id, 0, "").await.expect("before").events;
        record_many(url, &id, MANY).await;
        let db = Db::connect(url).await.expect("connect");
        // The undelivered request's failed deliveries may add events meanwhile: every page
        // holds those stored before it was read, and nothing else.
        let crm = RequestServiceClient::new(registry.channel("partner-crm"));
        for (mut client, page_size) in [(ops.clone(), 0), (crm, 0), (ops.clone(), 400)] {
            let stored_before = stored_ids(&db, &id).await;
            assert!(stored_before.len() >= before.len() + MANY);
            let (ids, sizes) = all_pages(&mut client, &id, page_size).await;
            let stored_after = stored_ids(&db, &id).await;
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "oldest first, each once"
            );
            assert!(
                stored_before.iter().all(|i| ids.contains(i)),
                "every event listed"
            );
            assert!(ids.iter().all(|i| stored_after.contains(i)));
            if page_size == 0 {
                // 4 KB events: the limit ends the default page of 1000 early.
                assert!(sizes.len() >= 2 && sizes[0] < 1000, "{sizes:?}");
            } else {
                assert_eq!(sizes.len(), ids.len().div_ceil(400), "{sizes:?}");
                assert!(sizes.iter().all(|n| *n <= 400), "{sizes:?}");
            }
        }
        registry.stop().await;
    }

    /// A token is refused (INVALID_ARGUMENT naming `page_token`, saying what to send) when
    /// it is another request's, made up, or altered; so is a page size past 1000.
    async fn a_bad_page_token_is_refused(url: &str, dir: &std::path::Path) {
        let registry = Registry::start(dir, url, Setup::default()).await;
        let id = registry.submit(RequestKind::Erasure, "one").await;
        let other = registry.submit(RequestKind::Erasure, "other").await;
        record_many(url, &other, 2).await;
        let mut ops = RequestServiceClient::new(registry.channel("operator"));
        let first = page(&mut ops, &other, 1, "").await.expect("first page");
        assert!(!first.next_page_token.is_empty(), "{first:?}");
        let token = first.next_page_token;
        page(&mut ops, &other, 1, &token)
            .await
            .expect("its own token");
        let (position, mac) = token.split_once('.').expect("token");
        let altered = format!("{}.{mac}", position.parse::<i64>().unwrap() + 1);
        for bad in [
            token.clone(),
            "12".to_string(),
            "0.00".to_string(),
            format!("{position}."),
            altered,
            format!("{position}.{}", "0".repeat(32)),
        ] {
            let refused = page(&mut ops, &id, 0, &bad).await.unwrap_err();
            assert_eq!(refused.code(), Code::InvalidArgument, "{bad}: {refused:?}");
            let m = refused.message();
            assert!(
                m.contains("page_token")
                    && m.contains(&format!("ListEvents gave for request {id}"))
                    && m.contains("start again without one"),
                "{m}"
            );
        }
        let refused = page(&mut ops, &id, 1001, "").await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("page_size"), "{refused:?}");
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_past_one_answer_are_listed_by_pages_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        events_past_one_answer_are_listed_by_pages(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_past_one_answer_are_listed_by_pages_on_postgres() {
        on_postgres(|url, dir| async move {
            events_past_one_answer_are_listed_by_pages(&url, &dir).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_page_token_is_refused_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_bad_page_token_is_refused(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_page_token_is_refused_on_postgres() {
        on_postgres(|url, dir| async move {
            a_bad_page_token_is_refused(&url, &dir).await;
        })
        .await;
    }

    /// A customer number, as the review's example.
    const CUSTOMER: &str = "C-1001";

    async fn submit_customer(registry: &Registry) -> String {
        RequestServiceClient::new(registry.channel("partner-crm"))
            .submit(SubmitRequest {
                kind: RequestKind::Erasure as i32,
                identities: vec![SubjectIdentity {
                    r#type: IdentityType::CustomerNumber as i32,
                    encoding: IdentityEncoding::Raw as i32,
                    value: CUSTOMER.into(),
                    label: String::new(),
                }],
                idempotency_key: "customer".into(),
                ..Default::default()
            })
            .await
            .expect("submit")
            .into_inner()
            .request_id
    }

    fn names_the_reason(refused: &Status) {
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        let m = refused.message();
        assert!(
            m.contains("reason: contains the subject's") && !m.contains(CUSTOMER),
            "{m}"
        );
    }

    /// A Cancel's or ExtendDeadline's reason naming one of the request's identities is
    /// refused as Submit's note is, and nothing is stored; a reason without one is taken;
    /// once the request's identities are forgotten there is nothing to compare. Before, the
    /// reason went into the request, its events and the processors' cancel_reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reason_naming_the_subject_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        let registry = Registry::start(dir.path(), &url, Setup::default()).await;
        let id = submit_customer(&registry).await;
        let mut crm = RequestServiceClient::new(registry.channel("partner-crm"));
        let mut ops = RequestServiceClient::new(registry.channel("operator"));
        let cancel = |reason: &str| CancelRequest {
            request_id: id.clone(),
            reason: reason.into(),
        };
        let extend = |reason: &str| ExtendDeadlineRequest {
            request_id: id.clone(),
            months: 1,
            reason: reason.into(),
        };
        for reason in ["customer C-1001 asked", "asked by c-1001."] {
            names_the_reason(&crm.cancel(cancel(reason)).await.unwrap_err());
            names_the_reason(&ops.cancel(cancel(reason)).await.unwrap_err());
            names_the_reason(&ops.extend_deadline(extend(reason)).await.unwrap_err());
        }
        let db = Db::connect(&url).await.expect("connect");
        let quoted: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM events WHERE message LIKE '%1001%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(quoted, 0);
        let row = registry.get(&id).await;
        assert_eq!(row.state, RequestState::Received as i32, "{row:?}");
        assert!(row.extension_reasons.is_empty(), "{row:?}");

        ops.extend_deadline(extend("the holder's books are archived"))
            .await
            .expect("a reason without the subject");
        // Forgotten: the body is gone, with the identities to compare.
        sqlx::query("UPDATE requests SET body = NULL WHERE id = $1")
            .bind(&id)
            .execute(&db.pool)
            .await
            .unwrap();
        crm.cancel(cancel("customer C-1001 asked"))
            .await
            .expect("nothing to compare once forgotten");
        registry.stop().await;
    }
}
