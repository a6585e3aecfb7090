//! Deletion certificates: an erasure COMPLETED at the SQL subprocessor comes back with a
//! certificate signed by the processor, which the registry verifies and keeps, `dsrctl`
//! fetches, and anyone checks offline with the processor's public key. Another partner
//! cannot read it; a registry configured with the wrong key does not present it as
//! certified; retained data erased later gets a follow-up.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use dsrelay_proto::v1::certificate_service_client::CertificateServiceClient;
use dsrelay_proto::v1::{
    EventType, ListCertificatesRequest, ListEventsRequest, RequestState, StoredCertificate,
};
use dsrelay_runtime::pki::dev_identity;
use dsrelay_runtime::signing::SigningKey;
use serde_json::Value;

use crate::harness::dsrctl::dsrctl;
use crate::harness::{
    count, erasure, in_state, spawn_pair, wait_until, Backend, PairOptions, PROCESSOR,
};

const TEEMU: &str = "teemu.testaaja@example.fi";

async fn certificates(
    pair: &crate::harness::TestPair,
    stem: &str,
    request_id: &str,
    subprocessor: &str,
) -> Result<Vec<StoredCertificate>, tonic::Status> {
    CertificateServiceClient::new(pair.channel_to_registry(stem))
        .list_certificates(ListCertificatesRequest {
            request_id: request_id.into(),
            processor: String::new(),
            subprocessor: subprocessor.into(),
        })
        .await
        .map(|r| r.into_inner().certificates)
}

async fn event_types(pair: &crate::harness::TestPair, request_id: &str) -> Vec<i32> {
    pair.crm()
        .list_events(ListEventsRequest {
            request_id: request_id.into(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events
        .iter()
        .map(|e| e.r#type)
        .collect()
}

/// The `count` of the certificate's `erased` entry for `table` and `action`.
fn erased(body: &Value, table: &str, action: &str) -> i64 {
    body["erased"]
        .as_array()
        .expect("erased")
        .iter()
        .filter(|e| e["target"] == table && e["action"] == action)
        .map(|e| e["count"].as_i64().expect("count"))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_erasure_is_certified_fetched_and_verified_offline_on_sqlite() {
    a_completed_erasure_is_certified_fetched_and_verified_offline(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_erasure_is_certified_fetched_and_verified_offline_on_postgres() {
    a_completed_erasure_is_certified_fetched_and_verified_offline(Backend::Postgres).await;
}

async fn a_completed_erasure_is_certified_fetched_and_verified_offline(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let url = pair.accounting_url.clone();
    // Teemu is customer 6 of the sample database; what the erasure will touch, counted now.
    let contacts = count(&url, "SELECT COUNT(*) FROM contacts WHERE customer_id = 6").await;
    let invoices = count(&url, "SELECT COUNT(*) FROM invoices WHERE customer_id = 6").await;
    let ledger = count(
        &url,
        "SELECT COUNT(*) FROM ledger_entries WHERE customer_id = 6",
    )
    .await;
    assert!(contacts + invoices + ledger > 0);

    let mut crm = pair.crm();
    let id = crm
        .submit(erasure(TEEMU))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let view = wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    let records: i64 = view
        .tasks
        .iter()
        .find(|t| t.subprocessor == "accounting")
        .and_then(|t| t.evidence.as_ref())
        .expect("accounting evidence")
        .records_affected;

    // Two tasks are certified: dsrctl asks which one is meant.
    dsrctl(
        &pair,
        "partner-crm",
        &["certificate", "get", &id, "--out", "any.json"],
    )
    .await
    .expect_code(2);
    let file = pair.dir().join("accounting.json");
    let file_arg = file.to_str().expect("utf-8 path");
    let got = dsrctl(
        &pair,
        "partner-crm",
        &[
            "--output",
            "json",
            "certificate",
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
    assert_eq!(got["verified_by_registry"], true, "{got}");

    // Offline: only the file and the processor's public key.
    let key = pair.pki().signing_public_key("processor");
    let key_arg = key.to_str().expect("utf-8 path");
    let verified = dsrctl(
        &pair,
        "partner-crm",
        &[
            "--output",
            "json",
            "certificate",
            "verify",
            file_arg,
            "--key",
            key_arg,
        ],
    )
    .await
    .json();
    let body = &verified["certificate"];
    assert_eq!(verified["verified"], true);
    assert_eq!(body["kind"], "erasure");
    assert_eq!(body["request_id"], id.as_str());
    assert_eq!(body["subprocessor"], "accounting");
    assert_eq!(body["task_state"], "COMPLETED");
    assert_eq!(body["processor"], dev_identity("processor", PROCESSOR));
    assert_eq!(body["certificate_id"], got["certificate_id"]);
    // The counts are the rows that were there, and they are gone now.
    assert_eq!(erased(body, "contacts", "deleted"), contacts);
    assert_eq!(erased(body, "invoices", "deleted"), invoices);
    assert_eq!(erased(body, "ledger_entries", "anonymized"), ledger);
    assert_eq!(erased(body, "customers", "deleted"), 1);
    assert_eq!(body["records_affected"], records);
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM customers WHERE id = 6").await,
        0
    );
    assert_eq!(body["retained"], serde_json::json!([]));
    let text = dsrctl(
        &pair,
        "partner-crm",
        &["certificate", "verify", file_arg, "--key", key_arg],
    )
    .await;
    assert!(
        text.ok().contains(&format!("contacts: deleted {contacts}")),
        "{}",
        text.stdout
    );

    // A certificate changed anywhere, or checked with another key, fails.
    let original = std::fs::read_to_string(&file).expect("certificate file");
    let tampered = original.replacen("\\\"deleted\\\"", "\\\"deletes\\\"", 1);
    assert_ne!(tampered, original);
    let bad = pair.dir().join("tampered.json");
    std::fs::write(&bad, tampered).expect("write");
    let run = dsrctl(
        &pair,
        "partner-crm",
        &[
            "certificate",
            "verify",
            bad.to_str().expect("utf-8"),
            "--key",
            key_arg,
        ],
    )
    .await;
    run.expect_code(1);
    assert!(run.stderr.contains("does not verify"), "{}", run.stderr);
    let other = SigningKey::generate().public_key().to_base64();
    dsrctl(
        &pair,
        "partner-crm",
        &["certificate", "verify", file_arg, "--key", &other],
    )
    .await
    .expect_code(1);

    // Another partner does not learn the certificate exists; an operator reads it.
    let status = certificates(&pair, "partner-webform", &id, "")
        .await
        .expect_err("another partner's request");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let run = dsrctl(
        &pair,
        "partner-webform",
        &["certificate", "get", &id, "--out", "stolen.json"],
    )
    .await;
    run.expect_code(2);
    assert!(run.stderr.contains("NOT_FOUND"), "{}", run.stderr);
    assert!(!pair.dir().join("stolen.json").exists());
    let all = certificates(&pair, "operator", &id, "")
        .await
        .expect("operator");
    assert_eq!(all.len(), 2, "{all:#?}");
    assert!(all.iter().all(|c| c.verified));
    assert!(event_types(&pair, &id)
        .await
        .contains(&(EventType::CertificateStored as i32)));
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_wrong_public_key_the_registry_does_not_present_an_erasure_as_certified() {
    let pair = spawn_pair(PairOptions {
        processor_public_key: Some(SigningKey::generate().public_key().to_base64()),
        ..Default::default()
    })
    .await
    .expect("pair");
    let mut crm = pair.crm();
    let id = crm
        .submit(erasure(TEEMU))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    // The work happened: the state is applied as reported.
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    let list = certificates(&pair, "partner-crm", &id, "accounting")
        .await
        .expect("stored as rejected");
    assert_eq!(list.len(), 1);
    assert!(!list[0].verified);
    assert!(
        list[0].rejection.contains("not with the expected key"),
        "{}",
        list[0].rejection
    );
    let types = event_types(&pair, &id).await;
    assert!(types.contains(&(EventType::CertificateRejected as i32)));
    assert!(!types.contains(&(EventType::CertificateStored as i32)));
    let out = pair.dir().join("rejected.json");
    let run = dsrctl(
        &pair,
        "partner-crm",
        &[
            "certificate",
            "get",
            &id,
            "--subprocessor",
            "accounting",
            "--out",
            out.to_str().expect("utf-8"),
        ],
    )
    .await;
    run.expect_code(1);
    assert!(run.stderr.contains("rejected"), "{}", run.stderr);
    assert!(!out.exists());
    // The trace shows the step and why its proof was rejected.
    let trace = dsrctl(&pair, "partner-crm", &["trace", &id]).await;
    trace.expect_code(0);
    assert!(
        trace.stdout.contains("CERTIFICATE_REJECTED") && trace.stdout.contains("expected key"),
        "{}",
        trace.stdout
    );

    // Once the request is forgotten, the rejected certificate's id went with its body:
    // `get` names the task, not an empty id.
    let registry_clock = pair.registry.clock().expect("in-process registry");
    registry_clock.advance(31 * 24 * 3_600_000);
    wait_until(&mut crm, &id, Duration::from_secs(20), |r| {
        r.identities_forgotten
    })
    .await;
    let list = certificates(&pair, "partner-crm", &id, "accounting")
        .await
        .expect("kept as rejected");
    assert_eq!(list[0].certificate_id, "", "{list:#?}");
    let run = dsrctl(
        &pair,
        "partner-crm",
        &[
            "certificate",
            "get",
            &id,
            "--subprocessor",
            "accounting",
            "--out",
            out.to_str().expect("utf-8"),
        ],
    )
    .await;
    run.expect_code(1);
    assert!(
        run.stderr.contains(&format!(
            "the registry rejected a certificate of {PROCESSOR}/accounting: "
        )),
        "{}",
        run.stderr
    );
    assert!(!out.exists());
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_data_erased_later_gets_a_follow_up_certificate() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut crm = pair.crm();
    let id = crm
        .submit(erasure("maija.meikalainen@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        in_state(RequestState::PartiallyCompleted),
    )
    .await;
    let first = certificates(&pair, "partner-crm", &id, "accounting")
        .await
        .expect("certificate of the retained step");
    assert_eq!(first.len(), 1);
    let body: Value =
        serde_json::from_slice(&first[0].certificate.as_ref().expect("c").body).expect("json body");
    assert_eq!(body["task_state"], "RETAINED");
    assert_eq!(body["retained"][0]["subprocessor"], "accounting");
    assert!(
        body["retained"][0]["legal_basis"]
            .as_str()
            .expect("basis")
            .contains("Kirjanpitolaki"),
        "{body}"
    );
    assert_eq!(body["retained"][0]["until"], "2031-01-01T00:00:00.000Z");
    assert!(body.get("follows").is_none());

    // The open invoice is paid and the books' ten years pass: the processor erases the
    // rest by itself and certifies that too.
    let db = dsrelay_runtime::store::Db::connect(&pair.accounting_url)
        .await
        .expect("connect");
    sqlx::query("UPDATE invoices SET status = 'paid' WHERE customer_id = 1")
        .execute(&db.pool)
        .await
        .expect("pay");
    db.pool.close().await;
    let clock = pair.processor.clock().expect("in-process processor");
    let later = Utc
        .with_ymd_and_hms(2035, 1, 2, 0, 0, 0)
        .single()
        .expect("date")
        .timestamp_millis();
    clock.advance(later - clock.now_ms());
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    let all = certificates(&pair, "partner-crm", &id, "accounting")
        .await
        .expect("certificates");
    let last = all.last().expect("follow-up");
    assert!(all.len() >= 2 && all.iter().all(|c| c.verified), "{all:#?}");
    let body: Value =
        serde_json::from_slice(&last.certificate.as_ref().expect("c").body).expect("json body");
    assert_eq!(body["task_state"], "COMPLETED");
    assert_eq!(body["follows"], all[all.len() - 2].certificate_id.as_str());
    assert_eq!(body["retained"], serde_json::json!([]));
    follow_ups_are_listed_fetched_by_id_and_verified(&pair, &id, &all).await;
    pair.stop().await;
}

/// `dsrctl certificate list` shows each certificate of the task `all` (the registry's list)
/// with the one it follows; `certificate get --certificate-id` fetches each, the first (the
/// RETAINED step with its legal basis) included, and `certificate verify` accepts each.
async fn follow_ups_are_listed_fetched_by_id_and_verified(
    pair: &crate::harness::TestPair,
    id: &str,
    all: &[StoredCertificate],
) {
    let listed = dsrctl(
        pair,
        "partner-crm",
        &[
            "--output",
            "json",
            "certificate",
            "list",
            id,
            "--subprocessor",
            "accounting",
        ],
    )
    .await
    .json();
    let rows = listed["certificates"].as_array().expect("certificates");
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r["certificate_id"].as_str().expect("id"))
        .collect();
    let want: Vec<&str> = all.iter().map(|c| c.certificate_id.as_str()).collect();
    assert_eq!(ids, want, "{listed}");
    assert_eq!(rows[0]["task_state"], "RETAINED", "{listed}");
    assert_eq!(rows[0]["follows"], "", "{listed}");
    for pair_of in rows.windows(2) {
        assert_eq!(
            pair_of[1]["follows"], pair_of[0]["certificate_id"],
            "{listed}"
        );
    }
    assert_eq!(rows[rows.len() - 1]["task_state"], "COMPLETED", "{listed}");
    assert!(rows.iter().all(|r| r["verified_by_registry"] == true));
    assert!(rows
        .iter()
        .all(|r| r["issued_at"].as_str().is_some_and(|t| t.ends_with('Z'))));
    let table = dsrctl(pair, "partner-crm", &["certificate", "list", id]).await;
    let first_line = table
        .ok()
        .lines()
        .find(|l| l.starts_with(ids[0]))
        .expect("the first certificate's row")
        .to_string();
    assert!(first_line.contains("RETAINED"), "{}", table.stdout);
    assert!(
        table.stdout.contains("FOLLOWS")
            && table
                .stdout
                .contains(&format!("COMPLETED  {}", ids[ids.len() - 2])),
        "{}",
        table.stdout
    );

    let key = pair.pki().signing_public_key("processor");
    let key_arg = key.to_str().expect("utf-8 path");
    for (i, cert_id) in ids.iter().enumerate() {
        let file = pair.dir().join(format!("accounting-{i}.json"));
        let file_arg = file.to_str().expect("utf-8 path");
        let got = dsrctl(
            pair,
            "partner-crm",
            &[
                "--output",
                "json",
                "certificate",
                "get",
                id,
                "--certificate-id",
                cert_id,
                "--out",
                file_arg,
            ],
        )
        .await
        .json();
        assert_eq!(got["certificate_id"], *cert_id, "{got}");
        let verified = dsrctl(
            pair,
            "partner-crm",
            &[
                "--output",
                "json",
                "certificate",
                "verify",
                file_arg,
                "--key",
                key_arg,
            ],
        )
        .await
        .json();
        assert_eq!(verified["verified"], true);
        assert_eq!(verified["certificate"]["certificate_id"], *cert_id);
        assert_eq!(verified["certificate"]["task_state"], rows[i]["task_state"]);
    }
    let first = pair.dir().join("accounting-0.json");
    let text = dsrctl(
        pair,
        "partner-crm",
        &[
            "certificate",
            "verify",
            first.to_str().expect("utf-8"),
            "--key",
            key_arg,
        ],
    )
    .await;
    assert!(
        text.ok().contains("state         RETAINED") && text.stdout.contains("Kirjanpitolaki"),
        "{}",
        text.stdout
    );
    // Without an id, the latest; an id not among the request's is a usage error.
    let latest = dsrctl(
        pair,
        "partner-crm",
        &[
            "--output",
            "json",
            "certificate",
            "get",
            id,
            "--subprocessor",
            "accounting",
            "--out",
            pair.dir().join("latest.json").to_str().expect("utf-8"),
        ],
    )
    .await
    .json();
    assert_eq!(latest["certificate_id"], ids[ids.len() - 1]);
    let missing = pair.dir().join("missing.json");
    let run = dsrctl(
        pair,
        "partner-crm",
        &[
            "certificate",
            "get",
            id,
            "--certificate-id",
            "0193a1f0-0000-7000-8000-000000000000",
            "--out",
            missing.to_str().expect("utf-8"),
        ],
    )
    .await;
    run.expect_code(2);
    assert!(run.stderr.contains("certificate list"), "{}", run.stderr);
    assert!(!missing.exists());
}
