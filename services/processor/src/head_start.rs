//! A return of data's export files sent to the registry while the connector still writes
//! them, so that a large export's upload overlaps its writing instead of following it.
//!
//! The runner watches the task's export sink ([`watch`]); every file the connector opens is
//! streamed to the registry as an upload whose size and SHA-256 follow at its end
//! (`UploadFileChunk.size_follows` and `end`), read from the file as it grows. The runner's
//! step waits for these uploads (at most `uploads.call_timeout_ms` after the connector
//! returned) before it records the export, so the uploader then finds the files stored whole
//! (GetUploadState answers complete) and only closes the part.
//!
//! This is only a head start: nothing about it is recorded. A file it did not deliver (the
//! registry down or slow, the stream cut, the export failed, the processor stopped) is sent
//! by the uploader as before, from offset 0; the registry drops the partial file then.

use std::time::Duration;

use dsrelay_connectors::{ExportSink, GrowingFile};
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::{ExportFileHeader, FileEnd, UploadFileChunk};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::metrics::Metrics;
use crate::store::TaskKey;
use crate::uploader::CHUNK;

/// How long a stream may go without a message while its file waits for the connector: the
/// registry ends streams idle for its `call_limit_ms` (60 s by default), and an empty
/// message keeps this one open.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// How long a read may find the file shorter than its writer reported before the stream
/// gives up: the writer's last write can still be on its way to the file for a moment.
const SHORT_READ_PATIENCE: Duration = Duration::from_secs(10);

/// The uploads of one export's files while they are written.
pub(crate) struct HeadStart {
    files: mpsc::UnboundedReceiver<GrowingFile>,
    client: ExportUploadServiceClient<Channel>,
    key: TaskKey,
}

/// `sink`, watched, and the head start that sends its files to the registry behind
/// `client`; the head start does nothing until [`HeadStart::run`].
pub(crate) fn watch(
    sink: ExportSink,
    client: ExportUploadServiceClient<Channel>,
    key: &TaskKey,
) -> (ExportSink, HeadStart) {
    let (tx, files) = mpsc::unbounded_channel();
    let head = HeadStart {
        files,
        client,
        key: key.clone(),
    };
    (sink.watched(tx), head)
}

impl HeadStart {
    /// Sends every file the sink opens, each on a stream of its own, until `connector_done`
    /// resolves; then waits up to `tail` for the streams still sending (the connector's last
    /// bytes, each file's end) and drops those it cuts off. Answers the files delivered.
    pub(crate) async fn run(
        mut self,
        connector_done: impl std::future::Future<Output = ()>,
        tail: Duration,
        metrics: &Metrics,
    ) -> usize {
        let mut sending = JoinSet::new();
        let mut start = |file: GrowingFile| {
            let header = ExportFileHeader {
                request_id: self.key.request_id.clone(),
                subprocessor: self.key.subprocessor.clone(),
                name: file.meta.name.clone(),
                media_type: file.meta.media_type.clone(),
                categories: file.meta.categories.clone(),
                size: 0,
                sha256: String::new(),
            };
            sending.spawn(send(self.client.clone(), header, file));
        };
        tokio::pin!(connector_done);
        loop {
            tokio::select! {
                Some(file) = self.files.recv() => start(file),
                () = &mut connector_done => break,
            }
        }
        // Files are announced as they are opened, so every one is queued by now.
        while let Ok(file) = self.files.try_recv() {
            start(file);
        }
        let subprocessor = self.key.subprocessor.as_str();
        let mut delivered = 0;
        let finished = tokio::time::timeout(tail, async {
            while let Some(joined) = sending.join_next().await {
                match joined {
                    Ok(Ok((name, bytes))) => {
                        delivered += 1;
                        metrics.export_sent(subprocessor, true, bytes);
                        tracing::debug!(file = %name, bytes, "export file sent while written");
                    }
                    Ok(Err(why)) => {
                        tracing::info!(%why, "an export file's head start failed; the uploader sends it");
                    }
                    Err(e) => tracing::warn!(error = %e, "an export file's head start panicked"),
                }
            }
        })
        .await;
        if finished.is_err() {
            tracing::info!(
                still_sending = sending.len(),
                "export files still sending {} ms after the export ended were cut off; the \
                 uploader sends them",
                tail.as_millis()
            );
        }
        delivered
    }
}

/// Streams `file` to the registry as it grows; answers its name and size once the registry
/// holds it whole, or why not.
async fn send(
    mut client: ExportUploadServiceClient<Channel>,
    header: ExportFileHeader,
    file: GrowingFile,
) -> Result<(String, u64), String> {
    let name = header.name.clone();
    let reader = tokio::fs::File::open(&file.path)
        .await
        .map_err(|e| format!("opening {name} to send it: {e}"))?;
    let outcome = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let chunks = futures::stream::unfold(
        Growing {
            reader,
            growth: file.growth,
            offset: 0,
            header: Some(header),
            ended: false,
            outcome: outcome.clone(),
        },
        |mut g| async move {
            let chunk = g.next().await?;
            Some((chunk, g))
        },
    );
    let state = client.upload_file(chunks).await;
    if let Some(why) = outcome.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(why);
    }
    let state = state
        .map_err(|s| format!("sending {name}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if state.complete {
        Ok((name, state.offset))
    } else {
        Err(format!(
            "the registry holds {} bytes of {name}, not all of it",
            state.offset
        ))
    }
}

/// One file being streamed as it grows.
struct Growing {
    reader: tokio::fs::File,
    growth: tokio::sync::watch::Receiver<dsrelay_connectors::Growth>,
    /// Bytes sent so far.
    offset: u64,
    /// Sent with the first message, then gone.
    header: Option<ExportFileHeader>,
    /// The end was sent: nothing follows.
    ended: bool,
    /// Why the stream stopped without the file's end, when it did.
    outcome: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Growing {
    /// The next message: the header at once (so the registry drops any earlier partial
    /// file while the connector works), then chunks as the file grows, empty messages while
    /// it waits, and the end. `None` ends the stream: after the end, or when the file was
    /// abandoned or cannot be read (the reason is kept in `outcome`).
    async fn next(&mut self) -> Option<UploadFileChunk> {
        if self.ended {
            return None;
        }
        if let Some(header) = self.header.take() {
            return Some(UploadFileChunk {
                header: Some(header),
                size_follows: true,
                ..Default::default()
            });
        }
        loop {
            let growth = self.growth.borrow_and_update().clone();
            let ready = growth.written.saturating_sub(self.offset);
            if ready >= CHUNK as u64 || (growth.end.is_some() && ready > 0) {
                return match self.read(ready.min(CHUNK as u64) as usize).await {
                    Ok(chunk) => Some(chunk),
                    Err(why) => self.stop(why),
                };
            }
            if let Some(end) = growth.end {
                self.ended = true;
                return Some(UploadFileChunk {
                    offset: self.offset,
                    end: Some(FileEnd {
                        size: end.size,
                        sha256: end.sha256,
                    }),
                    ..Default::default()
                });
            }
            tokio::select! {
                changed = self.growth.changed() => {
                    if changed.is_err() && self.growth.borrow().end.is_none() {
                        return self.stop("the export of the file was abandoned".into());
                    }
                }
                () = tokio::time::sleep(KEEPALIVE) => {
                    return Some(UploadFileChunk {
                        offset: self.offset,
                        ..Default::default()
                    });
                }
            }
        }
    }

    /// The next `len` bytes as a chunk.
    async fn read(&mut self, len: usize) -> Result<UploadFileChunk, String> {
        let mut data = vec![0u8; len];
        let mut filled = 0;
        let mut waited = Duration::ZERO;
        while filled < len {
            let n = self
                .reader
                .read(&mut data[filled..])
                .await
                .map_err(|e| format!("reading the file: {e}"))?;
            if n == 0 {
                if waited >= SHORT_READ_PATIENCE {
                    return Err(format!(
                        "the file ends at byte {} although its writer reported {}",
                        self.offset + filled as u64,
                        self.offset + len as u64
                    ));
                }
                let pause = Duration::from_millis(1);
                tokio::time::sleep(pause).await;
                waited += pause;
                continue;
            }
            filled += n;
        }
        let chunk = UploadFileChunk {
            offset: self.offset,
            chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(&data),
            data: data.into(),
            ..Default::default()
        };
        self.offset += len as u64;
        Ok(chunk)
    }

    fn stop(&mut self, why: String) -> Option<UploadFileChunk> {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.ended = true;
        None
    }
}
