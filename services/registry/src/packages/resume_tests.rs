//! Resumed uploads through the real registry (its server over mutual TLS with the development
//! PKI's certificates, its store on SQLite, and on PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server), with a checkpoint interval of [`EVERY`] set
//! through [`BUILD_HOOK`] and a package store that counts the bytes read from it: a resumed
//! file's check reads at most what was stored past its checkpoint, however large the file.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    ExportFileHeader, GetUploadStateRequest, IdentityEncoding, IdentityType, RequestKind,
    SubjectIdentity, SubmitRequest, UploadFileChunk, UploadState,
};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

use super::{file_key, Appender, PackageStore, Packages, BUILD_HOOK};
use crate::store::PackageFile;
use crate::test_postgres::on_postgres;
use crate::{App, Config};

const PROCESSOR: &str = "payroll-bureau";
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
}

#[tonic::async_trait]
impl PackageStore for Watched {
    async fn stored_len(&self, key: &str) -> std::io::Result<u64> {
        self.inner.stored_len(key).await
    }

    async fn appender(&self, key: &str) -> std::io::Result<Box<dyn Appender>> {
        Ok(Box::new(FailingAppender {
            inner: self.inner.appender(key).await?,
            syncs_left: self.syncs_left.clone(),
        }))
    }

    async fn open(&self, key: &str) -> std::io::Result<Box<dyn AsyncRead + Send + Unpin>> {
        self.open_at(key, 0).await
    }

    async fn open_at(
        &self,
        key: &str,
        offset: u64,
    ) -> std::io::Result<Box<dyn AsyncRead + Send + Unpin>> {
        Ok(Box::new(Counted {
            inner: self.inner.open_at(key, offset).await?,
            read: self.read.clone(),
        }))
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
}

#[tonic::async_trait]
impl Appender for FailingAppender {
    async fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.inner.append(data).await
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
    port: u16,
    pki: DevPki,
    packages: PathBuf,
    read: Arc<AtomicU64>,
    /// Syncs that succeed before the next fails ([`Watched`]); `u64::MAX` at the start.
    syncs_left: Arc<AtomicU64>,
    stop: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Registry {
    /// Serves a registry on `database_url`, its files under `dir`, with one processor
    /// (whose endpoint nobody answers: its deliveries wait, and it may still upload).
    async fn start(dir: &Path, database_url: &str) -> Self {
        let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
        let tls = pki.files("registry");
        let packages = dir.join("packages");
        let text = format!(
            "listen = \"127.0.0.1:0\"\ndatabase_url = {database_url:?}\n\
             identity_hash_key = \"k\"\npackage_dir = {packages:?}\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [audit]\ncheckpoint_key = {:?}\ncheckpoint_file = {:?}\n\
             [[identities]]\nidentity = {:?}\nrole = \"partner\"\nname = \"crm\"\n\
             [[processors]]\nname = \"{PROCESSOR}\"\nendpoint = \"https://localhost:1\"\n\
             identity = {:?}\ncategories = [\"contact\"]\n",
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
        let read = Arc::new(AtomicU64::new(0));
        let syncs_left = Arc::new(AtomicU64::new(u64::MAX));
        let (r, f) = (read.clone(), syncs_left.clone());
        let hook: Arc<dyn Fn(Packages) -> Packages + Send + Sync> = Arc::new(move |p| Packages {
            store: Arc::new(Watched {
                inner: p.store,
                read: r.clone(),
                syncs_left: f.clone(),
            }),
            checkpoint_every: EVERY,
            ..p
        });
        let app = BUILD_HOOK
            .scope(hook, App::build(config))
            .await
            .expect("app");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(app.run(listener, async {
            let _ = stopped.await;
        }));
        Self {
            port,
            pki,
            packages,
            read,
            syncs_left,
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

    /// A new return of data, delivered (in the outbox) to the processor.
    async fn return_of_data(&self, key: &str) -> String {
        RequestServiceClient::new(self.channel("partner-crm"))
            .submit(SubmitRequest {
                kind: RequestKind::ReturnOfData as i32,
                identities: vec![SubjectIdentity {
                    r#type: IdentityType::Email as i32,
                    encoding: IdentityEncoding::Raw as i32,
                    value: "maija@example.fi".into(),
                    label: String::new(),
                }],
                idempotency_key: key.into(),
                ..Default::default()
            })
            .await
            .expect("submit")
            .into_inner()
            .request_id
    }

    /// Bytes read from the package store since the last call.
    fn read_since(&self) -> u64 {
        self.read.swap(0, Ordering::SeqCst)
    }

    /// Where the store keeps the file `h` announces.
    fn path(&self, h: &ExportFileHeader) -> PathBuf {
        self.packages.join(file_key(&PackageFile {
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
        let _ = self.stop.send(());
        self.served.await.expect("joined").expect("served");
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

/// Sends `data[from..to]` of the file `h` announces in one stream, in chunks of [`PIECE`].
async fn send(
    uploads: &mut ExportUploadServiceClient<Channel>,
    h: &ExportFileHeader,
    data: &[u8],
    from: usize,
    to: usize,
) -> Result<UploadState, tonic::Status> {
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
    Ok(uploads
        .upload_file(tokio_stream::iter(chunks))
        .await?
        .into_inner())
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
