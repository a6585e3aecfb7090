//! `dsrelay-bench claims`: how long one claim of many due rows takes at each queue of both
//! services (the processor's tasks, acknowledgements and uploads, the registry's
//! deliveries), on SQLite or on PostgreSQL. Figures, printed; nothing is asserted but that
//! each claim took every row asked for.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use dsrelay_processor::store::{
    Store as ProcessorStore, TaskKey, Transition, POSTGRES_MIGRATIONS as PROC_PG,
    SQLITE_MIGRATIONS as PROC_SQLITE,
};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    DeliverRequest, IdentityEncoding, IdentityType, RequestKind, SubjectIdentity, TaskState,
};
use dsrelay_registry::store::{
    NewRequest, Store as RegistryStore, POSTGRES_MIGRATIONS as REG_PG,
    SQLITE_MIGRATIONS as REG_SQLITE,
};
use dsrelay_runtime::store::Db;

use crate::Postgres;

/// The options of `dsrelay-bench claims`.
#[derive(clap::Args, Debug)]
pub(crate) struct ClaimsArgs {
    /// Run on PostgreSQL: the server at $DSRELAY_TEST_POSTGRES_URL (a fresh database per
    /// service, dropped at the end).
    #[arg(long)]
    postgres: bool,
    /// Due rows in each queue; each claim asks for all of them (a multiple of 10).
    #[arg(long, default_value_t = 1_000)]
    rows: usize,
    /// Claims timed per queue (the rows are due again after a 1 ms lease).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// Prints the median, minimum and maximum time of a claim at each queue.
pub(crate) async fn run(args: &ClaimsArgs) -> Result<()> {
    ensure!(
        args.rows >= 10 && args.rows.is_multiple_of(10) && args.rounds >= 1,
        "--rows must be a multiple of 10 and --rounds at least 1"
    );
    let dir = tempfile::tempdir().context("creating a temporary folder")?;
    let mut pg = if args.postgres {
        let server = std::env::var("DSRELAY_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .context("--postgres needs DSRELAY_TEST_POSTGRES_URL")?;
        Some(Postgres {
            server,
            created: Vec::new(),
        })
    } else {
        None
    };
    let result = measure(args, dir.path(), pg.as_mut()).await;
    if let Some(pg) = &pg {
        pg.drop_all().await;
    }
    result
}

async fn measure(args: &ClaimsArgs, dir: &Path, mut pg: Option<&mut Postgres>) -> Result<()> {
    let backend = if pg.is_some() { "PostgreSQL" } else { "SQLite" };
    let rows = args.rows as i64;

    let db = Db::connect(&url(dir, &mut pg, "processor").await?).await?;
    db.migrate(&PROC_SQLITE, &PROC_PG).await?;
    let processor = ProcessorStore::new(db, b"bench key");
    let keys = deliver(&processor, 10, args.rows / 10).await?;
    time(backend, "processor tasks", args, || {
        processor.claim_tasks(10_000, rows, 1)
    })
    .await?;
    start_with_exports(&processor, &keys).await?;
    time(backend, "processor acknowledgements", args, || {
        processor.claim_acks(10_000, rows, 1)
    })
    .await?;
    time(backend, "processor uploads", args, || {
        processor.claim_uploads(10_000, rows, 1)
    })
    .await?;

    let db = Db::connect(&url(dir, &mut pg, "registry").await?).await?;
    db.migrate(&REG_SQLITE, &REG_PG).await?;
    let registry = RegistryStore::new(db, b"bench key");
    let requests: Vec<NewRequest> = (0..10).map(|i| new_request(i, args.rows / 10)).collect();
    registry.insert_requests(&requests).await?;
    time(backend, "registry deliveries", args, || {
        registry.claim_deliveries(10_000, rows, 1)
    })
    .await
}

/// A fresh database for `role`: on PostgreSQL when `pg` is given, else an SQLite file.
async fn url(dir: &Path, pg: &mut Option<&mut Postgres>, role: &str) -> Result<String> {
    match pg {
        Some(pg) => pg.fresh_database(role).await,
        None => Ok(format!("sqlite://{}/{role}.db", dir.display())),
    }
}

async fn time<T, Fut>(
    backend: &str,
    what: &str,
    args: &ClaimsArgs,
    claim: impl Fn() -> Fut,
) -> Result<()>
where
    Fut: std::future::Future<Output = Result<Vec<T>>>,
{
    let mut took = Vec::new();
    for _ in 0..args.rounds {
        // Past the 1 ms lease of the claim before.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        let n = claim().await?.len();
        took.push(start.elapsed());
        ensure!(
            n == args.rows,
            "{what}: a claim took {n} of {} rows",
            args.rows
        );
    }
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "claim of {} due rows, {backend}, {what}: median {:.1} ms, min {:.1} ms, max {:.1} ms \
         over {} claims",
        args.rows,
        ms(took[took.len() / 2]),
        ms(took[0]),
        ms(took[took.len() - 1]),
        args.rounds,
    );
    Ok(())
}

/// `requests` requests of `subprocessors` tasks each, all due.
async fn deliver(
    store: &ProcessorStore,
    requests: usize,
    subprocessors: usize,
) -> Result<Vec<TaskKey>> {
    let subs: Vec<String> = (0..subprocessors).map(|s| format!("s{s:04}")).collect();
    let mut keys = Vec::new();
    for i in 0..requests {
        let req = DeliverRequest {
            request_id: format!("r{i:04}"),
            kind: RequestKind::ReturnOfData as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: "a@b.fi".into(),
                label: String::new(),
            }],
            due_at: Some(timestamp_from_millis(50_000 + i as i64)),
            ..Default::default()
        };
        store
            .accept("c", &req, &subs, None, 1_000 + i as i64)
            .await?;
        keys.extend(subs.iter().map(|s| TaskKey {
            controller: "c".into(),
            request_id: req.request_id.clone(),
            subprocessor: s.clone(),
        }));
    }
    Ok(keys)
}

/// Moves every task to IN_PROGRESS with an export to send: one acknowledgement and one
/// upload each, due.
async fn start_with_exports(store: &ProcessorStore, keys: &[TaskKey]) -> Result<()> {
    let step = Transition {
        state: TaskState::InProgress,
        export_files: Some(Vec::new()),
        upload: true,
        ..Default::default()
    };
    for (i, key) in keys.iter().enumerate() {
        let seq = store.task(key).await?.context("task row")?.sequence;
        store
            .transition(key, seq, &step, 2_000 + i as i64, 1)
            .await?
            .context("the task moved on")?;
    }
    Ok(())
}

/// Request `i` of the registry, for `processors` processors, all due.
fn new_request(i: usize, processors: usize) -> NewRequest {
    NewRequest {
        id: format!("r{i:04}"),
        partner: "crm".into(),
        idempotency_key: format!("k{i}"),
        body_hash: format!("hash-of-{i}"),
        body: vec![1, 2, 3],
        identity_hashes: "[]".into(),
        kind: RequestKind::Erasure as i32,
        received_at: 1_000 + i as i64,
        due_at: 100_000 + i as i64,
        trace_id: "0".repeat(32),
        traceparent: None,
        processors: (0..processors).map(|p| format!("p{p:04}")).collect(),
    }
}
