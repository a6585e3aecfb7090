//! The processes under test (the registry's and the processor's replicas and, on PostgreSQL,
//! the database server) and the killer that SIGKILLs them, one at a time, at random moments
//! and starts them again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dsrelay_runtime::pki::{dev_identity, DevPki};

use super::balancer::Balancer;
use super::postgres::PgServer;
use super::ChaosArgs;
use crate::progress;
use crate::service::{channel, Service};

/// What can be killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Target {
    Registry,
    Processor,
    Database,
}

impl Target {
    pub(super) fn name(self) -> &'static str {
        match self {
            Target::Registry => "registry",
            Target::Processor => "processor",
            Target::Database => "database",
        }
    }
}

/// What the killer did.
#[derive(Debug, Default)]
pub(super) struct Kills {
    /// SIGKILLs per target.
    pub(super) by_target: HashMap<Target, u32>,
    /// Exits nobody asked for, per target (each was started again).
    pub(super) own_exits: HashMap<Target, u32>,
    /// Starts that failed and were tried again (e.g. a service started while the database
    /// was down).
    pub(super) failed_starts: u32,
}

/// One replica of a service: its process and the port it serves on.
pub(super) struct Replica {
    pub(super) service: Service,
    pub(super) port: u16,
}

/// The processes under test and how to reach them.
pub(super) struct Cluster {
    /// The registry's replicas (one unless the run is replicated).
    pub(super) registries: Vec<Replica>,
    /// The processor's replicas.
    pub(super) processors: Vec<Replica>,
    pub(super) database: Option<PgServer>,
    pub(super) pki: DevPki,
    /// The load balancers in front of replicated services, kept for as long as the cluster
    /// runs.
    pub(super) balancers: Vec<(Target, Balancer)>,
}

impl Cluster {
    pub(super) fn targets(&self) -> Vec<Target> {
        let mut t = vec![Target::Registry, Target::Processor];
        if self.database.is_some() {
            t.push(Target::Database);
        }
        t
    }

    /// How many replicas `target` has (the database: one).
    pub(super) fn replicas(&self, target: Target) -> usize {
        match target {
            Target::Registry => self.registries.len(),
            Target::Processor => self.processors.len(),
            Target::Database => 1,
        }
    }

    fn replica(&mut self, target: Target, i: usize) -> Option<&mut Replica> {
        match target {
            Target::Registry => self.registries.get_mut(i),
            Target::Processor => self.processors.get_mut(i),
            Target::Database => None,
        }
    }

    /// `target`'s replica `i` by name, for the progress lines.
    fn replica_name(&self, target: Target, i: usize) -> String {
        if self.replicas(target) > 1 {
            format!("{} {i}", target.name())
        } else {
            target.name().to_string()
        }
    }

    async fn sigkill(&mut self, target: Target, i: usize) {
        match target {
            Target::Database => {
                if let Some(db) = &mut self.database {
                    db.sigkill().await;
                }
            }
            _ => {
                if let Some(r) = self.replica(target, i) {
                    r.service.sigkill().await;
                }
            }
        }
    }

    fn has_exited(&mut self, target: Target, i: usize) -> bool {
        match target {
            Target::Database => self.database.as_mut().is_some_and(PgServer::has_exited),
            _ => self
                .replica(target, i)
                .is_some_and(|r| r.service.has_exited()),
        }
    }

    /// Starts `target`'s replica `i` again and waits until it serves, trying again (up to 20
    /// times) when it exits while starting, as a service does when its database is down.
    async fn bring_up(&mut self, target: Target, i: usize, kills: &mut Kills) -> Result<()> {
        let mut last = None;
        for _ in 0..20 {
            let r = match target {
                Target::Database => match &mut self.database {
                    Some(db) => db.restart().await,
                    None => Ok(()),
                },
                Target::Registry | Target::Processor => {
                    let (stem, expected) = match target {
                        Target::Registry => {
                            ("operator", Some(dev_identity("registry", "controller")))
                        }
                        _ => ("processor", None),
                    };
                    let pki = self.pki.clone();
                    match self.replica(target, i) {
                        Some(r) => {
                            // Its own port, not the balancer's: this replica must serve.
                            let health = channel(&pki, stem, r.port, expected)?;
                            match r.service.restart().await {
                                Ok(()) => r.service.wait_serving(health).await,
                                Err(e) => Err(e),
                            }
                        }
                        None => Ok(()),
                    }
                }
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) => {
                    progress(format!(
                        "chaos: the {} did not start, trying again: {e:#}",
                        self.replica_name(target, i)
                    ));
                    kills.failed_starts += 1;
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context(format!(
                "the {} did not start again",
                self.replica_name(target, i)
            )))
    }

    /// Starts again whatever exited on its own, the database first (the services need it).
    async fn supervise(&mut self, kills: &mut Kills) -> Result<()> {
        for target in [Target::Database, Target::Registry, Target::Processor] {
            if !self.targets().contains(&target) {
                continue;
            }
            for i in 0..self.replicas(target) {
                if self.has_exited(target, i) {
                    *kills.own_exits.entry(target).or_default() += 1;
                    progress(format!(
                        "chaos: the {} exited on its own",
                        self.replica_name(target, i)
                    ));
                    self.bring_up(target, i, kills).await?;
                }
            }
        }
        Ok(())
    }

    pub(super) async fn stop(self) {
        for r in self.registries.into_iter().chain(self.processors) {
            r.service.kill().await;
        }
        if let Some(mut db) = self.database {
            db.sigkill().await;
        }
    }

    /// Connections each balancer handed to each replica, one line per balancer.
    pub(super) fn balanced(&self) -> Vec<String> {
        self.balancers
            .iter()
            .map(|(target, b)| {
                let handed = b
                    .handed()
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("{} {i} {n}", target.name()))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "connections through the {} balancer: {handed}",
                    target.name()
                )
            })
            .collect()
    }

    pub(super) fn log_tails(&self) -> String {
        let mut s = String::new();
        for (target, replicas) in [
            (Target::Registry, &self.registries),
            (Target::Processor, &self.processors),
        ] {
            for (i, r) in replicas.iter().enumerate() {
                s.push_str(&format!(
                    "\n--- {} log (end) ---\n{}",
                    self.replica_name(target, i),
                    r.service.log_tail()
                ));
            }
        }
        if let Some(db) = &self.database {
            s.push_str(&format!("\n--- postgres log (end) ---\n{}", db.log_tail()));
        }
        s
    }
}

/// Kills a random target `kills` times at random moments, starting each again after a
/// short random pause, and starts again anything that exits on its own, until `stop`.
pub(super) async fn killer(
    mut cluster: Cluster,
    args: ChaosArgs,
    seed: u64,
    done: Arc<AtomicU32>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Cluster, Kills)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = Kills::default();
    let gap = |rng: &mut fastrand::Rng| {
        let mean = args.kill_gap_ms.max(4);
        Duration::from_millis(rng.u64(mean / 4..=mean * 7 / 4))
    };
    let mut next_kill = Instant::now() + gap(&mut rng);
    loop {
        if *stop.borrow() {
            return Ok((cluster, kills));
        }
        let result = async {
            cluster.supervise(&mut kills).await?;
            if done.load(Ordering::SeqCst) < args.kills && Instant::now() >= next_kill {
                let targets: Vec<Target> = cluster
                    .targets()
                    .into_iter()
                    .filter(|t| {
                        args.targets.is_empty() || args.targets.iter().any(|n| n == t.name())
                    })
                    .collect();
                if targets.is_empty() {
                    bail!("none of --targets can be killed in this run");
                }
                let target = targets[rng.usize(..targets.len())];
                // One replica at a time, started again before the next kill: never all of a
                // replicated service at once.
                let i = rng.usize(..cluster.replicas(target));
                let pause = Duration::from_millis(rng.u64(100..=args.max_pause_ms.max(100)));
                cluster.sigkill(target, i).await;
                *kills.by_target.entry(target).or_default() += 1;
                let n = done.load(Ordering::SeqCst) + 1;
                progress(format!(
                    "chaos: kill {n}: SIGKILL the {}, restart in {} ms",
                    cluster.replica_name(target, i),
                    pause.as_millis()
                ));
                tokio::time::sleep(pause).await;
                cluster.bring_up(target, i, &mut kills).await?;
                done.store(n, Ordering::SeqCst);
                next_kill = Instant::now() + gap(&mut rng);
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            let tails = cluster.log_tails();
            cluster.stop().await;
            return Err(e.context(tails));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => {}
        }
    }
}
