//! The store layer of both services behaves the same on SQLite and PostgreSQL: each check
//! below runs once per backend.

use dsrelay_processor::store::{
    Accepted, Store as ProcessorStore, Transition, POSTGRES_MIGRATIONS as PROC_PG,
    SQLITE_MIGRATIONS as PROC_SQLITE,
};
use dsrelay_proto::v1::{
    DeliverRequest, EventType, RequestKind, RequestState, TaskState, TaskStatus,
};
use dsrelay_registry::store::{
    AckOutcome, CancelOutcome, FailureRecorded, Inserted, ListFilter, NewRequest,
    Store as RegistryStore, TaskUpdate, POSTGRES_MIGRATIONS as REG_PG,
    SQLITE_MIGRATIONS as REG_SQLITE,
};
use dsrelay_runtime::store::Db;

use crate::harness::{database_url, email, Backend};

async fn registry_store(backend: Backend, dir: &std::path::Path) -> Option<RegistryStore> {
    let url = database_url(dir, "registry", backend).await?;
    let db = Db::connect(&url).await.expect("connect");
    db.migrate(&REG_SQLITE, &REG_PG).await.expect("migrate");
    // Migrating twice is a no-op (several replicas start at once).
    db.migrate(&REG_SQLITE, &REG_PG)
        .await
        .expect("migrate again");
    Some(RegistryStore::new(db, b"test key"))
}

/// Two replicas of the registry's store on one database: on SQLite, which has one writer per
/// database, the same store twice.
async fn registry_replicas(
    backend: Backend,
    dir: &std::path::Path,
) -> Option<(RegistryStore, RegistryStore)> {
    let url = database_url(dir, "registry", backend).await?;
    let db = Db::connect(&url).await.expect("connect");
    db.migrate(&REG_SQLITE, &REG_PG).await.expect("migrate");
    let a = RegistryStore::new(db, b"test key");
    let b = match backend {
        Backend::Sqlite => a.clone(),
        Backend::Postgres => {
            RegistryStore::new(Db::connect(&url).await.expect("connect"), b"test key")
        }
    };
    Some((a, b))
}

async fn processor_store(backend: Backend, dir: &std::path::Path) -> Option<ProcessorStore> {
    let url = database_url(dir, "processor", backend).await?;
    let db = Db::connect(&url).await.expect("connect");
    db.migrate(&PROC_SQLITE, &PROC_PG).await.expect("migrate");
    Some(ProcessorStore::new(db, b"test key"))
}

fn new_request(id: &str, key: &str, received_at: i64, processors: &[&str]) -> NewRequest {
    NewRequest {
        id: id.into(),
        partner: "crm".into(),
        idempotency_key: key.into(),
        body_hash: format!("hash-of-{key}"),
        body: vec![1, 2, 3],
        identity_hashes: "[]".into(),
        kind: RequestKind::Erasure as i32,
        received_at,
        due_at: received_at + 1000,
        trace_id: "0".repeat(32),
        traceparent: None,
        processors: processors.iter().map(|s| s.to_string()).collect(),
    }
}

fn ack(request_id: &str, sub: &str, seq: i64, state: TaskState) -> TaskUpdate {
    TaskUpdate {
        request_id: request_id.into(),
        subprocessor: sub.into(),
        sequence: seq,
        state: state as i32,
        ..Default::default()
    }
}

async fn registry_intake_and_idempotency(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    let r = new_request("r1", "k1", 1_000, &["p1", "p2"]);
    assert!(matches!(
        store.insert_request(&r).await.expect("insert"),
        Inserted::New
    ));
    match store.insert_request(&r).await.expect("again") {
        Inserted::Existing(id) => assert_eq!(id, "r1"),
        other => panic!("{other:?}"),
    }
    let mut changed = new_request("r2", "k1", 1_000, &["p1"]);
    changed.body_hash = "other".into();
    match store.insert_request(&changed).await.expect("conflict") {
        Inserted::Conflict(id) => assert_eq!(id, "r1"),
        other => panic!("{other:?}"),
    }
    let row = store.request("r1").await.expect("get").expect("exists");
    assert_eq!(row.state, RequestState::Received);
    assert_eq!(row.body, Some(vec![1, 2, 3]));
    let deliveries = store.deliveries("r1").await.expect("deliveries");
    assert_eq!(
        deliveries.len(),
        2,
        "the request and its outbox rows in one transaction"
    );
    // Nothing routed: complete at once.
    store
        .insert_request(&new_request("r3", "k3", 2_000, &[]))
        .await
        .expect("insert");
    assert_eq!(
        store.request("r3").await.expect("get").expect("row").state,
        RequestState::Completed
    );
    assert!(store.request("nope").await.expect("get").is_none());
}

async fn registry_batched_intake_shares_one_commit(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    store
        .insert_request(&new_request("r0", "k0", 500, &["p1"]))
        .await
        .expect("insert");
    let mut conflicting = new_request("rx", "k0", 600, &["p1"]);
    conflicting.body_hash = "another body".into();
    let batch = vec![
        new_request("r1", "k1", 1_000, &["p1"]),
        new_request("r2", "k2", 1_000, &["p1", "p2"]),
        // The same key twice in one batch: the second finds the first.
        new_request("r3", "k1", 1_000, &["p1"]),
        new_request("r0-again", "k0", 1_000, &["p1"]),
        conflicting,
    ];
    let mut batch_with_same_body = batch.clone();
    batch_with_same_body[2].body_hash = batch[0].body_hash.clone();
    batch_with_same_body[3].body_hash = "hash-of-k0".into();
    let out = store
        .insert_requests(&batch_with_same_body)
        .await
        .expect("batch");
    assert!(matches!(out[0], Inserted::New));
    assert!(matches!(out[1], Inserted::New));
    assert!(
        matches!(&out[2], Inserted::Existing(id) if id == "r1"),
        "{out:?}"
    );
    assert!(
        matches!(&out[3], Inserted::Existing(id) if id == "r0"),
        "{out:?}"
    );
    assert!(
        matches!(&out[4], Inserted::Conflict(id) if id == "r0"),
        "{out:?}"
    );
    assert_eq!(store.deliveries("r2").await.expect("deliveries").len(), 2);
    assert!(store.request("r3").await.expect("get").is_none());

    // A batch larger than one multi-row INSERT, from two partners, one request routed to
    // nobody (COMPLETED at once): each stored with its outbox rows and SUBMITTED event.
    let mut big: Vec<NewRequest> = (0..70)
        .map(|i| {
            let mut r = new_request(&format!("b{i}"), &format!("bk{i}"), 2_000, &["p1", "p2"]);
            if i % 2 == 1 {
                r.partner = "web-form".into();
            }
            r
        })
        .collect();
    big[69].processors.clear();
    let out = store.insert_requests(&big).await.expect("big batch");
    assert!(out.iter().all(|o| matches!(o, Inserted::New)), "{out:?}");
    for (i, r) in big.iter().enumerate() {
        let row = store.request(&r.id).await.unwrap().expect("stored");
        assert_eq!(row.partner, r.partner);
        let events = store.events(&r.id).await.unwrap();
        assert_eq!(events.len(), 1, "{}", r.id);
        assert_eq!(events[0].event_type, EventType::Submitted as i32);
        assert_eq!(events[0].request_state, row.state as i32);
        let deliveries = store.deliveries(&r.id).await.unwrap();
        if i == 69 {
            assert_eq!(row.state, RequestState::Completed);
            assert!(deliveries.is_empty());
        } else {
            assert_eq!(row.state, RequestState::Received);
            assert_eq!(deliveries.len(), 2);
        }
    }
    // The same keys again: each partner's key finds its own request, not the other's.
    let out = store.insert_requests(&big[..4]).await.expect("again");
    for (o, r) in out.iter().zip(&big) {
        assert!(
            matches!(o, Inserted::Existing(id) if *id == r.id),
            "{out:?}"
        );
    }
}

async fn registry_outbox_claims_leases_and_backoff(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    store
        .insert_request(&new_request("r1", "k1", 1_000, &["p1", "p2"]))
        .await
        .expect("insert");
    let jobs = store
        .claim_deliveries(5_000, 10, 30_000)
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 2);
    // Leased rows are not handed out again until the lease runs out.
    assert!(store
        .claim_deliveries(5_000, 10, 30_000)
        .await
        .expect("claim")
        .is_empty());
    let p1 = jobs.iter().find(|j| j.processor == "p1").expect("p1");
    let p2 = jobs.iter().find(|j| j.processor == "p2").expect("p2");
    store
        .delivery_failed(p2, "UNAVAILABLE: down", 9_000, 5_000, None)
        .await
        .expect("failed");
    let tasks = vec![TaskStatus {
        subprocessor: "s1".into(),
        state: TaskState::Pending as i32,
        sequence: 1,
        ..Default::default()
    }];
    store
        .delivery_succeeded(p1, &tasks, 5_000)
        .await
        .expect("ok");
    assert_eq!(
        store.request("r1").await.unwrap().unwrap().state,
        RequestState::Dispatched
    );
    // The failed one comes back when its next attempt is due, not before.
    assert!(store
        .claim_deliveries(8_999, 10, 30_000)
        .await
        .unwrap()
        .is_empty());
    // Leases run on the database's clock, not the `now` given: a short one and a real wait.
    let again = store.claim_deliveries(9_000, 10, 1_000).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].processor, "p2");
    assert_eq!(again[0].attempts, 1);
    let d = store.deliveries("r1").await.unwrap();
    let p2row = d.iter().find(|d| d.processor == "p2").unwrap();
    assert_eq!(p2row.last_error.as_deref(), Some("UNAVAILABLE: down"));
    assert!(p2row.done_at.is_none());
    assert!(
        store
            .claim_deliveries(9_000 + 3_600_000, 10, 30_000)
            .await
            .unwrap()
            .is_empty(),
        "moving the registry's clock does not end a lease"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    // An expired lease hands the row out again (a crashed replica's work is not lost).
    assert_eq!(
        store
            .claim_deliveries(9_000, 10, 30_000)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// Two dispatchers claim the same row: the first is paused past its lease, the second takes
/// the row, and the first's late outcome, acceptance or failure, is not recorded. A claim
/// released by its own token is claimed again at once, whatever its lease; another token
/// releases nothing.
async fn registry_outbox_lease_owner(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    store
        .insert_request(&new_request("r1", "k1", 1_000, &["p1"]))
        .await
        .unwrap();
    let first = store.claim_deliveries(2_000, 10, 200).await.unwrap();
    assert_eq!(first.len(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let hour = 3_600_000;
    let second = store.claim_deliveries(2_000, 10, hour).await.unwrap();
    assert_eq!(second.len(), 1, "the paused claim's lease ran out");
    assert_ne!(first[0].lease_owner, second[0].lease_owner);
    let accepted = vec![TaskStatus {
        subprocessor: "s1".into(),
        state: TaskState::Pending as i32,
        sequence: 1,
        ..Default::default()
    }];
    assert!(!store
        .delivery_succeeded(&first[0], &accepted, 2_500)
        .await
        .unwrap());
    assert_eq!(
        store
            .delivery_failed(&first[0], "UNAVAILABLE: late", 9_000, 2_500, Some(1))
            .await
            .unwrap(),
        FailureRecorded::LeaseLost
    );
    let row = store.deliveries("r1").await.unwrap().remove(0);
    assert!(row.done_at.is_none());
    assert_eq!(row.attempts, 0, "nothing of the lost claim was counted");
    assert!(row.last_error.is_none());
    assert!(store.tasks("r1").await.unwrap().is_empty());
    assert!(!store.release_delivery(&first[0]).await.unwrap());
    assert!(
        store
            .claim_deliveries(2_000, 10, hour)
            .await
            .unwrap()
            .is_empty(),
        "the stale claim released nothing"
    );
    // The holder releases it (its registry is stopping): another claim takes it at once.
    assert!(store.release_delivery(&second[0]).await.unwrap());
    let third = store.claim_deliveries(2_000, 10, hour).await.unwrap();
    assert_eq!(
        third.len(),
        1,
        "claimed at once, the hour-long lease notwithstanding"
    );
    assert!(!store
        .delivery_succeeded(&second[0], &accepted, 2_600)
        .await
        .unwrap());
    assert!(store
        .delivery_succeeded(&third[0], &accepted, 2_700)
        .await
        .unwrap());
    let row = store.deliveries("r1").await.unwrap().remove(0);
    assert_eq!(row.done_at, Some(2_700));
    assert_eq!(row.attempts, 1);
    assert_eq!(store.tasks("r1").await.unwrap().len(), 1);
    assert_eq!(store.unsent_delivery_count().await.unwrap(), 0);
}

/// Acceptances of several calls recorded together (the dispatcher's recorder): each held
/// row is marked done with the tasks its answer reported (an answer older than what an
/// acknowledgement already brought moves nothing back), the touched requests fold once, a
/// DELIVERED event per accepted call shows the state before the fold and comes before the
/// STATE_CHANGED; a row another claim took records nothing while the others still do.
async fn registry_deliveries_accepted_together(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    store
        .insert_request(&new_request("r1", "k1", 1_000, &["p1", "p2"]))
        .await
        .unwrap();
    store
        .insert_request(&new_request("r2", "k2", 1_000, &["p1"]))
        .await
        .unwrap();
    let hour = 3_600_000;
    let jobs = store.claim_deliveries(2_000, 10, hour).await.unwrap();
    assert_eq!(jobs.len(), 3);
    let job = |r: &str, p: &str| {
        jobs.iter()
            .find(|j| j.request_id == r && j.processor == p)
            .expect("claimed")
            .clone()
    };
    let (r1p1, r1p2) = (job("r1", "p1"), job("r1", "p2"));
    let mut stale = job("r2", "p1");
    stale.lease_owner = "another claim's token".into();
    // An acknowledgement overtook p1's answer: s1 is IN_PROGRESS already.
    store
        .apply_acks("p1", &[ack("r1", "s1", 2, TaskState::InProgress)], 2_100)
        .await
        .unwrap();
    let status = |sub: &str, seq: u64, state: TaskState| TaskStatus {
        subprocessor: sub.into(),
        state: state as i32,
        sequence: seq,
        ..Default::default()
    };
    let p1_tasks = vec![
        status("s1", 1, TaskState::Pending),
        status("s2", 1, TaskState::Pending),
    ];
    // p2's Deliver was sent again after its task had finished: the answer reports it so.
    let mut s3_done = status("s3", 3, TaskState::Completed);
    s3_done.evidence = Some(dsrelay_proto::v1::Evidence {
        records_affected: 2,
        ..Default::default()
    });
    let p2_tasks = vec![s3_done];
    let before = store.request("r1").await.unwrap().unwrap().state;
    let held = store
        .deliveries_succeeded(
            &[
                (&r1p1, p1_tasks.as_slice()),
                (&stale, p1_tasks.as_slice()),
                (&r1p2, p2_tasks.as_slice()),
            ],
            2_500,
        )
        .await
        .unwrap();
    assert_eq!(held, vec![true, false, true]);

    for d in store.deliveries("r1").await.unwrap() {
        assert_eq!(d.done_at, Some(2_500), "{}", d.processor);
        assert_eq!(d.attempts, 1);
    }
    let r2 = store.deliveries("r2").await.unwrap().remove(0);
    assert!(r2.done_at.is_none());
    assert_eq!(r2.attempts, 0, "nothing of the lost claim was counted");
    assert!(store.tasks("r2").await.unwrap().is_empty());
    let mut tasks: Vec<(String, u64, i32)> = store
        .tasks("r1")
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.subprocessor, t.sequence, t.state))
        .collect();
    tasks.sort();
    assert_eq!(
        tasks,
        vec![
            ("s1".into(), 2, TaskState::InProgress as i32),
            ("s2".into(), 1, TaskState::Pending as i32),
            ("s3".into(), 3, TaskState::Completed as i32),
        ],
        "the older answer moved nothing back"
    );

    let after = store.request("r1").await.unwrap().unwrap().state;
    assert_ne!(before, after, "both deliveries done: the request moved on");
    let events = store.events("r1").await.unwrap();
    let tail: Vec<(i32, i32, String)> = events
        .iter()
        .rev()
        .take(4)
        .rev()
        .map(|e| (e.event_type, e.request_state, e.processor.clone()))
        .collect();
    assert_eq!(
        tail,
        vec![
            (EventType::Delivered as i32, before as i32, "p1".to_string()),
            (EventType::Delivered as i32, before as i32, "p2".to_string()),
            (
                EventType::TaskUpdated as i32,
                before as i32,
                "p2".to_string()
            ),
            (EventType::StateChanged as i32, after as i32, String::new()),
        ],
        "a step learned from a delivery's answer is an event of its own"
    );
    let reported = &events[events.len() - 2];
    assert_eq!(reported.subprocessor, "s3");
    assert_eq!(reported.sequence, 3);
    assert!(
        reported.message.contains("reported on delivery"),
        "{}",
        reported.message
    );
    // Its acknowledgement, arriving afterwards, is recorded but says nothing new.
    let out = store
        .apply_acks("p2", &[ack("r1", "s3", 3, TaskState::Completed)], 2_600)
        .await
        .unwrap();
    assert_eq!(out.applied, 1);
    assert_eq!(store.events("r1").await.unwrap().len(), events.len());
    assert!(
        !store
            .events("r2")
            .await
            .unwrap()
            .iter()
            .any(|e| e.event_type == EventType::Delivered as i32),
        "no DELIVERED event for the lost claim"
    );
}

async fn registry_acknowledgements_fold(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    store
        .insert_request(&new_request("r1", "k1", 1_000, &["p1"]))
        .await
        .unwrap();
    // Not routed to p9: refused, nothing applied.
    let refused = store
        .apply_acks("p9", &[ack("r1", "s1", 2, TaskState::InProgress)], 2_000)
        .await
        .unwrap();
    assert_eq!(
        refused,
        AckOutcome {
            applied: 0,
            duplicates: 0,
            not_routed: vec![0],
        }
    );
    assert!(store.tasks("r1").await.unwrap().is_empty());
    // Acknowledgements may arrive before the delivery's answer is recorded, out of order.
    let r = store
        .apply_acks(
            "p1",
            &[
                ack("r1", "s1", 3, TaskState::Completed),
                ack("r1", "s1", 2, TaskState::InProgress),
            ],
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        AckOutcome {
            applied: 2,
            duplicates: 0,
            not_routed: vec![],
        }
    );
    let dup = store
        .apply_acks("p1", &[ack("r1", "s1", 3, TaskState::Completed)], 2_100)
        .await
        .unwrap();
    assert_eq!(
        dup,
        AckOutcome {
            applied: 0,
            duplicates: 1,
            not_routed: vec![],
        }
    );
    let tasks = store.tasks("r1").await.unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        tasks[0].state,
        TaskState::Completed as i32,
        "the older report did not move it back"
    );
    assert_eq!(tasks[0].sequence, 3);
    // The delivery is recorded later: the request completes.
    let job = store
        .claim_deliveries(3_000, 10, 1_000)
        .await
        .unwrap()
        .remove(0);
    store
        .delivery_succeeded(
            &job,
            &[TaskStatus {
                subprocessor: "s1".into(),
                state: TaskState::Pending as i32,
                sequence: 1,
                ..Default::default()
            }],
            3_000,
        )
        .await
        .unwrap();
    assert_eq!(
        store.tasks("r1").await.unwrap()[0].state,
        TaskState::Completed as i32
    );
    assert_eq!(
        store.request("r1").await.unwrap().unwrap().state,
        RequestState::Completed
    );
    let events = store.events("r1").await.unwrap();
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        events.last().unwrap().request_state,
        RequestState::Completed as i32
    );
}

/// One acknowledgement batch with two steps of one task, a copy of one of them, another
/// request's step and a request never routed: each step is recorded once with its event, the
/// task keeps the last state and the receipt an earlier step carried, and the audit trail
/// holds one valid chain of exactly the events written.
async fn registry_acknowledgement_batch(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    for (id, key) in [("r1", "k1"), ("r2", "k2")] {
        store
            .insert_request(&new_request(id, key, 1_000, &["p1"]))
            .await
            .unwrap();
    }
    let receipt = dsrelay_proto::v1::TransferReceipt {
        request_id: "r1".into(),
        subprocessor: "s1".into(),
        recipient: "recipient".into(),
        files: 1,
        bytes: 10,
        ..Default::default()
    };
    let mut first = ack("r1", "s1", 2, TaskState::InProgress);
    first.transfer_receipt = Some(receipt.clone());
    let head_before = store.audit_head().await.unwrap().map_or(0, |(seq, _)| seq);
    let events_before =
        store.events("r1").await.unwrap().len() + store.events("r2").await.unwrap().len();
    let r = store
        .apply_acks(
            "p1",
            &[
                first,
                ack("r1", "s1", 3, TaskState::Completed),
                ack("r1", "s1", 3, TaskState::Completed),
                ack("r2", "s1", 2, TaskState::InProgress),
                ack("r9", "s1", 2, TaskState::InProgress),
            ],
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        AckOutcome {
            applied: 3,
            duplicates: 1,
            not_routed: vec![4],
        }
    );
    let tasks = store.tasks("r1").await.unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0].state, TaskState::Completed as i32);
    assert_eq!(tasks[0].sequence, 3);
    assert_eq!(
        tasks[0]
            .evidence
            .as_ref()
            .and_then(|e| e.transfer_receipt.clone()),
        Some(receipt),
        "the receipt of the earlier step stays with the task"
    );
    let r1 = store.events("r1").await.unwrap();
    let steps: Vec<i64> = r1
        .iter()
        .filter(|e| e.event_type == dsrelay_proto::v1::EventType::TaskUpdated as i32)
        .map(|e| e.sequence)
        .collect();
    assert_eq!(steps, vec![2, 3], "one event per step, none for the copy");
    let written = store.events("r1").await.unwrap().len() + store.events("r2").await.unwrap().len()
        - events_before;
    let head_after = store.audit_head().await.unwrap().map_or(0, |(seq, _)| seq);
    assert_eq!(
        (head_after - head_before) as usize,
        written,
        "one audit entry per event"
    );
    let entries = store.audit_entries(0, 10_000).await.unwrap();
    dsrelay_runtime::audit::verify(&entries).expect("one valid chain");
    // Applying the same batch again changes nothing and writes nothing.
    let again = store
        .apply_acks("p1", &[ack("r1", "s1", 3, TaskState::Completed)], 2_100)
        .await
        .unwrap();
    assert_eq!(again.duplicates, 1);
    assert_eq!(
        store.audit_head().await.unwrap().map_or(0, |(seq, _)| seq),
        head_after
    );
}

/// Acknowledge calls that arrive together (two processors', and one processor's sent again)
/// are applied in one transaction, and each caller is answered with its own outcome: what it
/// applied, what was a duplicate (also of another call of the same transaction), what was
/// never routed to its processor.
async fn registry_concurrent_acknowledge_calls_share_one_commit(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    store
        .insert_request(&new_request("r1", "k1", 1_000, &["p1", "p2"]))
        .await
        .unwrap();
    let before = store.acknowledgement_commits();
    let p1 = [
        ack("r1", "s1", 2, TaskState::InProgress),
        ack("r1", "s1", 3, TaskState::Completed),
    ];
    let p2 = [
        ack("r1", "s2", 2, TaskState::Completed),
        ack("r9", "s2", 2, TaskState::Completed),
    ];
    let p1_again = [ack("r1", "s1", 3, TaskState::Completed)];
    // Polled together: every call queues before the writer takes the first batch.
    let (a, b, c) = tokio::join!(
        store.apply_acks("p1", &p1, 2_000),
        store.apply_acks("p2", &p2, 2_000),
        store.apply_acks("p1", &p1_again, 2_000),
    );
    assert_eq!(
        store.acknowledgement_commits() - before,
        1,
        "one transaction"
    );
    assert_eq!(
        a.unwrap(),
        AckOutcome {
            applied: 2,
            duplicates: 0,
            not_routed: vec![],
        }
    );
    assert_eq!(
        b.unwrap(),
        AckOutcome {
            applied: 1,
            duplicates: 0,
            not_routed: vec![1],
        }
    );
    assert_eq!(
        c.unwrap(),
        AckOutcome {
            applied: 0,
            duplicates: 1,
            not_routed: vec![],
        }
    );
    let mut tasks: Vec<(String, String, i32, u64)> = store
        .tasks("r1")
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.processor, t.subprocessor, t.state, t.sequence))
        .collect();
    tasks.sort();
    assert_eq!(
        tasks,
        vec![
            ("p1".into(), "s1".into(), TaskState::Completed as i32, 3),
            ("p2".into(), "s2".into(), TaskState::Completed as i32, 2),
        ]
    );
    let steps: Vec<(String, i64)> = store
        .events("r1")
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == EventType::TaskUpdated as i32)
        .map(|e| (e.processor, e.sequence))
        .collect();
    assert_eq!(
        steps,
        vec![("p1".into(), 2), ("p1".into(), 3), ("p2".into(), 2)],
        "one event per step, none for the copy"
    );
    let entries = store.audit_entries(0, 10_000).await.unwrap();
    dsrelay_runtime::audit::verify(&entries).expect("one valid chain");
}

async fn registry_list_cancel_extend(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    for i in 0..5 {
        store
            .insert_request(&new_request(
                &format!("r{i}"),
                &format!("k{i}"),
                1_000 + i,
                &["p1"],
            ))
            .await
            .unwrap();
    }
    let page = store
        .list(
            &ListFilter {
                limit: 2,
                ..Default::default()
            },
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["r4", "r3"]
    );
    let next = store
        .list(
            &ListFilter {
                limit: 10,
                before: Some((1_003, "r3".into())),
                ..Default::default()
            },
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        next.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["r2", "r1", "r0"]
    );
    // due_at = received + 1000; at 2_002 the first three are overdue.
    let overdue = store
        .list(
            &ListFilter {
                limit: 10,
                overdue_only: true,
                ..Default::default()
            },
            2_002,
        )
        .await
        .unwrap();
    assert_eq!(overdue.len(), 2, "r0 and r1 are due before 2002");
    assert!(matches!(
        store.cancel("r0", "withdrawn", 3_000).await.unwrap(),
        CancelOutcome::Cancelled
    ));
    assert!(matches!(
        store.cancel("r0", "again", 3_000).await.unwrap(),
        CancelOutcome::NotCancellable(RequestState::Cancelled)
    ));
    assert!(matches!(
        store.cancel("zz", "x", 3_000).await.unwrap(),
        CancelOutcome::NotFound
    ));
    let mine = store
        .list(
            &ListFilter {
                limit: 10,
                partner: Some("other".into()),
                ..Default::default()
            },
            0,
        )
        .await
        .unwrap();
    assert!(mine.is_empty());
    let cancelled = store
        .list(
            &ListFilter {
                limit: 10,
                states: vec![RequestState::Cancelled as i32],
                ..Default::default()
            },
            0,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 1);
    // The cancellation is queued for the processor; the undelivered delivery is not sent.
    let jobs = store.claim_deliveries(3_000, 100, 1_000).await.unwrap();
    let r0: Vec<&str> = jobs
        .iter()
        .filter(|j| j.request_id == "r0")
        .map(|j| j.op.as_str())
        .collect();
    assert_eq!(r0, ["cancel"]);
    let row = store.request("r1").await.unwrap().unwrap();
    assert!(store.extend(&row, 2, "archives", 3_000).await.unwrap());
    // A second extension made from the same read (a concurrent call) writes nothing and says
    // so, rather than losing the first one's months and reason.
    assert!(!store.extend(&row, 1, "later", 3_000).await.unwrap());
    let extended = store.request("r1").await.unwrap().unwrap();
    assert_eq!(extended.extension_months, 2);
    assert!(extended.extension_reasons.contains("archives"));
    assert!(!extended.extension_reasons.contains("later"));
    // Nor is a cancelled request extended by a call that read it before the cancellation.
    let before = store.request("r1").await.unwrap().unwrap();
    store.cancel("r1", "withdrawn", 3_500).await.unwrap();
    assert!(!store.extend(&before, 0, "too late", 4_000).await.unwrap());
}

async fn processor_tasks_and_ack_outbox(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = processor_store(backend, dir.path()).await else {
        return;
    };
    let req = DeliverRequest {
        request_id: "r1".into(),
        kind: RequestKind::Erasure as i32,
        identities: vec![email("a@b.fi")],
        ..Default::default()
    };
    let subs = vec!["s1".to_string(), "s2".to_string()];
    let Accepted::New(tasks) = store.accept("c", &req, &subs, None, 1_000).await.unwrap() else {
        panic!("new")
    };
    assert_eq!(tasks.len(), 2);
    assert!(
        matches!(store.accept("c", &req, &subs, None, 1_001).await.unwrap(), Accepted::Duplicate(t) if t.len() == 2)
    );
    // The same request id from another controller is another request.
    assert!(matches!(
        store
            .accept("c2", &req, &subs[..1], None, 1_001)
            .await
            .unwrap(),
        Accepted::New(_)
    ));

    let jobs = store.claim_tasks(2_000, 10, 5_000).await.unwrap();
    assert_eq!(jobs.len(), 3);
    assert!(jobs
        .iter()
        .all(|j| j.task.attempts == 1 && j.request.is_some()));
    assert!(
        store
            .claim_tasks(2_000, 10, 5_000)
            .await
            .unwrap()
            .is_empty(),
        "leased"
    );
    let j = jobs
        .iter()
        .find(|j| j.task.key.controller == "c" && j.task.key.subprocessor == "s1")
        .unwrap();
    let started = Transition {
        state: TaskState::InProgress,
        ..Default::default()
    };
    assert_eq!(
        store
            .transition(&j.task.key, 1, &started, 2_000, 1)
            .await
            .unwrap(),
        Some(2)
    );
    // A stale writer (expected sequence 1 again) loses.
    assert_eq!(
        store
            .transition(&j.task.key, 1, &started, 2_000, 1)
            .await
            .unwrap(),
        None
    );
    // Cancelling finishes the open tasks of that controller's request only.
    let after = store.cancel("c", "r1", "withdrawn", 2_500).await.unwrap();
    assert!(after.iter().all(|t| t.state == TaskState::Cancelled));
    let other = store.tasks("c2", "r1").await.unwrap();
    assert_eq!(other[0].state, TaskState::Pending);
    // A cancellation for an unknown request leaves a tombstone: a later delivery makes no tasks.
    store.cancel("c", "r9", "early", 2_500).await.unwrap();
    let late = DeliverRequest {
        request_id: "r9".into(),
        ..req.clone()
    };
    assert!(
        matches!(store.accept("c", &late, &subs, None, 2_600).await.unwrap(), Accepted::Duplicate(t) if t.is_empty())
    );

    let acks = store.claim_acks(3_000, 100, 5_000).await.unwrap();
    // s1: IN_PROGRESS (2) and CANCELLED (3); s2: CANCELLED (2).
    let mut seen: Vec<(String, u64)> = acks
        .iter()
        .map(|a| (a.ack.subprocessor.clone(), a.ack.sequence))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("s1".to_string(), 2),
            ("s1".to_string(), 3),
            ("s2".to_string(), 2)
        ]
    );
    assert!(
        store
            .claim_acks(3_000, 100, 5_000)
            .await
            .unwrap()
            .is_empty(),
        "leased"
    );
    let (first, rest) = acks.split_first().unwrap();
    store.acks_sent(&[first.id], 3_100).await.unwrap();
    let retry: Vec<(i64, &str, i64)> = rest
        .iter()
        .map(|a| (a.id, a.lease_owner.as_str(), 4_000))
        .collect();
    store.acks_failed(&retry, "UNAVAILABLE").await.unwrap();
    assert!(store
        .claim_acks(3_999, 100, 5_000)
        .await
        .unwrap()
        .is_empty());
    let again = store.claim_acks(4_000, 100, 5_000).await.unwrap();
    assert_eq!(again.len(), rest.len());
    assert!(again.iter().all(|a| a.attempts == 1));
}

/// A stopping processor gives up what it abandoned: a released task or acknowledgement is
/// claimed again at once, without waiting for its lease, and only the claim's own token
/// releases a task.
async fn processor_released_leases_are_claimed_at_once(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = processor_store(backend, dir.path()).await else {
        return;
    };
    let req = DeliverRequest {
        request_id: "r1".into(),
        kind: RequestKind::Erasure as i32,
        identities: vec![email("a@b.fi")],
        ..Default::default()
    };
    let subs = vec!["s1".to_string()];
    store.accept("c", &req, &subs, None, 1_000).await.unwrap();
    let hour = 3_600_000;
    let jobs = store.claim_tasks(2_000, 10, hour).await.unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    let key = &job.task.key;
    assert!(store
        .call_started(key, job.task.sequence, &job.lease_owner, 2_000)
        .await
        .unwrap());
    assert!(
        !store.release_lease(key, "not-the-owner").await.unwrap(),
        "another token releases nothing"
    );
    assert!(store.claim_tasks(2_000, 10, hour).await.unwrap().is_empty());
    assert!(store.release_lease(key, &job.lease_owner).await.unwrap());
    let row = store.task(key).await.unwrap().unwrap();
    assert_eq!(
        row.call_started_at,
        Some(2_000),
        "the cut-off call stays noted"
    );
    let again = store.claim_tasks(2_000, 10, hour).await.unwrap();
    assert_eq!(
        again.len(),
        1,
        "claimed at once, the hour-long lease notwithstanding"
    );
    assert_ne!(again[0].lease_owner, job.lease_owner);
    assert!(
        !store.release_lease(key, &job.lease_owner).await.unwrap(),
        "the old claim cannot release the new one"
    );

    let started = Transition {
        state: TaskState::InProgress,
        ..Default::default()
    };
    assert!(store
        .transition(key, again[0].task.sequence, &started, 2_500, 1)
        .await
        .unwrap()
        .is_some());
    let acks = store.claim_acks(3_000, 100, hour).await.unwrap();
    assert_eq!(acks.len(), 1);
    assert!(store.claim_acks(3_000, 100, hour).await.unwrap().is_empty());
    assert_eq!(store.unsent_ack_count().await.unwrap(), acks.len() as i64);
    let claims: Vec<(i64, &str)> = acks
        .iter()
        .map(|a| (a.id, a.lease_owner.as_str()))
        .collect();
    store.release_acks(&claims).await.unwrap();
    assert_eq!(
        store.claim_acks(3_000, 100, hour).await.unwrap().len(),
        acks.len()
    );
}

/// Every event recorded by concurrent writers, on two replicas sharing the database while
/// both run their audit chainer, is in one gapless, valid chain once read: as many entries
/// as events, none left waiting.
async fn registry_concurrent_events_form_one_chain(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((a, b)) = registry_replicas(backend, dir.path()).await else {
        return;
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let chainers = [a.clone(), b.clone()].map(|store| {
        let stop = stop.clone();
        tokio::spawn(async move { store.run_audit_chainer(stop).await })
    });
    let mut writers = Vec::new();
    for w in 0..8 {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        writers.push(tokio::spawn(async move {
            for i in 0..10 {
                let id = format!("w{w}-{i}");
                store
                    .insert_request(&new_request(&id, &id, 1_000 + i, &["p1", "p2"]))
                    .await
                    .expect("insert");
                if i % 3 == 0 {
                    // Reads of the trail chain what is committed, racing the chainers.
                    store.audit_head().await.expect("head");
                }
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    stop_tx.send(true).expect("stop");
    for c in chainers {
        c.await.expect("chainer");
    }
    let entries = b.audit_entries(0, 100_000).await.expect("entries");
    let intact = dsrelay_runtime::audit::verify(&entries).expect("one valid chain");
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events")
        .fetch_one(&a.db().pool)
        .await
        .expect("events");
    assert!(events >= 80, "{events} events");
    assert_eq!(entries.len() as i64, events, "one entry per event");
    assert_eq!(intact.entries, entries.len() as u64);
    assert_eq!(entries.last().map(|e| e.seq), Some(events as u64));
    if backend == Backend::Postgres {
        let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_pending")
            .fetch_one(&a.db().pool)
            .await
            .expect("pending");
        assert_eq!(pending, 0, "nothing left unchained");
    }
}

/// On PostgreSQL, transactions that record audit entries commit side by side: one that has
/// appended and not committed does not hold up another replica's change, whose entries are
/// chained at once; the first's entry is chained once it commits, after the others, and an
/// entry of a transaction rolled back never reaches the trail.
async fn registry_audited_transactions_do_not_wait_for_each_other(backend: Backend) {
    use dsrelay_runtime::audit::table::{append_all, NewEntry};
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((a, b)) = registry_replicas(backend, dir.path()).await else {
        return;
    };
    a.insert_request(&new_request("r0", "k0", 500, &["p1"]))
        .await
        .expect("insert");
    let before = a.audit_head().await.expect("head").map_or(0, |h| h.0);
    assert!(before > 0);
    let entry = |detail: &str| NewEntry {
        occurred_at: 2_000,
        request_id: "held".into(),
        event_type: EventType::Submitted as i32,
        actor: "test".into(),
        detail: detail.into(),
    };
    let mut held = a.db().pool.begin().await.expect("begin");
    append_all(&mut held, vec![entry("committed late")])
        .await
        .expect("append");
    let mut dropped = a.db().pool.begin().await.expect("begin");
    append_all(&mut dropped, vec![entry("rolled back")])
        .await
        .expect("append");
    // With one lock per audited transaction, or a chain written in each transaction, this
    // change would wait for `held` to end.
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        b.insert_request(&new_request("r1", "k1", 1_000, &["p1", "p2"])),
    )
    .await
    .expect("another replica's change committed while a transaction with entries is open")
    .expect("insert");
    let (seq, _) = tokio::time::timeout(std::time::Duration::from_secs(10), b.audit_head())
        .await
        .expect("chained while a transaction with entries is open")
        .expect("head")
        .expect("a head");
    assert!(seq > before, "the second change's entries are chained");
    dropped.rollback().await.expect("rollback");
    held.commit().await.expect("commit");
    let entries = a.audit_entries(0, 10_000).await.expect("entries");
    dsrelay_runtime::audit::verify(&entries).expect("one valid chain");
    let last = entries.last().expect("entries");
    assert_eq!(last.detail, "committed late");
    assert_eq!(last.seq, seq + 1);
    assert!(entries.iter().all(|e| e.detail != "rolled back"));
}

/// Cancellations of one request arriving side by side (the registry's retries, reaching two
/// processor replicas on PostgreSQL) record one audit entry, for a request the processor
/// knows and for one it does not know yet alike, and leave it cancelled once.
async fn processor_concurrent_cancellations_record_one_entry(backend: Backend) {
    use dsrelay_proto::v1::ProcessorAuditEvent;
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(url) = database_url(dir.path(), "processor", backend).await else {
        return;
    };
    let db = Db::connect(&url).await.expect("connect");
    db.migrate(&PROC_SQLITE, &PROC_PG).await.expect("migrate");
    let a = ProcessorStore::new(db, b"test key");
    let b = match backend {
        Backend::Sqlite => a.clone(),
        Backend::Postgres => {
            ProcessorStore::new(Db::connect(&url).await.expect("connect"), b"test key")
        }
    };
    let mut expected = Vec::new();
    for round in 0..5 {
        let (known, unknown) = (format!("known-{round}"), format!("unknown-{round}"));
        let req = DeliverRequest {
            request_id: known.clone(),
            kind: RequestKind::Erasure as i32,
            identities: vec![email("a@b.fi")],
            ..Default::default()
        };
        let subs = vec!["s1".to_string()];
        assert!(matches!(
            a.accept("c", &req, &subs, None, 1_000)
                .await
                .expect("accept"),
            Accepted::New(_)
        ));
        let mut calls = Vec::new();
        for i in 0..8 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let id = if i < 4 {
                known.clone()
            } else {
                unknown.clone()
            };
            calls.push(tokio::spawn(async move {
                store
                    .cancel("c", &id, "asked twice", 5_000 + i)
                    .await
                    .expect("cancel");
            }));
        }
        for c in calls {
            c.await.expect("cancel");
        }
        expected.extend([known, unknown]);
    }
    let entries = a.audit_entries(0, 10_000).await.expect("entries");
    dsrelay_runtime::audit::verify(&entries).expect("one valid chain");
    let mut cancelled: Vec<&str> = entries
        .iter()
        .filter(|e| e.event_type == ProcessorAuditEvent::RequestCancelled as i32)
        .map(|e| e.request_id.as_str())
        .collect();
    cancelled.sort_unstable();
    expected.sort_unstable();
    assert_eq!(cancelled, expected, "one entry per cancelled request");
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

/// The routes intake stores are remembered: the Acknowledge API's routing check
/// (`kinds_delivered_to`) answers them without a read, for the processors each request
/// went to and no other, whether the request came alone or in a batch. A store that did not
/// take them (another replica) reads them from the database. The Deliver rows are deleted
/// behind the stores' backs here only to tell the two answers apart.
async fn registry_routes_are_remembered_from_intake(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    store
        .insert_request(&new_request("r1", "k1", 1_000, &["p1", "p2"]))
        .await
        .unwrap();
    store
        .insert_requests(&[
            new_request("r2", "k2", 1_000, &["p1"]),
            new_request("r3", "k3", 1_000, &["p2"]),
        ])
        .await
        .unwrap();
    let other = RegistryStore::new(store.db().clone(), b"test key");
    let kinds = |ids: &[&str]| -> std::collections::HashMap<String, RequestKind> {
        ids.iter()
            .map(|id| (id.to_string(), RequestKind::Erasure))
            .collect()
    };
    assert_eq!(
        other
            .kinds_delivered_to("p1", &["r1", "r2", "r3", "r9"])
            .await
            .unwrap(),
        kinds(&["r1", "r2"]),
        "read from the database"
    );
    sqlx::query("DELETE FROM deliveries")
        .execute(&store.db().pool)
        .await
        .unwrap();
    assert_eq!(
        store
            .kinds_delivered_to("p1", &["r1", "r2", "r3", "r9"])
            .await
            .unwrap(),
        kinds(&["r1", "r2"]),
        "remembered from intake"
    );
    assert_eq!(
        store.kinds_delivered_to("p2", &["r1", "r3"]).await.unwrap(),
        kinds(&["r1", "r3"])
    );
    assert!(store
        .kinds_delivered_to("p3", &["r1"])
        .await
        .unwrap()
        .is_empty());
    // What the other store read is remembered too; it never took r3 for p2.
    assert_eq!(
        other.kinds_delivered_to("p1", &["r1", "r2"]).await.unwrap(),
        kinds(&["r1", "r2"])
    );
    assert!(other
        .kinds_delivered_to("p2", &["r3"])
        .await
        .unwrap()
        .is_empty());
}

on_both_backends!(
    registry_intake_and_idempotency,
    registry_batched_intake_shares_one_commit,
    registry_outbox_claims_leases_and_backoff,
    registry_outbox_lease_owner,
    registry_deliveries_accepted_together,
    registry_an_update_of_old_terms_stays_armed,
    registry_acknowledgements_fold,
    registry_acknowledgement_batch,
    registry_concurrent_acknowledge_calls_share_one_commit,
    registry_routes_are_remembered_from_intake,
    registry_list_cancel_extend,
    processor_tasks_and_ack_outbox,
    processor_released_leases_are_claimed_at_once,
    registry_concurrent_events_form_one_chain,
    processor_concurrent_cancellations_record_one_entry,
);

/// SQLite's one writer connection holds every transaction apart, so this is PostgreSQL's alone.
#[tokio::test]
async fn postgres_audited_transactions_do_not_wait_for_each_other() {
    registry_audited_transactions_do_not_wait_for_each_other(Backend::Postgres).await;
}

/// Two transactions applying overlapping acknowledgement batches (a batch sent again to
/// another registry replica while the first is still applying it) record the keys in one
/// order: a batch that arrives out of order waits for a key the other holds without holding
/// one the other needs next, so the other goes on rather than both waiting in a cycle (and
/// PostgreSQL aborting one). PostgreSQL's alone: SQLite's one writer holds them apart.
#[tokio::test]
async fn postgres_overlapping_acknowledgement_batches_do_not_wait_in_a_cycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(Backend::Postgres, dir.path()).await else {
        return;
    };
    store
        .insert_request(&new_request("r1", "k1", 1_000, &["p1"]))
        .await
        .expect("insert");
    let record = |sub: &'static str| {
        sqlx::query(
            "INSERT INTO acknowledgements (request_id, processor, subprocessor, sequence, \
             state, received_at) VALUES ('r1', 'p1', $1, 2, $2, 2000)",
        )
        .bind(sub)
        .bind(TaskState::InProgress as i32)
    };
    // The other transaction holds the first key of the batch, not committed yet.
    let mut other = store.db().pool.begin().await.expect("begin");
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *other)
        .await
        .expect("lock timeout");
    record("s1").execute(&mut *other).await.expect("first key");
    let applying = {
        let store = store.clone();
        tokio::spawn(async move {
            let batch = [
                ack("r1", "s2", 2, TaskState::InProgress),
                ack("r1", "s1", 2, TaskState::InProgress),
            ];
            store.apply_acks("p1", &batch, 2_100).await
        })
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&store.db().pool)
        .await
        .expect("pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the batch did not wait"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    record("s2")
        .execute(&mut *other)
        .await
        .expect("the second key is not held by the waiting batch");
    other.rollback().await.expect("rollback");
    let outcome = applying
        .await
        .expect("joined")
        .expect("the batch goes through once the other ends");
    assert_eq!((outcome.applied, outcome.duplicates), (2, 0));
}

/// Accepted deliveries recorded together, one of them a contract end's update of terms that
/// changed again while it was on its way: every claim held its row, the Deliver is done, and
/// the update stays armed (its terms are no longer the latest) until the one carrying the
/// new terms is accepted.
async fn registry_an_update_of_old_terms_stays_armed(backend: Backend) {
    use dsrelay_proto::v1::ContractEndChoice;
    use dsrelay_registry::store::{ContractChange, NewContract};
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = registry_store(backend, dir.path()).await else {
        return;
    };
    let mut contract_end = new_request("c1", "kc", 1_000, &["p1"]);
    contract_end.kind = RequestKind::ContractEnd as i32;
    let terms = NewContract {
        choice: ContractEndChoice::None as i32,
        effective_at: 1_000,
        grace_ends_at: 1_000_000,
        transfer_recipient: String::new(),
    };
    store
        .insert_batch(&[(contract_end, Some(terms))])
        .await
        .expect("insert");
    let hour = 3_600_000;
    let delivered = store
        .claim_deliveries(2_000, 10, hour)
        .await
        .expect("claim");
    assert_eq!(delivered.len(), 1);
    // The processor reports its task, pending: the contract end is under way.
    let pending = [TaskStatus {
        subprocessor: "s1".into(),
        state: TaskState::Pending as i32,
        sequence: 1,
        ..Default::default()
    }];
    assert!(store
        .delivery_succeeded(&delivered[0], &pending, 2_000)
        .await
        .expect("delivered"));
    let choose = ContractChange::Choose(ContractEndChoice::ReturnThenDelete, String::new());
    assert!(store
        .change_contract("c1", &choose, "ops", 3_000)
        .await
        .expect("choose"));
    store
        .insert_request(&new_request("r1", "k1", 3_000, &["p1"]))
        .await
        .expect("insert");
    let jobs = store
        .claim_deliveries(4_000, 10, hour)
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let update = jobs.iter().find(|j| j.request_id == "c1").expect("update");
    let deliver = jobs.iter().find(|j| j.request_id == "r1").expect("deliver");
    assert!(update.terms.contract_version.is_some());
    // Confirmed while the update carrying the choice is on its way.
    let confirm = ContractChange::ConfirmReturn("ab".repeat(32));
    assert!(store
        .change_contract("c1", &confirm, "ops", 4_100)
        .await
        .expect("confirm"));
    let held = store
        .deliveries_succeeded(&[(update, &[]), (deliver, &[])], 4_200)
        .await
        .expect("recorded");
    assert_eq!(held, [true, true]);
    let done_at = |id: &'static str, op: &'static str| {
        let pool = store.db().pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<i64>>(
                "SELECT done_at FROM deliveries WHERE request_id = $1 AND op = $2",
            )
            .bind(id)
            .bind(op)
            .fetch_one(&pool)
            .await
            .expect("row")
        }
    };
    assert_eq!(done_at("r1", "deliver").await, Some(4_200));
    assert_eq!(
        done_at("c1", "update").await,
        None,
        "the old terms' update stays armed"
    );
    let again = store
        .claim_deliveries(5_000, 10, hour)
        .await
        .expect("claim");
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0].terms.contract_version > update.terms.contract_version);
    assert!(store
        .delivery_succeeded(&again[0], &[], 5_100)
        .await
        .expect("delivered"));
    assert_eq!(done_at("c1", "update").await, Some(5_100));
}
