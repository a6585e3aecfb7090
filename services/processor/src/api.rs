//! The processor's gRPC handlers for configured controllers: Deliver, Cancel, GetStatus,
//! ListSubprocessors, UpdateContractEnd and ExtendDueDate.
//!
//! Callers are mapped by [`dsrelay_runtime::grpc::Authorizer`], errors become statuses by
//! the rules of [`dsrelay_runtime::grpc::error`], and the registry's trace is continued by
//! the layer the server builder installs.

use std::sync::Arc;

use dsrelay_proto::prost_types::Timestamp;
use dsrelay_proto::v1::processor_service_server::ProcessorService;
use dsrelay_proto::v1::subprocessor::{HeldTable, MatchableIdentity};
use dsrelay_proto::v1::{
    CancelDeliveryRequest, ContractEnd, ContractEndChoice, DeliverRequest, DeliverResponse,
    ExtendDueDateRequest, GetStatusRequest, ListSubprocessorsRequest, RequestKind, Subprocessor,
    SubprocessorList, TaskList, TransferRecipient, UpdateContractEndRequest,
};
use dsrelay_runtime::grpc::{self, Authorizer, CallerTrace, ServiceName};
use dsrelay_runtime::identity::{
    correction_violation, instant_violation, request_id_violation, text_violation,
    validate_identities, FieldViolation,
};
use dsrelay_runtime::trace_context;
use tonic::{Request, Response, Status};

use crate::app::Shared;
use crate::store::{Accepted, DueDateExtended, Refusal, Updated};

/// Names the processor in its answers.
#[derive(Debug)]
pub(crate) enum Processor {}

impl ServiceName for Processor {
    const NAME: &'static str = "processor";
}

/// What can go wrong in a processor call (both APIs).
pub(crate) type ApiError = grpc::ApiError<Processor>;

/// The ProcessorService implementation.
#[derive(Clone)]
pub(crate) struct Api {
    shared: Arc<Shared>,
    /// The registries this processor works for, by certificate identity; one role.
    controllers: Arc<Authorizer<()>>,
}

impl Api {
    /// Handlers over `shared`.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let controllers = Authorizer::new(
            shared
                .config
                .controllers
                .iter()
                .map(|c| (c.identity.clone(), (), c.name.clone())),
            "is not a controller of this processor",
        );
        Self {
            shared,
            controllers: Arc::new(controllers),
        }
    }

    /// The name of the controller calling, or PERMISSION_DENIED.
    fn controller<T>(&self, req: &Request<T>) -> Result<String, ApiError> {
        Ok(self.controllers.caller(req)?.name)
    }
}

#[tonic::async_trait]
impl ProcessorService for Api {
    #[tracing::instrument(skip_all, fields(controller, request_id = %req.get_ref().request_id))]
    async fn update_contract_end(
        &self,
        req: Request<UpdateContractEndRequest>,
    ) -> Result<Response<TaskList>, Status> {
        let controller = self.controller(&req)?;
        tracing::Span::current().record("controller", controller.as_str());
        let r = req.into_inner();
        ApiError::ensure_valid(update_violations(&r))?;
        let wanted = r.contract_end.unwrap_or_default();
        let updated = self
            .shared
            .store
            .update_contract_end(
                &controller,
                &r.request_id,
                &wanted,
                r.recipient.as_ref(),
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        let tasks = match updated {
            Updated::NotFound => {
                return Err(ApiError::not_found(format!(
                    "request {} is not a contract end delivered by this controller",
                    r.request_id
                ))
                .into())
            }
            Updated::Refused(Refusal::Invalid(field, rule)) => {
                return Err(ApiError::invalid([FieldViolation::new(field, rule)]).into())
            }
            Updated::Refused(Refusal::TooLate(why)) => {
                return Err(ApiError::failed_precondition(format!(
                    "the contract end can no longer change: {why}"
                ))
                .into())
            }
            Updated::Done(tasks) => tasks,
        };
        self.shared.task_wakeup.notify_one();
        self.shared.ack_wakeup.notify_one();
        tracing::info!("contract end terms updated");
        Ok(Response::new(TaskList {
            request_id: r.request_id,
            tasks: tasks.iter().map(|t| t.to_status()).collect(),
        }))
    }

    // A child of the registry's delivery attempt: the trace crosses the hop.
    #[tracing::instrument(name = "accept", skip_all, fields(
        request_id = %req.get_ref().request_id,
        trace_id = CallerTrace::of(&req).map_or("", CallerTrace::trace_id),
        controller,
    ))]
    async fn deliver(
        &self,
        req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let controller = self.controller(&req)?;
        let span = tracing::Span::current();
        span.record("controller", controller.as_str());
        // Without a tracer, the registry's header still names the request's trace.
        let traceparent = trace_context::traceparent_of(&span)
            .or_else(|| CallerTrace::of(&req).map(|t| t.traceparent().to_string()));

        let r = req.into_inner();
        ApiError::ensure_valid(delivery_violations(&r))?;
        let kind = RequestKind::try_from(r.kind).unwrap_or(RequestKind::Unspecified);
        let wanted: Vec<&str> = r
            .scope
            .as_ref()
            .filter(|_| kind != RequestKind::ContractEnd)
            .map(|s| s.data_categories.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let subprocessors: Vec<String> = self
            .shared
            .config
            .subprocessors
            .iter()
            .filter(|s| {
                wanted.is_empty() || s.categories.iter().any(|c| wanted.contains(&c.as_str()))
            })
            .map(|s| s.name.clone())
            .collect();
        let accepted = self
            .shared
            .store
            .accept(
                &controller,
                &r,
                &subprocessors,
                traceparent.as_deref(),
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        let (tasks, duplicate) = match accepted {
            Accepted::New(t) => {
                tracing::info!(tasks = t.len(), "request accepted");
                self.shared.task_wakeup.notify_one();
                (t, false)
            }
            Accepted::Duplicate(t) => (t, true),
        };
        Ok(Response::new(DeliverResponse {
            tasks: tasks.iter().map(|t| t.to_status()).collect(),
            duplicate,
        }))
    }

    #[tracing::instrument(skip_all, fields(controller, request_id = %req.get_ref().request_id))]
    async fn cancel(
        &self,
        req: Request<CancelDeliveryRequest>,
    ) -> Result<Response<TaskList>, Status> {
        let controller = self.controller(&req)?;
        tracing::Span::current().record("controller", controller.as_str());
        let r = req.into_inner();
        ApiError::ensure_valid(
            request_id_violation("request_id", &r.request_id)
                .into_iter()
                .chain(text_violation("reason", &r.reason, 1024, false)),
        )?;
        let tasks = self
            .shared
            .store
            .cancel(
                &controller,
                &r.request_id,
                &r.reason,
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        self.shared.ack_wakeup.notify_one();
        tracing::info!("request cancelled");
        Ok(Response::new(TaskList {
            request_id: r.request_id,
            tasks: tasks.iter().map(|t| t.to_status()).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(controller, request_id = %req.get_ref().request_id))]
    async fn extend_due_date(
        &self,
        req: Request<ExtendDueDateRequest>,
    ) -> Result<Response<TaskList>, Status> {
        let controller = self.controller(&req)?;
        tracing::Span::current().record("controller", controller.as_str());
        let r = req.into_inner();
        let mut violations: Vec<FieldViolation> = request_id_violation("request_id", &r.request_id)
            .into_iter()
            .collect();
        match &r.due_at {
            None => violations.push(FieldViolation::new("due_at", "required")),
            Some(t) => violations.extend(instant_violation("due_at", t)),
        }
        ApiError::ensure_valid(violations)?;
        let due_at = r
            .due_at
            .as_ref()
            .map(dsrelay_proto::millis_from_timestamp)
            .unwrap_or_default();
        let extended = self
            .shared
            .store
            .extend_due_date(
                &controller,
                &r.request_id,
                due_at,
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        let tasks = match extended {
            DueDateExtended::NotFound => {
                return Err(ApiError::not_found(format!(
                    "request {} was not delivered here",
                    r.request_id
                ))
                .into())
            }
            DueDateExtended::ContractEnd => {
                return Err(ApiError::failed_precondition(format!(
                    "request {} is a contract end: its due date follows its grace period and \
                     cannot be extended",
                    r.request_id
                ))
                .into())
            }
            DueDateExtended::Tasks { moved, tasks } => {
                if moved {
                    tracing::info!(due_at, "due date extended");
                }
                tasks
            }
        };
        Ok(Response::new(TaskList {
            request_id: r.request_id,
            tasks: tasks.iter().map(|t| t.to_status()).collect(),
        }))
    }

    async fn list_subprocessors(
        &self,
        req: Request<ListSubprocessorsRequest>,
    ) -> Result<Response<SubprocessorList>, Status> {
        self.controller(&req)?;
        // The kinds partners submit; CONTRACT_END is left out until the chain view
        // (`dsrctl chain`, which reads six kinds as "all kinds") knows it.
        let kinds: Vec<RequestKind> = (1..=6)
            .filter_map(|k| RequestKind::try_from(k).ok())
            .collect();
        let subprocessors = self
            .shared
            .config
            .subprocessors
            .iter()
            .map(|s| {
                let connector = self.shared.connectors.get(&s.name);
                let mark = self.shared.unavailable_until.mark(&s.name);
                Subprocessor {
                    name: s.name.clone(),
                    country: s.country.clone(),
                    transfer_mechanism: s.transfer_mechanism.to_proto() as i32,
                    data_categories: s.categories.clone(),
                    connector: connector.map(|c| c.kind_name()).unwrap_or("").to_string(),
                    supported_kinds: kinds
                        .iter()
                        .filter(|k| connector.is_some_and(|c| c.supports(**k)))
                        .map(|k| *k as i32)
                        .collect(),
                    description: s.description.clone(),
                    matchable_identities: connector
                        .map(|c| c.matchable_identities())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(ty, encoding)| MatchableIdentity {
                            r#type: ty as i32,
                            encoding: encoding as i32,
                        })
                        .collect(),
                    unreachable_since: mark
                        .as_ref()
                        .map(|m| dsrelay_proto::timestamp_from_millis(m.since)),
                    unreachable_error: mark.map(|m| m.error).unwrap_or_default(),
                    // A table naming no categories holds every category of its
                    // subprocessor, as a scoped request's narrowing takes it.
                    tables: connector
                        .map(|c| c.held_tables())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|t| HeldTable {
                            name: t.name,
                            inherited: t.categories.is_none(),
                            data_categories: t.categories.unwrap_or_else(|| s.categories.clone()),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Response::new(SubprocessorList { subprocessors }))
    }

    async fn get_status(
        &self,
        req: Request<GetStatusRequest>,
    ) -> Result<Response<TaskList>, Status> {
        let controller = self.controller(&req)?;
        let r = req.into_inner();
        ApiError::ensure_valid(request_id_violation("request_id", &r.request_id))?;
        let store = &self.shared.store;
        if !store
            .request_exists(&controller, &r.request_id)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ApiError::not_found(format!(
                "request {} was not delivered here",
                r.request_id
            ))
            .into());
        }
        let tasks = store
            .tasks(&controller, &r.request_id)
            .await
            .map_err(ApiError::from)?;
        // The registry reads these states here, so a dead letter of one of these tasks at
        // or below its reported sequence no longer needs an operator. Failing to record
        // that keeps the dead letter counted; it does not withhold the answer.
        let reported: Vec<(&str, i64)> = tasks
            .iter()
            .map(|t| (t.key.subprocessor.as_str(), t.sequence))
            .collect();
        let now = self.shared.clock.now_ms();
        match store
            .status_answered(&controller, &r.request_id, &reported, now)
            .await
        {
            // A dead letter carrying a certificate was put back in the queue: send it now
            // rather than at the sender's next poll.
            Ok(settled) if settled.requeued > 0 => self.shared.ack_wakeup.notify_one(),
            Ok(_) => {}
            Err(e) => {
                let error = format!("{e:#}");
                tracing::warn!(request_id = %r.request_id, %error, "recording GetStatus's answer failed");
            }
        }
        Ok(Response::new(TaskList {
            request_id: r.request_id,
            tasks: tasks.iter().map(|t| t.to_status()).collect(),
        }))
    }
}

/// At most this many data categories in a delivered scope, as the registry's Submit allows.
const MAX_CATEGORIES: usize = 32;
/// At most this many bytes in a data category, a correction's field name or a recipient's
/// name, endpoint or identity.
const MAX_NAME: usize = 256;
/// At most this many public keys for a recipient's receipts (its current one and those it
/// rotated away from).
const MAX_RECIPIENT_KEYS: usize = 16;
/// At most this many corrections, as the registry's Submit allows.
const MAX_CORRECTIONS: usize = 32;
/// At most this many bytes in a correction's new value.
const MAX_VALUE: usize = 1024;

/// Every rule a delivery breaks. Every text it carries reaches the store and the holders, so
/// each is checked by length and for control characters ([`text_violation`]), whichever
/// registry sent it.
fn delivery_violations(r: &DeliverRequest) -> Vec<FieldViolation> {
    let mut out: Vec<FieldViolation> = request_id_violation("request_id", &r.request_id)
        .into_iter()
        .collect();
    let kind = RequestKind::try_from(r.kind).unwrap_or(RequestKind::Unspecified);
    match kind {
        RequestKind::Unspecified => {
            out.push(FieldViolation::new(
                "kind",
                format!("{} is not a request kind", r.kind),
            ));
            out.extend(validate_identities(&r.identities));
        }
        // All of the controller's data, not a data subject's.
        RequestKind::ContractEnd => {
            if !r.identities.is_empty() {
                out.push(FieldViolation::new(
                    "identities",
                    "a contract end names no data subject: send no identities",
                ));
            }
            match r.parameters.as_ref().and_then(|p| p.contract_end.as_ref()) {
                None => out.push(FieldViolation::new(
                    "parameters.contract_end",
                    "required for CONTRACT_END",
                )),
                Some(c) => out.extend(terms_violations("parameters.contract_end", c, true)),
            }
        }
        _ => out.extend(validate_identities(&r.identities)),
    }
    out.extend(misplaced_parameters(kind, r));
    for (field, t) in [("received_at", &r.received_at), ("due_at", &r.due_at)] {
        out.extend(t.as_ref().and_then(|t| instant_violation(field, t)));
    }
    // With nothing to change, the connector would refuse it only after the registry was told
    // it was taken; the registry's Submit asks for the same.
    let corrections = r.parameters.as_ref().map_or(0, |p| p.corrections.len());
    if kind == RequestKind::Rectification && corrections == 0 {
        out.push(FieldViolation::new(
            "parameters.corrections",
            format!("a rectification needs 1 to {MAX_CORRECTIONS} corrections"),
        ));
    }
    if let Some(scope) = &r.scope {
        if scope.data_categories.len() > MAX_CATEGORIES {
            out.push(FieldViolation::new(
                "scope.data_categories",
                format!("at most {MAX_CATEGORIES} categories are allowed"),
            ));
        } else {
            for (i, c) in scope.data_categories.iter().enumerate() {
                out.extend(text_violation(
                    &format!("scope.data_categories[{i}]"),
                    c,
                    MAX_NAME,
                    true,
                ));
            }
        }
    }
    if let Some(p) = &r.parameters {
        if p.corrections.len() > MAX_CORRECTIONS {
            out.push(FieldViolation::new(
                "parameters.corrections",
                format!("at most {MAX_CORRECTIONS} corrections are allowed"),
            ));
        } else {
            for (i, c) in p.corrections.iter().enumerate() {
                let at = format!("parameters.corrections[{i}]");
                out.extend(text_violation(
                    &format!("{at}.field"),
                    &c.field,
                    MAX_NAME,
                    true,
                ));
                let new_value = format!("{at}.new_value");
                // As the registry's Submit does, so that one of an older build cannot have
                // a holder write an identity the subject can no longer be found by.
                out.extend(
                    text_violation(&new_value, &c.new_value, MAX_VALUE, false)
                        .or_else(|| correction_violation(&new_value, &c.field, &c.new_value)),
                );
            }
        }
        out.extend(text_violation(
            "parameters.transfer_recipient",
            &p.transfer_recipient,
            MAX_NAME,
            false,
        ));
    }
    if let Some(to) = &r.recipient {
        out.extend(recipient_violations(to));
    }
    out
}

/// Every rule an update of contract end terms breaks.
fn update_violations(r: &UpdateContractEndRequest) -> Vec<FieldViolation> {
    let mut out: Vec<FieldViolation> = request_id_violation("request_id", &r.request_id)
        .into_iter()
        .collect();
    match &r.contract_end {
        None => out.push(FieldViolation::new("contract_end", "required")),
        Some(c) => out.extend(terms_violations("contract_end", c, false)),
    }
    if let Some(to) = &r.recipient {
        out.extend(recipient_violations(to));
    }
    out
}

/// What is wrong with the `recipient` of a delivery or of an update: either is stored as the
/// place a transfer goes, so both are held to the same rules.
fn recipient_violations(to: &TransferRecipient) -> Vec<FieldViolation> {
    let mut out: Vec<FieldViolation> = [
        ("recipient.name", &to.name),
        ("recipient.endpoint", &to.endpoint),
        ("recipient.identity", &to.identity),
    ]
    .into_iter()
    .filter_map(|(field, value)| text_violation(field, value, MAX_NAME, true))
    .collect();
    if to.public_keys.len() > MAX_RECIPIENT_KEYS {
        out.push(FieldViolation::new(
            "recipient.public_keys",
            format!(
                "at most {MAX_RECIPIENT_KEYS} keys, {} given",
                to.public_keys.len()
            ),
        ));
        return out;
    }
    for (i, key) in to.public_keys.iter().enumerate() {
        let field = format!("recipient.public_keys[{i}]");
        // Base64 only, as stored (space-separated): a PEM key would not survive the join.
        let parsed = (!key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| dsrelay_runtime::signing::PublicKey::parse(key).ok())
            .flatten();
        if parsed.is_none() {
            out.push(FieldViolation::new(
                &field,
                "must be the standard base64 of an Ed25519 public key's 32 bytes",
            ));
        } else if to.public_keys[..i].contains(key) {
            out.push(FieldViolation::new(&field, "repeats an earlier key"));
        }
    }
    out
}

/// Parameters of another kind than `kind`: a registry that sends them has mistaken
/// something, and acting on either half could be acting on the wrong one.
fn misplaced_parameters(kind: RequestKind, r: &DeliverRequest) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    if kind == RequestKind::Unspecified {
        return out;
    }
    let got = kind.as_str_name().trim_start_matches("REQUEST_KIND_");
    let mut misplaced = |field: &str, owner: &str| {
        out.push(FieldViolation::new(
            field,
            format!("only a {owner} carries it (this is {got})"),
        ))
    };
    if let Some(p) = &r.parameters {
        if !p.corrections.is_empty() && kind != RequestKind::Rectification {
            misplaced("parameters.corrections", "RECTIFICATION");
        }
        if p.lift_restriction && kind != RequestKind::Restriction {
            misplaced("parameters.lift_restriction", "RESTRICTION");
        }
        if !p.transfer_recipient.is_empty() && kind != RequestKind::Transfer {
            misplaced("parameters.transfer_recipient", "TRANSFER");
        }
        if p.contract_end.is_some() && kind != RequestKind::ContractEnd {
            misplaced("parameters.contract_end", "CONTRACT_END");
        }
    }
    if r.recipient.is_some() && !matches!(kind, RequestKind::Transfer | RequestKind::ContractEnd) {
        misplaced("recipient", "TRANSFER or CONTRACT_END");
    }
    out
}

/// What is wrong with contract end terms under `at`; a delivery (`delivered`) must carry both
/// dates, an update may leave them out (they cannot change).
fn terms_violations(at: &str, c: &ContractEnd, delivered: bool) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    let choice = ContractEndChoice::try_from(c.choice).unwrap_or(ContractEndChoice::Unspecified);
    if choice == ContractEndChoice::Unspecified {
        out.push(FieldViolation::new(
            format!("{at}.choice"),
            "must be NONE, DELETE or RETURN_THEN_DELETE",
        ));
    }
    for (name, t) in [
        ("effective_at", &c.effective_at),
        ("grace_ends_at", &c.grace_ends_at),
    ] {
        match t {
            None if delivered => out.push(FieldViolation::new(format!("{at}.{name}"), "required")),
            None => {}
            Some(t) => out.extend(instant_violation(&format!("{at}.{name}"), t)),
        }
    }
    // An instant outside the years is reported above; comparing it would only say it again.
    let real = |t: &Option<Timestamp>| {
        t.as_ref()
            .filter(|t| dsrelay_proto::is_real_instant(t))
            .map(dsrelay_proto::millis_from_timestamp)
    };
    if let (Some(e), Some(g)) = (real(&c.effective_at), real(&c.grace_ends_at)) {
        if g < e {
            out.push(FieldViolation::new(
                format!("{at}.grace_ends_at"),
                "must not be before effective_at",
            ));
        }
    }
    out.extend(text_violation(
        &format!("{at}.transfer_recipient"),
        &c.transfer_recipient,
        MAX_NAME,
        false,
    ));
    if c.return_confirmed && choice != ContractEndChoice::ReturnThenDelete {
        out.push(FieldViolation::new(
            format!("{at}.return_confirmed"),
            "only a RETURN_THEN_DELETE contract end has a return to confirm",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::prost::Message;
    use dsrelay_proto::v1::{
        FieldCorrection, IdentityEncoding, IdentityType, RequestParameters, Scope, SubjectIdentity,
    };
    use dsrelay_proto::{EARLIEST_INSTANT_SECONDS, LATEST_INSTANT_SECONDS};
    use dsrelay_runtime::identity::{MAX_IDENTITIES, MAX_IDENTITY_LABEL, MAX_IDENTITY_VALUE};
    use dsrelay_runtime::signing::SigningKey;

    use super::*;

    /// The last instant of the year 9999, the longest to encode of those accepted.
    fn latest() -> Timestamp {
        Timestamp {
            seconds: LATEST_INSTANT_SECONDS,
            nanos: 999_999_999,
        }
    }

    /// The largest delivery the registry sends: its largest valid Submit (a rectification)
    /// with the request id, dates and a recipient.
    fn largest_delivery() -> DeliverRequest {
        let text = |len: usize| "€".repeat(len / 3) + &"x".repeat(len % 3);
        DeliverRequest {
            request_id: "r".repeat(dsrelay_runtime::identity::MAX_REQUEST_ID),
            kind: RequestKind::Rectification as i32,
            identities: (0..MAX_IDENTITIES)
                .map(|_| SubjectIdentity {
                    r#type: IdentityType::Other as i32,
                    encoding: IdentityEncoding::Raw as i32,
                    value: text(MAX_IDENTITY_VALUE),
                    label: text(MAX_IDENTITY_LABEL),
                })
                .collect(),
            scope: Some(Scope {
                data_categories: (0..MAX_CATEGORIES).map(|_| "c".repeat(64)).collect(),
            }),
            parameters: Some(RequestParameters {
                corrections: (0..MAX_CORRECTIONS)
                    .map(|_| FieldCorrection {
                        field: "f".repeat(64),
                        new_value: text(MAX_VALUE),
                    })
                    .collect(),
                ..Default::default()
            }),
            received_at: Some(latest()),
            due_at: Some(latest()),
            recipient: None,
        }
    }

    /// A transfer with the longest recipient.
    fn transfer() -> DeliverRequest {
        DeliverRequest {
            kind: RequestKind::Transfer as i32,
            parameters: Some(RequestParameters {
                transfer_recipient: "n".repeat(MAX_NAME),
                ..Default::default()
            }),
            recipient: Some(TransferRecipient {
                name: "n".repeat(MAX_NAME),
                endpoint: "e".repeat(MAX_NAME),
                identity: "i".repeat(MAX_NAME),
                public_keys: (0..MAX_RECIPIENT_KEYS)
                    .map(|_| SigningKey::generate().public_key().to_base64())
                    .collect(),
            }),
            ..largest_delivery()
        }
    }

    #[test]
    fn the_largest_valid_delivery_fits_the_decode_limit() {
        let r = largest_delivery();
        assert_eq!(delivery_violations(&r), []);
        let len = r.encoded_len();
        eprintln!("the largest valid delivery: {len} bytes");
        assert!(len <= crate::app::MAX_API_MESSAGE_BYTES, "{len} bytes");
        assert!(len > crate::app::MAX_API_MESSAGE_BYTES / 2, "{len} bytes");
    }

    #[test]
    fn every_text_of_a_delivery_is_checked_for_control_characters() {
        let bad = "a\u{0}b";
        let mut r = largest_delivery();
        r.identities[0].label = bad.into();
        r.scope.as_mut().unwrap().data_categories[3] = bad.into();
        let p = r.parameters.as_mut().unwrap();
        p.corrections[1].field = bad.into();
        p.corrections[2].new_value = bad.into();
        let fields: Vec<String> = delivery_violations(&r)
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "identities[0].label",
                "scope.data_categories[3]",
                "parameters.corrections[1].field",
                "parameters.corrections[2].new_value",
            ]
        );

        let mut r = transfer();
        assert_eq!(delivery_violations(&r), []);
        r.parameters.as_mut().unwrap().transfer_recipient = bad.into();
        let to = r.recipient.as_mut().unwrap();
        to.name = bad.into();
        to.endpoint = bad.into();
        to.identity = bad.into();
        let fields: Vec<String> = delivery_violations(&r)
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(
            fields,
            [
                "parameters.transfer_recipient",
                "recipient.name",
                "recipient.endpoint",
                "recipient.identity",
            ]
        );
    }

    #[test]
    fn parameters_of_another_kind_are_refused() {
        let mut r = transfer();
        r.kind = RequestKind::Erasure as i32;
        let p = r.parameters.as_mut().unwrap();
        p.corrections = largest_delivery().parameters.unwrap().corrections;
        p.lift_restriction = true;
        p.contract_end = Some(Default::default());
        let v = delivery_violations(&r);
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "parameters.corrections",
                "parameters.lift_restriction",
                "parameters.transfer_recipient",
                "parameters.contract_end",
                "recipient",
            ]
        );
        assert_eq!(
            v[0].rule,
            "only a RECTIFICATION carries it (this is ERASURE)"
        );
    }

    #[test]
    fn too_many_categories_or_corrections_are_refused_by_count() {
        let mut r = largest_delivery();
        r.scope.as_mut().unwrap().data_categories = vec!["c".into(); 10_000];
        r.parameters.as_mut().unwrap().corrections = vec![Default::default(); 10_000];
        let fields: Vec<String> = delivery_violations(&r)
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["scope.data_categories", "parameters.corrections"]);
    }

    /// Valid contract end terms, dated from the first to the last accepted instant.
    fn terms() -> ContractEnd {
        ContractEnd {
            choice: ContractEndChoice::Delete as i32,
            effective_at: Some(Timestamp {
                seconds: EARLIEST_INSTANT_SECONDS,
                nanos: 0,
            }),
            grace_ends_at: Some(latest()),
            ..Default::default()
        }
    }

    fn fields(violations: Vec<FieldViolation>) -> Vec<String> {
        violations.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn an_update_s_recipient_is_checked_as_a_delivery_s_is() {
        let mut r = UpdateContractEndRequest {
            request_id: "ce-1".into(),
            contract_end: Some(terms()),
            recipient: transfer().recipient,
        };
        assert_eq!(update_violations(&r), []);
        r.recipient = Some(TransferRecipient {
            name: "archive".into(),
            endpoint: String::new(),
            identity: "x\u{0}".into(),
            ..Default::default()
        });
        let v = update_violations(&r);
        assert_eq!(
            fields(v.clone()),
            ["recipient.endpoint", "recipient.identity"]
        );
        assert_eq!(v[0].rule, "is required (1 to 256 bytes of text)");
        r.recipient = Some(TransferRecipient {
            name: "n".repeat(MAX_NAME + 1),
            ..transfer().recipient.unwrap()
        });
        assert_eq!(fields(update_violations(&r)), ["recipient.name"]);
    }

    /// The keys are stored space-separated and parsed when a receipt comes, so only base64
    /// keys are taken, each once, and not more than a ring holds.
    #[test]
    fn a_recipient_s_public_keys_are_base64_keys_each_once() {
        let key = SigningKey::generate().public_key();
        let with = |keys: Vec<String>| {
            let mut r = transfer();
            r.recipient.as_mut().unwrap().public_keys = keys;
            delivery_violations(&r)
        };
        assert_eq!(with(vec![key.to_base64()]), []);
        let pem = key.to_pem().unwrap();
        let v = with(vec![
            key.to_base64(),
            "not a key".into(),
            pem,
            String::new(),
            "AAAA".into(),
            key.to_base64(),
        ]);
        assert_eq!(
            fields(v.clone()),
            (1..6)
                .map(|i| format!("recipient.public_keys[{i}]"))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            v[0].rule,
            "must be the standard base64 of an Ed25519 public key's 32 bytes"
        );
        assert_eq!(v[4].rule, "repeats an earlier key");
        let many = (0..=MAX_RECIPIENT_KEYS)
            .map(|_| SigningKey::generate().public_key().to_base64())
            .collect();
        let v = with(many);
        assert_eq!(fields(v.clone()), ["recipient.public_keys"]);
        assert_eq!(v[0].rule, "at most 16 keys, 17 given");
    }

    #[test]
    fn a_rectification_without_corrections_is_refused() {
        let mut r = largest_delivery();
        r.parameters.as_mut().unwrap().corrections.clear();
        let v = delivery_violations(&r);
        assert_eq!(fields(v.clone()), ["parameters.corrections"]);
        assert_eq!(v[0].rule, "a rectification needs 1 to 32 corrections");
        r.parameters = None;
        assert_eq!(fields(delivery_violations(&r)), ["parameters.corrections"]);
        // Other kinds carry none.
        r.kind = RequestKind::Erasure as i32;
        assert_eq!(delivery_violations(&r), []);
    }

    #[test]
    fn instants_outside_the_years_2000_to_9999_are_refused_naming_the_field() {
        let at = |seconds: i64| Some(Timestamp { seconds, nanos: 0 });
        let mut r = largest_delivery();
        r.received_at = at(1_800_000_000_000);
        r.due_at = at(LATEST_INSTANT_SECONDS + 1);
        let v = delivery_violations(&r);
        assert_eq!(fields(v.clone()), ["received_at", "due_at"]);
        assert!(v[0].rule.contains("2000 and 9999"), "{v:?}");
        assert!(v[0].rule.contains("1800000000000"), "{v:?}");
        r.received_at = at(EARLIEST_INSTANT_SECONDS - 1);
        r.due_at = at(i64::MIN);
        assert_eq!(fields(delivery_violations(&r)), ["received_at", "due_at"]);

        let mut end = DeliverRequest {
            request_id: "ce-1".into(),
            kind: RequestKind::ContractEnd as i32,
            parameters: Some(RequestParameters {
                contract_end: Some(terms()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(delivery_violations(&end), []);
        let c = end
            .parameters
            .as_mut()
            .unwrap()
            .contract_end
            .as_mut()
            .unwrap();
        c.effective_at = at(1_800_000_000_000);
        c.grace_ends_at = at(i64::MAX);
        assert_eq!(
            fields(delivery_violations(&end)),
            [
                "parameters.contract_end.effective_at",
                "parameters.contract_end.grace_ends_at",
            ]
        );

        let mut update = UpdateContractEndRequest {
            request_id: "ce-1".into(),
            contract_end: Some(ContractEnd {
                effective_at: None,
                ..terms()
            }),
            recipient: None,
        };
        assert_eq!(update_violations(&update), []);
        update.contract_end.as_mut().unwrap().grace_ends_at = at(1_800_000_000_000);
        assert_eq!(
            fields(update_violations(&update)),
            ["contract_end.grace_ends_at"]
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[a-z\u{0}-\u{1f}\u{7f}\u{80}-\u{9f}€ ]{0,40}",
                (0usize..2000).prop_map(|n| "x".repeat(n)),
            ]
        }

        fn number() -> impl Strategy<Value = i32> {
            prop_oneof![4 => -2..10i32, 1 => any::<i32>()]
        }

        fn any_delivery() -> impl Strategy<Value = DeliverRequest> {
            let identity = (number(), number(), text(), text()).prop_map(|(t, e, value, label)| {
                SubjectIdentity {
                    r#type: t,
                    encoding: e,
                    value,
                    label,
                }
            });
            let parameters = (
                prop::collection::vec((text(), text()), 0..40),
                any::<bool>(),
                text(),
                prop::option::of((number(), any::<bool>(), text(), any::<i64>())),
            )
                .prop_map(|(corrections, lift, recipient, end)| RequestParameters {
                    corrections: corrections
                        .into_iter()
                        .map(|(field, new_value)| FieldCorrection { field, new_value })
                        .collect(),
                    lift_restriction: lift,
                    transfer_recipient: recipient,
                    contract_end: end.map(|(choice, return_confirmed, transfer_recipient, at)| {
                        ContractEnd {
                            choice,
                            effective_at: Some(dsrelay_proto::timestamp_from_millis(at)),
                            grace_ends_at: Some(dsrelay_proto::timestamp_from_millis(
                                at.wrapping_neg(),
                            )),
                            return_confirmed,
                            transfer_recipient,
                        }
                    }),
                });
            (
                (text(), number()),
                prop::collection::vec(identity, 0..20),
                prop::option::of(prop::collection::vec(text(), 0..40)),
                prop::option::of(parameters),
                prop::option::of((text(), text(), text())),
            )
                .prop_map(
                    |((request_id, kind), identities, categories, parameters, to)| DeliverRequest {
                        request_id,
                        kind,
                        identities,
                        scope: categories.map(|data_categories| Scope { data_categories }),
                        parameters,
                        recipient: to.map(|(name, endpoint, identity)| TransferRecipient {
                            name,
                            endpoint,
                            identity,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                )
        }

        proptest! {
            #[test]
            fn any_delivery_is_judged_without_panicking(r in any_delivery()) {
                for v in delivery_violations(&r) {
                    prop_assert!(!v.field.is_empty() && !v.rule.is_empty(), "{v:?}");
                }
            }

            #[test]
            fn a_control_character_in_any_text_of_a_delivery_is_refused(
                which in 0usize..6,
                c in prop_oneof![0u32..0x09, 0x0bu32..0x0d, 0x0eu32..0x20, 0x7fu32..0xa0]
                    .prop_map(|c| char::from_u32(c).expect("a control character")),
            ) {
                let bad = format!("a{c}b");
                let (mut r, field) = match which {
                    0 => {
                        let mut r = largest_delivery();
                        r.scope.as_mut().unwrap().data_categories[0] = bad;
                        (r, "scope.data_categories[0]")
                    }
                    1 => {
                        let mut r = largest_delivery();
                        r.parameters.as_mut().unwrap().corrections[0].new_value = bad;
                        (r, "parameters.corrections[0].new_value")
                    }
                    2 => {
                        let mut r = largest_delivery();
                        r.identities[0].label = bad;
                        (r, "identities[0].label")
                    }
                    3 => {
                        let mut r = transfer();
                        r.parameters.as_mut().unwrap().transfer_recipient = bad;
                        (r, "parameters.transfer_recipient")
                    }
                    4 => {
                        let mut r = transfer();
                        r.recipient.as_mut().unwrap().endpoint = bad;
                        (r, "recipient.endpoint")
                    }
                    _ => {
                        let mut r = largest_delivery();
                        r.identities[0].value = bad;
                        (r, "identities[0].value")
                    }
                };
                r.request_id = "r-1".into();
                let v = delivery_violations(&r);
                prop_assert!(v.iter().any(|v| v.field == field), "{c:?} in {field}: {v:?}");
            }
        }
    }
}

#[cfg(test)]
#[path = "held_tables_tests.rs"]
mod held_tables_tests;

#[cfg(test)]
#[path = "correction_tests.rs"]
mod correction_tests;
