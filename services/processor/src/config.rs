//! The processor's configuration: the controllers it serves and the subprocessors it passes
//! work on to.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub use dsrelay_connectors::noop::NoopConfig;
pub use dsrelay_connectors::ConnectorConfig;
pub use dsrelay_runtime::audit::signer::AuditConfig;
use dsrelay_runtime::backoff::Backoff;
use dsrelay_runtime::config::{
    check_at_least_one, check_backoff, check_checkpoint_key, check_count, check_endpoint, check_ms,
    check_signing_key, ConfigErrors, MAX_CALL_TIMEOUT_MS, MAX_CONCURRENCY, MAX_DURATION_MS,
    MAX_RETENTION_DAYS,
};
use dsrelay_runtime::settings::{Defaults, ServiceConfig, ServiceSettings};
use serde::{Deserialize, Deserializer, Serialize};

/// Prefix of environment variables that override the file (`DSRELAY_PROCESSOR__LISTEN=...`).
pub const ENV_PREFIX: &str = "DSRELAY_PROCESSOR";

/// Longest subprocessor name (bytes): escaped byte by byte (three bytes each at most) it
/// still fits a file name.
pub const MAX_SUBPROCESSOR_NAME: usize = 64;

/// Everything the processor needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where it listens and stores, its TLS files and log format: the keys every service
    /// shares, at the top level of the file.
    #[serde(flatten, deserialize_with = "service_settings")]
    pub service: ServiceSettings,
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
    /// How exports are delivered (RETURN_OF_DATA and contract end returns to the registry,
    /// TRANSFER to its recipient) and retried.
    #[serde(default)]
    pub uploads: UploadConfig,
    /// How contract ends report their progress.
    #[serde(default)]
    pub contracts: ContractsConfig,
    /// The processor's data folder: exports of RETURN_OF_DATA, TRANSFER and returning
    /// CONTRACT_END tasks are written as files under `exports/` here, one folder per task. A
    /// relative path is taken from the working directory, like the default SQLite database
    /// beside it.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The Ed25519 private key (PKCS#8 PEM file) that signs the deletion certificate of
    /// every COMPLETED or RETAINED erasure task, and of every contract end's erasure. Its
    /// public key (the `.pub.pem` file the development PKI writes beside it) goes to each
    /// controller's registry, as `public_key` of this processor's `[[processors]]` entry. Without it the processor issues no
    /// certificates and warns at start-up; a key that cannot be read stops the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<PathBuf>,
    /// Key of the keyed hashes (HMAC-SHA256) of a request's identities that the processor
    /// keeps after forgetting the raw values, so an operator holding the key and an e-mail
    /// address can still show what was done for that subject. The processor's own secret
    /// (not the registry's). Required.
    #[serde(default)]
    pub identity_hash_key: String,
    /// Days after the last task of a request reached a final state before its raw identities,
    /// body, notes and export files are removed. A request with a RETAINED task keeps its
    /// identities until that task is done: they are needed to erase the retained data later.
    /// Default 30; 0 to [`MAX_RETENTION_DAYS`] (3650), 0 forgetting at the next sweep.
    #[serde(default = "default_forget_after_days")]
    pub forget_after_days: u32,
    /// How often the processor looks for requests to forget (ms); 1 to [`MAX_DURATION_MS`]
    /// (30 days).
    #[serde(default = "default_forget_sweep_interval_ms")]
    pub forget_sweep_interval_ms: u64,
    /// Signed checkpoints of the processor's own audit trail (`[audit]`): on by default, and
    /// then `checkpoint_key` and `checkpoint_file` are required. The key may be the one in
    /// `signing_key` (the development PKI's `<stem>-signing.key` serves both): a checkpoint's
    /// signed body cannot be read as a certificate's, nor the other way round.
    #[serde(default)]
    pub audit: AuditConfig,
}

fn default_forget_after_days() -> u32 {
    30
}

fn default_forget_sweep_interval_ms() -> u64 {
    60_000
}

/// The default of `data_dir`: next to the default SQLite database.
pub const DEFAULT_DATA_DIR: &str = ".dsrelay/processor-data";

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

/// A controller: who may deliver requests, and where its registry takes acknowledgements and
/// uploads (returns of data, contract ends' returns).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// The controller's name in records and logs.
    pub name: String,
    /// The identity its registry's certificate carries, both when it calls us and when we
    /// call it.
    pub identity: String,
    /// The registry's endpoint, `https://host:port` (the port 443 when left out).
    pub registry_endpoint: String,
}

/// A subprocessor and how to reach it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubprocessorConfig {
    /// Its name; acknowledgements name tasks by it. 1 to [`MAX_SUBPROCESSOR_NAME`] ASCII
    /// letters, digits, `-`, `_` and `.`, not starting with `.`.
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
    /// Retry spacing for transient connector errors; `initial_ms` and `max_ms` 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    pub backoff: Backoff,
    /// How often the runner looks for runnable tasks when nothing wakes it (ms); 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    pub poll_interval_ms: u64,
    /// How long a claimed task is reserved for this replica (ms), by the database's clock; a
    /// crashed replica's tasks are picked up again after this. 1 to [`MAX_DURATION_MS`] (30
    /// days): at 0 a claim has expired when it is taken, so the task could run twice at once.
    pub lease_ms: u64,
    /// Tasks claimed per round; 1 to [`MAX_CONCURRENCY`] (65536).
    pub batch_size: u32,
    /// Tasks run at once. Most steps wait on a commit or a holder's answer, so more in
    /// flight share more commits: 32 completed 40–55 % more one-hop erasures than 8
    /// (`docs/benchmarks.md`, session 19), and 128, with the registry's 64 deliveries in
    /// flight, about 45 % more than 32 with 16 (session 27). A holder with limits of its own
    /// keeps them in its connector (Mailchimp's calls per account). 1 to
    /// [`MAX_CONCURRENCY`] (65536).
    pub concurrency: usize,
    /// Of those, how many may be exports (the holder call of a return of data, a transfer,
    /// or a contract end that returns the data) at once; the others wait for a slot, their
    /// leases renewed meanwhile. Each export holds about 25 MiB while it runs (its blocks,
    /// the export reader and the upload beside it), so this bounds the processor's memory
    /// where `concurrency` would not. 1 to [`MAX_CONCURRENCY`] (65536).
    pub export_concurrency: usize,
    /// How often to ask a holder that accepted work whether it is done (ms); 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    pub confirm_interval_ms: u64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            batch_size: 64,
            concurrency: 128,
            export_concurrency: 4,
            confirm_interval_ms: 60_000,
        }
    }
}

/// Acknowledgement outbox settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AckConfig {
    /// Retry spacing when the registry cannot be reached; `initial_ms` and `max_ms` 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    pub backoff: Backoff,
    /// How often the sender looks for queued acknowledgements when nothing wakes it (ms); 1
    /// to [`MAX_DURATION_MS`] (30 days).
    pub poll_interval_ms: u64,
    /// How long claimed acknowledgements are reserved (ms); 1 to [`MAX_DURATION_MS`] (30
    /// days).
    pub lease_ms: u64,
    /// Acknowledgements claimed per round; each controller's share goes in calls of at most
    /// 500 and 3 MiB. 1 to [`MAX_CONCURRENCY`] (65536).
    pub batch_size: u32,
    /// Deadline of one Acknowledge call (ms); 1 to [`MAX_CALL_TIMEOUT_MS`] (one hour). The
    /// default, 15 s, outlasts the registry's wait for its own database
    /// ([`dsrelay_runtime::store::POOL_WAIT`], 10 s), so a registry whose database is out of
    /// reach answers UNAVAILABLE saying so rather than the call running out first.
    pub call_timeout_ms: u64,
    /// Rejections by the registry after which an acknowledgement is dead-lettered: parked,
    /// never sent again until an operator requeues it (`dsrctl tasks dead-letters`).
    /// Until then each rejection is retried with `backoff`, in case the registry is fixed.
    /// At least 1.
    pub max_rejections: u32,
}

impl Default for AckConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            batch_size: 200,
            call_timeout_ms: 15_000,
            max_rejections: 5,
        }
    }
}

/// Upload outbox settings: each RETURN_OF_DATA export (and a contract end's return) goes to
/// its controller's registry, each TRANSFER export (and a contract end's transfer) to the
/// recipient the registry named with the request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    /// Retry spacing when the registry or recipient cannot be reached, or refuses a chunk or
    /// (a recipient) answers a receipt that does not match; retries stop at the request's
    /// due date. `initial_ms` and `max_ms` 1 to [`MAX_DURATION_MS`] (30 days).
    pub backoff: Backoff,
    /// How often the worker looks for due uploads when nothing wakes it (ms); 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    pub poll_interval_ms: u64,
    /// How long a claimed upload is reserved (ms), renewed every third of it while the files
    /// are sent: after a crash, how long the upload waits before another claim resumes it. 1
    /// to [`MAX_DURATION_MS`] (30 days).
    pub lease_ms: u64,
    /// How long sending one file may go without the destination taking a chunk of it (or
    /// answering after the last) before the attempt ends (ms); the next resumes where the
    /// destination stands. 1 to [`MAX_DURATION_MS`] (30 days).
    pub stall_ms: u64,
    /// Exports uploaded at once; 1 to [`MAX_CONCURRENCY`] (65536).
    pub concurrency: u32,
    /// Deadline of one state call (GetUploadState, GetTransferState) or closing call
    /// (CompletePart, CompleteTransfer) (ms); 1 to [`MAX_CALL_TIMEOUT_MS`] (one hour), and
    /// shorter than `lease_ms`, which a closing call runs under unrenewed. The default, 15 s,
    /// outlasts the registry's wait for its own database
    /// ([`dsrelay_runtime::store::POOL_WAIT`], 10 s), as `acks.call_timeout_ms` does.
    pub call_timeout_ms: u64,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            stall_ms: 300_000,
            concurrency: 4,
            call_timeout_ms: 15_000,
        }
    }
}

/// Contract end settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContractsConfig {
    /// While a connector works through a controller's data, how often (ms) the processor
    /// reads its progress and, when it moved, acknowledges it to the registry. Default 1000;
    /// 1 to [`MAX_DURATION_MS`] (30 days).
    pub progress_interval_ms: u64,
}

impl Default for ContractsConfig {
    fn default() -> Self {
        Self {
            progress_interval_ms: 1000,
        }
    }
}

/// Where the processor listens and stores unless configured otherwise.
pub const DEFAULTS: Defaults = Defaults {
    listen: "127.0.0.1:50061",
    database_url: "sqlite://.dsrelay/processor.db",
};

fn service_settings<'de, D: Deserializer<'de>>(d: D) -> Result<ServiceSettings, D::Error> {
    ServiceSettings::deserialize_with_defaults(d, &DEFAULTS)
}

impl AsRef<ServiceSettings> for Config {
    fn as_ref(&self) -> &ServiceSettings {
        &self.service
    }
}

impl ServiceConfig for Config {
    const KEYS: &'static [&'static str] = &[
        "controllers",
        "subprocessors",
        "operators",
        "tasks",
        "acks",
        "uploads",
        "contracts",
        "data_dir",
        "signing_key",
        "identity_hash_key",
        "forget_after_days",
        "forget_sweep_interval_ms",
        "audit",
    ];

    fn relative_to(&mut self, dir: &Path) {
        self.service.relative_to(dir);
        if let Some(key) = &mut self.signing_key {
            *key = dir.join(&*key);
        }
        self.audit.relative_to(dir);
        // Connectors with their own TLS files resolve them like the service's.
        for s in &mut self.subprocessors {
            if let ConnectorConfig::Adapter(a) = &mut s.connector {
                a.tls = a.tls.clone().relative_to(dir);
            }
        }
    }

    fn check(&self) -> Result<(), ConfigErrors> {
        let mut errors = self.validate().err().map_or_else(Vec::new, |e| e.0);
        // Read here, not only at start-up, so a bad key is reported with the other files.
        if let Some(key) = &self.signing_key {
            check_signing_key(&mut errors, "signing_key", key);
        }
        check_checkpoint_key(&mut errors, &self.audit);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

impl Config {
    /// Loads the file (if any) and `DSRELAY_PROCESSOR__*` overrides, then validates and
    /// checks that the TLS files are there.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with the environment given (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        dsrelay_runtime::settings::load(file, ENV_PREFIX, env)
    }

    /// Every problem with the configuration's values, reported together; of the file system
    /// it reads only an adapter connector's TLS files (there, readable, PEM of their kind,
    /// through the connector's `validate`): the key files are read by `check`.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = self.service.validate();
        let mut ids = BTreeSet::new();
        // Tasks, scoping and acknowledgements go by the controller's name: one name for two
        // controllers would mix their data.
        let mut names = BTreeSet::new();
        for (i, c) in self.controllers.iter().enumerate() {
            if !ids.insert(&c.identity) {
                errors.push(format!(
                    "controllers[{i}]: identity {} is listed twice",
                    c.identity
                ));
            }
            if !names.insert(&c.name) {
                errors.push(format!("controllers[{i}]: name {} is used twice", c.name));
            }
            let key = format!("controllers[{i}].registry_endpoint");
            check_endpoint(&mut errors, &key, &c.registry_endpoint);
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.subprocessors.iter().enumerate() {
            if !is_subprocessor_name(&s.name) {
                errors.push(format!(
                    "subprocessors[{i}].name: {:?} must be 1 to {MAX_SUBPROCESSOR_NAME} ASCII \
                     letters, digits, '-', '_' and '.', not starting with '.'",
                    s.name
                ));
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
            // A table's categories say which requests reach it and label its export files:
            // one the subprocessor does not hold would never be asked for, and would label
            // files with a category the controller does not know it there.
            if let ConnectorConfig::Sql(sql) = &s.connector {
                for (j, table) in sql.tables.iter().enumerate() {
                    for c in table.categories.iter().flatten() {
                        if !s.categories.contains(c) {
                            errors.push(format!(
                                "subprocessors[{i}].connector: tables[{j}] ({}): category \
                                 {c:?} is not one of subprocessor {}'s categories ({}); add it \
                                 there or name one of those",
                                table.table,
                                s.name,
                                s.categories.join(", ")
                            ));
                        }
                    }
                }
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            errors.push("data_dir: must not be empty".into());
        }
        if self.identity_hash_key.is_empty() {
            errors.push(
                "identity_hash_key: required; set a long random secret (the key of the hashes \
                 kept after identities are forgotten)"
                    .into(),
            );
        }
        errors.extend(self.audit.errors());
        // Each sizes a semaphore or a claim: 0 would run nothing, and a huge value would
        // panic in the semaphore or allocate for it once the service runs.
        let (t, a, u) = (&self.tasks, &self.acks, &self.uploads);
        for (key, value) in [
            ("tasks.concurrency", t.concurrency as u64),
            ("tasks.export_concurrency", t.export_concurrency as u64),
            ("tasks.batch_size", u64::from(t.batch_size)),
            ("acks.batch_size", u64::from(a.batch_size)),
            ("uploads.concurrency", u64::from(u.concurrency)),
        ] {
            check_count(&mut errors, key, value, 1..=MAX_CONCURRENCY);
        }
        check_at_least_one(
            &mut errors,
            "acks.max_rejections",
            u64::from(a.max_rejections),
        );
        self.duration_errors(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// Whether `name` can name a subprocessor. It becomes the name of each task's export folder
/// and a path segment of the registry's package (`<processor>/<subprocessor>/<file>`), where
/// the registry and dsrctl refuse `/`, `:` and the like, and a leading `.` would hide it.
fn is_subprocessor_name(name: &str) -> bool {
    (1..=MAX_SUBPROCESSOR_NAME).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Config {
    /// Every duration outside its accepted range, by its full key: 0 where it would make a
    /// lease expire as it is taken, a call fail at once or a loop spin, and anything above
    /// [`MAX_DURATION_MS`] (a call's deadline: [`MAX_CALL_TIMEOUT_MS`]), which is a typo and
    /// would overflow once added to a clock reading. `forget_after_days` may be 0.
    fn duration_errors(&self, errors: &mut Vec<String>) {
        let any = 1..=MAX_DURATION_MS;
        let call = 1..=MAX_CALL_TIMEOUT_MS;
        if self.forget_after_days > MAX_RETENTION_DAYS {
            errors.push(format!(
                "forget_after_days: must be from 0 to {MAX_RETENTION_DAYS} days; it is {}",
                self.forget_after_days
            ));
        }
        let (t, a, u) = (&self.tasks, &self.acks, &self.uploads);
        for (key, value, range) in [
            (
                "forget_sweep_interval_ms",
                self.forget_sweep_interval_ms,
                &any,
            ),
            ("tasks.poll_interval_ms", t.poll_interval_ms, &any),
            ("tasks.lease_ms", t.lease_ms, &any),
            ("tasks.confirm_interval_ms", t.confirm_interval_ms, &any),
            ("acks.poll_interval_ms", a.poll_interval_ms, &any),
            ("acks.lease_ms", a.lease_ms, &any),
            ("acks.call_timeout_ms", a.call_timeout_ms, &call),
            ("uploads.poll_interval_ms", u.poll_interval_ms, &any),
            ("uploads.lease_ms", u.lease_ms, &any),
            ("uploads.stall_ms", u.stall_ms, &any),
            ("uploads.call_timeout_ms", u.call_timeout_ms, &call),
            (
                "contracts.progress_interval_ms",
                self.contracts.progress_interval_ms,
                &any,
            ),
        ] {
            check_ms(errors, key, value, range.clone());
        }
        check_backoff(errors, "tasks", &t.backoff);
        check_backoff(errors, "acks", &a.backoff);
        check_backoff(errors, "uploads", &u.backoff);
        // Closing a part (CompleteTransfer) runs under the upload's lease, not renewed
        // meanwhile: a lease that lapsed during the call let a Cancel cancel the return
        // outright and drop the recipient's receipt. Out-of-range values are named above.
        let in_range = any.contains(&u.lease_ms) && call.contains(&u.call_timeout_ms);
        if in_range && u.call_timeout_ms >= u.lease_ms {
            errors.push(format!(
                "uploads.call_timeout_ms ({} ms) must be shorter than uploads.lease_ms ({} ms): \
                 the lease must outlast a part's closing call",
                u.call_timeout_ms, u.lease_ms
            ));
        }
    }

    /// Every configured caller whose identity is outside the processor's trust domain
    /// (`trust_domain`, else the one of `own_identity`) or does not name its role:
    /// controllers' registries as `registry`, operators as `operator`.
    pub fn trust_errors(&self, own_identity: &str) -> anyhow::Result<Vec<String>> {
        use dsrelay_runtime::trust::{check_callers, effective_trust_domain, ConfiguredCaller};
        let domain = effective_trust_domain(self.service.trust_domain.as_deref(), own_identity)?;
        let controller_keys: Vec<String> = (0..self.controllers.len())
            .map(|i| format!("controllers[{i}].identity"))
            .collect();
        let operator_keys: Vec<String> = (0..self.operators.len())
            .map(|i| format!("operators[{i}]"))
            .collect();
        let controllers = self
            .controllers
            .iter()
            .zip(&controller_keys)
            .map(|(c, key)| ConfiguredCaller {
                key,
                identity: &c.identity,
                role_path: "registry",
            });
        let operators = self
            .operators
            .iter()
            .zip(&operator_keys)
            .map(|(identity, key)| ConfiguredCaller {
                key,
                identity,
                role_path: "operator",
            });
        Ok(check_callers(&domain, controllers.chain(operators)))
    }

    /// Whose data each subprocessor's connector can tell apart, checked against the
    /// controllers served; `scoped` answers [`dsrelay_connectors::Connector::scoped_controllers`]
    /// by subprocessor. Serving more than one controller, every connector must scope every
    /// one of them, or one controller's erasure or contract end could touch another's data;
    /// a connector may never scope a controller this processor does not serve.
    pub fn scoping_errors(&self, scoped: impl Fn(&str) -> Option<Vec<String>>) -> Vec<String> {
        let served: BTreeSet<&str> = self.controllers.iter().map(|c| c.name.as_str()).collect();
        let mut errors = Vec::new();
        for (i, s) in self.subprocessors.iter().enumerate() {
            let names = scoped(&s.name);
            for name in names.iter().flatten() {
                if !served.contains(name.as_str()) {
                    errors.push(format!(
                        "subprocessors[{i}].connector: subprocessor {} scopes controller {name}, \
                         which this processor does not serve",
                        s.name
                    ));
                }
            }
            if served.len() < 2 {
                continue;
            }
            for c in &served {
                match &names {
                    None => errors.push(format!(
                        "subprocessors[{i}].connector: subprocessor {} does not scope its data \
                         per controller, but this processor serves several; configure which \
                         data belongs to controller {c}",
                        s.name
                    )),
                    Some(n) if !n.iter().any(|x| x == c) => errors.push(format!(
                        "subprocessors[{i}].connector: subprocessor {} does not scope \
                         controller {c}; configure which of its data belongs to it",
                        s.name
                    )),
                    Some(_) => {}
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry (or recipient) whose database is out of reach answers UNAVAILABLE after
    /// the store's wait for a connection: the default deadlines of the calls to it must
    /// outlast that wait, or the caller records its own timeout instead of the reason.
    #[test]
    fn default_call_deadlines_outlast_the_stores_wait_for_a_connection() {
        let wait = dsrelay_runtime::store::POOL_WAIT.as_millis() as u64;
        assert!(AckConfig::default().call_timeout_ms > wait);
        assert!(UploadConfig::default().call_timeout_ms > wait);
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A misspelt top-level key is listed with the known ones (the shared keys and this
    /// service's), as a misspelt key in a table is.
    #[test]
    fn an_unknown_top_level_key_lists_the_known_ones() {
        let (_dir, file) = folder("data_dri = \"d\"\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].starts_with(&format!(
                "{}: key data_dri: unknown key; known here: listen, admin_listen, ",
                file.display()
            )),
            "{err}"
        );
        assert!(err.0[0].contains(", data_dir, "), "{err}");
    }

    /// `KEYS` lists exactly this service's own top-level keys: those a full configuration
    /// writes beside the shared ones.
    #[test]
    fn the_listed_top_level_keys_are_this_service_s() {
        let (_dir, file) = folder("signing_key = \"processor-checkpoint.key\"\n");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        let mut listed: Vec<String> = Config::KEYS.iter().map(|k| k.to_string()).collect();
        listed.sort();
        assert_eq!(dsrelay_runtime::settings::own_keys(&c), listed);
    }

    /// A folder with a configuration file naming TLS files that exist, an identity hash
    /// key unless `extra` sets one, and checkpoint files unless `extra` has an `[audit]`
    /// table.
    fn folder(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let extra = if extra.contains("identity_hash_key") {
            extra.to_string()
        } else {
            format!("identity_hash_key = \"test key\"\n{extra}")
        };
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "processor.pem", "processor.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        dsrelay_runtime::signing::SigningKey::generate()
            .write(&dir.path().join("processor-checkpoint.key"))
            .unwrap();
        let file = dir.path().join("processor.toml");
        std::fs::write(
            &file,
            format!(
                "{extra}\n[tls]\nca = \"ca.pem\"\ncert = \"processor.pem\"\nkey = \"processor.key\"\n{}",
                if extra.contains("[audit]") {
                    ""
                } else {
                    "[audit]\ncheckpoint_key = \"processor-checkpoint.key\"\n\
                     checkpoint_file = \"audit/checkpoints.jsonl\"\n"
                }
            ),
        )
        .unwrap();
        (dir, file)
    }

    #[test]
    fn shared_keys_and_overrides_stay_at_the_top_level() {
        let (dir, file) = folder("operators = [\"spiffe://x\"]");
        let c = Config::load_from(
            Some(&file),
            env(&[
                ("DSRELAY_PROCESSOR__DATABASE_URL", "postgres://u@h/db"),
                ("DSRELAY_PROCESSOR__TASKS__CONCURRENCY", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(c.service.listen, DEFAULTS.listen);
        assert_eq!(c.service.database_url, "postgres://u@h/db");
        assert!(!c.service.log_json);
        assert_eq!(c.service.tls.ca, dir.path().join("ca.pem"));
        assert_eq!(c.tasks.concurrency, 2);
        assert_eq!(c.operators, ["spiffe://x"]);
        assert_eq!(c.data_dir, Path::new(DEFAULT_DATA_DIR));
        assert_eq!(c.signing_key, None);
        let c = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_PROCESSOR__DATA_DIR", "/var/lib/dsrelay")]),
        )
        .unwrap();
        assert_eq!(c.data_dir, Path::new("/var/lib/dsrelay"));
    }

    #[test]
    fn audit_checkpoints_are_required_unless_turned_off() {
        let (dir, file) = folder("");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert!(c.audit.checkpoints);
        assert_eq!(c.audit.checkpoint_interval_ms, 60_000);
        assert_eq!(
            c.audit.checkpoint_key.as_deref(),
            Some(dir.path().join("processor-checkpoint.key").as_path())
        );
        assert_eq!(
            c.audit.checkpoint_file.as_deref(),
            Some(dir.path().join("audit/checkpoints.jsonl").as_path())
        );
        let (_dir, file) = folder("[audit]\ncheckpoint_interval_ms = 0\n");
        let err = Config::load_from(Some(&file), env(&[]))
            .unwrap_err()
            .to_string();
        for key in [
            "audit.checkpoint_key",
            "audit.checkpoint_file",
            "audit.checkpoint_interval_ms",
        ] {
            assert!(err.contains(key), "{key} missing from {err}");
        }
        let (_dir, file) = folder("[audit]\ncheckpoints = false\n");
        assert!(
            !Config::load_from(Some(&file), env(&[]))
                .unwrap()
                .audit
                .checkpoints
        );
    }

    #[test]
    fn two_controllers_may_not_share_a_name() {
        let (_dir, file) = folder(
            "[[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/a\"\n\
             registry_endpoint = \"https://a:1\"\n\
             [[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/b\"\n\
             registry_endpoint = \"https://b:1\"\n",
        );
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(
            err.0
                .iter()
                .any(|e| e == "controllers[1]: name acme is used twice"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_identity_hash_key_is_refused() {
        let (_dir, file) = folder("identity_hash_key = \"\"");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].starts_with("identity_hash_key: required"), "{err}");
        let c = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_PROCESSOR__IDENTITY_HASH_KEY", "from env")]),
        )
        .unwrap();
        assert_eq!(c.identity_hash_key, "from env");
        assert_eq!(c.forget_after_days, 30);
    }

    #[test]
    fn the_signing_key_is_found_beside_the_config_file() {
        let (dir, file) = folder("signing_key = \"keys/processor-signing.key\"");
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        dsrelay_runtime::signing::SigningKey::generate()
            .write(&dir.path().join("keys/processor-signing.key"))
            .unwrap();
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(
            c.signing_key,
            Some(dir.path().join("keys/processor-signing.key"))
        );
    }

    /// Key files are read with the TLS files, so every file problem shows in one round.
    #[test]
    fn unreadable_key_files_are_reported_with_the_tls_files() {
        let (dir, file) = folder("signing_key = \"missing-signing.key\"");
        std::fs::write(dir.path().join("processor-checkpoint.key"), "not a key").unwrap();
        std::fs::remove_file(dir.path().join("processor.pem")).unwrap();
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        let starts = ["signing_key: ", "audit.checkpoint_key: ", "tls.cert: "];
        assert_eq!(err.0.len(), starts.len(), "{err}");
        for start in starts {
            assert!(err.0.iter().any(|e| e.starts_with(start)), "{start}: {err}");
        }
        assert!(err.to_string().contains("missing-signing.key"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_and_every_problem_reported() {
        let (_dir, file) = folder("operator = []");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(
            err.to_string()
                .contains("key operator: unknown key; known here: listen, "),
            "{err}"
        );

        let (dir, file) = folder("admin_listen = \"9465\"");
        std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
        let err = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_PROCESSOR__ACKS__BATCH_SIZE", "0")]),
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        for key in ["admin_listen", "acks.batch_size", "tls.ca"] {
            assert!(err.0.iter().any(|e| e.starts_with(key)), "{key}: {err}");
        }
    }

    /// A SQL table's categories must be the subprocessor's: the processor refuses to start
    /// naming the table and the category, and takes those it holds.
    #[test]
    fn a_sql_table_category_the_subprocessor_does_not_hold_is_refused() {
        let text = |categories: &str| {
            format!(
                "[[controllers]]\nname = \"acme\"\nidentity = \"spiffe://a\"\n\
                 registry_endpoint = \"https://a:1\"\n\
                 [[subprocessors]]\nname = \"accounting\"\n\
                 categories = [\"contact\", \"invoicing\"]\n\
                 [subprocessors.connector]\ntype = \"sql\"\nurl = \"sqlite://books.db\"\n\
                 [[subprocessors.connector.tables]]\ntable = \"customers\"\n\
                 action = \"delete\"\nmatch = {{ email = \"email\" }}\n\
                 categories = {categories}\n"
            )
        };
        let (_dir, file) = folder(&text("[\"contact\", \"billing\"]"));
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [
                "subprocessors[0].connector: tables[0] (customers): category \"billing\" is not \
              one of subprocessor accounting's categories (contact, invoicing); add it there \
              or name one of those"
            ],
            "{err}"
        );
        // The connector's own rules are reported the same way.
        let (_dir, file) = folder(&text("[]"));
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].starts_with(
                "subprocessors[0].connector: tables[0] (customers): categories must not be empty"
            ),
            "{err}"
        );
        let (_dir, file) = folder(&text("[\"invoicing\", \"contact\"]"));
        Config::load_from(Some(&file), env(&[])).unwrap();
    }

    #[test]
    fn several_controllers_need_every_connector_to_scope_each_of_them() {
        let (_dir, file) = folder(
            "[[controllers]]\nname = \"acme\"\nidentity = \"spiffe://a\"\n\
             registry_endpoint = \"https://a:1\"\n\
             [[subprocessors]]\nname = \"mail\"\ncategories = [\"marketing\"]\n\
             connector = { type = \"noop\" }\n\
             [[subprocessors]]\nname = \"crm\"\ncategories = [\"contact\"]\n\
             connector = { type = \"noop\" }\n",
        );
        let mut c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.contracts.progress_interval_ms, 1000);
        // One controller: unscoped connectors keep today's behaviour.
        assert!(c.scoping_errors(|_| None).is_empty());
        let other = |n: &str| (n == "crm").then(|| vec!["globex".to_string()]);
        let errors = c.scoping_errors(other);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("crm") && errors[0].contains("globex"),
            "{errors:?}"
        );
        let mut second = c.controllers[0].clone();
        second.name = "globex".into();
        second.identity = "spiffe://g".into();
        c.controllers.push(second);
        let errors = c.scoping_errors(other);
        // mail scopes nobody (both named); crm misses acme.
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors
            .iter()
            .any(|e| e.contains("subprocessor mail") && e.contains("controller acme")));
        assert!(errors
            .iter()
            .any(|e| e.contains("subprocessor crm") && e.contains("controller acme")));
        let both = |_: &str| Some(vec!["acme".to_string(), "globex".to_string()]);
        assert!(c.scoping_errors(both).is_empty());
    }

    #[test]
    fn a_subprocessor_name_must_fit_a_folder_and_a_package_path() {
        let load = |name: &str| {
            let (_dir, file) = folder(&format!(
                "[[subprocessors]]\nname = {name:?}\ncategories = [\"contact\"]\n\
                 connector = {{ type = \"noop\" }}\n"
            ));
            Config::load_from(Some(&file), env(&[]))
        };
        for good in [
            "a",
            "mail-marketing",
            "accounting_2.eu",
            "A9",
            &"x".repeat(MAX_SUBPROCESSOR_NAME),
        ] {
            if let Err(e) = load(good) {
                panic!("{good:?} refused: {e}");
            }
        }
        for bad in [
            String::new(),
            "x".repeat(MAX_SUBPROCESSOR_NAME + 1),
            "€".repeat(10),
            ".hidden".into(),
            "..".into(),
            "a/b".into(),
            "crm:eu".into(),
            "mail marketing".into(),
        ] {
            let err = load(&bad).expect_err(&bad);
            assert_eq!(err.0.len(), 1, "{bad:?}: {err}");
            assert_eq!(
                err.0[0],
                format!(
                    "subprocessors[0].name: {bad:?} must be 1 to 64 ASCII letters, digits, \
                     '-', '_' and '.', not starting with '.'"
                ),
            );
        }
    }

    #[test]
    fn max_rejections_defaults_to_five_and_must_be_positive() {
        let (_dir, file) = folder("");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.acks.max_rejections, 5);
        let err = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_PROCESSOR__ACKS__MAX_REJECTIONS", "0")]),
        )
        .unwrap_err();
        assert_eq!(err.0, ["acks.max_rejections: must be at least 1; it is 0"]);
    }

    /// Every key that sizes a semaphore or a claim, with the environment variable that
    /// sets it.
    const COUNTS: &[&str] = &[
        "tasks.concurrency",
        "tasks.export_concurrency",
        "tasks.batch_size",
        "acks.batch_size",
        "uploads.concurrency",
    ];

    /// Each is refused at 0 and past 65536 (where tokio's semaphore would panic once the
    /// service runs), one message naming it and its value; 1 and 65536 are accepted.
    #[test]
    fn every_concurrency_and_batch_size_is_bounded_naming_its_key() {
        let (_dir, file) = folder("");
        for fine in ["1", "65536"] {
            let all = COUNTS.iter().map(|k| (env_var(k), fine.to_string()));
            Config::load_from(Some(&file), all.collect::<Vec<_>>()).unwrap();
        }
        for bad in ["0", "65537"] {
            let all = COUNTS.iter().map(|k| (env_var(k), bad.to_string()));
            let err = Config::load_from(Some(&file), all.collect::<Vec<_>>()).unwrap_err();
            let want: Vec<String> = (COUNTS.iter())
                .map(|k| format!("{k}: must be from 1 to 65536; it is {bad}"))
                .collect();
            assert_eq!(err.0, want, "{bad}");
        }
        // The values that panicked after the start; a u32 key refuses them by its type.
        for (key, bad) in [
            ("tasks.export_concurrency", "2305843009213693952"),
            ("tasks.concurrency", "9223372036854775807"),
        ] {
            let err = Config::load_from(Some(&file), env(&[(&env_var(key), bad)])).unwrap_err();
            assert_eq!(
                err.0,
                [format!("{key}: must be from 1 to 65536; it is {bad}")]
            );
        }
    }

    /// A registry endpoint that no call could use is refused with the settings, not when
    /// the first acknowledgement is sent.
    #[test]
    fn a_malformed_registry_endpoint_is_refused_naming_its_key() {
        for bad in ["https://", "https://bad host:x", "registry.example:1"] {
            let (_dir, file) = folder(&format!(
                "[[controllers]]\nname = \"c\"\nidentity = \"spiffe://d/registry/c\"\n\
                 registry_endpoint = {bad:?}\n"
            ));
            let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
            assert_eq!(
                err.0,
                [format!(
                    "controllers[0].registry_endpoint: {bad:?} must be https://host:port"
                )]
            );
        }
    }

    /// Every duration key with the largest value it accepts, as environment variable name
    /// suffixes.
    const DURATIONS: &[(&str, u64)] = &[
        ("forget_sweep_interval_ms", MAX_DURATION_MS),
        ("tasks.poll_interval_ms", MAX_DURATION_MS),
        ("tasks.lease_ms", MAX_DURATION_MS),
        ("tasks.confirm_interval_ms", MAX_DURATION_MS),
        ("tasks.backoff.initial_ms", MAX_DURATION_MS),
        ("tasks.backoff.max_ms", MAX_DURATION_MS),
        ("acks.poll_interval_ms", MAX_DURATION_MS),
        ("acks.lease_ms", MAX_DURATION_MS),
        ("acks.call_timeout_ms", MAX_CALL_TIMEOUT_MS),
        ("acks.backoff.initial_ms", MAX_DURATION_MS),
        ("acks.backoff.max_ms", MAX_DURATION_MS),
        ("uploads.poll_interval_ms", MAX_DURATION_MS),
        ("uploads.lease_ms", MAX_DURATION_MS),
        ("uploads.stall_ms", MAX_DURATION_MS),
        ("uploads.call_timeout_ms", MAX_CALL_TIMEOUT_MS),
        ("uploads.backoff.initial_ms", MAX_DURATION_MS),
        ("uploads.backoff.max_ms", MAX_DURATION_MS),
        ("contracts.progress_interval_ms", MAX_DURATION_MS),
        ("shutdown_grace_ms", MAX_DURATION_MS),
        ("call_limit_ms", MAX_DURATION_MS),
        ("audit.checkpoint_interval_ms", MAX_DURATION_MS),
    ];

    /// The environment variable that sets `key` (`a.b_ms` → `<prefix>__A__B_MS`).
    fn env_var(key: &str) -> String {
        format!("{ENV_PREFIX}__{}", key.to_uppercase().replace('.', "__"))
    }

    /// Every duration key set to `value(its maximum)` through the environment.
    fn every_duration(value: impl Fn(u64) -> u64) -> Vec<(String, String)> {
        DURATIONS
            .iter()
            .map(|(key, max)| (env_var(key), value(*max).to_string()))
            .collect()
    }

    #[test]
    fn the_defaults_and_every_duration_at_its_bounds_are_accepted() {
        let (_dir, file) = folder("");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.tasks.lease_ms, 30_000);
        assert_eq!(c.uploads.lease_ms, 30_000);
        assert_eq!(c.uploads.stall_ms, 300_000);
        c.validate().unwrap();
        // Every one at 1 ms but the upload lease, which must outlast the 1 ms call timeout.
        let mut least = every_duration(|_| 1);
        let upload_lease = env_var("uploads.lease_ms");
        for (var, value) in &mut least {
            if *var == upload_lease {
                *value = "2".into();
            }
        }
        Config::load_from(Some(&file), least).unwrap();
        Config::load_from(Some(&file), every_duration(|max| max)).unwrap();
        // 0 where the code gives it a meaning: forget at once; reload TLS files on SIGHUP only.
        let (_dir, file) = folder("forget_after_days = 0");
        let c = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_PROCESSOR__TLS__RELOAD_INTERVAL_MS", "0")]),
        )
        .unwrap();
        assert_eq!(
            (c.forget_after_days, c.service.tls.reload_interval_ms),
            (0, 0)
        );
    }

    #[test]
    fn a_task_lease_of_zero_is_refused_naming_the_key_and_the_range() {
        let (_dir, file) = folder("[tasks]\nlease_ms = 0\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            ["tasks.lease_ms: must be from 1 ms to 2592000000 ms (30 days); it is 0"]
        );
    }

    /// An upload lease that a part's closing call may outlast is refused, naming both keys;
    /// the defaults (10 s within 30 s) pass. Before, nothing checked the two together.
    #[test]
    fn an_upload_call_timeout_not_shorter_than_the_upload_lease_is_refused() {
        let defaults = UploadConfig::default();
        assert!(defaults.call_timeout_ms < defaults.lease_ms);
        let (_dir, file) = folder("[uploads]\nlease_ms = 5000\ncall_timeout_ms = 5000\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [
                "uploads.call_timeout_ms (5000 ms) must be shorter than uploads.lease_ms \
                 (5000 ms): the lease must outlast a part's closing call"
            ]
        );
        let (_dir, file) = folder("[uploads]\nlease_ms = 5001\ncall_timeout_ms = 5000\n");
        Config::load_from(Some(&file), env(&[])).expect("a shorter call timeout");
    }

    #[test]
    fn every_duration_of_zero_is_refused_naming_its_key() {
        let (_dir, file) = folder("");
        let err = Config::load_from(Some(&file), every_duration(|_| 0)).unwrap_err();
        for (key, _) in DURATIONS {
            let named: Vec<_> = err
                .0
                .iter()
                .filter(|e| e.starts_with(&format!("{key}:")))
                .collect();
            // The shared keys' own check reports 0 (once); the others name the range.
            assert_eq!(named.len(), 1, "{key}: {err}");
        }
        assert_eq!(err.0.len(), DURATIONS.len(), "{err}");
        assert!(
            err.0.contains(
                &"acks.call_timeout_ms: must be from 1 ms to 3600000 ms (1 hour); it is 0"
                    .to_string()
            ),
            "{err}"
        );
    }

    #[test]
    fn every_duration_above_its_maximum_is_refused_naming_its_key() {
        let (_dir, file) = folder("");
        let err = Config::load_from(Some(&file), every_duration(|max| max + 1)).unwrap_err();
        assert_eq!(err.0.len(), DURATIONS.len(), "{err}");
        for (key, max) in DURATIONS {
            let want = format!("{key}: must be from 1 ms to {max} ms");
            assert!(err.0.iter().any(|e| e.starts_with(&want)), "{want}: {err}");
        }
        // The largest a TOML file can hold, a typo's value, and retention beyond ten years.
        let (_dir, file) = folder(
            "forget_after_days = 3651\n[tasks]\nconfirm_interval_ms = 9223372036854775807\n",
        );
        let err = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_PROCESSOR__TLS__RELOAD_INTERVAL_MS", "2592000001")]),
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            [
                // The shared settings' own check comes first.
                "tls.reload_interval_ms: must be from 0 ms to 2592000000 ms (30 days); it is \
                 2592000001",
                "forget_after_days: must be from 0 to 3650 days; it is 3651",
                "tasks.confirm_interval_ms: must be from 1 ms to 2592000000 ms (30 days); it \
                 is 9223372036854775807",
            ]
        );
    }

    #[test]
    fn callers_outside_the_trust_domain_or_their_role_are_named() {
        let (_dir, file) = folder(
            "operators = [\"spiffe://dsrelay.dev/operator/ops\", \"spiffe://dsrelay.dev/partner/crm\"]\n\
             [[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/acme\"\n\
             registry_endpoint = \"https://r.example:1\"\n\
             [[controllers]]\nname = \"other\"\nidentity = \"spiffe://other.example/registry/x\"\n\
             registry_endpoint = \"https://o.example:1\"\n",
        );
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        let errors = c
            .trust_errors("spiffe://dsrelay.dev/processor/payroll-bureau")
            .unwrap();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("controllers[1].identity: identity spiffe://other.example/registry/x is in trust domain other.example"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with(
                "operators[1]: identity spiffe://dsrelay.dev/partner/crm must name its role"
            ),
            "{errors:?}"
        );
    }

    const KEYS: &[&str] = &[
        "listen",
        "admin_listen",
        "admin_token",
        "database_url",
        "trust_domain",
        "log_json",
        "shutdown_grace_ms",
        "identity_hash_key",
        "operators",
        "data_dir",
        "signing_key",
        "forget_after_days",
        "forget_sweep_interval_ms",
        "tasks.backoff.initial_ms",
        "tasks.backoff.max_ms",
        "tasks.poll_interval_ms",
        "tasks.lease_ms",
        "tasks.batch_size",
        "tasks.concurrency",
        "tasks.export_concurrency",
        "tasks.confirm_interval_ms",
        "acks.poll_interval_ms",
        "acks.lease_ms",
        "acks.batch_size",
        "acks.call_timeout_ms",
        "acks.max_rejections",
        "uploads.poll_interval_ms",
        "uploads.lease_ms",
        "uploads.stall_ms",
        "uploads.concurrency",
        "uploads.call_timeout_ms",
        "contracts.progress_interval_ms",
    ];
    const ARRAYS: &[(&str, &[&str])] = &[
        ("controllers", &["name", "identity", "registry_endpoint"]),
        (
            "subprocessors",
            &[
                "name",
                "categories",
                "country",
                "transfer_mechanism",
                "description",
                "connector",
                "connector.type",
                "connector.url",
                "connector.tables",
                "connector.controllers",
                "connector.delay_ms",
                "connector.instructions",
                "connector.endpoint",
                "connector.identity",
                "connector.timeout_ms",
                "connector.base_url",
                "connector.api_key",
                "connector.list_id",
            ],
        ),
    ];

    proptest::proptest! {
        /// Whatever the file and the environment hold, loading answers a configuration or
        /// the problems; it never panics, and neither do the checks run at start.
        #[test]
        fn any_toml_loads_or_is_refused_without_panicking(
            text in dsrelay_runtime::config::arbitrary::document(KEYS, ARRAYS),
            env in dsrelay_runtime::config::arbitrary::overrides("DSRELAY_PROCESSOR", KEYS),
        ) {
            let (_dir, file) = folder(&text);
            match Config::load_from(Some(&file), env) {
                Ok(c) => {
                    let _ = c.trust_errors("spiffe://dsrelay.dev/processor/payroll-bureau");
                    let _ = c.scoping_errors(|_| None);
                }
                Err(e) => proptest::prop_assert!(!e.0.is_empty()),
            }
        }
    }
}
