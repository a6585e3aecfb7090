//! Return-of-data packages at the registry: where their files are kept, how a stored file is
//! checked, what `manifest.json` says, and their expiry.
//!
//! # Layout
//! - `store`: the [`PackageStore`] trait the bytes go through (appends through an
//!   [`Appender`], durable once synced), and [`FolderStore`].
//! - `direct`: the folder store's files written and read with `O_DIRECT`.
//! - `manifest`: the manifest's deterministic JSON.
//! - this module: `Packages` (the store, the retention and the checkpoint interval), file
//!   keys, the digest check of a resumed file, and the expiry worker.
//!
//! The gRPC handlers are `crate::api::packages`; what was stored is recorded by
//! `crate::store` (`packages`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_runtime::export_files::path_component;
use dsrelay_runtime::resumable_hash::ResumableSha256;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::app::Shared;
use crate::store::{PackageFile, Store};

mod direct;
pub(crate) mod manifest;
#[cfg(test)]
mod resume_tests;
mod store;
#[cfg(test)]
mod upload_limit_tests;

pub use store::{Appender, FolderStore, PackageStore};

/// Largest chunk of a file in one message, either way: 1 MiB.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// One day in milliseconds.
const DAY_MS: i64 = 86_400_000;

/// Bytes an upload appends between two checkpoints of its digest (64 MiB): the most a
/// resumed file's check reads, within the call that resumes it.
pub(crate) const CHECKPOINT_EVERY: u64 = 64 * 1024 * 1024;

/// The package store and how long packages are kept.
#[derive(Clone)]
pub(crate) struct Packages {
    /// Where the bytes are.
    pub store: Arc<dyn PackageStore>,
    /// How long a package is kept after its request finished (ms).
    pub ttl_ms: i64,
    /// Bytes an upload appends between two checkpoints ([`CHECKPOINT_EVERY`]; tests set less
    /// through `BUILD_HOOK`).
    pub checkpoint_every: u64,
}

#[cfg(test)]
tokio::task_local! {
    /// Test hook: what a registry built within its scope does to its [`Packages`] (wrap the
    /// store to count what is read, shorten the checkpoint interval).
    pub(crate) static BUILD_HOOK: Arc<dyn Fn(Packages) -> Packages + Send + Sync>;
}

impl Packages {
    /// Packages in `store`, kept `ttl_days` after their request finished.
    pub(crate) fn new(store: Arc<dyn PackageStore>, ttl_days: u32) -> Self {
        Self {
            store,
            ttl_ms: i64::from(ttl_days) * DAY_MS,
            checkpoint_every: CHECKPOINT_EVERY,
        }
        .hooked()
    }

    /// These packages as `BUILD_HOOK` makes them, in a test within its scope.
    fn hooked(self) -> Self {
        #[cfg(test)]
        if let Ok(hooked) = BUILD_HOOK.try_with(|hook| hook(self.clone())) {
            return hooked;
        }
        self
    }

    /// The most bytes of a file stored past its checkpoint that its check reads: an upload
    /// checkpoints before a chunk that would take it past the interval, and a chunk may be
    /// longer than an interval set short.
    pub(crate) fn max_unchecked(&self) -> u64 {
        self.checkpoint_every.max(MAX_CHUNK as u64)
    }

    /// Where the check of a file with `stored` bytes stored takes up, given its recorded
    /// checkpoint (bytes, midstate): there, or at the start when it has none that fits
    /// (none recorded, not readable, or past what is stored, its bytes since dropped).
    /// `None` when more than [`Packages::max_unchecked`] bytes would be read: a file stored
    /// before checkpoints were recorded, which is sent again rather than read whole within a
    /// call's time limit.
    pub(crate) fn resume_point(
        &self,
        checkpoint: Option<(u64, Vec<u8>)>,
        stored: u64,
    ) -> Option<ResumableSha256> {
        let from = checkpoint
            .filter(|(bytes, _)| *bytes <= stored)
            .and_then(|(bytes, state)| ResumableSha256::resume(&state).filter(|h| h.len() == bytes))
            .unwrap_or_default();
        (stored - from.len() <= self.max_unchecked()).then_some(from)
    }

    /// `from`, having hashed the stored bytes of `key` from its length up to `stored`: reads
    /// only those ([`PackageStore::open_at`]).
    pub(crate) async fn hash_tail(
        &self,
        key: &str,
        mut from: ResumableSha256,
        stored: u64,
    ) -> Result<ResumableSha256> {
        let start = from.len();
        let mut reader = self
            .store
            .open_at(key, start)
            .await
            .context("opening a stored file")?
            .take(stored.saturating_sub(start));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .context("reading a stored file")?;
            if n == 0 {
                break;
            }
            from.update(&buf[..n]);
        }
        anyhow::ensure!(
            from.len() == stored,
            "the stored file {key} ended at byte {} of the {stored} counted",
            from.len()
        );
        Ok(from)
    }

    /// When a package whose request finished at `finished_at` expires (ms).
    pub(crate) fn expires_at(&self, finished_at: i64) -> i64 {
        finished_at.saturating_add(self.ttl_ms)
    }
}

/// The store key of a request's package folder.
pub(crate) fn package_key(request_id: &str) -> String {
    path_component(request_id)
}

/// The store key of one file of a package.
pub(crate) fn file_key(f: &PackageFile) -> String {
    part_file_key(&f.request_id, &f.processor, &f.subprocessor, &f.name)
}

/// [`file_key`] of the file `name` of `processor`'s part of `subprocessor` in request
/// `request_id`'s package.
fn part_file_key(request_id: &str, processor: &str, subprocessor: &str, name: &str) -> String {
    format!(
        "{}/{}/{}/{}",
        package_key(request_id),
        path_component(processor),
        path_component(subprocessor),
        path_component(name)
    )
}

/// Deletes packages `package_ttl_days` after their request finished, recording an event for
/// each, and the files streamed for parts whose task was cancelled, until `stop` turns true.
pub(crate) async fn expire(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.config.package_sweep_interval_ms);
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = expire_due(&shared).await {
            tracing::error!(error = format!("{e:#}"), "expiring packages failed");
        }
        if let Err(e) = drop_cancelled_parts(&shared.store, &shared.packages).await {
            tracing::error!(error = format!("{e:#}"), "deleting cancelled parts failed");
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One sweep: every package past its retention is deleted, then recorded as expired.
async fn expire_due(shared: &Shared) -> Result<()> {
    let packages = &shared.packages;
    let now = shared.clock.now_ms();
    let due = shared
        .store
        .packages_to_expire(now.saturating_sub(packages.ttl_ms), 100)
        .await?;
    for request_id in due {
        // One package that cannot be deleted is logged and tried again at the next sweep; it
        // does not hold back the ones behind it.
        match expire_one(shared, &request_id, now).await {
            Ok(()) => {
                tracing::info!(%request_id, "package expired and deleted");
                shared.publish(&request_id);
            }
            Err(e) => tracing::error!(
                %request_id,
                error = format!("{e:#}"),
                "expiring a package failed; trying again at the next sweep"
            ),
        }
    }
    Ok(())
}

/// Deletes the files streamed for parts whose task ended CANCELLED before the part was
/// declared ([`Store::cancelled_parts`]): such a part never comes, so they are in no
/// manifest, and would otherwise take space until the package expires. Answers how many
/// files were deleted. Each part's rows go only once its bytes are removed
/// ([`Store::drop_cancelled_part`]), so a crash or a failed removal leaves them for the next
/// sweep. Bytes that a stream registered before the drop appends after it are not listed by
/// any row; the package's expiry deletes them with the rest of its folder.
pub(crate) async fn drop_cancelled_parts(store: &Store, packages: &Packages) -> Result<usize> {
    let mut dropped = 0;
    for (request_id, processor, subprocessor) in store.cancelled_parts(100).await? {
        let names = store
            .drop_cancelled_part(&request_id, &processor, &subprocessor, |name| {
                let key = part_file_key(&request_id, &processor, &subprocessor, &name);
                async move {
                    packages
                        .store
                        .remove(&key)
                        .await
                        .with_context(|| format!("deleting {key}"))
                }
            })
            .await
            .with_context(|| {
                format!("deleting the cancelled part of {processor}/{subprocessor} of {request_id}")
            })?;
        if !names.is_empty() {
            tracing::info!(
                %request_id,
                %processor,
                %subprocessor,
                files = names.len(),
                "the files of a part whose task was cancelled deleted"
            );
        }
        dropped += names.len();
    }
    Ok(dropped)
}

/// Deletes one package's files, then records it expired: a crash in between deletes them
/// again at the next sweep, and the record never says deleted while bytes remain. Then
/// deletes once more, and records that: an upload registered before the expiry may have
/// created a file since the first deletion (one that comes after the record refuses itself
/// and deletes it), and a crash before the last deletion has the next sweep run it again.
async fn expire_one(shared: &Shared, request_id: &str, now: i64) -> Result<()> {
    let packages = &shared.packages;
    packages
        .store
        .remove_all(&package_key(request_id))
        .await
        .with_context(|| format!("deleting the package of request {request_id}"))?;
    let days = packages.ttl_ms / DAY_MS;
    shared
        .store
        .package_expired(
            request_id,
            now,
            &format!("package deleted {days} day(s) after the request finished"),
        )
        .await?;
    packages
        .store
        .remove_all(&package_key(request_id))
        .await
        .with_context(|| format!("deleting the package of request {request_id} again"))?;
    shared.store.package_files_removed(request_id, now).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_safe_and_distinct() {
        let f = PackageFile {
            request_id: "0190-ab".into(),
            processor: "../p".into(),
            subprocessor: "a/b".into(),
            name: "customers.csv".into(),
            media_type: "text/csv".into(),
            categories: "[]".into(),
            size: 0,
            sha256: String::new(),
        };
        assert_eq!(file_key(&f), "0190-ab/%2E.%2Fp/a%2Fb/customers.csv");
        assert_eq!(path_component(".hidden"), "%2Ehidden");
        assert_eq!(path_component(""), "%00");
        assert_ne!(path_component("a b"), path_component("a%20b"));
    }

    /// A check takes up at a checkpoint that fits what is stored, else at the start; never
    /// with more than [`Packages::max_unchecked`] bytes to read.
    #[test]
    fn a_check_resumes_where_little_is_left_to_read() {
        let packages = Packages {
            store: Arc::new(FolderStore::new("/nowhere")),
            ttl_ms: 0,
            checkpoint_every: 1000,
        };
        let max = packages.max_unchecked();
        assert_eq!(
            max, MAX_CHUNK as u64,
            "a chunk may be longer than the interval"
        );
        let mut h = ResumableSha256::new();
        h.update(&[7; 5000]);
        let at = |checkpoint: Option<(u64, Vec<u8>)>, stored| {
            packages.resume_point(checkpoint, stored).map(|h| h.len())
        };
        let good = Some((5000, h.midstate()));
        assert_eq!(at(None, max), Some(0));
        assert_eq!(at(None, max + 1), None);
        assert_eq!(at(good.clone(), 5000), Some(5000));
        assert_eq!(at(good.clone(), 5000 + max), Some(5000));
        assert_eq!(at(good.clone(), 5001 + max), None);
        // Past what is stored: its bytes were dropped since.
        assert_eq!(at(good, 4999), Some(0));
        // Not a midstate, or one of another length.
        assert_eq!(at(Some((5000, vec![1, 2, 3])), 6000), Some(0));
        assert_eq!(at(Some((4000, h.midstate())), 6000), Some(0));
    }
}
