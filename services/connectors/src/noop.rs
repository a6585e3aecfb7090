//! A connector that holds nothing and confirms every task after a fixed delay: for benchmarks
//! that measure the relay itself, and for tests that need a task to stay in progress. A
//! contract end's bulk step likewise confirms after the delay, with nothing counted; holding
//! nothing, it has nothing that could arrive after a return, so the erasure that follows one
//! is not checked ([`crate::BulkJob::returned`]).

use std::time::Duration;

use dsrelay_proto::v1::RequestKind;
use serde::{Deserialize, Serialize};

use crate::{BoxFuture, BulkJob, BulkProgress, Connector, ConnectorError, Outcome, Task};

/// Settings of the no-op connector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopConfig {
    /// How long each task takes (ms), standing in for a subprocessor's latency.
    #[serde(default)]
    pub delay_ms: u64,
    /// The controllers it stands in for, when the processor serves several (it holds nothing,
    /// so nothing of one controller can reach another's; the list only says whose holder it
    /// is). Absent: unscoped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<String>>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct NoopConnector {
    delay: Duration,
    controllers: Option<Vec<String>>,
}

impl NoopConnector {
    /// A connector that waits `config.delay_ms` per task.
    pub(crate) fn new(config: &NoopConfig) -> Self {
        Self {
            delay: Duration::from_millis(config.delay_ms),
            controllers: config.controllers.clone(),
        }
    }

    /// Waits the configured delay. A zero delay does not go through the timer: tokio rounds
    /// every deadline up to its next millisecond tick, so `sleep(0)` would still take up to a
    /// millisecond, which a benchmark of the relay would count as the relay's.
    async fn wait(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

impl Connector for NoopConnector {
    fn kind_name(&self) -> &'static str {
        "noop"
    }

    fn supports(&self, kind: RequestKind) -> bool {
        kind != RequestKind::Unspecified
    }

    fn scoped_controllers(&self) -> Option<Vec<String>> {
        self.controllers.clone()
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            self.wait().await;
            // Holding nothing, it writes no export files either.
            Ok(Outcome::Completed {
                records_affected: 0,
                note: "noop connector: nothing held".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            // Counted first, as a connector holding data would: nothing, of nothing.
            job.progress.report(BulkProgress::default());
            self.wait().await;
            Ok(Outcome::Completed {
                records_affected: 0,
                note: format!(
                    "noop connector: nothing held for controller {}",
                    job.controller
                ),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BulkOp, Phase, ProgressReporter};

    /// With no delay, the answer is there at the first poll: a `sleep(0)` would wait for the
    /// timer's next tick (up to a millisecond), which a benchmark would count as the relay's.
    #[tokio::test]
    async fn no_delay_answers_at_the_first_poll() {
        use futures::FutureExt;
        let task = Task {
            task_id: "acme/r-1/mail".into(),
            request_id: "r-1".into(),
            controller: "acme".into(),
            kind: RequestKind::Erasure,
            identities: Vec::new(),
            categories: Vec::new(),
            parameters: Default::default(),
            due_at_ms: 0,
            now_ms: 0,
            export: None,
            phase: Phase::Start,
            interrupted: false,
        };
        let c = NoopConnector::new(&NoopConfig::default());
        match c.run(&task).now_or_never() {
            Some(Ok(Outcome::Completed { note, .. })) => assert!(note.contains("nothing held")),
            other => panic!("{other:?}"),
        }
        // A delay still waits.
        let slow = NoopConnector::new(&NoopConfig {
            delay_ms: 50,
            controllers: None,
        });
        assert!(slow.run(&task).now_or_never().is_none());
    }

    #[tokio::test]
    async fn a_contract_end_confirms_with_nothing_counted() {
        let (progress, seen) = ProgressReporter::new();
        let job = BulkJob {
            job_id: "acme/r-1/mail".into(),
            request_id: "r-1".into(),
            controller: "acme".into(),
            op: BulkOp::Erase,
            phase: Phase::Start,
            due_at_ms: 0,
            now_ms: 0,
            interrupted: false,
            recorded_progress: Default::default(),
            export: None,
            progress,
            returned: None,
            returned_since_ms: None,
        };
        let c = NoopConnector::new(&NoopConfig {
            delay_ms: 1,
            controllers: Some(vec!["acme".into()]),
        });
        match c.run_bulk(&job).await.unwrap() {
            Outcome::Completed {
                records_affected,
                note,
                files,
                erased,
            } => {
                assert_eq!(records_affected, 0);
                assert!(note.contains("acme"), "{note}");
                assert!(files.is_empty() && erased.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(*seen.borrow(), BulkProgress::default());
        assert_eq!(c.scoped_controllers(), Some(vec!["acme".to_string()]));
    }
}
