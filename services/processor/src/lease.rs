//! How a claim's holder keeps its lease (a task's at the runner, an upload's at the
//! uploader): renewed every third of it, on the database's clock, while the time since the
//! last renewal that held is measured here, from before its statement was sent, so never
//! past the lease's real end.

use std::future::Future;
use std::time::{Duration, Instant};

/// What one renewal found.
pub(crate) enum Renewal<E> {
    /// The lease is this holder's for `lease_ms` more.
    Held,
    /// The renewal matched nothing: another claim took it, or it ended (the store revives
    /// no ended lease).
    Lost,
    /// The renewal failed, and the lease may run out before the next one: the holder can no
    /// longer tell it still holds it.
    RanOut(E),
    /// The renewal failed, and is tried again at the next one while the lease lasts.
    Failed(E),
}

/// A lease's duration and until when it is known to hold.
pub(crate) struct LeaseClock {
    lease: Duration,
    held_until: Instant,
}

impl LeaseClock {
    /// A lease of `lease_ms` set by a statement (a claim, or a step holding the task anew)
    /// sent after `claimed_at`: an instant taken before it was sent, as for a renewal.
    pub(crate) fn new(claimed_at: Instant, lease_ms: u64) -> Self {
        let lease = Duration::from_millis(lease_ms);
        Self {
            lease,
            held_until: claimed_at + lease,
        }
    }

    /// How often the lease is renewed: three tries before it runs out.
    pub(crate) fn every(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(1))
    }

    /// Runs `extend` (the store's renewal: whether it matched) and says what it found.
    pub(crate) async fn renew<E>(
        &mut self,
        extend: impl Future<Output = Result<bool, E>>,
    ) -> Renewal<E> {
        let asked = Instant::now();
        match extend.await {
            Ok(true) => {
                self.held_until = asked + self.lease;
                Renewal::Held
            }
            Ok(false) => Renewal::Lost,
            Err(e) if Instant::now() + self.every() >= self.held_until => Renewal::RanOut(e),
            Err(e) => Renewal::Failed(e),
        }
    }
}
