//! `dsrctl trace ID`: a request's propagation tree, drawn from the events the registry
//! stored — no trace collector needed.

use std::collections::BTreeMap;

use dsrelay_sdk::proto::{EventType, ListEventsRequest, RequestEvent, TaskState};
use serde::Serialize;

use crate::cli::TraceArgs;
use crate::commands::{Io, Registry};
use crate::output::{emit, kind_name, state_name, task_state_name, Render, Time};
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
                    hop.delivered_after_ms = Some(ms(e) - start);
                }
                Ok(EventType::DeliveryFailed | EventType::DeliveryDeadLettered) => {
                    hop.failures
                        .push(format!("+{}: {}", secs(ms(e) - start), e.message));
                }
                Ok(EventType::TaskUpdated) => {
                    if let Some(t) = &e.task {
                        steps
                            .entry((e.processor.clone(), t.subprocessor.clone()))
                            .or_default()
                            .push((ms(e) - start, task_state_name(t.state)));
                    }
                }
                // A task's export reaching the registry is a step of its own, between the
                // export and the COMPLETED it allows.
                Ok(EventType::PartStored) => {
                    if let Some(t) = &e.task {
                        steps
                            .entry((e.processor.clone(), t.subprocessor.clone()))
                            .or_default()
                            .push((ms(e) - start, "PART_STORED".to_string()));
                    }
                }
                // A deletion certificate arriving with the acknowledgement is the proof of
                // the step; a rejected one says why it proves nothing.
                Ok(EventType::CertificateStored) => {
                    if let Some(t) = &e.task {
                        steps
                            .entry((e.processor.clone(), t.subprocessor.clone()))
                            .or_default()
                            .push((ms(e) - start, "CERTIFICATE_STORED".to_string()));
                    }
                }
                Ok(EventType::CertificateRejected) => {
                    if let Some(t) = &e.task {
                        steps
                            .entry((e.processor.clone(), t.subprocessor.clone()))
                            .or_default()
                            .push((
                                ms(e) - start,
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
                (Some(a), Some(b)) => b.0 - a.0,
                _ => 0,
            };
            let detail = match TaskState::try_from(t.state) {
                Ok(TaskState::Retained) => format!(
                    "kept under {} until {}",
                    t.legal_basis,
                    Time::from_proto(t.retain_until.as_ref())
                        .map(|t| t.to_string())
                        .unwrap_or_default()
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
            elapsed_ms: last - start,
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
            self.received_at.map(|t| t.to_string()).unwrap_or_default(),
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
