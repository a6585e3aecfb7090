//! Contract ends at the registry (ContractService): statuses and idempotency against the
//! real pair, and what the registry sends to a processor — played here by a small
//! ProcessorService on 127.0.0.1 with the dev PKI's processor certificate that records every
//! call — and how it takes that processor's acknowledgements (with progress), its part of
//! the package, and the operator's choice and confirmation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::certificate_service_client::CertificateServiceClient;
use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::package_service_client::PackageServiceClient;
use dsrelay_proto::v1::processor_service_server::{ProcessorService, ProcessorServiceServer};
use dsrelay_proto::v1::{
    AcknowledgeRequest, Acknowledgement, CancelDeliveryRequest, ChooseContractEndRequest,
    CompletePartRequest, ConfirmReturnRequest, Contract, ContractEndChoice, ContractPhase,
    ContractProgress, DeletionCertificate, DeliverRequest, DeliverResponse, DeliveryState,
    EndContractRequest, EventType, ExportFileHeader, ExtendDeadlineRequest, ExtendDueDateRequest,
    GetContractRequest, GetPackageRequest, GetRequest, GetStatusRequest, GetUploadStateRequest,
    ListCertificatesRequest, ListContractEndsRequest, ListContractsRequest, ListEventsRequest,
    ListSubprocessorsRequest, RequestKind, RequestState, SubprocessorList, TaskList, TaskState,
    TaskStatus, UpdateContractEndRequest, UploadFileChunk,
};
use dsrelay_proto::{millis_from_timestamp, timestamp_from_millis};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::signing::{to_canonical_json, SigningKey};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::harness::dsrctl::dsrctl;
use crate::harness::{count, spawn_pair, Backend, PairOptions, Role, TestPair, PROCESSOR};

const DAY_MS: i64 = 86_400_000;

fn contracts(pair: &TestPair, stem: &str) -> ContractServiceClient<Channel> {
    ContractServiceClient::new(pair.channel_to_registry(stem))
}

fn end(choice: ContractEndChoice, key: &str) -> EndContractRequest {
    EndContractRequest {
        processor: PROCESSOR.into(),
        choice: choice as i32,
        effective_at: None,
        effective_now: true,
        idempotency_key: key.into(),
        transfer_recipient: String::new(),
    }
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Asserts `result` failed with `code` and a message holding every one of `words`.
fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, words: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    for w in words {
        assert!(status.message().contains(w), "{w:?} in {status:?}");
    }
}

/// Every status EndContract and the other calls answer, and idempotency, against the real
/// pair (what its processor then does with the contract ends is `contract_end.rs`'s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractreg_statuses_and_idempotency() {
    let pair = spawn_pair(PairOptions {
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut ops = contracts(&pair, "operator");

    // Partners and processors may not touch contract ends.
    for stem in ["partner-crm", "processor"] {
        refused(
            contracts(&pair, stem)
                .end_contract(end(ContractEndChoice::Delete, "p"))
                .await,
            Code::PermissionDenied,
            &["operators only"],
        );
        refused(
            contracts(&pair, stem)
                .list_contracts(ListContractsRequest::default())
                .await,
            Code::PermissionDenied,
            &[],
        );
    }

    let mut r = end(ContractEndChoice::Delete, "k0");
    r.processor = "nobody".into();
    refused(
        ops.end_contract(r).await,
        Code::InvalidArgument,
        &["processor", PROCESSOR],
    );
    refused(
        ops.end_contract(end(ContractEndChoice::Unspecified, "k0"))
            .await,
        Code::InvalidArgument,
        &["choice"],
    );
    let mut r = end(ContractEndChoice::Delete, "k0");
    r.effective_now = false;
    r.effective_at = Some(timestamp_from_millis(
        pair.registry.clock().expect("clock").now_ms() - DAY_MS,
    ));
    refused(
        ops.end_contract(r.clone()).await,
        Code::InvalidArgument,
        &["effective_at", "effective_now"],
    );
    r.effective_now = true;
    refused(
        ops.end_contract(r).await,
        Code::InvalidArgument,
        &["effective_at", "not both"],
    );

    let first = ops
        .end_contract(end(ContractEndChoice::None, "k1"))
        .await
        .expect("end")
        .into_inner();
    assert!(!first.deduplicated);
    assert_eq!(first.processor, PROCESSOR);
    let terms = first.contract_end.expect("terms");
    assert_eq!(terms.choice, ContractEndChoice::None as i32);
    let effective = millis_from_timestamp(&terms.effective_at.expect("effective"));
    let grace = millis_from_timestamp(&terms.grace_ends_at.expect("grace"));
    let months = chrono::DateTime::from_timestamp_millis(effective)
        .unwrap()
        .checked_add_months(chrono::Months::new(6))
        .unwrap()
        .timestamp_millis();
    assert_eq!(grace, months, "six calendar months by default");

    // The same key and body: the first answer again; another body: ALREADY_EXISTS.
    let again = ops
        .end_contract(end(ContractEndChoice::None, "k1"))
        .await
        .expect("again")
        .into_inner();
    assert!(again.deduplicated);
    assert_eq!(again.contract_id, first.contract_id);
    refused(
        ops.end_contract(end(ContractEndChoice::Delete, "k1")).await,
        Code::AlreadyExists,
        &["k1", &first.contract_id],
    );
    // A second contract end with the processor while the first runs.
    refused(
        ops.end_contract(end(ContractEndChoice::Delete, "k2")).await,
        Code::FailedPrecondition,
        &[&first.contract_id],
    );

    // It is a request like any other: Get shows its kind and due date, no identities.
    let request = pair
        .operator()
        .get(GetRequest {
            request_id: first.contract_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(request.kind, RequestKind::ContractEnd as i32);
    assert!(request.identities.is_empty());
    assert_eq!(
        millis_from_timestamp(&request.due_at.expect("due")),
        grace + 30 * DAY_MS
    );
    // Its due date follows the grace period: no art. 12(3) extension.
    refused(
        pair.operator()
            .extend_deadline(ExtendDeadlineRequest {
                request_id: first.contract_id.clone(),
                months: 1,
                reason: "more time".into(),
            })
            .await,
        Code::FailedPrecondition,
        &[&first.contract_id, "contract end", "grace period"],
    );
    // A partner does not see it.
    refused(
        pair.crm()
            .get(GetRequest {
                request_id: first.contract_id.clone(),
            })
            .await,
        Code::NotFound,
        &[],
    );
    // While its choice is NONE it has no package, and says why.
    refused(
        PackageServiceClient::new(pair.channel_to_registry("operator"))
            .get_package(GetPackageRequest {
                request_id: first.contract_id.clone(),
            })
            .await,
        Code::FailedPrecondition,
        &[&first.contract_id, "NONE", "only RETURN_THEN_DELETE"],
    );

    let listed = ops
        .list_contracts(ListContractsRequest {
            processor: PROCESSOR.into(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.contracts.len(), 1);
    assert_eq!(listed.contracts[0].contract_id, first.contract_id);
    let none = ops
        .list_contracts(ListContractsRequest {
            processor: "web-agency".into(),
        })
        .await
        .expect("list")
        .into_inner();
    assert!(none.contracts.is_empty());

    // A retry after the effective date passed still answers the contract end it made.
    let mut later = end(ContractEndChoice::Delete, "k-later");
    later.processor = "web-agency".into();
    later.effective_now = false;
    let clock = pair.registry.clock().expect("clock");
    later.effective_at = Some(timestamp_from_millis(clock.now_ms() + DAY_MS));
    let made = ops
        .end_contract(later.clone())
        .await
        .expect("end later")
        .into_inner();
    assert!(!made.deduplicated);
    clock.advance(2 * DAY_MS);
    let retried = ops
        .end_contract(later.clone())
        .await
        .expect("retry after the date")
        .into_inner();
    assert!(retried.deduplicated);
    assert_eq!(retried.contract_id, made.contract_id);
    // A new key with that date is refused as before.
    later.idempotency_key = "k-later-2".into();
    refused(
        ops.end_contract(later).await,
        Code::InvalidArgument,
        &["effective_at", "in the past"],
    );
    refused(
        ops.get_contract(GetContractRequest {
            contract_id: "0190a0a0-0000-7000-8000-000000000000".into(),
        })
        .await,
        Code::NotFound,
        &["contract end"],
    );

    // Choices: only DELETE or RETURN_THEN_DELETE, once; nothing to confirm for DELETE.
    let id = first.contract_id.clone();
    refused(
        ops.choose_contract_end(ChooseContractEndRequest {
            contract_id: id.clone(),
            choice: ContractEndChoice::None as i32,
            transfer_recipient: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["choice"],
    );
    let chosen = ops
        .choose_contract_end(ChooseContractEndRequest {
            contract_id: id.clone(),
            choice: ContractEndChoice::Delete as i32,
            transfer_recipient: String::new(),
        })
        .await
        .expect("choose")
        .into_inner();
    assert_eq!(
        chosen.contract_end.expect("terms").choice,
        ContractEndChoice::Delete as i32
    );
    refused(
        ops.choose_contract_end(ChooseContractEndRequest {
            contract_id: id.clone(),
            choice: ContractEndChoice::ReturnThenDelete as i32,
            transfer_recipient: String::new(),
        })
        .await,
        Code::FailedPrecondition,
        &["DELETE", "final"],
    );
    refused(
        ops.confirm_return(ConfirmReturnRequest {
            contract_id: id.clone(),
            manifest_sha256: "0".repeat(64),
        })
        .await,
        Code::FailedPrecondition,
        &["RETURN_THEN_DELETE"],
    );
    // The choice is what is wrong, whatever the digest looks like.
    refused(
        ops.confirm_return(ConfirmReturnRequest {
            contract_id: id.clone(),
            manifest_sha256: "not hex".into(),
        })
        .await,
        Code::FailedPrecondition,
        &["RETURN_THEN_DELETE"],
    );
    pair.stop().await;
}

/// What the test's processor was asked.
#[derive(Default)]
struct Calls {
    delivered: Vec<DeliverRequest>,
    updates: Vec<UpdateContractEndRequest>,
    /// Updates still to refuse with UNAVAILABLE before one is taken.
    refuse_updates: usize,
    /// Refuse every update as the real processor does once it has started deleting.
    deleting: bool,
}

/// A processor that records what the registry sends and answers with one PENDING task,
/// `accounting`, per delivery.
#[derive(Clone, Default)]
struct RecordingProcessor {
    calls: Arc<Mutex<Calls>>,
}

fn accounting() -> TaskStatus {
    TaskStatus {
        processor: PROCESSOR.into(),
        subprocessor: "accounting".into(),
        state: TaskState::Pending as i32,
        // As the processor reports a task it just created.
        sequence: 1,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ProcessorService for RecordingProcessor {
    async fn deliver(
        &self,
        req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.calls.lock().unwrap().delivered.push(req.into_inner());
        Ok(Response::new(DeliverResponse {
            tasks: vec![accounting()],
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
        // Nothing newer than the acknowledgements: reconciling changes nothing.
        Ok(Response::new(TaskList {
            request_id: req.into_inner().request_id,
            tasks: Vec::new(),
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
        req: Request<UpdateContractEndRequest>,
    ) -> Result<Response<TaskList>, Status> {
        let mut calls = self.calls.lock().unwrap();
        let req = req.into_inner();
        if calls.refuse_updates > 0 {
            calls.refuse_updates -= 1;
            calls.updates.push(req);
            return Err(Status::unavailable("busy"));
        }
        if calls.deleting {
            calls.updates.push(req);
            return Err(Status::failed_precondition(
                "the contract end can no longer change: deleting the controller's data has \
                 started",
            ));
        }
        let id = req.request_id.clone();
        calls.updates.push(req);
        Ok(Response::new(TaskList {
            request_id: id,
            tasks: Vec::new(),
        }))
    }

    async fn extend_due_date(
        &self,
        _req: Request<ExtendDueDateRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves `processor` on `listener` with the dev PKI's processor certificate.
fn serve(processor: RecordingProcessor, listener: TcpListener, pki: &DevPki) {
    let tls = pki.files("processor").server_config().expect("server tls");
    let router = dsrelay_runtime::server::builder(tls)
        .expect("server")
        .add_service(ProcessorServiceServer::new(processor));
    tokio::spawn(dsrelay_runtime::server::serve(
        router,
        listener,
        std::future::pending(),
    ));
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    eventually_async(what, || std::future::ready(f())).await
}

/// [`eventually`] for a check that awaits (asks a service).
async fn eventually_async<T, F>(what: &str, mut f: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn acknowledge(
    pair: &TestPair,
    id: &str,
    sequence: u64,
    state: TaskState,
    p: ContractProgress,
) {
    let answer = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"))
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![Acknowledgement {
                request_id: id.into(),
                subprocessor: "accounting".into(),
                sequence,
                state: state as i32,
                progress: Some(p),
                ..Default::default()
            }],
        })
        .await
        .expect("acknowledge")
        .into_inner();
    assert_eq!(answer.applied, 1, "{answer:?}");
}

async fn get(pair: &TestPair, id: &str) -> Contract {
    contracts(pair, "operator")
        .get_contract(GetContractRequest {
            contract_id: id.into(),
        })
        .await
        .expect("get contract")
        .into_inner()
}

async fn events(pair: &TestPair, id: &str, t: EventType) -> Vec<String> {
    pair.operator()
        .list_events(ListEventsRequest {
            request_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events
        .into_iter()
        .filter(|e| e.r#type == t as i32)
        .map(|e| e.message)
        .collect()
}

/// Uploads one file as the accounting part of `id` and declares the part complete.
async fn upload_part(pair: &TestPair, id: &str) {
    let data = br#"[{"customer":1}]"#;
    let header = ExportFileHeader {
        request_id: id.into(),
        subprocessor: "accounting".into(),
        name: "customers.json".into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: data.len() as u64,
        sha256: sha256(data),
    };
    let mut up = ExportUploadServiceClient::new(pair.channel_to_registry("processor"));
    let state = up
        .upload_file(tokio_stream::iter(vec![UploadFileChunk {
            header: Some(header.clone()),
            offset: 0,
            data: data.to_vec().into(),
            chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(data),
            ..Default::default()
        }]))
        .await
        .expect("upload")
        .into_inner();
    assert!(state.complete, "{state:?}");
    up.complete_part(CompletePartRequest {
        request_id: id.into(),
        subprocessor: "accounting".into(),
        files: vec![header],
    })
    .await
    .expect("complete part");
}

async fn delivery_update_and_progress(backend: Backend) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        down: vec![Role::Processor],
        processor_endpoint: Some(listener.local_addr().expect("addr")),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let processor = RecordingProcessor::default();
    serve(processor.clone(), listener, pair.pki());
    let calls = processor.calls.clone();
    let mut ops = contracts(&pair, "operator");

    let c = ops
        .end_contract(end(ContractEndChoice::None, "with-a-fake"))
        .await
        .expect("end")
        .into_inner();
    let id = c.contract_id.clone();

    // The delivery: the kind, the stored terms, no identities, the due date.
    let delivered = eventually("the delivery", || {
        calls.lock().unwrap().delivered.first().cloned()
    })
    .await;
    assert_eq!(delivered.request_id, id);
    assert_eq!(delivered.kind, RequestKind::ContractEnd as i32);
    assert!(delivered.identities.is_empty() && delivered.scope.is_none());
    let terms = delivered
        .parameters
        .and_then(|p| p.contract_end)
        .expect("terms delivered");
    assert_eq!(Some(terms.clone()), c.contract_end);
    assert_eq!(
        millis_from_timestamp(&delivered.due_at.expect("due")),
        millis_from_timestamp(terms.grace_ends_at.as_ref().expect("grace")) + 30 * DAY_MS
    );

    // Progress: the first report is an event; new counts alone are not, yet show.
    let scheduled = ContractProgress {
        phase: ContractPhase::Scheduled as i32,
        scheduled_at: terms.grace_ends_at,
        ..Default::default()
    };
    acknowledge(&pair, &id, 2, TaskState::InProgress, scheduled).await;
    let updated = events(&pair, &id, EventType::TaskUpdated).await.len();
    let counted = ContractProgress {
        subjects_total: 10,
        records_total: 40,
        ..scheduled
    };
    acknowledge(&pair, &id, 3, TaskState::InProgress, counted).await;
    assert_eq!(
        events(&pair, &id, EventType::TaskUpdated).await.len(),
        updated
    );
    let shown = get(&pair, &id).await;
    assert_eq!(shown.state, RequestState::InProgress as i32);
    assert_eq!(shown.tasks.len(), 1);
    assert_eq!(shown.tasks[0].sequence, 3);
    assert_eq!(shown.tasks[0].progress, Some(counted));
    let request = pair
        .operator()
        .get(GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(request.tasks[0].progress, Some(counted));
    // dsrctl shows each subprocessor's phase and progress.
    let shown = dsrctl(&pair, "operator", &["contracts", "show", &id]).await;
    let line = shown
        .ok()
        .lines()
        .find(|l| l.starts_with("accounting"))
        .unwrap_or_else(|| panic!("no accounting row:\n{}", shown.stdout))
        .to_string();
    for word in ["IN_PROGRESS", "SCHEDULED", "0/10", "0/40"] {
        assert!(line.contains(word), "{word:?} in {line:?}");
    }
    let listed = dsrctl(
        &pair,
        "operator",
        &["contracts", "list", "--processor", PROCESSOR],
    )
    .await;
    let row = listed
        .ok()
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}:\n{}", listed.stdout))
        .to_string();
    for word in [
        PROCESSOR,
        "NONE",
        "IN_PROGRESS",
        "accounting SCHEDULED 0/10 subjects",
    ] {
        assert!(row.contains(word), "{word:?} in {row:?}");
    }

    // Delivered with choice NONE, the contract end takes no upload: nothing is returned.
    let mut up = ExportUploadServiceClient::new(pair.channel_to_registry("processor"));
    refused(
        up.get_upload_state(GetUploadStateRequest {
            header: Some(ExportFileHeader {
                request_id: id.clone(),
                subprocessor: "accounting".into(),
                name: "customers.json".into(),
                media_type: "application/json".into(),
                categories: vec!["contact".into()],
                size: 2,
                sha256: sha256(b"[]"),
            }),
        })
        .await,
        Code::FailedPrecondition,
        &[&id, "NONE", "only RETURN_THEN_DELETE"],
    );

    // The choice travels as an update; the first two attempts fail, and a confirmation made
    // meanwhile is not possible yet (no part), so the latest terms are those sent.
    calls.lock().unwrap().refuse_updates = 2;
    ops.choose_contract_end(ChooseContractEndRequest {
        contract_id: id.clone(),
        choice: ContractEndChoice::ReturnThenDelete as i32,
        transfer_recipient: String::new(),
    })
    .await
    .expect("choose");
    refused(
        ops.confirm_return(ConfirmReturnRequest {
            contract_id: id.clone(),
            manifest_sha256: "0".repeat(64),
        })
        .await,
        Code::FailedPrecondition,
        &["not complete"],
    );
    let sent = eventually("the choice's update", || {
        let c = calls.lock().unwrap();
        (c.updates.len() >= 3)
            .then(|| c.updates.last().cloned())
            .flatten()
    })
    .await;
    let sent_terms = sent.contract_end.expect("terms");
    assert_eq!(
        sent_terms.choice,
        ContractEndChoice::ReturnThenDelete as i32
    );
    assert!(!sent_terms.return_confirmed);
    assert_eq!(sent_terms.effective_at, terms.effective_at);
    let chose = events(&pair, &id, EventType::ContractUpdated).await;
    assert_eq!(chose.len(), 1, "{chose:?}");
    assert!(chose[0].contains("RETURN_THEN_DELETE"), "{chose:?}");

    // The processor returns the data: its part is stored and the package can be read.
    let returning = ContractProgress {
        phase: ContractPhase::AwaitingConfirmation as i32,
        subjects_done: 10,
        subjects_total: 10,
        records_done: 40,
        records_total: 40,
        scheduled_at: None,
    };
    upload_part(&pair, &id).await;
    acknowledge(&pair, &id, 4, TaskState::InProgress, returning).await;
    let info = PackageServiceClient::new(pair.channel_to_registry("operator"))
        .get_package(GetPackageRequest {
            request_id: id.clone(),
        })
        .await
        .expect("package")
        .into_inner();
    assert!(info.complete, "{info:?}");
    assert_eq!(info.files.len(), 1);
    let manifest: serde_json::Value =
        serde_json::from_slice(&info.manifest_json).expect("manifest json");
    assert_eq!(manifest["kind"], "CONTRACT_END");

    refused(
        ops.confirm_return(ConfirmReturnRequest {
            contract_id: id.clone(),
            manifest_sha256: "not hex".into(),
        })
        .await,
        Code::InvalidArgument,
        &["manifest_sha256", "64 hex digits"],
    );
    // Nothing given: told what to give and how to get it, not that it is malformed.
    refused(
        ops.confirm_return(ConfirmReturnRequest {
            contract_id: id.clone(),
            manifest_sha256: String::new(),
        })
        .await,
        Code::InvalidArgument,
        &["manifest_sha256", "required", "--package DIR"],
    );
    refused(
        ops.confirm_return(ConfirmReturnRequest {
            contract_id: id.clone(),
            manifest_sha256: "ab".repeat(32),
        })
        .await,
        Code::FailedPrecondition,
        &["differs"],
    );
    // The operator downloads and verifies the package, then confirms it with dsrctl.
    let digest = sha256(&info.manifest_json);
    let folder = pair.dir().join("returned");
    let folder_arg = folder.to_str().expect("utf-8 path");
    dsrctl(&pair, "operator", &["download", &id, "--out", folder_arg])
        .await
        .ok();
    let confirmed = dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "confirm",
            &id,
            "--package",
            folder_arg,
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(confirmed["return_confirmed"], true, "{confirmed}");
    assert_eq!(confirmed["choice"], "RETURN_THEN_DELETE", "{confirmed}");
    // The same confirmation again changes nothing.
    ops.confirm_return(ConfirmReturnRequest {
        contract_id: id.clone(),
        manifest_sha256: digest.clone(),
    })
    .await
    .expect("confirm again");
    let sent = eventually("the confirmation's update", || {
        let c = calls.lock().unwrap();
        c.updates
            .last()
            .filter(|u| u.contract_end.as_ref().is_some_and(|t| t.return_confirmed))
            .cloned()
    })
    .await;
    assert_eq!(
        sent.contract_end.expect("terms").choice,
        ContractEndChoice::ReturnThenDelete as i32
    );
    let confirmations = events(&pair, &id, EventType::ReturnConfirmed).await;
    assert_eq!(confirmations.len(), 1, "{confirmations:?}");
    assert!(confirmations[0].contains(&digest), "{confirmations:?}");

    // One update row per contract end, re-armed and sent: never a second one.
    let db = pair.registry.database_url();
    let rows =
        format!("SELECT COUNT(*) FROM deliveries WHERE request_id = '{id}' AND op = 'update'");
    assert_eq!(count(db, &rows).await, 1);
    let sent_row = format!(
        "SELECT COUNT(*) FROM deliveries WHERE request_id = '{id}' AND op = 'update' \
         AND done_at IS NOT NULL"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(db, &sent_row).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the update row was never done"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The processor deletes and completes: a new phase and state speak, the request
    // completes, and no choice can be made any more.
    let done = ContractProgress {
        phase: ContractPhase::Done as i32,
        ..Default::default()
    };
    // With a certificate of kind contract_end, signed with the processor's key.
    let key = SigningKey::load(&pair.pki().signing_key("processor")).expect("signing key");
    let body = serde_json::json!({
        "version": 1, "certificate_id": uuid::Uuid::new_v4().to_string(), "kind": "contract_end",
        "processor": dev_identity("processor", PROCESSOR), "request_id": id,
        "subprocessor": "accounting", "task_state": "COMPLETED", "controller": "controller",
        "records_affected": 40, "erased": [], "retained": [],
        "completed_at": "2026-01-01T00:00:00.000Z", "issued_at": "2026-01-01T00:00:00.000Z",
    });
    let signed = key.sign(to_canonical_json(&body).expect("canonical"));
    let answer = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"))
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![Acknowledgement {
                request_id: id.clone(),
                subprocessor: "accounting".into(),
                sequence: 5,
                state: TaskState::Completed as i32,
                progress: Some(done),
                certificate: Some(DeletionCertificate {
                    body: signed.body,
                    signature: signed.signature,
                    key_id: signed.key_id,
                }),
                ..Default::default()
            }],
        })
        .await
        .expect("acknowledge")
        .into_inner();
    assert_eq!(answer.applied, 1, "{answer:?}");
    let certificates = CertificateServiceClient::new(pair.channel_to_registry("operator"))
        .list_certificates(ListCertificatesRequest {
            request_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("certificates")
        .into_inner()
        .certificates;
    assert_eq!(certificates.len(), 1);
    assert!(certificates[0].verified, "{:?}", certificates[0]);
    let finished = get(&pair, &id).await;
    assert_eq!(finished.state, RequestState::Completed as i32);
    assert_eq!(finished.tasks[0].progress, Some(done));
    let last = events(&pair, &id, EventType::TaskUpdated).await;
    assert!(last.last().is_some_and(|m| m.contains("DONE")), "{last:?}");
    // The event's task (as Watch and ListEvents show it) carries the progress it reported.
    let listed = pair
        .operator()
        .list_events(ListEventsRequest {
            request_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events;
    let task = listed
        .iter()
        .rev()
        .find(|e| e.r#type == EventType::TaskUpdated as i32)
        .and_then(|e| e.task.clone())
        .expect("a task update");
    assert_eq!(task.progress, Some(done));

    // Watching a finished contract end ends at once, exit 0 for COMPLETED.
    let watched = dsrctl(
        &pair,
        "operator",
        &["contracts", "show", &id, "--watch", "--output", "json"],
    )
    .await
    .json();
    assert_eq!(watched["state"], "COMPLETED", "{watched}");
    assert_eq!(watched["tasks"][0]["phase"], "DONE", "{watched}");

    // Finished: another contract end with the processor may begin.
    ops.end_contract(end(ContractEndChoice::Delete, "the-next"))
        .await
        .expect("a new contract end once the first finished");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractreg_delivery_update_and_progress_on_sqlite() {
    delivery_update_and_progress(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractreg_delivery_update_and_progress_on_postgres() {
    delivery_update_and_progress(Backend::Postgres).await;
}

/// dsrctl's contract commands against the real pair: end (printing the key it chose),
/// list, show, choose, and the registry's refusal carried to the exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractreg_dsrctl_contract_commands() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let ended = dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "end",
            "--processor",
            PROCESSOR,
            "--choice",
            "none",
            "--now",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let id = ended["contract_id"].as_str().expect("id").to_string();
    assert_eq!(ended["choice"], "NONE", "{ended}");
    assert!(
        ended["idempotency_key"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{ended}"
    );
    assert!(ended["grace_ends_at"].is_string(), "{ended}");

    // Both or neither of --effective-at and --now is a usage error.
    dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "end",
            "--processor",
            PROCESSOR,
            "--choice",
            "delete",
        ],
    )
    .await
    .expect_code(2);
    // A second one with the processor: the registry's refusal, naming the first.
    let again = dsrctl(
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
        ],
    )
    .await;
    again.expect_code(2);
    assert!(
        again.stderr.contains("FAILED_PRECONDITION") && again.stderr.contains(&id),
        "{}",
        again.stderr
    );
    // Partners may not.
    let partner = dsrctl(&pair, "partner-crm", &["contracts", "list"]).await;
    partner.expect_code(2);
    assert!(
        partner.stderr.contains("PERMISSION_DENIED"),
        "{}",
        partner.stderr
    );

    let list = dsrctl(&pair, "operator", &["contracts", "list"]).await;
    let header = list.ok().lines().next().expect("a header").to_string();
    for column in [
        "ID",
        "PROCESSOR",
        "CHOICE",
        "EFFECTIVE",
        "GRACE ENDS",
        "STATE",
        "SUBPROCESSORS",
    ] {
        assert!(header.contains(column), "{column} in {header:?}");
    }
    assert!(list.stdout.contains(&id), "{}", list.stdout);

    let chosen = dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "choose",
            &id,
            "--choice",
            "return-then-delete",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(chosen["choice"], "RETURN_THEN_DELETE", "{chosen}");
    let shown = dsrctl(&pair, "operator", &["contracts", "show", &id]).await;
    assert!(
        shown
            .ok()
            .lines()
            .any(|l| l.starts_with("choice") && l.contains("RETURN_THEN_DELETE")),
        "{}",
        shown.stdout
    );
    // Nothing was returned yet: the confirmation is refused.
    let confirm = dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "confirm",
            &id,
            "--manifest-sha256",
            &"0".repeat(64),
        ],
    )
    .await;
    confirm.expect_code(2);
    assert!(
        confirm.stderr.contains("not complete"),
        "{}",
        confirm.stderr
    );
    pair.stop().await;
}

/// The processor's clock ends the grace period, not the registry's. A choice made once the
/// processor has reported deleting is refused at once, naming the subprocessors; one the
/// registry accepts before it knows is refused by the processor, and the contract end then
/// says so beside the terms, instead of showing a choice nobody carries out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractreg_a_choice_too_late_for_the_processor_is_shown_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let pair = spawn_pair(PairOptions {
        down: vec![Role::Processor],
        processor_endpoint: Some(listener.local_addr().expect("addr")),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let processor = RecordingProcessor::default();
    serve(processor.clone(), listener, pair.pki());
    let calls = processor.calls.clone();
    let mut ops = contracts(&pair, "operator");
    let choose = |id: &str| ChooseContractEndRequest {
        contract_id: id.into(),
        choice: ContractEndChoice::ReturnThenDelete as i32,
        transfer_recipient: String::new(),
    };

    // The processor reports deleting: the registry refuses the choice itself.
    let reported = ops
        .end_contract(end(ContractEndChoice::None, "deleting-reported"))
        .await
        .expect("end")
        .into_inner()
        .contract_id;
    eventually("the delivery", || {
        (calls.lock().unwrap().delivered.len() == 1).then_some(())
    })
    .await;
    let deleting = ContractProgress {
        phase: ContractPhase::Deleting as i32,
        subjects_total: 10,
        records_total: 40,
        ..Default::default()
    };
    acknowledge(&pair, &reported, 2, TaskState::InProgress, deleting).await;
    refused(
        ops.choose_contract_end(choose(&reported)).await,
        Code::FailedPrecondition,
        &[&reported, "started deleting (accounting)"],
    );
    assert_eq!(
        get(&pair, &reported).await.contract_end.map(|t| t.choice),
        Some(ContractEndChoice::None as i32)
    );
    // It finishes: one contract end per processor is open at a time.
    let done = ContractProgress {
        phase: ContractPhase::Done as i32,
        subjects_done: 10,
        subjects_total: 10,
        records_done: 40,
        records_total: 40,
        ..Default::default()
    };
    acknowledge(&pair, &reported, 3, TaskState::Completed, done).await;

    // The processor has started deleting but not yet said so: the registry accepts the
    // choice, the processor refuses it, and the contract end shows the refusal.
    calls.lock().unwrap().deleting = true;
    let unreported = ops
        .end_contract(end(ContractEndChoice::None, "deleting-unreported"))
        .await
        .expect("end")
        .into_inner()
        .contract_id;
    eventually("the second delivery", || {
        (calls.lock().unwrap().delivered.len() == 2).then_some(())
    })
    .await;
    let chosen = ops
        .choose_contract_end(choose(&unreported))
        .await
        .expect("a choice the registry cannot yet know is too late")
        .into_inner();
    assert_eq!(chosen.terms_refused, "", "{chosen:?}");
    eventually("the update", || {
        (!calls.lock().unwrap().updates.is_empty()).then_some(())
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let c = get(&pair, &unreported).await;
        if !c.terms_refused.is_empty() {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal shown: {c:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        shown
            .terms_refused
            .contains("deleting the controller's data has started"),
        "{shown:#?}"
    );
    // The calls to the processor say which of them did not get through, and why.
    let calls_of = |c: &Contract| -> Vec<(String, i32)> {
        (c.deliveries.iter())
            .map(|d| (d.operation.clone(), d.state))
            .collect()
    };
    let update = (shown.deliveries.iter())
        .find(|d| d.operation == "update")
        .unwrap_or_else(|| panic!("no update among the calls: {shown:#?}"));
    assert_ne!(update.state, DeliveryState::Delivered as i32, "{update:#?}");
    assert!(
        update
            .last_error
            .contains("deleting the controller's data has started"),
        "{update:#?}"
    );
    assert_eq!(
        calls_of(&shown)[0],
        ("deliver".to_string(), DeliveryState::Delivered as i32),
        "{shown:#?}"
    );
    let table = dsrctl(&pair, "operator", &["contracts", "show", &unreported]).await;
    let text = table.ok();
    assert!(
        text.lines()
            .any(|l| l.starts_with("refused by the processor")
                && l.contains("deleting the controller's data has started")),
        "{}",
        table.stdout
    );
    assert!(
        text.lines()
            .any(|l| l.contains("update (the contract end's terms)")
                && (l.contains("PENDING") || l.contains("DEAD_LETTERED"))
                && l.contains("deleting the controller's data has started")),
        "{}",
        table.stdout
    );
    // The other contract end, whose terms the processor took, shows no refusal, and no
    // table of calls, all of which got through.
    let took = get(&pair, &reported).await;
    assert_eq!(took.terms_refused, "");
    assert_eq!(
        calls_of(&took),
        [("deliver".to_string(), DeliveryState::Delivered as i32)],
        "{took:#?}"
    );
    let table = dsrctl(&pair, "operator", &["contracts", "show", &reported]).await;
    assert!(!table.ok().contains("CALL"), "{}", table.stdout);
    pair.stop().await;
}

/// Polls the contract end `id` until `done` holds.
async fn until(pair: &TestPair, id: &str, what: &str, done: impl Fn(&Contract) -> bool) {
    let done = &done;
    eventually_async(what, move || async move {
        done(&get(pair, id).await).then_some(())
    })
    .await
}

/// A contract end cancelled before its effective date: both services, and dsrctl's views of
/// them, show every subprocessor CANCELLED with nothing scheduled (the processor keeps the
/// SCHEDULED phase and the date in its rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contractreg_a_contract_end_cancelled_before_it_started_is_not_shown_scheduled() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    const EFFECTIVE: &str = "2099-01-01T00:00:00Z";
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
            "--effective-at",
            EFFECTIVE,
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let id = ended["contract_id"].as_str().expect("id").to_string();
    let scheduled = |t: &TaskStatus| t.progress.is_some_and(|p| p.scheduled_at.is_some());
    until(&pair, &id, "every part scheduled", |c| {
        !c.tasks.is_empty() && c.tasks.iter().all(scheduled)
    })
    .await;
    let parts = get(&pair, &id).await.tasks.len();

    dsrctl(&pair, "operator", &["cancel", &id, "--reason", "test"])
        .await
        .ok();
    until(&pair, &id, "every part cancelled", |c| {
        c.tasks.len() == parts && (c.tasks.iter()).all(|t| t.state == TaskState::Cancelled as i32)
    })
    .await;
    let at_registry = get(&pair, &id).await;
    assert!(!at_registry.tasks.iter().any(scheduled), "{at_registry:#?}");
    let at_processor = pair
        .processor_operator()
        .list_contract_ends(ListContractEndsRequest::default())
        .await
        .expect("ListContractEnds")
        .into_inner();
    let ce = (at_processor.contract_ends.iter())
        .find(|c| c.request_id == id)
        .expect("the contract end at the processor");
    assert_eq!(ce.tasks.len(), parts, "{ce:#?}");
    for t in &ce.tasks {
        assert_eq!(t.state(), TaskState::Cancelled, "{ce:#?}");
        assert!(!scheduled(t), "{ce:#?}");
    }

    let processor = format!("https://localhost:{}", pair.processor.addr().port());
    let table = dsrctl(
        &pair,
        "operator",
        &["contracts", "scheduled", "--processor", &processor],
    )
    .await;
    let rows: Vec<&str> = table.ok().lines().filter(|l| l.contains(&id)).collect();
    assert_eq!(rows.len(), parts, "{}", table.stdout);
    for row in rows {
        // The effective date, and no date scheduled beside it.
        assert_eq!(row.matches("2099-01-01").count(), 1, "{row}");
        assert!(
            row.contains("CANCELLED") && row.contains("not started"),
            "{row}"
        );
    }
    let shown = dsrctl(
        &pair,
        "operator",
        &["contracts", "show", &id, "--output", "json"],
    )
    .await
    .json();
    for t in shown["tasks"].as_array().expect("tasks") {
        assert_eq!(t["state"], "CANCELLED", "{shown}");
        assert!(t["scheduled_at"].is_null(), "{shown}");
    }
    pair.stop().await;
}
