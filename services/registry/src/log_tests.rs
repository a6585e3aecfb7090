//! Logs never hold a processor's words, which may quote the subject: through the real registry
//! (its server over mutual TLS with the development PKI's certificates, its store on SQLite,
//! and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server, its dispatcher and chain
//! refresher) and a processor served here with the processor's certificate, whose every
//! answer is an error quoting the subject's address, as a holder's message passed on might.
//! The logs show each failure by its code and a keyed hash; the request's delivery (Get) and
//! the operators' chain still show the whole answer.

use std::time::Duration;

use dsrelay_proto::v1::processor_service_server::ProcessorService;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    CancelDeliveryRequest, DeliverRequest, DeliverResponse, DeliveryState, ExtendDueDateRequest,
    GetChainRequest, GetRequest, GetStatusRequest, IdentityEncoding, IdentityType,
    ListSubprocessorsRequest, RequestKind, SubjectIdentity, SubmitRequest, SubprocessorList,
    TaskList, UpdateContractEndRequest,
};
use dsrelay_runtime::testing::{captured_logs, CapturedLogs};
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup, PROCESSOR};

/// The subject's address, which the processor's answers quote; no other test uses it.
const ADDRESS: &str = "liisa.lokitesti@example.fi";
/// What of it no log line may hold.
const LOCAL_PART: &str = "liisa.lokitesti";

/// A processor whose answers quote the subject's address: Deliver is refused as a holder
/// refuses it, ListSubprocessors fails.
struct Quoting;

#[tonic::async_trait]
impl ProcessorService for Quoting {
    async fn deliver(
        &self,
        _req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        Err(Status::failed_precondition(format!(
            "payroll holds no employee {ADDRESS}"
        )))
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
        Err(Status::unavailable(format!("no status for {ADDRESS}")))
    }

    async fn list_subprocessors(
        &self,
        _req: Request<ListSubprocessorsRequest>,
    ) -> Result<Response<SubprocessorList>, Status> {
        Err(Status::internal(format!("the list broke at {ADDRESS}")))
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

/// Serves a registry on `database_url`, its files under `dir`, whose one processor is
/// [`Quoting`]; a refused delivery is sent again within tens of milliseconds and
/// dead-lettered at its second refusal.
async fn start(dir: &std::path::Path, database_url: &str) -> Registry {
    let setup = Setup {
        tables: "[delivery]\npoll_interval_ms = 20\nmax_refusals = 2\n\
                 backoff = { initial_ms = 20, max_ms = 100 }\n"
            .into(),
        ..Setup::default()
    };
    Registry::start(dir, database_url, setup.answered_by(Quoting)).await
}

/// The captured lines, parsed.
fn lines(logs: &CapturedLogs) -> Vec<Value> {
    logs.text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The captured lines whose message starts with `message` and, when `request_id` is given,
/// that were logged about that request.
fn logged(logs: &CapturedLogs, message: &str, request_id: Option<&str>) -> Vec<Value> {
    lines(logs)
        .into_iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .filter(|l| {
            request_id.is_none_or(|id| {
                l["spans"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["request_id"] == id))
            })
        })
        .collect()
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

/// A processor's refusal quoting the subject's address, sent until it is dead-lettered, and
/// its failed ListSubprocessors: the delivery and the chain show the answers whole, the log
/// lines their code and keyed hash. Before the log lines withheld the answers, "delivery
/// failed" and "delivery dead-lettered" carried `FailedPrecondition: payroll holds no
/// employee liisa.lokitesti@example.fi`, and "asking for subprocessors failed" the address
/// too.
async fn a_processors_answer_stays_out_of_the_logs(database_url: &str, dir: &std::path::Path) {
    let logs = captured_logs();
    let registry = start(dir, database_url).await;
    let mut requests = RequestServiceClient::new(registry.channel("partner-crm"));
    let id = requests
        .submit(SubmitRequest {
            kind: RequestKind::Erasure as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: ADDRESS.into(),
                label: String::new(),
            }],
            idempotency_key: format!("logs-{}", fastrand::u64(..)),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    eventually("the delivery dead-lettered", || {
        let mut requests = requests.clone();
        let id = id.clone();
        async move {
            let r = requests
                .get(GetRequest { request_id: id })
                .await
                .expect("get")
                .into_inner();
            r.deliveries
                .first()
                .is_some_and(|d| d.state() == DeliveryState::DeadLettered)
        }
    })
    .await;
    eventually("the dead letter logged", || async {
        !logged(&logs, "delivery dead-lettered", Some(&id)).is_empty()
    })
    .await;
    // This processor's answer (Internal): under `cargo test` other tests' registries log
    // theirs in the same process, failing to connect (Unavailable).
    let chain_failure = || {
        logged(&logs, "asking for subprocessors failed", None)
            .into_iter()
            .find(|l| {
                l["fields"]["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("Internal: "))
            })
    };
    eventually("the chain's failure logged", || async {
        chain_failure().is_some()
    })
    .await;

    // Where the log lines point, operators read the answers whole; the partner reads the
    // delivery's state and attempts, without the processor's answer (internal to the chain).
    let request = requests
        .get(GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(request.deliveries[0].last_error, "", "{request:?}");
    assert!(request.deliveries[0].attempts > 0, "{request:?}");
    let request = RequestServiceClient::new(registry.channel("operator"))
        .get(GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get as the operator")
        .into_inner();
    assert_eq!(
        request.deliveries[0].last_error,
        format!("FailedPrecondition: payroll holds no employee {ADDRESS}")
    );
    let chain = RequestServiceClient::new(registry.channel("operator"))
        .get_chain(GetChainRequest {})
        .await
        .expect("chain")
        .into_inner();
    assert!(
        chain.processors[0].last_error.contains(ADDRESS),
        "{chain:?}"
    );

    let text = logs.text();
    let leak = text.lines().find(|l| l.contains(LOCAL_PART));
    assert!(leak.is_none(), "a log line quotes the processor: {leak:?}");
    // Two refusals: the first is retried and says when; the second dead-letters the row and
    // says only that (it used to log a retry too, which never came).
    let failed = logged(&logs, "delivery failed", Some(&id));
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(failed[0]["fields"]["retry_in_ms"].is_u64(), "{failed:#?}");
    let dead = logged(&logs, "delivery dead-lettered", Some(&id));
    assert_eq!(dead.len(), 1, "{dead:#?}");
    for line in failed.iter().chain(&dead) {
        let error = line["fields"]["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("FailedPrecondition: 52 bytes withheld, keyed hash "),
            "{line}"
        );
    }
    // One text, one hash: the lines of one answer can be matched.
    assert_eq!(failed[0]["fields"]["error"], dead[0]["fields"]["error"]);
    let chain_line = chain_failure().expect("the chain's failure");
    let error = chain_line["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("Internal: ") && error.contains(" bytes withheld, keyed hash "),
        "{chain_line}"
    );
    assert_eq!(chain_line["fields"]["processor"], PROCESSOR);
    registry.stop().await;
}

/// Acknowledgements of requests never delivered to the processor: the log line says why
/// they were rejected and for which request, when the id is one this registry gives, and
/// never the text a processor sent in its place (here the subject's address). Before, it
/// carried only `first_code="PermissionDenied"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_rejected_are_logged_with_their_reason_and_request() {
    use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
    use dsrelay_proto::v1::{AcknowledgeRequest, Acknowledgement, TaskState};

    let logs = captured_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    let registry = start(dir.path(), &url).await;
    let mut acks = AcknowledgementServiceClient::new(registry.channel("processor"));
    let ack = |request_id: &str| Acknowledgement {
        request_id: request_id.into(),
        subprocessor: "accounting".into(),
        sequence: 1,
        state: TaskState::InProgress as i32,
        ..Default::default()
    };
    let unknown = uuid::Uuid::now_v7().to_string();
    for id in [unknown.as_str(), ADDRESS] {
        let answer = acks
            .acknowledge(AcknowledgeRequest {
                acknowledgements: vec![ack(id)],
            })
            .await
            .expect("acknowledge")
            .into_inner();
        assert_eq!(answer.rejected.len(), 1, "{answer:?}");
    }
    // Other tests of the process reject acknowledgements too, of their own requests: this
    // test's lines are the one naming its unknown id and the one with the placeholder (an
    // id that is no UUID, as no other test sends).
    let placeholder = "(not a request id this registry gives)";
    let rejected = logged(&logs, "acknowledgements rejected", None);
    for request_id in [unknown.as_str(), placeholder] {
        let lines: Vec<&Value> = rejected
            .iter()
            .filter(|l| l["fields"]["request_id"] == request_id)
            .collect();
        assert_eq!(lines.len(), 1, "{request_id}: {lines:#?}");
        assert_eq!(
            lines[0]["fields"]["first_code"], "PermissionDenied",
            "{}",
            lines[0]
        );
        assert_eq!(
            lines[0]["fields"]["first_reason"], "not_routed",
            "{}",
            lines[0]
        );
    }
    let leak = logs
        .text()
        .lines()
        .find(|l| l.contains(LOCAL_PART))
        .map(str::to_owned);
    assert!(leak.is_none(), "a log line quotes the processor: {leak:?}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processors_answer_stays_out_of_the_logs_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_processors_answer_stays_out_of_the_logs(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processors_answer_stays_out_of_the_logs_on_postgres() {
    on_postgres(|url, dir| async move {
        a_processors_answer_stays_out_of_the_logs(&url, &dir).await;
    })
    .await;
}

/// A processor that accepts every delivery, reporting no task yet.
struct Accepting;

#[tonic::async_trait]
impl ProcessorService for Accepting {
    async fn deliver(
        &self,
        _req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        Ok(Response::new(DeliverResponse::default()))
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

/// A task acknowledged FAILED, which turns its request FAILED: each is logged once at WARN,
/// with the request, processor and subprocessor and the commands that show and fix it, the
/// processor's reason withheld as a length and a keyed hash; a second FAILED report of the
/// same task (a new sequence, the same failure) logs nothing more. Before, the registry
/// logged nothing when a request failed.
async fn a_failure_is_logged_once_for_the_operator(database_url: &str, dir: &std::path::Path) {
    use dsrelay_proto::v1::{Acknowledgement, RequestState, TaskState};

    let logs = captured_logs();
    let setup = Setup {
        tables: "[delivery]\npoll_interval_ms = 20\n\
                 backoff = { initial_ms = 20, max_ms = 100 }\n"
            .into(),
        ..Setup::default()
    };
    let registry = Registry::start(dir, database_url, setup.answered_by(Accepting)).await;
    let id = registry
        .submit(
            RequestKind::Erasure,
            &format!("failed-{}", fastrand::u64(..)),
        )
        .await;
    eventually("the delivery delivered", || async {
        let r = registry.get(&id).await;
        r.deliveries
            .first()
            .is_some_and(|d| d.state() == DeliveryState::Delivered)
    })
    .await;
    let reason = format!("the holder refused: no such employee {ADDRESS}");
    let failed = |sequence: u64| Acknowledgement {
        request_id: id.clone(),
        subprocessor: "accounting".into(),
        sequence,
        state: TaskState::Failed as i32,
        reason: reason.clone(),
        ..Default::default()
    };
    let answer = registry.acknowledge(vec![failed(1)]).await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    assert_eq!(registry.get(&id).await.state(), RequestState::Failed);
    let answer = registry.acknowledge(vec![failed(2)]).await;
    assert_eq!(answer.applied, 1, "{answer:?}");

    let of_this = |message: &str| -> Vec<Value> {
        lines(&logs)
            .into_iter()
            .filter(|l| l["fields"]["request_id"] == id.as_str())
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .collect()
    };
    let task = of_this("task acknowledged FAILED");
    assert_eq!(task.len(), 1, "{task:#?}");
    let request = of_this("request FAILED");
    assert_eq!(request.len(), 1, "{request:#?}");
    for line in task.iter().chain(&request) {
        assert_eq!(line["level"], "WARN", "{line}");
        assert_eq!(line["fields"]["processor"], PROCESSOR, "{line}");
        assert_eq!(line["fields"]["subprocessor"], "accounting", "{line}");
        let message = line["fields"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("dsrctl get {id}")), "{line}");
        assert!(message.contains("dsrctl tasks retry"), "{line}");
    }
    let withheld = task[0]["fields"]["reason"].as_str().unwrap_or_default();
    assert!(
        withheld.starts_with(&format!("{} bytes withheld, keyed hash ", reason.len())),
        "{}",
        task[0]
    );
    let leak = logs
        .text()
        .lines()
        .find(|l| l.contains(LOCAL_PART))
        .map(str::to_owned);
    assert!(leak.is_none(), "a log line quotes the processor: {leak:?}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_logged_once_for_the_operator_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_failure_is_logged_once_for_the_operator(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_is_logged_once_for_the_operator_on_postgres() {
    on_postgres(|url, dir| async move {
        a_failure_is_logged_once_for_the_operator(&url, &dir).await;
    })
    .await;
}
