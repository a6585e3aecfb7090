//! Return-of-data packages through the real services: the processor uploads every export to
//! the registry, the task completes only then, and the submitting partner (or an operator)
//! reads the manifest and downloads files whose digests match what the processor wrote.
//! Bad chunks sent with the processor's own certificate are refused and never stored;
//! packages expire; an upload interrupted by the registry going down resumes.

use std::collections::BTreeMap;
use std::time::Duration;

use dsrelay_connectors::ExportedFile;
use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::package_chunk::Item;
use dsrelay_proto::v1::package_service_client::PackageServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, Acknowledgement, CompletePartRequest, DownloadPackageRequest, EventType,
    ExportFileHeader, FileEnd, GetPackageRequest, GetUploadStateRequest, ListEventsRequest,
    PackageInfo, RequestKind, SubmitRequest, TaskState, UploadFileChunk, UploadState,
};
use dsrelay_runtime::store::Db;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Code;

use crate::exports::delivered;
use crate::harness::{
    erasure, spawn_pair, wait_until, Backend, Holder, PairOptions, Role, TestPair, NEWSLETTER,
    PROCESSOR,
};
use crate::metrics::{scrape, value};

/// In the sample accounting database (customer 1) and the newsletter's seed.
const MAIJA: &str = "maija.meikalainen@example.fi";

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn return_of_data() -> SubmitRequest {
    SubmitRequest {
        kind: RequestKind::ReturnOfData as i32,
        ..erasure(MAIJA)
    }
}

fn packages(pair: &TestPair, stem: &str) -> PackageServiceClient<Channel> {
    PackageServiceClient::new(pair.channel_to_registry(stem))
}

/// The registry's upload API as the processor (its own certificate).
fn uploads(pair: &TestPair) -> ExportUploadServiceClient<Channel> {
    ExportUploadServiceClient::new(pair.channel_to_registry("processor"))
}

/// Reports, as the processor, the test holder's task of request `id` at `state` with
/// `sequence`, as a real processor acknowledges its tasks: the registry takes a part's files
/// only for a task it knows of, and a return of data's task only COMPLETED once its part is
/// stored.
async fn acknowledge(pair: &TestPair, id: &str, sequence: u64, state: TaskState) {
    let answer = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"))
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![Acknowledgement {
                request_id: id.into(),
                subprocessor: "test-holder".into(),
                sequence,
                state: state as i32,
                reason: if state == TaskState::Failed {
                    "the test holder's export stopped".into()
                } else {
                    String::new()
                },
                ..Default::default()
            }],
        })
        .await
        .expect("acknowledge")
        .into_inner();
    assert_eq!(
        (answer.applied, answer.rejected.len()),
        (1, 0),
        "{state:?} #{sequence}: {answer:?}"
    );
}

/// The files the processor recorded for the task of `request_id` at `subprocessor`.
async fn recorded_files(url: &str, request_id: &str, subprocessor: &str) -> Vec<ExportedFile> {
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

/// Downloads a package: its info, and every file's bytes by path.
async fn download(
    client: &mut PackageServiceClient<Channel>,
    id: &str,
) -> Result<(PackageInfo, BTreeMap<String, Vec<u8>>), tonic::Status> {
    let mut stream = client
        .download_package(DownloadPackageRequest {
            request_id: id.into(),
        })
        .await?
        .into_inner();
    let mut info = None;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    while let Some(chunk) = stream.message().await? {
        match chunk.item.expect("an item") {
            Item::Info(i) => {
                assert!(info.is_none(), "the manifest comes once");
                info = Some(i);
            }
            Item::File(f) => {
                assert!(info.is_some(), "the manifest comes first");
                let file = files.entry(f.path).or_default();
                assert_eq!(f.offset, file.len() as u64, "chunks in order");
                assert!(f.data.len() <= 1024 * 1024);
                file.extend_from_slice(&f.data);
            }
        }
    }
    Ok((info.expect("a manifest"), files))
}

async fn event_types(pair: &TestPair, id: &str) -> Vec<(i32, String, String)> {
    pair.operator()
        .list_events(ListEventsRequest {
            request_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner()
        .events
        .into_iter()
        .map(|e| (e.r#type, e.processor, e.message))
        .collect()
}

async fn a_return_of_data_travels_to_the_partner(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::Accounting, Holder::Newsletter],
        admin: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.client("partner-crm");
    let id = crm
        .submit(return_of_data())
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let view = wait_until(&mut crm, &id, Duration::from_secs(30), delivered).await;
    assert_eq!(view.tasks.len(), 2, "{view:#?}");

    // The manifest lists every file the processor wrote, with the same digests.
    let info = packages(&pair, "partner-crm")
        .get_package(GetPackageRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get package")
        .into_inner();
    assert!(info.complete, "{info:#?}");
    assert!(info.missing.is_empty(), "{info:#?}");
    assert!(info.expires_at.is_some());
    let mut expected: Vec<(String, u64, String)> = Vec::new();
    for sub in ["accounting", NEWSLETTER] {
        for f in recorded_files(pair.processor.database_url(), &id, sub).await {
            expected.push((format!("{PROCESSOR}/{sub}/{}", f.name), f.size, f.sha256));
        }
    }
    expected.sort();
    let listed: Vec<(String, u64, String)> = info
        .files
        .iter()
        .map(|f| (f.path.clone(), f.size, f.sha256.clone()))
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(listed.len(), 9, "eight accounting files and the adapter's");
    // Every byte went to the registry while the connectors wrote it; the uploader only
    // closed the parts.
    let metrics = scrape(&pair.processor.admin_addr().expect("admin").to_string()).await;
    for sub in ["accounting", NEWSLETTER] {
        let written: u64 = expected
            .iter()
            .filter(|(path, ..)| path.starts_with(&format!("{PROCESSOR}/{sub}/")))
            .map(|(_, size, _)| size)
            .sum();
        let sent = |when: &str| {
            value(
                &metrics,
                &format!(
                    "dsrelay_export_bytes_sent_total{{subprocessor=\"{sub}\",when=\"{when}\"}}"
                ),
            )
        };
        assert_eq!(sent("while_written"), written as f64, "{sub}\n{metrics}");
        assert_eq!(sent("after_export"), 0.0, "{sub}\n{metrics}");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&info.manifest_json).unwrap();
    assert_eq!(manifest["request_id"], id.as_str());
    assert_eq!(manifest["kind"], "RETURN_OF_DATA");
    assert_eq!(manifest["files"].as_array().unwrap().len(), 9);
    assert_eq!(manifest["files"][0]["processor"], PROCESSOR);

    // The download streams every file; each matches the manifest.
    let (downloaded, files) = download(&mut packages(&pair, "partner-crm"), &id)
        .await
        .expect("download");
    assert_eq!(downloaded.manifest_json, info.manifest_json);
    assert_eq!(files.len(), 9);
    for f in &info.files {
        let data = &files[&f.path];
        assert_eq!(
            (data.len() as u64, sha256(data)),
            (f.size, f.sha256.clone())
        );
    }
    let customers =
        String::from_utf8(files[&format!("{PROCESSOR}/accounting/customers.csv")].clone()).unwrap();
    assert!(customers.contains("Mannerheimintie 12 A 3"), "{customers}");

    // An operator may download it; another partner cannot see it exists.
    download(&mut packages(&pair, "operator"), &id)
        .await
        .expect("an operator downloads");
    let mut webform = packages(&pair, "partner-webform");
    let refused = webform
        .get_package(GetPackageRequest {
            request_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    let refused = download(&mut webform, &id).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");

    // Each part stored is an event, for `dsrctl trace`.
    let events = event_types(&pair, &id).await;
    let parts: Vec<&(i32, String, String)> = events
        .iter()
        .filter(|e| e.0 == EventType::PartStored as i32)
        .collect();
    assert_eq!(parts.len(), 2, "{events:#?}");
    assert!(parts.iter().all(|e| e.1 == PROCESSOR), "{parts:?}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_a_return_of_data_is_downloaded_and_verified_on_sqlite() {
    a_return_of_data_travels_to_the_partner(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_a_return_of_data_is_downloaded_and_verified_on_postgres() {
    a_return_of_data_travels_to_the_partner(Backend::Postgres).await;
}

/// A pair with the newsletter as its only holder (and `options` otherwise), and the id of a
/// return of data delivered to its processor, completed with the newsletter's part stored.
async fn a_delivered_return_of_data(options: PairOptions) -> (TestPair, String) {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter],
        ..options
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.client("partner-crm");
    let id = crm
        .submit(return_of_data())
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    wait_until(&mut crm, &id, Duration::from_secs(30), delivered).await;
    (pair, id)
}

/// [`a_delivered_return_of_data`] with a task of the test holder at its processor, acknowledged
/// IN_PROGRESS (sequence 1) as a processor reports a task it starts, so that the tests may
/// upload the test holder's part as that processor. The open task takes the request back to
/// IN_PROGRESS until the task ends.
async fn a_return_of_data_with_a_test_holder(options: PairOptions) -> (TestPair, String) {
    let (pair, id) = a_delivered_return_of_data(options).await;
    acknowledge(&pair, &id, 1, TaskState::InProgress).await;
    (pair, id)
}

/// Past `package_ttl_days` after the request finished, the files are deleted with an event,
/// and reading the package says it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_expire_after_their_retention() {
    let (pair, id) = a_delivered_return_of_data(PairOptions::default()).await;
    let folder = pair.package_dir().join(&id);
    assert!(folder.exists(), "{folder:?}");
    let mut client = packages(&pair, "partner-crm");
    download(&mut client, &id).await.expect("within retention");

    pair.registry
        .clock()
        .expect("in process")
        .advance(31 * 86_400_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while folder.exists() {
        assert!(tokio::time::Instant::now() < deadline, "not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = event_types(&pair, &id).await;
        if events
            .iter()
            .any(|e| e.0 == EventType::PackageExpired as i32 && e.2.contains("30 day(s)"))
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{events:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for status in [
        client
            .get_package(GetPackageRequest {
                request_id: id.clone(),
            })
            .await
            .unwrap_err(),
        download(&mut client, &id).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("expired at"), "{status:?}");
    }

    // As a crash between recording the expiry and its last deletion leaves it, when an
    // upload registered before the expiry created a file after the first deletion: the
    // next sweep deletes it.
    let url = pair.registry.database_url().to_string();
    let removed = "SELECT COUNT(*) FROM packages WHERE files_removed_at IS NOT NULL";
    assert_eq!(crate::harness::count(&url, removed).await, 1);
    let late = folder.join(PROCESSOR).join("accounting");
    std::fs::create_dir_all(&late).expect("a part's folder");
    std::fs::write(late.join("customers.json"), br#"[{"name":"Maija"}]"#).expect("file");
    let db = dsrelay_runtime::store::Db::connect(&url)
        .await
        .expect("registry store");
    sqlx::query("UPDATE packages SET files_removed_at = NULL")
        .execute(&db.pool)
        .await
        .expect("unrecord the last deletion");
    db.pool.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while folder.exists() || crate::harness::count(&url, removed).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a file under the expired package stayed: {folder:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pair.stop().await;
}

/// A file of `data` as a test holder's part of request `id`.
fn header(id: &str, name: &str, data: &[u8]) -> ExportFileHeader {
    ExportFileHeader {
        request_id: id.into(),
        subprocessor: "test-holder".into(),
        name: name.into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: data.len() as u64,
        sha256: sha256(data),
    }
}

fn chunk(header: Option<ExportFileHeader>, offset: u64, data: &[u8]) -> UploadFileChunk {
    UploadFileChunk {
        header,
        offset,
        data: data.to_vec().into(),
        chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(data),
        ..Default::default()
    }
}

async fn upload(
    client: &mut ExportUploadServiceClient<Channel>,
    chunks: Vec<UploadFileChunk>,
) -> Result<UploadState, tonic::Status> {
    Ok(client
        .upload_file(tokio_stream::iter(chunks))
        .await?
        .into_inner())
}

async fn state(
    client: &mut ExportUploadServiceClient<Channel>,
    h: &ExportFileHeader,
) -> UploadState {
    client
        .get_upload_state(GetUploadStateRequest {
            header: Some(h.clone()),
        })
        .await
        .expect("upload state")
        .into_inner()
}

/// An upload whose sender opens the stream, sends a chunk and then stalls is ended after
/// `call_limit_ms` with DEADLINE_EXCEEDED: the chunk it sent is kept, and the file is free
/// for the next upload, which resumes where GetUploadState says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_a_stalled_upload_stream_is_ended_and_the_file_freed() {
    let (pair, id) = a_return_of_data_with_a_test_holder(PairOptions {
        call_limit_ms: Some(500),
        ..Default::default()
    })
    .await;
    let mut client = uploads(&pair);
    let data = br#"{"subject": "maija", "rows": [1, 2, 3]}"#;
    let h = header(&id, "stalled.json", data);

    // The sender keeps its half of the stream open and sends nothing after the first chunk.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(chunk(Some(h.clone()), 0, &data[..10]))
        .await
        .expect("first chunk");
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(
        Duration::from_secs(20),
        client.upload_file(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("the registry ends a stalled stream")
    .expect_err("a stalled stream is not a completed upload");
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    assert!(ended.message().contains("500 ms"), "{ended:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(
        state(&mut client, &h).await.offset,
        10,
        "the chunk sent is kept"
    );

    // The file's claim went with the stream: the rest is uploaded at once.
    let rest = upload(&mut client, vec![chunk(Some(h.clone()), 10, &data[10..])])
        .await
        .expect("the upload resumes");
    assert!(rest.complete, "{rest:?}");
    drop(tx);
    pair.stop().await;
}

/// A part whose files would make the package's description (GetPackage's answer, the first
/// message of DownloadPackage) larger than a message may be is refused as invalid, so the
/// processor's task fails saying why instead of completing a package nobody could read;
/// parts of thousands of files are still taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_refuse_a_part_too_large_to_describe() {
    let (pair, id) = a_return_of_data_with_a_test_holder(PairOptions::default()).await;
    let mut client = uploads(&pair);
    let part = |n: usize| CompletePartRequest {
        request_id: id.clone(),
        subprocessor: "test-holder".into(),
        files: (0..n)
            .map(|i| header(&id, &format!("export-{i:06}.json"), b"{}"))
            .collect(),
    };
    let refused = client.complete_part(part(9_900)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    for words in ["description", "9900 files", "fewer files"] {
        assert!(
            refused.message().contains(words),
            "{words:?} in {refused:?}"
        );
    }
    // 2,000 files describe well within the limit: the part is judged on its files, which
    // were never uploaded. The answer names a few of them and counts the rest (all 2,000
    // names would not fit in a status, which then reached the caller as a protocol error).
    let waiting = client.complete_part(part(2_000)).await.unwrap_err();
    assert_eq!(waiting.code(), Code::FailedPrecondition, "{waiting:?}");
    for words in ["upload export-000000.json", "and 1995 more first"] {
        assert!(
            waiting.message().contains(words),
            "{words:?} in {waiting:?}"
        );
    }
    // Nothing of either was stored (the package holds only the processor's own export of
    // its newsletter subprocessor), and the package still reads.
    let info = packages(&pair, "operator")
        .get_package(GetPackageRequest {
            request_id: id.clone(),
        })
        .await
        .expect("the package reads")
        .into_inner();
    let holders: Vec<&str> = info.files.iter().map(|f| f.subprocessor.as_str()).collect();
    assert_eq!(holders, ["newsletter"]);
    pair.stop().await;
}

/// Chunks sent with the processor's certificate: a damaged or out-of-order chunk, and a file
/// whose bytes disagree with its header, are refused and leave nothing stored; an upload cut
/// short resumes where GetUploadState says; a part lists only files stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_refuse_bad_chunks_and_resume_uploads() {
    let (pair, id) = a_return_of_data_with_a_test_holder(PairOptions::default()).await;
    let mut client = uploads(&pair);
    let data = br#"{"subject": "maija", "rows": [1, 2, 3]}"#;
    let h = header(&id, "rows.json", data);
    let stored = pair
        .package_dir()
        .join(&id)
        .join(PROCESSOR)
        .join("test-holder")
        .join("rows.json");
    let stored_len = || std::fs::metadata(&stored).map(|m| m.len()).unwrap_or(0);

    // A chunk whose checksum does not match its data.
    let mut damaged = chunk(Some(h.clone()), 0, &data[..10]);
    let mut bytes = damaged.data.to_vec();
    bytes[3] ^= 0xff;
    damaged.data = bytes.into();
    let refused = upload(&mut client, vec![damaged]).await.unwrap_err();
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert_eq!(state(&mut client, &h).await.offset, 0);
    assert_eq!(stored_len(), 0, "nothing of it stored");
    // A sender built for the earlier protocol leaves chunk_crc32 unset, and is told so.
    let mut unset = chunk(Some(h.clone()), 0, &data[..10]);
    unset.chunk_crc32 = 0;
    let refused = upload(&mut client, vec![unset]).await.unwrap_err();
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(
        refused.message().contains("chunk_crc32 is not set"),
        "{refused:?}"
    );
    assert_eq!(stored_len(), 0, "nothing of it stored");

    // A chunk that does not start where the stored bytes end.
    let refused = upload(&mut client, vec![chunk(Some(h.clone()), 10, &data[10..20])])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("offset 0"), "{refused:?}");
    assert_eq!(stored_len(), 0, "nothing of it stored");

    // Cut short after the first chunk: the next upload resumes at the stored length.
    let first = upload(&mut client, vec![chunk(Some(h.clone()), 0, &data[..10])])
        .await
        .expect("first chunk");
    assert_eq!((first.offset, first.complete), (10, false));
    assert_eq!(state(&mut client, &h).await.offset, 10);
    // A part cannot be declared before its files are whole.
    let part = CompletePartRequest {
        request_id: id.clone(),
        subprocessor: "test-holder".into(),
        files: vec![h.clone()],
    };
    let refused = client.complete_part(part.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("rows.json"), "{refused:?}");
    let rest = upload(&mut client, vec![chunk(Some(h.clone()), 10, &data[10..])])
        .await
        .expect("the rest");
    assert_eq!((rest.offset, rest.complete), (data.len() as u64, true));
    assert_eq!(std::fs::read(&stored).unwrap(), data);

    // Every chunk intact, but the whole disagrees with the header: dropped, start again.
    let liar = ExportFileHeader {
        sha256: sha256(b"something else"),
        ..header(&id, "liar.json", data)
    };
    let refused = upload(&mut client, vec![chunk(Some(liar.clone()), 0, data)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    assert!(refused.message().contains("SHA-256"), "{refused:?}");
    assert_eq!(state(&mut client, &liar).await.offset, 0);
    client.complete_part(part).await.expect("part stored");

    // The stored part is closed: a file it does not list cannot join it.
    let late = header(&id, "late.json", data);
    let refused = upload(&mut client, vec![chunk(Some(late), 0, data)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("does not change"), "{refused:?}");

    // Only processors upload, and only to requests delivered to them.
    let refused = ExportUploadServiceClient::new(pair.channel_to_registry("partner-crm"))
        .get_upload_state(GetUploadStateRequest {
            header: Some(h.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A request that does not exist gets the answer of one not delivered to this processor:
    // nothing tells a processor whether another's request exists.
    let refused = client
        .get_upload_state(GetUploadStateRequest {
            header: Some(header("no-such-request", "a.json", data)),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("was not delivered to processor"),
        "{refused:?}"
    );
    // A part is taken only for a task of the processor's: every call for a subprocessor the
    // registry knows no task of (once it has waited a moment for one) is refused, naming it,
    // and stores nothing.
    let untasked = ExportFileHeader {
        subprocessor: "no-task-holder".into(),
        ..h.clone()
    };
    let refusals = [
        client
            .get_upload_state(GetUploadStateRequest {
                header: Some(untasked.clone()),
            })
            .await
            .map(drop),
        upload(&mut client, vec![chunk(Some(untasked.clone()), 0, data)])
            .await
            .map(drop),
        client
            .complete_part(CompletePartRequest {
                request_id: id.clone(),
                subprocessor: untasked.subprocessor.clone(),
                files: vec![untasked.clone()],
            })
            .await
            .map(drop),
    ];
    for refused in refusals {
        let refused = refused.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        let named = format!("no task of subprocessor no-task-holder on request {id}");
        assert!(refused.message().contains(&named), "{refused:?}");
    }
    let untasked_folder = pair
        .package_dir()
        .join(&id)
        .join(PROCESSOR)
        .join("no-task-holder");
    assert!(!untasked_folder.exists(), "{untasked_folder:?}");
    // Bad headers name their fields.
    let refused = upload(
        &mut client,
        vec![chunk(
            Some(ExportFileHeader {
                name: "../escape".into(),
                ..h.clone()
            }),
            0,
            data,
        )],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("header.name"), "{refused:?}");
    // The subprocessor names a folder too: one that could not be a folder of the package
    // on disk (too long once escaped) or in a download (a separator) is refused.
    for subprocessor in ["crm:eu".to_string(), "a/..".into(), "会計".repeat(15)] {
        let refused = upload(
            &mut client,
            vec![chunk(
                Some(ExportFileHeader {
                    subprocessor: subprocessor.clone(),
                    ..h.clone()
                }),
                0,
                data,
            )],
        )
        .await
        .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{subprocessor}: {refused:?}"
        );
        assert!(
            refused.message().contains("header.subprocessor"),
            "{refused:?}"
        );
        let refused = client
            .complete_part(CompletePartRequest {
                request_id: id.clone(),
                subprocessor: subprocessor.clone(),
                files: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{subprocessor}: {refused:?}"
        );
        assert!(refused.message().contains("subprocessor"), "{refused:?}");
    }

    // The test holder's part is in the package beside the newsletter's.
    let info = packages(&pair, "operator")
        .get_package(GetPackageRequest {
            request_id: id.clone(),
        })
        .await
        .expect("package")
        .into_inner();
    let paths: Vec<&str> = info.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!("{PROCESSOR}/{NEWSLETTER}/export.json"),
            format!("{PROCESSOR}/test-holder/rows.json")
        ]
    );
    pair.stop().await;
}

/// The header of a file streamed while it is written: its size and digest follow.
fn growing(id: &str, name: &str) -> ExportFileHeader {
    ExportFileHeader {
        size: 0,
        sha256: String::new(),
        ..header(id, name, b"")
    }
}

/// The messages of `data` streamed while written: the header alone, chunks of `step`
/// bytes with an empty (keep-alive) message among them, and `end` with `size` and `sha`.
fn grown(
    h: &ExportFileHeader,
    data: &[u8],
    step: usize,
    size: u64,
    sha: &str,
) -> Vec<UploadFileChunk> {
    let mut out = vec![UploadFileChunk {
        header: Some(h.clone()),
        size_follows: true,
        ..Default::default()
    }];
    for (i, part) in data.chunks(step).enumerate() {
        out.push(chunk(None, (i * step) as u64, part));
        out.push(UploadFileChunk {
            offset: (i * step + part.len()) as u64,
            ..Default::default()
        });
    }
    out.push(UploadFileChunk {
        offset: data.len() as u64,
        end: Some(FileEnd {
            size,
            sha256: sha.into(),
        }),
        ..Default::default()
    });
    out
}

/// A file streamed while it is written (`size_follows`): stored once its end gives the size
/// and SHA-256 of what arrived, after which GetUploadState with the real header finds it
/// whole; an end that disagrees drops it; it always starts at offset 0, over any partial
/// file; a re-export replaces a file until its part is stored, not after; and the fields are
/// refused where they do not belong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_a_file_streamed_while_written_is_checked_at_its_end() {
    let (pair, id) = a_return_of_data_with_a_test_holder(PairOptions::default()).await;
    let mut client = uploads(&pair);
    let data: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
    let stored = |name: &str| {
        pair.package_dir()
            .join(&id)
            .join(PROCESSOR)
            .join("test-holder")
            .join(name)
    };

    // A partial upload of the file is there; the streamed one starts over it at offset 0.
    let whole = header(&id, "grown.bin", &data);
    let first = upload(
        &mut client,
        vec![chunk(Some(whole.clone()), 0, &data[..100])],
    )
    .await
    .expect("a partial upload");
    assert_eq!(first.offset, 100);
    let g = growing(&id, "grown.bin");
    let done = upload(
        &mut client,
        grown(&g, &data, 7000, data.len() as u64, &sha256(&data)),
    )
    .await
    .expect("streamed while written");
    assert_eq!((done.offset, done.complete), (data.len() as u64, true));
    assert_eq!(std::fs::read(stored("grown.bin")).unwrap(), data);
    let s = state(&mut client, &whole).await;
    assert_eq!((s.offset, s.complete), (data.len() as u64, true));

    // An end that disagrees with what arrived drops the file.
    for (size, sha, name) in [
        (data.len() as u64, sha256(b"other"), "bad-digest.bin"),
        (data.len() as u64 + 1, sha256(&data), "bad-size.bin"),
    ] {
        let refused = upload(
            &mut client,
            grown(&growing(&id, name), &data, 7000, size, &sha),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), Code::DataLoss, "{name}: {refused:?}");
        assert!(
            refused.message().contains("send the file again"),
            "{refused:?}"
        );
        assert!(!stored(name).exists(), "{name} dropped");
        assert_eq!(
            state(&mut client, &header(&id, name, &data)).await.offset,
            0
        );
    }

    // The fields where they do not belong.
    let refused = upload(
        &mut client,
        vec![UploadFileChunk {
            header: Some(whole.clone()),
            size_follows: true,
            ..Default::default()
        }],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("header.sha256"), "{refused:?}");
    let mut ended = chunk(Some(header(&id, "plain.bin", &data[..10])), 0, &data[..10]);
    ended.end = Some(FileEnd {
        size: 10,
        sha256: sha256(&data[..10]),
    });
    let refused = upload(&mut client, vec![ended]).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("size_follows"), "{refused:?}");
    let mut after_end = grown(
        &growing(&id, "late.bin"),
        &data[..10],
        10,
        10,
        &sha256(&data[..10]),
    );
    after_end.push(chunk(None, 10, b"late"));
    let refused = upload(&mut client, after_end).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("end"), "{refused:?}");

    // Exported again before the part is stored: the new content replaces the stored file.
    let again: Vec<u8> = data.iter().rev().copied().collect();
    let done = upload(
        &mut client,
        grown(&g, &again, 4096, again.len() as u64, &sha256(&again)),
    )
    .await
    .expect("a re-export streamed");
    assert!(done.complete);
    assert_eq!(std::fs::read(stored("grown.bin")).unwrap(), again);
    let replaced = header(&id, "grown.bin", &again);
    client
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "test-holder".into(),
            files: vec![replaced.clone()],
        })
        .await
        .expect("part stored");
    // Once the part is stored, its files stay as they are.
    let refused = upload(
        &mut client,
        grown(&g, &data, 7000, data.len() as u64, &sha256(&data)),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let refused = client
        .get_upload_state(GetUploadStateRequest {
            header: Some(whole.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(std::fs::read(stored("grown.bin")).unwrap(), again);
    pair.stop().await;
}

/// Submits a return of data to a pair with the newsletter down, and returns once its export
/// is written and its upload has failed at least once because the registry is down.
async fn export_waiting_for_the_registry(pair: &mut TestPair) -> String {
    let mut crm = pair.client("partner-crm");
    let id = crm
        .submit(return_of_data())
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        !r.deliveries.is_empty() && r.deliveries.iter().all(|d| d.delivered_at.is_some())
    })
    .await;
    pair.registry.stop().await;
    pair.adapter().start().await;
    let db = Db::connect(pair.processor.database_url())
        .await
        .expect("processor db");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let failed: Option<String> = sqlx::query_scalar(
            "SELECT last_error FROM uploads WHERE request_id = $1 AND done_at IS NULL",
        )
        .bind(&id)
        .fetch_optional(&db.pool)
        .await
        .expect("uploads")
        .flatten();
        if failed.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no failed upload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.pool.close().await;
    id
}

fn pair_with_the_newsletter_down() -> PairOptions {
    PairOptions {
        holders: vec![Holder::Newsletter],
        down: vec![Role::Adapter],
        ..Default::default()
    }
}

/// The registry is down while the export is ready: the upload fails and is retried with
/// backoff until the registry is back, then the part is stored and the task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_an_upload_resumes_when_the_registry_is_back() {
    let mut pair = spawn_pair(pair_with_the_newsletter_down())
        .await
        .expect("sqlite pair");
    let id = export_waiting_for_the_registry(&mut pair).await;
    pair.registry.start().await;
    let mut crm = pair.client("partner-crm");
    wait_until(&mut crm, &id, Duration::from_secs(30), delivered).await;
    let (info, files) = download(&mut packages(&pair, "partner-crm"), &id)
        .await
        .expect("download");
    assert_eq!(info.files.len(), 1);
    let f = &info.files[0];
    assert_eq!(sha256(&files[&f.path]), f.sha256);
    pair.stop().await;
}

/// An export file changed at the processor after it was written is not what the holder
/// exported: the task fails with the reason, and nothing of it reaches the package. (The
/// processor checks the file as it sends it, so the registry may hold a partial upload of it,
/// which no manifest lists and which goes with the request's folder when the package
/// expires.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_a_changed_export_fails_its_task() {
    let mut pair = spawn_pair(pair_with_the_newsletter_down())
        .await
        .expect("sqlite pair");
    let id = export_waiting_for_the_registry(&mut pair).await;
    std::fs::write(
        pair.export_dir(&id, NEWSLETTER).join("export.json"),
        "[\"tampered\"]",
    )
    .unwrap();
    pair.registry.start().await;
    let mut crm = pair.client("partner-crm");
    let view = wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        r.tasks
            .iter()
            .any(|t| t.state == dsrelay_proto::v1::TaskState::Failed as i32)
    })
    .await;
    let reason = &view.tasks[0].reason;
    assert!(
        reason.contains("export.json changed at the processor"),
        "{reason}"
    );
    let info = packages(&pair, "partner-crm")
        .get_package(GetPackageRequest {
            request_id: id.clone(),
        })
        .await
        .expect("the package of a finished request")
        .into_inner();
    assert!(info.files.is_empty(), "{:?}", info.files);
    assert!(info.complete && info.missing.is_empty(), "{info:?}");
    pair.stop().await;
}

/// A file of no bytes (an export of a table with nothing in it, from an adapter) is stored,
/// whether announced with its size or streamed while written, and downloaded as the empty
/// file it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_empty_files_are_stored_and_downloaded() {
    let (pair, id) = a_return_of_data_with_a_test_holder(PairOptions::default()).await;
    let mut client = uploads(&pair);
    let announced = header(&id, "announced.json", b"");
    let s = state(&mut client, &announced).await;
    assert_eq!((s.offset, s.complete), (0, true));
    let streamed = growing(&id, "streamed.csv");
    let done = upload(&mut client, grown(&streamed, b"", 10, 0, &sha256(b"")))
        .await
        .expect("an empty file streamed while written");
    assert_eq!((done.offset, done.complete), (0, true));
    client
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "test-holder".into(),
            files: vec![announced, header(&id, "streamed.csv", b"")],
        })
        .await
        .expect("the part of two empty files");
    // The processor reports its task COMPLETED only once CompletePart was answered; only
    // then is the request finished.
    acknowledge(&pair, &id, 2, TaskState::Completed).await;
    let mut crm = pair.client("partner-crm");
    wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        r.state == dsrelay_proto::v1::RequestState::Completed as i32
    })
    .await;
    let (info, files) = download(&mut packages(&pair, "partner-crm"), &id)
        .await
        .expect("download");
    for name in ["announced.json", "streamed.csv"] {
        let path = format!("{PROCESSOR}/test-holder/{name}");
        assert!(
            info.files.iter().any(|f| f.path == path && f.size == 0),
            "{path} in {info:?}"
        );
        assert_eq!(files.get(&path).map(Vec::len).unwrap_or(0), 0, "{path}");
    }
    pair.stop().await;
}

/// An upload whose header came before its package expired, and whose bytes come after the
/// expiry deleted the package, is refused, and brings back no file: the record says the
/// package is gone, and so it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_an_upload_begun_before_the_expiry_does_not_outlive_it() {
    let (pair, id) = a_delivered_return_of_data(PairOptions::default()).await;
    let folder = pair.package_dir().join(&id);
    download(&mut packages(&pair, "partner-crm"), &id)
        .await
        .expect("within retention");
    // The test holder's task starts (a package downloads only while complete, so after the
    // download), so that its file may be uploaded.
    acknowledge(&pair, &id, 1, TaskState::InProgress).await;
    let data = br#"[{"late": true}]"#;
    let h = header(&id, "late.json", data);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(UploadFileChunk {
        header: Some(h.clone()),
        ..Default::default()
    })
    .await
    .expect("the header");
    let mut client = uploads(&pair);
    let call = tokio::spawn(async move {
        client
            .upload_file(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // The header is registered before the package expires.
    let db = Db::connect(pair.registry.database_url())
        .await
        .expect("the registry's store");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let files: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM package_files WHERE request_id = $1 AND name = 'late.json'",
        )
        .bind(&id)
        .fetch_one(&db.pool)
        .await
        .expect("package files");
        if files == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The test holder's task ends without its part, so that the request is finished again
    // when its package expires, as a real return of data is.
    acknowledge(&pair, &id, 2, TaskState::Failed).await;
    pair.registry
        .clock()
        .expect("in process")
        .advance(31 * 86_400_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !event_types(&pair, &id)
        .await
        .iter()
        .any(|e| e.0 == EventType::PackageExpired as i32)
    {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!folder.exists(), "{folder:?}");

    tx.send(chunk(None, 0, data)).await.expect("the bytes");
    drop(tx);
    let refused = call.await.expect("the call").unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("expired"), "{refused:?}");
    assert!(
        !folder.exists(),
        "the expired package came back: {folder:?}"
    );
    db.pool.close().await;
    pair.stop().await;
}
