//! What proves data returned, through the real registry: its server over mutual TLS with the
//! development PKI's certificates, its store (SQLite, and PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server) and its package folder. The processor is a
//! test double served here over TLS with the processor's certificate, so that the test
//! decides when a Deliver's answer reaches the registry; the registry's own dispatcher calls
//! it. Its uploads and acknowledgements are made as the real processor makes them.
//!
//! - A package is not complete, nor is a return confirmed, while the processor has not
//!   accepted the delivery: until its answer is recorded the registry knows only the tasks
//!   whose parts or acknowledgements came first, and a confirmation then would have the
//!   processor delete the others' data without returning it.
//! - A RETURN_OF_DATA task is COMPLETED only with its part stored, whatever its
//!   acknowledgement carries; a transfer receipt is refused where nothing is transferred.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::package_service_client::PackageServiceClient;
use dsrelay_proto::v1::processor_service_server::ProcessorService;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    package_chunk, AcknowledgeResponse, Acknowledgement, CancelDeliveryRequest, CancelRequest,
    CompletePartRequest, ConfirmReturnRequest, Contract, ContractEndChoice, ContractPhase,
    ContractProgress, DeliverRequest, DeliverResponse, DeliveryState, DownloadPackageRequest,
    EndContractRequest, Evidence, ExportFileHeader, ExtendDueDateRequest, GetContractRequest,
    GetPackageRequest, GetStatusRequest, GetUploadStateRequest, ListSubprocessorsRequest,
    PackageInfo, RequestKind, RequestState, SubprocessorList, TaskList, TaskState, TaskStatus,
    TransferReceipt, UpdateContractEndRequest,
};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::test_postgres::on_postgres;
use crate::test_registry::{self, Setup, PROCESSOR, RECIPIENT};

/// A processor whose answers to Deliver are lost (UNAVAILABLE, as a connection cut after the
/// processor committed looks to the registry) until [`Processor::answer`] lets them through
/// with the tasks it was given.
#[derive(Clone, Default)]
struct Processor {
    answering: Arc<AtomicBool>,
    delivers: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<TaskStatus>>>,
}

impl Processor {
    /// From now on, Deliver is answered with `tasks`, as the retry of an accepted one is.
    fn answer(&self, tasks: Vec<TaskStatus>) {
        *self.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        self.answering.store(true, Ordering::SeqCst);
    }

    fn delivers(&self) -> usize {
        self.delivers.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl ProcessorService for Processor {
    async fn deliver(
        &self,
        _req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.delivers.fetch_add(1, Ordering::SeqCst);
        if !self.answering.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the answer was lost on its way"));
        }
        Ok(Response::new(DeliverResponse {
            tasks: self.tasks.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            duplicate: true,
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
        _req: Request<GetStatusRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unavailable("not in this test"))
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
        Ok(Response::new(TaskList {
            request_id: req.into_inner().request_id,
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

/// A running registry and its processor, stopped by [`Registry::stop`].
struct Registry {
    registry: test_registry::Registry,
    processor: Processor,
}

impl std::ops::Deref for Registry {
    type Target = test_registry::Registry;

    fn deref(&self) -> &Self::Target {
        &self.registry
    }
}

impl Registry {
    /// Serves a registry on `database_url`, its files under `dir`, whose one processor is a
    /// [`Processor`] served here; deliveries are retried within a few tens of milliseconds.
    async fn start(dir: &std::path::Path, database_url: &str) -> Self {
        let processor = Processor::default();
        let setup = Setup {
            tables: "[delivery]\npoll_interval_ms = 20\n\
                     backoff = { initial_ms = 20, max_ms = 100 }\n"
                .into(),
            ..Setup::default()
        };
        let setup = setup.answered_by(processor.clone());
        let registry = test_registry::Registry::start(dir, database_url, setup).await;
        Self {
            registry,
            processor,
        }
    }

    fn contracts(&self) -> ContractServiceClient<Channel> {
        ContractServiceClient::new(self.channel("operator"))
    }

    async fn contract(&self, id: &str) -> Contract {
        self.contracts()
            .get_contract(GetContractRequest {
                contract_id: id.into(),
            })
            .await
            .expect("get contract")
            .into_inner()
    }

    /// The package of `id`, read as `stem` (the partner that asked, or an operator).
    async fn package(&self, stem: &str, id: &str) -> PackageInfo {
        PackageServiceClient::new(self.channel(stem))
            .get_package(GetPackageRequest {
                request_id: id.into(),
            })
            .await
            .expect("get package")
            .into_inner()
    }

    /// DownloadPackage's refusal, as `stem`.
    async fn download_refused(&self, stem: &str, id: &str) -> Status {
        match PackageServiceClient::new(self.channel(stem))
            .download_package(DownloadPackageRequest {
                request_id: id.into(),
            })
            .await
        {
            Ok(_) => panic!("the package of {id} was sent"),
            Err(status) => status,
        }
    }

    /// Stores `subprocessor`'s part of `id`, of one empty file (stored whole as soon as it
    /// is announced, so no upload stream is needed).
    async fn store_part(&self, id: &str, subprocessor: &str) {
        let mut uploads = ExportUploadServiceClient::new(self.channel("processor"));
        let file = ExportFileHeader {
            request_id: id.into(),
            subprocessor: subprocessor.into(),
            name: "export.json".into(),
            media_type: "application/json".into(),
            categories: vec!["contact".into()],
            size: 0,
            sha256: hex::encode(Sha256::digest(b"")),
        };
        let state = uploads
            .get_upload_state(GetUploadStateRequest {
                header: Some(file.clone()),
            })
            .await
            .expect("upload state")
            .into_inner();
        assert!(state.complete, "{state:?}");
        uploads
            .complete_part(CompletePartRequest {
                request_id: id.into(),
                subprocessor: subprocessor.into(),
                files: vec![file],
            })
            .await
            .expect("part stored");
    }

    async fn stop(self) {
        self.registry.stop().await;
    }
}

/// Waits up to 20 s for `check` to hold.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A recipient's receipt of `subprocessor`'s part of `id`, well-formed.
fn receipt(id: &str, subprocessor: &str, recipient: &str) -> TransferReceipt {
    TransferReceipt {
        request_id: id.into(),
        subprocessor: subprocessor.into(),
        manifest_sha256: "ab".repeat(32),
        bytes: 0,
        files: 1,
        received_at: None,
        recipient: recipient.into(),
        ..Default::default()
    }
}

/// A contract end's task at `sequence`, its part returned and waiting for the confirmation,
/// with `receipt` if any.
fn awaiting(
    id: &str,
    subprocessor: &str,
    sequence: u64,
    receipt: Option<TransferReceipt>,
) -> Acknowledgement {
    Acknowledgement {
        request_id: id.into(),
        subprocessor: subprocessor.into(),
        sequence,
        state: TaskState::InProgress as i32,
        evidence: Some(Evidence {
            confirmed: true,
            transfer_receipt: receipt,
            ..Default::default()
        }),
        progress: Some(ContractProgress {
            phase: ContractPhase::AwaitingConfirmation as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The processor's report of a task, as a Deliver's answer carries it.
fn report(subprocessor: &str, sequence: u64, state: TaskState, phase: ContractPhase) -> TaskStatus {
    TaskStatus {
        processor: PROCESSOR.into(),
        subprocessor: subprocessor.into(),
        state: state as i32,
        sequence,
        progress: Some(ContractProgress {
            phase: phase as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Ends the contract with the processor, RETURN_THEN_DELETE now, to `recipient` (empty: as
/// a package), and waits until its Deliver was tried and its answer lost.
async fn end_contract(registry: &Registry, key: &str, recipient: &str) -> String {
    let id = registry
        .contracts()
        .end_contract(EndContractRequest {
            processor: PROCESSOR.into(),
            choice: ContractEndChoice::ReturnThenDelete as i32,
            effective_now: true,
            idempotency_key: key.into(),
            transfer_recipient: recipient.into(),
            ..Default::default()
        })
        .await
        .expect("end contract")
        .into_inner()
        .contract_id;
    eventually("the Deliver tried", || async {
        registry.processor.delivers() > 0
    })
    .await;
    id
}

/// The SHA-256 of a package's manifest, as ConfirmReturn takes it.
fn digest(info: &PackageInfo) -> String {
    hex::encode(Sha256::digest(&info.manifest_json))
}

async fn confirm(registry: &Registry, id: &str, digest: &str) -> Result<Contract, Status> {
    registry
        .contracts()
        .confirm_return(ConfirmReturnRequest {
            contract_id: id.into(),
            manifest_sha256: digest.into(),
        })
        .await
        .map(Response::into_inner)
}

/// The processor accepted the contract end, but its answer was lost, and the delivery waits
/// for a retry. Its subprocessor `accounting` exported, stored its part and reported
/// AWAITING_CONFIRMATION; `mail`, still PENDING there, has sent nothing. The registry knows
/// one task, with its part: the package is not complete for all that, nor is the return
/// confirmed, until the retried Deliver's answer brings `mail` and `mail` returns its part.
/// Measured before, GetPackage said complete and ConfirmReturn was accepted, and the
/// processor, finding the return confirmed, would have deleted `mail`'s data unreturned.
async fn a_contract_end_package_waits_for_the_processors_delivery(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url).await;
    let id = end_contract(&registry, "package-before-delivery", "").await;

    // Its first report of the task came through, so the registry takes the task's part.
    let returning = Acknowledgement {
        progress: Some(ContractProgress {
            phase: ContractPhase::Returning as i32,
            ..Default::default()
        }),
        evidence: None,
        ..awaiting(&id, "accounting", 1, None)
    };
    assert_eq!(registry.acknowledge(vec![returning]).await.applied, 1);
    registry.store_part(&id, "accounting").await;
    // A receipt proves nothing here: the data comes to the registry, not to a recipient.
    let answer = registry
        .acknowledge(vec![awaiting(
            &id,
            "accounting",
            2,
            Some(receipt(&id, "accounting", "nobody")),
        )])
        .await;
    assert_eq!(answer.applied, 0, "{answer:?}");
    assert_eq!(answer.rejected.len(), 1, "{answer:?}");
    let rejected = &answer.rejected[0];
    assert_eq!(rejected.code, Code::InvalidArgument as i32, "{rejected:?}");
    assert_eq!(
        rejected.violations[0].field, "acknowledgements[0].evidence.transfer_receipt",
        "{rejected:?}"
    );
    assert!(
        rejected.violations[0]
            .rule
            .contains("terms name no transfer recipient"),
        "{rejected:?}"
    );
    let answer = registry
        .acknowledge(vec![awaiting(&id, "accounting", 2, None)])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");

    // One part stored, none missing among the tasks known: not complete all the same.
    let info = registry.package("operator", &id).await;
    assert_eq!(info.files.len(), 1, "{info:?}");
    assert!(info.missing.is_empty(), "{info:?}");
    assert!(
        !info.complete,
        "complete before the processor's delivery: {info:?}"
    );
    let refused = registry.download_refused("operator", &id).await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains(PROCESSOR)
            && refused
                .message()
                .contains("not accepted the request's delivery"),
        "{refused:?}"
    );
    let refused = confirm(&registry, &id, &digest(&info))
        .await
        .expect_err("confirmed before the processor's delivery");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains(PROCESSOR)
            && refused
                .message()
                .contains("not accepted the request's delivery"),
        "{refused:?}"
    );
    let terms = registry.contract(&id).await.contract_end.expect("terms");
    assert!(!terms.return_confirmed, "{terms:?}");

    // The retried Deliver is answered: the processor's tasks, `mail`'s among them.
    registry.processor.answer(vec![
        report(
            "accounting",
            2,
            TaskState::InProgress,
            ContractPhase::AwaitingConfirmation,
        ),
        report("mail", 1, TaskState::Pending, ContractPhase::Returning),
    ]);
    eventually("the Deliver's answer recorded", || async {
        registry.contract(&id).await.tasks.len() == 2
    })
    .await;
    let info = registry.package("operator", &id).await;
    assert!(!info.complete, "{info:?}");
    assert_eq!(info.missing, [format!("{PROCESSOR}/mail")], "{info:?}");
    let refused = confirm(&registry, &id, &digest(&info))
        .await
        .expect_err("confirmed without mail's part");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains(&format!("{PROCESSOR}/mail")),
        "{refused:?}"
    );
    assert!(
        !refused.message().contains("not accepted"),
        "the delivery is accepted now: {refused:?}"
    );

    // `mail` returns its part: now the package is all of the data, and is confirmed.
    registry.store_part(&id, "mail").await;
    let answer = registry
        .acknowledge(vec![awaiting(&id, "mail", 2, None)])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    let info = registry.package("operator", &id).await;
    assert!(info.complete, "{info:?}");
    assert_eq!(info.files.len(), 2, "{info:?}");
    // The package's time runs from the confirmation: the contract end may stay unfinished
    // for years (PARTIALLY_COMPLETED while holders retain data by law).
    let store = crate::store::Store::new(
        dsrelay_runtime::store::Db::connect(database_url)
            .await
            .unwrap(),
        b"test key",
    );
    let far = i64::MAX / 2;
    assert!(store.packages_to_expire(far, 10).await.unwrap().is_empty());
    assert!(info.expires_at.is_none(), "{info:?}");
    let confirmed = confirm(&registry, &id, &digest(&info))
        .await
        .expect("confirmed");
    assert_ne!(confirmed.state, RequestState::Completed as i32);
    assert!(
        confirmed.contract_end.is_some_and(|t| t.return_confirmed),
        "not confirmed"
    );
    assert_eq!(
        store.packages_to_expire(far, 10).await.unwrap(),
        vec![id.clone()]
    );
    // And GetPackage says when.
    let info = registry.package("operator", &id).await;
    assert!(info.expires_at.is_some(), "{info:?}");
    registry.stop().await;
}

/// The same for a return to a transfer recipient, proven by receipts: the receipt of every
/// task the registry knows does not confirm the return while the processor's delivery, and
/// so the list of its tasks, is still to come.
async fn a_transfer_waits_for_the_processors_delivery(database_url: &str, dir: &std::path::Path) {
    let registry = Registry::start(dir, database_url).await;
    let id = end_contract(&registry, "transfer-before-delivery", RECIPIENT).await;

    // Here a receipt is the proof, and is taken.
    let answer = registry
        .acknowledge(vec![awaiting(
            &id,
            "accounting",
            2,
            Some(receipt(&id, "accounting", RECIPIENT)),
        )])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    let refused = confirm(&registry, &id, "")
        .await
        .expect_err("confirmed before the processor's delivery");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains(PROCESSOR)
            && refused
                .message()
                .contains("not accepted the contract end's delivery"),
        "{refused:?}"
    );

    registry.processor.answer(vec![
        report(
            "accounting",
            2,
            TaskState::InProgress,
            ContractPhase::AwaitingConfirmation,
        ),
        report("mail", 1, TaskState::Pending, ContractPhase::Returning),
    ]);
    eventually("the Deliver's answer recorded", || async {
        registry.contract(&id).await.tasks.len() == 2
    })
    .await;
    let refused = confirm(&registry, &id, "")
        .await
        .expect_err("confirmed without mail's receipt");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("no receipt yet for mail")
            && !refused.message().contains("not accepted"),
        "{refused:?}"
    );

    let answer = registry
        .acknowledge(vec![awaiting(
            &id,
            "mail",
            2,
            Some(receipt(&id, "mail", RECIPIENT)),
        )])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    let confirmed = confirm(&registry, &id, "").await.expect("confirmed");
    assert!(
        confirmed.contract_end.is_some_and(|t| t.return_confirmed),
        "not confirmed"
    );
    registry.stop().await;
}

/// A return of data's COMPLETED without its part stored is refused whether or not the
/// acknowledgement carries a transfer receipt, and a receipt on a return of data is refused
/// as such. Measured before, the same COMPLETED with any well-formed receipt was applied: the
/// request read COMPLETED and its package complete with no file.
async fn a_return_of_data_is_completed_only_with_its_part(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url).await;
    registry.processor.answer(vec![TaskStatus {
        processor: PROCESSOR.into(),
        subprocessor: "crm".into(),
        state: TaskState::Pending as i32,
        sequence: 1,
        ..Default::default()
    }]);
    let id = registry
        .submit(RequestKind::ReturnOfData, "return-with-a-receipt")
        .await;
    let get = || registry.get(&id);
    eventually("the Deliver's answer recorded", || async {
        get().await.tasks.len() == 1
    })
    .await;
    let completed = |receipt: Option<TransferReceipt>| Acknowledgement {
        request_id: id.clone(),
        subprocessor: "crm".into(),
        sequence: 2,
        state: TaskState::Completed as i32,
        evidence: Some(Evidence {
            records_affected: 1,
            confirmed: true,
            transfer_receipt: receipt,
            ..Default::default()
        }),
        ..Default::default()
    };
    let fields = |answer: &AcknowledgeResponse| -> Vec<String> {
        assert_eq!(answer.applied, 0, "{answer:?}");
        assert_eq!(answer.rejected.len(), 1, "{answer:?}");
        assert_eq!(
            answer.rejected[0].code,
            Code::InvalidArgument as i32,
            "{answer:?}"
        );
        (answer.rejected[0].violations.iter())
            .map(|v| v.field.clone())
            .collect()
    };

    let answer = registry.acknowledge(vec![completed(None)]).await;
    assert_eq!(fields(&answer), ["acknowledgements[0].state"]);
    let answer = registry
        .acknowledge(vec![completed(Some(receipt(&id, "crm", "nobody")))])
        .await;
    assert_eq!(
        fields(&answer),
        [
            "acknowledgements[0].state",
            "acknowledgements[0].evidence.transfer_receipt"
        ]
    );
    let rule = &answer.rejected[0].violations[1].rule;
    assert!(
        rule.contains("a RETURN_OF_DATA request transfers nothing"),
        "{rule}"
    );
    let shown = get().await;
    assert_ne!(shown.state(), RequestState::Completed, "{shown:?}");
    assert_eq!(shown.tasks[0].state(), TaskState::Pending, "{shown:?}");
    let info = registry.package("partner-crm", &id).await;
    assert!(!info.complete, "{info:?}");
    assert_eq!(info.missing, [format!("{PROCESSOR}/crm")], "{info:?}");

    // With the part stored, the receipt alone is wrong; without it, COMPLETED is applied.
    registry.store_part(&id, "crm").await;
    let answer = registry
        .acknowledge(vec![completed(Some(receipt(&id, "crm", "nobody")))])
        .await;
    assert_eq!(
        fields(&answer),
        ["acknowledgements[0].evidence.transfer_receipt"]
    );
    let answer = registry.acknowledge(vec![completed(None)]).await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    assert_eq!(get().await.state(), RequestState::Completed);
    let info = registry.package("partner-crm", &id).await;
    assert!(info.complete && info.files.len() == 1, "{info:?}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_end_package_waits_for_the_processors_delivery_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_contract_end_package_waits_for_the_processors_delivery(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_end_package_waits_for_the_processors_delivery_on_postgres() {
    on_postgres(|url, dir| async move {
        a_contract_end_package_waits_for_the_processors_delivery(&url, &dir).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_waits_for_the_processors_delivery_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_transfer_waits_for_the_processors_delivery(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_waits_for_the_processors_delivery_on_postgres() {
    on_postgres(|url, dir| async move {
        a_transfer_waits_for_the_processors_delivery(&url, &dir).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_of_data_is_completed_only_with_its_part_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_return_of_data_is_completed_only_with_its_part(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_of_data_is_completed_only_with_its_part_on_postgres() {
    on_postgres(|url, dir| async move {
        a_return_of_data_is_completed_only_with_its_part(&url, &dir).await;
    })
    .await;
}

/// A contract end whose every return ended without its part (both holders FAILED): nothing
/// will come, and the package is never complete. A download names the failed returns;
/// before, it said "the request is still open", which tells the operator nothing to act on.
/// (ConfirmReturn is refused as the contract end has finished FAILED.)
async fn a_contract_end_whose_returns_all_failed_says_so(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url).await;
    let id = end_contract(&registry, "all-returns-failed", "").await;
    registry.processor.answer(vec![
        report(
            "accounting",
            1,
            TaskState::Pending,
            ContractPhase::Returning,
        ),
        report("mail", 1, TaskState::Pending, ContractPhase::Returning),
    ]);
    eventually("the Deliver's answer recorded", || async {
        registry.contract(&id).await.tasks.len() == 2
    })
    .await;
    let failed = |subprocessor: &str| Acknowledgement {
        request_id: id.clone(),
        subprocessor: subprocessor.into(),
        sequence: 2,
        state: TaskState::Failed as i32,
        reason: "the holder is gone".into(),
        progress: Some(ContractProgress {
            phase: ContractPhase::Returning as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = registry
        .acknowledge(vec![failed("accounting"), failed("mail")])
        .await;
    assert_eq!(answer.applied, 2, "{answer:?}");
    let info = registry.package("operator", &id).await;
    assert!(!info.complete, "{info:?}");
    let named = |sub: &str| format!("{PROCESSOR}/{sub}");
    assert_eq!(info.not_returned, [named("accounting"), named("mail")]);
    let refused = registry.download_refused("operator", &id).await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    for sub in ["accounting", "mail"] {
        let named = format!("{PROCESSOR}/{sub} (FAILED)");
        assert!(refused.message().contains(&named), "{refused:?}");
    }
    assert!(
        refused.message().contains("ended without their parts"),
        "{refused:?}"
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_end_whose_returns_all_failed_says_so_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_contract_end_whose_returns_all_failed_says_so(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_end_whose_returns_all_failed_says_so_on_postgres() {
    on_postgres(|url, dir| async move {
        a_contract_end_whose_returns_all_failed_says_so(&url, &dir).await;
    })
    .await;
}

/// A return of data one of whose holders failed: the package is complete with the other's
/// part, and says whose data it lacks, in GetPackage and in manifest.json. Measured before,
/// it read complete with nothing to tell the lack (a FAILED return of data's package even
/// downloaded as an empty package, verified).
async fn a_return_of_data_names_the_holders_whose_part_will_not_come(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url).await;
    let pending = |subprocessor: &str| TaskStatus {
        processor: PROCESSOR.into(),
        subprocessor: subprocessor.into(),
        state: TaskState::Pending as i32,
        sequence: 1,
        ..Default::default()
    };
    registry
        .processor
        .answer(vec![pending("crm"), pending("mail")]);
    let id = registry
        .submit(RequestKind::ReturnOfData, "one-return-failed")
        .await;
    let get = || registry.get(&id);
    eventually("the Deliver's answer recorded", || async {
        get().await.tasks.len() == 2
    })
    .await;
    registry.store_part(&id, "crm").await;
    let ack = |subprocessor: &str, state: TaskState| Acknowledgement {
        request_id: id.clone(),
        subprocessor: subprocessor.into(),
        sequence: 2,
        state: state as i32,
        reason: if state == TaskState::Failed {
            "the holder is gone".into()
        } else {
            String::new()
        },
        evidence: (state == TaskState::Completed).then(|| Evidence {
            records_affected: 1,
            confirmed: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = registry
        .acknowledge(vec![
            ack("crm", TaskState::Completed),
            ack("mail", TaskState::Failed),
        ])
        .await;
    assert_eq!(answer.applied, 2, "{answer:?}");
    assert_eq!(get().await.state(), RequestState::Failed);
    let info = registry.package("partner-crm", &id).await;
    assert!(info.complete && info.files.len() == 1, "{info:?}");
    assert_eq!(info.not_returned, [format!("{PROCESSOR}/mail")], "{info:?}");
    let manifest: serde_json::Value = serde_json::from_slice(&info.manifest_json).unwrap();
    assert_eq!(
        manifest["not_returned"],
        serde_json::json!([{"processor": PROCESSOR, "subprocessor": "mail", "state": "FAILED"}]),
        "{manifest}"
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_of_data_names_the_holders_whose_part_will_not_come_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_return_of_data_names_the_holders_whose_part_will_not_come(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_of_data_names_the_holders_whose_part_will_not_come_on_postgres() {
    on_postgres(|url, dir| async move {
        a_return_of_data_names_the_holders_whose_part_will_not_come(&url, &dir).await;
    })
    .await;
}

/// Cancels request `id` as `stem` (a partner, or an operator).
async fn cancel(registry: &Registry, stem: &str, id: &str) {
    RequestServiceClient::new(registry.channel(stem))
        .cancel(CancelRequest {
            request_id: id.into(),
            reason: "asked by mistake".into(),
        })
        .await
        .expect("cancel");
}

/// Reads the whole of DownloadPackage of `id` as `stem`: the description it opened with and
/// the number of file chunks after it, the stream ended OK.
async fn download(registry: &Registry, stem: &str, id: &str) -> (PackageInfo, usize) {
    let mut stream = PackageServiceClient::new(registry.channel(stem))
        .download_package(DownloadPackageRequest {
            request_id: id.into(),
        })
        .await
        .expect("download")
        .into_inner();
    let mut info = None;
    let mut chunks = 0;
    while let Some(chunk) = stream.message().await.expect("a chunk") {
        match chunk.item {
            Some(package_chunk::Item::Info(i)) => {
                assert!(info.is_none(), "a second description: {i:?}");
                info = Some(i);
            }
            Some(package_chunk::Item::File(_)) => chunks += 1,
            None => panic!("an empty chunk"),
        }
    }
    (info.expect("the description first"), chunks)
}

/// A return of data, and a contract end, cancelled while their processor had not accepted
/// the delivery (its answers lost, as when it is stopped): the processor was never asked for
/// the data, so the package is not complete and never will be, and DownloadPackage says so,
/// naming the processor. Measured before, the return of data's package read complete and
/// empty, and downloaded as an empty package: a "no data" nobody had answered.
async fn a_package_cancelled_before_its_delivery_was_accepted_is_never_complete(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url).await;
    let id = registry
        .submit(RequestKind::ReturnOfData, "cancelled-before-delivery")
        .await;
    eventually("the Deliver tried", || async {
        registry.processor.delivers() > 0
    })
    .await;
    cancel(&registry, "partner-crm", &id).await;
    let shown = registry.get(&id).await;
    assert_eq!(shown.state(), RequestState::Cancelled, "{shown:?}");
    assert_eq!(
        shown.deliveries[0].state(),
        DeliveryState::Cancelled,
        "{shown:?}"
    );
    let info = registry.package("partner-crm", &id).await;
    assert!(!info.complete, "{info:?}");
    assert!(info.files.is_empty(), "{info:?}");
    assert!(info.missing.is_empty(), "{info:?}");
    assert!(info.not_returned.is_empty(), "{info:?}");
    assert!(info.expires_at.is_some(), "{info:?}");
    assert_eq!(info.never_asked, [PROCESSOR], "{info:?}");
    let never_asked = |status: &Status| {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let message = status.message();
        assert!(
            message.contains(&format!(
                "the request was cancelled before processor(s) {PROCESSOR} accepted its \
                 delivery, so they were never asked for the data and this package will never \
                 be complete"
            )),
            "{status:?}"
        );
        assert!(!message.contains("still open"), "{status:?}");
    };
    never_asked(&registry.download_refused("partner-crm", &id).await);

    // A contract end an operator cancelled before its processor accepted it: its package
    // was never complete (no part), but a download said the request was still open.
    let contract = end_contract(&registry, "contract-cancelled-before-delivery", "").await;
    cancel(&registry, "operator", &contract).await;
    let info = registry.package("operator", &contract).await;
    assert!(!info.complete, "{info:?}");
    assert_eq!(info.never_asked, [PROCESSOR], "{info:?}");
    never_asked(&registry.download_refused("operator", &contract).await);

    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_cancelled_before_its_delivery_was_accepted_is_never_complete_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_package_cancelled_before_its_delivery_was_accepted_is_never_complete(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_cancelled_before_its_delivery_was_accepted_is_never_complete_on_postgres() {
    on_postgres(|url, dir| async move {
        a_package_cancelled_before_its_delivery_was_accepted_is_never_complete(&url, &dir).await;
    })
    .await;
}

/// A return of data cancelled after its processor accepted it: until the processor reports
/// its task, the package waits for its part; once the task ended CANCELLED without one, the
/// package is complete, lists the holder as not returned (in GetPackage and manifest.json,
/// state CANCELLED) and downloads as such, as package.proto documents.
async fn a_package_cancelled_after_its_delivery_was_accepted_lists_the_cancelled_task(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url).await;
    registry.processor.answer(vec![TaskStatus {
        processor: PROCESSOR.into(),
        subprocessor: "crm".into(),
        state: TaskState::Pending as i32,
        sequence: 1,
        ..Default::default()
    }]);
    let id = registry
        .submit(RequestKind::ReturnOfData, "cancelled-after-delivery")
        .await;
    eventually("the Deliver's answer recorded", || async {
        registry.get(&id).await.tasks.len() == 1
    })
    .await;
    cancel(&registry, "partner-crm", &id).await;
    let info = registry.package("partner-crm", &id).await;
    assert!(!info.complete, "{info:?}");
    let crm = format!("{PROCESSOR}/crm");
    assert_eq!(info.missing, std::slice::from_ref(&crm), "{info:?}");
    assert!(info.never_asked.is_empty(), "{info:?}");
    let refused = registry.download_refused("partner-crm", &id).await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&format!("the parts of {crm} are not stored yet")),
        "{refused:?}"
    );
    assert!(!refused.message().contains("never asked"), "{refused:?}");

    let answer = registry
        .acknowledge(vec![Acknowledgement {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            sequence: 2,
            state: TaskState::Cancelled as i32,
            ..Default::default()
        }])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    let info = registry.package("partner-crm", &id).await;
    assert!(info.complete, "{info:?}");
    assert!(info.files.is_empty() && info.missing.is_empty(), "{info:?}");
    assert_eq!(info.not_returned, [crm], "{info:?}");
    let manifest: serde_json::Value = serde_json::from_slice(&info.manifest_json).unwrap();
    assert_eq!(
        manifest["not_returned"],
        serde_json::json!([{"processor": PROCESSOR, "subprocessor": "crm", "state": "CANCELLED"}]),
        "{manifest}"
    );
    let (sent, chunks) = download(&registry, "partner-crm", &id).await;
    assert_eq!(sent, info);
    assert_eq!(chunks, 0);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_cancelled_after_its_delivery_was_accepted_lists_the_cancelled_task_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_package_cancelled_after_its_delivery_was_accepted_lists_the_cancelled_task(&url, dir.path())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_cancelled_after_its_delivery_was_accepted_lists_the_cancelled_task_on_postgres()
{
    on_postgres(|url, dir| async move {
        a_package_cancelled_after_its_delivery_was_accepted_lists_the_cancelled_task(&url, &dir)
            .await;
    })
    .await;
}
