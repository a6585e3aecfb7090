//! The calls that follow a Deliver (an extended due date, a cancellation) show in Get as
//! their own deliveries, PENDING with why until the processor takes them: through the real
//! registry (its server over mutual TLS with the development PKI, its store on SQLite, and
//! PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server, its dispatcher) and a processor
//! served here that accepts every Deliver and answers the calls that follow only once let.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::processor_service_server::ProcessorService;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    CancelDeliveryRequest, CancelRequest, DeliverRequest, DeliverResponse, Delivery, DeliveryState,
    ExtendDeadlineRequest, ExtendDueDateRequest, GetRequest, GetStatusRequest,
    ListSubprocessorsRequest, Request as RequestView, RequestKind, SubprocessorList, TaskList,
    TaskState, TaskStatus, UpdateContractEndRequest,
};
use tonic::{Request, Response, Status};

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup, PROCESSOR};

/// What the processor answers a call that follows a Deliver while it is shut.
const SHUT: &str = "the processor takes no follow-up calls yet";

/// A processor that accepts every Deliver with one task in progress, and refuses an
/// extension or a cancellation as unavailable until `open`.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<AtomicBool>,
    /// Cancellations are refused (FAILED_PRECONDITION), which dead-letters them.
    refuse_cancel: bool,
}

impl Gate {
    fn answer(&self, request_id: String, state: TaskState) -> Result<Response<TaskList>, Status> {
        if !self.open.load(Ordering::SeqCst) {
            return Err(Status::unavailable(SHUT));
        }
        Ok(Response::new(TaskList {
            request_id,
            tasks: vec![task(state)],
        }))
    }
}

fn task(state: TaskState) -> TaskStatus {
    TaskStatus {
        processor: PROCESSOR.into(),
        subprocessor: "payroll".into(),
        state: state as i32,
        sequence: 1,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ProcessorService for Gate {
    async fn deliver(
        &self,
        _req: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        Ok(Response::new(DeliverResponse {
            tasks: vec![task(TaskState::InProgress)],
            duplicate: false,
        }))
    }

    async fn cancel(
        &self,
        req: Request<CancelDeliveryRequest>,
    ) -> Result<Response<TaskList>, Status> {
        if self.refuse_cancel {
            return Err(Status::failed_precondition("this processor cannot cancel"));
        }
        self.answer(req.into_inner().request_id, TaskState::Cancelled)
    }

    async fn get_status(
        &self,
        _req: Request<GetStatusRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn list_subprocessors(
        &self,
        _req: Request<ListSubprocessorsRequest>,
    ) -> Result<Response<SubprocessorList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn update_contract_end(
        &self,
        _req: Request<UpdateContractEndRequest>,
    ) -> Result<Response<TaskList>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn extend_due_date(
        &self,
        req: Request<ExtendDueDateRequest>,
    ) -> Result<Response<TaskList>, Status> {
        self.answer(req.into_inner().request_id, TaskState::InProgress)
    }
}

/// Request `id` as the operator reads it.
async fn get(registry: &Registry, id: &str) -> RequestView {
    RequestServiceClient::new(registry.channel("operator"))
        .get(GetRequest {
            request_id: id.into(),
        })
        .await
        .expect("get")
        .into_inner()
}

/// Waits up to 20 s for request `id` to satisfy `check`; the request as it then stands.
async fn eventually(
    registry: &Registry,
    id: &str,
    what: &str,
    check: impl Fn(&RequestView) -> bool,
) -> RequestView {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let request = get(registry, id).await;
        if check(&request) {
            return request;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {what}: {request:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The follow-up call `operation` of `request`.
fn follow_up<'r>(request: &'r RequestView, operation: &str) -> Option<&'r Delivery> {
    (request.follow_up_deliveries.iter()).find(|d| d.operation == operation)
}

fn is(d: Option<&Delivery>, state: DeliveryState) -> bool {
    d.is_some_and(|d| d.state == state as i32)
}

/// An extension and then a cancellation of a delivered request, each PENDING with the
/// processor's answer while it refuses them and DELIVERED once it takes them; the Deliver
/// stays the one row of `deliveries`. Before, Get showed the Deliver alone: nothing said
/// that the processor had not got the new due date or the cancellation.
async fn follow_up_calls_show_until_the_processor_has_them(url: &str, dir: &std::path::Path) {
    let gate = Gate::default();
    let setup = Setup {
        tables: "[delivery]\npoll_interval_ms = 20\n\
                 backoff = { initial_ms = 20, max_ms = 100 }\n"
            .into(),
        ..Setup::default()
    }
    .answered_by(gate.clone());
    let registry = Registry::start(dir, url, setup).await;
    let id = registry.submit(RequestKind::Erasure, "follow-ups").await;
    let delivered = eventually(&registry, &id, "delivered", |r| {
        r.deliveries.len() == 1 && r.deliveries[0].state == DeliveryState::Delivered as i32
    })
    .await;
    assert_eq!(delivered.deliveries[0].operation, "deliver");
    assert!(delivered.follow_up_deliveries.is_empty(), "{delivered:#?}");

    let mut operator = RequestServiceClient::new(registry.channel("operator"));
    operator
        .extend_deadline(ExtendDeadlineRequest {
            request_id: id.clone(),
            months: 1,
            reason: "the holder's archive is offline".into(),
        })
        .await
        .expect("extend");
    let refused = eventually(&registry, &id, "the extension refused", |r| {
        follow_up(r, "extend").is_some_and(|d| d.attempts >= 2)
    })
    .await;
    let extend = follow_up(&refused, "extend").expect("extend row");
    assert_eq!(extend.processor, PROCESSOR);
    assert_eq!(extend.state, DeliveryState::Pending as i32, "{extend:#?}");
    assert!(extend.last_error.contains(SHUT), "{extend:#?}");
    assert!(extend.next_attempt_at.is_some(), "{extend:#?}");
    assert!(extend.delivered_at.is_none(), "{extend:#?}");
    assert_eq!(refused.deliveries.len(), 1, "{refused:#?}");
    // A partner sees that the call waits, not why.
    let partner_view = registry.get(&id).await;
    let partner_extend = follow_up(&partner_view, "extend").expect("extend row");
    assert!(partner_extend.last_error.is_empty(), "{partner_extend:#?}");

    gate.open.store(true, Ordering::SeqCst);
    eventually(&registry, &id, "the extension delivered", |r| {
        is(follow_up(r, "extend"), DeliveryState::Delivered)
    })
    .await;

    gate.open.store(false, Ordering::SeqCst);
    operator
        .cancel(CancelRequest {
            request_id: id.clone(),
            reason: "the subject withdrew".into(),
        })
        .await
        .expect("cancel");
    let waiting = eventually(&registry, &id, "the cancellation refused", |r| {
        follow_up(r, "cancel").is_some_and(|d| d.attempts >= 1)
    })
    .await;
    assert!(
        is(follow_up(&waiting, "cancel"), DeliveryState::Pending),
        "{waiting:#?}"
    );
    gate.open.store(true, Ordering::SeqCst);
    let done = eventually(&registry, &id, "the cancellation delivered", |r| {
        is(follow_up(r, "cancel"), DeliveryState::Delivered)
    })
    .await;
    let operations: Vec<&str> = (done.follow_up_deliveries.iter())
        .map(|d| d.operation.as_str())
        .collect();
    assert_eq!(operations, ["cancel", "extend"], "{done:#?}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_up_calls_show_until_the_processor_has_them_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    follow_up_calls_show_until_the_processor_has_them(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_up_calls_show_until_the_processor_has_them_on_postgres() {
    on_postgres(|url, dir| async move {
        follow_up_calls_show_until_the_processor_has_them(&url, &dir).await;
    })
    .await;
}

/// A cancellation the processor keeps refusing is dead-lettered, and while it is the
/// processor finishes the request's only task: the request is COMPLETED (the cancellation
/// stopped nothing), and its Cancel is withdrawn with why rather than left dead-lettered,
/// listed and counted as something an operator must requeue. Before, it stayed
/// DEAD_LETTERED for good.
async fn a_dead_lettered_cancel_of_a_request_that_completed_is_withdrawn(
    url: &str,
    dir: &std::path::Path,
) {
    use dsrelay_proto::v1::{Acknowledgement, RequestState};

    let gate = Gate {
        refuse_cancel: true,
        ..Gate::default()
    };
    let setup = Setup {
        tables: "[delivery]\npoll_interval_ms = 20\nmax_refusals = 2\n\
                 backoff = { initial_ms = 20, max_ms = 100 }\n"
            .into(),
        admin: true,
        ..Setup::default()
    }
    .answered_by(gate);
    let registry = Registry::start(dir, url, setup).await;
    let id = registry.submit(RequestKind::Erasure, "moot-cancel").await;
    eventually(&registry, &id, "delivered", |r| {
        r.deliveries.len() == 1 && r.deliveries[0].state == DeliveryState::Delivered as i32
    })
    .await;
    RequestServiceClient::new(registry.channel("operator"))
        .cancel(CancelRequest {
            request_id: id.clone(),
            reason: "the subject withdrew".into(),
        })
        .await
        .expect("cancel");
    let dead = eventually(&registry, &id, "the cancellation dead-lettered", |r| {
        is(follow_up(r, "cancel"), DeliveryState::DeadLettered)
    })
    .await;
    assert_eq!(dead.state, RequestState::Cancelled as i32, "{dead:#?}");

    let answer = registry
        .acknowledge(vec![Acknowledgement {
            request_id: id.clone(),
            subprocessor: "payroll".into(),
            sequence: 2,
            state: TaskState::Completed as i32,
            ..Default::default()
        }])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    let done = get(&registry, &id).await;
    assert_eq!(done.state, RequestState::Completed as i32, "{done:#?}");
    let cancel = follow_up(&done, "cancel").expect("cancel row");
    assert_eq!(cancel.state, DeliveryState::Cancelled as i32, "{cancel:#?}");
    assert!(
        cancel.last_error.contains("nothing left to stop"),
        "{cancel:#?}"
    );
    assert!(cancel.dead_lettered_at.is_some(), "{cancel:#?}");
    assert!(cancel.next_attempt_at.is_none(), "{cancel:#?}");
    assert!(cancel.delivered_at.is_none(), "{cancel:#?}");
    assert!(
        is(done.deliveries.first(), DeliveryState::Delivered),
        "{done:#?}"
    );
    let metrics = registry.scrape().await;
    let gauge = metrics
        .lines()
        .find(|l| l.starts_with("dsrelay_outbox_dead_lettered{op=\"cancel\"}"))
        .unwrap_or_else(|| panic!("no dead-lettered cancel gauge: {metrics}"));
    let value = gauge.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    assert_eq!(value, Some(0.0), "{gauge}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_cancel_of_a_request_that_completed_is_withdrawn_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_dead_lettered_cancel_of_a_request_that_completed_is_withdrawn(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_cancel_of_a_request_that_completed_is_withdrawn_on_postgres() {
    on_postgres(|url, dir| async move {
        a_dead_lettered_cancel_of_a_request_that_completed_is_withdrawn(&url, &dir).await;
    })
    .await;
}
