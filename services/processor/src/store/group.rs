//! The queue behind each group commit of the store (the runner's steps in `steps`, the
//! Deliver calls' acceptances in `accepts`): concurrent callers queue what they want
//! written, and the one that finds no commit under way starts a writer, which takes batches
//! until the queue is empty. On SQLite's one connection a commit costs about as much CPU as
//! a bare INSERT's whole transaction, so sharing it is where concurrent writers save most.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

/// What waits for a commit, and whether a writer is under way.
pub(super) struct GroupQueue<T> {
    state: Mutex<QueueState<T>>,
    /// Transactions committed so far, batches and items written alone alike.
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
