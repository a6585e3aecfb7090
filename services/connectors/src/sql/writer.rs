//! Erasures that arrive together share one transaction on SQLite.
//!
//! A SQLite database has one writer connection here, so concurrent erasures (the processor
//! runs several tasks at once) queue for it anyway, and each paid for a commit of its own: a
//! WAL append of every page it touched and a sync. The [`ErasureWriter`] of a SQLite database
//! takes what is queued and erases it in one transaction, each erasure inside a savepoint of
//! its own, so that one that fails is rolled back alone and answered with its error while
//! the others commit. A transaction that fails as a whole is run again one erasure at a time
//! (see [`dsrelay_runtime::group_commit`]). Each erasure still stores its task's receipt in
//! the same transaction as its work, so a caller that went away before its answer finds the
//! committed report on its retry (and that retry's own work is rolled back to its
//! savepoint).
//!
//! PostgreSQL runs erasures on connections of their own, side by side; they are not grouped.

use std::sync::Arc;

use dsrelay_runtime::group_commit::{GroupQueue, Queued};
use dsrelay_runtime::store::Db;
use tokio::sync::oneshot;

use super::execute::{classify, ErasureReport};
use super::plan::Identity;
use super::receipt;
use super::schema::ColumnTypes;
use super::{Narrowed, Scoped, SqlConnectorConfig};
use crate::ConnectorError;

/// Erasures per transaction at most.
const MAX_BATCH: usize = 32;

/// What an erasure answers: its report and whether an earlier call had committed it.
type Erased = Result<(ErasureReport, bool), ConnectorError>;

/// One queued erasure: what [`Scoped::erase_once`] was given.
pub(super) struct QueuedErasure {
    raw: Vec<Identity>,
    now_ms: i64,
    task_key: Option<String>,
    condition: Option<String>,
    /// The rules of a request scoped to categories that leave tables out.
    narrowed: Option<Arc<Narrowed>>,
    answer: oneshot::Sender<anyhow::Result<Erased>>,
}

impl Queued for QueuedErasure {
    type Answer = Erased;
    fn answer_to(self) -> oneshot::Sender<anyhow::Result<Erased>> {
        self.answer
    }
}

/// The erasure queue of one SQLite database; see the module documentation.
pub(super) struct ErasureWriter {
    config: Arc<SqlConnectorConfig>,
    db: Db,
    types: Arc<ColumnTypes>,
    queue: GroupQueue<QueuedErasure>,
}

impl std::fmt::Debug for ErasureWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErasureWriter")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl ErasureWriter {
    pub(super) fn new(
        config: Arc<SqlConnectorConfig>,
        db: Db,
        types: Arc<ColumnTypes>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            db,
            types,
            queue: GroupQueue::default(),
        })
    }

    /// Transactions committed so far.
    #[cfg(test)]
    pub(super) fn commits(&self) -> u64 {
        self.queue
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues the erasure and waits for its transaction. It is carried out even if the
    /// caller goes away meanwhile; the task's receipt then answers its retry.
    pub(super) async fn erase(
        self: &Arc<Self>,
        raw: &[Identity],
        now_ms: i64,
        task_key: Option<&str>,
        condition: Option<&str>,
        narrowed: Option<Arc<Narrowed>>,
    ) -> Erased {
        let (answer, answered) = oneshot::channel();
        let queued = QueuedErasure {
            raw: raw.to_vec(),
            now_ms,
            task_key: task_key.map(str::to_string),
            condition: condition.map(str::to_string),
            narrowed,
            answer,
        };
        if self.queue.push(queued) {
            let writer = Arc::clone(self);
            tokio::spawn(async move {
                let w = Arc::clone(&writer);
                writer
                    .queue
                    .write_all(MAX_BATCH, "erasures", move |batch| {
                        let w = Arc::clone(&w);
                        Box::pin(async move { w.erase_batch(batch).await })
                    })
                    .await;
            });
        }
        match answered.await {
            Ok(Ok(erased)) => erased,
            // The transaction failed; keep the error's class when it has one.
            Ok(Err(e)) => Err(e
                .downcast::<ConnectorError>()
                .unwrap_or_else(|e| ConnectorError::Transient(format!("erasing: {e:#}")))),
            Err(_) => Err(ConnectorError::Transient(
                "the erasure writer stopped before answering".into(),
            )),
        }
    }

    /// Erases `batch` in one transaction, each erasure in a savepoint; answers each
    /// erasure's outcome in the batch's order once the transaction is committed.
    async fn erase_batch(&self, batch: &[QueuedErasure]) -> anyhow::Result<Vec<Erased>> {
        let mut tx = self
            .db
            .pool
            .begin()
            .await
            .map_err(|e| classify("starting a transaction", &e))?;
        let mut answers = Vec::with_capacity(batch.len());
        for q in batch {
            let scoped = Scoped {
                config: q.narrowed.as_ref().map_or(&*self.config, |n| &n.config),
                db: &self.db,
                condition: q.condition.as_deref(),
                writer: None,
                types: &self.types,
                narrowed: q.narrowed.as_ref(),
            };
            savepoint(&mut tx, "SAVEPOINT erasure").await?;
            match scoped
                .erase_in(&mut tx, &q.raw, q.now_ms, q.task_key.as_deref())
                .await
            {
                Ok(erased) => {
                    if erased.1 {
                        // An earlier call did the work; this one's is undone.
                        savepoint(&mut tx, "ROLLBACK TO erasure").await?;
                    }
                    savepoint(&mut tx, "RELEASE erasure").await?;
                    answers.push(Ok(erased));
                }
                Err(e) => {
                    // Some errors (SQLITE_FULL, SQLITE_IOERR, ...) roll the whole transaction
                    // back, savepoints and all. The batch then fails with this erasure's own
                    // error, which is what it answers when it is run again alone.
                    let undone = savepoint(&mut tx, "ROLLBACK TO erasure").await;
                    if undone.is_err() || savepoint(&mut tx, "RELEASE erasure").await.is_err() {
                        return Err(e.into());
                    }
                    let receipts = self.config.receipts_table();
                    let key = q.task_key.as_deref();
                    answers.push(receipt::or_earlier(&mut *tx, receipts, key, e).await);
                }
            }
        }
        tx.commit()
            .await
            .map_err(|e| classify("committing the erasure", &e))?;
        self.queue
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(answers)
    }
}

async fn savepoint(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    sql: &'static str,
) -> Result<(), ConnectorError> {
    sqlx::query(sql)
        .execute(&mut **tx)
        .await
        .map(drop)
        .map_err(|e| classify(sql, &e))
}
