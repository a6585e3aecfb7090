//! A contract end at a holder that holds nothing of the controller, through the real
//! registry and the real processor: the holder (an adapter played here, over mutual TLS with
//! the pair's development certificates) answers the contract end's erasure NOT_FOUND, as
//! the no-op stand-in with `answer = "not_found"` does. The task ends NOT_FOUND with no
//! deletion certificate, and the contract end still completes at the registry. Before, the
//! task ended COMPLETED with a signed certificate stating zero records, which an auditor
//! takes for the holder's proof of deletion.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::certificate_service_client::CertificateServiceClient;
use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::subprocessor_adapter_server::{
    SubprocessorAdapter, SubprocessorAdapterServer,
};
use dsrelay_proto::v1::{
    ContractPhase, DescribeRequest, DescribeResponse, ExecuteBulkRequest, ExecuteBulkResponse,
    ExecuteOutcome, ExecuteRequest, ExecuteResponse, ExportPage, GetBulkStatusRequest,
    GetContractRequest, GetExportPageRequest, GetTaskStatusRequest, ListCertificatesRequest,
    RequestKind, RequestState, TaskState,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::harness::dsrctl::dsrctl;
use crate::harness::{spawn_pair, Holder, PairOptions, PROCESSOR};

/// An adapter that holds nothing: every bulk step is NOT_FOUND.
#[derive(Clone, Default)]
struct HoldsNothing {
    bulk_calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl SubprocessorAdapter for HoldsNothing {
    async fn describe(
        &self,
        _: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        Ok(Response::new(DescribeResponse {
            name: "holds-nothing".into(),
            supported_kinds: vec![RequestKind::Erasure as i32, RequestKind::ContractEnd as i32],
            data_categories: vec!["marketing".into()],
        }))
    }

    async fn execute(
        &self,
        _: Request<ExecuteRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_task_status(
        &self,
        _: Request<GetTaskStatusRequest>,
    ) -> Result<Response<ExecuteResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn execute_bulk(
        &self,
        _: Request<ExecuteBulkRequest>,
    ) -> Result<Response<ExecuteBulkResponse>, Status> {
        self.bulk_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ExecuteBulkResponse {
            outcome: ExecuteOutcome::NotFound as i32,
            note: "holds no data of the controller".into(),
            ..Default::default()
        }))
    }

    async fn get_bulk_status(
        &self,
        _: Request<GetBulkStatusRequest>,
    ) -> Result<Response<ExecuteBulkResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_export_page(
        &self,
        _: Request<GetExportPageRequest>,
    ) -> Result<Response<ExportPage>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_end_at_a_holder_of_nothing_completes_without_a_certificate() {
    // Bound first, so the pair is configured with its address; served once the pair's
    // certificates exist (a call made meanwhile waits in the listen queue).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter],
        newsletter_endpoint: Some(listener.local_addr().expect("addr")),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let holder = HoldsNothing::default();
    let server_tls = pair.pki().files("adapter").server_config().expect("tls");
    let router = dsrelay_runtime::server::builder(server_tls)
        .expect("server")
        .add_service(SubprocessorAdapterServer::new(holder.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
        let _ = stopped.await;
    }));

    let ended = dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "end",
            "--processor",
            PROCESSOR,
            "--choice",
            "delete",
            "--now",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let id = ended["contract_id"]
        .as_str()
        .expect("contract id")
        .to_string();
    let mut contracts = ContractServiceClient::new(pair.channel_to_registry("operator"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let done = loop {
        let c = contracts
            .get_contract(GetContractRequest {
                contract_id: id.clone(),
            })
            .await
            .expect("GetContract")
            .into_inner();
        if c.state == RequestState::Completed as i32 {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the contract end did not complete:\n{c:#?}\n--- processor log ---\n{}",
            pair.processor.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(holder.bulk_calls.load(Ordering::SeqCst) >= 1);
    assert_eq!(done.tasks.len(), 1, "{done:#?}");
    let task = &done.tasks[0];
    assert_eq!(task.state, TaskState::NotFound as i32, "{task:?}");
    assert_eq!(
        task.progress.as_ref().map(|p| p.phase),
        Some(ContractPhase::Done as i32),
        "{task:?}"
    );
    // The registry holds no certificate of the request, and says so.
    let certificates = CertificateServiceClient::new(pair.channel_to_registry("operator"))
        .list_certificates(ListCertificatesRequest {
            request_id: id.clone(),
            ..Default::default()
        })
        .await;
    match certificates {
        Err(status) => assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}"),
        Ok(listed) => assert!(listed.get_ref().certificates.is_empty(), "{listed:?}"),
    }
    let shown = dsrctl(&pair, "operator", &["contracts", "show", &id]).await;
    let text = shown.ok();
    assert!(text.contains("NOT_FOUND"), "{text}");
    let _ = stop.send(());
    pair.stop().await;
}
