//! Return-of-data packages at the registry: where their files are kept, how a stored file is
//! checked, what `manifest.json` says, and their expiry.
//!
//! # Layout
//! - `store`: the [`PackageStore`] trait the bytes go through (appends through an
//!   [`Appender`], durable once synced), and [`FolderStore`].
//! - `direct`: the folder store's files written and read with `O_DIRECT`.
//! - `manifest`: the manifest's deterministic JSON.
//! - this module: [`Packages`] (the store and the retention), file keys, the whole-file
//!   digest check, and the expiry worker.
//!
//! The gRPC handlers are `crate::api::packages`; what was stored is recorded by
//! `crate::store` (`packages`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_runtime::export_files::path_component;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::app::Shared;
use crate::store::PackageFile;

mod direct;
pub(crate) mod manifest;
mod store;

pub use store::{Appender, FolderStore, PackageStore};

/// Largest chunk of a file in one message, either way: 1 MiB.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// One day in milliseconds.
const DAY_MS: i64 = 86_400_000;

/// The package store and how long packages are kept.
#[derive(Clone)]
pub(crate) struct Packages {
    /// Where the bytes are.
    pub store: Arc<dyn PackageStore>,
    /// How long a package is kept after its request finished (ms).
    pub ttl_ms: i64,
}

impl Packages {
    /// Packages in `store`, kept `ttl_days` after their request finished.
    pub(crate) fn new(store: Arc<dyn PackageStore>, ttl_days: u32) -> Self {
        Self {
            store,
            ttl_ms: i64::from(ttl_days) * DAY_MS,
        }
    }

    /// When a package whose request finished at `finished_at` expires (ms).
    pub(crate) fn expires_at(&self, finished_at: i64) -> i64 {
        finished_at.saturating_add(self.ttl_ms)
    }

    /// The SHA-256 of what is stored under `key`, read in chunks: for a file whose upload
    /// resumed, so that no one stream saw all of it.
    pub(crate) async fn stored_sha256(&self, key: &str) -> Result<String> {
        let mut reader = self
            .store
            .open(key)
            .await
            .context("opening a stored file")?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .await
                .context("reading a stored file")?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

/// The store key of a request's package folder.
pub(crate) fn package_key(request_id: &str) -> String {
    path_component(request_id)
}

/// The store key of one file of a package.
pub(crate) fn file_key(f: &PackageFile) -> String {
    format!(
        "{}/{}/{}/{}",
        package_key(&f.request_id),
        path_component(&f.processor),
        path_component(&f.subprocessor),
        path_component(&f.name)
    )
}

/// Deletes packages `package_ttl_days` after their request finished, recording an event for
/// each, until `stop` turns true.
pub(crate) async fn expire(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.config.package_sweep_interval_ms);
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = expire_due(&shared).await {
            tracing::error!(error = format!("{e:#}"), "expiring packages failed");
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
}
