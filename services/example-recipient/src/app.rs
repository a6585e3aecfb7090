//! Building the recipient and handing its service to the runtime's [`Host`], which serves it
//! with health, reflection and an admin port (`/healthz`; `/metrics` has no families of its
//! own).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use dsrelay_proto::v1::transfer_receiver_server::TransferReceiverServer;
use dsrelay_runtime::host::Host;
use dsrelay_runtime::server::MAX_MESSAGE_BYTES;
use dsrelay_runtime::signing::SigningKey;
use tokio::net::TcpListener;

use crate::api::Api;
use crate::config::Config;
use crate::folder::Folder;

/// A recipient ready to serve.
pub struct App {
    config: Config,
    folder: Folder,
    signing_key: Option<Arc<SigningKey>>,
}

impl App {
    /// Reads the signing key (if configured) and creates the data folder. Nothing listens
    /// yet.
    pub fn build(config: Config) -> Result<Self> {
        let signing_key = signing_key(&config)?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let folder = Folder::new(config.data_dir.clone());
        Ok(Self {
            config,
            folder,
            signing_key,
        })
    }

    /// Serves on `listener` until `shutdown` resolves. Binds the admin port when the
    /// configuration names one (`admin_listen`).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let Self {
            config,
            folder,
            signing_key,
        } = self;
        tracing::info!(
            recipient = %config.name,
            data_dir = %config.data_dir.display(),
            chunk_delay_ms = config.chunk_delay_ms,
            "recipient starting"
        );
        let api = Api::new(
            folder,
            config.name.clone(),
            signing_key,
            &config.allowed_identities,
            config.chunk_delay_ms,
            Duration::from_millis(config.service.call_limit_ms),
        );
        let refusals = api.refusals();
        Host::new("recipient", &config.service)
            .worker("refusals log", move |stop| {
                crate::refusals::log_late(refusals, stop)
            })
            .service(
                TransferReceiverServer::new(api)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .run(listener, shutdown)
            .await
    }
}

/// The key receipts are signed with, when the configuration names one; a key that cannot be
/// read stops the start (a recipient answering unsigned receipts where a registry expects
/// signed ones would have every acknowledgement of a transfer to it refused by the
/// registry, and dead-lettered at the processor).
fn signing_key(config: &Config) -> Result<Option<Arc<SigningKey>>> {
    let Some(path) = &config.signing_key else {
        tracing::warn!(
            "no signing_key configured: receipts are answered unsigned, and a registry that \
             has this recipient's public_key refuses them"
        );
        return Ok(None);
    };
    let key = SigningKey::load(path).context("signing_key")?;
    tracing::info!(key_id = %key.public_key().key_id(), "signing receipts");
    Ok(Some(Arc::new(key)))
}
