//! A give-up at the due date that an extension overtook, through the processor's real store
//! (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server) and runner: the
//! holder's last attempt before the due date fails while `ExtendDueDate` moves that date
//! later. The runner decided with the date the task was claimed with, so it would fail the
//! task; the step is not written, and the task is tried again under the new date instead.
//! Where no extension came, the same attempt fails the task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dsrelay_connectors::{BoxFuture, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{DeliverRequest, RequestKind, TaskState};
use tokio::sync::{mpsc, oneshot};

use super::cancel_tests::{config, on_sqlite};
use crate::store::DueDateExtended;
use crate::App;

/// A holder that is down: each call reports itself on `entered` with the sender that lets
/// it answer, then fails as a refused connection does.
struct Unreachable {
    entered: mpsc::UnboundedSender<oneshot::Sender<()>>,
    calls: AtomicUsize,
}

impl Connector for Unreachable {
    fn kind_name(&self) -> &'static str {
        "unreachable"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let (release, released) = oneshot::channel();
            self.entered
                .send(release)
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            released
                .await
                .map_err(|_| ConnectorError::Permanent("test ended".into()))?;
            Err(ConnectorError::Transient("connection refused".into()))
        })
    }
}

/// How far past its due date the processor's clock is moved while the holder works.
const PAST_DUE_MS: i64 = 60_000;

/// One erasure due in 10 minutes, claimed; its holder's call fails once the clock has moved
/// past the due date, `extended` (by a day) while the call was under way or not.
async fn last_attempt(database_url: &str, dir: &std::path::Path, extended: bool) {
    let (tx, mut entered) = mpsc::unbounded_channel();
    let holder = Arc::new(Unreachable {
        entered: tx,
        calls: AtomicUsize::new(0),
    });
    let connectors = HashMap::from([("crm".to_string(), holder.clone() as Arc<dyn Connector>)]);
    let app = App::with_connectors(config(dir, database_url), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let due = now + 600_000;
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(due)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let lease_ms = shared.config.tasks.lease_ms as i64;
    let mut jobs = shared
        .store
        .claim_tasks(now, 10, lease_ms)
        .await
        .expect("claim");
    let job = jobs.pop().expect("one task");
    assert_eq!(job.due_at, due);
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
