//! The certificate of a contract end whose erasure finished in a later call than the one that
//! began it, through the processor's real store and runner (SQLite, and PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server): an earlier call's (failed, or cut off)
//! counts by table, recorded with its progress, are listed with the finishing call's; a
//! connector whose progress has none has that call's records named as not listed by table.
//! A contract end's certificate (version 2) states its terms and, after a return, the part
//! delivered and its confirmation as the store recorded them; an erasure's stays version 1.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_connectors::sql::{create_sample_accounting_db, sample_config};
use dsrelay_connectors::{
    BoxFuture, BulkJob, BulkOp, BulkProgress, Connector, ConnectorConfig, ConnectorError,
    ErasedCount, ExportedFile, Outcome, ProgressReporter, Task,
};
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    ContractEnd, ContractEndChoice, ContractPhase, DeliverRequest, RequestKind, TaskState,
};
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

/// `body` certifies the erasure of all of [`CUSTOMERS`]' rows, listed by table, and nothing
/// left out.
fn certifies_every_customer(body: &Value) {
    let all = i64::try_from(CUSTOMERS).expect("count");
    assert_eq!(body["records_affected"], 4 * all, "{body}");
    assert_eq!(erased(body, "customers", "deleted"), all, "{body}");
    assert_eq!(erased(body, "contacts", "deleted"), all, "{body}");
    assert_eq!(erased(body, "invoices", "deleted"), all, "{body}");
    assert_eq!(erased(body, "ledger_entries", "anonymized"), all, "{body}");
    let listed: i64 = (body["erased"].as_array().expect("erased").iter())
        .map(|e| e["count"].as_i64().expect("count"))
        .sum();
    assert_eq!(listed, 4 * all, "{body}");
    assert!(body.get("uncounted").is_none(), "{body}");
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
/// certificate lists by table every record erased, the failed call's recorded batch (40,000
/// records of 10,000 customers) and the rest, with no note of anything left out.
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
    certifies_every_customer(&body);
    holder_db.close().await;
}

on_both!(a_retried_sql_erasure_certifies_what_the_failed_call_erased);

/// The SQL connector, whose first erasure call is cut off once it has committed a batch and
/// the runner has recorded the progress reporting it: that call's holder future is no
/// longer polled (as a processor killed then), so its next batch never commits.
struct CutOffAfterABatch {
    sql: Arc<dyn Connector>,
    calls: AtomicUsize,
    recorded: Notify,
}

impl Connector for CutOffAfterABatch {
    fn kind_name(&self) -> &'static str {
        "sql"
    }

    fn supports(&self, kind: dsrelay_proto::v1::RequestKind) -> bool {
        self.sql.supports(kind)
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        self.sql.run(task)
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) > 0 {
                return self.sql.run_bulk(job).await;
            }
            let (reporter, mut seen) = ProgressReporter::new();
            let first = BulkJob {
                progress: reporter,
                ..job.clone()
            };
            let run = self.sql.run_bulk(&first);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    out = &mut run => return out,
                    Ok(()) = seen.changed() => {
                        let p = seen.borrow_and_update().clone();
                        job.progress.report(p.clone());
                        if p.records_done > 0 {
                            break;
                        }
                    }
                }
            }
            // Long enough for the runner to record it (every 20 ms here).
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.recorded.notify_one();
            std::future::pending().await
        })
    }
}

/// An SQL erasure cut off after its first batch (10,000 customers, 40,000 records) and
/// resumed: the resumed call erases the other 100 customers and the certificate lists by
/// table the cut-off call's recorded batch with them, with no note of anything left out.
async fn a_resumed_cut_off_sql_erasure_certifies_every_table(url: &str, dir: &std::path::Path) {
    let holder_url = format!("sqlite://{}/accounting.db", dir.display());
    let holder_db = accounting(&holder_url).await;
    sqlx::query("DROP TRIGGER on_hold")
        .execute(&holder_db.pool)
        .await
        .expect("drop trigger");
    let config = ConnectorConfig::Sql(sample_config(&holder_url));
    let holder = Arc::new(CutOffAfterABatch {
        sql: dsrelay_connectors::build(&config).await.expect("connector"),
        calls: AtomicUsize::new(0),
        recorded: Notify::new(),
    });
    let id = "ce-sql-cut";
    let app = with_contract_end(dir, url, holder.clone(), id, ContractEndChoice::Delete).await;
    let shared = app.shared();
    cut_off_then_resumed(&shared, &holder.recorded).await;
    assert_eq!(holder.calls.load(Ordering::SeqCst), 2);
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
    certifies_every_customer(&body);
    holder_db.close().await;
}

on_both!(a_resumed_cut_off_sql_erasure_certifies_every_table);

/// The walkthrough's case with retention: the even customers' invoices are open (kept while
/// so, their e-mail anonymized), so those customers stay, anonymized, through the cut-off
/// call's batch and after. The resumed call counts on to the customers and rows that
/// existed, never those the cut-off call anonymized again, and the certificate lists by
/// table what was erased or anonymized, with nothing left out.
async fn a_resumed_cut_off_sql_erasure_with_kept_rows_counts_what_existed(
    url: &str,
    dir: &std::path::Path,
) {
    let holder_url = format!("sqlite://{}/accounting.db", dir.display());
    let holder_db = accounting(&holder_url).await;
    for s in [
        "DROP TRIGGER on_hold",
        "UPDATE invoices SET status = 'open', customer_email = 'c' || customer_id || \
         '@example.com' WHERE customer_id % 2 = 0",
    ] {
        sqlx::query(s).execute(&holder_db.pool).await.expect(s);
    }
    let config = ConnectorConfig::Sql(sample_config(&holder_url));
    let holder = Arc::new(CutOffAfterABatch {
        sql: dsrelay_connectors::build(&config).await.expect("connector"),
        calls: AtomicUsize::new(0),
        recorded: Notify::new(),
    });
    let id = "ce-sql-kept";
    let app = with_contract_end(dir, url, holder.clone(), id, ContractEndChoice::Delete).await;
    let shared = app.shared();
    cut_off_then_resumed(&shared, &holder.recorded).await;
    assert_eq!(holder.calls.load(Ordering::SeqCst), 2);
    let done = acks(&shared, id).await;
    let last = done.last().expect("acks");
    assert_eq!(last.state(), TaskState::Retained, "{done:#?}");
    let p = last.progress.expect("progress");
    assert_eq!(
        (
            p.subjects_done,
            p.subjects_total,
            p.records_done,
            p.records_total
        ),
        (CUSTOMERS, CUSTOMERS, 4 * CUSTOMERS, 4 * CUSTOMERS),
        "{p:?}"
    );
    let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM customers WHERE name = '[erased]'")
        .fetch_one(&holder_db.pool)
        .await
        .expect("count");
    let half = i64::try_from(CUSTOMERS / 2).expect("count");
    assert_eq!(kept, half);

    let body = last_certificate(&shared, id).await;
    let all = i64::try_from(CUSTOMERS).expect("count");
    // Kept rows stripped of what the obligation does not need are listed, not counted.
    assert_eq!(body["records_affected"], 4 * all - 2 * half, "{body}");
    assert_eq!(erased(&body, "customers", "deleted"), half, "{body}");
    assert_eq!(
        erased(&body, "customers", "kept and stripped"),
        half,
        "{body}"
    );
    assert_eq!(erased(&body, "contacts", "deleted"), all, "{body}");
    assert_eq!(erased(&body, "invoices", "deleted"), half, "{body}");
    assert_eq!(
        erased(&body, "invoices", "kept and stripped"),
        half,
        "{body}"
    );
    assert_eq!(erased(&body, "ledger_entries", "anonymized"), all, "{body}");
    let listed: i64 = (body["erased"].as_array().expect("erased").iter())
        .map(|e| e["count"].as_i64().expect("count"))
        .sum();
    assert_eq!(listed, 4 * all, "{body}");
    assert!(body.get("uncounted").is_none(), "{body}");
    holder_db.close().await;
}

on_both!(a_resumed_cut_off_sql_erasure_with_kept_rows_counts_what_existed);

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
                    erased: Vec::new(),
                });
                // Long enough for the runner to record it (every 20 ms here).
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.recorded.notify_one();
                std::future::pending::<()>().await;
            }
            assert!(job.interrupted);
            let earlier = &job.recorded_progress;
            let (subjects, records) = (earlier.subjects_done + 28, earlier.records_done + 70);
            job.progress.report(BulkProgress {
                subjects_done: subjects,
                subjects_total: subjects,
                records_done: records,
                records_total: records,
                erased: Vec::new(),
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

/// A holder whose export answers `files` (written by the test) and whose erasure, or single
/// erasure, deletes 3 customers.
#[derive(Default)]
struct Returns {
    files: std::sync::Mutex<Vec<ExportedFile>>,
}

impl Returns {
    fn erased() -> Outcome {
        Outcome::Completed {
            records_affected: 3,
            note: "deleted 3 rows".into(),
            files: Vec::new(),
            erased: vec![ErasedCount {
                target: "customers".into(),
                action: "deleted".into(),
                count: 3,
            }],
        }
    }
}

impl Connector for Returns {
    fn kind_name(&self) -> &'static str {
        "returns"
    }

    fn supports(&self, _kind: dsrelay_proto::v1::RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Ok(Self::erased()) })
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            Ok(match job.op {
                BulkOp::Export => Outcome::Completed {
                    records_affected: 3,
                    note: "exported 3 rows".into(),
                    files: self.files.lock().expect("files").clone(),
                    erased: Vec::new(),
                },
                BulkOp::Erase => Self::erased(),
            })
        })
    }
}

/// Contract end `id` (RETURN_THEN_DELETE to the registry, its grace period ended at once)
/// with its export of two files run and delivered, as the uploader records a delivery: the
/// task awaits the controller's confirmation. The files, and when the delivery was recorded.
async fn returned_to_the_registry(
    shared: &Arc<crate::app::Shared>,
    holder: &Returns,
    id: &str,
) -> (Vec<ExportedFile>, i64) {
    let key = crate::contract_retry_tests::key(id);
    let files = vec![
        crate::upload_test_support::write_file(shared, &key, "customers.json", 120),
        crate::upload_test_support::write_file(shared, &key, "invoices.json", 30),
    ];
    *holder.files.lock().expect("files") = files.clone();
    assert_eq!(step_now(shared).await, 1);
    let mut jobs = (shared.store)
        .claim_uploads(shared.clock.now_ms(), 1, 60_000)
        .await
        .expect("claim");
    let job = jobs.pop().expect("the return's upload is queued");
    let task = shared
        .store
        .task(&key)
        .await
        .expect("task")
        .expect("a task");
    assert_eq!(task.phase, ContractPhase::Returning, "{task:?}");
    let now = shared.clock.now_ms();
    let event = crate::task_machine::Event::Delivered {
        to: crate::task_machine::Destination::Registry,
        files: 2,
        bytes: 150,
        receipt: None,
    };
    let crate::task_machine::Decision::Move(delivered) = crate::task_machine::decide(
        &task.current(),
        event,
        &crate::task_machine::Context::at(now),
    ) else {
        panic!("a delivered return moves the task");
    };
    let said = crate::store::Delivered {
        recipient: None,
        files: 2,
        bytes: 150,
    };
    (shared.store)
        .upload_finished(
            job.claim(),
            task.sequence,
            Some(&delivered),
            Some(&said),
            now,
            task.attempts,
        )
        .await
        .expect("delivered");
    let task = shared
        .store
        .task(&key)
        .await
        .expect("task")
        .expect("a task");
    assert_eq!(task.phase, ContractPhase::AwaitingConfirmation, "{task:?}");
    (files, now)
}

/// The SHA-256 of the canonical manifest of `id`'s part of `files`.
fn manifest(id: &str, files: &[ExportedFile]) -> String {
    let key = crate::contract_retry_tests::key(id);
    let headers: Vec<_> = (files.iter())
        .map(|f| crate::uploader::header(&key, f))
        .collect();
    dsrelay_runtime::transfer_manifest::sha256(id, "crm", &headers)
}

/// A return to the registry that the controller confirmed: the certificate of the erasure
/// that followed is version 2 and states the terms, the delivered part's manifest digest,
/// files, bytes and delivery time, and when the confirmation was recorded. Before, it was
/// version 1 and said none of it: only the evidence note did, which forgetting empties.
async fn a_confirmed_return_is_certified_with_its_part_and_confirmation(
    url: &str,
    dir: &std::path::Path,
) {
    let holder = Arc::new(Returns::default());
    let id = "ce-returned";
    let choice = ContractEndChoice::ReturnThenDelete;
    let app = with_contract_end(dir, url, holder.clone(), id, choice).await;
    let shared = app.shared();
    let (files, delivered_at) = returned_to_the_registry(&shared, &holder, id).await;
    shared.clock.advance(1_000);
    let confirmed_at = shared.clock.now_ms();
    let confirm = ContractEnd {
        choice: choice as i32,
        return_confirmed: true,
        ..Default::default()
    };
    (shared.store)
        .update_contract_end("acme", id, &confirm, None, confirmed_at)
        .await
        .expect("confirm");
    shared.clock.advance(1_000);
    assert_eq!(step_now(&shared).await, 1);
    let done = acks(&shared, id).await;
    assert_eq!(
        done.last().expect("acks").state(),
        TaskState::Completed,
        "{done:#?}"
    );
    let (terms, _) = (shared.store)
        .contract_terms_and_recipient("acme", id)
        .await
        .expect("terms")
        .expect("stored");

    let body = last_certificate(&shared, id).await;
    assert_eq!(body["version"], 2, "{body}");
    assert_eq!(body["kind"], "contract_end", "{body}");
    assert_eq!(erased(&body, "customers", "deleted"), 3, "{body}");
    let rfc3339 = crate::certificates::rfc3339;
    let expected = serde_json::json!({
        "choice": "RETURN_THEN_DELETE",
        "effective_at": rfc3339(terms.effective_at),
        "grace_ends_at": rfc3339(terms.grace_ends_at),
        "returned": {
            "to": "registry",
            "part": {
                "manifest_sha256": manifest(id, &files),
                "files": 2,
                "bytes": 150,
                "delivered_at": rfc3339(delivered_at),
            },
            "confirmation": {"state": "CONFIRMED", "at": rfc3339(confirmed_at)},
        },
    });
    assert_eq!(body["contract_end"], expected, "{body}");
}

/// A return never confirmed is erased at the grace end, and its certificate says so.
async fn an_unconfirmed_return_is_certified_as_released_by_the_grace_end(
    url: &str,
    dir: &std::path::Path,
) {
    let holder = Arc::new(Returns::default());
    let id = "ce-unconfirmed";
    let choice = ContractEndChoice::ReturnThenDelete;
    let app = with_contract_end(dir, url, holder.clone(), id, choice).await;
    let shared = app.shared();
    let (files, _) = returned_to_the_registry(&shared, &holder, id).await;
    assert_eq!(step_now(&shared).await, 1);
    let (terms, _) = (shared.store)
        .contract_terms_and_recipient("acme", id)
        .await
        .expect("terms")
        .expect("stored");
    let body = last_certificate(&shared, id).await;
    assert_eq!(body["version"], 2, "{body}");
    let returned = &body["contract_end"]["returned"];
    assert_eq!(returned["part"]["manifest_sha256"], manifest(id, &files));
    let grace_end = crate::certificates::rfc3339(terms.grace_ends_at);
    assert_eq!(
        returned["confirmation"],
        serde_json::json!({"state": "GRACE_PERIOD_ENDED", "at": grace_end}),
        "{body}"
    );
}

/// A DELETE's certificate states its terms and nothing returned.
async fn a_delete_is_certified_with_its_terms_only(url: &str, dir: &std::path::Path) {
    let holder = Arc::new(Returns::default());
    let id = "ce-delete";
    let app = with_contract_end(dir, url, holder, id, ContractEndChoice::Delete).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let body = last_certificate(&shared, id).await;
    assert_eq!(body["version"], 2, "{body}");
    let end = body["contract_end"].as_object().expect("contract_end");
    assert_eq!(end["choice"], "DELETE", "{body}");
    assert!(!end.contains_key("returned"), "{body}");
}

/// An erasure's certificate through the same store is as before: version 1, the keys it
/// always had, no contract end.
async fn an_erasure_certificate_stays_version_1(url: &str, dir: &std::path::Path) {
    let holder = Arc::new(Returns::default());
    let id = "ce-delete";
    let app = with_contract_end(dir, url, holder, id, ContractEndChoice::Delete).await;
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-erasure".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    // The contract end's task runs too: its certificate is issued beside the erasure's.
    assert_eq!(step_now(&shared).await, 2);
    let body = last_certificate(&shared, "r-erasure").await;
    let keys: Vec<&str> = (body.as_object().expect("object").keys())
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "certificate_id",
            "completed_at",
            "controller",
            "erased",
            "issued_at",
            "kind",
            "processor",
            "records_affected",
            "request_id",
            "retained",
            "subprocessor",
            "task_state",
            "version",
        ],
        "{body}"
    );
    assert_eq!(body["version"], 1, "{body}");
    assert_eq!(body["kind"], "erasure", "{body}");
    assert_eq!(last_certificate(&shared, id).await["version"], 2);
}

on_both!(
    a_confirmed_return_is_certified_with_its_part_and_confirmation,
    an_unconfirmed_return_is_certified_as_released_by_the_grace_end,
    a_delete_is_certified_with_its_terms_only,
    an_erasure_certificate_stays_version_1,
);
