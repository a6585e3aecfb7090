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
use dsrelay_runtime::signing::KeyRing;
use dsrelay_runtime::store::Db;
use dsrelay_runtime::tls::LiveTls;
use dsrelay_runtime::tls::ReloadingChannel;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Notify};

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
    pub processors: HashMap<String, ProcessorServiceClient<ReloadingChannel>>,
    /// Key of the identity hashes kept for the audit trail and deduplication, and of the
    /// Submit body hash.
    pub identity_hash_key: Vec<u8>,
    /// Counters and histograms served on the admin port.
    pub metrics: crate::metrics::Metrics,
    /// Group commit of submitted requests.
    pub intake: crate::intake::Intake,
    /// Each partner's Submit quota, taken before a Submit reads or stores anything.
    pub submit_quotas: crate::quota::SubmitQuotas,
    /// The clock deadlines and events are stamped by; tests move it. Leases are timed on the
    /// database's clock instead (`store/outbox.rs`), so that replicas agree on them.
    pub clock: Clock,
    /// Where return-of-data packages are kept, and for how long.
    pub packages: Packages,
    /// Files being uploaded right now, so two streams never append to one file.
    pub uploading: Uploading,
    /// Each processor's certificate-checking keys (`public_key` and
    /// `previous_public_keys`), by processor name.
    pub certificate_keys: HashMap<String, KeyRing>,
    /// Watch streams open per caller.
    pub watchers: crate::api::watch::Slots,
    /// DownloadPackage streams open per caller, each holding a task that reads files.
    pub downloads: crate::api::watch::Slots,
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

/// Waits until `changes` (subscribed to [`Shared::publish`]) carries `request_id`, or says
/// it missed some, which may have been that one: the caller then reads the store again.
/// Other requests' changes are not its to read for. Never returns once the sender is gone
/// (it lives as long as the registry): the caller's other wake-ups are what is left.
pub(crate) async fn changed(changes: &mut broadcast::Receiver<String>, request_id: &str) {
    loop {
        match changes.recv().await {
            Ok(changed) if changed != request_id => continue,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
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
            if let Some(keys) = p
                .key_ring()
                .with_context(|| format!("processor {}", p.name))?
            {
                certificate_keys.insert(p.name.clone(), keys);
            }
            let channel = dsrelay_runtime::tls::reloading_channel(
                &p.endpoint,
                Some(p.identity.clone()),
                &tls,
            )
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
        warn_of_unconfigured_processors(&db, &config).await;
        warn_of_unlisted_recipients(&db, &config).await;
        let mut receipt_keys = HashMap::new();
        for r in &config.recipients {
            let keys = r
                .key_ring()
                .with_context(|| format!("recipient {}", r.name))?;
            if keys.is_none() {
                tracing::warn!(
                    recipient = %r.name,
                    "recipient has no public_key: its transfer receipts are taken unsigned, on \
                     the processors' word"
                );
            }
            receipt_keys.insert(r.name.clone(), keys);
        }
        let identities = (config.processors.iter())
            .map(|p| (p.name.clone(), p.identity.clone()))
            .collect();
        let store = Store::new(db, &identity_hash_key)
            .with_receipt_keys(receipt_keys)
            .with_processor_identities(identities);
        let (intake, intake_writer) = intake::channel(store.clone());
        let packages = Packages::new(
            Arc::new(FolderStore::new(&config.package_dir)),
            config.package_ttl_days,
        );
        Ok(Self {
            shared: Arc::new(Shared {
                metrics: crate::metrics::Metrics::new(&config),
                intake,
                submit_quotas: crate::quota::SubmitQuotas::new(&config, std::time::Instant::now()),
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
                downloads: Default::default(),
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
        let quota_log = shared.clone();
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
        // Only with a quota: otherwise nothing is ever refused.
        let host = match shared.submit_quotas.is_empty() {
            true => host,
            false => host.worker("quota refusals log", move |stop| {
                crate::quota::log_late_refusals(quota_log, stop)
            }),
        };
        match checkpointing {
            Some((checkpointer, store, clock)) => host.worker("audit checkpoints", move |stop| {
                dsrelay_runtime::audit::signer::run(checkpointer, store, clock, stop)
            }),
            None => host,
        }
    }
}

/// Warns, one line per name, of a processor that requests name but `[[processors]]` no
/// longer has, as after a rename: the stored rows keep the old name, so nothing queued for
/// it is sent and its acknowledgements are rejected as not routed to it. A request counts
/// while it is open and has a delivery or task for the name, or, whatever its state, while
/// a delivery to the name is still PENDING (a cancelled request's Cancel, say). One query.
async fn warn_of_unconfigured_processors(db: &Db, config: &Config) {
    // Every state a processor may still report on: the open ones, and PARTIALLY_COMPLETED,
    // whose retained tasks are still erased and reported.
    let open = (crate::fold::OPEN_STATES.into_iter())
        .chain([dsrelay_proto::v1::RequestState::PartiallyCompleted])
        .map(|s| (s as i32).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // Our own enum values, written into the SQL so the index on the state serves the first
    // two arms. Deliveries have no state column: the third arm takes the rows the views
    // (api::views::delivery) show as PENDING, neither done (delivered or withdrawn) nor
    // dead-lettered.
    let sql = format!(
        "SELECT processor, COUNT(DISTINCT request_id) FROM (\
         SELECT d.request_id, d.processor FROM deliveries d \
         JOIN requests r ON r.id = d.request_id WHERE r.state IN ({open}) \
         UNION ALL SELECT t.request_id, t.processor FROM tasks t \
         JOIN requests r ON r.id = t.request_id WHERE r.state IN ({open}) \
         UNION ALL SELECT request_id, processor FROM deliveries \
         WHERE done_at IS NULL AND dead_lettered_at IS NULL\
         ) named GROUP BY processor"
    );
    let named: Vec<(String, i64)> = match sqlx::query_as(&sql).fetch_all(&db.reader).await {
        Ok(named) => named,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "checking which processors requests name failed; the registry starts \
                 without it"
            );
            return;
        }
    };
    for (processor, requests) in named {
        if config.processors.iter().any(|p| p.name == processor) {
            continue;
        }
        tracing::warn!(
            processor,
            requests,
            "requests name a processor [[processors]] no longer has (renamed?): nothing \
             queued for it is sent and its acknowledgements of them are rejected; give it \
             back this name in [[processors]] (cancelling the requests ends them, but queues \
             a Cancel for this name, which is not sent either)"
        );
    }
}

/// Warns of each recipient that open transfers (TRANSFER requests, transferring contract
/// ends) name but `[[recipients]]` no longer lists: their processors may still send the
/// data there, and the receipts are refused (`Store::with_receipt_keys`), so the requests
/// wait until the recipient is listed again or they are cancelled. A request forgotten with
/// its body no longer names one and is not counted.
async fn warn_of_unlisted_recipients(db: &Db, config: &Config) {
    use dsrelay_proto::prost::Message;
    use dsrelay_proto::v1::{RequestKind, SubmitRequest};
    let open = (crate::fold::OPEN_STATES.into_iter())
        .map(|s| (s as i32).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let transfers = format!(
        "SELECT body FROM requests WHERE kind = {} AND state IN ({open}) AND body IS NOT NULL",
        RequestKind::Transfer as i32
    );
    let contracts = format!(
        "SELECT c.transfer_recipient FROM contracts c JOIN requests r ON r.id = c.request_id \
         WHERE r.state IN ({open}) AND c.transfer_recipient <> ''"
    );
    let named = async {
        let bodies: Vec<Vec<u8>> = sqlx::query_scalar(&transfers).fetch_all(&db.reader).await?;
        let mut named: Vec<String> = sqlx::query_scalar(&contracts).fetch_all(&db.reader).await?;
        named.extend(bodies.iter().filter_map(|b| {
            let body = SubmitRequest::decode(b.as_slice()).ok()?;
            Some(body.parameters?.transfer_recipient)
        }));
        Ok::<_, sqlx::Error>(named)
    };
    let named = match named.await {
        Ok(named) => named,
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "checking which recipients open transfers name failed; the registry starts \
                 without it"
            );
            return;
        }
    };
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for name in named {
        *counts.entry(name).or_default() += 1;
    }
    for (recipient, requests) in counts {
        if config.recipient(&recipient).is_some() {
            continue;
        }
        tracing::warn!(
            recipient,
            requests,
            "open transfers name a recipient [[recipients]] no longer lists: their processors \
             may still send the data there, but its receipts are refused, so the requests wait \
             (a contract end cannot be confirmed); list it again with its public_key, or \
             cancel them"
        );
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

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{RequestKind, RequestState};
    use dsrelay_runtime::pki::{dev_identity, DevPki};
    use dsrelay_runtime::testing::captured_logs;
    use serde_json::Value;

    use super::*;
    use crate::store::NewRequest;
    use crate::test_postgres::on_postgres;

    /// A request `id` routed to `processors`.
    async fn request(store: &Store, id: &str, processors: &[&str]) {
        store
            .insert_request(&NewRequest {
                id: id.into(),
                partner: "crm".into(),
                idempotency_key: format!("key-{id}"),
                body_hash: format!("hash-{id}"),
                body: b"{}".to_vec(),
                identity_hashes: "[\"h\"]".into(),
                kind: RequestKind::Erasure as i32,
                received_at: 0,
                due_at: 1_000_000,
                trace_id: "0".repeat(32),
                traceparent: None,
                processors: processors.iter().map(|p| p.to_string()).collect(),
            })
            .await
            .expect("request");
    }

    /// Requests whose deliveries or tasks name processors the configuration has dropped
    /// (`old-bureau`, renamed to `payroll-bureau`; `gone-bureau`, named only by a task): one
    /// warning per name at start, counting the open requests and a cancelled one whose
    /// Cancel to `old-bureau` is still queued, not a finished one nor a cancelled one whose
    /// Cancel went out. Before, the registry started without a word, and then left out the
    /// cancelled request. The names end in a suffix of this run's own, since under
    /// `cargo test` the lines of the other variant are captured too.
    async fn dropped_processors_are_warned_of_at_start(url: &str, dir: &std::path::Path) {
        let logs = captured_logs();
        let suffix = format!("-{:08x}", fastrand::u32(..));
        let [old, payroll, gone] =
            ["old-bureau", "payroll-bureau", "gone-bureau"].map(|n| format!("{n}{suffix}"));
        {
            let db = Db::connect(url).await.expect("db");
            db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
                .await
                .expect("migrate");
            let store = Store::new(db, b"k");
            request(&store, "open-1", &[old.as_str(), &payroll]).await;
            request(&store, "open-2", &[&old]).await;
            request(&store, "open-3", &[&payroll]).await;
            request(&store, "done", &[&old]).await;
            request(&store, "cancelled", &[&old]).await;
            request(&store, "cancel-sent", &[&old]).await;
            for id in ["cancelled", "cancel-sent"] {
                let outcome = store.cancel(id, "asked to", 0).await.expect("cancel");
                assert_eq!(outcome, crate::store::CancelOutcome::Cancelled, "{id}");
            }
            let db = store.db();
            sqlx::query("UPDATE requests SET state = $1 WHERE id = 'done'")
                .bind(RequestState::Completed as i64)
                .execute(&db.pool)
                .await
                .expect("finish one");
            sqlx::query(
                "UPDATE deliveries SET done_at = 0 \
                 WHERE request_id IN ('done', 'cancel-sent') AND done_at IS NULL",
            )
            .execute(&db.pool)
            .await
            .expect("deliver");
            sqlx::query(
                "INSERT INTO tasks (request_id, processor, subprocessor, state, sequence, \
                 updated_at) VALUES ('open-3', $1, 'archive', 2, 1, 0)",
            )
            .bind(&gone)
            .execute(&db.pool)
            .await
            .expect("a task");
            db.pool.close().await;
        }
        let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
        let tls = pki.files("registry");
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = {url:?}\n\
             identity_hash_key = \"k\"\npackage_dir = {:?}\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [audit]\ncheckpoint_key = {:?}\ncheckpoint_file = {:?}\n\
             [[identities]]\nidentity = {:?}\nrole = \"partner\"\nname = \"crm\"\n\
             [[processors]]\nname = {payroll:?}\nendpoint = \"https://localhost:1\"\n\
             identity = {:?}\ncategories = [\"contact\"]\n",
            dir.join("packages"),
            tls.ca,
            tls.cert,
            tls.key,
            pki.signing_key("registry"),
            dir.join("audit/checkpoints.jsonl"),
            dev_identity("partner", "crm"),
            dev_identity("processor", &payroll),
        );
        let file = dir.join("registry.toml");
        std::fs::write(&file, text).expect("config file");
        let config = Config::load_from(Some(&file), Vec::new()).expect("config");
        let _app = App::build(config).await.expect("app");

        let mut warned: Vec<(String, i64)> = logs
            .text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("requests name a processor"))
                    && l["fields"]["processor"]
                        .as_str()
                        .is_some_and(|p| p.ends_with(&suffix))
            })
            .map(|l| {
                assert_eq!(l["level"], "WARN", "{l}");
                let message = l["fields"]["message"].as_str().unwrap_or_default();
                assert!(message.contains("give it back this name"), "{l}");
                (
                    l["fields"]["processor"].as_str().unwrap_or_default().into(),
                    l["fields"]["requests"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        warned.sort();
        assert_eq!(warned, [(gone, 1), (old, 3)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_processors_are_warned_of_at_start_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        dropped_processors_are_warned_of_at_start(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_processors_are_warned_of_at_start_on_postgres() {
        on_postgres(|url, dir| async move {
            dropped_processors_are_warned_of_at_start(&url, &dir).await;
        })
        .await;
    }
}
