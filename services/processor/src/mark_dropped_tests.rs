//! An unreachable mark whose holder has no task left to try it, through the processor's real
//! store and runner (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server),
//! its ListSubprocessors served over mutual TLS with the development PKI's certificates, and
//! its metrics as the admin port renders them: the check ([`crate::breaker::run`]'s pass)
//! drops it once it has run out, logged at INFO; a mark with a task left stays for that task's
//! probe. Before, nothing dropped such a mark: the holder stayed listed and scraped as
//! unreachable until a new task came or the processor restarted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use dsrelay_connectors::{BoxFuture, BulkJob, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::{
    ContractPhase, DeliverRequest, ListSubprocessorsRequest, RequestKind, TaskState,
};
use dsrelay_runtime::clock::date_label;
use dsrelay_runtime::pki::dev_identity;
use dsrelay_runtime::testing::{captured_logs, CapturedLogs};

use crate::app::Shared;
use crate::breaker::drop_untried_marks;
use crate::store::TaskKey;
use crate::task_machine::NEVER;
use crate::App;

/// Refuses the connection while it is down, erases a row once it is up.
struct Switch {
    down: AtomicBool,
    calls: AtomicUsize,
}

impl Switch {
    fn down() -> Arc<Self> {
        Arc::new(Self {
            down: AtomicBool::new(true),
            calls: AtomicUsize::new(0),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Connector for Switch {
    fn kind_name(&self) -> &'static str {
        "switch"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(ConnectorError::Transient("connection refused".into()));
            }
            Ok(Outcome::Completed {
                records_affected: 1,
                note: "deleted 1 row".into(),
                files: Vec::new(),
                erased: Vec::new(),
            })
        })
    }

    fn run_bulk<'a>(&'a self, _job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("single tasks only".into())) })
    }
}

/// A processor whose one subprocessor, named `holder` (each test and backend its own, as
/// `cargo test` logs every test of the process into one capture), is `connector`.
async fn processor(
    database_url: &str,
    dir: &std::path::Path,
    holder: &str,
    connector: Arc<dyn Connector>,
) -> Arc<Shared> {
    let mut config = crate::contract_tests::config(dir, database_url, &["acme"]);
    config.controllers[0].identity = dev_identity("registry", "controller");
    config.subprocessors[0].name = holder.to_string();
    let connectors = HashMap::from([(holder.to_string(), connector)]);
    let app = App::with_connectors(config, connectors).await.expect("app");
    app.shared()
}

/// The backend `database_url` names, to keep each variant's subprocessor apart.
fn backend(database_url: &str) -> &str {
    database_url
        .split_once(':')
        .map_or("db", |(scheme, _)| scheme)
}

/// Stores an erasure `request_id` for `holder`, due at `due`.
async fn deliver(shared: &Shared, holder: &str, request_id: &str, due: i64) {
    let req = DeliverRequest {
        request_id: request_id.into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(due)),
        ..Default::default()
    };
    let now = shared.clock.now_ms();
    (shared.store)
        .accept("acme", &req, &[holder.to_string()], None, now)
        .await
        .expect("accept");
}

/// Claims the runnable tasks (`expected` of them) and takes each one step.
async fn step(shared: &Shared, expected: usize) {
    let jobs = (shared.store)
        .claim_tasks(shared.clock.now_ms(), 10, 30_000)
        .await
        .expect("claim");
    assert_eq!(jobs.len(), expected, "{jobs:#?}");
    for job in jobs {
        crate::runner::run_task(shared, job).await.expect("step");
    }
}

async fn state(shared: &Shared, holder: &str, request_id: &str) -> TaskState {
    let key = TaskKey {
        controller: "acme".into(),
        request_id: request_id.into(),
        subprocessor: holder.into(),
    };
    let row = shared.store.manual_task(&key).await.expect("read");
    row.expect("the task").task.state
}

/// The unreachable gauge of `holder` in the processor's metrics now.
async fn gauge(shared: &Shared, holder: &str) -> f64 {
    let text = crate::metrics::render(shared, shared.clock.now_ms())
        .await
        .expect("metrics");
    let prefix = format!("dsrelay_subprocessor_unreachable{{subprocessor=\"{holder}\"}} ");
    let value = text.lines().find_map(|l| l.strip_prefix(&prefix));
    let value = value.unwrap_or_else(|| panic!("no gauge of {holder} in:\n{text}"));
    value.parse().expect("a number")
}

/// Since when ListSubprocessors says `holder` is unreachable, if it does.
async fn listed_since(
    client: &mut ProcessorServiceClient<tonic::transport::Channel>,
    holder: &str,
) -> Option<i64> {
    let list = client
        .list_subprocessors(ListSubprocessorsRequest {})
        .await
        .expect("ListSubprocessors")
        .into_inner();
    let listed = list.subprocessors.into_iter().find(|s| s.name == holder);
    let listed = listed.expect("the holder is listed");
    listed
        .unreachable_since
        .as_ref()
        .map(dsrelay_proto::millis_from_timestamp)
}

/// The INFO lines saying `holder`'s mark was dropped.
fn dropped_lines(logs: &CapturedLogs, holder: &str) -> Vec<serde_json::Value> {
    logs.text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["fields"]["subprocessor"] == holder && l["level"] == "INFO")
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("unreachable mark dropped"))
        })
        .collect()
}

/// A holder refuses the connection; its one task is cancelled. While the mark has not run
/// out the check keeps it; once it has, the check drops it, logged once at INFO with the
/// outage's length so far, saying no task is left and the next one will try the holder: the
/// gauge reads 0 and ListSubprocessors gives no mark. The next task calls the holder at once.
async fn a_mark_no_task_is_left_to_try_is_dropped(database_url: &str, dir: &std::path::Path) {
    let logs = captured_logs();
    let holder = format!("newsletter-cancelled-{}", backend(database_url));
    let switch = Switch::down();
    let shared = processor(database_url, dir, &holder, switch.clone()).await;
    let (mut client, stop) = crate::api_test_support::serve_processor_api(&shared, dir).await;
    let now = shared.clock.now_ms();
    deliver(&shared, &holder, "r-cancelled", now + 30 * 86_400_000).await;
    step(&shared, 1).await;
    assert_eq!(switch.calls(), 1);
    let since = shared
        .unavailable_until
        .mark(&holder)
        .expect("marked")
        .since;
    assert_eq!(gauge(&shared, &holder).await, 1.0);

    shared
        .store
        .cancel("acme", "r-cancelled", "no longer needed", now)
        .await
        .expect("cancel");
    assert_eq!(
        state(&shared, &holder, "r-cancelled").await,
        TaskState::Cancelled
    );
    // The mark has not run out: it stays, whatever is left.
    assert_eq!(drop_untried_marks(&shared).await.expect("check"), 0);
    assert_eq!(gauge(&shared, &holder).await, 1.0);

    // Past the retry's backoff (at most a minute by default) the mark has run out, with no
    // task left to probe the holder.
    shared.clock.advance(120_000);
    switch.down.store(false, Ordering::SeqCst);
    assert_eq!(listed_since(&mut client, &holder).await, Some(since));
    assert_eq!(drop_untried_marks(&shared).await.expect("check"), 1);
    assert_eq!(shared.unavailable_until.mark(&holder), None);
    assert_eq!(gauge(&shared, &holder).await, 0.0);
    assert_eq!(listed_since(&mut client, &holder).await, None);
    assert_eq!(drop_untried_marks(&shared).await.expect("check"), 0);

    let lines = dropped_lines(&logs, &holder);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let fields = &lines[0]["fields"];
    let outage_ms = fields["outage_ms"].as_i64().expect("outage_ms");
    assert!(outage_ms >= 120_000, "{outage_ms}");
    assert_eq!(fields["since"], date_label(since));
    assert_eq!(
        fields["message"],
        format!(
            "subprocessor {holder}'s unreachable mark dropped after {} s (unreachable since \
             {}): no task is left to try it; its reachability is unknown, and the next task \
             for it will try it",
            outage_ms / 1000,
            date_label(since)
        )
    );

    // The next task calls the holder, which answers.
    deliver(
        &shared,
        &holder,
        "r-next",
        shared.clock.now_ms() + 86_400_000,
    )
    .await;
    step(&shared, 1).await;
    assert_eq!(switch.calls(), 2);
    assert_eq!(
        state(&shared, &holder, "r-next").await,
        TaskState::Completed
    );
    let _ = stop.send(());
}

/// A holder refuses the connection. Its task's retry is due once the mark runs out: the
/// check keeps the mark (the gauge reads 1) for that task's probe. The probe, past the
/// task's due date, fails again: the task gives up (FAILED) and the mark is renewed; once
/// that has run out, no task is left and the check drops it.
async fn a_mark_with_a_task_left_stays_until_the_task_gives_up(
    database_url: &str,
    dir: &std::path::Path,
) {
    let logs = captured_logs();
    let holder = format!("newsletter-waiting-{}", backend(database_url));
    let switch = Switch::down();
    let shared = processor(database_url, dir, &holder, switch.clone()).await;
    let now = shared.clock.now_ms();
    let due = now + 86_400_000;
    deliver(&shared, &holder, "r-waiting", due).await;
    step(&shared, 1).await;
    assert_eq!(switch.calls(), 1);

    shared.clock.advance(120_000);
    assert_eq!(drop_untried_marks(&shared).await.expect("check"), 0);
    assert!(shared.unavailable_until.mark(&holder).is_some());
    assert_eq!(gauge(&shared, &holder).await, 1.0);
    assert_eq!(
        state(&shared, &holder, "r-waiting").await,
        TaskState::InProgress
    );

    // Past its due date the task probes the holder, which fails again: it gives up.
    shared.clock.advance(86_400_000);
    step(&shared, 1).await;
    assert_eq!(switch.calls(), 2);
    assert_eq!(
        state(&shared, &holder, "r-waiting").await,
        TaskState::Failed
    );
    assert_eq!(drop_untried_marks(&shared).await.expect("check"), 0);
    assert_eq!(gauge(&shared, &holder).await, 1.0);
    assert!(dropped_lines(&logs, &holder).is_empty());

    shared.clock.advance(120_000);
    assert_eq!(drop_untried_marks(&shared).await.expect("check"), 1);
    assert_eq!(gauge(&shared, &holder).await, 0.0);
    assert_eq!(dropped_lines(&logs, &holder).len(), 1);
}

/// Which tasks count as left to try their holder: a PENDING one, one retrying (whenever its
/// next try comes), a RETAINED one or a scheduled contract end only once its date has come,
/// a contract end whose holder is still to discard its export's record; not an export handed
/// to the uploader, a final task, nor another holder's task.
async fn tasks_left_to_try_a_holder(database_url: &str, dir: &std::path::Path) {
    let holder = format!("newsletter-left-{}", backend(database_url));
    let shared = processor(database_url, dir, &holder, Switch::down()).await;
    let store = &shared.store;
    let now = shared.clock.now_ms();
    deliver(&shared, &holder, "r-left", now + 30 * 86_400_000).await;
    let left = || async { store.tasks_left_to_try(&holder, now).await.expect("read") };
    let set = |state: TaskState, next: i64, phase: ContractPhase, discard: Option<i64>| async move {
        sqlx::query(
            "UPDATE tasks SET state = $1, next_attempt_at = $2, contract_phase = $3, \
             holder_discard_at = $4 WHERE request_id = 'r-left'",
        )
        .bind(i64::from(state as i32))
        .bind(next)
        .bind(i64::from(phase as i32))
        .bind(discard)
        .execute(&store.db().pool)
        .await
        .expect("update");
    };
    let (later, earlier) = (now + 3_600_000, now - 1);
    use ContractPhase::{AwaitingConfirmation, Returning, Scheduled, Unspecified};
    use TaskState::{Cancelled, Completed, InProgress, Pending, Retained};

    assert!(left().await, "PENDING");
    assert!(
        !store
            .tasks_left_to_try("someone-else", now)
            .await
            .expect("read"),
        "another holder's task"
    );
    set(InProgress, later, Unspecified, None).await;
    assert!(left().await, "retrying later");
    set(InProgress, NEVER, Unspecified, None).await;
    assert!(!left().await, "handed to the uploader");
    set(Retained, later, Unspecified, None).await;
    assert!(!left().await, "retained until later");
    set(Retained, earlier, Unspecified, None).await;
    assert!(left().await, "retained, its date come");
    set(Pending, later, Scheduled, None).await;
    assert!(!left().await, "a contract end scheduled later");
    set(Pending, earlier, Scheduled, None).await;
    assert!(left().await, "a contract end at its start");
    set(InProgress, later, AwaitingConfirmation, None).await;
    assert!(!left().await, "a contract end awaiting the controller");
    set(InProgress, later, Returning, None).await;
    assert!(left().await, "a contract end's export retrying");
    set(Completed, NEVER, Unspecified, None).await;
    assert!(!left().await, "COMPLETED");
    set(Cancelled, NEVER, Returning, Some(later)).await;
    assert!(left().await, "its holder to discard the export's record");
    set(Cancelled, NEVER, Returning, None).await;
    assert!(!left().await, "CANCELLED");
}

on_both!(
    a_mark_no_task_is_left_to_try_is_dropped,
    a_mark_with_a_task_left_stays_until_the_task_gives_up,
    tasks_left_to_try_a_holder,
);
