//! The registry's configuration: where it listens and stores, who may call it, which
//! processors it routes to and which transfer recipients a request may name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use dsrelay_runtime::audit::signer::AuditConfig;
use dsrelay_runtime::backoff::Backoff;
use dsrelay_runtime::config::{
    check_at_least_one, check_backoff, check_checkpoint_key, check_count, check_endpoint, check_ms,
    ConfigErrors, MAX_CALL_TIMEOUT_MS, MAX_CONCURRENCY, MAX_DURATION_MS, MAX_RETENTION_DAYS,
};
use dsrelay_runtime::settings::{Defaults, ServiceConfig, ServiceSettings};
use dsrelay_runtime::signing::{KeyRing, PublicKey, Revocation};
use serde::{Deserialize, Deserializer, Serialize};

/// Prefix of environment variables that override the file (`DSRELAY_REGISTRY__LISTEN=...`).
pub const ENV_PREFIX: &str = "DSRELAY_REGISTRY";

/// Everything the registry needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where it listens and stores, its TLS files and log format: the keys every service
    /// shares, at the top level of the file.
    #[serde(flatten, deserialize_with = "service_settings")]
    pub service: ServiceSettings,
    /// Which certificate identities are partners and operators.
    #[serde(default)]
    pub identities: Vec<IdentityRole>,
    /// The processors requests are routed to.
    #[serde(default)]
    pub processors: Vec<ProcessorConfig>,
    /// The recipients a TRANSFER may name (GDPR art. 20(2)): Submit refuses any other name.
    #[serde(default)]
    pub recipients: Vec<RecipientConfig>,
    /// How deliveries to processors are retried.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// When the registry asks processors for status because acknowledgements are late.
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    /// Bounds on Watch streams.
    #[serde(default)]
    pub watch: WatchConfig,
    /// Per-partner Submit quotas; off by default.
    #[serde(default)]
    pub submit_quota: SubmitQuotaConfig,
    /// Bounds on what processors upload to packages and on their downloads.
    #[serde(default)]
    pub packages: PackagesConfig,
    /// Contract ends (ContractService).
    #[serde(default)]
    pub contracts: ContractsConfig,
    /// Key of the keyed hashes (HMAC-SHA256) that stay after raw identities are forgotten,
    /// for the audit trail and deduplication; also keys the Submit body hash. Required:
    /// anyone holding it can test a guessed e-mail address against the hashes, so keep it
    /// out of the database and never reuse a development key.
    #[serde(default)]
    pub identity_hash_key: String,
    /// Days after a request finished (COMPLETED, FAILED or CANCELLED) before its raw
    /// identities and body are removed from the store: the window in which a dispute about
    /// the request can still be answered from what was asked. Default 30; 0 to
    /// [`MAX_RETENTION_DAYS`] (3650), 0 forgetting at the next sweep.
    #[serde(default = "default_forget_after_days")]
    pub forget_after_days: u32,
    /// How often the registry looks for finished requests past `forget_after_days` (ms); 1
    /// to [`MAX_DURATION_MS`] (30 days).
    #[serde(default = "default_forget_sweep_interval_ms")]
    pub forget_sweep_interval_ms: u64,
    /// The folder return-of-data packages are kept in, one folder per request. A relative
    /// path is taken from the working directory, like the default SQLite database beside it.
    #[serde(default = "default_package_dir")]
    pub package_dir: PathBuf,
    /// Days a package is kept after its request finished; then its files are deleted and an
    /// event recorded. 1 to [`MAX_RETENTION_DAYS`] (3650).
    #[serde(default = "default_package_ttl_days")]
    pub package_ttl_days: u32,
    /// How often the registry looks for packages past their retention (ms); 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    #[serde(default = "default_package_sweep_interval_ms")]
    pub package_sweep_interval_ms: u64,
    /// Signed checkpoints of the audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// The default of `package_dir`: next to the default SQLite database.
pub const DEFAULT_PACKAGE_DIR: &str = ".dsrelay/registry-packages";

fn default_package_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PACKAGE_DIR)
}

fn default_package_ttl_days() -> u32 {
    30
}

fn default_package_sweep_interval_ms() -> u64 {
    60_000
}

fn default_forget_after_days() -> u32 {
    30
}

fn default_forget_sweep_interval_ms() -> u64 {
    60_000
}

/// A certificate identity and the role it has.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityRole {
    /// The identity as found in the certificate (its one URI SAN).
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
    /// The Ed25519 public key its deletion certificates are checked with: the standard
    /// base64 of the key's 32 bytes, or the path of a file holding it (SPKI PEM, as the
    /// processor's development PKI writes it, or the base64). Without it, every certificate
    /// the processor sends is kept as rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The keys the processor signed with before its `public_key` (after a rotation), given
    /// as `public_key` is. A certificate is checked with the key its `key_id` names, so what
    /// the processor signed before the rotation stays verified, when it arrives and whenever
    /// it is shown; take a key out of the list (one that leaked, say) and the certificates
    /// signed with it read as rejected. Needs `public_key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_public_keys: Vec<String>,
    /// Keys revoked as of a time (one that leaked, say): a certificate signed with one stays
    /// verified if the registry stored it before `revoked_at`, and one arriving at or after
    /// it is rejected, whatever dates its body gives. Needs `public_key`; a key listed here
    /// may not also be `public_key` or in `previous_public_keys`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_public_keys: Vec<RevokedKey>,
}

/// A key revoked as of a time: `{ key = "...", revoked_at = "2026-11-30T12:00:00Z" }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RevokedKey {
    /// The key, given as `public_key` is.
    pub key: String,
    /// From when (RFC 3339) what it signed is no longer trusted when it reaches the registry;
    /// may be in the future, to schedule a revocation.
    pub revoked_at: String,
}

impl ProcessorConfig {
    /// The keys its certificates are checked with, read from the settings (a file where one
    /// is named); `None` without a `public_key`.
    pub fn key_ring(&self) -> anyhow::Result<Option<KeyRing>> {
        key_ring(
            self.public_key.as_deref(),
            &self.previous_public_keys,
            &self.revoked_public_keys,
        )
    }
}

/// A recipient a subject's data may be transferred to: another controller, named by the
/// subject. Submit checks that a TRANSFER names one of these, and its Deliver carries the
/// recipient's name, endpoint and identity to the processors, which send the data there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecipientConfig {
    /// The name a partner gives in `transfer_recipient`; unique, 1 to
    /// [`MAX_RECIPIENT_NAME`] bytes.
    pub name: String,
    /// Where the recipient receives transfers (`TransferReceiver`), `https://host:port`; sent
    /// to the processors with a TRANSFER's Deliver, and called by them.
    pub endpoint: String,
    /// The certificate identity the recipient must present there (its one URI SAN);
    /// sent with the endpoint, and checked by the processors before they send anything.
    pub identity: String,
    /// Who the recipient is, for operators reading the configuration.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The Ed25519 public key the recipient signs its transfer receipts with, given as a
    /// processor's `public_key` is. With it, a receipt the key does not verify is refused
    /// (an acknowledgement's) or left out (a processor's answer's), so that a task completes
    /// only on the recipient's own word; without it, receipts are taken unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The keys the recipient signed with before its `public_key` (after a rotation), as a
    /// processor's `previous_public_keys`. Needs `public_key`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_public_keys: Vec<String>,
    /// Keys revoked as of a time, as a processor's `revoked_public_keys`: a receipt signed
    /// with one is taken only when the acknowledgement or answer carrying it reaches the
    /// registry before `revoked_at`, and the key is no longer sent to the processors then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_public_keys: Vec<RevokedKey>,
}

impl RecipientConfig {
    /// The keys its receipts are checked with; `None` without a `public_key`.
    pub fn key_ring(&self) -> anyhow::Result<Option<KeyRing>> {
        key_ring(
            self.public_key.as_deref(),
            &self.previous_public_keys,
            &self.revoked_public_keys,
        )
    }
}

/// The ring of `public_key`, `previous` and `revoked`, each key read as a key or from the
/// file it names; `None` without a `public_key` (and then no `previous` or `revoked`).
fn key_ring(
    public_key: Option<&str>,
    previous: &[String],
    revoked: &[RevokedKey],
) -> anyhow::Result<Option<KeyRing>> {
    use anyhow::Context;
    let Some(current) = public_key else {
        anyhow::ensure!(
            previous.is_empty(),
            "previous_public_keys needs a public_key (the key it signs with now)"
        );
        anyhow::ensure!(
            revoked.is_empty(),
            "revoked_public_keys needs a public_key (the key it signs with now)"
        );
        return Ok(None);
    };
    let current = PublicKey::from_config(current).context("public_key")?;
    let previous = previous
        .iter()
        .enumerate()
        .map(|(i, k)| {
            PublicKey::from_config(k).with_context(|| format!("previous_public_keys[{i}]"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ring = KeyRing::new(current, previous).context("previous_public_keys")?;
    let revoked = revoked
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let key = PublicKey::from_config(&r.key)
                .with_context(|| format!("revoked_public_keys[{i}].key"))?;
            let revoked_at_ms = dsrelay_runtime::signing::parse_revoked_at(&r.revoked_at)
                .with_context(|| format!("revoked_public_keys[{i}].revoked_at"))?;
            Ok(Revocation { key, revoked_at_ms })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ring.with_revoked(revoked)
        .context("revoked_public_keys")
        .map(Some)
}

/// At most this many receipt keys of one recipient: `public_key`, `previous_public_keys` and
/// `revoked_public_keys` together, since a revoked key is sent until its `revoked_at`. A
/// processor refuses a Deliver whose `recipient.public_keys` holds more (processor.proto,
/// `TransferRecipient.public_keys`), so a recipient with more could never be transferred to.
pub const MAX_RECIPIENT_KEYS: usize = 16;

/// At most this many bytes in a recipient's name: the longest `transfer_recipient` Submit
/// accepts, so that every configured recipient can be named.
pub const MAX_RECIPIENT_NAME: usize = 256;

/// Delivery outbox settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Retry spacing, of the outbox and of a failed ListSubprocessors (capped there at
    /// `reconcile.chain_interval_ms`); `initial_ms` and `max_ms` 1 to [`MAX_DURATION_MS`]
    /// (30 days).
    pub backoff: Backoff,
    /// How often the dispatcher looks for due deliveries when nothing wakes it (ms); 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    pub poll_interval_ms: u64,
    /// How long a claimed delivery is reserved for this replica (ms); 1 to
    /// [`MAX_DURATION_MS`] (30 days): at 0 a claim has expired when it is taken, so another
    /// replica could send the same row at once.
    pub lease_ms: u64,
    /// Deliveries claimed per round; 1 to [`MAX_CONCURRENCY`] (65536).
    pub batch_size: u32,
    /// Deliveries in flight at once. Each call waits on the processor's commit, so more in
    /// flight share more commits there and downstream: with the processor's 128 tasks at
    /// once, 64 completed about 45 % more one-hop erasures than 16, at about a quarter less
    /// CPU per erasure, while a burst of Submits is accepted about half as fast, since the
    /// propagation keeps up with it on the same cores instead of falling behind
    /// (`docs/benchmarks.md`, session 27). 1 to [`MAX_CONCURRENCY`] (65536).
    pub concurrency: usize,
    /// Deadline of one call to a processor (ms): Deliver, Cancel, UpdateContractEnd and
    /// ExtendDueDate, and the reconciler's GetStatus and ListSubprocessors. 1 to
    /// [`MAX_CALL_TIMEOUT_MS`] (one hour). The default, 15 s, outlasts a processor's wait for
    /// its own database ([`dsrelay_runtime::store::POOL_WAIT`], 10 s), so a processor whose
    /// database is out of reach answers UNAVAILABLE saying so, which the delivery's error
    /// then shows, rather than the call running out first with nothing said.
    pub call_timeout_ms: u64,
    /// Refusals after which an outbox row (a delivery, a cancellation, a contract end's
    /// update or a due date's extension) is dead-lettered: no longer sent, shown in Get and
    /// the request's events. A refusal is an answer retrying cannot change
    /// (INVALID_ARGUMENT, PERMISSION_DENIED, UNIMPLEMENTED, FAILED_PRECONDITION); each is
    /// still retried with `backoff` until then, in case the processor is fixed meanwhile.
    /// At least 1.
    pub max_refusals: u32,
    /// While Submits queue for the intake writer (4 or more waiting for their commit), the
    /// dispatcher claims at most once per this many ms, so that accepting requests (each
    /// answered once durable) does not share the cores and the store's writer with
    /// delivering earlier ones; the deliveries wait and catch up when the burst ends. Off (0)
    /// by default: on this machine 250 ms took a burst's accepted Submits from about 600/s to
    /// 3,700 to 4,500/s and cost one hop of real work 9 to 15 % of its completed erasures/s
    /// (`docs/benchmarks.md`, session 37). 0 to [`MAX_DURATION_MS`].
    pub yield_to_intake_ms: u64,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            poll_interval_ms: 1000,
            lease_ms: 30_000,
            batch_size: 64,
            concurrency: 64,
            call_timeout_ms: 15_000,
            max_refusals: 5,
            yield_to_intake_ms: 0,
        }
    }
}

/// Reconciliation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// How often to look for quiet requests (ms); 1 to [`MAX_DURATION_MS`] (30 days).
    pub interval_ms: u64,
    /// A request with no acknowledgement for this long gets a status check (ms); 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    pub ack_timeout_ms: u64,
    /// How often to ask every processor for its subprocessor list (ms); also at start. A
    /// processor whose answer failed is asked again after `delivery.backoff` instead (growing
    /// with each failure in a row), at most this long. 1 to [`MAX_DURATION_MS`] (30 days).
    pub chain_interval_ms: u64,
    /// A status check that finds nothing new waits, before the next one, as long again as
    /// the request has been unchanged, up to this (ms). A request that waits for months (a
    /// contract end's grace period, data retained for years) is then asked about daily, not
    /// every `ack_timeout_ms`. The wait is measured from the request's last change of state,
    /// so an acknowledgement that moves the request resets it; one that does not (a task's
    /// progress within the same request state) brings one check `ack_timeout_ms` later, and
    /// then the long wait resumes. 0 to [`MAX_DURATION_MS`] (30 days); 0: no backing off,
    /// a quiet request is checked every `ack_timeout_ms`.
    pub max_backoff_ms: u64,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
            ack_timeout_ms: 120_000,
            chain_interval_ms: 600_000,
            max_backoff_ms: 86_400_000,
        }
    }
}

/// Bounds on Watch streams: each open stream holds a task and a store read per change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Watch streams one caller (partner or operator, by configured name) may hold open at
    /// once; one more is RESOURCE_EXHAUSTED.
    pub streams_per_caller: u32,
    /// Longest an open stream waits before it reads its request's events again (ms) when no
    /// change in this process woke it. Changes made through another replica sharing the
    /// database wake nobody here, so this bounds how late a watcher hears of them. 1 to
    /// [`MAX_DURATION_MS`] (30 days).
    pub poll_interval_ms: u64,
    /// How long one Watch stream may stay open (ms): then it ends with UNAVAILABLE naming
    /// the `after_event_id` to watch again from, so that a stream its caller never closes,
    /// or never reads, does not hold a task and a slot forever. 1 to
    /// [`MAX_WATCH_STREAM_MS`] (one day).
    pub max_stream_ms: u64,
}

/// The longest `watch.max_stream_ms` accepted: one day (24 times the default). A caller
/// watches on from where a stream ended, so a longer lifetime gains nothing but streams
/// that hold a task and a slot for days.
pub const MAX_WATCH_STREAM_MS: u64 = 86_400_000;

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            streams_per_caller: 32,
            poll_interval_ms: 1_000,
            max_stream_ms: 3_600_000,
        }
    }
}

/// Per-partner Submit quotas: a token bucket per partner name, holding up to `burst` Submits
/// and refilled at `per_second`; a Submit that finds it empty is RESOURCE_EXHAUSTED with the
/// time until a token is free. Each registry process keeps its own buckets (`quota.rs`), so
/// behind `n` replicas a partner may submit `n` times as much. Operators are not limited.
///
/// Off by default (no key set): which rate is right depends on the partners, and one that
/// migrates a backlog, or the benchmark, submits thousands a second from one partner.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SubmitQuotaConfig {
    /// Submits a second each partner's bucket gains; from [`MIN_SUBMITS_PER_SECOND`] to
    /// [`MAX_SUBMITS_PER_SECOND`]. Set with `burst`, or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_second: Option<f64>,
    /// The most Submits each partner's bucket holds: how many may come at once after a
    /// quiet spell. 1 to [`MAX_SUBMIT_BURST`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Limits of single partners, by the `name` of their `[[identities]]` entries (of role
    /// partner), in place of the table's; a key left out is the table's. Without the
    /// table's keys only the partners named here are limited, and each must set both.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub partners: BTreeMap<String, PartnerSubmitQuota>,
}

/// One partner's Submit quota (`[submit_quota.partners.NAME]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PartnerSubmitQuota {
    /// In place of `submit_quota.per_second`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_second: Option<f64>,
    /// In place of `submit_quota.burst`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// The slowest `per_second` accepted: one Submit in under three hours. Slower is a typo
/// (a missing zero), and the time to wait for a token must stay a sensible number.
pub const MIN_SUBMITS_PER_SECOND: f64 = 0.0001;
/// The fastest `per_second` accepted: far more than a registry commits.
pub const MAX_SUBMITS_PER_SECOND: f64 = 1_000_000.0;
/// The largest `burst` accepted.
pub const MAX_SUBMIT_BURST: u32 = 1_000_000;

impl SubmitQuotaConfig {
    /// Every key set outside its range or where it does not belong, by its full key.
    fn errors(&self, identities: &[IdentityRole]) -> Vec<String> {
        let mut errors = Vec::new();
        let table = "submit_quota";
        match (self.per_second, self.burst) {
            (Some(_), None) => errors.push(format!(
                "{table}.burst: required with {table}.per_second (the most Submits at once)"
            )),
            (None, Some(_)) => errors.push(format!(
                "{table}.per_second: required with {table}.burst (the Submits a second)"
            )),
            _ => {}
        }
        check_limits(&mut errors, table, self.per_second, self.burst);
        for (name, own) in &self.partners {
            let key = format!("{table}.partners.{name}");
            match identities.iter().find(|i| &i.name == name) {
                None => errors.push(format!(
                    "{key}: no [[identities]] entry is named {name}; name a partner"
                )),
                Some(i) if i.role != Role::Partner => errors.push(format!(
                    "{key}: {name} is an operator, whose Submits are not limited; name a partner"
                )),
                Some(_) => {}
            }
            if own.per_second.is_none() && own.burst.is_none() {
                errors.push(format!("{key}: set per_second, burst or both"));
            } else {
                for (field, mine, table_s) in [
                    (
                        "per_second",
                        own.per_second.is_some(),
                        self.per_second.is_some(),
                    ),
                    ("burst", own.burst.is_some(), self.burst.is_some()),
                ] {
                    if !mine && !table_s {
                        errors.push(format!(
                            "{key}.{field}: required, since {table} sets no {field} to take"
                        ));
                    }
                }
            }
            check_limits(&mut errors, &key, own.per_second, own.burst);
        }
        errors
    }
}

/// Range errors of the `per_second` and `burst` of `table`, where set.
fn check_limits(
    errors: &mut Vec<String>,
    table: &str,
    per_second: Option<f64>,
    burst: Option<u32>,
) {
    if let Some(v) = per_second {
        // `!(..contains)` refuses NaN too, which TOML can spell.
        if !(MIN_SUBMITS_PER_SECOND..=MAX_SUBMITS_PER_SECOND).contains(&v) {
            errors.push(format!(
                "{table}.per_second: must be from {MIN_SUBMITS_PER_SECOND} to \
                 {MAX_SUBMITS_PER_SECOND} Submits a second; it is {v}"
            ));
        }
    }
    if let Some(v) = burst {
        if !(1..=MAX_SUBMIT_BURST).contains(&v) {
            errors.push(format!(
                "{table}.burst: must be from 1 to {MAX_SUBMIT_BURST} Submits; it is {v}"
            ));
        }
    }
}

/// Bounds on return-of-data packages: what one processor's part may take of the package
/// folder before it is declared complete, how many downloads one caller may run, and how
/// many upload streams one processor may hold open.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PackagesConfig {
    /// Bytes one part (one processor's export of one subprocessor) may hold: the sizes its
    /// files' headers announce, whether their bytes came yet or not, and for a file streamed
    /// while it is written (its size comes at its end) the bytes stored of it so far. A file
    /// that would pass it is refused RESOURCE_EXHAUSTED. At least 1.
    pub max_part_bytes: u64,
    /// Files one part may register: the first file past it is refused RESOURCE_EXHAUSTED,
    /// before any of its bytes are taken. 1 to [`MAX_FILES_PER_PART`] (10,000), the most a
    /// CompletePart may list.
    pub max_files_per_part: u32,
    /// DownloadPackage streams one caller (partner or operator, by configured name) may hold
    /// open at once; one more is RESOURCE_EXHAUSTED. At least 1.
    pub downloads_per_caller: u32,
    /// ExportUploadService.UploadFile streams one processor (by configured name) may hold
    /// open at once on this registry; one more is RESOURCE_EXHAUSTED, before its first
    /// message is read. At least 1. The default, 64: with its defaults a processor replica
    /// opens at most 16 at once (its uploader `uploads.concurrency` 4 exports times
    /// `FILES_AT_ONCE` 2 files = 8; its head start, 4 exports written at once
    /// (`tasks.export_concurrency`), each streaming the file its connector writes and at
    /// most the previous one still finishing = 8); twice that is 32, for each of two
    /// replicas of a processor.
    pub uploads_per_processor: u32,
}

/// The most files a part may list: CompletePart's limit, the ceiling of
/// `packages.max_files_per_part`.
pub const MAX_FILES_PER_PART: u32 = dsrelay_runtime::export_files::MAX_FILES_PER_PART as u32;

impl PackagesConfig {
    /// Every bound set outside its range, by its full key.
    fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.max_part_bytes == 0 {
            errors.push("packages.max_part_bytes: must be at least 1".into());
        }
        if self.max_files_per_part == 0 || self.max_files_per_part > MAX_FILES_PER_PART {
            errors.push(format!(
                "packages.max_files_per_part: must be 1 to {MAX_FILES_PER_PART} (the most a \
                 CompletePart may list)"
            ));
        }
        if self.downloads_per_caller == 0 {
            errors.push("packages.downloads_per_caller: must be at least 1".into());
        }
        if self.uploads_per_processor == 0 {
            errors.push("packages.uploads_per_processor: must be at least 1".into());
        }
        errors
    }
}

impl Default for PackagesConfig {
    fn default() -> Self {
        Self {
            max_part_bytes: 64 << 30,
            max_files_per_part: MAX_FILES_PER_PART,
            downloads_per_caller: 4,
            uploads_per_processor: 64,
        }
    }
}

/// Contract-end settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContractsConfig {
    /// Calendar months the processor keeps a controller's data after the contract's effective
    /// date when no choice was made (`grace_ends_at`); six by default, as the privacy notices
    /// promise. Every contract end's `grace_ends_at` is computed with it when it is created.
    pub grace_months: u32,
}

impl Default for ContractsConfig {
    fn default() -> Self {
        Self { grace_months: 6 }
    }
}

/// Where the registry listens and stores unless configured otherwise.
pub const DEFAULTS: Defaults = Defaults {
    listen: "127.0.0.1:50051",
    database_url: "sqlite://.dsrelay/registry.db",
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
        "identities",
        "processors",
        "recipients",
        "delivery",
        "reconcile",
        "watch",
        "submit_quota",
        "packages",
        "contracts",
        "identity_hash_key",
        "forget_after_days",
        "forget_sweep_interval_ms",
        "package_dir",
        "package_ttl_days",
        "package_sweep_interval_ms",
        "audit",
    ];

    fn relative_to(&mut self, dir: &Path) {
        self.service.relative_to(dir);
        self.audit.relative_to(dir);
        let processors = (self.processors.iter_mut()).map(|p| {
            (
                &mut p.public_key,
                &mut p.previous_public_keys,
                &mut p.revoked_public_keys,
            )
        });
        let recipients = (self.recipients.iter_mut()).map(|r| {
            (
                &mut r.public_key,
                &mut r.previous_public_keys,
                &mut r.revoked_public_keys,
            )
        });
        for (current, previous, revoked) in processors.chain(recipients) {
            let revoked = revoked.iter_mut().map(|r| &mut r.key);
            // A key given inline stays as it is; a relative file name is the config's.
            for key in current.iter_mut().chain(previous).chain(revoked) {
                if PublicKey::parse(key).is_err() && Path::new(key.as_str()).is_relative() {
                    *key = dir.join(key.as_str()).to_string_lossy().into_owned();
                }
            }
        }
    }

    fn check(&self) -> Result<(), ConfigErrors> {
        let mut errors = self.validate().err().map_or_else(Vec::new, |e| e.0);
        // Read here, not only at start-up, so a bad key is reported with the other files.
        check_checkpoint_key(&mut errors, &self.audit);
        for (i, p) in self.processors.iter().enumerate() {
            if let Err(e) = p.key_ring() {
                errors.push(format!("processors[{i}].{e:#}"));
            }
        }
        for (i, r) in self.recipients.iter().enumerate() {
            match r.key_ring() {
                Err(e) => errors.push(format!("recipients[{i}].{e:#}")),
                Ok(Some(ring)) => {
                    // Counted with every revoked key: before its `revoked_at` a revoked key
                    // is sent too, and the ring has already refused a key given twice.
                    let count = ring.keys().len() + ring.revoked().len();
                    if count > MAX_RECIPIENT_KEYS {
                        errors.push(format!(
                            "recipients[{i}]: recipient {} has {count} receipt keys \
                             (public_key, previous_public_keys and revoked_public_keys), more \
                             than the {MAX_RECIPIENT_KEYS} a processor takes with a transfer, \
                             so every transfer to it would be refused; drop the oldest \
                             previous_public_keys (and revoked_public_keys whose revoked_at \
                             has passed) until at most {MAX_RECIPIENT_KEYS} are left",
                            r.name
                        ));
                    }
                }
                Ok(None) => {}
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

impl Config {
    /// Loads the file (if any) and `DSRELAY_REGISTRY__*` overrides, then validates and
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

    /// Every configured caller whose identity is outside the registry's trust domain
    /// (the `trust_domain` key, else the one of `own_identity`) or does not name its role:
    /// partners as `partner`, operators as `operator`, processors as `processor`. Transfer
    /// recipients are not callers (they may sit at another organisation) and are matched
    /// exactly only.
    pub fn trust_errors(&self, own_identity: &str) -> anyhow::Result<Vec<String>> {
        use dsrelay_runtime::trust::{check_callers, effective_trust_domain, ConfiguredCaller};
        let domain = effective_trust_domain(self.service.trust_domain.as_deref(), own_identity)?;
        let identity_keys: Vec<String> = (0..self.identities.len())
            .map(|i| format!("identities[{i}].identity"))
            .collect();
        let processor_keys: Vec<String> = (0..self.processors.len())
            .map(|i| format!("processors[{i}].identity"))
            .collect();
        let people = self
            .identities
            .iter()
            .zip(&identity_keys)
            .map(|(r, key)| ConfiguredCaller {
                key,
                identity: &r.identity,
                role_path: match r.role {
                    Role::Partner => "partner",
                    Role::Operator => "operator",
                },
            });
        let processors =
            self.processors
                .iter()
                .zip(&processor_keys)
                .map(|(p, key)| ConfiguredCaller {
                    key,
                    identity: &p.identity,
                    role_path: "processor",
                });
        Ok(check_callers(&domain, people.chain(processors)))
    }

    /// Every problem with the configuration that shows without looking at the file system,
    /// reported together.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = self.service.validate();
        let mut seen_ids = BTreeSet::new();
        // Requests belong to a partner by name: two identities under one name would see
        // and act on each other's requests.
        let mut seen_names = BTreeSet::new();
        for (i, r) in self.identities.iter().enumerate() {
            if r.identity.is_empty() || r.name.is_empty() {
                errors.push(format!(
                    "identities[{i}]: identity and name must not be empty"
                ));
            }
            if !seen_ids.insert(r.identity.clone()) {
                errors.push(format!("identities[{i}]: {} is listed twice", r.identity));
            }
            if !r.name.is_empty() && !seen_names.insert(r.name.clone()) {
                errors.push(format!(
                    "identities[{i}]: name {} is used twice; each identity needs a name of its own",
                    r.name
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.processors.iter().enumerate() {
            if !names.insert(p.name.clone()) {
                errors.push(format!("processors[{i}]: name {} is used twice", p.name));
            }
            // A processor's name is the top folder of its parts in a package and its download.
            let field = format!("processors[{i}].name");
            if let Some(v) = dsrelay_runtime::export_files::file_name_violation(&field, &p.name) {
                errors.push(format!("{}: {:?} {}", v.field, p.name, v.rule));
            }
            if !seen_ids.insert(p.identity.clone()) {
                errors.push(format!(
                    "processors[{i}]: identity {} is already given another role",
                    p.identity
                ));
            }
            check_endpoint(
                &mut errors,
                &format!("processors[{i}].endpoint"),
                &p.endpoint,
            );
            if p.categories.is_empty() {
                errors.push(format!(
                    "processors[{i}].categories: list the data categories {} holds",
                    p.name
                ));
            }
        }
        if self.package_dir.as_os_str().is_empty() {
            errors.push("package_dir: must not be empty".into());
        }
        if self.watch.streams_per_caller == 0 {
            errors.push("watch.streams_per_caller: must be at least 1".into());
        }
        errors.extend(self.packages.errors());
        errors.extend(self.submit_quota.errors(&self.identities));
        if self.contracts.grace_months == 0 || self.contracts.grace_months > 120 {
            errors.push("contracts.grace_months: must be 1 to 120".into());
        }
        if self.identity_hash_key.is_empty() {
            errors.push(
                "identity_hash_key: required; set a long random secret (the key of the hashes \
                 kept after identities are forgotten)"
                    .into(),
            );
        }
        let mut recipients = BTreeSet::new();
        for (i, r) in self.recipients.iter().enumerate() {
            if r.name.is_empty() || r.name.len() > MAX_RECIPIENT_NAME {
                errors.push(format!(
                    "recipients[{i}].name: must be 1 to {MAX_RECIPIENT_NAME} bytes"
                ));
            } else if !recipients.insert(r.name.as_str()) {
                errors.push(format!("recipients[{i}]: name {} is used twice", r.name));
            }
            check_endpoint(
                &mut errors,
                &format!("recipients[{i}].endpoint"),
                &r.endpoint,
            );
            if r.identity.trim().is_empty() {
                errors.push(format!(
                    "recipients[{i}].identity: the certificate identity the recipient \
                     presents is required (e.g. spiffe://example.org/recipient)"
                ));
            }
        }
        // Each sizes a semaphore or a claim: 0 would send nothing, and a huge value would
        // panic in the semaphore or allocate for it once the service runs.
        let d = &self.delivery;
        for (key, value) in [
            ("delivery.concurrency", d.concurrency as u64),
            ("delivery.batch_size", u64::from(d.batch_size)),
        ] {
            check_count(&mut errors, key, value, 1..=MAX_CONCURRENCY);
        }
        check_at_least_one(
            &mut errors,
            "delivery.max_refusals",
            u64::from(d.max_refusals),
        );
        errors.extend(self.audit.errors());
        self.duration_errors(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Every duration outside its accepted range, by its full key: 0 where it would make a
    /// lease expire as it is taken, a call fail at once or a loop spin, and anything above
    /// [`MAX_DURATION_MS`] (a call's deadline: [`MAX_CALL_TIMEOUT_MS`], a Watch stream's
    /// lifetime: [`MAX_WATCH_STREAM_MS`]), which is a typo and would overflow once added to
    /// a clock reading. `forget_after_days` and `reconcile.max_backoff_ms` may be 0.
    fn duration_errors(&self, errors: &mut Vec<String>) {
        for (key, value, min) in [
            ("forget_after_days", self.forget_after_days, 0),
            ("package_ttl_days", self.package_ttl_days, 1),
        ] {
            if !(min..=MAX_RETENTION_DAYS).contains(&value) {
                errors.push(format!(
                    "{key}: must be from {min} to {MAX_RETENTION_DAYS} days; it is {value}"
                ));
            }
        }
        let any = 1..=MAX_DURATION_MS;
        let (d, r, w) = (&self.delivery, &self.reconcile, &self.watch);
        for (key, value, range) in [
            (
                "forget_sweep_interval_ms",
                self.forget_sweep_interval_ms,
                any.clone(),
            ),
            (
                "package_sweep_interval_ms",
                self.package_sweep_interval_ms,
                any.clone(),
            ),
            ("delivery.poll_interval_ms", d.poll_interval_ms, any.clone()),
            ("delivery.lease_ms", d.lease_ms, any.clone()),
            (
                "delivery.yield_to_intake_ms",
                d.yield_to_intake_ms,
                0..=MAX_DURATION_MS,
            ),
            (
                "delivery.call_timeout_ms",
                d.call_timeout_ms,
                1..=MAX_CALL_TIMEOUT_MS,
            ),
            ("reconcile.interval_ms", r.interval_ms, any.clone()),
            ("reconcile.ack_timeout_ms", r.ack_timeout_ms, any.clone()),
            (
                "reconcile.chain_interval_ms",
                r.chain_interval_ms,
                any.clone(),
            ),
            (
                "reconcile.max_backoff_ms",
                r.max_backoff_ms,
                0..=MAX_DURATION_MS,
            ),
            ("watch.poll_interval_ms", w.poll_interval_ms, any),
            (
                "watch.max_stream_ms",
                w.max_stream_ms,
                1..=MAX_WATCH_STREAM_MS,
            ),
        ] {
            check_ms(errors, key, value, range);
        }
        check_backoff(errors, "delivery", &d.backoff);
    }

    /// Every data category some processor holds.
    pub fn known_categories(&self) -> BTreeSet<&str> {
        self.processors
            .iter()
            .flat_map(|p| p.categories.iter().map(String::as_str))
            .collect()
    }

    /// The recipient named `name`, as a Deliver carries it to the processors.
    pub fn recipient(&self, name: &str) -> Option<dsrelay_proto::v1::TransferRecipient> {
        self.recipients.iter().find(|r| r.name == name).map(|r| {
            dsrelay_proto::v1::TransferRecipient {
                name: r.name.clone(),
                endpoint: r.endpoint.clone(),
                identity: r.identity.clone(),
                // The dispatcher adds the keys, read once at the start (`Store::receipt_keys`).
                public_keys: Vec::new(),
            }
        })
    }

    /// The names a TRANSFER may give as its recipient.
    pub fn known_recipients(&self) -> BTreeSet<&str> {
        self.recipients.iter().map(|r| r.name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A processor whose database is out of reach answers UNAVAILABLE after the store's wait
    /// for a connection: the default deadline of the calls to it must outlast that wait, or
    /// the delivery records the registry's own timeout instead of the reason.
    #[test]
    fn the_default_call_deadline_outlasts_the_stores_wait_for_a_connection() {
        let wait = dsrelay_runtime::store::POOL_WAIT.as_millis() as u64;
        assert!(DeliveryConfig::default().call_timeout_ms > wait);
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
        let (_dir, file) = folder("pakage_dir = \"p\"\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].starts_with(&format!(
                "{}: key pakage_dir: unknown key; known here: listen, admin_listen, ",
                file.display()
            )),
            "{err}"
        );
        assert!(err.0[0].contains(", package_dir, "), "{err}");
    }

    /// `KEYS` lists exactly this service's own top-level keys: those a full configuration
    /// writes beside the shared ones.
    #[test]
    fn the_listed_top_level_keys_are_this_service_s() {
        let (_dir, file) = folder("");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        let mut listed: Vec<String> = Config::KEYS.iter().map(|k| k.to_string()).collect();
        listed.sort();
        assert_eq!(dsrelay_runtime::settings::own_keys(&c), listed);
    }

    /// A folder with a configuration file naming TLS files that exist, an identity hash
    /// key unless `extra` sets (or misspells) one, and checkpoint files unless `extra` has an
    /// `[audit]` table.
    fn folder(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let extra = if extra.contains("identity_hash_key") {
            extra.to_string()
        } else {
            format!("identity_hash_key = \"test key\"\n{extra}")
        };
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "registry.pem", "registry.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        dsrelay_runtime::signing::SigningKey::generate()
            .write(&dir.path().join("registry-signing.key"))
            .unwrap();
        let file = dir.path().join("registry.toml");
        std::fs::write(
            &file,
            format!(
                "{extra}\n[tls]\nca = \"ca.pem\"\ncert = \"registry.pem\"\nkey = \"registry.key\"\n{}",
                if extra.contains("[audit]") {
                    ""
                } else {
                    "[audit]\ncheckpoint_key = \"registry-signing.key\"\n\
                     checkpoint_file = \"audit/checkpoints.jsonl\"\n"
                }
            ),
        )
        .unwrap();
        (dir, file)
    }

    #[test]
    fn a_processor_public_key_file_is_the_config_folder_s_and_an_inline_key_stays() {
        use dsrelay_runtime::signing::SigningKey;
        let inline = SigningKey::generate().public_key().to_base64();
        let processor = |name: &str, key: &str, previous: &str| {
            format!(
                "[[processors]]\nname = \"{name}\"\nendpoint = \"https://p:1\"\n\
                 identity = \"spiffe://x/{name}\"\ncategories = [\"c\"]\npublic_key = \"{key}\"\n\
                 previous_public_keys = [{previous}]\n"
            )
        };
        let text = format!(
            "{}{}",
            processor("a", "keys/a.pub.pem", "\"keys/a-old.pub.pem\""),
            processor("b", &inline, &format!("{:?}", "keys/a-old.pub.pem"))
        );
        let (dir, file) = folder(&text);
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        for stem in ["a", "a-old"] {
            let key = SigningKey::generate();
            key.write(&dir.path().join(format!("keys/{stem}.key")))
                .unwrap();
        }
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        let at = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
        assert_eq!(
            c.processors[0].public_key.as_deref(),
            Some(at("keys/a.pub.pem").as_str())
        );
        assert_eq!(
            c.processors[0].previous_public_keys,
            [at("keys/a-old.pub.pem")]
        );
        assert_eq!(c.processors[1].public_key.as_deref(), Some(inline.as_str()));
        assert_eq!(
            c.processors[1].previous_public_keys,
            [at("keys/a-old.pub.pem")]
        );
        let ring = c.processors[0].key_ring().unwrap().unwrap();
        let old = dsrelay_runtime::signing::PublicKey::from_config(&at("keys/a-old.pub.pem"));
        assert!(ring.holds(&old.unwrap().key_id()));
    }

    /// A previous key without a current one, a key listed twice and a key file that is not
    /// there are each reported by the load, naming the processor's entry.
    #[test]
    fn a_processor_s_previous_keys_are_checked_when_the_file_is_loaded() {
        let key = dsrelay_runtime::signing::SigningKey::generate()
            .public_key()
            .to_base64();
        let processor = |name: &str, keys: &str| {
            format!(
                "[[processors]]\nname = \"{name}\"\nendpoint = \"https://{name}:1\"\n\
                 identity = \"spiffe://x/{name}\"\ncategories = [\"c\"]\n{keys}\n"
            )
        };
        let text = [
            processor("a", &format!("previous_public_keys = [{key:?}]")),
            processor(
                "b",
                &format!("public_key = {key:?}\nprevious_public_keys = [{key:?}]"),
            ),
            processor(
                "c",
                &format!("public_key = {key:?}\nprevious_public_keys = [\"gone.pem\"]"),
            ),
        ]
        .concat();
        let (_dir, file) = folder(&text);
        let errors = Config::load_from(Some(&file), env(&[])).unwrap_err().0;
        let said = errors.join("\n");
        for expected in [
            "processors[0].previous_public_keys needs a public_key",
            "processors[1].previous_public_keys: previous key 0 is the current key again",
            "processors[2].previous_public_keys[0]: reading the public key",
        ] {
            assert!(said.contains(expected), "{expected}: {said}");
        }
    }

    /// Revoked keys are read with the others: a future revocation is taken (scheduled), a
    /// relative key file is the config folder's, and a revoked key that is also trusted, a
    /// date that is none, a key file that is not there and a revocation without a current
    /// key are each reported, naming the entry's key, together with the other errors.
    #[test]
    fn revoked_keys_are_checked_when_the_file_is_loaded() {
        use dsrelay_runtime::signing::SigningKey;
        let (key, leaked) = (
            SigningKey::generate().public_key().to_base64(),
            SigningKey::generate().public_key().to_base64(),
        );
        let revoked = |k: &str, at: &str| format!("{{ key = {k:?}, revoked_at = {at:?} }}");
        let processor = |name: &str, keys: &str| {
            format!(
                "[[processors]]\nname = \"{name}\"\nendpoint = \"https://{name}:1\"\n\
                 identity = \"spiffe://x/{name}\"\ncategories = [\"c\"]\n{keys}\n"
            )
        };
        let recipient = |name: &str, keys: &str| {
            format!(
                "[[recipients]]\nname = \"{name}\"\nendpoint = \"https://{name}:1\"\n\
                 identity = \"spiffe://y/{name}\"\n{keys}\n"
            )
        };
        let good = [
            processor(
                "a",
                &format!(
                    "public_key = {key:?}\nrevoked_public_keys = [{}, {}]",
                    revoked(&leaked, "2026-11-30T12:00:00Z"),
                    revoked("keys/old.pub.pem", "2999-01-01T00:00:00+02:00"),
                ),
            ),
            recipient(
                "r",
                &format!(
                    "public_key = {key:?}\nrevoked_public_keys = [{}]",
                    revoked(&leaked, "2026-11-30T12:00:00Z")
                ),
            ),
        ]
        .concat();
        let (dir, file) = folder(&good);
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let old = SigningKey::generate();
        old.write(&dir.path().join("keys/old.key")).unwrap();
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        let path = dir.path().join("keys/old.pub.pem");
        assert_eq!(
            c.processors[0].revoked_public_keys[1].key,
            path.to_str().unwrap()
        );
        let ring = c.processors[0].key_ring().unwrap().unwrap();
        let scheduled = ring.revocation(&old.public_key().key_id()).unwrap();
        assert_eq!(scheduled.revoked_at_ms, 32_472_136_800_000);
        assert_eq!(ring.revoked().len(), 2);
        let ring = c.recipients[0].key_ring().unwrap().unwrap();
        assert_eq!(ring.revoked()[0].revoked_at_ms, 1_796_040_000_000);

        let bad = [
            processor(
                "a",
                &format!(
                    "public_key = {key:?}\nrevoked_public_keys = [{}]",
                    revoked(&key, "2026-11-30T12:00:00Z")
                ),
            ),
            processor(
                "b",
                &format!(
                    "public_key = {key:?}\nprevious_public_keys = [{leaked:?}]\n\
                     revoked_public_keys = [{}]",
                    revoked(&leaked, "2026-11-30T12:00:00Z")
                ),
            ),
            processor(
                "c",
                &format!(
                    "public_key = {key:?}\nrevoked_public_keys = [{}]",
                    revoked(&leaked, "30 Nov 2026")
                ),
            ),
            processor(
                "d",
                &format!(
                    "revoked_public_keys = [{}]",
                    revoked(&leaked, "2026-11-30T12:00:00Z")
                ),
            ),
            recipient(
                "r",
                &format!(
                    "public_key = {key:?}\nrevoked_public_keys = [{}]",
                    revoked("gone.pem", "2026-11-30T12:00:00Z")
                ),
            ),
            "[contracts]\ngrace_months = 0\n".to_string(),
        ]
        .concat();
        let (_dir, file) = folder(&bad);
        let errors = Config::load_from(Some(&file), env(&[])).unwrap_err().0;
        let said = errors.join("\n");
        for expected in [
            "processors[0].revoked_public_keys: revoked key 0 is the current key too",
            "processors[1].revoked_public_keys: revoked key 0 is previous key 0 too",
            "processors[2].revoked_public_keys[0].revoked_at: \"30 Nov 2026\" is not an RFC 3339",
            "processors[3].revoked_public_keys needs a public_key",
            "recipients[0].revoked_public_keys[0].key: reading the public key",
            "contracts.grace_months: must be 1 to 120",
        ] {
            assert!(said.contains(expected), "{expected}: {said}");
        }
    }

    #[test]
    fn shared_keys_and_overrides_stay_at_the_top_level() {
        let (dir, file) = folder("identity_hash_key = \"k\"");
        let c = Config::load_from(
            Some(&file),
            env(&[
                ("DSRELAY_REGISTRY__LISTEN", "0.0.0.0:7"),
                ("DSRELAY_REGISTRY__ADMIN_LISTEN", "127.0.0.1:8"),
                ("DSRELAY_REGISTRY__LOG_JSON", "true"),
                ("DSRELAY_REGISTRY__DELIVERY__CONCURRENCY", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(c.service.listen, "0.0.0.0:7");
        assert_eq!(c.service.admin_listen.as_deref(), Some("127.0.0.1:8"));
        assert!(c.service.log_json);
        assert_eq!(c.service.database_url, DEFAULTS.database_url);
        assert_eq!(c.service.tls.key, dir.path().join("registry.key"));
        assert_eq!(c.delivery.concurrency, 3);
        assert_eq!(c.identity_hash_key, "k");
        assert_eq!(c.package_dir, Path::new(DEFAULT_PACKAGE_DIR));
        assert_eq!(c.package_ttl_days, 30);
        assert_eq!(c.contracts.grace_months, 6);
        // Written back, it is the same flat file.
        let text = toml::to_string(&c).unwrap();
        let again: Config = toml::from_str(&text).unwrap();
        assert_eq!(again.service, c.service);
    }

    #[test]
    fn an_empty_identity_hash_key_is_refused() {
        let (_dir, file) = folder("identity_hash_key = \"\"");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].starts_with("identity_hash_key: required"), "{err}");
        // Not set at all is the same error; the environment can supply it.
        let (_dir, file) = folder("# identity_hash_key unset");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(err.0[0].starts_with("identity_hash_key: required"), "{err}");
        let c = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_REGISTRY__IDENTITY_HASH_KEY", "from env")]),
        )
        .unwrap();
        assert_eq!(c.identity_hash_key, "from env");
        assert_eq!(c.forget_after_days, 30);
    }

    #[test]
    fn max_refusals_defaults_to_five_and_must_be_positive() {
        let (_dir, file) = folder("identity_hash_key = \"k\"");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.delivery.max_refusals, 5);
        let err = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_REGISTRY__DELIVERY__MAX_REFUSALS", "0")]),
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            ["delivery.max_refusals: must be at least 1; it is 0"]
        );
    }

    /// `delivery.concurrency` and `delivery.batch_size` are refused at 0 and past 65536
    /// (where tokio's semaphore would panic once the service runs), each by its own message.
    #[test]
    fn delivery_concurrency_and_batch_size_are_bounded_naming_their_keys() {
        let (_dir, file) = folder("identity_hash_key = \"k\"");
        let vars = |concurrency: &str, batch: &str| {
            env(&[
                ("DSRELAY_REGISTRY__DELIVERY__CONCURRENCY", concurrency),
                ("DSRELAY_REGISTRY__DELIVERY__BATCH_SIZE", batch),
            ])
        };
        for fine in ["1", "65536"] {
            Config::load_from(Some(&file), vars(fine, fine)).unwrap();
        }
        for (concurrency, batch) in [("0", "0"), ("9223372036854775807", "65537")] {
            let err = Config::load_from(Some(&file), vars(concurrency, batch)).unwrap_err();
            assert_eq!(
                err.0,
                [
                    format!("delivery.concurrency: must be from 1 to 65536; it is {concurrency}"),
                    format!("delivery.batch_size: must be from 1 to 65536; it is {batch}"),
                ]
            );
        }
    }

    /// A processor endpoint that no call could use is refused with the settings, not when
    /// the first delivery is sent.
    #[test]
    fn a_malformed_processor_endpoint_is_refused_naming_its_key() {
        for bad in ["https://bad host:x", "https://", "p.example:1"] {
            let text = format!(
                "[[processors]]\nname = \"p\"\nendpoint = {bad:?}\n\
                 identity = \"spiffe://dsrelay.dev/processor/p\"\ncategories = [\"contact\"]\n"
            );
            let (_dir, file) = folder(&text);
            let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
            assert_eq!(
                err.0,
                [format!(
                    "processors[0].endpoint: {bad:?} must be https://host:port"
                )]
            );
        }
    }

    #[test]
    fn package_caps_have_generous_defaults_and_are_checked() {
        let (_dir, file) = folder("identity_hash_key = \"k\"");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.packages.max_part_bytes, 64 << 30);
        assert_eq!(c.packages.max_files_per_part, 10_000);
        assert_eq!(c.packages.downloads_per_caller, 4);
        assert_eq!(c.packages.uploads_per_processor, 64);
        let err = Config::load_from(
            Some(&file),
            env(&[
                ("DSRELAY_REGISTRY__PACKAGES__MAX_PART_BYTES", "0"),
                ("DSRELAY_REGISTRY__PACKAGES__MAX_FILES_PER_PART", "10001"),
                ("DSRELAY_REGISTRY__PACKAGES__DOWNLOADS_PER_CALLER", "0"),
                ("DSRELAY_REGISTRY__PACKAGES__UPLOADS_PER_PROCESSOR", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for key in [
            "packages.max_part_bytes",
            "packages.max_files_per_part",
            "packages.downloads_per_caller",
            "packages.uploads_per_processor",
        ] {
            assert!(err.contains(key), "{key} in {err}");
        }
    }

    #[test]
    fn watch_poll_interval_defaults_to_one_second_and_must_be_positive() {
        let (_dir, file) = folder("identity_hash_key = \"k\"");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.watch.poll_interval_ms, 1_000);
        let c = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_REGISTRY__WATCH__POLL_INTERVAL_MS", "250")]),
        )
        .unwrap();
        assert_eq!(c.watch.poll_interval_ms, 250);
        let err = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_REGISTRY__WATCH__POLL_INTERVAL_MS", "0")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains(
                "watch.poll_interval_ms: must be from 1 ms to 2592000000 ms (30 days); it is 0"
            ),
            "{err}"
        );
    }

    /// Every duration key with the smallest and largest values it accepts, as environment
    /// variable name suffixes.
    const DURATIONS: &[(&str, u64, u64)] = &[
        ("forget_sweep_interval_ms", 1, MAX_DURATION_MS),
        ("package_sweep_interval_ms", 1, MAX_DURATION_MS),
        ("delivery.poll_interval_ms", 1, MAX_DURATION_MS),
        ("delivery.lease_ms", 1, MAX_DURATION_MS),
        ("delivery.yield_to_intake_ms", 0, MAX_DURATION_MS),
        ("delivery.call_timeout_ms", 1, MAX_CALL_TIMEOUT_MS),
        ("delivery.backoff.initial_ms", 1, MAX_DURATION_MS),
        ("delivery.backoff.max_ms", 1, MAX_DURATION_MS),
        ("reconcile.interval_ms", 1, MAX_DURATION_MS),
        ("reconcile.ack_timeout_ms", 1, MAX_DURATION_MS),
        ("reconcile.chain_interval_ms", 1, MAX_DURATION_MS),
        ("reconcile.max_backoff_ms", 0, MAX_DURATION_MS),
        ("watch.poll_interval_ms", 1, MAX_DURATION_MS),
        ("watch.max_stream_ms", 1, MAX_WATCH_STREAM_MS),
        ("shutdown_grace_ms", 1, MAX_DURATION_MS),
        ("call_limit_ms", 1, MAX_DURATION_MS),
        ("audit.checkpoint_interval_ms", 1, MAX_DURATION_MS),
        ("tls.reload_interval_ms", 0, MAX_DURATION_MS),
        ("forget_after_days", 0, MAX_RETENTION_DAYS as u64),
        ("package_ttl_days", 1, MAX_RETENTION_DAYS as u64),
    ];

    /// The environment variable that sets `key` (`a.b_ms` → `<prefix>__A__B_MS`).
    fn env_var(key: &str) -> String {
        format!("{ENV_PREFIX}__{}", key.to_uppercase().replace('.', "__"))
    }

    /// Every duration key set to `value(its minimum, its maximum)` through the environment.
    fn every_duration(value: impl Fn(u64, u64) -> u64) -> Vec<(String, String)> {
        DURATIONS
            .iter()
            .map(|(key, min, max)| (env_var(key), value(*min, *max).to_string()))
            .collect()
    }

    #[test]
    fn the_defaults_and_every_duration_at_its_bounds_are_accepted() {
        let (_dir, file) = folder("");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.delivery.lease_ms, 30_000);
        assert_eq!(c.watch.max_stream_ms, 3_600_000);
        c.validate().unwrap();
        Config::load_from(Some(&file), every_duration(|min, _| min)).unwrap();
        Config::load_from(Some(&file), every_duration(|_, max| max)).unwrap();
    }

    const PARTNERS: &str = "[[identities]]\nidentity = \"spiffe://dsrelay.dev/partner/crm\"\n\
        role = \"partner\"\nname = \"crm\"\n\
        [[identities]]\nidentity = \"spiffe://dsrelay.dev/partner/webform\"\n\
        role = \"partner\"\nname = \"webform\"\n\
        [[identities]]\nidentity = \"spiffe://dsrelay.dev/operator/ops\"\n\
        role = \"operator\"\nname = \"ops\"\n";

    #[test]
    fn the_submit_quota_is_off_by_default_and_read_with_partners_own_limits() {
        let (_dir, file) = folder(PARTNERS);
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.submit_quota, SubmitQuotaConfig::default());

        let text = format!(
            "[submit_quota]\nper_second = 5\nburst = 20\n\
             [submit_quota.partners.webform]\nburst = 200\n{PARTNERS}"
        );
        let (_dir, file) = folder(&text);
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(c.submit_quota.per_second, Some(5.0));
        assert_eq!(c.submit_quota.burst, Some(20));
        assert_eq!(
            c.submit_quota.partners["webform"],
            PartnerSubmitQuota {
                per_second: None,
                burst: Some(200),
            }
        );
        // Written back (as `dsrctl dev up` does), it reads the same.
        let again: Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again.submit_quota, c.submit_quota);

        // And from the environment, a fraction as well as a whole number.
        let (_dir, file) = folder(PARTNERS);
        let c = Config::load_from(
            Some(&file),
            env(&[
                ("DSRELAY_REGISTRY__SUBMIT_QUOTA__PER_SECOND", "0.5"),
                ("DSRELAY_REGISTRY__SUBMIT_QUOTA__BURST", "10"),
                (
                    "DSRELAY_REGISTRY__SUBMIT_QUOTA__PARTNERS__CRM__PER_SECOND",
                    "2",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.submit_quota.per_second, Some(0.5));
        assert_eq!(c.submit_quota.burst, Some(10));
        assert_eq!(c.submit_quota.partners["crm"].per_second, Some(2.0));
    }

    /// Out of range, the quota's keys are refused in the words of the other range errors,
    /// and with them.
    #[test]
    fn submit_quota_values_out_of_range_are_refused_with_the_other_range_errors() {
        let text = format!(
            "[delivery]\nlease_ms = 0\n[submit_quota]\nper_second = 0\nburst = 0\n\
             [submit_quota.partners.crm]\nper_second = 1000001\nburst = 1000001\n{PARTNERS}"
        );
        let (_dir, file) = folder(&text);
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [
                "submit_quota.per_second: must be from 0.0001 to 1000000 Submits a second; \
                 it is 0",
                "submit_quota.burst: must be from 1 to 1000000 Submits; it is 0",
                "submit_quota.partners.crm.per_second: must be from 0.0001 to 1000000 Submits \
                 a second; it is 1000001",
                "submit_quota.partners.crm.burst: must be from 1 to 1000000 Submits; it is \
                 1000001",
                "delivery.lease_ms: must be from 1 ms to 2592000000 ms (30 days); it is 0",
            ],
            "{err}"
        );
        // TOML spells infinities and NaN; none is a rate.
        for bad in ["nan", "inf", "-inf", "0.00009", "-1"] {
            let text = format!("[submit_quota]\nper_second = {bad}\nburst = 1\n{PARTNERS}");
            let (_dir, file) = folder(&text);
            let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
            assert_eq!(err.0.len(), 1, "{bad}: {err}");
            assert!(
                err.0[0].starts_with("submit_quota.per_second: must be from 0.0001 to 1000000"),
                "{bad}: {err}"
            );
        }
        // The bounds themselves are taken.
        let text = format!(
            "[submit_quota]\nper_second = 0.0001\nburst = 1\n\
             [submit_quota.partners.crm]\nper_second = 1000000\nburst = 1000000\n{PARTNERS}"
        );
        let (_dir, file) = folder(&text);
        Config::load_from(Some(&file), env(&[])).unwrap();
    }

    #[test]
    fn a_submit_quota_names_partners_and_sets_both_limits() {
        let text = format!(
            "[submit_quota]\nper_second = 1\n\
             [submit_quota.partners.ops]\nburst = 5\n\
             [submit_quota.partners.nobody]\nburst = 5\n\
             [submit_quota.partners.crm]\n{PARTNERS}"
        );
        let (_dir, file) = folder(&text);
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [
                "submit_quota.burst: required with submit_quota.per_second (the most Submits at \
                 once)",
                "submit_quota.partners.crm: set per_second, burst or both",
                "submit_quota.partners.nobody: no [[identities]] entry is named nobody; name a \
                 partner",
                "submit_quota.partners.ops: ops is an operator, whose Submits are not limited; \
                 name a partner",
            ],
            "{err}"
        );
        // Without the table's limits a partner's own must give both.
        let text = format!("[submit_quota.partners.crm]\nburst = 5\n{PARTNERS}");
        let (_dir, file) = folder(&text);
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [
                "submit_quota.partners.crm.per_second: required, since submit_quota sets no \
                 per_second to take"
            ],
            "{err}"
        );
        let text = format!("[submit_quota]\nburst = 5\n{PARTNERS}");
        let (_dir, file) = folder(&text);
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(
            err.0[0].starts_with("submit_quota.per_second: required with submit_quota.burst"),
            "{err}"
        );
    }

    #[test]
    fn a_delivery_lease_of_zero_is_refused_naming_the_key_and_the_range() {
        let (_dir, file) = folder("[delivery]\nlease_ms = 0\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            ["delivery.lease_ms: must be from 1 ms to 2592000000 ms (30 days); it is 0"]
        );
    }

    #[test]
    fn every_duration_below_its_minimum_is_refused_naming_its_key() {
        let (_dir, file) = folder("");
        let err = Config::load_from(Some(&file), every_duration(|_, _| 0)).unwrap_err();
        let refused: Vec<_> = DURATIONS.iter().filter(|(_, min, _)| *min > 0).collect();
        for (key, _, _) in &refused {
            let named = err.0.iter().filter(|e| e.starts_with(&format!("{key}:")));
            // The shared keys' own checks report their 0 (once); the others name the range.
            assert_eq!(named.count(), 1, "{key}: {err}");
        }
        assert_eq!(err.0.len(), refused.len(), "{err}");
        for want in [
            "delivery.call_timeout_ms: must be from 1 ms to 3600000 ms (1 hour); it is 0",
            "reconcile.interval_ms: must be from 1 ms to 2592000000 ms (30 days); it is 0",
            "package_ttl_days: must be from 1 to 3650 days; it is 0",
        ] {
            assert!(err.0.iter().any(|e| e == want), "{want}: {err}");
        }
    }

    #[test]
    fn every_duration_above_its_maximum_is_refused_naming_its_key() {
        let (_dir, file) = folder("");
        let err = Config::load_from(Some(&file), every_duration(|_, max| max + 1)).unwrap_err();
        assert_eq!(err.0.len(), DURATIONS.len(), "{err}");
        for (key, min, max) in DURATIONS {
            let unit = if key.ends_with("_days") { "" } else { " ms" };
            let want = format!("{key}: must be from {min}{unit} to {max}{unit}");
            assert!(err.0.iter().any(|e| e.starts_with(&want)), "{want}: {err}");
        }
        // The largest a TOML file can hold: `now - ack_timeout_ms` would overflow.
        let (_dir, file) = folder("[reconcile]\nack_timeout_ms = 9223372036854775807\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [
                "reconcile.ack_timeout_ms: must be from 1 ms to 2592000000 ms (30 days); it is \
              9223372036854775807"
            ]
        );
        let (_dir, file) = folder("[watch]\nmax_stream_ms = 86400001\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(
            err.0,
            ["watch.max_stream_ms: must be from 1 ms to 86400000 ms (1 day); it is 86400001"]
        );
    }

    #[test]
    fn checkpoints_are_on_by_default_and_then_need_a_key_and_a_file() {
        let (dir, file) = folder("");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert!(c.audit.checkpoints);
        assert_eq!(c.audit.checkpoint_interval_ms, 60_000);
        // Relative paths are the configuration folder's.
        assert_eq!(
            c.audit.checkpoint_key.as_deref(),
            Some(dir.path().join("registry-signing.key").as_path())
        );
        assert_eq!(
            c.audit.checkpoint_file.as_deref(),
            Some(dir.path().join("audit/checkpoints.jsonl").as_path())
        );

        let (_dir, file) = folder("[audit]\ncheckpoint_interval_ms = 0\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        let keys: Vec<&str> = err.0.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "audit.checkpoint_key",
                "audit.checkpoint_file",
                "audit.checkpoint_interval_ms"
            ],
            "{err}"
        );
        // Turned off on purpose, nothing else is asked for.
        let (_dir, file) = folder("[audit]\ncheckpoints = false\n");
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert!(!c.audit.checkpoints);
        let (_dir, file) = folder("[audit]\n");
        let c = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_REGISTRY__AUDIT__CHECKPOINTS", "false")]),
        )
        .unwrap();
        assert!(!c.audit.checkpoints);
    }

    /// The checkpoint key is read with the TLS files, so every file problem shows in one
    /// round.
    #[test]
    fn an_unreadable_checkpoint_key_is_reported_with_the_tls_files() {
        let (dir, file) = folder("");
        std::fs::remove_file(dir.path().join("registry-signing.key")).unwrap();
        std::fs::remove_file(dir.path().join("registry.pem")).unwrap();
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.0[0].starts_with("audit.checkpoint_key: "), "{err}");
        assert!(err.0[0].contains("registry-signing.key"), "{err}");
        assert!(err.0[1].starts_with("tls.cert: "), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let (_dir, file) = folder("identity_hash_keys = \"k\"");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(err.to_string().contains("identity_hash_keys"), "{err}");
        let (_dir, file) = folder("");
        let err = Config::load_from(Some(&file), env(&[("DSRELAY_REGISTRY__LISTEN_ON", "x")]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("key listen_on: unknown key; known here: listen, "),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let (dir, file) = folder("listen = \"nowhere\"\ndatabase_url = \"mysql://x\"");
        std::fs::remove_file(dir.path().join("registry.key")).unwrap();
        let err = Config::load_from(
            Some(&file),
            env(&[("DSRELAY_REGISTRY__DELIVERY__CONCURRENCY", "0")]),
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 4, "{err}");
        for key in ["listen", "database_url", "delivery", "tls.key"] {
            assert!(err.0.iter().any(|e| e.starts_with(key)), "{key}: {err}");
        }
    }

    const RECIPIENT: &str = "[[recipients]]\nname = \"new-bookkeeper\"\n\
        endpoint = \"https://dsr.bookkeeper.example:8443\"\n\
        identity = \"spiffe://bookkeeper.example/recipient\"\n\
        description = \"the accounting firm a customer moves to\"\n";

    #[test]
    fn recipients_are_read_and_named() {
        let (_dir, file) = folder(RECIPIENT);
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        assert_eq!(
            c.recipients,
            [RecipientConfig {
                name: "new-bookkeeper".into(),
                endpoint: "https://dsr.bookkeeper.example:8443".into(),
                identity: "spiffe://bookkeeper.example/recipient".into(),
                description: "the accounting firm a customer moves to".into(),
                public_key: None,
                previous_public_keys: Vec::new(),
                revoked_public_keys: Vec::new(),
            }]
        );
        assert_eq!(c.known_recipients(), ["new-bookkeeper"].into());
        let r = c.recipient("new-bookkeeper").expect("configured");
        assert_eq!(r.identity, "spiffe://bookkeeper.example/recipient");
        assert_eq!(r.endpoint, c.recipients[0].endpoint);
        assert_eq!(c.recipient("old-bookkeeper"), None);
        // Written back (as `dsrctl dev up` does), it reads the same.
        let again: Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again.recipients, c.recipients);
    }

    #[test]
    fn two_identities_may_not_share_a_name() {
        let text = "[[identities]]\nidentity = \"spiffe://dsrelay.dev/partner/crm\"\n\
            role = \"partner\"\nname = \"crm\"\n\
            [[identities]]\nidentity = \"spiffe://dsrelay.dev/partner/other\"\n\
            role = \"partner\"\nname = \"crm\"\n";
        let (_dir, file) = folder(text);
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(
            err.0
                .iter()
                .any(|e| e.starts_with("identities[1]: name crm is used twice")),
            "{err}"
        );
    }

    #[test]
    fn a_processor_name_must_do_as_a_folder_name() {
        // It is the top folder of the processor's parts in a package and in its download,
        // where dsrctl would refuse the whole package over it.
        for bad in ["", "pay/roll", "..", "c:bureau", "pay roll"] {
            let text = format!(
                "[[processors]]\nname = {bad:?}\nendpoint = \"https://p.example:443\"\n\
                 identity = \"spiffe://dsrelay.dev/processor/p\"\ncategories = [\"contact\"]\n"
            );
            let (_dir, file) = folder(&text);
            let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
            assert!(
                err.0.iter().any(|e| e.starts_with("processors[0].name: ")),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn every_recipient_problem_is_reported_at_once() {
        let bad = "[[recipients]]\nname = \"a\"\nendpoint = \"https://a.example\"\n\
            identity = \"spiffe://a\"\n\
            [[recipients]]\nname = \"a\"\nendpoint = \"http://a.example:80\"\n\
            identity = \"spiffe://a2\"\n\
            [[recipients]]\nname = \"\"\nendpoint = \"not a url\"\nidentity = \" \"\n";
        let (_dir, file) = folder(bad);
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        let expected = [
            "recipients[1]: name a is used twice",
            "recipients[1].endpoint: \"http://a.example:80\" must be https://host:port",
            "recipients[2].name: must be 1 to 256 bytes",
            "recipients[2].endpoint: \"not a url\" must be https://host:port",
            "recipients[2].identity: the certificate identity",
        ];
        assert_eq!(err.0.len(), expected.len(), "{err}");
        for (got, want) in err.0.iter().zip(expected) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn a_recipient_without_endpoint_or_identity_does_not_parse() {
        let (_dir, file) = folder("[[recipients]]\nname = \"a\"\n");
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert!(err.to_string().contains("endpoint"), "{err}");
    }

    /// A processor refuses a transfer carrying more than 16 receipt keys, so a recipient that
    /// could be sent more (current, previous and revoked keys, a revoked one being sent until
    /// its `revoked_at`) is refused at the start, naming it, the count and the limit. Sixteen
    /// are taken, and a processor's keys (never sent) are not limited.
    #[test]
    fn a_recipient_with_more_receipt_keys_than_a_processor_takes_is_refused() {
        use dsrelay_runtime::signing::SigningKey;
        let keys = |n: usize| -> Vec<String> {
            (0..n)
                .map(|_| format!("{:?}", SigningKey::generate().public_key().to_base64()))
                .collect()
        };
        let revoked = |keys: &[String]| -> String {
            keys.iter()
                .map(|k| format!("{{ key = {k}, revoked_at = \"2999-01-01T00:00:00Z\" }}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // `public_key`, then `previous` previous keys and `revoked` revoked ones.
        let entry = |table: &str, name: &str, previous: usize, revoked_n: usize| {
            let k = keys(1 + previous + revoked_n);
            let extra = if table == "processors" {
                "categories = [\"c\"]\n"
            } else {
                ""
            };
            format!(
                "[[{table}]]\nname = \"{name}\"\nendpoint = \"https://{name}.example:1\"\n\
                 identity = \"spiffe://x/{name}\"\n{extra}public_key = {}\n\
                 previous_public_keys = [{}]\nrevoked_public_keys = [{}]\n",
                k[0],
                k[1..=previous].join(", "),
                revoked(&k[1 + previous..]),
            )
        };

        let sixteen = [
            entry("recipients", "just-fits", 10, 5),
            entry("processors", "many", 20, 5),
        ]
        .concat();
        let (_dir, file) = folder(&sixteen);
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        let ring = c.recipients[0].key_ring().unwrap().unwrap();
        assert_eq!(ring.keys().len() + ring.revoked().len(), MAX_RECIPIENT_KEYS);

        let over = [
            entry("recipients", "previous-only", 16, 0),
            entry("recipients", "with-revoked", 10, 6),
            entry("recipients", "just-fits", 15, 0),
        ]
        .concat();
        let (_dir, file) = folder(&over);
        let err = Config::load_from(Some(&file), env(&[])).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        for (got, name) in err.0.iter().zip(["previous-only", "with-revoked"]) {
            assert!(
                got.contains(&format!("recipient {name} has 17 receipt keys")),
                "{got}"
            );
            assert!(got.contains("than the 16 a processor takes"), "{got}");
            assert!(
                got.contains("drop the oldest previous_public_keys"),
                "{got}"
            );
        }
        assert!(err.0[0].starts_with("recipients[0]: "), "{err}");
        assert!(err.0[1].starts_with("recipients[1]: "), "{err}");
    }

    #[test]
    fn callers_outside_the_trust_domain_or_their_role_are_named() {
        let (_dir, file) = folder(
            "[[identities]]\nidentity = \"spiffe://dsrelay.dev/partner/crm\"\nrole = \"partner\"\n\
             name = \"crm\"\n\
             [[identities]]\nidentity = \"spiffe://dsrelay.dev/partner/webform\"\n\
             role = \"operator\"\nname = \"webform\"\n\
             [[identities]]\nidentity = \"spiffe://elsewhere.example/operator/ops\"\n\
             role = \"operator\"\nname = \"ops\"\n\
             [[processors]]\nname = \"p\"\nendpoint = \"https://p.example:1\"\n\
             identity = \"spiffe://dsrelay.dev/processor/p\"\ncategories = [\"c\"]\n\
             [[recipients]]\nname = \"r\"\nendpoint = \"https://r.example:1\"\n\
             identity = \"spiffe://other.example/recipient\"\n",
        );
        let c = Config::load_from(Some(&file), env(&[])).unwrap();
        let errors = c
            .trust_errors("spiffe://dsrelay.dev/registry/controller")
            .unwrap();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("identities[1].identity: identity spiffe://dsrelay.dev/partner/webform must name its role"),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("trust domain elsewhere.example, not dsrelay.dev"),
            "{errors:?}"
        );

        // A configured trust domain replaces the one of the registry's own certificate.
        let mut c = c;
        c.service.trust_domain = Some("elsewhere.example".into());
        let errors = c
            .trust_errors("spiffe://dsrelay.dev/registry/controller")
            .unwrap();
        // Every caller but the operator from elsewhere.example is now outside it.
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().all(|e| e.contains("not elsewhere.example")));
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
        "forget_after_days",
        "forget_sweep_interval_ms",
        "package_dir",
        "package_ttl_days",
        "package_sweep_interval_ms",
        "delivery.backoff.initial_ms",
        "delivery.backoff.max_ms",
        "delivery.poll_interval_ms",
        "delivery.lease_ms",
        "delivery.batch_size",
        "delivery.concurrency",
        "delivery.call_timeout_ms",
        "delivery.max_refusals",
        "delivery.yield_to_intake_ms",
        "reconcile.interval_ms",
        "reconcile.ack_timeout_ms",
        "reconcile.chain_interval_ms",
        "reconcile.max_backoff_ms",
        "watch.streams_per_caller",
        "submit_quota.per_second",
        "submit_quota.burst",
        "packages.max_part_bytes",
        "packages.max_files_per_part",
        "packages.downloads_per_caller",
        "packages.uploads_per_processor",
        "contracts.grace_months",
    ];
    const ARRAYS: &[(&str, &[&str])] = &[
        (
            "processors",
            &[
                "name",
                "endpoint",
                "identity",
                "categories",
                "public_key",
                "previous_public_keys",
                "revoked_public_keys",
            ],
        ),
        ("identities", &["identity", "role", "name"]),
        (
            "recipients",
            &[
                "name",
                "endpoint",
                "identity",
                "description",
                "public_key",
                "previous_public_keys",
                "revoked_public_keys",
            ],
        ),
    ];

    proptest::proptest! {
        /// Whatever the file and the environment hold, loading answers a configuration or
        /// the problems; it never panics, and neither do the checks run at start.
        #[test]
        fn any_toml_loads_or_is_refused_without_panicking(
            text in dsrelay_runtime::config::arbitrary::document(KEYS, ARRAYS),
            env in dsrelay_runtime::config::arbitrary::overrides("DSRELAY_REGISTRY", KEYS),
        ) {
            let (_dir, file) = folder(&text);
            match Config::load_from(Some(&file), env) {
                Ok(c) => {
                    let _ = c.trust_errors("spiffe://dsrelay.dev/registry/controller");
                    let _ = (c.known_categories(), c.known_recipients());
                }
                Err(e) => proptest::prop_assert!(!e.0.is_empty()),
            }
        }
    }
}
