//! The queue behind each group commit of the store (the runner's steps in `steps`, the
//! Deliver calls' acceptances in `accepts`): concurrent callers queue what they want
//! written, and the one that finds no commit under way starts a writer, which takes batches
//! until the queue is empty ([`GroupQueue::write_all`]). On SQLite's one connection a commit
//! costs about as much CPU as a bare INSERT's whole transaction, so sharing it is where
//! concurrent writers save most.
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
pub(super) trait Queued {
    /// What the caller is answered once its item is committed.
    type Answer;
    /// Where the caller waits for its answer.
    fn answer_to(self) -> oneshot::Sender<Result<Self::Answer, String>>;
}

/// What waits for a commit, and whether a writer is under way.
pub(super) struct GroupQueue<T> {
    state: Mutex<QueueState<T>>,
    /// Transactions committed so far, batches and items written alone alike (counted by
    /// the `record` that commits them).
    pub(super) commits: AtomicU64,
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
    pub(super) fn push(&self, item: T) -> bool {
        let mut state = self.state.lock().expect("group queue");
        state.waiting.push(item);
        !std::mem::replace(&mut state.writing, true)
    }

    /// The writer's next batch, oldest first, at most `max`; `None` once nothing waits, and
    /// the writer is then gone (the next [`GroupQueue::push`] starts another).
    pub(super) fn next_batch(&self, max: usize) -> Option<Vec<T>> {
        let mut state = self.state.lock().expect("group queue");
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
    pub(super) async fn write_all<F>(&self, max: usize, what: &str, record: F)
    where
        F: for<'a> Fn(&'a [T]) -> BoxFuture<'a, Result<Vec<T::Answer>>>,
    {
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
                let _ = item.answer_to().send(outcome.map_err(|e| format!("{e:#}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
