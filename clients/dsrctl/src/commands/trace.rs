//! `dsrctl trace ID`: a request's propagation tree, drawn from the events the registry
//! stored — no trace collector needed.

use std::collections::BTreeMap;

use dsrelay_sdk::proto::{
    ContractPhase, DeliveryState, EventList, EventType, ListEventsRequest, RequestEvent, TaskState,
};
use serde::{Serialize, Serializer};

use crate::cli::TraceArgs;
use crate::commands::{Hint, Io, Registry};
use crate::output::{
    delivery_state_name, emit, event_type_name, kind_name, retention_words, state_name,
    task_state_name, time_cell, DeliveryView, Render, StatusCheckView, Time,
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
    /// Receipt in milliseconds since the epoch: where the steps' offsets count from.
    #[serde(skip)]
    start_ms: i64,
    /// What happened to the request as a whole (submission, state changes, extensions,
    /// cancellation, ...), and events of processors it has no delivery to.
    events: Vec<EventLine>,
    processors: Vec<HopView>,
    #[serde(skip)]
    hint: Hint,
}

/// One event as the trace lists it.
#[derive(Debug, Serialize)]
struct EventLine {
    #[serde(rename = "type")]
    ty: String,
    at: Option<Time>,
    /// Milliseconds after receipt.
    after_ms: i64,
    /// The processor concerned, for an event of one; empty for the request's own.
    #[serde(skip_serializing_if = "String::is_empty")]
    processor: String,
    /// The delivery's attempt for delivery events; for a task update, the processor's run
    /// of the task (see [`TaskView::run`]); 0 for none.
    attempt: u32,
    message: String,
}

impl EventLine {
    fn new(e: &RequestEvent, start: i64) -> Self {
        Self {
            ty: event_type_name(e.r#type),
            at: Time::from_proto(e.occurred_at.as_ref()),
            after_ms: since(ms(e), start),
            processor: e.processor.clone(),
            attempt: e.attempt,
            message: e.message.clone(),
        }
    }

    /// `+1.000 s, attempt 2`, the attempt left out when there is none.
    fn when(&self) -> String {
        if self.attempt > 0 {
            format!("+{}, attempt {}", secs(self.after_ms), self.attempt)
        } else {
            format!("+{}", secs(self.after_ms))
        }
    }

    fn with_message(&self, head: String) -> String {
        if self.message.is_empty() {
            head
        } else {
            format!("{head}: {}", self.message)
        }
    }
}

#[derive(Debug, Serialize)]
struct HopView {
    processor: String,
    /// The delivery's state (PENDING, DELIVERED, DEAD_LETTERED, CANCELLED).
    state: String,
    delivered: bool,
    /// Milliseconds from receipt to the processor's acceptance.
    delivered_after_ms: Option<i64>,
    attempts: u32,
    /// The failed attempts (DELIVERY_FAILED), as `+<seconds>: <message>`.
    failures: Vec<String>,
    /// Every event of this processor that is not a task's step, but the first acceptance,
    /// in order: failed attempts, dead letters, requeues, acceptances reported later, and
    /// contract-end updates and return confirmations.
    history: Vec<EventLine>,
    /// The calls that follow the delivery (a cancellation, a due date, a contract end's
    /// terms) that have not got through: PENDING or DEAD_LETTERED.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    calls_not_through: Vec<DeliveryView>,
    /// The registry's last failed status check of the processor (GetChain), while none
    /// answered since: its tasks show its last report, which one that is down does not
    /// update.
    #[serde(skip_serializing_if = "Option::is_none")]
    processor_status_check: Option<StatusCheckView>,
    tasks: Vec<TaskView>,
}

/// A task's step: (milliseconds after receipt, what), and the processor's run of the task
/// that took it; in JSON the pair alone, the task saying its highest run.
#[derive(Debug)]
struct Step {
    at: i64,
    what: String,
    run: u32,
}

impl Serialize for Step {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.at, &self.what).serialize(s)
    }
}

#[derive(Debug, Serialize)]
struct TaskView {
    subprocessor: String,
    state: String,
    sequence: u64,
    records_affected: i64,
    /// Each state change: (milliseconds after receipt, state).
    steps: Vec<Step>,
    /// Milliseconds from the first to the last change.
    duration_ms: i64,
    /// For a pending task, milliseconds from its first change to when the trace was read:
    /// how long it has been open, which `duration_ms` does not show (a task waiting for a
    /// holder has no new change to count to).
    #[serde(skip_serializing_if = "Option::is_none")]
    open_for_ms: Option<i64>,
    /// The highest run of the task the events report (0 when they report none). The
    /// processor counts every time it takes the task up, so above 1 it was tried again
    /// (the holder failed, or the processor restarted mid-task), or it ran again later: a
    /// retained task's erasure run, a contract end's next phase.
    run: u32,
    /// Not ended yet. A RETAINED task is not: it ended for now, and the processor erases the
    /// data kept under its legal basis at a later erasure run by itself.
    pending: bool,
    detail: String,
    /// Set when the task's deletion began from AWAITING_CONFIRMATION with no RETURN_CONFIRMED
    /// event before it: the grace period ended with the returned data unconfirmed
    /// ([`unconfirmed_deletions`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    return_unconfirmed: Option<Unconfirmed>,
}

/// A contract end task's deletion begun with its return unconfirmed.
#[derive(Debug, Serialize)]
struct Unconfirmed {
    /// When the registry recorded the deletion beginning.
    deletion_reported_at: Option<Time>,
}

/// The contract end tasks whose deletion began with their return unconfirmed, by
/// (processor, subprocessor), with when the registry recorded that. A task the events show
/// moving from AWAITING_CONFIRMATION to DELETING (or DONE) with no RETURN_CONFIRMED event
/// before: the processor only deletes returned data on a confirmation the registry sent it,
/// which the registry records as that event first, or at the end of the grace period without
/// one. A step the events do not show (a report lost and reconciled) says nothing here.
fn unconfirmed_deletions(events: &[RequestEvent]) -> BTreeMap<(String, String), Unconfirmed> {
    let mut confirmed = false;
    let mut phases: BTreeMap<(String, String), i32> = BTreeMap::new();
    let mut found = BTreeMap::new();
    for e in events {
        match (EventType::try_from(e.r#type), &e.task) {
            (Ok(EventType::ReturnConfirmed), _) => confirmed = true,
            (Ok(EventType::TaskUpdated), Some(t)) => {
                let Some(p) = t.progress else { continue };
                let key = (e.processor.clone(), t.subprocessor.clone());
                let deleting = p.phase == ContractPhase::Deleting as i32
                    || p.phase == ContractPhase::Done as i32;
                let awaited =
                    phases.get(&key) == Some(&(ContractPhase::AwaitingConfirmation as i32));
                if deleting && awaited && !confirmed {
                    let deletion_reported_at = Time::from_proto(e.occurred_at.as_ref());
                    found.insert(
                        key.clone(),
                        Unconfirmed {
                            deletion_reported_at,
                        },
                    );
                }
                phases.insert(key, p.phase);
            }
            _ => {}
        }
    }
    found
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
        Ok(TaskState::Pending) | Ok(TaskState::InProgress) | Ok(TaskState::WaitingForOperator)
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
                    state: delivery_state_name(d.state),
                    delivered: d.delivered_at.is_some(),
                    delivered_after_ms: None,
                    attempts: d.attempts,
                    failures: Vec::new(),
                    history: Vec::new(),
                    calls_not_through: Vec::new(),
                    processor_status_check: None,
                    tasks: Vec::new(),
                },
            );
        }
        for d in &request.follow_up_deliveries {
            let through = !matches!(
                DeliveryState::try_from(d.state),
                Ok(DeliveryState::Pending | DeliveryState::DeadLettered)
            );
            if let (false, Some(hop)) = (through, hops.get_mut(&d.processor)) {
                hop.calls_not_through.push(DeliveryView::from(d));
            }
        }
        let mut unconfirmed = unconfirmed_deletions(&list.events);
        let mut events = Vec::new();
        let mut steps: BTreeMap<(String, String), Vec<Step>> = BTreeMap::new();
        for e in &list.events {
            let ty = EventType::try_from(e.r#type);
            // A task's step: its new state; a task's export reaching the registry, between
            // the export and the COMPLETED it allows; a deletion certificate arriving with
            // the acknowledgement, the proof of the step (a rejected one says why it proves
            // nothing).
            let step = match (ty, &e.task) {
                (Ok(EventType::TaskUpdated), Some(t)) => Some(task_state_name(t.state)),
                (Ok(EventType::PartStored | EventType::CertificateStored), Some(_)) => {
                    Some(event_type_name(e.r#type))
                }
                (Ok(EventType::CertificateRejected), Some(_)) => {
                    Some(format!("CERTIFICATE_REJECTED ({})", e.message))
                }
                _ => None,
            };
            let Some(hop) = hops.get_mut(&e.processor) else {
                events.push(EventLine::new(e, start));
                continue;
            };
            match (ty, step, &e.task) {
                (_, Some(what), Some(t)) => {
                    steps
                        .entry((e.processor.clone(), t.subprocessor.clone()))
                        .or_default()
                        .push(Step {
                            at: since(ms(e), start),
                            what,
                            // Only a task update carries the run.
                            run: if ty == Ok(EventType::TaskUpdated) {
                                e.attempt
                            } else {
                                0
                            },
                        });
                }
                (Ok(EventType::Delivered), _, _) if hop.delivered_after_ms.is_none() => {
                    hop.delivered_after_ms = Some(since(ms(e), start));
                }
                (Ok(EventType::DeliveryFailed), _, _) => {
                    hop.failures
                        .push(format!("+{}: {}", secs(since(ms(e), start)), e.message));
                    hop.history.push(EventLine::new(e, start));
                }
                _ => hop.history.push(EventLine::new(e, start)),
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
                (Some(a), Some(b)) => since(b.at, a.at),
                _ => 0,
            };
            let run = s.iter().map(|s| s.run).max().unwrap_or(0);
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
                open_for_ms: None,
                run,
                pending: is_open(t.state),
                detail,
                return_unconfirmed: unconfirmed
                    .remove(&(t.processor.clone(), t.subprocessor.clone())),
            });
        }
        Self {
            request_id: request.request_id.clone(),
            kind: kind_name(request.kind),
            state: state_name(request.state),
            trace_id: request.trace_id.clone(),
            received_at: Time::from_proto(request.received_at.as_ref()),
            elapsed_ms: since(last, start),
            start_ms: start,
            events,
            processors: hops.into_values().collect(),
            hint: Hint::default(),
        }
    }
}

impl TraceView {
    /// Sets how long each pending task has been open, as read at `now` (milliseconds since
    /// the epoch).
    fn read_at(&mut self, now: i64) {
        let start = self.start_ms;
        for task in self.processors.iter_mut().flat_map(|h| h.tasks.iter_mut()) {
            let first = task.steps.first().map_or(0, |s| s.at);
            task.open_for_ms = task
                .pending
                .then(|| since(now, start.saturating_add(first)));
        }
    }

    /// Adds each processor's last failed status check in `chain`.
    fn checked(&mut self, chain: &dsrelay_sdk::proto::Chain) {
        for hop in &mut self.processors {
            hop.processor_status_check = StatusCheckView::of(chain, &hop.processor);
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
        for e in &self.events {
            let of = if e.processor.is_empty() {
                String::new()
            } else {
                format!(" of {}", e.processor)
            };
            let head = format!("{}{of} at {} ({})", e.ty, time_cell(e.at), e.when());
            out.push_str(&format!("   {}\n", clean(&e.with_message(head))));
        }
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
                (false, _) if p.state == "DEAD_LETTERED" => format!(
                    "DEAD_LETTERED delivery: {} attempt(s) failed, no longer sent (an \
                     operator's `{}` sends it again)",
                    p.attempts,
                    clean(&self.hint.command(&[
                        "deliveries",
                        "requeue",
                        &self.request_id,
                        "--processor",
                        &p.processor
                    ]))
                ),
                (false, _) if p.state == "PENDING" => {
                    format!("PENDING delivery: {} attempt(s) failed", p.attempts)
                }
                (false, _) => format!(
                    "{} delivery, no acceptance recorded: {} attempt(s) failed",
                    p.state, p.attempts
                ),
            };
            out.push_str(&format!("{branch} {}  {delivery}\n", clean(&p.processor)));
            if let Some(check) = &p.processor_status_check {
                out.push_str(&format!(
                    "{indent}   processor status check {}\n",
                    check.cell()
                ));
            }
            // Until they get through, the processor works under what it was sent before.
            for d in &p.calls_not_through {
                let state = if d.behind_deliver {
                    format!("{}: waits for the deliver, and goes after it", d.state)
                } else if d.state == "DEAD_LETTERED" {
                    format!(
                        "DEAD_LETTERED: {} attempt(s) failed, no longer sent (an operator's \
                         `{}` sends it again)",
                        d.attempts,
                        self.hint.command(&[
                            "deliveries",
                            "requeue",
                            &self.request_id,
                            "--processor",
                            &p.processor
                        ])
                    )
                } else {
                    format!("{}: {} attempt(s) failed", d.state, d.attempts)
                };
                out.push_str(&format!(
                    "{indent}   {} {}\n",
                    clean(&d.call()),
                    clean(&state)
                ));
            }
            for (k, e) in p.history.iter().enumerate() {
                let line = match e.ty.as_str() {
                    // The refusal that dead-letters the delivery is not retried.
                    "DELIVERY_FAILED" => {
                        // Written together, in one transaction: same attempt, same time, same
                        // call (the message's first word: Deliver, Cancel, ...).
                        let call = |l: &EventLine| l.message.split(' ').next().map(str::to_owned);
                        let dead = p.history.get(k + 1).is_some_and(|next| {
                            next.ty == "DELIVERY_DEAD_LETTERED"
                                && next.attempt == e.attempt
                                && next.after_ms == e.after_ms
                                && call(next) == call(e)
                        });
                        let word = if dead { "failed" } else { "retry" };
                        e.with_message(format!("{word} {}", e.when()))
                    }
                    "DELIVERY_DEAD_LETTERED" => e.with_message(format!(
                        "dead-lettered at {} ({})",
                        time_cell(e.at),
                        e.when()
                    )),
                    "DELIVERY_REQUEUED" => {
                        e.with_message(format!("requeued at {} ({})", time_cell(e.at), e.when()))
                    }
                    "DELIVERED" => e.with_message(format!("delivered {}", e.when())),
                    other => e.with_message(format!("{other} {}", e.when())),
                };
                out.push_str(&format!("{indent}   {}\n", clean(&line)));
            }
            let m = p.tasks.len();
            for (j, t) in p.tasks.iter().enumerate() {
                let b = if j + 1 == m { "└─" } else { "├─" };
                let path = t
                    .steps
                    .iter()
                    .map(|s| match s.run {
                        0 | 1 => format!("{} +{}", s.what, secs(s.at)),
                        n => format!("{} +{} (run {n})", s.what, secs(s.at)),
                    })
                    .collect::<Vec<_>>()
                    .join(" → ");
                let run = if t.run > 1 {
                    format!("  run {}", t.run)
                } else {
                    String::new()
                };
                let pending = match (t.pending, t.state.as_str()) {
                    (true, _) => "  (pending)",
                    (false, "RETAINED") => {
                        "  (ended for now; kept data awaits a later erasure run)"
                    }
                    (false, _) => "",
                };
                // An open task has not taken its time yet: how long it has been open says
                // more (a task waiting for a holder shows no new change for minutes).
                let time = match t.open_for_ms {
                    Some(open) => format!("open for {}", secs(open)),
                    None => format!("took {}", secs(t.duration_ms)),
                };
                out.push_str(&format!(
                    "{indent}{b} {}  {}  #{}  {} record(s)  {time}{run}{pending}\n",
                    clean(&t.subprocessor),
                    t.state,
                    t.sequence,
                    t.records_affected,
                ));
                if !path.is_empty() {
                    out.push_str(&format!("{indent}   {}\n", clean(&path)));
                }
                if !t.detail.is_empty() {
                    out.push_str(&format!("{indent}   {}\n", clean(&t.detail)));
                }
                // The reason the processor gave then is gone from the task by its outcome.
                if let Some(u) = &t.return_unconfirmed {
                    out.push_str(&format!(
                        "{indent}   return: not confirmed; deletion began at the end of the \
                         grace period (reported {})\n",
                        time_cell(u.deletion_reported_at)
                    ));
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
    let list = all_events(registry, &args.id).await?;
    let mut view = TraceView::build(&list);
    view.read_at(chrono::Utc::now().timestamp_millis());
    view.hint = registry.hint.clone();
    if !view.processors.is_empty() {
        if let Some(chain) = super::request::chain(registry).await {
            view.checked(&chain);
        }
    }
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}

/// Every event of request `id`, one page after the other (a request's events may pass what
/// one answer carries), with the request as the last page shows it.
async fn all_events(registry: &Registry, id: &str) -> Result<EventList, Failure> {
    let mut all = EventList::default();
    let mut page_token = String::new();
    loop {
        let page = registry
            .client
            .raw()
            .list_events(ListEventsRequest {
                request_id: id.to_string(),
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| registry.failed(s))?
            .into_inner();
        let last = all.events.last().map_or(0, |e| e.event_id);
        // Either would have the next request ask for the same page again, for ever.
        let wrong = if page.events.is_empty() && !page.next_page_token.is_empty() {
            Some("holds no event yet names a next page".to_string())
        } else if page.events.first().is_some_and(|e| e.event_id <= last) {
            Some(format!(
                "does not start past event {last}, the last of the page before"
            ))
        } else {
            None
        };
        if let Some(wrong) = wrong {
            return Err(Failure::BadAnswer(format!(
                "the registry at {} answered a page of request {id}'s events that {wrong}; \
                 stopping, as asking again would never end",
                registry.endpoint
            )));
        }
        all.request = page.request;
        all.events.extend(page.events);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::prost_types::Timestamp;
    use dsrelay_sdk::proto::{Delivery, DeliveryState, Request, TaskStatus};

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
            ..Default::default()
        };
        let view = TraceView::build(&list);
        assert_eq!(view.elapsed_ms, i64::MAX);
        let hop = &view.processors[0];
        assert_eq!(hop.delivered_after_ms, Some(i64::MAX));
        assert_eq!(hop.tasks[0].steps[0].at, 0);
        assert_eq!(hop.tasks[0].steps[1].at, i64::MAX);
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
            ..Default::default()
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

    /// A RETAINED task ended for now: not pending, but kept data awaiting a later run.
    #[test]
    fn a_retained_task_is_not_pending() {
        let task = |subprocessor: &str, state: TaskState| TaskStatus {
            processor: "payroll-bureau".into(),
            subprocessor: subprocessor.into(),
            state: state as i32,
            legal_basis: "Kirjanpitolaki 2:10 §".into(),
            ..Default::default()
        };
        let list = EventList {
            request: Some(Request {
                request_id: "r-1".into(),
                deliveries: vec![Delivery {
                    processor: "payroll-bureau".into(),
                    ..Default::default()
                }],
                tasks: vec![
                    task("accounting", TaskState::Retained),
                    task("crm", TaskState::InProgress),
                ],
                ..Default::default()
            }),
            events: Vec::new(),
            ..Default::default()
        };
        let view = TraceView::build(&list);
        let text = view.to_table();
        let line = |name: &str| {
            let found = text.lines().find(|l| l.contains(name));
            found
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .to_string()
        };
        let retained = line("accounting");
        assert!(!retained.contains("pending"), "{text}");
        assert!(
            retained.ends_with("  (ended for now; kept data awaits a later erasure run)"),
            "{text}"
        );
        assert!(line("crm").ends_with("  (pending)"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        let tasks = &json["processors"][0]["tasks"];
        assert_eq!(tasks[0]["pending"], false, "{json:#}");
        assert_eq!(tasks[1]["pending"], true, "{json:#}");
    }

    /// A pending task shows how long it has been open when the trace is read, where an
    /// ended one shows what it took: a task waiting for a holder for minutes has no new
    /// change, and "took 0.000 s" would read as just started.
    #[test]
    fn a_pending_task_shows_how_long_it_has_been_open() {
        let task = |subprocessor: &str, state: TaskState| TaskStatus {
            processor: "payroll-bureau".into(),
            subprocessor: subprocessor.into(),
            state: state as i32,
            ..Default::default()
        };
        let list = EventList {
            request: Some(Request {
                request_id: "r-1".into(),
                received_at: Some(dsrelay_proto::timestamp_from_millis(1_000_000)),
                deliveries: vec![Delivery {
                    processor: "payroll-bureau".into(),
                    ..Default::default()
                }],
                tasks: vec![
                    task("accounting", TaskState::Completed),
                    task("crm", TaskState::InProgress),
                ],
                ..Default::default()
            }),
            events: Vec::new(),
            ..Default::default()
        };
        let mut view = TraceView::build(&list);
        // No task events: each task's first change counts from receipt.
        view.read_at(1_000_000 + 312_500);
        let text = view.to_table();
        let line = |name: &str| {
            let found = text.lines().find(|l| l.contains(name));
            found
                .unwrap_or_else(|| panic!("{name} in {text}"))
                .to_string()
        };
        assert!(
            line("crm").contains("  open for 312.500 s  (pending)"),
            "{text}"
        );
        assert!(line("accounting").contains("  took 0.000 s"), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        let tasks = &json["processors"][0]["tasks"];
        assert_eq!(tasks[1]["open_for_ms"], 312_500, "{json:#}");
        assert!(tasks[0].get("open_for_ms").is_none(), "{json:#}");
    }

    /// A request to `processor` with one task, and `events`.
    fn traced(delivery: Delivery, events: Vec<RequestEvent>) -> EventList {
        EventList {
            request: Some(Request {
                request_id: "r-1".into(),
                deliveries: vec![delivery],
                tasks: vec![TaskStatus {
                    processor: "payroll-bureau".into(),
                    subprocessor: "accounting".into(),
                    state: TaskState::Completed as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            events,
            ..Default::default()
        }
    }

    fn said(mut e: RequestEvent, attempt: u32, message: &str) -> RequestEvent {
        e.attempt = attempt;
        e.message = message.into();
        e
    }

    /// A cancellation dead-lettered and a due date still pending show under their
    /// processor, the dead letter with the command that sends it again; one delivered does
    /// not. Before, the branch said "delivered" alone, as if the processor had all of them.
    #[test]
    fn calls_that_follow_and_did_not_get_through_show_under_their_processor() {
        let delivered = Delivery {
            processor: "payroll-bureau".into(),
            operation: "deliver".into(),
            state: DeliveryState::Delivered as i32,
            attempts: 1,
            delivered_at: Some(Timestamp::default()),
            ..Default::default()
        };
        let mut list = traced(delivered.clone(), Vec::new());
        let call = |operation: &str, state: DeliveryState, attempts| Delivery {
            operation: operation.into(),
            state: state as i32,
            attempts,
            ..delivered.clone()
        };
        list.request.as_mut().unwrap().follow_up_deliveries = vec![
            call("cancel", DeliveryState::DeadLettered, 3),
            call("extend", DeliveryState::Pending, 2),
            call("update", DeliveryState::Delivered, 1),
        ];
        let view = TraceView::build(&list);
        let text = view.to_table();
        assert!(
            text.contains(
                "   cancel (its cancellation) DEAD_LETTERED: 3 attempt(s) failed, no longer \
                 sent (an operator's `dsrctl deliveries requeue r-1 --processor \
                 payroll-bureau` sends it again)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("   extend (its due date) PENDING: 2 attempt(s) failed\n"),
            "{text}"
        );
        assert!(!text.contains("update ("), "{text}");
        let json = serde_json::to_value(&view).unwrap();
        let calls = &json["processors"][0]["calls_not_through"];
        assert_eq!(calls.as_array().map(Vec::len), Some(2), "{json:#}");
        // One that waits for its Deliver says so rather than count failed attempts.
        let follow_ups = &mut list.request.as_mut().unwrap().follow_up_deliveries;
        follow_ups[1].behind_deliver = true;
        let text = TraceView::build(&list).to_table();
        assert!(
            text.contains(
                "   extend (its due date) PENDING: waits for the deliver, and goes after it\n"
            ),
            "{text}"
        );
    }

    /// A dead letter is not retried; a requeue says when it was sent again.
    #[test]
    fn a_dead_letter_is_no_retry_and_its_requeue_shows() {
        let failed = |s, attempt| {
            said(
                event(EventType::DeliveryFailed, s, false),
                attempt,
                "Deliver to payroll-bureau failed: refused",
            )
        };
        let dead = said(
            event(EventType::DeliveryDeadLettered, 1_700_000_028, false),
            2,
            "Deliver to payroll-bureau dead-lettered after 2 refusals, no longer sent: refused",
        );
        let events = vec![
            event(EventType::Submitted, 1_700_000_000, false),
            failed(1_700_000_001, 1),
            failed(1_700_000_028, 2),
            dead,
        ];
        let delivery = Delivery {
            processor: "payroll-bureau".into(),
            state: DeliveryState::DeadLettered as i32,
            attempts: 2,
            ..Default::default()
        };
        let text = TraceView::build(&traced(delivery.clone(), events.clone())).to_table();
        let lines: Vec<&str> = text.lines().collect();
        let retries: Vec<&&str> = lines.iter().filter(|l| l.contains("retry")).collect();
        assert_eq!(retries.len(), 1, "{text}");
        assert!(retries[0].contains("retry +1.000 s"), "{text}");
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("retry") && l.contains("dead-lettered")),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.trim_start().starts_with(
                "dead-lettered at 2023-11-14T22:13:48Z (+28.000 s, attempt 2): Deliver"
            )),
            "{text}"
        );
        assert!(text.contains("DEAD_LETTERED delivery"), "{text}");
        assert!(!text.contains("PENDING delivery"), "{text}");
        // The command it names runs as printed: the request and processor, and the registry
        // the trace came from.
        let mut view = TraceView::build(&traced(delivery.clone(), events.clone()));
        view.hint = Hint::new(&crate::cli::ConnectionArgs {
            endpoint: Some("https://registry.example:50051".into()),
            ..Default::default()
        });
        let requeue = "(an operator's `dsrctl deliveries requeue r-1 --processor payroll-bureau \
                       --endpoint https://registry.example:50051` sends it again)";
        assert!(view.to_table().contains(requeue), "{}", view.to_table());

        let mut requeued = events;
        requeued.push(said(
            event(EventType::DeliveryRequeued, 1_700_000_100, false),
            0,
            "1 dead-lettered delivery row(s) to payroll-bureau requeued by operator",
        ));
        let delivery = Delivery {
            state: DeliveryState::Pending as i32,
            ..delivery
        };
        let text = TraceView::build(&traced(delivery, requeued)).to_table();
        assert!(
            text.contains(
                "requeued at 2023-11-14T22:15:00Z (+100.000 s): 1 dead-lettered delivery row(s) \
                 to payroll-bureau requeued by operator"
            ),
            "{text}"
        );
        assert!(text.contains("PENDING delivery"), "{text}");
    }

    /// Every type of event the registry records shows up in the trace.
    #[test]
    fn every_event_type_is_drawn() {
        let mut events = Vec::new();
        let mut types = Vec::new();
        for (i, ty) in (1..).map_while(|v| EventType::try_from(v).ok()).enumerate() {
            let seconds = 1_700_000_000 + i as i64;
            let request_wide = !matches!(
                ty,
                EventType::DeliveryFailed
                    | EventType::Delivered
                    | EventType::DeliveryDeadLettered
                    | EventType::DeliveryRequeued
                    | EventType::TaskUpdated
                    | EventType::PartStored
                    | EventType::CertificateStored
                    | EventType::CertificateRejected
                    | EventType::AcknowledgementRejected
                    | EventType::ContractUpdated
                    | EventType::ReturnConfirmed
            );
            let mut e = said(
                event(
                    ty,
                    seconds,
                    matches!(
                        ty,
                        EventType::TaskUpdated
                            | EventType::PartStored
                            | EventType::CertificateStored
                            | EventType::CertificateRejected
                            | EventType::AcknowledgementRejected
                    ),
                ),
                0,
                &format!("message-{}", ty.as_str_name()),
            );
            if request_wide {
                e.processor.clear();
            }
            events.push(e);
            types.push(ty);
        }
        assert!(types.contains(&EventType::DeliveryRequeued));
        let delivery = Delivery {
            processor: "payroll-bureau".into(),
            state: DeliveryState::Delivered as i32,
            delivered_at: Some(Timestamp::default()),
            ..Default::default()
        };
        let text = TraceView::build(&traced(delivery, events)).to_table();
        for ty in types {
            let name = ty.as_str_name().trim_start_matches("EVENT_TYPE_");
            // What a task's step shows is its state, and the first acceptance is the
            // delivery's time; the rest each say what their message says.
            match ty {
                EventType::TaskUpdated => assert!(text.contains("COMPLETED +"), "{text}"),
                EventType::PartStored | EventType::CertificateStored => {
                    assert!(text.contains(&format!("{name} +")), "{name} in {text}")
                }
                EventType::Delivered => assert!(text.contains("delivered after"), "{text}"),
                _ => assert!(
                    text.contains(&format!("message-{}", ty.as_str_name())),
                    "{name} in {text}"
                ),
            }
        }
    }

    /// A step reached on a later run of the task (the processor restarted mid-task, the
    /// holder failed and was retried, a retained task's erasure ran) says which.
    #[test]
    fn a_step_of_a_later_run_names_the_run() {
        let step = |s, attempt| {
            let mut e = event(EventType::TaskUpdated, s, true);
            e.attempt = attempt;
            e
        };
        let mut first = step(1_700_000_001, 1);
        if let Some(t) = first.task.as_mut() {
            t.state = TaskState::InProgress as i32;
        }
        let events = vec![
            event(EventType::Submitted, 1_700_000_000, false),
            first,
            step(1_700_000_031, 2),
        ];
        let delivery = Delivery {
            processor: "payroll-bureau".into(),
            state: DeliveryState::Delivered as i32,
            delivered_at: Some(Timestamp::default()),
            ..Default::default()
        };
        let view = TraceView::build(&traced(delivery, events));
        let text = view.to_table();
        assert!(
            text.contains("IN_PROGRESS +1.000 s → COMPLETED +31.000 s (run 2)"),
            "{text}"
        );
        assert!(text.contains("took 30.000 s  run 2"), "{text}");
        assert!(!text.contains("run 1"), "{text}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(json["processors"][0]["tasks"][0]["run"], 2, "{json}");
    }

    /// A contract end's task deleted at the end of the grace period with its return
    /// unconfirmed says so, once COMPLETED too: the reason the processor gave then is the
    /// task's no more. Before, only `--output json trace` showed it, in the event's message.
    #[test]
    fn a_deletion_without_a_confirmation_of_the_return_says_so() {
        use dsrelay_sdk::proto::ContractProgress;
        let step = |s, phase: ContractPhase, state: TaskState| {
            let mut e = event(EventType::TaskUpdated, s, true);
            if let Some(t) = e.task.as_mut() {
                t.state = state as i32;
                t.progress = Some(ContractProgress {
                    phase: phase as i32,
                    ..Default::default()
                });
            }
            e
        };
        let events = |confirmed: bool| {
            let mut events = vec![
                event(EventType::Submitted, 1_700_000_000, false),
                step(
                    1_700_000_001,
                    ContractPhase::Returning,
                    TaskState::InProgress,
                ),
                step(
                    1_700_000_002,
                    ContractPhase::AwaitingConfirmation,
                    TaskState::InProgress,
                ),
                step(
                    1_700_000_100,
                    ContractPhase::Deleting,
                    TaskState::InProgress,
                ),
                step(1_700_000_101, ContractPhase::Done, TaskState::Completed),
            ];
            if confirmed {
                events.insert(3, event(EventType::ReturnConfirmed, 1_700_000_050, false));
            }
            events
        };
        let delivery = Delivery {
            processor: "payroll-bureau".into(),
            state: DeliveryState::Delivered as i32,
            delivered_at: Some(Timestamp::default()),
            ..Default::default()
        };
        let line = "return: not confirmed; deletion began at the end of the grace period \
                    (reported 2023-11-14T22:15:00Z)\n";
        let view = TraceView::build(&traced(delivery.clone(), events(false)));
        let text = view.to_table();
        assert!(text.contains(line), "{text}");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(
            json["processors"][0]["tasks"][0]["return_unconfirmed"]["deletion_reported_at"],
            "2023-11-14T22:15:00Z",
            "{json}"
        );
        // Confirmed before the deletion: nothing to say.
        let text = TraceView::build(&traced(delivery.clone(), events(true))).to_table();
        assert!(!text.contains("not confirmed"), "{text}");
        // Deleted with no return awaited (DELETE, or no choice): nothing to say either.
        let mut direct = events(false);
        direct.remove(2);
        let text = TraceView::build(&traced(delivery, direct)).to_table();
        assert!(!text.contains("not confirmed"), "{text}");
    }

    /// The tree gives the registry's last failed status check under each processor it has
    /// one of, as `dsrctl chain` does: a processor that is down sends no report, and its
    /// tasks alone show the last one as if it stood. Before, `trace` gave no sign of it.
    #[test]
    fn a_processor_whose_status_check_failed_says_so() {
        use dsrelay_sdk::proto::{Chain, ChainProcessor};
        let hop = |processor: &str| Delivery {
            processor: processor.into(),
            delivered_at: Some(Timestamp::default()),
            ..Default::default()
        };
        let list = EventList {
            request: Some(Request {
                request_id: "r-1".into(),
                deliveries: vec![hop("mailer"), hop("payroll-bureau")],
                ..Default::default()
            }),
            ..Default::default()
        };
        let chain = Chain {
            processors: vec![
                ChainProcessor {
                    name: "payroll-bureau".into(),
                    status_check_error: "request r-1: Unavailable: connection refused".into(),
                    status_check_failed_at: Some(Timestamp {
                        seconds: 1_767_225_600,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                ChainProcessor {
                    name: "mailer".into(),
                    ..Default::default()
                },
            ],
        };
        let mut view = TraceView::build(&list);
        assert!(!view.to_table().contains("status check"));
        view.checked(&chain);
        let text = view.to_table();
        assert!(
            text.contains(
                "└─ payroll-bureau  delivered (0 attempt(s))\n      processor status check failed \
                 at 2026-01-01T00:00:00Z: request r-1: Unavailable: connection refused\n"
            ),
            "{text}"
        );
        assert_eq!(text.matches("status check").count(), 1, "{text}");
        let json = serde_json::to_value(&view).unwrap();
        let check = &json["processors"][1]["processor_status_check"];
        assert_eq!(check["failed_at"], "2026-01-01T00:00:00Z", "{json:#}");
        assert!(json["processors"][0]
            .get("processor_status_check")
            .is_none());
    }
}
