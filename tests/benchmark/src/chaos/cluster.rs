//! The processes under test (registry, processor and, on PostgreSQL, the database server)
//! and the killer that SIGKILLs them at random moments and starts them again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dsrelay_runtime::pki::{dev_identity, DevPki};

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

/// The processes under test and how to reach them.
pub(super) struct Cluster {
    pub(super) registry: Service,
    pub(super) processor: Service,
    pub(super) database: Option<PgServer>,
    pub(super) pki: DevPki,
    pub(super) registry_port: u16,
    pub(super) processor_port: u16,
}

impl Cluster {
    pub(super) fn targets(&self) -> Vec<Target> {
        let mut t = vec![Target::Registry, Target::Processor];
        if self.database.is_some() {
            t.push(Target::Database);
        }
        t
    }

    async fn sigkill(&mut self, target: Target) {
        match target {
            Target::Registry => self.registry.sigkill().await,
            Target::Processor => self.processor.sigkill().await,
            Target::Database => {
                if let Some(db) = &mut self.database {
                    db.sigkill().await;
                }
            }
        }
    }

    fn has_exited(&mut self, target: Target) -> bool {
        match target {
            Target::Registry => self.registry.has_exited(),
            Target::Processor => self.processor.has_exited(),
            Target::Database => self.database.as_mut().is_some_and(PgServer::has_exited),
        }
    }

    /// Starts `target` again and waits until it serves, trying again (up to 20 times) when
    /// it exits while starting, as a service does when its database is down.
    async fn bring_up(&mut self, target: Target, kills: &mut Kills) -> Result<()> {
        let mut last = None;
        for _ in 0..20 {
            let r = match target {
                Target::Database => match &mut self.database {
                    Some(db) => db.restart().await,
                    None => Ok(()),
                },
                Target::Registry => {
                    let health = channel(
                        &self.pki,
                        "operator",
                        self.registry_port,
                        Some(dev_identity("registry", "controller")),
                    )?;
                    match self.registry.restart().await {
                        Ok(()) => self.registry.wait_serving(health).await,
                        Err(e) => Err(e),
                    }
                }
                Target::Processor => {
                    let health = channel(&self.pki, "processor", self.processor_port, None)?;
                    match self.processor.restart().await {
                        Ok(()) => self.processor.wait_serving(health).await,
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) => {
                    progress(format!(
                        "chaos: the {} did not start, trying again: {e:#}",
                        target.name()
                    ));
                    kills.failed_starts += 1;
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
            .context(format!("the {} did not start again", target.name())))
    }

    /// Starts again whatever exited on its own, the database first (the services need it).
    async fn supervise(&mut self, kills: &mut Kills) -> Result<()> {
        for target in [Target::Database, Target::Registry, Target::Processor] {
            if self.has_exited(target) && self.targets().contains(&target) {
                *kills.own_exits.entry(target).or_default() += 1;
                progress(format!("chaos: the {} exited on its own", target.name()));
                self.bring_up(target, kills).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn stop(self) {
        self.registry.kill().await;
        self.processor.kill().await;
        if let Some(mut db) = self.database {
            db.sigkill().await;
        }
    }

    pub(super) fn log_tails(&self) -> String {
        let mut s = format!(
            "\n--- registry log (end) ---\n{}\n--- processor log (end) ---\n{}",
            self.registry.log_tail(),
            self.processor.log_tail()
        );
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
                let pause = Duration::from_millis(rng.u64(100..=args.max_pause_ms.max(100)));
                cluster.sigkill(target).await;
                *kills.by_target.entry(target).or_default() += 1;
                let n = done.load(Ordering::SeqCst) + 1;
                progress(format!(
                    "chaos: kill {n}: SIGKILL the {}, restart in {} ms",
                    target.name(),
                    pause.as_millis()
                ));
                tokio::time::sleep(pause).await;
                cluster.bring_up(target, &mut kills).await?;
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
