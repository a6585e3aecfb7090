//! Connectors: the code that carries out a data-subject request at one holder of the data (a
//! subprocessor's database or service) and reports what it did.
//!
//! A connector answers with an [`Outcome`] or a [`ConnectorError`]; the processor turns the
//! first into COMPLETED or NOT_FOUND and uses the error's kind to decide between retrying
//! with backoff and failing the task for an operator.
//!
//! # Layout
//! - [`sql`]: erasure in accounting/ERP databases (SQLite, PostgreSQL) by declarative table rules.

pub mod sql;

/// Why a connector could not finish, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectorError {
    /// A condition that passes by itself (connection refused, database locked, timeout):
    /// the caller retries with backoff.
    #[error("{0}")]
    Transient(String),
    /// A condition that will not fix itself (bad configuration, SQL errors, identities the
    /// connector cannot use): retrying is pointless, an operator must act.
    #[error("{0}")]
    Permanent(String),
}

impl ConnectorError {
    /// True when retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}

/// What a connector did for one request at one holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// How many records (rows, members, files) were erased, anonymized or changed.
    pub records_affected: i64,
    /// A human-readable account of the work, safe to store and show: it never contains the
    /// subject's identity values.
    pub note: String,
    /// False when the holder has no data on the subject; the processor then answers NOT_FOUND.
    pub found: bool,
}
