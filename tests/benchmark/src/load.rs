//! Load generators (closed loop for a fixed time, a fixed number of calls, open loop at a
//! fixed rate) and resident-memory sampling of processes.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a load run did.
#[derive(Debug, Clone, Default)]
pub(crate) struct LoadResult {
    /// Calls that succeeded.
    pub(crate) ok: u64,
    /// Calls that failed.
    pub(crate) errors: u64,
    /// The first failure.
    pub(crate) first_error: Option<String>,
    /// From the first call to the end of the last.
    pub(crate) elapsed: Duration,
}

impl LoadResult {
    /// Successful calls per second.
    pub(crate) fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ok as f64 / s
        } else {
            0.0
        }
    }

    fn add(&mut self, other: (u64, u64, Option<String>)) {
        self.ok += other.0;
        self.errors += other.1;
        if self.first_error.is_none() {
            self.first_error = other.2;
        }
    }
}

/// `concurrency` callers each call `call(caller, n)` again as soon as the last call returns,
/// until `duration` has passed.
pub(crate) async fn closed_loop<F, Fut>(
    concurrency: usize,
    duration: Duration,
    call: F,
) -> LoadResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let (mut ok, mut errors, mut first) = (0, 0, None);
                let mut n = 0;
                while Instant::now() < deadline {
                    match call(worker, n).await {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            errors += 1;
                            first.get_or_insert(e);
                            // A failing target fails fast; do not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    n += 1;
                }
                (ok, errors, first)
            })
        })
        .collect();
    join(workers, start).await
}

/// `concurrency` callers share `total` calls `call(i)`, `i` in `0..total`.
pub(crate) async fn fixed_count<F, Fut>(concurrency: usize, total: u64, call: F) -> LoadResult
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = call.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let (mut ok, mut errors, mut first) = (0, 0, None);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    match call(i).await {
                        Ok(()) => ok += 1,
                        Err(e) => {
                            errors += 1;
                            first.get_or_insert(e);
                        }
                    }
                }
                (ok, errors, first)
            })
        })
        .collect();
    join(workers, start).await
}

/// `total` calls `call(i)` started at `rate` per second whatever the earlier ones are doing
/// (open loop), then waits for all of them.
pub(crate) async fn open_loop<F, Fut>(rate: f64, total: u64, call: F) -> LoadResult
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let mut calls = Vec::with_capacity(total as usize);
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut tick = tokio::time::interval(period);
    // Late ticks fire at once so that the schedule, not the system, sets the rate.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        let call = call.clone();
        calls.push(tokio::spawn(async move {
            match call(i).await {
                Ok(()) => (1, 0, None),
                Err(e) => (0, 1, Some(e)),
            }
        }));
    }
    join(calls, start).await
}

async fn join(handles: Vec<JoinHandle<(u64, u64, Option<String>)>>, start: Instant) -> LoadResult {
    let mut result = LoadResult::default();
    for h in handles {
        match h.await {
            Ok(r) => result.add(r),
            Err(e) => result.add((0, 1, Some(format!("load task failed: {e}")))),
        }
    }
    result.elapsed = start.elapsed();
    result
}

/// A process's resident memory (`VmRSS`) in KiB, if it is alive.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// KiB as MiB.
pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Samples the resident memory of some processes every 100 ms and keeps each one's peak.
pub(crate) struct RssSampler {
    stop: watch::Sender<bool>,
    handle: JoinHandle<Vec<u64>>,
}

impl RssSampler {
    /// Starts sampling `pids`.
    pub(crate) fn start(pids: Vec<u32>) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let handle = tokio::spawn(async move {
            let mut peaks = vec![0; pids.len()];
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    if let Some(kib) = rss_kib(*pid) {
                        *peak = (*peak).max(kib);
                    }
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
            }
            peaks
        });
        Self { stop, handle }
    }

    /// Stops and returns each process's peak (KiB), in the order given.
    pub(crate) async fn finish(self) -> Vec<u64> {
        let _ = self.stop.send(true);
        self.handle.await.unwrap_or_default()
    }
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`, 100 on every common
/// Linux).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The machine's CPU ticks since boot, all cores: (all, idle, waiting for I/O).
fn machine_ticks() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let v: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() >= 5).then(|| (v.iter().sum(), v[3], v[4]))
}

/// A process's CPU ticks so far (user + system).
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The parent of a process.
pub(crate) fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// CPU ticks so far of `root` and each of its direct children (a database server and its
/// backends), by pid.
fn tree_ticks(root: u32) -> std::collections::HashMap<u32, u64> {
    let mut out = std::collections::HashMap::new();
    if let Some(t) = process_ticks(root) {
        out.insert(root, t);
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if parent_pid(pid) == Some(root) {
            if let Some(t) = process_ticks(pid) {
                out.insert(pid, t);
            }
        }
    }
    out
}

/// Where the CPU time of a stretch of load went.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuUsage {
    /// Share of all cores' time spent running (user, system, interrupts), 0..=1.
    pub(crate) busy: f64,
    /// Share of all cores' time idle while waiting for I/O, 0..=1.
    pub(crate) iowait: f64,
    /// CPU seconds each watched process used, in the order given.
    pub(crate) process_secs: Vec<f64>,
    /// Share of all cores' time the watched processes used together, 0..=1.
    pub(crate) watched: f64,
    /// CPU seconds the watched process tree (the database server) used, if one is watched.
    pub(crate) tree_secs: Option<f64>,
    /// Share of all cores' time the watched process tree used, 0..=1.
    pub(crate) tree: f64,
}

/// Counts CPU time from `start` to `finish`.
pub(crate) struct CpuWindow {
    pids: Vec<u32>,
    machine: Option<(u64, u64, u64)>,
    processes: Vec<Option<u64>>,
    tree: Option<(u32, std::collections::HashMap<u32, u64>)>,
    started: Instant,
}

impl CpuWindow {
    /// Starts counting the machine's CPU time and that of `pids`.
    pub(crate) fn start(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            machine: machine_ticks(),
            processes: pids.iter().map(|p| process_ticks(*p)).collect(),
            tree: None,
            started: Instant::now(),
        }
    }

    /// Also counts `root` and its direct children (processes started meanwhile count
    /// whole; those that ended meanwhile are lost).
    pub(crate) fn with_tree(mut self, root: Option<u32>) -> Self {
        self.tree = root.map(|r| (r, tree_ticks(r)));
        self
    }

    /// What was used since `start`.
    pub(crate) fn finish(&self) -> CpuUsage {
        let mut usage = CpuUsage::default();
        if let (Some((t0, i0, w0)), Some((t1, i1, w1))) = (self.machine, machine_ticks()) {
            let all = t1.saturating_sub(t0).max(1) as f64;
            let idle = i1.saturating_sub(i0) as f64;
            let wait = w1.saturating_sub(w0) as f64;
            usage.busy = ((all - idle - wait) / all).clamp(0.0, 1.0);
            usage.iowait = (wait / all).clamp(0.0, 1.0);
        }
        usage.process_secs = self
            .pids
            .iter()
            .zip(&self.processes)
            .map(|(pid, start)| match (start, process_ticks(*pid)) {
                (Some(a), Some(b)) => b.saturating_sub(*a) as f64 / clock_ticks(),
                _ => 0.0,
            })
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = self.started.elapsed().as_secs_f64().max(1e-3);
        usage.watched = (usage.process_secs.iter().sum::<f64>() / (wall * cores)).clamp(0.0, 1.0);
        if let Some((root, start)) = &self.tree {
            let ticks: u64 = tree_ticks(*root)
                .iter()
                .map(|(pid, now)| now.saturating_sub(start.get(pid).copied().unwrap_or(0)))
                .sum();
            let secs = ticks as f64 / clock_ticks();
            usage.tree_secs = Some(secs);
            usage.tree = (secs / (wall * cores)).clamp(0.0, 1.0);
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fixed_count_makes_every_call_once() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let r = fixed_count(4, 50, move |i| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(i);
                if i == 7 {
                    Err("seven".to_string())
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!((r.ok, r.errors), (49, 1));
        assert_eq!(r.first_error.as_deref(), Some("seven"));
        let mut v = seen.lock().unwrap().clone();
        v.sort_unstable();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn own_rss_and_cpu_are_readable() {
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
        let w = CpuWindow::start(&[std::process::id()]);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let u = w.finish();
        assert!((0.0..=1.0).contains(&u.busy) && (0.0..=1.0).contains(&u.iowait));
        assert_eq!(u.process_secs.len(), 1);
        assert!(u.process_secs[0] >= 0.0);
    }
}
