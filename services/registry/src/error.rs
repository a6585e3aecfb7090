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

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that went away while a Submit was stored answers UNAVAILABLE, so that the
    /// caller retries with its idempotency key, not INTERNAL.
    #[test]
    fn a_store_outage_during_intake_is_unavailable() {
        for cause in [
            anyhow::Error::from(sqlx::Error::PoolTimedOut),
            anyhow::Error::from(sqlx::Error::PoolTimedOut).context("storing"),
        ] {
            let e = crate::intake::IntakeError::store(1, cause);
            let status = tonic::Status::from(ApiError::from(e));
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
        // Anything else stays an internal error.
        let e = crate::intake::IntakeError::store(1, anyhow::anyhow!("a bug"));
        let status = tonic::Status::from(ApiError::from(e));
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }
}
