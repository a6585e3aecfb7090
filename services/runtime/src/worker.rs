//! A claim-and-run loop shared by the outbox dispatchers and the task runner.
//!
//! Work is claimed only for free slots, and each job holds its slot only while it runs, so a
//! slow job (a holder that times out) never holds back the jobs claimed with it: the loop
//! claims more as soon as any slot frees.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};

/// How a pool runs.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Jobs running at once.
    pub concurrency: usize,
    /// Most jobs claimed in one round.
    pub batch: usize,
    /// How long to sleep when nothing wakes the loop.
    pub poll: Duration,
}

/// Claims jobs with `claim(n)` and runs each with `run(job)` until `stop` turns true; then
/// waits (at most `grace`) for the running jobs.
pub async fn run_pool<J, C, CF, R, RF>(
    settings: PoolSettings,
    wakeup: &Notify,
    stop: watch::Receiver<bool>,
    grace: Duration,
    claim: C,
    run: R,
) where
    J: Send + 'static,
    C: Fn(usize) -> CF,
    CF: Future<Output = Vec<J>>,
    R: Fn(J) -> RF,
    RF: Future<Output = ()> + Send + 'static,
{
    let ready = || std::future::ready(());
    run_pool_gated(settings, wakeup, stop, grace, ready, claim, run).await;
}

/// As [`run_pool`], but before each claim for free slots it awaits `gate()` (which may hold
/// claims back for a while), and then claims for the slots free once it returns.
pub async fn run_pool_gated<J, G, GF, C, CF, R, RF>(
    settings: PoolSettings,
    wakeup: &Notify,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    gate: G,
    claim: C,
    run: R,
) where
    J: Send + 'static,
    G: Fn() -> GF,
    GF: Future<Output = ()>,
    C: Fn(usize) -> CF,
    CF: Future<Output = Vec<J>>,
    R: Fn(J) -> RF,
    RF: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let free_now = || slots.available_permits().min(settings.batch.max(1));
    loop {
        if *stop.borrow() {
            break;
        }
        let mut free = free_now();
        if free > 0 {
            gate().await;
            if *stop.borrow() {
                break;
            }
            free = free_now();
            let jobs = claim(free).await;
            let claimed = jobs.len();
            for job in jobs {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let fut = run(job);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            if claimed == free {
                // More may be due right now.
                continue;
            }
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = wakeup.notified() => {}
            _ = tokio::time::sleep(settings.poll) => {}
            // A slot freed while all were busy. Jobs tend to finish together (a group
            // commit answers a batch of steps at once): yielding first lets the others that
            // finished give their slots back, so one claim fills them all instead of one
            // claim, a durable commit on SQLite, per slot.
            p = slots.acquire(), if free == 0 => {
                drop(p);
                tokio::task::yield_now().await;
            }
        }
    }
    let all = u32::try_from(settings.concurrency.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(grace, slots.acquire_many(all)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_slow_job_does_not_hold_back_the_others() {
        let done = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let (stop_tx, stop_rx) = watch::channel(false);
        let d = done.clone();
        let n = next.clone();
        let wakeup = Notify::new();
        let pool = run_pool(
            PoolSettings {
                concurrency: 2,
                batch: 10,
                poll: Duration::from_millis(5),
            },
            &wakeup,
            stop_rx,
            Duration::from_secs(1),
            move |k| {
                let n = n.clone();
                async move {
                    // Jobs 0..20; job 0 is slow.
                    (0..k)
                        .map(|_| n.fetch_add(1, Ordering::SeqCst))
                        .filter(|i| *i < 20)
                        .collect::<Vec<_>>()
                }
            },
            move |i| {
                let d = d.clone();
                async move {
                    if i == 0 {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    d.fetch_add(1, Ordering::SeqCst);
                }
            },
        );
        let check = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // 19 fast jobs ran through the one free slot while job 0 held the other.
            let fast = done.load(Ordering::SeqCst);
            stop_tx.send(true).unwrap();
            fast
        };
        let ((), fast) = tokio::join!(pool, check);
        assert_eq!(fast, 19);
    }
}
