//! Building and running the adapter: store, gRPC server (with health and reflection) and, when
//! erasures are confirmed after a delay, the sweeper that carries them out on time.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_proto::v1::subprocessor_adapter_server::SubprocessorAdapterServer;
use dsrelay_runtime::server::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::Api;
use crate::config::Config;
use crate::store::Store;

/// Largest answer sent: an export of up to 16 MiB plus the rest of the message.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;

/// An adapter ready to serve.
pub struct App {
    config: Config,
    store: Store,
}

impl App {
    /// Connects and migrates the store (seeding subscribers on first start). Nothing listens
    /// yet.
    pub async fn build(config: Config) -> Result<Self> {
        let store = Store::open(&config.database_url)
            .await
            .context("opening the newsletter database")?;
        Ok(Self { config, store })
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let tls = self
            .config
            .tls
            .server_config()
            .context("loading the adapter's TLS files")?;
        let api = Api::new(
            self.store.clone(),
            &self.config.allowed_identities,
            self.config.confirm_delay_ms,
        );
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<SubprocessorAdapterServer<Api>>().await;
        let router = dsrelay_runtime::server::builder(tls)?
            .add_service(health_service)
            .add_service(dsrelay_runtime::server::reflection()?)
            .add_service(dsrelay_runtime::server::reflection_v1alpha()?)
            .add_service(
                SubprocessorAdapterServer::new(api)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            );
        let (stop_tx, stop_rx) = watch::channel(false);
        let sweeper = (self.config.confirm_delay_ms > 0).then(|| {
            tokio::spawn(sweep(
                self.store.clone(),
                self.config.confirm_delay_ms,
                stop_rx,
            ))
        });
        let addr = listener.local_addr().ok();
        tracing::info!(
            ?addr,
            confirm_delay_ms = self.config.confirm_delay_ms,
            "adapter serving"
        );
        let served = dsrelay_runtime::server::serve(router, listener, shutdown).await;
        let _ = stop_tx.send(true);
        if let Some(s) = sweeper {
            let _ = tokio::time::timeout(Duration::from_secs(10), s).await;
        }
        tracing::info!("adapter stopped");
        served
    }
}

/// Carries out accepted erasures once their delay has passed, so they finish on time even
/// when nobody asks (GetTaskStatus finishes a due one too).
async fn sweep(store: Store, confirm_delay_ms: u64, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_millis((confirm_delay_ms / 4).clamp(50, 1000));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if *stop.borrow() {
            return;
        }
        if let Err(e) = store.finish_due(dsrelay_runtime::store::now_ms()).await {
            tracing::error!(error = %e, "finishing accepted erasures failed");
        }
    }
}
