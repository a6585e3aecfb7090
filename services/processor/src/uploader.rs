//! Uploads each written RETURN_OF_DATA export to its controller's registry
//! (`ExportUploadService`), file by file in 1 MiB chunks, resuming every file where the
//! registry's `GetUploadState` says it stands; then declares the part complete and moves the
//! task to COMPLETED through the task machine, so the acknowledgement carries it.
//!
//! Failures of the call (registry down, a chunk damaged on the way) are retried with backoff
//! and jitter; an export that no longer matches what the connector wrote (a file vanished
//! or changed) fails the task with the reason. Files are read in chunks, never whole.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dsrelay_connectors::ExportedFile;
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::{
    CompletePartRequest, ExportFileHeader, GetUploadStateRequest, TaskState, UploadFileChunk,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::Code;

use crate::app::Shared;
use crate::store::{TaskKey, UploadJob};
use crate::task_machine::{decide, Context, Decision, Event};

/// Bytes of a file in one message: the most the registry takes.
pub(crate) const CHUNK: usize = 1024 * 1024;

/// Runs until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.config.uploads.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let jobs = match shared
            .store
            .claim_uploads(
                shared.clock.now_ms(),
                i64::from(cfg.concurrency),
                cfg.lease_ms as i64,
            )
            .await
        {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "claiming uploads failed");
                Vec::new()
            }
        };
        let full = jobs.len() == cfg.concurrency as usize;
        futures::future::join_all(jobs.into_iter().map(|j| upload(&shared, j))).await;
        if full {
            continue;
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = shared.upload_wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(cfg.poll_interval_ms)) => {}
        }
    }
}

/// Why an upload did not finish.
#[derive(Debug)]
enum Failure {
    /// Try again later: the registry was unreachable or refused a chunk it wants again.
    Retry(String),
    /// The export cannot be delivered as written; the task fails with this reason.
    Undeliverable(String),
}

#[tracing::instrument(skip_all, fields(request_id = %job.key.request_id, subprocessor = %job.key.subprocessor))]
async fn upload(shared: &Shared, job: UploadJob) {
    if let Err(e) = try_upload(shared, &job).await {
        // The lease runs out and the upload is claimed again.
        tracing::error!(error = format!("{e:#}"), "recording an upload failed");
    }
}

async fn try_upload(shared: &Shared, job: &UploadJob) -> anyhow::Result<()> {
    let key = &job.key;
    let Some(task) = shared.store.task(key).await? else {
        return retire(shared, job, None, 0, 0).await;
    };
    if task.state != TaskState::InProgress {
        // Cancelled (or otherwise finished) meanwhile: nothing is waiting for the part.
        return retire(shared, job, None, task.sequence, task.attempts).await;
    }
    let event = match send_export(shared, job).await {
        Ok(()) => {
            tracing::info!(files = job.files.len(), "part stored at the registry");
            Event::Delivered {
                files: job.files.len(),
                bytes: job.files.iter().map(|f| f.size).sum(),
            }
        }
        Err(Failure::Undeliverable(reason)) => {
            tracing::warn!(%reason, "export cannot be delivered");
            let decision = decide(
                &task.current(),
                Event::Undeliverable { reason: &reason },
                &Context::at(shared.clock.now_ms()),
            );
            return record(shared, job, decision, task.sequence, task.attempts).await;
        }
        Err(Failure::Retry(error)) => {
            let cfg = &shared.config.uploads;
            let attempt = u32::try_from(job.attempts).unwrap_or(u32::MAX);
            let next = shared.clock.now_ms() + cfg.backoff.delay(attempt).as_millis() as i64;
            tracing::warn!(%error, "uploading an export failed; will retry");
            return shared.store.upload_failed(key, next, &error).await;
        }
    };
    let decision = decide(&task.current(), event, &Context::at(shared.clock.now_ms()));
    record(shared, job, decision, task.sequence, task.attempts).await
}

/// Records what the task machine decided and retires the upload.
async fn record(
    shared: &Shared,
    job: &UploadJob,
    decision: Decision,
    sequence: i64,
    attempts: i64,
) -> anyhow::Result<()> {
    match decision {
        Decision::Move(t) => retire(shared, job, Some(&t), sequence, attempts).await,
        _ => retire(shared, job, None, sequence, attempts).await,
    }
}

async fn retire(
    shared: &Shared,
    job: &UploadJob,
    t: Option<&crate::task_machine::Transition>,
    sequence: i64,
    attempts: i64,
) -> anyhow::Result<()> {
    let moved = shared
        .store
        .upload_finished(&job.key, sequence, t, shared.clock.now_ms(), attempts)
        .await?;
    if moved.is_some() {
        shared.ack_wakeup.notify_one();
    }
    Ok(())
}

/// Sends every file of the export the registry does not hold whole yet, then declares the
/// part complete.
async fn send_export(shared: &Shared, job: &UploadJob) -> Result<(), Failure> {
    let key = &job.key;
    let Some(client) = shared.uploaders.get(&key.controller) else {
        return Err(Failure::Undeliverable(format!(
            "controller {} is no longer configured",
            key.controller
        )));
    };
    let cfg = &shared.config.uploads;
    let dir = crate::exports::task_dir(&shared.config.data_dir, key);
    let headers: Vec<ExportFileHeader> = job.files.iter().map(|f| header(key, f)).collect();
    for (f, header) in job.files.iter().zip(&headers) {
        let path = dir.join(&f.name);
        check_file(&path, f).await?;
        let mut req = tonic::Request::new(GetUploadStateRequest {
            header: Some(header.clone()),
        });
        req.set_timeout(Duration::from_millis(cfg.call_timeout_ms));
        let state = client
            .clone()
            .get_upload_state(req)
            .await
            .map_err(|s| refused("asking the upload state", &s))?
            .into_inner();
        if !state.complete {
            send_file(client, &path, header, state.offset, cfg.lease_ms).await?;
        }
        let until = shared.clock.now_ms() + cfg.lease_ms as i64;
        if let Err(e) = shared.store.extend_upload_lease(key, until).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "extending an upload's lease failed"
            );
        }
    }
    let mut req = tonic::Request::new(CompletePartRequest {
        request_id: key.request_id.clone(),
        subprocessor: key.subprocessor.clone(),
        files: headers,
    });
    req.set_timeout(Duration::from_millis(cfg.call_timeout_ms));
    client
        .clone()
        .complete_part(req)
        .await
        .map_err(|s| refused("completing the part", &s))?;
    Ok(())
}

/// The header the registry gets for `f`.
fn header(key: &TaskKey, f: &ExportedFile) -> ExportFileHeader {
    ExportFileHeader {
        request_id: key.request_id.clone(),
        subprocessor: key.subprocessor.clone(),
        name: f.name.clone(),
        media_type: f.media_type.clone(),
        categories: f.categories.clone(),
        size: f.size,
        sha256: f.sha256.clone(),
    }
}

/// Checks that the file at `path` is still the one the connector wrote: its size and
/// SHA-256, read in chunks.
async fn check_file(path: &Path, f: &ExportedFile) -> Result<(), Failure> {
    let mut file = open(path, f).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| Failure::Retry(format!("reading export file {}: {e}", f.name)))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let digest = hex::encode(hasher.finalize());
    if size != f.size || digest != f.sha256 {
        return Err(Failure::Undeliverable(format!(
            "export file {} changed at the processor: {size} bytes with SHA-256 {digest}, \
             written as {} bytes with SHA-256 {}",
            f.name, f.size, f.sha256
        )));
    }
    Ok(())
}

async fn open(path: &Path, f: &ExportedFile) -> Result<tokio::fs::File, Failure> {
    tokio::fs::File::open(path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Failure::Undeliverable(format!(
                "export file {} vanished from the processor's data folder",
                f.name
            ))
        } else {
            Failure::Retry(format!("opening export file {}: {e}", f.name))
        }
    })
}

/// Streams the file at `path` from `offset` to its end, in chunks of [`CHUNK`] bytes with
/// their digests; the first message carries the header.
async fn send_file(
    client: &ExportUploadServiceClient<Channel>,
    path: &Path,
    header: &ExportFileHeader,
    offset: u64,
    timeout_ms: u64,
) -> Result<(), Failure> {
    let meta = ExportedFile {
        name: header.name.clone(),
        media_type: String::new(),
        categories: Vec::new(),
        size: header.size,
        sha256: header.sha256.clone(),
    };
    let mut file = open(path, &meta).await?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| Failure::Retry(format!("reading export file {}: {e}", header.name)))?;
    let first = Some(header.clone());
    let chunks = futures::stream::unfold(
        (file, offset, first, false),
        |(mut file, offset, header, done)| async move {
            if done {
                return None;
            }
            let mut data = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match file.read(&mut data[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    // The stream ends short; the registry's answer says where it stopped and
                    // the next attempt checks the file again.
                    Err(_) => break,
                }
            }
            data.truncate(filled);
            if filled == 0 && header.is_none() {
                return None;
            }
            let chunk = UploadFileChunk {
                header,
                offset,
                chunk_sha256: hex::encode(Sha256::digest(&data)),
                data,
            };
            let next = offset + filled as u64;
            Some((chunk, (file, next, None, filled == 0)))
        },
    );
    let mut req = tonic::Request::new(chunks);
    req.set_timeout(Duration::from_millis(timeout_ms));
    let state = client
        .clone()
        .upload_file(req)
        .await
        .map_err(|s| refused(&format!("uploading {}", header.name), &s))?
        .into_inner();
    if !state.complete {
        return Err(Failure::Retry(format!(
            "the registry holds {} of {} bytes of {} after the upload",
            state.offset, header.size, header.name
        )));
    }
    Ok(())
}

/// What a refusal by the registry means for the export: input it will never take, or a
/// request it does not route to us, fails the task; anything else is tried again.
fn refused(doing: &str, s: &tonic::Status) -> Failure {
    let error = format!("{doing}: {:?}: {}", s.code(), s.message());
    match s.code() {
        Code::InvalidArgument | Code::NotFound | Code::PermissionDenied => {
            Failure::Undeliverable(error)
        }
        _ => Failure::Retry(error),
    }
}
