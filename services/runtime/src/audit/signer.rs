//! The worker that signs a service's audit trail: every `checkpoint_interval_ms` in which
//! the trail grew, its head (the last entry's seq and hash) is signed with the checkpoint
//! key and appended to the checkpoint file, neither of which the database holds
//! ([`super::checkpoint`]). The registry and the processor each run it over their trail
//! ([`Trail`]); their `[audit]` configuration is [`AuditConfig`].
//!
//! Several replicas sharing one database each need a file of their own: each signs the head
//! it sees, and one file's seqs must increase line by line.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::checkpoint::{self, Checkpoint, CheckpointFile, Due};
use crate::clock::Clock;
use crate::signing::{PublicKey, Signed, SigningKey};

/// Signed checkpoints of the audit trail (`[audit]`): on by default, and then
/// `checkpoint_key` and `checkpoint_file` are required, so a service never runs with a trail
/// that whoever can write its database could rewrite unseen, unless its configuration says
/// so (`checkpoints = false`). `dsrctl pki init` and `dsrctl dev up` generate the key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Whether the service signs checkpoints. Turning them off leaves a chain that someone
    /// able to write the database can rewrite from any entry on without a trace.
    pub checkpoints: bool,
    /// The Ed25519 private key (PKCS#8 PEM) that signs checkpoints. Keep it outside the
    /// database and out of reach of whoever administers it: with it, a rewritten trail can
    /// be checkpointed anew.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_key: Option<PathBuf>,
    /// The file checkpoints are appended to, one JSON line each, made durable before the
    /// next; ListAuditCheckpoints serves it. Put it where the database's administrators
    /// cannot write, and copy it away as it grows: a copy elsewhere is what an auditor trusts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_file: Option<PathBuf>,
    /// How often the service signs the trail's head, if it moved since the last checkpoint
    /// (ms); default one minute. Entries newer than the last checkpoint are covered only by
    /// the chain until the next one.
    pub checkpoint_interval_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoints: true,
            checkpoint_key: None,
            checkpoint_file: None,
            checkpoint_interval_ms: 60_000,
        }
    }
}

impl AuditConfig {
    /// What is wrong with it, one message per key.
    pub fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !self.checkpoints {
            return errors;
        }
        if self.checkpoint_key.is_none() {
            errors.push(
                "audit.checkpoint_key: required while audit.checkpoints is on; the ed25519 key \
                 (pkcs#8 pem) that signs the audit trail's checkpoints, kept outside the \
                 database (dsrctl pki init writes one per service: registry-signing.key, \
                 processor-signing.key), or set audit.checkpoints = false"
                    .into(),
            );
        }
        if self.checkpoint_file.is_none() {
            errors.push(
                "audit.checkpoint_file: required while audit.checkpoints is on; the file the \
                 signed checkpoints are appended to, where the database's administrators \
                 cannot write"
                    .into(),
            );
        }
        crate::config::check_ms(
            &mut errors,
            "audit.checkpoint_interval_ms",
            self.checkpoint_interval_ms,
            1..=crate::config::MAX_DURATION_MS,
        );
        errors
    }

    /// Takes relative key and file paths from `dir` (the configuration file's folder).
    pub fn relative_to(&mut self, dir: &Path) {
        for path in [&mut self.checkpoint_key, &mut self.checkpoint_file]
            .into_iter()
            .flatten()
        {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }
}

/// A service's audit trail as the signer sees it.
pub trait Trail: Send + Sync {
    /// The last entry (seq and hash), if any: what a checkpoint signs.
    fn head(&self) -> impl Future<Output = Result<Option<(u64, String)>>> + Send;
    /// The stored hash of entry `seq`, if there is one.
    fn hash_of(&self, seq: u64) -> impl Future<Output = Result<Option<String>>> + Send;
}

/// The key and the file a service's checkpoints are signed with and written to.
#[derive(Debug)]
pub struct Checkpointer {
    /// What every checkpoint names as the trail's owner (`registry`, `processor`).
    service: &'static str,
    key: SigningKey,
    file: CheckpointFile,
    interval: Duration,
}

impl Checkpointer {
    /// The checkpointer `config` asks for; `None` when checkpoints are off. Fails when the
    /// key cannot be read, so a service never starts believing it signs when it cannot.
    pub fn from_config(service: &'static str, config: &AuditConfig) -> Result<Option<Self>> {
        if !config.checkpoints {
            return Ok(None);
        }
        // Validation requires both; checked again for configurations built in code.
        let (Some(key), Some(file)) = (&config.checkpoint_key, &config.checkpoint_file) else {
            anyhow::bail!(
                "audit.checkpoint_key and audit.checkpoint_file: required while \
                 audit.checkpoints is on"
            );
        };
        Ok(Some(Self {
            service,
            key: SigningKey::load(key).context("audit.checkpoint_key")?,
            file: CheckpointFile::new(file),
            interval: Duration::from_millis(config.checkpoint_interval_ms.max(1)),
        }))
    }

    /// The key that checks this service's checkpoints.
    pub fn public_key(&self) -> PublicKey {
        self.key.public_key()
    }

    /// Up to `limit` checkpoints after `after_seq` from the file, and whether more follow.
    pub async fn page(&self, after_seq: u64, limit: usize) -> Result<(Vec<Signed>, bool)> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.page(after_seq, limit)).await?
    }

    /// Signs the trail's head if it moved since `last` (read from the file first when not
    /// known yet); returns the checkpoint written, if any. Fails, signing nothing, when the
    /// trail no longer holds the last checkpoint's entry as it was signed.
    pub async fn round(
        &self,
        trail: &impl Trail,
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
        let head = trail.head().await?;
        let service = self.service;
        let diverged = |detail: String| {
            anyhow::anyhow!(
                "the audit trail no longer holds the last checkpoint's entry ({detail}): it \
                 was cut or rewritten behind the {service}'s back, or the {service} now runs on \
                 another database than the one {} was kept for (give each database its own \
                 audit.checkpoint_file); no checkpoint signed",
                self.file.path().display()
            )
        };
        let due = checkpoint::due(known.as_ref(), head.as_ref().map(|(s, h)| (*s, h.as_str())));
        if let (Due::Diverged, Some(l)) = (due, &known) {
            let trail_end = match head {
                Some((seq, hash)) => format!("the trail ends at seq {seq} with {hash}"),
                None => "the trail is empty".to_string(),
            };
            return Err(diverged(format!(
                "checkpoint at seq {} says {}, {trail_end}",
                l.seq, l.hash
            )));
        }
        let (Due::Yes, Some((seq, hash))) = (due, head) else {
            return Ok(None);
        };
        // The head moved on; the entry the last checkpoint named must still be there as it
        // was, or the new checkpoint would vouch for a rewritten trail.
        if let Some(l) = &known {
            let stored = trail.hash_of(l.seq).await?;
            if stored.as_deref() != Some(l.hash.as_str()) {
                return Err(diverged(format!(
                    "checkpoint at seq {} says {}, the store says {}",
                    l.seq,
                    l.hash,
                    stored.as_deref().unwrap_or("nothing")
                )));
            }
        }
        let (c, signed) = Checkpoint::sign(self.service, seq, &hash, now, &self.key)?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.append(&signed)).await??;
        *last = Some(Some(c.clone()));
        Ok(Some(c))
    }
}

/// Signs the head every interval in which it moved, until `stop` turns true.
pub async fn run(
    checkpointer: Arc<Checkpointer>,
    trail: impl Trail,
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
        match checkpointer.round(&trail, &mut last, clock.now_ms()).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A trail of `entries` hashes, seq 1 first.
    struct Entries(Vec<String>);

    impl Trail for Entries {
        async fn head(&self) -> Result<Option<(u64, String)>> {
            Ok(self.0.last().map(|h| (self.0.len() as u64, h.clone())))
        }
        async fn hash_of(&self, seq: u64) -> Result<Option<String>> {
            let i = usize::try_from(seq).ok().and_then(|s| s.checked_sub(1));
            Ok(i.and_then(|i| self.0.get(i).cloned()))
        }
    }

    /// A checkpoint file kept for another database meets a trail that does not hold its
    /// entry: the error says so among the causes, and names the file, not an empty hash.
    #[tokio::test]
    async fn a_file_kept_for_another_database_is_named_as_a_cause() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        SigningKey::generate().write(&key).unwrap();
        let config = AuditConfig {
            checkpoints: true,
            checkpoint_key: Some(key),
            checkpoint_file: Some(dir.path().join("checkpoints.jsonl")),
            ..AuditConfig::default()
        };
        let signer = Checkpointer::from_config("registry", &config)
            .unwrap()
            .unwrap();
        let mut last = None;
        let trail = Entries(vec!["a".repeat(64), "b".repeat(64)]);
        let signed = signer.round(&trail, &mut last, 0).await.unwrap();
        assert_eq!(signed.map(|c| c.seq), Some(2));

        let mut last = None;
        let err = format!(
            "{:#}",
            signer
                .round(&Entries(Vec::new()), &mut last, 0)
                .await
                .unwrap_err()
        );
        assert!(err.contains("the trail is empty"), "{err}");
        assert!(!err.contains("with )"), "{err}");
        assert!(
            err.contains("now runs on another database than the one")
                && err.contains("checkpoints.jsonl"),
            "{err}"
        );
    }
}
