//! Contract ends at the processor, driven over its real gRPC API with the registry's
//! certificate: Deliver of a CONTRACT_END, UpdateContractEnd and ListContractEnds. The test
//! plays the controller's registry itself (a small AcknowledgementService and
//! ExportUploadService on 127.0.0.1 presenting the registry's certificate) and checks what
//! the processor sends it: acknowledgements with progress, certificates of kind
//! `contract_end`, and a returned export's part.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::acknowledgement_service_server::{
    AcknowledgementService, AcknowledgementServiceServer,
};
use dsrelay_proto::v1::export_upload_service_server::{
    ExportUploadService, ExportUploadServiceServer,
};
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Acknowledgement, CancelDeliveryRequest,
    CompleteManualTaskRequest, CompletePartRequest, CompletePartResponse, ContractEnd,
    ContractEndChoice, ContractPhase, DeliverRequest, ExtendDueDateRequest, GetStatusRequest,
    GetUploadStateRequest, ListContractEndsRequest, ListManualTasksRequest, RequestKind,
    RequestParameters, TaskState, UpdateContractEndRequest, UploadFileChunk, UploadState,
};
use dsrelay_runtime::signing::SigningKey;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::harness::{
    binary, spawn_pair, Backend, Holder, PairOptions, Role, TestPair, OTHER_CONTROLLER,
};

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// What the processor sent to the controller's registry.
#[derive(Default)]
struct Received {
    acks: Vec<Acknowledgement>,
    /// Stored file bytes by (request, subprocessor, name).
    files: HashMap<(String, String, String), Vec<u8>>,
    parts: Vec<CompletePartRequest>,
}

/// The controller's registry as far as the processor talks to it.
#[derive(Clone, Default)]
struct FakeRegistry(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl AcknowledgementService for FakeRegistry {
    async fn acknowledge(
        &self,
        req: Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        let acks = req.into_inner().acknowledgements;
        let applied = acks.len() as u32;
        self.0.lock().unwrap().acks.extend(acks);
        Ok(Response::new(AcknowledgeResponse {
            applied,
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl ExportUploadService for FakeRegistry {
    async fn get_upload_state(
        &self,
        req: Request<GetUploadStateRequest>,
    ) -> Result<Response<UploadState>, Status> {
        let h = req.into_inner().header.unwrap_or_default();
        let got = self.0.lock().unwrap();
        let len = got
            .files
            .get(&(h.request_id, h.subprocessor, h.name))
            .map_or(0, |b| b.len() as u64);
        Ok(Response::new(UploadState {
            offset: len,
            complete: len == h.size,
        }))
    }

    async fn upload_file(
        &self,
        req: Request<Streaming<UploadFileChunk>>,
    ) -> Result<Response<UploadState>, Status> {
        let mut stream = req.into_inner();
        let mut header = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if header.is_none() {
                header = chunk.header.clone();
            }
            let h = header.clone().unwrap_or_default();
            let mut got = self.0.lock().unwrap();
            let file = got
                .files
                .entry((h.request_id, h.subprocessor, h.name))
                .or_default();
            if chunk.offset != file.len() as u64 {
                return Err(Status::failed_precondition("offset"));
            }
            file.extend_from_slice(&chunk.data);
        }
        let h = header.unwrap_or_default();
        let got = self.0.lock().unwrap();
        let len = got
            .files
            .get(&(h.request_id, h.subprocessor, h.name))
            .map_or(0, |b| b.len() as u64);
        Ok(Response::new(UploadState {
            offset: len,
            complete: len == h.size,
        }))
    }

    async fn complete_part(
        &self,
        req: Request<CompletePartRequest>,
    ) -> Result<Response<CompletePartResponse>, Status> {
        self.0.lock().unwrap().parts.push(req.into_inner());
        Ok(Response::new(CompletePartResponse {
            stored_at: Some(timestamp_from_millis(0)),
        }))
    }
}

impl FakeRegistry {
    fn acks(&self, request_id: &str, subprocessor: &str) -> Vec<Acknowledgement> {
        let mut acks: Vec<Acknowledgement> = self
            .0
            .lock()
            .unwrap()
            .acks
            .iter()
            .filter(|a| a.request_id == request_id && a.subprocessor == subprocessor)
            .cloned()
            .collect();
        acks.sort_by_key(|a| a.sequence);
        acks.dedup_by_key(|a| a.sequence);
        acks
    }

    /// Waits (20 s at most) until the latest acknowledgement of the task satisfies `pred`.
    async fn wait(
        &self,
        request_id: &str,
        subprocessor: &str,
        pred: impl Fn(&Acknowledgement) -> bool,
    ) -> Acknowledgement {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(last) = self.acks(request_id, subprocessor).pop() {
                if pred(&last) {
                    return last;
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out; acknowledgements of {request_id}/{subprocessor}: {:#?}",
                    self.acks(request_id, subprocessor)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A pair whose processor reports to a registry this test plays, and a client of the
/// processor with the registry's certificate.
struct Setup {
    pair: TestPair,
    registry: FakeRegistry,
    processor: ProcessorServiceClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Setup {
    async fn start(backend: Backend, holders: Vec<Holder>) -> Option<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let pair = spawn_pair(PairOptions {
            backend,
            holders,
            registry_endpoint: Some(addr),
            ..Default::default()
        })
        .await?;
        let registry = FakeRegistry::default();
        let tls = pair
            .pki()
            .files("registry")
            .server_config()
            .expect("registry tls");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = dsrelay_runtime::server::builder(tls)
            .expect("server")
            .add_service(AcknowledgementServiceServer::new(registry.clone()))
            .add_service(ExportUploadServiceServer::new(registry.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            );
        tokio::spawn(server);
        let processor = ProcessorServiceClient::new(pair.channel_to_processor("registry"));
        Some(Self {
            pair,
            registry,
            processor,
            stop: Some(stop),
        })
    }

    fn now(&self) -> i64 {
        self.pair
            .processor
            .clock()
            .expect("in-process clock")
            .now_ms()
    }

    fn advance(&self, ms: i64) {
        self.pair
            .processor
            .clock()
            .expect("in-process clock")
            .advance(ms);
    }

    async fn deliver(&mut self, id: &str, terms: ContractEnd) -> Result<Vec<TaskState>, Status> {
        let due = terms
            .grace_ends_at
            .as_ref()
            .map_or(0, |t| dsrelay_proto::millis_from_timestamp(t) + 30 * DAY_MS);
        let r = self
            .processor
            .deliver(DeliverRequest {
                request_id: id.into(),
                kind: RequestKind::ContractEnd as i32,
                parameters: Some(RequestParameters {
                    contract_end: Some(terms),
                    ..Default::default()
                }),
                received_at: Some(timestamp_from_millis(self.now())),
                due_at: Some(timestamp_from_millis(due)),
                ..Default::default()
            })
            .await?
            .into_inner();
        Ok(r.tasks.iter().map(|t| t.state()).collect())
    }

    async fn update(&mut self, id: &str, terms: ContractEnd) -> Result<(), Status> {
        self.processor
            .update_contract_end(UpdateContractEndRequest {
                request_id: id.into(),
                contract_end: Some(terms),
                recipient: None,
            })
            .await
            .map(|_| ())
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.pair.stop().await;
    }
}

fn terms(choice: ContractEndChoice, effective_at: i64) -> ContractEnd {
    ContractEnd {
        choice: choice as i32,
        effective_at: Some(timestamp_from_millis(effective_at)),
        grace_ends_at: Some(timestamp_from_millis(effective_at + 180 * DAY_MS)),
        return_confirmed: false,
        transfer_recipient: String::new(),
    }
}

fn phase(a: &Acknowledgement) -> ContractPhase {
    a.progress
        .as_ref()
        .map_or(ContractPhase::Unspecified, |p| p.phase())
}

/// The certificate body of `a`, checked against the processor's public key.
fn certified(pair: &TestPair, a: &Acknowledgement) -> Value {
    let c = a.certificate.as_ref().expect("a certificate");
    let key = SigningKey::load(&pair.pki().signing_key("processor")).expect("signing key");
    key.public_key()
        .verify(&dsrelay_processor::certificates::from_proto(c))
        .expect("a certificate the processor's key verifies")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractproc_deleting_now_completes_with_a_contract_end_certificate() {
    deleting_now(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractproc_deleting_now_completes_with_a_contract_end_certificate_on_postgres() {
    deleting_now(Backend::Postgres).await;
}

async fn deleting_now(backend: Backend) {
    let Some(mut s) = Setup::start(backend, vec![Holder::MailMarketing]).await else {
        return;
    };
    let now = s.now();
    let states = s
        .deliver("ce-delete", terms(ContractEndChoice::Delete, now))
        .await
        .expect("deliver");
    assert_eq!(states, [TaskState::Pending]);
    // Delivered again: the same task, nothing new.
    let again = s
        .processor
        .deliver(DeliverRequest {
            request_id: "ce-delete".into(),
            kind: RequestKind::ContractEnd as i32,
            parameters: Some(RequestParameters {
                contract_end: Some(terms(ContractEndChoice::Delete, now)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("deliver again")
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.tasks.len(), 1);

    let done = s
        .registry
        .wait("ce-delete", "mail-marketing", |a| {
            a.state == TaskState::Completed as i32
        })
        .await;
    assert_eq!(phase(&done), ContractPhase::Done);
    let body = certified(&s.pair, &done);
    assert_eq!(body["kind"], "contract_end");
    assert_eq!(body["request_id"], "ce-delete");
    assert_eq!(body["subprocessor"], "mail-marketing");
    assert_eq!(body["task_state"], "COMPLETED");
    // Every acknowledgement of a contract end task carries its progress, in order.
    let acks = s.registry.acks("ce-delete", "mail-marketing");
    assert!(acks.len() >= 2, "{acks:#?}");
    assert!(acks.iter().all(|a| a.progress.is_some()), "{acks:#?}");
    assert_eq!(phase(&acks[0]), ContractPhase::Deleting);
    assert_eq!(acks[0].state(), TaskState::InProgress);

    let status = s
        .processor
        .get_status(GetStatusRequest {
            request_id: "ce-delete".into(),
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        status.tasks[0].progress.as_ref().map(|p| p.phase()),
        Some(ContractPhase::Done)
    );
    // Too late to choose anything else.
    let err = s
        .update("ce-delete", terms(ContractEndChoice::ReturnThenDelete, now))
        .await
        .expect_err("a choice was made");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The same terms again are fine.
    s.update("ce-delete", terms(ContractEndChoice::Delete, now))
        .await
        .expect("idempotent");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractproc_without_a_choice_nothing_happens_until_the_grace_period_ends() {
    let Some(mut s) = Setup::start(Backend::Sqlite, vec![Holder::MailMarketing]).await else {
        return;
    };
    let now = s.now();
    let t = terms(ContractEndChoice::None, now);
    let grace = dsrelay_proto::millis_from_timestamp(t.grace_ends_at.as_ref().unwrap());
    s.deliver("ce-none", t).await.expect("deliver");
    let mut ops = s.pair.processor_operator();
    let list = ops
        .list_contract_ends(ListContractEndsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.contract_ends.len(), 1);
    let ce = &list.contract_ends[0];
    assert_eq!(ce.request_id, "ce-none");
    assert_eq!(ce.controller, crate::harness::CONTROLLER);
    let p = ce.tasks[0].progress.expect("progress");
    assert_eq!(p.phase(), ContractPhase::Scheduled);
    assert_eq!(
        p.scheduled_at
            .map(|t| dsrelay_proto::millis_from_timestamp(&t)),
        Some(grace)
    );
    // A controller this processor does not serve is named as such, not answered "nothing".
    let other = ops
        .list_contract_ends(ListContractEndsRequest {
            controller: OTHER_CONTROLLER.into(),
        })
        .await
        .expect_err("an unknown controller");
    assert_eq!(other.code(), tonic::Code::NotFound, "{other:?}");
    assert!(other.message().contains(OTHER_CONTROLLER), "{other:?}");

    // A month after the effective date: still nothing.
    s.advance(30 * DAY_MS);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(s.registry.acks("ce-none", "mail-marketing").is_empty());
    // At the end of the grace period the data goes without anyone asking.
    s.advance(151 * DAY_MS);
    let done = s
        .registry
        .wait("ce-none", "mail-marketing", |a| {
            a.state == TaskState::Completed as i32
        })
        .await;
    assert_eq!(certified(&s.pair, &done)["kind"], "contract_end");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractproc_a_choice_during_the_grace_period_runs_at_once() {
    let Some(mut s) = Setup::start(Backend::Sqlite, vec![Holder::MailMarketing]).await else {
        return;
    };
    let now = s.now();
    s.deliver("ce-choose", terms(ContractEndChoice::None, now))
        .await
        .expect("deliver");
    s.advance(10 * DAY_MS);
    // Statuses first: an unknown request, a moved effective date, a confirmation without a
    // return.
    let err = s
        .update("ce-unknown", terms(ContractEndChoice::Delete, now))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = s
        .update("ce-choose", terms(ContractEndChoice::Delete, now + DAY_MS))
        .await
        .expect_err("moved date");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("effective_at"), "{err:?}");
    // A contract end's due date follows its grace period; an unknown request is not found;
    // a due date is required.
    for (id, due_at, code, words) in [
        (
            "ce-choose",
            Some(timestamp_from_millis(now + 400 * DAY_MS)),
            Code::FailedPrecondition,
            "grace period",
        ),
        (
            "ce-unknown",
            Some(timestamp_from_millis(now + 400 * DAY_MS)),
            Code::NotFound,
            "ce-unknown",
        ),
        ("ce-choose", None, Code::InvalidArgument, "due_at"),
    ] {
        let err = s
            .processor
            .extend_due_date(ExtendDueDateRequest {
                request_id: id.into(),
                due_at,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(words), "{err:?}");
    }
    let mut confirmed = terms(ContractEndChoice::Delete, now);
    confirmed.return_confirmed = true;
    let err = s
        .update("ce-choose", confirmed)
        .await
        .expect_err("nothing to confirm");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = s
        .update(
            "ce-choose",
            ContractEnd {
                choice: ContractEndChoice::Unspecified as i32,
                ..terms(ContractEndChoice::Delete, now)
            },
        )
        .await
        .expect_err("no choice");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    s.update("ce-choose", terms(ContractEndChoice::Delete, now))
        .await
        .expect("choose");
    let done = s
        .registry
        .wait("ce-choose", "mail-marketing", |a| {
            a.state == TaskState::Completed as i32
        })
        .await;
    assert_eq!(phase(&done), ContractPhase::Done);
    // The rescheduling itself was acknowledged, with its new start.
    let acks = s.registry.acks("ce-choose", "mail-marketing");
    let rescheduled = &acks[0];
    assert_eq!(rescheduled.state(), TaskState::Pending);
    assert_eq!(phase(rescheduled), ContractPhase::Scheduled);
    assert_eq!(
        rescheduled
            .progress
            .as_ref()
            .and_then(|p| p.scheduled_at.as_ref())
            .map(dsrelay_proto::millis_from_timestamp),
        Some(now)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractproc_return_then_delete_waits_for_the_confirmation() {
    let Some(mut s) = Setup::start(Backend::Sqlite, vec![Holder::MailMarketing]).await else {
        return;
    };
    let now = s.now();
    s.deliver("ce-return", terms(ContractEndChoice::ReturnThenDelete, now))
        .await
        .expect("deliver");
    let waiting = s
        .registry
        .wait("ce-return", "mail-marketing", |a| {
            phase(a) == ContractPhase::AwaitingConfirmation
        })
        .await;
    // The data is returned, not deleted: the task is still in progress.
    assert_eq!(waiting.state(), TaskState::InProgress);
    assert!(
        waiting
            .evidence
            .as_ref()
            .is_some_and(|e| e.note.contains("confirmation")),
        "{waiting:?}"
    );
    {
        let got = s.registry.0.lock().unwrap();
        assert_eq!(got.parts.len(), 1);
        assert_eq!(got.parts[0].request_id, "ce-return");
        assert_eq!(got.parts[0].subprocessor, "mail-marketing");
    }
    let acks = s.registry.acks("ce-return", "mail-marketing");
    assert_eq!(phase(&acks[0]), ContractPhase::Returning);
    assert!(acks.iter().all(|a| a.state() == TaskState::InProgress));
    // Nothing more happens without the confirmation.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        s.registry.acks("ce-return", "mail-marketing").len(),
        acks.len()
    );

    let mut confirmed = terms(ContractEndChoice::ReturnThenDelete, now);
    confirmed.return_confirmed = true;
    s.update("ce-return", confirmed.clone())
        .await
        .expect("confirm");
    let done = s
        .registry
        .wait("ce-return", "mail-marketing", |a| {
            a.state == TaskState::Completed as i32
        })
        .await;
    assert_eq!(certified(&s.pair, &done)["kind"], "contract_end");
    let phases: Vec<ContractPhase> = s
        .registry
        .acks("ce-return", "mail-marketing")
        .iter()
        .map(phase)
        .collect();
    assert!(
        phases.ends_with(&[ContractPhase::Deleting, ContractPhase::Done]),
        "{phases:?}"
    );
    // The same confirmation again answers OK; taking it back does not.
    s.update("ce-return", confirmed).await.expect("idempotent");
    let err = s
        .update("ce-return", terms(ContractEndChoice::ReturnThenDelete, now))
        .await
        .expect_err("already confirmed");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractproc_a_manual_holder_is_told_whose_data_and_cancelling_stops_only_what_has_not_started(
) {
    let Some(mut s) = Setup::start(
        Backend::Sqlite,
        vec![Holder::MailMarketing, Holder::PaperArchive],
    )
    .await
    else {
        return;
    };
    let now = s.now();
    s.deliver("ce-manual", terms(ContractEndChoice::Delete, now))
        .await
        .expect("deliver");
    let waiting = s
        .registry
        .wait("ce-manual", "paper-archive", |a| {
            a.state == TaskState::WaitingForOperator as i32
        })
        .await;
    assert_eq!(phase(&waiting), ContractPhase::Deleting);
    let mut ops = s.pair.processor_operator();
    let tasks = ops
        .list_manual_tasks(ListManualTasksRequest::default())
        .await
        .expect("list")
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
    assert!(
        tasks[0].instructions.contains("controller controller"),
        "{:?}",
        tasks[0]
    );
    // Deleting has started everywhere: a cancellation changes nothing.
    s.processor
        .cancel(CancelDeliveryRequest {
            request_id: "ce-manual".into(),
            reason: "changed our mind".into(),
        })
        .await
        .expect("cancel");
    ops.complete_manual_task(CompleteManualTaskRequest {
        task: tasks[0].task.clone(),
        records_affected: 12,
        evidence_note: "shredded cabinet B2".into(),
        ..Default::default()
    })
    .await
    .expect("complete");
    let done = s
        .registry
        .wait("ce-manual", "paper-archive", |a| {
            a.state == TaskState::Completed as i32
        })
        .await;
    assert_eq!(certified(&s.pair, &done)["records_affected"], 12);

    // A contract end not yet started is cancelled.
    s.deliver(
        "ce-later",
        terms(ContractEndChoice::Delete, now + 5 * DAY_MS),
    )
    .await
    .expect("deliver");
    s.processor
        .cancel(CancelDeliveryRequest {
            request_id: "ce-later".into(),
            reason: "signed a renewal".into(),
        })
        .await
        .expect("cancel");
    s.registry
        .wait("ce-later", "mail-marketing", |a| {
            a.state == TaskState::Cancelled as i32
        })
        .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractproc_bad_deliveries_are_refused_with_the_field() {
    let Some(mut s) = Setup::start(Backend::Sqlite, vec![Holder::MailMarketing]).await else {
        return;
    };
    let now = s.now();
    let cases: Vec<(DeliverRequest, &str)> = vec![
        (
            DeliverRequest {
                request_id: "ce-bad-1".into(),
                kind: RequestKind::ContractEnd as i32,
                ..Default::default()
            },
            "parameters.contract_end",
        ),
        (
            DeliverRequest {
                request_id: "ce-bad-2".into(),
                kind: RequestKind::ContractEnd as i32,
                identities: vec![crate::harness::email("a@example.fi")],
                parameters: Some(RequestParameters {
                    contract_end: Some(terms(ContractEndChoice::Delete, now)),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "identities",
        ),
        (
            DeliverRequest {
                request_id: "ce-bad-3".into(),
                kind: RequestKind::ContractEnd as i32,
                parameters: Some(RequestParameters {
                    contract_end: Some(ContractEnd {
                        effective_at: None,
                        ..terms(ContractEndChoice::Delete, now)
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "parameters.contract_end.effective_at",
        ),
        (
            DeliverRequest {
                request_id: "ce-bad-4".into(),
                kind: RequestKind::ContractEnd as i32,
                parameters: Some(RequestParameters {
                    contract_end: Some(ContractEnd {
                        choice: 42,
                        ..terms(ContractEndChoice::Delete, now)
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "parameters.contract_end.choice",
        ),
    ];
    for (req, field) in cases {
        let err = s.processor.deliver(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        let details = tonic_types::StatusExt::get_details_bad_request(&err).expect("details");
        assert!(
            details.field_violations.iter().any(|v| v.field == field),
            "{field}: {details:?}"
        );
    }
    // A caller that is not a controller of this processor cannot update one.
    let mut partner = ProcessorServiceClient::new(s.pair.channel_to_processor("partner-crm"));
    let err = partner
        .update_contract_end(UpdateContractEndRequest {
            request_id: "ce-bad-1".into(),
            contract_end: Some(terms(ContractEndChoice::Delete, now)),
            recipient: None,
        })
        .await
        .expect_err("not a controller");
    assert_eq!(err.code(), Code::PermissionDenied);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractproc_two_controllers_and_an_unscoped_connector_refuse_to_start() {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::MailMarketing],
        second_controller: true,
        down: vec![Role::Processor],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    // The pair holds the configured port, and the process binds before it builds: the copy
    // listens anywhere.
    let text = std::fs::read_to_string(pair.processor.config_file()).expect("config");
    let listen = format!("listen = \"{}\"", pair.processor.addr());
    assert!(text.contains(&listen), "{text}");
    let copy = pair.dir().join("processor-two-controllers.toml");
    std::fs::write(&copy, text.replace(&listen, "listen = \"127.0.0.1:0\"")).expect("copy");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(binary("dsrelay-processor"))
            .arg("--config")
            .arg(&copy)
            .env("RUST_LOG", "error")
            .output(),
    )
    .await
    .expect("the processor exits")
    .expect("running the processor");
    assert!(!out.status.success(), "{out:?}");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        log.contains("subprocessor mail-marketing") && log.contains(OTHER_CONTROLLER),
        "{log}"
    );
    pair.stop().await;
}
