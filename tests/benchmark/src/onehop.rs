//! One hop of real work: erasures of existing customers through the real registry and one
//! processor whose only subprocessor is the `sql` connector on the sample accounting schema
//! filled with `--onehop-customers` customers (`accounting::fill`).
//!
//! Each erasure names one customer by the customer number the holder keeps (`C-{i}`, matched
//! through the schema's UNIQUE index on `customer_no`), and no customer is asked about twice,
//! so every task finds one customer with a contact, an invoice and a ledger entry past every
//! retention period: the connector deletes three rows and anonymizes one, in one transaction
//! of the holder's database, and the request COMPLETES. After the loads the services are
//! stopped and the holder's database is checked row by row against the requests the registry
//! stored: every erased customer's rows gone or anonymized, everyone else's untouched. Any
//! request not COMPLETED, or any difference, fails the run: a rate of erasures that did
//! nothing would be worthless.
//!
//! The loads are those of the relay scenario: a warm-up, a batch submitted by the concurrent
//! callers as fast as they can (completed erasures per second: the batch over the time from
//! the first Submit to the last request COMPLETED), then an open loop at half that rate for
//! the latency (`finished_at - received_at` at the registry), capped by the customers left.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    IdentityEncoding, IdentityType, RequestKind, SubjectIdentity, SubmitRequest,
};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::store::{now_ms, Db};
use tonic::transport::Channel;

use crate::accounting;
use crate::export::start_pair;
use crate::load::{fixed_count, open_loop, CpuUsage, CpuWindow, LoadResult};
use crate::relay::{submit_request, Relay, COMPLETED};
use crate::service::channel;

/// How long without any request finishing counts as stuck.
const STALL: Duration = Duration::from_secs(10);
/// The longest any one wait for requests to finish may take.
const WAIT: Duration = Duration::from_secs(600);

/// What to run.
pub(crate) struct OnehopLoad {
    /// Customers in the holder's database.
    pub(crate) customers: u64,
    /// Erasures in the batch.
    pub(crate) erasures: u64,
    /// Concurrent callers of the warm-up and the batch.
    pub(crate) concurrency: usize,
    /// gRPC channels the callers share.
    pub(crate) channels: usize,
    /// Length of the open-loop latency load (s).
    pub(crate) latency_secs: u64,
}

/// Where the services and the holder keep their data.
pub(crate) struct OnehopStores<'a> {
    /// The registry's store.
    pub(crate) registry: &'a str,
    /// The processor's store.
    pub(crate) processor: &'a str,
    /// The holder's database (`None`: a SQLite file in the scenario's folder).
    pub(crate) holder: Option<&'a str>,
    /// The database server's main process, to count its CPU (PostgreSQL on this machine).
    pub(crate) db_server: Option<u32>,
}

/// The one-hop scenario's figures.
pub(crate) struct OnehopFigures {
    /// Customers in the holder's database.
    pub(crate) customers: u64,
    /// Erasures of the batch that COMPLETED.
    pub(crate) completed: i64,
    /// Completed erasures per second over the batch.
    pub(crate) completed_rate: f64,
    /// CPU over the batch: the registry, then the processor (and the database server).
    pub(crate) batch_cpu: CpuUsage,
    /// The open loop's rate (per second); 0 when no customer was left for it.
    pub(crate) latency_rate: f64,
    /// `finished_at - received_at` (ms) of the latency load's requests, sorted.
    pub(crate) latencies: Vec<f64>,
    /// Customers checked as erased in the holder's database afterwards.
    pub(crate) checked_erased: usize,
    /// Failed Submits and the like, for the report's notes.
    pub(crate) notes: Vec<String>,
}

/// Runs the scenario in `dir` (deleted at the end).
pub(crate) async fn run(
    pki: &DevPki,
    dir: &Path,
    load: &OnehopLoad,
    stores: &OnehopStores<'_>,
) -> Result<OnehopFigures> {
    std::fs::create_dir_all(dir)?;
    let result = scenario(pki, dir, load, stores).await;
    let _ = std::fs::remove_dir_all(dir);
    result
}

async fn scenario(
    pki: &DevPki,
    dir: &Path,
    load: &OnehopLoad,
    stores: &OnehopStores<'_>,
) -> Result<OnehopFigures> {
    let warm = warm_up_count(load.concurrency);
    if load.customers < load.erasures + warm {
        bail!(
            "--onehop-customers {} is too few for a warm-up of {warm} and --onehop-erasures {} \
             (each customer is erased once)",
            load.customers,
            load.erasures
        );
    }
    let holder = match stores.holder {
        Some(url) => url.to_string(),
        None => format!("sqlite://{}/accounting.db", dir.display()),
    };
    crate::progress(format!(
        "one hop: filling the sample accounting schema with {} customers",
        load.customers
    ));
    accounting::fill(&holder, load.customers).await?;
    let (registry, processor, port) =
        start_pair(pki, dir, stores.registry, stores.processor, &holder).await?;
    let expected = Some(dev_identity("registry", "controller"));
    let clients = (0..load.channels.max(1))
        .map(|_| {
            Ok(RequestServiceClient::new(channel(
                pki,
                "partner-crm",
                port,
                expected.clone(),
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    let registry_db = Db::connect(stores.registry).await?;
    let mut relay = Relay {
        services: vec![registry, processor],
        clients,
        registry_db,
    };
    let measured = measure(&mut relay, load, warm, stores.db_server).await;
    let erased = match &measured {
        Ok(_) => erased_customers(&relay).await,
        Err(_) => Ok(BTreeSet::new()),
    };
    relay.stop().await;
    let mut figures = measured?;
    let erased = erased?;
    crate::progress(format!(
        "  checking the holder's database: {} customers erased, {} untouched",
        erased.len(),
        load.customers - erased.len() as u64
    ));
    accounting::check_erased(&holder, load.customers, &erased).await?;
    figures.checked_erased = erased.len();
    Ok(figures)
}

/// Erasures of the warm-up: two per caller, as in the relay scenario.
pub(crate) fn warm_up_count(concurrency: usize) -> u64 {
    (2 * concurrency.max(1)) as u64
}

/// An erasure of customer `customer` by their customer number, under the idempotency key
/// `{prefix}{customer}`.
fn erasure_of(prefix: &str, customer: u64) -> SubmitRequest {
    SubmitRequest {
        kind: RequestKind::Erasure as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::CustomerNumber as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: accounting::customer_number(customer),
            label: String::new(),
        }],
        idempotency_key: format!("{prefix}{customer}"),
        ..Default::default()
    }
}

/// `count` erasures of the customers from `first` on, under `prefix`, by `concurrency`
/// callers (closed loop) or, with `rate`, started at that rate (open loop).
async fn submit_all(
    clients: &[RequestServiceClient<Channel>],
    prefix: &'static str,
    first: u64,
    count: u64,
    concurrency: usize,
    rate: Option<f64>,
) -> LoadResult {
    let clients = clients.to_vec();
    let call = move |i: u64| {
        submit_request(
            clients[i as usize % clients.len()].clone(),
            erasure_of(prefix, first + i),
        )
    };
    match rate {
        Some(rate) => open_loop(rate, count, call).await,
        None => fixed_count(concurrency, count, call).await,
    }
}

/// Fails unless every request under `prefix` that the registry stored COMPLETED.
async fn all_completed(relay: &mut Relay, what: &str, prefix: &str, accepted: u64) -> Result<()> {
    let w = relay
        .wait_finished(prefix, accepted, STALL, WAIT, None)
        .await?;
    if w.completed < accepted as i64 {
        bail!(
            "one hop, {what}: of {accepted} erasures {} finished and {} COMPLETED; every one \
             should complete at once (nothing is retained): {}{}",
            w.finished,
            w.completed,
            relay.describe_unfinished(prefix, 3).await,
            relay.log_tails()
        );
    }
    Ok(())
}

async fn measure(
    relay: &mut Relay,
    load: &OnehopLoad,
    warm: u64,
    db_server: Option<u32>,
) -> Result<OnehopFigures> {
    let c = load.concurrency.max(1);
    let pids = relay.pids()?;
    let mut notes = Vec::new();
    crate::progress(format!("  warm-up: {warm} erasures"));
    let r = submit_all(&relay.clients, "warm-", 1, warm, c, None).await;
    if r.errors > 0 {
        bail!(
            "one hop: warm-up Submits failed: {}{}",
            r.first_error.unwrap_or_default(),
            relay.log_tails()
        );
    }
    all_completed(relay, "warm-up", "warm-", warm).await?;

    crate::progress(format!(
        "  completed erasures: a batch of {}, {c} callers",
        load.erasures
    ));
    let cpu = CpuWindow::start(&pids).with_tree(db_server);
    let t0 = now_ms();
    let batch = submit_all(&relay.clients, "batch-", warm + 1, load.erasures, c, None).await;
    notes.extend(failed("batch", &batch));
    let w = relay
        .wait_finished("batch-", batch.ok, STALL, WAIT, Some(&cpu))
        .await?;
    let batch_cpu = w.cpu.unwrap_or_else(|| cpu.finish());
    all_completed(relay, "batch", "batch-", batch.ok).await?;
    let last = relay.last_finished_at("batch-").await?.unwrap_or(t0);
    let completed_rate = w.completed as f64 / ((last - t0).max(1) as f64 / 1000.0);
    crate::progress(format!(
        "  {completed_rate:.1} completed erasures/s ({} in {:.1} s; the Submits took {:.1} s)",
        w.completed,
        (last - t0) as f64 / 1000.0,
        batch.elapsed.as_secs_f64()
    ));

    let first = warm + load.erasures + 1;
    let left = load.customers + 1 - first;
    let latency_rate = (completed_rate / 2.0).max(1.0);
    let wanted = ((latency_rate * load.latency_secs as f64).round() as u64).max(10);
    let total = wanted.min(left);
    let mut latencies = Vec::new();
    if total < wanted {
        notes.push(format!(
            "one hop, latency: {total} erasures, not the {wanted} that {} s at {:.0}/s would \
             take: only {left} customers were left",
            load.latency_secs, latency_rate
        ));
    }
    if total > 0 {
        crate::progress(format!(
            "  latency: {total} erasures open loop at {latency_rate:.1}/s"
        ));
        let lat = submit_all(&relay.clients, "lat-", first, total, c, Some(latency_rate)).await;
        notes.extend(failed("latency", &lat));
        all_completed(relay, "latency", "lat-", lat.ok).await?;
        latencies = relay.latencies_ms("lat-").await?;
    }
    relay.check_alive()?;
    Ok(OnehopFigures {
        customers: load.customers,
        completed: w.completed,
        completed_rate,
        batch_cpu,
        latency_rate: if total > 0 { latency_rate } else { 0.0 },
        latencies,
        checked_erased: 0,
        notes,
    })
}

/// A note when some of `r`'s Submits failed.
fn failed(what: &str, r: &LoadResult) -> Option<String> {
    (r.errors > 0).then(|| {
        format!(
            "one hop, {what}: {} of {} Submits failed; the first: {}",
            r.errors,
            r.ok + r.errors,
            r.first_error.as_deref().unwrap_or("?")
        )
    })
}

/// The customers the registry holds an erasure request for (every one of them COMPLETED,
/// as the loads checked), from the requests' idempotency keys.
async fn erased_customers(relay: &Relay) -> Result<BTreeSet<u64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT idempotency_key, CAST(state AS BIGINT) FROM requests")
            .fetch_all(&relay.registry_db.pool)
            .await
            .context("reading the registry's requests")?;
    let mut out = BTreeSet::new();
    for (key, state) in rows {
        if state != COMPLETED {
            bail!("one hop: request {key} ended in state {state}, not COMPLETED");
        }
        let customer = key
            .rsplit_once('-')
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .with_context(|| format!("one hop: a request the benchmark did not make: {key}"))?;
        if !out.insert(customer) {
            bail!("one hop: customer {customer} was asked about twice");
        }
    }
    Ok(out)
}
