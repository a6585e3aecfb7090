//! Stored rows → the protocol's messages.

use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    AuditEntry, Delivery, DeliveryState, Request, RequestEvent, SubmitRequest, TaskStatus,
};
use dsrelay_runtime::audit;

use crate::store::{DeliveryRow, EventRow, RequestRow};

/// A request as the partner API shows it at `now`. The identities, scope and parameters
/// come from the stored body, which retention may have forgotten.
pub(crate) fn request(
    row: RequestRow,
    deliveries: Vec<DeliveryRow>,
    tasks: Vec<TaskStatus>,
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
        kind: row.kind as i32,
        state: row.state as i32,
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
        deliveries: deliveries.into_iter().map(delivery).collect(),
        tasks,
        updated_at: Some(timestamp_from_millis(row.updated_at)),
        cancel_reason: row.cancel_reason.unwrap_or_default(),
        identities_forgotten: body.is_none(),
    }
}

fn delivery(d: DeliveryRow) -> Delivery {
    Delivery {
        processor: d.processor,
        state: if d.withdrawn_at.is_some() {
            DeliveryState::Cancelled
        } else if d.done_at.is_some() {
            DeliveryState::Delivered
        } else if d.dead_lettered_at.is_some() {
            DeliveryState::DeadLettered
        } else {
            DeliveryState::Pending
        } as i32,
        attempts: d.attempts.clamp(0, i64::from(u32::MAX)) as u32,
        last_error: d.last_error.unwrap_or_default(),
        next_attempt_at: (d.done_at.is_none() && d.dead_lettered_at.is_none())
            .then(|| timestamp_from_millis(d.next_attempt_at)),
        delivered_at: d
            .done_at
            .filter(|_| d.withdrawn_at.is_none())
            .map(timestamp_from_millis),
        dead_lettered_at: d.dead_lettered_at.map(timestamp_from_millis),
    }
}

/// One event of request `request_id`.
pub(crate) fn event(request_id: &str, e: &EventRow) -> RequestEvent {
    let task = (!e.subprocessor.is_empty()).then(|| TaskStatus {
        processor: e.processor.clone(),
        subprocessor: e.subprocessor.clone(),
        state: e.task_state,
        sequence: e.sequence.max(0) as u64,
        updated_at: Some(timestamp_from_millis(e.occurred_at)),
        // Written by this registry from a decoded message: it decodes again.
        progress: e.progress.as_deref().and_then(|b| {
            <dsrelay_proto::v1::ContractProgress as dsrelay_proto::prost::Message>::decode(b).ok()
        }),
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

/// One entry of the audit trail.
pub(crate) fn audit_entry(e: audit::Entry) -> AuditEntry {
    AuditEntry {
        seq: e.seq,
        occurred_at: Some(timestamp_from_millis(e.occurred_at)),
        request_id: e.request_id,
        event_type: e.event_type,
        actor: e.actor,
        detail: e.detail,
        prev_hash: e.prev_hash,
        hash: e.hash,
    }
}
