//! The unreachable-holder breaker: after a transient failure a holder is marked unreachable
//! for the retry's backoff, and its other tasks wait without calling it, so that one holder
//! that is down costs one timeout, not one per task. When the mark runs out one task probes
//! the holder while the others keep waiting; any answer from the holder clears the mark.
//!
//! A mark also keeps since when the holder has been failing (a failed probe renews the mark
//! without moving that), its last error, and how many times each task waited for it: the
//! runner acknowledges waits 1, 2, 4, 8... with the mark's words
//! ([`crate::task_machine::worth_acknowledging`]), so the count starts again once the
//! holder answers.
//!
//! The marks live in this process: each replica learns of a down holder by itself.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::store::TaskKey;

/// Holders marked unreachable, by subprocessor name.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    marks: Mutex<HashMap<String, Mark>>,
}

#[derive(Debug, Clone)]
struct Mark {
    /// Until then (ms) nobody calls the holder.
    open_until: i64,
    /// While a probe is out, until when (ms) it may take; then another task probes, so a
    /// probe that was lost (its runner crashed) does not keep the holder shut.
    probe_until: Option<i64>,
    /// When the holder's first failure of this run of failures came (ms).
    since: i64,
    /// Its last transient error.
    error: String,
    /// Waits so far of each task held back by this mark, the one being let in included.
    waits: HashMap<TaskKey, i64>,
}

/// Why a task may not call its holder now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Down {
    /// When (ms) to look at the task again: the mark's end, or shortly while a probe is out.
    pub until: i64,
    /// Since when (ms) the holder has been failing.
    pub since: i64,
    /// Its last transient error.
    pub error: String,
    /// This task's waits for the holder so far, this one included.
    pub waits: i64,
}

impl Breaker {
    /// Whether `task` may call `holder` at `now`: `None` to call it, or why to wait (and the
    /// wait is counted). Once a mark has run out the first caller is let through as the
    /// probe, for up to `probe_ms`; the others look again after `recheck_ms`.
    pub(crate) fn admit(
        &self,
        holder: &str,
        task: &TaskKey,
        now: i64,
        probe_ms: i64,
        recheck_ms: i64,
    ) -> Option<Down> {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let mark = marks.get_mut(holder)?;
        let until = if mark.open_until > now {
            mark.open_until
        } else {
            match mark.probe_until {
                Some(until) if until > now => (now + recheck_ms).min(until),
                _ => {
                    mark.probe_until = Some(now + probe_ms);
                    return None;
                }
            }
        };
        let waits = mark.waits.entry(task.clone()).or_insert(0);
        *waits += 1;
        Some(Down {
            until,
            since: mark.since,
            error: mark.error.clone(),
            waits: *waits,
        })
    }

    /// The holder failed transiently at `now` with `error`: nobody calls it before `until`
    /// (ms). A holder marked already keeps since when it fails, and its tasks' waits.
    pub(crate) fn failed(&self, holder: &str, now: i64, until: i64, error: &str) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let mark = marks.entry(holder.to_string()).or_insert_with(|| Mark {
            open_until: until,
            probe_until: None,
            since: now,
            error: String::new(),
            waits: HashMap::new(),
        });
        mark.open_until = until;
        mark.probe_until = None;
        // Enough to say what is wrong; the task's last error keeps a call's whole words.
        mark.error = crate::text::fit(error, 200).into_owned();
    }

    /// [`Breaker::failed`] with no error to tell, since `until`.
    #[cfg(test)]
    pub(crate) fn unreachable(&self, holder: &str, until: i64) {
        self.failed(holder, until, until, "");
    }

    /// The holder answered (whatever it said): it is reachable, and its tasks' waits are over.
    pub(crate) fn answered(&self, holder: &str) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        marks.remove(holder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(request_id: &str) -> TaskKey {
        TaskKey {
            controller: "acme".into(),
            request_id: request_id.into(),
            subprocessor: "mail".into(),
        }
    }

    /// `admit`'s answer: until when to wait, `None` to call.
    fn until(b: &Breaker, holder: &str, now: i64) -> Option<i64> {
        b.admit(holder, &task("r-1"), now, 1_000, 100)
            .map(|d| d.until)
    }

    #[test]
    fn a_holder_never_marked_is_called() {
        let b = Breaker::default();
        assert_eq!(until(&b, "mail", 0), None);
        assert_eq!(until(&b, "mail", 0), None);
    }

    #[test]
    fn a_marked_holder_is_waited_for_then_probed_by_one_task() {
        let b = Breaker::default();
        b.unreachable("mail", 5_000);
        assert_eq!(until(&b, "mail", 1_000), Some(5_000));
        // Another holder is not affected.
        assert_eq!(until(&b, "accounting", 1_000), None);
        // The mark ran out: one probe goes, the others look again shortly.
        assert_eq!(until(&b, "mail", 5_000), None);
        assert_eq!(until(&b, "mail", 5_010), Some(5_110));
        assert_eq!(until(&b, "mail", 5_950), Some(6_000));
        // The probe failed again: a new mark, no probe out.
        b.unreachable("mail", 9_000);
        assert_eq!(until(&b, "mail", 6_100), Some(9_000));
        // The next probe answered: everyone calls again.
        assert_eq!(until(&b, "mail", 9_000), None);
        b.answered("mail");
        assert_eq!(until(&b, "mail", 9_001), None);
        assert_eq!(until(&b, "mail", 9_001), None);
    }

    #[test]
    fn a_lost_probe_lets_another_task_probe() {
        let b = Breaker::default();
        b.unreachable("mail", 1_000);
        assert_eq!(until(&b, "mail", 1_000), None);
        assert_eq!(until(&b, "mail", 1_500), Some(1_600));
        assert_eq!(until(&b, "mail", 2_000), None);
    }

    /// Each task's waits are counted apart, across a failed probe, until the holder answers;
    /// the mark keeps since when the holder fails and its last words.
    #[test]
    fn waits_are_counted_per_task_until_the_holder_answers() {
        let b = Breaker::default();
        b.failed("mail", 100, 5_000, "connection refused");
        let wait = |r, now| b.admit("mail", &task(r), now, 1_000, 100);
        let first = wait("r-1", 1_000).expect("waits");
        assert_eq!(first.since, 100);
        assert_eq!(first.error, "connection refused");
        assert_eq!(first.waits, 1);
        assert_eq!(wait("r-1", 1_100).map(|d| d.waits), Some(2));
        assert_eq!(wait("r-2", 1_100).map(|d| d.waits), Some(1));
        // A failed probe renews the mark: since stays, the error is the new one.
        b.failed("mail", 5_500, 9_000, "timed out");
        let again = wait("r-1", 6_000).expect("waits");
        assert_eq!((again.since, again.error.as_str()), (100, "timed out"));
        assert_eq!((again.until, again.waits), (9_000, 3));
        b.answered("mail");
        b.failed("mail", 10_000, 12_000, "refused");
        let next = wait("r-1", 10_500).expect("waits");
        assert_eq!((next.since, next.waits), (10_000, 1));
    }
}
