//! Presenting call failures.

use std::error::Error as _;
use std::sync::Arc;

use tonic::{Code, Status};

/// The canonical gRPC name of a status code, as other gRPC tools print it (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// True when the status was made on our side because no connection to the server could be
/// established or kept (refused, TLS handshake failed, unexpected server identity), rather
/// than sent by the server.
///
/// tonic reports both as a `Status`; only the local kind carries the transport or I/O error
/// as its source, which is what this looks for.
pub fn is_connection_error(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<tonic::transport::Error>() || err.is::<std::io::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Why this client stopped on answers that cannot be right; the source of the status that
/// says so.
#[derive(Debug)]
struct BadAnswer;

impl std::fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server's answers cannot be right")
    }
}

impl std::error::Error for BadAnswer {}

/// A status made here, not sent by the server, for answers that cannot be right (a listing
/// handing back a page token it already followed, a package stream out of order): INTERNAL
/// with `message`, which [`is_bad_answer`] recognises.
pub(crate) fn bad_answer(message: impl Into<String>) -> Status {
    let mut status = Status::internal(message);
    status.set_source(Arc::new(BadAnswer));
    status
}

/// True when the status was made on our side because the server's answers cannot be right
/// (a listing handing back a page token it already followed, a package stream out of
/// order), rather than sent by the server: its code, INTERNAL, is then not the server's.
pub fn is_bad_answer(status: &Status) -> bool {
    status.source().is_some_and(|err| err.is::<BadAnswer>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_canonical() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
        assert_eq!(code_name(Code::from_i32(14)), "UNAVAILABLE");
    }

    #[test]
    fn a_server_status_is_not_a_connection_error() {
        assert!(!is_connection_error(&Status::not_found("no such request")));
        assert!(!is_connection_error(&Status::unavailable("draining")));
    }

    #[test]
    fn a_bad_answer_is_told_from_the_server_s_internal() {
        let made_here = bad_answer("page token \"A\" again");
        assert!(is_bad_answer(&made_here));
        assert!(is_bad_answer(&made_here.clone()));
        assert!(!is_connection_error(&made_here));
        assert_eq!(made_here.message(), "page token \"A\" again");
        assert!(!is_bad_answer(&Status::internal("page token \"A\" again")));
    }
}
