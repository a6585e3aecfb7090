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

/// What the relay does once it passed on its share of the registry's answers.
#[derive(Clone, Copy)]
enum AtLimit {
    /// Closes every connection, as a network that went down.
    Cut,
    /// Passes nothing more, holding the connections open, as a network that hangs.
    Hold,
}

/// A TCP relay between dsrctl and the registry (TLS goes through it untouched): it passes
/// on everything dsrctl sends and, of the registry's answers, the first `limit` bytes
/// counted over every connection.
struct Relay {
    port: u16,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(pair: &crate::harness::TestPair, limit: u64, at_limit: AtLimit) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the relay");
        let port = listener.local_addr().expect("the relay's address").port();
        let upstream = pair.registry.addr();
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = answered.clone();
        let task = tokio::spawn(async move {
            // Dropped with this task: every connection ends with the relay.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                connections.spawn(relay(client, server, counted.clone(), limit, at_limit));
            }
        });
        Self {
            port,
            answered,
            task,
        }
    }

    /// The registry's bytes seen so far, passed on or not.
    fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// dsrctl as `partner-crm`, connecting through the relay.
    fn dsrctl(&self, pair: &crate::harness::TestPair, args: &[&str]) -> tokio::process::Command {
        let mut cmd = crate::harness::dsrctl::command(pair.dir());
        cmd.arg("--endpoint")
            .arg(format!("https://localhost:{}", self.port))
            .args(crate::harness::dsrctl::tls_flags(pair, "partner-crm"))
            .args(args);
        cmd
    }

    fn stop(self) {
        self.task.abort();
    }
}

/// One connection through a [`Relay`].
async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    limit: u64,
    at_limit: AtLimit,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let asked = async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    };
    let answers = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let before = answered.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
            let pass = limit.saturating_sub(before).min(n as u64) as usize;
            if client_write.write_all(&buf[..pass]).await.is_err() {
                return;
            }
            if pass < n {
                match at_limit {
                    AtLimit::Cut => return,
                    AtLimit::Hold => std::future::pending::<()>().await,
                }
            }
        }
    };
    // Either side ending drops both sockets: the other sees the connection closed.
    tokio::select! {
        () = asked => {}
        () = answers => {}
    }
}

/// Asserts that every file in `dir` (the staging folder aside) is a file of the package,
/// whole and as `files` lists it, and that the folder has no manifest.json; returns how
/// many there are.
fn assert_only_whole_files(dir: &Path, files: &BTreeMap<String, (u64, String)>) -> usize {
    assert!(
        !dir.join("manifest.json").exists(),
        "a download cut short wrote manifest.json"
    );
    let mut named = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("a folder entry");
            let path = entry.path();
            if path == dir.join(".dsrctl-download") {
                continue;
            }
            if entry.file_type().expect("a file type").is_dir() {
                pending.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let (size, sha256) = files
                .get(&rel)
                .unwrap_or_else(|| panic!("{rel} is not a file of the package"));
            let data = std::fs::read(&path).unwrap();
            assert_eq!(
                data.len() as u64,
                *size,
                "{rel} is under its name, not whole"
            );
            assert_eq!(&sha256_hex(&data), sha256, "{rel}");
            named += 1;
        }
    }
    named
}

/// Asserts that a download into `dir` that stopped early left no partial file in its
/// staging folder: at most the file naming the request, for the next run.
fn assert_nothing_staged(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir.join(".dsrctl-download")) else {
        return;
    };
    let names: Vec<_> = entries.map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["request"], "staged files stayed");
}

/// Asserts that `dir` holds the whole package: manifest.json and every file it lists.
fn assert_whole_package(dir: &Path, files: &BTreeMap<String, (u64, String)>) {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest.json"))
            .expect("a JSON manifest");
    assert_eq!(&manifest_files(&manifest), files);
    for (path, (size, sha256)) in files {
        let data = std::fs::read(dir.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(data.len() as u64, *size, "{path}");
        assert_eq!(&sha256_hex(&data), sha256, "{path}");
    }
    assert!(
        !dir.join(".dsrctl-download").exists(),
        "the staging folder stayed"
    );
}

/// A completed return of data for MAIJA from two holders, and its files as `package` lists
/// them.
async fn completed_return(
    pair: &crate::harness::TestPair,
) -> (String, BTreeMap<String, (u64, String)>) {
    let id = submit_return_of_data(pair).await;
    let mut crm = pair.client("partner-crm");
    wait_until(
        &mut crm,
        &id,
        Duration::from_secs(60),
        in_state(RequestState::Completed),
    )
    .await;
    let info = dsrctl(pair, "partner-crm", &["package", &id, "--output", "json"])
        .await
        .json();
    (id, manifest_files(&info))
}

/// The bytes the registry answers a whole download with, as a relay counts them.
async fn bytes_of_a_whole_download(pair: &crate::harness::TestPair, id: &str) -> u64 {
    let relay = Relay::start(pair, u64::MAX, AtLimit::Cut).await;
    let out = pair.dir().join("measured");
    let run: Run = crate::harness::dsrctl::output(
        relay.dsrctl(pair, &["download", id, "--out", out.to_str().unwrap()]),
    )
    .await;
    run.ok();
    let total = relay.answered();
    relay.stop();
    total
}

use crate::harness::dsrctl::Run;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_cut_short_finishes_when_run_again_and_refuses_foreign_files() {
    let Some(pair) = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting, Holder::Newsletter],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let (id, files) = completed_return(&pair).await;
    let total = bytes_of_a_whole_download(&pair, &id).await;

    // The connection cut at ever later points, each run into the folder the last one left.
    // The files come last, after the handshake and the manifest: only the later cuts fall
    // amid them.
    let out = pair.dir().join("cut");
    let out_arg = out.to_str().unwrap();
    let (mut most_named, mut stopped_in_a_file) = (0, false);
    for step in 1..32 {
        let relay = Relay::start(&pair, total * step / 32, AtLimit::Cut).await;
        let run = crate::harness::dsrctl::output(
            relay.dsrctl(&pair, &["download", &id, "--out", out_arg]),
        )
        .await;
        relay.stop();
        // Shown when the test fails.
        eprintln!("cut at {step}/32: exit {:?}\n{}", run.code, run.stderr);
        assert_ne!(run.code, Some(0), "cut at {step}/32: {}", run.stdout);
        // Every refusal of the folder names --out.
        assert!(
            !run.stderr.contains("--out "),
            "cut at {step}/32: the folder a cut run left is taken up again: {}",
            run.stderr
        );
        stopped_in_a_file |= run.stderr.contains("the download stopped while receiving ");
        assert_nothing_staged(&out);
        most_named = most_named.max(assert_only_whole_files(&out, &files));
    }
    assert!(stopped_in_a_file, "some cut came amid the files");
    assert!(
        most_named > 0,
        "some cut left verified files for the next run"
    );

    // What else the folder holds must be what those runs left.
    let refused = |run: Run, what: &str| {
        run.expect_code(2);
        assert!(
            run.stderr.contains(what) && run.stderr.contains("give a new or empty folder"),
            "{}",
            run.stderr
        );
    };
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    refused(
        dsrctl(&pair, "partner-crm", &["download", &id, "--out", out_arg]).await,
        "holds notes.txt, which is not a file of this package",
    );
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    // A file of the package under its name but not whole (what an older dsrctl left when
    // cut short) is not taken for a verified one.
    let (path, (size, _)) = files.iter().find(|(_, (size, _))| *size > 1).unwrap();
    let whole = std::fs::read(pair.dir().join("measured").join(path)).unwrap();
    std::fs::create_dir_all(out.join(path).parent().unwrap()).unwrap();
    std::fs::write(out.join(path), &whole[..whole.len() / 2]).unwrap();
    refused(
        dsrctl(&pair, "partner-crm", &["download", &id, "--out", out_arg]).await,
        &format!(
            "holds {path}, which does not match the manifest (ended at {} of {size} bytes)",
            whole.len() / 2
        ),
    );
    std::fs::remove_file(out.join(path)).unwrap();
    let run = dsrctl(&pair, "partner-crm", &["download", &id, "--out", out_arg]).await;
    assert!(
        run.ok()
            .contains(&format!("{n} of {n} verified", n = files.len())),
        "{}",
        run.stdout
    );
    assert_whole_package(&out, &files);
    // Run once more, it says the download finished, not merely that the folder is not empty,
    // and succeeds: nothing is left to do.
    let run = dsrctl(&pair, "partner-crm", &["download", &id, "--out", out_arg]).await;
    assert!(
        run.ok().starts_with("download finished already"),
        "{}",
        run.stdout
    );
    assert_whole_package(&out, &files);

    // The same for a zip: never under its name until whole, then written by the next run.
    let zip_path = pair.dir().join("cut.zip");
    let partial = pair.dir().join(".cut.zip.dsrctl-partial");
    for quarter in 1..4 {
        let relay = Relay::start(&pair, total * quarter / 4, AtLimit::Cut).await;
        let run = crate::harness::dsrctl::output(relay.dsrctl(
            &pair,
            &["download", &id, "--zip", zip_path.to_str().unwrap()],
        ))
        .await;
        relay.stop();
        assert_ne!(run.code, Some(0), "cut at {quarter}/4: {}", run.stdout);
        assert!(
            !zip_path.exists(),
            "cut at {quarter}/4: a zip cut short took the name"
        );
        assert!(!partial.exists(), "cut at {quarter}/4: {}", run.stderr);
    }
    dsrctl(
        &pair,
        "partner-crm",
        &["download", &id, "--zip", zip_path.to_str().unwrap()],
    )
    .await
    .ok();
    let zip = zip::ZipArchive::new(std::fs::File::open(&zip_path).unwrap()).unwrap();
    assert_eq!(zip.len(), files.len() + 1);

    // A folder without this download's staging folder is refused before connecting, and
    // left as it was.
    let foreign = pair.dir().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
    let run = dsrctl(
        &pair,
        "partner-crm",
        &["download", &id, "--out", foreign.to_str().unwrap()],
    )
    .await;
    run.expect_code(2);
    assert_eq!(
        run.stderr,
        format!("error: --out {} is not empty\n", foreign.display())
    );
    let left: Vec<_> = std::fs::read_dir(&foreign)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["notes.txt"]);

    pair.stop().await;
}

/// Waits until `done` holds, for at most 30 s.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_killed_or_interrupted_names_nothing_partial_and_runs_again() {
    let Some(pair) = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting, Holder::Newsletter],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let (id, files) = completed_return(&pair).await;
    let total = bytes_of_a_whole_download(&pair, &id).await;
    // The network hangs amid the files: dsrctl has the manifest and waits for the rest.
    let hang_at = total * 7 / 8;

    // Killed: nothing cleans up.
    let killed = pair.dir().join("killed");
    let relay = Relay::start(&pair, hang_at, AtLimit::Hold).await;
    let mut child = relay
        .dsrctl(&pair, &["download", &id, "--out", killed.to_str().unwrap()])
        .spawn()
        .expect("starting dsrctl");
    // Written once the run holds the folder's lock.
    let owner = killed.join(".dsrctl-download").join("request");
    until("dsrctl began writing", || owner.exists()).await;
    // A second run into the folder meanwhile is refused before it writes anything.
    let second = dsrctl(
        &pair,
        "partner-crm",
        &["download", &id, "--out", killed.to_str().unwrap()],
    )
    .await;
    second.expect_code(1);
    assert!(
        second.stderr.contains(&format!(
            "another dsrctl download is writing {}; wait for it or use another folder",
            killed.display()
        )),
        "{}",
        second.stderr
    );
    assert_eq!(
        std::fs::read(&owner).expect("the file naming the request"),
        id.as_bytes()
    );
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("dsrctl ended");
    relay.stop();
    assert_only_whole_files(&killed, &files);

    // Ctrl-C: dsrctl removes what it staged and says what is left.
    let interrupted = pair.dir().join("interrupted");
    let relay = Relay::start(&pair, hang_at, AtLimit::Hold).await;
    let child = relay
        .dsrctl(
            &pair,
            &["download", &id, "--out", interrupted.to_str().unwrap()],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting dsrctl");
    until("dsrctl began writing", || interrupted.exists()).await;
    let pid = child.id().expect("dsrctl's pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let run: Run = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("dsrctl ended after Ctrl-C")
        .expect("dsrctl's output")
        .into();
    relay.stop();
    run.expect_code(1);
    assert!(
        run.stderr.contains("the download stopped")
            && run.stderr.contains("nothing partial was left")
            && run.stderr.contains("error: interrupted (Ctrl-C)"),
        "{}",
        run.stderr
    );
    assert_nothing_staged(&interrupted);
    assert_only_whole_files(&interrupted, &files);

    // A zip killed before it was whole: not under its name.
    let zip_path = pair.dir().join("killed.zip");
    let partial = pair.dir().join(".killed.zip.dsrctl-partial");
    let relay = Relay::start(&pair, hang_at, AtLimit::Hold).await;
    let mut child = relay
        .dsrctl(
            &pair,
            &["download", &id, "--zip", zip_path.to_str().unwrap()],
        )
        .spawn()
        .expect("starting dsrctl");
    until("dsrctl began writing", || {
        zip_path.exists() || partial.exists()
    })
    .await;
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("dsrctl ended");
    relay.stop();
    assert!(!zip_path.exists(), "a zip cut short took the name");

    // The same commands again finish each download where the last one stopped.
    for out in [&killed, &interrupted] {
        dsrctl(
            &pair,
            "partner-crm",
            &["download", &id, "--out", out.to_str().unwrap()],
        )
        .await
        .ok();
        assert_whole_package(out, &files);
    }
    dsrctl(
        &pair,
        "partner-crm",
        &["download", &id, "--zip", zip_path.to_str().unwrap()],
    )
    .await
    .ok();
    assert!(!partial.exists());
    let zip = zip::ZipArchive::new(std::fs::File::open(&zip_path).unwrap()).unwrap();
    assert_eq!(zip.len(), files.len() + 1);

    pair.stop().await;
}
