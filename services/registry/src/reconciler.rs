//! Asks processors for status when a request has been quiet too long, so a lost
//! acknowledgement (or a processor outbox that is stuck) cannot leave a request hanging. A
//! check that finds nothing new backs off (`reconcile.max_backoff_ms`), so requests that
//! wait for months cost a call a day, not one every `ack_timeout_ms`. A check that gets no
//! answer puts its request behind the other quiet ones, and when the processor is down or too
//! slow (UNAVAILABLE, DEADLINE_EXCEEDED) the round skips the rest of its requests, so
//! requests that cannot be checked never keep the others from being checked.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{GetStatusRequest, ListSubprocessorsRequest};
use dsrelay_runtime::log_text::Said;
use tokio::sync::watch;

use crate::app::Shared;
use crate::store::ChainReport;

/// Asks every processor for its subprocessor list and stores the answers, so the controller
/// sees its whole chain. Runs at start and every `chain_interval_ms` until `stop`.
pub(crate) async fn refresh_chain(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.config.reconcile.chain_interval_ms);
    loop {
        for (name, client) in &shared.processors {
            let mut req = tonic::Request::new(ListSubprocessorsRequest {});
            req.set_timeout(Duration::from_millis(
                shared.config.delivery.call_timeout_ms,
            ));
            let mut client = client.clone();
            let answer = tokio::select! {
                a = client.list_subprocessors(req) => a,
                () = stopped(&mut stop) => return,
            };
            let report = match answer {
                Ok(r) => ChainReport::Listed(r.into_inner().encode_to_vec()),
                Err(s) => {
                    let said = Said::status(&s);
                    tracing::warn!(
                        processor = %name,
                        error = %said.logged(&shared.identity_hash_key),
                        "asking for subprocessors failed; `dsrctl chain` shows its answer"
                    );
                    ChainReport::Unanswered(said.full())
                }
            };
            if let Err(e) = shared
                .store
                .record_chain(name, report, shared.clock.now_ms())
                .await
            {
                tracing::error!(error = format!("{e:#}"), "recording subprocessors failed");
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Runs until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.config.reconcile.clone();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(cfg.interval_ms)) => {}
        }
        let now = shared.clock.now_ms();
        let quiet = match shared
            .store
            .quiet_requests(now - cfg.ack_timeout_ms as i64, 100)
            .await
        {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "finding quiet requests failed");
                continue;
            }
        };
        // Processors down or too slow this round: their other requests wait for the next
        // round instead of a timeout each.
        let mut unanswered: BTreeSet<String> = BTreeSet::new();
        for (request_id, processor) in quiet {
            let client = match shared.processors.get(&processor) {
                Some(client) if !unanswered.contains(&processor) => client,
                _ => {
                    postpone(&shared, &request_id).await;
                    continue;
                }
            };
            let mut req = tonic::Request::new(GetStatusRequest {
                request_id: request_id.clone(),
            });
            req.set_timeout(Duration::from_millis(
                shared.config.delivery.call_timeout_ms,
            ));
            // A processor slow to answer does not hold the registry's shutdown; the question
            // is asked again after the restart.
            let mut client = client.clone();
            let answer = tokio::select! {
                a = client.get_status(req) => a,
                () = stopped(&mut stop) => return,
            };
            match answer {
                Ok(resp) => {
                    let tasks = crate::api::acknowledgement::well_formed_reports(
                        &processor,
                        &request_id,
                        resp.into_inner().tasks,
                    );
                    match shared
                        .store
                        .reconcile(
                            &request_id,
                            &processor,
                            &tasks,
                            shared.clock.now_ms(),
                            cfg.max_backoff_ms as i64,
                        )
                        .await
                    {
                        Ok(changed) => {
                            if changed > 0 {
                                tracing::info!(%request_id, %processor, changed, "reconciled late acknowledgements");
                                shared.publish(&request_id);
                            }
                        }
                        Err(e) => {
                            tracing::error!(%request_id, error = format!("{e:#}"), "reconciling failed")
                        }
                    }
                }
                Err(status) => {
                    // The message is not kept anywhere: the code is what decides what follows.
                    tracing::warn!(
                        %request_id,
                        %processor,
                        error = %Said::status(&status).logged(&shared.identity_hash_key),
                        "status check failed"
                    );
                    // Down or too slow, not an answer about this request alone.
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) {
                        unanswered.insert(processor);
                    }
                    postpone(&shared, &request_id).await;
                }
            }
        }
    }
}

/// Puts `request_id` behind the other quiet requests after a status check that got no
/// answer; a store failure is logged (the request is then asked about first again).
async fn postpone(shared: &Shared, request_id: &str) {
    if let Err(e) = shared
        .store
        .status_check_unanswered(request_id, shared.clock.now_ms())
        .await
    {
        tracing::error!(%request_id, error = format!("{e:#}"), "postponing a status check failed");
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
