//! An operator's retry of a task the example adapter answered FAILED, end to end: registry →
//! processor → the example newsletter adapter (in-process, over mTLS) and back.
//!
//! The example adapter answers FAILED, and stores that answer under the task's `task_id`,
//! only for a rectification it cannot apply (an e-mail correction to an address another
//! subscriber uses, or one matching several subscribers); an erasure there is never FAILED.
//! So the task that fails is the rectification of Maija's address to Matti's. Once Matti has
//! left the newsletter (his own erasure through the relay), the operator retries the task
//! (RetryTask) and the processor calls the adapter again under the same `task_id`: the
//! adapter must do the work this time rather than repeat its stored FAILED answer
//! (adapter.proto), so the task and the request end COMPLETED with Maija's row corrected.
//! An adapter that repeated the stored answer would leave the task FAILED again, and the
//! wait for COMPLETED below would fail.
//!
//! An erasure fails for good at the adapter only when its store faults (INTERNAL, nothing
//! stored: the claiming transaction is rolled back), which the second test plays with a
//! trigger refusing to delete subscribers: retried once the trigger is dropped, the erasure
//! completes and Maija is gone from the adapter's store.

use std::time::Duration;

use dsrelay_proto::v1::{
    ExecuteOutcome, FieldCorrection, ListManualTasksRequest, ManualTask, Request, RequestKind,
    RequestParameters, RequestState, RetryTaskRequest, TaskRef, TaskState, TaskStatus,
};

use crate::harness::{
    count, erasure, in_state, spawn_pair, wait_until, Backend, Holder, PairOptions, TestPair,
    CONTROLLER, NEWSLETTER, PROCESSOR,
};

const MAIJA: &str = "maija.meikalainen@example.fi";
/// The address Maija asks to be corrected to, which the seeded subscriber Matti holds.
const MATTI: &str = "matti.virtanen@example.fi";
/// What the operator fixed; it names no identity of the request, which RetryTask refuses.
const NOTE: &str = "the subscriber who held the corrected address has left the newsletter";
/// The adapter's reason for the clash (services/example-adapter/src/newsletter.rs).
const CLASH: &str = "another subscriber already uses the corrected e-mail address";

fn newsletter_task(r: &Request) -> Option<&TaskStatus> {
    r.tasks.iter().find(|t| t.subprocessor == NEWSLETTER)
}

/// The rectification of Maija's e-mail address to [`MATTI`].
fn correct_maija_to_matti() -> dsrelay_proto::v1::SubmitRequest {
    let mut req = erasure(MAIJA);
    req.kind = RequestKind::Rectification as i32;
    req.parameters = Some(RequestParameters {
        corrections: vec![FieldCorrection {
            field: "email".into(),
            new_value: MATTI.into(),
        }],
        ..Default::default()
    });
    req
}

/// The newsletter task of `request_id` at the processor.
fn task_ref(request_id: &str) -> TaskRef {
    TaskRef {
        controller: CONTROLLER.into(),
        request_id: request_id.into(),
        subprocessor: NEWSLETTER.into(),
    }
}

/// The FAILED tasks the processor's operator sees.
async fn failed_tasks(pair: &TestPair) -> Vec<ManualTask> {
    pair.processor_operator()
        .list_manual_tasks(ListManualTasksRequest {
            states: vec![TaskState::Failed as i32],
            ..Default::default()
        })
        .await
        .expect("ListManualTasks")
        .into_inner()
        .tasks
}

/// The adapter's stored answers (`adapter_tasks`) with `outcome` for the processor's task
/// of `request_id`, whose `task_id` is `controller/request/subprocessor`.
async fn stored_answers(pair: &mut TestPair, request_id: &str, outcome: ExecuteOutcome) -> i64 {
    let task_id = format!("{CONTROLLER}/{request_id}/{NEWSLETTER}");
    count(
        pair.adapter().database_url(),
        &format!(
            "SELECT COUNT(*) FROM adapter_tasks WHERE task_id = '{task_id}' AND outcome = {}",
            outcome as i32
        ),
    )
    .await
}

/// Subscribers of the newsletter with `email`.
async fn subscribers(pair: &mut TestPair, email: &str) -> i64 {
    count(
        pair.adapter().database_url(),
        &format!("SELECT COUNT(*) FROM subscribers WHERE email = '{email}'"),
    )
    .await
}

async fn a_failed_adapter_answer_is_retried_to_completion(backend: Backend) {
    let Some(mut pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::Newsletter],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.crm();

    // 1. The correction clashes with Matti's address: the adapter answers FAILED and stores
    // that answer; the task and the request end FAILED, and the operator sees why.
    let submitted = crm
        .submit(correct_maija_to_matti())
        .await
        .expect("submit the rectification")
        .into_inner();
    assert_eq!(submitted.routed_to, vec![PROCESSOR.to_string()]);
    let id = submitted.request_id;
    let failed = wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        in_state(RequestState::Failed),
    )
    .await;
    let task = newsletter_task(&failed).expect("newsletter task");
    assert_eq!(task.state, TaskState::Failed as i32, "{task:#?}");
    assert!(task.reason.contains(CLASH), "{task:#?}");
    let listed = failed_tasks(&pair).await;
    let listed = listed
        .iter()
        .find(|t| t.task.as_ref() == Some(&task_ref(&id)))
        .unwrap_or_else(|| panic!("the operator does not see the failed task: {listed:#?}"));
    assert!(listed.reason.contains(CLASH), "{listed:#?}");
    assert_eq!(listed.retry_refusal, "", "{listed:#?}");
    // What a retry must not repeat: the FAILED answer the adapter keeps under the task_id.
    assert_eq!(
        stored_answers(&mut pair, &id, ExecuteOutcome::Failed).await,
        1,
        "the adapter stored no FAILED answer for the task, so a retry would prove nothing"
    );
    assert_eq!(subscribers(&mut pair, MAIJA).await, 1, "nothing corrected");
    assert_eq!(subscribers(&mut pair, MATTI).await, 1);

    // 2. The cause goes: Matti's erasure through the relay removes the address's holder.
    let matti_leaves = crm
        .submit(erasure(MATTI))
        .await
        .expect("submit Matti's erasure")
        .into_inner();
    wait_until(
        &mut crm,
        &matti_leaves.request_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    assert_eq!(subscribers(&mut pair, MATTI).await, 0, "Matti is gone");

    // 3. The operator retries the task; the adapter is called again under the same task_id.
    let retried = pair
        .processor_operator()
        .retry_task(RetryTaskRequest {
            task: Some(task_ref(&id)),
            note: NOTE.into(),
        })
        .await
        .expect("RetryTask")
        .into_inner();
    assert_eq!(retried.state, TaskState::InProgress as i32, "{retried:#?}");
    assert_eq!(
        retried.reason,
        format!("retried by spiffe://dsrelay.dev/operator/ops: {NOTE}"),
        "{retried:#?}"
    );

    // The request reopens and completes: the adapter did the correction this time.
    let done = wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        r.state == RequestState::Completed as i32
            || newsletter_task(r)
                .is_some_and(|t| t.state == TaskState::Failed as i32 && t.sequence > task.sequence)
    })
    .await;
    let done_task = newsletter_task(&done).expect("newsletter task");
    assert_eq!(
        done.state,
        RequestState::Completed as i32,
        "the retried task failed again: the adapter repeated its FAILED answer?\n{done:#?}"
    );
    assert_eq!(
        done_task.state,
        TaskState::Completed as i32,
        "{done_task:#?}"
    );
    assert!(done_task.sequence > task.sequence, "{done_task:#?}");
    let evidence = done_task.evidence.clone().expect("evidence");
    assert_eq!(evidence.records_affected, 1, "{evidence:?}");
    assert!(evidence.confirmed, "{evidence:?}");
    assert!(evidence.note.contains("corrected email"), "{evidence:?}");

    // The adapter's store: the old address gone, Maija's row under the new one, and the
    // task's stored answer now the COMPLETED one, the FAILED one replaced.
    assert_eq!(subscribers(&mut pair, MAIJA).await, 0);
    assert_eq!(
        count(
            pair.adapter().database_url(),
            &format!(
                "SELECT COUNT(*) FROM subscribers WHERE email = '{MATTI}' \
                 AND name = 'Maija Meikäläinen'"
            ),
        )
        .await,
        1
    );
    assert_eq!(
        stored_answers(&mut pair, &id, ExecuteOutcome::Failed).await,
        0
    );
    assert_eq!(
        stored_answers(&mut pair, &id, ExecuteOutcome::Completed).await,
        1
    );
    // The operator no longer sees a failed task of the request.
    assert!(
        failed_tasks(&pair)
            .await
            .iter()
            .all(|t| t.task.as_ref() != Some(&task_ref(&id))),
        "the task is still listed as FAILED"
    );

    pair.stop().await;
}

/// Runs `sql` on the SQLite database at `url`.
async fn execute(url: &str, sql: &str) {
    let db = dsrelay_runtime::store::Db::connect(url)
        .await
        .expect("connect");
    sqlx::query(sql).execute(&db.pool).await.expect(sql);
    db.pool.close().await;
}

/// A trigger that makes the adapter's store refuse every deletion of a subscriber, as a
/// hold on the table would.
const HOLD: &str = "CREATE TRIGGER subscribers_on_hold BEFORE DELETE ON subscribers \
                    BEGIN SELECT RAISE(ABORT, 'subscribers are on hold'); END";

async fn a_failed_adapter_erasure_is_retried_to_completion(backend: Backend) {
    let Some(mut pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::Newsletter],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.crm();
    execute(pair.adapter().database_url(), HOLD).await;

    // The adapter's store refuses the deletion: INTERNAL, which fails the task for good.
    let id = crm
        .submit(erasure(MAIJA))
        .await
        .expect("submit the erasure")
        .into_inner()
        .request_id;
    let failed = wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        in_state(RequestState::Failed),
    )
    .await;
    let task = newsletter_task(&failed).expect("newsletter task");
    assert_eq!(task.state, TaskState::Failed as i32, "{task:#?}");
    assert!(task.reason.contains("Internal"), "{task:#?}");
    let listed = failed_tasks(&pair).await;
    assert!(
        listed
            .iter()
            .any(|t| t.task.as_ref() == Some(&task_ref(&id)) && t.retry_refusal.is_empty()),
        "the operator does not see the failed task as retryable: {listed:#?}"
    );
    assert_eq!(subscribers(&mut pair, MAIJA).await, 1, "nothing erased");
    assert_eq!(
        count(
            pair.adapter().database_url(),
            &format!(
                "SELECT COUNT(*) FROM adapter_tasks WHERE task_id = \
                 '{CONTROLLER}/{id}/{NEWSLETTER}'"
            ),
        )
        .await,
        0,
        "the failed call stored nothing"
    );

    execute(
        pair.adapter().database_url(),
        "DROP TRIGGER subscribers_on_hold",
    )
    .await;
    let retried = pair
        .processor_operator()
        .retry_task(RetryTaskRequest {
            task: Some(task_ref(&id)),
            note: "the hold on the newsletter's subscribers was lifted".into(),
        })
        .await
        .expect("RetryTask")
        .into_inner();
    assert_eq!(retried.state, TaskState::InProgress as i32, "{retried:#?}");

    let done = wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        r.state == RequestState::Completed as i32
            || newsletter_task(r)
                .is_some_and(|t| t.state == TaskState::Failed as i32 && t.sequence > task.sequence)
    })
    .await;
    assert_eq!(done.state, RequestState::Completed as i32, "{done:#?}");
    let done_task = newsletter_task(&done).expect("newsletter task");
    assert_eq!(
        done_task.state,
        TaskState::Completed as i32,
        "{done_task:#?}"
    );
    let evidence = done_task.evidence.clone().expect("evidence");
    assert_eq!(evidence.records_affected, 1, "{evidence:?}");
    assert!(evidence.confirmed, "{evidence:?}");
    assert_eq!(subscribers(&mut pair, MAIJA).await, 0, "Maija is gone");
    // The other seeded subscribers are untouched.
    assert_eq!(
        count(
            pair.adapter().database_url(),
            "SELECT COUNT(*) FROM subscribers"
        )
        .await,
        3
    );

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_retry_of_a_failed_answer_completes_on_sqlite() {
    a_failed_adapter_answer_is_retried_to_completion(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_retry_of_a_failed_answer_completes_on_postgres() {
    a_failed_adapter_answer_is_retried_to_completion(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_retry_of_a_failed_erasure_completes_on_sqlite() {
    a_failed_adapter_erasure_is_retried_to_completion(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_retry_of_a_failed_erasure_completes_on_postgres() {
    a_failed_adapter_erasure_is_retried_to_completion(Backend::Postgres).await;
}
