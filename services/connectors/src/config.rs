//! The configuration of every connector, tagged by `type`, and building a connector from it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterConfig, AdapterConnector};
use crate::mailchimp::{MailchimpConfig, MailchimpConnector};
use crate::manual::{ManualConfig, ManualConnector};
use crate::noop::{NoopConfig, NoopConnector};
use crate::sql::{LazySqlConnector, SqlConnectorConfig};
use crate::Connector;

/// Which connector a subprocessor uses and how it is set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectorConfig {
    /// An SQL database (SQLite or PostgreSQL) with declarative per-table rules.
    Sql(SqlConnectorConfig),
    /// Holds nothing and confirms every task after `delay_ms`.
    Noop(NoopConfig),
    /// A person does the work and confirms it through the processor's operator API.
    Manual(ManualConfig),
    /// An external adapter reached over mutual TLS through the SubprocessorAdapter API.
    Adapter(AdapterConfig),
    /// A Mailchimp audience, reached through the Marketing API v3.
    Mailchimp(MailchimpConfig),
}

impl ConnectorConfig {
    /// Every problem with the configuration; empty when usable.
    pub fn validate(&self) -> Vec<String> {
        match self {
            Self::Sql(c) => c.validate(),
            Self::Noop(c) => c.validate(),
            Self::Manual(_) => Vec::new(),
            Self::Adapter(c) => c.validate(),
            Self::Mailchimp(c) => c.validate(),
        }
    }
}

/// Connects the connector `config` describes. A `sql` connector whose PostgreSQL database
/// cannot be reached now for a reason that may pass (refused, full, starting up) is built
/// unconnected and connects on its first task; any other problem fails the build.
pub async fn build(config: &ConnectorConfig) -> anyhow::Result<Arc<dyn Connector>> {
    Ok(match config {
        ConnectorConfig::Sql(c) => Arc::new(LazySqlConnector::start(c.clone()).await?),
        ConnectorConfig::Noop(c) => Arc::new(NoopConnector::new(c)),
        ConnectorConfig::Manual(c) => Arc::new(ManualConnector::new(c)),
        ConnectorConfig::Adapter(c) => Arc::new(AdapterConnector::connect(c)?),
        ConnectorConfig::Mailchimp(c) => Arc::new(MailchimpConnector::new(c.clone())?),
    })
}
