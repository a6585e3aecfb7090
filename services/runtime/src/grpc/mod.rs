//! The gRPC boundary every dsrelay service shares, so that the registry, the processor and
//! the example adapter answer alike.
//!
//! - [`error`]: a service's error type and the one mapping from errors to statuses (field
//!   violations with `google.rpc.BadRequest` details, store outages as UNAVAILABLE, faults of
//!   ours as INTERNAL with the details in the log).
//! - [`auth`]: the caller of a request, from its verified certificate identity, and the
//!   refusals when it is not configured or may not do what it asks.
//! - [`trace`]: the tower layer that continues the caller's W3C trace, installed once by
//!   [`crate::server::builder`], so handlers open their spans with plain
//!   `#[tracing::instrument]`.
//! - [`feed`]: server streams fed by a producer task that stops when its reader stalls.
//! - [`timed_out`]: on the client's side, whether its own deadline ended a call.

pub mod auth;
pub mod error;
pub mod feed;
pub mod trace;

pub use auth::{Authorizer, Caller, Refused};
pub use error::{ApiError, ServiceName};
pub use trace::{CallerTrace, TraceContextLayer};

/// Whether a call's own deadline ended it, on the client's side: tonic's
/// [`tonic::TimeoutExpired`] among the status's sources (tonic reports it as CANCELLED
/// "Timeout expired", alone or under a transport error), not a status the server sent. The
/// connection may be fine, and a call that changes something may have taken effect.
pub fn timed_out(status: &tonic::Status) -> bool {
    std::iter::successors(std::error::Error::source(status), |e| e.source())
        .any(|e| e.is::<tonic::TimeoutExpired>())
}
