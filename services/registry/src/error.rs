//! The registry's error type. Statuses are made from it in one place for every service,
//! [`dsrelay_runtime::grpc::error`].

use dsrelay_runtime::grpc::{self, ServiceName};

/// Names the registry in its answers.
#[derive(Debug)]
pub enum Registry {}

impl ServiceName for Registry {
    const NAME: &'static str = "registry";
}

/// What can go wrong in a registry call.
pub(crate) type ApiError = grpc::ApiError<Registry>;

impl From<crate::intake::IntakeError> for ApiError {
    fn from(e: crate::intake::IntakeError) -> Self {
        match e {
            crate::intake::IntakeError::Stopped => Self::unavailable(e.to_string()),
            // The store's own error stays in the chain, so an outage still answers UNAVAILABLE.
            crate::intake::IntakeError::Store { .. } => Self::unexpected(e),
        }
    }
}
