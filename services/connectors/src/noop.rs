//! A connector that holds nothing and confirms every task after a fixed delay: for benchmarks
//! that measure the relay itself, and for tests that need a task to stay in progress.

use std::time::Duration;

use dsrelay_proto::v1::RequestKind;
use serde::{Deserialize, Serialize};

use crate::{BoxFuture, Connector, ConnectorError, Outcome, Task};

/// Settings of the no-op connector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopConfig {
    /// How long each task takes (ms), standing in for a subprocessor's latency.
    #[serde(default)]
    pub delay_ms: u64,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct NoopConnector {
    delay: Duration,
}

impl NoopConnector {
    /// A connector that waits `config.delay_ms` per task.
    pub(crate) fn new(config: &NoopConfig) -> Self {
        Self {
            delay: Duration::from_millis(config.delay_ms),
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

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            // Holding nothing, it writes no export files either.
            Ok(Outcome::Completed {
                records_affected: 0,
                note: "noop connector: nothing held".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }
}
