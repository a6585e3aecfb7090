//! A connector that holds nothing and answers every task after a fixed delay: for benchmarks
//! that measure the relay itself, for tests that need a task to stay in progress, and as a
//! stand-in for a holder a setup does not have.
//!
//! What it answers is [`NoopConfig::answer`]. By default COMPLETED, with nothing counted,
//! which keeps a benchmark measuring the relay; but COMPLETED says the holder did the work, and
//! the processor signs a deletion certificate for a COMPLETED erasure, so a stand-in that
//! someone other than the benchmark's author reads answers [`NoopAnswer::NotFound`]: it holds
//! no data of the subject, which is true of it. A contract end's bulk step answers likewise
//! (COMPLETED with nothing counted, or NOT_FOUND: no data of the controller, which the
//! processor ends NOT_FOUND with no deletion certificate). Holding nothing,
//! it has nothing that could arrive after a return, so the erasure that follows one is not
//! checked ([`crate::BulkJob::returned`]).

use std::time::Duration;

use dsrelay_proto::v1::RequestKind;
use serde::{Deserialize, Serialize};

use crate::{BoxFuture, BulkJob, BulkProgress, Connector, ConnectorError, Outcome, Task};

/// What the no-op connector answers every task and every contract end's bulk step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoopAnswer {
    /// COMPLETED, with no records: for benchmarks and tests of the relay. It claims work done
    /// that no system did (an erasure gets a signed deletion certificate), so it is not for a
    /// setup whose outcomes anyone takes for a holder's.
    #[default]
    Completed,
    /// NOT_FOUND: "holds no data of the subject", what a stand-in that holds nothing can
    /// truly say. The processor then ends the task NOT_FOUND, whatever its kind: an erasure
    /// gets no deletion certificate, a return of data or a transfer has no export (the
    /// package gets no part from it, the recipient nothing), a rectification, restriction or
    /// objection has nothing to change. A contract end's bulk step answers NOT_FOUND too (no
    /// data of the controller): its export step delivers an empty part of the return, and its
    /// erasure step ends the task NOT_FOUND with no deletion certificate, so that nothing
    /// signed states a deletion no system made.
    NotFound,
}

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
    /// What it answers (`"completed"`, the default, or `"not_found"`); see [`NoopAnswer`].
    #[serde(default)]
    pub answer: NoopAnswer,
}

impl NoopConfig {
    /// Every problem with the configuration; empty when usable. `delay_ms` stands in for a
    /// holder's latency, so it is held to what a call may take.
    pub fn validate(&self) -> Vec<String> {
        let mut out = Vec::new();
        dsrelay_runtime::config::check_ms(
            &mut out,
            "delay_ms",
            self.delay_ms,
            0..=dsrelay_runtime::config::MAX_CALL_TIMEOUT_MS,
        );
        out
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct NoopConnector {
    delay: Duration,
    controllers: Option<Vec<String>>,
    answer: NoopAnswer,
}

impl NoopConnector {
    /// A connector that waits `config.delay_ms` per task, then answers `config.answer`.
    pub(crate) fn new(config: &NoopConfig) -> Self {
        Self {
            delay: Duration::from_millis(config.delay_ms),
            controllers: config.controllers.clone(),
            answer: config.answer,
        }
    }

    /// The configured answer; `whose` (the subject, a controller) is what its note says
    /// it holds nothing of.
    fn answer(&self, whose: &str) -> Outcome {
        match self.answer {
            // Holding nothing, it writes no export files either.
            NoopAnswer::Completed => Outcome::Completed {
                records_affected: 0,
                note: format!("noop connector: nothing held of {whose}"),
                files: Vec::new(),
                erased: Vec::new(),
            },
            NoopAnswer::NotFound => Outcome::NotFound {
                note: format!(
                    "noop connector, a stand-in that reaches no system: holds no data of {whose}"
                ),
            },
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
            Ok(self.answer("the subject"))
        })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            // Counted first, as a connector holding data would: nothing, of nothing.
            job.progress.report(BulkProgress::default());
            self.wait().await;
            Ok(self.answer(&format!("controller {}", job.controller)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BulkOp, Phase, ProgressReporter};

    /// A task of `kind` for the stand-in.
    fn task(kind: RequestKind) -> Task {
        Task {
            task_id: "acme/r-1/mail".into(),
            request_id: "r-1".into(),
            controller: "acme".into(),
            kind,
            identities: Vec::new(),
            categories: Vec::new(),
            parameters: Default::default(),
            due_at_ms: 0,
            now_ms: 0,
            export: None,
            phase: Phase::Start,
            interrupted: false,
        }
    }

    fn job(op: BulkOp) -> (BulkJob, tokio::sync::watch::Receiver<BulkProgress>) {
        let (progress, seen) = ProgressReporter::new();
        let job = BulkJob {
            job_id: "acme/r-1/mail".into(),
            request_id: "r-1".into(),
            controller: "acme".into(),
            op,
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
        (job, seen)
    }

    /// With no delay, the answer is there at the first poll: a `sleep(0)` would wait for the
    /// timer's next tick (up to a millisecond), which a benchmark would count as the relay's.
    #[tokio::test]
    async fn no_delay_answers_at_the_first_poll() {
        use futures::FutureExt;
        let task = task(RequestKind::Erasure);
        let c = NoopConnector::new(&NoopConfig::default());
        match c.run(&task).now_or_never() {
            Some(Ok(Outcome::Completed { note, .. })) => assert!(note.contains("nothing held")),
            other => panic!("{other:?}"),
        }
        // A delay still waits.
        let slow = NoopConnector::new(&NoopConfig {
            delay_ms: 50,
            ..Default::default()
        });
        assert!(slow.run(&task).now_or_never().is_none());
    }

    #[tokio::test]
    async fn a_contract_end_confirms_with_nothing_counted() {
        let (job, seen) = job(BulkOp::Erase);
        let c = NoopConnector::new(&NoopConfig {
            delay_ms: 1,
            controllers: Some(vec!["acme".into()]),
            ..Default::default()
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

    /// A stand-in set to `answer = "not_found"` says, for every kind and both bulk steps,
    /// that it holds no data: never COMPLETED, which would claim work no system did.
    #[tokio::test]
    async fn a_stand_in_answers_not_found_for_every_kind() {
        let config: NoopConfig =
            toml::from_str("answer = \"not_found\"\ncontrollers = [\"acme\"]").unwrap();
        assert_eq!(config.answer, NoopAnswer::NotFound);
        let c = NoopConnector::new(&config);
        let kinds = [
            RequestKind::Erasure,
            RequestKind::ReturnOfData,
            RequestKind::Transfer,
            RequestKind::Rectification,
            RequestKind::Restriction,
            RequestKind::Objection,
        ];
        for kind in kinds {
            match c.run(&task(kind)).await.unwrap() {
                Outcome::NotFound { note } => {
                    assert!(note.contains("stand-in"), "{note}");
                    assert!(note.ends_with("holds no data of the subject"), "{note}");
                }
                other => panic!("{kind:?}: {other:?}"),
            }
        }
        for op in [BulkOp::Export, BulkOp::Erase] {
            let (job, seen) = job(op);
            match c.run_bulk(&job).await.unwrap() {
                Outcome::NotFound { note } => {
                    assert!(note.ends_with("holds no data of controller acme"), "{note}")
                }
                other => panic!("{op:?}: {other:?}"),
            }
            assert_eq!(*seen.borrow(), BulkProgress::default());
        }
    }

    /// Without `answer` it completes, as benchmarks and tests rely on; a misspelt answer is
    /// refused rather than taken for the default.
    #[test]
    fn the_answer_defaults_to_completed_and_is_checked() {
        let config: NoopConfig = toml::from_str("delay_ms = 5").unwrap();
        assert_eq!(config.answer, NoopAnswer::Completed);
        assert!(toml::from_str::<NoopConfig>("answer = \"notfound\"").is_err());
        let written = toml::to_string(&NoopConfig {
            answer: NoopAnswer::NotFound,
            ..Default::default()
        })
        .unwrap();
        assert!(written.contains("answer = \"not_found\""), "{written}");
    }

    /// A delay of u64::MAX ms was taken, and a task would have waited for ever.
    #[test]
    fn a_delay_longer_than_a_call_may_take_is_refused_naming_the_key() {
        let config = |delay_ms| NoopConfig {
            delay_ms,
            ..NoopConfig::default()
        };
        assert!(config(0).validate().is_empty());
        assert!(config(3_600_000).validate().is_empty());
        let errors = config(3_600_001).validate();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("delay_ms: must be from "),
            "{errors:?}"
        );
        assert!(errors[0].ends_with("; it is 3600001"), "{errors:?}");
        assert_eq!(config(u64::MAX).validate().len(), 1);
    }
}
