//! The bound on UploadFile streams one processor holds open (`packages.uploads_per_processor`),
//! through the real registry (its server over mutual TLS with the development PKI's
//! certificates and one more processor's, its store on SQLite, and on PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server): one stream past the bound is refused
//! RESOURCE_EXHAUSTED naming the setting, another processor's streams are its own, and a
//! stream's place comes back when it ends, however it ends.

use std::path::Path;
use std::sync::Arc;

use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, Acknowledgement, ExportFileHeader, RequestKind, TaskState, UploadFileChunk,
    UploadState,
};
use dsrelay_runtime::pki::{dev_identity, DevCa, DevPki};
use futures::channel::mpsc::UnboundedSender;
use sha2::{Digest, Sha256};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Code;

use super::{Appender, PackageStore, Packages};
use crate::test_postgres::on_postgres;
use crate::test_registry::{self, Setup};

/// The bound these tests set.
const LIMIT: u32 = 2;
/// The second processor, configured by these tests.
const OTHER: &str = "second-bureau";
/// The file stem of its certificate in the development PKI's folder.
const OTHER_STEM: &str = "processor-second";

/// What the store tells the test, with the key of the file it concerns.
#[derive(Debug, PartialEq, Eq)]
enum Told {
    /// An append done: the stream holds its place and has opened its file.
    Appended(String),
    /// An appender dropped: its stream's call has ended, its place already given back
    /// (`FileUpload` drops its place before its file).
    Closed(String),
}

/// The folder store, telling of each append and of each appender dropped.
struct Telling {
    inner: Arc<dyn PackageStore>,
    told: mpsc::UnboundedSender<Told>,
}

#[tonic::async_trait]
impl PackageStore for Telling {
    async fn stored_len(&self, key: &str) -> std::io::Result<u64> {
        self.inner.stored_len(key).await
    }

    async fn appender(&self, key: &str, size: Option<u64>) -> std::io::Result<Box<dyn Appender>> {
        Ok(Box::new(TellingAppender {
            inner: self.inner.appender(key, size).await?,
            key: key.to_string(),
            told: self.told.clone(),
        }))
    }

    async fn open_at(
        &self,
        key: &str,
        offset: u64,
    ) -> std::io::Result<Box<dyn AsyncRead + Send + Unpin>> {
        self.inner.open_at(key, offset).await
    }

    async fn remove(&self, key: &str) -> std::io::Result<()> {
        self.inner.remove(key).await
    }

    async fn remove_all(&self, prefix: &str) -> std::io::Result<()> {
        self.inner.remove_all(prefix).await
    }
}

struct TellingAppender {
    inner: Box<dyn Appender>,
    key: String,
    told: mpsc::UnboundedSender<Told>,
}

#[tonic::async_trait]
impl Appender for TellingAppender {
    async fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.inner.append(data).await?;
        let _ = self.told.send(Told::Appended(self.key.clone()));
        Ok(())
    }

    async fn sync(&mut self) -> std::io::Result<()> {
        self.inner.sync().await
    }

    async fn file_len(&mut self) -> std::io::Result<u64> {
        self.inner.file_len().await
    }
}

impl Drop for TellingAppender {
    fn drop(&mut self) {
        let _ = self.told.send(Told::Closed(self.key.clone()));
    }
}

/// Issues the second processor's certificate into the development PKI under `dir`, which the
/// registry started on `dir` then trusts.
fn issue_other_certificate(dir: &Path) {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).expect("pki file");
    let ca = DevCa::load(&read(pki.ca()), &read(pki.dir.join("ca.key"))).expect("ca");
    let leaf = ca
        .issue(
            "dsrelay processor second",
            &dev_identity("processor", OTHER),
        )
        .expect("leaf");
    std::fs::write(pki.cert(OTHER_STEM), leaf.cert_pem).expect("cert");
    std::fs::write(pki.key(OTHER_STEM), leaf.key_pem).expect("key");
}

/// The file `name` of subprocessor `accounting` of request `id`, holding `data`.
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

/// The message carrying `data[from..to]` of the file `h` announces, with the header when
/// `from` is 0.
fn chunk(h: &ExportFileHeader, data: &[u8], from: usize, to: usize) -> UploadFileChunk {
    UploadFileChunk {
        header: (from == 0).then(|| h.clone()),
        offset: from as u64,
        data: data[from..to].to_vec().into(),
        chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(&data[from..to]),
        ..Default::default()
    }
}

/// Uploads the whole of `data` as the file `h` announces, in one stream of one message.
async fn upload_whole(
    uploads: &mut ExportUploadServiceClient<Channel>,
    h: &ExportFileHeader,
    data: &[u8],
) -> Result<UploadState, tonic::Status> {
    let message = chunk(h, data, 0, data.len());
    Ok(uploads
        .upload_file(tokio_stream::iter([message]))
        .await?
        .into_inner())
}

/// An upload stream left open after its first message (the header and the first byte of
/// `data`), and the task awaiting its answer.
struct Held {
    tx: UnboundedSender<UploadFileChunk>,
    answer: tokio::task::JoinHandle<Result<UploadState, tonic::Status>>,
    header: ExportFileHeader,
    data: Vec<u8>,
}

/// Opens [`Held`] streams of the files `names` and waits for the registry to have stored
/// each one's first byte: each then holds its place.
async fn hold(
    uploads: &ExportUploadServiceClient<Channel>,
    told: &mut mpsc::UnboundedReceiver<Told>,
    id: &str,
    names: &[&str],
) -> Vec<Held> {
    let mut held = Vec::new();
    for name in names {
        let data = format!("{{\"file\":\"{name}\"}}").into_bytes();
        let header = header(id, name, &data);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tx.unbounded_send(chunk(&header, &data, 0, 1))
            .expect("first message");
        let mut client = uploads.clone();
        let answer = tokio::spawn(async move { Ok(client.upload_file(rx).await?.into_inner()) });
        held.push(Held {
            tx,
            answer,
            header,
            data,
        });
    }
    let mut waiting: Vec<String> = names.iter().map(|n| (*n).to_string()).collect();
    while !waiting.is_empty() {
        match told.recv().await.expect("the store tells") {
            Told::Appended(key) => waiting.retain(|n| !key.ends_with(&format!("/{n}"))),
            Told::Closed(key) => panic!("{key} closed while its stream was held"),
        }
    }
    held
}

/// Waits for the store to tell that the file `name`'s appender was dropped.
async fn closed(told: &mut mpsc::UnboundedReceiver<Told>, name: &str) {
    loop {
        if let Told::Closed(key) = told.recv().await.expect("the store tells") {
            if key.ends_with(&format!("/{name}")) {
                return;
            }
        }
    }
}

/// Asserts that `refused` is the refusal of one stream past the bound of the processor
/// `PROCESSOR` of the test registry.
fn assert_over_the_bound(refused: Result<UploadState, tonic::Status>) {
    let status = refused.expect_err("a stream past the bound");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    for words in [
        format!("{} already has {LIMIT}", test_registry::PROCESSOR),
        format!("packages.uploads_per_processor = {LIMIT}"),
        "finish or end one of them".to_string(),
    ] {
        assert!(status.message().contains(&words), "{words} in {status:?}");
    }
}

/// One processor holds at most [`LIMIT`] upload streams: one more is refused before its
/// first message is read, while another processor's stream goes through; a stream ended by
/// its last byte, and one whose client vanished mid-file, each give their place back.
async fn uploads_are_bounded_per_processor(database_url: &str, dir: &Path) {
    issue_other_certificate(dir);
    let (tx, mut told) = mpsc::unbounded_channel();
    let hook: Arc<dyn Fn(Packages) -> Packages + Send + Sync> = Arc::new(move |p| Packages {
        store: Arc::new(Telling {
            inner: p.store,
            told: tx.clone(),
        }),
        ..p
    });
    let setup = Setup {
        tables: format!(
            "[packages]\nuploads_per_processor = {LIMIT}\n\
             [[processors]]\nname = \"{OTHER}\"\nendpoint = \"https://localhost:1\"\n\
             identity = {:?}\ncategories = [\"contact\"]\n",
            dev_identity("processor", OTHER)
        ),
        packages: Some(hook),
        ..Setup::default()
    };
    let registry = test_registry::Registry::start(dir, database_url, setup).await;
    let id = registry.submit(RequestKind::ReturnOfData, "bounded").await;
    registry.in_progress(&id, "accounting").await;
    let other_channel = registry.channel(OTHER_STEM);
    let applied = AcknowledgementServiceClient::new(other_channel.clone())
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![Acknowledgement {
                request_id: id.clone(),
                subprocessor: "accounting".into(),
                sequence: 1,
                state: TaskState::InProgress as i32,
                ..Default::default()
            }],
        })
        .await
        .expect("the second processor's acknowledgement")
        .into_inner()
        .applied;
    assert_eq!(applied, 1);

    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let mut held = hold(&uploads, &mut told, &id, &["held-a.json", "held-b.json"]).await;
    let data = b"{\"n\":1}".to_vec();
    assert_over_the_bound(
        upload_whole(&mut uploads, &header(&id, "past.json", &data), &data).await,
    );

    // Another processor's streams are counted apart.
    let mut others = ExportUploadServiceClient::new(other_channel);
    let theirs = upload_whole(&mut others, &header(&id, "theirs.json", &data), &data)
        .await
        .expect("another processor's stream");
    assert!(theirs.complete, "{theirs:?}");

    // A stream ended by its last byte gives its place back once answered.
    let a = held.remove(0);
    a.tx.unbounded_send(chunk(&a.header, &a.data, 1, a.data.len()))
        .expect("the rest");
    drop(a.tx);
    let done = a.answer.await.expect("joined").expect("stored");
    assert!(done.complete, "{done:?}");
    let next = upload_whole(&mut uploads, &header(&id, "next.json", &data), &data)
        .await
        .expect("a place given back by a stream that ended");
    assert!(next.complete, "{next:?}");

    // A client that vanishes mid-file (its call dropped: the stream is reset) gives its
    // place back too, once the registry's call for it ends.
    let b = held.remove(0);
    b.answer.abort();
    let _ = b.answer.await;
    closed(&mut told, "held-b.json").await;
    drop(b.tx);
    // Both places are free: two streams are held again, and a third is refused.
    let again = hold(&uploads, &mut told, &id, &["held-c.json", "held-d.json"]).await;
    assert_over_the_bound(
        upload_whole(&mut uploads, &header(&id, "past-again.json", &data), &data).await,
    );
    drop(again);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_bounded_per_processor_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    uploads_are_bounded_per_processor(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_bounded_per_processor_on_postgres() {
    on_postgres(|url, dir| async move { uploads_are_bounded_per_processor(&url, &dir).await })
        .await;
}
