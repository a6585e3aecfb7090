//! The processor's configuration: the controllers it serves and the subprocessors it passes
//! work on to.

use std::collections::BTreeSet;
use std::path::Path;

pub use dsrelay_connectors::noop::NoopConfig;
pub use dsrelay_connectors::ConnectorConfig;
use dsrelay_runtime::backoff::Backoff;
use dsrelay_runtime::tls::TlsFiles;
use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override the file (`DSRELAY_PROCESSOR__LISTEN=...`).
pub const ENV_PREFIX: &str = "DSRELAY_PROCESSOR";

/// Everything the processor needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, used by `main` (tests bind their own listener).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Plain-HTTP admin port serving `/metrics` (Prometheus text format) and `/healthz`, e.g.
    /// `127.0.0.1:9465`; off when absent. It has no TLS: keep it on loopback or a private
    /// network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// `sqlite://path` (the embedded default) or `postgres://...`.
    #[serde(default = "default_database_url")]
    pub database_url: String,
    /// This service's certificate and the CA its peers must chain to.
    pub tls: TlsFiles,
    /// The controllers this processor works for.
    #[serde(default)]
    pub controllers: Vec<ControllerConfig>,
    /// The systems holding the data, one task each per request.
    #[serde(default)]
    pub subprocessors: Vec<SubprocessorConfig>,
    /// Certificate identities of the people who may confirm manual tasks.
    #[serde(default)]
    pub operators: Vec<String>,
    /// How tasks are run and retried.
    #[serde(default)]
    pub tasks: TaskConfig,
    /// How acknowledgements are sent back and retried.
    #[serde(default)]
    pub acks: AckConfig,
    /// Log one JSON object per line instead of human-readable text.
    #[serde(default)]
    pub log_json: bool,
}

/// A controller: who may deliver requests, and where its registry takes acknowledgements.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The controller's name in records and logs.
    pub name: String,
    /// The identity its registry's certificate carries, both when it calls us and when we
    /// call it.
    pub identity: String,
    /// The registry's endpoint, `https://host:port`.
    pub registry_endpoint: String,
}

/// A subprocessor and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubprocessorConfig {
    /// Its name; acknowledgements name tasks by it.
    pub name: String,
    /// The data categories it holds; a request whose scope names none of them gets no task
    /// here.
    pub categories: Vec<String>,
    /// Where the data is processed (ISO 3166-1 alpha-2, e.g. "FI"), for the published
    /// subprocessor list.
    #[serde(default)]
    pub country: String,
    /// The safeguard for transfers outside the EU/EEA; `none` inside it.
    #[serde(default)]
    pub transfer_mechanism: TransferMechanismConfig,
    /// A human description for the published list.
    #[serde(default)]
    pub description: String,
    /// The connector that does the work.
    pub connector: ConnectorConfig,
}

/// How personal data may leave the EU/EEA (GDPR chapter V).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferMechanismConfig {
    /// The data stays in the EU/EEA.
    #[default]
    None,
    /// An adequacy decision (art. 45).
    AdequacyDecision,
    /// Standard contractual clauses (art. 46(2)(c)).
    StandardContractualClauses,
    /// Binding corporate rules (art. 47).
    BindingCorporateRules,
}

impl TransferMechanismConfig {
    /// The wire enum.
    pub fn to_proto(self) -> dsrelay_proto::v1::TransferMechanism {
        use dsrelay_proto::v1::TransferMechanism as T;
        match self {
            Self::None => T::None,
            Self::AdequacyDecision => T::AdequacyDecision,
            Self::StandardContractualClauses => T::StandardContractualClauses,
            Self::BindingCorporateRules => T::BindingCorporateRules,
        }
    }
}

/// EU and EEA member states (ISO 3166-1 alpha-2): data processed here is not transferred.
pub const EU_EEA: &[&str] = &[
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
];

/// Task runner settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// Retry spacing for transient connector errors.
    pub backoff: Backoff,
    /// How often the runner looks for runnable tasks when nothing wakes it (ms).
    pub poll_interval_ms: u64,
    /// How long a claimed task is reserved for this replica (ms); a crashed replica's tasks
    /// are picked up again after this.
    pub lease_ms: u64,
    /// Tasks claimed per round.
    pub batch_size: u32,
    /// Tasks run at once.
    pub concurrency: usize,
    /// How often to ask a holder that accepted work whether it is done (ms).
    pub confirm_interval_ms: u64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            batch_size: 64,
            concurrency: 8,
            confirm_interval_ms: 60_000,
        }
    }
}

/// Acknowledgement outbox settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AckConfig {
    /// Retry spacing when the registry cannot be reached.
    pub backoff: Backoff,
    /// How often the sender looks for queued acknowledgements when nothing wakes it (ms).
    pub poll_interval_ms: u64,
    /// How long claimed acknowledgements are reserved (ms).
    pub lease_ms: u64,
    /// Acknowledgements per call.
    pub batch_size: u32,
    /// Deadline of one Acknowledge call (ms).
    pub call_timeout_ms: u64,
}

impl Default for AckConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            batch_size: 200,
            call_timeout_ms: 10_000,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:50061".into()
}

fn default_database_url() -> String {
    "sqlite://.dsrelay/processor.db".into()
}

impl Config {
    /// Loads the file (if any) and `DSRELAY_PROCESSOR__*` overrides, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, dsrelay_runtime::config::ConfigErrors> {
        let mut config: Self = dsrelay_runtime::config::load(file, ENV_PREFIX, std::env::vars())?;
        if let Some(dir) = file.and_then(Path::parent) {
            config.tls = config.tls.relative_to(dir);
            // Connectors with their own TLS files resolve them like the service's.
            for s in &mut config.subprocessors {
                if let ConnectorConfig::Adapter(a) = &mut s.connector {
                    a.tls = a.tls.clone().relative_to(dir);
                }
            }
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
        let mut ids = BTreeSet::new();
        for (i, c) in self.controllers.iter().enumerate() {
            if !ids.insert(&c.identity) {
                errors.push(format!(
                    "controllers[{i}]: identity {} is listed twice",
                    c.identity
                ));
            }
            if !c.registry_endpoint.starts_with("https://") {
                errors.push(format!(
                    "controllers[{i}].registry_endpoint: {:?} must start with https://",
                    c.registry_endpoint
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.subprocessors.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > 128 {
                errors.push(format!("subprocessors[{i}].name: must be 1 to 128 bytes"));
            }
            if !names.insert(&s.name) {
                errors.push(format!("subprocessors[{i}]: name {} is used twice", s.name));
            }
            if s.categories.is_empty() {
                errors.push(format!(
                    "subprocessors[{i}].categories: list the data categories {} holds",
                    s.name
                ));
            }
            let country_ok =
                s.country.len() == 2 && s.country.bytes().all(|b| b.is_ascii_uppercase());
            if !s.country.is_empty() && !country_ok {
                errors.push(format!(
                    "subprocessors[{i}].country: {:?} is not an ISO 3166-1 alpha-2 code like \"FI\"",
                    s.country
                ));
            }
            if country_ok
                && !EU_EEA.contains(&s.country.as_str())
                && s.transfer_mechanism == TransferMechanismConfig::None
            {
                errors.push(format!(
                    "subprocessors[{i}].transfer_mechanism: {} is outside the EU/EEA; name the \
                     safeguard (adequacy_decision, standard_contractual_clauses or \
                     binding_corporate_rules)",
                    s.country
                ));
            }
            for e in s.connector.validate() {
                errors.push(format!("subprocessors[{i}].connector: {e}"));
            }
        }
        if self.tasks.concurrency == 0 || self.tasks.batch_size == 0 || self.acks.batch_size == 0 {
            errors.push("tasks and acks: concurrency and batch sizes must be at least 1".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(dsrelay_runtime::config::ConfigErrors(errors))
        }
    }
}
