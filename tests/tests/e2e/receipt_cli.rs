//! `dsrctl receipt get` and `dsrctl receipt verify`: a partner fetches the recipient's
//! signed receipt of a real transfer and checks it offline with the recipient's public key;
//! a receipt changed anywhere, checked with another key or unsigned fails with exit 1.

use std::time::Duration;

use dsrelay_proto::v1::{
    Request, RequestKind, RequestParameters, RequestState, SubmitRequest, TaskState,
};
use dsrelay_runtime::signing::{PublicKey, SigningKey};
use serde_json::Value;

use crate::harness::dsrctl::dsrctl;
use crate::harness::{
    erasure, spawn_pair, wait_until, Backend, Holder, PairOptions, RecipientOptions, NEWSLETTER,
    PROCESSOR, RECIPIENT,
};

/// In the sample accounting database (customer 1) and the newsletter's seed.
const MAIJA: &str = "maija.meikalainen@example.fi";

/// Every task COMPLETED with a receipt, and so the request.
fn received(view: &Request) -> bool {
    view.state == RequestState::Completed as i32
        && !view.tasks.is_empty()
        && view.tasks.iter().all(|t| {
            t.state == TaskState::Completed as i32
                && t.evidence
                    .as_ref()
                    .is_some_and(|e| e.transfer_receipt.is_some())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_cli_fetches_a_signed_receipt_and_verifies_it_offline() {
    let Some(pair) = spawn_pair(PairOptions {
        backend: Backend::Sqlite,
        holders: vec![Holder::Accounting, Holder::Newsletter],
        recipient: Some(RecipientOptions::default()),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.crm();
    let id = crm
        .submit(SubmitRequest {
            kind: RequestKind::Transfer as i32,
            parameters: Some(RequestParameters {
                transfer_recipient: RECIPIENT.into(),
                ..Default::default()
            }),
            ..erasure(MAIJA)
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let view = wait_until(&mut crm, &id, Duration::from_secs(30), received).await;
    let stored = view
        .tasks
        .iter()
        .find(|t| t.subprocessor == "accounting")
        .and_then(|t| t.evidence.as_ref()?.transfer_receipt.clone())
        .expect("accounting's receipt");
    assert!(!stored.signature.is_empty(), "{stored:?}");

    // Two tasks have receipts: dsrctl asks which one is meant, and writes nothing.
    let run = dsrctl(
        &pair,
        "partner-crm",
        &["receipt", "get", &id, "--out", "any.json"],
    )
    .await;
    run.expect_code(2);
    assert!(
        run.stderr.contains(&format!("{PROCESSOR}/{NEWSLETTER}")),
        "{}",
        run.stderr
    );
    assert!(!pair.dir().join("any.json").exists());
    // A task with no receipt: exit 1, nothing written.
    let run = dsrctl(
        &pair,
        "partner-crm",
        &[
            "receipt",
            "get",
            &id,
            "--subprocessor",
            "nobody",
            "--out",
            "none.json",
        ],
    )
    .await;
    run.expect_code(1);
    assert!(run.stderr.contains("no transfer receipt"), "{}", run.stderr);
    assert!(!pair.dir().join("none.json").exists());

    let file = pair.dir().join("receipt.json");
    let file_arg = file.to_str().expect("utf-8 path");
    let got = dsrctl(
        &pair,
        "partner-crm",
        &[
            "--output",
            "json",
            "receipt",
            "get",
            &id,
            "--processor",
            PROCESSOR,
            "--subprocessor",
            "accounting",
            "--out",
            file_arg,
        ],
    )
    .await
    .json();
    assert_eq!(got["subprocessor"], "accounting", "{got}");
    assert_eq!(got["key_id"], stored.key_id.as_str(), "{got}");

    // Offline: only the file and the recipient's public key, as a PEM file or as base64.
    let key = pair.pki().signing_public_key("recipient");
    let key_arg = key.to_str().expect("utf-8 path");
    let verified = dsrctl(
        &pair,
        "partner-crm",
        &[
            "--output",
            "json",
            "receipt",
            "verify",
            file_arg,
            "--public-key",
            key_arg,
        ],
    )
    .await
    .json();
    assert_eq!(verified["verified"], true, "{verified}");
    assert_eq!(verified["key_id"], stored.key_id.as_str());
    let attested = &verified["receipt"];
    assert_eq!(attested["request_id"], id.as_str());
    assert_eq!(attested["subprocessor"], "accounting");
    assert_eq!(attested["recipient"], RECIPIENT);
    assert_eq!(attested["bytes"], stored.bytes);
    assert_eq!(attested["files"], stored.files);
    assert_eq!(attested["manifest_sha256"], stored.manifest_sha256.as_str());
    assert!(attested["received_at"].is_string(), "{attested}");
    let pem = std::fs::read_to_string(&key).expect("public key");
    let base64_key = PublicKey::parse(&pem).expect("pem").to_base64();
    let text = dsrctl(
        &pair,
        "partner-crm",
        &["receipt", "verify", file_arg, "--key", &base64_key],
    )
    .await;
    let out = text.ok();
    assert!(
        out.starts_with(&format!("verified: signed by key {}\n", stored.key_id)),
        "{out}"
    );
    for line in [
        format!("request          {id}"),
        format!("recipient        {RECIPIENT}"),
        format!("bytes            {}", stored.bytes),
        format!("manifest sha256  {}", stored.manifest_sha256),
    ] {
        assert!(out.contains(&line), "{line:?} missing in\n{out}");
    }

    // One byte of the signature flipped, or a field changed: exit 1.
    let original: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("receipt file")).unwrap();
    // The first base64 digit carries the top six bits of the signature's first byte.
    let signature = original["signature"].as_str().expect("signature");
    let first = if signature.starts_with('A') { "B" } else { "A" };
    let mut flipped = original.clone();
    flipped["signature"] = format!("{first}{}", &signature[1..]).into();
    let mut changed = original.clone();
    changed["bytes"] = (stored.bytes + 1).into();
    let mut unsigned = original.clone();
    unsigned["signature"] = "".into();
    unsigned["key_id"] = "".into();
    for (name, doc, why) in [
        ("flipped.json", flipped, "does not match its fields"),
        ("changed.json", changed, "does not match its fields"),
        ("unsigned.json", unsigned, "not signed"),
    ] {
        let bad = pair.dir().join(name);
        std::fs::write(&bad, doc.to_string()).expect("write");
        let run = dsrctl(
            &pair,
            "partner-crm",
            &[
                "receipt",
                "verify",
                bad.to_str().expect("utf-8"),
                "--public-key",
                key_arg,
            ],
        )
        .await;
        run.expect_code(1);
        assert!(run.stderr.contains("does not verify"), "{}", run.stderr);
        assert!(run.stderr.contains(why), "{name}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{name}: {}", run.stdout);
    }
    // Another key, the processor's among them: exit 1.
    let processor_key = pair.pki().signing_public_key("processor");
    let other = SigningKey::generate().public_key().to_base64();
    for key in [processor_key.to_str().expect("utf-8"), other.as_str()] {
        let run = dsrctl(
            &pair,
            "partner-crm",
            &["receipt", "verify", file_arg, "--key", key],
        )
        .await;
        run.expect_code(1);
        assert!(
            run.stderr.contains("not with the given public key"),
            "{}",
            run.stderr
        );
    }

    // Another partner does not learn the request exists.
    let run = dsrctl(
        &pair,
        "partner-webform",
        &["receipt", "get", &id, "--out", "stolen.json"],
    )
    .await;
    run.expect_code(2);
    assert!(run.stderr.contains("NOT_FOUND"), "{}", run.stderr);
    assert!(!pair.dir().join("stolen.json").exists());
    pair.stop().await;
}
