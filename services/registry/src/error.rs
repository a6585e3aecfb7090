//! The one place where registry errors become gRPC statuses.

use dsrelay_runtime::identity::FieldViolation;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// What can go wrong in a registry call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The input broke documented rules; each violation names its field.
    #[error("invalid request: {}", join(.0))]
    Invalid(Vec<FieldViolation>),
    /// No such request (or not visible to the caller).
    #[error("request {0} not found")]
    NotFound(String),
    /// The caller's role may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The idempotency key was used before with a different body.
    #[error("{0}")]
    Conflict(String),
    /// The request's state forbids the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The registry cannot take the call now (it is shutting down); a retry may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of ours; details go to the log, not the caller.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// At most this many violations go into one status: the message and the details travel in
/// HTTP/2 headers, which clients cap (16 KiB in hyper), and a status too large to deliver
/// would reach the caller as a protocol error instead of INVALID_ARGUMENT.
pub const MAX_REPORTED_VIOLATIONS: usize = 20;
/// Longest field path or rule text reported.
const MAX_VIOLATION_TEXT: usize = 300;

fn clip(s: &str) -> String {
    if s.len() <= MAX_VIOLATION_TEXT {
        return s.to_string();
    }
    let mut end = MAX_VIOLATION_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The violations to report: the first few, clipped, and a note of how many more there were.
fn reported(v: &[FieldViolation]) -> Vec<FieldViolation> {
    let mut out: Vec<FieldViolation> = v
        .iter()
        .take(MAX_REPORTED_VIOLATIONS)
        .map(|v| FieldViolation::new(clip(&v.field), clip(&v.rule)))
        .collect();
    if let Some(next) = v.get(MAX_REPORTED_VIOLATIONS) {
        out.push(FieldViolation::new(
            clip(&next.field),
            format!(
                "and {} more violations, not listed",
                v.len() - MAX_REPORTED_VIOLATIONS
            ),
        ));
    }
    out
}

fn join(v: &[FieldViolation]) -> String {
    reported(v)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::Unexpected(e.into())
    }
}

impl From<crate::intake::IntakeError> for ApiError {
    fn from(e: crate::intake::IntakeError) -> Self {
        match e {
            crate::intake::IntakeError::Stopped => Self::Unavailable(e.to_string()),
            crate::intake::IntakeError::Store { .. } => Self::Unexpected(e.into()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Invalid(violations) => {
                let mut details = ErrorDetails::new();
                for v in &reported(&violations) {
                    details.add_bad_request_violation(v.field.clone(), v.rule.clone());
                }
                Status::with_error_details(
                    Code::InvalidArgument,
                    format!("invalid request: {}", join(&violations)),
                    details,
                )
            }
            ApiError::NotFound(_) => Status::not_found(e.to_string()),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::Conflict(m) => Status::already_exists(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Unexpected(err) => {
                tracing::error!(error = format!("{err:#}"), "internal error");
                Status::internal("internal error; the registry logged the details")
            }
        }
    }
}
