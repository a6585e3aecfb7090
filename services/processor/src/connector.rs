//! Runs a task through its subprocessor's connector and says what the task's next state is.

use anyhow::Result;
use dsrelay_connectors::sql::SqlConnector;
use dsrelay_connectors::ConnectorError;
use dsrelay_proto::v1::{DeliverRequest, RequestKind};

use crate::config::{ConnectorConfig, SubprocessorConfig};

/// A ready connector.
pub enum Connector {
    /// An SQL database.
    Sql(SqlConnector),
    /// Confirms after a fixed delay, holds nothing.
    Noop(std::time::Duration),
}

/// What a connector run ended in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    /// The holder confirmed the work.
    Completed {
        /// Records affected.
        records: i64,
        /// What was done, without identity values.
        note: String,
    },
    /// The holder has no data on the subject.
    NotFound {
        /// What was searched.
        note: String,
    },
    /// The connector cannot do this kind of request.
    Refused {
        /// Why.
        reason: String,
    },
}

impl Connector {
    /// Connects the subprocessor's connector.
    pub async fn build(sub: &SubprocessorConfig) -> Result<Self> {
        Ok(match &sub.connector {
            ConnectorConfig::Sql(cfg) => Self::Sql(SqlConnector::connect(cfg.clone()).await?),
            ConnectorConfig::Noop(n) => Self::Noop(std::time::Duration::from_millis(n.delay_ms)),
        })
    }

    /// Carries out `req` at this holder.
    pub async fn run(
        &self,
        subprocessor: &str,
        req: &DeliverRequest,
    ) -> Result<TaskOutcome, ConnectorError> {
        let kind = RequestKind::try_from(req.kind).unwrap_or(RequestKind::Unspecified);
        match (self, kind) {
            (Self::Noop(delay), _) => {
                tokio::time::sleep(*delay).await;
                Ok(TaskOutcome::Completed {
                    records: 0,
                    note: "noop connector: nothing held".into(),
                })
            }
            (Self::Sql(sql), RequestKind::Erasure) => {
                let out = sql.erase(&req.identities).await?;
                Ok(if out.found {
                    TaskOutcome::Completed {
                        records: out.records_affected,
                        note: out.note,
                    }
                } else {
                    TaskOutcome::NotFound { note: out.note }
                })
            }
            (Self::Sql(_), other) => Ok(TaskOutcome::Refused {
                reason: format!(
                    "subprocessor {subprocessor}: the sql connector does not support {} yet",
                    other.as_str_name().trim_start_matches("REQUEST_KIND_")
                ),
            }),
        }
    }
}
