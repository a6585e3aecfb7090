//! Resumed uploads through the real registry (its server over mutual TLS with the development
//! PKI's certificates, its store on SQLite, and on PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server), with a checkpoint interval of [`EVERY`] set
//! through [`BUILD_HOOK`] and a package store that counts the bytes read from it: a resumed
//! file's check reads at most what was stored past its checkpoint, however large the file.
//! And a stream's bytes are stored as it counted them, whatever another call does to the
//! file meanwhile, on this registry or on another replica of it.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::{
    CompletePartRequest, ExportFileHeader, FileEnd, GetUploadStateRequest, RequestKind,
    UploadFileChunk, UploadState,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

use super::{file_key, Appender, PackageStore, Packages};
use crate::store::PackageFile;
use crate::test_postgres::on_postgres;
use crate::test_registry::{self, Setup, PROCESSOR};

/// The checkpoint interval of these tests.
const EVERY: u64 = 64 * 1024;
/// Bytes per chunk sent: several per interval.
const PIECE: usize = 16 * 1024;

/// The folder store, counting the bytes read from it, and failing appenders' syncs once a
/// number of them succeeded (after syncing: an fsync that reports an error may have written).
struct Watched {
    inner: Arc<dyn PackageStore>,
    read: Arc<AtomicU64>,
    syncs_left: Arc<AtomicU64>,
    signals: Arc<Signals>,
}

/// What a test waits for the registry to have done, each told once when asked for.
#[derive(Default)]
struct Signals {
    /// A stored file opened to be read: a resumed upload hashing its tail.
    opened_at: Mutex<Option<oneshot::Sender<()>>>,
    /// An append done: the stream has opened its file, and checked it.
    appended: Mutex<Option<oneshot::Sender<()>>>,
    /// Set: the next appender is opened on the file at this path with these bytes appended
    /// first, and the file is then replaced under its name by one holding what it held
    /// before them (a file dropped and created again between the open and any later step).
    swap_on_open: Mutex<Option<(PathBuf, Vec<u8>)>>,
}

impl Signals {
    fn tell(slot: &Mutex<Option<oneshot::Sender<()>>>) {
        if let Some(tx) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
    }

    fn ask(slot: &Mutex<Option<oneshot::Sender<()>>>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }
}

#[tonic::async_trait]
impl PackageStore for Watched {
    async fn stored_len(&self, key: &str) -> std::io::Result<u64> {
        self.inner.stored_len(key).await
    }

    async fn appender(&self, key: &str, size: Option<u64>) -> std::io::Result<Box<dyn Appender>> {
        let swap = (self.signals.swap_on_open.lock())
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut before = Vec::new();
        if let Some((path, extra)) = &swap {
            use std::io::Write;
            before = std::fs::read(path)?;
            let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
            f.write_all(extra)?;
            f.sync_all()?;
        }
        let inner = self.inner.appender(key, size).await?;
        if let Some((path, _)) = &swap {
            std::fs::remove_file(path)?;
            std::fs::write(path, &before)?;
        }
        Ok(Box::new(FailingAppender {
            inner,
            syncs_left: self.syncs_left.clone(),
            signals: self.signals.clone(),
        }))
    }

    async fn open_at(
        &self,
        key: &str,
        offset: u64,
    ) -> std::io::Result<Box<dyn AsyncRead + Send + Unpin>> {
        let opened = Counted {
            inner: self.inner.open_at(key, offset).await?,
            read: self.read.clone(),
        };
        Signals::tell(&self.signals.opened_at);
        Ok(Box::new(opened))
    }

    async fn remove(&self, key: &str) -> std::io::Result<()> {
        self.inner.remove(key).await
    }

    async fn remove_all(&self, prefix: &str) -> std::io::Result<()> {
        self.inner.remove_all(prefix).await
    }
}

struct FailingAppender {
    inner: Box<dyn Appender>,
    syncs_left: Arc<AtomicU64>,
    signals: Arc<Signals>,
}

#[tonic::async_trait]
impl Appender for FailingAppender {
    async fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.inner.append(data).await?;
        Signals::tell(&self.signals.appended);
        Ok(())
    }

    async fn file_len(&mut self) -> std::io::Result<u64> {
        self.inner.file_len().await
    }

    async fn sync(&mut self) -> std::io::Result<()> {
        self.inner.sync().await?;
        self.syncs_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .map(drop)
            .map_err(|_| std::io::Error::other("the test's disk failed the sync"))
    }
}

struct Counted {
    inner: Box<dyn AsyncRead + Send + Unpin>,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::SeqCst);
        polled
    }
}

/// A running registry, stopped by [`Registry::stop`].
struct Registry {
    registry: test_registry::Registry,
    read: Arc<AtomicU64>,
    /// Syncs that succeed before the next fails ([`Watched`]); `u64::MAX` at the start.
    syncs_left: Arc<AtomicU64>,
    signals: Arc<Signals>,
}

impl std::ops::Deref for Registry {
    type Target = test_registry::Registry;

    fn deref(&self) -> &Self::Target {
        &self.registry
    }
}

impl Registry {
    /// Serves a registry on `database_url`, its files under `dir`, with one processor
    /// (whose endpoint nobody answers: its deliveries wait, and it may still upload).
    async fn start(dir: &Path, database_url: &str) -> Self {
        Self::replica(dir, database_url, "registry").await
    }

    /// [`Registry::start`] as the replica `name`: replicas started on the same `dir` and
    /// database share the package folder and the records, as a deployment's do.
    async fn replica(dir: &Path, database_url: &str, name: &'static str) -> Self {
        let read = Arc::new(AtomicU64::new(0));
        let syncs_left = Arc::new(AtomicU64::new(u64::MAX));
        let signals = Arc::new(Signals::default());
        let (r, f, s) = (read.clone(), syncs_left.clone(), signals.clone());
        let hook: Arc<dyn Fn(Packages) -> Packages + Send + Sync> = Arc::new(move |p| Packages {
            store: Arc::new(Watched {
                inner: p.store,
                read: r.clone(),
                syncs_left: f.clone(),
                signals: s.clone(),
            }),
            checkpoint_every: EVERY,
            ..p
        });
        let setup = Setup {
            replica: name,
            packages: Some(hook),
            ..Setup::default()
        };
        Self {
            registry: test_registry::Registry::start(dir, database_url, setup).await,
            read,
            syncs_left,
            signals,
        }
    }

    /// A new return of data, delivered (in the outbox) to the processor, whose task of
    /// `accounting` (the subprocessor of [`header`]'s files) the processor reported, so that
    /// the registry takes its part.
    async fn return_of_data(&self, key: &str) -> String {
        let id = self.submit(RequestKind::ReturnOfData, key).await;
        self.in_progress(&id, "accounting").await;
        id
    }

    /// Bytes read from the package store since the last call.
    fn read_since(&self) -> u64 {
        self.read.swap(0, Ordering::SeqCst)
    }

    /// Where the store keeps the file `h` announces.
    fn path(&self, h: &ExportFileHeader) -> PathBuf {
        self.package_dir().join(file_key(&PackageFile {
            request_id: h.request_id.clone(),
            processor: PROCESSOR.into(),
            subprocessor: h.subprocessor.clone(),
            name: h.name.clone(),
            media_type: String::new(),
            categories: String::new(),
            size: 0,
            sha256: String::new(),
        }))
    }

    /// Appends `data` to the stored file of `h` behind the registry's back: bytes an upload
    /// appended, durably, before the registry stopped short of recording them.
    fn append_behind(&self, h: &ExportFileHeader, data: &[u8]) {
        use std::io::Write;
        let path = self.path(h);
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("its folder");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .expect("the stored file");
        f.write_all(data).expect("appended");
        f.sync_all().expect("synced");
    }

    async fn stop(self) {
        self.registry.stop().await;
    }
}

/// `len` bytes no two files of these tests share.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn header(id: &str, name: &str, data: &[u8]) -> ExportFileHeader {
    ExportFileHeader {
        request_id: id.into(),
        subprocessor: "accounting".into(),
        name: name.into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(data)),
    }
}

/// The messages sending `data[from..to]` of the file `h` announces, in chunks of [`PIECE`],
/// the header in the first.
fn chunks(h: &ExportFileHeader, data: &[u8], from: usize, to: usize) -> Vec<UploadFileChunk> {
    let mut chunks = Vec::new();
    let mut at = from;
    while at < to || chunks.is_empty() {
        let end = (at + PIECE).min(to);
        chunks.push(UploadFileChunk {
            header: chunks.is_empty().then(|| h.clone()),
            offset: at as u64,
            data: data[at..end].to_vec().into(),
            chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(&data[at..end]),
            ..Default::default()
        });
        at = end;
    }
    chunks
}

/// Sends `data[from..to]` of the file `h` announces in one stream, in chunks of [`PIECE`].
async fn send(
    uploads: &mut ExportUploadServiceClient<Channel>,
    h: &ExportFileHeader,
    data: &[u8],
    from: usize,
    to: usize,
) -> Result<UploadState, tonic::Status> {
    Ok(uploads
        .upload_file(tokio_stream::iter(chunks(h, data, from, to)))
        .await?
        .into_inner())
}

/// An upload stream sending what is put in the sender answered, until it is dropped.
type Live = (
    futures::channel::mpsc::UnboundedSender<UploadFileChunk>,
    tokio::task::JoinHandle<Result<UploadState, tonic::Status>>,
);

fn live(uploads: &ExportUploadServiceClient<Channel>) -> Live {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let mut uploads = uploads.clone();
    let answer = tokio::spawn(async move { Ok(uploads.upload_file(rx).await?.into_inner()) });
    (tx, answer)
}

/// Sends `messages` down the upload stream `tx` for a registry that is to refuse them: it
/// answers as soon as it reads the chunk it refuses, which ends the stream, so what follows
/// may find it closed (and is not read anyway).
fn refused_after(
    tx: &futures::channel::mpsc::UnboundedSender<UploadFileChunk>,
    messages: impl IntoIterator<Item = UploadFileChunk>,
) {
    for m in messages {
        if tx.unbounded_send(m).is_err() {
            return;
        }
    }
}

/// `h` with another media type: the same file restarted under another header.
fn restarted(h: &ExportFileHeader) -> ExportFileHeader {
    ExportFileHeader {
        media_type: "application/octet-stream".into(),
        ..h.clone()
    }
}

/// Registers `again` (a file of `a` restarted under another header) as another replica of
/// `a` does, which `a` does not keep apart from its own streams: through a second replica on
/// PostgreSQL; on SQLite, which one process writes (it has no replicas: a second one's
/// transactions fail as busy), by leaving the records and the folder as that registration
/// leaves them.
async fn restart_elsewhere(a: &Registry, dir: &Path, database_url: &str, again: &ExportFileHeader) {
    if database_url.starts_with("sqlite") {
        let db = dsrelay_runtime::store::Db::connect(database_url)
            .await
            .expect("connect");
        sqlx::query(
            "UPDATE package_files SET media_type = $1, stored_at = NULL, \
             checkpoint_bytes = NULL, checkpoint_state = NULL, generation = generation + 2 \
             WHERE request_id = $2 AND name = $3",
        )
        .bind(&again.media_type)
        .bind(&again.request_id)
        .bind(&again.name)
        .execute(&db.pool)
        .await
        .expect("the header restarted");
        db.pool.close().await;
        std::fs::remove_file(a.path(again)).expect("the bytes dropped");
        return;
    }
    let b = Registry::replica(dir, database_url, "replica-b").await;
    let mut on_b = ExportUploadServiceClient::new(b.channel("processor"));
    assert_eq!(state(&mut on_b, again).await.expect("restarted").offset, 0);
    b.stop().await;
}

/// Registers the file `grow` announces (streamed while written) again as another replica of
/// `a` does, and stores `theirs` of it: through a second replica's upload stream on
/// PostgreSQL; on SQLite (see [`restart_elsewhere`]) by leaving the folder and the records
/// as that upload leaves them (the header is the same; its drop of the bytes is a new
/// generation).
async fn regrow_elsewhere(
    a: &Registry,
    dir: &Path,
    database_url: &str,
    grow: &ExportFileHeader,
    theirs: &[u8],
) {
    if database_url.starts_with("sqlite") {
        let db = dsrelay_runtime::store::Db::connect(database_url)
            .await
            .expect("connect");
        sqlx::query(
            "UPDATE package_files SET generation = generation + 1 WHERE request_id = $1 \
             AND name = $2",
        )
        .bind(&grow.request_id)
        .bind(&grow.name)
        .execute(&db.pool)
        .await
        .expect("the bytes' drop recorded");
        db.pool.close().await;
        std::fs::remove_file(a.path(grow)).expect("the bytes dropped");
        a.append_behind(grow, theirs);
        return;
    }
    let b = Registry::replica(dir, database_url, "replica-b").await;
    let mut on_b = ExportUploadServiceClient::new(b.channel("processor"));
    let mut messages = chunks(grow, theirs, 0, theirs.len());
    messages[0].size_follows = true;
    let sent = on_b
        .upload_file(tokio_stream::iter(messages))
        .await
        .expect("registered again")
        .into_inner();
    assert_eq!((sent.offset, sent.complete), (theirs.len() as u64, false));
    b.stop().await;
}

async fn state(
    uploads: &mut ExportUploadServiceClient<Channel>,
    h: &ExportFileHeader,
) -> Result<UploadState, tonic::Status> {
    Ok(uploads
        .get_upload_state(GetUploadStateRequest {
            header: Some(h.clone()),
        })
        .await?
        .into_inner())
}

/// A file 64 intervals long, sent in four streams cut at unaligned offsets: each resumed
/// stream reads at most one interval of what is stored (before, the last one read all of
/// it), GetUploadState reads nothing, and the file is stored whole and checked.
async fn a_resumed_upload_reads_one_interval_at_most(database_url: &str, dir: &Path) {
    let registry = Registry::start(dir, database_url).await;
    let id = registry.return_of_data("resumed").await;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let data = bytes(64 * EVERY as usize + 12_345, 1);
    let h = header(&id, "large.bin", &data);
    let cuts = [0, 300_001, 1_700_000, 2_900_017, data.len()];
    for pair in cuts.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let asked = state(&mut uploads, &h).await.expect("state");
        assert_eq!(asked.offset, from as u64);
        assert_eq!(registry.read_since(), 0, "GetUploadState read stored bytes");
        let sent = send(&mut uploads, &h, &data, from, to).await.expect("sent");
        assert_eq!(sent.offset, to as u64);
        assert_eq!(sent.complete, to == data.len());
        let read = registry.read_since();
        assert!(read <= EVERY, "{read} bytes read resuming at {from}");
    }
    assert!(std::fs::read(registry.path(&h)).expect("stored") == data);
    assert!(state(&mut uploads, &h).await.expect("state").complete);
    registry.stop().await;
}

/// Bytes stored past the last checkpoint (an upload that appended them durably and stopped
/// before recording it) are hashed again at the resumption, by the next upload or by
/// GetUploadState once they complete the file: the file is stored whole with the right
/// digest, reading only them. Wrong bytes there fail the check: DATA_LOSS, and the file is
/// dropped, as is a resumed file whose bytes disagree with its header's digest.
async fn bytes_past_the_checkpoint_are_checked_again(database_url: &str, dir: &Path) {
    let registry = Registry::start(dir, database_url).await;
    let id = registry.return_of_data("cut").await;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let data = bytes(16 * EVERY as usize + 777, 2);
    let h = header(&id, "cut.bin", &data);
    let last = data.len() - 40_000;

    send(&mut uploads, &h, &data, 0, 200_000)
        .await
        .expect("sent");
    registry.append_behind(&h, &data[200_000..250_000]);
    assert_eq!(
        state(&mut uploads, &h).await.expect("state").offset,
        250_000
    );
    let sent = send(&mut uploads, &h, &data, 250_000, last)
        .await
        .expect("sent");
    assert_eq!((sent.offset, sent.complete), (last as u64, false));
    let read = registry.read_since();
    assert!((50_000..=EVERY).contains(&read), "{read} bytes read");
    registry.append_behind(&h, &data[last..]);
    let checked = state(&mut uploads, &h).await.expect("state");
    assert_eq!(
        (checked.offset, checked.complete),
        (data.len() as u64, true)
    );
    let read = registry.read_since();
    assert!((40_000..=EVERY).contains(&read), "{read} bytes read");
    assert!(std::fs::read(registry.path(&h)).expect("stored") == data);

    // The same, with one byte of the bytes past the checkpoint damaged.
    let torn = header(&id, "torn.bin", &data);
    send(&mut uploads, &torn, &data, 0, last)
        .await
        .expect("sent");
    let mut damaged = data[last..].to_vec();
    damaged[1_000] ^= 0x40;
    registry.append_behind(&torn, &damaged);
    let refused = state(&mut uploads, &torn).await.expect_err("damaged");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(refused.message().contains("SHA-256"), "{refused:?}");
    assert!(registry.read_since() <= EVERY);
    assert_eq!(state(&mut uploads, &torn).await.expect("state").offset, 0);
    assert!(
        !registry.path(&torn).exists(),
        "the damaged file was dropped"
    );

    // A header whose digest is not the bytes', the upload resumed.
    let liar = ExportFileHeader {
        sha256: hex::encode(Sha256::digest(b"something else")),
        ..header(&id, "liar.bin", &data)
    };
    send(&mut uploads, &liar, &data, 0, 300_000)
        .await
        .expect("sent");
    registry.read_since();
    let refused = send(&mut uploads, &liar, &data, 300_000, data.len())
        .await
        .expect_err("the digest is wrong");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(registry.read_since() <= EVERY);
    assert_eq!(state(&mut uploads, &liar).await.expect("state").offset, 0);
    assert!(!registry.path(&liar).exists(), "the file was dropped");
    registry.stop().await;
}

/// A stream cut short (a sync failing, as the registry stopping would) keeps the checkpoints
/// it recorded every interval: the next upload reads at most one interval, not everything
/// the stream stored.
async fn a_stream_cut_short_keeps_its_checkpoints(database_url: &str, dir: &Path) {
    let registry = Registry::start(dir, database_url).await;
    let id = registry.return_of_data("cut-short").await;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let data = bytes(16 * EVERY as usize + 99, 7);
    let h = header(&id, "cut-short.bin", &data);
    registry.syncs_left.store(10, Ordering::SeqCst);
    let failed = send(&mut uploads, &h, &data, 0, data.len())
        .await
        .expect_err("a sync failed");
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    registry.syncs_left.store(u64::MAX, Ordering::SeqCst);
    let stored = state(&mut uploads, &h).await.expect("state").offset;
    assert!(stored > 10 * EVERY, "{stored} bytes kept");
    let sent = send(&mut uploads, &h, &data, stored as usize, data.len())
        .await
        .expect("the rest");
    assert!(sent.complete);
    let read = registry.read_since();
    assert!(read <= EVERY, "{read} bytes read");
    registry.stop().await;
}

/// A file stored before checkpoints were recorded has none: one with no more stored than the
/// check may read is hashed from its first byte and resumes; a larger one, even stored
/// whole, is dropped and sent again (hashing it whole would not end within a call's time).
async fn files_without_a_checkpoint(database_url: &str, dir: &Path) {
    let registry = Registry::start(dir, database_url).await;
    let id = registry.return_of_data("old").await;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let max = registry_max_unchecked();

    let small = bytes(300_000, 3);
    let h = header(&id, "small.bin", &small);
    assert_eq!(state(&mut uploads, &h).await.expect("state").offset, 0);
    registry.append_behind(&h, &small[..100_000]);
    assert_eq!(
        state(&mut uploads, &h).await.expect("state").offset,
        100_000
    );
    let sent = send(&mut uploads, &h, &small, 100_000, small.len())
        .await
        .expect("sent");
    assert!(sent.complete);
    assert_eq!(registry.read_since(), 100_000);

    let large = bytes(max as usize + 2, 4);
    for (name, stored) in [("part.bin", large.len() - 1), ("whole.bin", large.len())] {
        let h = header(&id, name, &large);
        assert_eq!(state(&mut uploads, &h).await.expect("state").offset, 0);
        registry.append_behind(&h, &large[..stored]);
        let asked = state(&mut uploads, &h).await.expect("state");
        assert_eq!((asked.offset, asked.complete), (0, false), "{name}");
        assert!(!registry.path(&h).exists(), "{name} was dropped");
        assert_eq!(registry.read_since(), 0);
        let sent = send(&mut uploads, &h, &large, 0, large.len())
            .await
            .expect("sent again");
        assert!(sent.complete, "{name}");
    }
    registry.stop().await;
}

/// The most a check reads, with [`EVERY`].
fn registry_max_unchecked() -> u64 {
    Packages {
        store: Arc::new(super::FolderStore::new("/nowhere")),
        ttl_ms: 0,
        checkpoint_every: EVERY,
    }
    .max_unchecked()
}

/// A checkpoint left from bytes since dropped (the file restarted under another header) is
/// not taken for the bytes written after: it is forgotten with the bytes, so that a crash
/// before the new bytes' first checkpoint (a failed sync here) leaves no checkpoint rather
/// than one of other bytes. So it is when the registry stopped between dropping the bytes
/// and forgetting the checkpoint: the next registration finds none stored, and forgets it.
async fn a_restarted_file_forgets_its_checkpoint(database_url: &str, dir: &Path) {
    let registry = Registry::start(dir, database_url).await;
    let id = registry.return_of_data("restarted").await;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let db = dsrelay_runtime::store::Db::connect(database_url)
        .await
        .expect("connect");
    for (name, crashed) in [("again.bin", false), ("crashed.bin", true)] {
        let first = bytes(200_000, 5);
        let before = header(&id, name, &first);
        send(&mut uploads, &before, &first, 0, PIECE)
            .await
            .expect("sent");
        let data = bytes(200_000, 6);
        let h = header(&id, name, &data);
        if crashed {
            // What the restart did before the registry stopped: the new header recorded,
            // the bytes dropped, the checkpoint not yet.
            sqlx::query("UPDATE package_files SET sha256 = $1 WHERE name = $2")
                .bind(&h.sha256)
                .bind(name)
                .execute(&db.pool)
                .await
                .expect("the new header");
            std::fs::remove_file(registry.path(&h)).expect("the bytes dropped");
        }
        // The upload's own registration restarts the file.
        registry.syncs_left.store(0, Ordering::SeqCst);
        let failed = send(&mut uploads, &h, &data, 0, 3 * PIECE)
            .await
            .expect_err("the sync failed");
        assert_eq!(failed.code(), Code::Internal, "{failed:?}");
        registry.syncs_left.store(u64::MAX, Ordering::SeqCst);
        let asked = state(&mut uploads, &h).await.expect("state");
        assert_eq!(asked.offset, 3 * PIECE as u64);
        let sent = send(&mut uploads, &h, &data, 3 * PIECE, data.len())
            .await
            .expect("the rest, checked");
        assert!(sent.complete, "{name}");
    }
    db.pool.close().await;
    registry.stop().await;
}

macro_rules! on_both_backends {
    ($scenario:ident, $sqlite:ident, $postgres:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}/registry.db", dir.path().display());
            $scenario(&url, dir.path()).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            on_postgres(|url, dir| async move { $scenario(&url, &dir).await }).await;
        }
    };
}

on_both_backends!(
    a_resumed_upload_reads_one_interval_at_most,
    a_resumed_upload_reads_one_interval_at_most_on_sqlite,
    a_resumed_upload_reads_one_interval_at_most_on_postgres
);
on_both_backends!(
    bytes_past_the_checkpoint_are_checked_again,
    bytes_past_the_checkpoint_are_checked_again_on_sqlite,
    bytes_past_the_checkpoint_are_checked_again_on_postgres
);
on_both_backends!(
    a_stream_cut_short_keeps_its_checkpoints,
    a_stream_cut_short_keeps_its_checkpoints_on_sqlite,
    a_stream_cut_short_keeps_its_checkpoints_on_postgres
);
on_both_backends!(
    files_without_a_checkpoint,
    files_without_a_checkpoint_on_sqlite,
    files_without_a_checkpoint_on_postgres
);
on_both_backends!(
    a_restarted_file_forgets_its_checkpoint,
    a_restarted_file_forgets_its_checkpoint_on_sqlite,
    a_restarted_file_forgets_its_checkpoint_on_postgres
);

/// GetUploadState waits for a live upload of the file (ABORTED, saying to ask again), since
/// its answer may drop or check the bytes the stream appends to: asked with a restarted
/// header, which would drop them, it drops nothing, and the upload goes on and stores the
/// file whole. Before, it answered, and could unlink the file under the stream.
async fn the_state_waits_for_a_live_upload(database_url: &str, dir: &Path) {
    let registry = Registry::start(dir, database_url).await;
    let id = registry.return_of_data("live").await;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let data = bytes(6 * EVERY as usize + 321, 8);
    let h = header(&id, "live.bin", &data);
    let mut messages = chunks(&h, &data, 0, data.len()).into_iter();
    let appended = Signals::ask(&registry.signals.appended);
    let (tx, answer) = live(&uploads);
    tx.unbounded_send(messages.next().expect("a chunk"))
        .expect("sent");
    appended.await.expect("the first chunk appended");
    let busy = state(&mut uploads, &restarted(&h))
        .await
        .expect_err("an upload is live");
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert!(
        busy.message().contains("live.bin") && busy.message().contains("ask again"),
        "{busy:?}"
    );
    for m in messages {
        tx.unbounded_send(m).expect("sent");
    }
    drop(tx);
    let sent = answer.await.expect("joined").expect("stored");
    assert!(sent.complete);
    assert!(std::fs::read(registry.path(&h)).expect("stored") == data);
    assert!(state(&mut uploads, &h).await.expect("state").complete);
    registry.stop().await;
}

/// Another replica restarts a file (another header, same size and digest) while an upload
/// resumed at its checkpoint has not appended yet: the upload's first chunk is refused,
/// naming the offset it expected, nothing appended, and the file is sent again whole.
/// Before, the upload wrote its bytes from the first of the new file while counting from the
/// offset it resumed at, its digest matched, and the file was stored with shifted bytes.
async fn a_file_restarted_under_a_resumed_upload_is_not_stored_shifted(
    database_url: &str,
    dir: &Path,
) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("shifted").await;
    let mut on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(4 * EVERY as usize + 999, 9);
    let h = header(&id, "shifted.bin", &data);
    let cut = 2 * EVERY as usize + 4_321;
    send(&mut on_a, &h, &data, 0, cut).await.expect("sent");
    let opened = Signals::ask(&a.signals.opened_at);
    let (tx, answer) = live(&on_a);
    let mut messages = chunks(&h, &data, cut, data.len());
    let first = UploadFileChunk {
        header: Some(h.clone()),
        offset: cut as u64,
        ..Default::default()
    };
    messages[0].header = None;
    tx.unbounded_send(first).expect("sent");
    opened
        .await
        .expect("the upload resumed, hashing from its checkpoint");
    let again = restarted(&h);
    restart_elsewhere(&a, dir, database_url, &again).await;
    refused_after(&tx, messages);
    drop(tx);
    let refused = answer
        .await
        .expect("joined")
        .expect_err("the file was restarted");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&format!("expected {cut} bytes stored")),
        "{refused:?}"
    );
    let asked = state(&mut on_a, &again).await.expect("state");
    assert_eq!((asked.offset, asked.complete), (0, false));
    let sent = send(&mut on_a, &again, &data, 0, data.len())
        .await
        .expect("sent whole");
    assert!(sent.complete);
    assert!(std::fs::read(a.path(&h)).expect("stored") == data);
    a.stop().await;
}

/// Another replica restarts a file while an upload streams it, dropping the bytes stored:
/// the upload, whose own bytes match the digest, finds the store not holding them and
/// answers DATA_LOSS instead of recording the file stored, dropping nothing (the file is
/// the restart's now). Before, the file was recorded stored with no bytes behind it, for
/// good. (Shorter than a checkpoint's interval, so the
/// end's check is what refuses it: a checkpoint would be refused first.)
async fn a_file_dropped_under_a_live_upload_is_not_recorded_stored(database_url: &str, dir: &Path) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("dropped").await;
    let mut on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(EVERY as usize - 77, 10);
    let h = header(&id, "dropped.bin", &data);
    let mut messages = chunks(&h, &data, 0, data.len()).into_iter();
    let appended = Signals::ask(&a.signals.appended);
    let (tx, answer) = live(&on_a);
    tx.unbounded_send(messages.next().expect("a chunk"))
        .expect("sent");
    appended.await.expect("the first chunk appended");
    let again = restarted(&h);
    restart_elsewhere(&a, dir, database_url, &again).await;
    refused_after(&tx, messages);
    drop(tx);
    let refused = answer
        .await
        .expect("joined")
        .expect_err("its bytes are gone");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(
        refused.message().contains("nothing was dropped"),
        "{refused:?}"
    );
    let asked = state(&mut on_a, &again).await.expect("state");
    assert_eq!((asked.offset, asked.complete), (0, false));
    a.stop().await;
}

/// Another replica registers a file streamed while written (`size_follows`) again while an
/// upload of it streams here, dropping the bytes stored, and stores some of its own: the
/// upload, whose own bytes match its end, finds the store holding some bytes but not its
/// size and answers DATA_LOSS, the file not recorded stored and the other stream's bytes
/// left to it. Before, the file was recorded stored, with the other stream's bytes behind
/// it.
async fn a_growing_file_dropped_under_its_upload_is_not_recorded_stored(
    database_url: &str,
    dir: &Path,
) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("growing").await;
    let mut on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(3 * EVERY as usize + 55, 11);
    let whole = header(&id, "growing.bin", &data);
    let grow = ExportFileHeader {
        size: 0,
        sha256: String::new(),
        ..whole.clone()
    };
    let mut messages = chunks(&grow, &data, 0, data.len());
    messages[0].size_follows = true;
    messages.push(UploadFileChunk {
        offset: data.len() as u64,
        end: Some(FileEnd {
            size: data.len() as u64,
            sha256: whole.sha256.clone(),
        }),
        ..Default::default()
    });
    let mut messages = messages.into_iter();
    let appended = Signals::ask(&a.signals.appended);
    let (tx, answer) = live(&on_a);
    tx.unbounded_send(messages.next().expect("a chunk"))
        .expect("sent");
    appended.await.expect("the first chunk appended");
    let theirs = bytes(5_000, 12);
    regrow_elsewhere(&a, dir, database_url, &grow, &theirs).await;
    refused_after(&tx, messages);
    drop(tx);
    let refused = answer
        .await
        .expect("joined")
        .expect_err("its bytes are gone");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(
        refused.message().contains("nothing was dropped"),
        "{refused:?}"
    );
    assert!(std::fs::read(a.path(&whole)).expect("kept") == theirs);
    let asked = state(&mut on_a, &whole).await.expect("state");
    assert_eq!((asked.offset, asked.complete), (0, false));
    a.stop().await;
}

/// A resumed upload whose store holds bytes past its checkpoint (appended by a stream that
/// stopped before recording them) checkpoints before its first chunk. When another replica
/// restarted the file meanwhile, that chunk is refused before any checkpoint: one recorded
/// would vouch, with the digest this stream hashed, for the bytes the restarted file holds,
/// which no check would read again, so a byte damaged among them would be stored. Bytes
/// appended behind the registry's back stand for them here. Before, that checkpoint was
/// recorded and the damaged file stored.
async fn a_refused_resumed_upload_records_no_checkpoint(database_url: &str, dir: &Path) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("stale").await;
    let mut on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(4 * EVERY as usize + 999, 13);
    let h = header(&id, "stale.bin", &data);
    let cut = 2 * EVERY as usize + 4_321;
    let past = cut + EVERY as usize;
    send(&mut on_a, &h, &data, 0, cut).await.expect("sent");
    a.append_behind(&h, &data[cut..past]);
    let opened = Signals::ask(&a.signals.opened_at);
    let (tx, answer) = live(&on_a);
    let mut messages = chunks(&h, &data, past, data.len());
    messages[0].header = None;
    tx.unbounded_send(UploadFileChunk {
        header: Some(h.clone()),
        offset: past as u64,
        ..Default::default()
    })
    .expect("sent");
    opened
        .await
        .expect("the upload resumed, hashing from its checkpoint");
    let again = restarted(&h);
    restart_elsewhere(&a, dir, database_url, &again).await;
    let stored = past + 1_000;
    let mut damaged = data[..stored].to_vec();
    damaged[cut] ^= 0x40;
    a.append_behind(&again, &damaged);
    refused_after(&tx, messages);
    drop(tx);
    let refused = answer
        .await
        .expect("joined")
        .expect_err("the file was restarted");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let expected = format!("expected {past} bytes stored, but {stored} are");
    assert!(refused.message().contains(&expected), "{refused:?}");
    let asked = state(&mut on_a, &again).await.expect("state");
    assert_eq!((asked.offset, asked.complete), (stored as u64, false));
    let checked = send(&mut on_a, &again, &data, stored, data.len())
        .await
        .expect_err("a stored byte is damaged");
    assert_eq!(checked.code(), Code::DataLoss, "{checked:?}");
    assert!(checked.message().contains("SHA-256"), "{checked:?}");
    a.stop().await;
}

on_both_backends!(
    the_state_waits_for_a_live_upload,
    the_state_waits_for_a_live_upload_on_sqlite,
    the_state_waits_for_a_live_upload_on_postgres
);
on_both_backends!(
    a_file_restarted_under_a_resumed_upload_is_not_stored_shifted,
    a_file_restarted_under_a_resumed_upload_is_not_stored_shifted_on_sqlite,
    a_file_restarted_under_a_resumed_upload_is_not_stored_shifted_on_postgres
);
on_both_backends!(
    a_file_dropped_under_a_live_upload_is_not_recorded_stored,
    a_file_dropped_under_a_live_upload_is_not_recorded_stored_on_sqlite,
    a_file_dropped_under_a_live_upload_is_not_recorded_stored_on_postgres
);
on_both_backends!(
    a_growing_file_dropped_under_its_upload_is_not_recorded_stored,
    a_growing_file_dropped_under_its_upload_is_not_recorded_stored_on_sqlite,
    a_growing_file_dropped_under_its_upload_is_not_recorded_stored_on_postgres
);
on_both_backends!(
    a_refused_resumed_upload_records_no_checkpoint,
    a_refused_resumed_upload_records_no_checkpoint_on_sqlite,
    a_refused_resumed_upload_records_no_checkpoint_on_postgres
);

/// Another replica restarts a file (another media type: same size and digest) after an
/// upload's first chunk was appended; the upload goes on past a checkpoint's interval and
/// stops short of the end. Its checkpoint is refused (FAILED_PRECONDITION), so the restarted
/// file, whose sender stored as many bytes with one damaged, is hashed again from its first
/// byte when resumed, and refused. Before, the checkpoint was recorded onto the restarted
/// file, whose resumption hashed only what followed it, and the damaged file was stored.
async fn a_stream_whose_file_was_restarted_records_no_checkpoint(database_url: &str, dir: &Path) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("generation").await;
    let mut on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(4 * EVERY as usize + 999, 14);
    let h = header(&id, "generation.bin", &data);
    let sent = 2 * EVERY as usize + 4_321;
    let mut messages = chunks(&h, &data, 0, sent).into_iter();
    let appended = Signals::ask(&a.signals.appended);
    let (tx, answer) = live(&on_a);
    tx.unbounded_send(messages.next().expect("a chunk"))
        .expect("sent");
    appended.await.expect("the first chunk appended");
    let again = restarted(&h);
    restart_elsewhere(&a, dir, database_url, &again).await;
    refused_after(&tx, messages);
    drop(tx);
    let refused = answer
        .await
        .expect("joined")
        .expect_err("the file was restarted");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("registered the file again or dropped it"),
        "{refused:?}"
    );
    let mut damaged = data[..sent].to_vec();
    damaged[1_000] ^= 0x40;
    a.append_behind(&again, &damaged);
    let asked = state(&mut on_a, &again).await.expect("state");
    assert_eq!((asked.offset, asked.complete), (sent as u64, false));
    let checked = send(&mut on_a, &again, &data, sent, data.len())
        .await
        .expect_err("a stored byte is damaged");
    assert_eq!(checked.code(), Code::DataLoss, "{checked:?}");
    assert!(checked.message().contains("SHA-256"), "{checked:?}");
    a.stop().await;
}

/// Another replica restarts a file while an upload resumed at its checkpoint has not
/// appended yet, and the restarted file's sender stores exactly as many bytes as the upload
/// expects, one damaged: the length matches, but the registration is not the upload's, so
/// its first chunk is refused (FAILED_PRECONDITION), nothing appended, and the damaged file
/// is refused when resumed. Before, the upload appended, its digest (of the bytes it had
/// hashed before the restart, and its own) matched, and the damaged file was stored.
async fn a_restart_leaving_the_expected_length_is_refused(database_url: &str, dir: &Path) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("same-length").await;
    let mut on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(4 * EVERY as usize + 999, 15);
    let h = header(&id, "same-length.bin", &data);
    let cut = 2 * EVERY as usize + 4_321;
    send(&mut on_a, &h, &data, 0, cut).await.expect("sent");
    let opened = Signals::ask(&a.signals.opened_at);
    let (tx, answer) = live(&on_a);
    let mut messages = chunks(&h, &data, cut, data.len());
    messages[0].header = None;
    tx.unbounded_send(UploadFileChunk {
        header: Some(h.clone()),
        offset: cut as u64,
        ..Default::default()
    })
    .expect("sent");
    opened
        .await
        .expect("the upload resumed, hashing from its checkpoint");
    let again = restarted(&h);
    restart_elsewhere(&a, dir, database_url, &again).await;
    let mut damaged = data[..cut].to_vec();
    damaged[1_000] ^= 0x40;
    a.append_behind(&again, &damaged);
    refused_after(&tx, messages);
    drop(tx);
    let refused = answer
        .await
        .expect("joined")
        .expect_err("the file was restarted");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("registered the file again or dropped it"),
        "{refused:?}"
    );
    let asked = state(&mut on_a, &again).await.expect("state");
    assert_eq!((asked.offset, asked.complete), (cut as u64, false));
    let checked = send(&mut on_a, &again, &data, cut, data.len())
        .await
        .expect_err("a stored byte is damaged");
    assert_eq!(checked.code(), Code::DataLoss, "{checked:?}");
    assert!(checked.message().contains("SHA-256"), "{checked:?}");
    a.stop().await;
}

on_both_backends!(
    a_stream_whose_file_was_restarted_records_no_checkpoint,
    a_stream_whose_file_was_restarted_records_no_checkpoint_on_sqlite,
    a_stream_whose_file_was_restarted_records_no_checkpoint_on_postgres
);
on_both_backends!(
    a_restart_leaving_the_expected_length_is_refused,
    a_restart_leaving_the_expected_length_is_refused_on_sqlite,
    a_restart_leaving_the_expected_length_is_refused_on_postgres
);

/// The file a resumed upload opens holds more than it counted (bytes appended behind it),
/// and is dropped and created again under its name, with the length counted, before the
/// upload checks the length: the length checked is the opened file's, so the upload is
/// refused (FAILED_PRECONDITION naming both lengths), nothing appended, and resumes from the
/// file now stored. Before, the new file's length was read by name, it matched, and the
/// upload appended to the dropped file, to be refused only at its end (DATA_LOSS).
async fn the_length_checked_is_the_opened_files(database_url: &str, dir: &Path) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("opened").await;
    let mut on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(2 * EVERY as usize + 333, 16);
    let h = header(&id, "opened.bin", &data);
    let cut = EVERY as usize + 4_321;
    send(&mut on_a, &h, &data, 0, cut).await.expect("sent");
    *a.signals
        .swap_on_open
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some((a.path(&h), vec![7; 1_000]));
    let refused = send(&mut on_a, &h, &data, cut, data.len())
        .await
        .expect_err("the opened file holds more");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let expected = format!("expected {cut} bytes stored, but {} are", cut + 1_000);
    assert!(refused.message().contains(&expected), "{refused:?}");
    assert_eq!(
        std::fs::metadata(a.path(&h)).expect("stored").len(),
        cut as u64
    );
    let asked = state(&mut on_a, &h).await.expect("state");
    assert_eq!(asked.offset, cut as u64);
    let sent = send(&mut on_a, &h, &data, cut, data.len())
        .await
        .expect("the rest");
    assert!(sent.complete);
    assert!(std::fs::read(a.path(&h)).expect("stored") == data);
    a.stop().await;
}

on_both_backends!(
    the_length_checked_is_the_opened_files,
    the_length_checked_is_the_opened_files_on_sqlite,
    the_length_checked_is_the_opened_files_on_postgres
);

/// Restarts the file of `a` that `again` announces (another size) as another replica of `a`
/// does, uploads `data` as it whole, and completes its part (of that one file): the restart
/// and the upload through a second replica on PostgreSQL; on SQLite (see
/// [`restart_elsewhere`]) by leaving the records and the folder as they leave them. The
/// part is completed through `a`, which keeps no completion apart from its streams.
async fn replace_and_complete(
    a: &Registry,
    dir: &Path,
    database_url: &str,
    again: &ExportFileHeader,
    data: &[u8],
) {
    if database_url.starts_with("sqlite") {
        let db = dsrelay_runtime::store::Db::connect(database_url)
            .await
            .expect("connect");
        sqlx::query(
            "UPDATE package_files SET size = $1, sha256 = $2, stored_at = 1, \
             checkpoint_bytes = NULL, checkpoint_state = NULL, generation = generation + 2 \
             WHERE request_id = $3 AND name = $4",
        )
        .bind(again.size as i64)
        .bind(&again.sha256)
        .bind(&again.request_id)
        .bind(&again.name)
        .execute(&db.pool)
        .await
        .expect("restarted and stored");
        db.pool.close().await;
        std::fs::remove_file(a.path(again)).expect("the bytes dropped");
        a.append_behind(again, data);
    } else {
        let b = Registry::replica(dir, database_url, "replica-b").await;
        let mut on_b = ExportUploadServiceClient::new(b.channel("processor"));
        assert_eq!(state(&mut on_b, again).await.expect("restarted").offset, 0);
        let sent = send(&mut on_b, again, data, 0, data.len())
            .await
            .expect("sent whole");
        assert!(sent.complete);
        b.stop().await;
    }
    complete_part(a, again).await.expect("the part stored");
}

async fn complete_part(a: &Registry, h: &ExportFileHeader) -> Result<(), tonic::Status> {
    ExportUploadServiceClient::new(a.channel("processor"))
        .complete_part(CompletePartRequest {
            request_id: h.request_id.clone(),
            subprocessor: h.subprocessor.clone(),
            files: vec![h.clone()],
        })
        .await?;
    Ok(())
}

/// An upload's last chunks arrive after another replica restarted its file with another
/// size, uploaded that whole and completed the part: the upload finds the store holding
/// another size and answers DATA_LOSS, dropping nothing, and the stored part keeps its file,
/// stored. Before, the upload dropped the part's file and its record of being stored.
async fn a_stale_upload_leaves_a_stored_part_alone(database_url: &str, dir: &Path) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("stale-end").await;
    let mut on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(EVERY as usize - 77, 14);
    let h = header(&id, "kept.bin", &data);
    let mut messages = chunks(&h, &data, 0, data.len()).into_iter();
    let appended = Signals::ask(&a.signals.appended);
    let (tx, answer) = live(&on_a);
    tx.unbounded_send(messages.next().expect("a chunk"))
        .expect("sent");
    appended.await.expect("the first chunk appended");
    let theirs = bytes(EVERY as usize / 2 + 5, 15);
    let again = header(&id, "kept.bin", &theirs);
    replace_and_complete(&a, dir, database_url, &again, &theirs).await;
    refused_after(&tx, messages);
    drop(tx);
    let refused = answer
        .await
        .expect("joined")
        .expect_err("the file is another's");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(std::fs::read(a.path(&again)).expect("kept") == theirs);
    let asked = state(&mut on_a, &again).await.expect("state");
    assert_eq!((asked.offset, asked.complete), (theirs.len() as u64, true));
    complete_part(&a, &again).await.expect("still stored");
    assert!(
        refused.message().contains("nothing was dropped"),
        "{refused:?}"
    );
    a.stop().await;
}

/// The package expires (recorded expired, its files deleted, as the sweep does) while an
/// upload streams one of its files: the upload's end answers that the package expired.
/// Before, it answered that another call had dropped or restarted the file.
async fn an_upload_outlived_by_its_package_is_told_so(database_url: &str, dir: &Path) {
    let a = Registry::start(dir, database_url).await;
    let id = a.return_of_data("outlived").await;
    let on_a = ExportUploadServiceClient::new(a.channel("processor"));
    let data = bytes(EVERY as usize - 99, 16);
    let h = header(&id, "late.bin", &data);
    let mut messages = chunks(&h, &data, 0, data.len()).into_iter();
    let appended = Signals::ask(&a.signals.appended);
    let (tx, answer) = live(&on_a);
    tx.unbounded_send(messages.next().expect("a chunk"))
        .expect("sent");
    appended.await.expect("the first chunk appended");
    let db = dsrelay_runtime::store::Db::connect(database_url)
        .await
        .expect("connect");
    sqlx::query("UPDATE packages SET expired_at = 1 WHERE request_id = $1")
        .bind(&id)
        .execute(&db.pool)
        .await
        .expect("expired");
    db.pool.close().await;
    std::fs::remove_file(a.path(&h)).expect("the bytes deleted");
    refused_after(&tx, messages);
    drop(tx);
    let refused = answer
        .await
        .expect("joined")
        .expect_err("the package expired");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("expired"), "{refused:?}");
    a.stop().await;
}

on_both_backends!(
    a_stale_upload_leaves_a_stored_part_alone,
    a_stale_upload_leaves_a_stored_part_alone_on_sqlite,
    a_stale_upload_leaves_a_stored_part_alone_on_postgres
);
on_both_backends!(
    an_upload_outlived_by_its_package_is_told_so,
    an_upload_outlived_by_its_package_is_told_so_on_sqlite,
    an_upload_outlived_by_its_package_is_told_so_on_postgres
);
