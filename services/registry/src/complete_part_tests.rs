//! CompletePart through the real registry: its server over mutual TLS with the development
//! PKI's certificates, its store (SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL`
//! names a server) and its package folder, called as the processor and the partner call it.

use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::{
    CompletePartRequest, ExportFileHeader, FileEnd, GetUploadStateRequest, RequestKind,
    UploadFileChunk,
};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Code;

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup, PROCESSOR};

/// The header of an empty file `name` of `subprocessor`'s part of request `id`: stored
/// whole as soon as it is announced, so a test needs no upload stream.
fn empty_file(id: &str, subprocessor: &str, name: &str) -> ExportFileHeader {
    ExportFileHeader {
        request_id: id.into(),
        subprocessor: subprocessor.into(),
        name: name.into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: 0,
        sha256: hex::encode(Sha256::digest(b"")),
    }
}

/// Announces `file` (stored whole at once, being empty) and completes its part of one file.
async fn complete(
    uploads: &mut ExportUploadServiceClient<Channel>,
    file: &ExportFileHeader,
) -> Result<i64, tonic::Status> {
    let state = uploads
        .get_upload_state(GetUploadStateRequest {
            header: Some(file.clone()),
        })
        .await?
        .into_inner();
    assert!(state.complete, "{state:?}");
    let stored = uploads
        .complete_part(CompletePartRequest {
            request_id: file.request_id.clone(),
            subprocessor: file.subprocessor.clone(),
            files: vec![file.clone()],
        })
        .await?
        .into_inner();
    Ok(stored
        .stored_at
        .map(|t| dsrelay_proto::millis_from_timestamp(&t))
        .unwrap_or_default())
}

/// A part the registry stored stays stored for the processor that asks again after losing
/// the answer, though parts completing at the same moment (each measured without the
/// other's files) have since grown the package past what a new part may bring: the replay
/// is answered as stored, with the first answer's time, and only a new part is refused.
/// Measured first, the replay was refused INVALID_ARGUMENT, and the processor failed a task
/// whose part the registry held.
async fn a_replayed_part_is_answered_as_stored_past_the_size_limit(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url, Setup::default()).await;
    let id = registry
        .submit(RequestKind::ReturnOfData, "replay-past-the-limit")
        .await;
    for subprocessor in ["crm", "archive"] {
        registry.in_progress(&id, subprocessor).await;
    }
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let file = empty_file(&id, "crm", "contacts.json");
    let stored_at = complete(&mut uploads, &file).await.expect("part stored");

    // 12,000 files of another part, as two parts completing together leave them: each
    // passed the check alone, and together they describe past the limit.
    let db = dsrelay_runtime::store::Db::connect(database_url)
        .await
        .expect("connect");
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12000) \
         INSERT INTO package_files (request_id, processor, subprocessor, name, media_type, \
         categories, size, sha256, stored_at) SELECT f.request_id, f.processor, 'mail', \
         'export-' || CAST(n.i AS TEXT) || '.json', f.media_type, f.categories, f.size, \
         f.sha256, f.stored_at FROM package_files f, n WHERE f.request_id = $1",
    )
    .bind(&id)
    .execute(&db.pool)
    .await
    .expect("the other part's files");
    sqlx::query(
        "INSERT INTO package_parts (request_id, processor, subprocessor, files, bytes, \
         stored_at) VALUES ($1, $2, 'mail', 12000, 0, $3)",
    )
    .bind(&id)
    .bind(PROCESSOR)
    .bind(stored_at)
    .execute(&db.pool)
    .await
    .expect("the other part");
    db.pool.close().await;

    // A new part is refused: the package is past what may be described.
    let refused = complete(&mut uploads, &empty_file(&id, "archive", "old.json"))
        .await
        .expect_err("a new part past the limit");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("description"), "{refused:?}");

    // The stored part, asked again, is answered as it was the first time.
    let again = uploads
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            files: vec![file.clone()],
        })
        .await
        .expect("the stored part answered as stored")
        .into_inner();
    assert_eq!(
        again
            .stored_at
            .map(|t| dsrelay_proto::millis_from_timestamp(&t)),
        Some(stored_at)
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_part_is_answered_as_stored_past_the_size_limit_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_replayed_part_is_answered_as_stored_past_the_size_limit(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_part_is_answered_as_stored_past_the_size_limit_on_postgres() {
    on_postgres(|url, dir| async move {
        a_replayed_part_is_answered_as_stored_past_the_size_limit(&url, &dir).await;
    })
    .await;
}

/// A stored part is closed: a file it does not list cannot join it afterwards (before, it was
/// taken and shown in the package, whose manifest then changed after a partner downloaded it
/// or a controller confirmed its digest), and CompletePart with another list is refused; the
/// same declaration again is answered as stored.
async fn a_stored_part_does_not_change(database_url: &str, dir: &std::path::Path) {
    let registry = Registry::start(dir, database_url, Setup::default()).await;
    let id = registry
        .submit(RequestKind::ReturnOfData, "a-closed-part")
        .await;
    registry.in_progress(&id, "crm").await;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let file = empty_file(&id, "crm", "contacts.json");
    let stored_at = complete(&mut uploads, &file).await.expect("part stored");

    let late = empty_file(&id, "crm", "orders.csv");
    let refused = uploads
        .get_upload_state(GetUploadStateRequest {
            header: Some(late.clone()),
        })
        .await
        .expect_err("a file joining a stored part");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("does not change"), "{refused:?}");

    let refused = uploads
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            files: vec![file.clone(), late],
        })
        .await
        .expect_err("another declaration of a stored part");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("contacts.json"), "{refused:?}");

    let again = uploads
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            files: vec![file],
        })
        .await
        .expect("the same declaration")
        .into_inner();
    assert_eq!(
        again
            .stored_at
            .map(|t| dsrelay_proto::millis_from_timestamp(&t)),
        Some(stored_at)
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_part_does_not_change_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_stored_part_does_not_change(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_part_does_not_change_on_postgres() {
    on_postgres(|url, dir| async move {
        a_stored_part_does_not_change(&url, &dir).await;
    })
    .await;
}

/// The header of a file `name` of `size` bytes (not sent) of `subprocessor`'s part of `id`.
fn sized_file(id: &str, subprocessor: &str, name: &str, size: u64) -> ExportFileHeader {
    ExportFileHeader {
        size,
        sha256: "ab".repeat(32),
        ..empty_file(id, subprocessor, name)
    }
}

/// The messages streaming `pieces` of `data` each as the file `name` of `subprocessor`'s
/// part of `id` is written (`size_follows`), its `end` last when `end` is set.
fn growing(
    id: &str,
    subprocessor: &str,
    name: &str,
    pieces: &[&[u8]],
    end: bool,
) -> Vec<UploadFileChunk> {
    let header = ExportFileHeader {
        size: 0,
        sha256: String::new(),
        ..empty_file(id, subprocessor, name)
    };
    let mut offset = 0u64;
    let mut all = Vec::new();
    let mut chunks: Vec<UploadFileChunk> = pieces
        .iter()
        .enumerate()
        .map(|(i, data)| {
            all.extend_from_slice(data);
            let chunk = UploadFileChunk {
                header: (i == 0).then(|| header.clone()),
                size_follows: i == 0,
                offset,
                data: data.to_vec().into(),
                chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(data),
                ..Default::default()
            };
            offset += data.len() as u64;
            chunk
        })
        .collect();
    if end {
        if let Some(last) = chunks.last_mut() {
            last.end = Some(FileEnd {
                size: offset,
                sha256: hex::encode(Sha256::digest(&all)),
            });
        }
    }
    chunks
}

/// Files of request `id`'s part of `subprocessor`, as recorded.
async fn recorded(database_url: &str, id: &str, subprocessor: &str) -> i64 {
    let db = dsrelay_runtime::store::Db::connect(database_url)
        .await
        .expect("connect");
    let n: i64 = sqlx::query_scalar(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM package_files WHERE request_id = $1 \
         AND subprocessor = $2",
    )
    .bind(id)
    .bind(subprocessor)
    .fetch_one(&db.pool)
    .await
    .expect("files");
    db.pool.close().await;
    n
}

/// A processor uploads only for a subprocessor it has a task of on the request: any other
/// name would open a part of its own, files and all. Refused (FAILED_PRECONDITION, which the
/// processor tries again) with nothing recorded; taken once the task is acknowledged.
/// Measured before, every name was taken.
async fn uploads_are_taken_only_for_the_processors_tasks(
    database_url: &str,
    dir: &std::path::Path,
) {
    let registry = Registry::start(dir, database_url, Setup::default()).await;
    let id = registry
        .submit(RequestKind::ReturnOfData, "no-such-task")
        .await;
    let mut uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let file = empty_file(&id, "ghost", "a.json");
    let no_task = |s: &tonic::Status| {
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(
            s.message().contains("no task of subprocessor ghost"),
            "{s:?}"
        );
    };
    let refused = uploads
        .get_upload_state(GetUploadStateRequest {
            header: Some(file.clone()),
        })
        .await
        .expect_err("a file of no task");
    no_task(&refused);
    let refused = uploads
        .upload_file(tokio_stream::iter(growing(
            &id,
            "ghost",
            "b.json",
            &[b"{}"],
            true,
        )))
        .await
        .expect_err("a file of no task streamed");
    no_task(&refused);
    let refused = uploads
        .complete_part(CompletePartRequest {
            request_id: id.clone(),
            subprocessor: "ghost".into(),
            files: vec![file.clone()],
        })
        .await
        .expect_err("a part of no task");
    no_task(&refused);
    assert_eq!(recorded(database_url, &id, "ghost").await, 0);

    registry.in_progress(&id, "ghost").await;
    complete(&mut uploads, &file).await.expect("part stored");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_taken_only_for_the_processors_tasks_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    uploads_are_taken_only_for_the_processors_tasks(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_taken_only_for_the_processors_tasks_on_postgres() {
    on_postgres(|url, dir| async move {
        uploads_are_taken_only_for_the_processors_tasks(&url, &dir).await;
    })
    .await;
}

/// A part is held to `packages.max_files_per_part` and `packages.max_part_bytes` as its files
/// are registered, long before CompletePart: sizes announced count whether their bytes came
/// or not, a file streamed while written is cut off at the chunk that would pass the cap,
/// and its bytes stored count against the files after it. Measured before, each new name
/// was a file, and a streamed file had no ceiling.
async fn a_part_is_capped_before_it_is_declared(database_url: &str, dir: &std::path::Path) {
    let setup = Setup {
        tables: "[packages]\nmax_files_per_part = 3\nmax_part_bytes = 1000\n".into(),
        ..Setup::default()
    };
    let registry = Registry::start(dir, database_url, setup).await;
    let id = registry.submit(RequestKind::ReturnOfData, "capped").await;
    registry.in_progress(&id, "crm").await;
    registry.in_progress(&id, "mail").await;
    let uploads = ExportUploadServiceClient::new(registry.channel("processor"));
    let state = |header: ExportFileHeader| {
        let mut uploads = uploads.clone();
        async move {
            uploads
                .get_upload_state(GetUploadStateRequest {
                    header: Some(header),
                })
                .await
        }
    };
    let over = |s: &tonic::Status, key: &str| {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains(key), "{key} in {s:?}");
    };
    for name in ["a.json", "b.json"] {
        state(sized_file(&id, "crm", name, 400))
            .await
            .expect("within the caps");
    }
    let refused = state(sized_file(&id, "crm", "c.json", 300))
        .await
        .unwrap_err();
    over(&refused, "packages.max_part_bytes (1000)");
    assert!(refused.message().contains("1100 bytes"), "{refused:?}");
    state(sized_file(&id, "crm", "c.json", 200))
        .await
        .expect("up to the byte cap");
    let refused = state(empty_file(&id, "crm", "d.json")).await.unwrap_err();
    over(&refused, "packages.max_files_per_part");
    // A file registered before is not a new one.
    state(sized_file(&id, "crm", "a.json", 400))
        .await
        .expect("a file asked about again");
    assert_eq!(recorded(database_url, &id, "crm").await, 3);

    let pieces: [&[u8]; 4] = [&[1; 300], &[2; 300], &[3; 300], &[4; 300]];
    let refused = (uploads.clone())
        .upload_file(tokio_stream::iter(growing(
            &id, "mail", "g.json", &pieces, true,
        )))
        .await
        .expect_err("a streamed file past the cap");
    over(&refused, "packages.max_part_bytes");
    let stored = std::fs::metadata(dir.join("packages").join(crate::packages::file_key(
        &crate::store::PackageFile {
            request_id: id.clone(),
            processor: PROCESSOR.into(),
            subprocessor: "mail".into(),
            name: "g.json".into(),
            media_type: String::new(),
            categories: String::new(),
            size: 0,
            sha256: String::new(),
        },
    )))
    .expect("the streamed file")
    .len();
    assert_eq!(stored, 900);
    // Its 900 bytes, though unfinished, count against the part's next file.
    let refused = state(sized_file(&id, "mail", "k.json", 200))
        .await
        .unwrap_err();
    over(&refused, "packages.max_part_bytes");
    state(sized_file(&id, "mail", "k.json", 100))
        .await
        .expect("up to the byte cap");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_is_capped_before_it_is_declared_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_part_is_capped_before_it_is_declared(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_is_capped_before_it_is_declared_on_postgres() {
    on_postgres(|url, dir| async move {
        a_part_is_capped_before_it_is_declared(&url, &dir).await;
    })
    .await;
}
