//! The certificate of a contract end whose erasure finished in a later call than the one that
//! began it, through the processor's real store and runner (SQLite, and PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server): its counts by table are the connector's for
//! the call that finished, so it says what an earlier call (failed, or cut off) erased as
//! far as its progress was recorded, rather than passing those counts off as the whole.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_connectors::sql::{create_sample_accounting_db, sample_config};
use dsrelay_connectors::{
    BoxFuture, BulkJob, BulkProgress, Connector, ConnectorConfig, ConnectorError, ErasedCount,
    Outcome, Task,
};
use dsrelay_proto::v1::{ContractEndChoice, TaskState};
use dsrelay_runtime::store::Db;
use serde_json::Value;
use tokio::sync::Notify;

use crate::contract_progress_tests::{cut_off_then_resumed, last_certificate};
use crate::contract_retry_tests::{acks, retry, step_now, with_contract_end};

/// Customers in the accounting database: one batch of the SQL connector's erasure (10,000)
/// and 100 more, each with a contact, an invoice and a ledger entry past their retention.
const CUSTOMERS: u64 = 10_100;

/// The customer whose deletion a trigger refuses: in the second batch.
const BLOCKED: u64 = 10_050;

/// The sample accounting database at `url`, its rows replaced by [`CUSTOMERS`] customers,
/// with a trigger refusing the deletion of [`BLOCKED`].
async fn accounting(url: &str) -> Db {
    create_sample_accounting_db(url).await.expect("sample");
    let db = Db::connect(url).await.expect("holder db");
    let statements = [
        "DELETE FROM ledger_entries".to_string(),
        "DELETE FROM invoices".to_string(),
        "DELETE FROM contacts".to_string(),
        "DELETE FROM customers".to_string(),
        format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {CUSTOMERS}) \
             INSERT INTO customers (id, customer_no, name) SELECT i, 'C-' || i, 'n' || i FROM n"
        ),
        "INSERT INTO contacts (id, customer_id, name) SELECT id, id, name FROM customers"
            .to_string(),
        "INSERT INTO invoices (id, customer_id, amount_cents, issued_on, status) \
         SELECT id, id, 100, '2010-01-05', 'paid' FROM customers"
            .to_string(),
        "INSERT INTO ledger_entries (id, customer_id, booked_on, account, amount_cents, \
         description) SELECT id, id, '2010-01-05', '1700', 100, 'invoice' FROM customers"
            .to_string(),
        format!(
            "CREATE TRIGGER on_hold BEFORE DELETE ON customers WHEN OLD.id = {BLOCKED} \
             BEGIN SELECT RAISE(ABORT, 'customer {BLOCKED} is on hold'); END"
        ),
    ];
    for s in &statements {
        sqlx::query(s).execute(&db.pool).await.expect(s);
    }
    db
}

/// `body`'s count of `action` in `target`, 0 when it lists none.
fn erased(body: &Value, target: &str, action: &str) -> i64 {
    (body["erased"].as_array().expect("erased").iter())
        .filter(|e| e["target"] == target && e["action"] == action)
        .map(|e| e["count"].as_i64().expect("count"))
        .sum()
}

/// The walkthrough's case: the SQL connector's erasure commits a batch, a trigger fails the
/// next for good, and after the trigger is dropped the operator's retry erases the rest. The
/// certificate counts every record erased (the failed call's recorded batch and the rest)
/// and says that the failed call's 40,000 records of 10,000 customers are not in the counts
/// by table, which are the last call's.
async fn a_retried_sql_erasure_certifies_what_the_failed_call_erased(
    url: &str,
    dir: &std::path::Path,
) {
    let holder_url = format!("sqlite://{}/accounting.db", dir.display());
    let holder_db = accounting(&holder_url).await;
    let config = ConnectorConfig::Sql(sample_config(&holder_url));
    let holder = dsrelay_connectors::build(&config).await.expect("connector");
    let id = "ce-sql";
    let app = with_contract_end(dir, url, holder, id, ContractEndChoice::Delete).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let failed = acks(&shared, id).await;
    let last = failed.last().expect("acks");
    assert_eq!(last.state(), TaskState::Failed, "{failed:#?}");
    assert!(last.reason.contains("on hold"), "{}", last.reason);
    let p = last.progress.expect("progress");
    assert_eq!(
        (p.subjects_done, p.records_done, p.records_total),
        (10_000, 40_000, 40_400),
        "{p:?}"
    );

    sqlx::query("DROP TRIGGER on_hold")
        .execute(&holder_db.pool)
        .await
        .expect("drop trigger");
    retry(&shared, id).await;
    assert_eq!(step_now(&shared).await, 1);
    let done = acks(&shared, id).await;
    assert_eq!(
        done.last().expect("acks").state(),
        TaskState::Completed,
        "{done:#?}"
    );
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM customers")
        .fetch_one(&holder_db.pool)
        .await
        .expect("count");
    assert_eq!(left, 0);

    let body = last_certificate(&shared, id).await;
    assert_eq!(body["task_state"], "COMPLETED", "{body}");
    assert_eq!(body["records_affected"], 40_400, "{body}");
    // What the call that finished counted by table: the last 100 customers' rows.
    assert_eq!(erased(&body, "customers", "deleted"), 100, "{body}");
    assert_eq!(erased(&body, "contacts", "deleted"), 100, "{body}");
    assert_eq!(erased(&body, "ledger_entries", "anonymized"), 100, "{body}");
    let uncounted = &body["uncounted"];
    assert_eq!(uncounted["earlier_records"], 40_000, "{body}");
    assert_eq!(uncounted["earlier_subjects"], 10_000, "{body}");
    // Nothing is missing from the totals: the failed call's last batch was recorded.
    assert_eq!(
        (&uncounted["records"], &uncounted["subjects"]),
        (&0.into(), &0.into())
    );
    let reason = uncounted["reason"].as_str().expect("reason");
    assert!(
        reason.contains("40000 record(s) of 10000 subject(s)") && reason.contains("by table"),
        "{reason}"
    );
    holder_db.close().await;
}

on_both!(a_retried_sql_erasure_certifies_what_the_failed_call_erased);

/// An erasure whose first call records 25 records of 10 subjects as erased and is then cut
/// off; the resumed call counts on from there (95 of the 100 records: 5 went after the
/// recorded progress) and answers with its own counts by table.
struct CutOffAfterProgress {
    calls: AtomicUsize,
    recorded: Notify,
}

impl Connector for CutOffAfterProgress {
    fn kind_name(&self) -> &'static str {
        "cut-off-after-progress"
    }

    fn supports(&self, _kind: dsrelay_proto::v1::RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("bulk only".into())) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                job.progress.report(BulkProgress {
                    subjects_done: 10,
                    subjects_total: 40,
                    records_done: 25,
                    records_total: 100,
                });
                // Long enough for the runner to record it (every 20 ms here).
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.recorded.notify_one();
                std::future::pending::<()>().await;
            }
            assert!(job.interrupted);
            let earlier = job.recorded_progress;
            let (subjects, records) = (earlier.subjects_done + 28, earlier.records_done + 70);
            job.progress.report(BulkProgress {
                subjects_done: subjects,
                subjects_total: subjects,
                records_done: records,
                records_total: records,
            });
            Ok(Outcome::Completed {
                records_affected: i64::try_from(records).expect("count"),
                note: "erased the rest".into(),
                files: Vec::new(),
                erased: vec![ErasedCount {
                    target: "customers".into(),
                    action: "deleted".into(),
                    count: 28,
                }],
            })
        })
    }
}

/// A cut-off erasure resumed: the certificate says what the cut-off call erased as far as
/// its progress was recorded (25 records of 10 subjects), which its counts by table leave
/// out, besides the 5 records its totals show went uncounted.
async fn a_resumed_cut_off_erasure_certifies_what_the_cut_off_call_erased(
    url: &str,
    dir: &std::path::Path,
) {
    let holder = Arc::new(CutOffAfterProgress {
        calls: AtomicUsize::new(0),
        recorded: Notify::new(),
    });
    let id = "ce-cut";
    let app = with_contract_end(dir, url, holder.clone(), id, ContractEndChoice::Delete).await;
    let shared = app.shared();
    cut_off_then_resumed(&shared, &holder.recorded).await;
    let done = acks(&shared, id).await;
    assert_eq!(
        done.last().expect("acks").state(),
        TaskState::Completed,
        "{done:#?}"
    );
    let body = last_certificate(&shared, id).await;
    assert_eq!(body["records_affected"], 95, "{body}");
    let uncounted = &body["uncounted"];
    assert_eq!(uncounted["earlier_records"], 25, "{body}");
    assert_eq!(uncounted["earlier_subjects"], 10, "{body}");
    assert_eq!(uncounted["records"], 5, "{body}");
    let reason = uncounted["reason"].as_str().expect("reason");
    assert!(reason.contains("25 record(s) of 10 subject(s)"), "{reason}");
}

on_both!(a_resumed_cut_off_erasure_certifies_what_the_cut_off_call_erased);
