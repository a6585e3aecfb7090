//! Group commit for Submit: concurrent Submits queue their requests here, and one writer
//! stores what is queued, up to [`MAX_BATCH`] requests, in a single transaction. One commit
//! (one fsync on SQLite with `synchronous=FULL`) then serves many partners, which is how
//! intake outruns the rate of single-row commits while every answer still waits for its
//! request to be durable.
//!
//! [`channel`] makes the queue ([`Intake`], shared by the handlers) and its [`Writer`], which
//! runs as one of the registry's workers. When told to stop, the writer refuses new requests,
//! commits the ones already queued and returns; a Submit after that gets
//! [`IntakeError::Stopped`] at once (UNAVAILABLE to the partner), never a wait.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsrelay_runtime::host::Stop;
use tokio::sync::{mpsc, oneshot};

use crate::store::{Inserted, Intaken, NewContract, NewRequest, Store};

/// Most requests stored in one transaction.
pub(crate) const MAX_BATCH: usize = 256;

/// Why a submitted request was not stored.
#[derive(Debug, Clone)]
pub enum IntakeError {
    /// The writer has stopped (the registry is shutting down) or stopped before answering.
    /// The request may still have been committed; a retry with the same idempotency key is
    /// safe either way.
    Stopped,
    /// Storing the request failed: the batch's transaction could not begin or commit (no
    /// request of the batch was stored), or, stored alone after the batch could not take it,
    /// this request could not be (the others of its batch were answered on their own).
    Store {
        /// Requests refused together with this one (1 when it failed alone).
        batch: usize,
        /// What the store said, shared by every request of the batch.
        cause: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl std::fmt::Display for IntakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stopped => {
                f.write_str("the registry is not taking requests now (shutting down); submit again")
            }
            Self::Store { batch, .. } => {
                write!(f, "storing a batch of {batch} submitted requests failed")
            }
        }
    }
}

// By hand: thiserror would give the `Arc` itself as the source, whose type hides the store's
// error from the chain that the status of the answer is read from.
impl std::error::Error for IntakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Stopped => None,
            Self::Store { cause, .. } => Some(&**cause),
        }
    }
}

impl IntakeError {
    /// Storing `batch` requests failed with `e`. The cause keeps the store's own error as
    /// its type when it is one: an anyhow error boxed hides the type of what it holds, and
    /// the status of the answer depends on it (a database out of reach is UNAVAILABLE, to be
    /// retried with the same idempotency key; anything else INTERNAL).
    pub(crate) fn store(batch: usize, e: anyhow::Error) -> Self {
        let cause: Arc<dyn std::error::Error + Send + Sync> = match e.downcast::<sqlx::Error>() {
            Ok(store) => Arc::new(store),
            Err(e) => Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(e)),
        };
        Self::Store { batch, cause }
    }
}

/// Submits waiting for their commit at which intake counts as busy. A lone caller, or an open
/// loop the writer keeps up with, has none or one waiting at a time; callers that send the
/// next Submit as soon as one is answered have nearly all of theirs waiting.
const BUSY_WAITING: usize = 4;

/// How long the dispatcher sleeps before it looks again while intake is busy (ms).
const LOOK_AGAIN_MS: u64 = 10;

/// Whether Submits are queueing, so that the dispatcher can give way to them: a Submit is
/// answered only once its request is durable, and delivering earlier requests takes the same
/// cores and, on SQLite, the same store writer. With `delivery.yield_to_intake_ms` set
/// (it is off by default), while [`BUSY_WAITING`] or more Submits wait for their commit, the
/// dispatcher claims at most once per that interval, so that deliveries go on, more slowly,
/// under any load, and catch up once the burst ends; their due dates are days away, while a
/// partner waiting on a Submit is waiting now.
#[derive(Debug)]
pub(crate) struct Pressure {
    origin: Instant,
    /// Submits queued for the writer or in its transaction, until answered.
    waiting: AtomicUsize,
    /// Milliseconds since `origin` of the dispatcher's last claim.
    claimed_at: AtomicU64,
}

impl Default for Pressure {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            waiting: AtomicUsize::new(0),
            claimed_at: AtomicU64::new(0),
        }
    }
}

/// One Submit counted in [`Pressure::waiting`] until dropped (answered, or its caller gone).
struct Waiting<'p>(&'p Pressure);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pressure {
    fn wait(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }

    /// How long the dispatcher should sleep before it asks again: `None` when intake is not
    /// busy or the last claim is at least `max_wait` ago (0 turns the waiting off), and the
    /// claim is then counted as made.
    pub(crate) fn defer_claim(&self, max_wait: Duration) -> Option<Duration> {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.defer_claim_at(now, self.waiting.load(Ordering::Relaxed), max_wait)
    }

    fn defer_claim_at(&self, now_ms: u64, waiting: usize, max_wait: Duration) -> Option<Duration> {
        let wait = u64::try_from(max_wait.as_millis()).unwrap_or(u64::MAX);
        let turn = self.claimed_at.load(Ordering::Relaxed).saturating_add(wait);
        if waiting >= BUSY_WAITING && now_ms < turn {
            return Some(Duration::from_millis(LOOK_AGAIN_MS.min(turn - now_ms)));
        }
        self.claimed_at.store(now_ms, Ordering::Relaxed);
        None
    }
}

type Job = (Intaken, oneshot::Sender<Result<Inserted, IntakeError>>);

/// The queue in front of the writer.
#[derive(Debug, Clone)]
pub(crate) struct Intake {
    tx: mpsc::Sender<Job>,
    /// Counted by the Submits, read by the dispatcher.
    pub(crate) pressure: Arc<Pressure>,
}

/// The writer's end of the queue: [`Writer::run`] is a worker of the registry's host.
#[derive(Debug)]
pub(crate) struct Writer {
    store: Store,
    rx: mpsc::Receiver<Job>,
}

/// A queue and the writer that stores what is queued on `store`. Nothing is written until
/// the writer runs; Submits queued before that wait for it.
pub(crate) fn channel(store: Store) -> (Intake, Writer) {
    let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
    let pressure = Arc::new(Pressure::default());
    (Intake { tx, pressure }, Writer { store, rx })
}

impl Intake {
    /// Stores `request` (or finds its idempotency key's earlier request); returns once it is
    /// committed.
    pub(crate) async fn submit(&self, request: NewRequest) -> Result<Inserted, IntakeError> {
        self.queue((request, None)).await
    }

    /// Stores a contract end with its terms, as [`Intake::submit`] stores a request; it is
    /// [`Inserted::Running`] while another contract end with the processor has not finished.
    pub(crate) async fn end_contract(
        &self,
        request: NewRequest,
        contract: NewContract,
    ) -> Result<Inserted, IntakeError> {
        self.queue((request, Some(contract))).await
    }

    async fn queue(&self, job: Intaken) -> Result<Inserted, IntakeError> {
        let _waiting = self.pressure.wait();
        let (done_tx, done_rx) = oneshot::channel();
        self.tx
            .send((job, done_tx))
            .await
            .map_err(|_| IntakeError::Stopped)?;
        done_rx.await.map_err(|_| IntakeError::Stopped)?
    }
}

impl Writer {
    /// Commits queued requests in batches until `stop` turns true (or its sender is gone);
    /// then refuses new ones, commits those still queued, and returns.
    pub(crate) async fn run(mut self, mut stop: Stop) {
        loop {
            let first = tokio::select! {
                // Queued work first: a stop never overtakes a request that was waiting.
                biased;
                job = self.rx.recv() => job,
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(first) = first else { break };
            self.commit(first).await;
        }
        self.rx.close();
        let mut drained = 0;
        while let Some(first) = self.rx.recv().await {
            drained += 1;
            self.commit(first).await;
        }
        tracing::debug!(batches = drained, "intake writer stopped");
    }

    /// Stores `first` and whatever else is queued (up to [`MAX_BATCH`]) in one transaction,
    /// and answers each.
    async fn commit(&mut self, first: Job) {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (requests, answers): (Vec<Intaken>, Vec<_>) = jobs.into_iter().unzip();
        match self.store.insert_each(&requests).await {
            Ok(outcomes) => {
                for (answer, outcome) in answers.into_iter().zip(outcomes) {
                    // A failure is logged where the Submit answers it (once per call, and
                    // a database out of reach only now and then); here only one whose
                    // caller hung up, which nobody else hears of. A success whose caller
                    // hung up is stored: nothing to say.
                    if let Err(Err(e)) = answer.send(outcome.map_err(|e| IntakeError::store(1, e)))
                    {
                        tracing::warn!(
                            error = format!("{:#}", anyhow::Error::new(e)),
                            "storing a submitted request failed, and its caller had hung up"
                        );
                    }
                }
            }
            Err(e) => {
                let error = IntakeError::store(requests.len(), e);
                let mut unheard = 0;
                for answer in answers {
                    unheard += usize::from(answer.send(Err(error.clone())).is_err());
                }
                if unheard > 0 {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::new(error)),
                        batch = requests.len(),
                        unheard,
                        "storing submitted requests failed, and some callers had hung up"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dsrelay_proto::v1::RequestKind;
    use dsrelay_runtime::store::Db;
    use tokio::sync::watch;

    use super::*;
    use crate::store::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    async fn store(dir: &std::path::Path) -> Store {
        let db = Db::connect(&format!("sqlite://{}/registry.db", dir.display()))
            .await
            .unwrap();
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .unwrap();
        Store::new(db, b"test key")
    }

    fn request(id: &str) -> NewRequest {
        NewRequest {
            id: id.into(),
            partner: "crm".into(),
            idempotency_key: format!("key-{id}"),
            body_hash: format!("hash-{id}"),
            body: vec![1],
            identity_hashes: "[]".into(),
            kind: RequestKind::Erasure as i32,
            received_at: 1_000,
            due_at: 2_000,
            trace_id: "0".repeat(32),
            traceparent: None,
            processors: vec!["p1".into()],
        }
    }

    #[tokio::test]
    async fn queued_requests_are_committed_on_stop_and_later_ones_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        let (intake, writer) = channel(store.clone());
        // Queued before the writer runs, and stop already asked when it starts.
        let queued: Vec<_> = ["r1", "r2", "r3"]
            .into_iter()
            .map(|id| {
                let intake = intake.clone();
                tokio::spawn(async move { intake.submit(request(id)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (stop_tx, stop_rx) = watch::channel(false);
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), writer.run(stop_rx))
            .await
            .expect("the writer returns once drained");
        for q in queued {
            assert!(matches!(q.await.unwrap(), Ok(Inserted::New)));
        }
        for id in ["r1", "r2", "r3"] {
            assert!(store.request(id).await.unwrap().is_some(), "{id}");
        }
        let late = tokio::time::timeout(Duration::from_secs(1), intake.submit(request("r4")))
            .await
            .expect("a submit after stop does not wait");
        assert!(matches!(late, Err(IntakeError::Stopped)), "{late:?}");
        assert!(store.request("r4").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_writer_commits_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let (intake, writer) = channel(store(dir.path()).await);
        let (stop_tx, stop_rx) = watch::channel(false);
        let running = tokio::spawn(writer.run(stop_rx));
        assert!(matches!(
            intake.submit(request("a")).await,
            Ok(Inserted::New)
        ));
        assert!(matches!(
            intake.submit(request("a")).await,
            Ok(Inserted::Existing(id)) if id == "a"
        ));
        stop_tx.send(true).unwrap();
        running.await.unwrap();
        assert!(matches!(
            intake.submit(request("b")).await,
            Err(IntakeError::Stopped)
        ));
    }

    /// A request of a batch that cannot be stored (here: its id is taken) is answered with
    /// its own error, and the others of the batch, stored alone, as stored.
    #[tokio::test]
    async fn each_request_of_a_failed_batch_gets_its_own_answer() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        let (intake, writer) = channel(store.clone());
        let taken = NewRequest {
            idempotency_key: "another key".into(),
            ..request("r1")
        };
        let queued: Vec<_> = [request("r1"), request("r2"), taken]
            .into_iter()
            .map(|r| {
                let intake = intake.clone();
                tokio::spawn(async move { intake.submit(r).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (stop_tx, stop_rx) = watch::channel(false);
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), writer.run(stop_rx))
            .await
            .expect("the writer returns once drained");
        let mut answers = Vec::new();
        for q in queued {
            answers.push(q.await.unwrap());
        }
        assert!(matches!(answers[0], Ok(Inserted::New)), "{answers:?}");
        assert!(matches!(answers[1], Ok(Inserted::New)), "{answers:?}");
        assert!(
            matches!(answers[2], Err(IntakeError::Store { batch: 1, .. })),
            "{answers:?}"
        );
        for id in ["r1", "r2"] {
            assert!(store.request(id).await.unwrap().is_some(), "{id}");
        }
    }

    #[test]
    fn the_dispatcher_waits_only_while_submits_wait_and_at_most_its_turn() {
        let max = Duration::from_millis(500);
        let p = Pressure::default();
        // A caller or a few at a time: claim at once, each time.
        for (t, waiting) in [(1_000, 0), (1_001, 1), (1_002, BUSY_WAITING - 1)] {
            assert_eq!(p.defer_claim_at(t, waiting, max), None, "{waiting} waiting");
        }
        // Submits queue: look again soon, until the turn (500 ms after the last claim) comes.
        let busy = BUSY_WAITING;
        assert_eq!(
            p.defer_claim_at(1_100, busy, max),
            Some(Duration::from_millis(LOOK_AGAIN_MS))
        );
        assert_eq!(
            p.defer_claim_at(1_497, busy, max),
            Some(Duration::from_millis(5))
        );
        assert_eq!(p.defer_claim_at(1_502, busy, max), None);
        assert!(p.defer_claim_at(1_503, busy, max).is_some());
        // The queue gone: claim at once.
        assert_eq!(p.defer_claim_at(1_504, 0, max), None);
        // Off: 0 never waits, however many wait.
        assert_eq!(p.defer_claim_at(1_505, 100, Duration::ZERO), None);
        // A Submit counts while it waits, and stops counting however it ends.
        let guards: Vec<_> = (0..BUSY_WAITING).map(|_| p.wait()).collect();
        assert!(p.defer_claim(max).is_some());
        drop(guards);
        assert_eq!(p.waiting.load(Ordering::Relaxed), 0);
        assert_eq!(p.defer_claim(max), None);
    }

    /// Answers (Get, List, Watch's events) read through the store's readers: a writer
    /// transaction held open does not hold them up.
    #[tokio::test]
    async fn answers_are_read_while_the_writer_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        store.insert_batch(&[(request("r1"), None)]).await.unwrap();
        let mut busy = store.db().pool.begin().await.unwrap();
        sqlx::query("UPDATE requests SET checked_at = 1")
            .execute(&mut *busy)
            .await
            .unwrap();
        let reads = async {
            let got = store.request_with_tasks("r1").await.unwrap();
            let filter = crate::store::ListFilter {
                limit: 10,
                ..Default::default()
            };
            let listed = store.list(&filter, 0).await.unwrap();
            let events = store.events("r1").await.unwrap();
            (got.is_some(), listed.len(), events.len())
        };
        let (got, listed, events) = tokio::time::timeout(Duration::from_secs(5), reads)
            .await
            .expect("reads do not wait for the writer's open transaction");
        assert!(got);
        assert_eq!(listed, 1);
        assert!(events >= 1, "the request's RECEIVED event");
        busy.rollback().await.unwrap();
    }
}
