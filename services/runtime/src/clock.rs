//! The services' clock: the system clock plus an offset that tests can move, so that
//! retention periods and due dates can be tested without waiting years.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// An instant (ms since the Unix epoch) for messages, events and notes: RFC 3339 in UTC, to
/// the second (`2027-01-04T10:00:00Z`); one chrono cannot represent as itself in ms.
pub fn date_label(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Milliseconds since the Unix epoch, shifted by an adjustable offset. Clones share the
/// offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        crate::store::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves the clock forward by `ms` (tests).
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_every_clone() {
        let c = Clock::system();
        let d = c.clone();
        let before = d.now_ms();
        c.advance(86_400_000);
        assert!(d.now_ms() - before >= 86_400_000);
    }
}
