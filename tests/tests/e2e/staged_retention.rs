//! Data kept in stages, through real services: the example newsletter bills its paid
//! edition, and the law keeps a sale's invoice six years after its year and the sale's VAT
//! One-Stop Shop record ten. An erasure leaves the request PARTIALLY_COMPLETED, the
//! newsletter's task RETAINED until the invoice's date. The processor's clock is moved past
//! each date in turn: the task runs again by itself (the adapter sees a new task id naming
//! the date), is RETAINED until the OSS record's date, and then COMPLETED with nothing of the
//! subscriber left.

use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use dsrelay_example_adapter::retention::BillingKind;
use dsrelay_example_adapter::store::Store;
use dsrelay_proto::v1::{Request, RequestState, TaskState, TaskStatus};

use crate::harness::{count, erasure, in_state, spawn_pair, wait_until, Holder, PairOptions};

/// A seeded subscriber in Sweden: a sale to him is an OSS sale of the Finnish newsletter.
const ERIK: &str = "erik.lindqvist@example.se";

fn newsletter(r: &Request) -> TaskStatus {
    r.tasks
        .iter()
        .find(|t| t.subprocessor == crate::harness::NEWSLETTER)
        .cloned()
        .expect("newsletter task")
}

fn new_year(year: i32) -> i64 {
    Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0)
        .single()
        .expect("date")
        .timestamp_millis()
}

fn until(t: &TaskStatus) -> i64 {
    dsrelay_proto::millis_from_timestamp(t.retain_until.as_ref().expect("retain_until"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_kept_in_stages_is_erased_at_each_date() {
    let mut pair = spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let url = pair.adapter().database_url().to_string();

    // This year's sale (so that both dates lie ahead of the adapter's real clock), and an
    // invoice of 2015 whose period is over.
    let store = Store::open(&url).await.expect("the adapter's database");
    assert_eq!(store.add_deliveries(ERIK, 3).await.expect("deliveries"), 3);
    let booked = Utc::now();
    let bill = |kind, reference: &'static str, at: i64| {
        let store = store.clone();
        async move {
            store
                .add_billing_record(ERIK, kind, reference, 1290, at)
                .await
                .expect("billing record")
        }
    };
    bill(
        BillingKind::Invoice,
        "INV-2015-7",
        new_year(2015) + 86_400_000,
    )
    .await;
    let invoice = bill(BillingKind::Invoice, "INV-1", booked.timestamp_millis()).await;
    let oss = bill(BillingKind::OssSale, "INV-1", booked.timestamp_millis()).await;
    store.db().pool.close().await;
    // Vouchers are kept to the end of the sixth year after theirs, OSS records the tenth.
    let invoice_released = new_year(booked.year() + 7);
    let oss_released = new_year(booked.year() + 11);
    let billing = |ids: &str| format!("SELECT COUNT(*) FROM billing_records WHERE id IN ({ids})");

    let mut crm = pair.crm();
    let r = crm
        .submit(erasure(ERIK))
        .await
        .expect("submit")
        .into_inner();
    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::PartiallyCompleted),
    )
    .await;
    let t1 = newsletter(&view);
    assert_eq!(t1.state, TaskState::Retained as i32, "{t1:#?}");
    assert_eq!(until(&t1), invoice_released, "{t1:#?}");
    assert!(t1.legal_basis.contains("Kirjanpitolaki"), "{t1:#?}");
    assert!(t1.legal_basis.contains("2006/112/EC"), "{t1:#?}");
    // The subscriber and the 2015 invoice.
    assert_eq!(t1.evidence.clone().expect("evidence").records_affected, 2);
    // What no obligation keeps is gone at once: the subscriber, his deliveries, the 2015
    // invoice. This year's records are kept, no longer tied to a subscriber.
    assert_eq!(
        count(
            &url,
            &format!("SELECT COUNT(*) FROM subscribers WHERE email = '{ERIK}'")
        )
        .await,
        0
    );
    assert_eq!(count(&url, "SELECT COUNT(*) FROM deliveries").await, 0);
    assert_eq!(count(&url, "SELECT COUNT(*) FROM billing_records").await, 2);
    assert_eq!(count(&url, &billing(&format!("{invoice}, {oss}"))).await, 2);
    assert_eq!(
        count(
            &url,
            "SELECT COUNT(*) FROM billing_records WHERE subscriber_id IS NOT NULL"
        )
        .await,
        0
    );

    // Past the invoice's date (by the processor's clock; the adapter's is years behind) the
    // invoice goes and the OSS record is kept until its own date.
    let clock = pair.processor.clock().expect("an in-process processor");
    clock.advance(invoice_released - clock.now_ms() + 1000);
    let view = wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
        newsletter(v).sequence > t1.sequence
    })
    .await;
    let t2 = newsletter(&view);
    assert_eq!(t2.state, TaskState::Retained as i32, "{t2:#?}");
    assert_eq!(until(&t2), oss_released, "{t2:#?}");
    assert!(!t2.legal_basis.contains("Kirjanpitolaki"), "{t2:#?}");
    assert!(t2.legal_basis.contains("2006/112/EC"), "{t2:#?}");
    assert_eq!(view.state, RequestState::PartiallyCompleted as i32);
    assert_eq!(count(&url, &billing(&invoice.to_string())).await, 0);
    assert_eq!(count(&url, &billing(&oss.to_string())).await, 1);

    // Past the OSS record's date nothing is kept: the task and the request complete, with
    // nobody asking again.
    clock.advance(oss_released - clock.now_ms() + 1000);
    let done = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::Completed),
    )
    .await;
    let t3 = newsletter(&done);
    assert_eq!(t3.state, TaskState::Completed as i32, "{t3:#?}");
    let evidence = t3.evidence.expect("evidence");
    assert!(evidence.confirmed, "{evidence:?}");
    // Every run's records: the first two, the invoice, the OSS record.
    assert_eq!(evidence.records_affected, 4, "{evidence:?}");
    assert_eq!(count(&url, "SELECT COUNT(*) FROM billing_records").await, 0);
    assert_eq!(
        count(
            &url,
            &format!("SELECT COUNT(*) FROM subscribers WHERE email = '{ERIK}'")
        )
        .await,
        0
    );
    // The other seeded subscribers are untouched.
    assert_eq!(count(&url, "SELECT COUNT(*) FROM subscribers").await, 3);
    pair.stop().await;
}
