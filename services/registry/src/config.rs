//! The registry's configuration: where it listens and stores, who may call it, and which
//! processors it routes to.

use std::collections::BTreeSet;
use std::path::Path;

use dsrelay_runtime::backoff::Backoff;
use dsrelay_runtime::tls::TlsFiles;
use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override the file (`DSRELAY_REGISTRY__LISTEN=...`).
pub const ENV_PREFIX: &str = "DSRELAY_REGISTRY";

/// Everything the registry needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, used by `main` (tests bind their own listener).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Plain-HTTP admin port serving `/metrics` (Prometheus text format) and `/healthz`, e.g.
    /// `127.0.0.1:9464`; off when absent. It has no TLS: keep it on loopback or a private
    /// network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// `sqlite://path` (the embedded default) or `postgres://...`.
    #[serde(default = "default_database_url")]
    pub database_url: String,
    /// This service's certificate and the CA its peers must chain to.
    pub tls: TlsFiles,
    /// Which certificate identities are partners and operators.
    #[serde(default)]
    pub identities: Vec<IdentityRole>,
    /// The processors requests are routed to.
    #[serde(default)]
    pub processors: Vec<ProcessorConfig>,
    /// How deliveries to processors are retried.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// When the registry asks processors for status because acknowledgements are late.
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    /// Key of the keyed hashes that stay in the audit trail after raw identities are
    /// forgotten. Empty means a fixed development key (a warning is logged).
    #[serde(default)]
    pub identity_hash_key: String,
    /// Log one JSON object per line instead of human-readable text.
    #[serde(default)]
    pub log_json: bool,
}

/// A certificate identity and the role it has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityRole {
    /// The identity as found in the certificate (URI SAN, else DNS SAN).
    pub identity: String,
    /// What it may do.
    pub role: Role,
    /// A short name used in records and logs (e.g. the partner's name).
    pub name: String,
}

/// What a caller of the partner API may do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Submits requests and sees only its own.
    Partner,
    /// Sees and acts on every request; may extend deadlines.
    Operator,
}

/// A processor the controller has hired.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// The processor's name in records and routing.
    pub name: String,
    /// Where its processor service listens, `https://host:port`.
    pub endpoint: String,
    /// The identity its certificate must carry, both when we call it and when it
    /// acknowledges.
    pub identity: String,
    /// The data categories it holds; requests are routed by these.
    pub categories: Vec<String>,
}

/// Delivery outbox settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Retry spacing.
    pub backoff: Backoff,
    /// How often the dispatcher looks for due deliveries when nothing wakes it (ms).
    pub poll_interval_ms: u64,
    /// How long a claimed delivery is reserved for this replica (ms).
    pub lease_ms: u64,
    /// Deliveries claimed per round.
    pub batch_size: u32,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Deadline of one Deliver call (ms).
    pub call_timeout_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            batch_size: 64,
            concurrency: 16,
            call_timeout_ms: 10_000,
        }
    }
}

/// Reconciliation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// How often to look for quiet requests (ms).
    pub interval_ms: u64,
    /// A request with no acknowledgement for this long gets a status check (ms).
    pub ack_timeout_ms: u64,
    /// How often to ask every processor for its subprocessor list (ms); also at start.
    pub chain_interval_ms: u64,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
            ack_timeout_ms: 120_000,
            chain_interval_ms: 600_000,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:50051".into()
}

fn default_database_url() -> String {
    "sqlite://.dsrelay/registry.db".into()
}

impl Config {
    /// Loads the file (if any) and `DSRELAY_REGISTRY__*` overrides, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, dsrelay_runtime::config::ConfigErrors> {
        let mut config: Self = dsrelay_runtime::config::load(file, ENV_PREFIX, std::env::vars())?;
        if let Some(dir) = file.and_then(Path::parent) {
            config.tls = config.tls.relative_to(dir);
        }
        config.validate()?;
        Ok(config)
    }

    /// Every problem with the configuration, reported together.
    pub fn validate(&self) -> Result<(), dsrelay_runtime::config::ConfigErrors> {
        let mut errors = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            errors.push(format!("listen: {:?} is not host:port", self.listen));
        }
        if let Some(a) = &self.admin_listen {
            if a.parse::<std::net::SocketAddr>().is_err() {
                errors.push(format!("admin_listen: {a:?} is not host:port"));
            }
        }
        let mut seen_ids = BTreeSet::new();
        for (i, r) in self.identities.iter().enumerate() {
            if r.identity.is_empty() || r.name.is_empty() {
                errors.push(format!(
                    "identities[{i}]: identity and name must not be empty"
                ));
            }
            if !seen_ids.insert(r.identity.clone()) {
                errors.push(format!("identities[{i}]: {} is listed twice", r.identity));
            }
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.processors.iter().enumerate() {
            if !names.insert(p.name.clone()) {
                errors.push(format!("processors[{i}]: name {} is used twice", p.name));
            }
            if !seen_ids.insert(p.identity.clone()) {
                errors.push(format!(
                    "processors[{i}]: identity {} is already given another role",
                    p.identity
                ));
            }
            if !p.endpoint.starts_with("https://") {
                errors.push(format!(
                    "processors[{i}].endpoint: {:?} must start with https://",
                    p.endpoint
                ));
            }
            if p.categories.is_empty() {
                errors.push(format!(
                    "processors[{i}].categories: list the data categories {} holds",
                    p.name
                ));
            }
        }
        if self.delivery.concurrency == 0 || self.delivery.batch_size == 0 {
            errors.push("delivery: concurrency and batch_size must be at least 1".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(dsrelay_runtime::config::ConfigErrors(errors))
        }
    }

    /// Every data category some processor holds.
    pub fn known_categories(&self) -> BTreeSet<&str> {
        self.processors
            .iter()
            .flat_map(|p| p.categories.iter().map(String::as_str))
            .collect()
    }
}
