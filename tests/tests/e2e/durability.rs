//! Nothing accepted is lost and nothing is applied twice when the real service processes are
//! SIGKILLed and restarted at the awkward moments.

use std::time::Duration;

use dsrelay_proto::v1::{RequestState, Scope, TaskState};

use crate::harness::{
    count, erasure, in_state, spawn_pair, wait_until, Backend, Mode, PairOptions, Role,
};

const LONG: Duration = Duration::from_secs(60);

fn task_state(r: &dsrelay_proto::v1::Request, sub: &str) -> Option<TaskState> {
    r.tasks
        .iter()
        .find(|t| t.subprocessor == sub)
        .and_then(|t| TaskState::try_from(t.state).ok())
}

async fn crash_before_delivery(backend: Backend) {
    // Only the registry runs: the processor is down when the request is submitted.
    let Some(mut pair) = spawn_pair(PairOptions {
        backend,
        mode: Mode::Processes,
        down: vec![Role::Processor],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.crm();
    let r = crm
        .submit(erasure("teemu.testaaja@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    // The delivery's error is shown to operators only.
    let mut ops = pair.operator();
    wait_until(&mut ops, &r.request_id, LONG, |v| {
        v.deliveries
            .iter()
            .any(|d| d.attempts >= 2 && !d.last_error.is_empty())
    })
    .await;

    // The registry crashes with the delivery still pending, and comes back.
    pair.registry.restart().await;
    let view = wait_until(&mut crm, &r.request_id, LONG, |_| true).await;
    assert_eq!(view.state, RequestState::Received as i32, "{view:#?}");

    // The processor returns and gets the request.
    pair.processor.start().await;
    let view = wait_until(
        &mut crm,
        &r.request_id,
        LONG,
        in_state(RequestState::Completed),
    )
    .await;
    let accounting = view
        .tasks
        .iter()
        .find(|t| t.subprocessor == "accounting")
        .expect("task");
    assert_eq!(
        accounting.evidence.as_ref().map(|e| e.records_affected),
        Some(4)
    );
    assert_eq!(
        count(&pair.accounting_url, "SELECT COUNT(*) FROM customers").await,
        5,
        "exactly the subject's customer row is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_down_and_registry_crash_before_delivery_lose_nothing_sqlite() {
    crash_before_delivery(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_down_and_registry_crash_before_delivery_lose_nothing_postgres() {
    crash_before_delivery(Backend::Postgres).await;
}

async fn registry_down_while_acknowledging(backend: Backend) {
    let Some(mut pair) = spawn_pair(PairOptions {
        backend,
        mode: Mode::Processes,
        mail_delay_ms: 3000,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.crm();
    let r = crm
        .submit(erasure("teemu.testaaja@example.fi"))
        .await
        .expect("submit")
        .into_inner();
    // The mail task is slow: it is still in progress when the registry dies.
    wait_until(&mut crm, &r.request_id, LONG, |v| {
        task_state(v, "mail-marketing") == Some(TaskState::InProgress)
    })
    .await;
    pair.registry.kill().await;

    // Meanwhile the processor finishes and cannot reach the registry: its outbox holds the
    // acknowledgements and keeps retrying.
    let processor_db = pair.processor.database_url().to_string();
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let stuck = count(
            &processor_db,
            "SELECT COUNT(*) FROM ack_outbox WHERE sent_at IS NULL AND attempts > 0",
        )
        .await;
        if stuck > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acknowledgements were never retried\n{}",
            pair.processor.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    pair.registry.start().await;
    let view = wait_until(
        &mut crm,
        &r.request_id,
        LONG,
        in_state(RequestState::Completed),
    )
    .await;
    for t in &view.tasks {
        // PENDING (1) → IN_PROGRESS (2) → COMPLETED (3), each applied once.
        assert_eq!(t.sequence, 3, "{t:#?}");
    }
    let registry_db = pair.registry.database_url();
    let acks = count(registry_db, "SELECT COUNT(*) FROM acknowledgements").await;
    assert_eq!(acks, 4, "two tasks, two acknowledgements each, none twice");
    let updates = count(registry_db, "SELECT COUNT(*) FROM events WHERE type = 4").await;
    assert_eq!(updates, 4, "one TASK_UPDATED event per acknowledgement");
    // Every acknowledgement eventually left the processor's outbox.
    let deadline = tokio::time::Instant::now() + LONG;
    while count(
        &processor_db,
        "SELECT COUNT(*) FROM ack_outbox WHERE sent_at IS NULL",
    )
    .await
        > 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "outbox never drained"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_while_acknowledging_gets_every_ack_once_sqlite() {
    registry_down_while_acknowledging(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_while_acknowledging_gets_every_ack_once_postgres() {
    registry_down_while_acknowledging(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_killed_mid_task_resumes_it() {
    let mut pair = spawn_pair(PairOptions {
        mode: Mode::Processes,
        mail_delay_ms: 3000,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.crm();
    let mut req = erasure("teemu.testaaja@example.fi");
    req.scope = Some(Scope {
        data_categories: vec!["marketing".into()],
    });
    let r = crm.submit(req).await.expect("submit").into_inner();
    wait_until(&mut crm, &r.request_id, LONG, |v| {
        task_state(v, "mail-marketing") == Some(TaskState::InProgress)
    })
    .await;
    pair.processor.restart().await;
    let view = wait_until(
        &mut crm,
        &r.request_id,
        LONG,
        in_state(RequestState::Completed),
    )
    .await;
    assert_eq!(view.tasks.len(), 1);
    assert_eq!(view.tasks[0].sequence, 3, "{view:#?}");
    let attempts = count(
        pair.processor.database_url(),
        "SELECT attempts FROM tasks WHERE subprocessor = 'mail-marketing'",
    )
    .await;
    assert_eq!(attempts, 2, "the interrupted run and the resumed one");
    assert_eq!(
        count(
            pair.registry.database_url(),
            "SELECT COUNT(*) FROM acknowledgements"
        )
        .await,
        2
    );
}
