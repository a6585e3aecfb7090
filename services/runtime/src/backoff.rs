//! Retry timing for outboxes: exponential backoff with equal jitter (a delay between half
//! and all of the ceiling).

use std::time::Duration;

/// How retries are spaced.
#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// The first retry waits up to this long (milliseconds).
    pub initial_ms: u64,
    /// No wait exceeds this (milliseconds).
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 500,
            max_ms: 60_000,
        }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (1 = first retry): a random duration between
    /// half and all of `min(max, initial * 2^(attempt-1))`, so that many senders retrying
    /// after one outage do not arrive together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let ceiling = self
            .initial_ms
            .max(1)
            .saturating_mul(1u64 << exp)
            .min(self.max_ms.max(1));
        let half = ceiling / 2;
        Duration::from_millis(half + fastrand::u64(0..=ceiling - half))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff {
            initial_ms: 100,
            max_ms: 1000,
        };
        for _ in 0..100 {
            let d1 = b.delay(1).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            let d3 = b.delay(3).as_millis();
            assert!((200..=400).contains(&d3), "{d3}");
            let d20 = b.delay(20).as_millis();
            assert!((500..=1000).contains(&d20), "{d20}");
        }
        assert!(b.delay(u32::MAX).as_millis() <= 1000);
    }
}
