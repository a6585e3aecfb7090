//! The one way the end-to-end tests start services: [`spawn_pair`].
//!
//! It binds every socket first (so the registry's configuration can name the processor's
//! address, and the processor's the registry's, before either starts), writes each
//! service's configuration (built in [`configs`], the one place that knows the config
//! structs), and starts the registry, the processor and, when a holder needs it, the example
//! adapter, and when a test asks for one, the example transfer recipient: in this process, or as real processes that inherit their listening socket
//! (`LISTEN_FDS`, fd 3; the admin port on fd 4), so a restart after SIGKILL serves the same
//! socket and nothing races it to the port. A service that is down keeps its port bound but
//! not listening, so callers are refused at once, as by a machine whose service is down.
//!
//! Each pair has its own temporary folder, a PKI whose CA is generated for the test, and its
//! own databases (SQLite files in the folder, or fresh PostgreSQL databases). [`TestPair`]
//! hands out ready clients for every role and, for in-process services, their clocks.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    GetRequest, IdentityEncoding, IdentityType, Request, RequestKind, RequestState,
    SubjectIdentity, SubmitRequest,
};
use dsrelay_runtime::backoff::Backoff;
use dsrelay_runtime::clock::Clock;
use dsrelay_runtime::pki::{dev_identity, DevPki};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Which store the services use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where the services run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As tasks of the test: fast, and their clocks can be moved.
    InProcess,
    /// As the real binaries: they can be SIGKILLed and restarted, their logs and environment
    /// are their own; their clocks cannot be moved from here.
    Processes,
}

/// A service of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Registry,
    Processor,
    /// The example newsletter adapter, present when [`Holder::Newsletter`] is.
    Adapter,
    /// The example transfer recipient, present when [`PairOptions::recipient`] is set.
    Recipient,
}

impl Role {
    /// The name the service goes by in file names and `OTEL_SERVICE_NAME`.
    fn name(self) -> &'static str {
        match self {
            Role::Registry => "registry",
            Role::Processor => "processor",
            Role::Adapter => "adapter",
            Role::Recipient => "recipient",
        }
    }
}

/// A subprocessor of the processor (a holder of the subject's data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// `accounting`: the sample accounting database through the SQL connector (categories
    /// `contact`, `invoicing`).
    Accounting,
    /// `mail-marketing`: a no-op connector taking `mail_delay_ms` (category `marketing`).
    MailMarketing,
    /// `paper-archive`: a manual connector waiting for an operator (category `archive`).
    PaperArchive,
    /// `newsletter`: the example adapter through the adapter connector (categories
    /// `marketing`, `contact`).
    Newsletter,
}

/// The name under which the registry knows the processor.
pub const PROCESSOR: &str = "payroll-bureau";
/// The newsletter holder's subprocessor name.
pub const NEWSLETTER: &str = "newsletter";
/// The transfer recipient the registry knows, so that a TRANSFER may name it. Its endpoint is
/// the example recipient's when [`PairOptions::recipient`] starts one, and leads nowhere
/// otherwise.
pub const RECIPIENT: &str = "new-bookkeeper";

/// The certificate identity the dev PKI gives the example recipient.
pub fn recipient_identity() -> String {
    dev_identity("recipient", "example")
}

/// The example transfer recipient of a pair. The default: in the pair's mode, no pause, the
/// identity its certificate carries.
#[derive(Debug, Clone, Default)]
pub struct RecipientOptions {
    /// Run it as a process (so it can be SIGKILLed), whatever the pair's mode.
    pub process: bool,
    /// Its pause after every stored chunk (ms).
    pub chunk_delay_ms: u64,
    /// The identity the registry's `[[recipients]]` expects of it; `None`: the one its
    /// certificate carries ([`recipient_identity`]).
    pub expected_identity: Option<String>,
}

/// The controller's name in the processor's configuration.
pub const CONTROLLER: &str = "controller";

/// The processor's name for a second controller ([`PairOptions::second_controller`]).
pub const OTHER_CONTROLLER: &str = "other-controller";

/// The processor's data folder, inside the pair's folder.
pub const PROCESSOR_DATA_DIR: &str = "processor-data";

/// The registry's package folder, inside the pair's folder.
const REGISTRY_PACKAGES_DIR: &str = "registry-packages";
/// The registry's audit checkpoint file, inside the pair's folder.
const REGISTRY_CHECKPOINTS: &str = "registry-audit-checkpoints.jsonl";
/// The processor's audit checkpoint file, inside the pair's folder.
const PROCESSOR_CHECKPOINTS: &str = "processor-audit-checkpoints.jsonl";

/// The example recipient's folder, inside the pair's folder.
const RECIPIENT_DATA_DIR: &str = "recipient-data";

/// What a pair is made of. The default: SQLite, in-process, accounting and mail-marketing,
/// everything started.
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// Store backend of the services (the sample accounting DB stays SQLite).
    pub backend: Backend,
    pub mode: Mode,
    /// The processor's subprocessors, in this order.
    pub holders: Vec<Holder>,
    /// Delay of the mail-marketing no-op subprocessor (ms).
    pub mail_delay_ms: u64,
    /// How long the newsletter adapter takes to confirm an accepted erasure (ms; 0: at once).
    pub newsletter_confirm_delay_ms: u64,
    /// The kinds the processor believes the newsletter supports (`None`: ask the adapter).
    pub newsletter_kinds: Option<Vec<String>>,
    /// Where the newsletter holder answers when the test plays it itself (no example adapter
    /// is started then).
    pub newsletter_endpoint: Option<SocketAddr>,
    /// The processor's task retry spacing (default: fast, 100 ms to 1 s).
    pub task_backoff: Option<Backoff>,
    /// Register a second processor, `web-agency` (category `web-analytics`), which is never up.
    pub with_absent_processor: bool,
    /// Point the processor's acknowledgements at a port nothing listens on, so the registry
    /// learns of progress only by reconciling.
    pub acks_to_nowhere: bool,
    /// Give the registry and the processor an admin port.
    pub admin: bool,
    /// Services left down at the start; [`Service::start`] brings each up on its address.
    pub down: Vec<Role>,
    /// JSON log lines (processes).
    pub log_json: bool,
    /// `RUST_LOG` of the processes (default `info`).
    pub rust_log: Option<String>,
    /// An OTLP endpoint the processes export traces to, each under its role's name.
    pub otel_endpoint: Option<String>,
    /// The processor's `public_key` as the registry is configured with it (default: the
    /// public half of the signing key the development PKI gave the processor).
    pub processor_public_key: Option<String>,
    /// Start the example transfer recipient as [`RECIPIENT`] (in this process unless it
    /// asks for a process).
    pub recipient: Option<RecipientOptions>,
    /// `forget_after_days` of both services (default 30; 0 forgets as soon as a request is
    /// finished, for processes, whose clocks cannot be moved).
    pub forget_after_days: u32,
    /// Where the processor sends acknowledgements and uploads when the test plays the
    /// controller's registry itself, presenting the registry's certificate (the real registry
    /// still runs, and still delivers).
    pub registry_endpoint: Option<SocketAddr>,
    /// Also serve [`OTHER_CONTROLLER`] at the processor (its registry at the same endpoint).
    pub second_controller: bool,
    /// With `second_controller`: scope every holder per controller, so that the processor
    /// starts. The accounting holder keeps each controller's data in a sample database of
    /// its own ([`TestPair::other_accounting_url`] is the second controller's); the others
    /// list both controllers.
    pub scope_holders: bool,
    /// Where the registry finds the processor when the test plays it itself (leave the
    /// processor down then: `down: vec![Role::Processor]`).
    pub processor_endpoint: Option<SocketAddr>,
    /// Give the registry and the processor the development CA's revocation list
    /// (`DevPki::crl`, written with no entries before they start) in `tls.crls`.
    pub revocation_list: bool,
    /// How often the registry and the processor look for changed TLS files (ms; `None`:
    /// their default).
    pub tls_reload_ms: Option<u64>,
    /// `shutdown_grace_ms` of the registry and the processor (`None`: the default).
    pub shutdown_grace_ms: Option<u64>,
    /// `call_limit_ms` of the registry and the processor (`None`: the default).
    pub call_limit_ms: Option<u64>,
    /// `worker_threads` of the registry and the processor (`None`: the default).
    pub worker_threads: Option<usize>,
    /// The registry's `[watch]` table (`None`: its defaults).
    pub watch: Option<dsrelay_registry::config::WatchConfig>,
    /// The processor's `forget_sweep_interval_ms` (`None`: 200 ms, so tests see forgetting
    /// and the removal of retired exports' files soon).
    pub processor_forget_sweep_ms: Option<u64>,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            mode: Mode::InProcess,
            holders: vec![Holder::Accounting, Holder::MailMarketing],
            mail_delay_ms: 0,
            newsletter_confirm_delay_ms: 0,
            newsletter_kinds: None,
            newsletter_endpoint: None,
            task_backoff: None,
            with_absent_processor: false,
            acks_to_nowhere: false,
            admin: false,
            down: Vec::new(),
            log_json: false,
            rust_log: None,
            otel_endpoint: None,
            processor_public_key: None,
            recipient: None,
            forget_after_days: 30,
            registry_endpoint: None,
            second_controller: false,
            scope_holders: false,
            processor_endpoint: None,
            revocation_list: false,
            tls_reload_ms: None,
            shutdown_grace_ms: None,
            call_limit_ms: None,
            worker_threads: None,
            watch: None,
            processor_forget_sweep_ms: None,
        }
    }
}

/// The PostgreSQL server URL for tests, or `None` (test skipped) outside CI.
/// In CI a missing server is a failure.
pub fn postgres_server() -> Option<String> {
    match std::env::var("DSRELAY_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
                panic!(
                    "PostgreSQL is required in CI: set DSRELAY_TEST_POSTGRES_URL \
                     (scripts/test.sh starts a throwaway server and sets it)"
                );
            }
            // .config/nextest.toml shows the output of passing PostgreSQL tests, so this
            // line is what tells a reader the test checked nothing.
            eprintln!(
                "SKIPPED on PostgreSQL: DSRELAY_TEST_POSTGRES_URL is not set \
                 (scripts/test.sh sets it; in CI this is a failure)"
            );
            None
        }
    }
}

/// Creates a fresh database on the test server and returns its URL.
pub async fn fresh_postgres_database(server: &str) -> String {
    let name = format!("e2e_{:016x}", fastrand::u64(..));
    let db = dsrelay_runtime::store::Db::connect(server)
        .await
        .expect("connecting to the test PostgreSQL server");
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&db.pool)
        .await
        .expect("creating a test database");
    db.pool.close().await;
    let (base, _) = server.rsplit_once('/').expect("server url has a path");
    let query = server
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{base}/{name}{query}")
}

/// A database URL for `name` on `backend`, or `None` when PostgreSQL is skipped.
pub async fn database_url(dir: &Path, name: &str, backend: Backend) -> Option<String> {
    match backend {
        Backend::Sqlite => Some(format!("sqlite://{}/{name}.db", dir.display())),
        Backend::Postgres => Some(fresh_postgres_database(&postgres_server()?).await),
    }
}

/// A port on 127.0.0.1 that is bound but not listening: connections are refused at once, and
/// nobody else can take the port while this is kept.
fn reserve() -> TcpSocket {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("binding 127.0.0.1:0");
    socket
}

fn addr_of(socket: &TcpSocket) -> SocketAddr {
    socket.local_addr().expect("local addr")
}

/// A bound and listening socket, as std keeps it (so it can be cloned and handed down).
fn listen(socket: TcpSocket) -> std::net::TcpListener {
    socket
        .listen(1024)
        .expect("listen")
        .into_std()
        .expect("std listener")
}

/// A tokio listener on a copy of `listener`'s socket; the original stays open.
fn tokio_copy(listener: &std::net::TcpListener) -> TcpListener {
    let copy = listener.try_clone().expect("dup listener");
    copy.set_nonblocking(true).expect("nonblocking");
    TcpListener::from_std(copy).expect("tokio listener")
}

/// Every service configuration of a pair. The only code that knows the config structs.
mod configs {
    use dsrelay_connectors::adapter::AdapterConfig;
    use dsrelay_connectors::manual::ManualConfig;
    use dsrelay_connectors::sql::sample_config;
    use dsrelay_processor::config::{
        AckConfig, ConnectorConfig, ContractsConfig, ControllerConfig, NoopConfig,
        SubprocessorConfig, TaskConfig, TransferMechanismConfig, UploadConfig,
    };
    use dsrelay_registry::config::{
        AuditConfig, DeliveryConfig, IdentityRole, ProcessorConfig, RecipientConfig,
        ReconcileConfig, Role,
    };
    use dsrelay_runtime::backoff::Backoff;
    use dsrelay_runtime::pki::{dev_identity, DevPki};
    use dsrelay_runtime::settings::ServiceSettings;

    use super::{recipient_identity, Holder, PairOptions, NEWSLETTER, PROCESSOR, RECIPIENT};

    /// Addresses and stores decided before any configuration is written.
    pub(super) struct Plan<'a> {
        pub opts: &'a PairOptions,
        pub pki: &'a DevPki,
        pub registry_listen: String,
        pub registry_admin: Option<String>,
        pub registry_db: String,
        pub processor_listen: String,
        pub processor_admin: Option<String>,
        pub processor_db: String,
        /// The processor's data folder (export files).
        pub processor_data: std::path::PathBuf,
        /// The registry's package folder.
        pub registry_packages: std::path::PathBuf,
        /// The registry's audit checkpoint file.
        pub registry_checkpoints: std::path::PathBuf,
        /// The processor's audit checkpoint file.
        pub processor_checkpoints: std::path::PathBuf,
        /// Where the processor sends its acknowledgements.
        pub ack_port: u16,
        pub absent_processor_port: Option<u16>,
        pub accounting_url: String,
        /// The second controller's accounting database ([`super::PairOptions::scope_holders`]).
        pub other_accounting_url: String,
        pub adapter_listen: String,
        pub adapter_db: String,
        /// Where the example recipient listens (empty: none is started).
        pub recipient_listen: String,
        /// Its folder.
        pub recipient_data: std::path::PathBuf,
    }

    fn fast_backoff() -> Backoff {
        Backoff {
            initial_ms: 100,
            max_ms: 1000,
        }
    }

    /// The TLS files of the registry or the processor (`stem`), with the pair's revocation
    /// list and reload interval.
    fn service_tls(plan: &Plan<'_>, stem: &str) -> dsrelay_runtime::tls::TlsFiles {
        let mut files = plan.pki.files(stem);
        if plan.opts.revocation_list {
            files.crls = vec![plan.pki.crl()];
        }
        if let Some(ms) = plan.opts.tls_reload_ms {
            files.reload_interval_ms = ms;
        }
        files
    }

    fn port(listen: &str) -> &str {
        listen.rsplit_once(':').expect("host:port").1
    }

    pub(super) fn registry(plan: &Plan<'_>) -> dsrelay_registry::Config {
        let mut processors = vec![ProcessorConfig {
            name: PROCESSOR.into(),
            endpoint: match plan.opts.processor_endpoint {
                Some(addr) => format!("https://localhost:{}", addr.port()),
                None => format!("https://localhost:{}", port(&plan.processor_listen)),
            },
            identity: dev_identity("processor", PROCESSOR),
            categories: vec![
                "contact".into(),
                "invoicing".into(),
                "marketing".into(),
                "archive".into(),
            ],
            public_key: Some(plan.opts.processor_public_key.clone().unwrap_or_else(|| {
                plan.pki
                    .signing_public_key("processor")
                    .display()
                    .to_string()
            })),
            previous_public_keys: Vec::new(),
            revoked_public_keys: Vec::new(),
        }];
        if let Some(absent) = plan.absent_processor_port {
            processors.push(ProcessorConfig {
                name: "web-agency".into(),
                endpoint: format!("https://127.0.0.1:{absent}"),
                identity: dev_identity("processor", "web-agency"),
                categories: vec!["web-analytics".into()],
                public_key: None,
                previous_public_keys: Vec::new(),
                revoked_public_keys: Vec::new(),
            });
        }
        let party = |stem: &str, name: &str, role: Role| IdentityRole {
            identity: dev_identity(stem, name),
            role,
            name: name.into(),
        };
        let config = dsrelay_registry::Config {
            service: ServiceSettings {
                admin_token: None,
                listen: plan.registry_listen.clone(),
                admin_listen: plan.registry_admin.clone(),
                database_url: plan.registry_db.clone(),
                tls: service_tls(plan, "registry"),
                trust_domain: None,
                log_json: plan.opts.log_json,
                shutdown_grace_ms: plan
                    .opts
                    .shutdown_grace_ms
                    .unwrap_or(dsrelay_runtime::settings::DEFAULT_SHUTDOWN_GRACE_MS),
                call_limit_ms: plan
                    .opts
                    .call_limit_ms
                    .unwrap_or(dsrelay_runtime::settings::DEFAULT_CALL_LIMIT_MS),
                worker_threads: plan
                    .opts
                    .worker_threads
                    .unwrap_or(dsrelay_runtime::settings::DEFAULT_WORKER_THREADS),
            },
            identities: vec![
                party("partner", "crm", Role::Partner),
                party("partner", "webform", Role::Partner),
                party("operator", "ops", Role::Operator),
            ],
            processors,
            recipients: vec![match &plan.opts.recipient {
                Some(r) => RecipientConfig {
                    name: RECIPIENT.into(),
                    endpoint: format!("https://localhost:{}", port(&plan.recipient_listen)),
                    identity: r
                        .expected_identity
                        .clone()
                        .unwrap_or_else(recipient_identity),
                    description: "the accounting firm a customer moves to".into(),
                    // The key the spawned recipient signs its receipts with.
                    public_key: Some(
                        plan.pki
                            .signing_public_key("recipient")
                            .display()
                            .to_string(),
                    ),
                    previous_public_keys: Vec::new(),
                    revoked_public_keys: Vec::new(),
                },
                None => RecipientConfig {
                    name: RECIPIENT.into(),
                    endpoint: "https://recipient.invalid:8443".into(),
                    identity: dev_identity("recipient", RECIPIENT),
                    description: "the accounting firm a customer moves to".into(),
                    public_key: None,
                    previous_public_keys: Vec::new(),
                    revoked_public_keys: Vec::new(),
                },
            }],
            delivery: DeliveryConfig {
                backoff: fast_backoff(),
                poll_interval_ms: 100,
                lease_ms: 3000,
                batch_size: 64,
                concurrency: 8,
                call_timeout_ms: 3000,
                max_refusals: 5,
                // On (it is off by default), so that every end-to-end test runs through the
                // dispatcher's giving way to queued Submits.
                yield_to_intake_ms: 250,
            },
            reconcile: ReconcileConfig {
                interval_ms: 500,
                ack_timeout_ms: 3000,
                chain_interval_ms: 2000,
                max_backoff_ms: 60_000,
            },
            watch: plan.opts.watch.clone().unwrap_or_default(),
            submit_quota: Default::default(),
            packages: Default::default(),
            identity_hash_key: "test registry key".into(),
            forget_after_days: plan.opts.forget_after_days,
            forget_sweep_interval_ms: 200,
            package_dir: plan.registry_packages.clone(),
            package_ttl_days: 30,
            package_sweep_interval_ms: 200,
            contracts: Default::default(),
            // Signed often, so tests see the head checkpointed soon after it moves.
            audit: AuditConfig {
                checkpoints: true,
                checkpoint_key: Some(plan.pki.signing_key("registry")),
                checkpoint_file: Some(plan.registry_checkpoints.clone()),
                checkpoint_interval_ms: 100,
            },
        };
        config.validate().expect("registry config");
        config
    }

    fn subprocessor(plan: &Plan<'_>, holder: Holder) -> SubprocessorConfig {
        let finnish =
            |name: &str, categories: &[&str], description: &str, connector| SubprocessorConfig {
                name: name.into(),
                categories: categories.iter().map(|c| c.to_string()).collect(),
                country: "FI".into(),
                transfer_mechanism: TransferMechanismConfig::None,
                description: description.into(),
                connector,
            };
        let scoped = plan.opts.second_controller && plan.opts.scope_holders;
        let controllers = scoped.then(|| {
            vec![
                super::CONTROLLER.to_string(),
                super::OTHER_CONTROLLER.to_string(),
            ]
        });
        match holder {
            Holder::Accounting => finnish(
                "accounting",
                &["contact", "invoicing"],
                "accounting outsourcing",
                ConnectorConfig::Sql({
                    let mut sql = sample_config(&plan.accounting_url);
                    if scoped {
                        // Each controller's books in a database of its own; the shared url
                        // is then not opened.
                        for (name, url) in [
                            (super::CONTROLLER, &plan.accounting_url),
                            (super::OTHER_CONTROLLER, &plan.other_accounting_url),
                        ] {
                            sql.controllers.insert(
                                name.to_string(),
                                dsrelay_connectors::sql::ControllerScope {
                                    condition: None,
                                    url: Some(url.clone()),
                                },
                            );
                        }
                    }
                    sql
                }),
            ),
            Holder::MailMarketing => SubprocessorConfig {
                name: "mail-marketing".into(),
                categories: vec!["marketing".into()],
                country: "US".into(),
                transfer_mechanism: TransferMechanismConfig::AdequacyDecision,
                description: "mail-marketing service (EU-US Data Privacy Framework)".into(),
                connector: ConnectorConfig::Noop(NoopConfig {
                    delay_ms: plan.opts.mail_delay_ms,
                    controllers: controllers.clone(),
                    ..Default::default()
                }),
            },
            Holder::PaperArchive => finnish(
                "paper-archive",
                &["archive"],
                "signed contracts in cabinet B2",
                ConnectorConfig::Manual(ManualConfig {
                    instructions: "shred the customer's folder and note its id".into(),
                    controllers: controllers.clone(),
                }),
            ),
            Holder::Newsletter => finnish(
                NEWSLETTER,
                &["marketing", "contact"],
                "newsletter service (the example adapter)",
                ConnectorConfig::Adapter(AdapterConfig {
                    endpoint: match plan.opts.newsletter_endpoint {
                        Some(addr) => format!("https://localhost:{}", addr.port()),
                        None => format!("https://localhost:{}", port(&plan.adapter_listen)),
                    },
                    identity: dev_identity("adapter", "example"),
                    tls: plan.pki.files("processor"),
                    timeout_ms: 5000,
                    supported_kinds: plan.opts.newsletter_kinds.clone(),
                    controllers,
                }),
            ),
        }
    }

    pub(super) fn processor(plan: &Plan<'_>) -> dsrelay_processor::Config {
        let config = dsrelay_processor::Config {
            service: ServiceSettings {
                admin_token: None,
                listen: plan.processor_listen.clone(),
                admin_listen: plan.processor_admin.clone(),
                database_url: plan.processor_db.clone(),
                tls: service_tls(plan, "processor"),
                trust_domain: None,
                log_json: plan.opts.log_json,
                shutdown_grace_ms: plan
                    .opts
                    .shutdown_grace_ms
                    .unwrap_or(dsrelay_runtime::settings::DEFAULT_SHUTDOWN_GRACE_MS),
                call_limit_ms: plan
                    .opts
                    .call_limit_ms
                    .unwrap_or(dsrelay_runtime::settings::DEFAULT_CALL_LIMIT_MS),
                worker_threads: plan
                    .opts
                    .worker_threads
                    .unwrap_or(dsrelay_runtime::settings::DEFAULT_WORKER_THREADS),
            },
            controllers: [(super::CONTROLLER, "controller")]
                .into_iter()
                .chain(
                    plan.opts
                        .second_controller
                        .then_some((super::OTHER_CONTROLLER, "other")),
                )
                .map(|(name, stem)| ControllerConfig {
                    name: name.into(),
                    identity: dev_identity("registry", stem),
                    registry_endpoint: format!("https://localhost:{}", plan.ack_port),
                })
                .collect(),
            operators: vec![dev_identity("operator", "ops")],
            data_dir: plan.processor_data.clone(),
            signing_key: Some(plan.pki.signing_key("processor")),
            subprocessors: plan
                .opts
                .holders
                .iter()
                .map(|h| subprocessor(plan, *h))
                .collect(),
            tasks: TaskConfig {
                backoff: plan.opts.task_backoff.unwrap_or_else(fast_backoff),
                poll_interval_ms: 100,
                lease_ms: 2000,
                batch_size: 64,
                concurrency: 8,
                export_concurrency: 4,
                confirm_interval_ms: 200,
            },
            acks: AckConfig {
                backoff: fast_backoff(),
                poll_interval_ms: 100,
                lease_ms: 2000,
                batch_size: 200,
                call_timeout_ms: 3000,
                max_rejections: 5,
            },
            uploads: UploadConfig {
                backoff: fast_backoff(),
                poll_interval_ms: 100,
                lease_ms: 10_000,
                stall_ms: 10_000,
                concurrency: 4,
                call_timeout_ms: 3000,
            },
            contracts: ContractsConfig {
                progress_interval_ms: 50,
            },
            identity_hash_key: "test processor key".into(),
            forget_after_days: plan.opts.forget_after_days,
            forget_sweep_interval_ms: plan.opts.processor_forget_sweep_ms.unwrap_or(200),
            // Signed often, so tests see the head checkpointed soon after it moves.
            audit: dsrelay_processor::config::AuditConfig {
                checkpoints: true,
                checkpoint_key: Some(plan.pki.signing_key("processor")),
                checkpoint_file: Some(plan.processor_checkpoints.clone()),
                checkpoint_interval_ms: 100,
            },
        };
        config.validate().expect("processor config");
        config
    }

    pub(super) fn adapter(plan: &Plan<'_>) -> dsrelay_example_adapter::Config {
        let config = dsrelay_example_adapter::Config {
            service: ServiceSettings {
                admin_token: None,
                listen: plan.adapter_listen.clone(),
                admin_listen: None,
                database_url: plan.adapter_db.clone(),
                tls: plan.pki.files("adapter"),
                trust_domain: None,
                log_json: plan.opts.log_json,
                shutdown_grace_ms: dsrelay_runtime::settings::DEFAULT_SHUTDOWN_GRACE_MS,
                call_limit_ms: dsrelay_runtime::settings::DEFAULT_CALL_LIMIT_MS,
                worker_threads: dsrelay_runtime::settings::DEFAULT_WORKER_THREADS,
            },
            allowed_identities: vec![dev_identity("processor", PROCESSOR)],
            confirm_delay_ms: plan.opts.newsletter_confirm_delay_ms,
            default_controller: super::CONTROLLER.into(),
        };
        config.validate().expect("adapter config");
        config
    }

    pub(super) fn recipient(plan: &Plan<'_>) -> dsrelay_example_recipient::Config {
        let opts = plan.opts.recipient.clone().unwrap_or_default();
        let config = dsrelay_example_recipient::Config {
            service: ServiceSettings {
                admin_token: None,
                listen: plan.recipient_listen.clone(),
                admin_listen: None,
                database_url: String::new(),
                tls: plan.pki.files("recipient"),
                trust_domain: None,
                log_json: plan.opts.log_json,
                shutdown_grace_ms: dsrelay_runtime::settings::DEFAULT_SHUTDOWN_GRACE_MS,
                call_limit_ms: dsrelay_runtime::settings::DEFAULT_CALL_LIMIT_MS,
                worker_threads: dsrelay_runtime::settings::DEFAULT_WORKER_THREADS,
            },
            name: RECIPIENT.into(),
            data_dir: plan.recipient_data.clone(),
            allowed_identities: vec![dev_identity("processor", PROCESSOR)],
            chunk_delay_ms: opts.chunk_delay_ms,
            signing_key: Some(plan.pki.signing_key("recipient")),
        };
        config.validate().expect("recipient config");
        config
    }

    /// Another replica of `registry` on its database: the same configuration, its own
    /// audit checkpoint file (`checkpoints`) and address (`listen`).
    pub(super) fn registry_replica(
        registry: &dsrelay_registry::Config,
        listen: std::net::SocketAddr,
        checkpoints: std::path::PathBuf,
    ) -> dsrelay_registry::Config {
        let mut config = registry.clone();
        config.service.listen = listen.to_string();
        config.audit.checkpoint_file = Some(checkpoints);
        config.validate().expect("registry replica config");
        config
    }

    /// Another replica of the processor `processor`: the same database and data folder,
    /// serving at `listen`, without an admin port, with a checkpoint file of its own.
    pub(super) fn processor_replica(
        processor: &dsrelay_processor::Config,
        listen: std::net::SocketAddr,
        checkpoints: std::path::PathBuf,
    ) -> dsrelay_processor::Config {
        let mut config = processor.clone();
        config.service.listen = listen.to_string();
        config.service.admin_listen = None;
        config.audit.checkpoint_file = Some(checkpoints);
        config.validate().expect("processor replica config");
        config
    }
}

/// One service's configuration.
#[derive(Clone)]
enum ServiceConfig {
    Registry(dsrelay_registry::Config),
    Processor(dsrelay_processor::Config),
    Adapter(dsrelay_example_adapter::Config),
    Recipient(dsrelay_example_recipient::Config),
}

impl ServiceConfig {
    fn database_url(&self) -> &str {
        match self {
            Self::Registry(c) => &c.service.database_url,
            Self::Processor(c) => &c.service.database_url,
            Self::Adapter(c) => &c.service.database_url,
            Self::Recipient(c) => &c.service.database_url,
        }
    }

    fn to_toml(&self) -> String {
        match self {
            Self::Registry(c) => toml::to_string(c),
            Self::Processor(c) => toml::to_string(c),
            Self::Adapter(c) => toml::to_string(c),
            Self::Recipient(c) => toml::to_string(c),
        }
        .expect("config as toml")
    }
}

/// The service's main socket.
enum Socket {
    /// Bound, never started: callers are refused.
    Reserved(TcpSocket),
    /// Listening since the first start; kept here so every start serves the same socket.
    Listening(std::net::TcpListener),
    /// Only while turning one into the other.
    Moving,
}

/// What runs.
enum Running {
    Stopped,
    InProcess {
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
        clock: Option<Clock>,
    },
    Process(tokio::process::Child),
}

/// One service of a pair, running or down.
pub struct Service {
    role: Role,
    mode: Mode,
    addr: SocketAddr,
    socket: Socket,
    /// The admin port's listener, bound by the pair like the main socket.
    admin: Option<std::net::TcpListener>,
    config: ServiceConfig,
    config_file: PathBuf,
    log_file: PathBuf,
    env: Vec<(String, String)>,
    pki: DevPki,
    running: Running,
}

impl Service {
    /// The address it serves gRPC on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its admin port, when the pair has admin ports.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .map(|l| l.local_addr().expect("admin addr"))
    }

    /// Its store.
    pub fn database_url(&self) -> &str {
        self.config.database_url()
    }

    /// Its configuration file (written for both modes; processes read it).
    pub fn config_file(&self) -> &Path {
        &self.config_file
    }

    /// The service's clock while it runs in this process; moving it moves the service's
    /// time. `None` for a process: its clock lives in another process and cannot be moved
    /// from a test.
    pub fn clock(&self) -> Option<Clock> {
        match &self.running {
            Running::InProcess { clock, .. } => clock.clone(),
            _ => None,
        }
    }

    /// The process id, while it runs as a process.
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Process(child) => child.id(),
            _ => None,
        }
    }

    /// The process's log so far (empty in process: the test's own output holds it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// A channel to it as the dev-PKI party `stem`, checking its identity where the
    /// service has a fixed one.
    pub fn channel(&self, stem: &str) -> Channel {
        let tls = self.pki.files(stem).client_config().expect("client tls");
        let expected = match self.role {
            Role::Registry => Some(dev_identity("registry", "controller")),
            Role::Processor => None,
            Role::Adapter => Some(dev_identity("adapter", "example")),
            Role::Recipient => Some(recipient_identity()),
        };
        dsrelay_runtime::tls::channel(
            &format!("https://localhost:{}", self.addr.port()),
            expected,
            &tls,
        )
        .expect("channel")
    }

    /// The listening socket, listening from now on.
    fn listener(&mut self) -> &std::net::TcpListener {
        if let Socket::Reserved(_) = self.socket {
            let Socket::Reserved(socket) = std::mem::replace(&mut self.socket, Socket::Moving)
            else {
                unreachable!()
            };
            self.socket = Socket::Listening(listen(socket));
        }
        match &self.socket {
            Socket::Listening(l) => l,
            _ => unreachable!("the socket is listening"),
        }
    }

    /// Starts it on its address and waits until it answers health checks.
    pub async fn start(&mut self) {
        assert!(
            matches!(self.running, Running::Stopped),
            "{} is already running",
            self.role.name()
        );
        self.running = match self.mode {
            Mode::InProcess => self.start_in_process().await,
            Mode::Processes => self.start_process(),
        };
        self.wait_serving().await;
    }

    async fn start_in_process(&mut self) -> Running {
        let listener = tokio_copy(self.listener());
        let admin = self.admin.as_ref().map(tokio_copy);
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let (task, clock) = match self.config.clone() {
            ServiceConfig::Registry(c) => {
                let app = dsrelay_registry::App::build(c)
                    .await
                    .expect("build registry");
                let clock = app.clock();
                let task = tokio::spawn(app.run_with_admin(listener, admin, shutdown));
                (task, Some(clock))
            }
            ServiceConfig::Processor(c) => {
                let app = dsrelay_processor::App::build(c)
                    .await
                    .expect("build processor");
                let clock = app.clock();
                let task = tokio::spawn(app.run_with_admin(listener, admin, shutdown));
                (task, Some(clock))
            }
            ServiceConfig::Adapter(c) => {
                let app = dsrelay_example_adapter::App::build(c)
                    .await
                    .expect("build adapter");
                (tokio::spawn(app.run(listener, shutdown)), None)
            }
            ServiceConfig::Recipient(c) => {
                let app = dsrelay_example_recipient::App::build(c).expect("build recipient");
                (tokio::spawn(app.run(listener, shutdown)), None)
            }
        };
        Running::InProcess { stop, task, clock }
    }

    fn start_process(&mut self) -> Running {
        let bin = match self.role {
            Role::Registry => "dsrelay-registry",
            Role::Processor => "dsrelay-processor",
            Role::Adapter => "dsrelay-example-adapter",
            Role::Recipient => "dsrelay-example-recipient",
        };
        // Handed down as systemd does: from fd 3 on, counted in LISTEN_FDS; the service
        // takes each for the configured address it is bound to.
        let mut fds = vec![OwnedFd::from(
            self.listener().try_clone().expect("dup listener"),
        )];
        if let Some(admin) = &self.admin {
            fds.push(OwnedFd::from(admin.try_clone().expect("dup admin")));
        }
        let count = fds.len();
        let mappings = fds
            .into_iter()
            .zip(3..)
            .map(|(parent_fd, child_fd)| FdMapping {
                parent_fd,
                child_fd,
            })
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .expect("log file");
        let mut cmd = std::process::Command::new(binary(bin));
        cmd.arg("--config")
            .arg(&self.config_file)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("LISTEN_FDS", count.to_string())
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        cmd.fd_mappings(mappings).expect("fd mappings");
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .expect("spawning a service");
        Running::Process(child)
    }

    /// Waits (up to 30 s) until it reports SERVING; fails at once, with its log, when the
    /// process exits or the in-process service returns.
    async fn wait_serving(&mut self) {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let stem = match self.role {
            Role::Registry => "operator",
            Role::Processor => "registry",
            Role::Adapter | Role::Recipient => "processor",
        };
        let mut client = HealthClient::new(self.channel(stem));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if r.is_ok() {
                return;
            }
            let ended = match &mut self.running {
                Running::Process(child) => child.try_wait().ok().flatten().is_some(),
                Running::InProcess { task, .. } => task.is_finished(),
                Running::Stopped => true,
            };
            if ended || tokio::time::Instant::now() > deadline {
                panic!(
                    "{} did not become healthy: {r:?}\n--- log ---\n{}",
                    self.role.name(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops it: gracefully in process; a process is killed. Its socket stays bound, so
    /// callers wait in the listen queue until it starts again.
    pub async fn stop(&mut self) {
        match std::mem::replace(&mut self.running, Running::Stopped) {
            Running::Stopped => {}
            Running::InProcess { stop, mut task, .. } => {
                let _ = stop.send(());
                let _ = tokio::time::timeout(Duration::from_secs(15), &mut task).await;
            }
            Running::Process(child) => {
                self.running = Running::Process(child);
                self.kill().await;
            }
        }
    }

    /// SIGKILL: no shutdown handler runs, whatever was in flight is cut off. Processes only:
    /// an in-process service cannot be cut off like that.
    pub async fn kill(&mut self) {
        match std::mem::replace(&mut self.running, Running::Stopped) {
            Running::Process(mut child) => {
                child.start_kill().expect("sending SIGKILL");
                let status = child.wait().await.expect("reaping");
                assert!(!status.success(), "a killed process does not exit cleanly");
            }
            Running::Stopped => {}
            Running::InProcess { .. } => {
                panic!("kill needs a process: start the pair with Mode::Processes")
            }
        }
    }

    /// SIGTERM, the signal an orchestrator stops a service with; waits (at most 30 s) for the
    /// process to exit and answers how it exited and how long that took. Processes only.
    pub async fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let Running::Process(mut child) = std::mem::replace(&mut self.running, Running::Stopped)
        else {
            panic!("terminate needs a running process: start the pair with Mode::Processes")
        };
        let pid = child.id().expect("a running process has an id");
        let began = std::time::Instant::now();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM {pid}: {sent}");
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} did not exit within 30 s of SIGTERM\n--- log ---\n{}",
                    self.role.name(),
                    self.log()
                )
            })
            .expect("reaping");
        (status, began.elapsed())
    }

    /// SIGKILL, then the same binary with the same configuration on the same socket; waits
    /// until it serves again. Processes only.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.start().await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // The in-process service's workers see the stop and end; a process is killed on drop.
        if let Running::InProcess { stop, .. } =
            std::mem::replace(&mut self.running, Running::Stopped)
        {
            let _ = stop.send(());
        }
    }
}

/// A running pair (the registry, the processor and, with the newsletter holder, the adapter),
/// its folder, its PKI and its databases.
pub struct TestPair {
    pub registry: Service,
    pub processor: Service,
    /// Present when [`Holder::Newsletter`] is one of the holders.
    pub adapter: Option<Service>,
    /// Present when [`PairOptions::recipient`] is set.
    pub recipient: Option<Service>,
    /// The sample accounting database the `accounting` holder erases from.
    pub accounting_url: String,
    /// The second controller's sample accounting database, with the same rows
    /// ([`PairOptions::scope_holders`]; created only then).
    pub other_accounting_url: String,
    pki: DevPki,
    /// Ports where nothing listens (the absent processor, acknowledgements to nowhere),
    /// bound so that calls there are refused at once and nobody else takes them.
    _nowhere: Vec<TcpSocket>,
    /// Last, so the services are gone before their folder is.
    dir: TempDir,
}

/// Starts a pair as `opts` says; `None` when its backend is skipped here (PostgreSQL without
/// a server outside CI).
pub async fn spawn_pair(opts: PairOptions) -> Option<TestPair> {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = DevPki::ensure(&dir.path().join("pki")).expect("dev pki");
    if opts.revocation_list {
        pki.revoke(&[], Duration::from_secs(30 * 86_400))
            .expect("an empty revocation list");
    }
    let registry_db = database_url(dir.path(), "registry", opts.backend).await?;
    let processor_db = database_url(dir.path(), "processor", opts.backend).await?;
    let accounting_url = format!("sqlite://{}/accounting.db", dir.path().display());
    dsrelay_connectors::sql::create_sample_accounting_db(&accounting_url)
        .await
        .expect("sample accounting db");
    let other_accounting_url = format!("sqlite://{}/accounting-other.db", dir.path().display());
    if opts.scope_holders {
        dsrelay_connectors::sql::create_sample_accounting_db(&other_accounting_url)
            .await
            .expect("the second controller's sample accounting db");
    }

    let registry_socket = reserve();
    let processor_socket = reserve();
    let adapter_socket = (opts.holders.contains(&Holder::Newsletter)
        && opts.newsletter_endpoint.is_none())
    .then(reserve);
    let recipient_socket = opts.recipient.is_some().then(reserve);
    let admin = |on: bool| {
        on.then(|| std::net::TcpListener::bind("127.0.0.1:0").expect("binding an admin port"))
    };
    let (registry_admin, processor_admin) = (admin(opts.admin), admin(opts.admin));
    let admin_addr = |l: &Option<std::net::TcpListener>| {
        l.as_ref()
            .map(|l| l.local_addr().expect("admin addr").to_string())
    };
    let mut nowhere = Vec::new();
    let ack_port = if let Some(registry) = opts.registry_endpoint {
        registry.port()
    } else if opts.acks_to_nowhere {
        nowhere.push(reserve());
        addr_of(&nowhere[nowhere.len() - 1]).port()
    } else {
        addr_of(&registry_socket).port()
    };
    let absent_processor_port = opts.with_absent_processor.then(|| {
        nowhere.push(reserve());
        addr_of(&nowhere[nowhere.len() - 1]).port()
    });
    let plan = configs::Plan {
        opts: &opts,
        pki: &pki,
        registry_listen: addr_of(&registry_socket).to_string(),
        registry_admin: admin_addr(&registry_admin),
        registry_db,
        processor_listen: addr_of(&processor_socket).to_string(),
        processor_admin: admin_addr(&processor_admin),
        processor_db,
        processor_data: dir.path().join(PROCESSOR_DATA_DIR),
        registry_packages: dir.path().join(REGISTRY_PACKAGES_DIR),
        registry_checkpoints: dir.path().join(REGISTRY_CHECKPOINTS),
        processor_checkpoints: dir.path().join(PROCESSOR_CHECKPOINTS),
        ack_port,
        absent_processor_port,
        accounting_url: accounting_url.clone(),
        other_accounting_url: other_accounting_url.clone(),
        adapter_listen: adapter_socket
            .as_ref()
            .map(|s| addr_of(s).to_string())
            .unwrap_or_default(),
        adapter_db: format!("sqlite://{}/newsletter.db", dir.path().display()),
        recipient_listen: recipient_socket
            .as_ref()
            .map(|s| addr_of(s).to_string())
            .unwrap_or_default(),
        recipient_data: dir.path().join(RECIPIENT_DATA_DIR),
    };

    let service = |role: Role, socket: TcpSocket, admin, config: ServiceConfig| {
        let config_file = dir.path().join(format!("{}.toml", role.name()));
        std::fs::write(&config_file, config.to_toml()).expect("writing a config file");
        let mut env = Vec::new();
        if let Some(filter) = &opts.rust_log {
            env.push(("RUST_LOG".to_string(), filter.clone()));
        }
        if let Some(endpoint) = &opts.otel_endpoint {
            env.extend([
                ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()),
                ("OTEL_SERVICE_NAME".into(), role.name().into()),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            ]);
        }
        Service {
            role,
            mode: opts.mode,
            addr: addr_of(&socket),
            socket: Socket::Reserved(socket),
            admin,
            config,
            config_file,
            log_file: dir.path().join(format!("{}.log", role.name())),
            env,
            pki: pki.clone(),
            running: Running::Stopped,
        }
    };
    let registry = service(
        Role::Registry,
        registry_socket,
        registry_admin,
        ServiceConfig::Registry(configs::registry(&plan)),
    );
    let processor = service(
        Role::Processor,
        processor_socket,
        processor_admin,
        ServiceConfig::Processor(configs::processor(&plan)),
    );
    let adapter = adapter_socket.map(|socket| {
        service(
            Role::Adapter,
            socket,
            None,
            ServiceConfig::Adapter(configs::adapter(&plan)),
        )
    });
    let recipient = recipient_socket.map(|socket| {
        let mut s = service(
            Role::Recipient,
            socket,
            None,
            ServiceConfig::Recipient(configs::recipient(&plan)),
        );
        if opts.recipient.as_ref().is_some_and(|r| r.process) {
            s.mode = Mode::Processes;
        }
        s
    });
    let mut pair = TestPair {
        registry,
        processor,
        adapter,
        recipient,
        accounting_url,
        other_accounting_url,
        pki,
        _nowhere: nowhere,
        dir,
    };
    // Holders first, the registry last: what is up is ready for what calls it.
    for role in [
        Role::Recipient,
        Role::Adapter,
        Role::Processor,
        Role::Registry,
    ] {
        if opts.down.contains(&role) {
            continue;
        }
        if let Some(service) = pair.service(role) {
            service.start().await;
        }
    }
    Some(pair)
}

impl TestPair {
    fn service(&mut self, role: Role) -> Option<&mut Service> {
        match role {
            Role::Registry => Some(&mut self.registry),
            Role::Processor => Some(&mut self.processor),
            Role::Adapter => self.adapter.as_mut(),
            Role::Recipient => self.recipient.as_mut(),
        }
    }

    /// The pair's folder (configurations, logs, SQLite files, PKI).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The folder the processor writes the export of `request_id` at `subprocessor` to.
    pub fn export_dir(&self, request_id: &str, subprocessor: &str) -> PathBuf {
        dsrelay_processor::exports::task_dir(
            &self.dir().join(PROCESSOR_DATA_DIR),
            &dsrelay_processor::store::TaskKey {
                controller: CONTROLLER.into(),
                request_id: request_id.into(),
                subprocessor: subprocessor.into(),
            },
        )
    }

    /// The registry's package folder.
    pub fn package_dir(&self) -> PathBuf {
        self.dir().join(REGISTRY_PACKAGES_DIR)
    }

    /// The file the registry appends its signed audit checkpoints to.
    pub fn checkpoint_file(&self) -> PathBuf {
        self.dir().join(REGISTRY_CHECKPOINTS)
    }

    /// The configuration of another replica of the registry on its database, serving at
    /// `listen`, with checkpoint file number `n` of its own.
    pub fn registry_replica_config(&self, listen: SocketAddr, n: u32) -> dsrelay_registry::Config {
        let ServiceConfig::Registry(registry) = &self.registry.config else {
            unreachable!("the pair's registry has a registry configuration")
        };
        configs::registry_replica(
            registry,
            listen,
            self.dir().join(format!("registry-{n}-checkpoints.jsonl")),
        )
    }

    /// The configuration of another replica of the processor on its database and data
    /// folder, serving at `listen`, with checkpoint file number `n` of its own.
    pub fn processor_replica_config(
        &self,
        listen: SocketAddr,
        n: u32,
    ) -> dsrelay_processor::Config {
        let ServiceConfig::Processor(processor) = &self.processor.config else {
            unreachable!("the pair's processor has a processor configuration")
        };
        configs::processor_replica(
            processor,
            listen,
            self.dir().join(format!("processor-{n}-checkpoints.jsonl")),
        )
    }

    /// The file the processor appends its signed audit checkpoints to.
    pub fn processor_checkpoint_file(&self) -> PathBuf {
        self.dir().join(PROCESSOR_CHECKPOINTS)
    }

    /// The pair's development PKI, its CA generated for this test.
    pub fn pki(&self) -> &DevPki {
        &self.pki
    }

    /// The example recipient (panics unless [`PairOptions::recipient`] started one).
    pub fn recipient(&mut self) -> &mut Service {
        self.recipient
            .as_mut()
            .expect("a recipient: set PairOptions::recipient")
    }

    /// The example recipient's folder: `<sender>/<request_id>/<subprocessor>/<name>` per file
    /// received.
    pub fn recipient_dir(&self) -> PathBuf {
        self.dir().join(RECIPIENT_DATA_DIR)
    }

    /// Where the example recipient keeps what this pair's processor sent it:
    /// `<request_id>/<subprocessor>/<name>` per file.
    pub fn received_from_processor(&self) -> PathBuf {
        self.recipient_dir()
            .join(dsrelay_example_recipient::folder::sender_component(
                &dev_identity("processor", PROCESSOR),
            ))
    }

    /// The adapter (panics unless the newsletter is a holder).
    pub fn adapter(&mut self) -> &mut Service {
        self.adapter
            .as_mut()
            .expect("an adapter: add Holder::Newsletter to the holders")
    }

    /// The registry's request API as the dev-PKI party `stem` (`partner-crm`,
    /// `partner-webform`, `operator`, `processor`, ...).
    pub fn client(&self, stem: &str) -> RequestServiceClient<Channel> {
        RequestServiceClient::new(self.channel_to_registry(stem))
    }

    /// The registry's request API as the partner `crm`.
    pub fn crm(&self) -> RequestServiceClient<Channel> {
        self.client("partner-crm")
    }

    /// The registry's request API as the operator.
    pub fn operator(&self) -> RequestServiceClient<Channel> {
        self.client("operator")
    }

    /// The processor's operator API as the operator.
    pub fn processor_operator(&self) -> ProcessorOperatorServiceClient<Channel> {
        ProcessorOperatorServiceClient::new(self.channel_to_processor("operator"))
    }

    /// A raw channel to the registry as `stem`, for any service client.
    pub fn channel_to_registry(&self, stem: &str) -> Channel {
        self.registry.channel(stem)
    }

    /// A raw channel to the processor as `stem`, for any service client.
    pub fn channel_to_processor(&self, stem: &str) -> Channel {
        self.processor.channel(stem)
    }

    /// Stops every service (the registry first, so nothing new reaches the others).
    pub async fn stop(mut self) {
        self.registry.stop().await;
        self.processor.stop().await;
        if let Some(adapter) = &mut self.adapter {
            adapter.stop().await;
        }
        if let Some(recipient) = &mut self.recipient {
            recipient.stop().await;
        }
    }
}

/// A raw e-mail identity.
pub fn email(v: &str) -> SubjectIdentity {
    SubjectIdentity {
        r#type: IdentityType::Email as i32,
        encoding: IdentityEncoding::Raw as i32,
        value: v.into(),
        label: String::new(),
    }
}

/// An erasure of the subject with `mail`, under a fresh idempotency key.
pub fn erasure(mail: &str) -> SubmitRequest {
    SubmitRequest {
        kind: RequestKind::Erasure as i32,
        identities: vec![email(mail)],
        idempotency_key: format!("test-{}", uuid::Uuid::new_v4()),
        ..Default::default()
    }
}

/// Polls Get until `pred` holds, or panics after `timeout` with the last view.
pub async fn wait_until(
    client: &mut RequestServiceClient<Channel>,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&Request) -> bool,
) -> Request {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = client
            .get(GetRequest {
                request_id: id.into(),
            })
            .await
            .map(|r| r.into_inner());
        if let Ok(r) = &last {
            if pred(r) {
                return r.clone();
            }
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for request {id}; last view: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True when the request is in `state`.
pub fn in_state(state: RequestState) -> impl Fn(&Request) -> bool {
    move |r| r.state == state as i32
}

/// Counts the rows of `sql` (a `SELECT COUNT(*) ...`) in an SQLite or PostgreSQL database.
pub async fn count(url: &str, sql: &str) -> i64 {
    let db = dsrelay_runtime::store::Db::connect(url)
        .await
        .expect("connect");
    let n: i64 = sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect("count");
    db.pool.close().await;
    n
}

/// Waits (10 s at most) until the running service whose database is `url` has chained every
/// audit entry committed so far: on PostgreSQL entries wait in `audit_pending` for the
/// service's chainer, which runs every `CHAIN_INTERVAL`; on SQLite they are chained when
/// committed. For tests that read `audit_log` directly rather than through the service.
pub async fn audit_chained(url: &str) {
    if url.starts_with("sqlite:") {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pending = count(url, "SELECT COUNT(*) FROM audit_pending").await;
        if pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pending} audit entries still wait for the chainer after 10 s"
        );
        tokio::time::sleep(dsrelay_runtime::audit::table::CHAIN_INTERVAL).await;
    }
}

/// Where cargo put the service binaries (next to the test binary's `deps` folder).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the service binaries first (`cargo build --workspace --bins`; \
         scripts/test.sh does it)",
        path.display()
    );
    path
}

/// Running the real `dsrctl` binary against a pair, as its users do.
pub mod dsrctl {
    use std::ffi::OsString;
    use std::path::Path;
    use std::process::Output;
    use std::time::Duration;

    use serde_json::Value;

    use super::{binary, TestPair};

    /// The identity the registry's certificate names.
    pub const REGISTRY_IDENTITY: &str = "spiffe://dsrelay.dev/registry/controller";

    /// Every variable dsrctl reads; removed so the caller's environment cannot leak in.
    pub const ENV_NAMES: [&str; 7] = [
        "DSRCTL_ENDPOINT",
        "DSRCTL_CA",
        "DSRCTL_CERT",
        "DSRCTL_KEY",
        "DSRCTL_CRL",
        "DSRCTL_SERVER_IDENTITY",
        "DSRCTL_CONFIG",
    ];

    /// A finished dsrctl run.
    pub struct Run {
        pub code: Option<i32>,
        pub stdout: String,
        pub stderr: String,
    }

    impl From<Output> for Run {
        fn from(out: Output) -> Self {
            Self {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
    }

    impl Run {
        /// Asserts the exit status, showing both streams when it differs.
        pub fn expect_code(&self, code: i32) -> &Self {
            assert_eq!(
                self.code,
                Some(code),
                "exit status\n--- stdout ---\n{}--- stderr ---\n{}",
                self.stdout,
                self.stderr
            );
            self
        }

        /// Stdout of a successful run.
        pub fn ok(&self) -> &str {
            self.expect_code(0);
            &self.stdout
        }

        /// Stdout of a successful run, parsed as one JSON document.
        pub fn json(&self) -> Value {
            serde_json::from_str(self.ok())
                .unwrap_or_else(|e| panic!("{e}: not JSON:\n{}", self.stdout))
        }
    }

    /// dsrctl in `cwd`, with no `DSRCTL_*` variables set.
    pub fn command(cwd: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(binary("dsrctl"));
        cmd.current_dir(cwd).kill_on_drop(true);
        for name in ENV_NAMES {
            cmd.env_remove(name);
        }
        cmd
    }

    pub async fn output(mut cmd: tokio::process::Command) -> Run {
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("dsrctl finished within a minute")
            .expect("running dsrctl");
        out.into()
    }

    /// The registry's endpoint.
    pub fn endpoint(pair: &TestPair) -> String {
        format!("https://localhost:{}", pair.registry.addr().port())
    }

    /// `--ca --cert --key` of the dev-PKI party `stem`, and the registry's identity.
    pub fn tls_flags(pair: &TestPair, stem: &str) -> Vec<OsString> {
        let files = pair.pki().files(stem);
        vec![
            "--ca".into(),
            files.ca.into(),
            "--cert".into(),
            files.cert.into(),
            "--key".into(),
            files.key.into(),
            "--server-identity".into(),
            REGISTRY_IDENTITY.into(),
        ]
    }

    /// dsrctl with every connection flag pointing at the pair's registry, as `stem`.
    pub fn as_party(pair: &TestPair, stem: &str) -> tokio::process::Command {
        let mut cmd = command(pair.dir());
        cmd.arg("--endpoint")
            .arg(endpoint(pair))
            .args(tls_flags(pair, stem));
        cmd
    }

    /// Runs `dsrctl ARGS` against the pair's registry as the dev-PKI party `stem`.
    pub async fn dsrctl(pair: &TestPair, stem: &str, args: &[&str]) -> Run {
        let mut cmd = as_party(pair, stem);
        cmd.args(args);
        output(cmd).await
    }
}
