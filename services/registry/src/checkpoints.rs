//! Signed checkpoints of the audit trail: every `audit.checkpoint_interval_ms` in which the
//! trail grew, the head (the last entry's seq and hash) is signed with the checkpoint key and
//! appended to the checkpoint file, neither of which the database holds
//! ([`dsrelay_runtime::audit::checkpoint`]). ListAuditCheckpoints serves the file.
//!
//! Several replicas sharing one database each need a file of their own: each signs the head
//! it sees, and one file's seqs must increase line by line.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_runtime::audit::checkpoint::{self, Checkpoint, CheckpointFile, Due};
use dsrelay_runtime::clock::Clock;
use dsrelay_runtime::signing::{PublicKey, Signed, SigningKey};
use tokio::sync::watch;

use crate::config::AuditConfig;
use crate::store::Store;

/// What every checkpoint names as the trail's owner.
pub(crate) const SERVICE: &str = "registry";

/// The key and the file checkpoints are signed with and written to.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    key: SigningKey,
    file: CheckpointFile,
    interval: Duration,
}

impl Checkpointer {
    /// The checkpointer `config` asks for; `None` when checkpoints are off. Fails when the
    /// key cannot be read, so a registry never starts believing it signs when it cannot.
    pub(crate) fn from_config(config: &AuditConfig) -> Result<Option<Self>> {
        if !config.checkpoints {
            return Ok(None);
        }
        // Config::validate requires both; checked again for configurations built in code.
        let (Some(key), Some(file)) = (&config.checkpoint_key, &config.checkpoint_file) else {
            anyhow::bail!(
                "audit.checkpoint_key and audit.checkpoint_file: required while \
                 audit.checkpoints is on"
            );
        };
        Ok(Some(Self {
            key: SigningKey::load(key).context("audit.checkpoint_key")?,
            file: CheckpointFile::new(file),
            interval: Duration::from_millis(config.checkpoint_interval_ms.max(1)),
        }))
    }

    /// The key that checks this registry's checkpoints.
    pub(crate) fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Up to `limit` checkpoints after `after_seq` from the file, and whether more follow.
    pub(crate) async fn page(&self, after_seq: u64, limit: usize) -> Result<(Vec<Signed>, bool)> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.page(after_seq, limit)).await?
    }

    /// Signs the trail's head if it moved since `last` (read from the file first when not
    /// known yet); returns the checkpoint written, if any.
    async fn round(
        &self,
        store: &Store,
        last: &mut Option<Option<Checkpoint>>,
        now: i64,
    ) -> Result<Option<Checkpoint>> {
        let known = match last {
            Some(known) => known.clone(),
            None => {
                let file = self.file.clone();
                let read = tokio::task::spawn_blocking(move || file.last()).await??;
                *last = Some(read.clone());
                read
            }
        };
        let head = store.audit_head().await?;
        let diverged = |detail: String| {
            anyhow::anyhow!(
                "the audit trail no longer holds the last checkpoint's entry ({detail}): it \
                 was cut or rewritten behind the registry's back; no checkpoint signed"
            )
        };
        let due = checkpoint::due(known.as_ref(), head.as_ref().map(|(s, h)| (*s, h.as_str())));
        if let (Due::Diverged, Some(l)) = (due, &known) {
            let (seq, hash) = head.unwrap_or_default();
            return Err(diverged(format!(
                "checkpoint at seq {} says {}, the trail ends at seq {seq} with {hash}",
                l.seq, l.hash
            )));
        }
        let (Due::Yes, Some((seq, hash))) = (due, head) else {
            return Ok(None);
        };
        // The head moved on; the entry the last checkpoint named must still be there as it
        // was, or the new checkpoint would vouch for a rewritten trail.
        if let Some(l) = &known {
            let stored = store.audit_hash(l.seq).await?;
            if stored.as_deref() != Some(l.hash.as_str()) {
                return Err(diverged(format!(
                    "checkpoint at seq {} says {}, the store says {}",
                    l.seq,
                    l.hash,
                    stored.as_deref().unwrap_or("nothing")
                )));
            }
        }
        let (c, signed) = Checkpoint::sign(SERVICE, seq, &hash, now, &self.key)?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.append(&signed)).await??;
        *last = Some(Some(c.clone()));
        Ok(Some(c))
    }
}

/// Signs the head every interval in which it moved, until `stop` turns true.
pub(crate) async fn run(
    checkpointer: Arc<Checkpointer>,
    store: Store,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!(
        file = %checkpointer.file.path().display(),
        key_id = checkpointer.public_key().key_id(),
        "signing audit checkpoints"
    );
    // None until the file was read; then the last checkpoint written, if any.
    let mut last = None;
    loop {
        if *stop.borrow() {
            return;
        }
        match checkpointer.round(&store, &mut last, clock.now_ms()).await {
            Ok(Some(c)) => tracing::debug!(seq = c.seq, "audit checkpoint signed"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = format!("{e:#}"), "audit checkpoint failed"),
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(checkpointer.interval) => {}
        }
    }
}
