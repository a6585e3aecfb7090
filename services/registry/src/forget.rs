//! The relay forgets: `forget_after_days` after a request finished (COMPLETED, FAILED or
//! CANCELLED), its raw identities, body and the free text kept with it are removed from the
//! store, leaving the keyed identity hashes for the audit trail and deduplication. The
//! window is the time in which a dispute about the request can still be answered from what
//! was asked.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;

use crate::app::Shared;

/// One day in milliseconds.
const DAY_MS: i64 = 86_400_000;

/// Requests forgotten per store round trip of a sweep.
const BATCH: i64 = 100;

/// The latest finish time (ms) a request may have to be forgotten at `now`.
pub(crate) fn cutoff(now: i64, after_days: u32) -> i64 {
    now.saturating_sub(i64::from(after_days) * DAY_MS)
}

/// Forgets requests past their window, recording an event for each, until `stop` turns
/// true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.config.forget_sweep_interval_ms);
    // Whether the SQLite write-ahead log may still hold forgotten bytes.
    let mut log_dirty = false;
    loop {
        if *stop.borrow() {
            return;
        }
        match sweep(&shared).await {
            Ok(forgotten) => log_dirty |= forgotten > 0,
            Err(e) => {
                // Some requests may have been forgotten before the error.
                log_dirty = true;
                tracing::error!(error = format!("{e:#}"), "forgetting requests failed");
            }
        }
        if log_dirty {
            match shared.store.scrub_log().await {
                Ok(done) => log_dirty = !done,
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "emptying the write-ahead log failed"
                ),
            }
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One sweep: every finished request past its window is forgotten; returns how many.
async fn sweep(shared: &Shared) -> Result<usize> {
    let days = shared.config.forget_after_days;
    let mut forgotten = 0usize;
    // Each page starts after the last one, so requests that cannot be forgotten (logged
    // below) do not come back first at every page and hold back those behind them.
    let mut after = None;
    loop {
        let now = shared.clock.now_ms();
        let cutoff = cutoff(now, days);
        let due = shared
            .store
            .requests_to_forget(cutoff, after.as_ref(), BATCH)
            .await?;
        let Some(last) = due.last().cloned() else {
            break;
        };
        for position in &due {
            let request_id = &position.id;
            let message = format!("identities forgotten {days} day(s) after the request finished");
            // One request that cannot be forgotten is logged and tried again at the next
            // sweep; it does not hold back the ones behind it.
            match shared
                .store
                .forget_request(request_id, cutoff, now, &message)
                .await
            {
                Ok(true) => {
                    forgotten += 1;
                    tracing::info!(%request_id, "identities forgotten");
                    shared.publish(request_id);
                }
                Ok(false) => {}
                Err(e) => tracing::error!(
                    %request_id,
                    error = format!("{e:#}"),
                    "forgetting a request failed; trying again at the next sweep"
                ),
            }
        }
        if due.len() < BATCH as usize {
            break;
        }
        after = Some(last);
    }
    Ok(forgotten)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_whole_days_back_from_now() {
        let now = 100 * DAY_MS;
        assert_eq!(cutoff(now, 30), 70 * DAY_MS);
        assert_eq!(cutoff(now, 0), now);
        assert_eq!(cutoff(0, u32::MAX), -i64::from(u32::MAX) * DAY_MS);
        assert_eq!(cutoff(i64::MIN, 1), i64::MIN);
    }
}
