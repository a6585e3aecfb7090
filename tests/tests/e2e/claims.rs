//! Claims of queued work at both services, on both backends: the processor's tasks,
//! acknowledgements and uploads, the registry's deliveries. Several claimers at once (one
//! pool, as a replica's workers share it; on PostgreSQL each on its own connection) take
//! every due row exactly once, each row under its own lease token, the most overdue first,
//! and a claim is one statement however many rows it takes. How long a claim takes is
//! measured by `dsrelay-bench claims`, not here.

use std::collections::{HashMap, HashSet};

use dsrelay_processor::store::{
    Store as ProcessorStore, TaskKey, Transition, POSTGRES_MIGRATIONS as PROC_PG,
    SQLITE_MIGRATIONS as PROC_SQLITE,
};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{DeliverRequest, RequestKind, TaskState};
use dsrelay_registry::store::{
    NewRequest, Store as RegistryStore, POSTGRES_MIGRATIONS as REG_PG,
    SQLITE_MIGRATIONS as REG_SQLITE,
};
use dsrelay_runtime::store::Db;

use crate::harness::{database_url, email, Backend};

/// Claimers running at once.
const CLAIMERS: usize = 6;
/// Rows each claim asks for.
const BATCH: i64 = 7;

async fn processor(backend: Backend, dir: &std::path::Path) -> Option<(ProcessorStore, Db)> {
    let url = database_url(dir, "processor", backend).await?;
    let db = Db::connect(&url).await.expect("connect");
    db.migrate(&PROC_SQLITE, &PROC_PG).await.expect("migrate");
    Some((ProcessorStore::new(db.clone(), b"test key"), db))
}

async fn registry(backend: Backend, dir: &std::path::Path) -> Option<(RegistryStore, Db)> {
    let url = database_url(dir, "registry", backend).await?;
    let db = Db::connect(&url).await.expect("connect");
    db.migrate(&REG_SQLITE, &REG_PG).await.expect("migrate");
    Some((RegistryStore::new(db.clone(), b"test key"), db))
}

/// `requests` requests of `subprocessors` tasks each, request `i` delivered (and so due) at
/// `1_000 + i`.
async fn deliver(store: &ProcessorStore, requests: usize, subprocessors: usize) -> Vec<TaskKey> {
    let subs: Vec<String> = (0..subprocessors).map(|s| format!("s{s:04}")).collect();
    let mut keys = Vec::new();
    for i in 0..requests {
        let req = DeliverRequest {
            request_id: format!("r{i:04}"),
            kind: RequestKind::ReturnOfData as i32,
            identities: vec![email("a@b.fi")],
            due_at: Some(timestamp_from_millis(due_of(i))),
            ..Default::default()
        };
        store
            .accept("c", &req, &subs, None, 1_000 + i as i64)
            .await
            .expect("accept");
        keys.extend(subs.iter().map(|s| TaskKey {
            controller: "c".into(),
            request_id: req.request_id.clone(),
            subprocessor: s.clone(),
        }));
    }
    keys
}

/// The due date of the processor's request `i`.
fn due_of(i: usize) -> i64 {
    50_000 + i as i64
}

/// The number in a request id made by [`deliver`] or [`new_request`].
fn number_of(request_id: &str) -> usize {
    request_id[1..].parse().expect("a number")
}

/// Moves every task to IN_PROGRESS with an export to send, the task at `i` at `2_000 + i`:
/// one acknowledgement and one upload each, due then.
async fn start_with_exports(store: &ProcessorStore, keys: &[TaskKey]) {
    let step = Transition {
        state: TaskState::InProgress,
        export_files: Some(Vec::new()),
        upload: true,
        ..Default::default()
    };
    for (i, key) in keys.iter().enumerate() {
        let seq = store.task(key).await.expect("task").expect("row").sequence;
        let recorded = store
            .transition(key, seq, &step, 2_000 + i as i64, 1)
            .await
            .expect("transition");
        assert!(recorded.is_some());
    }
}

/// Runs `CLAIMERS` loops at once, each claiming with `claim` until a claim comes back empty,
/// and returns every batch claimed.
async fn claim_all<T, F, Fut>(claim: F) -> Vec<Vec<T>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<T>>>,
{
    let loops = (0..CLAIMERS).map(|_| async {
        let mut batches = Vec::new();
        loop {
            let batch = claim().await.expect("claim");
            if batch.is_empty() {
                return batches;
            }
            assert!(batch.len() as i64 <= BATCH, "a claim took more than asked");
            batches.push(batch);
            tokio::task::yield_now().await;
        }
    });
    futures::future::join_all(loops)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Every item of `expected` exactly once in `claimed`.
fn exactly_once<K: std::hash::Hash + Eq + Clone + std::fmt::Debug>(claimed: &[K], expected: &[K]) {
    let mut seen = HashSet::new();
    for k in claimed {
        assert!(seen.insert(k.clone()), "{k:?} was claimed twice");
    }
    let expected: HashSet<K> = expected.iter().cloned().collect();
    assert_eq!(seen, expected, "not every due row was claimed");
}

/// Distinct, non-empty lease tokens, one per row.
fn distinct_tokens<'a>(tokens: impl Iterator<Item = &'a String>) {
    let mut seen = HashSet::new();
    for t in tokens {
        assert!(!t.is_empty(), "a claimed row without a lease token");
        assert!(seen.insert(t.clone()), "two rows share the lease token {t}");
    }
}

fn key_of(job: &dsrelay_processor::store::TaskJob) -> (String, String) {
    (
        job.task.key.request_id.clone(),
        job.task.key.subprocessor.clone(),
    )
}

async fn processor_claims_take_each_due_row_once(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((store, _db)) = processor(backend, dir.path()).await else {
        return;
    };
    let keys = deliver(&store, 12, 5).await;
    let expected: Vec<(String, String)> = keys
        .iter()
        .map(|k| (k.request_id.clone(), k.subprocessor.clone()))
        .collect();

    // The most overdue first: a claim of 10 takes the first two requests' tasks, in order.
    let first = store.claim_tasks(10_000, 10, 60_000).await.expect("claim");
    assert_eq!(first.len(), 10);
    let requests: Vec<&str> = first
        .iter()
        .map(|j| j.task.key.request_id.as_str())
        .collect();
    let mut sorted = requests.clone();
    sorted.sort();
    assert_eq!(requests, sorted, "claimed rows come most overdue first");
    assert!(requests.iter().all(|r| *r == "r0000" || *r == "r0001"));

    let batches = claim_all(|| store.claim_tasks(10_000, BATCH, 60_000)).await;
    let jobs: Vec<_> = first.iter().chain(batches.iter().flatten()).collect();
    let claimed: Vec<_> = jobs.iter().map(|j| key_of(j)).collect();
    exactly_once(&claimed, &expected);
    distinct_tokens(jobs.iter().map(|j| &j.lease_owner));
    for job in &jobs {
        assert_eq!(job.task.attempts, 1, "the claim counts its attempt");
        let request = job
            .request
            .as_ref()
            .expect("the request comes with its task");
        assert_eq!(request.request_id, job.task.key.request_id);
        assert_eq!(job.due_at, due_of(number_of(&job.task.key.request_id)));
    }
    for batch in &batches {
        assert!(
            batch
                .windows(2)
                .all(|w| w[0].task.key.request_id <= w[1].task.key.request_id),
            "each batch comes most overdue first"
        );
    }
    assert!(store
        .claim_tasks(10_000, 100, 60_000)
        .await
        .expect("claim")
        .is_empty());
    // A released task is claimed again under a new token, its attempt counted again.
    let job = jobs[0];
    assert!(store
        .release_lease(&job.task.key, &job.lease_owner)
        .await
        .expect("release"));
    let again = store.claim_tasks(10_000, 100, 60_000).await.expect("claim");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].task.key, job.task.key);
    assert_eq!(again[0].task.attempts, 2);
    assert_ne!(again[0].lease_owner, job.lease_owner);

    start_with_exports(&store, &keys).await;

    let first = store.claim_acks(10_000, 10, 60_000).await.expect("claim");
    assert_eq!(first.len(), 10);
    assert!(first.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    let batches = claim_all(|| store.claim_acks(10_000, BATCH, 60_000)).await;
    let acks: Vec<_> = first.iter().chain(batches.iter().flatten()).collect();
    let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
    let mut all_ids = ids.clone();
    all_ids.sort();
    all_ids.dedup();
    assert_eq!(all_ids.len(), keys.len(), "one acknowledgement per task");
    exactly_once(&ids, &all_ids);
    assert!(
        first
            .iter()
            .all(|a| batches.iter().flatten().all(|b| a.id < b.id)),
        "the oldest were claimed first"
    );
    for batch in &batches {
        assert!(batch.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    }
    let claimed: Vec<_> = acks
        .iter()
        .map(|a| (a.ack.request_id.clone(), a.ack.subprocessor.clone()))
        .collect();
    exactly_once(&claimed, &expected);
    assert!(acks.iter().all(|a| a.attempts == 0 && a.controller == "c"));

    let first = store
        .claim_uploads(10_000, 10, 60_000)
        .await
        .expect("claim");
    assert_eq!(first.len(), 10);
    let order: Vec<_> = first.iter().map(|u| u.key.clone()).collect();
    assert_eq!(order, keys[..10], "the most overdue first, in order");
    let batches = claim_all(|| store.claim_uploads(10_000, BATCH, 60_000)).await;
    let uploads: Vec<_> = first.iter().chain(batches.iter().flatten()).collect();
    let claimed: Vec<_> = uploads
        .iter()
        .map(|u| (u.key.request_id.clone(), u.key.subprocessor.clone()))
        .collect();
    exactly_once(&claimed, &expected);
    for u in &uploads {
        assert_eq!(u.attempts, 1, "the claim counts its attempt");
        assert_eq!(u.kind, RequestKind::ReturnOfData);
        assert!(u.recipient.is_none() && u.contract_recipient.is_empty());
        assert_eq!(u.due_at, due_of(number_of(&u.key.request_id)));
    }
}

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

async fn registry_claims_take_each_due_row_once(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((store, db)) = registry(backend, dir.path()).await else {
        return;
    };
    let requests: Vec<NewRequest> = (0..10).map(|i| new_request(i, 6)).collect();
    store.insert_requests(&requests).await.expect("insert");
    // The most overdue row is of an operation this build does not know (a newer version's,
    // left after a rollback): it is never claimed, and never fails the claims of the others.
    sqlx::query(
        "INSERT INTO deliveries (request_id, processor, op, next_attempt_at) \
         VALUES ('r0000', 'p-newer', 'purge', 0)",
    )
    .execute(&db.pool)
    .await
    .expect("a row of an unknown operation");
    let expected: Vec<(String, String)> = requests
        .iter()
        .flat_map(|r| r.processors.iter().map(|p| (r.id.clone(), p.clone())))
        .collect();

    let first = store
        .claim_deliveries(10_000, 9, 60_000)
        .await
        .expect("claim");
    assert_eq!(first.len(), 9);
    let ids: Vec<&str> = first.iter().map(|j| j.request_id.as_str()).collect();
    assert_eq!(ids[..6], ["r0000"; 6], "the most overdue first");
    assert_eq!(ids[6..], ["r0001"; 3]);

    let batches = claim_all(|| store.claim_deliveries(10_000, BATCH, 60_000)).await;
    let jobs: Vec<_> = first.iter().chain(batches.iter().flatten()).collect();
    let claimed: Vec<_> = jobs
        .iter()
        .map(|j| (j.request_id.clone(), j.processor.clone()))
        .collect();
    exactly_once(&claimed, &expected);
    distinct_tokens(jobs.iter().map(|j| &j.lease_owner));
    let by_id: HashMap<&str, &NewRequest> = requests.iter().map(|r| (r.id.as_str(), r)).collect();
    for job in &jobs {
        let r = by_id[job.request_id.as_str()];
        assert_eq!(job.attempts, 0, "attempts count answers, not claims");
        assert_eq!(job.body.as_deref(), Some(&r.body[..]));
        assert_eq!((job.received_at, job.due_at), (r.received_at, r.due_at));
        assert_eq!(job.kind, RequestKind::Erasure as i64);
        assert!(job.terms.contract_version.is_none(), "no contract end");
    }
    for batch in &batches {
        assert!(
            batch.windows(2).all(|w| w[0].request_id <= w[1].request_id),
            "each batch comes most overdue first"
        );
    }
    assert!(store
        .claim_deliveries(10_000, 100, 60_000)
        .await
        .expect("claim")
        .is_empty());
}

/// What sqlx reports of each statement this process runs (its `sqlx::query` events, which
/// `Db::connect` turns on): the text and the rows it changed. The recorder becomes the
/// process's subscriber on first use.
mod statements {
    use std::future::Future;
    use std::sync::{Arc, Mutex, OnceLock};

    use ::tracing::field::{Field, Visit};
    use dsrelay_runtime::store::Db;
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::Layer;

    /// One statement as sqlx logged it.
    #[derive(Debug, Clone, Default)]
    pub struct Statement {
        pub sql: String,
        pub rows_affected: u64,
    }

    #[derive(Default)]
    struct Fields(Statement);

    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            match field.name() {
                // The first words; the whole text follows unless they are all of it.
                "summary" if self.0.sql.is_empty() => self.0.sql = value.to_string(),
                "db.statement" if !value.is_empty() => self.0.sql = value.to_string(),
                _ => {}
            }
        }

        fn record_u64(&mut self, field: &Field, value: u64) {
            if field.name() == "rows_affected" {
                self.0.rows_affected = value;
            }
        }

        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }

    struct Recorder(Arc<Mutex<Vec<Statement>>>);

    impl<S: ::tracing::Subscriber> Layer<S> for Recorder {
        fn on_event(&self, event: &::tracing::Event<'_>, _: Context<'_, S>) {
            if event.metadata().target() == "sqlx::query" {
                let mut fields = Fields::default();
                event.record(&mut fields);
                self.0.lock().expect("log").push(fields.0);
            }
        }
    }

    fn log() -> &'static Arc<Mutex<Vec<Statement>>> {
        static LOG: OnceLock<Arc<Mutex<Vec<Statement>>>> = OnceLock::new();
        LOG.get_or_init(|| {
            let log = Arc::default();
            let subscriber = tracing_subscriber::registry().with(Recorder(Arc::clone(&log)));
            ::tracing::subscriber::set_global_default(subscriber)
                .expect("no other subscriber in this process");
            log
        })
    }

    /// Starts recording (before the first statement of a test, so that every one is seen).
    pub fn record() {
        log();
    }

    /// What `work` returned and the statements it ran: those logged from its start until a
    /// marker statement `db` runs after it. SQLite logs from its connection's own thread,
    /// which runs one statement after another, so the marker comes after everything `work`
    /// ran; PostgreSQL logs before a statement's answer is handed back.
    pub async fn of<T>(db: &Db, work: impl Future<Output = T>) -> (T, Vec<Statement>) {
        let start = log().lock().expect("log").len();
        let out = work.await;
        sqlx::query("SELECT 'statements marker'")
            .execute(&db.pool)
            .await
            .expect("marker");
        let ran = log().lock().expect("log")[start..]
            .iter()
            .take_while(|s| !s.sql.contains("statements marker"))
            .cloned()
            .collect();
        (out, ran)
    }
}

/// `ran` (the statements of one claim) holds one `UPDATE` of `table` that claimed all
/// `rows`; run alone in its process (nextest runs each test in its own), nothing else.
fn one_statement_claimed(ran: &[statements::Statement], table: &str, rows: u64) {
    let update = format!("UPDATE {table} SET");
    assert!(
        ran.iter()
            .any(|s| s.sql.contains(&update) && s.rows_affected == rows),
        "no one statement claimed all {rows} rows of {table}: {} statements ran",
        ran.len()
    );
    if std::env::var("NEXTEST_EXECUTION_MODE").as_deref() == Ok("process-per-test") {
        assert_eq!(ran.len(), 1, "{ran:#?}");
    }
}

/// Claims of 50 rows, at both services: one statement each.
async fn claims_are_one_statement(backend: Backend) {
    statements::record();
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((store, db)) = processor(backend, dir.path()).await else {
        return;
    };
    let keys = deliver(&store, 10, 5).await;
    let (jobs, ran) = statements::of(&db, store.claim_tasks(10_000, 100, 60_000)).await;
    assert_eq!(jobs.expect("claim").len(), 50);
    one_statement_claimed(&ran, "tasks", 50);
    start_with_exports(&store, &keys).await;
    let (acks, ran) = statements::of(&db, store.claim_acks(10_000, 100, 60_000)).await;
    assert_eq!(acks.expect("claim").len(), 50);
    one_statement_claimed(&ran, "ack_outbox", 50);
    let (uploads, ran) = statements::of(&db, store.claim_uploads(10_000, 100, 60_000)).await;
    assert_eq!(uploads.expect("claim").len(), 50);
    one_statement_claimed(&ran, "uploads", 50);

    let Some((outbox, db)) = registry(backend, dir.path()).await else {
        return;
    };
    let requests: Vec<NewRequest> = (0..10).map(|i| new_request(i, 5)).collect();
    outbox.insert_requests(&requests).await.expect("insert");
    let (jobs, ran) = statements::of(&db, outbox.claim_deliveries(10_000, 100, 60_000)).await;
    assert_eq!(jobs.expect("claim").len(), 50);
    one_statement_claimed(&ran, "deliveries", 50);
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    processor_claims_take_each_due_row_once,
    registry_claims_take_each_due_row_once,
    claims_are_one_statement,
);
