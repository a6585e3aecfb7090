//! Building the adapter (its store) and handing its service and, when erasures are confirmed
//! after a delay, the sweeper that carries them out on time to the runtime's [`Host`], which
//! serves them with health, reflection and an admin port (`/healthz`; `/metrics` has no
//! families of its own).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_proto::v1::subprocessor_adapter_server::SubprocessorAdapterServer;
use dsrelay_runtime::host::{Host, Stop};
use dsrelay_runtime::server::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;

use crate::api::Api;
use crate::config::Config;
use crate::store::Store;

/// Largest answer sent: an export page of up to 16 MiB (the most `max_bytes` may ask) plus
/// the rest of the message.
pub(crate) const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;

/// An adapter ready to serve.
pub struct App {
    config: Config,
    store: Store,
}

impl App {
    /// Connects and migrates the store (seeding subscribers on first start) and gives the
    /// subscribers stored without a controller to `default_controller` (and their billing
    /// records with them). Nothing listens yet.
    pub async fn build(config: Config) -> Result<Self> {
        let store = Store::open(&config.service.database_url)
            .await
            .context("opening the newsletter database")?;
        let (subscribers, billing_records) = store
            .assign_unowned(&config.default_controller)
            .await
            .context("assigning subscribers and billing records without a controller")?;
        if subscribers + billing_records > 0 {
            tracing::info!(
                subscribers,
                billing_records,
                controller = %config.default_controller,
                "subscribers and billing records without a controller assigned"
            );
        }
        Ok(Self { config, store })
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> Store {
        self.store.clone()
    }

    /// Serves on `listener` until `shutdown` resolves. Binds the admin port when the
    /// configuration names one (`admin_listen`).
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
        let Self { config, store } = self;
        let delay = config.confirm_delay_ms;
        tracing::info!(confirm_delay_ms = delay, "adapter starting");
        let api = Api::new(
            store.clone(),
            &config.allowed_identities,
            delay,
            &config.default_controller,
        );
        let host = Host::new("adapter", &config.service).service(
            SubprocessorAdapterServer::new(api)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        );
        if delay == 0 {
            return host;
        }
        host.worker("sweeper", move |stop| sweep(store, delay, stop))
    }
}

/// Carries out accepted erasures once their delay has passed, so they finish on time even
/// when nobody asks (GetTaskStatus finishes a due one too).
async fn sweep(store: Store, confirm_delay_ms: u64, mut stop: Stop) {
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
