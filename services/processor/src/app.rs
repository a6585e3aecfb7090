//! Building and running the processor: store, connectors, workers and the gRPC server.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_connectors::Connector;
use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::processor_operator_service_server::ProcessorOperatorServiceServer;
use dsrelay_proto::v1::processor_service_server::ProcessorServiceServer;
use dsrelay_runtime::clock::Clock;
use dsrelay_runtime::server::MAX_MESSAGE_BYTES;
use dsrelay_runtime::store::Db;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tonic::transport::Channel;

use crate::api::Api;
use crate::config::Config;
use crate::operator_api::OperatorApi;
use crate::store::{Store, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

/// State shared by the handlers and the workers.
pub struct Shared {
    /// The store.
    pub store: Store,
    /// The configuration the processor started with.
    pub config: Config,
    /// One connector per subprocessor, by name.
    pub connectors: HashMap<String, Arc<dyn Connector>>,
    /// The clock tasks are scheduled by; tests move it.
    pub clock: Clock,
    /// One acknowledgement client per controller, by name.
    pub registries: HashMap<String, AcknowledgementServiceClient<Channel>>,
    /// Wakes the task runner when tasks were stored, so they do not wait for the next poll.
    pub task_wakeup: Notify,
    /// Wakes the acknowledgement sender when acknowledgements were queued.
    pub ack_wakeup: Notify,
    /// Subprocessors that failed transiently, and until when (ms) their tasks wait without
    /// calling them: one unreachable holder costs one timeout, not one per task.
    pub unavailable_until: crate::breaker::Breaker,
    /// Counters and histograms served on the admin port.
    pub metrics: crate::metrics::Metrics,
}

/// A processor ready to serve.
pub struct App {
    shared: Arc<Shared>,
}

impl App {
    /// Connects and migrates the store, connects every subprocessor's connector, and prepares
    /// the registry clients. Nothing listens yet.
    pub async fn build(config: Config) -> Result<Self> {
        let db = Db::connect(&config.database_url).await?;
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS).await?;
        let mut connectors = HashMap::new();
        for s in &config.subprocessors {
            let c = dsrelay_connectors::build(&s.connector)
                .await
                .with_context(|| format!("connecting subprocessor {}", s.name))?;
            connectors.insert(s.name.clone(), c);
        }
        let client_tls = config
            .tls
            .client_config()
            .context("loading the processor's TLS files")?;
        let mut registries = HashMap::new();
        for c in &config.controllers {
            let channel = dsrelay_runtime::tls::channel(
                &c.registry_endpoint,
                Some(c.identity.clone()),
                &client_tls,
            )
            .with_context(|| format!("controller {}", c.name))?;
            registries.insert(
                c.name.clone(),
                AcknowledgementServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        }
        Ok(Self {
            shared: Arc::new(Shared {
                metrics: crate::metrics::Metrics::new(&config),
                store: Store::new(db),
                config,
                connectors,
                clock: Clock::system(),
                registries,
                task_wakeup: Notify::new(),
                ack_wakeup: Notify::new(),
                unavailable_until: Default::default(),
            }),
        })
    }

    /// The processor's clock; clones share its offset, so tests move time with it.
    pub fn clock(&self) -> Clock {
        self.shared.clock.clone()
    }

    /// The shared state (for tests and tools).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves on `listener` and runs the task runner and acknowledgement sender until
    /// `shutdown` resolves. Binds the admin port when the configuration names one
    /// (`admin_listen`).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let admin =
            dsrelay_runtime::metrics::bind(self.shared.config.admin_listen.as_deref()).await?;
        self.run_with_admin(listener, admin, shutdown).await
    }

    /// [`App::run`] with an admin listener the caller bound (or none: no admin port),
    /// whatever the configuration says.
    pub async fn run_with_admin(
        self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let shared = self.shared;
        let (stop_tx, stop_rx) = watch::channel(false);
        let scraped = shared.clone();
        let admin = dsrelay_runtime::metrics::spawn(
            admin,
            Arc::new(move || {
                let shared = scraped.clone();
                Box::pin(async move {
                    let now = shared.clock.now_ms();
                    crate::metrics::render(&shared, now).await
                })
            }),
            stop_rx.clone(),
        );
        let runner = tokio::spawn(crate::runner::run(shared.clone(), stop_rx.clone()));
        let sender = tokio::spawn(crate::ack_sender::run(shared.clone(), stop_rx));

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ProcessorServiceServer<Api>>().await;
        health
            .set_serving::<ProcessorOperatorServiceServer<OperatorApi>>()
            .await;
        let router = dsrelay_runtime::server::builder(shared.config.tls.server_config()?)?
            .add_service(health_service)
            .add_service(dsrelay_runtime::server::reflection()?)
            .add_service(dsrelay_runtime::server::reflection_v1alpha()?)
            .add_service(ProcessorOperatorServiceServer::new(OperatorApi::new(
                shared.clone(),
            )))
            .add_service(
                ProcessorServiceServer::new(Api::new(shared.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        let addr = listener.local_addr().ok();
        tracing::info!(
            ?addr,
            subprocessors = shared.connectors.len(),
            "processor serving"
        );
        let served = dsrelay_runtime::server::serve(router, listener, shutdown).await;
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            let _ = runner.await;
            let _ = sender.await;
            if let Some(admin) = admin {
                let _ = admin.await;
            }
        })
        .await;
        tracing::info!("processor stopped");
        served
    }
}
