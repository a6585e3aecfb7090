//! When a request was finished and answered, and whether the answer came after its due
//! date, as Get and List show them, read through the store on SQLite and PostgreSQL.

use dsrelay_proto::millis_from_timestamp;
use dsrelay_proto::v1::{Request, RequestKind, RequestState, TaskState, TaskStatus};
use dsrelay_runtime::store::Db;

use super::{request_for, Reader};
use crate::store::{
    ListFilter, NewRequest, Operation, Store, TaskUpdate, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS,
};
use crate::test_postgres::on_postgres;

use RequestState as R;
use TaskState::*;

/// When every request here is first due.
const DUE: i64 = 1_000_000;
/// Before it.
const EARLY: i64 = 500_000;
/// After it.
const LATE: i64 = 2_000_000;
/// Long after it: a retained task's erasure run.
const YEARS_LATER: i64 = 9_000_000;

async fn store_at(url: &str) -> Store {
    let db = Db::connect(url).await.unwrap();
    db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
        .await
        .unwrap();
    Store::new(db, b"test key")
}

/// An erasure `id` received at 0, due at [`DUE`], routed to `processors`.
async fn request(store: &Store, id: &str, processors: &[&str]) {
    store
        .insert_request(&NewRequest {
            id: id.into(),
            partner: "crm".into(),
            idempotency_key: format!("key-{id}"),
            body_hash: format!("hash-{id}"),
            body: Vec::new(),
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

/// `id` delivered to `p1` (at 1_000) with one task, `a`, PENDING.
async fn delivered(store: &Store, id: &str) {
    request(store, id, &["p1"]).await;
    let jobs = store.claim_deliveries(1_000, 100, 60_000).await.unwrap();
    let job = (jobs.iter())
        .find(|j| j.request_id == id && j.op == Operation::Deliver)
        .unwrap_or_else(|| panic!("no deliver of {id} in {jobs:?}"));
    let pending = TaskStatus {
        processor: "p1".into(),
        subprocessor: "a".into(),
        state: Pending as i32,
        sequence: 1,
        ..Default::default()
    };
    assert!(store
        .delivery_succeeded(job, &[pending], 1_000)
        .await
        .unwrap());
}

/// `p1` reports task `a` of `id` at `sequence` in `state`, at `now`.
async fn ack(store: &Store, id: &str, sequence: i64, state: TaskState, now: i64) {
    let retained = state == Retained;
    let update = TaskUpdate {
        request_id: id.into(),
        subprocessor: "a".into(),
        sequence,
        state: state as i32,
        legal_basis: if retained {
            "bookkeeping law".into()
        } else {
            String::new()
        },
        retain_until: retained.then_some(YEARS_LATER),
        ..Default::default()
    };
    let outcome = store.apply_acks("p1", &[update], now).await.unwrap();
    assert_eq!(outcome.applied, 1, "{outcome:?}");
}

/// `id` as an operator's Get shows it at `now`.
async fn get(store: &Store, id: &str, now: i64) -> Request {
    let (row, deliveries, tasks) = store.request_with_tasks(id).await.unwrap().unwrap();
    request_for(Reader::Operator, row, deliveries, tasks, now)
}

/// `id`'s state, finish, answer and lateness as Get shows them.
type Seen = (R, Option<i64>, Option<i64>, bool);

fn seen(r: &Request) -> Seen {
    let at =
        |t: &Option<dsrelay_proto::prost_types::Timestamp>| t.as_ref().map(millis_from_timestamp);
    (
        R::try_from(r.state).unwrap(),
        at(&r.finished_at),
        at(&r.answered_at),
        r.answered_late,
    )
}

/// A request answered after its due date says so once it is no longer overdue, with when it
/// finished; one answered PARTIALLY_COMPLETED in time stays answered in time when its
/// retention run completes it years later; FAILED and CANCELLED ones were not answered.
/// Before, Get gave no finish time, and `overdue` false was all an answered request said.
async fn late_answers_stay_visible(store: Store) {
    // Completed after its due date.
    delivered(&store, "late").await;
    ack(&store, "late", 2, Completed, LATE).await;
    let late = get(&store, "late", YEARS_LATER).await;
    assert_eq!(seen(&late), (R::Completed, Some(LATE), Some(LATE), true));
    assert!(!late.overdue);

    delivered(&store, "in-time").await;
    ack(&store, "in-time", 2, Completed, EARLY).await;
    assert_eq!(
        seen(&get(&store, "in-time", LATE).await),
        (R::Completed, Some(EARLY), Some(EARLY), false)
    );

    // Answered in time with data retained: not finished; its erasure run completes it
    // years after, which is no late answer.
    delivered(&store, "retained").await;
    ack(&store, "retained", 2, Retained, EARLY).await;
    assert_eq!(
        seen(&get(&store, "retained", LATE).await),
        (R::PartiallyCompleted, None, Some(EARLY), false)
    );
    ack(&store, "retained", 3, InProgress, YEARS_LATER).await;
    ack(&store, "retained", 4, Completed, YEARS_LATER).await;
    assert_eq!(
        seen(&get(&store, "retained", YEARS_LATER).await),
        (R::Completed, Some(YEARS_LATER), Some(EARLY), false)
    );

    // Answered late with data retained: late, though not finished.
    delivered(&store, "retained-late").await;
    ack(&store, "retained-late", 2, Retained, LATE).await;
    assert_eq!(
        seen(&get(&store, "retained-late", LATE).await),
        (R::PartiallyCompleted, None, Some(LATE), true)
    );

    // Failed past its due date: finished, never answered, still overdue.
    delivered(&store, "failed").await;
    ack(&store, "failed", 2, Failed, LATE).await;
    let failed = get(&store, "failed", LATE).await;
    assert_eq!(seen(&failed), (R::Failed, Some(LATE), None, false));
    assert!(failed.overdue);

    // An extension moves the due date the answer is measured against.
    delivered(&store, "extended").await;
    let row = store.request("extended").await.unwrap().unwrap();
    assert!(store.extend(&row, 1, "complex", EARLY).await.unwrap());
    ack(&store, "extended", 2, Completed, LATE).await;
    let extended = get(&store, "extended", LATE).await;
    assert!(millis_from_timestamp(extended.due_at.as_ref().unwrap()) > LATE);
    assert_eq!(
        seen(&extended),
        (R::Completed, Some(LATE), Some(LATE), false)
    );

    // Cancelled: finished, not answered.
    delivered(&store, "cancelled").await;
    store.cancel("cancelled", "withdrawn", LATE).await.unwrap();
    assert_eq!(
        seen(&get(&store, "cancelled", LATE).await),
        (R::Cancelled, Some(LATE), None, false)
    );

    // No processor held its data: answered when it was received.
    request(&store, "nobody", &[]).await;
    assert_eq!(
        seen(&get(&store, "nobody", LATE).await),
        (R::Completed, Some(0), Some(0), false)
    );

    // List reads the same columns.
    let filter = ListFilter {
        limit: 50,
        ..Default::default()
    };
    let rows = store.list(&filter, YEARS_LATER).await.unwrap();
    assert_eq!(rows.len(), 8);
    for row in rows {
        let id = row.id.clone();
        let listed = request_for(Reader::Operator, row, Vec::new(), Vec::new(), YEARS_LATER);
        assert_eq!(
            seen(&listed),
            seen(&get(&store, &id, YEARS_LATER).await),
            "{id}"
        );
    }
}

#[tokio::test]
async fn late_answers_stay_visible_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    late_answers_stay_visible(store_at(&url).await).await;
}

#[tokio::test]
async fn late_answers_stay_visible_on_postgres() {
    on_postgres(|url, _| async move {
        late_answers_stay_visible(store_at(&url).await).await;
    })
    .await;
}
