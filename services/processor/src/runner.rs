//! Runs tasks through their connectors. Each claimed task takes one step: the state machine
//! ([`crate::task_machine`]) says which step its state calls for, the connector takes it
//! (its lease renewed while the holder works), the state machine turns the outcome into the
//! task's next state, and the store records it with its acknowledgement. A holder that
//! failed transiently is marked unreachable ([`crate::breaker`]) and its other tasks wait
//! without calling it: waits 1, 2, 4, 8... of a task are acknowledged with a reason saying
//! why, and logged. An export task's connector writes into the task's folder under the
//! data folder ([`crate::exports`]), emptied before each call.
//!
//! A claim counts an attempt (`attempts = attempts + 1`, so that one cut off by a crash
//! still counts); a step that ends without calling the holder takes it back when it records
//! what it decided, so a task's attempts are the holder's calls made.
//!
//! Each claim leases its task under a random token ([`TaskJob::lease_owner`]), timed on the
//! database's clock; the lease is renewed every third of `tasks.lease_ms` while the
//! connector runs. When a renewal matches
//! nothing (the lease ran out and another claim took the task, or the task changed) or
//! renewals keep failing until the lease is over, the step is abandoned: the connector call
//! is dropped, its outcome never recorded, and the task is left to whoever claims it next.
//! Transitions and postponements match the token too, so a step that ends after its lease
//! was taken records nothing over the new holder's work.
//!
//! When the service stops (its [`Stop`](dsrelay_runtime::host::Stop) turns true) no task is
//! claimed any more; steps in flight get `shutdown_grace_ms` to finish. A step still
//! calling its holder then is
//! abandoned like one whose lease was lost, and its lease released on the spot
//! ([`Store::release_lease`](crate::store::Store::release_lease)) so that another replica
//! claims the task at once instead of waiting `tasks.lease_ms`; the call having been noted,
//! that claim resumes it with care.
//!
//! A request cancelled while a holder works does not stop the call: its outcome is recorded
//! as what the holder did, saying the cancellation came too late ([`crate::task_machine`]).
//!
//! An erasure's retention run first asks the store for a contract end of its controller
//! whose deletion has begun at its holder
//! ([`Store::contract_end_deleting`](crate::store::Store::contract_end_deleting)): that
//! deletion strips the rows it keeps of the columns the request's identities match, so the
//! run follows the contract end's task instead of calling the holder
//! ([`Event::Superseded`]). A run whose holder answered COMPLETED or NOT_FOUND asks again
//! after the call, for a deletion begun meanwhile.
//!
//! A CONTRACT_END task runs its connector's bulk step ([`Connector::run_bulk`]) over all of
//! the controller's data instead; while it runs, the runner reads the connector's progress
//! every `contracts.progress_interval_ms` and acknowledges it when it moved. A bulk erasure
//! is noted as a call too, so the claim after one cut off resumes it with care
//! ([`BulkJob::interrupted`], with the progress recorded so far); an export is run again
//! whole and is not noted.
//!
//! The erasure that follows a return is handed what the return counted
//! ([`BulkJob::returned`], kept with the task by [`Store::record_returned`] when the
//! confirmation releases it) and when the export's last start call began
//! ([`BulkJob::returned_since_ms`], written by [`Store::record_export_started`] right before
//! each [`Phase::Start`] call of the export, not before a confirmation poll: the connectors
//! that read it run their export again whole on every start, so the snapshot returned is
//! the last start's; adapters are not sent it), until a call of it has recorded progress of
//! its own: the connector checks the holder against them and records that it passed
//! ([`ProgressReporter::record_now`], answered here at once) before it erases anything.
//! An erasure the end of the grace period released, no confirmation having come, is handed
//! neither: it deletes all of the controller's data there, as a contract end without a
//! choice does then.
//!
//! [`Store::record_returned`]: crate::store::Store::record_returned
//! [`Store::record_export_started`]: crate::store::Store::record_export_started

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsrelay_connectors::{
    BulkJob, BulkOp, BulkProgress, Connector, ConnectorError, ExportSink, Outcome, Phase,
    ProgressReporter, Task,
};
use dsrelay_proto::v1::{ContractPhase, DeliverRequest, RequestKind, TaskState};
use dsrelay_runtime::clock::date_label;
use dsrelay_runtime::log_text::{withheld, Said};
use dsrelay_runtime::trace_context;
use dsrelay_runtime::worker::{run_pool, PoolSettings};
use tokio::sync::watch;
use tracing::Instrument;

use crate::app::Shared;
use crate::exports;
use crate::head_start;
use crate::lease::{LeaseClock, Renewal};
use crate::store::TaskJob;
use crate::task_machine::{
    bulk_step, claimed_retention_run, decide, follows_contract_end, phase_of, retry_at, Context,
    Decision, Event, Holder,
};

/// Runs until `stop` turns true, then lets the steps in flight finish within the grace,
/// abandons and releases the rest, and logs what it finished, released and left queued.
pub(crate) async fn run(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let grace = Duration::from_millis(shared.config.service.shutdown_grace_ms);
    let finished = Arc::new(AtomicUsize::new(0));
    let deadline = {
        let (shared, mut stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            if stop.wait_for(|s| *s).await.is_ok() {
                tokio::time::sleep(grace).await;
                shared.abandon.send_replace(true);
            }
        })
    };
    pool(shared.clone(), stop.clone(), grace, finished.clone()).await;
    deadline.abort();
    if *stop.borrow() {
        let left = shared.store.runnable_count().await.unwrap_or_else(|e| {
            tracing::warn!(error = format!("{e:#}"), "counting queued tasks failed");
            -1
        });
        tracing::info!(
            finished = finished.load(Ordering::SeqCst),
            released = shared.shutdown_released.load(Ordering::SeqCst),
            left_queued = left,
            "task runner stopped"
        );
    }
    shared.runner_stopped.send_replace(true);
}

/// The claim-and-run loop; `finished` counts the steps that ended after `stop` turned true.
async fn pool(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    grace: Duration,
    finished: Arc<AtomicUsize>,
) {
    let cfg = shared.config.tasks.clone();
    let stopping = stop.clone();
    let settings = PoolSettings {
        concurrency: cfg.concurrency,
        batch: cfg.batch_size as usize,
        poll: Duration::from_millis(cfg.poll_interval_ms),
    };
    let claimer = shared.clone();
    let runner = shared.clone();
    run_pool(
        settings,
        &shared.task_wakeup,
        stop,
        // Abandoned steps release their leases within the margin after the grace.
        grace + dsrelay_runtime::host::SHUTDOWN_MARGIN / 2,
        move |n| {
            let shared = claimer.clone();
            async move {
                // Before the claim's statement is sent: the lease it sets ends no sooner.
                let leased_at = Instant::now();
                shared
                    .store
                    .claim_tasks(shared.clock.now_ms(), n as i64, cfg.lease_ms as i64)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = format!("{e:#}"), "claiming tasks failed");
                        Vec::new()
                    })
                    .into_iter()
                    .map(|job| (job, leased_at))
                    .collect::<Vec<_>>()
            }
        },
        move |(job, leased_at): (TaskJob, Instant)| {
            let shared = runner.clone();
            let (stopping, finished) = (stopping.clone(), finished.clone());
            // Each step of a task is a span under the Deliver call that brought the request.
            let trace_id = job
                .traceparent
                .as_deref()
                .and_then(trace_context::trace_id_from_traceparent)
                .unwrap_or_default();
            let span = tracing::info_span!(
                "task",
                request_id = %job.task.key.request_id,
                subprocessor = %job.task.key.subprocessor,
                attempt = job.task.attempts,
                trace_id = %trace_id,
            );
            if let Some(tp) = &job.traceparent {
                trace_context::set_parent(&span, trace_context::from_traceparent(tp));
            }
            async move {
                if let Err(e) = run_claimed(&shared, job, leased_at).await {
                    // The lease runs out and the task is picked up again.
                    tracing::error!(error = format!("{e:#}"), "task step failed");
                }
                if *stopping.borrow() && !*shared.abandon.borrow() {
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }
            .instrument(span)
        },
    )
    .await;
}

/// [`run_claimed`] for a task claimed a moment ago (tests claim, then run it): its lease is
/// timed from now, a moment after its claim's statement.
#[cfg(test)]
pub(crate) async fn run_task(shared: &Shared, job: TaskJob) -> anyhow::Result<()> {
    run_claimed(shared, job, Instant::now()).await
}

/// One step of a claimed task: claim → phase → connector → next state. `leased_at`: an
/// instant before the claim's statement was sent, from which its lease is timed here.
pub(crate) async fn run_claimed(
    shared: &Shared,
    job: TaskJob,
    leased_at: Instant,
) -> anyhow::Result<()> {
    let key = &job.task.key;
    let current = job.task.current();
    let seq = job.task.sequence;
    let request = job.request.as_ref();
    let kind = request.map_or(RequestKind::Unspecified, |r| {
        RequestKind::try_from(r.kind).unwrap_or(RequestKind::Unspecified)
    });
    if kind == RequestKind::ContractEnd {
        return run_contract_task(shared, job, leased_at).await;
    }
    let connector = shared
        .connectors
        .get(&key.subprocessor)
        .filter(|_| request.is_some());
    let holder = connector.map(|c| Holder {
        connector: c.kind_name(),
        supports: c.supports(kind),
    });
    // Where a contract end has begun deleting at the holder, a retention run follows its
    // task there: the holder would find nothing of what that deletion kept and stripped. A
    // holder no longer configured, or a request body missing, is the claim's to fail.
    let retention = claimed_retention_run(&current);
    let runnable = holder.is_some_and(|h| h.supports);
    if runnable && retention.is_some_and(|p| follows_contract_end(kind, &current, &p)) {
        if let Some(by) = shared.store.contract_end_deleting(key).await? {
            let event = Event::Superseded { by: &by, ran: None };
            let decision = decide(&current, event, &context(shared, &job, 0));
            return record(shared, &job, seq, decision, false).await;
        }
    }
    let (start, phase) = match decide(
        &current,
        Event::Claimed {
            kind,
            holder,
            recipient: request.is_some_and(|r| r.recipient.is_some()),
        },
        &context(shared, &job, 0),
    ) {
        Decision::Run { start, phase } => (start, phase),
        other => return record(shared, &job, seq, other, false).await,
    };
    let (Some(connector), Some(request)) = (connector, request) else {
        return Ok(());
    };
    let before = before_call(shared, &job, seq, start, phase, true, leased_at).await?;
    let Some((seq, phase, noted, leased_at)) = before else {
        return Ok(());
    };
    let call = call(
        shared,
        connector.as_ref(),
        &job,
        request,
        kind,
        &phase,
        (seq, noted, leased_at),
    );
    let Ok(result) = call.await else {
        return Ok(());
    };
    let ctx = after_call(shared, &job, &result);
    // A contract end whose deletion began while the run was under way may have stripped
    // what the run was to find: its "nothing left" is then no proof, and the contract end's
    // task says what became of the rest.
    let superseding = match &result {
        Ok(Outcome::Completed { .. } | Outcome::NotFound { .. })
            if follows_contract_end(kind, &current, &phase) =>
        {
            shared.store.contract_end_deleting(key).await?
        }
        _ => None,
    };
    // A cancellation that came while the holder worked makes the outcome say it came too
    // late. Unless the claim found the task marked already, the outcome is decided as if none
    // came and written only while the task is still unmarked; when a mark stopped the write,
    // it is decided again with the mark. So no step reads the mark before writing (a
    // statement each), and none can miss a mark set between such a read and its write.
    let decided = |cancel_requested: bool| {
        let current = crate::task_machine::Current {
            cancel_requested,
            ..current
        };
        let event = match (&superseding, &result) {
            (Some(by), Ok(outcome)) => Event::Superseded {
                by,
                ran: Some(outcome.clone()),
            },
            _ => Event::Ran {
                kind,
                phase: phase.clone(),
                result: result.clone(),
            },
        };
        let decision = decide(&current, event, &ctx);
        if let Some((at, error)) = decision.retried() {
            tracing::warn!(
                error = %connector_error_logged(shared.log_key(), error),
                attempts = job.task.attempts,
                retry_in_ms = at - ctx.now,
                "connector failed; will retry (the task's last_error holds the holder's words \
                 until the request is forgotten)"
            );
        }
        decision
    };
    if current.cancel_requested {
        return record(shared, &job, seq, decided(true), true).await;
    }
    let decision = decided(false);
    let gave_up = match &decision {
        Decision::Move(t) => t.due_by.is_some(),
        _ => false,
    };
    let written = write(shared, &job, seq, decision, true, true).await?;
    if written == Some(true) {
        return Ok(());
    }
    let marked = match shared.store.task(key).await? {
        Some(row) => row.cancel_requested_at.is_some(),
        None => false,
    };
    if marked {
        return record(shared, &job, seq, decided(true), true).await;
    }
    if gave_up {
        // Given up at the due date the task was claimed with, but not written: an extension
        // may have moved the date past now meanwhile. The task is tried again at once, so
        // that the next claim decides under the request's date as it stands (where nothing
        // moved, the lease was lost and this writes nothing either).
        let again = Decision::Later {
            at: ctx.now,
            error: result.as_ref().err().map(ToString::to_string),
        };
        if write(shared, &job, seq, again, true, true).await? == Some(true) {
            tracing::info!("the due date moved while the holder worked; trying again under it");
            return Ok(());
        }
    }
    if written == Some(false) {
        tracing::warn!("{STEP_NOT_RECORDED}");
    }
    Ok(())
}

/// What comes between a task's claim and its holder's call, for single and contract end
/// tasks alike: while the holder is known to be unreachable, lets the task wait instead of
/// calling it (asked first, so that a start recorded for a wait does not note a call); then
/// records the `start` transition the claim decided on, and the wait. Returns the sequence
/// and the phase to call with, and whether the call was noted (`note_call`: with the start
/// transition, which spares the call its own statement), or `None` when the step ends here
/// (what happened is recorded); with them, when the lease was last set: `leased_at` (the
/// claim's), or an instant before the start's statement when the start held the task anew.
async fn before_call(
    shared: &Shared,
    job: &TaskJob,
    mut seq: i64,
    start: Option<crate::task_machine::Transition>,
    mut phase: Phase,
    note_call: bool,
    mut leased_at: Instant,
) -> anyhow::Result<Option<(i64, Phase, bool, Instant)>> {
    let cfg = &shared.config.tasks;
    let key = &job.task.key;
    let mut wait = None;
    if let Some(down) = shared.unavailable_until.admit(
        &key.subprocessor,
        key,
        shared.clock.now_ms(),
        cfg.lease_ms as i64,
        cfg.poll_interval_ms as i64,
    ) {
        let event = Event::HolderDown {
            phase,
            until: down.until,
            since: down.since,
            error: &down.error,
            waits: down.waits,
        };
        match decide(&job.task.current(), event, &context(shared, job, 0)) {
            Decision::Run { phase: p, .. } => phase = p,
            other => {
                phase = Phase::Start;
                wait = Some((other, down));
            }
        }
    }
    let mut noted = false;
    if let Some(start) = start {
        let call_at = (note_call && wait.is_none()).then(|| shared.clock.now_ms());
        let attempts = job.task.attempts;
        // Its `hold_ms` sets the lease anew, from when the statement runs: no sooner.
        let asked = Instant::now();
        match record_move(shared, job, seq, &start, call_at, false, attempts).await? {
            Some(s) => seq = s,
            None => return Ok(None),
        }
        if start.hold_ms.is_some() {
            leased_at = asked;
        }
        noted = call_at.is_some();
    }
    let Some((decision, down)) = wait else {
        return Ok(Some((seq, phase, noted, leased_at)));
    };
    // No call in this claim: a note of a call cut off earlier stays for the call that
    // follows, and the claim is no attempt (see `Store::postpone`).
    let acknowledged = matches!(decision, Decision::Move(_));
    let written = match decision {
        Decision::Later { at, error } => {
            postpone(shared, job, seq, at, error.as_deref(), false, true).await?
        }
        // Acknowledged like a retry: the note is written again as it stands, not cleared.
        Decision::Move(t) => {
            let (note, attempts) = (job.task.call_started_at, job.task.attempts - 1);
            let moved = record_move(shared, job, seq, &t, note, false, attempts).await?;
            // `record_move` leaves the wakeup to a call that follows when `note` is set.
            shared.ack_wakeup.notify_one();
            moved.is_some()
        }
        other => {
            record(shared, job, seq, other, false).await?;
            false
        }
    };
    if acknowledged && written {
        // One line per acknowledged wait (1, 2, 4, 8...), not one per claim.
        tracing::warn!(
            controller = %key.controller,
            request_id = %key.request_id,
            subprocessor = %key.subprocessor,
            waits = down.waits,
            unreachable_since = %date_label(down.since),
            unreachable_until = %date_label(down.until),
            error = %connector_error_logged(shared.log_key(), &down.error),
            "task waits for its holder, marked unreachable, without calling it; the registry \
             was told why"
        );
    }
    Ok(None)
}

/// One step of a claimed contract end task: claim → bulk step (with progress) → next state.
/// `leased_at` as for [`run_claimed`].
async fn run_contract_task(
    shared: &Shared,
    job: TaskJob,
    leased_at: Instant,
) -> anyhow::Result<()> {
    let key = &job.task.key;
    let current = job.task.current();
    let seq = job.task.sequence;
    let connector = shared
        .connectors
        .get(&key.subprocessor)
        .filter(|_| job.request.is_some());
    let holder = connector.map(|c| Holder {
        connector: c.kind_name(),
        supports: c.supports(RequestKind::ContractEnd),
    });
    let (terms, recipient) = shared
        .store
        .contract_terms_and_recipient(&key.controller, &key.request_id)
        .await?
        .unzip();
    // The data goes back to the registry unless the terms name a transfer recipient.
    let to_registry = recipient.is_some_and(|r| r.is_empty());
    let confirmed = terms.is_some_and(|t| t.return_confirmed);
    let event = Event::ContractClaimed { holder, terms };
    let (start, op, phase) = match decide(&current, event, &context(shared, &job, 0)) {
        Decision::RunBulk { start, op, phase } => (start, op, phase),
        other => return record(shared, &job, seq, other, false).await,
    };
    let Some(connector) = connector else {
        return Ok(());
    };
    // The confirmation releases the erasure, whose start gives the task's counts (the
    // export's, until now) to the erasure: what was returned is kept for its check first.
    // The end of the grace period without a confirmation releases it too, unchecked: all of
    // the data goes then, as without a choice, and a check refusing it would keep it there.
    if op == BulkOp::Erase && job.task.phase == ContractPhase::AwaitingConfirmation && confirmed {
        let counts = job.task.counts.clone();
        if !(shared.store)
            .record_returned(key, seq, &job.lease_owner, counts)
            .await?
        {
            tracing::warn!(
                "what the return counted was not recorded: the task changed meanwhile or its \
                 lease was lost to another claim"
            );
            return Ok(());
        }
    }
    // Not noted with the start: `call_bulk` notes an erasure's call right before the holder
    // is called, so that a step failing before it (what the return left not removed) leaves
    // no note of a call never made, which would tell the next call that one was cut off.
    let before = before_call(shared, &job, seq, start, phase, false, leased_at).await?;
    let Some((mut seq, phase, _, leased_at)) = before else {
        return Ok(());
    };
    let Ok((result, progress, called)) = call_bulk(
        shared,
        connector.as_ref(),
        &job,
        (op, to_registry),
        &phase,
        &mut seq,
        leased_at,
    )
    .await
    else {
        return Ok(());
    };
    let ctx = after_call(shared, &job, &result);
    let event = Event::BulkRan {
        op,
        phase,
        result,
        progress,
        earlier: recorded_of(&job, op),
    };
    let decision = decide(&current, event, &ctx);
    if let Some((at, error)) = decision.retried() {
        tracing::warn!(
            error = %connector_error_logged(shared.log_key(), error),
            attempts = job.task.attempts,
            retry_in_ms = at - ctx.now,
            "connector failed a contract end step; will retry (the task's last_error holds \
             the holder's words)"
        );
    }
    match decision {
        // The holder was not called (what the return left could not be removed): a note of
        // an erasure cut off earlier stays for the call that follows, as while it waits.
        Decision::Later { at, error } if !called => {
            let error = error.as_deref();
            postpone(shared, &job, seq, at, error, false, true)
                .await
                .map(drop)
        }
        // Acknowledged alike: the note is written again as it stands, not cleared, and the
        // claim is no attempt.
        Decision::Move(t) if !called && t.error.is_some() => {
            let (note, attempts) = (job.task.call_started_at, job.task.attempts - 1);
            if record_move(shared, &job, seq, &t, note, false, attempts)
                .await?
                .is_some()
            {
                // `record_move` leaves the wakeup to a call that follows; none does.
                shared.ack_wakeup.notify_one();
            }
            Ok(())
        }
        decision => record(shared, &job, seq, decision, called).await,
    }
}

/// Runs the connector's bulk step `op`, renewing the task's lease and acknowledging the
/// connector's progress at most every `contracts.progress_interval_ms` when it moved;
/// `seq` follows the acknowledgements. An export the registry is to receive
/// (`to_registry`) gets a head start. The lease is timed from `leased_at`, before the
/// statement that last set it. Answers the outcome, the last progress reported and
/// whether the holder was called, or [`LeaseLost`] when the step was abandoned (or an
/// erasure's call or an export's start could not be noted).
async fn call_bulk(
    shared: &Shared,
    connector: &dyn Connector,
    job: &TaskJob,
    (op, to_registry): (BulkOp, bool),
    phase: &Phase,
    seq: &mut i64,
    leased_at: Instant,
) -> Result<(Result<Outcome, ConnectorError>, BulkProgress, bool), LeaseLost> {
    let key = &job.task.key;
    let export = if op == BulkOp::Export {
        // All of the controller's data: every category the subprocessor holds.
        match export_sink(shared, key, &[]).await {
            Ok(sink) => Some(sink),
            Err(error) => return Ok((Err(error), BulkProgress::default(), false)),
        }
    } else {
        // What the contract end exported for its return goes before the erasure that will
        // certify the data gone: the uploader removes it once delivered, but a crash right
        // after the delivery was recorded can have left it (the forget worker's sweep would
        // remove it later, possibly after the certificate).
        let dir = exports::task_dir(&shared.config.data_dir, key);
        if let Err(e) = exports::remove(&dir).await {
            let error = ConnectorError::Transient(format!(
                "removing the returned export {} before the erasure: {e}",
                dir.display()
            ));
            return Ok((Err(error), BulkProgress::default(), false));
        }
        // Noted before the call, so that if it is cut off the next claim tells the holder,
        // whose repeated erasure may answer differently once the data is gone.
        note_call(shared, job, *seq).await?;
        None
    };
    let recorded = recorded_of(job, op);
    // An erasure that recorded progress of its own passed its check in an earlier call
    // (connectors record it before erasing anything): it may have erased part, so it is
    // not checked again.
    let passed = recorded != BulkProgress::default();
    let (returned, returned_since_ms) = match (op, phase) {
        (BulkOp::Erase, Phase::Start) if !passed => match shared.store.returned(key).await {
            Ok(Some((returned, since))) => (Some(returned), since),
            Ok(None) => (None, None),
            Err(e) => {
                let error = ConnectorError::Transient(format!(
                    "reading what the contract end returned, for the erasure's check: {e:#}"
                ));
                return Ok((Err(error), BulkProgress::default(), false));
            }
        },
        _ => (None, None),
    };
    let (export, head_start) = head_start::attach(shared, key, export, to_registry);
    let (reporter, _seen, mut asked) = ProgressReporter::recorded();
    // Recorded as the whole step's counts, also while a resumed erasure runs.
    let cut_off = job.task.call_started_at.is_some();
    let counted = |p| crate::task_machine::step_counts(op, phase, (&recorded, cut_off), p);
    let check_due = returned.is_some();
    let bulk = BulkJob {
        job_id: bulk_job_id(key, op),
        request_id: key.request_id.clone(),
        controller: key.controller.clone(),
        op,
        phase: phase.clone(),
        due_at_ms: job.due_at,
        now_ms: shared.clock.now_ms(),
        interrupted: op == BulkOp::Erase && job.task.call_started_at.is_some(),
        recorded_progress: recorded.clone(),
        export,
        progress: reporter.clone(),
        returned,
        returned_since_ms,
    };
    let mut lease = Lease::new(shared, job, leased_at);
    let every = Duration::from_millis(shared.config.contracts.progress_interval_ms);
    let mut tick = tokio::time::interval(every.min(lease.every()));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut reported, mut reported_at, mut renewed_at) =
        (BulkProgress::default(), Instant::now(), Instant::now());
    // What the task holds now. Counts equal to these are not recorded again: a holder that
    // reports again at every attempt the totals it reported before (the sql connector does
    // as its erasure starts) has not moved, and recording them would clear the reason the
    // failed attempt left (`Store::record_progress`), which the registry shows until the
    // holder answers again.
    let mut stored = recorded.clone();
    let span = tracing::info_span!(
        "connector",
        subprocessor = %key.subprocessor,
        connector = connector.kind_name(),
        op = ?op,
        phase = phase.name(),
    );
    // Nothing is recorded before the holder is called, so the sequence is still this one.
    let seq_at_call = *seq;
    let run = async {
        // Renewed by the loop below while it waits for an export slot.
        let _slot = export_slot(shared, op == BulkOp::Export).await;
        if op == BulkOp::Export && matches!(phase, Phase::Start) {
            note_export_start(shared, job, seq_at_call).await?;
        }
        let started = Instant::now();
        let result = head_start::beside(shared, head_start, async {
            let result = connector.run_bulk(&bulk).instrument(span).await;
            shared
                .metrics
                .connector_duration
                .observe(&[&key.subprocessor], started.elapsed().as_secs_f64());
            result
        })
        .await;
        Ok::<_, LeaseLost>(result)
    };
    tokio::pin!(run);
    let result = loop {
        tokio::select! {
            r = &mut run => break r?,
            _ = tick.tick() => {}
            () = abandoned(shared) => return Err(release(shared, job).await),
            Some(ask) = asked.recv() => {
                let counts = counted(ask.progress.clone());
                let answer = if ask.progress == reported {
                    Ok(())
                } else if counts == stored {
                    reported = ask.progress;
                    Ok(())
                } else {
                    match record_bulk_progress(shared, job, op, *seq, counts.clone()).await {
                        Ok(Some(s)) => {
                            (*seq, reported, reported_at) = (s, ask.progress, Instant::now());
                            stored = counts;
                            Ok(())
                        }
                        Ok(None) => Err("the task changed meanwhile or its lease was lost".into()),
                        Err(e) => Err(format!("{e:#}")),
                    }
                };
                let _ = ask.done.send(answer);
            }
        }
        let latest = reporter.latest();
        if latest != reported && counted(latest.clone()) == stored {
            reported = latest;
        } else if latest != reported && reported_at.elapsed() >= every {
            let counts = counted(latest.clone());
            match record_bulk_progress(shared, job, op, *seq, counts.clone()).await {
                Ok(Some(s)) => {
                    (*seq, reported, reported_at) = (s, latest, Instant::now());
                    stored = counts;
                }
                // The task changed meanwhile (cancelled) or another claim took it: the
                // step's end, or the next renewal, finds out.
                Ok(None) => {}
                Err(e) => tracing::warn!(error = format!("{e:#}"), "recording progress failed"),
            }
        }
        if renewed_at.elapsed() >= lease.every() {
            renewed_at = Instant::now();
            lease.renew(*seq).await?;
        }
    };
    if let Err(e) = &result {
        shared
            .metrics
            .connector_error(&key.subprocessor, e.is_transient());
    }
    // A failed call that was to check the holder against the return and recorded nothing
    // may have reported counts before its check passed: handed on, they would be recorded
    // and spare the next call the check.
    let last = match &result {
        Err(_) if check_due && reported == BulkProgress::default() => BulkProgress::default(),
        _ => reporter.latest(),
    };
    Ok((result, last, true))
}

/// The progress `job`'s task recorded of its bulk step `op` before this call: what the task
/// holds is another step's (a return's, a finished erasure's) until this step records its
/// own.
fn recorded_of(job: &TaskJob, op: BulkOp) -> BulkProgress {
    if job.task.phase == phase_of(op) {
        job.task.counts.clone()
    } else {
        BulkProgress::default()
    }
}

/// Records `progress` as the running bulk step `op`'s and queues its acknowledgement
/// ([`Store::record_progress`](crate::store::Store::record_progress)): the new sequence,
/// `None` when the task changed or another claim took it.
async fn record_bulk_progress(
    shared: &Shared,
    job: &TaskJob,
    op: BulkOp,
    seq: i64,
    progress: BulkProgress,
) -> anyhow::Result<Option<i64>> {
    let now = shared.clock.now_ms();
    let (key, owner) = (&job.task.key, &job.lease_owner);
    let recorded = (shared.store)
        .record_progress(
            key,
            seq,
            owner,
            (phase_of(op), bulk_step(op)),
            progress,
            now,
        )
        .await?;
    if recorded.is_some() {
        shared.ack_wakeup.notify_one();
    }
    Ok(recorded)
}

/// Notes that a task's holder is being called, a single task's or a bulk erasure's
/// ([`Store::call_started`](crate::store::Store::call_started)); [`LeaseLost`] when the
/// claim no longer holds the task or the note failed: the holder is not called unnoted.
async fn note_call(shared: &Shared, job: &TaskJob, seq: i64) -> Result<(), LeaseLost> {
    let now = shared.clock.now_ms();
    let noted = (shared.store)
        .call_started(&job.task.key, seq, &job.lease_owner, now)
        .await;
    noted_or_lost(
        noted,
        "task lease lost before its holder was called; the step is abandoned",
        "noting a holder call failed; the step is abandoned",
    )
}

/// Records that `job`'s contract end export starts at its holder now, in place of an earlier
/// start ([`Store::record_export_started`](crate::store::Store::record_export_started)): the
/// erasure after the return asks the holder what changed since. [`LeaseLost`] when the claim
/// no longer holds the task or the write failed: the holder is not called, as after a lost
/// lease, and a later claim runs the export again.
async fn note_export_start(shared: &Shared, job: &TaskJob, seq: i64) -> Result<(), LeaseLost> {
    let now = shared.clock.now_ms();
    let (key, owner) = (&job.task.key, &job.lease_owner);
    let noted = (shared.store)
        .record_export_started(key, seq, owner, now)
        .await;
    noted_or_lost(
        noted,
        "the export's start was not recorded: the task changed meanwhile or its lease was \
         lost to another claim; the step is abandoned",
        "recording the export's start failed; the step is abandoned",
    )
}

/// The answer of a guarded write made before a holder is called: [`LeaseLost`], logged with
/// `lost` when the claim no longer holds the task, or with `failed` when the write failed (the
/// lease then runs out and a later claim takes the step).
fn noted_or_lost(noted: anyhow::Result<bool>, lost: &str, failed: &str) -> Result<(), LeaseLost> {
    match noted {
        Ok(true) => Ok(()),
        Ok(false) => {
            tracing::warn!("{lost}");
            Err(LeaseLost)
        }
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "{failed}");
            Err(LeaseLost)
        }
    }
}

/// Marks `job`'s holder unreachable after a transient failure, or answering after any other
/// outcome of its call, and gives the context to decide on `result` with: the backoff is
/// drawn for this attempt's retry.
fn after_call(shared: &Shared, job: &TaskJob, result: &Result<Outcome, ConnectorError>) -> Context {
    let holder = &job.task.key.subprocessor;
    let attempt = u32::try_from(job.task.attempts).unwrap_or(u32::MAX);
    let backoff = shared.config.tasks.backoff.delay(attempt).as_millis() as i64;
    let ctx = context(shared, job, backoff);
    match result {
        // One timeout per holder, not one per task: the others wait as long as this one.
        Err(e) if e.is_transient() => {
            let until = retry_at(&ctx, e);
            (shared.unavailable_until).failed(holder, ctx.now, until, &e.to_string());
        }
        _ => shared.unavailable_until.answered(holder),
    }
    ctx
}

/// What the state machine needs of the runner's settings and the clock; `backoff_ms` is the
/// delay drawn for a retry of this attempt.
fn context(shared: &Shared, job: &TaskJob, backoff_ms: i64) -> Context {
    let cfg = &shared.config.tasks;
    Context {
        now: shared.clock.now_ms(),
        due_at: job.due_at,
        lease_ms: cfg.lease_ms as i64,
        confirm_interval_ms: cfg.confirm_interval_ms as i64,
        backoff_ms,
    }
}

/// Calls the connector for `phase`, renewing the task's lease while the holder works, so a
/// slow holder is not run twice by another replica (or by this one, on its next claim),
/// timed from `leased_at`, before the statement that last set the lease. `noted`: the call
/// was already noted with the task's sequence `seq` (by the start transition); otherwise it
/// is noted here first. [`LeaseLost`] when the lease could not be
/// kept: the call is dropped unfinished.
async fn call(
    shared: &Shared,
    connector: &dyn Connector,
    job: &TaskJob,
    request: &DeliverRequest,
    kind: RequestKind,
    phase: &Phase,
    (seq, noted, leased_at): (i64, bool, Instant),
) -> Result<Result<Outcome, ConnectorError>, LeaseLost> {
    let key = &job.task.key;
    let categories = request
        .scope
        .as_ref()
        .map(|s| s.data_categories.clone())
        .unwrap_or_default();
    let export = if exports::exports(kind) {
        match export_sink(shared, key, &categories).await {
            Ok(sink) => Some(sink),
            Err(error) => return Ok(Err(error)),
        }
    } else {
        None
    };
    // A return of data's files start for the registry while they are written.
    let (export, head_start) =
        head_start::attach(shared, key, export, kind == RequestKind::ReturnOfData);
    let task = Task {
        task_id: format!("{}/{}/{}", key.controller, key.request_id, key.subprocessor),
        request_id: key.request_id.clone(),
        controller: key.controller.clone(),
        kind,
        identities: request.identities.clone(),
        categories,
        parameters: request.parameters.clone().unwrap_or_default(),
        due_at_ms: job.due_at,
        now_ms: shared.clock.now_ms(),
        phase: phase.clone(),
        interrupted: job.task.call_started_at.is_some(),
        export,
    };
    // Noted before the call, so that if it is cut off the next claim makes a resumed one.
    if !noted {
        note_call(shared, job, seq).await?;
    }
    let renew = async {
        let mut lease = Lease::new(shared, job, leased_at);
        loop {
            tokio::time::sleep(lease.every()).await;
            if let Err(lost) = lease.renew(seq).await {
                break lost;
            }
        }
    };
    let span = tracing::info_span!(
        "connector",
        subprocessor = %key.subprocessor,
        connector = connector.kind_name(),
        phase = phase.name(),
    );
    let m = &shared.metrics;
    let run = async {
        let started = Instant::now();
        let result = connector.run(&task).instrument(span).await;
        m.connector_duration
            .observe(&[&key.subprocessor], started.elapsed().as_secs_f64());
        result
    };
    let exporting = task.export.is_some();
    let work = async {
        // Inside the select, so the lease is renewed while it waits for an export slot.
        let _slot = export_slot(shared, exporting).await;
        head_start::beside(shared, head_start, run).await
    };
    let result = tokio::select! {
        r = work => r,
        lost = renew => return Err(lost),
        () = abandoned(shared) => return Err(release(shared, job).await),
    };
    if let Err(e) = &result {
        m.connector_error(&key.subprocessor, e.is_transient());
    }
    Ok(result)
}

/// The task's export folder, emptied first: whatever an earlier run of the task left goes,
/// its files are replaced, never added to. Its files are labelled with the categories the
/// holder holds of those `requested` (all, when none are) only when the connector hands the
/// scope to the holder ([`Connector::scopes_by_category`]); the others export all they hold
/// of the subject, which every category the holder holds then describes.
async fn export_sink(
    shared: &Shared,
    key: &crate::store::TaskKey,
    requested: &[String],
) -> Result<ExportSink, ConnectorError> {
    let held = shared
        .config
        .subprocessors
        .iter()
        .find(|s| s.name == key.subprocessor)
        .map_or(&[][..], |s| &s.categories[..]);
    let scoped = (shared.connectors.get(&key.subprocessor)).is_some_and(|c| c.scopes_by_category());
    let requested = if scoped { requested } else { &[][..] };
    let sink = exports::sink(&shared.config.data_dir, key, held, requested);
    if let Err(e) = exports::reset(&sink).await {
        return Err(ConnectorError::Permanent(format!(
            "preparing the export folder {}: {e}",
            sink.dir().display()
        )));
    }
    Ok(sink)
}

/// One of the `tasks.export_concurrency` slots when the step `exports`, once one is free;
/// `None` at once for a step that does not. Callers wait where their lease is renewed.
async fn export_slot(shared: &Shared, exports: bool) -> Option<tokio::sync::SemaphorePermit<'_>> {
    if !exports {
        return None;
    }
    // The semaphore is never closed.
    shared.export_slots.acquire().await.ok()
}

/// Resolves when the shutdown grace is over.
async fn abandoned(shared: &Shared) {
    let _ = shared.abandon.subscribe().wait_for(|a| *a).await;
}

/// A step abandoned at the end of the shutdown grace gives its lease up, so that another
/// runner claims the task at once; its holder's call is dropped, no outcome recorded.
async fn release(shared: &Shared, job: &TaskJob) -> LeaseLost {
    match shared
        .store
        .release_lease(&job.task.key, &job.lease_owner)
        .await
    {
        Ok(true) => {
            shared.shutdown_released.fetch_add(1, Ordering::SeqCst);
            tracing::warn!("shutting down: step abandoned mid-call and its lease released");
        }
        Ok(false) => tracing::warn!("shutting down: step abandoned; its lease was already lost"),
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "shutting down: step abandoned; releasing its lease failed, it runs out instead"
        ),
    }
    LeaseLost
}

/// The step was abandoned because its task's lease was lost (or, before the holder was
/// called, the call or the export's start could not be noted, or the shutdown grace ended);
/// the cause is logged.
#[derive(Debug)]
pub(crate) struct LeaseLost;

/// The lease of one claimed task, as its runner keeps it.
struct Lease<'a> {
    shared: &'a Shared,
    job: &'a TaskJob,
    lease_ms: i64,
    clock: LeaseClock,
}

impl<'a> Lease<'a> {
    /// The lease of `tasks.lease_ms` that `job`'s claim took, or its start step set anew,
    /// from `leased_at`: an instant before that statement was sent.
    fn new(shared: &'a Shared, job: &'a TaskJob, leased_at: Instant) -> Self {
        let lease_ms = shared.config.tasks.lease_ms as i64;
        Self {
            shared,
            job,
            lease_ms,
            clock: LeaseClock::new(leased_at, u64::try_from(lease_ms).unwrap_or(0)),
        }
    }

    /// How often the lease is renewed ([`LeaseClock::every`]).
    fn every(&self) -> Duration {
        self.clock.every()
    }

    /// Extends the lease by `lease_ms` from now (the database's clock). A failed renewal is
    /// retried at the next one, as long as the lease lasts; the lease is lost when a renewal
    /// matches nothing or the failures outlast it.
    async fn renew(&mut self, seq: i64) -> Result<(), LeaseLost> {
        let key = &self.job.task.key;
        let owner = &self.job.lease_owner;
        let extend = self
            .shared
            .store
            .extend_lease(key, seq, owner, self.lease_ms);
        match self.clock.renew(extend).await {
            Renewal::Held => Ok(()),
            Renewal::Lost => {
                tracing::warn!(
                    "task lease lost: another claim took the task or it changed; \
                     the step is abandoned and its outcome not recorded"
                );
                Err(LeaseLost)
            }
            Renewal::RanOut(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "task lease lost: renewals failed until it ran out; \
                     the step is abandoned and its outcome not recorded"
                );
                Err(LeaseLost)
            }
            Renewal::Failed(e) => {
                tracing::warn!(error = format!("{e:#}"), "renewing a task lease failed");
                Ok(())
            }
        }
    }
}

/// Stores what the state machine decided; `called`: whether this claim called the holder
/// (if not, the claim is no attempt, and a note of an earlier call cut off stays).
async fn record(
    shared: &Shared,
    job: &TaskJob,
    seq: i64,
    decision: Decision,
    called: bool,
) -> anyhow::Result<()> {
    write(shared, job, seq, decision, false, called)
        .await
        .map(drop)
}

/// [`record`], only while no cancellation marked the task when `unless_cancelled` (then a
/// write that matched nothing is not logged: the caller finds out why). Answers whether the
/// decision was written; `None` when it writes nothing.
async fn write(
    shared: &Shared,
    job: &TaskJob,
    seq: i64,
    decision: Decision,
    unless_cancelled: bool,
    called: bool,
) -> anyhow::Result<Option<bool>> {
    match decision {
        Decision::Move(t) => {
            let attempts = job.task.attempts - i64::from(!called);
            let moved = record_move(shared, job, seq, &t, None, unless_cancelled, attempts).await?;
            Ok(Some(moved.is_some()))
        }
        Decision::Later { at, error } => {
            let held = postpone(
                shared,
                job,
                seq,
                at,
                error.as_deref(),
                unless_cancelled,
                !called,
            )
            .await?;
            Ok(Some(held))
        }
        Decision::Run { .. }
        | Decision::RunBulk { .. }
        | Decision::Mark { .. }
        | Decision::Ignore
        | Decision::Reject(_) => Ok(None),
    }
}

/// Puts the claimed task off until `at` ([`crate::store::Store::postpone`], against the due
/// time as this claim knows it); answers whether it was. A postponement that matched
/// nothing is logged unless `unless_cancelled` (the caller finds out why). `no_call`: the
/// claim called no holder, so it is no attempt and an earlier call's note stays.
async fn postpone(
    shared: &Shared,
    job: &TaskJob,
    seq: i64,
    at: i64,
    error: Option<&str>,
    unless_cancelled: bool,
    no_call: bool,
) -> anyhow::Result<bool> {
    let held = shared
        .store
        .postpone(
            &job.task.key,
            seq,
            &job.lease_owner,
            job.due_as_known(),
            at,
            error,
            unless_cancelled,
            no_call,
            shared.clock.now_ms(),
        )
        .await?;
    if !held && !unless_cancelled {
        tracing::warn!("task lease lost or task changed; the retry is left to its holder");
    }
    Ok(held)
}

/// Records a transition (noting the holder's call at `call_at` with it, when the call follows
/// directly, or keeping the note of an earlier call cut off, when no call was made; with
/// `attempts` as the task's count, the claim's taken back when it made no call; only
/// while no cancellation marked the task when `unless_cancelled`) and wakes
/// the acknowledgement sender; the new sequence, or `None` when the task changed meanwhile
/// (a cancellation wins) or another claim took it. An export the transition ends without a
/// delivery has its folder removed once the step is committed.
///
/// A transition the holder's call directly follows does not wake the sender: its
/// acknowledgement (IN_PROGRESS, mostly) goes with the outcome's, which the call's step
/// queues and wakes the sender for, in one Acknowledge call instead of two; it goes sooner
/// when the sender wakes for another reason or polls (`acks.poll_interval_ms`) while the
/// holder is still at work.
async fn record_move(
    shared: &Shared,
    job: &TaskJob,
    seq: i64,
    t: &crate::task_machine::Transition,
    call_at: Option<i64>,
    unless_cancelled: bool,
    attempts: i64,
) -> anyhow::Result<Option<i64>> {
    let now = shared.clock.now_ms();
    let moved = shared
        .store
        .transition_leased(
            &job.task.key,
            seq,
            &job.lease_owner,
            t,
            now,
            attempts,
            call_at,
            unless_cancelled,
        )
        .await?;
    if moved.is_some() {
        // As the step writer writes it (see `Store::transition`).
        job.moved(t.next_attempt_at.unwrap_or(now));
        tracing::info!(
            state = t.state.as_str_name(),
            records = t.records_affected,
            "task step done"
        );
        if t.state == TaskState::Failed {
            failed_for_good(shared, &job.task.key, &t.reason);
        }
        if call_at.is_none() {
            shared.ack_wakeup.notify_one();
        }
        if t.upload {
            shared.upload_wakeup.notify_one();
        }
        if t.discard_export {
            crate::forget::remove_discarded_export(shared, &job.task.key).await;
        }
    } else if !unless_cancelled {
        tracing::warn!(state = t.state.as_str_name(), "{STEP_NOT_RECORDED}");
    }
    Ok(moved)
}

/// Why a step's write matched nothing: what the runner cannot tell apart, said once for
/// both places that log it.
const STEP_NOT_RECORDED: &str = "task step not recorded: the task changed meanwhile, or its \
     lease ran out (the database was slow or out of reach) or was taken by another claim";

/// A connector's error as a log line shows it: the adapter connector's own framing of an
/// adapter's answer (`adapter <rpc> at <endpoint>: <gRPC code>`, from this service's
/// configuration and the call's status) stays readable, and what follows it, which may quote
/// the holder, is withheld; any other text is withheld whole. The connectors' error is one
/// text, so what follows the code is withheld even where it is this service's own transport
/// error (a refused connection, a failed TLS handshake), which a log line could show.
fn connector_error_logged(key: &[u8], error: &str) -> String {
    let framed = error.strip_prefix("adapter ").and_then(|rest| {
        let mut parts = rest.splitn(3, ": ");
        let (call, code, quoted) = (parts.next()?, parts.next()?, parts.next()?);
        let is_code = (0..=16).any(|n| format!("{:?}", tonic::Code::from(n)) == code);
        (call.contains(" at ") && is_code).then_some((call, code, quoted))
    });
    match framed {
        Some((call, code, quoted)) => Said::quoting(format!("adapter {call}: {code}"), quoted)
            .logged(key)
            .to_string(),
        None => withheld(key, error).to_string(),
    }
}

/// Logs a task that has just been recorded FAILED, from any step (a permanent error, given
/// up at the due date, an export that cannot be delivered): it runs again only when an
/// operator retries it, so the line says so at WARN, like the transient failures before it,
/// and names the commands that show the reason in full and retry the task. The reason may
/// quote the holder, so the line shows it withheld.
pub(crate) fn failed_for_good(shared: &Shared, key: &crate::store::TaskKey, reason: &str) {
    tracing::warn!(
        controller = %key.controller,
        request_id = %key.request_id,
        subprocessor = %key.subprocessor,
        reason = %withheld(shared.log_key(), reason),
        read_with = "dsrctl tasks list --state failed --output json",
        retry_with = %format!(
            "dsrctl tasks retry {} {} {} --note \"what was fixed\"",
            key.controller, key.request_id, key.subprocessor
        ),
        "task failed; it runs again only when an operator retries it once the cause is fixed \
         (the task's reason in full: read_with; then retry_with)"
    );
}

/// A contract-end step's key at its holder. The export keeps the task's id (its pages are
/// read under it), and the erasure that follows a return adds `#erase`: a holder answers a
/// repeated key with its first outcome, or refuses it for another operation
/// (`adapter.proto`), so an erasure under the export's key would be refused, or answered
/// with the export's COMPLETED and certified with nothing erased. A retention run appends
/// its own suffix to the erasure's key.
pub(crate) fn bulk_job_id(key: &crate::store::TaskKey, op: BulkOp) -> String {
    let task = format!("{}/{}/{}", key.controller, key.request_id, key.subprocessor);
    match op {
        BulkOp::Export => task,
        BulkOp::Erase => format!("{task}#erase"),
    }
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod lease_tests;

#[cfg(test)]
#[path = "cancel_tests.rs"]
mod cancel_tests;

#[cfg(test)]
#[path = "shutdown_tests.rs"]
mod shutdown_tests;

#[cfg(test)]
#[path = "due_date_tests.rs"]
mod due_date_tests;

#[cfg(test)]
#[path = "retention_tests.rs"]
mod retention_tests;

#[cfg(test)]
#[path = "discard_tests.rs"]
mod discard_tests;

#[cfg(test)]
#[path = "returned_tests.rs"]
mod returned_tests;

#[cfg(test)]
#[path = "export_label_tests.rs"]
mod export_label_tests;

#[cfg(test)]
mod connector_error_tests {
    use super::connector_error_logged;

    /// The adapter connector's framing (the call, the configured endpoint, the gRPC code)
    /// stays in the log line and only the adapter's words are withheld; before, the whole
    /// error was withheld, and a reader could not tell which adapter failed or with what.
    #[test]
    fn an_adapter_s_status_keeps_its_framing_and_withholds_its_words() {
        let error = "adapter Execute at https://localhost:4711: Unavailable: the row of \
                     paavo.lokitesti@example.fi is locked";
        let logged = connector_error_logged(b"k", error);
        let quoted = "the row of paavo.lokitesti@example.fi is locked";
        assert!(
            logged.starts_with(&format!(
                "adapter Execute at https://localhost:4711: Unavailable: {} bytes withheld, \
                 keyed hash ",
                quoted.len()
            )),
            "{logged}"
        );
        assert!(!logged.contains("paavo"), "{logged}");
    }

    /// Any other text may be the holder's throughout (a database's error quoting a value),
    /// and is withheld whole, as is one that only looks framed.
    #[test]
    fn any_other_error_is_withheld_whole() {
        for error in [
            "relation \"contacts\" does not exist: paavo.lokitesti@example.fi",
            "adapter Execute at https://x: NotACode: paavo.lokitesti@example.fi",
            "adapter paavo.lokitesti@example.fi: Unavailable: locked",
            "",
        ] {
            let logged = connector_error_logged(b"k", error);
            assert_eq!(
                logged,
                dsrelay_runtime::log_text::withheld(b"k", error).to_string()
            );
        }
    }
}
