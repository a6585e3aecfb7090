//! A connector for holders without an API (paper archives, a legacy system someone must
//! open by hand): the task waits for an operator, who confirms it with evidence or refuses
//! it through the processor's operator API (`dsrctl tasks`). A contract end's bulk step waits
//! for an operator the same way, with instructions naming the controller. It counts nothing,
//! so the erasure that follows a return ([`crate::BulkJob::returned`]) is not checked here:
//! its instructions tell the operator to delete only what was returned.

use dsrelay_proto::v1::RequestKind;
use serde::{Deserialize, Serialize};

use crate::{kind_label, BoxFuture, BulkJob, BulkOp, Connector, ConnectorError, Outcome, Task};

/// Settings of the manual connector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualConfig {
    /// What the operator should do, shown with each task (e.g. "customer folders are in
    /// cabinet B2, sorted by customer number; shred and note the folder ids").
    #[serde(default)]
    pub instructions: String,
    /// The controllers whose data the operator handles here, when the processor serves
    /// several; each task and contract end tells the operator its controller. Absent:
    /// unscoped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<String>>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct ManualConnector {
    instructions: String,
    controllers: Option<Vec<String>>,
}

impl ManualConnector {
    /// A connector handing every task to an operator.
    pub(crate) fn new(config: &ManualConfig) -> Self {
        Self {
            instructions: config.instructions.clone(),
            controllers: config.controllers.clone(),
        }
    }
}

impl Connector for ManualConnector {
    fn kind_name(&self) -> &'static str {
        "manual"
    }

    fn supports(&self, kind: RequestKind) -> bool {
        kind != RequestKind::Unspecified
    }

    fn scoped_controllers(&self) -> Option<Vec<String>> {
        self.controllers.clone()
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let what = kind_label(task.kind).to_lowercase().replace('_', " ");
            let note = if self.instructions.is_empty() {
                format!("{what}: waiting for an operator to do it by hand and confirm")
            } else {
                format!("{what}: {}", self.instructions)
            };
            Ok(Outcome::WaitingForOperator { note })
        })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let what = match job.op {
                BulkOp::Export => format!(
                    "contract end: return ALL of controller {}'s data held here to the \
                     controller, then confirm; it is deleted only after the controller \
                     confirms receipt",
                    job.controller
                ),
                BulkOp::Erase => format!(
                    "contract end: delete ALL of controller {}'s data held here (keep only \
                     what a legal obligation requires), then confirm with what was deleted",
                    job.controller
                ),
            };
            // No count to check here: the person who deletes is told what to check.
            let what = match (job.op, &job.returned) {
                (BulkOp::Erase, Some(_)) => format!(
                    "{what}. It was returned first: delete only what was returned; if data \
                     came here after the return, delete nothing and refuse the task saying \
                     so, and the controller can end the contract again to have it returned"
                ),
                _ => what,
            };
            let note = if self.instructions.is_empty() {
                what
            } else {
                format!("{what}; {}", self.instructions)
            };
            Ok(Outcome::WaitingForOperator { note })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Phase, ProgressReporter};

    fn job(op: BulkOp) -> BulkJob {
        BulkJob {
            job_id: "acme/r-1/archive".into(),
            request_id: "r-1".into(),
            controller: "acme".into(),
            op,
            phase: Phase::Start,
            due_at_ms: 0,
            now_ms: 0,
            interrupted: false,
            recorded_progress: Default::default(),
            export: None,
            progress: ProgressReporter::new().0,
            returned: None,
            returned_since_ms: None,
        }
    }

    #[tokio::test]
    async fn a_contract_end_waits_for_an_operator_told_whose_data_and_what_to_do() {
        let c = ManualConnector::new(&ManualConfig {
            controllers: None,
            instructions: "cabinet B2".into(),
        });
        for (op, verb) in [
            (BulkOp::Erase, "delete ALL"),
            (BulkOp::Export, "return ALL"),
        ] {
            match c.run_bulk(&job(op)).await.unwrap() {
                Outcome::WaitingForOperator { note } => {
                    assert!(note.contains(verb), "{note}");
                    assert!(note.contains("controller acme"), "{note}");
                    assert!(note.ends_with("; cabinet B2"), "{note}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_erasure_after_a_return_tells_the_operator_to_delete_only_what_was_returned() {
        let c = ManualConnector::new(&ManualConfig::default());
        let after_return = BulkJob {
            returned: Some(Default::default()),
            ..job(BulkOp::Erase)
        };
        for (job, told) in [(after_return, true), (job(BulkOp::Erase), false)] {
            match c.run_bulk(&job).await.unwrap() {
                Outcome::WaitingForOperator { note } => assert_eq!(
                    note.contains("delete only what was returned"),
                    told,
                    "{note}"
                ),
                other => panic!("{other:?}"),
            }
        }
    }
}
