//! Runs tasks through their connectors: PENDING → IN_PROGRESS → a final state, each step an
//! acknowledgement. Transient connector errors are retried with backoff until the request's
//! due date; then, or on a permanent error, the task FAILS with the reason.

use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::TaskState;
use dsrelay_runtime::store::now_ms;
use futures::StreamExt;
use tokio::sync::watch;

use crate::app::Shared;
use crate::connector::TaskOutcome;
use crate::store::{TaskJob, Transition};

/// Runs until `stop` turns true.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.config.tasks.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let jobs = match shared
            .store
            .claim_tasks(now_ms(), i64::from(cfg.batch_size), cfg.lease_ms as i64)
            .await
        {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "claiming tasks failed");
                Vec::new()
            }
        };
        let full = jobs.len() == cfg.batch_size as usize;
        futures::stream::iter(jobs)
            .for_each_concurrent(cfg.concurrency, |job| {
                let shared = shared.clone();
                async move {
                    if let Err(e) = run_task(&shared, job).await {
                        // The lease runs out and the task is picked up again.
                        tracing::error!(error = format!("{e:#}"), "task step failed");
                    }
                }
            })
            .await;
        if full {
            continue;
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = shared.task_wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(cfg.poll_interval_ms)) => {}
        }
    }
}

#[tracing::instrument(skip_all, fields(request_id = %job.task.key.request_id, subprocessor = %job.task.key.subprocessor))]
async fn run_task(shared: &Shared, job: TaskJob) -> anyhow::Result<()> {
    let key = &job.task.key;
    let store = &shared.store;
    let attempts = job.task.attempts;
    let mut seq = job.task.sequence;
    if job.task.state == TaskState::Pending {
        let started = Transition {
            state: TaskState::InProgress as i32,
            ..Default::default()
        };
        match store.transition(key, seq, &started, now_ms(), attempts).await? {
            Some(s) => seq = s,
            None => return Ok(()),
        }
        shared.ack_wakeup.notify_one();
    }
    let (Some(request), Some(connector)) = (&job.request, shared.connectors.get(&key.subprocessor))
    else {
        let t = Transition {
            state: TaskState::Failed as i32,
            reason: format!(
                "subprocessor {} is no longer configured or the request body is missing",
                key.subprocessor
            ),
            ..Default::default()
        };
        store.transition(key, seq, &t, now_ms(), attempts).await?;
        shared.ack_wakeup.notify_one();
        return Ok(());
    };
    let outcome = connector.run(&key.subprocessor, request).await;
    let now = now_ms();
    let t = match outcome {
        Ok(TaskOutcome::Completed { records, note }) => Transition {
            state: TaskState::Completed as i32,
            records_affected: records,
            confirmed: true,
            note,
            ..Default::default()
        },
        Ok(TaskOutcome::NotFound { note }) => Transition {
            state: TaskState::NotFound as i32,
            confirmed: true,
            note,
            ..Default::default()
        },
        Ok(TaskOutcome::Refused { reason }) => Transition {
            state: TaskState::Refused as i32,
            reason,
            ..Default::default()
        },
        Err(e) if e.is_transient() && now < job.due_at => {
            let delay = shared
                .config
                .tasks
                .backoff
                .delay(u32::try_from(attempts).unwrap_or(u32::MAX));
            tracing::warn!(error = %e, attempts, retry_in_ms = delay.as_millis() as u64, "connector failed; will retry");
            store
                .retry_later(key, seq, &e.to_string(), now + delay.as_millis() as i64)
                .await?;
            return Ok(());
        }
        Err(e) => Transition {
            state: TaskState::Failed as i32,
            reason: if e.is_transient() {
                format!("gave up at the due date after {attempts} attempt(s): {e}")
            } else {
                e.to_string()
            },
            ..Default::default()
        },
    };
    let state = TaskState::try_from(t.state).unwrap_or_default();
    if store.transition(key, seq, &t, now, attempts).await?.is_some() {
        tracing::info!(state = state.as_str_name(), records = t.records_affected, "task finished");
        shared.ack_wakeup.notify_one();
    }
    Ok(())
}
