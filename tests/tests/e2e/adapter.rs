//! The external-adapter connector end to end: registry → processor → the example newsletter
//! adapter (over mTLS, in-process) and back, including an adapter that confirms later and
//! one that is down when the request arrives.

use std::time::Duration;

use dsrelay_proto::v1::{Request, RequestState, TaskState, TaskStatus};

use crate::harness::{
    count, erasure, in_state, spawn_pair, wait_until, Holder, PairOptions, Role, TestPair,
    NEWSLETTER, PROCESSOR,
};

const MAIJA: &str = "maija.meikalainen@example.fi";

/// A pair whose processor has one holder, the newsletter, reached through the example
/// adapter (in this process); the adapter is down at first when `adapter_down`.
async fn newsletter_pair(
    confirm_delay_ms: u64,
    supported_kinds: Option<Vec<String>>,
    adapter_down: bool,
) -> TestPair {
    spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter],
        newsletter_confirm_delay_ms: confirm_delay_ms,
        newsletter_kinds: supported_kinds,
        down: if adapter_down {
            vec![Role::Adapter]
        } else {
            vec![]
        },
        ..Default::default()
    })
    .await
    .expect("sqlite pair")
}

fn newsletter_task(r: &Request) -> Option<&TaskStatus> {
    r.tasks.iter().find(|t| t.subprocessor == NEWSLETTER)
}

/// Asserts the request completed with the newsletter's confirmed erasure of one record, and
/// that the row is gone from the adapter's database.
async fn assert_erased(view: &Request, url: &str) {
    assert_eq!(view.tasks.len(), 1, "{view:#?}");
    let task = newsletter_task(view).expect("newsletter task");
    assert_eq!(task.state, TaskState::Completed as i32, "{task:#?}");
    assert_eq!(task.processor, PROCESSOR);
    let evidence = task.evidence.clone().expect("evidence");
    assert_eq!(evidence.records_affected, 1, "{evidence:?}");
    assert!(evidence.confirmed, "{evidence:?}");
    assert_eq!(
        count(
            url,
            &format!("SELECT COUNT(*) FROM subscribers WHERE email = '{MAIJA}'")
        )
        .await,
        0
    );
    // The other seeded subscribers are untouched.
    assert_eq!(count(url, "SELECT COUNT(*) FROM subscribers").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_reaches_the_newsletter_through_the_adapter() {
    let mut pair = newsletter_pair(0, None, false).await;

    let mut crm = pair.crm();
    let submitted = crm
        .submit(erasure(MAIJA))
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(submitted.routed_to, vec![PROCESSOR.to_string()]);
    let view = wait_until(
        &mut crm,
        &submitted.request_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    assert_erased(&view, pair.adapter().database_url()).await;
    // PENDING (1) → IN_PROGRESS (2) → COMPLETED (3): nothing was accepted unconfirmed.
    assert_eq!(newsletter_task(&view).expect("task").sequence, 3);

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_that_confirms_later_keeps_the_task_in_progress_until_it_does() {
    let mut pair = newsletter_pair(
        1500,
        Some(vec!["erasure".into(), "objection".into()]),
        false,
    )
    .await;

    let mut crm = pair.crm();
    let submitted = crm
        .submit(erasure(MAIJA))
        .await
        .expect("submit")
        .into_inner();
    // First the holder's acceptance: IN_PROGRESS, not confirmed (sequence 3 follows
    // PENDING and the start of the work).
    let accepted = wait_until(
        &mut crm,
        &submitted.request_id,
        Duration::from_secs(20),
        |r| {
            newsletter_task(r).is_some_and(|t| {
                t.state == TaskState::InProgress as i32
                    && t.sequence == 3
                    && t.evidence.as_ref().is_some_and(|e| !e.confirmed)
            })
        },
    )
    .await;
    assert_ne!(
        accepted.state,
        RequestState::Completed as i32,
        "{accepted:#?}"
    );
    let note = &newsletter_task(&accepted)
        .and_then(|t| t.evidence.clone())
        .expect("evidence")
        .note;
    assert!(note.contains("accepted"), "{note}");

    // Then, once the adapter has carried it out, its confirmation.
    let view = wait_until(
        &mut crm,
        &submitted.request_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    assert_erased(&view, pair.adapter().database_url()).await;
    assert_eq!(newsletter_task(&view).expect("task").sequence, 4);

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_that_is_down_is_retried_until_it_is_up() {
    // The adapter is down when the processor starts and when the request arrives.
    let mut pair = newsletter_pair(0, None, true).await;

    let mut crm = pair.crm();
    let submitted = crm
        .submit(erasure(MAIJA))
        .await
        .expect("submit")
        .into_inner();

    // The processor tries, fails transiently and keeps the task to retry.
    let processor_db = pair.processor.database_url();
    let retried = format!(
        "SELECT COUNT(*) FROM tasks WHERE subprocessor = '{NEWSLETTER}' AND attempts >= 2 \
         AND last_error IS NOT NULL AND state = {}",
        TaskState::InProgress as i32
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(processor_db, &retried).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the processor did not retry the newsletter task"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_error: String = {
        let db = dsrelay_runtime::store::Db::connect(processor_db)
            .await
            .expect("connect");
        let e = sqlx::query_scalar("SELECT last_error FROM tasks WHERE subprocessor = $1")
            .bind(NEWSLETTER)
            .fetch_one(&db.pool)
            .await
            .expect("last error");
        db.pool.close().await;
        e
    };
    assert!(last_error.contains("Unavailable"), "{last_error}");
    let waiting = crm
        .get(dsrelay_proto::v1::GetRequest {
            request_id: submitted.request_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    let task = newsletter_task(&waiting).expect("task");
    assert!(
        task.state == TaskState::Pending as i32 || task.state == TaskState::InProgress as i32,
        "{task:#?}"
    );

    // The adapter comes up; the next retry completes the task.
    pair.adapter().start().await;
    let view = wait_until(
        &mut crm,
        &submitted.request_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    assert_erased(&view, pair.adapter().database_url()).await;

    pair.stop().await;
}
