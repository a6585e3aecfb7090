//! The example adapter's API over real mutual TLS: the dev PKI's "adapter" party serves, its
//! "processor" party calls.

use std::time::Duration;

use dsrelay_example_adapter::retention::BillingKind;
use dsrelay_example_adapter::store::Store;
use dsrelay_example_adapter::{App, Config};
use dsrelay_proto::v1::subprocessor_adapter_client::SubprocessorAdapterClient;
use dsrelay_proto::v1::{
    BulkOperation, DescribeRequest, ExecuteBulkRequest, ExecuteBulkResponse, ExecuteOutcome,
    ExecuteRequest, ExecuteResponse, FieldCorrection, GetBulkStatusRequest, GetExportPageRequest,
    GetTaskStatusRequest, IdentityEncoding, IdentityType, RequestKind, RequestParameters, Scope,
    SubjectIdentity,
};
use dsrelay_runtime::identity::{digest, normalize};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::settings::ServiceSettings;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

const MAIJA: &str = "maija.meikalainen@example.fi";
/// The controller the seeded subscribers are given to.
const CONTROLLER: &str = "payroll";

struct Running {
    _dir: TempDir,
    pki: DevPki,
    port: u16,
    store: Store,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Which database the adapter keeps its data in.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database on the test PostgreSQL server (`DSRELAY_TEST_POSTGRES_URL`, which
/// scripts/test.sh sets), or `None` when there is none (the test is skipped; in CI it fails).
async fn fresh_postgres_database() -> Option<String> {
    let server = match std::env::var("DSRELAY_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")),
                "PostgreSQL is required in CI: set DSRELAY_TEST_POSTGRES_URL"
            );
            eprintln!("skipped on PostgreSQL: DSRELAY_TEST_POSTGRES_URL is not set");
            return None;
        }
    };
    let name = format!(
        "adapter_{:016x}",
        std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            std::time::SystemTime::now(),
        )
    );
    let db = dsrelay_runtime::store::Db::connect(&server).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&db.pool)
        .await
        .unwrap();
    db.pool.close().await;
    let (base, _) = server.rsplit_once('/').expect("server url has a path");
    let query = server
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    Some(format!("{base}/{name}{query}"))
}

/// A fresh database of `backend`: a file in `dir`, or a new database on the test server
/// (`None` when there is none).
async fn fresh_database(backend: Backend, dir: &TempDir) -> Option<String> {
    match backend {
        Backend::Sqlite => Some(format!("sqlite://{}/newsletter.db", dir.path().display())),
        Backend::Postgres => fresh_postgres_database().await,
    }
}

impl Running {
    async fn start(confirm_delay_ms: u64) -> Self {
        Self::start_on(Backend::Sqlite, confirm_delay_ms)
            .await
            .expect("sqlite")
    }

    async fn start_on(backend: Backend, confirm_delay_ms: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let database_url = fresh_database(backend, &dir).await?;
        Some(Self::start_at(dir, database_url, confirm_delay_ms).await)
    }

    /// An adapter on the database at `database_url` (which may hold data already), with its
    /// PKI in `dir`.
    async fn start_at(dir: TempDir, database_url: String, confirm_delay_ms: u64) -> Self {
        let pki = DevPki::ensure(&dir.path().join("pki")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = Config {
            service: ServiceSettings::new(
                format!("127.0.0.1:{port}"),
                database_url,
                pki.files("adapter"),
            ),
            allowed_identities: vec![dev_identity("processor", "payroll-bureau")],
            confirm_delay_ms,
            default_controller: CONTROLLER.into(),
        };
        config.validate().unwrap();
        let app = App::build(config).await.unwrap();
        let store = app.store();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(listener, async {
            let _ = rx.await;
        }));
        Self {
            _dir: dir,
            pki,
            port,
            store,
            stop: Some(tx),
            handle,
        }
    }

    /// A client presenting the dev PKI party `stem`'s certificate.
    fn client(&self, stem: &str) -> SubprocessorAdapterClient<Channel> {
        let tls = self.pki.files(stem).client_config().unwrap();
        let channel = dsrelay_runtime::tls::channel(
            &format!("https://localhost:{}", self.port),
            Some(dev_identity("adapter", "example")),
            &tls,
        )
        .unwrap();
        SubprocessorAdapterClient::new(channel)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let served = tokio::time::timeout(Duration::from_secs(10), &mut self.handle)
            .await
            .expect("stopped in time")
            .expect("joined");
        served.expect("served cleanly");
    }
}

fn email(v: &str) -> SubjectIdentity {
    SubjectIdentity {
        r#type: IdentityType::Email as i32,
        encoding: IdentityEncoding::Raw as i32,
        value: v.into(),
        label: String::new(),
    }
}

fn request(task_id: &str, kind: RequestKind, who: SubjectIdentity) -> ExecuteRequest {
    ExecuteRequest {
        task_id: task_id.into(),
        request_id: format!("req-{task_id}"),
        kind: kind as i32,
        identities: vec![who],
        ..Default::default()
    }
}

fn outcome(r: &ExecuteResponse) -> ExecuteOutcome {
    ExecuteOutcome::try_from(r.outcome).unwrap()
}

fn records(r: &ExecuteResponse) -> i64 {
    r.evidence.as_ref().unwrap().records_affected
}

#[tokio::test]
async fn describe_lists_kinds_and_categories() {
    let a = Running::start(0).await;
    let d = a
        .client("processor")
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.name, "example newsletter");
    assert_eq!(d.supported_kinds.len(), 7);
    assert!(d
        .supported_kinds
        .contains(&(RequestKind::ContractEnd as i32)));
    assert!(!d
        .supported_kinds
        .contains(&(RequestKind::Unspecified as i32)));
    assert_eq!(d.data_categories, vec!["contact", "marketing"]);
    a.stop().await;
}

#[tokio::test]
async fn refuses_callers_that_are_not_allowed() {
    let a = Running::start(0).await;
    // A valid certificate from the same CA, but not a processor this adapter serves.
    let mut partner = a.client("partner-crm");
    let e = partner.describe(DescribeRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("spiffe://dsrelay.dev/partner/crm"),
        "{e:?}"
    );
    let e = partner
        .execute(request("t-denied", RequestKind::Erasure, email(MAIJA)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = partner
        .get_task_status(GetTaskStatusRequest {
            task_id: "t-denied".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Nothing was done.
    assert!(a.store.subscriber(MAIJA).await.unwrap().is_some());
    a.stop().await;
}

async fn erasure_is_done_once_per_task_id(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    let mut c = a.client("processor");
    let before = a.store.subscribers().await.unwrap().len();
    let first = c
        .execute(request("t-erase", RequestKind::Erasure, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&first), ExecuteOutcome::Completed);
    assert_eq!(records(&first), 1);
    assert!(first.evidence.as_ref().unwrap().confirmed);
    assert!(a.store.subscriber(MAIJA).await.unwrap().is_none());
    assert_eq!(a.store.subscribers().await.unwrap().len(), before - 1);

    // The same task again (a retry after a lost answer): the first answer, no new work.
    let again = c
        .execute(request("t-erase", RequestKind::Erasure, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    assert_eq!(a.store.subscribers().await.unwrap().len(), before - 1);
    let status = c
        .get_task_status(GetTaskStatusRequest {
            task_id: "t-erase".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status, first);

    // A new task finds nothing left.
    let other = c
        .execute(request("t-erase-2", RequestKind::Erasure, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&other), ExecuteOutcome::NotFound);

    // A task id names one task.
    let e = c
        .execute(request("t-erase", RequestKind::Objection, email(MAIJA)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    a.stop().await;
}

#[tokio::test]
async fn erasure_is_done_once_per_task_id_on_sqlite() {
    erasure_is_done_once_per_task_id(Backend::Sqlite).await;
}

#[tokio::test]
async fn erasure_is_done_once_per_task_id_on_postgres() {
    erasure_is_done_once_per_task_id(Backend::Postgres).await;
}

async fn concurrent_calls_with_one_task_id_do_the_work_once(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    let calls = (0..8).map(|_| {
        let mut c = a.client("processor");
        async move {
            c.execute(request("t-race", RequestKind::Erasure, email(MAIJA)))
                .await
                .unwrap()
                .into_inner()
        }
    });
    let answers = futures_join_all(calls).await;
    assert!(answers.iter().all(|r| *r == answers[0]), "{answers:#?}");
    assert_eq!(outcome(&answers[0]), ExecuteOutcome::Completed);
    assert_eq!(records(&answers[0]), 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_with_one_task_id_do_the_work_once_on_sqlite() {
    concurrent_calls_with_one_task_id_do_the_work_once(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_with_one_task_id_do_the_work_once_on_postgres() {
    concurrent_calls_with_one_task_id_do_the_work_once(Backend::Postgres).await;
}

/// Joins futures without an extra dependency.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn invalid_input_names_its_fields() {
    let a = Running::start(0).await;
    let mut c = a.client("processor");
    let bad = ExecuteRequest {
        task_id: String::new(),
        request_id: "r".into(),
        kind: RequestKind::Unspecified as i32,
        identities: vec![email("not-an-address")],
        ..Default::default()
    };
    let e = c.execute(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    for field in ["task_id", "kind", "identities[0].value"] {
        assert!(e.message().contains(field), "{field}: {e:?}");
    }
    let mut transfer = request("t-transfer", RequestKind::Transfer, email(MAIJA));
    transfer.parameters = None;
    let e = c.execute(transfer).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("parameters.transfer_recipient"),
        "{e:?}"
    );
    let e = c
        .get_task_status(GetTaskStatusRequest {
            task_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .get_task_status(GetTaskStatusRequest {
            task_id: "never-seen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    a.stop().await;
}

/// Every record of the export of `task_id`, page by page with `max_bytes`; also the number
/// of pages.
async fn all_pages(
    c: &mut SubprocessorAdapterClient<Channel>,
    task_id: &str,
    max_bytes: u32,
) -> (Vec<serde_json::Value>, usize) {
    let mut token = String::new();
    let mut records = Vec::new();
    let mut pages = 0;
    loop {
        let page = c
            .get_export_page(GetExportPageRequest {
                task_id: task_id.into(),
                page_token: token.clone(),
                max_bytes,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(pages <= 1000, "the export of {task_id} does not end");
        let size: usize = page.records.iter().map(Vec::len).sum();
        assert!(max_bytes == 0 || size <= max_bytes as usize, "{size}");
        for r in &page.records {
            records.push(serde_json::from_slice(r).unwrap());
        }
        if page.next_page_token.is_empty() {
            return (records, pages);
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn exports_the_subscriber_in_pages() {
    let a = Running::start(0).await;
    let mut c = a.client("processor");
    // Found by a hashed address too, as Mailchimp-style holders are asked.
    let hashed = SubjectIdentity {
        r#type: IdentityType::Email as i32,
        encoding: IdentityEncoding::Sha256 as i32,
        value: digest(
            IdentityEncoding::Sha256,
            &normalize(IdentityType::Email, MAIJA),
        )
        .unwrap(),
        label: String::new(),
    };
    let r = c
        .execute(request("t-export", RequestKind::ReturnOfData, hashed))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed);
    assert_eq!(records(&r), 1);
    assert!(r.export_paged && r.export_json.is_empty(), "{r:?}");
    let (json, pages) = all_pages(&mut c, "t-export", 0).await;
    assert_eq!(pages, 1);
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["record"], "subscriber");
    assert_eq!(json[0]["email"], MAIJA);
    assert_eq!(json[0]["phone"], "+358401234567");
    // Repeated: the same answer, and the pages read the data again.
    let again = c
        .execute(request("t-export", RequestKind::ReturnOfData, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, r);
    assert_eq!(all_pages(&mut c, "t-export", 0).await.0, json);
    // Exports have no status to ask for.
    let e = c
        .get_task_status(GetTaskStatusRequest {
            task_id: "t-export".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    let mut transfer = request("t-transfer", RequestKind::Transfer, email(MAIJA));
    transfer.parameters = Some(RequestParameters {
        transfer_recipient: "spiffe://dsrelay.dev/partner/crm".into(),
        ..Default::default()
    });
    let r = c.execute(transfer).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed);
    assert!(r.export_paged);
    assert_eq!(all_pages(&mut c, "t-transfer", 0).await.0, json);
    a.stop().await;
}

async fn a_large_export_arrives_whole_and_in_order(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    const N: usize = 3000;
    assert_eq!(a.store.add_deliveries(MAIJA, N).await.unwrap(), N);
    // Another subscriber's history is not part of Maija's export.
    a.store
        .add_deliveries("matti.virtanen@example.fi", 10)
        .await
        .unwrap();
    let mut c = a.client("processor");
    let r = c
        .execute(request("t-big", RequestKind::ReturnOfData, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.export_paged, "{r:?}");
    assert!(
        r.evidence
            .unwrap()
            .note
            .contains(&format!("{N} delivery record(s)")),
        "note"
    );
    let (json, pages) = all_pages(&mut c, "t-big", 16 * 1024).await;
    assert!(pages >= 10, "{pages} pages");
    assert_eq!(json.len(), N + 1);
    assert_eq!(json[0]["record"], "subscriber");
    for (i, d) in json[1..].iter().enumerate() {
        assert_eq!(d["record"], "delivery");
        assert_eq!(d["email"], MAIJA);
        assert_eq!(d["issue"], format!("Issue {}", i + 1), "in order");
    }
    // An erasure takes the history with the subscriber.
    let r = c
        .execute(request("t-erase", RequestKind::Erasure, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(records(&r), 1);
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM deliveries")
        .fetch_one(&a.store.db().pool)
        .await
        .unwrap();
    assert_eq!(left, 10);
    a.stop().await;
}

#[tokio::test]
async fn a_large_export_arrives_whole_and_in_order_on_sqlite() {
    a_large_export_arrives_whole_and_in_order(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_large_export_arrives_whole_and_in_order_on_postgres() {
    a_large_export_arrives_whole_and_in_order(Backend::Postgres).await;
}

#[tokio::test]
async fn bad_page_requests_get_clear_statuses() {
    let a = Running::start(0).await;
    a.store.add_deliveries(MAIJA, 50).await.unwrap();
    let mut c = a.client("processor");
    for (id, who) in [("t-a", MAIJA), ("t-b", "matti.virtanen@example.fi")] {
        c.execute(request(id, RequestKind::ReturnOfData, email(who)))
            .await
            .unwrap();
    }
    c.execute(request("t-erase", RequestKind::Objection, email(MAIJA)))
        .await
        .unwrap();
    let page = |task_id: &str, page_token: &str, max_bytes: u32| GetExportPageRequest {
        task_id: task_id.into(),
        page_token: page_token.into(),
        max_bytes,
    };
    let first = c
        .get_export_page(page("t-a", "", 1024))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    // The same token answers the same page: a lost answer can be asked again.
    let second = c
        .get_export_page(page("t-a", &first.next_page_token, 1024))
        .await
        .unwrap()
        .into_inner();
    let again = c
        .get_export_page(page("t-a", &first.next_page_token, 1024))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second, again);
    let names = |e: &tonic::Status, field: &str| {
        e.code() == Code::InvalidArgument && e.message().contains(field)
    };
    // A token of another task, a made-up token, a bad size.
    let e = c
        .get_export_page(page("t-b", &first.next_page_token, 1024))
        .await
        .unwrap_err();
    assert!(names(&e, "page_token"), "{e:?}");
    assert!(e.message().contains("another task"), "{e:?}");
    let e = c
        .get_export_page(page("t-a", "page-2", 0))
        .await
        .unwrap_err();
    assert!(names(&e, "page_token"), "{e:?}");
    let e = c.get_export_page(page("t-a", "", 10)).await.unwrap_err();
    assert!(names(&e, "max_bytes"), "{e:?}");
    // An unknown task, another caller's task, a task that is no export.
    let e = c.get_export_page(page("t-nope", "", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut other = a.client("partner-crm");
    let e = other.get_export_page(page("t-a", "", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c.get_export_page(page("t-erase", "", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    a.stop().await;
}

async fn rectifies_restricts_and_honours_objections(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    let mut c = a.client("processor");
    let mut fix = request("t-fix", RequestKind::Rectification, email(MAIJA));
    fix.parameters = Some(RequestParameters {
        corrections: vec![
            FieldCorrection {
                field: "name".into(),
                new_value: "Maija Virtanen".into(),
            },
            FieldCorrection {
                field: "phone".into(),
                new_value: "+358 40 765 4321".into(),
            },
            FieldCorrection {
                field: "address".into(),
                new_value: "Esimerkkikatu 1".into(),
            },
        ],
        ..Default::default()
    });
    let r = c.execute(fix).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    assert!(r
        .evidence
        .as_ref()
        .unwrap()
        .note
        .contains("not held here: address"));
    let s = a.store.subscriber(MAIJA).await.unwrap().unwrap();
    assert_eq!(s.name, "Maija Virtanen");
    assert_eq!(s.phone.as_deref(), Some("+358407654321"));

    // An address another subscriber uses is refused without changing anything.
    let mut clash = request("t-clash", RequestKind::Rectification, email(MAIJA));
    clash.parameters = Some(RequestParameters {
        corrections: vec![FieldCorrection {
            field: "email".into(),
            new_value: "matti.virtanen@example.fi".into(),
        }],
        ..Default::default()
    });
    let r = c.execute(clash.clone()).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Failed);
    assert!(a.store.subscriber(MAIJA).await.unwrap().is_some());

    let r = c
        .execute(request(
            "t-restrict",
            RequestKind::Restriction,
            email(MAIJA),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(records(&r), 1);
    assert!(a.store.subscriber(MAIJA).await.unwrap().unwrap().restricted);
    // A subscriber already as asked is found, and nothing is counted as changed.
    let again = |task: &str, kind: RequestKind, lift: bool| {
        let mut again = request(task, kind, email(MAIJA));
        again.parameters = Some(RequestParameters {
            lift_restriction: lift,
            ..Default::default()
        });
        again
    };
    let unchanged = |r: &ExecuteResponse, already: &str| {
        assert_eq!(outcome(r), ExecuteOutcome::Completed, "{r:?}");
        assert_eq!(records(r), 0, "{r:?}");
        let note = &r.evidence.as_ref().unwrap().note;
        assert!(note.ends_with(&format!("; 1 {already}")), "{note}");
    };
    let r = c
        .execute(again("t-restrict-again", RequestKind::Restriction, false))
        .await
        .unwrap()
        .into_inner();
    unchanged(&r, "already restricted");
    let lift = again("t-lift", RequestKind::Restriction, true);
    let r = c.execute(lift).await.unwrap().into_inner();
    assert_eq!(records(&r), 1);
    assert!(!a.store.subscriber(MAIJA).await.unwrap().unwrap().restricted);
    let r = c
        .execute(again("t-lift-again", RequestKind::Restriction, true))
        .await
        .unwrap()
        .into_inner();
    unchanged(&r, "not restricted");

    let r = c
        .execute(request("t-object", RequestKind::Objection, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed);
    assert_eq!(records(&r), 1);
    assert!(!a.store.subscriber(MAIJA).await.unwrap().unwrap().subscribed);
    let r = c
        .execute(again("t-object-again", RequestKind::Objection, false))
        .await
        .unwrap()
        .into_inner();
    unchanged(&r, "already unsubscribed");

    // Outside the newsletter's categories, or without an identity it can use.
    let mut other_scope = request("t-scope", RequestKind::Erasure, email(MAIJA));
    other_scope.scope = Some(Scope {
        data_categories: vec!["invoicing".into()],
    });
    let r = c.execute(other_scope).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::NotFound);
    let customer = SubjectIdentity {
        r#type: IdentityType::CustomerNumber as i32,
        encoding: IdentityEncoding::Raw as i32,
        value: "C-1001".into(),
        label: String::new(),
    };
    let r = c
        .execute(request("t-customer", RequestKind::Erasure, customer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Refused);
    assert!(!r.reason.is_empty());
    assert!(a.store.subscriber(MAIJA).await.unwrap().is_some());

    // A FAILED answer is not repeated: once its cause is gone (the other subscriber left),
    // the same task_id, an operator's retry, is done again.
    let matti = c
        .execute(request(
            "t-matti-leaves",
            RequestKind::Erasure,
            email("matti.virtanen@example.fi"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&matti), ExecuteOutcome::Completed, "{matti:?}");
    let r = c.execute(clash).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    assert!(a.store.subscriber(MAIJA).await.unwrap().is_none());
    assert!(a
        .store
        .subscriber("matti.virtanen@example.fi")
        .await
        .unwrap()
        .is_some_and(|s| s.name.starts_with("Maija")));
    a.stop().await;
}

#[tokio::test]
async fn rectifies_restricts_and_honours_objections_on_sqlite() {
    rectifies_restricts_and_honours_objections(Backend::Sqlite).await;
}

#[tokio::test]
async fn rectifies_restricts_and_honours_objections_on_postgres() {
    rectifies_restricts_and_honours_objections(Backend::Postgres).await;
}

/// A rectification of fields the newsletter does not hold is refused before anyone is
/// looked up: the same answer for a subscriber, for a subject with only kept billing
/// records, and for an address no one holds, naming what it can correct.
async fn a_rectification_of_fields_not_held_is_refused(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    bill_erik(&a.store).await;
    let mut c = a.client("processor");
    let r = c
        .execute(request("t-erase-erik", RequestKind::Erasure, email(ERIK)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    let fix = |task: &str, who: &str| {
        let mut fix = request(task, RequestKind::Rectification, email(who));
        fix.parameters = Some(RequestParameters {
            corrections: vec![
                FieldCorrection {
                    field: "Address".into(),
                    new_value: "Esimerkkikatu 1".into(),
                },
                FieldCorrection {
                    field: " iban ".into(),
                    new_value: "FI21 1234 5600 0007 85".into(),
                },
            ],
            ..Default::default()
        });
        fix
    };
    let before = a.store.subscriber(MAIJA).await.unwrap().unwrap();
    for (task, who) in [
        ("t-fix-maija", MAIJA),
        ("t-fix-erik", ERIK),
        ("t-fix-nobody", "nobody@example.com"),
    ] {
        let r = c.execute(fix(task, who)).await.unwrap().into_inner();
        assert_eq!(outcome(&r), ExecuteOutcome::Refused, "{who}: {r:?}");
        assert_eq!(
            r.reason,
            "the newsletter holds none of the corrected field(s) \"Address\", \"iban\"; \
             it can correct email, name, phone",
            "{who}"
        );
        assert_eq!(records(&r), 0, "{who}");
        // Answered once per task id, as any answer.
        let again = c.execute(fix(task, who)).await.unwrap().into_inner();
        assert_eq!(again, r, "{who}");
    }
    assert_eq!(a.store.subscriber(MAIJA).await.unwrap().unwrap(), before);
    a.stop().await;
}

#[tokio::test]
async fn a_rectification_of_fields_not_held_is_refused_on_sqlite() {
    a_rectification_of_fields_not_held_is_refused(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_rectification_of_fields_not_held_is_refused_on_postgres() {
    a_rectification_of_fields_not_held_is_refused(Backend::Postgres).await;
}

async fn delayed_erasure_is_accepted_then_confirmed(backend: Backend) {
    let Some(a) = Running::start_on(backend, 400).await else {
        return;
    };
    let mut c = a.client("processor");
    let r = c
        .execute(request("t-later", RequestKind::Erasure, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Accepted);
    assert!(!r.evidence.as_ref().unwrap().confirmed);
    // Accepted, not yet done.
    assert!(a.store.subscriber(MAIJA).await.unwrap().is_some());
    let asked = GetTaskStatusRequest {
        task_id: "t-later".into(),
    };
    let early = c.get_task_status(asked.clone()).await.unwrap().into_inner();
    assert_eq!(outcome(&early), ExecuteOutcome::Accepted);

    tokio::time::sleep(Duration::from_millis(600)).await;
    let done = c.get_task_status(asked.clone()).await.unwrap().into_inner();
    assert_eq!(outcome(&done), ExecuteOutcome::Completed, "{done:?}");
    assert_eq!(records(&done), 1);
    assert!(done.evidence.as_ref().unwrap().confirmed);
    assert!(a.store.subscriber(MAIJA).await.unwrap().is_none());
    // Stable afterwards, through either call.
    assert_eq!(c.get_task_status(asked).await.unwrap().into_inner(), done);
    let replay = c
        .execute(request("t-later", RequestKind::Erasure, email(MAIJA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, done);
    a.stop().await;
}

#[tokio::test]
async fn delayed_erasure_is_accepted_then_confirmed_on_sqlite() {
    delayed_erasure_is_accepted_then_confirmed(Backend::Sqlite).await;
}

#[tokio::test]
async fn delayed_erasure_is_accepted_then_confirmed_on_postgres() {
    delayed_erasure_is_accepted_then_confirmed(Backend::Postgres).await;
}

#[tokio::test]
async fn serves_health_checks() {
    let a = Running::start(0).await;
    let tls = a.pki.files("processor").client_config().unwrap();
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{}", a.port),
        Some(dev_identity("adapter", "example")),
        &tls,
    )
    .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "dsrelay.v1.SubprocessorAdapter".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    a.stop().await;
}

/// Another controller of the same processor, beside [`CONTROLLER`] (which owns the seed).
const GLOBEX: &str = "globex";
const PEKKA: &str = "pekka.nieminen@example.fi";

fn bulk(job_id: &str, controller: &str, operation: BulkOperation) -> ExecuteBulkRequest {
    ExecuteBulkRequest {
        job_id: job_id.into(),
        request_id: "ce-1".into(),
        controller: controller.into(),
        operation: operation as i32,
        ..Default::default()
    }
}

/// Gives globex two subscribers, Maija's address among them (so it exists for both
/// controllers), and the seeded Maija and Matti (the default controller's) deliveries.
async fn two_controllers(a: &Running) {
    a.store
        .add_subscriber(GLOBEX, MAIJA, "Maija M.")
        .await
        .unwrap();
    a.store
        .add_subscriber(GLOBEX, PEKKA, "Pekka Nieminen")
        .await
        .unwrap();
    assert_eq!(a.store.add_deliveries(MAIJA, 3).await.unwrap(), 3);
    assert_eq!(
        a.store
            .add_deliveries("matti.virtanen@example.fi", 2)
            .await
            .unwrap(),
        2
    );
}

async fn bulk_jobs_touch_only_their_controller(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    two_controllers(&a).await;
    let seeded = a.store.emails_of(CONTROLLER).await.unwrap();
    assert_eq!(seeded.len(), 4);
    let mut c = a.client("processor");

    // One subject's erasure for globex leaves the same address of the other controller.
    let mut erase = request("t-globex-maija", RequestKind::Erasure, email(MAIJA));
    erase.controller = GLOBEX.into();
    let r = c.execute(erase).await.unwrap().into_inner();
    assert_eq!((outcome(&r), records(&r)), (ExecuteOutcome::Completed, 1));
    assert_eq!(a.store.emails_of(GLOBEX).await.unwrap(), [PEKKA]);
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap(), seeded);

    // The default controller's export: all its subscribers and deliveries, nobody else's.
    let r = c
        .execute_bulk(bulk("ce-export", CONTROLLER, BulkOperation::Export))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Completed, "{r:?}");
    assert!(r.export_paged);
    let p = r.progress.unwrap();
    assert_eq!((p.subjects_done, p.subjects_total), (4, 4));
    assert_eq!((p.records_done, p.records_total), (9, 9));
    let (json, _) = all_pages(&mut c, "ce-export", 1024).await;
    let subscribers: Vec<&str> = json
        .iter()
        .filter(|r| r["record"] == "subscriber")
        .map(|r| r["email"].as_str().unwrap())
        .collect();
    assert_eq!(subscribers, seeded);
    let deliveries = json.iter().filter(|r| r["record"] == "delivery").count();
    assert_eq!(deliveries, 5);
    assert!(!json.iter().any(|r| r["email"] == PEKKA), "{json:?}");

    // Globex's contract end erases all of globex's data, in a few statements, and nothing
    // else.
    let r = c
        .execute_bulk(bulk("ce-erase", GLOBEX, BulkOperation::Erase))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Completed, "{r:?}");
    let erased: Vec<(&str, i64)> = r
        .erased
        .iter()
        .map(|e| (e.target.as_str(), e.count))
        .collect();
    assert_eq!(erased, [("subscribers", 1), ("deliveries", 0)]);
    assert!(a.store.emails_of(GLOBEX).await.unwrap().is_empty());
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap(), seeded);

    // Idempotent per job id; a job id reused for another job is refused.
    let again = c
        .execute_bulk(bulk("ce-erase", GLOBEX, BulkOperation::Erase))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, r);
    let status = c
        .get_bulk_status(GetBulkStatusRequest {
            job_id: "ce-erase".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status, r);
    let e = c
        .execute_bulk(bulk("ce-erase", CONTROLLER, BulkOperation::Erase))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap(), seeded);
    let e = c
        .execute_bulk(bulk("t-globex-maija", GLOBEX, BulkOperation::Erase))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = c
        .get_task_status(GetTaskStatusRequest {
            task_id: "ce-erase".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = c
        .get_bulk_status(GetBulkStatusRequest {
            job_id: "t-globex-maija".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    a.stop().await;
}

#[tokio::test]
async fn bulk_jobs_touch_only_their_controller_on_sqlite() {
    bulk_jobs_touch_only_their_controller(Backend::Sqlite).await;
}

#[tokio::test]
async fn bulk_jobs_touch_only_their_controller_on_postgres() {
    bulk_jobs_touch_only_their_controller(Backend::Postgres).await;
}

fn outcome_of(n: i32) -> ExecuteOutcome {
    ExecuteOutcome::try_from(n).unwrap()
}

#[tokio::test]
async fn invalid_bulk_jobs_name_their_fields() {
    let a = Running::start(0).await;
    let mut c = a.client("processor");
    let mut r = bulk("", "", BulkOperation::Unspecified);
    r.request_id = String::new();
    let e = c.execute_bulk(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    for field in ["job_id", "request_id", "controller", "operation"] {
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let mut r = bulk("j", CONTROLLER, BulkOperation::Export);
    r.retention_expired = true;
    let e = c.execute_bulk(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("retention_expired"), "{}", e.message());
    // Nothing was touched.
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap().len(), 4);
    let e = c
        .execute(ExecuteRequest {
            controller: "bad\ncontroller".into(),
            ..request("t", RequestKind::Erasure, email(MAIJA))
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("controller"), "{}", e.message());
    a.stop().await;
}

/// The processor's adapter connector against this adapter, over the same mutual TLS.
#[tokio::test]
async fn the_adapter_connector_scopes_tasks_and_ends_a_contract() {
    use dsrelay_connectors::adapter::AdapterConfig;
    use dsrelay_connectors::{
        BulkJob, BulkOp, ConnectorConfig, ExportSink, Outcome, Phase, ProgressReporter, Task,
    };
    let a = Running::start(0).await;
    two_controllers(&a).await;
    let seeded = a.store.emails_of(CONTROLLER).await.unwrap();
    let connector = dsrelay_connectors::build(&ConnectorConfig::Adapter(AdapterConfig {
        endpoint: format!("https://localhost:{}", a.port),
        identity: dev_identity("adapter", "example"),
        tls: a.pki.files("processor"),
        timeout_ms: 5_000,
        supported_kinds: None,
        controllers: Some(vec![CONTROLLER.into(), GLOBEX.into()]),
    }))
    .await
    .unwrap();
    assert_eq!(
        connector.scoped_controllers(),
        Some(vec![GLOBEX.to_string(), CONTROLLER.to_string()])
    );
    let task = |controller: &str| Task {
        task_id: format!("{controller}/r1/newsletter"),
        request_id: "r1".into(),
        controller: controller.into(),
        kind: RequestKind::Erasure,
        identities: vec![email(MAIJA)],
        categories: Vec::new(),
        parameters: RequestParameters::default(),
        due_at_ms: 2_000_000_000_000,
        now_ms: 1_700_000_000_000,
        phase: Phase::Start,
        interrupted: false,
        export: None,
    };
    // One subject: globex's Maija goes, the other controller's stays.
    let out = connector.run(&task(GLOBEX)).await.unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 1,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(a.store.emails_of(GLOBEX).await.unwrap(), [PEKKA]);
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap(), seeded);
    // A controller the configuration does not list is refused, nothing touched.
    let out = connector.run(&task("initech")).await.unwrap();
    assert!(
        matches!(&out, Outcome::Refused { reason } if reason.contains("initech")),
        "{out:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let job = |controller: &str, op: BulkOp| {
        let sink = ExportSink::new(dir.path().join(controller), Vec::new());
        let (progress, seen) = ProgressReporter::new();
        let job = BulkJob {
            job_id: format!("{controller}/ce1/newsletter/{op:?}"),
            request_id: "ce1".into(),
            controller: controller.into(),
            op,
            phase: Phase::Start,
            due_at_ms: 2_000_000_000_000,
            now_ms: 1_700_000_000_000,
            interrupted: false,
            recorded_progress: Default::default(),
            export: Some(sink),
            progress,
            returned: None,
            returned_since_ms: None,
        };
        (job, seen)
    };
    // The contract end's export: every record of the controller, fetched page by page.
    let (export, seen) = job(CONTROLLER, BulkOp::Export);
    export.export.as_ref().unwrap().reset().await.unwrap();
    let out = connector.run_bulk(&export).await.unwrap();
    let Outcome::Completed {
        files,
        records_affected,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert_eq!(*records_affected, 9);
    assert_eq!(files.len(), 1);
    let bytes = std::fs::read(dir.path().join(CONTROLLER).join("export.json")).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(records.len(), 9);
    assert!(!records.iter().any(|r| r["email"] == PEKKA));
    assert_eq!(seen.borrow().subjects_total, 4);
    assert_eq!(seen.borrow().records_done, 9);
    // The contract end's erasure: globex's data only, with counts for the certificate.
    let (erase, seen) = job(GLOBEX, BulkOp::Erase);
    let out = connector.run_bulk(&erase).await.unwrap();
    let Outcome::Completed {
        erased,
        records_affected,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert_eq!(*records_affected, 1);
    assert_eq!(erased[0].target, "subscribers");
    assert_eq!(seen.borrow().subjects_done, 1);
    assert!(a.store.emails_of(GLOBEX).await.unwrap().is_empty());
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap(), seeded);
    // Asking again under the handle answers the same.
    let confirm = BulkJob {
        phase: Phase::Confirm {
            handle: erase.job_id.clone(),
        },
        ..erase.clone()
    };
    assert_eq!(connector.run_bulk(&confirm).await.unwrap(), out);
    let (refused, _) = job("initech", BulkOp::Erase);
    let out = connector.run_bulk(&refused).await.unwrap();
    assert!(matches!(out, Outcome::Refused { .. }), "{out:?}");
    a.stop().await;
}

/// A contract end's erasure through the adapter connector whose first call was cut off after
/// the adapter answered (the processor had recorded the progress the answer carried, not the
/// answer): the progress lists by place what the job erased, and the resumed call, answered
/// the job's outcome again, adds nothing to it, so that the certificate, which lists the
/// recorded counts and the answer's summed, lists each record once. Resumed with nothing
/// recorded, the answer lists the whole job.
#[tokio::test]
async fn the_adapter_connector_lists_a_cut_off_erasure_by_place_once() {
    use dsrelay_connectors::adapter::AdapterConfig;
    use dsrelay_connectors::{
        sum_erased, BulkJob, BulkOp, ConnectorConfig, Outcome, Phase, ProgressReporter,
    };
    let a = Running::start(0).await;
    two_controllers(&a).await;
    let connector = dsrelay_connectors::build(&ConnectorConfig::Adapter(AdapterConfig {
        endpoint: format!("https://localhost:{}", a.port),
        identity: dev_identity("adapter", "example"),
        tls: a.pki.files("processor"),
        timeout_ms: 5_000,
        supported_kinds: None,
        controllers: Some(vec![CONTROLLER.into(), GLOBEX.into()]),
    }))
    .await
    .unwrap();
    let job = |recorded, interrupted| {
        let (progress, seen) = ProgressReporter::new();
        let job = BulkJob {
            job_id: format!("{CONTROLLER}/ce1/newsletter#erase"),
            request_id: "ce1".into(),
            controller: CONTROLLER.into(),
            op: BulkOp::Erase,
            phase: Phase::Start,
            due_at_ms: 2_000_000_000_000,
            now_ms: 1_700_000_000_000,
            interrupted,
            recorded_progress: recorded,
            export: None,
            progress,
            returned: None,
            returned_since_ms: None,
        };
        (job, seen)
    };
    let answered = |out: Outcome| match out {
        Outcome::Completed {
            records_affected,
            erased,
            ..
        } => (records_affected, erased),
        other => panic!("{other:?}"),
    };
    let (first, seen) = job(Default::default(), false);
    let (records, whole) = answered(connector.run_bulk(&first).await.unwrap());
    assert!(records > 0 && !whole.is_empty(), "{whole:?}");
    let recorded = seen.borrow().clone();
    assert_eq!(recorded.erased, whole);
    assert!(a.store.emails_of(CONTROLLER).await.unwrap().is_empty());

    let (resumed, seen) = job(recorded.clone(), true);
    let (again, erased) = answered(connector.run_bulk(&resumed).await.unwrap());
    assert_eq!(again, records);
    assert!(erased.is_empty(), "{erased:?}");
    assert_eq!(sum_erased(&recorded.erased, &erased), whole);
    assert_eq!(*seen.borrow(), recorded);

    let (unrecorded, _) = job(Default::default(), true);
    let (_, erased) = answered(connector.run_bulk(&unrecorded).await.unwrap());
    assert_eq!(erased, whole);
    a.stop().await;
}

/// A database from before subscribers had a controller keeps its subscribers (with their
/// ids) and their deliveries through migration 0004, and they go to the default controller.
async fn subscribers_from_before_controllers_keep_their_deliveries(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}/old.db", dir.path().display()),
        Backend::Postgres => match fresh_postgres_database().await {
            Some(url) => url,
            None => return,
        },
    };
    let db = dsrelay_runtime::store::Db::connect(&url).await.unwrap();
    let all = match backend {
        Backend::Sqlite => &dsrelay_example_adapter::store::SQLITE_MIGRATIONS,
        Backend::Postgres => &dsrelay_example_adapter::store::POSTGRES_MIGRATIONS,
    };
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(all.migrations[..3].to_vec()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&db.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO deliveries (subscriber_id, issue, sent_at, opened) VALUES \
         (1, 'Issue 1', 1, 1), (1, 'Issue 2', 2, 0), (2, 'Issue 1', 1, 0)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    db.pool.close().await;

    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.assign_unowned(CONTROLLER).await.unwrap(), (4, 0));
    assert_eq!(store.assign_unowned(CONTROLLER).await.unwrap(), (0, 0));
    let emails = store.emails_of(CONTROLLER).await.unwrap();
    assert_eq!(emails.len(), 4);
    assert_eq!(emails[0], MAIJA);
    let deliveries: Vec<(i64, String)> =
        sqlx::query_as("SELECT subscriber_id, issue FROM deliveries ORDER BY id")
            .fetch_all(&store.db().pool)
            .await
            .unwrap();
    assert_eq!(
        deliveries,
        [
            (1, "Issue 1".to_string()),
            (1, "Issue 2".into()),
            (2, "Issue 1".into())
        ]
    );
    // Deliveries still must belong to a subscriber, and an address may now be another
    // controller's subscriber too.
    assert!(sqlx::query(
        "INSERT INTO deliveries (subscriber_id, issue, sent_at, opened) VALUES (999, 'x', 1, 0)"
    )
    .execute(&store.db().pool)
    .await
    .is_err());
    store.add_subscriber(GLOBEX, MAIJA, "Maija").await.unwrap();
    assert!(store.add_subscriber(GLOBEX, MAIJA, "Maija").await.is_err());
}

#[tokio::test]
async fn subscribers_from_before_controllers_keep_their_deliveries_on_sqlite() {
    subscribers_from_before_controllers_keep_their_deliveries(Backend::Sqlite).await;
}

#[tokio::test]
async fn subscribers_from_before_controllers_keep_their_deliveries_on_postgres() {
    subscribers_from_before_controllers_keep_their_deliveries(Backend::Postgres).await;
}

const ERIK: &str = "erik.lindqvist@example.se";

/// Erik's paid edition: an invoice of 2015, released long ago, and this year's invoice and
/// OSS record of a sale to Sweden. Returns the ids of this year's two and their release
/// dates (the invoice's first).
async fn bill_erik(store: &Store) -> ([i64; 2], [i64; 2]) {
    bill_erik_at(store, dsrelay_runtime::store::now_ms()).await
}

/// [`bill_erik`] with this year's records booked at `now` (ms), for a test that compares
/// the booking times with its own.
async fn bill_erik_at(store: &Store, now: i64) -> ([i64; 2], [i64; 2]) {
    // 2015-03-01: kept through 2021.
    let old = 1_425_168_000_000;
    store
        .add_billing_record(ERIK, BillingKind::Invoice, "INV-2015-7", 990, old)
        .await
        .unwrap();
    let invoice = store
        .add_billing_record(ERIK, BillingKind::Invoice, "INV-NOW-1", 1290, now)
        .await
        .unwrap();
    let oss = store
        .add_billing_record(ERIK, BillingKind::OssSale, "INV-NOW-1", 1290, now)
        .await
        .unwrap();
    let dates = [
        BillingKind::Invoice.kept_until(now).unwrap(),
        BillingKind::OssSale.kept_until(now).unwrap(),
    ];
    assert!(dates[0] > now && dates[0] < dates[1], "{dates:?}");
    ([invoice, oss], dates)
}

fn retain_until(r: &ExecuteResponse) -> i64 {
    dsrelay_proto::millis_from_timestamp(r.retain_until.as_ref().expect("retain_until"))
}

/// The billing records left: (id, still attached to a subscriber).
async fn billing_left(store: &Store) -> Vec<(i64, bool)> {
    store
        .billing_records()
        .await
        .unwrap()
        .iter()
        .map(|r| (r.id, r.subscriber_id.is_some()))
        .collect()
}

async fn staged_retention_releases_billing_records_at_their_dates(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    let mut c = a.client("processor");
    assert_eq!(a.store.add_deliveries(ERIK, 2).await.unwrap(), 2);
    let ([invoice, oss], [date1, date2]) = bill_erik(&a.store).await;
    let erase = |task_id: &str| ExecuteRequest {
        request_id: "req-erik".into(),
        ..request(task_id, RequestKind::Erasure, email(ERIK))
    };

    // Everything but this year's records goes: the subscriber, his deliveries and the 2015
    // invoice. The two records stay, detached, until the invoice's date.
    let first = c.execute(erase("t-erik")).await.unwrap().into_inner();
    assert_eq!(outcome(&first), ExecuteOutcome::Retained, "{first:?}");
    assert_eq!(retain_until(&first), date1);
    assert!(first.legal_basis.contains("Kirjanpitolaki"), "{first:?}");
    assert!(first.legal_basis.contains("2006/112/EC"), "{first:?}");
    assert_eq!(records(&first), 2, "{first:?}");
    assert!(first.evidence.as_ref().unwrap().confirmed);
    assert!(a.store.subscriber(ERIK).await.unwrap().is_none());
    assert_eq!(
        billing_left(&a.store).await,
        [(invoice, false), (oss, false)]
    );
    let deliveries: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM deliveries")
        .fetch_one(&a.store.db().pool)
        .await
        .unwrap();
    assert_eq!(deliveries, 0);
    assert_eq!(
        c.execute(erase("t-erik")).await.unwrap().into_inner(),
        first
    );

    // The processor's run at the invoice's date (its own clock, long before the adapter's):
    // the invoice goes, the OSS record stays until its date.
    let at1 = format!("t-erik#retention-expired-{date1}");
    let second = c.execute(erase(&at1)).await.unwrap().into_inner();
    assert_eq!(outcome(&second), ExecuteOutcome::Retained, "{second:?}");
    assert_eq!(retain_until(&second), date2);
    assert!(!second.legal_basis.contains("Kirjanpitolaki"), "{second:?}");
    assert!(second.legal_basis.contains("2006/112/EC"), "{second:?}");
    assert_eq!(records(&second), 1);
    assert_eq!(billing_left(&a.store).await, [(oss, false)]);
    assert_eq!(c.execute(erase(&at1)).await.unwrap().into_inner(), second);

    // A date the adapter never gave, or another task's run, is no retention run of this
    // erasure but an erasure like the first, judged by the adapter's clock: it finds the
    // record kept for Erik, releases nothing, and answers RETAINED until the record's date.
    for task_id in [
        format!("t-erik#retention-expired-{}", date2 + 1),
        format!("t-other#retention-expired-{date2}"),
    ] {
        let r = c.execute(erase(&task_id)).await.unwrap().into_inner();
        assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{task_id}: {r:?}");
        assert_eq!(
            (retain_until(&r), records(&r)),
            (date2, 0),
            "{task_id}: {r:?}"
        );
    }
    assert_eq!(billing_left(&a.store).await, [(oss, false)]);

    // At the OSS record's date nothing is kept any more.
    let last = c
        .execute(erase(&format!("t-erik#retention-expired-{date2}")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&last), ExecuteOutcome::Completed, "{last:?}");
    assert_eq!(records(&last), 1);
    assert!(last.evidence.as_ref().unwrap().confirmed);
    assert!(billing_left(&a.store).await.is_empty());
    // Earlier answers are kept as given; the other subscribers are untouched.
    assert_eq!(c.execute(erase(&at1)).await.unwrap().into_inner(), second);
    assert_eq!(a.store.subscribers().await.unwrap().len(), 3);
    a.stop().await;
}

#[tokio::test]
async fn staged_retention_releases_billing_records_at_their_dates_on_sqlite() {
    staged_retention_releases_billing_records_at_their_dates(Backend::Sqlite).await;
}

#[tokio::test]
async fn staged_retention_releases_billing_records_at_their_dates_on_postgres() {
    staged_retention_releases_billing_records_at_their_dates(Backend::Postgres).await;
}

/// Polls GetTaskStatus (10 s at most) until `task_id` is no longer ACCEPTED.
async fn settled(c: &mut SubprocessorAdapterClient<Channel>, task_id: &str) -> ExecuteResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .get_task_status(GetTaskStatusRequest {
                task_id: task_id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        if outcome(&r) != ExecuteOutcome::Accepted {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepted: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With a confirmation delay the erasure is accepted and RETAINED once carried out; the
/// retention run at its date is answered at once.
async fn a_delayed_erasure_retains_and_its_retention_run_answers_at_once(backend: Backend) {
    let Some(a) = Running::start_on(backend, 200).await else {
        return;
    };
    let mut c = a.client("processor");
    let ([_, oss], [date1, date2]) = bill_erik(&a.store).await;
    let accepted = c
        .execute(request("t-late", RequestKind::Erasure, email(ERIK)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&accepted), ExecuteOutcome::Accepted);
    let done = settled(&mut c, "t-late").await;
    assert_eq!(outcome(&done), ExecuteOutcome::Retained, "{done:?}");
    assert_eq!(retain_until(&done), date1);
    assert!(
        done.evidence
            .as_ref()
            .unwrap()
            .note
            .contains("accepted earlier"),
        "{done:?}"
    );
    assert!(a.store.subscriber(ERIK).await.unwrap().is_none());

    let run = c
        .execute(ExecuteRequest {
            request_id: "req-t-late".into(),
            ..request(
                &format!("t-late#retention-expired-{date1}"),
                RequestKind::Erasure,
                email(ERIK),
            )
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&run), ExecuteOutcome::Retained, "{run:?}");
    assert_eq!(retain_until(&run), date2);
    assert_eq!(billing_left(&a.store).await, [(oss, false)]);
    a.stop().await;
}

#[tokio::test]
async fn a_delayed_erasure_retains_and_its_retention_run_answers_at_once_on_sqlite() {
    a_delayed_erasure_retains_and_its_retention_run_answers_at_once(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_delayed_erasure_retains_and_its_retention_run_answers_at_once_on_postgres() {
    a_delayed_erasure_retains_and_its_retention_run_answers_at_once(Backend::Postgres).await;
}

/// A contract end's erasure keeps the controller's billing records the same way, and its
/// retention runs release them in stages.
async fn a_contract_end_retains_billing_records_in_stages(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    two_controllers(&a).await;
    let now = dsrelay_runtime::store::now_ms();
    let mut pekka = Vec::new();
    for kind in [BillingKind::Invoice, BillingKind::OssSale] {
        let id = a
            .store
            .add_billing_record(PEKKA, kind, "INV-G-1", 1290, now)
            .await
            .unwrap();
        pekka.push((id, kind.kept_until(now).unwrap()));
    }
    let [(invoice, date1), (oss, date2)] = pekka[..] else {
        unreachable!()
    };
    // The default controller's billing is not the contract's.
    let erik = a
        .store
        .add_billing_record(ERIK, BillingKind::Invoice, "INV-C-1", 990, now)
        .await
        .unwrap();
    let mut c = a.client("processor");

    let r = c
        .execute_bulk(bulk("ce-g", GLOBEX, BulkOperation::Erase))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Retained, "{r:?}");
    let until = |r: &ExecuteBulkResponse| {
        dsrelay_proto::millis_from_timestamp(r.retain_until.as_ref().expect("retain_until"))
    };
    assert_eq!(until(&r), date1);
    assert!(r.legal_basis.contains("Kirjanpitolaki"), "{r:?}");
    let erased = |r: &ExecuteBulkResponse| -> Vec<(String, i64)> {
        r.erased
            .iter()
            .map(|e| (e.target.clone(), e.count))
            .collect()
    };
    assert_eq!(
        erased(&r),
        [
            ("subscribers".to_string(), 2),
            ("deliveries".into(), 0),
            ("billing records".into(), 0)
        ]
    );
    // Handled, as the SQL holder counts: the two subscribers and the two billing records it
    // keeps.
    let counts = |r: &ExecuteBulkResponse| {
        let p = r.progress.clone().expect("progress");
        (
            p.subjects_done,
            p.subjects_total,
            p.records_done,
            p.records_total,
        )
    };
    assert_eq!(counts(&r), (2, 2, 4, 4), "{r:?}");
    assert!(a.store.emails_of(GLOBEX).await.unwrap().is_empty());
    assert_eq!(
        billing_left(&a.store).await,
        [(invoice, false), (oss, false), (erik, true)]
    );

    let run = |date: i64| ExecuteBulkRequest {
        retention_expired: true,
        ..bulk(
            &format!("ce-g#retention-expired-{date}"),
            GLOBEX,
            BulkOperation::Erase,
        )
    };
    let r = c.execute_bulk(run(date1)).await.unwrap().into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Retained, "{r:?}");
    assert_eq!(until(&r), date2);
    assert!(!r.legal_basis.contains("Kirjanpitolaki"), "{r:?}");
    assert_eq!(erased(&r)[2], ("billing records".to_string(), 1));
    // The one released and the one still kept, billed to one buyer: one subject.
    assert_eq!(counts(&r), (1, 1, 2, 2), "{r:?}");
    assert_eq!(billing_left(&a.store).await, [(oss, false), (erik, true)]);
    let r = c.execute_bulk(run(date2)).await.unwrap().into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Completed, "{r:?}");
    assert_eq!(erased(&r)[2], ("billing records".to_string(), 1));
    assert_eq!(billing_left(&a.store).await, [(erik, true)]);
    a.stop().await;
}

#[tokio::test]
async fn a_contract_end_retains_billing_records_in_stages_on_sqlite() {
    a_contract_end_retains_billing_records_in_stages(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_contract_end_retains_billing_records_in_stages_on_postgres() {
    a_contract_end_retains_billing_records_in_stages(Backend::Postgres).await;
}

/// The processor's adapter connector runs the stages under its own keys, with its clock at
/// each date (far ahead of the adapter's), and never finds a date already past.
#[tokio::test]
async fn the_adapter_connector_runs_each_stage_at_its_date() {
    use dsrelay_connectors::adapter::AdapterConfig;
    use dsrelay_connectors::{ConnectorConfig, Outcome, Phase, Task};
    let a = Running::start(0).await;
    let ([_, oss], [date1, date2]) = bill_erik(&a.store).await;
    let connector = dsrelay_connectors::build(&ConnectorConfig::Adapter(AdapterConfig {
        endpoint: format!("https://localhost:{}", a.port),
        identity: dev_identity("adapter", "example"),
        tls: a.pki.files("processor"),
        timeout_ms: 5_000,
        supported_kinds: None,
        controllers: None,
    }))
    .await
    .unwrap();
    let task = |phase: Phase, now_ms: i64| Task {
        task_id: format!("{CONTROLLER}/r1/newsletter"),
        request_id: "r1".into(),
        controller: CONTROLLER.into(),
        kind: RequestKind::Erasure,
        identities: vec![email(ERIK)],
        categories: Vec::new(),
        parameters: RequestParameters::default(),
        due_at_ms: dsrelay_runtime::store::now_ms() + 30 * 86_400_000,
        now_ms,
        phase,
        interrupted: false,
        export: None,
    };
    let now = dsrelay_runtime::store::now_ms();
    let out = connector.run(&task(Phase::Start, now)).await.unwrap();
    assert!(
        matches!(out, Outcome::Retained { until_ms, .. } if until_ms == date1),
        "{out:?}"
    );
    let out = connector
        .run(&task(
            Phase::RetentionExpired { until_ms: date1 },
            date1 + 1000,
        ))
        .await
        .unwrap();
    assert!(
        matches!(out, Outcome::Retained { until_ms, .. } if until_ms == date2),
        "{out:?}"
    );
    assert_eq!(billing_left(&a.store).await, [(oss, false)]);
    let out = connector
        .run(&task(
            Phase::RetentionExpired { until_ms: date2 },
            date2 + 1000,
        ))
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 1,
                ..
            }
        ),
        "{out:?}"
    );
    assert!(billing_left(&a.store).await.is_empty());
    a.stop().await;
}

/// The processor's adapter connector for `a`, unscoped.
async fn connector_for(a: &Running) -> std::sync::Arc<dyn dsrelay_connectors::Connector> {
    use dsrelay_connectors::adapter::AdapterConfig;
    dsrelay_connectors::build(&dsrelay_connectors::ConnectorConfig::Adapter(
        AdapterConfig {
            endpoint: format!("https://localhost:{}", a.port),
            identity: dev_identity("adapter", "example"),
            tls: a.pki.files("processor"),
            timeout_ms: 5_000,
            supported_kinds: None,
            controllers: None,
        },
    ))
    .await
    .unwrap()
}

/// The billing records of an export, in its order.
fn billing_in(json: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    json.iter()
        .filter(|r| r["record"] == "billing_record")
        .collect()
}

/// (kind, reference, the subscriber's address or null) of each billing record of an export.
fn billing_keys(json: &[serde_json::Value]) -> Vec<(String, String, serde_json::Value)> {
    billing_in(json)
        .iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap().to_string();
            (text("kind"), text("reference"), r["email"].clone())
        })
        .collect()
}

/// A subject's export holds the billing records linked to them, after their deliveries, and
/// no other subscriber's; with a small page size pages break inside the billing records.
async fn a_subjects_export_holds_their_billing_records(backend: Backend) {
    use dsrelay_connectors::{ExportSink, Outcome, Phase, Task};
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    assert_eq!(a.store.add_deliveries(ERIK, 2).await.unwrap(), 2);
    let now = dsrelay_runtime::store::now_ms();
    let old = 1_425_168_000_000;
    // Booked at this `now`: read again inside, the clock may have moved on a millisecond.
    bill_erik_at(&a.store, now).await;
    // Maija's record lies between Erik's by id, so the keyset reads pass over it.
    a.store
        .add_billing_record(MAIJA, BillingKind::Invoice, "INV-M-1", 500, now)
        .await
        .unwrap();
    let mut expected = vec![
        (BillingKind::Invoice, "INV-2015-7".to_string(), old),
        (BillingKind::Invoice, "INV-NOW-1".into(), now),
        (BillingKind::OssSale, "INV-NOW-1".into(), now),
    ];
    for i in 2..=7 {
        let reference = format!("INV-NOW-{i}");
        a.store
            .add_billing_record(ERIK, BillingKind::Invoice, &reference, 1290, now)
            .await
            .unwrap();
        expected.push((BillingKind::Invoice, reference, now));
    }
    let mut c = a.client("processor");
    let r = c
        .execute(request("t-erik", RequestKind::ReturnOfData, email(ERIK)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    let note = &r.evidence.as_ref().unwrap().note;
    assert!(
        note.contains("2 delivery record(s) and 9 billing record(s)"),
        "{note}"
    );

    let (json, pages) = all_pages(&mut c, "t-erik", 1024).await;
    assert_eq!(json[0]["record"], "subscriber");
    assert_eq!(json[0]["email"], ERIK);
    assert!(
        json[1..3].iter().all(|r| r["record"] == "delivery"),
        "{json:?}"
    );
    let billing = billing_in(&json);
    assert_eq!(json.len(), 3 + billing.len(), "billing records come last");
    let got: Vec<(&str, &str, i64)> = billing
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap(),
                r["reference"].as_str().unwrap(),
                r["booked_at_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(&str, &str, i64)> = expected
        .iter()
        .map(|(k, reference, at)| (k.as_str(), reference.as_str(), *at))
        .collect();
    assert_eq!(got, want, "exactly Erik's records, in order, none twice");
    for (r, (kind, _, at)) in billing.iter().zip(&expected) {
        assert_eq!(r["email"], ERIK);
        assert_eq!(r["buyer"], format!("Erik Lindqvist <{ERIK}>"));
        assert_eq!(r["kept_until_ms"], kind.kept_until(*at).unwrap());
        assert!(r["amount_cents"].as_i64().unwrap() > 0, "{r}");
    }
    // The billing records alone fill more than a page: a page boundary lies among them.
    let billing_bytes: usize = billing
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap().len())
        .sum();
    assert!(billing_bytes > 1024, "{billing_bytes} bytes");
    assert!(pages >= 3, "{pages} pages");
    // One page holds them all the same.
    assert_eq!(all_pages(&mut c, "t-erik", 0).await.0, json);
    assert!(
        !json.iter().any(|r| r["reference"] == "INV-M-1"),
        "{json:?}"
    );

    // Maija's export has her record only; a transfer of Erik's data the same as his return.
    c.execute(request("t-maija", RequestKind::ReturnOfData, email(MAIJA)))
        .await
        .unwrap();
    let (maija, _) = all_pages(&mut c, "t-maija", 1024).await;
    assert_eq!(
        billing_keys(&maija),
        [("invoice".into(), "INV-M-1".into(), MAIJA.into())]
    );
    let mut transfer = request("t-erik-transfer", RequestKind::Transfer, email(ERIK));
    transfer.parameters = Some(RequestParameters {
        transfer_recipient: "spiffe://dsrelay.dev/partner/crm".into(),
        ..Default::default()
    });
    c.execute(transfer).await.unwrap();
    assert_eq!(all_pages(&mut c, "t-erik-transfer", 1024).await.0, json);

    // The processor's connector writes them into the task's export.json as they are.
    let connector = connector_for(&a).await;
    let dir = tempfile::tempdir().unwrap();
    let task = Task {
        task_id: format!("{CONTROLLER}/r1/newsletter"),
        request_id: "r1".into(),
        controller: CONTROLLER.into(),
        kind: RequestKind::ReturnOfData,
        identities: vec![email(ERIK)],
        categories: Vec::new(),
        parameters: RequestParameters::default(),
        due_at_ms: now + 30 * 86_400_000,
        now_ms: now,
        phase: Phase::Start,
        interrupted: false,
        export: Some(ExportSink::new(dir.path().join("erik"), Vec::new())),
    };
    task.export.as_ref().unwrap().reset().await.unwrap();
    let out = connector.run(&task).await.unwrap();
    let Outcome::Completed { files, .. } = &out else {
        panic!("{out:?}");
    };
    assert_eq!(files.len(), 1);
    let bytes = std::fs::read(dir.path().join("erik").join("export.json")).unwrap();
    let written: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(written, json);
    a.stop().await;
}

#[tokio::test]
async fn a_subjects_export_holds_their_billing_records_on_sqlite() {
    a_subjects_export_holds_their_billing_records(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_subjects_export_holds_their_billing_records_on_postgres() {
    a_subjects_export_holds_their_billing_records(Backend::Postgres).await;
}

/// A contract end's export holds all of the controller's billing records, those an erasure
/// detached and kept included (still the controller's data, held for it), and none of
/// another controller's; the connector's file and count hold them too.
async fn a_contract_end_export_holds_the_controllers_billing_records(backend: Backend) {
    use dsrelay_connectors::{BulkJob, BulkOp, ExportSink, Outcome, Phase, ProgressReporter};
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    two_controllers(&a).await;
    let now = dsrelay_runtime::store::now_ms();
    bill_erik(&a.store).await;
    a.store
        .add_billing_record(MAIJA, BillingKind::Invoice, "INV-M-1", 500, now)
        .await
        .unwrap();
    a.store
        .add_billing_record(PEKKA, BillingKind::OssSale, "INV-G-1", 1290, now)
        .await
        .unwrap();
    let mut c = a.client("processor");
    // Erik's erasure deletes his 2015 invoice and keeps this year's two, detached.
    let r = c
        .execute(request("t-erik", RequestKind::Erasure, email(ERIK)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");

    let r = c
        .execute_bulk(bulk("ce-export", CONTROLLER, BulkOperation::Export))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Completed, "{r:?}");
    assert!(r.note.contains("and 3 billing record(s)"), "{}", r.note);
    // Three subscribers, five deliveries, three billing records.
    let p = r.progress.unwrap();
    assert_eq!((p.records_done, p.records_total), (11, 11));
    let (json, pages) = all_pages(&mut c, "ce-export", 1024).await;
    assert!(pages >= 2, "{pages} pages");
    assert_eq!(json.len(), 11);
    let null = serde_json::Value::Null;
    assert_eq!(
        billing_keys(&json),
        [
            ("invoice".into(), "INV-NOW-1".into(), null.clone()),
            ("vat-oss-sale".into(), "INV-NOW-1".into(), null),
            ("invoice".into(), "INV-M-1".into(), MAIJA.into()),
        ]
    );
    // A detached record still names the buyer as billed.
    assert_eq!(
        billing_in(&json)[0]["buyer"],
        format!("Erik Lindqvist <{ERIK}>")
    );
    assert!(
        !json.iter().any(|r| r["reference"] == "INV-G-1"),
        "{json:?}"
    );

    let r = c
        .execute_bulk(bulk("ce-export-g", GLOBEX, BulkOperation::Export))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.progress.unwrap().records_done, 3);
    let (globex, _) = all_pages(&mut c, "ce-export-g", 0).await;
    assert_eq!(
        billing_keys(&globex),
        [("vat-oss-sale".into(), "INV-G-1".into(), PEKKA.into())]
    );

    // Through the connector: one export.json of every record, its count the same.
    let connector = connector_for(&a).await;
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join(CONTROLLER), Vec::new());
    sink.reset().await.unwrap();
    let (progress, _) = ProgressReporter::new();
    let job = BulkJob {
        job_id: format!("{CONTROLLER}/ce1/newsletter/export"),
        request_id: "ce1".into(),
        controller: CONTROLLER.into(),
        op: BulkOp::Export,
        phase: Phase::Start,
        due_at_ms: now + 30 * 86_400_000,
        now_ms: now,
        interrupted: false,
        recorded_progress: Default::default(),
        export: Some(sink),
        progress,
        returned: None,
        returned_since_ms: None,
    };
    let out = connector.run_bulk(&job).await.unwrap();
    let Outcome::Completed {
        files,
        records_affected,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert_eq!((files.len(), *records_affected), (1, 11));
    let bytes = std::fs::read(dir.path().join(CONTROLLER).join("export.json")).unwrap();
    let written: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(written, json);
    a.stop().await;
}

#[tokio::test]
async fn a_contract_end_export_holds_the_controllers_billing_records_on_sqlite() {
    a_contract_end_export_holds_the_controllers_billing_records(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_contract_end_export_holds_the_controllers_billing_records_on_postgres() {
    a_contract_end_export_holds_the_controllers_billing_records(Backend::Postgres).await;
}

/// The erasure after a return, through the processor's adapter connector: a subscriber who
/// signed up after the export makes it FAILED_PRECONDITION (a permanent error naming how
/// many arrived), with nothing erased and nothing stored under its job id; once only what
/// was returned is held (the newcomer gone again), the same job id erases as before.
async fn an_erasure_after_a_return_refuses_what_arrived_since(backend: Backend) {
    use dsrelay_connectors::{BulkJob, BulkOp, ExportSink, Outcome, Phase, ProgressReporter};
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    assert_eq!(a.store.add_deliveries(MAIJA, 2).await.unwrap(), 2);
    let connector = connector_for(&a).await;
    let dir = tempfile::tempdir().unwrap();
    let job = |op: BulkOp| {
        let (progress, seen) = ProgressReporter::new();
        let job = BulkJob {
            job_id: format!(
                "{CONTROLLER}/ce1/newsletter{}",
                match op {
                    BulkOp::Export => "",
                    BulkOp::Erase => "#erase",
                }
            ),
            request_id: "ce1".into(),
            controller: CONTROLLER.into(),
            op,
            phase: Phase::Start,
            due_at_ms: 2_000_000_000_000,
            now_ms: 1_700_000_000_000,
            interrupted: false,
            recorded_progress: Default::default(),
            export: Some(ExportSink::new(dir.path().join("export"), Vec::new())),
            progress,
            returned: None,
            returned_since_ms: None,
        };
        (job, seen)
    };
    let (export, seen) = job(BulkOp::Export);
    export.export.as_ref().unwrap().reset().await.unwrap();
    let out = connector.run_bulk(&export).await.unwrap();
    assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
    let returned = seen.borrow().clone();
    let seeded = a.store.emails_of(CONTROLLER).await.unwrap();
    assert_eq!(returned.subjects_done, seeded.len() as u64);

    a.store
        .add_subscriber(CONTROLLER, PEKKA, "Pekka Nieminen")
        .await
        .unwrap();
    let (erase, _) = job(BulkOp::Erase);
    let erase = BulkJob {
        returned: Some(returned),
        export: None,
        ..erase
    };
    let err = connector.run_bulk(&erase).await.unwrap_err();
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(text.contains("FailedPrecondition"), "{text}");
    assert!(
        text.contains(
            "1 record(s) of controller payroll arrived after the contract end's export and \
             were never returned: 1 subscriber(s), 0 delivery record(s)"
        ),
        "{text}"
    );
    assert!(text.contains("nothing was erased"), "{text}");
    let mut held = seeded.clone();
    held.push(PEKKA.to_string());
    held.sort();
    let mut now_held = a.store.emails_of(CONTROLLER).await.unwrap();
    now_held.sort();
    assert_eq!(now_held, held);
    assert_eq!(
        a.client("processor")
            .get_bulk_status(GetBulkStatusRequest {
                job_id: erase.job_id.clone(),
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Without the newcomer, what is held is what was returned: erased as before.
    let mut tx = a.store.db().pool.begin().await.unwrap();
    sqlx::query("DELETE FROM subscribers WHERE email = $1")
        .bind(PEKKA)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let out = connector.run_bulk(&erase).await.unwrap();
    let Outcome::Completed { erased, .. } = &out else {
        panic!("{out:?}");
    };
    assert_eq!(erased[0].count, seeded.len() as i64, "{out:?}");
    assert!(a.store.emails_of(CONTROLLER).await.unwrap().is_empty());
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_after_a_return_refuses_what_arrived_since_on_sqlite() {
    an_erasure_after_a_return_refuses_what_arrived_since(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_after_a_return_refuses_what_arrived_since_on_postgres() {
    an_erasure_after_a_return_refuses_what_arrived_since(Backend::Postgres).await;
}

const MATTI: &str = "matti.virtanen@example.fi";
const ANNA: &str = "anna.korhonen@example.com";
const LIISA: &str = "liisa.laine@example.fi";

/// The contract end's EXPORT under `key` for [`CONTROLLER`], answered COMPLETED; its progress
/// (what the processor sends back as `returned`).
async fn bulk_export(
    c: &mut SubprocessorAdapterClient<Channel>,
    key: &str,
) -> dsrelay_proto::v1::BulkJobProgress {
    let r = c
        .execute_bulk(bulk(key, CONTROLLER, BulkOperation::Export))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Completed, "{r:?}");
    r.progress.expect("progress")
}

/// The ERASE that follows the return of the export `key`, under `<key>#erase`.
async fn erase_after_return(
    c: &mut SubprocessorAdapterClient<Channel>,
    key: &str,
    returned: dsrelay_proto::v1::BulkJobProgress,
) -> Result<ExecuteBulkResponse, tonic::Status> {
    c.execute_bulk(ExecuteBulkRequest {
        returned: Some(returned),
        ..bulk(&format!("{key}#erase"), CONTROLLER, BulkOperation::Erase)
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Runs `sql` (binding `email`) on the adapter's database, as the newsletter's own code
/// would change its rows.
async fn exec(store: &Store, sql: &str, email: &str) {
    sqlx::query(sql)
        .bind(email)
        .execute(&store.db().pool)
        .await
        .unwrap();
}

/// An arrival since the export offset by a deletion, in each table (a subscriber erased and
/// another signed up, two deliveries deleted and one sent, one billing record added): the
/// totals are those returned, yet the erasure is refused with how many arrived where, and
/// nothing is erased.
async fn an_arrival_offset_by_a_deletion_is_refused(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    assert_eq!(a.store.add_deliveries(MAIJA, 2).await.unwrap(), 2);
    let mut c = a.client("processor");
    let returned = bulk_export(&mut c, "ce1/newsletter").await;
    assert_eq!((returned.subjects_done, returned.records_done), (4, 6));

    let r = c
        .execute(request("t-anna", RequestKind::Erasure, email(ANNA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    a.store
        .add_subscriber(CONTROLLER, PEKKA, "Pekka Nieminen")
        .await
        .unwrap();
    exec(
        &a.store,
        "DELETE FROM deliveries WHERE subscriber_id = \
         (SELECT id FROM subscribers WHERE email = $1)",
        MAIJA,
    )
    .await;
    assert_eq!(a.store.add_deliveries(MATTI, 1).await.unwrap(), 1);
    let now = dsrelay_runtime::store::now_ms();
    a.store
        .add_billing_record(MATTI, BillingKind::Invoice, "INV-T-1", 100, now)
        .await
        .unwrap();
    let before = (
        a.store.emails_of(CONTROLLER).await.unwrap(),
        a.store.billing_records().await.unwrap().len(),
    );
    assert_eq!(before.0.len(), 4);

    let err = erase_after_return(&mut c, "ce1/newsletter", returned.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(
            "3 record(s) of controller payroll arrived after the contract end's export and \
             were never returned: 1 subscriber(s), 1 delivery record(s) and 1 billing \
             record(s); nothing was erased"
        ),
        "{}",
        err.message()
    );
    let after = (
        a.store.emails_of(CONTROLLER).await.unwrap(),
        a.store.billing_records().await.unwrap().len(),
    );
    assert_eq!(after, before);
    let status = c
        .get_bulk_status(GetBulkStatusRequest {
            job_id: "ce1/newsletter#erase".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    a.stop().await;
}

#[tokio::test]
async fn an_arrival_offset_by_a_deletion_is_refused_on_sqlite() {
    an_arrival_offset_by_a_deletion_is_refused(Backend::Sqlite).await;
}

#[tokio::test]
async fn an_arrival_offset_by_a_deletion_is_refused_on_postgres() {
    an_arrival_offset_by_a_deletion_is_refused(Backend::Postgres).await;
}

/// Rows added after the export was counted but before its pages are read are not in the
/// pages, which hold exactly what the export counted; so the erasure refuses them and only
/// them (never a row that was returned), and erases once they are gone.
async fn a_contract_end_export_returns_what_it_counted(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    assert_eq!(a.store.add_deliveries(MAIJA, 2).await.unwrap(), 2);
    let mut c = a.client("processor");
    let returned = bulk_export(&mut c, "ce1/newsletter").await;
    assert_eq!((returned.subjects_done, returned.records_done), (4, 6));
    a.store
        .add_subscriber(CONTROLLER, PEKKA, "Pekka Nieminen")
        .await
        .unwrap();
    assert_eq!(a.store.add_deliveries(MAIJA, 1).await.unwrap(), 1);

    let (json, _) = all_pages(&mut c, "ce1/newsletter", 1024).await;
    assert_eq!(json.len() as u64, returned.records_done, "{json:?}");
    assert!(!json.iter().any(|r| r["email"] == PEKKA), "{json:?}");
    // Maija's deliveries were issues 1 and 2; the one sent after the count is issue 1 again.
    let issue_1 = json
        .iter()
        .filter(|r| r["issue"] == "Issue 1" && r["email"] == MAIJA)
        .count();
    assert_eq!(issue_1, 1, "{json:?}");

    let err = erase_after_return(&mut c, "ce1/newsletter", returned.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(
            "2 record(s) of controller payroll arrived after the contract end's export and \
             were never returned: 1 subscriber(s), 1 delivery record(s) and 0 billing \
             record(s)"
        ),
        "{}",
        err.message()
    );
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap().len(), 5);

    exec(&a.store, "DELETE FROM subscribers WHERE email = $1", PEKKA).await;
    exec(
        &a.store,
        "DELETE FROM deliveries WHERE id = (SELECT MAX(d.id) FROM deliveries d \
         JOIN subscribers s ON s.id = d.subscriber_id WHERE s.email = $1)",
        MAIJA,
    )
    .await;
    let r = erase_after_return(&mut c, "ce1/newsletter", returned)
        .await
        .unwrap();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Completed, "{r:?}");
    assert!(a.store.emails_of(CONTROLLER).await.unwrap().is_empty());
    a.stop().await;
}

#[tokio::test]
async fn a_contract_end_export_returns_what_it_counted_on_sqlite() {
    a_contract_end_export_returns_what_it_counted(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_contract_end_export_returns_what_it_counted_on_postgres() {
    a_contract_end_export_returns_what_it_counted(Backend::Postgres).await;
}

/// With no arrival since the export the erasure erases everything returned, less what was
/// deleted since: a row changed since (a corrected name) and another controller's new
/// subscriber are no arrivals of this one, and the other controller keeps its data.
async fn without_arrivals_the_erasure_erases_what_was_returned(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    assert_eq!(a.store.add_deliveries(MAIJA, 2).await.unwrap(), 2);
    let mut c = a.client("processor");
    let returned = bulk_export(&mut c, "ce1/newsletter").await;
    assert_eq!((returned.subjects_done, returned.records_done), (4, 6));

    let r = c
        .execute(request("t-anna", RequestKind::Erasure, email(ANNA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    let mut rectify = request("t-matti", RequestKind::Rectification, email(MATTI));
    rectify.parameters = Some(RequestParameters {
        corrections: vec![FieldCorrection {
            field: "name".into(),
            new_value: "Matti V.".into(),
        }],
        ..Default::default()
    });
    let r = c.execute(rectify).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    a.store
        .add_subscriber(GLOBEX, PEKKA, "Pekka Nieminen")
        .await
        .unwrap();

    let r = erase_after_return(&mut c, "ce1/newsletter", returned)
        .await
        .unwrap();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Completed, "{r:?}");
    let erased: Vec<(&str, i64)> = r
        .erased
        .iter()
        .map(|e| (e.target.as_str(), e.count))
        .collect();
    assert_eq!(erased, [("subscribers", 3), ("deliveries", 2)], "{r:?}");
    assert!(
        r.note
            .contains("deleted 3 subscriber(s) and 2 delivery record(s) of controller payroll"),
        "{}",
        r.note
    );
    assert!(a.store.emails_of(CONTROLLER).await.unwrap().is_empty());
    assert_eq!(a.store.emails_of(GLOBEX).await.unwrap(), [PEKKA]);
    a.stop().await;
}

#[tokio::test]
async fn without_arrivals_the_erasure_erases_what_was_returned_on_sqlite() {
    without_arrivals_the_erasure_erases_what_was_returned(Backend::Sqlite).await;
}

#[tokio::test]
async fn without_arrivals_the_erasure_erases_what_was_returned_on_postgres() {
    without_arrivals_the_erasure_erases_what_was_returned(Backend::Postgres).await;
}

/// An export the adapter kept no arrival clock for (one from before migration 0007) leaves
/// the erasure after it to compare totals, as before: more held than returned is refused.
#[tokio::test]
async fn an_erasure_after_an_older_export_compares_totals() {
    let a = Running::start(0).await;
    let mut c = a.client("processor");
    let returned = bulk_export(&mut c, "ce1/newsletter").await;
    exec(
        &a.store,
        "UPDATE adapter_tasks SET arrived_upto = NULL WHERE task_id = $1",
        "ce1/newsletter",
    )
    .await;
    a.store
        .add_subscriber(CONTROLLER, PEKKA, "Pekka Nieminen")
        .await
        .unwrap();
    let err = erase_after_return(&mut c, "ce1/newsletter", returned.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("1 record(s) (1 subscriber(s)) of controller payroll arrived after"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("if not more"), "{}", err.message());
    a.stop().await;
}

/// A subscriber stored without a controller before the contract end's export is not the
/// controller's then and is not returned; given to it at a later start, it is new to the
/// controller (with its delivery and billing record) and the erasure refuses it.
async fn a_row_given_to_the_controller_after_the_export_is_an_arrival(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    a.store
        .add_subscriber("", PEKKA, "Pekka Nieminen")
        .await
        .unwrap();
    assert_eq!(a.store.add_deliveries(PEKKA, 1).await.unwrap(), 1);
    let now = dsrelay_runtime::store::now_ms();
    a.store
        .add_billing_record(PEKKA, BillingKind::Invoice, "INV-U-1", 100, now)
        .await
        .unwrap();
    let mut c = a.client("processor");
    let returned = bulk_export(&mut c, "ce1/newsletter").await;
    assert_eq!(returned.subjects_done, 4, "{returned:?}");
    let (json, _) = all_pages(&mut c, "ce1/newsletter", 1024).await;
    assert!(!json.iter().any(|r| r["email"] == PEKKA), "{json:?}");

    // What the adapter's next start does.
    assert_eq!(a.store.assign_unowned(CONTROLLER).await.unwrap(), (1, 1));
    let err = erase_after_return(&mut c, "ce1/newsletter", returned.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(
            "3 record(s) of controller payroll arrived after the contract end's export and \
             were never returned: 1 subscriber(s), 1 delivery record(s) and 1 billing \
             record(s); nothing was erased"
        ),
        "{}",
        err.message()
    );
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap().len(), 5);
    a.stop().await;
}

#[tokio::test]
async fn a_row_given_to_the_controller_after_the_export_is_an_arrival_on_sqlite() {
    a_row_given_to_the_controller_after_the_export_is_an_arrival(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_row_given_to_the_controller_after_the_export_is_an_arrival_on_postgres() {
    a_row_given_to_the_controller_after_the_export_is_an_arrival(Backend::Postgres).await;
}

/// The pid of the one backend of this database, other than `conn`'s, that waits for a lock
/// while running a statement starting with `statement`, once there is one.
async fn waiting_backend(conn: &mut sqlx::AnyConnection, statement: &str) -> i32 {
    for _ in 0..2000 {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' \
             AND query LIKE $1 || '%'",
        )
        .bind(statement)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        assert!(pids.len() <= 1, "{pids:?}");
        if let Some(pid) = pids.first() {
            return *pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no backend waits for a lock in {statement}");
}

/// Whether the backend `pid` waits for a lock that `blocker` holds.
async fn blocked_by(conn: &mut sqlx::AnyConnection, pid: i32, blocker: i32) -> bool {
    sqlx::query_scalar("SELECT $2 = ANY(pg_blocking_pids($1))")
        .bind(pid)
        .bind(blocker)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

/// PostgreSQL, where row ids are not commit-ordered: a subscriber inserted by a transaction
/// still open while the export counts is not counted, and once committed is still not in the
/// pages; the erasure after the return refuses it. And an erasure that holds the arrival
/// clock (here while it waits for a row another transaction locks) makes an insert wait
/// until it commits, so the row inserted then is not erased.
#[tokio::test]
async fn an_insert_under_way_at_the_export_is_an_arrival_on_postgres() {
    let Some(a) = Running::start_on(Backend::Postgres, 0).await else {
        return;
    };
    let pool = a.store.db().pool.clone();
    let mut inserting = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO subscribers (controller, email, name) VALUES ($1, $2, $3)")
        .bind(CONTROLLER)
        .bind(PEKKA)
        .bind("Pekka Nieminen")
        .execute(&mut *inserting)
        .await
        .unwrap();
    let mut c = a.client("processor");
    let returned = bulk_export(&mut c, "ce1/newsletter").await;
    assert_eq!(returned.subjects_done, 4, "{returned:?}");
    inserting.commit().await.unwrap();
    let (json, _) = all_pages(&mut c, "ce1/newsletter", 1024).await;
    assert_eq!(json.len() as u64, returned.records_done, "{json:?}");
    assert!(!json.iter().any(|r| r["email"] == PEKKA), "{json:?}");
    let err = erase_after_return(&mut c, "ce1/newsletter", returned.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(
            "1 record(s) of controller payroll arrived after the contract end's export and \
             were never returned: 1 subscriber(s), 0 delivery record(s)"
        ),
        "{}",
        err.message()
    );
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap().len(), 5);
    exec(&a.store, "DELETE FROM subscribers WHERE email = $1", PEKKA).await;

    // Another transaction locks a returned row, so the erasure waits there holding the clock.
    let mut locking = pool.begin().await.unwrap();
    let locker: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *locking)
        .await
        .unwrap();
    sqlx::query("SELECT id FROM subscribers WHERE email = $1 FOR UPDATE")
        .bind(MAIJA)
        .execute(&mut *locking)
        .await
        .unwrap();
    let mut erasing = c.clone();
    let erasure =
        tokio::spawn(
            async move { erase_after_return(&mut erasing, "ce1/newsletter", returned).await },
        );
    let mut watch = pool.acquire().await.unwrap();
    let eraser = waiting_backend(&mut watch, "").await;
    assert!(blocked_by(&mut watch, eraser, locker).await);
    let store = a.store.clone();
    let insert =
        tokio::spawn(async move { store.add_subscriber(CONTROLLER, LIISA, "Liisa Laine").await });
    let inserter = waiting_backend(&mut watch, "INSERT INTO subscribers").await;
    assert!(blocked_by(&mut watch, inserter, eraser).await);
    drop(watch);

    locking.rollback().await.unwrap();
    let r = erasure.await.unwrap().unwrap();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Completed, "{r:?}");
    insert.await.unwrap().unwrap();
    assert_eq!(a.store.emails_of(CONTROLLER).await.unwrap(), [LIISA]);
    a.stop().await;
}

fn sha256_email(v: &str) -> SubjectIdentity {
    SubjectIdentity {
        encoding: IdentityEncoding::Sha256 as i32,
        value: digest(IdentityEncoding::Sha256, &normalize(IdentityType::Email, v)).unwrap(),
        ..email(v)
    }
}

fn for_controller(controller: &str, req: ExecuteRequest) -> ExecuteRequest {
    ExecuteRequest {
        controller: controller.into(),
        ..req
    }
}

/// After an erasure kept Erik's billing records, his later access request returns them
/// (found by his address as billed, given raw or hashed) and nothing of anyone else's: not
/// Maija's record, not the record another controller kept of Pekka. Pekka's own request
/// finds his only under that controller.
async fn a_later_export_returns_what_an_erasure_kept(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    two_controllers(&a).await;
    let now = dsrelay_runtime::store::now_ms();
    let (_, [date1, date2]) = bill_erik(&a.store).await;
    a.store
        .add_billing_record(MAIJA, BillingKind::Invoice, "INV-M-1", 500, now)
        .await
        .unwrap();
    a.store
        .add_billing_record(PEKKA, BillingKind::OssSale, "INV-G-1", 1290, now)
        .await
        .unwrap();
    let mut c = a.client("processor");
    for (task_id, controller, who) in [
        ("t-erase-e", CONTROLLER, ERIK),
        ("t-erase-p", GLOBEX, PEKKA),
    ] {
        let r = c
            .execute(for_controller(
                controller,
                request(task_id, RequestKind::Erasure, email(who)),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    }

    let r = c
        .execute(request("t-access", RequestKind::ReturnOfData, email(ERIK)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    assert!(r.export_paged, "{r:?}");
    assert_eq!(records(&r), 2, "{r:?}");
    let note = &r.evidence.as_ref().unwrap().note;
    assert!(
        note.contains("0 subscriber record(s), 0 delivery record(s) and 2 billing record(s)"),
        "{note}"
    );
    let (json, _) = all_pages(&mut c, "t-access", 1024).await;
    let null = serde_json::Value::Null;
    assert_eq!(
        billing_keys(&json),
        [
            ("invoice".into(), "INV-NOW-1".into(), null.clone()),
            ("vat-oss-sale".into(), "INV-NOW-1".into(), null)
        ]
    );
    assert_eq!(json.len(), 2, "{json:?}");
    for (r, date) in json.iter().zip([date1, date2]) {
        assert_eq!(r["buyer"], format!("Erik Lindqvist <{ERIK}>"));
        assert_eq!(r["kept_until_ms"], date);
    }
    // A hashed address finds the same; a transfer carries the same.
    let r = c
        .execute(request(
            "t-access-h",
            RequestKind::ReturnOfData,
            sha256_email(ERIK),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    assert_eq!(all_pages(&mut c, "t-access-h", 0).await.0, json);
    let mut transfer = request("t-move", RequestKind::Transfer, email(ERIK));
    transfer.parameters = Some(RequestParameters {
        transfer_recipient: "spiffe://dsrelay.dev/partner/crm".into(),
        ..Default::default()
    });
    c.execute(transfer).await.unwrap();
    assert_eq!(all_pages(&mut c, "t-move", 0).await.0, json);

    // What globex kept of Pekka is globex's: not found for the default controller.
    let r = c
        .execute(request("t-pekka", RequestKind::ReturnOfData, email(PEKKA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::NotFound, "{r:?}");
    c.execute(for_controller(
        GLOBEX,
        request("t-pekka-g", RequestKind::ReturnOfData, email(PEKKA)),
    ))
    .await
    .unwrap();
    let (pekka, _) = all_pages(&mut c, "t-pekka-g", 0).await;
    assert_eq!(
        billing_keys(&pekka),
        [(
            "vat-oss-sale".into(),
            "INV-G-1".into(),
            serde_json::Value::Null
        )]
    );
    assert_eq!(pekka.len(), 1, "{pekka:?}");
    a.stop().await;
}

#[tokio::test]
async fn a_later_export_returns_what_an_erasure_kept_on_sqlite() {
    a_later_export_returns_what_an_erasure_kept(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_later_export_returns_what_an_erasure_kept_on_postgres() {
    a_later_export_returns_what_an_erasure_kept(Backend::Postgres).await;
}

/// The other kinds see the kept records too: a later erasure answers RETAINED for them (not
/// NOT_FOUND, which would say nothing is held) and its own retention run releases them in
/// stages; rectification, restriction and objection change nothing of them and say so. Erik
/// subscribing again at his old address and erasing again is not answered for them (that
/// subscriber may be someone else); at a new address, and asking by both, he is, after a
/// delay too.
async fn later_requests_see_what_an_erasure_kept(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    let ([invoice, oss], [date1, date2]) = bill_erik(&a.store).await;
    let mut c = a.client("processor");
    c.execute(request("t-first", RequestKind::Erasure, email(ERIK)))
        .await
        .unwrap();
    assert_eq!(
        billing_left(&a.store).await,
        [(invoice, false), (oss, false)]
    );

    let again = |task_id: &str| ExecuteRequest {
        request_id: "req-again".into(),
        ..request(task_id, RequestKind::Erasure, sha256_email(ERIK))
    };
    let r = c.execute(again("t-again")).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    assert_eq!((retain_until(&r), records(&r)), (date1, 0));
    assert!(r.legal_basis.contains("Kirjanpitolaki"), "{r:?}");
    assert!(
        r.evidence
            .as_ref()
            .unwrap()
            .note
            .starts_with("no subscriber matches"),
        "{r:?}"
    );
    let r = c
        .execute(again(&format!("t-again#retention-expired-{date1}")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    assert_eq!((retain_until(&r), records(&r)), (date2, 1));
    assert_eq!(billing_left(&a.store).await, [(oss, false)]);

    let mut fix = request("t-fix", RequestKind::Rectification, email(ERIK));
    fix.parameters = Some(RequestParameters {
        corrections: vec![FieldCorrection {
            field: "name".into(),
            new_value: "Erik Lind".into(),
        }],
        ..Default::default()
    });
    let restrict = request("t-restrict", RequestKind::Restriction, email(ERIK));
    let object = request("t-object", RequestKind::Objection, email(ERIK));
    for req in [fix, restrict, object] {
        let r = c.execute(req).await.unwrap().into_inner();
        assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
        assert_eq!(records(&r), 0, "{r:?}");
        let note = &r.evidence.as_ref().unwrap().note;
        assert!(note.contains("holds only 1 billing record(s)"), "{note}");
    }
    c.execute(request("t-look", RequestKind::ReturnOfData, email(ERIK)))
        .await
        .unwrap();
    let (json, _) = all_pages(&mut c, "t-look", 0).await;
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["buyer"], format!("Erik Lindqvist <{ERIK}>"));

    // Subscribed again at the same address and erased again: the new subscriber goes, and
    // the old record is not named, since an address a subscriber holds now may be someone
    // else's; it stays kept.
    a.store
        .add_subscriber(CONTROLLER, ERIK, "Erik Lindqvist")
        .await
        .unwrap();
    let r = c
        .execute(request("t-third", RequestKind::Erasure, email(ERIK)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    assert_eq!(records(&r), 1, "{r:?}");
    assert!(a.store.subscriber(ERIK).await.unwrap().is_none());
    assert_eq!(billing_left(&a.store).await, [(oss, false)]);
    a.stop().await;

    // Subscribed again at another address, erased again after a confirmation delay by both:
    // the kept record is answered for once carried out.
    const ERIK_NOW: &str = "erik@lindqvist.example.se";
    let Some(a) = Running::start_on(backend, 200).await else {
        return;
    };
    let (_, [date1, _]) = bill_erik(&a.store).await;
    let mut c = a.client("processor");
    c.execute(request("t-first", RequestKind::Erasure, email(ERIK)))
        .await
        .unwrap();
    assert_eq!(
        outcome(&settled(&mut c, "t-first").await),
        ExecuteOutcome::Retained
    );
    a.store
        .add_subscriber(CONTROLLER, ERIK_NOW, "Erik Lindqvist")
        .await
        .unwrap();
    let mut second = request("t-second", RequestKind::Erasure, email(ERIK));
    second.identities.push(email(ERIK_NOW));
    let r = c.execute(second).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Accepted, "{r:?}");
    let done = settled(&mut c, "t-second").await;
    assert_eq!(outcome(&done), ExecuteOutcome::Retained, "{done:?}");
    assert_eq!(retain_until(&done), date1);
    assert!(a.store.subscriber(ERIK_NOW).await.unwrap().is_none());
    a.stop().await;
}

#[tokio::test]
async fn later_requests_see_what_an_erasure_kept_on_sqlite() {
    later_requests_see_what_an_erasure_kept(Backend::Sqlite).await;
}

#[tokio::test]
async fn later_requests_see_what_an_erasure_kept_on_postgres() {
    later_requests_see_what_an_erasure_kept(Backend::Postgres).await;
}

/// Billing records written while their subscriber had no controller yet (a tool billing a
/// seeded subscriber before the adapter first started) get one at start: their
/// subscriber's, or, once detached by an erasure, the default controller. A contract end's
/// export and erasure then reach them.
async fn billing_records_without_a_controller_get_their_subscribers(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_database(backend, &dir).await else {
        return;
    };
    let store = Store::open(&url).await.unwrap();
    let now = dsrelay_runtime::store::now_ms();
    let erik = store
        .add_billing_record(ERIK, BillingKind::Invoice, "INV-E-1", 990, now)
        .await
        .unwrap();
    let maija = store
        .add_billing_record(MAIJA, BillingKind::Invoice, "INV-M-1", 500, now)
        .await
        .unwrap();
    // Maija's was kept after an erasure; an adapter of the previous version then gave the
    // subscribers to its default controller, then globex, and left the records without one.
    let db = &store.db().pool;
    sqlx::query("UPDATE billing_records SET subscriber_id = NULL WHERE id = $1")
        .bind(maija)
        .execute(db)
        .await
        .unwrap();
    sqlx::query("UPDATE subscribers SET controller = $1 WHERE controller = ''")
        .bind(GLOBEX)
        .execute(db)
        .await
        .unwrap();
    db.close().await;

    let a = Running::start_at(dir, url, 0).await;
    let owners: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, controller FROM billing_records ORDER BY id")
            .fetch_all(&a.store.db().pool)
            .await
            .unwrap();
    assert_eq!(
        owners,
        [(erik, GLOBEX.to_string()), (maija, CONTROLLER.into())]
    );
    let mut c = a.client("processor");
    let r = c
        .execute_bulk(bulk("ce-export", CONTROLLER, BulkOperation::Export))
        .await
        .unwrap()
        .into_inner();
    assert!(r.note.contains("and 1 billing record(s)"), "{}", r.note);
    let (json, _) = all_pages(&mut c, "ce-export", 0).await;
    assert_eq!(
        billing_keys(&json),
        [("invoice".into(), "INV-M-1".into(), serde_json::Value::Null)]
    );
    let r = c
        .execute_bulk(bulk("ce-erase", GLOBEX, BulkOperation::Erase))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Retained, "{r:?}");
    assert_eq!(
        billing_left(&a.store).await,
        [(erik, false), (maija, false)]
    );
    a.stop().await;
}

#[tokio::test]
async fn billing_records_without_a_controller_get_their_subscribers_on_sqlite() {
    billing_records_without_a_controller_get_their_subscribers(Backend::Sqlite).await;
}

#[tokio::test]
async fn billing_records_without_a_controller_get_their_subscribers_on_postgres() {
    billing_records_without_a_controller_get_their_subscribers(Backend::Postgres).await;
}

/// `--demo-billing`: the seeded Erik gets an invoice and an OSS record once, and erasing him
/// keeps them in stages.
#[tokio::test]
async fn the_demo_bills_the_seeded_subscriber_once() {
    let a = Running::start(0).await;
    let now = dsrelay_runtime::store::now_ms();
    assert_eq!(a.store.bill_seeded_subscriber(now).await.unwrap(), 2);
    assert_eq!(a.store.bill_seeded_subscriber(now).await.unwrap(), 0);
    let kinds: Vec<BillingKind> = a
        .store
        .billing_records()
        .await
        .unwrap()
        .iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, [BillingKind::Invoice, BillingKind::OssSale]);
    let mut c = a.client("processor");
    let r = c
        .execute(request("t-demo", RequestKind::Erasure, email(ERIK)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    assert_eq!(
        retain_until(&r),
        BillingKind::Invoice.kept_until(now).unwrap()
    );
    // Gone, he is billed no more.
    assert_eq!(a.store.bill_seeded_subscriber(now).await.unwrap(), 0);
    a.stop().await;
}

/// A record billed before kept records could be found (migration 0006) gets its key from the
/// address its `buyer` names, whatever its case, and is found by it once an erasure kept it.
/// One kept before has no key: nothing tells whether its address was its subscriber's at the
/// erasure.
async fn records_billed_before_the_lookup_are_found_once_kept(backend: Backend) {
    const ANNA: &str = "anna.korhonen@example.com";
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_database(backend, &dir).await else {
        return;
    };
    let db = dsrelay_runtime::store::Db::connect(&url).await.unwrap();
    let all = match backend {
        Backend::Sqlite => &dsrelay_example_adapter::store::SQLITE_MIGRATIONS,
        Backend::Postgres => &dsrelay_example_adapter::store::POSTGRES_MIGRATIONS,
    };
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(all.migrations[..5].to_vec()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&db.pool).await.unwrap();
    let now = dsrelay_runtime::store::now_ms();
    let until = BillingKind::Invoice.kept_until(now).unwrap();
    sqlx::query(
        "INSERT INTO billing_records (controller, subscriber_id, kind, reference, buyer, \
         amount_cents, booked_at, kept_until) VALUES \
         ($1, (SELECT id FROM subscribers WHERE email = $4), 'invoice', 'INV-OLD-1', \
         'Anna <Korhonen> <Anna.Korhonen@Example.com>', 990, $2, $3), \
         ($1, NULL, 'invoice', 'INV-OLD-2', 'Old Buyer <old.buyer@example.com>', 990, $2, $3), \
         ($1, NULL, 'invoice', 'INV-OLD-3', 'no address', 990, $2, $3)",
    )
    .bind(CONTROLLER)
    .bind(now)
    .bind(until)
    .bind(ANNA)
    .execute(&db.pool)
    .await
    .unwrap();
    db.pool.close().await;

    let a = Running::start_at(dir, url, 0).await;
    let mut c = a.client("processor");
    let r = c
        .execute(request("t-anna-erase", RequestKind::Erasure, email(ANNA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    let r = c
        .execute(request("t-anna", RequestKind::ReturnOfData, email(ANNA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    let (json, _) = all_pages(&mut c, "t-anna", 0).await;
    assert_eq!(
        billing_keys(&json),
        [(
            "invoice".into(),
            "INV-OLD-1".into(),
            serde_json::Value::Null
        )]
    );
    let r = c
        .execute(request(
            "t-old",
            RequestKind::ReturnOfData,
            email("old.buyer@example.com"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::NotFound, "{r:?}");
    a.stop().await;
}

#[tokio::test]
async fn records_billed_before_the_lookup_are_found_once_kept_on_sqlite() {
    records_billed_before_the_lookup_are_found_once_kept(Backend::Sqlite).await;
}

#[tokio::test]
async fn records_billed_before_the_lookup_are_found_once_kept_on_postgres() {
    records_billed_before_the_lookup_are_found_once_kept(Backend::Postgres).await;
}

/// The access request of a subscriber with a record kept of someone else at their address:
/// it finds their own subscriber row and no billing record.
async fn finds_no_kept_record(c: &mut SubprocessorAdapterClient<Channel>, task: &str, who: &str) {
    for (task_id, identity) in [
        (format!("{task}-raw"), email(who)),
        (format!("{task}-hashed"), sha256_email(who)),
    ] {
        let r = c
            .execute(request(&task_id, RequestKind::ReturnOfData, identity))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
        assert_eq!(records(&r), 1, "{r:?}");
        let (json, _) = all_pages(c, &task_id, 0).await;
        assert!(billing_in(&json).is_empty(), "{json:?}");
        assert_eq!(json.len(), 1, "{json:?}");
        assert_eq!(json[0]["email"], who, "{json:?}");
    }
}

/// A kept record is found only by the subject it belongs to. Anu, billed at one address and
/// erased after correcting it, leaves her record to nobody who signs up with the old one, nor
/// does Eva to whoever presents hers; Cai's record, found by his address after his erasure,
/// is not Dan's when Dan signs up with that address, nor once Dan is erased too.
async fn a_reused_address_finds_no_one_elses_kept_records(backend: Backend) {
    const ANU: &str = "anu.aalto@example.fi";
    const ANU_NOW: &str = "anu.aalto@example.net";
    const CAI: &str = "cai.berg@example.se";
    const EVA: &str = "eva.ek@example.fi";
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    let now = dsrelay_runtime::store::now_ms();
    let mut c = a.client("processor");
    let erase = |task_id: &str, who: &str| request(task_id, RequestKind::Erasure, email(who));

    a.store
        .add_subscriber(CONTROLLER, ANU, "Anu Aalto")
        .await
        .unwrap();
    a.store
        .add_billing_record(ANU, BillingKind::Invoice, "INV-ANU-1", 990, now)
        .await
        .unwrap();
    let mut fix = request("t-anu-fix", RequestKind::Rectification, email(ANU));
    fix.parameters = Some(RequestParameters {
        corrections: vec![FieldCorrection {
            field: "email".into(),
            new_value: ANU_NOW.into(),
        }],
        ..Default::default()
    });
    let r = c.execute(fix).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    a.store
        .add_subscriber(CONTROLLER, ANU, "Bea Blom")
        .await
        .unwrap();
    let r = c
        .execute(erase("t-anu", ANU_NOW))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    finds_no_kept_record(&mut c, "t-bea", ANU).await;
    // Bea's erasure is hers alone: nothing of Anu's kept is answered for.
    let r = c.execute(erase("t-bea", ANU)).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    // Eva, erased after correcting her address, leaves her record to nobody who presents
    // the old one, whether or not they ever subscribe.
    a.store
        .add_subscriber(CONTROLLER, EVA, "Eva Ek")
        .await
        .unwrap();
    a.store
        .add_billing_record(EVA, BillingKind::Invoice, "INV-EVA-1", 990, now)
        .await
        .unwrap();
    let mut fix = request("t-eva-fix", RequestKind::Rectification, email(EVA));
    fix.parameters = Some(RequestParameters {
        corrections: vec![FieldCorrection {
            field: "email".into(),
            new_value: "eva.ek@example.net".into(),
        }],
        ..Default::default()
    });
    c.execute(fix).await.unwrap();
    let r = c
        .execute(erase("t-eva", "eva.ek@example.net"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    let r = c
        .execute(request("t-eva-old", RequestKind::ReturnOfData, email(EVA)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::NotFound, "{r:?}");

    a.store
        .add_subscriber(CONTROLLER, CAI, "Cai Berg")
        .await
        .unwrap();
    a.store
        .add_billing_record(CAI, BillingKind::Invoice, "INV-CAI-1", 990, now)
        .await
        .unwrap();
    let r = c.execute(erase("t-cai", CAI)).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Retained, "{r:?}");
    // Cai's request by his address at the erasure finds his record.
    let r = c
        .execute(request("t-cai-look", RequestKind::ReturnOfData, email(CAI)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    let (json, _) = all_pages(&mut c, "t-cai-look", 0).await;
    assert_eq!(json.len(), 1, "{json:?}");
    assert_eq!(json[0]["buyer"], format!("Cai Berg <{CAI}>"));

    a.store
        .add_subscriber(CONTROLLER, CAI, "Dan Dahl")
        .await
        .unwrap();
    finds_no_kept_record(&mut c, "t-dan", CAI).await;
    let r = c.execute(erase("t-dan", CAI)).await.unwrap().into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::Completed, "{r:?}");
    // The address named two subscribers: neither's later request can tell whose it was.
    let r = c
        .execute(request(
            "t-cai-again",
            RequestKind::ReturnOfData,
            email(CAI),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::NotFound, "{r:?}");
    // All three records are still kept, as the law requires.
    assert_eq!(
        billing_left(&a.store).await.len(),
        3,
        "{:?}",
        a.store.billing_records().await
    );
    a.stop().await;
}

#[tokio::test]
async fn a_reused_address_finds_no_one_elses_kept_records_on_sqlite() {
    a_reused_address_finds_no_one_elses_kept_records(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_reused_address_finds_no_one_elses_kept_records_on_postgres() {
    a_reused_address_finds_no_one_elses_kept_records(Backend::Postgres).await;
}

/// A contract end's erasure leaves what it kept to no later request of a subject: among all
/// the addresses it erases at once it does not tell those that could name someone else (see
/// `retention::release_controller`). The records stay kept.
async fn a_contract_end_leaves_kept_records_to_no_later_request(backend: Backend) {
    let Some(a) = Running::start_on(backend, 0).await else {
        return;
    };
    two_controllers(&a).await;
    let now = dsrelay_runtime::store::now_ms();
    a.store
        .add_billing_record(PEKKA, BillingKind::Invoice, "INV-G-1", 990, now)
        .await
        .unwrap();
    let mut c = a.client("processor");
    let r = c
        .execute_bulk(bulk("ce-erase", GLOBEX, BulkOperation::Erase))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome_of(r.outcome), ExecuteOutcome::Retained, "{r:?}");
    let r = c
        .execute(for_controller(
            GLOBEX,
            request("t-pekka", RequestKind::ReturnOfData, email(PEKKA)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome(&r), ExecuteOutcome::NotFound, "{r:?}");
    assert_eq!(billing_left(&a.store).await.len(), 1);
    a.stop().await;
}

#[tokio::test]
async fn a_contract_end_leaves_kept_records_to_no_later_request_on_sqlite() {
    a_contract_end_leaves_kept_records_to_no_later_request(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_contract_end_leaves_kept_records_to_no_later_request_on_postgres() {
    a_contract_end_leaves_kept_records_to_no_later_request(Backend::Postgres).await;
}
