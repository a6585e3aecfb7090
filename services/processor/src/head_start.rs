//! The export files of a return of data, or of a contract end returned to the registry, sent
//! to the registry while the connector still writes them, so that a large export's upload
//! overlaps its writing instead of following it.
//!
//! The runner watches the task's export sink ([`attach`]); every file the connector opens is
//! streamed to the registry as an upload whose size and SHA-256 follow at its end
//! (`UploadFileChunk.size_follows` and `end`). Its chunks are the writer's blocks, handed
//! over as they go to the file, so nothing is read back. The writer waits for this side
//! when it falls behind, but only `WATCHER_PATIENCE` for a block; past that it hands over no
//! more, and what follows is read from the file once it is written there. The
//! runner's step waits for these uploads ([`beside`]: at most `uploads.call_timeout_ms`
//! after the connector returned) before it records the export, so the uploader then finds
//! the files stored whole (GetUploadState answers complete) and only closes the part.
//!
//! This is only a head start: nothing about it is recorded. A file it did not deliver (the
//! registry down or slow, the stream cut, the export failed, the processor stopped) is sent
//! by the uploader as before, from offset 0; the registry drops the partial file then.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dsrelay_connectors::export::BLOCKS_AHEAD;
use dsrelay_connectors::{Block, ExportSink, GrowingFile, Growth};
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::{ExportFileHeader, FileEnd, UploadFileChunk};
use dsrelay_runtime::log_text::Said;
use dsrelay_runtime::tls::ReloadingChannel;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::app::Shared;
use crate::store::TaskKey;
use crate::uploader::{header, CHUNK};

// A block of the writer goes as one chunk.
const _: () = assert!(dsrelay_connectors::export::WRITE_BUFFER <= CHUNK);

/// How long a stream may go without a message while its file waits for the connector: the
/// registry ends streams idle for its `call_limit_ms` (60 s by default), and an empty
/// message keeps this one open.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// The uploads of one export's files while they are written.
pub(crate) struct HeadStart {
    files: mpsc::UnboundedReceiver<GrowingFile>,
    client: ExportUploadServiceClient<ReloadingChannel>,
    key: TaskKey,
}

/// `export` and, when it goes `to_registry` and the task's controller has an upload client,
/// its head start: the sink watched, and what sends its files ([`beside`] runs it).
pub(crate) fn attach(
    shared: &Shared,
    key: &TaskKey,
    export: Option<ExportSink>,
    to_registry: bool,
) -> (Option<ExportSink>, Option<HeadStart>) {
    match (export, shared.uploaders.get(&key.controller)) {
        (Some(sink), Some(client)) if to_registry => {
            let (sink, head) = watch(sink, client.clone(), key);
            (Some(sink), Some(head))
        }
        (export, _) => (export, None),
    }
}

/// Runs `connector` (the connector's call that writes the export) with `head` beside it:
/// the head start sends what the connector writes, and once the connector has returned
/// gets at most `uploads.call_timeout_ms` to finish. Answers the connector's outcome.
pub(crate) async fn beside<T>(
    shared: &Shared,
    head: Option<HeadStart>,
    connector: impl std::future::Future<Output = T>,
) -> T {
    let Some(head) = head else {
        return connector.await;
    };
    let (connector_done, done) = tokio::sync::oneshot::channel::<()>();
    let connector = async {
        let outcome = connector.await;
        // Whatever the outcome, the head start sends what is finished and stops.
        let _ = connector_done.send(());
        outcome
    };
    let tail = Duration::from_millis(shared.config.uploads.call_timeout_ms);
    let head = head.run(
        async {
            let _ = done.await;
        },
        tail,
        shared,
    );
    tokio::join!(connector, head).0
}

/// `sink`, watched, and the head start that sends its files to the registry behind
/// `client`; the head start does nothing until [`HeadStart::run`].
fn watch(
    sink: ExportSink,
    client: ExportUploadServiceClient<ReloadingChannel>,
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
    /// bytes, each file's end) and drops those it cuts off.
    pub(crate) async fn run(
        mut self,
        connector_done: impl std::future::Future<Output = ()>,
        tail: Duration,
        shared: &Shared,
    ) {
        let metrics = &shared.metrics;
        let mut sending = JoinSet::new();
        let mut start = |file: GrowingFile| {
            // The file's size and digest are not known yet: the header leaves them empty.
            let header = header(&self.key, &file.meta);
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
        let finished = tokio::time::timeout(tail, async {
            while let Some(joined) = sending.join_next().await {
                match joined {
                    Ok(Ok((name, bytes))) => {
                        metrics.export_sent(subprocessor, true, bytes);
                        tracing::debug!(file = %name, bytes, "export file sent while written");
                    }
                    // Nothing records why: the uploader sends the file again, and what the
                    // registry says then is kept.
                    Ok(Err(why)) => tracing::info!(
                        why = %why.logged(shared.log_key()),
                        "an export file's head start failed; the uploader sends it"
                    ),
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
    }
}

/// Streams `file` to the registry as it grows; answers its name and size once the registry
/// holds it whole, or why not (quoting the registry's answer apart from the processor's words).
async fn send(
    mut client: ExportUploadServiceClient<ReloadingChannel>,
    header: ExportFileHeader,
    file: GrowingFile,
) -> Result<(String, u64), Said> {
    let name = header.name.clone();
    let outcome = Arc::new(Mutex::new(None::<String>));
    let chunks = futures::stream::unfold(
        Growing {
            reader: None,
            path: file.path,
            growth: file.growth,
            blocks: Some(file.blocks),
            waiting: VecDeque::new(),
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
        return Err(Said::ours(format!("{name}: {why}")));
    }
    let state = state
        .map_err(|s| Said::about_status(format!("sending {name}: {:?}", s.code()), &s))?
        .into_inner();
    if state.complete {
        Ok((name, state.offset))
    } else {
        Err(Said::ours(format!(
            "the registry holds {} bytes of {name}, not all of it",
            state.offset
        )))
    }
}

/// One file being streamed as it grows.
struct Growing {
    /// The file, opened at the first block that has to be read from it.
    reader: Option<tokio::fs::File>,
    path: std::path::PathBuf,
    growth: tokio::sync::watch::Receiver<Growth>,
    /// The writer's blocks; `None` once the writer dropped its end.
    blocks: Option<mpsc::Receiver<Block>>,
    /// Blocks received and not sent yet, in order.
    waiting: VecDeque<Block>,
    /// Bytes sent so far.
    offset: u64,
    /// Sent with the first message, then gone.
    header: Option<ExportFileHeader>,
    /// The end was sent: nothing follows.
    ended: bool,
    /// Why the stream stopped without the file's end, when it did.
    outcome: Arc<Mutex<Option<String>>>,
}

impl Growing {
    /// The next message: the header at once (so the registry drops any earlier partial
    /// file while the connector works), then chunks as the file grows (the writer's blocks
    /// as they are, or read from the file for blocks the writer could not hand over), empty
    /// messages while it waits, and the end. `None` ends the stream: after the end, or when
    /// the file was abandoned or cannot be read (the reason is kept in `outcome`).
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
            self.take_blocks();
            // The next bytes, if a block received holds them.
            if let Some(block) = self.waiting.pop_front() {
                if block.offset <= self.offset {
                    let skip = (self.offset - block.offset) as usize;
                    let data = block.data.slice(skip.min(block.data.len())..);
                    if data.is_empty() {
                        continue;
                    }
                    return Some(self.chunk(data));
                }
                self.waiting.push_front(block);
            }
            // Otherwise from the file: up to the next block received, or a whole chunk, or
            // the rest once the file is finished.
            let growth = self.growth.borrow_and_update().clone();
            let on_disk = growth.written.saturating_sub(self.offset);
            let gap = self.waiting.front().map(|b| b.offset - self.offset);
            if on_disk > 0 && (gap.is_some() || on_disk >= CHUNK as u64 || growth.end.is_some()) {
                let len = on_disk.min(CHUNK as u64).min(gap.unwrap_or(u64::MAX));
                return match self.read(len as usize).await {
                    Ok(data) => Some(self.chunk(data.into())),
                    Err(why) => self.stop(why),
                };
            }
            if let Some(end) = growth.end.filter(|e| e.size == self.offset) {
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
            let block = async {
                match self.blocks.as_mut() {
                    Some(b) => b.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                received = block, if self.waiting.len() < BLOCKS_AHEAD => match received {
                    Some(b) => self.waiting.push_back(b),
                    None => self.blocks = None,
                },
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

    /// Moves the blocks that arrived into `waiting`, dropping those already sent, never
    /// holding more than [`BLOCKS_AHEAD`]: when the export outpaces the stream, the writer
    /// then finds the channel full and waits, instead of this side taking every block out
    /// of the channel and holding the export in memory.
    fn take_blocks(&mut self) {
        self.drop_sent();
        if let Some(blocks) = self.blocks.as_mut() {
            while self.waiting.len() < BLOCKS_AHEAD {
                match blocks.try_recv() {
                    Ok(b) => self.waiting.push_back(b),
                    Err(_) => break,
                }
            }
        }
        self.drop_sent();
    }

    /// Drops the blocks in `waiting` that were sent already.
    fn drop_sent(&mut self) {
        while self
            .waiting
            .front()
            .is_some_and(|b| b.offset + b.data.len() as u64 <= self.offset)
        {
            self.waiting.pop_front();
        }
    }

    /// `data`, which starts at `offset`, as the next chunk.
    fn chunk(&mut self, data: Bytes) -> UploadFileChunk {
        let chunk = UploadFileChunk {
            offset: self.offset,
            chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(&data),
            data,
            ..Default::default()
        };
        self.offset += chunk.data.len() as u64;
        chunk
    }

    /// `len` bytes of the file from `offset`, all of which are written.
    async fn read(&mut self, len: usize) -> Result<Vec<u8>, String> {
        let reader = match &mut self.reader {
            Some(r) => r,
            None => self.reader.insert(
                tokio::fs::File::open(&self.path)
                    .await
                    .map_err(|e| format!("opening the file: {e}"))?,
            ),
        };
        reader
            .seek(std::io::SeekFrom::Start(self.offset))
            .await
            .map_err(|e| format!("reading the file: {e}"))?;
        let mut data = vec![0u8; len];
        reader.read_exact(&mut data).await.map_err(|e| {
            format!(
                "reading {len} bytes of the file at byte {}: {e}",
                self.offset
            )
        })?;
        Ok(data)
    }

    fn stop(&mut self, why: String) -> Option<UploadFileChunk> {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.ended = true;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An export that outpaces a stream that stalls (here it is not polled while the writer
    /// writes): the stream holds at most [`BLOCKS_AHEAD`] of the writer's blocks, the writer
    /// gives up waiting for it, and the stream reads the rest from the file; it still sends
    /// every byte in order, then the end with the file's size and digest.
    #[tokio::test]
    async fn a_lagging_stream_holds_few_blocks_and_reads_the_rest_from_the_file() {
        use sha2::Digest as _;
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut announced) = mpsc::unbounded_channel();
        let sink = ExportSink::new(dir.path().join("task"), Vec::new()).watched(tx);
        sink.reset().await.unwrap();
        let mut writer = sink.file("big.json", "application/json").await.unwrap();
        let file = announced.recv().await.unwrap();
        let mut growing = Growing {
            reader: None,
            path: file.path.clone(),
            growth: file.growth,
            blocks: Some(file.blocks),
            waiting: VecDeque::new(),
            offset: 0,
            header: Some(ExportFileHeader::default()),
            ended: false,
            outcome: Arc::new(Mutex::new(None)),
        };
        let header = growing.next().await.unwrap();
        assert!(header.size_follows);
        let block = dsrelay_connectors::export::WRITE_BUFFER;
        let mut sent = Vec::new();
        let mut most_held = 0;
        // Three blocks written for every chunk the stream sends.
        for round in 0..30u8 {
            writer.write(&vec![round; 3 * block]).await.unwrap();
            let chunk = growing.next().await.unwrap();
            most_held = most_held.max(growing.waiting.len());
            assert_eq!(chunk.offset, sent.len() as u64);
            sent.extend_from_slice(&chunk.data);
        }
        assert!(
            most_held <= BLOCKS_AHEAD,
            "held {most_held} blocks, more than {BLOCKS_AHEAD}"
        );
        let meta = writer.finish().await.unwrap();
        loop {
            let chunk = growing.next().await.unwrap();
            if let Some(end) = chunk.end {
                assert_eq!((end.size, &end.sha256), (meta.size, &meta.sha256));
                break;
            }
            assert_eq!(chunk.offset, sent.len() as u64);
            sent.extend_from_slice(&chunk.data);
        }
        assert!(growing.next().await.is_none());
        assert_eq!(sent.len() as u64, meta.size);
        let on_disk = std::fs::read(&file.path).unwrap();
        assert!(
            sent == on_disk,
            "the stream sent other bytes than the file holds"
        );
        assert_eq!(hex::encode(sha2::Sha256::digest(&sent)), meta.sha256);
    }
}
