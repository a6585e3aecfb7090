//! A give-up at the due date that an extension overtook, through the processor's real store
//! (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server) and runner: the
//! holder's last attempt before the due date fails while `ExtendDueDate` moves that date
//! later. The runner decided with the date the task was claimed with, so it would fail the
//! task; the step is not written, and the task is tried again under the new date instead.
//! Where no extension came, the same attempt fails the task. The same holds for an export's
//! last delivery attempt: an extension that came after its upload was claimed keeps the task
//! IN_PROGRESS, tried again under the new date.

use dsrelay_connectors::{ConnectorError, Outcome};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{DeliverRequest, RequestKind, TaskState};

use super::cancel_tests::{on_sqlite, setup_answering, Setup};
use crate::store::DueDateExtended;

/// A holder that is down: its call fails as a refused connection does.
fn refused() -> Result<Outcome, ConnectorError> {
    Err(ConnectorError::Transient("connection refused".into()))
}

/// How far past its due date the processor's clock is moved while the holder works.
const PAST_DUE_MS: i64 = 60_000;

/// One erasure due in 10 minutes, claimed; its holder's call fails once the clock has moved
/// past the due date, `extended` (by a day) while the call was under way or not.
async fn last_attempt(database_url: &str, dir: &std::path::Path, extended: bool) {
    let Setup {
        app, mut entered, ..
    } = setup_answering(database_url, dir, refused).await;
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let lease_ms = shared.config.tasks.lease_ms as i64;
    let mut jobs = shared
        .store
        .claim_tasks(now, 10, lease_ms)
        .await
        .expect("claim");
    let job = jobs.pop().expect("one task");
    let due = job.due_at;
    let runner = {
        let shared = shared.clone();
        tokio::spawn(async move { crate::runner::run_task(&shared, job).await })
    };
    let release = entered.recv().await.expect("the holder is called");
    // The due date passes while the holder works; an extension may come meanwhile.
    shared.clock.advance(due - now + PAST_DUE_MS);
    if extended {
        let later = due + 86_400_000;
        let answer = shared
            .store
            .extend_due_date("acme", "r-1", later, shared.clock.now_ms())
            .await
            .expect("extend");
        assert!(matches!(answer, DueDateExtended::Tasks { moved: true, .. }));
    }
    release.send(()).expect("the holder answers");
    runner.await.expect("runner task").expect("step");

    let task = shared
        .store
        .tasks("acme", "r-1")
        .await
        .expect("tasks")
        .pop()
        .expect("the task");
    if !extended {
        assert_eq!(task.state, TaskState::Failed, "{task:?}");
        assert!(task.reason.contains("gave up at the due date"), "{task:?}");
        return;
    }
    assert_ne!(
        task.state,
        TaskState::Failed,
        "the task gave up at a due date the extension had moved: {task:?}"
    );
    // Tried again at once: the next claim takes it, under the new date, and the holder being
    // down (called again, or known to be down since the last call) only postpones it.
    let mut jobs = shared
        .store
        .claim_tasks(shared.clock.now_ms(), 10, lease_ms)
        .await
        .expect("claim again");
    let job = jobs.pop().expect("the task is due again at once");
    assert_eq!(job.due_at, due + 86_400_000);
    tokio::spawn(async move {
        while let Some(release) = entered.recv().await {
            let _ = release.send(());
        }
    });
    crate::runner::run_task(&shared, job).await.expect("step");
    let task = shared
        .store
        .tasks("acme", "r-1")
        .await
        .expect("tasks")
        .pop()
        .expect("the task");
    assert_ne!(task.state, TaskState::Failed, "{task:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_during_the_last_attempt_keeps_the_task_on_sqlite() {
    on_sqlite(|u, d| async move { last_attempt(&u, &d, true).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_during_the_last_attempt_keeps_the_task_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move { last_attempt(&u, &d, true).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_extension_the_last_attempt_fails_the_task_on_sqlite() {
    on_sqlite(|u, d| async move { last_attempt(&u, &d, false).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_extension_the_last_attempt_fails_the_task_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move { last_attempt(&u, &d, false).await })
        .await;
}

/// A RETURN_OF_DATA (`r-2`) due in 10 minutes whose export waits to go to the controller's
/// registry, which is down (the test config names a port nothing listens on). Its upload
/// is claimed; then the clock moves past the due date and, when `extended`, the due date
/// moves a day later before the claimed attempt runs (the claim read the old date).
async fn last_upload_attempt(database_url: &str, dir: &std::path::Path, extended: bool) {
    let Setup { app, .. } = setup_answering(database_url, dir, refused).await;
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let due = now + 600_000;
    let req = DeliverRequest {
        request_id: "r-2".into(),
        kind: RequestKind::ReturnOfData as i32,
        due_at: Some(timestamp_from_millis(due)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    // As the export step leaves it: IN_PROGRESS, its (empty) export waiting to be sent.
    let db = &shared.store.db().pool;
    sqlx::query("UPDATE tasks SET state = $1, export_files = '[]' WHERE request_id = 'r-2'")
        .bind(TaskState::InProgress as i32)
        .execute(db)
        .await
        .expect("in progress");
    sqlx::query(
        "INSERT INTO uploads (controller, request_id, subprocessor, next_attempt_at) \
         VALUES ('acme', 'r-2', 'crm', $1)",
    )
    .bind(now)
    .execute(db)
    .await
    .expect("an upload due");
    let lease_ms = shared.config.uploads.lease_ms as i64;
    let mut jobs = shared
        .store
        .claim_uploads(now, 10, lease_ms)
        .await
        .expect("claim");
    let job = jobs.pop().expect("the upload");
    assert_eq!(job.due_at, due);
    shared.clock.advance(due - now + PAST_DUE_MS);
    let later = due + 86_400_000;
    if extended {
        shared
            .store
            .extend_due_date("acme", "r-2", later, shared.clock.now_ms())
            .await
            .expect("extend");
    }
    crate::uploader::upload(&shared, job).await;

    let task = shared
        .store
        .tasks("acme", "r-2")
        .await
        .expect("tasks")
        .pop()
        .expect("the task");
    let done: Option<i64> =
        sqlx::query_scalar("SELECT done_at FROM uploads WHERE request_id = 'r-2'")
            .fetch_one(db)
            .await
            .expect("upload");
    if !extended {
        assert_eq!(task.state, TaskState::Failed, "{task:?}");
        assert!(
            task.reason
                .starts_with("gave up at the due date after 1 attempt(s) to deliver the export"),
            "{task:?}"
        );
        assert!(done.is_some(), "the upload is retired with its task");
        return;
    }
    assert_eq!(
        task.state,
        TaskState::InProgress,
        "the export gave up at a due date the extension had moved: {task:?}"
    );
    assert_eq!(done, None, "the upload stays, to be tried again");
    // Tried again at once, under the new date: the registry still down only postpones it.
    let mut jobs = shared
        .store
        .claim_uploads(shared.clock.now_ms(), 10, lease_ms)
        .await
        .expect("claim again");
    let job = jobs.pop().expect("the upload is due again at once");
    assert_eq!(job.due_at, later);
    crate::uploader::upload(&shared, job).await;
    let task = shared
        .store
        .tasks("acme", "r-2")
        .await
        .expect("tasks")
        .pop()
        .expect("the task");
    assert_eq!(task.state, TaskState::InProgress, "{task:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_after_an_upload_was_claimed_keeps_the_task_on_sqlite() {
    on_sqlite(|u, d| async move { last_upload_attempt(&u, &d, true).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_after_an_upload_was_claimed_keeps_the_task_on_postgres() {
    crate::test_postgres::on_postgres(
        |u, d| async move { last_upload_attempt(&u, &d, true).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_failing_past_the_due_date_fails_the_task_on_sqlite() {
    on_sqlite(|u, d| async move { last_upload_attempt(&u, &d, false).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_failing_past_the_due_date_fails_the_task_on_postgres() {
    crate::test_postgres::on_postgres(
        |u, d| async move { last_upload_attempt(&u, &d, false).await },
    )
    .await;
}
