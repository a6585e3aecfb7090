//! The processor forgets: `forget_after_days` after the last task of a request reached a
//! final state (COMPLETED, NOT_FOUND, REFUSED, FAILED or CANCELLED; none RETAINED), with
//! every acknowledgement and upload sent (or the acknowledgement dead-lettered, waiting for
//! an operator), its raw identities, body, notes and export files are removed, and a legal
//! basis and a TRANSFER's recipient are left only as their keyed hash. Keyed hashes of the
//! identities (HMAC-SHA256 under the processor's `identity_hash_key`) stay, so an operator
//! holding the key and an address can still show what was done for that subject.
//!
//! The same worker removes, at every sweep, the export files a retired upload left behind
//! (see `remove_retired_exports`): an export is kept only until its upload is retired; and,
//! once at start, the empty export folders earlier versions left behind
//! (`remove_empty_export_folders`). At every sweep too, it has the holders of contract ends
//! that will not go on discard what their exports recorded there (`crate::holder_discard`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::DeliverRequest;
use dsrelay_runtime::identity::keyed_hash;
use tokio::sync::watch;

use crate::app::Shared;
use crate::store::{Forgettable, TaskKey};

/// One day in milliseconds.
const DAY_MS: i64 = 86_400_000;

/// Requests forgotten per store round trip of a sweep.
const BATCH: i64 = 100;

/// The latest time (ms) a request's tasks may have reached their final state to be
/// forgotten at `now`.
pub(crate) fn cutoff(now: i64, after_days: u32) -> i64 {
    now.saturating_sub(i64::from(after_days) * DAY_MS)
}

/// The keyed hashes of the identities in an encoded DeliverRequest, as a JSON array; an
/// empty array when there is no body or it does not decode (nothing raw is kept either way).
pub(crate) fn identity_hashes(key: &[u8], body: Option<&[u8]>) -> Result<String> {
    let hashes: Vec<String> = body
        .and_then(|b| DeliverRequest::decode(b).ok())
        .map(|d| d.identities.iter().map(|i| keyed_hash(key, i)).collect())
        .unwrap_or_default();
    serde_json::to_string(&hashes).context("encoding identity hashes")
}

/// Forgets requests past their window until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.config.forget_sweep_interval_ms);
    // Whether the SQLite write-ahead log may still hold forgotten bytes.
    let mut log_dirty = false;
    remove_empty_export_folders(&shared).await;
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = remove_retired_exports(&shared).await {
            tracing::error!(
                error = format!("{e:#}"),
                "removing the files of retired exports failed; trying again at the next sweep"
            );
        }
        if let Err(e) = crate::holder_discard::sweep(&shared).await {
            tracing::error!(
                error = format!("{e:#}"),
                "having holders discard what ended contract ends recorded failed; trying \
                 again at the next sweep"
            );
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

/// Removes the empty request and controller folders that earlier versions left in the data
/// folder after removing their exports' files (this version removes them with the files):
/// no sweep passes them again, since their exports are recorded removed. Once, at start.
async fn remove_empty_export_folders(shared: &Shared) {
    let data_dir = shared.config.data_dir.clone();
    let removed =
        tokio::task::spawn_blocking(move || crate::exports::remove_empty_folders(&data_dir))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
    match removed {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "empty export folders removed"),
        Err(e) => tracing::warn!(error = %e, "removing empty export folders failed"),
    }
}

/// Removes the folder of `key`'s export, which a step just ended without a delivery
/// ([`crate::task_machine::Transition::discard_export`]), and records it removed. A failure
/// is logged: the step recorded the export as an upload retired unsent, so the next sweep
/// ([`remove_retired_exports`]) tries again.
pub(crate) async fn remove_discarded_export(shared: &Shared, key: &TaskKey) {
    let failed = "removing an undelivered export failed; the next sweep tries again";
    if let Err(e) = remove_export(shared, key, failed).await {
        tracing::warn!(
            error = format!("{e:#}"),
            "recording an undelivered export removed failed; the next sweep does"
        );
    }
}

/// Removes the folder of `key`'s export and records it removed: `Ok(true)`. `Ok(false)`:
/// the folder would not go, which is logged with `failed` and left unrecorded, so that the
/// sweep of retired exports comes back to it; an error: recording the removal failed.
async fn remove_export(shared: &Shared, key: &TaskKey, failed: &str) -> Result<bool> {
    let dir = crate::exports::task_dir(&shared.config.data_dir, key);
    if let Err(e) = crate::exports::remove(&dir).await {
        tracing::warn!(error = %e, dir = %dir.display(), "{failed}");
        return Ok(false);
    }
    shared
        .store
        .export_files_removed(key, shared.clock.now_ms())
        .await?;
    Ok(true)
}

/// Removes what retired uploads left in the data folder: an export is kept only until its
/// upload is retired (delivered, undeliverable, given up, or its task ended otherwise; an
/// export task that ended without a delivery is recorded as an upload retired unsent). The
/// uploader removes a delivered export's files at once, and the runner an undelivered one's;
/// this catches a crash between the retirement and the removal, and the retirements that
/// delivered nothing, at the latest one sweep interval after a start.
async fn remove_retired_exports(shared: &Shared) -> Result<()> {
    // Those that could not be removed stay first in the order; skipped, so that they do not
    // hold back the ones behind them.
    let mut failed: i64 = 0;
    loop {
        let keys = shared.store.retired_exports_left(BATCH, failed).await?;
        let mut removed = 0;
        for key in &keys {
            // Retried meanwhile: the folder is its new export's now.
            if !shared.store.export_still_retired(key).await? {
                continue;
            }
            if remove_export(shared, key, "removing a retired export's files failed").await? {
                removed += 1;
            } else {
                failed += 1;
            }
        }
        if removed > 0 {
            tracing::debug!(removed, "retired exports' files removed");
        }
        if keys.len() < BATCH as usize {
            return Ok(());
        }
    }
}

/// One sweep: every request past its window is forgotten; returns how many.
async fn sweep(shared: &Shared) -> Result<usize> {
    let mut forgotten = 0usize;
    // Each batch goes on after the last request of the one before, in the order they are
    // listed in, whatever became of it: one that could not be forgotten is still listed,
    // and would otherwise fill every batch.
    let mut after: Option<Forgettable> = None;
    loop {
        let now = shared.clock.now_ms();
        let cutoff = cutoff(now, shared.config.forget_after_days);
        let mut due = shared
            .store
            .requests_to_forget(cutoff, after.as_ref(), BATCH)
            .await?;
        for r in &due {
            // One request that cannot be forgotten (a folder that will not go) is logged and
            // tried again at the next sweep; it does not hold back the ones behind it.
            match forget(shared, r, cutoff, now).await {
                Ok(true) => forgotten += 1,
                Ok(false) => {}
                Err(e) => tracing::error!(
                    request_id = %r.request_id,
                    controller = %r.controller,
                    error = format!("{e:#}"),
                    "forgetting a request failed; trying again at the next sweep"
                ),
            }
        }
        if due.len() < BATCH as usize {
            break;
        }
        after = due.pop();
    }
    Ok(forgotten)
}

/// Forgets one request: its export files first (a crash in between deletes them again at
/// the next sweep, and the store never says forgotten while files remain), then its rows.
async fn forget(shared: &Shared, r: &Forgettable, cutoff: i64, now: i64) -> Result<bool> {
    let data_dir = &shared.config.data_dir;
    crate::exports::remove_request(data_dir, &r.controller, &r.request_id)
        .await
        .with_context(|| {
            let dir = crate::exports::request_dir(data_dir, &r.controller, &r.request_id);
            format!("deleting exports in {}", dir.display())
        })?;
    let key = shared.config.identity_hash_key.as_bytes();
    let hashes = identity_hashes(key, r.body.as_deref())?;
    let done = shared.store.forget_request(r, &hashes, cutoff, now).await?;
    if done {
        tracing::info!(
            request_id = %r.request_id,
            controller = %r.controller,
            "identities forgotten"
        );
    }
    Ok(done)
}

#[cfg(test)]
#[path = "forget_tests.rs"]
mod forget_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use dsrelay_proto::v1::{IdentityEncoding, IdentityType, SubjectIdentity};

    #[test]
    fn the_window_counts_whole_days_back_from_now() {
        assert_eq!(cutoff(40 * DAY_MS, 30), 10 * DAY_MS);
        assert_eq!(cutoff(5, 0), 5);
        assert_eq!(cutoff(i64::MIN, 1), i64::MIN);
    }

    #[test]
    fn only_keyed_hashes_of_the_identities_are_kept() {
        let email = "Forget.Me@Example.org";
        let body = DeliverRequest {
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: email.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let kept = identity_hashes(b"k1", Some(&body)).unwrap();
        let hashes: Vec<String> = serde_json::from_str(&kept).unwrap();
        assert_eq!(hashes.len(), 1);
        assert_eq!(hashes[0].len(), 64);
        assert!(!kept.to_lowercase().contains("example"));
        // Keyed: another key gives another hash.
        assert_ne!(identity_hashes(b"k2", Some(&body)).unwrap(), kept);
        assert_eq!(identity_hashes(b"k1", None).unwrap(), "[]");
        assert_eq!(identity_hashes(b"k1", Some(b"\xff\xff")).unwrap(), "[]");
    }
}
