//! The example recipient keeps the signed receipt of each part it closed in the part's
//! folder, as `.receipt.signed.json`, and `dsrctl receipt verify` checks that file against the
//! recipient's public key with no registry: what the recipient signed can be checked where it
//! stored the files.

use dsrelay_example_recipient::folder::sender_component;
use dsrelay_example_recipient::{App, Config};
use dsrelay_proto::v1::transfer_receiver_client::TransferReceiverClient;
use dsrelay_proto::v1::{CompleteTransferRequest, ExportFileHeader, UploadFileChunk};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::settings::ServiceSettings;
use sha2::{Digest, Sha256};

use crate::harness::dsrctl::{command, output};

#[tokio::test]
async fn the_receipt_the_recipient_keeps_verifies_with_dsrctl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = DevPki::ensure(&dir.path().join("pki")).expect("dev pki");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("port").port();
    let sender = dev_identity("processor", "payroll-bureau");
    let data_dir = dir.path().join("data");
    let config = Config {
        service: ServiceSettings::new(format!("127.0.0.1:{port}"), "", pki.files("recipient")),
        name: "new-bookkeeper".into(),
        data_dir: data_dir.clone(),
        allowed_identities: vec![sender.clone()],
        chunk_delay_ms: 0,
        signing_key: Some(pki.signing_key("recipient")),
    };
    let app = App::build(config).expect("build recipient");
    let server = tokio::spawn(app.run(listener, std::future::pending()));

    let tls = pki.files("processor").client_config().expect("tls");
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{port}"),
        Some(dev_identity("recipient", "example")),
        &tls,
    )
    .expect("channel");
    let mut c = TransferReceiverClient::new(channel);
    let data = b"{\"customer\": 1}".to_vec();
    let h = ExportFileHeader {
        request_id: "0190-kept-receipt".into(),
        subprocessor: "accounting".into(),
        name: "export.json".into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(&data)),
    };
    let chunk = UploadFileChunk {
        header: Some(h.clone()),
        offset: 0,
        chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(&data),
        data: data.into(),
        ..Default::default()
    };
    let stored = c
        .send_file(futures::stream::iter([chunk]))
        .await
        .expect("send")
        .into_inner();
    assert!(stored.complete, "{stored:?}");
    let receipt = c
        .complete_transfer(CompleteTransferRequest {
            request_id: h.request_id.clone(),
            subprocessor: h.subprocessor.clone(),
            files: vec![h.clone()],
        })
        .await
        .expect("close the part")
        .into_inner();

    let kept = data_dir
        .join(sender_component(&sender))
        .join(&h.request_id)
        .join(&h.subprocessor)
        .join(".receipt.signed.json");
    let key = pki.signing_public_key("recipient");
    let verify = |file: &std::path::Path| {
        let mut cmd = command(dir.path());
        cmd.args(["--output", "json", "receipt", "verify"])
            .arg(file)
            .arg("--public-key")
            .arg(&key);
        output(cmd)
    };
    let verified = verify(&kept).await.json();
    assert_eq!(verified["verified"], true, "{verified}");
    assert_eq!(verified["key_id"], receipt.key_id.as_str(), "{verified}");
    let attested = &verified["receipt"];
    assert_eq!(attested["request_id"], h.request_id.as_str(), "{verified}");
    assert_eq!(attested["recipient"], "new-bookkeeper", "{verified}");
    assert_eq!(attested["bytes"], receipt.bytes, "{verified}");
    assert_eq!(
        attested["manifest_sha256"],
        receipt.manifest_sha256.as_str(),
        "{verified}"
    );

    // What it attests is what was signed: the file changed by a byte count does not verify.
    let mut changed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&kept).expect("kept receipt")).expect("json");
    changed["bytes"] = (receipt.bytes + 1).into();
    let changed_file = dir.path().join("changed.json");
    std::fs::write(&changed_file, changed.to_string()).expect("write");
    let run = verify(&changed_file).await;
    run.expect_code(1);
    assert!(run.stderr.contains("does not verify"), "{}", run.stderr);
    server.abort();
}
