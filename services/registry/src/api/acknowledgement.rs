//! The acknowledgement API (`AcknowledgementService`): processors report the state of the
//! tasks of requests delivered to them, in batches. A COMPLETED TRANSFER task must come with
//! the recipient's receipt (`evidence.transfer_receipt`): without it nothing proves the data
//! arrived, so the batch is invalid.

use std::collections::{BTreeMap, BTreeSet};

use dsrelay_proto::v1::acknowledgement_service_server::AcknowledgementService;
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Acknowledgement, RequestKind, TaskState,
    TransferReceipt,
};
use dsrelay_runtime::identity::{request_id_violation, FieldViolation};
use dsrelay_runtime::trace_context;
use tonic::{Response, Status};

use crate::auth::Party;
use crate::error::ApiError;
use crate::store::{AckOutcome, TaskUpdate};
use crate::validate::text_violation;

use super::Api;

/// At most this many acknowledgements in one call.
pub(crate) const MAX_ACKS_PER_CALL: usize = 500;

#[tonic::async_trait]
impl AcknowledgementService for Api {
    #[tracing::instrument(skip_all, fields(processor, count))]
    async fn acknowledge(
        &self,
        req: tonic::Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        let processor = self
            .shared
            .auth
            .require(&req, &[Party::Processor], |c| {
                format!(
                    "{} is not a processor and may not acknowledge tasks",
                    c.name
                )
            })?
            .name;
        let acks = req.into_inner().acknowledgements;
        tracing::Span::current()
            .record("processor", processor.as_str())
            .record("count", acks.len());
        let mut problems = violations(&acks);
        problems.extend(self.receipt_violations(&acks).await?);
        ApiError::ensure_valid(problems)?;
        let mut updates: Vec<TaskUpdate> = acks.iter().map(TaskUpdate::from).collect();
        self.check_certificates(&processor, &acks, &mut updates);
        let applied = self
            .shared
            .store
            .apply_acks(&processor, &updates, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?;
        let (applied, duplicates) = match applied {
            AckOutcome::Applied {
                applied,
                duplicates,
            } => (applied, duplicates),
            AckOutcome::NotRouted { request_id } => {
                return Err(ApiError::permission_denied(format!(
                    "request {request_id} was not delivered to processor {processor}"
                ))
                .into())
            }
        };
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
            trace_context::set_parent(&span, trace_context::from_traceparent(&a.traceparent));
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
            .collect::<BTreeSet<_>>()
        {
            self.shared.publish(id);
        }
        tracing::debug!(applied, duplicates, "acknowledgements applied");
        Ok(Response::new(AcknowledgeResponse {
            applied,
            duplicates,
        }))
    }
}

impl Api {
    /// COMPLETED reports of TRANSFER tasks that lack the recipient's receipt. Only requests
    /// with such a report are looked up.
    async fn receipt_violations(
        &self,
        acks: &[Acknowledgement],
    ) -> Result<Vec<FieldViolation>, ApiError> {
        let mut kinds: BTreeMap<&str, Option<RequestKind>> = BTreeMap::new();
        let mut violations = Vec::new();
        for (i, a) in acks.iter().enumerate().take(MAX_ACKS_PER_CALL) {
            let receipt = a
                .evidence
                .as_ref()
                .and_then(|e| e.transfer_receipt.as_ref());
            if a.state != TaskState::Completed as i32 || receipt.is_some() {
                continue;
            }
            let kind = match kinds.get(a.request_id.as_str()) {
                Some(k) => *k,
                None => {
                    let k = self
                        .shared
                        .store
                        .request_kind(&a.request_id)
                        .await
                        .map_err(ApiError::from)?;
                    kinds.insert(&a.request_id, k);
                    k
                }
            };
            if kind == Some(RequestKind::Transfer) {
                violations.push(FieldViolation::new(
                    format!("acknowledgements[{i}].evidence.transfer_receipt"),
                    "is required when a TRANSFER task is COMPLETED: the recipient's receipt \
                     proves the data arrived",
                ));
            }
        }
        Ok(violations)
    }
}

/// What is wrong with the receipt of the acknowledgement at `i`, each naming its field.
fn receipt_problems(i: usize, a: &Acknowledgement, r: &TransferReceipt) -> Vec<FieldViolation> {
    let field = |name: &str| format!("acknowledgements[{i}].evidence.transfer_receipt.{name}");
    let mut violations = Vec::new();
    if r.request_id != a.request_id {
        violations.push(FieldViolation::new(
            field("request_id"),
            "must be the acknowledgement's request_id",
        ));
    }
    if r.subprocessor != a.subprocessor {
        violations.push(FieldViolation::new(
            field("subprocessor"),
            "must be the acknowledgement's subprocessor",
        ));
    }
    let hex64 = r.manifest_sha256.len() == 64
        && r.manifest_sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex64 {
        violations.push(FieldViolation::new(
            field("manifest_sha256"),
            "must be 64 lowercase hex digits",
        ));
    }
    violations.extend(text_violation(&field("recipient"), &r.recipient, 256, true));
    violations
}

/// Every rule the batch breaks, each naming its field.
fn violations(acks: &[Acknowledgement]) -> Vec<FieldViolation> {
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
        if TaskState::try_from(a.state).unwrap_or_default() == TaskState::Unspecified {
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
            if let Some(r) = &e.transfer_receipt {
                violations.extend(receipt_problems(i, a, r));
            }
        }
        if let Some(c) = &a.certificate {
            violations.extend(super::certificates::violations(i, c));
        }
    }
    violations
}
