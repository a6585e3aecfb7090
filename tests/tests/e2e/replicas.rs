//! Replicas sharing one PostgreSQL database: what one replica writes reaches the callers of
//! another. (The chaos run with several replicas of each service under SIGKILLs is in
//! `chaos.rs`.)

use std::time::Duration;

use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    EventType, ExtendDeadlineRequest, ListEventsRequest, TaskState, WatchRequest,
};
use dsrelay_runtime::pki::dev_identity;
use tokio_stream::StreamExt;

use crate::harness::{erasure, spawn_pair, wait_until, Backend, PairOptions};

/// A Watch stream opened at one registry hears of an event written through another replica
/// on the same database, although nothing in its own process changed: the stream reads the
/// store again every `watch.poll_interval_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_watch_at_one_registry_sees_an_event_written_through_another() {
    let Some(pair) = spawn_pair(PairOptions {
        backend: Backend::Postgres,
        // The mail holder takes its time, so the request stays open and quiet: no
        // acknowledgement reaches registry A while the test waits.
        mail_delay_ms: 60_000,
        ..Default::default()
    })
    .await
    else {
        return;
    };

    // Registry B: the same configuration and database as A, its own checkpoint file and
    // address, as a second replica is deployed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding registry B");
    let b_addr = listener.local_addr().expect("B's address");
    let b_port = b_addr.port();
    let config = pair.registry_replica_config(b_addr, 1);
    let b = dsrelay_registry::App::build(config)
        .await
        .expect("building registry B");
    let (stop_b, stopped) = tokio::sync::oneshot::channel::<()>();
    let b_task = tokio::spawn(b.run(listener, async {
        let _ = stopped.await;
    }));
    let tls = pair
        .pki()
        .files("operator")
        .client_config()
        .expect("client tls");
    let b_channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{b_port}"),
        Some(dev_identity("registry", "controller")),
        &tls,
    )
    .expect("a channel to B");
    let mut operator_at_b = RequestServiceClient::new(b_channel);
    let mut at_a = pair.crm();

    let id = at_a
        .submit(erasure("replica.watcher@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    // Wait until the accounting holder's answer (it has no such subject) is acknowledged
    // and the mail holder's work is running: from then on nothing happens to the request
    // at A.
    wait_until(&mut at_a, &id, Duration::from_secs(30), |r| {
        r.tasks
            .iter()
            .any(|t| t.subprocessor == "accounting" && t.state == TaskState::NotFound as i32)
            && r.tasks
                .iter()
                .any(|t| t.state == TaskState::InProgress as i32)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = at_a
        .list_events(ListEventsRequest {
            request_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("list events")
        .into_inner()
        .events
        .iter()
        .map(|e| e.event_id)
        .max()
        .unwrap_or(0);
    let mut stream = at_a
        .watch(WatchRequest {
            request_id: id.clone(),
            after_event_id: last,
            follow_after_terminal: false,
        })
        .await
        .expect("watch at A")
        .into_inner();

    operator_at_b
        .extend_deadline(ExtendDeadlineRequest {
            request_id: id.clone(),
            months: 1,
            reason: "the subject's records are spread over several archives".into(),
        })
        .await
        .expect("extend the deadline through B");

    // A's default interval is 1 s; the bound leaves room for a slow machine.
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = stream.next().await {
            let e = e.expect("an event");
            if e.r#type == EventType::DeadlineExtended as i32 {
                return Some(e);
            }
        }
        None
    })
    .await
    .expect("the watcher at A heard nothing of B's write within 10 s");
    assert!(
        heard.is_some(),
        "the stream at A ended without the deadline extension"
    );

    let _ = stop_b.send(());
    let _ = b_task.await;
    pair.stop().await;
}
