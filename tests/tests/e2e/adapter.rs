//! The external-adapter connector end to end: registry → processor → the example newsletter
//! adapter (over mTLS, in-process) and back, including an adapter that confirms later and
//! one that is down when the request arrives.

use std::net::SocketAddr;
use std::time::Duration;

use dsrelay_connectors::adapter::AdapterConfig;
use dsrelay_processor::config::{ConnectorConfig, SubprocessorConfig};
use dsrelay_proto::v1::{Request, RequestState, TaskState, TaskStatus};
use dsrelay_runtime::pki::dev_identity;
use dsrelay_runtime::settings::ServiceSettings;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::harness::{
    count, erasure, in_state, start_processor, start_registry, wait_until, PairOptions, Setup,
    PROCESSOR,
};

const MAIJA: &str = "maija.meikalainen@example.fi";
pub(crate) const NEWSLETTER: &str = "newsletter";

/// The example adapter running in this process.
struct Adapter {
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Adapter {
    async fn start(config: dsrelay_example_adapter::Config, listener: TcpListener) -> Self {
        let app = dsrelay_example_adapter::App::build(config)
            .await
            .expect("build adapter");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(listener, async {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            handle,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.handle).await;
    }
}

/// A harness setup whose processor has one subprocessor, `newsletter`, reached through the
/// adapter connector at `adapter_addr`; and the adapter's own configuration.
pub(crate) async fn newsletter_setup(
    adapter_addr: SocketAddr,
    confirm_delay_ms: u64,
    supported_kinds: Option<Vec<String>>,
) -> (Setup, dsrelay_example_adapter::Config) {
    let mut setup = Setup::new(&PairOptions::default())
        .await
        .expect("sqlite setup");
    let adapter = dsrelay_example_adapter::Config {
        service: ServiceSettings::new(
            adapter_addr.to_string(),
            format!("sqlite://{}/newsletter.db", setup.dir.path().display()),
            setup.pki.files("adapter"),
        ),
        allowed_identities: vec![dev_identity("processor", PROCESSOR)],
        confirm_delay_ms,
    };
    adapter.validate().expect("adapter config");
    // Start from the harness's Finnish subprocessor (so that every other setting keeps the
    // harness's value) and replace the whole list with the newsletter alone.
    let mut newsletter: SubprocessorConfig = setup
        .processor
        .subprocessors
        .iter()
        .find(|s| s.country == "FI")
        .expect("a subprocessor in Finland")
        .clone();
    newsletter.name = NEWSLETTER.into();
    newsletter.categories = vec!["marketing".into(), "contact".into()];
    newsletter.connector = ConnectorConfig::Adapter(AdapterConfig {
        endpoint: format!("https://localhost:{}", adapter_addr.port()),
        identity: dev_identity("adapter", "example"),
        tls: setup.pki.files("processor"),
        timeout_ms: 5000,
        supported_kinds,
    });
    setup.processor.subprocessors = vec![newsletter];
    setup.processor.validate().expect("processor config");
    (setup, adapter)
}

fn newsletter_task(r: &Request) -> Option<&TaskStatus> {
    r.tasks.iter().find(|t| t.subprocessor == NEWSLETTER)
}

/// Asserts the request completed with the newsletter's confirmed erasure of one record, and
/// that the row is gone from the adapter's database.
async fn assert_erased(view: &Request, adapter: &dsrelay_example_adapter::Config) {
    assert_eq!(view.tasks.len(), 1, "{view:#?}");
    let task = newsletter_task(view).expect("newsletter task");
    assert_eq!(task.state, TaskState::Completed as i32, "{task:#?}");
    assert_eq!(task.processor, PROCESSOR);
    let evidence = task.evidence.clone().expect("evidence");
    assert_eq!(evidence.records_affected, 1, "{evidence:?}");
    assert!(evidence.confirmed, "{evidence:?}");
    let url = &adapter.service.database_url;
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
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind adapter");
    let (setup, adapter_config) =
        newsletter_setup(listener.local_addr().expect("addr"), 0, None).await;
    let adapter = Adapter::start(adapter_config.clone(), listener).await;
    let processor = start_processor(&setup).await;
    let (registry, _) = start_registry(&setup).await;

    let mut crm = setup.client("partner-crm").await;
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
    assert_erased(&view, &adapter_config).await;
    // PENDING (1) → IN_PROGRESS (2) → COMPLETED (3): nothing was accepted unconfirmed.
    assert_eq!(newsletter_task(&view).expect("task").sequence, 3);

    registry.stop().await;
    processor.stop().await;
    adapter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_that_confirms_later_keeps_the_task_in_progress_until_it_does() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind adapter");
    let (setup, adapter_config) = newsletter_setup(
        listener.local_addr().expect("addr"),
        1500,
        Some(vec!["erasure".into(), "objection".into()]),
    )
    .await;
    let adapter = Adapter::start(adapter_config.clone(), listener).await;
    let processor = start_processor(&setup).await;
    let (registry, _) = start_registry(&setup).await;

    let mut crm = setup.client("partner-crm").await;
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
    assert_erased(&view, &adapter_config).await;
    assert_eq!(newsletter_task(&view).expect("task").sequence, 4);

    registry.stop().await;
    processor.stop().await;
    adapter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_that_is_down_is_retried_until_it_is_up() {
    // Reserve a port, then leave it closed: the adapter is down when the processor starts
    // and when the request arrives.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let (setup, adapter_config) = newsletter_setup(addr, 0, None).await;
    let processor = start_processor(&setup).await;
    let (registry, _) = start_registry(&setup).await;

    let mut crm = setup.client("partner-crm").await;
    let submitted = crm
        .submit(erasure(MAIJA))
        .await
        .expect("submit")
        .into_inner();

    // The processor tries, fails transiently and keeps the task to retry.
    let processor_db = &setup.processor.service.database_url;
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
    let listener = TcpListener::bind(addr)
        .await
        .expect("rebind the adapter port");
    let adapter = Adapter::start(adapter_config.clone(), listener).await;
    let view = wait_until(
        &mut crm,
        &submitted.request_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    assert_erased(&view, &adapter_config).await;

    registry.stop().await;
    processor.stop().await;
    adapter.stop().await;
}
