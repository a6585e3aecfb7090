//! A contract end cancelled after its export began has its holder discard what the export
//! recorded there, through the processor's real store (SQLite, and PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server) and runner: once, from the mark the
//! cancellation stored, also when the processor restarted in between; a failed call is made
//! again after its backoff; a contract end whose export failed for good has its holder
//! discard once its request is forgotten (no retry can take it then); a contract end
//! cancelled before its export began, or one that goes on, calls nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dsrelay_connectors::{
    BoxFuture, BulkJob, BulkOp, BulkProgress, Connector, ConnectorError, Outcome, Task,
};
use dsrelay_proto::v1::{ContractEndChoice, RequestKind, TaskState};

use crate::app::Shared;
use crate::contract_retry_tests::{key, step_now, with_contract_end};
use crate::App;

/// Exports 16 records of 4 subjects (or fails for good when `export_fails`), and lists the
/// discard calls it gets; the first `failing` of them fail transiently.
#[derive(Default)]
struct Recorder {
    discards: Mutex<Vec<(String, String)>>,
    failing: AtomicUsize,
    export_fails: bool,
}

impl Recorder {
    fn discards(&self) -> Vec<(String, String)> {
        self.discards.lock().expect("discards").clone()
    }
}

impl Connector for Recorder {
    fn kind_name(&self) -> &'static str {
        "recorder"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            assert_eq!(job.op, BulkOp::Export);
            if self.export_fails {
                return Err(ConnectorError::Permanent("permission denied".into()));
            }
            job.progress.report(BulkProgress::counts(4, 4, 16, 16));
            Ok(Outcome::Completed {
                records_affected: 16,
                note: "exported 16 records".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }

    fn discard_bulk<'a>(
        &'a self,
        controller: &'a str,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ConnectorError>> {
        Box::pin(async move {
            let call = (controller.to_string(), job_id.to_string());
            self.discards.lock().expect("discards").push(call);
            let failing = self.failing.load(Ordering::SeqCst);
            if failing > 0 {
                self.failing.store(failing - 1, Ordering::SeqCst);
                return Err(ConnectorError::Transient("connection refused".into()));
            }
            Ok(())
        })
    }
}

/// The processor started again on the same database and folder, with `holder` as `crm`.
async fn restarted(dir: &std::path::Path, url: &str, holder: Arc<Recorder>) -> App {
    let connectors = HashMap::from([("crm".to_string(), holder as Arc<dyn Connector>)]);
    let config = crate::contract_tests::config(dir, url, &["acme"]);
    App::with_connectors(config, connectors).await.expect("app")
}

/// Moves `shared`'s clock a task lease on, past which a cancelled task's discard is due.
fn past_a_lease(shared: &Shared) {
    shared
        .clock
        .advance(i64::try_from(shared.config.tasks.lease_ms).expect("ms"));
}

/// Cancels `id` as its controller does.
async fn cancel(shared: &Shared, id: &str) {
    let tasks = (shared.store)
        .cancel("acme", id, "withdrawn", shared.clock.now_ms())
        .await
        .expect("cancel");
    assert_eq!(tasks[0].state, TaskState::Cancelled, "{tasks:?}");
}

/// A return cancelled once its export was written: no call at the cancellation, one at the
/// first sweep of the processor started again, none at the sweeps after it.
async fn a_cancelled_return_has_its_holder_discard_once_after_a_restart(
    url: &str,
    dir: &std::path::Path,
) {
    let holder = Arc::new(Recorder::default());
    let choice = ContractEndChoice::ReturnThenDelete;
    let app = with_contract_end(dir, url, holder.clone(), "ce-d", choice).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    cancel(&shared, "ce-d").await;
    assert_eq!(holder.discards(), []);
    shared.store.db().pool.close().await;
    drop((shared, app));

    let app = restarted(dir, url, holder.clone()).await;
    let shared = app.shared();
    past_a_lease(&shared);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        1
    );
    let export_job = crate::runner::bulk_job_id(&key("ce-d"), BulkOp::Export);
    assert_eq!(holder.discards(), [("acme".to_string(), export_job)]);
    shared.clock.advance(86_400_000);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        0
    );
    assert_eq!(holder.discards().len(), 1);
}

on_both!(a_cancelled_return_has_its_holder_discard_once_after_a_restart);

/// A failed call leaves the mark: it is not made again before its backoff, and once that
/// passed the next sweep makes it and clears the mark.
async fn a_failed_discard_is_made_again_after_its_backoff(url: &str, dir: &std::path::Path) {
    let holder = Arc::new(Recorder {
        failing: AtomicUsize::new(1),
        ..Default::default()
    });
    let choice = ContractEndChoice::ReturnThenDelete;
    let app = with_contract_end(dir, url, holder.clone(), "ce-f", choice).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    cancel(&shared, "ce-f").await;
    past_a_lease(&shared);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        0
    );
    assert_eq!(holder.discards().len(), 1);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        0
    );
    assert_eq!(holder.discards().len(), 1);

    let max_ms = shared.config.tasks.backoff.max_ms;
    shared.clock.advance(i64::try_from(max_ms).expect("ms") + 1);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        1
    );
    assert_eq!(holder.discards().len(), 2);
    shared.clock.advance(i64::try_from(max_ms).expect("ms") + 1);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        0
    );
    assert_eq!(holder.discards().len(), 2);
}

on_both!(a_failed_discard_is_made_again_after_its_backoff);

/// A cancelled return's discard waits a task lease past the cancellation: a runner whose
/// lease lapsed may still be in the export call, which commits what it recorded only when it
/// ends. Due at once, the sweep's discard came before that commit and left those records.
async fn a_cancelled_returns_discard_waits_a_lease(url: &str, dir: &std::path::Path) {
    let holder = Arc::new(Recorder::default());
    let choice = ContractEndChoice::ReturnThenDelete;
    let app = with_contract_end(dir, url, holder.clone(), "ce-w", choice).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    cancel(&shared, "ce-w").await;
    let lease_ms = i64::try_from(shared.config.tasks.lease_ms).expect("ms");
    // The clock runs on meanwhile: a second short of the lease, not a millisecond.
    shared.clock.advance(lease_ms - 1_000);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        0
    );
    assert_eq!(holder.discards(), []);
    shared.clock.advance(1_000);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        1
    );
    assert_eq!(holder.discards().len(), 1);
}

on_both!(a_cancelled_returns_discard_waits_a_lease);

/// A contract end cancelled before its export began recorded nothing at its holder, and one
/// whose export ran and that goes on has its erasure still to come: neither calls.
async fn contract_ends_without_a_started_export_or_that_go_on_call_nothing(
    url: &str,
    dir: &std::path::Path,
) {
    let holder = Arc::new(Recorder::default());
    let choice = ContractEndChoice::ReturnThenDelete;
    let app = with_contract_end(dir, url, holder.clone(), "ce-early", choice).await;
    let shared = app.shared();
    cancel(&shared, "ce-early").await;
    shared.store.db().pool.close().await;
    drop((shared, app));

    let app = with_contract_end(dir, url, holder.clone(), "ce-on", choice).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    shared.clock.advance(86_400_000);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        0
    );
    assert_eq!(holder.discards(), []);
}

on_both!(contract_ends_without_a_started_export_or_that_go_on_call_nothing);

/// A contract end whose export failed for good may still be retried by an operator, so its
/// holder keeps what the export recorded; once its request is forgotten no retry can take
/// it, and the next sweep has the holder discard it.
async fn a_failed_contract_end_is_discarded_once_forgotten(url: &str, dir: &std::path::Path) {
    let holder = Arc::new(Recorder {
        export_fails: true,
        ..Default::default()
    });
    let choice = ContractEndChoice::ReturnThenDelete;
    let app = with_contract_end(dir, url, holder.clone(), "ce-x", choice).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let row = (shared.store.manual_task(&key("ce-x")).await)
        .expect("read")
        .expect("the task");
    assert_eq!(row.task.state, TaskState::Failed, "{row:?}");
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        0
    );
    assert_eq!(holder.discards(), []);

    // Past the forget window, every acknowledgement sent.
    sqlx::query("UPDATE ack_outbox SET sent_at = 1")
        .execute(&shared.store.db().pool)
        .await
        .expect("sent");
    let days = i64::from(shared.config.forget_after_days) + 1;
    shared.clock.advance(days * 86_400_000);
    let now = shared.clock.now_ms();
    let cutoff = crate::forget::cutoff(now, shared.config.forget_after_days);
    let due = (shared.store.requests_to_forget(cutoff, None, 10).await).expect("due");
    assert_eq!(due.len(), 1, "{due:?}");
    let forgotten = (shared
        .store
        .forget_request(&due[0], "[]", cutoff, now)
        .await)
        .expect("forget");
    assert!(forgotten);
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        1
    );
    let export_job = crate::runner::bulk_job_id(&key("ce-x"), BulkOp::Export);
    assert_eq!(holder.discards(), [("acme".to_string(), export_job)]);
}

on_both!(a_failed_contract_end_is_discarded_once_forgotten);

/// The store before migration 0027: every migration before it.
fn before_0027(all: &sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    sqlx::migrate::Migrator {
        migrations: all.iter().filter(|m| m.version < 27).cloned().collect(),
        ignore_missing: all.ignore_missing,
        locking: all.locking,
        no_tx: all.no_tx,
    }
}

/// Contract ends that ended before migration 0027 left their holders' records there: the
/// migration marks those cancelled after their export began, and those failed after it whose
/// request was forgotten, and the first sweep has their holders discard; a failed one not
/// forgotten, and one cancelled before its export, stay unmarked.
async fn the_migration_marks_contract_ends_that_ended_before_it(url: &str, dir: &std::path::Path) {
    use crate::store::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    let db = dsrelay_runtime::store::Db::connect(url).await.expect("db");
    let (sqlite, postgres) = (
        before_0027(&SQLITE_MIGRATIONS),
        before_0027(&POSTGRES_MIGRATIONS),
    );
    db.migrate(&sqlite, &postgres)
        .await
        .expect("migrate to 0026");
    let kind = i64::from(RequestKind::ContractEnd as i32);
    let (cancelled, failed) = (TaskState::Cancelled as i32, TaskState::Failed as i32);
    for (id, state, exported, forgotten) in [
        ("ce-cancelled", cancelled, true, false),
        ("ce-forgotten", failed, true, true),
        ("ce-failed", failed, true, false),
        ("ce-early", cancelled, false, false),
    ] {
        sqlx::query(
            "INSERT INTO requests (controller, request_id, kind, received_at, due_at, \
             accepted_at, forgotten_at) VALUES ('acme', $1, $2, 1, 1, 1, $3)",
        )
        .bind(id)
        .bind(kind)
        .bind(forgotten.then_some(5_i64))
        .execute(&db.pool)
        .await
        .expect("request");
        sqlx::query(
            "INSERT INTO tasks (controller, request_id, subprocessor, state, sequence, \
             next_attempt_at, updated_at, contract_phase, export_started_at) \
             VALUES ('acme', $1, 'crm', $2, 3, 1, 1, 2, $3)",
        )
        .bind(id)
        .bind(i64::from(state))
        .bind(exported.then_some(2_i64))
        .execute(&db.pool)
        .await
        .expect("task");
    }
    db.pool.close().await;

    let holder = Arc::new(Recorder::default());
    let app = restarted(dir, url, holder.clone()).await;
    let shared = app.shared();
    assert_eq!(
        crate::holder_discard::sweep(&shared).await.expect("sweep"),
        2
    );
    let mut called: Vec<String> = holder.discards().into_iter().map(|(_, job)| job).collect();
    called.sort();
    assert_eq!(called, ["acme/ce-cancelled/crm", "acme/ce-forgotten/crm"]);
}

on_both!(the_migration_marks_contract_ends_that_ended_before_it);
