//! Task reports a processor gives outside Acknowledge, in its answer to a Deliver and to a
//! status check, are held to the rules an acknowledgement keeps. A COMPLETED report of a
//! return of data whose part the registry does not hold moves nothing, nor does a malformed
//! report; the same COMPLETED sent as an acknowledgement is refused by name.
//!
//! The registry is the real service. The processor is a test double speaking the protocol,
//! because the real processor never reports a return of data COMPLETED before its part is
//! stored: only a processor that is broken or hostile does, and the registry must not believe
//! it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::processor_service_server::{ProcessorService, ProcessorServiceServer};
use dsrelay_proto::v1::{
    AcknowledgeRequest, Acknowledgement, CancelDeliveryRequest, DeliverRequest, DeliverResponse,
    Evidence, ExtendDueDateRequest, GetRequest, GetStatusRequest, ListSubprocessorsRequest,
    RequestKind, RequestState, SubmitRequest, SubprocessorList, TaskList, TaskState, TaskStatus,
    UpdateContractEndRequest,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::harness::{erasure, spawn_pair, Backend, PairOptions, Role, TestPair, PROCESSOR};

/// A processor that answers every Deliver and status check with the reports it is given;
/// a status check of a request in `unknown` is answered NOT_FOUND instead.
#[derive(Clone, Default)]
struct ReportingProcessor {
    reports: Arc<Mutex<Vec<TaskStatus>>>,
    status_checks: Arc<AtomicUsize>,
    unknown: Arc<Mutex<BTreeSet<String>>>,
}

impl ReportingProcessor {
    fn report(&self, reports: Vec<TaskStatus>) {
        *self.reports.lock().unwrap() = reports;
    }

    fn reports(&self) -> Vec<TaskStatus> {
        self.reports.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl ProcessorService for ReportingProcessor {
    async fn deliver(
        &self,
        _req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        Ok(Response::new(DeliverResponse {
            tasks: self.reports(),
            duplicate: false,
        }))
    }

    async fn cancel(
        &self,
        _req: Request<CancelDeliveryRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_status(
        &self,
        req: Request<GetStatusRequest>,
    ) -> Result<Response<TaskList>, Status> {
        self.status_checks.fetch_add(1, Ordering::SeqCst);
        let request_id = req.into_inner().request_id;
        if self.unknown.lock().unwrap().contains(&request_id) {
            return Err(Status::not_found(format!("no request {request_id} here")));
        }
        Ok(Response::new(TaskList {
            request_id,
            tasks: self.reports(),
        }))
    }

    async fn list_subprocessors(
        &self,
        _req: Request<ListSubprocessorsRequest>,
    ) -> Result<Response<SubprocessorList>, Status> {
        Ok(Response::new(SubprocessorList::default()))
    }

    async fn update_contract_end(
        &self,
        _req: Request<UpdateContractEndRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn extend_due_date(
        &self,
        _req: Request<ExtendDueDateRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

fn report(subprocessor: &str, sequence: u64, state: TaskState) -> TaskStatus {
    TaskStatus {
        processor: PROCESSOR.into(),
        subprocessor: subprocessor.into(),
        state: state as i32,
        sequence,
        evidence: Some(Evidence {
            records_affected: 3,
            note: "exported".into(),
            confirmed: state == TaskState::Completed,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The request's tasks as the registry shows them: (subprocessor, state, sequence).
async fn tasks(pair: &TestPair, id: &str) -> (RequestState, Vec<(String, TaskState, u64)>) {
    let r = pair
        .client("partner-crm")
        .get(GetRequest {
            request_id: id.into(),
        })
        .await
        .expect("get")
        .into_inner();
    let mut tasks: Vec<(String, TaskState, u64)> = r
        .tasks
        .iter()
        .map(|t| (t.subprocessor.clone(), t.state(), t.sequence))
        .collect();
    tasks.sort();
    (r.state(), tasks)
}

/// A pair whose processor is a [`ReportingProcessor`] served here.
async fn pair_with_reporting_processor(backend: Backend) -> Option<(TestPair, ReportingProcessor)> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let pair = spawn_pair(PairOptions {
        backend,
        down: vec![Role::Processor],
        processor_endpoint: Some(listener.local_addr().expect("addr")),
        ..Default::default()
    })
    .await?;
    let processor = ReportingProcessor::default();
    let tls = pair
        .pki()
        .files("processor")
        .server_config()
        .expect("server tls");
    let router = dsrelay_runtime::server::builder(tls)
        .expect("server")
        .add_service(ProcessorServiceServer::new(processor.clone()));
    tokio::spawn(dsrelay_runtime::server::serve(
        router,
        listener,
        std::future::pending(),
    ));
    Some((pair, processor))
}

async fn reports_are_held_to_the_acknowledgement_rules(backend: Backend) {
    let Some((pair, processor)) = pair_with_reporting_processor(backend).await else {
        return;
    };

    // The answer to the Deliver: one task COMPLETED with no part stored, one malformed (a
    // control character in its name), one PENDING as the real processor reports it.
    processor.report(vec![
        report("accounting", 2, TaskState::Completed),
        report("mail\u{1}marketing", 1, TaskState::Pending),
        report("archive", 1, TaskState::Pending),
    ]);
    let id = pair
        .client("partner-crm")
        .submit(SubmitRequest {
            kind: RequestKind::ReturnOfData as i32,
            ..erasure("maija.meikalainen@example.fi")
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (state, shown) = loop {
        let (state, shown) = tasks(&pair, &id).await;
        if !shown.is_empty() {
            break (state, shown);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Deliver's answer was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The unproven COMPLETED is not believed, but its task is the request's all the same:
    // it is kept PENDING (sequence 0, before any report), so that it holds the request open.
    let believed = vec![
        ("accounting".to_string(), TaskState::Pending, 0),
        ("archive".to_string(), TaskState::Pending, 1),
    ];
    assert_eq!(
        shown, believed,
        "only the well-formed report without a claim to prove is recorded"
    );
    assert_ne!(state, RequestState::Completed);

    // The status checks that follow (the request is quiet) report the same; asked again and
    // again, the registry still believes none of it.
    processor.report(vec![
        report("accounting", 3, TaskState::Completed),
        report("archive", 2, TaskState::Completed),
        report("mail\u{1}marketing", 2, TaskState::Completed),
        report("ledger", 0, TaskState::InProgress),
    ]);
    let asked = processor.status_checks.load(Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while processor.status_checks.load(Ordering::SeqCst) < asked + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registry never checked the quiet request's status"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (state, shown) = tasks(&pair, &id).await;
    assert_eq!(
        shown, believed,
        "no unproven or malformed report moved a task"
    );
    assert_ne!(state, RequestState::Completed);

    // Acknowledged, the same COMPLETED is refused, naming the rule.
    let answer = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"))
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![Acknowledgement {
                request_id: id.clone(),
                subprocessor: "archive".into(),
                sequence: 2,
                state: TaskState::Completed as i32,
                evidence: report("archive", 2, TaskState::Completed).evidence,
                ..Default::default()
            }],
        })
        .await
        .expect("acknowledge")
        .into_inner();
    assert_eq!(answer.applied, 0, "{answer:?}");
    let rejected = answer.rejected.first().expect("rejected");
    assert_eq!(rejected.code, tonic::Code::InvalidArgument as i32);
    assert!(
        rejected
            .violations
            .iter()
            .any(|v| v.field == "acknowledgements[0].state" && v.rule.contains("part")),
        "{rejected:?}"
    );
    assert_eq!(tasks(&pair, &id).await.1, believed);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_held_to_the_acknowledgement_rules_on_sqlite() {
    reports_are_held_to_the_acknowledgement_rules(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_held_to_the_acknowledgement_rules_on_postgres() {
    reports_are_held_to_the_acknowledgement_rules(Backend::Postgres).await;
}

/// More quiet requests than one round of status checks takes (100), each answered NOT_FOUND,
/// ahead of one whose check would finish it: each unanswered check puts its request behind
/// the others, so the last one is still asked about, and reconciled, within a few rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_status_checks_fail_hold_back_no_other() {
    let Some((pair, processor)) = pair_with_reporting_processor(Backend::Sqlite).await else {
        return;
    };
    processor.report(vec![report("accounting", 1, TaskState::Pending)]);
    let mut crm = pair.client("partner-crm");
    let mut ids = Vec::new();
    for i in 0..110 {
        ids.push(
            crm.submit(erasure(&format!("quiet.{i}@example.fi")))
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    let last = ids.pop().expect("the last request");
    processor.unknown.lock().unwrap().extend(ids);
    // Every request was delivered (its task shows) before the status checks finish one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tasks(&pair, &last).await.1.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last request was never delivered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    processor.report(vec![report("accounting", 2, TaskState::Completed)]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (state, _) = tasks(&pair, &last).await;
        if state == RequestState::Completed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the last quiet request was never checked ({state:?}, {} status checks)",
            processor.status_checks.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pair.stop().await;
}
