//! Building the registry (store, processor clients, shared state) and handing its services,
//! metrics and workers to the runtime's [`Host`], which serves and stops them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use dsrelay_proto::v1::acknowledgement_service_server::AcknowledgementServiceServer;
use dsrelay_proto::v1::certificate_service_server::CertificateServiceServer;
use dsrelay_proto::v1::contract_service_server::ContractServiceServer;
use dsrelay_proto::v1::export_upload_service_server::ExportUploadServiceServer;
use dsrelay_proto::v1::package_service_server::PackageServiceServer;
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::request_service_server::RequestServiceServer;
use dsrelay_runtime::audit::signer::Checkpointer;
use dsrelay_runtime::clock::Clock;
use dsrelay_runtime::host::{Host, ReflectionRole};
use dsrelay_runtime::server::MAX_MESSAGE_BYTES;
use dsrelay_runtime::signing::PublicKey;
use dsrelay_runtime::store::Db;
use dsrelay_runtime::tls::LiveTls;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Notify};
use tonic::transport::Channel;

use crate::api::{Api, Uploading};
use crate::auth::Authorizer;
use crate::config::{Config, Role};
use crate::intake::{self, Writer};
use crate::packages::{FolderStore, Packages};
use crate::store::{Store, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

/// Largest message the request, contract, certificate and package APIs decode. The largest
/// valid one is a Submit of about 45 KB (16 identities, 32 corrections of 1 KiB, 32 data
/// categories, a note: `validate::tests::the_largest_valid_submit_fits_the_decode_limit`).
/// tonic refuses a longer message from its length prefix (OUT_OF_RANGE) before buffering its
/// body, so a flood of oversized calls costs the registry no memory; with the 4 MiB of
/// [`MAX_MESSAGE_BYTES`] instead, 16 callers sending 3.9 MB Submits for 15 s took the pair
/// from 18 MB to 102 MB resident.
pub const MAX_API_MESSAGE_BYTES: usize = 64 * 1024;

/// State shared by the handlers and the background workers.
pub(crate) struct Shared {
    /// The store.
    pub store: Store,
    /// The configuration the registry started with.
    pub config: Config,
    /// Certificate identity → caller.
    pub auth: Authorizer,
    /// Wakes the dispatcher when new outbox rows were committed, so delivery does not wait
    /// for the next poll.
    pub dispatch_wakeup: Notify,
    /// Carries the id of every request that changed, to wake Watch streams.
    pub events: broadcast::Sender<String>,
    /// One client per processor, connecting lazily.
    pub processors: HashMap<String, ProcessorServiceClient<Channel>>,
    /// Key of the identity hashes kept for the audit trail and deduplication, and of the
    /// Submit body hash.
    pub identity_hash_key: Vec<u8>,
    /// Counters and histograms served on the admin port.
    pub metrics: crate::metrics::Metrics,
    /// Group commit of submitted requests.
    pub intake: crate::intake::Intake,
    /// The clock deadlines and events are stamped by; tests move it. Leases are timed on the
    /// database's clock instead (`store/outbox.rs`), so that replicas agree on them.
    pub clock: Clock,
    /// Where return-of-data packages are kept, and for how long.
    pub packages: Packages,
    /// Files being uploaded right now, so two streams never append to one file.
    pub uploading: Uploading,
    /// Each processor's certificate-checking key (`public_key`), by processor name.
    pub certificate_keys: HashMap<String, PublicKey>,
    /// Watch streams open per caller.
    pub watchers: crate::api::watch::Slots,
    /// Turns true when shutdown begins, so Watch streams end at once instead of holding
    /// the server open.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Signs the audit trail's checkpoints and reads them back; `None` with
    /// `audit.checkpoints = false`.
    pub checkpoints: Option<Arc<Checkpointer>>,
}

impl Shared {
    /// Tells Watch streams that `request_id` changed.
    pub(crate) fn publish(&self, request_id: &str) {
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(request_id.to_string());
    }
}

/// A registry ready to serve.
pub struct App {
    shared: Arc<Shared>,
    /// Started as a worker by `run`, so intake stops with the other workers.
    intake_writer: Writer,
    /// The registry's TLS, which its server and its channels to processors share.
    tls: LiveTls,
}

impl App {
    /// Connects and migrates the store and prepares processor clients. Nothing listens and
    /// no worker runs yet.
    pub async fn build(config: Config) -> Result<Self> {
        let db = Db::connect(&config.service.database_url).await?;
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS).await?;
        let own_identity = config
            .service
            .tls
            .own_identity()
            .context("reading the registry's own certificate identity")?;
        let errors = config.trust_errors(&own_identity)?;
        anyhow::ensure!(errors.is_empty(), "configuration: {}", errors.join("; "));
        // Shared with the host, whose watcher reloads it: new connections to the processors
        // then present the new certificate too.
        let tls = LiveTls::load(&config.service.tls).context("loading the registry's TLS files")?;
        let mut processors = HashMap::new();
        let mut certificate_keys = HashMap::new();
        for p in &config.processors {
            if let Some(key) = &p.public_key {
                let key = PublicKey::from_config(key)
                    .with_context(|| format!("processor {}: public_key", p.name))?;
                certificate_keys.insert(p.name.clone(), key);
            }
            let channel =
                dsrelay_runtime::tls::channel(&p.endpoint, Some(p.identity.clone()), &tls)
                    .with_context(|| format!("processor {}", p.name))?;
            let client = ProcessorServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            processors.insert(p.name.clone(), client);
        }
        // Config::validate refuses an empty key; checked again here for configurations
        // built in code, so no request is ever hashed with a key anyone could know.
        anyhow::ensure!(
            !config.identity_hash_key.is_empty(),
            "identity_hash_key: required"
        );
        let identity_hash_key = config.identity_hash_key.as_bytes().to_vec();
        let checkpoints = Checkpointer::from_config("registry", &config.audit)?.map(Arc::new);
        if checkpoints.is_none() {
            tracing::warn!(
                "audit.checkpoints is off: whoever can write the database can rewrite the audit \
                 trail without a trace"
            );
        }
        let (events, _) = broadcast::channel(1024);
        let store = Store::new(db, &identity_hash_key);
        let (intake, intake_writer) = intake::channel(store.clone());
        let packages = Packages::new(
            Arc::new(FolderStore::new(&config.package_dir)),
            config.package_ttl_days,
        );
        Ok(Self {
            shared: Arc::new(Shared {
                metrics: crate::metrics::Metrics::new(&config),
                intake,
                store,
                auth: crate::auth::authorizer(&config),
                config,
                dispatch_wakeup: Notify::new(),
                events,
                processors,
                identity_hash_key,
                clock: Clock::system(),
                packages,
                uploading: Uploading::default(),
                certificate_keys,
                watchers: Default::default(),
                stopping: tokio::sync::watch::channel(false).0,
                checkpoints,
            }),
            intake_writer,
            tls,
        })
    }

    /// The registry's clock; clones share its offset, so tests move time with it.
    pub fn clock(&self) -> Clock {
        self.shared.clock.clone()
    }

    /// Serves on `listener` and runs the intake writer, dispatcher, reconciler, package
    /// expiry, forgetting and audit checkpoints until
    /// `shutdown` resolves; then stops accepting, lets the workers finish their current
    /// round (queued Submits are committed), and returns. Binds the admin port when the
    /// configuration names one (`admin_listen`).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let shutdown = self.announcing(shutdown);
        self.host().run(listener, shutdown).await
    }

    /// [`App::run`] with an admin listener the caller bound (or none: no admin port),
    /// whatever the configuration says.
    pub async fn run_with_admin(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let shutdown = self.announcing(shutdown);
        self.host().run_with_admin(listener, admin, shutdown).await
    }

    /// `shutdown`, which also tells the registry's open streams that it began.
    fn announcing(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            shutdown.await;
            shared.stopping.send_replace(true);
        }
    }

    fn host(self) -> Host {
        let Self {
            shared,
            intake_writer,
            tls,
        } = self;
        tracing::info!(processors = shared.processors.len(), "registry starting");
        let api = Api::new(shared.clone());
        let scraped = shared.clone();
        let (dispatched, reconciled, chained) = (shared.clone(), shared.clone(), shared.clone());
        let (expiring, forgetting) = (shared.clone(), shared.clone());
        let audit_chain = shared.store.clone();
        let checkpointing = shared
            .checkpoints
            .clone()
            .map(|c| (c, shared.store.clone(), shared.clock.clone()));
        let host = Host::new("registry", &shared.config.service)
            .tls(tls)
            .reflection_for(reflection_roles(&shared.config))
            .service(
                RequestServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_API_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            // Only processors call it, with up to 500 acknowledgements (`MAX_ACKS_PER_CALL`)
            // whose texts may each be 9 KB and certificates 64 KiB: more than fits, so the
            // processor's sender splits its batches to stay under this limit.
            .service(
                AcknowledgementServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            // MAX_MESSAGE_BYTES (4 MiB) leaves room for a 1 MiB chunk with its header and
            // digest, both ways, and for a CompletePart, which lists every file of a part
            // (at most `MAX_FILES_PER_PART`, 10,000).
            .service(
                ExportUploadServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .service(
                CertificateServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_API_MESSAGE_BYTES),
            )
            .service(
                ContractServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_API_MESSAGE_BYTES),
            )
            .service(
                PackageServiceServer::new(api)
                    .max_decoding_message_size(MAX_API_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .metrics(move || {
                let shared = scraped.clone();
                async move {
                    let now = shared.clock.now_ms();
                    crate::metrics::render(&shared, now).await
                }
            })
            .worker("intake", move |stop| intake_writer.run(stop))
            .worker("dispatcher", move |stop| {
                crate::dispatcher::run(dispatched, stop)
            })
            .worker("reconciler", move |stop| {
                crate::reconciler::run(reconciled, stop)
            })
            .worker("processor chain", move |stop| {
                crate::reconciler::refresh_chain(chained, stop)
            })
            .worker("package expiry", move |stop| {
                crate::packages::expire(expiring, stop)
            })
            .worker("forgetting", move |stop| {
                crate::forget::run(forgetting, stop)
            })
            .worker("audit chainer", move |stop| async move {
                audit_chain.run_audit_chainer(stop).await
            });
        match checkpointing {
            Some((checkpointer, store, clock)) => host.worker("audit checkpoints", move |stop| {
                dsrelay_runtime::audit::signer::run(checkpointer, store, clock, stop)
            }),
            None => host,
        }
    }
}

/// Who sees what in server reflection: each role only the services it may call.
fn reflection_roles(config: &Config) -> Vec<ReflectionRole> {
    use dsrelay_proto::v1::{
        acknowledgement_service_server as acks, certificate_service_server as certificates,
        contract_service_server as contracts, export_upload_service_server as uploads,
        package_service_server as packages, request_service_server as requests,
    };
    let people = |role: Role| {
        config
            .identities
            .iter()
            .filter(|i| i.role == role)
            .map(|i| i.identity.clone())
            .collect()
    };
    // RequestService's methods reflection shows a partner: all but the operators'
    // (ExtendDeadline, ListAuditEntries, ListDeadLetteredDeliveries, RequeueDelivery, whose
    // handlers refuse partners too). A method added to the service stays hidden from
    // partners until it is listed here.
    const PARTNER_REQUEST_METHODS: [&str; 8] = [
        "dsrelay.v1.RequestService/Submit",
        "dsrelay.v1.RequestService/Get",
        "dsrelay.v1.RequestService/List",
        "dsrelay.v1.RequestService/Watch",
        "dsrelay.v1.RequestService/Cancel",
        "dsrelay.v1.RequestService/GetChain",
        "dsrelay.v1.RequestService/ListEvents",
        "dsrelay.v1.RequestService/ListAuditCheckpoints",
    ];
    let mut partner_services: Vec<&'static str> = PARTNER_REQUEST_METHODS.to_vec();
    partner_services.extend([certificates::SERVICE_NAME, packages::SERVICE_NAME]);
    let operator_services = vec![
        requests::SERVICE_NAME,
        certificates::SERVICE_NAME,
        packages::SERVICE_NAME,
        contracts::SERVICE_NAME,
    ];
    vec![
        ReflectionRole {
            callers: people(Role::Partner),
            services: partner_services,
        },
        ReflectionRole {
            callers: people(Role::Operator),
            services: operator_services,
        },
        ReflectionRole {
            callers: config
                .processors
                .iter()
                .map(|p| p.identity.clone())
                .collect(),
            services: vec![acks::SERVICE_NAME, uploads::SERVICE_NAME],
        },
    ]
}
