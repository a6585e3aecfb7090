//! What a transfer's delivery tells the controller, through the processor's real store
//! (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server) and uploader,
//! the recipient played by the test over mutual TLS (the development PKI's `recipient`
//! certificate): a receipt naming another sending processor is refused and the part closed
//! again; an attempt after a failed one that gets through (a file taken whole, or one
//! resumed) replaces the failure's note with one saying the delivery is under way, once,
//! while the rest is still on its way; a contract end's return received by the recipient
//! waits for the confirmation scheduled for the grace end, its note naming the command.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::transfer_receiver_server::{TransferReceiver, TransferReceiverServer};
use dsrelay_proto::v1::{
    Acknowledgement, CompleteTransferRequest, ContractEnd, ContractEndChoice, ContractPhase,
    DeliverRequest, ExportFileHeader, GetUploadStateRequest, RequestKind, RequestParameters,
    TaskState, TransferReceipt, TransferRecipient, UploadFileChunk, UploadState,
};
use dsrelay_runtime::pki::dev_identity;
use tokio::sync::{oneshot, watch};
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};

use crate::app::Shared;
use crate::store::{TaskKey, TaskRow, Transition};
use crate::task_machine::ContractStep;
use crate::upload_test_support as support;
use crate::uploader::CHUNK;
use crate::{App, Config};

/// The registry's name for the recipient.
const RECIPIENT: &str = "new-bookkeeper";

/// The recipient's side: it stores files' bytes by count (checking offsets and chunk
/// checksums), answers every call UNAVAILABLE while `down`, breaks off the first SendFile of
/// `break_off.0` once `break_off.1` bytes of it are stored, holds a SendFile of `held` before
/// its first chunk until `open` turns true, and answers a receipt for exactly the part it is
/// asked to close, naming `sender` (the caller's certificate identity when `None`).
#[derive(Clone)]
struct Recipient {
    files: Arc<Mutex<HashMap<String, (u64, bool)>>>,
    down: Arc<AtomicBool>,
    break_off: Arc<Mutex<Option<(&'static str, u64)>>>,
    held: Arc<Mutex<Option<&'static str>>>,
    open: watch::Sender<bool>,
    /// SendFile calls waiting for `open`.
    waiting: watch::Sender<usize>,
    sender: Arc<Mutex<Option<String>>>,
}

impl Recipient {
    fn new() -> Self {
        Self {
            files: Arc::default(),
            down: Arc::default(),
            break_off: Arc::default(),
            held: Arc::default(),
            open: watch::channel(true).0,
            waiting: watch::channel(0).0,
            sender: Arc::default(),
        }
    }

    fn up(&self) -> Result<(), Status> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(Status::unavailable("down for maintenance")),
            false => Ok(()),
        }
    }

    fn state(&self, name: &str) -> UploadState {
        let files = self.files.lock().expect("files");
        let (offset, complete) = files.get(name).copied().unwrap_or_default();
        UploadState { offset, complete }
    }
}

#[tonic::async_trait]
impl TransferReceiver for Recipient {
    async fn get_transfer_state(
        &self,
        req: Request<GetUploadStateRequest>,
    ) -> Result<Response<UploadState>, Status> {
        self.up()?;
        let header = req.into_inner().header.expect("a header");
        Ok(Response::new(self.state(&header.name)))
    }

    async fn send_file(
        &self,
        req: Request<Streaming<UploadFileChunk>>,
    ) -> Result<Response<UploadState>, Status> {
        self.up()?;
        let mut chunks = req.into_inner();
        let mut next = chunks.message().await?;
        let header: ExportFileHeader = next
            .as_ref()
            .and_then(|c| c.header.clone())
            .ok_or_else(|| Status::invalid_argument("no header"))?;
        let name = header.name.clone();
        let held = *self.held.lock().expect("held") == Some(name.as_str());
        if held {
            self.waiting.send_modify(|n| *n += 1);
            let _ = self.open.subscribe().wait_for(|o| *o).await;
        }
        while let Some(chunk) = next {
            let stored = {
                let mut files = self.files.lock().expect("files");
                let f = files.entry(name.clone()).or_default();
                if chunk.offset != f.0 {
                    return Err(Status::failed_precondition(format!("expected {}", f.0)));
                }
                if dsrelay_runtime::export_files::chunk_crc32(&chunk.data) != chunk.chunk_crc32 {
                    return Err(Status::data_loss("chunk CRC-32 mismatch"));
                }
                f.0 += chunk.data.len() as u64;
                f.1 = f.0 == header.size;
                f.0
            };
            let broken = {
                let mut break_off = self.break_off.lock().expect("break off");
                let now = matches!(*break_off, Some((file, at)) if file == name && stored >= at);
                if now {
                    *break_off = None;
                }
                now
            };
            if broken {
                return Err(Status::unavailable("transport error"));
            }
            next = chunks.message().await?;
        }
        Ok(Response::new(self.state(&name)))
    }

    async fn complete_transfer(
        &self,
        req: Request<CompleteTransferRequest>,
    ) -> Result<Response<TransferReceipt>, Status> {
        self.up()?;
        let caller = dsrelay_runtime::tls::peer_identity(&req).map_err(Status::unauthenticated)?;
        let sender = self.sender.lock().expect("sender").clone();
        let r = req.into_inner();
        let manifest =
            dsrelay_runtime::transfer_manifest::sha256(&r.request_id, &r.subprocessor, &r.files);
        Ok(Response::new(TransferReceipt {
            bytes: r.files.iter().map(|f| f.size).sum(),
            files: r.files.len() as u32,
            request_id: r.request_id,
            subprocessor: r.subprocessor,
            manifest_sha256: manifest,
            recipient: RECIPIENT.into(),
            sender: sender.unwrap_or(caller),
            ..Default::default()
        }))
    }
}

/// The processor's configuration: a registry nobody answers (the tests send to a recipient).
fn config(dir: &std::path::Path, database_url: &str) -> Config {
    let uploads = "poll_interval_ms = 50\nbackoff = { initial_ms = 20, max_ms = 100 }";
    support::config(dir, database_url, "https://127.0.0.1:9", uploads)
}

/// A processor in `dir` on `database_url` and `recipient` served beside it: the processor,
/// the recipient's port, and what stops the recipient.
async fn start(
    dir: &std::path::Path,
    database_url: &str,
    recipient: &Recipient,
) -> (App, u16, oneshot::Sender<()>) {
    let routes = Routes::new(TransferReceiverServer::new(recipient.clone()));
    let (port, stop) = support::serve(dir, "recipient", routes).await;
    let app = App::build(config(dir, database_url)).await.expect("app");
    (app, port, stop)
}

fn recipient_at(port: u16) -> TransferRecipient {
    TransferRecipient {
        name: RECIPIENT.into(),
        endpoint: format!("https://127.0.0.1:{port}"),
        identity: dev_identity("recipient", "example"),
        public_keys: Vec::new(),
    }
}

/// Request `r-1` (`kind`, with `parameters`) to the recipient on `port`, its task's export of
/// `files` (name, size) recorded as an export step records it (`contract`: a contract end's
/// return), its upload queued.
async fn exported(
    shared: &Shared,
    req: DeliverRequest,
    files: &[(&str, u64)],
    contract: Option<ContractStep>,
) -> TaskKey {
    let now = shared.clock.now_ms();
    (shared.store)
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let task = task(shared).await;
    let files = files
        .iter()
        .map(|(name, size)| support::write_file(shared, &task.key, name, *size))
        .collect();
    let export = Transition {
        state: TaskState::InProgress,
        confirmed: true,
        note: "exported".into(),
        next_attempt_at: Some(crate::task_machine::NEVER),
        export_files: Some(files),
        upload: true,
        contract,
        ..Default::default()
    };
    (shared.store)
        .transition(&task.key, task.sequence, &export, now, 1)
        .await
        .expect("record the export")
        .expect("recorded");
    task.key
}

/// A TRANSFER to the recipient on `port`, due in 10 minutes, whose task exported `files`.
async fn transfer(shared: &Shared, port: u16, files: &[(&str, u64)]) -> TaskKey {
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::Transfer as i32,
        due_at: Some(timestamp_from_millis(shared.clock.now_ms() + 600_000)),
        recipient: Some(recipient_at(port)),
        ..Default::default()
    };
    exported(shared, req, files, None).await
}

async fn task(shared: &Shared) -> TaskRow {
    let mut tasks = shared.store.tasks("acme", "r-1").await.expect("tasks");
    tasks.pop().expect("the task")
}

/// Claims the upload (whenever its next attempt is due) and runs one attempt of it.
async fn attempt(shared: &Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let later = shared.clock.now_ms() + 60_000;
    let job = (shared.store.claim_uploads(later, 10, 60_000).await)
        .expect("claim")
        .pop()
        .expect("the upload is due");
    let shared = shared.clone();
    tokio::spawn(async move { crate::uploader::upload(&shared, job).await })
}

/// The reasons of the acknowledgements queued for `r-1`, in order.
async fn acknowledged(shared: &Shared) -> Vec<String> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE request_id = 'r-1' ORDER BY sequence",
    )
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("acks");
    payloads
        .iter()
        .map(|p| Acknowledgement::decode(p.as_slice()).expect("ack").reason)
        .collect()
}

/// Waits (up to 30 s) until the task's reason contains `words`; answers the task.
async fn reason_says(shared: &Shared, words: &str) -> TaskRow {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = task(shared).await;
        if t.reason.contains(words) {
            return t;
        }
        assert!(Instant::now() < deadline, "{words:?} never came: {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A receipt naming another sending processor is not proof of this processor's part: the
/// task stays IN_PROGRESS saying why, and the next attempt closes the part again; a receipt
/// naming this processor (as the recipient saw it over mTLS) completes the task. Before, the
/// first receipt completed it, and the registry refused the acknowledgement carrying it.
async fn a_receipt_naming_another_sender_is_refused(database_url: &str, dir: &std::path::Path) {
    let recipient = Recipient::new();
    let other = dev_identity("processor", "elsewhere");
    *recipient.sender.lock().expect("sender") = Some(other.clone());
    let (app, port, stop) = start(dir, database_url, &recipient).await;
    let shared = app.shared();
    transfer(&shared, port, &[("a.json", 10)]).await;

    attempt(&shared).await.await.expect("attempt 1");
    let t = task(&shared).await;
    assert_eq!(t.state, TaskState::InProgress, "{t:?}");
    assert!(
        t.reason.contains(&format!(
            "it names sender {other:?}, sent by {:?}",
            dev_identity("processor", "payroll-bureau")
        )),
        "{}",
        t.reason
    );
    assert!(t.transfer_receipt.is_none(), "{t:?}");

    *recipient.sender.lock().expect("sender") = None;
    attempt(&shared).await.await.expect("attempt 2");
    let t = task(&shared).await;
    assert_eq!(t.state, TaskState::Completed, "{t:?}");
    let receipt = t.transfer_receipt.expect("the receipt");
    assert_eq!(receipt.sender, dev_identity("processor", "payroll-bureau"));
    let _ = stop.send(());
}

/// The recipient broke off the first attempt one chunk into the file: the second resumes it
/// there, and while the rest is on its way the task says so (attempt 2, from which byte, to
/// whom), acknowledged once. Before, it said "attempt 1 failed ... next attempt at" until
/// the receipt came.
async fn a_resumed_attempt_replaces_the_failure_note(database_url: &str, dir: &std::path::Path) {
    let recipient = Recipient::new();
    *recipient.break_off.lock().expect("break off") = Some(("a.json", CHUNK as u64));
    let (app, port, stop) = start(dir, database_url, &recipient).await;
    let shared = app.shared();
    transfer(&shared, port, &[("a.json", 3 * CHUNK as u64 + 7)]).await;

    attempt(&shared).await.await.expect("attempt 1");
    reason_says(&shared, "attempt 1 failed at").await;

    *recipient.held.lock().expect("held") = Some("a.json");
    recipient.open.send_replace(false);
    let second = attempt(&shared).await;
    let t = reason_says(&shared, "under way").await;
    assert!(
        t.reason.starts_with(&format!(
            "sending 1 file(s) (3.1 MB) to recipient {RECIPIENT}: attempt 2 under way since "
        )) && t.reason.ends_with(&format!(
            ", resuming a.json from byte {CHUNK}, which recipient {RECIPIENT} holds"
        )),
        "{}",
        t.reason
    );
    assert_eq!(t.state, TaskState::InProgress);
    recipient.open.send_replace(true);
    second.await.expect("attempt 2");
    let t = task(&shared).await;
    assert_eq!(t.state, TaskState::Completed, "{t:?}");
    let reasons = acknowledged(&shared).await;
    let under_way = reasons.iter().filter(|r| r.contains("under way")).count();
    assert_eq!(under_way, 1, "{reasons:?}");
    let _ = stop.send(());
}

/// The recipient was down for the first attempt: in the second it takes the small file
/// whole while the large one is still on its way, and the task says the delivery is under
/// way instead of naming the failure.
async fn a_file_taken_whole_replaces_the_failure_note(database_url: &str, dir: &std::path::Path) {
    let recipient = Recipient::new();
    recipient.down.store(true, Ordering::SeqCst);
    let (app, port, stop) = start(dir, database_url, &recipient).await;
    let shared = app.shared();
    let files = [("small.json", 10), ("large.json", 2 * CHUNK as u64)];
    transfer(&shared, port, &files).await;

    attempt(&shared).await.await.expect("attempt 1");
    reason_says(&shared, "attempt 1 failed at").await;

    recipient.down.store(false, Ordering::SeqCst);
    *recipient.held.lock().expect("held") = Some("large.json");
    recipient.open.send_replace(false);
    let second = attempt(&shared).await;
    let t = reason_says(&shared, "under way").await;
    assert!(
        t.reason.contains(": attempt 2 under way since ")
            && t.reason
                .ends_with(&format!(", recipient {RECIPIENT} took small.json whole")),
        "{}",
        t.reason
    );
    recipient.open.send_replace(true);
    second.await.expect("attempt 2");
    assert_eq!(task(&shared).await.state, TaskState::Completed);
    let _ = stop.send(());
}

/// A contract end's return received by its transfer recipient waits for the controller's
/// confirmation until the grace end, when the data is deleted confirmed or not: that is the
/// scheduled time its progress reports, and its note names the command that confirms.
/// Before, the wait reported no time at all.
async fn a_received_return_is_scheduled_for_the_grace_end(
    database_url: &str,
    dir: &std::path::Path,
) {
    let recipient = Recipient::new();
    let (app, port, stop) = start(dir, database_url, &recipient).await;
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let grace_ends_at = now + 600_000;
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::ContractEnd as i32,
        parameters: Some(RequestParameters {
            contract_end: Some(ContractEnd {
                choice: ContractEndChoice::ReturnThenDelete as i32,
                effective_at: Some(timestamp_from_millis(now)),
                grace_ends_at: Some(timestamp_from_millis(grace_ends_at)),
                return_confirmed: false,
                transfer_recipient: RECIPIENT.into(),
            }),
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(grace_ends_at)),
        recipient: Some(recipient_at(port)),
        ..Default::default()
    };
    let returning = ContractStep {
        phase: ContractPhase::Returning,
        progress: None,
        scheduled_at: None,
    };
    exported(&shared, req, &[("customers.json", 100)], Some(returning)).await;

    attempt(&shared).await.await.expect("the delivery");
    let t = task(&shared).await;
    assert_eq!(
        (t.state, t.phase),
        (TaskState::InProgress, ContractPhase::AwaitingConfirmation),
        "{t:?}"
    );
    let progress = t.to_status().progress.expect("a contract end's progress");
    assert_eq!(
        progress.scheduled_at,
        Some(timestamp_from_millis(grace_ends_at))
    );
    assert!(
        t.reason.contains(&format!(
            "the controller confirms receipt once every part's receipt is in (dsrctl \
             contracts confirm r-1); the data is deleted at the end of the grace period ({}), \
             confirmed or not",
            dsrelay_runtime::clock::date_label(grace_ends_at)
        )),
        "{}",
        t.reason
    );
    let _ = stop.send(());
}

on_both!(
    a_receipt_naming_another_sender_is_refused,
    a_resumed_attempt_replaces_the_failure_note,
    a_file_taken_whole_replaces_the_failure_note,
    a_received_return_is_scheduled_for_the_grace_end,
);
