//! A holder marked unreachable, as a controller's registry and a scrape see it: through the
//! processor's real store and runner (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL`
//! names a server), its ListSubprocessors served over mutual TLS with the development PKI's
//! certificates, and its metrics as the admin port renders them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dsrelay_connectors::{BoxFuture, BulkJob, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::{
    DeliverRequest, ListSubprocessorsRequest, RequestKind, Subprocessor, TaskState,
};
use dsrelay_proto::{millis_from_timestamp, timestamp_from_millis};
use dsrelay_runtime::pki::dev_identity;

use crate::api_test_support::serve_processor_api;
use crate::app::Shared;
use crate::store::TaskKey;
use crate::App;

/// Refuses the connection on its first call, erases a row on the next.
#[derive(Default)]
struct DownOnce {
    calls: AtomicUsize,
}

impl Connector for DownOnce {
    fn kind_name(&self) -> &'static str {
        "down-once"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
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

/// The subprocessor `crm` as ListSubprocessors answers it now.
async fn listed(client: &mut ProcessorServiceClient<tonic::transport::Channel>) -> Subprocessor {
    let list = client
        .list_subprocessors(ListSubprocessorsRequest {})
        .await
        .expect("ListSubprocessors")
        .into_inner();
    let crm = list.subprocessors.into_iter().find(|s| s.name == "crm");
    crm.expect("crm is listed")
}

/// The value of `series` in the processor's metrics now.
async fn gauge(shared: &Shared, series: &str) -> f64 {
    let text = crate::metrics::render(shared, shared.clock.now_ms())
        .await
        .expect("metrics");
    let prefix = format!("{series} ");
    let value = text.lines().find_map(|l| l.strip_prefix(&prefix));
    let value = value.unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    value.parse().expect("a number")
}

/// A task's holder refuses the connection: while it is marked unreachable, ListSubprocessors
/// gives since when (its failure) and its error, and the gauges read 1 and that time; once
/// its probe gets an answer, neither shows a mark. Before, nothing outside the task's reason
/// told a controller or an operator that the holder was down.
async fn a_marked_holder_is_listed_and_scraped_until_it_answers(
    database_url: &str,
    dir: &std::path::Path,
) {
    let holder = Arc::new(DownOnce::default());
    let connectors = HashMap::from([("crm".to_string(), holder.clone() as Arc<dyn Connector>)]);
    let mut config = crate::contract_tests::config(dir, database_url, &["acme"]);
    config.controllers[0].identity = dev_identity("registry", "controller");
    let app = App::with_connectors(config, connectors).await.expect("app");
    let shared = app.shared();
    let (mut client, stop) = serve_processor_api(&shared, dir).await;
    let unreachable = "dsrelay_subprocessor_unreachable{subprocessor=\"crm\"}";
    let since_seconds = "dsrelay_subprocessor_unreachable_since_seconds{subprocessor=\"crm\"}";

    let crm = listed(&mut client).await;
    assert_eq!(
        (crm.unreachable_since, crm.unreachable_error.as_str()),
        (None, "")
    );
    assert_eq!(gauge(&shared, unreachable).await, 0.0);

    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-mark".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 30 * 86_400_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let step = || async {
        let jobs = (shared.store)
            .claim_tasks(shared.clock.now_ms(), 10, 30_000)
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 1);
        for job in jobs {
            crate::runner::run_task(&shared, job).await.expect("step");
        }
    };
    let before = shared.clock.now_ms();
    step().await;
    let after = shared.clock.now_ms();
    assert_eq!(holder.calls.load(Ordering::SeqCst), 1);

    let crm = listed(&mut client).await;
    let since = crm.unreachable_since.as_ref().map(millis_from_timestamp);
    let since = since.expect("marked unreachable");
    assert!(
        (before..=after).contains(&since),
        "{since} in {before}..={after}"
    );
    assert_eq!(crm.unreachable_error, "connection refused");
    assert_eq!(gauge(&shared, unreachable).await, 1.0);
    assert_eq!(gauge(&shared, since_seconds).await, since as f64 / 1000.0);

    // Past the retry's backoff the task probes the holder, which answers.
    shared.clock.advance(86_400_000);
    step().await;
    assert_eq!(holder.calls.load(Ordering::SeqCst), 2);
    let key = TaskKey {
        controller: "acme".into(),
        request_id: "r-mark".into(),
        subprocessor: "crm".into(),
    };
    let row = shared.store.manual_task(&key).await.expect("read");
    assert_eq!(row.expect("the task").task.state, TaskState::Completed);
    let crm = listed(&mut client).await;
    assert_eq!(
        (crm.unreachable_since, crm.unreachable_error.as_str()),
        (None, "")
    );
    assert_eq!(gauge(&shared, unreachable).await, 0.0);
    assert_eq!(gauge(&shared, since_seconds).await, 0.0);
    let _ = stop.send(());
}

on_both!(a_marked_holder_is_listed_and_scraped_until_it_answers);
