//! Idempotency, deduplication, cancellation and deadlines, through the real APIs.

use std::time::Duration;

use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, Acknowledgement, CancelRequest, DeliverRequest, EventType, Evidence,
    ExtendDeadlineRequest, ExtendDueDateRequest, GetRequest, ListEventsRequest,
    ListRequestsRequest, Request, RequestKind, RequestState, Scope, SubmitRequest, TaskState,
    WatchRequest,
};
use dsrelay_registry::deadline::due_at;
use tonic::Code;

use crate::harness::{
    count, email, erasure, in_state, spawn_pair, wait_until, Backend, Holder, PairOptions,
    PROCESSOR,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_is_idempotent_per_partner_and_key() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut crm = pair.client("partner-crm");
    let req = erasure("teemu.testaaja@example.fi");
    let first = crm.submit(req.clone()).await.expect("first").into_inner();
    assert!(!first.deduplicated);
    let again = crm.submit(req.clone()).await.expect("again").into_inner();
    assert!(again.deduplicated);
    assert_eq!(again.request_id, first.request_id);
    assert_eq!(again.due_at, first.due_at);

    // Same key, another body: refused, and the message says why and what to do.
    let mut other = req.clone();
    other.identities = vec![email("someone.else@example.fi")];
    let err = crm.submit(other).await.expect_err("conflict");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("idempotency_key"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&first.request_id),
        "{}",
        err.message()
    );

    // The same key from another partner is another request.
    let mut web = pair.client("partner-webform");
    let theirs = web.submit(req).await.expect("webform").into_inner();
    assert_ne!(theirs.request_id, first.request_id);
    assert!(!theirs.deduplicated);

    // Only one request exists per (partner, key) even though the first was submitted twice.
    assert_eq!(
        count(
            pair.registry.database_url(),
            "SELECT COUNT(*) FROM requests"
        )
        .await,
        2
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_deduplicate_deliveries_and_acknowledgements() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut crm = pair.client("partner-crm");
    let r = crm
        .submit(erasure("teemu.testaaja@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    let done = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::Completed),
    )
    .await;

    // A repeated delivery (as after a lost answer) changes nothing at the processor.
    let mut processor = ProcessorServiceClient::new(pair.channel_to_processor("registry"));
    let body = DeliverRequest {
        request_id: r.request_id.clone(),
        kind: RequestKind::Erasure as i32,
        identities: vec![email("teemu.testaaja@example.fi")],
        ..Default::default()
    };
    let again = processor
        .deliver(body)
        .await
        .expect("redeliver")
        .into_inner();
    assert!(again.duplicate);
    assert_eq!(again.tasks.len(), 2);
    assert!(again.tasks.iter().all(|t| t.sequence == 3));
    let proc_db = pair.processor.database_url();
    assert_eq!(count(proc_db, "SELECT COUNT(*) FROM requests").await, 1);
    assert_eq!(count(proc_db, "SELECT COUNT(*) FROM tasks").await, 2);
    assert_eq!(
        count(&pair.accounting_url, "SELECT COUNT(*) FROM customers").await,
        5
    );

    // A repeated acknowledgement is a duplicate; a stale one never moves a task back.
    let mut acks = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"));
    let stale = Acknowledgement {
        request_id: r.request_id.clone(),
        subprocessor: "accounting".into(),
        sequence: 2,
        state: TaskState::InProgress as i32,
        evidence: Some(Evidence::default()),
        ..Default::default()
    };
    let resp = acks
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![stale],
        })
        .await
        .expect("ack")
        .into_inner();
    assert_eq!((resp.applied, resp.duplicates), (0, 1));
    let view = crm
        .get(GetRequest {
            request_id: r.request_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(view.state, RequestState::Completed as i32);
    assert_eq!(view.tasks, done.tasks);
    pair.stop().await;
}

/// A cancellation that comes while a holder works cannot call it back: the mail holder's
/// erasure (five seconds long) goes on, and the task reports what it did, COMPLETED and
/// saying the cancellation came too late, never CANCELLED over work that was done. The
/// cancellation stopped nothing, so the request ends COMPLETED, its cancel reason kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_a_holder_works_reports_what_it_did() {
    let pair = spawn_pair(PairOptions {
        mail_delay_ms: 5000,
        ..Default::default()
    })
    .await
    .expect("pair");
    let mut crm = pair.client("partner-crm");
    let r = crm
        .submit(erasure("teemu.testaaja@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    let task_in = |name: &'static str, state: TaskState| {
        move |v: &Request| {
            v.tasks
                .iter()
                .any(|t| t.subprocessor == name && t.state == state as i32)
        }
    };
    wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        |v: &Request| {
            task_in("accounting", TaskState::Completed)(v)
                && task_in("mail-marketing", TaskState::InProgress)(v)
        },
    )
    .await;
    let cancelled = crm
        .cancel(CancelRequest {
            request_id: r.request_id.clone(),
            reason: "subject withdrew the request".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state, RequestState::Cancelled as i32);
    assert_eq!(cancelled.cancel_reason, "subject withdrew the request");
    // A watch does not end at CANCELLED while the mail holder works: it follows on to what
    // the holder did.
    let mut events = crm
        .watch(WatchRequest {
            request_id: r.request_id.clone(),
            after_event_id: 0,
            follow_after_terminal: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let watched = tokio::spawn(async move {
        let mut states = Vec::new();
        while let Some(event) = events.message().await.expect("watching") {
            states.push(event.request_state);
        }
        states
    });
    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        task_in("mail-marketing", TaskState::Completed),
    )
    .await;
    let mail = view
        .tasks
        .iter()
        .find(|t| t.subprocessor == "mail-marketing")
        .expect("task");
    let evidence = mail.evidence.as_ref().expect("evidence");
    assert!(
        evidence
            .note
            .contains("the cancellation came while the holder was working"),
        "{mail:#?}"
    );
    assert!(view
        .tasks
        .iter()
        .all(|t| t.state != TaskState::Cancelled as i32));
    assert_eq!(view.state, RequestState::Completed as i32);
    assert_eq!(view.cancel_reason, "subject withdrew the request");
    let states = tokio::time::timeout(Duration::from_secs(20), watched)
        .await
        .expect("the watch ended once the request was COMPLETED")
        .expect("the watch task");
    assert!(
        states.contains(&(RequestState::Cancelled as i32)),
        "{states:?}"
    );
    assert_eq!(
        states.last(),
        Some(&(RequestState::Completed as i32)),
        "{states:?}"
    );
    let err = crm
        .cancel(CancelRequest {
            request_id: r.request_id.clone(),
            reason: "again".into(),
        })
        .await
        .expect_err("second cancel");
    assert_eq!(err.code(), Code::FailedPrecondition);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_dates_extensions_and_overdue_filter() {
    let pair = spawn_pair(PairOptions {
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("pair");
    let mut crm = pair.crm();
    // A request received 40 days ago and still open (its only holder, web-agency, is never
    // up): submitted first, then the registry's clock moves on 40 days.
    let mut old = SubmitRequest {
        kind: RequestKind::Erasure as i32,
        identities: vec![email("old@example.fi")],
        idempotency_key: "old-one".into(),
        ..Default::default()
    };
    old.scope = Some(Scope {
        data_categories: vec!["web-analytics".into()],
    });
    let old_id = crm
        .submit(old)
        .await
        .expect("submit old")
        .into_inner()
        .request_id;
    let clock = pair.registry.clock().expect("an in-process registry");
    clock.advance(40 * 24 * 3600 * 1000);

    let before = clock.now_ms();
    let r = crm
        .submit(erasure("someone@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    let due = dsrelay_proto::millis_from_timestamp(&r.due_at.expect("due"));
    let after = clock.now_ms();
    // One calendar month after receipt.
    assert!(due >= due_at(before, 0) && due <= due_at(after, 0), "{due}");

    // Extending is for operators, by at most two months in all, with a reason.
    let err = crm
        .extend_deadline(ExtendDeadlineRequest {
            request_id: r.request_id.clone(),
            months: 1,
            reason: "complex".into(),
        })
        .await
        .expect_err("partner may not extend");
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut ops = pair.client("operator");
    let extended = ops
        .extend_deadline(ExtendDeadlineRequest {
            request_id: r.request_id.clone(),
            months: 2,
            reason: "many archives to search".into(),
        })
        .await
        .expect("extend")
        .into_inner();
    let received = dsrelay_proto::millis_from_timestamp(&extended.received_at.expect("received"));
    assert_eq!(
        dsrelay_proto::millis_from_timestamp(&extended.due_at.expect("due")),
        due_at(received, 2)
    );
    assert_eq!(
        extended.extension_reasons,
        vec!["many archives to search".to_string()]
    );
    let err = ops
        .extend_deadline(ExtendDeadlineRequest {
            request_id: r.request_id.clone(),
            months: 1,
            reason: "more".into(),
        })
        .await
        .expect_err("a third month");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("months"), "{}", err.message());

    // The old request is overdue; the fresh one is not.
    let overdue = crm
        .list(ListRequestsRequest {
            overdue_only: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<&str> = overdue
        .requests
        .iter()
        .map(|r| r.request_id.as_str())
        .collect();
    assert_eq!(ids, [old_id.as_str()]);
    assert!(overdue.requests[0].overdue);
    let all = crm
        .list(ListRequestsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.requests.len(), 2);
    let _ = PROCESSOR;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_and_filters() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut crm = pair.client("partner-crm");
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut req = erasure(&format!("p{i}@example.fi"));
        if i % 2 == 1 {
            req.kind = RequestKind::Objection as i32;
        }
        ids.push(
            crm.submit(req)
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = crm
            .list(ListRequestsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.requests.len() <= 3);
        seen.extend(page.requests.into_iter().map(|r| r.request_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ids.reverse();
    assert_eq!(seen, ids, "every request once, newest first");
    let objections = crm
        .list(ListRequestsRequest {
            kind: RequestKind::Objection as i32,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(objections.requests.len(), 3);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_acknowledgements_are_reconciled() {
    let pair = spawn_pair(PairOptions {
        acks_to_nowhere: true,
        ..Default::default()
    })
    .await
    .expect("pair");
    let mut crm = pair.client("partner-crm");
    let r = crm
        .submit(erasure("teemu.testaaja@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    // No acknowledgement can arrive; the registry asks the processor once the request has
    // been quiet for ack_timeout_ms (3 s in the tests).
    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    assert!(view.tasks.iter().all(|t| t.sequence == 3), "{view:#?}");
    assert_eq!(
        count(
            pair.registry.database_url(),
            "SELECT COUNT(*) FROM acknowledgements"
        )
        .await,
        0,
        "nothing came through the acknowledgement API"
    );
    let reconciled = count(
        pair.registry.database_url(),
        "SELECT COUNT(*) FROM events WHERE message LIKE '%(reconciled)%'",
    )
    .await;
    assert_eq!(reconciled, 2, "one reconciled update per task");
    pair.stop().await;
}

/// The registry's `checked_at` of request `id` (ms).
async fn checked_at(pair: &crate::harness::TestPair, id: &str) -> i64 {
    count(
        pair.registry.database_url(),
        &format!("SELECT checked_at FROM requests WHERE id = '{id}'"),
    )
    .await
}

/// Waits until `checked_at` of `id` differs from `before`; None after `secs`.
async fn next_check(
    pair: &crate::harness::TestPair,
    id: &str,
    before: i64,
    secs: u64,
) -> Option<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        let now = checked_at(pair, id).await;
        if now != before {
            return Some(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_request_is_asked_about_less_and_less_often() {
    // Maija's books are kept for years: the request stays PARTIALLY_COMPLETED and nothing new
    // comes of a status check until then.
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut crm = pair.client("partner-crm");
    let r = crm
        .submit(erasure("maija.meikalainen@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(30),
        in_state(RequestState::PartiallyCompleted),
    )
    .await;
    let clock = pair.registry.clock().expect("registry clock");
    // Ten quiet minutes: the next check finds nothing and waits as long as the backoff's cap
    // (60 s in the tests) before the one after, instead of ack_timeout_ms (3 s).
    clock.advance(600_000);
    let before = checked_at(&pair, &r.request_id).await;
    let checked = next_check(&pair, &r.request_id, before, 10)
        .await
        .expect("a status check after ten quiet minutes");
    let now = clock.now_ms();
    assert!(
        checked > now + 50_000,
        "the next check should wait about 60 s: checked_at {checked}, now {now}"
    );
    // Nothing is asked meanwhile, though the reconciler looks every 500 ms.
    assert_eq!(next_check(&pair, &r.request_id, checked, 3).await, None);
    // Once the wait is over, it is asked again.
    clock.advance(70_000);
    assert!(next_check(&pair, &r.request_id, checked, 10)
        .await
        .is_some());
    pair.stop().await;
}

/// An operator's extension reaches the processor: a holder that stays unreachable is
/// retried past the original due date, until the extended one, and only then given up.
/// Before the processor was told, its tasks failed at the date they were delivered with
/// while the registry showed the request extended.
async fn an_extended_due_date_reaches_the_processor(backend: Backend) {
    // The newsletter's port is bound and never listened on: every call is refused at once.
    let nowhere = tokio::net::TcpSocket::new_v4().expect("socket");
    nowhere.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::Newsletter],
        newsletter_endpoint: Some(nowhere.local_addr().expect("addr")),
        newsletter_kinds: Some(vec!["erasure".into()]),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.crm();
    let mut operator = pair.operator();
    let mut req = erasure("extended@example.fi");
    req.scope = Some(Scope {
        data_categories: vec!["marketing".into()],
    });
    let r = crm.submit(req).await.expect("submit").into_inner();
    let view = wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
        v.tasks.len() == 1
    })
    .await;
    let received = dsrelay_proto::millis_from_timestamp(&view.received_at.expect("received"));

    let extended = operator
        .extend_deadline(ExtendDeadlineRequest {
            request_id: r.request_id.clone(),
            months: 2,
            reason: "the holder is being migrated".into(),
        })
        .await
        .expect("extend")
        .into_inner();
    let new_due = due_at(received, 2);
    assert_eq!(
        extended
            .due_at
            .map(|t| dsrelay_proto::millis_from_timestamp(&t)),
        Some(new_due)
    );
    // The registry records the processor's acceptance of the new date as an event.
    let label = dsrelay_runtime::clock::date_label(new_due);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = operator
            .list_events(ListEventsRequest {
                request_id: r.request_id.clone(),
                ..Default::default()
            })
            .await
            .expect("events")
            .into_inner()
            .events;
        let taken = events.iter().any(|e| {
            e.r#type == EventType::Delivered as i32
                && e.message == format!("due date {label} accepted by {PROCESSOR}")
        });
        if taken {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{events:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = count(
        pair.processor.database_url(),
        &format!(
            "SELECT due_at FROM requests WHERE request_id = '{}'",
            r.request_id
        ),
    )
    .await;
    assert_eq!(stored, new_due);
    // An older date (a late retry of an earlier extension, say) never moves it back.
    let tasks = ProcessorServiceClient::new(pair.channel_to_processor("registry"))
        .extend_due_date(ExtendDueDateRequest {
            request_id: r.request_id.clone(),
            due_at: Some(dsrelay_proto::timestamp_from_millis(due_at(received, 1))),
        })
        .await
        .expect("an older date")
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 1);
    let processor_db = pair.processor.database_url();
    let due_query = format!(
        "SELECT due_at FROM requests WHERE request_id = '{}'",
        r.request_id
    );
    assert_eq!(count(processor_db, &due_query).await, new_due);

    // Past the original due date (one month), before the new one: still retried.
    let clock = pair.processor.clock().expect("an in-process processor");
    clock.advance(due_at(received, 0) - clock.now_ms() + 5 * 24 * 3600 * 1000);
    let moved_on = clock.now_ms();
    let task = |column: &str| {
        format!(
            "SELECT {column} FROM tasks WHERE request_id = '{}'",
            r.request_id
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // The runner tried again after the clock moved, and set its next attempt after it.
    while count(pair.processor.database_url(), &task("next_attempt_at")).await <= moved_on {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no attempt after the move"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        count(pair.processor.database_url(), &task("state")).await,
        TaskState::InProgress as i64,
        "the task gave up before its extended due date"
    );

    // Past the new due date: given up, saying so.
    clock.advance(new_due - clock.now_ms() + 1000);
    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::Failed),
    )
    .await;
    assert_eq!(view.tasks[0].state, TaskState::Failed as i32, "{view:#?}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_due_date_reaches_the_processor_on_sqlite() {
    an_extended_due_date_reaches_the_processor(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_due_date_reaches_the_processor_on_postgres() {
    an_extended_due_date_reaches_the_processor(Backend::Postgres).await;
}
