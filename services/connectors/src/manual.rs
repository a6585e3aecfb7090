//! A connector for holders without an API (paper archives, a legacy system someone must
//! open by hand): the task waits for an operator, who confirms it with evidence or refuses
//! it through the processor's operator API (`dsrctl tasks`).

use dsrelay_proto::v1::RequestKind;
use serde::{Deserialize, Serialize};

use crate::{kind_label, BoxFuture, Connector, ConnectorError, Outcome, Task};

/// Settings of the manual connector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualConfig {
    /// What the operator should do, shown with each task (e.g. "customer folders are in
    /// cabinet B2, sorted by customer number; shred and note the folder ids").
    #[serde(default)]
    pub instructions: String,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct ManualConnector {
    instructions: String,
}

impl ManualConnector {
    /// A connector handing every task to an operator.
    pub(crate) fn new(config: &ManualConfig) -> Self {
        Self {
            instructions: config.instructions.clone(),
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
}
