//! The example recipient's API over real mutual TLS: the dev PKI's "recipient" party serves,
//! its "processor" party sends (and, where two processors send, a second one the dev CA
//! issues).

use std::path::{Path, PathBuf};
use std::time::Duration;

use dsrelay_example_recipient::folder::sender_component;
use dsrelay_example_recipient::{App, Config};
use dsrelay_proto::v1::transfer_receiver_client::TransferReceiverClient;
use dsrelay_proto::v1::{
    CompleteTransferRequest, ExportFileHeader, FileEnd, GetUploadStateRequest, UploadFileChunk,
    UploadState,
};
use dsrelay_runtime::pki::{dev_identity, DevCa, DevPki};
use dsrelay_runtime::settings::ServiceSettings;
use dsrelay_runtime::tls::TlsFiles;
use dsrelay_runtime::transfer_manifest as manifest;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::Code;

const MIB: usize = 1024 * 1024;
const REQUEST: &str = "0190-transfer";

/// The dev PKI's processor, the sender unless a test says otherwise.
fn processor() -> String {
    dev_identity("processor", "payroll-bureau")
}

struct Running {
    pki: DevPki,
    data_dir: PathBuf,
    port: u16,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// A recipient writing to `dir/data`, with its PKI in `dir/pki`, taking transfers from
    /// the dev PKI's processor.
    async fn start(dir: &Path, chunk_delay_ms: u64) -> Self {
        Self::start_allowing(dir, chunk_delay_ms, vec![processor()]).await
    }

    /// [`Running::start`] taking transfers from the identities `allowed`.
    async fn start_allowing(dir: &Path, chunk_delay_ms: u64, allowed: Vec<String>) -> Self {
        Self::start_with(dir, chunk_delay_ms, allowed, false).await
    }

    /// [`Running::start`] signing its receipts with the dev PKI's recipient key.
    async fn start_signing(dir: &Path) -> Self {
        Self::start_with(dir, 0, vec![processor()], true).await
    }

    async fn start_with(
        dir: &Path,
        chunk_delay_ms: u64,
        allowed: Vec<String>,
        signing: bool,
    ) -> Self {
        let pki = DevPki::ensure(&dir.join("pki")).unwrap();
        let data_dir = dir.join("data");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = Config {
            service: ServiceSettings::new(format!("127.0.0.1:{port}"), "", pki.files("recipient")),
            name: "new-bookkeeper".into(),
            data_dir: data_dir.clone(),
            allowed_identities: allowed,
            chunk_delay_ms,
            signing_key: signing.then(|| pki.signing_key("recipient")),
        };
        config.validate().unwrap();
        let app = App::build(config).unwrap();
        let handle = tokio::spawn(app.run(listener, std::future::pending()));
        Self {
            pki,
            data_dir,
            port,
            handle,
        }
    }

    /// A client presenting party `stem`'s certificate, expecting the recipient to be
    /// `expected`.
    fn client_expecting(&self, stem: &str, expected: &str) -> TransferReceiverClient<Channel> {
        self.client_with(&self.pki.files(stem), expected)
    }

    /// A client presenting the certificate in `files`, expecting the recipient to be
    /// `expected`.
    fn client_with(&self, files: &TlsFiles, expected: &str) -> TransferReceiverClient<Channel> {
        let tls = files.client_config().unwrap();
        let channel = dsrelay_runtime::tls::channel(
            &format!("https://localhost:{}", self.port),
            Some(expected.to_string()),
            &tls,
        )
        .unwrap();
        TransferReceiverClient::new(channel)
    }

    /// The processor's client, expecting the recipient's own identity.
    fn client(&self) -> TransferReceiverClient<Channel> {
        self.client_expecting("processor", &dev_identity("recipient", "example"))
    }

    /// The folder of the test request's accounting part as `sender` sent it.
    fn part_dir(&self, sender: &str) -> PathBuf {
        self.data_dir
            .join(sender_component(sender))
            .join(REQUEST)
            .join("accounting")
    }
}

/// `len` bytes that differ from chunk to chunk.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn header(name: &str, data: &[u8]) -> ExportFileHeader {
    ExportFileHeader {
        request_id: REQUEST.into(),
        subprocessor: "accounting".into(),
        name: name.into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(data)),
    }
}

/// The messages sending `data[from..to]` in 1 MiB chunks, the header first.
fn chunks(h: &ExportFileHeader, data: &[u8], from: usize, to: usize) -> Vec<UploadFileChunk> {
    let mut out: Vec<UploadFileChunk> = data[from..to]
        .chunks(MIB)
        .enumerate()
        .map(|(i, c)| UploadFileChunk {
            header: None,
            offset: (from + i * MIB) as u64,
            data: c.to_vec().into(),
            chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(c),
            ..Default::default()
        })
        .collect();
    if out.is_empty() {
        out.push(UploadFileChunk::default());
    }
    out[0].header = Some(h.clone());
    out
}

async fn send(
    c: &mut TransferReceiverClient<Channel>,
    msgs: Vec<UploadFileChunk>,
) -> Result<UploadState, tonic::Status> {
    c.send_file(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn state(c: &mut TransferReceiverClient<Channel>, h: &ExportFileHeader) -> UploadState {
    c.get_transfer_state(GetUploadStateRequest {
        header: Some(h.clone()),
    })
    .await
    .unwrap()
    .into_inner()
}

fn part(files: &[ExportFileHeader]) -> CompleteTransferRequest {
    CompleteTransferRequest {
        request_id: REQUEST.into(),
        subprocessor: "accounting".into(),
        files: files.to_vec(),
    }
}

#[tokio::test]
async fn a_file_arrives_verified_and_the_part_answers_a_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let data = content(2 * MIB + 1234);
    let h = header("export.json", &data);
    assert_eq!(state(&mut c, &h).await, UploadState::default());
    let early = c
        .complete_transfer(part(std::slice::from_ref(&h)))
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    assert!(early.message().contains("export.json"), "{early:?}");

    let done = send(&mut c, chunks(&h, &data, 0, data.len()))
        .await
        .unwrap();
    assert!(done.complete);
    assert_eq!(done.offset, data.len() as u64);
    let stored = r.part_dir(&processor()).join("export.json");
    assert_eq!(std::fs::read(&stored).unwrap(), data);

    let receipt = c
        .complete_transfer(part(std::slice::from_ref(&h)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.request_id, REQUEST);
    assert_eq!(receipt.subprocessor, "accounting");
    assert_eq!(receipt.recipient, "new-bookkeeper");
    assert_eq!(receipt.bytes, data.len() as u64);
    assert_eq!(receipt.files, 1);
    assert!(receipt.signature.is_empty() && receipt.key_id.is_empty());
    assert_eq!(
        receipt.manifest_sha256,
        manifest::sha256(REQUEST, "accounting", std::slice::from_ref(&h))
    );
    let written = std::fs::read(stored.with_file_name(".manifest.json")).unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&written)),
        receipt.manifest_sha256
    );
    // Closing the same part again answers the first receipt; other files are refused.
    let again = c
        .complete_transfer(part(std::slice::from_ref(&h)))
        .await
        .unwrap();
    assert_eq!(again.into_inner(), receipt);
    let other = c.complete_transfer(part(&[])).await.unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
}

/// With a signing key every receipt answered is signed, the first close and a repeated one
/// alike, and verifies under the recipient's public key from the dev PKI; without one the
/// receipt is unsigned (above).
#[tokio::test]
async fn receipts_are_signed_with_the_configured_key() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start_signing(dir.path()).await;
    let mut c = r.client();
    let data = content(1000);
    let h = header("export.json", &data);
    assert!(
        send(&mut c, chunks(&h, &data, 0, data.len()))
            .await
            .unwrap()
            .complete
    );
    let public = std::fs::read_to_string(r.pki.signing_public_key("recipient")).unwrap();
    let public = dsrelay_runtime::signing::PublicKey::parse(&public).unwrap();
    let ring = dsrelay_runtime::signing::KeyRing::new(public.clone(), vec![]).unwrap();
    let first = c
        .complete_transfer(part(std::slice::from_ref(&h)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.key_id, public.key_id());
    assert_eq!(
        dsrelay_runtime::transfer_receipt::verify(&first, &ring),
        Ok(())
    );
    let again = c
        .complete_transfer(part(std::slice::from_ref(&h)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first);
    // The part's folder keeps the signed receipt in the form `dsrctl receipt get` writes
    // (tests/tests/e2e/recipient_receipt.rs has `dsrctl receipt verify` check it).
    let kept = r.part_dir(&processor()).join(".receipt.signed.json");
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(kept).unwrap()).unwrap();
    use base64::Engine as _;
    let signature = base64::engine::general_purpose::STANDARD.encode(&first.signature);
    let at = first.received_at.unwrap();
    let at = chrono::DateTime::from_timestamp(at.seconds, at.nanos as u32).unwrap();
    assert_eq!(
        kept,
        serde_json::json!({
            "request_id": REQUEST,
            "subprocessor": "accounting",
            "recipient": "new-bookkeeper",
            "sender": processor(),
            "bytes": 1000,
            "files": 1,
            "manifest_sha256": first.manifest_sha256,
            "received_at": at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "key_id": public.key_id(),
            "signature": signature,
        })
    );
}

/// A signing key that cannot be read stops the start, naming the setting and the file.
#[test]
fn an_unreadable_signing_key_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki")).unwrap();
    let key = dir.path().join("missing-signing.key");
    let config = Config {
        service: ServiceSettings::new("127.0.0.1:0", "", pki.files("recipient")),
        name: "new-bookkeeper".into(),
        data_dir: dir.path().join("data"),
        allowed_identities: vec![processor()],
        chunk_delay_ms: 0,
        signing_key: Some(key.clone()),
    };
    let err = App::build(config).err().expect("no key to read");
    let err = format!("{err:#}");
    assert!(err.starts_with("signing_key: "), "{err}");
    assert!(err.contains(&key.display().to_string()), "{err}");
}

#[tokio::test]
async fn an_interrupted_file_resumes_at_the_stored_offset() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let data = content(3 * MIB);
    let h = header("big.csv", &data);
    let first = send(&mut c, chunks(&h, &data, 0, MIB)).await.unwrap();
    assert_eq!(
        first,
        UploadState {
            offset: MIB as u64,
            complete: false
        }
    );
    assert_eq!(state(&mut c, &h).await.offset, MIB as u64);
    // A chunk that does not start at the stored offset is refused and stores nothing.
    let skipped = send(&mut c, chunks(&h, &data, 2 * MIB, 3 * MIB))
        .await
        .unwrap_err();
    assert_eq!(skipped.code(), Code::FailedPrecondition);
    assert!(skipped.message().contains(&format!("{MIB}")), "{skipped:?}");
    let done = send(&mut c, chunks(&h, &data, MIB, 3 * MIB)).await.unwrap();
    assert!(done.complete);
    let stored = r.part_dir(&processor()).join("big.csv");
    assert_eq!(std::fs::read(stored).unwrap(), data);
}

#[tokio::test]
async fn a_corrupted_chunk_or_file_is_refused_and_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let data = content(MIB + 10);
    let h = header("export.json", &data);
    let mut msgs = chunks(&h, &data, 0, data.len());
    let mut damaged = msgs[1].data.to_vec();
    damaged[3] ^= 0xff;
    msgs[1].data = damaged.into();
    let bad = send(&mut c, msgs).await.unwrap_err();
    assert_eq!(bad.code(), Code::DataLoss, "{bad:?}");
    // The good first chunk stayed; the damaged one left nothing.
    assert_eq!(state(&mut c, &h).await.offset, MIB as u64);

    // Chunks that match their own checksums but not the file's digest: the whole file is dropped.
    let mut lying = h.clone();
    lying.sha256 = "0".repeat(64);
    let dropped = send(&mut c, chunks(&lying, &data, 0, data.len()))
        .await
        .unwrap_err();
    assert_eq!(dropped.code(), Code::DataLoss, "{dropped:?}");
    assert_eq!(state(&mut c, &lying).await, UploadState::default());
    assert!(!r.part_dir(&processor()).join("export.json").exists());
}

#[tokio::test]
async fn only_configured_senders_reach_it_and_senders_check_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let data = content(10);
    let h = header("export.json", &data);
    let mut partner = r.client_expecting("partner-crm", &dev_identity("recipient", "example"));
    let refused = partner
        .get_transfer_state(GetUploadStateRequest {
            header: Some(h.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A processor expecting another recipient does not talk to this one.
    let mut wrong = r.client_expecting("processor", &dev_identity("recipient", "other"));
    let err = wrong
        .get_transfer_state(GetUploadStateRequest { header: Some(h) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let entries = std::fs::read_dir(&r.data_dir).unwrap().count();
    assert_eq!(entries, 0, "nothing stored for a refused caller");
}

#[tokio::test]
async fn bad_headers_name_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let mut h = header("../escape", b"x");
    h.request_id = "a/b".into();
    let err = c
        .get_transfer_state(GetUploadStateRequest { header: Some(h) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let details = tonic_types::StatusExt::get_details_bad_request(&err).expect("field details");
    let fields: Vec<&str> = details
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    assert_eq!(fields, ["header.request_id", "header.name"]);
}

/// A file whose size and digest follow at its end (the registry's uploads of a file still
/// being written) is refused by name, and nothing of it is stored.
#[tokio::test]
async fn a_file_whose_size_follows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let data = content(1000);
    let h = header("grown.json", &data);
    let mut first = chunks(&h, &data, 0, data.len());
    first[0].size_follows = true;
    let err = send(&mut c, first).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("size_follows"), "{err:?}");
    let mut ended = chunks(&h, &data, 0, data.len());
    ended.push(UploadFileChunk {
        offset: data.len() as u64,
        end: Some(FileEnd {
            size: data.len() as u64,
            sha256: h.sha256.clone(),
        }),
        ..Default::default()
    });
    let err = send(&mut c, ended).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("end"), "{err:?}");
    // The chunks before the refused message were stored: the file is whole, as sent.
    assert!(state(&mut c, &h).await.complete);
}

#[tokio::test]
async fn a_transfer_cut_mid_stream_resumes_after_the_recipient_restarts() {
    let dir: TempDir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 150).await;
    let data = content(8 * MIB);
    let h = header("export.json", &data);
    let mut c = r.client();
    let sending = tokio::spawn({
        let msgs = chunks(&h, &data, 0, data.len());
        async move { send(&mut c, msgs).await }
    });
    let partial = r.part_dir(&processor()).join("export.json.partial");
    // Stop it once some chunks are stored, long before the last.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 2 * MIB as u64 {
        assert!(tokio::time::Instant::now() < deadline, "no chunk arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The sender's stream breaks off, and the recipient goes down with what it stored.
    sending.abort();
    assert!(sending.await.unwrap_err().is_cancelled());
    r.handle.abort();
    let _ = r.handle.await;
    // Whatever the old server still had in hand has been written once the size holds still.
    let mut size = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let now = std::fs::metadata(&partial).unwrap().len();
        if now == size {
            break;
        }
        size = now;
    }

    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let at = state(&mut c, &h).await;
    assert!(!at.complete);
    assert!(
        at.offset >= 2 * MIB as u64,
        "resumes past the stored chunks: {at:?}"
    );
    assert!(at.offset < data.len() as u64);
    let done = send(&mut c, chunks(&h, &data, at.offset as usize, data.len()))
        .await
        .unwrap();
    assert!(done.complete);
    let receipt = c.complete_transfer(part(&[h])).await.unwrap().into_inner();
    assert_eq!(receipt.bytes, data.len() as u64);
    let stored = r.part_dir(&processor()).join("export.json");
    assert_eq!(std::fs::read(stored).unwrap(), data);
}

/// The size of the largest `.partial` file anywhere under `dir` (0 if none).
fn largest_partial(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut largest = 0;
    for e in entries.flatten() {
        let path = e.path();
        let size = if path.is_dir() {
            largest_partial(&path)
        } else if path.extension().is_some_and(|x| x == "partial") {
            e.metadata().map(|m| m.len()).unwrap_or(0)
        } else {
            0
        };
        largest = largest.max(size);
    }
    largest
}

/// A second processor's certificate, issued by the dev CA in `dir/pki` into `dir`.
fn second_processor(dir: &Path, identity: &str) -> TlsFiles {
    let pki = dir.join("pki");
    let read = |name: &str| std::fs::read_to_string(pki.join(name)).unwrap();
    let ca = DevCa::load(&read("ca.pem"), &read("ca.key")).unwrap();
    let leaf = ca
        .issue("dsrelay processor other-bureau", identity)
        .unwrap();
    let (cert, key) = (dir.join("other-bureau.pem"), dir.join("other-bureau.key"));
    std::fs::write(&cert, leaf.cert_pem).unwrap();
    std::fs::write(&key, leaf.key_pem).unwrap();
    TlsFiles::new(pki.join("ca.pem"), cert, key)
}

/// Subprocessor names are unique only within a processor: two processors transferring the
/// same request, each with an "accounting" sending an "export.json", neither see nor block
/// nor overwrite each other's part, and each record names its sender.
#[tokio::test]
async fn two_senders_parts_of_the_same_name_are_stored_apart() {
    let dir = tempfile::tempdir().unwrap();
    let other = dev_identity("processor", "other-bureau");
    let r = Running::start_allowing(dir.path(), 0, vec![processor(), other.clone()]).await;
    let other_tls = second_processor(dir.path(), &other);
    let mut a = r.client();
    let mut b = r.client_with(&other_tls, &dev_identity("recipient", "example"));
    let data_a = content(2 * MIB);
    let data_b: Vec<u8> = content(MIB + 77).into_iter().rev().collect();
    let (ha, hb) = (
        header("export.json", &data_a),
        header("export.json", &data_b),
    );

    // The first sender's stream stays open after its first chunk, holding its file.
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let mut msgs = chunks(&ha, &data_a, 0, data_a.len()).into_iter();
    tx.unbounded_send(msgs.next().unwrap()).unwrap();
    let sending_a = tokio::spawn({
        let mut a = a.clone();
        async move { a.send_file(rx).await.map(|r| r.into_inner()) }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while largest_partial(&r.data_dir) < MIB as u64 {
        assert!(tokio::time::Instant::now() < deadline, "no chunk arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The second sender's file of the same name goes meanwhile, and starts from nothing.
    assert_eq!(state(&mut b, &hb).await, UploadState::default());
    let done_b = send(&mut b, chunks(&hb, &data_b, 0, data_b.len()))
        .await
        .unwrap();
    assert!(done_b.complete);
    let receipt_b = b
        .complete_transfer(part(std::slice::from_ref(&hb)))
        .await
        .unwrap()
        .into_inner();
    // The first sender's half-sent file is untouched (and its state waits for its stream).
    let partial = r.part_dir(&processor()).join("export.json.partial");
    assert_eq!(std::fs::metadata(partial).unwrap().len(), MIB as u64);
    let busy = a
        .get_transfer_state(GetUploadStateRequest {
            header: Some(ha.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    for m in msgs {
        tx.unbounded_send(m).unwrap();
    }
    drop(tx);
    assert!(sending_a.await.unwrap().unwrap().complete);
    let receipt_a = a
        .complete_transfer(part(std::slice::from_ref(&ha)))
        .await
        .unwrap()
        .into_inner();

    for (sender, h, data, receipt) in [
        (processor(), &ha, &data_a, &receipt_a),
        (other.clone(), &hb, &data_b, &receipt_b),
    ] {
        let folder = r.part_dir(&sender);
        assert_eq!(&std::fs::read(folder.join("export.json")).unwrap(), data);
        assert_eq!(receipt.bytes, data.len() as u64);
        assert_eq!(
            receipt.manifest_sha256,
            manifest::sha256(REQUEST, "accounting", std::slice::from_ref(h))
        );
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(folder.join(".receipt.json")).unwrap()).unwrap();
        assert_eq!(written["sender"], sender.as_str());
        assert_eq!(written["manifest_sha256"], receipt.manifest_sha256.as_str());
    }
    assert_ne!(receipt_a.manifest_sha256, receipt_b.manifest_sha256);
}

/// Each receipt names the processor whose part it is, by the certificate identity it
/// presented over mutual TLS, and signs it (the version 2 body): the receipt of one
/// processor's part, given the other processor as its sender, no longer verifies, so it
/// cannot pass for the other's part of the same request and subprocessor. Before, receipts
/// named no sender and the two parts' receipts differed only in their manifests.
#[tokio::test]
async fn a_receipt_names_the_processor_that_sent_the_part() {
    let dir = tempfile::tempdir().unwrap();
    let other = dev_identity("processor", "other-bureau");
    let r = Running::start_with(dir.path(), 0, vec![processor(), other.clone()], true).await;
    let other_tls = second_processor(dir.path(), &other);
    let mut a = r.client();
    let mut b = r.client_with(&other_tls, &dev_identity("recipient", "example"));
    let data = content(1000);
    let h = header("export.json", &data);
    let public = std::fs::read_to_string(r.pki.signing_public_key("recipient")).unwrap();
    let public = dsrelay_runtime::signing::PublicKey::parse(&public).unwrap();
    let ring = dsrelay_runtime::signing::KeyRing::new(public, vec![]).unwrap();
    let mut receipts = Vec::new();
    for (c, sender) in [(&mut a, processor()), (&mut b, other.clone())] {
        assert!(
            send(c, chunks(&h, &data, 0, data.len()))
                .await
                .unwrap()
                .complete
        );
        let receipt = c
            .complete_transfer(part(std::slice::from_ref(&h)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(receipt.sender, sender);
        assert_eq!(
            dsrelay_runtime::transfer_receipt::verify(&receipt, &ring),
            Ok(())
        );
        receipts.push(receipt);
    }
    // The same files: only the sender tells the two receipts apart.
    assert_eq!(receipts[0].manifest_sha256, receipts[1].manifest_sha256);
    let passed_off = dsrelay_proto::v1::TransferReceipt {
        sender: other,
        ..receipts[0].clone()
    };
    let why = dsrelay_runtime::transfer_receipt::verify(&passed_off, &ring).unwrap_err();
    assert!(why.contains("does not match"), "{why}");
}

/// The error events logged on this thread while it is recorded: a `#[tokio::test]` runs the
/// in-process server's tasks on the test's own thread, so a thread's recorder sees the
/// server's log without changing what other tests running alongside log.
mod errors {
    use std::fmt::{self, Write};
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata};

    /// Collects the WARN and ERROR events, each as its `name=value` fields.
    #[derive(Clone, Default)]
    pub(crate) struct Recorder(Arc<Mutex<Vec<String>>>);

    struct Line(String);

    impl Visit for Line {
        fn record_str(&mut self, field: &Field, value: &str) {
            let _ = write!(self.0, "{}={value} ", field.name());
        }

        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            let _ = write!(self.0, "{}={value:?} ", field.name());
        }
    }

    impl tracing::Subscriber for Recorder {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.is_event() && *metadata.level() <= Level::WARN
        }

        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }

        fn record(&self, _: &Id, _: &Record<'_>) {}

        fn record_follows_from(&self, _: &Id, _: &Id) {}

        fn event(&self, event: &Event<'_>) {
            let mut line = Line(String::new());
            event.record(&mut line);
            self.0.lock().expect("log").push(line.0);
        }

        fn enter(&self, _: &Id) {}

        fn exit(&self, _: &Id) {}
    }

    impl Recorder {
        /// The events recorded so far.
        pub(crate) fn lines(&self) -> Vec<String> {
            self.0.lock().expect("log").clone()
        }
    }
}

/// The lines logged for `reason` naming `sender`.
fn refusal_lines(recorder: &errors::Recorder, sender: &str, reason: &str) -> Vec<String> {
    let (sender, reason) = (format!("sender={sender} "), format!("reason={reason} "));
    (recorder.lines().into_iter())
        .filter(|l| l.contains(&sender) && l.contains(&reason))
        .collect()
}

/// The refusals the lines count, added up.
fn refusals_counted(lines: &[String]) -> u64 {
    lines
        .iter()
        .map(|l| {
            let n = l.split("refused=").nth(1).expect("a refused= field");
            n.split(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum()
}

/// A caller not in `allowed_identities` and a file whose bytes do not hash to its header's
/// digest are logged, naming the sender's certificate identity and the reason, one line at
/// once and then at most one a second per sender and reason however many come: the ones
/// left out are counted into a line of their own within about two seconds. Before, neither
/// left a line at INFO or above.
#[tokio::test]
async fn refusals_are_logged_once_a_second_per_sender_and_reason() {
    let recorder = errors::Recorder::default();
    let _recording = tracing::subscriber::set_default(recorder.clone());
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let data = content(1000);
    let h = header("export.json", &data);
    let mut partner = r.client_expecting("partner-crm", &dev_identity("recipient", "example"));
    let crm = dev_identity("partner", "crm");
    let not_allowed = "not in allowed_identities";
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let refused = partner
            .get_transfer_state(GetUploadStateRequest {
                header: Some(h.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
    let mut lying = h.clone();
    lying.sha256 = "0".repeat(64);
    let mut c = r.client();
    for _ in 0..2 {
        let dropped = send(&mut c, chunks(&lying, &data, 0, data.len()))
            .await
            .unwrap_err();
        assert_eq!(dropped.code(), Code::DataLoss, "{dropped:?}");
    }
    let first = refusal_lines(&recorder, &crm, not_allowed);
    let digest = refusal_lines(&recorder, &processor(), "file digest mismatch");
    if started.elapsed() < Duration::from_millis(900) {
        assert_eq!(first.len(), 1, "{first:#?}");
        assert_eq!(digest.len(), 1, "{digest:#?}");
    }
    assert!(first[0].contains("refused=1 left_out=0 "), "{first:#?}");
    assert!(
        first[0].contains(&format!("certificate identity {crm} may not send")),
        "{first:#?}"
    );
    assert!(
        digest[0].contains("file export.json: the 1000 bytes received have SHA-256"),
        "{digest:#?}"
    );
    // The rest follow without another refusal to carry them.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let lines = refusal_lines(&recorder, &crm, not_allowed);
        let digest = refusal_lines(&recorder, &processor(), "file digest mismatch");
        if refusals_counted(&lines) == 5 && refusals_counted(&digest) == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every refusal counted: {:#?}",
            recorder.lines()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        (recorder.lines().iter()).all(|l| !l.contains("refused=0")),
        "{:#?}",
        recorder.lines()
    );
}

/// A file-system failure is logged with the step that failed and the path it failed on, so
/// an operator can tell which file of which part to look at; the sender, another
/// organisation, is told only that the recipient failed and logged why, never a local path.
/// Tests run as root, whom permission bits do not stop, so the failures are staged with
/// entries of the wrong kind: a file where the part's folder belongs, and a partial file
/// that is a link to `/dev/full` (every write to it fails: the disk is full).
#[tokio::test]
async fn file_system_failures_are_logged_with_the_step_and_the_path() {
    let recorder = errors::Recorder::default();
    let _recording = tracing::subscriber::set_default(recorder.clone());
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let data = content(1000);
    let refused = |s: &tonic::Status| {
        assert_eq!(s.code(), Code::Internal, "{s:?}");
        assert_eq!(
            s.message(),
            "internal error; the recipient logged the details"
        );
        assert!(
            !s.message().contains(&*r.data_dir.to_string_lossy()),
            "{s:?}"
        );
    };
    let logged = |step: &str, path: &Path| {
        let wanted = format!("{step} {}: ", path.display());
        let lines = recorder.lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("internal error") && l.contains(&wanted)),
            "no error logged naming {wanted:?}: {lines:#?}"
        );
    };

    // The part's folder is a file: its files' headers cannot even be looked for.
    let blocked = header("blocked.json", &data);
    let part = r.part_dir(&processor());
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, b"not a folder").unwrap();
    let err = send(&mut c, chunks(&blocked, &data, 0, data.len()))
        .await
        .unwrap_err();
    refused(&err);
    logged(
        "reading the header",
        &part.join(".header.blocked.json.json"),
    );
    std::fs::remove_file(&part).unwrap();

    // The disk fills up under a file's partial form: the chunk cannot be appended.
    let h = header("export.json", &data);
    assert_eq!(state(&mut c, &h).await, UploadState::default());
    let partial = part.join("export.json.partial");
    std::os::unix::fs::symlink("/dev/full", &partial).unwrap();
    let err = send(&mut c, chunks(&h, &data, 0, data.len()))
        .await
        .unwrap_err();
    refused(&err);
    logged("appending to", &partial);
}

/// The names in the folder `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// A closed part's folder holding exactly `names` (and their headers).
fn closed_with(names: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = names
        .iter()
        .flat_map(|n| [n.to_string(), format!(".header.{n}.json")])
        .chain([".manifest.json".into(), ".receipt.json".into()])
        .collect();
    out.sort();
    out
}

/// Once a part's receipt is written the part takes no changes: the receipt's files answer
/// complete, any other file (or one of its files announced differently) is refused naming
/// the receipt's manifest, and closing it again with the same files answers the same receipt.
#[tokio::test]
async fn a_closed_part_takes_no_changes() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let data = content(MIB + 5);
    let h = header("export.json", &data);
    assert!(
        send(&mut c, chunks(&h, &data, 0, data.len()))
            .await
            .unwrap()
            .complete
    );
    let receipt = c
        .complete_transfer(part(std::slice::from_ref(&h)))
        .await
        .unwrap()
        .into_inner();
    let refused = |s: tonic::Status, name: &str| {
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        let wanted = format!(
            "the part of accounting in request {REQUEST} was closed with manifest SHA-256 {}",
            receipt.manifest_sha256
        );
        assert!(s.message().contains(&wanted), "{s:?}");
        assert!(s.message().contains(name), "{s:?}");
    };

    assert_eq!(
        state(&mut c, &h).await,
        UploadState {
            offset: data.len() as u64,
            complete: true
        }
    );
    let late_data = content(100);
    let late = header("late.json", &late_data);
    let asked = c
        .get_transfer_state(GetUploadStateRequest {
            header: Some(late.clone()),
        })
        .await
        .unwrap_err();
    refused(asked, "late.json");
    let sent = send(&mut c, chunks(&late, &late_data, 0, late_data.len()))
        .await
        .unwrap_err();
    refused(sent, "late.json");
    // One of its files announced with other bytes does not restart it.
    let other_data = content(MIB + 6);
    let other = header("export.json", &other_data);
    let restarted = send(&mut c, chunks(&other, &other_data, 0, other_data.len()))
        .await
        .unwrap_err();
    refused(restarted, "export.json");

    let again = c
        .complete_transfer(part(std::slice::from_ref(&h)))
        .await
        .unwrap();
    assert_eq!(again.into_inner(), receipt);
    let folder = r.part_dir(&processor());
    assert_eq!(entries(&folder), closed_with(&["export.json"]));
    assert_eq!(std::fs::read(folder.join("export.json")).unwrap(), data);
}

/// A file stored complete in a part with no receipt yet, announced again with other bytes
/// (a task retried at the processor exports anew), restarts at offset 0 and takes the new
/// bytes, which the receipt then covers; once the part is closed, the old header is refused.
/// Before, the new header was refused as long as the old file was stored.
#[tokio::test]
async fn a_complete_file_of_an_open_part_restarts_under_another_header() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let old_data = content(MIB + 5);
    let old = header("customers.json", &old_data);
    assert!(
        send(&mut c, chunks(&old, &old_data, 0, old_data.len()))
            .await
            .unwrap()
            .complete
    );
    let new_data: Vec<u8> = content(MIB + 5).iter().map(|b| b ^ 0x55).collect();
    let new = header("customers.json", &new_data);
    assert_ne!(new.sha256, old.sha256);
    assert_eq!(state(&mut c, &new).await, UploadState::default());
    let folder = r.part_dir(&processor());
    assert!(
        !folder.join("customers.json").exists(),
        "the old bytes went"
    );
    let done = send(&mut c, chunks(&new, &new_data, 0, new_data.len()))
        .await
        .unwrap();
    assert!(done.complete);
    assert_eq!(
        std::fs::read(folder.join("customers.json")).unwrap(),
        new_data
    );

    let receipt = c
        .complete_transfer(part(std::slice::from_ref(&new)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        receipt.manifest_sha256,
        manifest::sha256(REQUEST, "accounting", std::slice::from_ref(&new))
    );
    assert_eq!(receipt.bytes, new_data.len() as u64);
    let refused = c
        .get_transfer_state(GetUploadStateRequest {
            header: Some(old.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains(&receipt.manifest_sha256),
        "{refused:?}"
    );
    assert_eq!(
        std::fs::read(folder.join("customers.json")).unwrap(),
        new_data
    );
}

/// An earlier attempt's files the final list does not name (a whole file, a partial one, one
/// only announced) are removed when the part is closed: the folder holds what the receipt
/// covers.
#[tokio::test]
async fn closing_a_part_removes_the_files_it_does_not_list() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let (old_data, half_data, kept_data) = (content(1000), content(2 * MIB), content(3000));
    let old = header("old.json", &old_data);
    assert!(
        send(&mut c, chunks(&old, &old_data, 0, old_data.len()))
            .await
            .unwrap()
            .complete
    );
    let half = header("half.json", &half_data);
    assert_eq!(
        send(&mut c, chunks(&half, &half_data, 0, MIB))
            .await
            .unwrap()
            .offset,
        MIB as u64
    );
    let announced = header("announced.json", b"never sent");
    assert_eq!(state(&mut c, &announced).await, UploadState::default());
    let kept = header("kept.json", &kept_data);
    assert!(
        send(&mut c, chunks(&kept, &kept_data, 0, kept_data.len()))
            .await
            .unwrap()
            .complete
    );
    let folder = r.part_dir(&processor());
    assert!(folder.join("half.json.partial").exists());

    let receipt = c
        .complete_transfer(part(std::slice::from_ref(&kept)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((receipt.files, receipt.bytes), (1, kept_data.len() as u64));
    assert_eq!(entries(&folder), closed_with(&["kept.json"]));
    assert_eq!(std::fs::read(folder.join("kept.json")).unwrap(), kept_data);
}

/// A part is not closed while one of its files is being received: the file would land in
/// the closed part after its receipt. The closing is turned away, naming the file, and goes
/// once the file's stream has ended.
#[tokio::test]
async fn a_part_is_not_closed_while_a_file_of_it_is_received() {
    let dir = tempfile::tempdir().unwrap();
    let r = Running::start(dir.path(), 0).await;
    let mut c = r.client();
    let data = content(2 * MIB);
    let h = header("export.json", &data);
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let mut msgs = chunks(&h, &data, 0, data.len()).into_iter();
    tx.unbounded_send(msgs.next().unwrap()).unwrap();
    let sending = tokio::spawn({
        let mut c = c.clone();
        async move { c.send_file(rx).await.map(|r| r.into_inner()) }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while largest_partial(&r.data_dir) < MIB as u64 {
        assert!(tokio::time::Instant::now() < deadline, "no chunk arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let busy = c.complete_transfer(part(&[])).await.unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    assert!(busy.message().contains("export.json"), "{busy:?}");
    assert!(!r.part_dir(&processor()).join(".receipt.json").exists());

    for m in msgs {
        tx.unbounded_send(m).unwrap();
    }
    drop(tx);
    assert!(sending.await.unwrap().unwrap().complete);
    let receipt = c
        .complete_transfer(part(std::slice::from_ref(&h)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.bytes, data.len() as u64);
    assert_eq!(
        entries(&r.part_dir(&processor())),
        closed_with(&["export.json"])
    );
}
