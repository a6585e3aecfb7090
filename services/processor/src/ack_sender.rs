//! Sends queued acknowledgements to each controller's registry, in batches, retrying with
//! backoff until the registry has stored them. The registry judges each acknowledgement on its
//! own; one it rejects is rescheduled on its own (after the backoff, the others sent
//! meanwhile), then sent again in a batch like any due acknowledgement, and dead-lettered
//! after `acks.max_rejections` rejections, so it never holds back the others.
//!
//! A dead-lettered acknowledgement does not hold back later ones of the same task either: the
//! registry keeps a task at the state of the highest sequence it applied and records an older
//! one that arrives later (after a requeue) without moving the task back, so a later sequence
//! overtaking a parked one leaves the task where the processor has it.
//!
//! The runner's steps queue their acknowledgements already leased to this sender and hand
//! them over in memory once committed (`Store::with_ack_handoff`), so the sender sends them
//! without claiming them first: one statement and one commit fewer between a task's step and
//! the registry hearing of it. It still claims from the outbox once a poll interval, and
//! whenever nothing was handed over, for retries and for what other paths queued. Should the
//! process stop without sending a handed acknowledgement (a crash), the row is claimed by a
//! sender once its lease (`acks.lease_ms`) ends, as a claimed one would be.
//!
//! When the service stops, the sender flushes: it keeps sending what is due until the task
//! runner has returned (its last steps queue acknowledgements too) and nothing due is left,
//! within the shutdown grace plus half of [`SHUTDOWN_MARGIN`]. A batch still unanswered then
//! is released (its lease ended), and so is what was handed over and not taken, so another
//! replica or the next start sends it at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{AcknowledgeRequest, RejectedAcknowledgement};
use dsrelay_runtime::host::SHUTDOWN_MARGIN;
use dsrelay_runtime::log_text::Said;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app::Shared;
use crate::store::AckJob;

/// Runs until `stop` turns true, then flushes.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.config.acks.clone();
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let batch = cfg.batch_size as usize;
    // When the outbox was last claimed from. Acknowledgements the runner's steps hand over
    // are sent without a claim; the outbox is still claimed from once a poll interval (for
    // retries, and for what other paths or other processes queued) and whenever nothing was
    // handed over.
    let mut claimed_at: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let (mut jobs, more) = shared.store.take_handed_acks(batch);
        if jobs.is_empty() || claimed_at.is_none_or(|at| at.elapsed() >= poll) {
            if jobs.len() < batch {
                jobs.extend(claim(&shared, batch - jobs.len()).await);
            }
            claimed_at = Some(Instant::now());
        }
        let full = more || jobs.len() == batch;
        send_all(&shared, jobs).await;
        if full {
            continue;
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = shared.ack_wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(cfg.poll_interval_ms)) => {}
        }
    }
    flush(&shared).await;
}

/// Sends what is due until the task runner has stopped and nothing due is left, or the
/// shutdown deadline comes; logs how many were sent and how many are left queued.
async fn flush(shared: &Shared) {
    let grace = Duration::from_millis(shared.config.service.shutdown_grace_ms);
    let deadline = Instant::now() + grace + SHUTDOWN_MARGIN / 2;
    let poll = Duration::from_millis(shared.config.acks.poll_interval_ms);
    let mut runner_stopped = shared.runner_stopped.subscribe();
    let mut sent = 0usize;
    loop {
        // Read before claiming: acknowledgements the runner queued before it stopped are
        // then claimed by this round or a later one.
        let runner_done = *runner_stopped.borrow_and_update();
        let batch = shared.config.acks.batch_size as usize;
        let (mut jobs, _) = shared.store.take_handed_acks(batch);
        if jobs.len() < batch {
            let Ok(claimed) =
                tokio::time::timeout_at(deadline, claim(shared, batch - jobs.len())).await
            else {
                break;
            };
            jobs.extend(claimed);
        }
        if jobs.is_empty() {
            if runner_done {
                break;
            }
            tokio::select! {
                _ = runner_stopped.changed() => {}
                _ = shared.ack_wakeup.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
            continue;
        }
        let claims: Vec<(i64, String)> =
            jobs.iter().map(|j| (j.id, j.lease_owner.clone())).collect();
        if tokio::time::timeout_at(deadline, send_all(shared, jobs))
            .await
            .is_err()
        {
            if let Err(e) = shared.store.release_acks(&claims).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "releasing unanswered acknowledgements failed; their lease runs out instead"
                );
            }
            break;
        }
        sent += claims.len();
    }
    // What the runner handed over and this flush did not take keeps its lease otherwise.
    let (unsent, _) = shared.store.take_handed_acks(usize::MAX);
    if !unsent.is_empty() {
        let claims: Vec<(i64, &str)> = unsent
            .iter()
            .map(|j| (j.id, j.lease_owner.as_str()))
            .collect();
        if let Err(e) = shared.store.release_acks(&claims).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "releasing handed-over acknowledgements failed; their lease runs out instead"
            );
        }
    }
    let left = shared.store.unsent_ack_count().await.unwrap_or_else(|e| {
        tracing::warn!(
            error = format!("{e:#}"),
            "counting queued acknowledgements failed"
        );
        -1
    });
    tracing::info!(
        flushed = sent,
        left_queued = left,
        "acknowledgement sender stopped"
    );
}

/// Claims the due acknowledgements, `limit` at most.
async fn claim(shared: &Shared, limit: usize) -> Vec<AckJob> {
    let cfg = &shared.config.acks;
    shared
        .store
        .claim_acks(
            shared.clock.now_ms(),
            i64::try_from(limit).unwrap_or(i64::MAX),
            cfg.lease_ms as i64,
        )
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = format!("{e:#}"), "claiming acknowledgements failed");
            Vec::new()
        })
}

/// Most acknowledgements the registry takes in one call (`AcknowledgeRequest` in
/// `registry.proto`).
const MAX_ACKS_PER_CALL: usize = 500;

/// Most encoded bytes of acknowledgements in one call: the registry refuses a message over
/// `MAX_MESSAGE_BYTES` (4 MiB) whole, and an acknowledgement may carry 9 KB of text and a
/// 64 KiB certificate, so `acks.batch_size` of them may not fit. A quarter is left for
/// framing.
const MAX_BYTES_PER_CALL: usize = dsrelay_runtime::server::MAX_MESSAGE_BYTES / 4 * 3;

/// Sends claimed acknowledgements, one batch per controller at once; a controller's batch
/// goes in as many calls as it needs to stay within the registry's limits ([`calls`]), so a
/// batch too large for one call is never refused whole and retried as it is forever.
async fn send_all(shared: &Shared, jobs: Vec<AckJob>) {
    let mut by_controller: BTreeMap<String, Vec<AckJob>> = BTreeMap::new();
    for j in jobs {
        by_controller
            .entry(j.controller.clone())
            .or_default()
            .push(j);
    }
    let sends = by_controller
        .into_iter()
        .map(|(controller, jobs)| async move {
            for call in calls(jobs, |j| j.ack.encoded_len()) {
                send(shared, controller.clone(), call).await;
            }
        });
    futures::future::join_all(sends).await;
}

/// `jobs` split, in order, into calls of at most [`MAX_ACKS_PER_CALL`] acknowledgements and
/// [`MAX_BYTES_PER_CALL`] bytes (`size` of each, with its field's framing); one larger than
/// that alone goes in a call of its own.
fn calls<J>(jobs: Vec<J>, size: impl Fn(&J) -> usize) -> Vec<Vec<J>> {
    let mut out: Vec<Vec<J>> = Vec::new();
    let mut bytes = 0;
    for j in jobs {
        // A length-delimited field: its tag, its length (at most 5 bytes), its bytes.
        let framed = size(&j) + 6;
        match out.last_mut() {
            Some(call)
                if call.len() < MAX_ACKS_PER_CALL && bytes + framed <= MAX_BYTES_PER_CALL =>
            {
                call.push(j);
                bytes += framed;
            }
            _ => {
                out.push(vec![j]);
                bytes = framed;
            }
        }
    }
    out
}

#[tracing::instrument(skip_all, fields(controller = %controller, count = jobs.len()))]
async fn send(shared: &Shared, controller: String, jobs: Vec<AckJob>) {
    let cfg = &shared.config.acks;
    let result = match shared.registries.get(&controller) {
        Some(client) => {
            let mut req = tonic::Request::new(AcknowledgeRequest {
                acknowledgements: jobs.iter().map(|j| j.ack.clone()).collect(),
            });
            req.set_timeout(Duration::from_millis(cfg.call_timeout_ms));
            client
                .clone()
                .acknowledge(req)
                .await
                .map_err(|s| Said::status(&s))
        }
        None => Err(Said::ours(format!(
            "controller {controller} is no longer configured"
        ))),
    };
    match result {
        Ok(resp) => {
            let r = resp.into_inner();
            tracing::debug!(
                applied = r.applied,
                duplicates = r.duplicates,
                "acknowledged"
            );
            let now = shared.clock.now_ms();
            // A rejected acknowledgement is not stored by the registry: it stays queued and is
            // retried with backoff, while the others of the batch are done.
            let mut rejected = BTreeMap::new();
            for x in &r.rejected {
                rejected.insert(x.index as usize, describe_rejection(x));
            }
            let ids: Vec<i64> = jobs
                .iter()
                .enumerate()
                .filter(|(i, _)| !rejected.contains_key(i))
                .map(|(_, j)| j.id)
                .collect();
            for (i, said) in &rejected {
                let Some(j) = jobs.get(*i) else { continue };
                let attempt = u32::try_from(j.attempts + 1).unwrap_or(u32::MAX);
                let next_at = now + cfg.backoff.delay(attempt).as_millis() as i64;
                let error = said.logged(shared.log_key());
                match shared
                    .store
                    .ack_rejected(
                        (j.id, &j.lease_owner),
                        next_at,
                        &said.full(),
                        now,
                        cfg.max_rejections,
                    )
                    .await
                {
                    Ok(true) => tracing::error!(
                        request_id = %j.ack.request_id,
                        subprocessor = %j.ack.subprocessor,
                        sequence = j.ack.sequence,
                        %error,
                        "acknowledgement dead-lettered after repeated rejection; `dsrctl tasks \
                         dead-letters` shows the registry's answer"
                    ),
                    Ok(false) => tracing::warn!(
                        request_id = %j.ack.request_id,
                        subprocessor = %j.ack.subprocessor,
                        sequence = j.ack.sequence,
                        %error,
                        "acknowledgement rejected; will retry (its outbox row's last_error holds \
                         the registry's answer)"
                    ),
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "recording an acknowledgement rejection failed"
                    ),
                }
            }
            if let Err(e) = shared.store.acks_sent(&ids, now).await {
                // They are sent again after the lease; the registry counts them as duplicates.
                tracing::error!(
                    error = format!("{e:#}"),
                    "recording sent acknowledgements failed"
                );
            }
        }
        Err(error) => {
            let now = shared.clock.now_ms();
            let retries: Vec<(i64, &str, i64)> = jobs
                .iter()
                .map(|j| {
                    let attempt = u32::try_from(j.attempts + 1).unwrap_or(u32::MAX);
                    let next_at = now + cfg.backoff.delay(attempt).as_millis() as i64;
                    (j.id, j.lease_owner.as_str(), next_at)
                })
                .collect();
            tracing::warn!(
                error = %error.logged(shared.log_key()),
                "sending acknowledgements failed; will retry (their outbox rows' last_error \
                 holds the answer)"
            );
            if let Err(e) = shared.store.acks_failed(&retries, &error.full()).await {
                tracing::error!(
                    error = format!("{e:#}"),
                    "recording an acknowledgement failure failed"
                );
            }
        }
    }
}

/// A rejection as one line for the outbox: the code, quoting the registry's message and each
/// field with its rule (the registry's words, which a log line shows only as their hash).
fn describe_rejection(x: &RejectedAcknowledgement) -> Said {
    let code = tonic::Code::from_i32(x.code);
    let mut s = x.message.clone();
    for v in &x.violations {
        s.push_str(&format!("; {}: {}", v.field, v.rule));
    }
    Said::quoting(format!("{code:?}"), s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_in_calls_within_the_registrys_limits() {
        // 1,200 acknowledgements of 9 KB (the most text one may carry): 10.8 MB in all.
        let split = calls((0..1200).collect::<Vec<i32>>(), |_| 9 * 1024);
        let sizes: Vec<usize> = split.iter().map(Vec::len).collect();
        assert!(sizes.len() >= 4, "{sizes:?}");
        for call in &split {
            assert!(call.len() <= MAX_ACKS_PER_CALL, "{sizes:?}");
            assert!(
                call.len() * (9 * 1024 + 6) <= MAX_BYTES_PER_CALL,
                "{sizes:?}"
            );
        }
        // Every one, once, in order.
        let flat: Vec<i32> = split.into_iter().flatten().collect();
        assert_eq!(flat, (0..1200).collect::<Vec<_>>());

        // Small ones: only the count limits a call.
        assert_eq!(calls_of(1200, 200), [500, 500, 200]);
        // One over the byte limit goes alone, between the others.
        let big = MAX_BYTES_PER_CALL + 1;
        let split = calls(vec![10usize, big, 10], |n| *n);
        assert_eq!(split, [vec![10], vec![big], vec![10]]);
    }

    fn calls_of(n: usize, size: usize) -> Vec<usize> {
        calls((0..n).collect::<Vec<_>>(), |_| size)
            .iter()
            .map(Vec::len)
            .collect()
    }
}
