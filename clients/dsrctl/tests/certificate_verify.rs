//! `dsrctl certificate verify` on files signed here with a test key: a body the processor's
//! certificate type writes, of either version, verifies; a body the same key signed that
//! certificate.proto does not define (an audit checkpoint, an unknown version, a key too
//! many or too few, a state or count out of range) exits 1, says what is wrong and prints
//! nothing on stdout, in either output format.
//!
//! A certificate a real processor issued is verified in the end-to-end suite
//! (`tests/tests/e2e/certificates.rs`).

use std::path::Path;
use std::process::Output;

use dsrelay_connectors::ErasedCount;
use dsrelay_processor::certificates::{
    CertificateBody, Confirmation, ContractEndFacts, Retained, Returned, ReturnedPart,
};
use dsrelay_runtime::signing::{canonical_json, SigningKey};
use serde_json::{json, Value};

/// Runs dsrctl in `cwd` with no `DSRCTL_*` variable of the shell's.
fn dsrctl(cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dsrctl"));
    cmd.current_dir(cwd).args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("DSRCTL_") {
            cmd.env_remove(name);
        }
    }
    cmd.output().expect("running dsrctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An erasure's body, version 1, as the processor's type writes it.
fn erasure() -> Value {
    let body = CertificateBody {
        version: 1,
        certificate_id: "0193a1f0-7c3e-7d5a-9b1e-2f4c6a8e0b12".into(),
        kind: "erasure".into(),
        processor: "spiffe://dsrelay.test/processor/processor".into(),
        controller: "acme".into(),
        request_id: "r-1".into(),
        subprocessor: "accounting".into(),
        task_state: "RETAINED".into(),
        records_affected: 3,
        erased: vec![ErasedCount {
            target: "contacts".into(),
            action: "deleted".into(),
            count: 3,
        }],
        retained: vec![Retained {
            subprocessor: "accounting".into(),
            legal_basis: "Kirjanpitolaki 2:10 §".into(),
            until: "2031-01-01T00:00:00.000Z".into(),
        }],
        uncounted: None,
        follows: None,
        contract_end: None,
        completed_at: "2025-01-01T00:00:00.000Z".into(),
        issued_at: "2025-01-01T00:00:00.000Z".into(),
    };
    serde_json::to_value(body).expect("json")
}

/// A contract end's body, version 2, with a return to a recipient.
fn contract_end() -> Value {
    let mut body: CertificateBody = serde_json::from_value(erasure()).expect("body");
    body.version = 2;
    body.kind = "contract_end".into();
    body.task_state = "COMPLETED".into();
    body.retained.clear();
    body.follows = Some("0193a1f0-7c3e-7d5a-9b1e-2f4c6a8e0b11".into());
    body.contract_end = Some(ContractEndFacts {
        choice: "RETURN_THEN_DELETE".into(),
        effective_at: "2026-01-01T00:00:00.000Z".into(),
        grace_ends_at: "2026-02-01T00:00:00.000Z".into(),
        returned: Some(Returned {
            to: "recipient".into(),
            recipient: "archive-oy".into(),
            part: Some(ReturnedPart {
                manifest_sha256: "ab".repeat(32),
                files: 2,
                bytes: 150,
                delivered_at: Some("2026-01-02T00:00:00.000Z".into()),
            }),
            confirmation: Confirmation {
                state: "CONFIRMED".into(),
                at: Some("2026-01-15T00:00:00.000Z".into()),
            },
        }),
    });
    serde_json::to_value(body).expect("json")
}

/// Signs `body` with `key` and writes the certificate file to `dir/name`.
fn signed_file(dir: &Path, name: &str, key: &SigningKey, body: &Value) -> String {
    let doc = key.sign(canonical_json(body).expect("canonical"));
    let path = dir.join(name);
    std::fs::write(&path, doc.to_file_json().expect("file form")).expect("write");
    path.to_str().expect("utf-8").to_string()
}

#[test]
fn a_signed_body_of_either_version_verifies_and_is_described() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::generate();
    let public = key.public_key().to_base64();
    for (name, body, line) in [
        (
            "v1.json",
            erasure(),
            "retained      accounting: kept under Kirjanpitolaki 2:10 §",
        ),
        (
            "v2.json",
            contract_end(),
            "returned      to transfer recipient archive-oy: 2 file(s), 150 bytes",
        ),
    ] {
        let file = signed_file(tmp.path(), name, &key, &body);
        let out = dsrctl(
            tmp.path(),
            &["certificate", "verify", &file, "--public-key", &public],
        );
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(
            stdout.starts_with("verified: signed by key sha256:"),
            "{stdout}"
        );
        assert!(stdout.contains(line), "{name}: {stdout}");
        let out = dsrctl(
            tmp.path(),
            &[
                "--output",
                "json",
                "certificate",
                "verify",
                &file,
                "--public-key",
                &public,
            ],
        );
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        let json: Value = serde_json::from_slice(&out.stdout).expect("json output");
        assert_eq!(json["verified"], true);
        assert_eq!(json["certificate"], body);
    }
}

#[test]
fn a_signed_body_that_is_no_deletion_certificate_exits_1_saying_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let key = SigningKey::generate();
    let public = key.public_key().to_base64();
    let with = |base: Value, key: &str, value: Value| {
        let mut body = base;
        body[key] = value;
        body
    };
    let without = |key: &str| {
        let mut body = erasure();
        body.as_object_mut().expect("object").remove(key);
        body
    };
    let mut v1_with_terms = erasure();
    v1_with_terms["contract_end"] = contract_end()["contract_end"].clone();
    let cases = [
        // What the processor's audit trail signs with the same key in the dev setup.
        (
            json!({"at": "2026-01-01T00:00:00.000Z",
                "hash": "5f".repeat(32), "seq": 27, "service": "processor"}),
            "the body has no version",
        ),
        (
            with(erasure(), "version", json!(3)),
            "its version is 3, not 1 or 2",
        ),
        (
            with(erasure(), "task_state", json!("NOT_FOUND")),
            r#"its task_state is "NOT_FOUND", not "COMPLETED" or "RETAINED""#,
        ),
        (
            with(erasure(), "records_affected", json!(-7)),
            "its records_affected is -7, not an integer of at least 0",
        ),
        (without("kind"), "the body has no kind"),
        (
            with(erasure(), "note", json!("x")),
            r#"the body has the key "note", which a version 1 certificate does not have"#,
        ),
        (
            v1_with_terms,
            "the body has contract_end, which only a version 2 body has",
        ),
        (
            with(contract_end(), "kind", json!("erasure")),
            "its version is 2, which only a contract_end certificate has",
        ),
        (
            with(erasure(), "issued_at", json!("yesterday")),
            r#"its issued_at is "yesterday", not a UTC time of the form"#,
        ),
    ];
    for (i, (body, why)) in cases.into_iter().enumerate() {
        let file = signed_file(tmp.path(), &format!("case-{i}.json"), &key, &body);
        for format in ["table", "json"] {
            let out = dsrctl(
                tmp.path(),
                &[
                    "--output",
                    format,
                    "certificate",
                    "verify",
                    &file,
                    "--public-key",
                    &public,
                ],
            );
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{why}: {stderr}");
            assert!(
                stderr.contains(&format!(
                    "is signed by key {}, but not a deletion certificate: {why}",
                    key.public_key().key_id()
                )),
                "{why}: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{why}: {}", text(&out.stdout));
        }
    }
}
