//! A return of data from two holders (the SQL accounting database and the example adapter)
//! through the real services: each connector writes its export as files into the task's
//! folder under the processor's data folder, and the processor stores only the list of those
//! files (name, media type, categories, size, SHA-256) with the task. A task run again
//! replaces its files. A return of data completes once its files are stored at the registry
//! (see `packages.rs` for the package itself), and the processor then deletes its copy; a
//! transfer's files go to the recipient instead (see `transfer.rs`).

use std::path::Path;
use std::time::Duration;

use dsrelay_connectors::sql::sample_config;
use dsrelay_connectors::ExportedFile;
use dsrelay_proto::v1::{IdentityEncoding, RequestKind, RequestState, TaskState};
use dsrelay_runtime::identity::digest;
use dsrelay_runtime::store::Db;
use sqlx::Row as _;

use crate::harness::{
    erasure, spawn_pair, wait_until, Backend, Holder, PairOptions, Role, NEWSLETTER, PROCESSOR,
};

/// In the sample accounting database (customer 1) and the newsletter's seed.
const MAIJA: &str = "maija.meikalainen@example.fi";

/// The files the processor recorded for the task of `request_id` at `subprocessor`.
pub(crate) async fn recorded_files(
    url: &str,
    request_id: &str,
    subprocessor: &str,
) -> Vec<ExportedFile> {
    let db = Db::connect(url).await.expect("connect");
    let text: Option<String> = sqlx::query_scalar(
        "SELECT export_files FROM tasks WHERE request_id = $1 AND subprocessor = $2",
    )
    .bind(request_id)
    .bind(subprocessor)
    .fetch_one(&db.pool)
    .await
    .expect("task row");
    db.pool.close().await;
    serde_json::from_str(&text.expect("export_files recorded")).expect("file list")
}

/// The content of `name` in `dir`, checked against what was recorded of it.
fn checked(dir: &Path, files: &[ExportedFile], name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let meta = files
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("{name} not recorded: {files:?}"));
    assert_eq!(meta.size, text.len() as u64, "{name}");
    assert_eq!(
        Some(meta.sha256.clone()),
        digest(IdentityEncoding::Sha256, &text),
        "{name}"
    );
    text
}

/// The export columns of `table` for the rows `filter` selects in the sample database, each
/// value as text (NULL as ""), the rows sorted (an export is not: compare it sorted).
async fn expected(url: &str, table: &str, filter: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let config = sample_config(url);
    let rule = config.tables.iter().find(|t| t.table == table).unwrap();
    let columns: Vec<String> = rule
        .export
        .iter()
        .map(|c| format!("CAST({c} AS TEXT)"))
        .collect();
    let sql = format!("SELECT {} FROM {table} WHERE {filter}", columns.join(", "));
    let db = Db::connect(url).await.expect("connect");
    let rows = sqlx::query(&sql).fetch_all(&db.pool).await.expect(&sql);
    db.pool.close().await;
    let mut values: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            (0..columns.len())
                .map(|i| r.get::<Option<String>, _>(i).unwrap_or_default())
                .collect()
        })
        .collect();
    values.sort();
    (rule.export.clone(), values)
}

/// A JSON value as the text a database CAST gives it.
fn as_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn return_of_data_is_written_to_files(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::Accounting, Holder::Newsletter],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.client("partner-crm");
    let submitted = crm
        .submit(dsrelay_proto::v1::SubmitRequest {
            kind: RequestKind::ReturnOfData as i32,
            ..erasure(MAIJA)
        })
        .await
        .expect("submit")
        .into_inner();
    let id = submitted.request_id;
    // The exports are written at the processor, then uploaded: each task is COMPLETED only
    // once the registry holds its part, and so the request.
    let view = wait_until(&mut crm, &id, Duration::from_secs(30), delivered).await;
    assert_eq!(view.tasks.len(), 2, "{view:#?}");
    assert_eq!(view.state, RequestState::Completed as i32, "{view:#?}");

    // Delivered, the processor's copy is gone; the registry holds the files as written.
    for sub in ["accounting", NEWSLETTER] {
        let at_processor = pair.export_dir(&id, sub);
        assert!(
            !at_processor.exists(),
            "{at_processor:?} is kept after delivery"
        );
    }
    let stored = |sub: &str| pair.package_dir().join(&id).join(PROCESSOR).join(sub);

    // The accounting database: per exported table a JSON and a CSV file holding exactly the
    // subject's rows.
    let processor_db = pair.processor.database_url();
    let files = recorded_files(processor_db, &id, "accounting").await;
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "contacts.json",
            "contacts.csv",
            "invoices.json",
            "invoices.csv",
            "ledger_entries.json",
            "ledger_entries.csv",
            "customers.json",
            "customers.csv"
        ]
    );
    assert!(files
        .iter()
        .all(|f| f.categories == ["contact", "invoicing"]));
    let dir = stored("accounting");
    // Her own contact row only (201), not the other contact persons of her customer.
    for (table, filter) in [
        ("customers", "id = 1"),
        ("invoices", "customer_id = 1"),
        ("contacts", "id = 201"),
        ("ledger_entries", "customer_id = 1"),
    ] {
        let (columns, rows) = expected(&pair.accounting_url, table, filter).await;
        assert!(!rows.is_empty(), "{table}");
        let json: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(&checked(&dir, &files, &format!("{table}.json"))).unwrap();
        // An export is not sorted: compared in the order `expected` gives.
        let mut got: Vec<Vec<String>> = json
            .iter()
            .map(|o| {
                assert_eq!(o.keys().count(), columns.len(), "{o:?}");
                columns.iter().map(|c| as_text(&o[c])).collect()
            })
            .collect();
        got.sort();
        assert_eq!(got, rows, "{table}.json");
        let csv = checked(&dir, &files, &format!("{table}.csv"));
        let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
        assert_eq!(lines[0], columns.join(","), "{table}.csv header");
        assert_eq!(lines.len(), rows.len() + 1, "{table}.csv: {csv}");
    }
    let customers = checked(&dir, &files, "customers.csv");
    assert!(
        customers.contains("\"Mannerheimintie 12 A 3, 00100 Helsinki\""),
        "{customers}"
    );

    // The adapter's export, as it sent it.
    let files = recorded_files(processor_db, &id, NEWSLETTER).await;
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        (files[0].name.as_str(), files[0].media_type.as_str()),
        ("export.json", "application/json")
    );
    let export = checked(&stored(NEWSLETTER), &files, "export.json");
    let export: serde_json::Value = serde_json::from_str(&export).unwrap();
    assert!(export.to_string().contains(MAIJA), "{export}");

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_return_of_data_to_files_on_sqlite() {
    return_of_data_is_written_to_files(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_return_of_data_to_files_on_postgres() {
    return_of_data_is_written_to_files(Backend::Postgres).await;
}

/// The first attempts find the adapter down; what is in the task's folder then (here a file
/// planted between attempts) is gone when the attempt that succeeds has written its files:
/// only those reach the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_a_rerun_replaces_the_files_of_earlier_attempts() {
    let mut pair = spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter],
        down: vec![Role::Adapter],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.client("partner-crm");
    let id = crm
        .submit(dsrelay_proto::v1::SubmitRequest {
            kind: RequestKind::ReturnOfData as i32,
            ..erasure(MAIJA)
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let dir = pair.export_dir(&id, NEWSLETTER);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !dir.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no attempt made {dir:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(dir.join("stale.json"), "[]").unwrap();
    pair.adapter().start().await;
    wait_until(&mut crm, &id, Duration::from_secs(30), delivered).await;
    assert!(!dir.exists(), "deleted once delivered");
    let stored = pair
        .package_dir()
        .join(&id)
        .join(PROCESSOR)
        .join(NEWSLETTER);
    let mut names: Vec<String> = std::fs::read_dir(&stored)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["export.json"]);
    let files = recorded_files(pair.processor.database_url(), &id, NEWSLETTER).await;
    checked(&stored, &files, "export.json");
    pair.stop().await;
}

/// Every task's export is stored at the registry, so the request is COMPLETED.
pub(crate) fn delivered(view: &dsrelay_proto::v1::Request) -> bool {
    view.state == RequestState::Completed as i32
        && !view.tasks.is_empty()
        && view.tasks.iter().all(|t| {
            t.state == TaskState::Completed as i32
                && t.evidence
                    .as_ref()
                    .is_some_and(|e| e.confirmed && e.note.contains("stored at the registry"))
        })
}

/// A transfer's export is written at the processor like a return of data, but none of it
/// goes to the registry's package store: it is the recipient's (see `transfer.rs`). Here the
/// registry's recipient leads nowhere, so the task waits IN_PROGRESS saying what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_a_transfer_is_not_uploaded_to_the_registry() {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.client("partner-crm");
    let mut transfer = dsrelay_proto::v1::SubmitRequest {
        kind: RequestKind::Transfer as i32,
        ..erasure(MAIJA)
    };
    transfer.parameters = Some(dsrelay_proto::v1::RequestParameters {
        transfer_recipient: crate::harness::RECIPIENT.into(),
        ..Default::default()
    });
    let id = crm
        .submit(transfer)
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let waiting = |view: &dsrelay_proto::v1::Request| {
        !view.tasks.is_empty()
            && view.tasks.iter().all(|t| {
                t.state == TaskState::InProgress as i32
                    && t.reason.contains("to recipient new-bookkeeper: attempt")
            })
    };
    let view = wait_until(&mut crm, &id, Duration::from_secs(30), waiting).await;
    assert_eq!(view.state, RequestState::InProgress as i32, "{view:#?}");
    let files = recorded_files(pair.processor.database_url(), &id, NEWSLETTER).await;
    checked(&pair.export_dir(&id, NEWSLETTER), &files, "export.json");
    assert!(!pair.package_dir().join(&id).exists());
    pair.stop().await;
}
