//! A contract end that will not go on: [`Connector::discard_bulk`] deletes what its export
//! recorded in the table of returned keys, and leaves another contract end's keys. On SQLite
//! and PostgreSQL.

use dsrelay_runtime::store::Db;

use super::tests::{
    bulk_job, fresh_postgres_database, now, on_both_backends, run_bulk_watched, sample,
};
use super::*;
use crate::ExportSink;

on_both_backends!(
    a_discarded_contract_end_leaves_no_returned_keys_and_others_keep_theirs,
    discarding_before_any_export_finds_nothing_to_do,
);

/// Rows of the table of returned keys recorded under `job`.
async fn recorded(db: &Db, job: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM dsrelay_erasure_receipts_returned WHERE job = $1",
    )
    .bind(job)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Runs the export of contract end `request` of `acme`: its job id.
async fn export(connector: &SqlConnector, request: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join(request), vec!["billing".into()]);
    sink.reset().await.unwrap();
    let (job, rx) = bulk_job(
        "acme",
        crate::BulkOp::Export,
        Phase::Start,
        now(),
        Some(sink),
    );
    let job = crate::BulkJob {
        job_id: format!("acme/{request}/accounting"),
        request_id: request.into(),
        ..job
    };
    let id = job.job_id.clone();
    run_bulk_watched(connector, job, rx).await;
    id
}

/// The cancelled contract end's keys (more than one batch of them) are gone, its mark too;
/// another contract end's are all still there; a second discard finds nothing and answers
/// done.
async fn a_discarded_contract_end_leaves_no_returned_keys_and_others_keep_theirs(url: String) {
    let (connector, db) = sample(&url).await;
    let cancelled = export(&connector, "ce-cancelled").await;
    let going_on = export(&connector, "ce-going-on").await;
    let (before, kept) = (
        recorded(&db, &cancelled).await,
        recorded(&db, &going_on).await,
    );
    assert!(before > 3, "{before}");
    assert_eq!(kept, before);

    // A small batch: the deletion goes on past a full one.
    let scope = connector.scope("acme").unwrap();
    let deleted = scope.discard_returned(&cancelled, 2).await.unwrap();
    assert_eq!(deleted, u64::try_from(before).unwrap());
    assert_eq!(recorded(&db, &cancelled).await, 0);
    assert_eq!(recorded(&db, &going_on).await, kept);

    let again = export(&connector, "ce-again").await;
    Connector::discard_bulk(&connector, "acme", &again)
        .await
        .unwrap();
    Connector::discard_bulk(&connector, "acme", &again)
        .await
        .unwrap();
    assert_eq!(recorded(&db, &again).await, 0);
    assert_eq!(recorded(&db, &going_on).await, kept);
}

/// No export of a contract end ran here, so the table of returned keys was never created:
/// there is nothing to discard, which is no error, and no table is created.
async fn discarding_before_any_export_finds_nothing_to_do(url: String) {
    let (connector, db) = sample(&url).await;
    Connector::discard_bulk(&connector, "acme", "acme/ce-1/accounting")
        .await
        .unwrap();
    let exists: i64 = sqlx::query_scalar(db.backend.table_exists())
        .bind("dsrelay_erasure_receipts_returned")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}
