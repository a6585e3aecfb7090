//! A TRANSFER's export on its way to its recipient, through the processor's real store
//! (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server) and uploader, the
//! recipient played by the test over mutual TLS (the development PKI's `recipient`
//! certificate), taking every chunk slowly. A Cancel taken while the first files are being
//! sent (written to the store as any replica's would be) stops the transfer: the files
//! already on their way go to their end, no later one starts, the part is never closed and
//! the task is CANCELLED. A send the recipient breaks off is noted with what it stored. A
//! contract end's return cancelled while the recipient closes its part (CompleteTransfer
//! under way) is CANCELLED with the recipient's receipt kept and acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::transfer_receiver_server::{TransferReceiver, TransferReceiverServer};
use dsrelay_proto::v1::{
    Acknowledgement, CompleteTransferRequest, ContractEnd, ContractEndChoice, ContractPhase,
    DeliverRequest, ExportFileHeader, GetUploadStateRequest, RequestKind, RequestParameters,
    TaskState, TransferReceipt, TransferRecipient, UploadFileChunk, UploadState,
};
use dsrelay_runtime::pki::dev_identity;
use prost::Message;
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::app::Shared;
use crate::store::{TaskKey, Transition};
use crate::task_machine::ContractStep;
use crate::upload_test_support as support;
use crate::uploader::CHUNK;
use crate::{App, Config};
use tonic::service::Routes;

/// The registry's name for the recipient.
const RECIPIENT: &str = "new-bookkeeper";

/// How long the recipient waits before it stores each chunk.
const PACE: Duration = Duration::from_millis(50);

/// A call the recipient answered, in the order they came.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    /// GetTransferState of a file.
    State(String),
    /// SendFile of a file, from an offset.
    Send(String, u64),
    /// CompleteTransfer.
    Complete,
}

#[derive(Default)]
struct Held {
    /// Bytes stored per file, and whether it is whole.
    files: HashMap<String, (u64, bool)>,
    calls: Vec<(Instant, Call)>,
}

/// The recipient's side as far as this test goes: it stores files' bytes by count (checking
/// offsets and chunk checksums), holds every file after its first chunk until `open` turns
/// true, breaks off the first SendFile of `break_off.0` once `break_off.1` bytes of it are
/// stored, and answers a receipt for exactly the part it is asked to close.
#[derive(Clone)]
struct Recipient {
    held: Arc<Mutex<Held>>,
    open: watch::Sender<bool>,
    /// Files whose first chunk is stored.
    begun: watch::Sender<usize>,
    break_off: Option<(&'static str, u64)>,
    /// CompleteTransfer calls received, each held while `closing` is false.
    completing: watch::Sender<usize>,
    closing: watch::Sender<bool>,
    /// Whether CompleteTransfer fails (unavailable) once let through, instead of answering.
    fail_close: bool,
}

impl Recipient {
    fn new(open: bool, break_off: Option<(&'static str, u64)>) -> Self {
        Self {
            held: Arc::default(),
            open: watch::channel(open).0,
            begun: watch::channel(0).0,
            break_off,
            completing: watch::channel(0).0,
            closing: watch::channel(true).0,
            fail_close: false,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().expect("held")
    }

    fn called(&self, call: Call) {
        self.held().calls.push((Instant::now(), call));
    }

    fn calls_since(&self, since: Instant) -> Vec<Call> {
        let held = self.held();
        let after = held.calls.iter().filter(|(at, _)| *at >= since);
        after.map(|(_, c)| c.clone()).collect()
    }

    fn state(&self, name: &str) -> UploadState {
        let (offset, complete) = self.held().files.get(name).copied().unwrap_or_default();
        UploadState { offset, complete }
    }
}

#[tonic::async_trait]
impl TransferReceiver for Recipient {
    async fn get_transfer_state(
        &self,
        req: Request<GetUploadStateRequest>,
    ) -> Result<Response<UploadState>, Status> {
        let header = req.into_inner().header.expect("a header");
        self.called(Call::State(header.name.clone()));
        Ok(Response::new(self.state(&header.name)))
    }

    async fn send_file(
        &self,
        req: Request<Streaming<UploadFileChunk>>,
    ) -> Result<Response<UploadState>, Status> {
        let mut chunks = req.into_inner();
        let mut next = chunks.message().await?;
        let header: ExportFileHeader = next
            .as_ref()
            .and_then(|c| c.header.clone())
            .ok_or_else(|| Status::invalid_argument("no header"))?;
        let name = header.name.clone();
        let from = next.as_ref().map_or(0, |c| c.offset);
        self.called(Call::Send(name.clone(), from));
        let first_send = from == 0;
        while let Some(chunk) = next {
            tokio::time::sleep(PACE).await;
            let stored = {
                let mut held = self.held();
                let f = held.files.entry(name.clone()).or_default();
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
            if chunk.offset == 0 {
                self.begun.send_modify(|n| *n += 1);
                let mut open = self.open.subscribe();
                let _ = open.wait_for(|o| *o).await;
            }
            if let Some((broken, at)) = self.break_off {
                if first_send && broken == name && stored >= at {
                    return Err(Status::unavailable("transport error"));
                }
            }
            next = chunks.message().await?;
        }
        Ok(Response::new(self.state(&name)))
    }

    async fn complete_transfer(
        &self,
        req: Request<CompleteTransferRequest>,
    ) -> Result<Response<TransferReceipt>, Status> {
        self.called(Call::Complete);
        self.completing.send_modify(|n| *n += 1);
        let _ = self.closing.subscribe().wait_for(|c| *c).await;
        if self.fail_close {
            return Err(Status::unavailable(
                "the recipient went away while closing the part",
            ));
        }
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
            ..Default::default()
        }))
    }
}

/// The processor's configuration: a registry nobody answers (the tests send to a recipient).
fn config(dir: &std::path::Path, database_url: &str) -> Config {
    let uploads = "poll_interval_ms = 50\nbackoff = { initial_ms = 20, max_ms = 100 }";
    support::config(dir, database_url, "https://127.0.0.1:9", uploads)
}

/// Serves `recipient` with the development PKI's recipient certificate; answers its port.
async fn serve(dir: &std::path::Path, recipient: Recipient) -> (u16, oneshot::Sender<()>) {
    let routes = Routes::new(TransferReceiverServer::new(recipient));
    support::serve(dir, "recipient", routes).await
}

/// A TRANSFER (`r-1`, due in 10 minutes) to the recipient on `port`, whose task exported
/// `files` (name, size), recorded as the runner's export step records it, its upload queued.
async fn exported(shared: &Shared, port: u16, files: &[(&str, u64)]) -> TaskKey {
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::Transfer as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        recipient: Some(TransferRecipient {
            name: RECIPIENT.into(),
            endpoint: format!("https://127.0.0.1:{port}"),
            identity: dev_identity("recipient", "example"),
            public_keys: Vec::new(),
        }),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let task = shared
        .store
        .tasks("acme", "r-1")
        .await
        .expect("tasks")
        .pop()
        .expect("the task");
    let files = files
        .iter()
        .map(|(name, size)| support::write_file(shared, &task.key, name, *size))
        .collect();
    let export = Transition {
        state: TaskState::InProgress,
        note: "exported; transferring".into(),
        export_files: Some(files),
        upload: true,
        ..Default::default()
    };
    shared
        .store
        .transition(&task.key, task.sequence, &export, now, 1)
        .await
        .expect("record the export")
        .expect("recorded");
    task.key
}

async fn task(shared: &Shared) -> crate::store::TaskRow {
    let mut tasks = shared.store.tasks("acme", "r-1").await.expect("tasks");
    tasks.pop().expect("the task")
}

/// The upload's retirement time and last error.
async fn upload_row(shared: &Shared) -> (Option<i64>, Option<String>) {
    sqlx::query_as("SELECT done_at, last_error FROM uploads")
        .fetch_one(&shared.store.db().pool)
        .await
        .expect("the upload")
}

/// A transfer of `count` files cancelled while the files it sends at once are on their way
/// (held by the recipient after their first chunk) sends those to their end and no more: the
/// other files are not even asked about, CompleteTransfer is never called (so the part stays
/// unclosed, which is all a recipient is ever told of an abandoned transfer), and the task
/// is CANCELLED with the export undelivered. Checked only when an attempt started, the
/// cancellation used to let every file go and the part be closed, the task COMPLETED.
async fn cancelled_while_the_first_files_go(
    database_url: &str,
    dir: &std::path::Path,
    count: usize,
) {
    let recipient = Recipient::new(false, None);
    let (port, stop_recipient) = serve(dir, recipient.clone()).await;
    let app = App::build(config(dir, database_url)).await.expect("app");
    let shared = app.shared();
    let size = 2 * CHUNK as u64 + 100;
    let names = ["a.json", "b.json", "c.json", "d.json", "e.json"];
    let files: Vec<_> = names[..count].iter().map(|n| (*n, size)).collect();
    exported(&shared, port, &files).await;

    let (stop, stopping) = watch::channel(false);
    let worker = tokio::spawn(crate::uploader::run(shared.clone(), stopping));
    // Every file sent at once has its first chunk stored, and waits.
    let at_once = crate::uploader::FILES_AT_ONCE;
    tokio::time::timeout(
        Duration::from_secs(30),
        recipient.begun.subscribe().wait_for(|n| *n >= at_once),
    )
    .await
    .expect("the first files reach the recipient")
    .expect("begun");
    let now = shared.clock.now_ms();
    let tasks = shared
        .store
        .cancel("acme", "r-1", "the subject withdrew", now)
        .await
        .expect("cancel");
    let cancelled = Instant::now();
    // The upload is leased: the cancellation only marks the task.
    assert_eq!(tasks[0].state, TaskState::InProgress, "{tasks:?}");
    assert!(tasks[0].cancel_requested_at.is_some(), "{tasks:?}");
    recipient.open.send_replace(true);

    let deadline = Instant::now() + Duration::from_secs(30);
    while task(&shared).await.state == TaskState::InProgress {
        assert!(
            Instant::now() < deadline,
            "the task stays IN_PROGRESS: {:?}, calls {:?}",
            upload_row(&shared).await,
            recipient.held().calls
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).expect("worker watch");
    worker.await.expect("worker");

    let after = recipient.calls_since(cancelled);
    assert!(after.is_empty(), "called after the cancellation: {after:?}");
    let calls = recipient.held().calls.clone();
    assert!(
        !calls.iter().any(|(_, c)| *c == Call::Complete),
        "the part was closed: {calls:?}"
    );
    let files = recipient.held().files.clone();
    assert_eq!(files.len(), at_once, "{files:?}");
    // The files on their way when the cancellation was found went to their end.
    assert!(files.values().all(|(_, whole)| *whole), "{files:?}");
    let t = task(&shared).await;
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
    assert!(
        t.reason
            .contains("is not delivered to recipient new-bookkeeper"),
        "{t:?}"
    );
    assert!(t.transfer_receipt.is_none(), "{t:?}");
    let (done_at, _) = upload_row(&shared).await;
    assert!(done_at.is_some(), "the upload is retired");
    let _ = stop_recipient.send(());
}

/// Files left to start when the cancellation is found: none of them does.
async fn a_transfer_cancelled_mid_file_starts_no_other_file(
    database_url: &str,
    dir: &std::path::Path,
) {
    cancelled_while_the_first_files_go(database_url, dir, 5).await;
}

/// Only its last files were on their way: they end, and the part is still not closed (the
/// task is read once more before closing it).
async fn a_transfer_cancelled_during_its_last_files_is_not_closed(
    database_url: &str,
    dir: &std::path::Path,
) {
    cancelled_while_the_first_files_go(database_url, dir, crate::uploader::FILES_AT_ONCE).await;
}

/// A send the recipient breaks off after two chunks of a file it was sent from byte 0 is
/// noted with where it began and what the recipient holds of it, not "from byte 0" alone,
/// which read as where it failed.
async fn a_broken_off_send_says_what_the_recipient_stored(
    database_url: &str,
    dir: &std::path::Path,
) {
    let stored = 2 * CHUNK as u64;
    let recipient = Recipient::new(true, Some(("invoices.csv", stored)));
    let (port, stop_recipient) = serve(dir, recipient.clone()).await;
    let app = App::build(config(dir, database_url)).await.expect("app");
    let shared = app.shared();
    exported(&shared, port, &[("invoices.csv", 3 * CHUNK as u64 + 7)]).await;
    let job = shared
        .store
        .claim_uploads(shared.clock.now_ms(), 10, 60_000)
        .await
        .expect("claim")
        .pop()
        .expect("the upload");
    crate::uploader::upload(&shared, job).await;

    let (done_at, error) = upload_row(&shared).await;
    assert_eq!(done_at, None);
    let error = error.expect("the attempt's error");
    assert!(
        error.contains(&format!(
            "sending invoices.csv (from byte 0; {stored} bytes stored) at recipient \
             new-bookkeeper: Unavailable"
        )),
        "{error}"
    );
    assert_eq!(task(&shared).await.state, TaskState::InProgress);
    let _ = stop_recipient.send(());
}

/// Contract end `r-1` (RETURN_THEN_DELETE to the recipient on `port`), whose return exported
/// `files` (name, size), recorded as the runner's export step records it, its upload queued.
async fn returning(shared: &Shared, port: u16, files: &[(&str, u64)]) -> TaskKey {
    returning_due(shared, port, files, 600_000).await
}

/// [`returning`], due in `due_in_ms`.
async fn returning_due(
    shared: &Shared,
    port: u16,
    files: &[(&str, u64)],
    due_in_ms: i64,
) -> TaskKey {
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::ContractEnd as i32,
        parameters: Some(RequestParameters {
            contract_end: Some(ContractEnd {
                choice: ContractEndChoice::ReturnThenDelete as i32,
                effective_at: Some(timestamp_from_millis(now)),
                grace_ends_at: Some(timestamp_from_millis(now + 600_000)),
                return_confirmed: false,
                transfer_recipient: RECIPIENT.into(),
            }),
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(now + due_in_ms)),
        recipient: Some(TransferRecipient {
            name: RECIPIENT.into(),
            endpoint: format!("https://127.0.0.1:{port}"),
            identity: dev_identity("recipient", "example"),
            public_keys: Vec::new(),
        }),
        ..Default::default()
    };
    shared
        .store
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
        records_affected: 7,
        confirmed: true,
        note: "exported; returning".into(),
        next_attempt_at: Some(crate::task_machine::NEVER),
        export_files: Some(files),
        upload: true,
        contract: Some(ContractStep {
            phase: ContractPhase::Returning,
            progress: None,
            scheduled_at: None,
        }),
        ..Default::default()
    };
    shared
        .store
        .transition(&task.key, task.sequence, &export, now, 1)
        .await
        .expect("record the export")
        .expect("recorded");
    task.key
}

/// A contract end's return cancelled while the recipient closes its part (CompleteTransfer
/// under way, the recipient slow to answer) is marked, not moved; the recipient's receipt,
/// when it comes, ends the task CANCELLED with the receipt kept and in its acknowledgement,
/// saying the recipient received the data too late to stop, and neither waiting for a
/// confirmation nor deleting. Cancelled outright, the task dropped the receipt and never
/// said the recipient held the data.
async fn a_return_cancelled_while_its_part_is_closed_keeps_the_receipt(
    database_url: &str,
    dir: &std::path::Path,
) {
    let recipient = Recipient::new(true, None);
    recipient.closing.send_replace(false);
    let (port, stop_recipient) = serve(dir, recipient.clone()).await;
    let app = App::build(config(dir, database_url)).await.expect("app");
    let shared = app.shared();
    let key = returning(&shared, port, &[("customers.json", CHUNK as u64 + 10)]).await;

    let (stop, stopping) = watch::channel(false);
    let worker = tokio::spawn(crate::uploader::run(shared.clone(), stopping));
    tokio::time::timeout(
        Duration::from_secs(30),
        recipient.completing.subscribe().wait_for(|n| *n >= 1),
    )
    .await
    .expect("CompleteTransfer reaches the recipient")
    .expect("completing");
    let now = shared.clock.now_ms();
    let tasks = shared
        .store
        .cancel("acme", "r-1", "the subject withdrew", now)
        .await
        .expect("cancel");
    // The part is being closed: the cancellation only marks the task.
    assert_eq!(tasks[0].state, TaskState::InProgress, "{tasks:?}");
    assert!(tasks[0].cancel_requested_at.is_some(), "{tasks:?}");
    recipient.closing.send_replace(true);

    let deadline = Instant::now() + Duration::from_secs(30);
    while task(&shared).await.state == TaskState::InProgress {
        assert!(
            Instant::now() < deadline,
            "the task stays IN_PROGRESS: {:?}, {:?}",
            task(&shared).await,
            upload_row(&shared).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).expect("worker watch");
    worker.await.expect("worker");

    let t = task(&shared).await;
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
    assert_eq!(t.phase, ContractPhase::Returning, "{t:?}");
    let receipt = t.transfer_receipt.clone().expect("the receipt is kept");
    assert_eq!(receipt.recipient, RECIPIENT);
    assert!(
        t.note.contains("received by recipient new-bookkeeper")
            && t.note.contains("too late to stop"),
        "{t:?}"
    );
    let (done_at, _) = upload_row(&shared).await;
    assert!(done_at.is_some(), "the upload is retired");
    let calls = recipient.held().calls.clone();
    let closes = calls.iter().filter(|(_, c)| *c == Call::Complete).count();
    assert_eq!(closes, 1, "{calls:?}");

    let payload: Vec<u8> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE controller = $1 AND request_id = $2 \
         AND subprocessor = $3 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .fetch_one(&shared.store.db().pool)
    .await
    .expect("the last acknowledgement");
    let ack = Acknowledgement::decode(payload.as_slice()).expect("ack");
    assert_eq!(ack.state, TaskState::Cancelled as i32, "{ack:?}");
    let evidence = ack.evidence.expect("evidence");
    assert_eq!(
        evidence.transfer_receipt,
        Some(receipt),
        "{:?}",
        evidence.note
    );
    assert_eq!(
        ack.progress.map(|p| p.phase),
        Some(ContractPhase::Returning as i32)
    );
    let _ = stop_recipient.send(());
}

/// A contract end's return cancelled while the recipient closes its part, whose closing then
/// fails after the due date passed, ends CANCELLED (nothing delivered, nothing deleted), and
/// no acknowledgement after the mark says an attempt failed. Decided on the task as the
/// attempt first read it, the failure overwrote the mark: FAILED at the due date (or
/// "attempt 1 failed … retrying" before it).
async fn a_return_cancelled_while_its_part_fails_to_close_ends_cancelled(
    database_url: &str,
    dir: &std::path::Path,
) {
    let mut recipient = Recipient::new(true, None);
    recipient.fail_close = true;
    // Held whole from an earlier attempt: no file goes, so nothing notes this attempt under
    // way, whose note made the uploader read the task again after a failure.
    (recipient.held().files).insert("customers.json".into(), (10, true));
    recipient.closing.send_replace(false);
    let (port, stop_recipient) = serve(dir, recipient.clone()).await;
    let app = App::build(config(dir, database_url)).await.expect("app");
    let shared = app.shared();
    let due_in = 3_000;
    let started = shared.clock.now_ms();
    let key = returning_due(&shared, port, &[("customers.json", 10)], due_in).await;

    let (stop, stopping) = watch::channel(false);
    let worker = tokio::spawn(crate::uploader::run(shared.clone(), stopping));
    tokio::time::timeout(
        Duration::from_secs(30),
        recipient.completing.subscribe().wait_for(|n| *n >= 1),
    )
    .await
    .expect("CompleteTransfer reaches the recipient")
    .expect("completing");
    let now = shared.clock.now_ms();
    let tasks = shared
        .store
        .cancel("acme", "r-1", "the subject withdrew", now)
        .await
        .expect("cancel");
    assert!(tasks[0].cancel_requested_at.is_some(), "{tasks:?}");
    let marked_at: i64 = sqlx::query_scalar("SELECT MAX(sequence) FROM ack_outbox")
        .fetch_one(&shared.store.db().pool)
        .await
        .expect("the last acknowledgement");
    // Past the due date, where a failure decided without the mark gives up (FAILED).
    let past_due = (started + due_in + 200 - shared.clock.now_ms()).max(0);
    tokio::time::sleep(Duration::from_millis(past_due as u64)).await;
    recipient.closing.send_replace(true);

    let deadline = Instant::now() + Duration::from_secs(30);
    while task(&shared).await.state == TaskState::InProgress {
        assert!(
            Instant::now() < deadline,
            "the task stays IN_PROGRESS: {:?}, {:?}",
            task(&shared).await,
            upload_row(&shared).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).expect("worker watch");
    worker.await.expect("worker");

    let t = task(&shared).await;
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
    assert!(t.transfer_receipt.is_none(), "{t:?}");
    assert!(t.reason.contains("is not delivered to"), "{t:?}");
    let (done_at, _) = upload_row(&shared).await;
    assert!(done_at.is_some(), "the upload is retired");
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE controller = $1 AND request_id = $2 \
         AND subprocessor = $3 AND sequence > $4 ORDER BY sequence",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .bind(marked_at)
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("the acknowledgements after the mark");
    let acks: Vec<Acknowledgement> = payloads
        .iter()
        .map(|p| Acknowledgement::decode(p.as_slice()).expect("ack"))
        .collect();
    let states: Vec<i32> = acks.iter().map(|a| a.state).collect();
    assert_eq!(states, [TaskState::Cancelled as i32], "{acks:?}");
    let _ = stop_recipient.send(());
}

on_both!(
    a_return_cancelled_while_its_part_fails_to_close_ends_cancelled,
    a_return_cancelled_while_its_part_is_closed_keeps_the_receipt,
    a_transfer_cancelled_mid_file_starts_no_other_file,
    a_transfer_cancelled_during_its_last_files_is_not_closed,
    a_broken_off_send_says_what_the_recipient_stored,
);
