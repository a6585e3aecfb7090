//! An upload's lease while one of its files is sent, through the processor's real store
//! (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server), uploader and a
//! controller's registry played by the test over mTLS, which takes one large file slowly:
//! a chunk at a time, [`PACE`] apart, for several times `uploads.lease_ms`. The sender
//! renews its lease while the file goes, so no other claim takes the upload and the file
//! goes once, in one stream; a sender whose lease another claim took stops mid-file, and
//! records nothing over the new holder's claim. Leases are on the database's clock, so
//! nothing here moves a clock: the file simply takes that long.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::export_upload_service_server::{
    ExportUploadService, ExportUploadServiceServer,
};
use dsrelay_proto::v1::{
    CompletePartRequest, CompletePartResponse, DeliverRequest, ExportFileHeader,
    GetUploadStateRequest, RequestKind, TaskState, UploadFileChunk, UploadState,
};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::app::Shared;
use crate::store::{TaskKey, Transition};
use crate::upload_test_support as support;
use crate::{App, Config};
use tonic::service::Routes;

/// `uploads.lease_ms`: short, so the slow file outlasts it several times over, yet long
/// enough that a loaded 2-core machine renews it in time (every 333 ms, so a renewal may
/// come two thirds of a second late before the lease runs out).
const LEASE_MS: u64 = 1_000;

/// How long the registry waits before it takes each chunk of the slow part of [`SLOW`]: a
/// small part of the lease, so the sender sees its file move well within `lease_ms` (and
/// within `stall_ms`, how long a send may go without the destination taking a chunk, set
/// as short here).
const PACE: Duration = Duration::from_millis(200);

/// Chunks of [`SLOW`] taken [`PACE`] apart: 18 of them make over three leases' worth.
const SLOW_CHUNKS: u64 = 18;

/// The slow file.
const SLOW: &str = "large.json";

/// The size of [`SLOW`]: its slow part, then 10 MiB taken as fast as they come. More than
/// the sender can have on its way unread (the registry's 4 MiB stream window and the
/// client's buffers), so the sender never reaches the file's end while the registry is
/// slow, and its last chunks are not left waiting `PACE` each for an answer.
const SLOW_SIZE: u64 = (SLOW_CHUNKS + 10) * crate::uploader::CHUNK as u64 + 12_345;

/// One UploadFile call, as the registry saw it.
#[derive(Debug, Clone)]
struct Stream {
    name: String,
    /// The offset of its first chunk.
    from: u64,
    began: Instant,
    /// How long it took to store the file whole (`None`: it never did).
    took: Option<Duration>,
}

/// One file as the registry holds it.
struct Stored {
    header: ExportFileHeader,
    bytes: u64,
    hasher: Sha256,
    complete: bool,
    /// An UploadFile call is storing it now.
    busy: bool,
}

#[derive(Default)]
struct Held {
    files: HashMap<String, Stored>,
    streams: Vec<Stream>,
    /// CompletePart calls that stored the part.
    parts: usize,
}

/// The controller's registry as far as uploads go: it stores files (counting their bytes
/// and hashing them, keeping no content), resumes them where they stand, refuses a second
/// upload of a file while one is in progress and checks every file whole before a part is
/// stored, as the registry does.
#[derive(Clone)]
struct Registry {
    held: Arc<Mutex<Held>>,
    /// Bytes of [`SLOW`] stored so far.
    slow_stored: watch::Sender<u64>,
}

impl Registry {
    fn new() -> Self {
        Self {
            held: Arc::default(),
            slow_stored: watch::channel(0).0,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().expect("held")
    }

    /// Every UploadFile call of `name` so far.
    fn streams_of(&self, name: &str) -> Vec<Stream> {
        self.held()
            .streams
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// Stores `chunk` of `name`, sent by the UploadFile call `streams[index]`.
    fn store(&self, name: &str, index: usize, chunk: &UploadFileChunk) -> Result<(), Status> {
        let mut held = self.held();
        let f = held
            .files
            .get_mut(name)
            .ok_or_else(|| Status::internal("the file is gone"))?;
        if chunk.offset != f.bytes {
            return Err(Status::failed_precondition(format!(
                "expected offset {}",
                f.bytes
            )));
        }
        if dsrelay_runtime::export_files::chunk_crc32(&chunk.data) != chunk.chunk_crc32 {
            return Err(Status::data_loss("chunk CRC-32 mismatch"));
        }
        f.bytes += chunk.data.len() as u64;
        if f.bytes > f.header.size {
            return Err(Status::invalid_argument("data past the file's size"));
        }
        f.hasher.update(&chunk.data);
        if f.bytes == f.header.size {
            let digest = hex::encode(f.hasher.clone().finalize());
            if digest != f.header.sha256 {
                f.bytes = 0;
                f.hasher = Sha256::new();
                return Err(Status::data_loss("SHA-256 mismatch"));
            }
            f.complete = true;
            let stream = &mut held.streams[index];
            stream.took = Some(stream.began.elapsed());
        }
        if name == SLOW {
            let bytes = held.files.get(name).map_or(0, |f| f.bytes);
            self.slow_stored.send_replace(bytes);
        }
        Ok(())
    }

    fn state(&self, name: &str) -> UploadState {
        self.held()
            .files
            .get(name)
            .map(|f| UploadState {
                offset: f.bytes,
                complete: f.complete,
            })
            .unwrap_or_default()
    }
}

/// Marks a file free for the next UploadFile call once this one ends, however it ends (the
/// server drops a call whose stream the sender reset).
struct Busy {
    registry: Registry,
    name: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(f) = self.registry.held().files.get_mut(&self.name) {
            f.busy = false;
        }
    }
}

#[tonic::async_trait]
impl ExportUploadService for Registry {
    async fn get_upload_state(
        &self,
        req: Request<GetUploadStateRequest>,
    ) -> Result<Response<UploadState>, Status> {
        let header = req
            .into_inner()
            .header
            .ok_or_else(|| Status::invalid_argument("no header"))?;
        Ok(Response::new(self.state(&header.name)))
    }

    async fn upload_file(
        &self,
        req: Request<Streaming<UploadFileChunk>>,
    ) -> Result<Response<UploadState>, Status> {
        let mut chunks = req.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no message"))?;
        let header = first
            .header
            .clone()
            .ok_or_else(|| Status::invalid_argument("no header"))?;
        let name = header.name.clone();
        let index = {
            let mut held = self.held();
            let f = held.files.entry(name.clone()).or_insert_with(|| Stored {
                header: header.clone(),
                bytes: 0,
                hasher: Sha256::new(),
                complete: false,
                busy: false,
            });
            if f.busy {
                return Err(Status::aborted("an upload of this file is in progress"));
            }
            f.busy = true;
            held.streams.push(Stream {
                name: name.clone(),
                from: first.offset,
                began: Instant::now(),
                took: None,
            });
            held.streams.len() - 1
        };
        let _busy = Busy {
            registry: self.clone(),
            name: name.clone(),
        };
        let slow_until = SLOW_CHUNKS * crate::uploader::CHUNK as u64;
        let mut next = Some(first);
        while let Some(chunk) = next {
            if name == SLOW && chunk.offset < slow_until {
                tokio::time::sleep(PACE).await;
            }
            self.store(&name, index, &chunk)?;
            next = chunks.message().await?;
        }
        Ok(Response::new(self.state(&name)))
    }

    async fn complete_part(
        &self,
        req: Request<CompletePartRequest>,
    ) -> Result<Response<CompletePartResponse>, Status> {
        let files = req.into_inner().files;
        let mut held = self.held();
        for h in &files {
            let whole = held
                .files
                .get(&h.name)
                .is_some_and(|f| f.complete && f.header.sha256 == h.sha256);
            if !whole {
                return Err(Status::failed_precondition(format!(
                    "{} is not stored whole",
                    h.name
                )));
            }
        }
        held.parts += 1;
        Ok(Response::new(CompletePartResponse {
            stored_at: Some(timestamp_from_millis(0)),
        }))
    }
}

/// Serves the registry with the development PKI's registry certificate.
async fn serve_registry(dir: &std::path::Path) -> (Registry, u16, oneshot::Sender<()>) {
    let registry = Registry::new();
    let routes = Routes::new(ExportUploadServiceServer::new(registry.clone()));
    let (port, stop) = support::serve(dir, "registry", routes).await;
    (registry, port, stop)
}

fn config(dir: &std::path::Path, database_url: &str, registry: u16) -> Config {
    let uploads = format!(
        "lease_ms = {LEASE_MS}\nstall_ms = {LEASE_MS}\npoll_interval_ms = 50\n\
         call_timeout_ms = {}\nbackoff = {{ initial_ms = 20, max_ms = 100 }}",
        LEASE_MS / 2
    );
    support::config(
        dir,
        database_url,
        &format!("https://127.0.0.1:{registry}"),
        &uploads,
    )
}

/// A RETURN_OF_DATA (`r-1`, due in 10 minutes) whose task exported a small file and
/// [`SLOW`], recorded as the runner's export step records it, its upload queued.
async fn exported(shared: &Shared) -> TaskKey {
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::ReturnOfData as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
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
    let files = vec![
        support::write_file(shared, &task.key, "small.json", 1_000),
        support::write_file(shared, &task.key, SLOW, SLOW_SIZE),
    ];
    let export = Transition {
        state: TaskState::InProgress,
        note: "exported; uploading".into(),
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

async fn task_state(shared: &Shared) -> TaskState {
    shared
        .store
        .tasks("acme", "r-1")
        .await
        .expect("tasks")
        .pop()
        .expect("the task")
        .state
}

/// The upload's lease token, attempts and last error.
async fn upload_row(shared: &Shared) -> (Option<String>, i64, Option<String>) {
    sqlx::query_as("SELECT lease_owner, attempts, last_error FROM uploads")
        .fetch_one(&shared.store.db().pool)
        .await
        .expect("the upload")
}

/// Two upload workers on one database (as two replicas' would be) and a file that takes
/// over three leases to send: the lease renewed while it goes, neither worker claims the upload
/// a second time, the file goes once in one stream and the task is COMPLETED. Renewed only
/// between files (and each file's sending cut off after `stall_ms`), the upload was claimed
/// again and again, its large file sent in pieces by one attempt after another.
async fn a_file_longer_than_the_lease_goes_once(database_url: &str, dir: &std::path::Path) {
    let (registry, port, stop_registry) = serve_registry(dir).await;
    let app = App::build(config(dir, database_url, port))
        .await
        .expect("app");
    let shared = app.shared();
    exported(&shared).await;

    let (stop, stopping) = watch::channel(false);
    let workers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(crate::uploader::run(shared.clone(), stopping.clone())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while task_state(&shared).await == TaskState::InProgress {
        assert!(
            Instant::now() < deadline,
            "not delivered: {:?}, streams {:?}",
            upload_row(&shared).await,
            registry.held().streams
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).expect("workers watch");
    for w in workers {
        w.await.expect("worker");
    }

    assert_eq!(task_state(&shared).await, TaskState::Completed);
    let (owner, attempts, error) = upload_row(&shared).await;
    assert_eq!(
        (owner, attempts, error),
        (None, 1, None),
        "claimed once, and retired"
    );
    let streams = registry.streams_of(SLOW);
    assert_eq!(streams.len(), 1, "{streams:?}");
    assert_eq!(streams[0].from, 0, "{streams:?}");
    // The file did outlast the lease: the registry's pace alone makes it.
    let took = streams[0].took.expect("stored whole");
    assert!(took > Duration::from_millis(3 * LEASE_MS), "{took:?}");
    assert_eq!(registry.streams_of("small.json").len(), 1);
    assert_eq!(registry.held().parts, 1);
    let _ = stop_registry.send(());
}

/// A sender whose upload another claim took while it sent the slow file (its lease
/// released under it here, as a lease that ran out is, and the upload claimed again) learns
/// of it at its next renewal and stops mid-file: the file is never stored whole by that
/// stream, and nothing it records touches the new holder's claim.
async fn a_sender_whose_lease_was_taken_stops_mid_file(database_url: &str, dir: &std::path::Path) {
    let (registry, port, stop_registry) = serve_registry(dir).await;
    let app = App::build(config(dir, database_url, port))
        .await
        .expect("app");
    let shared = app.shared();
    exported(&shared).await;
    let mut jobs = shared
        .store
        .claim_uploads(shared.clock.now_ms(), 10, LEASE_MS as i64)
        .await
        .expect("claim");
    let first = jobs.pop().expect("the upload");
    let sender = {
        let (shared, first) = (shared.clone(), first.clone());
        tokio::spawn(async move { crate::uploader::upload(&shared, first).await })
    };
    registry
        .slow_stored
        .subscribe()
        .wait_for(|stored| *stored > 0)
        .await
        .expect("the slow file is being stored");

    shared
        .store
        .release_upload(first.claim())
        .await
        .expect("release");
    // On PostgreSQL a claim skips the row while a renewal of the first sender locks it: the
    // next poll takes it, as another replica's would.
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        let mut jobs = shared
            .store
            .claim_uploads(shared.clock.now_ms(), 10, 600_000)
            .await
            .expect("claim again");
        if let Some(job) = jobs.pop() {
            break job;
        }
        assert!(Instant::now() < deadline, "the upload is not claimed again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("the first sender stops")
        .expect("sender");

    assert!(
        !registry.state(SLOW).complete,
        "the first sender went on sending: {:?}",
        registry.streams_of(SLOW)
    );
    assert_eq!(task_state(&shared).await, TaskState::InProgress);
    let (owner, attempts, error) = upload_row(&shared).await;
    assert_eq!(
        (owner.as_deref(), attempts, error),
        (Some(second.lease_owner.as_str()), 2, None),
        "the new holder's claim stands"
    );
    assert_eq!(registry.held().parts, 0);
    let _ = stop_registry.send(());
}

async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(String, std::path::PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    test(url, dir.path().to_path_buf()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_lease_a_file_longer_than_the_lease_goes_once_on_sqlite() {
    on_sqlite(|u, d| async move { a_file_longer_than_the_lease_goes_once(&u, &d).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_lease_a_file_longer_than_the_lease_goes_once_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_file_longer_than_the_lease_goes_once(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_lease_a_sender_whose_lease_was_taken_stops_mid_file_on_sqlite() {
    on_sqlite(|u, d| async move { a_sender_whose_lease_was_taken_stops_mid_file(&u, &d).await })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_lease_a_sender_whose_lease_was_taken_stops_mid_file_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_sender_whose_lease_was_taken_stops_mid_file(&u, &d).await
    })
    .await;
}
