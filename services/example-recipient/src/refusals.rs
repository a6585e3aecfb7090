//! The refusals an operator finds in the log: a caller not in `allowed_identities`, and a
//! file whose bytes do not hash to the SHA-256 its header announced. Each is one WARN line
//! naming the sender's certificate identity and the reason, at most one a second per sender
//! and reason ([`WARN_EVERY`]), so that a flood does not flood the log: the refusals left
//! out are counted into the next line, and a worker ([`log_late`]) logs what a flood's last
//! second left when no refusal follows to carry it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Refusals of one sender for one reason are logged at most once per this long.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(1);

/// Why a sender was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Reason {
    /// Its certificate identity is not in `allowed_identities` (PERMISSION_DENIED).
    NotAllowed,
    /// A file's bytes do not hash to its header's SHA-256; they were dropped and the file
    /// starts again at offset 0 (DATA_LOSS).
    DigestMismatch,
}

impl Reason {
    /// The reason as the log line's `reason` names it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NotAllowed => "not in allowed_identities",
            Self::DigestMismatch => "file digest mismatch",
        }
    }
}

/// The log state of one sender's refusals for one reason.
#[derive(Debug, Default)]
struct Logged {
    /// When a line was last logged.
    warned_at: Option<Instant>,
    /// Refusals not in a line since.
    unlogged: u64,
}

/// The refusals' log state, by sender and reason.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    by_sender: Mutex<HashMap<(String, Reason), Logged>>,
}

impl Refusals {
    /// Counts a refusal of `sender` for `reason` at `now`: `Some(refused)` when it is to be
    /// logged now, `refused` being the refusals since the last line, this one included;
    /// `None` within [`WARN_EVERY`] of that line.
    pub(crate) fn count(&self, sender: &str, reason: Reason, now: Instant) -> Option<u64> {
        // Every field is written whole under the lock: a panic elsewhere leaves it usable.
        let mut by_sender = self.by_sender.lock().unwrap_or_else(|e| e.into_inner());
        let l = by_sender.entry((sender.to_string(), reason)).or_default();
        l.unlogged += 1;
        match l.warned_at {
            Some(at) if now.saturating_duration_since(at) < WARN_EVERY => None,
            _ => {
                l.warned_at = Some(now);
                Some(std::mem::take(&mut l.unlogged))
            }
        }
    }

    /// The refusals not logged yet of each sender and reason whose last line is at least
    /// [`WARN_EVERY`] old at `now`, taken as if logged now. Entries with nothing left to log
    /// and no line within the second are dropped: a refusal finds an absent entry as it would
    /// find them, and senders a flood named once are not kept for ever.
    pub(crate) fn take_unlogged(&self, now: Instant) -> Vec<(String, Reason, u64)> {
        let mut by_sender = self.by_sender.lock().unwrap_or_else(|e| e.into_inner());
        let mut late = Vec::new();
        by_sender.retain(|(sender, reason), l| {
            let quiet = l
                .warned_at
                .is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY);
            if !quiet {
                return true;
            }
            if l.unlogged == 0 {
                return false;
            }
            l.warned_at = Some(now);
            late.push((sender.clone(), *reason, std::mem::take(&mut l.unlogged)));
            true
        });
        late.sort();
        late
    }

    /// Counts a refusal of `sender` for `reason` now and logs it unless a line for the same
    /// sender and reason was logged within [`WARN_EVERY`]; `why` is what the sender was told.
    pub(crate) fn refused(&self, sender: &str, reason: Reason, why: &str) {
        if let Some(refused) = self.count(sender, reason, Instant::now()) {
            warn(sender, reason, refused, Some(why));
        }
    }
}

/// The line of `refused` refusals of `sender` for `reason`, those since its last line: with
/// `why`, the answer to the one logged as it came, the others (`left_out`) having been left
/// out of the lines of the last second; without, all of them were.
fn warn(sender: &str, reason: Reason, refused: u64, why: Option<&str>) {
    tracing::warn!(
        sender,
        reason = reason.as_str(),
        refused,
        left_out = refused.saturating_sub(u64::from(why.is_some())),
        why = why.unwrap_or("(left out of the lines of the last second)"),
        "transfer refused"
    );
}

/// Logs, every [`WARN_EVERY`] until `stop`, the refusals a flood left unlogged
/// ([`Refusals::take_unlogged`]), so that every refusal is in a line within about two
/// seconds even when no refusal comes after it.
pub(crate) async fn log_late(refusals: Arc<Refusals>, mut stop: dsrelay_runtime::host::Stop) {
    loop {
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(WARN_EVERY) => {}
        }
        for (sender, reason, refused) in refusals.take_unlogged(Instant::now()) {
            warn(&sender, reason, refused, None);
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second_per_sender_and_reason() {
        let t0 = Instant::now();
        let r = Refusals::default();
        let logged = |sender: &str, reason: Reason, at: u64| r.count(sender, reason, t0 + ms(at));
        assert_eq!(logged("a", Reason::NotAllowed, 0), Some(1));
        assert_eq!(logged("a", Reason::NotAllowed, 10), None);
        assert_eq!(logged("a", Reason::NotAllowed, 999), None);
        // Another reason of the same sender, and another sender, have lines of their own.
        assert_eq!(logged("a", Reason::DigestMismatch, 999), Some(1));
        assert_eq!(logged("b", Reason::NotAllowed, 999), Some(1));
        assert_eq!(logged("a", Reason::NotAllowed, 1000), Some(3));
        assert_eq!(logged("a", Reason::NotAllowed, 1001), None);
        assert_eq!(logged("a", Reason::NotAllowed, 5000), Some(2));
    }

    #[test]
    fn refusals_left_unlogged_are_taken_once_their_line_is_a_second_old() {
        let t0 = Instant::now();
        let r = Refusals::default();
        for at in [0, 10, 20] {
            r.count("a", Reason::NotAllowed, t0 + ms(at));
        }
        r.count("b", Reason::DigestMismatch, t0);
        assert!(r.take_unlogged(t0 + ms(999)).is_empty());
        assert_eq!(
            r.take_unlogged(t0 + ms(1000)),
            [("a".to_string(), Reason::NotAllowed, 2)]
        );
        // Taken counts as a line: the next refusal within the second waits again.
        assert_eq!(r.count("a", Reason::NotAllowed, t0 + ms(1500)), None);
        assert_eq!(
            r.take_unlogged(t0 + ms(2000)),
            [("a".to_string(), Reason::NotAllowed, 1)]
        );
        // Entries with nothing to log a second after their line are dropped, and a refusal
        // after that is logged at once, as the first was.
        assert!(r.take_unlogged(t0 + ms(3000)).is_empty());
        assert!(r.by_sender.lock().unwrap().is_empty());
        assert_eq!(r.count("a", Reason::NotAllowed, t0 + ms(3000)), Some(1));
    }
}
