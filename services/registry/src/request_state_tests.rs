//! A request's state through the store, on SQLite and PostgreSQL: what a cancellation does to
//! it, and how what processors report after a cancellation or an answer is folded in.

use dsrelay_proto::v1::{EventType, RequestKind, RequestState, TaskState, TaskStatus};
use dsrelay_runtime::store::Db;

use crate::store::{
    CancelOutcome, FailureRecorded, NewRequest, Operation, Store, TaskUpdate, POSTGRES_MIGRATIONS,
    SQLITE_MIGRATIONS,
};
use crate::test_postgres::on_postgres;

use RequestState as R;
use TaskState::*;

/// When every request here is due.
const DUE: i64 = 1_000_000;
/// Until when a RETAINED task keeps its data.
const RETAIN_UNTIL: i64 = 2_000_000;
/// After both.
const LATER: i64 = 3_000_000;

async fn store_at(url: &str) -> Store {
    let db = Db::connect(url).await.unwrap();
    db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
        .await
        .unwrap();
    Store::new(db, b"test key")
}

/// Runs `test` on a fresh SQLite store.
async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    test(store_at(&url).await).await;
}

/// An erasure request `id` routed to `processors`.
async fn request(store: &Store, id: &str, processors: &[&str]) {
    store
        .insert_request(&NewRequest {
            id: id.into(),
            partner: "crm".into(),
            idempotency_key: format!("key-{id}"),
            body_hash: format!("hash-{id}"),
            body: b"{}".to_vec(),
            identity_hashes: "[\"h\"]".into(),
            kind: RequestKind::Erasure as i32,
            received_at: 0,
            due_at: DUE,
            trace_id: "0".repeat(32),
            traceparent: None,
            processors: processors.iter().map(|p| p.to_string()).collect(),
        })
        .await
        .unwrap();
}

/// A task report of `subprocessor` at `sequence`.
fn status(subprocessor: &str, sequence: u64, state: TaskState) -> TaskStatus {
    TaskStatus {
        processor: "p1".into(),
        subprocessor: subprocessor.into(),
        state: state as i32,
        sequence,
        ..Default::default()
    }
}

/// Has `processor` accept the `op` of `id` waiting for it, reporting `tasks`. (The claim
/// takes every row then due, and the others stay leased: accept a Cancel before the next
/// request's delivery.)
async fn accept(store: &Store, id: &str, processor: &str, op: Operation, tasks: &[TaskStatus]) {
    let jobs = store.claim_deliveries(LATER, 100, 60_000).await.unwrap();
    let job = jobs
        .iter()
        .find(|j| j.request_id == id && j.processor == processor && j.op == op)
        .unwrap_or_else(|| panic!("no {op:?} of {id} to {processor} in {jobs:?}"));
    assert!(store.delivery_succeeded(job, tasks, 1_000).await.unwrap());
}

/// `p1` acknowledges `subprocessor`'s task of `id` at `sequence` in `state`, at `now`.
async fn ack(
    store: &Store,
    id: &str,
    subprocessor: &str,
    sequence: i64,
    state: TaskState,
    now: i64,
) {
    let retained = state == Retained;
    let update = TaskUpdate {
        request_id: id.into(),
        subprocessor: subprocessor.into(),
        sequence,
        state: state as i32,
        legal_basis: if retained {
            "bookkeeping law".into()
        } else {
            String::new()
        },
        retain_until: retained.then_some(RETAIN_UNTIL),
        ..Default::default()
    };
    let outcome = store.apply_acks("p1", &[update], now).await.unwrap();
    assert_eq!(outcome.applied, 1, "{outcome:?}");
}

/// `id`'s state as stored.
async fn state(store: &Store, id: &str) -> RequestState {
    store.request(id).await.unwrap().unwrap().state
}

/// `id` delivered to `p1`, with tasks `a` and `b` in the states given (at sequence 2).
async fn with_tasks(store: &Store, id: &str, a: TaskState, b: TaskState) {
    request(store, id, &["p1"]).await;
    accept(
        store,
        id,
        "p1",
        Operation::Deliver,
        &[status("a", 1, Pending), status("b", 1, Pending)],
    )
    .await;
    ack(store, id, "a", 2, a, 2_000).await;
    ack(store, id, "b", 2, b, 2_000).await;
}

/// A PARTIALLY_COMPLETED request was answered: when a retained task's date passes and its
/// holder works on the erasure (IN_PROGRESS, or WAITING_FOR_OPERATOR), the request stays
/// answered (not overdue, not to be cancelled or extended), then ends COMPLETED.
async fn a_retention_run_keeps_an_answered_request_answered(store: Store) {
    with_tasks(&store, "r1", Completed, Retained).await;
    assert_eq!(state(&store, "r1").await, R::PartiallyCompleted);
    let refused = CancelOutcome::NotCancellable(R::PartiallyCompleted);
    assert_eq!(
        store.cancel("r1", "too late", 3_000).await.unwrap(),
        refused
    );

    // Past its date (and the request's due date), the holder accepted the erasure.
    ack(&store, "r1", "b", 3, InProgress, LATER).await;
    let row = store.request("r1").await.unwrap().unwrap();
    assert_eq!(row.state, R::PartiallyCompleted);
    assert!(!row.overdue(LATER));
    assert_eq!(
        store.cancel("r1", "too late", LATER).await.unwrap(),
        refused
    );
    assert!(!store.extend(&row, 1, "too late", LATER).await.unwrap());
    // So through a status check, which folds on its own path.
    let waiting = status("b", 4, WaitingForOperator);
    store
        .reconcile("r1", "p1", &[waiting], LATER, 60_000)
        .await
        .unwrap();
    assert_eq!(state(&store, "r1").await, R::PartiallyCompleted);

    ack(&store, "r1", "b", 5, Completed, LATER).await;
    let row = store.request("r1").await.unwrap().unwrap();
    assert_eq!((row.state, row.cancel_reason), (R::Completed, None));
}

#[tokio::test]
async fn a_retention_run_keeps_an_answered_request_answered_on_sqlite() {
    on_sqlite(a_retention_run_keeps_an_answered_request_answered).await;
}

#[tokio::test]
async fn a_retention_run_keeps_an_answered_request_answered_on_postgres() {
    on_postgres(|url, _| async move {
        a_retention_run_keeps_an_answered_request_answered(store_at(&url).await).await;
    })
    .await;
}

/// A retention run that fails makes the request FAILED at once, even while another one is
/// still under way: an operator must act.
async fn a_failed_retention_run_fails_the_request(store: Store) {
    with_tasks(&store, "r1", Retained, Retained).await;
    assert_eq!(state(&store, "r1").await, R::PartiallyCompleted);
    ack(&store, "r1", "a", 3, InProgress, LATER).await;
    ack(&store, "r1", "b", 3, InProgress, LATER).await;
    assert_eq!(state(&store, "r1").await, R::PartiallyCompleted);
    ack(&store, "r1", "b", 4, Failed, LATER).await;
    assert_eq!(state(&store, "r1").await, R::Failed);
    ack(&store, "r1", "a", 4, Completed, LATER).await;
    assert_eq!(state(&store, "r1").await, R::Failed);

    // The other order: one run failed before the other's holder accepted it. The request
    // stays FAILED, not open, overdue or cancellable again.
    with_tasks(&store, "r2", Retained, Retained).await;
    ack(&store, "r2", "b", 3, Failed, LATER).await;
    assert_eq!(state(&store, "r2").await, R::Failed);
    ack(&store, "r2", "a", 3, InProgress, LATER).await;
    assert_eq!(state(&store, "r2").await, R::Failed);
    assert_eq!(
        store.cancel("r2", "withdrawn", LATER).await.unwrap(),
        CancelOutcome::NotCancellable(R::Failed)
    );
    ack(&store, "r2", "a", 4, Completed, LATER).await;
    assert_eq!(state(&store, "r2").await, R::Failed);
}

#[tokio::test]
async fn a_failed_retention_run_fails_the_request_on_sqlite() {
    on_sqlite(a_failed_retention_run_fails_the_request).await;
}

#[tokio::test]
async fn a_failed_retention_run_fails_the_request_on_postgres() {
    on_postgres(|url, _| async move {
        a_failed_retention_run_fails_the_request(store_at(&url).await).await;
    })
    .await;
}

/// A cancellation that came too late for every task (the last one had finished, and its
/// acknowledgement was on its way) stopped nothing: once the tasks have all reported, the
/// request says what happened, however the reports come (an acknowledgement, the answer to
/// the Cancel, a status check). A Cancel not yet through when the request becomes COMPLETED
/// is withdrawn, with why: nothing is left to stop.
async fn a_cancellation_too_late_for_every_task_gives_way(store: Store) {
    // The acknowledgement in flight.
    with_tasks(&store, "r1", Completed, InProgress).await;
    assert_eq!(state(&store, "r1").await, R::InProgress);
    assert_eq!(
        store.cancel("r1", "withdrawn", 3_000).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(state(&store, "r1").await, R::Cancelled);
    ack(&store, "r1", "b", 3, Completed, 4_000).await;
    let row = store.request("r1").await.unwrap().unwrap();
    assert_eq!(row.state, R::Completed);
    // What was asked stays on record; the Cancel is no longer sent.
    assert_eq!(row.cancel_reason.as_deref(), Some("withdrawn"));
    let calls = store.deliveries_with_follow_ups("r1").await.unwrap();
    let cancel = (calls.iter())
        .find(|d| d.op == Operation::Cancel)
        .expect("the Cancel's row");
    assert!(cancel.withdrawn_at.is_some(), "{cancel:?}");
    let due = store.claim_deliveries(LATER, 100, 60_000).await.unwrap();
    assert!(due.iter().all(|j| j.request_id != "r1"), "{due:?}");
    assert_eq!(state(&store, "r1").await, R::Completed);

    // The answer to the Cancel reports what the holder did.
    with_tasks(&store, "r2", Completed, InProgress).await;
    store.cancel("r2", "withdrawn", 3_000).await.unwrap();
    let answer = [status("a", 2, Completed), status("b", 3, NotFound)];
    accept(&store, "r2", "p1", Operation::Cancel, &answer).await;
    assert_eq!(state(&store, "r2").await, R::Completed);

    // A status check does; the holder had failed.
    with_tasks(&store, "r3", Completed, InProgress).await;
    store.cancel("r3", "withdrawn", 3_000).await.unwrap();
    let failed = [status("b", 3, Failed)];
    store
        .reconcile("r3", "p1", &failed, 4_000, 60_000)
        .await
        .unwrap();
    assert_eq!(state(&store, "r3").await, R::Failed);

    // A holder that retains by law: the rest is erased at its date, cancelled or not.
    with_tasks(&store, "r4", Completed, InProgress).await;
    store.cancel("r4", "withdrawn", 3_000).await.unwrap();
    ack(&store, "r4", "b", 3, Retained, 4_000).await;
    assert_eq!(state(&store, "r4").await, R::PartiallyCompleted);

    // A Cancel in flight when the last task completes is left to its answer, which records
    // it delivered: withdrawn, it would read "no longer sent" though it was sent.
    with_tasks(&store, "r5", Completed, InProgress).await;
    store.cancel("r5", "withdrawn", 3_000).await.unwrap();
    let jobs = store.claim_deliveries(LATER, 100, 60_000).await.unwrap();
    let job = (jobs.iter())
        .find(|j| j.request_id == "r5" && j.op == Operation::Cancel)
        .expect("the Cancel claimed");
    ack(&store, "r5", "b", 3, Completed, 4_000).await;
    assert_eq!(state(&store, "r5").await, R::Completed);
    let answer = [status("a", 2, Completed), status("b", 3, Completed)];
    assert!(store.delivery_succeeded(job, &answer, 5_000).await.unwrap());
    let calls = store.deliveries_with_follow_ups("r5").await.unwrap();
    let cancel = (calls.iter())
        .find(|d| d.op == Operation::Cancel)
        .expect("the Cancel's row");
    assert!(
        cancel.withdrawn_at.is_none() && cancel.done_at.is_some(),
        "{cancel:?}"
    );
}

#[tokio::test]
async fn a_cancellation_too_late_for_every_task_gives_way_on_sqlite() {
    on_sqlite(a_cancellation_too_late_for_every_task_gives_way).await;
}

#[tokio::test]
async fn a_cancellation_too_late_for_every_task_gives_way_on_postgres() {
    on_postgres(|url, _| async move {
        a_cancellation_too_late_for_every_task_gives_way(store_at(&url).await).await;
    })
    .await;
}

/// `id`'s events as (type, request state, message), in order.
async fn events(store: &Store, id: &str) -> Vec<(EventType, RequestState, String)> {
    let rows = store.events(id).await.unwrap();
    rows.into_iter()
        .map(|e| {
            let ty = EventType::try_from(e.event_type).unwrap();
            (
                ty,
                RequestState::try_from(e.request_state).unwrap(),
                e.message,
            )
        })
        .collect()
}

/// A cancellation's events follow the contract of every event that moves a request:
/// CANCELLED shows the state before, and a STATE_CHANGED to CANCELLED follows (a Watch
/// client following STATE_CHANGED sees the cancellation). One that gives way is followed by
/// a STATE_CHANGED from CANCELLED.
async fn a_cancellation_records_its_state_change(store: Store) {
    with_tasks(&store, "r1", Completed, InProgress).await;
    let before = events(&store, "r1").await.len();
    store.cancel("r1", "withdrawn", 3_000).await.unwrap();
    let after = events(&store, "r1").await;
    assert_eq!(
        after[before..],
        [
            (
                EventType::Cancelled,
                R::InProgress,
                "cancelled: withdrawn".into()
            ),
            (
                EventType::StateChanged,
                R::Cancelled,
                "IN_PROGRESS -> CANCELLED".into()
            ),
        ]
    );
    ack(&store, "r1", "b", 3, Completed, 4_000).await;
    let last = events(&store, "r1").await.pop().unwrap();
    let gave_way = (
        EventType::StateChanged,
        R::Completed,
        "CANCELLED -> COMPLETED".into(),
    );
    assert_eq!(last, gave_way);
}

#[tokio::test]
async fn a_cancellation_records_its_state_change_on_sqlite() {
    on_sqlite(a_cancellation_records_its_state_change).await;
}

#[tokio::test]
async fn a_cancellation_records_its_state_change_on_postgres() {
    on_postgres(|url, _| async move {
        a_cancellation_records_its_state_change(store_at(&url).await).await;
    })
    .await;
}

/// A cancellation that stopped a task, or a delivery, stands whatever the others report.
async fn a_cancellation_that_stopped_something_stands(store: Store) {
    with_tasks(&store, "r1", Completed, Pending).await;
    assert_eq!(
        store.cancel("r1", "withdrawn", 3_000).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let answer = [status("a", 2, Completed), status("b", 2, Cancelled)];
    accept(&store, "r1", "p1", Operation::Cancel, &answer).await;
    assert_eq!(state(&store, "r1").await, R::Cancelled);

    // p2 never had the request: its delivery is withdrawn, and p1 finishing changes nothing.
    request(&store, "r2", &["p1", "p2"]).await;
    accept(
        &store,
        "r2",
        "p1",
        Operation::Deliver,
        &[status("a", 1, Pending)],
    )
    .await;
    ack(&store, "r2", "a", 2, InProgress, 2_000).await;
    assert_eq!(
        store.cancel("r2", "withdrawn", 3_000).await.unwrap(),
        CancelOutcome::Cancelled
    );
    ack(&store, "r2", "a", 3, Completed, 4_000).await;
    assert_eq!(state(&store, "r2").await, R::Cancelled);
}

#[tokio::test]
async fn a_cancellation_that_stopped_something_stands_on_sqlite() {
    on_sqlite(a_cancellation_that_stopped_something_stands).await;
}

#[tokio::test]
async fn a_cancellation_that_stopped_something_stands_on_postgres() {
    on_postgres(|url, _| async move {
        a_cancellation_that_stopped_something_stands(store_at(&url).await).await;
    })
    .await;
}

/// A Deliver in flight when the request is cancelled is withdrawn. If its processor
/// accepted it all the same, its answer counts when it comes; and if the answer is lost,
/// what the processor then reports (an acknowledgement, its answer to the Cancel, a status
/// check) shows it had the request: the delivery reads accepted, with a DELIVERED event, and
/// a cancellation too late for its tasks gives way as for any other. A processor that
/// reports no task (it never had the request) keeps it withdrawn. Until the in-flight call
/// ends, the cancellation is not settled (a Watch goes on).
async fn a_delivery_in_flight_at_the_cancellation_counts_once_reported(store: Store) {
    // r1: the Deliver's answer comes after the cancellation. r2: the answer is lost, the
    // processor acknowledges, then answers the Cancel. r3: the answer is lost, a status check
    // reports the task.
    let ids = ["r1", "r2", "r3"];
    for id in ids {
        request(&store, id, &["p1"]).await;
    }
    let in_flight = store.claim_deliveries(LATER, 100, 60_000).await.unwrap();
    for id in ids {
        assert_eq!(
            store.cancel(id, "withdrawn", 3_000).await.unwrap(),
            CancelOutcome::Cancelled
        );
        assert!(!store.cancellation_settled(id).await.unwrap());
    }
    for job in &in_flight {
        if job.request_id == "r1" {
            let answer = [status("a", 1, Pending)];
            assert!(store.delivery_succeeded(job, &answer, 3_500).await.unwrap());
        } else {
            let recorded = store
                .delivery_failed(job, "deadline exceeded", LATER, 3_500, None)
                .await
                .unwrap();
            assert_eq!(recorded, FailureRecorded::Withdrawn);
            assert!(store.cancellation_settled(&job.request_id).await.unwrap());
        }
    }
    assert_eq!(state(&store, "r1").await, R::Cancelled);
    assert!(!store.cancellation_settled("r1").await.unwrap());
    let events = store.events("r1").await.unwrap();
    assert!(
        events.iter().any(|e| e
            .message
            .contains("its answer arriving after the cancellation")),
        "{events:#?}"
    );
    ack(&store, "r2", "a", 2, InProgress, 4_000).await;
    assert_eq!(state(&store, "r2").await, R::Cancelled);
    let events = store.events("r2").await.unwrap();
    assert!(
        events.iter().any(|e| e.processor == "p1"
            && e.message
                .contains("accepted by p1 before the cancellation reached it")),
        "{events:#?}"
    );
    let cancels = store.claim_deliveries(LATER, 100, 60_000).await.unwrap();
    let answer_cancel = |id: &str, tasks: Vec<TaskStatus>| {
        let job = cancels
            .iter()
            .find(|j| j.request_id == id && j.op == Operation::Cancel)
            .unwrap_or_else(|| panic!("no Cancel of {id} in {cancels:?}"));
        let store = &store;
        async move { assert!(store.delivery_succeeded(job, &tasks, 5_000).await.unwrap()) }
    };
    answer_cancel("r1", vec![status("a", 2, Completed)]).await;
    assert_eq!(state(&store, "r1").await, R::Completed);
    answer_cancel("r2", vec![status("a", 3, Completed)]).await;
    assert_eq!(state(&store, "r2").await, R::Completed);

    let reported = [status("a", 2, Completed)];
    store
        .reconcile("r3", "p1", &reported, 4_000, 60_000)
        .await
        .unwrap();
    assert_eq!(state(&store, "r3").await, R::Completed);
    let delivered = store.deliveries_of(&["r3".to_string()]).await.unwrap();
    assert!(delivered["r3"][0].withdrawn_at.is_none(), "{delivered:#?}");

    // r4: p1 stopped its task; r5: p2 never had the request and says so with no task.
    for id in ["r4", "r5"] {
        request(&store, id, &["p1", "p2"]).await;
    }
    let delivering = store.claim_deliveries(LATER, 100, 60_000).await.unwrap();
    for job in delivering.iter().filter(|j| j.processor == "p1") {
        assert!(store.delivery_succeeded(job, &[], 2_000).await.unwrap());
    }
    for id in ["r4", "r5"] {
        assert_eq!(
            store.cancel(id, "withdrawn", 3_000).await.unwrap(),
            CancelOutcome::Cancelled
        );
    }
    let cancels = store.claim_deliveries(LATER, 100, 60_000).await.unwrap();
    for (id, processor, tasks) in [
        ("r4", "p1", vec![status("a", 2, Cancelled)]),
        ("r4", "p2", vec![]),
        ("r5", "p1", vec![status("a", 2, Completed)]),
        ("r5", "p2", vec![]),
    ] {
        let job = cancels
            .iter()
            .find(|j| j.request_id == id && j.processor == processor)
            .unwrap_or_else(|| panic!("no Cancel of {id} to {processor} in {cancels:?}"));
        assert!(store.delivery_succeeded(job, &tasks, 5_000).await.unwrap());
    }
    assert_eq!(state(&store, "r4").await, R::Cancelled);
    assert_eq!(state(&store, "r5").await, R::Cancelled);
}

#[tokio::test]
async fn a_delivery_in_flight_at_the_cancellation_counts_once_reported_on_sqlite() {
    on_sqlite(a_delivery_in_flight_at_the_cancellation_counts_once_reported).await;
}

#[tokio::test]
async fn a_delivery_in_flight_at_the_cancellation_counts_once_reported_on_postgres() {
    on_postgres(|url, _| async move {
        a_delivery_in_flight_at_the_cancellation_counts_once_reported(store_at(&url).await).await;
    })
    .await;
}

/// A transfer receipt in a processor's answer to a request that transfers nothing is left
/// out with the report that carries it, as Acknowledge refuses it: shown with the task, it
/// would read as proof that the data arrived somewhere. A report without one is taken.
async fn a_receipt_where_nothing_is_transferred_is_left_out(store: Store) {
    let with_receipt = |sequence: u64, state: TaskState| TaskStatus {
        evidence: Some(dsrelay_proto::v1::Evidence {
            transfer_receipt: Some(dsrelay_proto::v1::TransferReceipt {
                request_id: "r1".into(),
                subprocessor: "a".into(),
                manifest_sha256: "ab".repeat(32),
                files: 1,
                recipient: "nobody".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..status("a", sequence, state)
    };
    request(&store, "r1", &["p1"]).await;
    accept(
        &store,
        "r1",
        "p1",
        Operation::Deliver,
        &[with_receipt(2, Completed)],
    )
    .await;
    // The task is still known, and holds the request open.
    let pending = |tasks: Vec<TaskStatus>| {
        tasks.len() == 1 && tasks[0].state == Pending as i32 && tasks[0].sequence == 0
    };
    assert!(pending(store.tasks("r1").await.unwrap()));
    assert_eq!(state(&store, "r1").await, R::Dispatched);
    let reported = [with_receipt(3, InProgress)];
    store
        .reconcile("r1", "p1", &reported, 4_000, 60_000)
        .await
        .unwrap();
    assert!(pending(store.tasks("r1").await.unwrap()));
    // A task first heard of in a status check that is left out is kept open too.
    request(&store, "r2", &["p1"]).await;
    accept(&store, "r2", "p1", Operation::Deliver, &[]).await;
    let reported = [with_receipt(2, Completed)];
    store
        .reconcile("r2", "p1", &reported, 4_000, 60_000)
        .await
        .unwrap();
    assert!(pending(store.tasks("r2").await.unwrap()));
    let reported = [status("a", 4, Completed)];
    store
        .reconcile("r1", "p1", &reported, 5_000, 60_000)
        .await
        .unwrap();
    assert_eq!(state(&store, "r1").await, R::Completed);
}

#[tokio::test]
async fn a_receipt_where_nothing_is_transferred_is_left_out_on_sqlite() {
    on_sqlite(a_receipt_where_nothing_is_transferred_is_left_out).await;
}

#[tokio::test]
async fn a_receipt_where_nothing_is_transferred_is_left_out_on_postgres() {
    on_postgres(|url, _| async move {
        a_receipt_where_nothing_is_transferred_is_left_out(store_at(&url).await).await;
    })
    .await;
}

/// A FAILED request whose every task has ended (or is retained, which no Cancel stops) has
/// nothing left to stop: its cancellation is refused and writes nothing, so it never reads
/// CANCELLED. One with a task still to stop is cancelled.
async fn a_cancellation_with_nothing_to_stop_is_refused(store: Store) {
    for (id, a, b) in [("r1", Completed, Failed), ("r2", Retained, Refused)] {
        with_tasks(&store, id, a, b).await;
        assert_eq!(state(&store, id).await, R::Failed);
        assert_eq!(
            store.cancel(id, "withdrawn", 3_000).await.unwrap(),
            CancelOutcome::NotCancellable(R::Failed)
        );
        let row = store.request(id).await.unwrap().unwrap();
        assert_eq!((row.state, row.cancel_reason), (R::Failed, None));
    }
    let queued = store.claim_deliveries(3_000, 100, 60_000).await.unwrap();
    assert!(queued.is_empty(), "{queued:?}");

    with_tasks(&store, "r3", Failed, WaitingForOperator).await;
    assert_eq!(
        store.cancel("r3", "withdrawn", 3_000).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(state(&store, "r3").await, R::Cancelled);
}

#[tokio::test]
async fn a_cancellation_with_nothing_to_stop_is_refused_on_sqlite() {
    on_sqlite(a_cancellation_with_nothing_to_stop_is_refused).await;
}

#[tokio::test]
async fn a_cancellation_with_nothing_to_stop_is_refused_on_postgres() {
    on_postgres(|url, _| async move {
        a_cancellation_with_nothing_to_stop_is_refused(store_at(&url).await).await;
    })
    .await;
}

/// A finished request that a new task reopens is not finished meanwhile, and its finish is
/// the last one: its package expires, and the request is forgotten, counting from then,
/// not from a finish the new task undid.
async fn a_reopened_request_finishes_anew(store: Store) {
    with_tasks(&store, "r1", Completed, Completed).await;
    assert_eq!(state(&store, "r1").await, R::Completed);
    let finished_at = |store: &Store| {
        let store = store.clone();
        async move { store.package("r1").await.unwrap().finished_at }
    };
    assert_eq!(finished_at(&store).await, Some(2_000));

    // The processor reports a task it did not list before: the request is open again.
    ack(&store, "r1", "c", 1, InProgress, 3_000).await;
    assert_eq!(state(&store, "r1").await, R::InProgress);
    assert_eq!(finished_at(&store).await, None);

    ack(&store, "r1", "c", 2, Completed, 4_000).await;
    assert_eq!(state(&store, "r1").await, R::Completed);
    assert_eq!(finished_at(&store).await, Some(4_000));
}

#[tokio::test]
async fn a_reopened_request_finishes_anew_on_sqlite() {
    on_sqlite(a_reopened_request_finishes_anew).await;
}

#[tokio::test]
async fn a_reopened_request_finishes_anew_on_postgres() {
    on_postgres(|url, _| async move {
        a_reopened_request_finishes_anew(store_at(&url).await).await;
    })
    .await;
}

/// A failed task the processor's operator retried (RetryTask) reopens its FAILED request:
/// IN_PROGRESS, no longer finished, cancellable again, then as its tasks end. While another
/// task is still failed the request stays FAILED.
async fn a_retried_task_reopens_a_failed_request(store: Store) {
    with_tasks(&store, "r1", Completed, Failed).await;
    assert_eq!(state(&store, "r1").await, R::Failed);
    ack(&store, "r1", "b", 3, InProgress, 3_000).await;
    let row = store.request("r1").await.unwrap().unwrap();
    assert_eq!(row.state, R::InProgress);
    assert_eq!(store.package("r1").await.unwrap().finished_at, None);
    ack(&store, "r1", "b", 4, Completed, 4_000).await;
    assert_eq!(state(&store, "r1").await, R::Completed);

    with_tasks(&store, "r2", Failed, Refused).await;
    assert_eq!(state(&store, "r2").await, R::Failed);
    ack(&store, "r2", "a", 3, InProgress, 3_000).await;
    assert_eq!(state(&store, "r2").await, R::Failed);
    ack(&store, "r2", "a", 4, Completed, 4_000).await;
    assert_eq!(state(&store, "r2").await, R::Failed);

    // Reopened, it may be cancelled again.
    with_tasks(&store, "r3", Completed, Failed).await;
    ack(&store, "r3", "b", 3, InProgress, 3_000).await;
    let cancelled = store.cancel("r3", "withdrawn", 3_500).await.unwrap();
    assert_eq!(cancelled, CancelOutcome::Cancelled);

    // A cancellation that seemed to stop nothing (the task failed before it arrived) gave
    // way to FAILED; the retried task is then cancelled by it: CANCELLED after all, never
    // COMPLETED over a task that was not done.
    with_tasks(&store, "r4", Completed, InProgress).await;
    let cancelled = store.cancel("r4", "withdrawn", 2_500).await.unwrap();
    assert_eq!(cancelled, CancelOutcome::Cancelled);
    ack(&store, "r4", "b", 3, Failed, 3_000).await;
    assert_eq!(state(&store, "r4").await, R::Failed);
    ack(&store, "r4", "b", 4, InProgress, 3_500).await;
    assert_eq!(state(&store, "r4").await, R::InProgress);
    ack(&store, "r4", "b", 5, Cancelled, 4_000).await;
    assert_eq!(state(&store, "r4").await, R::Cancelled);
}

#[tokio::test]
async fn a_retried_task_reopens_a_failed_request_on_sqlite() {
    on_sqlite(a_retried_task_reopens_a_failed_request).await;
}

#[tokio::test]
async fn a_retried_task_reopens_a_failed_request_on_postgres() {
    on_postgres(|url, _| async move {
        a_retried_task_reopens_a_failed_request(store_at(&url).await).await;
    })
    .await;
}

/// A contract end whose tasks have ended or are deleting has nothing a cancellation could
/// stop (the processor lets a deletion under way run and report what it did): refused,
/// rather than CANCELLED until the deletion's report undoes it. One still returning is
/// cancelled.
async fn a_deletion_under_way_is_not_cancelled(store: Store) {
    use dsrelay_proto::v1::{ContractPhase, ContractProgress};
    let in_phase = |id: &str, sequence: i64, phase: ContractPhase| TaskUpdate {
        request_id: id.into(),
        subprocessor: "b".into(),
        sequence,
        state: InProgress as i32,
        progress: Some(ContractProgress {
            phase: phase as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    for (id, phase, cancelled) in [
        ("r1", ContractPhase::Deleting, false),
        ("r2", ContractPhase::Returning, true),
    ] {
        with_tasks(&store, id, Completed, Pending).await;
        let outcome = store
            .apply_acks("p1", &[in_phase(id, 3, phase)], 3_000)
            .await
            .unwrap();
        assert_eq!(outcome.applied, 1, "{outcome:?}");
        assert_eq!(state(&store, id).await, R::InProgress);
        let expected = if cancelled {
            CancelOutcome::Cancelled
        } else {
            CancelOutcome::NotCancellable(R::InProgress)
        };
        assert_eq!(store.cancel(id, "stop it", 4_000).await.unwrap(), expected);
    }
}

#[tokio::test]
async fn a_deletion_under_way_is_not_cancelled_on_sqlite() {
    on_sqlite(a_deletion_under_way_is_not_cancelled).await;
}

#[tokio::test]
async fn a_deletion_under_way_is_not_cancelled_on_postgres() {
    on_postgres(|url, _| async move {
        a_deletion_under_way_is_not_cancelled(store_at(&url).await).await;
    })
    .await;
}
