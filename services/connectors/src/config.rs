//! The configuration of every connector, tagged by `type`, and building a connector from it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::noop::{NoopConfig, NoopConnector};
use crate::sql::{SqlConnector, SqlConnectorConfig};
use crate::Connector;

/// Which connector a subprocessor uses and how it is set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectorConfig {
    /// An SQL database (SQLite or PostgreSQL) with declarative per-table rules.
    Sql(SqlConnectorConfig),
    /// Holds nothing and confirms every task after `delay_ms`.
    Noop(NoopConfig),
}

impl ConnectorConfig {
    /// Every problem with the configuration; empty when usable.
    pub fn validate(&self) -> Vec<String> {
        match self {
            Self::Sql(c) => c.validate(),
            Self::Noop(_) => Vec::new(),
        }
    }
}

/// Connects the connector `config` describes.
pub async fn build(config: &ConnectorConfig) -> anyhow::Result<Arc<dyn Connector>> {
    Ok(match config {
        ConnectorConfig::Sql(c) => Arc::new(SqlConnector::connect(c.clone()).await?),
        ConnectorConfig::Noop(c) => Arc::new(NoopConnector::new(c)),
    })
}
