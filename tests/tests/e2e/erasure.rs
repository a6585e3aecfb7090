//! An erasure travels registry → processor → subprocessors, erases real rows and comes back
//! acknowledged hop by hop.

use std::time::Duration;

use dsrelay_proto::v1::{
    CancelRequest, DeliveryState, EventType, GetRequest, RequestState, Scope, TaskState,
    WatchRequest,
};
use tokio_stream::StreamExt;

use crate::harness::{
    count, erasure, in_state, spawn_pair, wait_until, Backend, PairOptions, PROCESSOR,
};

async fn erasure_reaches_every_holder(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.client("partner-crm");
    let submitted = crm
        .submit(erasure("teemu.testaaja@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(submitted.routed_to, vec![PROCESSOR.to_string()]);
    assert_eq!(submitted.trace_id.len(), 32);

    // Watch until the stream ends: it must end on COMPLETED.
    let mut stream = crm
        .watch(WatchRequest {
            request_id: submitted.request_id.clone(),
            after_event_id: 0,
            follow_after_terminal: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    let collect = async {
        while let Some(e) = stream.next().await {
            events.push(e.expect("event"));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .expect("watch ended in time");
    let types: Vec<i32> = events.iter().map(|e| e.r#type).collect();
    assert_eq!(types.first(), Some(&(EventType::Submitted as i32)));
    assert!(
        types.contains(&(EventType::Delivered as i32)),
        "{events:#?}"
    );
    assert_eq!(
        events.last().map(|e| e.request_state),
        Some(RequestState::Completed as i32),
        "{events:#?}"
    );
    // Event ids increase.
    assert!(events.windows(2).all(|w| w[0].event_id < w[1].event_id));

    let view = wait_until(
        &mut crm,
        &submitted.request_id,
        Duration::from_secs(5),
        in_state(RequestState::Completed),
    )
    .await;
    assert_eq!(view.tasks.len(), 2, "{view:#?}");
    let accounting = view
        .tasks
        .iter()
        .find(|t| t.subprocessor == "accounting")
        .expect("accounting task");
    assert_eq!(accounting.state, TaskState::Completed as i32);
    assert_eq!(accounting.processor, PROCESSOR);
    let evidence = accounting.evidence.clone().expect("evidence");
    // His contact, his invoice (past six years) and customer row deleted, his ledger entry
    // (past ten years) anonymized: the sample data.
    assert_eq!(evidence.records_affected, 4, "{evidence:?}");
    assert!(evidence.confirmed);
    // PENDING (1) → IN_PROGRESS (2) → COMPLETED (3).
    assert_eq!(accounting.sequence, 3);

    let url = &pair.accounting_url;
    assert_eq!(
        count(
            url,
            "SELECT COUNT(*) FROM customers WHERE email = 'teemu.testaaja@example.fi'"
        )
        .await,
        0
    );
    assert_eq!(count(url, "SELECT COUNT(*) FROM customers").await, 5);
    // His only invoice is past the six years vouchers are kept: gone; the other customers'
    // invoices are untouched.
    assert_eq!(
        count(url, "SELECT COUNT(*) FROM invoices WHERE customer_id = 6").await,
        0
    );
    assert_eq!(count(url, "SELECT COUNT(*) FROM invoices").await, 8);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_reaches_every_holder_on_sqlite() {
    erasure_reaches_every_holder(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_reaches_every_holder_on_postgres() {
    erasure_reaches_every_holder(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_routes_to_the_holders_of_its_categories_only() {
    let pair = spawn_pair(PairOptions {
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.client("partner-crm");

    // Only marketing: one processor, and there only the mail system.
    let mut req = erasure("someone@example.fi");
    req.scope = Some(Scope {
        data_categories: vec!["marketing".into()],
    });
    let r = crm.submit(req).await.expect("submit").into_inner();
    assert_eq!(r.routed_to, vec![PROCESSOR.to_string()]);
    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::Completed),
    )
    .await;
    let subs: Vec<&str> = view.tasks.iter().map(|t| t.subprocessor.as_str()).collect();
    assert_eq!(subs, ["mail-marketing"]);

    // No scope: both processors; the absent one keeps the request open and is retried.
    let r = crm
        .submit(erasure("someone.else@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(r.routed_to.len(), 2);
    let view = wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
        v.deliveries
            .iter()
            .any(|d| d.processor == "web-agency" && d.attempts >= 2)
            && v.tasks.iter().all(|t| {
                t.state != TaskState::Pending as i32 && t.state != TaskState::InProgress as i32
            })
    })
    .await;
    assert_eq!(view.state, RequestState::InProgress as i32, "{view:#?}");
    let absent = view
        .deliveries
        .iter()
        .find(|d| d.processor == "web-agency")
        .expect("delivery");
    // Why it failed is the connection's words, shown to operators only.
    assert!(absent.last_error.is_empty(), "{absent:#?}");
    assert!(absent.next_attempt_at.is_some());
    let for_ops = (pair.operator())
        .get(GetRequest {
            request_id: r.request_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(for_ops
        .deliveries
        .iter()
        .any(|d| d.processor == "web-agency" && !d.last_error.is_empty()));

    // Cancelled, the delivery the absent processor never accepted is CANCELLED, not
    // DELIVERED; the one the processor accepted stays DELIVERED.
    let cancelled = crm
        .cancel(CancelRequest {
            request_id: r.request_id.clone(),
            reason: "withdrawn".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    let state_of = |name: &str| {
        cancelled
            .deliveries
            .iter()
            .find(|d| d.processor == name)
            .cloned()
            .expect("delivery")
    };
    let withdrawn = state_of("web-agency");
    assert_eq!(
        withdrawn.state,
        DeliveryState::Cancelled as i32,
        "{cancelled:#?}"
    );
    assert!(withdrawn.delivered_at.is_none(), "{withdrawn:#?}");
    assert!(withdrawn.next_attempt_at.is_none(), "{withdrawn:#?}");
    // Shown to operators only, as every delivery error is.
    assert_eq!(withdrawn.last_error, "", "{withdrawn:#?}");
    let accepted = state_of(PROCESSOR);
    assert_eq!(accepted.state, DeliveryState::Delivered as i32);
    assert!(accepted.delivered_at.is_some());
    pair.stop().await;
}
