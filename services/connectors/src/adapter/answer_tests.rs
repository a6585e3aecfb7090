//! How the connector words answers that never come, or come unreadable: a call past
//! `timeout_ms`, and bytes that are not the method's answer (a string field that is not
//! UTF-8). Each against a real server on 127.0.0.1 over mutual TLS.

use std::convert::Infallible;

use bytes::{Buf, BufMut};
use dsrelay_proto::tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use dsrelay_proto::tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use dsrelay_proto::tonic::{self, Request, Response, Status};
use dsrelay_proto::v1::subprocessor_adapter_server::{
    SubprocessorAdapter, SubprocessorAdapterServer,
};
use dsrelay_proto::v1::{
    DescribeRequest, DescribeResponse, ExecuteBulkRequest, ExecuteBulkResponse, ExecuteRequest,
    ExecuteResponse, ExportPage, GetBulkStatusRequest, GetExportPageRequest, GetTaskStatusRequest,
    RequestKind,
};

use super::{AdapterConfig, AdapterConnector};
use crate::{Connector, ConnectorError, Phase, Task};

/// Bytes passed as they are, both ways: what the raw adapter reads and answers.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Answers every call of the adapter service with the same bytes, OK.
#[derive(Clone)]
struct RawAdapter(Vec<u8>);

impl tonic::server::UnaryService<Vec<u8>> for RawAdapter {
    type Response = Vec<u8>;
    type Future = BoxFuture<Response<Vec<u8>>, Status>;

    fn call(&mut self, _: Request<Vec<u8>>) -> Self::Future {
        let answer = self.0.clone();
        Box::pin(async move { Ok(Response::new(answer)) })
    }
}

impl Service<http::Request<tonic::body::Body>> for RawAdapter {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(tonic::server::Grpc::new(RawCodec).unary(this, req).await) })
    }
}

impl tonic::server::NamedService for RawAdapter {
    const NAME: &'static str = "dsrelay.v1.SubprocessorAdapter";
}

/// An adapter that never answers Execute within any deadline.
struct Silent;

#[tonic::async_trait]
impl SubprocessorAdapter for Silent {
    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn execute(
        &self,
        _: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        // Ended with the test's runtime: the server is never stopped gracefully.
        std::future::pending().await
    }

    async fn get_task_status(
        &self,
        _: Request<GetTaskStatusRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn get_export_page(
        &self,
        _: Request<GetExportPageRequest>,
    ) -> Result<Response<ExportPage>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn execute_bulk(
        &self,
        _: Request<ExecuteBulkRequest>,
    ) -> Result<Response<ExecuteBulkResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn get_bulk_status(
        &self,
        _: Request<GetBulkStatusRequest>,
    ) -> Result<Response<ExecuteBulkResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }
}

/// Serves `service` over mutual TLS on a free port (never stopped: the test's runtime ends
/// it) and connects to it with `timeout_ms`.
async fn connect<S>(
    pki: &dsrelay_runtime::pki::DevPki,
    service: S,
    timeout_ms: u64,
) -> AdapterConnector
where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = dsrelay_runtime::server::builder(pki.files("adapter").server_config().unwrap())
        .unwrap()
        .add_service(service);
    tokio::spawn(dsrelay_runtime::server::serve(
        router,
        listener,
        std::future::pending(),
    ));
    AdapterConnector::connect(&AdapterConfig {
        endpoint: format!("https://localhost:{port}"),
        identity: "spiffe://dsrelay.dev/adapter/example".into(),
        tls: pki.files("processor"),
        timeout_ms,
        supported_kinds: Some(vec!["erasure".into()]),
        controllers: None,
    })
    .unwrap()
}

fn erasure() -> Task {
    Task {
        task_id: "controller/r1/newsletter".into(),
        request_id: "r1".into(),
        controller: "acme".into(),
        kind: RequestKind::Erasure,
        identities: Vec::new(),
        categories: Vec::new(),
        parameters: Default::default(),
        due_at_ms: 1_700_000_000_000,
        now_ms: 1_600_000_000_000,
        export: None,
        phase: Phase::Start,
        interrupted: false,
    }
}

/// A call past `timeout_ms` says so, naming the setting, and is retried: whichever of the
/// client's deadline (tonic's CANCELLED "Timeout expired") or the connector's timer ends it.
#[tokio::test]
async fn a_call_past_the_timeout_says_no_answer_came_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dsrelay_runtime::pki::DevPki::ensure(dir.path()).unwrap();
    let connector = connect(&pki, SubprocessorAdapterServer::new(Silent), 200).await;
    let err = connector.run(&erasure()).await.unwrap_err();
    let ConnectorError::Transient(message) = &err else {
        panic!("{err:?}");
    };
    assert!(
        message.ends_with("no answer within the configured timeout_ms (200 ms)"),
        "{message}"
    );
    assert!(!message.contains("Cancelled"), "{message}");
}

/// An answer the connector cannot decode (its `reason`, a string, is not UTF-8) is the
/// adapter's malformed answer: it fails the task for good, says what was wrong with the
/// answer, and neither passes for the adapter's INVALID_ARGUMENT nor gives the advice a
/// server gives its caller.
#[tokio::test]
async fn an_undecodable_answer_fails_for_good_as_a_malformed_answer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dsrelay_runtime::pki::DevPki::ensure(dir.path()).unwrap();
    // ExecuteResponse { outcome: REFUSED (5), reason: 0xff 0xfe }.
    let answer = vec![0x08, 0x05, 0x1a, 0x02, 0xff, 0xfe];
    let connector = connect(&pki, RawAdapter(answer), 5_000).await;
    let err = connector.run(&erasure()).await.unwrap_err();
    let ConnectorError::Permanent(message) = &err else {
        panic!("{err:?}");
    };
    assert!(
        message.starts_with("adapter Execute at https://localhost:")
            && message.contains(
                ": its answer could not be decoded: it is not a valid protobuf ExecuteResponse: "
            )
            && message.contains("reason"),
        "{message}"
    );
    for not_said in ["InvalidArgument", "send the message"] {
        assert!(!message.contains(not_said), "{message}");
    }
    // Well-formed bytes from the same server pass: the failure was the answer's.
    let refused = vec![0x08, 0x05, 0x1a, 0x02, b'n', b'o'];
    let connector = connect(&pki, RawAdapter(refused), 5_000).await;
    let out = connector.run(&erasure()).await.unwrap();
    assert_eq!(
        out,
        crate::Outcome::Refused {
            reason: "no".into()
        }
    );
}
