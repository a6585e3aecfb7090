//! `dsrctl trace ID`: a request's propagation tree, drawn from the events the registry
//! stored — no trace collector needed.

use std::collections::BTreeMap;

use dsrelay_sdk::proto::{EventType, ListEventsRequest, RequestEvent, TaskState};
use serde::Serialize;

use crate::cli::TraceArgs;
use crate::commands::{Io, Registry};
use crate::output::{
    emit, kind_name, retention_words, state_name, task_state_name, time_cell, Render, Time,
};
use crate::table::clean;
use crate::Failure;

/// The tree, for printing.
#[derive(Debug, Serialize)]
pub(crate) struct TraceView {
    request_id: String,
    kind: String,
    state: String,
    trace_id: String,
    received_at: Option<Time>,
    /// Milliseconds from receipt to the last event.
    elapsed_ms: i64,
    processors: Vec<HopView>,
}

#[derive(Debug, Serialize)]
struct HopView {
    processor: String,
    delivered: bool,
    /// Milliseconds from receipt to the processor's acceptance.
    delivered_after_ms: Option<i64>,
    attempts: u32,
    failures: Vec<String>,
    tasks: Vec<TaskView>,
}

#[derive(Debug, Serialize)]
struct TaskView {
    subprocessor: String,
    state: String,
    sequence: u64,
    records_affected: i64,
    /// Each state change: (milliseconds after receipt, state).
    steps: Vec<(i64, String)>,
    /// Milliseconds from the first to the last change.
    duration_ms: i64,
    pending: bool,
    detail: String,
}

fn ms(e: &RequestEvent) -> i64 {
    e.occurred_at
        .as_ref()
        .map(dsrelay_proto::millis_from_timestamp)
        .unwrap_or(0)
}

/// Milliseconds from `start` to `at`. Both come from the registry's timestamps, which may be
/// anywhere in the i64 range: saturating, absurd times show absurd durations instead of
/// panicking (debug builds) or wrapping to plausible ones (release builds).
fn since(at: i64, start: i64) -> i64 {
    at.saturating_sub(start)
}

fn secs(ms: i64) -> String {
    format!("{:.3} s", ms as f64 / 1000.0)
}

fn is_open(state: i32) -> bool {
    matches!(
        TaskState::try_from(state),
        Ok(TaskState::Pending)
            | Ok(TaskState::InProgress)
            | Ok(TaskState::WaitingForOperator)
            | Ok(TaskState::Retained)
    )
}

impl TraceView {
    fn build(list: &dsrelay_sdk::proto::EventList) -> Self {
        let request = list.request.clone().unwrap_or_default();
        let start = list
            .events
            .iter()
            .find(|e| e.r#type == EventType::Submitted as i32)
            .map(ms)
            .or_else(|| {
                request
                    .received_at
                    .as_ref()
                    .map(dsrelay_proto::millis_from_timestamp)
            })
            .unwrap_or(0);
        let last = list.events.iter().map(ms).max().unwrap_or(start);
        let mut hops: BTreeMap<String, HopView> = BTreeMap::new();
        for d in &request.deliveries {
            hops.insert(
                d.processor.clone(),
                HopView {
                    processor: d.processor.clone(),
                    delivered: d.delivered_at.is_some(),
                    delivered_after_ms: None,
                    attempts: d.attempts,
                    failures: Vec::new(),
                    tasks: Vec::new(),
                },
            );
        }
        let mut steps: BTreeMap<(String, String), Vec<(i64, String)>> = BTreeMap::new();
        for e in &list.events {
            let Some(hop) = hops.get_mut(&e.processor) else {
                continue;
            };
            match EventType::try_from(e.r#type) {
                Ok(EventType::Delivered) if hop.delivered_after_ms.is_none() => {
                    hop.delivered_after_ms = Some(since(ms(e), start));
                }
                Ok(EventType::DeliveryFailed | EventType::DeliveryDeadLettered) => {
                    hop.failures
                        .push(format!("+{}: {}", secs(since(ms(e), start)), e.message));
                }
                Ok(EventType::TaskUpdated) => {
                    if let Some(t) = &e.task {
                        steps
                            .entry((e.processor.clone(), t.subprocessor.clone()))
                            .or_default()
                            .push((since(ms(e), start), task_state_name(t.state)));
                    }
                }
                // A task's export reaching the registry is a step of its own, between the
                // export and the COMPLETED it allows.
                Ok(EventType::PartStored) => {
                    if let Some(t) = &e.task {
                        steps
                            .entry((e.processor.clone(), t.subprocessor.clone()))
                            .or_default()
                            .push((since(ms(e), start), "PART_STORED".to_string()));
                    }
                }
                // A deletion certificate arriving with the acknowledgement is the proof of
                // the step; a rejected one says why it proves nothing.
                Ok(EventType::CertificateStored) => {
                    if let Some(t) = &e.task {
                        steps
                            .entry((e.processor.clone(), t.subprocessor.clone()))
                            .or_default()
                            .push((since(ms(e), start), "CERTIFICATE_STORED".to_string()));
                    }
                }
                Ok(EventType::CertificateRejected) => {
                    if let Some(t) = &e.task {
                        steps
                            .entry((e.processor.clone(), t.subprocessor.clone()))
                            .or_default()
                            .push((
                                since(ms(e), start),
                                format!("CERTIFICATE_REJECTED ({})", e.message),
                            ));
                    }
                }
                _ => {}
            }
        }
        for t in &request.tasks {
            let Some(hop) = hops.get_mut(&t.processor) else {
                continue;
            };
            let s = steps
                .remove(&(t.processor.clone(), t.subprocessor.clone()))
                .unwrap_or_default();
            let duration_ms = match (s.first(), s.last()) {
                (Some(a), Some(b)) => since(b.0, a.0),
                _ => 0,
            };
            let detail = match TaskState::try_from(t.state) {
                Ok(TaskState::Retained) => retention_words(
                    &t.legal_basis,
                    &time_cell(Time::from_proto(t.retain_until.as_ref())),
                ),
                Ok(TaskState::Refused) | Ok(TaskState::Failed) => t.reason.clone(),
                _ => t
                    .evidence
                    .as_ref()
                    .map(|e| e.note.clone())
                    .unwrap_or_default(),
            };
            hop.tasks.push(TaskView {
                subprocessor: t.subprocessor.clone(),
                state: task_state_name(t.state),
                sequence: t.sequence,
                records_affected: t.evidence.as_ref().map(|e| e.records_affected).unwrap_or(0),
                steps: s,
                duration_ms,
                pending: is_open(t.state),
                detail,
            });
        }
        Self {
            request_id: request.request_id.clone(),
            kind: kind_name(request.kind),
            state: state_name(request.state),
            trace_id: request.trace_id.clone(),
            received_at: Time::from_proto(request.received_at.as_ref()),
            elapsed_ms: since(last, start),
            processors: hops.into_values().collect(),
        }
    }
}

impl Render for TraceView {
    fn to_table(&self) -> String {
        let mut out = format!(
            "request {}  {}  {}  trace {}\nreceived {}; last event after {}\n",
            clean(&self.request_id),
            self.kind,
            self.state,
            clean(&self.trace_id),
            time_cell(self.received_at),
            secs(self.elapsed_ms)
        );
        let n = self.processors.len();
        for (i, p) in self.processors.iter().enumerate() {
            let (branch, indent) = if i + 1 == n {
                ("└─", "   ")
            } else {
                ("├─", "│  ")
            };
            let delivery = match (p.delivered, p.delivered_after_ms) {
                (true, Some(t)) => {
                    format!("delivered after {} ({} attempt(s))", secs(t), p.attempts)
                }
                (true, None) => format!("delivered ({} attempt(s))", p.attempts),
                (false, _) => format!("PENDING delivery: {} attempt(s) failed", p.attempts),
            };
            out.push_str(&format!("{branch} {}  {delivery}\n", clean(&p.processor)));
            for f in &p.failures {
                out.push_str(&format!("{indent}   retry {}\n", clean(f)));
            }
            let m = p.tasks.len();
            for (j, t) in p.tasks.iter().enumerate() {
                let b = if j + 1 == m { "└─" } else { "├─" };
                let path = t
                    .steps
                    .iter()
                    .map(|(at, s)| format!("{s} +{}", secs(*at)))
                    .collect::<Vec<_>>()
                    .join(" → ");
                let pending = if t.pending { "  (pending)" } else { "" };
                out.push_str(&format!(
                    "{indent}{b} {}  {}  #{}  {} record(s)  took {}{pending}\n",
                    clean(&t.subprocessor),
                    t.state,
                    t.sequence,
                    t.records_affected,
                    secs(t.duration_ms)
                ));
                if !path.is_empty() {
                    out.push_str(&format!("{indent}   {}\n", clean(&path)));
                }
                if !t.detail.is_empty() {
                    out.push_str(&format!("{indent}   {}\n", clean(&t.detail)));
                }
            }
        }
        out
    }
}

/// Prints the tree of request `args.id`.
pub(crate) async fn run(
    registry: &Registry,
    args: &TraceArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let list = registry
        .client
        .raw()
        .list_events(ListEventsRequest {
            request_id: args.id.clone(),
        })
        .await
        .map_err(|s| registry.failed(s))?
        .into_inner();
    emit(io.out, io.format, &TraceView::build(&list), false)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::prost_types::Timestamp;
    use dsrelay_sdk::proto::{Delivery, EventList, Request, TaskStatus};

    use super::*;

    fn event(r#type: EventType, seconds: i64, task: bool) -> RequestEvent {
        RequestEvent {
            r#type: r#type as i32,
            occurred_at: Some(Timestamp { seconds, nanos: 0 }),
            processor: "payroll-bureau".into(),
            task: task.then(|| TaskStatus {
                processor: "payroll-bureau".into(),
                subprocessor: "accounting".into(),
                state: TaskState::Completed as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Timestamps at both ends of the i64 range: every difference the tree takes would
    /// overflow.
    #[test]
    fn extreme_timestamps_saturate_instead_of_overflowing() {
        let list = EventList {
            request: Some(Request {
                request_id: "r-1".into(),
                deliveries: vec![Delivery {
                    processor: "payroll-bureau".into(),
                    delivered_at: Some(Timestamp::default()),
                    ..Default::default()
                }],
                tasks: vec![TaskStatus {
                    processor: "payroll-bureau".into(),
                    subprocessor: "accounting".into(),
                    state: TaskState::Completed as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            events: vec![
                event(EventType::Submitted, i64::MIN, false),
                event(EventType::TaskUpdated, i64::MIN, true),
                event(EventType::DeliveryFailed, i64::MAX, false),
                event(EventType::Delivered, i64::MAX, false),
                event(EventType::TaskUpdated, i64::MAX, true),
            ],
        };
        let view = TraceView::build(&list);
        assert_eq!(view.elapsed_ms, i64::MAX);
        let hop = &view.processors[0];
        assert_eq!(hop.delivered_after_ms, Some(i64::MAX));
        assert_eq!(hop.tasks[0].steps[0].0, 0);
        assert_eq!(hop.tasks[0].steps[1].0, i64::MAX);
        assert_eq!(hop.tasks[0].duration_ms, i64::MAX);
        // And the other way round: a submission after everything else.
        let mut backwards = list.clone();
        backwards.events[0] = event(EventType::Submitted, i64::MAX, false);
        backwards.events[2] = event(EventType::DeliveryFailed, i64::MIN, false);
        backwards.events[3] = event(EventType::Delivered, i64::MIN, false);
        let view = TraceView::build(&backwards);
        assert_eq!(view.processors[0].delivered_after_ms, Some(i64::MIN));
        assert!(view.to_table().contains("payroll-bureau"));
    }

    /// A RETAINED task's date is when the holder's erasure runs again, not when the
    /// retention ends.
    #[test]
    fn a_retained_task_names_its_next_erasure_run() {
        let list = EventList {
            request: Some(Request {
                request_id: "r-1".into(),
                deliveries: vec![Delivery {
                    processor: "payroll-bureau".into(),
                    ..Default::default()
                }],
                tasks: vec![TaskStatus {
                    processor: "payroll-bureau".into(),
                    subprocessor: "accounting".into(),
                    state: TaskState::Retained as i32,
                    legal_basis: "Kirjanpitolaki 2:10 §".into(),
                    retain_until: Some(Timestamp {
                        seconds: 1_924_992_000,
                        nanos: 0,
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            events: Vec::new(),
        };
        let text = TraceView::build(&list).to_table();
        assert!(
            text.contains(
                "kept under Kirjanpitolaki 2:10 §; next erasure run 2031-01-01T00:00:00Z\n"
            ),
            "{text}"
        );
        assert!(!text.contains("until"), "{text}");
    }
}
