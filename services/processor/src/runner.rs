//! Runs tasks through their connectors: PENDING → IN_PROGRESS → a final state, each step an
//! acknowledgement. A holder that accepted work without confirming it keeps the task
//! IN_PROGRESS and is asked again every `confirm_interval_ms`; a RETAINED task sleeps until
//! its retain-until date and is then run again to erase the rest; a manual task waits for an
//! operator. Transient connector errors are retried with backoff until the request's due
//! date; then, or on a permanent error, the task FAILS with the reason.

use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::TaskState;
use dsrelay_runtime::trace_context;
use dsrelay_runtime::worker::{run_pool, PoolSettings};
use tokio::sync::watch;
use tracing::Instrument;

use dsrelay_connectors::{kind_label, Outcome, Phase, Task};
use dsrelay_proto::v1::RequestKind;

use crate::app::Shared;
use crate::store::{TaskJob, Transition, NEVER};

/// Runs until `stop` turns true.
pub async fn run(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let cfg = shared.config.tasks.clone();
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
        Duration::from_secs(10),
        move |n| {
            let shared = claimer.clone();
            async move {
                shared
                    .store
                    .claim_tasks(shared.clock.now_ms(), n as i64, cfg.lease_ms as i64)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = format!("{e:#}"), "claiming tasks failed");
                        Vec::new()
                    })
            }
        },
        move |job| {
            let shared = runner.clone();
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
                if let Err(e) = run_task(&shared, job).await {
                    // The lease runs out and the task is picked up again.
                    tracing::error!(error = format!("{e:#}"), "task step failed");
                }
            }
            .instrument(span)
        },
    )
    .await;
}

fn failed(reason: String) -> Transition {
    Transition {
        state: TaskState::Failed as i32,
        reason,
        ..Default::default()
    }
}

async fn run_task(shared: &Shared, job: TaskJob) -> anyhow::Result<()> {
    let key = &job.task.key;
    let store = &shared.store;
    let clock = &shared.clock;
    let attempts = job.task.attempts;
    let mut seq = job.task.sequence;

    let (Some(request), Some(connector)) = (&job.request, shared.connectors.get(&key.subprocessor))
    else {
        let t = failed(format!(
            "subprocessor {} is no longer configured or the request body is missing",
            key.subprocessor
        ));
        store
            .transition(key, seq, &t, clock.now_ms(), attempts)
            .await?;
        shared.ack_wakeup.notify_one();
        return Ok(());
    };
    let kind = RequestKind::try_from(request.kind).unwrap_or(RequestKind::Unspecified);
    // A kind the connector cannot do is answered explicitly, never left hanging.
    if !connector.supports(kind) {
        let t = Transition {
            state: TaskState::Refused as i32,
            reason: format!(
                "subprocessor {} ({} connector) does not support {}",
                key.subprocessor,
                connector.kind_name(),
                kind_label(kind)
            ),
            ..Default::default()
        };
        if store
            .transition(key, seq, &t, clock.now_ms(), attempts)
            .await?
            .is_some()
        {
            shared.ack_wakeup.notify_one();
        }
        return Ok(());
    }
    let phase = match (job.task.state, &job.task.handle) {
        (TaskState::Pending, _) => {
            // The runner goes on with the task: keep it reserved, or another claim would
            // run it a second time alongside.
            let started = Transition {
                state: TaskState::InProgress as i32,
                hold_until: Some(clock.now_ms() + shared.config.tasks.lease_ms as i64),
                ..Default::default()
            };
            match store
                .transition(key, seq, &started, clock.now_ms(), attempts)
                .await?
            {
                Some(s) => seq = s,
                None => return Ok(()),
            }
            shared.ack_wakeup.notify_one();
            Phase::Start
        }
        (TaskState::InProgress, Some(handle)) => Phase::Confirm {
            handle: handle.clone(),
        },
        (TaskState::InProgress, None) => Phase::Start,
        (TaskState::Retained, _) => Phase::RetentionExpired,
        _ => return Ok(()),
    };
    // While a holder is known to be unreachable its tasks wait without calling it.
    let now = clock.now_ms();
    let open_until = shared
        .unavailable_until
        .lock()
        .ok()
        .and_then(|m| m.get(&key.subprocessor).copied());
    // A request's due date bounds its retries; retained data past its date is erased
    // however long the holder takes to come back.
    let may_retry = |now: i64| now < job.due_at || phase == Phase::RetentionExpired;
    if let Some(until) = open_until.filter(|u| *u > now) {
        if may_retry(now) {
            let note = format!("subprocessor {} is unreachable; waiting", key.subprocessor);
            let next = if phase == Phase::RetentionExpired {
                until
            } else {
                until.min(job.due_at)
            };
            store.retry_later(key, seq, &note, next).await?;
            return Ok(());
        }
    }
    let task = Task {
        task_id: format!("{}/{}/{}", key.controller, key.request_id, key.subprocessor),
        request_id: key.request_id.clone(),
        kind,
        identities: request.identities.clone(),
        categories: request
            .scope
            .as_ref()
            .map(|s| s.data_categories.clone())
            .unwrap_or_default(),
        parameters: request.parameters.clone().unwrap_or_default(),
        due_at_ms: job.due_at,
        now_ms: clock.now_ms(),
        phase: phase.clone(),
    };
    // Renew the lease while the holder works, so a slow holder is not run twice by another
    // replica (or by this one, on its next claim).
    let lease_ms = shared.config.tasks.lease_ms as i64;
    let renew = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(
                (lease_ms / 3).max(1) as u64
            ))
            .await;
            if let Err(e) = store
                .extend_lease(key, seq, clock.now_ms() + lease_ms)
                .await
            {
                tracing::warn!(error = format!("{e:#}"), "renewing a task lease failed");
            }
        }
    };
    let started = std::time::Instant::now();
    let call = tracing::info_span!(
        "connector",
        subprocessor = %key.subprocessor,
        connector = connector.kind_name(),
        phase = ?phase,
    );
    let outcome = tokio::select! {
        o = connector.run(&task).instrument(call) => o,
        () = renew => Err(dsrelay_connectors::ConnectorError::Transient(
            "lease renewal stopped".into(),
        )),
    };
    let m = &shared.metrics;
    m.connector_duration
        .observe(&[&key.subprocessor], started.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        m.connector_error(&key.subprocessor, e.is_transient());
    }
    // A retained task's evidence counts every run, not only the last.
    let earlier = if phase == Phase::RetentionExpired {
        job.task.records_affected
    } else {
        0
    };
    let now = clock.now_ms();
    if outcome.is_ok() {
        // It answered: it is reachable again.
        if let Ok(mut m) = shared.unavailable_until.lock() {
            m.remove(&key.subprocessor);
        }
    }
    let t = match outcome {
        Ok(Outcome::Completed {
            records_affected,
            note,
            export,
        }) => Transition {
            state: TaskState::Completed as i32,
            records_affected: earlier + records_affected,
            confirmed: true,
            note,
            export_json: export.map(|e| e.to_string()),
            ..Default::default()
        },
        Ok(Outcome::NotFound { note }) => Transition {
            state: TaskState::NotFound as i32,
            confirmed: true,
            note,
            ..Default::default()
        },
        Ok(Outcome::Retained {
            legal_basis,
            until_ms,
            records_affected,
            note,
        }) => Transition {
            state: TaskState::Retained as i32,
            records_affected: earlier + records_affected,
            confirmed: true,
            note,
            legal_basis,
            retain_until: Some(until_ms),
            // Wake up when the obligation ends and erase the rest without being asked.
            next_attempt_at: Some(until_ms),
            ..Default::default()
        },
        Ok(Outcome::Accepted { handle, note }) => {
            let next = now + shared.config.tasks.confirm_interval_ms as i64;
            if matches!(&phase, Phase::Confirm { handle: h } if *h == handle) {
                // Still not confirmed: nothing changed, so nothing to acknowledge.
                store.reschedule(key, seq, next).await?;
                return Ok(());
            }
            Transition {
                state: TaskState::InProgress as i32,
                confirmed: false,
                note: format!("accepted by the holder, awaiting its confirmation: {note}"),
                next_attempt_at: Some(next),
                handle: Some(handle),
                ..Default::default()
            }
        }
        Ok(Outcome::WaitingForOperator { note }) => Transition {
            state: TaskState::WaitingForOperator as i32,
            note,
            next_attempt_at: Some(NEVER),
            ..Default::default()
        },
        Ok(Outcome::Refused { reason }) => Transition {
            state: TaskState::Refused as i32,
            reason,
            ..Default::default()
        },
        Err(e) if e.is_transient() && may_retry(now) => {
            let backoff = shared
                .config
                .tasks
                .backoff
                .delay(u32::try_from(attempts).unwrap_or(u32::MAX));
            let delay = backoff.max(std::time::Duration::from_millis(
                e.retry_after_ms().unwrap_or(0),
            ));
            tracing::warn!(error = %e, attempts, retry_in_ms = delay.as_millis() as u64, "connector failed; will retry");
            store
                .retry_later(key, seq, &e.to_string(), now + delay.as_millis() as i64)
                .await?;
            return Ok(());
        }
        Err(e) => failed(if e.is_transient() {
            format!("gave up at the due date after {attempts} attempt(s): {e}")
        } else {
            e.to_string()
        }),
    };
    let state = TaskState::try_from(t.state).unwrap_or_default();
    if store
        .transition(key, seq, &t, now, attempts)
        .await?
        .is_some()
    {
        tracing::info!(
            state = state.as_str_name(),
            records = t.records_affected,
            "task step done"
        );
        shared.ack_wakeup.notify_one();
    }
    Ok(())
}
