//! A service's error type and the one place where errors become gRPC statuses.
//!
//! Each service names itself once ([`ServiceName`]) and uses `ApiError<ItsName>` in its
//! handlers; `?` turns the error into a [`Status`] by the rules here:
//!
//! - broken input rules are INVALID_ARGUMENT with one `google.rpc.BadRequest` field
//!   violation per rule, at most [`MAX_REPORTED_VIOLATIONS`] of them (and one more saying
//!   how many were left out) and each text clipped;
//! - a store that cannot be reached just now (pool timeout, closed pool, lost connection,
//!   a busy SQLite file) is UNAVAILABLE, so callers retry;
//! - any other fault of ours is INTERNAL: the details go to the log, and the answer says so.

use std::fmt;
use std::marker::PhantomData;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::identity::FieldViolation;

use super::auth::Refused;

/// Names a service in the answers it gives ("internal error; the registry logged the
/// details").
pub trait ServiceName {
    /// The name, lowercase: `registry`, `processor`, `adapter`.
    const NAME: &'static str;
}

/// What went wrong, whichever service it happened in.
#[derive(Debug)]
enum Failure {
    /// The input broke documented rules; each violation names its field.
    Invalid(Vec<FieldViolation>),
    NotFound(String),
    PermissionDenied(String),
    /// Something with the same key exists and differs (an idempotency key, a task id).
    AlreadyExists(String),
    /// The state of what the call is about forbids it.
    FailedPrecondition(String),
    /// Someone else changed it meanwhile; reading again and retrying may succeed.
    Aborted(String),
    /// The service cannot take the call now (it is shutting down); a retry may succeed.
    Unavailable(String),
    /// The caller holds as much of a bounded resource as it may (streams, say); it may try
    /// again once it has released some.
    ResourceExhausted(String),
    /// Data the caller sent arrived damaged (a digest did not match); nothing was kept, and
    /// sending it again may succeed.
    DataLoss(String),
    /// A fault of ours; the details go to the log, not the caller.
    Unexpected(anyhow::Error),
}

/// An error of the service `S`, on its way to becoming a [`Status`].
pub struct ApiError<S> {
    failure: Failure,
    /// Only names the service; `fn() -> S` keeps the error `Send` and `Sync` whatever `S` is.
    service: PhantomData<fn() -> S>,
}

impl<S> ApiError<S> {
    fn new(failure: Failure) -> Self {
        Self {
            failure,
            service: PhantomData,
        }
    }

    /// The input broke `violations` (INVALID_ARGUMENT).
    pub fn invalid(violations: impl IntoIterator<Item = FieldViolation>) -> Self {
        Self::new(Failure::Invalid(violations.into_iter().collect()))
    }

    /// Ok when `violations` is empty, else [`ApiError::invalid`] with all of them.
    pub fn ensure_valid(violations: impl IntoIterator<Item = FieldViolation>) -> Result<(), Self> {
        let violations: Vec<_> = violations.into_iter().collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(Self::invalid(violations))
        }
    }

    /// NOT_FOUND, saying what was not found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Failure::NotFound(message.into()))
    }

    /// PERMISSION_DENIED, saying what the caller may not do.
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Failure::PermissionDenied(message.into()))
    }

    /// ALREADY_EXISTS, saying what exists and how to avoid the clash.
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(Failure::AlreadyExists(message.into()))
    }

    /// FAILED_PRECONDITION, saying which state forbids the call.
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(Failure::FailedPrecondition(message.into()))
    }

    /// ABORTED, saying what changed meanwhile.
    pub fn aborted(message: impl Into<String>) -> Self {
        Self::new(Failure::Aborted(message.into()))
    }

    /// UNAVAILABLE, saying why the service cannot take the call now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Failure::Unavailable(message.into()))
    }

    /// RESOURCE_EXHAUSTED, saying which limit the caller reached and how to stay under it.
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::new(Failure::ResourceExhausted(message.into()))
    }

    /// DATA_LOSS, saying what arrived damaged and that nothing of it was kept.
    pub fn data_loss(message: impl Into<String>) -> Self {
        Self::new(Failure::DataLoss(message.into()))
    }

    /// A fault of ours (INTERNAL, or UNAVAILABLE when the store is out of reach).
    pub fn unexpected(error: impl Into<anyhow::Error>) -> Self {
        Self::new(Failure::Unexpected(error.into()))
    }
}

impl<S> fmt::Debug for ApiError<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.failure, f)
    }
}

impl<S> fmt::Display for ApiError<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.failure {
            Failure::Invalid(v) => write!(f, "invalid request: {}", joined(v)),
            Failure::NotFound(m)
            | Failure::PermissionDenied(m)
            | Failure::AlreadyExists(m)
            | Failure::FailedPrecondition(m)
            | Failure::Aborted(m)
            | Failure::Unavailable(m)
            | Failure::ResourceExhausted(m)
            | Failure::DataLoss(m) => f.write_str(m),
            Failure::Unexpected(e) => write!(f, "{e:#}"),
        }
    }
}

impl<S> std::error::Error for ApiError<S> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.failure {
            Failure::Unexpected(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

impl<S> From<anyhow::Error> for ApiError<S> {
    fn from(e: anyhow::Error) -> Self {
        Self::unexpected(e)
    }
}

impl<S> From<sqlx::Error> for ApiError<S> {
    fn from(e: sqlx::Error) -> Self {
        Self::unexpected(e)
    }
}

impl<S> From<Refused> for ApiError<S> {
    fn from(r: Refused) -> Self {
        Self::permission_denied(r.to_string())
    }
}

impl<S: ServiceName> From<ApiError<S>> for Status {
    fn from(e: ApiError<S>) -> Self {
        match e.failure {
            Failure::Invalid(violations) => invalid_argument(&violations),
            Failure::NotFound(m) => Status::not_found(clip_message(m)),
            Failure::PermissionDenied(m) => Status::permission_denied(clip_message(m)),
            Failure::AlreadyExists(m) => Status::already_exists(clip_message(m)),
            Failure::FailedPrecondition(m) => Status::failed_precondition(clip_message(m)),
            Failure::Aborted(m) => Status::aborted(clip_message(m)),
            Failure::Unavailable(m) => Status::unavailable(clip_message(m)),
            Failure::ResourceExhausted(m) => Status::resource_exhausted(clip_message(m)),
            Failure::DataLoss(m) => Status::data_loss(clip_message(m)),
            Failure::Unexpected(err) if store_out_of_reach(&err) => {
                match UNAVAILABLE_LOG.take_turn(std::time::Instant::now()) {
                    Some(suppressed) => tracing::warn!(
                        error = format!("{err:#}"),
                        suppressed,
                        "store unavailable; calls answered so meanwhile are logged at DEBUG \
                         for {} s (suppressed: how many since the last such line)",
                        UNAVAILABLE_LOG_EVERY.as_secs()
                    ),
                    None => tracing::debug!(error = format!("{err:#}"), "store unavailable"),
                }
                Status::unavailable(format!(
                    "the {} could not reach its database; try again later",
                    S::NAME
                ))
            }
            Failure::Unexpected(err) => {
                tracing::error!(error = format!("{err:#}"), "internal error");
                Status::internal(format!(
                    "internal error; the {} logged the details",
                    S::NAME
                ))
            }
        }
    }
}

/// At most this many violations go into one status: the message and the details travel in
/// HTTP/2 headers, which clients cap (16 KiB in hyper), and a status too large to deliver
/// would reach the caller as a protocol error instead of INVALID_ARGUMENT.
pub const MAX_REPORTED_VIOLATIONS: usize = 20;
/// Longest field path or rule text reported.
const MAX_VIOLATION_TEXT: usize = 300;
/// The most text (fields and rules, in bytes) the reported violations carry together. It
/// goes three times: in the message (percent-encoded: up to three bytes for one), and in
/// the details, which repeat the message beside the violations (base64: four bytes for
/// three). 1.5 KiB of non-ASCII text makes about 9.5 KiB of headers, under hyper's 16 KiB;
/// 20 violations of 300-byte texts made 46 KiB.
const MAX_VIOLATIONS_TEXT: usize = 1536;

fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let mut details = ErrorDetails::new();
    for v in reported(violations) {
        details.add_bad_request_violation(v.field, v.rule);
    }
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {}", joined(violations)),
        details,
    )
}

/// Longest message of any other status. It travels in an HTTP/2 header too, percent-encoded
/// where it is not plain ASCII (up to three bytes for one), so 4 KiB stays under hyper's
/// 16 KiB however it is written.
const MAX_MESSAGE_TEXT: usize = 4096;

/// The longest start of `s` of at most `max` bytes that ends on a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `m` cut at [`MAX_MESSAGE_TEXT`] bytes, saying how much was cut.
fn clip_message(m: String) -> String {
    if m.len() <= MAX_MESSAGE_TEXT {
        return m;
    }
    let kept = head(&m, MAX_MESSAGE_TEXT);
    format!("{kept}… [{} more bytes cut]", m.len() - kept.len())
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_VIOLATION_TEXT {
        return s.to_string();
    }
    format!("{}…", head(s, MAX_VIOLATION_TEXT))
}

/// The violations to report: the first few, clipped, as many as fit
/// [`MAX_VIOLATIONS_TEXT`] (the first always), and a note of how many more there were.
fn reported(v: &[FieldViolation]) -> Vec<FieldViolation> {
    let mut out: Vec<FieldViolation> = Vec::new();
    let mut text = 0;
    for one in v.iter().take(MAX_REPORTED_VIOLATIONS) {
        let one = FieldViolation::new(clip(&one.field), clip(&one.rule));
        let size = one.field.len() + one.rule.len();
        if !out.is_empty() && text + size > MAX_VIOLATIONS_TEXT {
            break;
        }
        text += size;
        out.push(one);
    }
    if let Some(next) = v.get(out.len()) {
        out.push(FieldViolation::new(
            clip(&next.field),
            format!("and {} more violations, not listed", v.len() - out.len()),
        ));
    }
    out
}

fn joined(v: &[FieldViolation]) -> String {
    reported(v)
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// How often a WARN line says that calls were answered UNAVAILABLE for want of the database:
/// while it is down every call would write one, at the partners' rate.
const UNAVAILABLE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// When the last "store unavailable" WARN was written, and how many calls were answered so
/// since without one.
static UNAVAILABLE_LOG: LogTurn = LogTurn::new();

/// One WARN line per [`UNAVAILABLE_LOG_EVERY`], counting the calls in between.
struct LogTurn(std::sync::Mutex<(Option<std::time::Instant>, u64)>);

impl LogTurn {
    const fn new() -> Self {
        Self(std::sync::Mutex::new((None, 0)))
    }

    /// `Some(suppressed since the last line)` when a line is due at `now`; `None` (and one
    /// more suppressed) otherwise.
    fn take_turn(&self, now: std::time::Instant) -> Option<u64> {
        let mut turn = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let due = turn
            .0
            .is_none_or(|last| now.duration_since(last) >= UNAVAILABLE_LOG_EVERY);
        if due {
            let suppressed = turn.1;
            *turn = (Some(now), 0);
            Some(suppressed)
        } else {
            turn.1 += 1;
            None
        }
    }
}

/// Whether `err` comes from a store that cannot serve just now but may soon: the caller
/// should retry rather than report a fault. The sqlx error may sit anywhere in the chain of
/// contexts.
fn store_out_of_reach(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<sqlx::Error>()
            .is_some_and(sqlx_out_of_reach)
    })
}

fn sqlx_out_of_reach(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let sqlite = db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some();
            db.code().is_some_and(|code| lost_connection(&code, sqlite))
        }
        _ => false,
    }
}

/// Database error codes that mean the connection is gone or the database cannot take work
/// now: PostgreSQL's connection exceptions (class 08), shutdowns and start-ups (57P01 to
/// 57P03), too many connections (53300) and a login refused on reconnecting (class 28: a
/// role without LOGIN, a password changed during a failover, which the operator puts right
/// while the caller retries); SQLite's BUSY and LOCKED (primary codes 5 and
/// 6, whatever the extended code) once its busy timeout ran out. Which backend spoke
/// matters: a SQLSTATE such as 22021 (a NUL byte in text) or 42501 (permission denied) is a
/// number too, whose low byte may read as BUSY, and must not tell the caller to try again.
fn lost_connection(code: &str, sqlite: bool) -> bool {
    if sqlite {
        return code
            .parse::<u32>()
            .is_ok_and(|extended| matches!(extended & 0xff, 5 | 6));
    }
    code.starts_with("08")
        || code.starts_with("28")
        || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Test {}

    impl ServiceName for Test {
        const NAME: &'static str = "test service";
    }

    type Error = ApiError<Test>;

    #[test]
    fn long_messages_are_cut_to_fit_a_header() {
        // Non-ASCII text grows when percent-encoded for the header; cut on a boundary.
        let long = "ä".repeat(10_000);
        let status = Status::from(Error::failed_precondition(long.clone()));
        assert_eq!(status.code(), Code::FailedPrecondition);
        let m = status.message();
        assert!(m.len() < MAX_MESSAGE_TEXT + 40, "{}", m.len());
        assert!(m.starts_with("ää"), "{m}");
        assert!(m.ends_with("… [15904 more bytes cut]"), "{m}");
        // One that fits is left whole.
        let status = Status::from(Error::not_found("x".repeat(MAX_MESSAGE_TEXT)));
        assert_eq!(status.message().len(), MAX_MESSAGE_TEXT);
    }

    #[test]
    fn violations_are_reported_with_details_and_clipped() {
        let long = "x".repeat(1000);
        let violations: Vec<_> = (0..25)
            .map(|i| FieldViolation::new(format!("f{i}"), long.clone()))
            .collect();
        let status = Status::from(Error::invalid(violations));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("invalid request: f0: xxx"));
        let bad = status.get_details_bad_request().expect("details");
        // Five texts of about 300 bytes fit 1.5 KiB; the rest is counted.
        assert_eq!(bad.field_violations.len(), 6);
        assert!(bad.field_violations[0].description.len() < 310);
        assert_eq!(
            bad.field_violations[5].description,
            "and 20 more violations, not listed"
        );
        // Short ones go up to the count.
        let short: Vec<_> = (0..25)
            .map(|i| FieldViolation::new(format!("f{i}"), "must be set"))
            .collect();
        let bad = Status::from(Error::invalid(short))
            .get_details_bad_request()
            .expect("details");
        assert_eq!(bad.field_violations.len(), MAX_REPORTED_VIOLATIONS + 1);
        assert_eq!(
            bad.field_violations[MAX_REPORTED_VIOLATIONS].description,
            "and 5 more violations, not listed"
        );
    }

    /// The status of the most a caller can get wrong still fits hyper's 16 KiB of headers,
    /// non-ASCII text included (percent-encoded in the message, base64 in the details).
    #[test]
    fn the_largest_invalid_argument_fits_its_headers() {
        let long = "ä".repeat(1000);
        let violations: Vec<_> = (0..25)
            .map(|i| FieldViolation::new(format!("{long}{i}"), long.clone()))
            .collect();
        let status = Status::from(Error::invalid(violations));
        let mut headers = http::HeaderMap::new();
        status.add_header(&mut headers).expect("headers");
        let size: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        assert!(size < 10 * 1024, "{size} bytes of headers");
    }

    #[test]
    fn no_violations_is_valid() {
        assert!(Error::ensure_valid(Vec::new()).is_ok());
        assert!(Error::ensure_valid(Some(FieldViolation::new("a", "b"))).is_err());
    }

    #[test]
    fn an_unreachable_store_is_unavailable_however_deep() {
        let err = anyhow::Error::from(sqlx::Error::PoolTimedOut)
            .context("reading the request")
            .context("answering Get");
        let status = Status::from(Error::unexpected(err));
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("test service"), "{status:?}");

        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let status = Status::from(Error::from(sqlx::Error::Io(io)));
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    #[test]
    fn other_faults_are_internal_without_details() {
        let status = Status::from(Error::from(sqlx::Error::RowNotFound));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(
            status.message(),
            "internal error; the test service logged the details"
        );
        let status = Status::from(Error::unexpected(anyhow::anyhow!("secret detail")));
        assert!(!status.message().contains("secret"));
    }

    /// A role refused its login when the pool reconnects (NOLOGIN, a password changed during
    /// a failover) is a database the service cannot reach just now, not a fault of its own:
    /// the caller hears UNAVAILABLE and tries again.
    #[tokio::test]
    async fn a_login_refused_on_reconnecting_is_unavailable() {
        let Some(server) = crate::testing::postgres_server() else {
            return;
        };
        let admin = crate::store::Db::connect(&server).await.unwrap();
        let role = format!("refused_{:016x}", fastrand::u64(..));
        sqlx::query(&format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'"))
            .execute(&admin.pool)
            .await
            .unwrap();
        let (scheme, rest) = server.split_once("://").unwrap();
        let after = &rest[rest.rfind('@').map_or(0, |at| at + 1)..];
        let db = crate::store::Db::connect(&format!("{scheme}://{role}:pw@{after}"))
            .await
            .unwrap();
        sqlx::query(&format!("ALTER ROLE \"{role}\" NOLOGIN"))
            .execute(&admin.pool)
            .await
            .unwrap();
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
            .bind(&role)
            .execute(&admin.pool)
            .await
            .unwrap();
        // The pool may hand out the connection just terminated first: the one after it is
        // a new login.
        let mut refused = None;
        for _ in 0..5 {
            if let Err(e) = sqlx::query("SELECT 1").execute(&db.pool).await {
                let login = matches!(&e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("28")));
                if login {
                    refused = Some(e);
                    break;
                }
            }
        }
        let err = refused.expect("a login refused");
        let status = Status::from(Error::unexpected(anyhow::Error::new(err)));
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("could not reach its database"),
            "{status:?}"
        );
        db.close().await;
        sqlx::query(&format!("DROP ROLE \"{role}\""))
            .execute(&admin.pool)
            .await
            .unwrap();
        admin.close().await;
    }

    #[test]
    fn store_unavailable_is_logged_once_per_interval_counting_the_rest() {
        let turn = LogTurn::new();
        let start = std::time::Instant::now();
        assert_eq!(turn.take_turn(start), Some(0));
        assert_eq!(turn.take_turn(start), None);
        assert_eq!(turn.take_turn(start + UNAVAILABLE_LOG_EVERY / 2), None);
        assert_eq!(turn.take_turn(start + UNAVAILABLE_LOG_EVERY), Some(2));
        assert_eq!(turn.take_turn(start + UNAVAILABLE_LOG_EVERY), None);
    }

    #[test]
    fn lost_connection_codes() {
        for code in ["08006", "08003", "57P01", "53300", "28000", "28P01"] {
            assert!(lost_connection(code, false), "{code}");
        }
        for code in ["5", "517", "6", "262"] {
            assert!(lost_connection(code, true), "{code}");
        }
        // 22021 & 0xff is 5 and 42501 & 0xff is 5: PostgreSQL's, not SQLite's BUSY.
        for code in ["23505", "42P01", "22021", "42501", "5"] {
            assert!(!lost_connection(code, false), "{code}");
        }
        for code in ["19", "2067", "1", "08006", "28000"] {
            assert!(!lost_connection(code, true), "{code}");
        }
    }

    #[test]
    fn refusals_are_permission_denied() {
        let status = Status::from(Error::from(Refused::new("no")));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "no");
    }
}
