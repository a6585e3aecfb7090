//! A contract end's export has its holder record what it returned, for the erasure after the
//! return (the SQL connector: the keys of the returned rows, in its table beside the
//! receipts). A contract end that will not go on never gets there: CANCELLED after its
//! export began, or FAILED and its request forgotten (no operator can retry it then). The
//! store marks such a task when it records that state or forgets its request
//! ([`Store::holder_discards_due`](crate::store::Store::holder_discards_due) reads the
//! marks), and the forget worker's sweep calls [`sweep`]: each marked task's connector is
//! asked to discard what the export recorded ([`Connector::discard_bulk`], under the
//! export's job id), and the mark is cleared once the call succeeded. A cancelled task's
//! call waits a task lease (`tasks.lease_ms`) past its mark, by when a runner's export call
//! the cancellation cut off has ended and committed what it recorded. A failed call is
//! logged at WARN with the subprocessor and tried again after the tasks' backoff, which grows
//! with each failure; a transient failure marks the holder unreachable for the tasks too
//! ([`crate::breaker`]), and while it is marked the call waits, uncounted, as its tasks do.
//! The mark is in the store, so a restart in between loses no call; two replicas' sweeps
//! may both make one, which finds nothing left the second time.

use std::time::Duration;

use anyhow::Result;
use dsrelay_connectors::{BulkOp, Connector, ConnectorError};

use crate::app::Shared;
use crate::store::HolderDiscard;

/// Marked tasks read per store round trip of a sweep.
const BATCH: i64 = 100;

/// Calls the holder of every marked task whose call is due; answers how many discarded.
/// Each call clears or moves its task's mark, so a batch is never read twice in a sweep.
pub(crate) async fn sweep(shared: &Shared) -> Result<usize> {
    let mut discarded = 0;
    loop {
        let settle_ms = i64::try_from(shared.config.tasks.lease_ms).unwrap_or(i64::MAX);
        let due = (shared.store)
            .holder_discards_due(shared.clock.now_ms(), settle_ms, BATCH)
            .await?;
        for d in &due {
            discarded += usize::from(discard(shared, d).await?);
        }
        if due.len() < BATCH as usize {
            return Ok(discarded);
        }
    }
}

/// One task's call: true when the holder discarded and the mark was cleared.
async fn discard(shared: &Shared, d: &HolderDiscard) -> Result<bool> {
    let key = &d.key;
    let holder = &key.subprocessor;
    let cfg = &shared.config.tasks;
    let now = shared.clock.now_ms();
    let retry_at = |error: Option<&ConnectorError>| {
        let attempt = u32::try_from(d.failures.saturating_add(1)).unwrap_or(u32::MAX);
        let backoff = cfg.backoff.delay(attempt).as_millis() as i64;
        let asked = error.and_then(ConnectorError::retry_after_ms).unwrap_or(0);
        now.saturating_add(backoff.max(i64::try_from(asked).unwrap_or(i64::MAX)))
    };
    let Some(connector) = shared.connectors.get(holder) else {
        let at = retry_at(None);
        tracing::warn!(
            subprocessor = %holder,
            request_id = %key.request_id,
            controller = %key.controller,
            retry_in_ms = at - now,
            "what a contract end that will not go on recorded at its holder cannot be \
             discarded: the subprocessor is no longer configured"
        );
        shared.store.holder_discard_later(d, at, true).await?;
        return Ok(false);
    };
    let (probe_ms, recheck_ms) = (cfg.lease_ms as i64, cfg.poll_interval_ms as i64);
    if let Some(down) = (shared.unavailable_until).admit(holder, key, now, probe_ms, recheck_ms) {
        shared
            .store
            .holder_discard_later(d, down.until, false)
            .await?;
        return Ok(false);
    }
    let job_id = crate::runner::bulk_job_id(key, BulkOp::Export);
    let result = call(connector.as_ref(), &key.controller, &job_id, cfg.lease_ms).await;
    match result {
        Ok(()) => {
            shared.unavailable_until.answered(holder);
            let cleared = shared.store.holder_discarded(d).await?;
            tracing::info!(
                subprocessor = %holder,
                request_id = %key.request_id,
                controller = %key.controller,
                "what a contract end that will not go on recorded at its holder was discarded"
            );
            Ok(cleared)
        }
        Err(e) => {
            let at = retry_at(Some(&e));
            if e.is_transient() {
                (shared.unavailable_until).failed(holder, now, at, &e.to_string());
            } else {
                shared.unavailable_until.answered(holder);
            }
            tracing::warn!(
                subprocessor = %holder,
                request_id = %key.request_id,
                controller = %key.controller,
                error = ?e.logged(),
                failures = d.failures + 1,
                retry_in_ms = at - now,
                "discarding what a contract end that will not go on recorded at its holder \
                 failed; trying again later"
            );
            shared.store.holder_discard_later(d, at, true).await?;
            Ok(false)
        }
    }
}

/// The connector's [`Connector::discard_bulk`], given up as a transient failure after
/// `limit_ms`, so that a holder that never answers does not hold the forget worker.
async fn call(
    connector: &dyn Connector,
    controller: &str,
    job_id: &str,
    limit_ms: u64,
) -> Result<(), ConnectorError> {
    let limit = Duration::from_millis(limit_ms);
    match tokio::time::timeout(limit, connector.discard_bulk(controller, job_id)).await {
        Ok(result) => result,
        Err(_) => Err(ConnectorError::Transient(format!(
            "the holder did not answer within {limit_ms} ms"
        ))),
    }
}

#[cfg(test)]
#[path = "holder_discard_tests.rs"]
mod holder_discard_tests;
