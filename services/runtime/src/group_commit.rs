//! The queue behind a group commit (the processor's task steps and Deliver acceptances, the
//! registry's acknowledgement batches): concurrent callers queue what they want written,
//! and the one that finds no commit under way starts a writer, which takes batches until the
//! queue is empty ([`GroupQueue::write_all`]). On SQLite's one connection a commit costs
//! about as much CPU as a bare INSERT's whole transaction, so sharing it is where concurrent
//! writers save most; on PostgreSQL it also takes the row locks of a batch once.
//!
//! When a batch's transaction fails, every item of it is written again alone, in a
//! transaction of its own, so one that cannot be written never takes the others down with
//! it; each caller gets its own item's outcome.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use anyhow::{anyhow, Result};
use futures::future::BoxFuture;
use tokio::sync::oneshot;

/// What a caller queues for a group commit: the item, and where its answer goes.
pub trait Queued {
    /// What the caller is answered once its item is committed.
    type Answer;
    /// Where the caller waits for its answer.
    fn answer_to(self) -> oneshot::Sender<Result<Self::Answer>>;
}

/// What waits for a commit, and whether a writer is under way.
pub struct GroupQueue<T> {
    state: Mutex<QueueState<T>>,
    /// Transactions committed so far, batches and items written alone alike (counted by
    /// the `record` that commits them).
    pub commits: AtomicU64,
}

struct QueueState<T> {
    waiting: Vec<T>,
    writing: bool,
}

impl<T> Default for GroupQueue<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(QueueState {
                waiting: Vec::new(),
                writing: false,
            }),
            commits: AtomicU64::new(0),
        }
    }
}

impl<T> std::fmt::Debug for GroupQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().expect("group queue");
        f.debug_struct("GroupQueue")
            .field("waiting", &state.waiting.len())
            .field("writing", &state.writing)
            .finish_non_exhaustive()
    }
}

impl<T> GroupQueue<T> {
    /// Queues `item`; `true` when no writer is under way, so the caller must start one.
    pub fn push(&self, item: T) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.waiting.push(item);
        !std::mem::replace(&mut state.writing, true)
    }

    /// The writer's next batch, oldest first, at most `max`; `None` once nothing waits, and
    /// the writer is then gone (the next [`GroupQueue::push`] starts another).
    pub fn next_batch(&self, max: usize) -> Option<Vec<T>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.waiting.is_empty() {
            state.writing = false;
            return None;
        }
        let n = state.waiting.len().min(max);
        Some(state.waiting.drain(..n).collect())
    }
}

impl<T: Queued> GroupQueue<T> {
    /// The writer: commits queued items, batches of at most `max`, until none is left. Each
    /// batch is written by `record` in one transaction, which answers, in the batch's order,
    /// each item's answer; a failed batch is written again one item at a time (see the
    /// module documentation). `what` names a batch in the log.
    pub async fn write_all<F>(&self, max: usize, what: &str, record: F)
    where
        F: for<'a> Fn(&'a [T]) -> BoxFuture<'a, Result<Vec<T::Answer>>>,
    {
        // A writer that ends any other way than finding the queue empty (`record` panicked,
        // or the task running it was dropped) would leave `writing` set, and every later
        // caller waiting for a writer that never comes.
        let mut guard = WriterGuard {
            queue: self,
            what,
            done: false,
        };
        // Callers woken by the same event (a claim's tasks starting together, their holders
        // answering together) are ready to run on this thread now: letting them queue first
        // puts them in the first batch, not the second.
        tokio::task::yield_now().await;
        while let Some(batch) = self.next_batch(max) {
            if batch.len() > 1 {
                match record(&batch).await {
                    Ok(answers) => {
                        for (item, answer) in batch.into_iter().zip(answers) {
                            // The caller may have gone (its call dropped); the item is stored.
                            let _ = item.answer_to().send(Ok(answer));
                        }
                        continue;
                    }
                    Err(e) => tracing::warn!(
                        error = format!("{e:#}"),
                        items = batch.len(),
                        "writing a batch of {what} failed; writing each alone"
                    ),
                }
            }
            for item in batch {
                let outcome = record(std::slice::from_ref(&item))
                    .await
                    .and_then(|mut a| a.pop().ok_or_else(|| anyhow!("nothing was written")));
                let _ = item.answer_to().send(outcome);
            }
        }
        guard.done = true;
    }
}

/// Clears a writer's claim on its queue if it ends without emptying it, answering what waits
/// with an error: the callers retry (their leases run out, their calls are repeated), and the
/// next caller starts a writer again. The items of the batch under way when it stopped are
/// answered by their senders being dropped.
struct WriterGuard<'a, T: Queued> {
    queue: &'a GroupQueue<T>,
    what: &'a str,
    done: bool,
}

impl<T: Queued> Drop for WriterGuard<'_, T> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // A poisoned lock is the same state: a panic elsewhere while it was held.
        let waiting = {
            let mut state = self
                .queue
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.writing = false;
            std::mem::take(&mut state.waiting)
        };
        tracing::error!(
            waiting = waiting.len(),
            "the writer of {} stopped before its queue was empty; what waited is answered \
             with an error",
            self.what
        );
        for item in waiting {
            let _ = item.answer_to().send(Err(anyhow!(
                "the writer of {} stopped before writing this; nothing of it was written",
                self.what
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// An item of the tests' queue: its number and where its answer goes.
    struct Item(usize, oneshot::Sender<Result<usize>>);

    impl Queued for Item {
        type Answer = usize;
        fn answer_to(self) -> oneshot::Sender<Result<usize>> {
            self.1
        }
    }

    /// Queues item `i` as a store's caller does: the first to find no writer starts one in a
    /// task of its own, whose batches' sizes go to `batches`; answers the item's answer.
    async fn queue(
        q: Arc<GroupQueue<Item>>,
        batches: Arc<Mutex<Vec<usize>>>,
        i: usize,
    ) -> Result<usize> {
        let (answer, answered) = oneshot::channel();
        if q.push(Item(i, answer)) {
            let q = q.clone();
            tokio::spawn(async move {
                q.write_all(64, "test items", move |batch| {
                    let batches = batches.clone();
                    Box::pin(async move {
                        batches.lock().expect("batches").push(batch.len());
                        Ok(batch.iter().map(|item| item.0 * 10).collect())
                    })
                })
                .await
            });
        }
        answered.await.expect("answered")
    }

    /// Tasks that start together (a claim's tasks, spawned one after the other) all find
    /// room in the first batch: the writer, which a worker thread would run next, first lets
    /// the tasks already waiting on that thread queue their items.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn callers_started_together_share_the_first_batch() {
        const N: usize = 8;
        let q: Arc<GroupQueue<Item>> = Arc::default();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let (q2, b2) = (q.clone(), batches.clone());
        // Spawned from a worker thread, as the runner spawns its tasks.
        let answers = tokio::spawn(async move {
            let callers: Vec<_> = (0..N)
                .map(|i| tokio::spawn(queue(q2.clone(), b2.clone(), i)))
                .collect();
            let mut answers = Vec::new();
            for c in callers {
                answers.push(c.await.expect("caller").expect("answer"));
            }
            answers
        })
        .await
        .expect("callers");
        assert_eq!(answers, (0..N).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(*batches.lock().expect("batches"), vec![N]);
    }

    /// A writer whose `record` panics does not leave the queue waiting for it: the caller
    /// whose item it was writing gets an error, and the next caller's writer writes.
    #[tokio::test]
    async fn a_writer_that_panics_leaves_the_queue_to_the_next_one() {
        let q: Arc<GroupQueue<Item>> = Arc::default();
        let (answer, answered) = oneshot::channel();
        assert!(q.push(Item(1, answer)));
        let writer = {
            let q = q.clone();
            tokio::spawn(async move {
                q.write_all(64, "test items", |_batch| {
                    Box::pin(async move { panic!("a bug in record") })
                })
                .await
            })
        };
        assert!(writer.await.is_err(), "the writer panicked");
        assert!(answered.await.is_err(), "its caller hears it stopped");
        let batches = Arc::new(Mutex::new(Vec::new()));
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            queue(q.clone(), batches.clone(), 2),
        )
        .await
        .expect("a new writer starts")
        .expect("answer");
        assert_eq!(answer, 20);
        assert_eq!(*batches.lock().expect("batches"), vec![1]);
    }

    #[test]
    fn the_first_push_starts_a_writer_which_takes_batches_until_none_is_left() {
        let q = GroupQueue::default();
        assert!(q.push(1), "nothing under way: start a writer");
        assert!(!q.push(2), "a writer is under way");
        assert!(!q.push(3));
        assert_eq!(q.next_batch(2), Some(vec![1, 2]));
        assert!(!q.push(4), "still under way until it finds the queue empty");
        assert_eq!(q.next_batch(2), Some(vec![3, 4]));
        assert_eq!(q.next_batch(2), None);
        assert!(q.push(5), "the writer is gone: start another");
    }
}
