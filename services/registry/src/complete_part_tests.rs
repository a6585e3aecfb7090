//! CompletePart through the real registry: its server over mutual TLS with the development
//! PKI's certificates, its store (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL`
//! names a server) and its package folder, called as the processor and the partner call it.

use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    CompletePartRequest, ExportFileHeader, GetUploadStateRequest, IdentityEncoding, IdentityType,
    RequestKind, SubjectIdentity, SubmitRequest,
};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

use crate::test_postgres::on_postgres;
use crate::{App, Config};

const PROCESSOR: &str = "payroll-bureau";

/// A running registry, stopped by [`Registry::stop`].
struct Registry {
    port: u16,
    pki: DevPki,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Registry {
    /// Serves a registry on `database_url`, its files under `dir`, with one processor
    /// (whose endpoint nobody answers: its deliveries wait, and it may still upload).
    async fn start(dir: &std::path::Path, database_url: &str) -> Self {
        let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
        let tls = pki.files("registry");
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = {database_url:?}\n\
             identity_hash_key = \"k\"\npackage_dir = {:?}\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [audit]\ncheckpoint_key = {:?}\ncheckpoint_file = {:?}\n\
             [[identities]]\nidentity = {:?}\nrole = \"partner\"\nname = \"crm\"\n\
             [[processors]]\nname = \"{PROCESSOR}\"\nendpoint = \"https://localhost:1\"\n\
             identity = {:?}\ncategories = [\"contact\"]\n",
            dir.join("packages"),
            tls.ca,
            tls.cert,
            tls.key,
            pki.signing_key("registry"),
            dir.join("audit/checkpoints.jsonl"),
            dev_identity("partner", "crm"),
            dev_identity("processor", PROCESSOR),
        );
        let file = dir.join("registry.toml");
        std::fs::write(&file, text).expect("config file");
        let config = Config::load_from(Some(&file), Vec::new()).expect("config");
        let app = App::build(config).await.expect("app");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(app.run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            port,
            pki,
            stop,
            served,
        }
    }

    /// A channel to the registry with the certificate of the PKI's party `stem`.
    fn channel(&self, stem: &str) -> Channel {
        let tls = self.pki.files(stem).client_config().expect("client tls");
        dsrelay_runtime::tls::channel(
            &format!("https://localhost:{}", self.port),
            Some(dev_identity("registry", "controller")),
            &tls,
        )
        .expect("channel")
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.served.await.expect("joined").expect("served");
    }
}

/// The header of an empty file `name` of `subprocessor`'s part of request `id`: stored
/// whole as soon as it is announced, so a test needs no upload stream.
fn empty_file(id: &str, subprocessor: &str, name: &str) -> ExportFileHeader {
    ExportFileHeader {
        request_id: id.into(),
        subprocessor: subprocessor.into(),
        name: name.into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: 0,
        sha256: hex::encode(Sha256::digest(b"")),
    }
}

/// Announces `file` (stored whole at once, being empty) and completes its part of one file.
async fn complete(
    uploads: &mut ExportUploadServiceClient<Channel>,
    file: &ExportFileHeader,
) -> Result<i64, tonic::Status> {
    let state = uploads
        .get_upload_state(GetUploadStateRequest {
            header: Some(file.clone()),
        })
        .await?
        .into_inner();
    assert!(state.complete, "{state:?}");
    let stored = uploads
        .complete_part(CompletePartRequest {
            request_id: file.request_id.clone(),
            subprocessor: file.subprocessor.clone(),
            files: vec![file.clone()],
        })
        .await?
        .into_inner();
    Ok(stored
        .stored_at
        .map(|t| dsrelay_proto::millis_from_timestamp(&t))
        .unwrap_or_default())
}

/// A part the registry stored stays stored for the processor that asks again after losing
/// the answer, though parts completing at the same moment (each measured without the
/// other's files) have since grown the package past what a new part may bring: the replay
/// is answered as stored, with the first answer's time, and only a new part is refused.
/// Measured first, the replay was refused INVALID_ARGUMENT, and the processor failed a task
/// whose part the registry held.
async fn a_replayed_part_is_answered_as_stored_past_the_size_limit(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url).await;
    let id = RequestServiceClient::new(registry.channel("partner-crm"))
        .submit(SubmitRequest {
            kind: RequestKind::ReturnOfData as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: "maija@example.fi".into(),
                label: String::new(),
            }],
            idempotency_key: "replay-past-the-limit".into(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let file = empty_file(&id, "crm", "contacts.json");
    let stored_at = complete(&mut uploads, &file).await.expect("part stored");

    // 12,000 files of another part, as two parts completing together leave them: each
    // passed the check alone, and together they describe past the limit.
    let db = dsrelay_runtime::store::Db::connect(database_url)
        .await
        .expect("connect");
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12000) \
         INSERT INTO package_files (request_id, processor, subprocessor, name, media_type, \
         categories, size, sha256, stored_at) SELECT f.request_id, f.processor, 'mail', \
         'export-' || CAST(n.i AS TEXT) || '.json', f.media_type, f.categories, f.size, \
         f.sha256, f.stored_at FROM package_files f, n WHERE f.request_id = $1",
    )
    .bind(&id)
    .execute(&db.pool)
    .await
    .expect("the other part's files");
    sqlx::query(
        "INSERT INTO package_parts (request_id, processor, subprocessor, files, bytes, \
         stored_at) VALUES ($1, $2, 'mail', 12000, 0, $3)",
    )
    .bind(&id)
    .bind(PROCESSOR)
    .bind(stored_at)
    .execute(&db.pool)
    .await
    .expect("the other part");
    db.pool.close().await;

    // A new part is refused: the package is past what may be described.
    let refused = complete(&mut uploads, &empty_file(&id, "archive", "old.json"))
        .await
        .expect_err("a new part past the limit");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("description"), "{refused:?}");

    // The stored part, asked again, is answered as it was the first time.
    let again = uploads
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            files: vec![file.clone()],
        })
        .await
        .expect("the stored part answered as stored")
        .into_inner();
    assert_eq!(
        again
            .stored_at
            .map(|t| dsrelay_proto::millis_from_timestamp(&t)),
        Some(stored_at)
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_part_is_answered_as_stored_past_the_size_limit_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_replayed_part_is_answered_as_stored_past_the_size_limit(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_part_is_answered_as_stored_past_the_size_limit_on_postgres() {
    on_postgres(|url, dir| async move {
        a_replayed_part_is_answered_as_stored_past_the_size_limit(&url, &dir).await;
    })
    .await;
}

/// A stored part is closed: a file it does not list cannot join it afterwards (before, it was
/// taken and shown in the package, whose manifest then changed after a partner downloaded it
/// or a controller confirmed its digest), and CompletePart with another list is refused; the
/// same declaration again is answered as stored.
async fn a_stored_part_does_not_change(database_url: &str, dir: &std::path::Path) {
    let registry = Registry::start(dir, database_url).await;
    let id = RequestServiceClient::new(registry.channel("partner-crm"))
        .submit(SubmitRequest {
            kind: RequestKind::ReturnOfData as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: "maija@example.fi".into(),
                label: String::new(),
            }],
            idempotency_key: "a-closed-part".into(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let file = empty_file(&id, "crm", "contacts.json");
    let stored_at = complete(&mut uploads, &file).await.expect("part stored");

    let late = empty_file(&id, "crm", "orders.csv");
    let refused = uploads
        .get_upload_state(GetUploadStateRequest {
            header: Some(late.clone()),
        })
        .await
        .expect_err("a file joining a stored part");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("does not change"), "{refused:?}");

    let refused = uploads
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            files: vec![file.clone(), late],
        })
        .await
        .expect_err("another declaration of a stored part");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("contacts.json"), "{refused:?}");

    let again = uploads
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            files: vec![file],
        })
        .await
        .expect("the same declaration")
        .into_inner();
    assert_eq!(
        again
            .stored_at
            .map(|t| dsrelay_proto::millis_from_timestamp(&t)),
        Some(stored_at)
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_part_does_not_change_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_stored_part_does_not_change(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_part_does_not_change_on_postgres() {
    on_postgres(|url, dir| async move {
        a_stored_part_does_not_change(&url, &dir).await;
    })
    .await;
}
