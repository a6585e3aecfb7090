//! A paged adapter export end to end: the example newsletter holds a subscriber with a long
//! delivery history (several 1 MiB pages of `GetExportPage`) and billing records of the paid
//! edition, a return of data goes through the registry, the processor's adapter connector
//! and back, and the package `dsrctl download` writes holds every record, in order: the
//! billing records after the deliveries, in the same `export.json`.

use std::time::Duration;

use dsrelay_example_adapter::retention::BillingKind;
use dsrelay_example_adapter::store::Store;
use dsrelay_proto::v1::RequestState;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::harness::dsrctl::dsrctl;
use crate::harness::{in_state, spawn_pair, wait_until, Holder, PairOptions, PROCESSOR};

const MAIJA: &str = "maija.meikalainen@example.fi";

/// Deliveries added to Maija's history: about 2.9 MB of records, three pages at the
/// connector's 1 MiB.
const DELIVERIES: usize = 25_000;

/// Maija's invoices, exported after her deliveries.
const INVOICES: [&str; 2] = ["INV-2024-3", "INV-2024-4"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_export_of_many_pages_arrives_whole_in_the_package() {
    let mut pair = spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let store = Store::open(pair.adapter().database_url())
        .await
        .expect("the adapter's database");
    assert_eq!(
        store.add_deliveries(MAIJA, DELIVERIES).await.unwrap(),
        DELIVERIES
    );
    // Two sales of the paid edition to Maija (2024-03-01), each leaving an invoice.
    let booked = 1_709_251_200_000;
    for reference in INVOICES {
        store
            .add_billing_record(MAIJA, BillingKind::Invoice, reference, 1290, booked)
            .await
            .expect("billing record");
    }
    store.db().pool.close().await;

    let doc = dsrctl(
        &pair,
        "partner-crm",
        &[
            "submit",
            "--kind",
            "return-of-data",
            "--email",
            MAIJA,
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let id = doc["request_id"].as_str().expect("request_id").to_string();
    let mut crm = pair.client("partner-crm");
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(90),
        in_state(RequestState::Completed),
    )
    .await;

    let out = pair.dir().join("download");
    let summary = dsrctl(
        &pair,
        "partner-crm",
        &[
            "download",
            &id,
            "--out",
            out.to_str().unwrap(),
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(summary["verified"], true, "{summary:#}");
    let path = format!("{PROCESSOR}/newsletter/export.json");
    let bytes = std::fs::read(out.join(&path)).expect("export.json");
    assert!(bytes.len() > 2 * 1024 * 1024, "{} bytes", bytes.len());
    // The manifest's digest is that of the file the pages made.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let listed = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path.as_str())
        .expect("export.json in the manifest");
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(listed["sha256"], digest.as_str());

    let records: Vec<Value> = serde_json::from_slice(&bytes).expect("a JSON array");
    assert_eq!(records.len(), DELIVERIES + 3);
    assert_eq!(records[0]["record"], "subscriber");
    assert_eq!(records[0]["email"], MAIJA);
    for (i, r) in records[1..=DELIVERIES].iter().enumerate() {
        assert_eq!(r["record"], "delivery", "{r}");
        assert_eq!(r["issue"], format!("Issue {}", i + 1), "in order");
    }
    for (r, reference) in records[DELIVERIES + 1..].iter().zip(INVOICES) {
        assert_eq!(r["record"], "billing_record", "{r}");
        assert_eq!(r["kind"], "invoice", "{r}");
        assert_eq!(r["reference"], reference, "{r}");
        assert_eq!(r["email"], MAIJA, "{r}");
        assert_eq!(r["booked_at_ms"], booked, "{r}");
    }
    pair.stop().await;
}
