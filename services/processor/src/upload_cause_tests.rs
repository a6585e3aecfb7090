//! What the registry is told of a delivery that keeps failing, through the processor's real
//! store (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server) and
//! uploader, against a controller's registry played by the test over mTLS that refuses every
//! call with the words it is given. Failures are acknowledged after attempts 1, 2, 4, 8...
//! and after any attempt whose cause differs from the one acknowledged last, so the task's
//! reason (what `dsrctl get` and `trace` show) never names a cause that has passed; each
//! says when it failed and when the next attempt comes.

use std::sync::{Arc, Mutex};

use dsrelay_connectors::ExportedFile;
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::export_upload_service_server::{
    ExportUploadService, ExportUploadServiceServer,
};
use dsrelay_proto::v1::{
    Acknowledgement, CompletePartRequest, CompletePartResponse, DeliverRequest,
    GetUploadStateRequest, RequestKind, TaskState, UploadFileChunk, UploadState,
};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status, Streaming};

use crate::app::Shared;
use crate::store::Transition;
use crate::upload_test_support as support;
use crate::{App, Config};
use tonic::service::Routes;

const HOUR: i64 = 3_600_000;

/// A registry that answers every call UNAVAILABLE with its current words.
#[derive(Clone, Default)]
struct Refusing {
    said: Arc<Mutex<String>>,
}

impl Refusing {
    fn say(&self, words: String) {
        *self.said.lock().expect("said") = words;
    }

    fn refusal(&self) -> Status {
        Status::unavailable(self.said.lock().expect("said").clone())
    }
}

#[tonic::async_trait]
impl ExportUploadService for Refusing {
    async fn get_upload_state(
        &self,
        _req: Request<GetUploadStateRequest>,
    ) -> Result<Response<UploadState>, Status> {
        Err(self.refusal())
    }

    async fn upload_file(
        &self,
        _req: Request<Streaming<UploadFileChunk>>,
    ) -> Result<Response<UploadState>, Status> {
        Err(self.refusal())
    }

    async fn complete_part(
        &self,
        _req: Request<CompletePartRequest>,
    ) -> Result<Response<CompletePartResponse>, Status> {
        Err(self.refusal())
    }
}

/// Serves [`Refusing`] with the development PKI's registry certificate.
async fn serve_registry(dir: &std::path::Path) -> (Refusing, u16, oneshot::Sender<()>) {
    let registry = Refusing::default();
    let routes = Routes::new(ExportUploadServiceServer::new(registry.clone()));
    let (port, stop) = support::serve(dir, "registry", routes).await;
    (registry, port, stop)
}

fn config(dir: &std::path::Path, database_url: &str, registry: u16) -> Config {
    support::config(
        dir,
        database_url,
        &format!("https://127.0.0.1:{registry}"),
        "",
    )
}

/// A RETURN_OF_DATA (`r-1`, due in a month) whose task exported one small file, recorded
/// as the runner's export step records it, its upload queued.
async fn exported(shared: &Shared) {
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::ReturnOfData as i32,
        due_at: Some(timestamp_from_millis(now + 30 * 24 * HOUR)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let task = (shared.store.tasks("acme", "r-1").await.expect("tasks"))
        .pop()
        .expect("the task");
    let dir = crate::exports::task_dir(&shared.config.data_dir, &task.key);
    std::fs::create_dir_all(&dir).expect("export folder");
    let content = b"[{\"name\": \"x\"}]";
    std::fs::write(dir.join("customers.json"), content).expect("export file");
    let file = ExportedFile {
        name: "customers.json".into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: content.len() as u64,
        sha256: hex::encode(Sha256::digest(content)),
    };
    let export = Transition {
        state: TaskState::InProgress,
        note: "exported; uploading".into(),
        export_files: Some(vec![file]),
        upload: true,
        ..Default::default()
    };
    (shared.store)
        .transition(&task.key, task.sequence, &export, now, 1)
        .await
        .expect("record the export")
        .expect("recorded");
}

/// The reasons of the acknowledgements queued for `r-1`, in order.
async fn acknowledged(shared: &Shared) -> Vec<String> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE request_id = 'r-1' ORDER BY sequence",
    )
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("acks");
    (payloads.iter())
        .map(|p| Acknowledgement::decode(p.as_slice()).expect("ack").reason)
        .collect()
}

/// Attempts 1 to 8 fail with one cause, 9 to 16 with another, whose words carry a count
/// that changes every time: acknowledged after attempts 1, 2, 4, 8, 9 (the cause changed)
/// and 16, and the task's reason after attempt 15 names the second cause, with attempt 9's
/// times. Before, attempts 9 to 15 were never acknowledged and the task's reason named the
/// first cause until attempt 16.
async fn a_changed_cause_is_acknowledged_at_once(database_url: &str, dir: &std::path::Path) {
    let (registry, port, _stop) = serve_registry(dir).await;
    let app = App::build(config(dir, database_url, port))
        .await
        .expect("app");
    let shared = app.shared();
    exported(&shared).await;
    let mut seen = acknowledged(&shared).await.len();
    let mut acked = Vec::new();
    let mut ninth = None;
    for attempt in 1..=16 {
        registry.say(match attempt {
            ..=8 => "the registry is read-only for maintenance".into(),
            n => format!("the registry's disk is full ({} bytes free)", 100 - n),
        });
        let mut jobs = (shared.store)
            .claim_uploads(shared.clock.now_ms() + HOUR, 1, 60_000)
            .await
            .expect("claim");
        let job = jobs.pop().expect("the upload is due");
        assert_eq!(job.attempts, attempt);
        let before = shared.clock.now_ms();
        crate::uploader::upload(&shared, job).await;
        if attempt == 9 {
            let next: i64 = sqlx::query_scalar("SELECT next_attempt_at FROM uploads")
                .fetch_one(&shared.store.db().pool)
                .await
                .expect("the upload");
            ninth = Some((before, shared.clock.now_ms(), next));
        }
        let reasons = acknowledged(&shared).await;
        if reasons.len() > seen {
            assert_eq!(reasons.len(), seen + 1, "attempt {attempt}: {reasons:#?}");
            let reason = reasons.last().expect("reason");
            assert!(
                reason.contains(&format!("attempt {attempt} failed at ")),
                "{reason}"
            );
            acked.push(attempt);
        }
        seen = reasons.len();
        let task = (shared.store.tasks("acme", "r-1").await.expect("tasks"))
            .pop()
            .expect("the task");
        assert_eq!(task.state, TaskState::InProgress);
        if attempt == 15 {
            let (before, after, next) = ninth.expect("attempt 9 ran");
            let reason = task.reason;
            let head = "sending 1 file(s) (15 bytes) to the registry: attempt 9 failed at ";
            assert!(reason.starts_with(head), "{reason}");
            let (failed_at, rest) = reason[head.len()..].split_once(": ").expect("a time");
            let failed_at = chrono::DateTime::parse_from_rfc3339(failed_at).expect("a time");
            let failed_at = failed_at.timestamp_millis();
            assert!(
                (before - 1_000..=after).contains(&failed_at),
                "{failed_at} not within {before}..={after}: {reason}"
            );
            assert!(
                rest.contains("the registry's disk is full (91 bytes free)"),
                "{reason}"
            );
            let next_at = dsrelay_runtime::clock::date_label(next);
            assert!(
                rest.contains(&format!("; next attempt at {next_at}, retrying until ")),
                "{reason}"
            );
        }
        shared.clock.advance(HOUR);
    }
    assert_eq!(acked, [1, 2, 4, 8, 9, 16]);
}

on_both!(a_changed_cause_is_acknowledged_at_once);
