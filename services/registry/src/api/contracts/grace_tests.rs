//! ConfirmReturn once the grace period has ended, through the real registry (its server over
//! mutual TLS, its store on SQLite and on PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names
//! a server): the processor deletes unconfirmed returned data at the grace end, so a
//! confirmation after it is refused, as a choice is. The processor is a test double that
//! accepts the contract end's delivery with one task.

use std::time::Duration;

use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::package_service_client::PackageServiceClient;
use dsrelay_proto::v1::processor_service_server::ProcessorService;
use dsrelay_proto::v1::{
    Acknowledgement, CancelDeliveryRequest, CompletePartRequest, ConfirmReturnRequest, Contract,
    ContractEndChoice, ContractPhase, ContractProgress, DeliverRequest, DeliverResponse,
    EndContractRequest, Evidence, ExportFileHeader, ExtendDueDateRequest, GetContractRequest,
    GetPackageRequest, GetStatusRequest, GetUploadStateRequest, ListSubprocessorsRequest,
    PackageInfo, SubprocessorList, TaskList, TaskState, TaskStatus, UpdateContractEndRequest,
};
use sha2::{Digest, Sha256};
use tonic::{Code, Request, Response, Status};

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup, PROCESSOR};

/// A processor that accepts every delivery with its one task, `accounting`, returning.
struct Processor;

#[tonic::async_trait]
impl ProcessorService for Processor {
    async fn deliver(
        &self,
        _req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        Ok(Response::new(DeliverResponse {
            tasks: vec![TaskStatus {
                processor: PROCESSOR.into(),
                subprocessor: "accounting".into(),
                state: TaskState::Pending as i32,
                sequence: 1,
                progress: Some(ContractProgress {
                    phase: ContractPhase::Returning as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }],
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

async fn contract(registry: &Registry, id: &str) -> Contract {
    ContractServiceClient::new(registry.channel("operator"))
        .get_contract(GetContractRequest {
            contract_id: id.into(),
        })
        .await
        .expect("get contract")
        .into_inner()
}

async fn package(registry: &Registry, id: &str) -> PackageInfo {
    PackageServiceClient::new(registry.channel("operator"))
        .get_package(GetPackageRequest {
            request_id: id.into(),
        })
        .await
        .expect("get package")
        .into_inner()
}

async fn confirm(registry: &Registry, id: &str, digest: &str) -> Result<Contract, Status> {
    ContractServiceClient::new(registry.channel("operator"))
        .confirm_return(ConfirmReturnRequest {
            contract_id: id.into(),
            manifest_sha256: digest.into(),
        })
        .await
        .map(Response::into_inner)
}

/// Moves the grace period of contract end `id` to end at `at` (ms), as the clock passing it
/// would, in the registry's store.
async fn grace_ends(database_url: &str, id: &str, at: i64) {
    let db = dsrelay_runtime::store::Db::connect(database_url)
        .await
        .expect("db");
    let sql = format!("UPDATE contracts SET grace_ends_at = {at} WHERE request_id = '{id}'");
    let done = sqlx::query(&sql).execute(&db.pool).await.expect("update");
    assert_eq!(done.rows_affected(), 1);
}

/// A registry whose contract end with `accounting` has its part stored and waits for the
/// confirmation, its id, and the digest of its package's manifest.
async fn returned(database_url: &str, dir: &std::path::Path) -> (Registry, String, String) {
    let setup = Setup {
        tables: "[delivery]\npoll_interval_ms = 20\n\
                 backoff = { initial_ms = 20, max_ms = 100 }\n"
            .into(),
        ..Setup::default()
    }
    .answered_by(Processor);
    let registry = Registry::start(dir, database_url, setup).await;
    let id = ContractServiceClient::new(registry.channel("operator"))
        .end_contract(EndContractRequest {
            processor: PROCESSOR.into(),
            choice: ContractEndChoice::ReturnThenDelete as i32,
            effective_now: true,
            idempotency_key: "grace".into(),
            ..Default::default()
        })
        .await
        .expect("end contract")
        .into_inner()
        .contract_id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while contract(&registry, &id).await.tasks.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // `accounting` stores its part (one empty file) and waits for the confirmation.
    let file = ExportFileHeader {
        request_id: id.clone(),
        subprocessor: "accounting".into(),
        name: "export.json".into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: 0,
        sha256: hex::encode(Sha256::digest(b"")),
    };
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
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
            request_id: id.clone(),
            subprocessor: "accounting".into(),
            files: vec![file],
        })
        .await
        .expect("part stored");
    let answer = registry
        .acknowledge(vec![Acknowledgement {
            request_id: id.clone(),
            subprocessor: "accounting".into(),
            sequence: 2,
            state: TaskState::InProgress as i32,
            evidence: Some(Evidence {
                confirmed: true,
                ..Default::default()
            }),
            progress: Some(ContractProgress {
                phase: ContractPhase::AwaitingConfirmation as i32,
                ..Default::default()
            }),
            ..Default::default()
        }])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    let info = package(&registry, &id).await;
    assert!(info.complete, "{info:?}");
    let digest = hex::encode(Sha256::digest(&info.manifest_json));

    (registry, id, digest)
}

/// A package whose every part is stored and was verified is confirmed in the grace period
/// and not after it, with a message saying when it ended and what became of the data; a
/// confirmation made in time is still answered as done when repeated afterwards. Before,
/// the confirmation after the grace end was accepted, and sent to a processor that had
/// deleted the data unconfirmed by then.
async fn a_return_is_not_confirmed_after_the_grace_period(
    database_url: &str,
    dir: &std::path::Path,
) {
    let (registry, id, digest) = returned(database_url, dir).await;

    // The grace period has ended: refused, saying when and what became of the data.
    let ended = 1_700_000_000_000;
    grace_ends(database_url, &id, ended).await;
    let refused = confirm(&registry, &id, &digest)
        .await
        .expect_err("confirmed after the grace period");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!(
            "the grace period of contract end {id} ended at 2023-11-14T22:13:20Z: the processor \
             deletes the returned data then without a confirmation, and the return can no \
             longer be confirmed"
        )
    );
    let terms = contract(&registry, &id).await.contract_end.expect("terms");
    assert!(!terms.return_confirmed, "{terms:?}");

    // In the grace period the same confirmation is taken, and stays answered once it ended.
    let later = i64::MAX / 2;
    grace_ends(database_url, &id, later).await;
    let confirmed = confirm(&registry, &id, &digest).await.expect("confirmed");
    assert!(
        confirmed.contract_end.is_some_and(|t| t.return_confirmed),
        "not confirmed"
    );
    grace_ends(database_url, &id, ended).await;
    let again = confirm(&registry, &id, &digest)
        .await
        .expect("confirmed again");
    assert!(
        again.contract_end.is_some_and(|t| t.return_confirmed),
        "not confirmed"
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_is_not_confirmed_after_the_grace_period_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_return_is_not_confirmed_after_the_grace_period(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_is_not_confirmed_after_the_grace_period_on_postgres() {
    on_postgres(|url, dir| async move {
        a_return_is_not_confirmed_after_the_grace_period(&url, &dir).await;
    })
    .await;
}

/// The processor's clock decides when its grace period ends: once it reported deleting with
/// no confirmation recorded, a confirmation is refused though the registry's clock has not
/// reached the grace end. Before, it was accepted and the return read as confirmed.
async fn a_return_is_not_confirmed_once_the_processor_deletes(
    database_url: &str,
    dir: &std::path::Path,
) {
    let (registry, id, digest) = returned(database_url, dir).await;
    let answer = registry
        .acknowledge(vec![Acknowledgement {
            request_id: id.clone(),
            subprocessor: "accounting".into(),
            sequence: 3,
            state: TaskState::InProgress as i32,
            progress: Some(ContractProgress {
                phase: ContractPhase::Deleting as i32,
                ..Default::default()
            }),
            ..Default::default()
        }])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    let refused = confirm(&registry, &id, &digest)
        .await
        .expect_err("confirmed while the processor deletes");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!(
            "the processor of contract end {id} has started deleting (accounting) at the end of \
             its grace period without a confirmation: the return can no longer be confirmed"
        )
    );
    let terms = contract(&registry, &id).await.contract_end.expect("terms");
    assert!(!terms.return_confirmed, "{terms:?}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_is_not_confirmed_once_the_processor_deletes_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_return_is_not_confirmed_once_the_processor_deletes(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_is_not_confirmed_once_the_processor_deletes_on_postgres() {
    on_postgres(|url, dir| async move {
        a_return_is_not_confirmed_once_the_processor_deletes(&url, &dir).await;
    })
    .await;
}
