//! Starts real service pairs for tests: in-process on 127.0.0.1 ports, or as real processes
//! that can be SIGKILLed and restarted; real mTLS from a CA generated per test; real SQLite
//! files or a fresh PostgreSQL database per test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dsrelay_connectors::manual::ManualConfig;
use dsrelay_connectors::sql::{create_sample_accounting_db, sample_config};
use dsrelay_processor::config::{
    AckConfig, ConnectorConfig, ControllerConfig, NoopConfig, SubprocessorConfig, TaskConfig,
    TransferMechanismConfig,
};
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    GetRequest, IdentityEncoding, IdentityType, Request, RequestKind, RequestState,
    SubjectIdentity, SubmitRequest,
};
use dsrelay_registry::config::{
    DeliveryConfig, IdentityRole, ProcessorConfig, ReconcileConfig, Role,
};
use dsrelay_runtime::backoff::Backoff;
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::settings::ServiceSettings;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Which store the services use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
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
            eprintln!("skipped on PostgreSQL: DSRELAY_TEST_POSTGRES_URL is not set");
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

/// Options for a pair.
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// Store backend of both services (the sample accounting DB stays SQLite).
    pub backend: Backend,
    /// Delay of the mail-marketing no-op subprocessor (ms).
    pub mail_delay_ms: u64,
    /// Register a second processor whose endpoint nothing listens on.
    pub with_absent_processor: bool,
    /// Point the processor's acknowledgements at a port nothing listens on, so the registry
    /// learns of progress only by reconciling.
    pub acks_to_nowhere: bool,
    /// Add a third subprocessor, `paper-archive` (category `archive`), whose manual connector
    /// waits for an operator.
    pub with_manual_archive: bool,
    /// Give both services an admin port (`admin_listen`) on a free 127.0.0.1 port.
    pub admin: bool,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            backend: Backend::Sqlite,
            mail_delay_ms: 0,
            with_absent_processor: false,
            acks_to_nowhere: false,
            with_manual_archive: false,
            admin: false,
        }
    }
}

/// The name under which the registry knows the processor.
pub const PROCESSOR: &str = "payroll-bureau";

/// Everything a pair needs that outlives a restart: folder, PKI, addresses, configurations.
pub struct Setup {
    pub dir: TempDir,
    pub pki: DevPki,
    pub registry_addr: SocketAddr,
    pub processor_addr: SocketAddr,
    pub registry: dsrelay_registry::Config,
    pub processor: dsrelay_processor::Config,
    pub accounting_url: String,
    /// Extra environment variables for service processes (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
}

fn fast_backoff() -> Backoff {
    Backoff {
        initial_ms: 100,
        max_ms: 1000,
    }
}

async fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    l.local_addr().expect("local addr")
}

impl Setup {
    /// Generates the PKI, databases and configurations; binds nothing.
    pub async fn new(opts: &PairOptions) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = DevPki::ensure(&dir.path().join("pki")).expect("dev pki");
        let registry_db = database_url(dir.path(), "registry", opts.backend).await?;
        let processor_db = database_url(dir.path(), "processor", opts.backend).await?;
        let accounting_url = format!("sqlite://{}/accounting.db", dir.path().display());
        create_sample_accounting_db(&accounting_url)
            .await
            .expect("sample accounting db");
        let registry_addr = free_port().await;
        let processor_addr = free_port().await;
        let ack_port = if opts.acks_to_nowhere {
            free_port().await.port()
        } else {
            registry_addr.port()
        };
        let mut processors = vec![ProcessorConfig {
            name: PROCESSOR.into(),
            endpoint: format!("https://localhost:{}", processor_addr.port()),
            identity: dev_identity("processor", PROCESSOR),
            categories: vec![
                "contact".into(),
                "invoicing".into(),
                "marketing".into(),
                "archive".into(),
            ],
        }];
        if opts.with_absent_processor {
            let absent = free_port().await;
            processors.push(ProcessorConfig {
                name: "web-agency".into(),
                endpoint: format!("https://127.0.0.1:{}", absent.port()),
                identity: dev_identity("processor", "web-agency"),
                categories: vec!["web-analytics".into()],
            });
        }
        let mut registry = dsrelay_registry::Config {
            service: ServiceSettings::new(
                registry_addr.to_string(),
                registry_db,
                pki.files("registry"),
            ),
            identities: vec![
                IdentityRole {
                    identity: dev_identity("partner", "crm"),
                    role: Role::Partner,
                    name: "crm".into(),
                },
                IdentityRole {
                    identity: dev_identity("partner", "webform"),
                    role: Role::Partner,
                    name: "webform".into(),
                },
                IdentityRole {
                    identity: dev_identity("operator", "ops"),
                    role: Role::Operator,
                    name: "ops".into(),
                },
            ],
            processors,
            delivery: DeliveryConfig {
                backoff: fast_backoff(),
                poll_interval_ms: 100,
                lease_ms: 3000,
                batch_size: 64,
                concurrency: 8,
                call_timeout_ms: 3000,
            },
            reconcile: ReconcileConfig {
                interval_ms: 500,
                ack_timeout_ms: 3000,
                chain_interval_ms: 2000,
            },
            identity_hash_key: "test key".into(),
        };
        let mut processor = dsrelay_processor::Config {
            service: ServiceSettings::new(
                processor_addr.to_string(),
                processor_db,
                pki.files("processor"),
            ),
            controllers: vec![ControllerConfig {
                name: "controller".into(),
                identity: dev_identity("registry", "controller"),
                registry_endpoint: format!("https://localhost:{ack_port}"),
            }],
            operators: vec![dev_identity("operator", "ops")],
            subprocessors: vec![
                SubprocessorConfig {
                    name: "accounting".into(),
                    categories: vec!["contact".into(), "invoicing".into()],
                    country: "FI".into(),
                    transfer_mechanism: TransferMechanismConfig::None,
                    description: "accounting outsourcing".into(),
                    connector: ConnectorConfig::Sql(sample_config(&accounting_url)),
                },
                SubprocessorConfig {
                    name: "mail-marketing".into(),
                    categories: vec!["marketing".into()],
                    country: "US".into(),
                    transfer_mechanism: TransferMechanismConfig::AdequacyDecision,
                    description: "mail-marketing service (EU-US Data Privacy Framework)".into(),
                    connector: ConnectorConfig::Noop(NoopConfig {
                        delay_ms: opts.mail_delay_ms,
                    }),
                },
            ],
            tasks: TaskConfig {
                backoff: fast_backoff(),
                poll_interval_ms: 100,
                lease_ms: 2000,
                batch_size: 64,
                concurrency: 8,
                confirm_interval_ms: 200,
            },
            acks: AckConfig {
                backoff: fast_backoff(),
                poll_interval_ms: 100,
                lease_ms: 2000,
                batch_size: 200,
                call_timeout_ms: 3000,
            },
        };
        if opts.with_manual_archive {
            processor.subprocessors.push(SubprocessorConfig {
                name: "paper-archive".into(),
                categories: vec!["archive".into()],
                country: "FI".into(),
                transfer_mechanism: TransferMechanismConfig::None,
                description: "signed contracts in cabinet B2".into(),
                connector: ConnectorConfig::Manual(ManualConfig {
                    instructions: "shred the customer's folder and note its id".into(),
                }),
            });
        }
        if opts.admin {
            registry.service.admin_listen = Some(free_port().await.to_string());
            processor.service.admin_listen = Some(free_port().await.to_string());
        }
        registry.validate().expect("registry config");
        processor.validate().expect("processor config");
        Some(Self {
            dir,
            pki,
            registry_addr,
            processor_addr,
            registry,
            processor,
            accounting_url,
            env: Vec::new(),
        })
    }

    /// A partner-API client authenticating as the party `stem` of the dev PKI.
    pub async fn client(&self, stem: &str) -> RequestServiceClient<Channel> {
        RequestServiceClient::new(self.channel_to_registry(stem))
    }

    /// A channel to the registry as `stem`.
    pub fn channel_to_registry(&self, stem: &str) -> Channel {
        let tls = self.pki.files(stem).client_config().expect("client tls");
        dsrelay_runtime::tls::channel(
            &format!("https://localhost:{}", self.registry_addr.port()),
            Some(dev_identity("registry", "controller")),
            &tls,
        )
        .expect("channel")
    }

    /// A channel to the processor as `stem`.
    pub fn channel_to_processor(&self, stem: &str) -> Channel {
        let tls = self.pki.files(stem).client_config().expect("client tls");
        dsrelay_runtime::tls::channel(
            &format!("https://localhost:{}", self.processor_addr.port()),
            None,
            &tls,
        )
        .expect("channel")
    }
}

/// A service running in this process.
pub struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Stops it gracefully and waits.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.handle).await;
    }
}

/// Starts the registry in-process on its configured address.
pub async fn start_registry(
    setup: &Setup,
) -> (InProcess, std::sync::Arc<dsrelay_registry::app::Shared>) {
    let listener = TcpListener::bind(setup.registry_addr)
        .await
        .expect("bind registry");
    // Bound here, so that the admin port (when configured) answers once this returns.
    let admin = dsrelay_runtime::metrics::bind(setup.registry.service.admin_listen.as_deref())
        .await
        .expect("bind registry admin port");
    let app = dsrelay_registry::App::build(setup.registry.clone())
        .await
        .expect("build registry");
    let shared = app.shared();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_with_admin(listener, admin, async {
        let _ = rx.await;
    }));
    (
        InProcess {
            stop: Some(tx),
            handle,
        },
        shared,
    )
}

/// Starts the processor in-process on its configured address.
pub async fn start_processor(setup: &Setup) -> InProcess {
    start_processor_with_state(setup).await.0
}

/// Starts the processor in-process and returns its shared state too (its clock, for tests
/// that move time).
pub async fn start_processor_with_state(
    setup: &Setup,
) -> (InProcess, std::sync::Arc<dsrelay_processor::app::Shared>) {
    let listener = TcpListener::bind(setup.processor_addr)
        .await
        .expect("bind processor");
    let admin = dsrelay_runtime::metrics::bind(setup.processor.service.admin_listen.as_deref())
        .await
        .expect("bind processor admin port");
    let app = dsrelay_processor::App::build(setup.processor.clone())
        .await
        .expect("build processor");
    let shared = app.shared();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_with_admin(listener, admin, async {
        let _ = rx.await;
    }));
    (
        InProcess {
            stop: Some(tx),
            handle,
        },
        shared,
    )
}

/// A pair running in this process.
pub struct Pair {
    pub setup: Setup,
    pub registry: InProcess,
    pub registry_shared: std::sync::Arc<dsrelay_registry::app::Shared>,
    pub processor: InProcess,
    pub processor_shared: std::sync::Arc<dsrelay_processor::app::Shared>,
}

impl Pair {
    /// Starts both services, or `None` when the backend is skipped here.
    pub async fn start(opts: PairOptions) -> Option<Self> {
        let setup = Setup::new(&opts).await?;
        let (processor, processor_shared) = start_processor_with_state(&setup).await;
        let (registry, registry_shared) = start_registry(&setup).await;
        Some(Self {
            setup,
            registry,
            registry_shared,
            processor,
            processor_shared,
        })
    }

    /// Stops both.
    pub async fn stop(self) {
        self.registry.stop().await;
        self.processor.stop().await;
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

/// A service running as a real process, which tests may SIGKILL and restart.
pub struct Process {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
}

impl Process {
    /// Starts `bin_name --config config`, logging to `log`.
    pub async fn start(bin_name: &str, config: PathBuf, log: PathBuf) -> Self {
        Self::start_with_env(bin_name, config, log, Vec::new()).await
    }

    /// Like [`Process::start`], with extra environment variables.
    pub async fn start_with_env(
        bin_name: &str,
        config: PathBuf,
        log: PathBuf,
        env: Vec<(String, String)>,
    ) -> Self {
        let mut p = Self {
            bin: binary(bin_name),
            config,
            log,
            env,
            child: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = tokio::process::Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawning a service");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown handler runs, whatever was in flight is cut off.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().expect("sending SIGKILL");
            let status = c.wait().await.expect("reaping");
            assert!(!status.success(), "a killed process does not exit cleanly");
        }
    }

    /// Starts the same binary with the same configuration again.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn();
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// The service's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Setup {
    /// Writes both configurations as TOML files; returns (registry, processor) paths.
    pub fn write_configs(&self) -> (PathBuf, PathBuf) {
        let r = self.dir.path().join("registry.toml");
        let p = self.dir.path().join("processor.toml");
        std::fs::write(&r, toml::to_string(&self.registry).expect("registry toml")).expect("write");
        std::fs::write(
            &p,
            toml::to_string(&self.processor).expect("processor toml"),
        )
        .expect("write");
        (r, p)
    }

    /// Starts the registry as a process and waits until it answers health checks.
    pub async fn spawn_registry(&self) -> Process {
        let (r, _) = self.write_configs();
        let p = Process::start_with_env(
            "dsrelay-registry",
            r,
            self.dir.path().join("registry.log"),
            self.env.clone(),
        )
        .await;
        wait_serving(self.channel_to_registry("operator"), &p).await;
        p
    }

    /// Starts the processor as a process and waits until it answers health checks.
    pub async fn spawn_processor(&self) -> Process {
        let (_, pc) = self.write_configs();
        let p = Process::start_with_env(
            "dsrelay-processor",
            pc,
            self.dir.path().join("processor.log"),
            self.env.clone(),
        )
        .await;
        wait_serving(self.channel_to_processor("registry"), &p).await;
        p
    }
}

/// Waits (up to 30 s) until the service behind `channel` reports SERVING.
pub async fn wait_serving(channel: Channel, process: &Process) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut client = HealthClient::new(channel);
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
        if tokio::time::Instant::now() > deadline {
            panic!(
                "service did not become healthy: {r:?}\n--- log ---\n{}",
                process.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a processor service after a restart (same as [`wait_serving`]).
pub async fn wait_processor(setup: &Setup, p: &Process) {
    wait_serving(setup.channel_to_processor("registry"), p).await;
}

/// Waits for the registry after a restart.
pub async fn wait_registry(setup: &Setup, p: &Process) {
    wait_serving(setup.channel_to_registry("operator"), p).await;
}
