//! "We must keep this by law" is an answer, not a failure: the sample accounting database
//! keeps vouchers six years and books ten years after the end of the fiscal year, and open
//! invoices while they are open. The processor's clock is moved to show the rest is erased,
//! and acknowledged, without anyone asking again.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use dsrelay_proto::v1::{
    CancelRequest, ExtendDeadlineRequest, GetRequest, ListRequestsRequest, Request, RequestState,
    TaskState,
};
use tonic::Code;

use crate::harness::{count, erasure, spawn_pair, wait_until, PairOptions};

const MAIJA: &str = "maija.meikalainen@example.fi";

fn accounting(r: &Request) -> dsrelay_proto::v1::TaskStatus {
    r.tasks
        .iter()
        .find(|t| t.subprocessor == "accounting")
        .cloned()
        .expect("accounting task")
}

fn ms(y: i32, m: u32, d: u32) -> i64 {
    Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
        .single()
        .expect("date")
        .timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_data_is_erased_when_the_obligation_ends() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut crm = pair.crm();
    let url = pair.accounting_url.clone();
    let r = crm
        .submit(erasure(MAIJA))
        .await
        .expect("submit")
        .into_inner();

    let view = wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
        v.state == RequestState::PartiallyCompleted as i32
    })
    .await;
    let t = accounting(&view);
    assert_eq!(t.state, TaskState::Retained as i32, "{t:#?}");
    assert!(t.legal_basis.contains("Kirjanpitolaki"), "{t:#?}");
    let until = dsrelay_proto::millis_from_timestamp(&t.retain_until.expect("retain_until"));
    // Invoice 102 (2024) is the first to be released: six years after the end of 2024.
    assert_eq!(until, ms(2031, 1, 1), "{t:#?}");
    // What the obligation does not need is gone already: her contacts, the 2015 invoice, and
    // her e-mail on the invoices kept.
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM contacts WHERE customer_id = 1").await,
        0
    );
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM invoices WHERE id = 101").await,
        0
    );
    assert_eq!(
        count(
            &url,
            "SELECT COUNT(*) FROM invoices WHERE customer_id = 1 AND customer_email IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM invoices WHERE id IN (102, 103)").await,
        2
    );
    let first_records = t.evidence.clone().expect("evidence").records_affected;
    assert!(first_records > 0);

    // Past the vouchers' period, the paid invoice goes; the open one stays while it is open
    // and the 2024 ledger entry stays under the books' ten years.
    let clock = pair.processor.clock().expect("an in-process processor");
    clock.advance(until - clock.now_ms() + 1000);
    let view = wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
        accounting(v).sequence > t.sequence
    })
    .await;
    let t2 = accounting(&view);
    assert_eq!(t2.state, TaskState::Retained as i32, "{t2:#?}");
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM invoices WHERE id = 102").await,
        0
    );
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM invoices WHERE id = 103").await,
        1
    );
    assert!(t2.evidence.clone().expect("evidence").records_affected > first_records);

    // The open invoice is paid; ten years after 2024 the books are released too. Nobody asks
    // again: the processor wakes up at the dates it gave and finishes.
    let accounting_db = dsrelay_runtime::store::Db::connect(&url)
        .await
        .expect("connect");
    sqlx::query("UPDATE invoices SET status = 'paid' WHERE id = 103")
        .execute(&accounting_db.pool)
        .await
        .expect("pay the invoice");
    accounting_db.pool.close().await;
    clock.advance(ms(2035, 1, 2) - clock.now_ms());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let done = loop {
        let v = wait_until(&mut crm, &r.request_id, Duration::from_secs(5), |_| true).await;
        if v.state == RequestState::Completed as i32 {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{v:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let t3 = accounting(&done);
    assert_eq!(t3.state, TaskState::Completed as i32);
    assert!(t3.evidence.expect("evidence").confirmed);
    for table in ["invoices", "ledger_entries", "contacts"] {
        assert_eq!(
            count(
                &url,
                &format!("SELECT COUNT(*) FROM {table} WHERE customer_id = 1")
            )
            .await,
            0,
            "{table}"
        );
    }
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM customers WHERE id = 1").await,
        0
    );
    // Everyone else's books are intact.
    assert_eq!(count(&url, "SELECT COUNT(*) FROM customers").await, 5);
    pair.stop().await;
}

/// A PARTIALLY_COMPLETED request is answered: what is left is retained by law and erased by
/// its holders when the date passes. So, like COMPLETED, it is never overdue, even long past
/// its due date, and neither Cancel nor ExtendDeadline acts on it; each refusal names the
/// state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partially_completed_request_is_not_open() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut crm = pair.crm();
    let r = crm
        .submit(erasure(MAIJA))
        .await
        .expect("submit")
        .into_inner();
    wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
        v.state == RequestState::PartiallyCompleted as i32
    })
    .await;
    let registry = pair.registry.clock().expect("an in-process registry");
    let due = dsrelay_proto::millis_from_timestamp(&r.due_at.expect("due_at"));
    registry.advance(due - registry.now_ms() + 86_400_000);

    let mut operator = pair.operator();
    let view = operator
        .get(GetRequest {
            request_id: r.request_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(view.state, RequestState::PartiallyCompleted as i32);
    assert!(!view.overdue, "{view:#?}");
    let overdue = operator
        .list(ListRequestsRequest {
            overdue_only: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(overdue.requests.is_empty(), "{overdue:#?}");

    let refused = operator
        .extend_deadline(ExtendDeadlineRequest {
            request_id: r.request_id.clone(),
            months: 1,
            reason: "a large request".into(),
        })
        .await
        .expect_err("nothing to extend");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("is PARTIALLY_COMPLETED"),
        "{refused:?}"
    );
    let refused = crm
        .cancel(CancelRequest {
            request_id: r.request_id.clone(),
            reason: "changed her mind".into(),
        })
        .await
        .expect_err("nothing to cancel");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("is PARTIALLY_COMPLETED"),
        "{refused:?}"
    );
    let after = operator
        .get(GetRequest {
            request_id: r.request_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(after.due_at, view.due_at);
    assert!(after.extension_reasons.is_empty(), "{after:#?}");
    pair.stop().await;
}
