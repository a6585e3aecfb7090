//! Presenting call failures.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

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
/// established or kept (refused, TLS handshake failed, unexpected server identity, or the
/// connection closed while a call was under way, as when the server is killed), rather than
/// sent by the server. False for a call that outlived its own deadline ([`timed_out`]): the
/// connection may be fine, the server just did not answer in time.
///
/// tonic reports both as a `Status`; only the local kind carries the cause as its source: the
/// transport's or an I/O error when the connection could not be made, and when it broke under
/// a call, hyper's error for the body, whose source is h2's (which keeps the I/O error to
/// itself). The statuses this crate's calls make of such failures keep those causes, so they
/// are recognised too.
pub fn is_connection_error(status: &Status) -> bool {
    if timed_out(status) {
        return false;
    }
    let mut source = status.source();
    while let Some(err) = source {
        if err.is::<tonic::transport::Error>()
            || err.is::<std::io::Error>()
            || err.is::<h2::Error>()
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// True when the call's own deadline ended it: tonic's `TimeoutExpired` (which tonic reports
/// as CANCELLED "Timeout expired"), as the status's source or under a transport error, or
/// the DEADLINE_EXCEEDED this crate's calls make of it. The connection may be fine, so
/// neither a refused certificate nor an unreachable server is the likely cause, and a call
/// that changes something may have taken effect.
pub fn timed_out(status: &Status) -> bool {
    dsrelay_runtime::grpc::timed_out(status)
}

/// True when the connection was made and then closed or broken from the other end before
/// the call had its answer: tonic's CANCELLED for a call that a closed connection never
/// sent, a write to or read from a connection the peer closed, or a TLS alert from the peer
/// about this client's certificate; and the UNAVAILABLE this crate's calls make of these.
///
/// A server that refuses a client certificate does one of these under TLS 1.3: the client
/// finishes its side of the handshake before the server has checked the certificate, so the
/// server's alert reaches it, if at all, after it began to send the call. A refused TCP
/// connection, a failed name lookup, this client's own refusal of the server's certificate,
/// a call past its deadline ([`timed_out`]) and a stream that had its answer before the
/// connection was lost (which this crate's streams end with UNAVAILABLE saying so) are not
/// matched.
pub fn closed_by_peer(status: &Status) -> bool {
    if !is_connection_error(status) {
        return false;
    }
    if let Some(explained) = explanation(status) {
        return explained.why == Why::ClosedBeforeAnswer;
    }
    if status.code() == Code::Cancelled {
        return true;
    }
    // h2 keeps only the kind and the text of the I/O error that broke its connection, and
    // hands on a new one made of them: an alert under it is known by its text.
    let io_closed = |err: &std::io::Error| {
        matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::UnexpectedEof
        ) || err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .is_some_and(is_certificate_alert)
            || (err.kind() == std::io::ErrorKind::InvalidData
                && CERTIFICATE_ALERTS.iter().any(|alert| {
                    err.to_string() == rustls::Error::AlertReceived(*alert).to_string()
                }))
    };
    let h2_closed = |err: &h2::Error| err.get_io().is_some_and(io_closed);
    let mut source = status.source();
    while let Some(err) = source {
        let closed = err.downcast_ref::<std::io::Error>().is_some_and(io_closed)
            || err.downcast_ref::<h2::Error>().is_some_and(h2_closed)
            || (err.downcast_ref::<rustls::Error>()).is_some_and(is_certificate_alert);
        if closed {
            return true;
        }
        source = err.source();
    }
    false
}

/// The alerts a peer sends about this client's certificate. DecryptError is one: a rustls
/// server sends it for a certificate whose issuer has the name of a CA it trusts but did not
/// sign it (another development CA, say).
pub const CERTIFICATE_ALERTS: [rustls::AlertDescription; 9] = [
    rustls::AlertDescription::BadCertificate,
    rustls::AlertDescription::UnsupportedCertificate,
    rustls::AlertDescription::CertificateRevoked,
    rustls::AlertDescription::CertificateExpired,
    rustls::AlertDescription::CertificateUnknown,
    rustls::AlertDescription::CertificateRequired,
    rustls::AlertDescription::UnknownCA,
    rustls::AlertDescription::AccessDenied,
    rustls::AlertDescription::DecryptError,
];

/// True for one of [`CERTIFICATE_ALERTS`] received from the peer.
pub fn is_certificate_alert(err: &rustls::Error) -> bool {
    matches!(err, rustls::Error::AlertReceived(alert) if CERTIFICATE_ALERTS.contains(alert))
}

/// What to check when [`closed_by_peer`], for a `server` ("registry", "processor") and this
/// client's `certificate` as the caller names it ("the certificate (--cert)"). The server's
/// log knows why it closed the connection, the client cannot, so the text names the likely
/// cause without claiming it.
pub fn refused_certificate_hint(server: &str, certificate: &str) -> String {
    format!(
        "the connection closed before the {server} answered, which is what a {server} that \
         refuses this client's certificate does: check that {certificate} was issued by the \
         CA the {server} trusts and is not itself a CA certificate, that today is within its \
         validity dates, that it is not on the {server}'s revocation list, and that its \
         identity is one the {server} accepts (the {server}'s log says why it closed the \
         connection)"
    )
}

/// True when the status's message is this crate's explanation of a failure tonic reported
/// with little to go on (a call past its deadline, a connection closed before the answer or
/// lost under a stream) rather than tonic's or the server's words. The status tonic made
/// follows in its source chain: the first source's text is tonic's message, then its
/// causes.
pub fn is_explained(status: &Status) -> bool {
    explanation(status).is_some()
}

/// True when a stream of this crate (a Watch, a download) ended because its connection was
/// lost after the registry answered: the status is then UNAVAILABLE and its message says how
/// to follow on with this crate's calls, which a program with its own way to follow on (a
/// command line's, say) can word instead, keeping the cause from the status's source.
pub fn is_lost_stream(status: &Status) -> bool {
    explanation(status).is_some_and(|explained| explained.why == Why::Lost)
}

/// Which failure a status made by [`explain`] explains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// No answer within the call's deadline.
    Deadline,
    /// The connection closed before the registry answered.
    ClosedBeforeAnswer,
    /// A stream's connection was lost after the stream was answered.
    Lost,
}

/// The source of a status made by [`explain`]: the status tonic made, whose message it shows
/// and whose causes it hands on, so that [`is_connection_error`] and [`timed_out`] still
/// find them.
#[derive(Debug)]
struct Explained {
    why: Why,
    original: Status,
}

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.original.message().is_empty() {
            f.write_str(code_name(self.original.code()))
        } else {
            f.write_str(self.original.message())
        }
    }
}

impl std::error::Error for Explained {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.original.source()
    }
}

fn explanation(status: &Status) -> Option<&Explained> {
    status.source()?.downcast_ref::<Explained>()
}

fn explain(original: Status, why: Why, code: Code, message: String) -> Status {
    let mut status = Status::new(code, message);
    status.set_source(Arc::new(Explained { why, original }));
    status
}

/// The status a unary call of this crate fails with, given tonic's: DEADLINE_EXCEEDED for
/// a call past its `deadline`, UNAVAILABLE for a connection closed before the registry
/// answered (a refused certificate, likely); anything else as it is.
pub(crate) fn unary_failure(status: Status, deadline: Option<Duration>) -> Status {
    if is_explained(&status) {
        status
    } else if timed_out(&status) {
        let within = match deadline {
            Some(deadline) => format!("within the call's deadline ({deadline:?})"),
            None => "within the call's deadline".to_string(),
        };
        let message = format!(
            "no answer came from the registry {within}: it may be busy or waiting on its \
             database. The call may have been done all the same, so repeat it rather than \
             assume it was not (a Submit with the same idempotency key, which returns the \
             request the first one made instead of making another)"
        );
        explain(status, Why::Deadline, Code::DeadlineExceeded, message)
    } else if closed_by_peer(&status) {
        let message = refused_certificate_hint("registry", "the client certificate (`tls.cert`)");
        explain(status, Why::ClosedBeforeAnswer, Code::Unavailable, message)
    } else {
        status
    }
}

/// The status a stream of this crate ends with when it could not be opened: as for a unary
/// call without deadline ([`unary_failure`]), and a connection broken while the stream was
/// asked for (not one that could not be made, which is UNAVAILABLE already) as for a lost
/// one ([`stream_failure`]).
pub(crate) fn opening_failure(status: Status, during: &str, follow_on: &str) -> Status {
    let status = unary_failure(status, None);
    if is_explained(&status) || status.code() == Code::Unavailable {
        status
    } else {
        stream_failure(status, during, follow_on)
    }
}

/// The status a stream of this crate ends with, given tonic's for an item after the stream
/// was answered: UNAVAILABLE for a lost connection, saying that and how to `follow_on`;
/// anything else as it is.
pub(crate) fn stream_failure(status: Status, during: &str, follow_on: &str) -> Status {
    if is_explained(&status) || !is_connection_error(&status) {
        return status;
    }
    let message = format!(
        "the connection to the registry was lost during the {during} (the registry was \
         stopped, or the network failed); to follow on, {follow_on}"
    );
    explain(status, Why::Lost, Code::Unavailable, message)
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
    use dsrelay_proto::v1::package_service_client::PackageServiceClient;
    use dsrelay_proto::v1::package_service_server::{PackageService, PackageServiceServer};
    use dsrelay_proto::v1::{DownloadPackageRequest, GetPackageRequest, PackageChunk, PackageInfo};
    use futures::StreamExt as _;
    use tokio::net::{TcpListener, TcpStream};
    use tonic::transport::Channel;

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
    fn a_call_that_outlived_its_timeout_is_not_a_connection_error() {
        let status = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(status.code(), Code::Cancelled, "{status:?}");
        assert!(!is_connection_error(&status), "{status:?}");
    }

    /// Sends one chunk of a package, then nothing: the stream stays open.
    struct OneChunk;

    #[tonic::async_trait]
    impl PackageService for OneChunk {
        async fn get_package(
            &self,
            _: tonic::Request<GetPackageRequest>,
        ) -> Result<tonic::Response<PackageInfo>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        type DownloadPackageStream =
            futures::stream::BoxStream<'static, Result<PackageChunk, Status>>;
        async fn download_package(
            &self,
            _: tonic::Request<DownloadPackageRequest>,
        ) -> Result<tonic::Response<Self::DownloadPackageStream>, Status> {
            let first = futures::stream::iter([Ok(PackageChunk::default())]);
            Ok(tonic::Response::new(
                first.chain(futures::stream::pending()).boxed(),
            ))
        }
    }

    /// A connection that closes under a stream, as when the server is killed: no status
    /// from the server ends the stream, only the transport's error.
    #[tokio::test]
    async fn a_connection_closed_under_a_stream_is_a_connection_error() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_port = server.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PackageServiceServer::new(OneChunk))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(server)),
        );
        // The client reaches the server through this relay, whose connection the test
        // closes.
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_port = relay.local_addr().unwrap().port();
        let relayed = tokio::spawn(async move {
            let (mut inbound, _) = relay.accept().await.unwrap();
            let mut outbound = TcpStream::connect(("127.0.0.1", server_port))
                .await
                .unwrap();
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
        let channel = Channel::from_shared(format!("http://127.0.0.1:{relay_port}"))
            .unwrap()
            .connect_lazy();
        let mut client = PackageServiceClient::new(channel);
        let mut chunks = client
            .download_package(DownloadPackageRequest::default())
            .await
            .unwrap()
            .into_inner();
        chunks.message().await.unwrap().expect("the first chunk");
        relayed.abort();
        let status = chunks.message().await.unwrap_err();
        assert!(is_connection_error(&status), "{status:?}");
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
