//! Building the processor (store, connectors, registry clients, shared state) and handing its
//! services, metrics and workers to the runtime's [`Host`], which serves and stops them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use dsrelay_connectors::Connector;
use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::processor_operator_service_server::{self, ProcessorOperatorServiceServer};
use dsrelay_proto::v1::processor_service_server::{self, ProcessorServiceServer};
use dsrelay_runtime::audit::signer::Checkpointer;
use dsrelay_runtime::clock::Clock;
use dsrelay_runtime::host::{Host, ReflectionRole};
use dsrelay_runtime::server::MAX_MESSAGE_BYTES;
use dsrelay_runtime::store::Db;
use dsrelay_runtime::tls::{LiveTls, ReloadingChannel};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use dsrelay_runtime::signing::SigningKey;

use crate::api::Api;
use crate::certificates::Issuer;
use crate::config::Config;
use crate::operator_api::OperatorApi;
use crate::store::{Store, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

/// Largest message the processor's APIs decode. The largest valid one is a Deliver of about
/// 45 KB: a rectification with 16 identities, 32 corrections of 1 KiB and 32 data categories,
/// as the registry's largest valid Submit, with its request id and dates
/// (`api::tests::the_largest_valid_delivery_fits_the_decode_limit`); a transfer's recipient
/// is far smaller than the corrections, and an operator's note or reason is at most 4 KiB. tonic refuses a longer message from its length prefix
/// (OUT_OF_RANGE) before buffering its body, so oversized calls cost no memory.
pub const MAX_API_MESSAGE_BYTES: usize = 64 * 1024;

/// State shared by the handlers and the workers.
pub(crate) struct Shared {
    /// The store.
    pub store: Store,
    /// The configuration the processor started with.
    pub config: Config,
    /// One connector per subprocessor, by name.
    pub connectors: HashMap<String, Arc<dyn Connector>>,
    /// The clock tasks are scheduled by; tests move it.
    pub clock: Clock,
    /// One acknowledgement client per controller, by name.
    pub registries: HashMap<String, AcknowledgementServiceClient<ReloadingChannel>>,
    /// Wakes the task runner when tasks were stored, so they do not wait for the next poll.
    pub task_wakeup: Notify,
    /// Wakes the acknowledgement sender when acknowledgements were queued.
    pub ack_wakeup: Notify,
    /// One upload client per controller, by name: the same registry endpoint and TLS as the
    /// acknowledgements.
    pub uploaders: HashMap<String, ExportUploadServiceClient<ReloadingChannel>>,
    /// Wakes the upload worker when an export was written and its upload queued.
    pub upload_wakeup: Notify,
    /// Channels to the recipients of transfers, made on first use with the processor's client
    /// TLS, one per (endpoint, identity).
    pub recipients: crate::uploader::RecipientClients,
    /// Subprocessors that failed transiently, and until when (ms) their tasks wait without
    /// calling them: one unreachable holder costs one timeout, not one per task.
    pub unavailable_until: crate::breaker::Breaker,
    /// One permit per export that may run at once (`tasks.export_concurrency`): an export
    /// holds buffers and an upload stream, an erasure hardly anything.
    pub export_slots: tokio::sync::Semaphore,
    /// Counters and histograms served on the admin port.
    pub metrics: crate::metrics::Metrics,
    /// Turns true when the shutdown grace is over: task steps still calling their holder
    /// drop the call and release their lease ([`crate::runner`]).
    pub abandon: watch::Sender<bool>,
    /// Turns true when the task runner has returned, so the acknowledgement sender knows no
    /// more acknowledgements come before it stops.
    pub runner_stopped: watch::Sender<bool>,
    /// Task leases released by steps abandoned at the end of the shutdown grace, for the
    /// runner's last log line.
    pub shutdown_released: std::sync::atomic::AtomicUsize,
    /// Signs the audit trail's head into the checkpoint file; `None` when `audit.checkpoints`
    /// is off.
    pub checkpoints: Option<Arc<Checkpointer>>,
}

impl Shared {
    /// The key of the hashes that stand in log lines for text from outside the processor (a
    /// holder's error, a registry's or recipient's status message), which may name the
    /// subject: [`dsrelay_runtime::log_text`].
    pub(crate) fn log_key(&self) -> &[u8] {
        self.config.identity_hash_key.as_bytes()
    }
}

/// The signer of deletion certificates, when the configuration names a key; `identity`
/// (the processor's own certificate identity) names the processor in its certificates.
fn issuer(config: &Config, identity: String) -> Result<Option<Arc<Issuer>>> {
    let Some(path) = &config.signing_key else {
        tracing::warn!(
            "no signing_key configured: erasures are acknowledged without a deletion certificate"
        );
        return Ok(None);
    };
    let key = SigningKey::load(path)?;
    let issuer = Issuer::new(key, identity);
    tracing::info!(key_id = %issuer.key_id(), "signing deletion certificates");
    Ok(Some(Arc::new(issuer)))
}

/// A processor ready to serve.
pub struct App {
    shared: Arc<Shared>,
    /// The processor's TLS, which its server and its outbound channels share.
    tls: LiveTls,
}

impl App {
    /// Connects and migrates the store, connects every subprocessor's connector (a `sql`
    /// holder unreachable for a reason that may pass is connected on its first task), and prepares
    /// the registry clients. Nothing listens yet.
    pub async fn build(config: Config) -> Result<Self> {
        // Config::validate refuses an empty key; checked again for configurations built in
        // code, so nothing is ever hashed with a key anyone could know.
        anyhow::ensure!(
            !config.identity_hash_key.is_empty(),
            "identity_hash_key: required"
        );
        use tracing::Instrument;
        let mut connectors = HashMap::new();
        for s in &config.subprocessors {
            // Under a span naming the subprocessor, so that what the connector logs while
            // it connects (a holder it starts without) names it; not the runner's
            // `connector` span, which is about a request.
            let c = dsrelay_connectors::build(&s.connector)
                .instrument(tracing::info_span!("connecting", subprocessor = %s.name))
                .await
                .with_context(|| format!("connecting subprocessor {}", s.name))?;
            if let dsrelay_connectors::ConnectorConfig::Noop(noop) = &s.connector {
                // By default it answers COMPLETED for work no system did: an operator who
                // configured it in place of a real holder should learn that from the log, not
                // from an audit.
                tracing::warn!(
                    subprocessor = %s.name,
                    answer = ?noop.answer,
                    "this subprocessor uses the noop connector: it holds nothing and answers \
                     every task without reaching any system (for benchmarks, tests and \
                     stand-ins)"
                );
            }
            connectors.insert(s.name.clone(), c);
        }
        Self::with_connectors(config, connectors).await
    }

    /// [`App::build`] with the connectors given, one per subprocessor by name (tests bring
    /// their own).
    pub(crate) async fn with_connectors(
        config: Config,
        connectors: HashMap<String, Arc<dyn Connector>>,
    ) -> Result<Self> {
        let errors = config.scoping_errors(|name| {
            connectors
                .get(name)
                .and_then(|c: &Arc<dyn Connector>| c.scoped_controllers())
        });
        anyhow::ensure!(errors.is_empty(), "configuration: {}", errors.join("; "));
        let own_identity = config
            .service
            .tls
            .own_identity()
            .context("reading the processor's own certificate identity")?;
        let errors = config.trust_errors(&own_identity)?;
        anyhow::ensure!(errors.is_empty(), "configuration: {}", errors.join("; "));
        let checkpoints = Checkpointer::from_config(crate::SERVICE, &config.audit)?.map(Arc::new);
        if checkpoints.is_none() {
            tracing::warn!(
                "audit.checkpoints is off: whoever can write the database can rewrite the audit \
                 trail without a trace"
            );
        }
        let db = Db::connect(&config.service.database_url).await?;
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS).await?;
        // Shared with the host, whose watcher reloads it: new connections to the registries
        // and recipients then present the new certificate too.
        let tls =
            LiveTls::load(&config.service.tls).context("loading the processor's TLS files")?;
        let recipients = crate::uploader::RecipientClients::new((&tls).into());
        let mut registries = HashMap::new();
        let mut uploaders = HashMap::new();
        for c in &config.controllers {
            let reloading = dsrelay_runtime::tls::reloading_channel(
                &c.registry_endpoint,
                Some(c.identity.clone()),
                &tls,
            )
            .with_context(|| format!("controller {}", c.name))?;
            // MAX_MESSAGE_BYTES (4 MiB) leaves room for a 1 MiB chunk with its header.
            uploaders.insert(
                c.name.clone(),
                ExportUploadServiceClient::new(reloading.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
            registries.insert(
                c.name.clone(),
                AcknowledgementServiceClient::new(reloading)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        }
        let export_slots = tokio::sync::Semaphore::new(config.tasks.export_concurrency);
        let clock = Clock::system();
        let breaker =
            crate::breaker::Breaker::new(clock.clone(), config.identity_hash_key.as_bytes());
        let store = Store::new(db, config.identity_hash_key.as_bytes())
            .with_issuer(issuer(&config, own_identity)?)
            .with_ack_handoff(config.acks.lease_ms);
        // A build before migration 0031 marked superseded dead letters that carry a deletion
        // certificate, which must still be sent; SQL cannot read the payloads, so this does.
        store
            .unmark_certified_dead_letters()
            .await
            .context("unmarking certified dead letters an earlier build superseded")?;
        Ok(Self {
            tls,
            shared: Arc::new(Shared {
                metrics: crate::metrics::Metrics::new(&config),
                store,
                config,
                connectors,
                clock,
                registries,
                task_wakeup: Notify::new(),
                ack_wakeup: Notify::new(),
                uploaders,
                upload_wakeup: Notify::new(),
                recipients,
                unavailable_until: breaker,
                export_slots,
                abandon: watch::Sender::new(false),
                runner_stopped: watch::Sender::new(false),
                shutdown_released: Default::default(),
                checkpoints,
            }),
        })
    }

    /// The state handlers and workers share (tests drive the runner with it).
    #[cfg(test)]
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The processor's clock; clones share its offset, so tests move time with it.
    pub fn clock(&self) -> Clock {
        self.shared.clock.clone()
    }

    /// Serves on `listener` and runs the task runner, acknowledgement sender, export
    /// uploader (to the registry and to transfer recipients), forgetting and the check that
    /// drops unreachable marks no task is left to try (`breaker::run`) until `shutdown`
    /// resolves. Binds the admin port when the configuration names one (`admin_listen`).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
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
        self.host().run_with_admin(listener, admin, shutdown).await
    }

    fn host(self) -> Host {
        let Self { shared, tls } = self;
        tracing::info!(
            subprocessors = shared.connectors.len(),
            "processor starting"
        );
        let scraped = shared.clone();
        let (runner, sender, uploader) = (shared.clone(), shared.clone(), shared.clone());
        let forgetting = shared.clone();
        let marks = shared.clone();
        let audit_chain = shared.store.clone();
        let signing = shared.checkpoints.clone().map(|c| (c, shared.clone()));
        // Each caller sees in reflection only what it may call.
        let reflection = [
            ReflectionRole {
                callers: shared
                    .config
                    .controllers
                    .iter()
                    .map(|c| c.identity.clone())
                    .collect(),
                services: vec![
                    processor_service_server::SERVICE_NAME,
                    "dsrelay.v1.ProcessorOperatorService/ListAuditCheckpoints",
                ],
            },
            ReflectionRole {
                callers: shared.config.operators.clone(),
                services: vec![processor_operator_service_server::SERVICE_NAME],
            },
        ];
        let host = Host::new("processor", &shared.config.service)
            .tls(tls)
            .reflection_for(reflection)
            .service(
                ProcessorOperatorServiceServer::new(OperatorApi::new(shared.clone()))
                    .max_decoding_message_size(MAX_API_MESSAGE_BYTES),
            )
            .service(
                ProcessorServiceServer::new(Api::new(shared.clone()))
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
            .worker("task runner", move |stop| crate::runner::run(runner, stop))
            .worker("acknowledgement sender", move |stop| {
                crate::ack_sender::run(sender, stop)
            })
            .worker("export uploader", move |stop| {
                crate::uploader::run(uploader, stop)
            })
            .worker("forgetting", move |stop| {
                crate::forget::run(forgetting, stop)
            })
            .worker("unreachable marks", move |stop| {
                crate::breaker::run(marks, stop)
            })
            .worker("audit chainer", move |stop| async move {
                audit_chain.run_audit_chainer(stop).await
            });
        match signing {
            Some((checkpointer, shared)) => host.worker("audit checkpoints", move |stop| {
                let (store, clock) = (shared.store.clone(), shared.clock.clone());
                dsrelay_runtime::audit::signer::run(checkpointer, store, clock, stop)
            }),
            None => host,
        }
    }
}

#[cfg(test)]
#[path = "lazy_holder_tests.rs"]
mod lazy_holder_tests;
