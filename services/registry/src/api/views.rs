//! Stored rows → the protocol's messages.

use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    AuditEntry, Delivery, DeliveryState, EventType, Request, RequestEvent, SubmitRequest,
    Subprocessor, TaskStatus,
};
use dsrelay_runtime::audit;

use crate::store::{DeliveryRow, EventRow, Operation, RequestRow};

/// Who reads a view. Why a delivery failed is the processor's answer or what the
/// connection to it said (TLS identities, addresses): internal network details that
/// operators need and partners are not shown, as GetChain does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reader {
    /// Sees every detail.
    Operator,
    /// Sees a delivery's state and attempts, not why it failed.
    Partner,
}

impl Reader {
    /// The reader `caller` is.
    pub(crate) fn of(caller: &crate::auth::Caller) -> Self {
        if caller.is(&[crate::auth::Party::Operator]) {
            Self::Operator
        } else {
            Self::Partner
        }
    }
}

/// A request as the partner API shows it to `reader` at `now`. The identities, scope and
/// parameters come from the stored body, which retention may have forgotten.
pub(crate) fn request_for(
    reader: Reader,
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
    let answered_late = row.answered_late();
    let extension_reasons = serde_json::from_str(&row.extension_reasons).unwrap_or_default();
    let (delivered, follow_ups) = calls(reader, deliveries)
        .into_iter()
        .partition(|d| d.operation == Operation::Deliver.as_str());
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
        deliveries: delivered,
        follow_up_deliveries: follow_ups,
        tasks,
        updated_at: Some(timestamp_from_millis(row.updated_at)),
        cancel_reason: row.cancel_reason.unwrap_or_default(),
        identities_forgotten: body.is_none(),
        finished_at: row.finished_at.map(timestamp_from_millis),
        answered_at: row.answered_at.map(timestamp_from_millis),
        answered_late,
    }
}

/// A request's delivery rows as `reader` is shown them: each processor's Deliver and the
/// calls that follow it, those that wait for a Deliver not yet through marked so
/// ([`Delivery::behind_deliver`]).
pub(crate) fn calls(reader: Reader, rows: Vec<DeliveryRow>) -> Vec<Delivery> {
    let mut calls: Vec<Delivery> = rows.into_iter().map(|d| delivery(reader, d)).collect();
    let through: std::collections::HashSet<String> = (calls.iter())
        .filter(|d| d.operation == Operation::Deliver.as_str())
        .filter(|d| d.state == DeliveryState::Delivered as i32)
        .map(|d| d.processor.clone())
        .collect();
    // Only these two wait for the Deliver (`Store::claim_deliveries`); a cancellation goes
    // whether the Deliver got through or not.
    let waits = [Operation::Update.as_str(), Operation::Extend.as_str()];
    for d in &mut calls {
        if waits.contains(&d.operation.as_str())
            && d.state == DeliveryState::Pending as i32
            && !through.contains(&d.processor)
        {
            d.behind_deliver = true;
            d.next_attempt_at = None;
        }
    }
    calls
}

/// A delivery row as `reader` is shown it: a request's Deliver to a processor, or a call
/// that follows it.
fn delivery(reader: Reader, d: DeliveryRow) -> Delivery {
    Delivery {
        operation: d.op.to_string(),
        behind_deliver: false,
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
        last_error: match reader {
            Reader::Operator => d.last_error.unwrap_or_default(),
            Reader::Partner => String::new(),
        },
        next_attempt_at: (d.done_at.is_none() && d.dead_lettered_at.is_none())
            .then(|| timestamp_from_millis(d.next_attempt_at)),
        delivered_at: d
            .done_at
            .filter(|_| d.withdrawn_at.is_none())
            .map(timestamp_from_millis),
        dead_lettered_at: d.dead_lettered_at.map(timestamp_from_millis),
    }
}

/// One event of request `request_id` as `reader` is shown it: a partner reads a failed or
/// dead-lettered delivery's event without the error text its message ends with (after
/// `": "`, which no operation or processor name holds).
pub(crate) fn event_for(reader: Reader, request_id: &str, e: &EventRow) -> RequestEvent {
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
        message: match reader {
            Reader::Partner if carries_delivery_error(e.event_type) => e
                .message
                .split_once(": ")
                .map_or(e.message.as_str(), |(head, _)| head)
                .to_string(),
            _ => e.message.clone(),
        },
        attempt: e.attempt.clamp(0, i64::from(u32::MAX)) as u32,
        trace_id: e.trace_id.clone().unwrap_or_default(),
        span_id: e.span_id.clone().unwrap_or_default(),
    }
}

/// Whether events of `event_type` end their message with why a delivery failed.
fn carries_delivery_error(event_type: i32) -> bool {
    event_type == EventType::DeliveryFailed as i32
        || event_type == EventType::DeliveryDeadLettered as i32
}

/// A processor's reported subprocessor as `reader` is shown it in GetChain. A partner is
/// told that it is unreachable and since when, not the holder's words (which may quote
/// what it holds), nor its tables (internal schema details): operators see both.
pub(crate) fn subprocessor_for(reader: Reader, mut s: Subprocessor) -> Subprocessor {
    if reader == Reader::Partner {
        s.unreachable_error.clear();
        s.tables.clear();
    }
    s
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

#[cfg(test)]
#[path = "views_answer_tests.rs"]
mod answer_tests;

#[cfg(test)]
#[path = "views_chain_tests.rs"]
mod chain_tests;

#[cfg(test)]
mod tests {
    use super::*;

    const WHY: &str = "Unavailable: tcp connect error: 10.0.3.7:8443 refused; peer \
                       spiffe://dsrelay.dev/processor/payroll";

    fn failed_delivery() -> DeliveryRow {
        DeliveryRow {
            processor: "payroll".into(),
            op: Operation::Deliver,
            attempts: 3,
            next_attempt_at: 5_000,
            last_error: Some(WHY.into()),
            done_at: None,
            dead_lettered_at: None,
            withdrawn_at: None,
        }
    }

    fn row(event_type: EventType, message: &str) -> EventRow {
        EventRow {
            id: 7,
            event_type: event_type as i32,
            occurred_at: 1_000,
            request_state: 0,
            processor: "payroll".into(),
            subprocessor: String::new(),
            task_state: 0,
            sequence: 0,
            attempt: 3,
            message: message.into(),
            trace_id: None,
            span_id: None,
            progress: None,
        }
    }

    /// An extension or new terms wait for a Deliver that has not got through, and say so
    /// with no next attempt (the claim does not take them before it); a cancellation goes
    /// regardless. Before, a dead-lettered Deliver's extension read PENDING with a next
    /// attempt long past, as if it were being retried.
    #[test]
    fn calls_behind_a_deliver_not_yet_through_say_so() {
        let row = |op, dead: bool, done: bool| DeliveryRow {
            op,
            last_error: None,
            dead_lettered_at: dead.then_some(4_000),
            done_at: done.then_some(4_500),
            ..failed_delivery()
        };
        let behind = |deliver: DeliveryRow| {
            let rows = vec![
                deliver,
                row(Operation::Cancel, false, false),
                row(Operation::Extend, false, false),
                row(Operation::Update, false, false),
                row(Operation::Extend, false, true),
            ];
            calls(Reader::Operator, rows)
                .into_iter()
                .map(|d| (d.operation, d.behind_deliver, d.next_attempt_at.is_some()))
                .collect::<Vec<_>>()
        };
        let s = |op: &str, behind, next| (op.to_string(), behind, next);
        assert_eq!(
            behind(row(Operation::Deliver, true, false)),
            [
                s("deliver", false, false),
                s("cancel", false, true),
                s("extend", true, false),
                s("update", true, false),
                s("extend", false, false),
            ]
        );
        assert_eq!(
            behind(row(Operation::Deliver, false, true)),
            [
                s("deliver", false, false),
                s("cancel", false, true),
                s("extend", false, true),
                s("update", false, true),
                s("extend", false, false),
            ]
        );
    }

    #[test]
    fn partners_see_a_deliverys_state_and_attempts_but_not_why_it_failed() {
        let partner = delivery(Reader::Partner, failed_delivery());
        assert_eq!(partner.last_error, "");
        assert_eq!(partner.attempts, 3);
        assert_eq!(partner.state, DeliveryState::Pending as i32);
        assert!(partner.next_attempt_at.is_some());
        let operator = delivery(Reader::Operator, failed_delivery());
        assert_eq!(operator.last_error, WHY);
        assert_eq!(
            Delivery {
                last_error: String::new(),
                ..operator
            },
            partner
        );
    }

    #[test]
    fn partners_read_delivery_failures_without_the_error_text() {
        for (kind, head) in [
            (EventType::DeliveryFailed, "Deliver to payroll failed"),
            (
                EventType::DeliveryDeadLettered,
                "Deliver to payroll dead-lettered after 5 refusals, no longer sent",
            ),
        ] {
            let e = row(kind, &format!("{head}: {WHY}"));
            assert_eq!(event_for(Reader::Partner, "r1", &e).message, head);
            let full = event_for(Reader::Operator, "r1", &e);
            assert_eq!(full.message, format!("{head}: {WHY}"));
            assert_eq!(full.attempt, 3);
        }
        // Other events' messages are the request's own story, shown as recorded.
        let note = row(EventType::StateChanged, "state: COMPLETED");
        assert_eq!(
            event_for(Reader::Partner, "r1", &note).message,
            "state: COMPLETED"
        );
    }
}
