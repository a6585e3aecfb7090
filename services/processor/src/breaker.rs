//! The unreachable-holder breaker: after a transient failure a holder is marked unreachable
//! for the retry's backoff, and its other tasks wait without calling it, so that one holder
//! that is down costs one timeout, not one per task. When the mark runs out one task probes
//! the holder while the others keep waiting; any answer from the holder clears the mark.
//!
//! The marks live in this process: each replica learns of a down holder by itself.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Holders marked unreachable, by subprocessor name.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    marks: Mutex<HashMap<String, Mark>>,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    /// Until then (ms) nobody calls the holder.
    open_until: i64,
    /// While a probe is out, until when (ms) it may take; then another task probes, so a
    /// probe that was lost (its runner crashed) does not keep the holder shut.
    probe_until: Option<i64>,
}

impl Breaker {
    /// Whether a task may call `holder` at `now`: `None` to call it, or until when (ms) to
    /// wait. Once a mark has run out the first caller is let through as the probe, for up to
    /// `probe_ms`; the others look again after `recheck_ms`.
    pub(crate) fn admit(
        &self,
        holder: &str,
        now: i64,
        probe_ms: i64,
        recheck_ms: i64,
    ) -> Option<i64> {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let mark = marks.get_mut(holder)?;
        if mark.open_until > now {
            return Some(mark.open_until);
        }
        match mark.probe_until {
            Some(until) if until > now => Some((now + recheck_ms).min(until)),
            _ => {
                mark.probe_until = Some(now + probe_ms);
                None
            }
        }
    }

    /// The holder failed transiently: nobody calls it before `until` (ms).
    pub(crate) fn unreachable(&self, holder: &str, until: i64) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        marks.insert(
            holder.to_string(),
            Mark {
                open_until: until,
                probe_until: None,
            },
        );
    }

    /// The holder answered (whatever it said): it is reachable.
    pub(crate) fn answered(&self, holder: &str) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        marks.remove(holder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_never_marked_is_called() {
        let b = Breaker::default();
        assert_eq!(b.admit("mail", 0, 1_000, 100), None);
        assert_eq!(b.admit("mail", 0, 1_000, 100), None);
    }

    #[test]
    fn a_marked_holder_is_waited_for_then_probed_by_one_task() {
        let b = Breaker::default();
        b.unreachable("mail", 5_000);
        assert_eq!(b.admit("mail", 1_000, 1_000, 100), Some(5_000));
        // Another holder is not affected.
        assert_eq!(b.admit("accounting", 1_000, 1_000, 100), None);
        // The mark ran out: one probe goes, the others look again shortly.
        assert_eq!(b.admit("mail", 5_000, 1_000, 100), None);
        assert_eq!(b.admit("mail", 5_010, 1_000, 100), Some(5_110));
        assert_eq!(b.admit("mail", 5_950, 1_000, 100), Some(6_000));
        // The probe failed again: a new mark, no probe out.
        b.unreachable("mail", 9_000);
        assert_eq!(b.admit("mail", 6_100, 1_000, 100), Some(9_000));
        // The next probe answered: everyone calls again.
        assert_eq!(b.admit("mail", 9_000, 1_000, 100), None);
        b.answered("mail");
        assert_eq!(b.admit("mail", 9_001, 1_000, 100), None);
        assert_eq!(b.admit("mail", 9_001, 1_000, 100), None);
    }

    #[test]
    fn a_lost_probe_lets_another_task_probe() {
        let b = Breaker::default();
        b.unreachable("mail", 1_000);
        assert_eq!(b.admit("mail", 1_000, 1_000, 100), None);
        assert_eq!(b.admit("mail", 1_500, 1_000, 100), Some(1_600));
        assert_eq!(b.admit("mail", 2_000, 1_000, 100), None);
    }
}
