//! The real `dsrctl download` and `dsrctl package` against a real pair: a return of data
//! from two subprocessors (the SQL connector and the example adapter) travels to the
//! registry, and the submitting partner downloads it into a folder and a zip, every file
//! checked against the manifest; another partner gets NOT_FOUND; a package with parts
//! missing is refused naming them; two operators confirming one return by hand at once
//! leave the record of the one who won, intact.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient;
use dsrelay_proto::v1::{CompleteManualTaskRequest, RequestState, TaskRef, TaskState};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::harness::dsrctl::dsrctl;
use crate::harness::{
    in_state, spawn_pair, wait_until, Backend, Holder, PairOptions, CONTROLLER, PROCESSOR,
};

/// The sample accounting database's customer 1, also known to the example adapter.
const MAIJA: &str = "maija.meikalainen@example.fi";

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Submits a return of data for MAIJA as `partner-crm` through dsrctl; returns its id.
async fn submit_return_of_data(pair: &crate::harness::TestPair) -> String {
    let doc = dsrctl(
        pair,
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
    doc["request_id"].as_str().expect("request_id").to_string()
}

/// The files `manifest.json` lists, by path: (size, sha256).
fn manifest_files(manifest: &Value) -> BTreeMap<String, (u64, String)> {
    manifest["files"]
        .as_array()
        .expect("files in the manifest")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                (
                    f["size"].as_u64().unwrap(),
                    f["sha256"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_a_return_of_data_into_a_folder_and_a_zip() {
    let Some(pair) = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting, Holder::Newsletter],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let id = submit_return_of_data(&pair).await;
    let mut crm = pair.client("partner-crm");
    // COMPLETED only once both parts are stored at the registry.
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(60),
        in_state(RequestState::Completed),
    )
    .await;

    // What the package holds, as the partner sees it.
    let info = dsrctl(&pair, "partner-crm", &["package", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(info["complete"], true, "{info:#}");
    assert_eq!(info["missing"], serde_json::json!([]), "{info:#}");
    let listed: Vec<&str> = info["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for expected in [
        format!("{PROCESSOR}/accounting/customers.csv"),
        format!("{PROCESSOR}/accounting/customers.json"),
        format!("{PROCESSOR}/accounting/invoices.csv"),
        format!("{PROCESSOR}/accounting/invoices.json"),
        format!("{PROCESSOR}/newsletter/export.json"),
    ] {
        assert!(
            listed.contains(&expected.as_str()),
            "{expected} in {listed:?}"
        );
    }

    // Into a folder: manifest.json and every file, each checked.
    let out = pair.dir().join("download");
    let run = dsrctl(
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
    .await;
    let summary = run.json();
    assert!(
        run.stderr.is_empty(),
        "no progress bar off a terminal: {}",
        run.stderr
    );
    assert_eq!(summary["verified"], true, "{summary:#}");
    assert_eq!(summary["file_count"], listed.len(), "{summary:#}");
    assert_eq!(summary["digests_verified"], listed.len(), "{summary:#}");
    let manifest_bytes = std::fs::read(out.join("manifest.json")).expect("manifest.json");
    assert_eq!(summary["package_sha256"], sha256_hex(&manifest_bytes));
    assert_eq!(info["package_sha256"], sha256_hex(&manifest_bytes));
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["request_id"], id.as_str());
    let files = manifest_files(&manifest);
    assert_eq!(files.len(), listed.len());
    let mut total = 0;
    for (path, (size, sha256)) in &files {
        // Checked again here, independently of dsrctl.
        let data = std::fs::read(out.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(data.len() as u64, *size, "{path}");
        assert_eq!(&sha256_hex(&data), sha256, "{path}");
        total += size;
    }
    assert_eq!(summary["bytes"], total);
    let customers =
        std::fs::read_to_string(out.join(format!("{PROCESSOR}/accounting/customers.csv"))).unwrap();
    assert!(
        customers.contains("\"Mannerheimintie 12 A 3, 00100 Helsinki\""),
        "{customers}"
    );
    let newsletter =
        std::fs::read_to_string(out.join(format!("{PROCESSOR}/newsletter/export.json"))).unwrap();
    assert!(newsletter.contains(MAIJA), "{newsletter}");

    // Into a zip, with the table output: the same bytes, deflated.
    let zip_path = pair.dir().join("package.zip");
    let run = dsrctl(
        &pair,
        "partner-crm",
        &["download", &id, "--zip", zip_path.to_str().unwrap()],
    )
    .await;
    let table = run.ok();
    assert!(
        table.contains(&format!("{n} of {n} verified", n = files.len())),
        "{table}"
    );
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&zip_path).unwrap()).unwrap();
    assert_eq!(zip.len(), files.len() + 1);
    for path in files.keys().map(String::as_str).chain(["manifest.json"]) {
        let mut entry = zip.by_name(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(entry.compression(), zip::CompressionMethod::Deflated);
        let mut data = vec![];
        entry.read_to_end(&mut data).unwrap();
        assert_eq!(data, std::fs::read(out.join(path)).unwrap(), "{path}");
    }

    // An operator may read any package; another partner learns nothing of this one.
    dsrctl(&pair, "operator", &["package", &id]).await.ok();
    let elsewhere = pair.dir().join("not-theirs");
    let run = dsrctl(
        &pair,
        "partner-webform",
        &["download", &id, "--out", elsewhere.to_str().unwrap()],
    )
    .await;
    run.expect_code(2);
    assert!(
        run.stderr.starts_with("error: NOT_FOUND: "),
        "{}",
        run.stderr
    );
    assert!(
        !elsewhere.exists(),
        "nothing written for a refused download"
    );
    let run = dsrctl(&pair, "partner-webform", &["package", &id]).await;
    run.expect_code(2);
    assert!(
        run.stderr.starts_with("error: NOT_FOUND: "),
        "{}",
        run.stderr
    );

    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_of_a_package_with_parts_missing_names_them() {
    // The paper archive waits for an operator, so its part never arrives in this test.
    let Some(pair) = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting, Holder::PaperArchive],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let id = submit_return_of_data(&pair).await;
    let mut crm = pair.client("partner-crm");
    let task = |r: &dsrelay_proto::v1::Request, name: &str, state: TaskState| {
        r.tasks
            .iter()
            .any(|t| t.subprocessor == name && t.state == state as i32)
    };
    wait_until(&mut crm, &id, Duration::from_secs(60), |r| {
        task(r, "accounting", TaskState::Completed)
            && task(r, "paper-archive", TaskState::WaitingForOperator)
    })
    .await;

    let missing = format!("{PROCESSOR}/paper-archive");
    let info = dsrctl(&pair, "partner-crm", &["package", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(info["complete"], false, "{info:#}");
    assert_eq!(info["missing"], serde_json::json!([missing]), "{info:#}");
    let table = dsrctl(&pair, "partner-crm", &["package", &id]).await;
    assert!(table.ok().contains(&missing), "{}", table.stdout);

    let out = pair.dir().join("incomplete");
    let run = dsrctl(
        &pair,
        "partner-crm",
        &["download", &id, "--out", out.to_str().unwrap()],
    )
    .await;
    run.expect_code(2);
    assert!(
        run.stderr.starts_with("error: FAILED_PRECONDITION: ") && run.stderr.contains(&missing),
        "{}",
        run.stderr
    );
    assert!(
        !Path::new(&out).exists(),
        "nothing written for a refused download"
    );

    // The archive's operator returns the subject's folder by hand. The operator's word alone
    // does not complete the task: the record of the return travels to the registry as the
    // archive's part, and the request is COMPLETED only once the registry holds it.
    pair.processor_operator()
        .complete_manual_task(CompleteManualTaskRequest {
            task: Some(TaskRef {
                controller: CONTROLLER.into(),
                request_id: id.clone(),
                subprocessor: "paper-archive".into(),
            }),
            not_found: false,
            records_affected: 2,
            evidence_note: "posted folder 2019/14 to the subject by registered mail".into(),
        })
        .await
        .expect("CompleteManualTask");
    let done = wait_until(&mut crm, &id, Duration::from_secs(60), |r| {
        r.state != RequestState::InProgress as i32 && r.state != RequestState::Dispatched as i32
    })
    .await;
    assert_eq!(done.state, RequestState::Completed as i32, "{done:#?}");
    let info = dsrctl(&pair, "partner-crm", &["package", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(info["complete"], true, "{info:#}");
    let run = dsrctl(
        &pair,
        "partner-crm",
        &["download", &id, "--out", out.to_str().unwrap()],
    )
    .await;
    run.ok();
    let record: Value = serde_json::from_slice(
        &std::fs::read(out.join(&missing).join("returned-by-hand.json"))
            .unwrap_or_else(|e| panic!("the archive's record: {e}\n{}", run.stdout)),
    )
    .expect("json record");
    assert_eq!(record["returned_by_hand"], true, "{record}");
    assert!(
        record["returned_by"]
            .as_str()
            .is_some_and(|by| !by.is_empty()),
        "{record}"
    );
    assert_eq!(record["records"], 2, "{record}");
    assert_eq!(
        record["note"], "posted folder 2019/14 to the subject by registered mail",
        "{record}"
    );

    pair.stop().await;
}

/// The answer of the operator who came second: told the task changed or is no longer
/// waiting, nothing worse.
fn assert_late(round: usize, refused: &tonic::Status) {
    assert!(
        matches!(
            refused.code(),
            tonic::Code::Aborted | tonic::Code::FailedPrecondition
        ),
        "round {round}: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_confirming_one_return_by_hand_leave_one_true_record() {
    two_operators_confirming_one_return_by_hand(Backend::Sqlite, false).await;
}

/// The same on two processor replicas sharing PostgreSQL and the data folder, each operator
/// calling one of them: a lock inside one process would not stop the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_on_two_processor_replicas_leave_one_true_record() {
    two_operators_confirming_one_return_by_hand(Backend::Postgres, true).await;
}

async fn two_operators_confirming_one_return_by_hand(backend: Backend, replicas: bool) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::Accounting, Holder::PaperArchive],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    // The second operator's processor: the pair's own, or a replica of it.
    let (second_operator, replica) = if replicas {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding processor B");
        let port = listener.local_addr().expect("B's address").port();
        let b = dsrelay_processor::App::build(
            pair.processor_replica_config(listener.local_addr().unwrap(), 1),
        )
        .await
        .expect("building processor B");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(b.run(listener, async {
            let _ = stopped.await;
        }));
        let tls = pair
            .pki()
            .files("operator")
            .client_config()
            .expect("client tls");
        let channel = dsrelay_runtime::tls::channel(
            &format!("https://localhost:{port}"),
            Some(dsrelay_runtime::pki::dev_identity("processor", PROCESSOR)),
            &tls,
        )
        .expect("a channel to B");
        (
            ProcessorOperatorServiceClient::new(channel),
            Some((stop, task)),
        )
    } else {
        (pair.processor_operator(), None)
    };
    let mut crm = pair.client("partner-crm");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(submit_return_of_data(&pair).await);
    }
    for id in &ids {
        wait_until(&mut crm, id, Duration::from_secs(60), |r| {
            r.tasks.iter().any(|t| {
                t.subprocessor == "paper-archive" && t.state == TaskState::WaitingForOperator as i32
            })
        })
        .await;
    }
    let confirm = |id: &str, records: i64, note: &str, second: bool| {
        let mut operator = if second {
            second_operator.clone()
        } else {
            pair.processor_operator()
        };
        let request = CompleteManualTaskRequest {
            task: Some(TaskRef {
                controller: CONTROLLER.into(),
                request_id: id.into(),
                subprocessor: "paper-archive".into(),
            }),
            not_found: false,
            records_affected: records,
            evidence_note: note.into(),
        };
        async move { operator.complete_manual_task(request).await }
    };
    for (round, id) in ids.iter().enumerate() {
        // Two operators confirm the same return at once; one of them is told it was too late,
        // and the record that travels is the other's, as its transition recorded it.
        let (first, second) = tokio::join!(
            confirm(id, 2, "posted folder 2019/14 by registered mail", false),
            confirm(id, 3, "handed folder 2019/14 over at the office", true),
        );
        let (note, records) = match (&first, &second) {
            (Ok(_), Err(refused)) => {
                assert_late(round, refused);
                ("posted folder 2019/14 by registered mail", 2)
            }
            (Err(refused), Ok(_)) => {
                assert_late(round, refused);
                ("handed folder 2019/14 over at the office", 3)
            }
            other => panic!("round {round}: one confirmation must win, not {other:?}"),
        };
        let done = wait_until(&mut crm, id, Duration::from_secs(60), |r| {
            r.state != RequestState::InProgress as i32 && r.state != RequestState::Dispatched as i32
        })
        .await;
        assert_eq!(
            done.state,
            RequestState::Completed as i32,
            "round {round}: {done:#?}"
        );
        let out = pair.dir().join(format!("race-{round}"));
        let run = dsrctl(
            &pair,
            "partner-crm",
            &["download", id, "--out", out.to_str().unwrap()],
        )
        .await;
        run.ok();
        let record: Value = serde_json::from_slice(
            &std::fs::read(
                out.join(format!("{PROCESSOR}/paper-archive"))
                    .join("returned-by-hand.json"),
            )
            .unwrap_or_else(|e| panic!("the archive's record: {e}\n{}", run.stdout)),
        )
        .expect("json record");
        assert_eq!(record["note"], note, "round {round}: {record}");
        assert_eq!(record["records"], records, "round {round}: {record}");
    }

    if let Some((stop, task)) = replica {
        let _ = stop.send(());
        task.await
            .expect("processor B")
            .expect("processor B stopped cleanly");
    }
    pair.stop().await;
}

/// An export is kept only until its upload is retired. A crash between recording the
/// delivery and removing the files left them in the processor's data folder until the
/// request was forgotten (30 days after it ended, by default); the forget worker's sweep now
/// removes what any retired upload left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_a_retired_upload_left_behind_are_removed() {
    let Some(pair) = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.client("partner-crm");
    let id = submit_return_of_data(&pair).await;
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(60),
        in_state(RequestState::Completed),
    )
    .await;
    let dir = pair.export_dir(&id, "accounting");
    let url = pair.processor.database_url();
    let recorded = "SELECT COUNT(*) FROM uploads WHERE files_removed_at IS NOT NULL";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while crate::harness::count(url, recorded).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "removal never recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!dir.exists(), "a delivered export's files stayed");

    // As a crash right after the delivery was recorded leaves it: the files still there,
    // their removal not recorded.
    std::fs::create_dir_all(&dir).expect("export folder");
    std::fs::write(dir.join("customers.json"), br#"[{"name":"Maija"}]"#).expect("file");
    let db = dsrelay_runtime::store::Db::connect(url)
        .await
        .expect("processor store");
    sqlx::query("UPDATE uploads SET files_removed_at = NULL")
        .execute(&db.pool)
        .await
        .expect("unrecord the removal");
    db.pool.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dir.exists() || crate::harness::count(url, recorded).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the files a retired upload left stayed in {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pair.stop().await;
}
