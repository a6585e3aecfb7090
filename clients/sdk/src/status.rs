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
/// established or kept (refused, TLS handshake failed, unexpected server identity, or the
/// connection closed while a call was under way, as when the server is killed), rather than
/// sent by the server.
///
/// tonic reports both as a `Status`; only the local kind carries the cause as its source: the
/// transport's or an I/O error when the connection could not be made, and when it broke under
/// a call, hyper's error for the body, whose source is h2's (which keeps the I/O error to
/// itself).
pub fn is_connection_error(status: &Status) -> bool {
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
