//! A contract end task that failed for good, retried by the processor's operator once the
//! cause is fixed (`dsrctl tasks retry`, RetryTask), through the real registry and processor
//! binaries: the task resumes in the phase it failed in, the registry reopens the FAILED
//! contract end, and it reaches COMPLETED with the controller's data gone. Before, RetryTask
//! refused a contract end task, and the contract end stayed FAILED with the data in place.

use std::time::Duration;

use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::{Contract, ContractPhase, GetContractRequest, RequestState, TaskState};

use crate::harness::dsrctl::dsrctl;
use crate::harness::{count, spawn_pair, Holder, Mode, PairOptions, TestPair, CONTROLLER};

const NOTE: &str = "contacts table restored from the backup";

/// Runs `sql` on the SQLite database at `url`.
async fn execute(url: &str, sql: &str) {
    let db = dsrelay_runtime::store::Db::connect(url)
        .await
        .expect("connect");
    sqlx::query(sql).execute(&db.pool).await.expect(sql);
    db.pool.close().await;
}

async fn contract(pair: &TestPair, id: &str) -> Contract {
    ContractServiceClient::new(pair.channel_to_registry("operator"))
        .get_contract(GetContractRequest {
            contract_id: id.into(),
        })
        .await
        .expect("GetContract")
        .into_inner()
}

/// Polls the contract end until `done` holds, failing with its last view after `secs`.
async fn until(
    pair: &TestPair,
    id: &str,
    secs: u64,
    what: &str,
    done: impl Fn(&Contract) -> bool,
) -> Contract {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let c = contract(pair, id).await;
        if done(&c) {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached in {secs} s\n{c:#?}\n--- processor log ---\n{}",
            pair.processor.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state(c: &Contract) -> RequestState {
    RequestState::try_from(c.state).unwrap_or(RequestState::Unspecified)
}

/// The accounting task's state and phase.
fn accounting(c: &Contract) -> Option<(TaskState, ContractPhase)> {
    let t = c.tasks.iter().find(|t| t.subprocessor == "accounting")?;
    let phase = t.progress.as_ref().map_or(0, |p| p.phase);
    Some((
        TaskState::try_from(t.state).unwrap_or_default(),
        ContractPhase::try_from(phase).unwrap_or_default(),
    ))
}

/// A pair whose SQL holder keeps nothing under the Accounting Act (every customer goes at
/// the erasure, so the contract end is COMPLETED rather than PARTIALLY_COMPLETED) and has
/// lost its `contacts` table, which the export and the erasure both need: any contract end
/// fails there for good until [`restore`].
async fn broken_pair() -> TestPair {
    let pair = spawn_pair(PairOptions {
        mode: Mode::Processes,
        holders: vec![Holder::Accounting],
        ..Default::default()
    })
    .await
    .expect("pair");
    let books = &pair.accounting_url;
    execute(books, "DELETE FROM ledger_entries").await;
    execute(books, "DELETE FROM invoices").await;
    execute(books, "ALTER TABLE contacts RENAME TO contacts_moved").await;
    pair
}

/// Puts back the table [`broken_pair`] took away.
async fn restore(pair: &TestPair) {
    execute(
        &pair.accounting_url,
        "ALTER TABLE contacts_moved RENAME TO contacts",
    )
    .await;
}

/// The processor's address, as `dsrctl tasks --processor` takes it.
fn processor(pair: &TestPair) -> String {
    format!("https://localhost:{}", pair.processor.addr().port())
}

/// Ends the contract with the processor, effective now, with `choice` (as `dsrctl contracts
/// end --choice` spells it); the contract end's id.
async fn end_now(pair: &TestPair, choice: &str) -> String {
    let ended = dsrctl(
        pair,
        "operator",
        &[
            "contracts",
            "end",
            "--processor",
            crate::harness::PROCESSOR,
            "--choice",
            choice,
            "--now",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    ended["contract_id"]
        .as_str()
        .expect("contract id")
        .to_string()
}

/// `dsrctl tasks retry` of contract end `id`'s accounting task with [`NOTE`]; the task as
/// the processor answers.
async fn retry(pair: &TestPair, id: &str) -> serde_json::Value {
    dsrctl(
        pair,
        "operator",
        &[
            "--output",
            "json",
            "tasks",
            "retry",
            "--processor",
            &processor(pair),
            CONTROLLER,
            id,
            "accounting",
            "--note",
            NOTE,
        ],
    )
    .await
    .json()
}

/// DELETE, effective now, whose SQL holder lost a table it erases from: the erasure fails
/// for good (FAILED in DELETING, nothing erased, the contract end FAILED at the registry).
/// The table is restored, `dsrctl tasks list` says the task is retried, and `dsrctl tasks
/// retry` resumes the erasure: the contract end is open again, then COMPLETED, every
/// customer gone, and the registry's trail keeps who retried it and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_contract_end_erasure_is_retried_to_completion() {
    let pair = broken_pair().await;
    let books = &pair.accounting_url;
    let customers = "SELECT COUNT(*) FROM customers";
    assert_eq!(count(books, customers).await, 6);

    let id = end_now(&pair, "delete").await;
    let failed = until(&pair, &id, 60, "the erasure failed", |c| {
        state(c) == RequestState::Failed
    })
    .await;
    assert_eq!(
        accounting(&failed),
        Some((TaskState::Failed, ContractPhase::Deleting)),
        "{failed:#?}"
    );
    assert_eq!(count(books, customers).await, 6, "nothing erased");

    // The operator's list says a retry is taken.
    let listed = dsrctl(
        &pair,
        "operator",
        &[
            "--output",
            "json",
            "tasks",
            "list",
            "--processor",
            &processor(&pair),
            "--state",
            "failed",
        ],
    )
    .await
    .json();
    let task = &listed["tasks"][0];
    assert_eq!(task["request_id"], id.as_str(), "{listed:#}");
    assert_eq!(task["retryable"], true, "{listed:#}");
    assert_eq!(task["retry_refusal"], "", "{listed:#}");

    restore(&pair).await;
    let retried = retry(&pair, &id).await;
    assert_eq!(retried["state"], "IN_PROGRESS", "{retried}");
    assert_eq!(
        retried["reason"],
        format!("retried by spiffe://dsrelay.dev/operator/ops: {NOTE}"),
        "{retried}"
    );

    let done = until(&pair, &id, 60, "the contract end completed", |c| {
        state(c) == RequestState::Completed
    })
    .await;
    assert_eq!(
        accounting(&done),
        Some((TaskState::Completed, ContractPhase::Done)),
        "{done:#?}"
    );
    assert_eq!(count(books, customers).await, 0);
    assert_eq!(count(books, "SELECT COUNT(*) FROM contacts").await, 0);

    // The registry followed the retry: open again after FAILED, the operator's note kept.
    let registry_db = pair.registry.database_url();
    let reopened = format!(
        "SELECT COUNT(*) FROM events WHERE request_id = '{id}' AND request_state = {} \
         AND id > (SELECT MIN(id) FROM events WHERE request_id = '{id}' \
         AND request_state = {})",
        RequestState::InProgress as i32,
        RequestState::Failed as i32
    );
    assert!(count(registry_db, &reopened).await > 0);
    let noted = format!(
        "SELECT COUNT(*) FROM events WHERE request_id = '{id}' \
         AND message LIKE '%retried by spiffe://dsrelay.dev/operator/ops: {NOTE}%'"
    );
    assert!(count(registry_db, &noted).await > 0);
    pair.stop().await;
}

/// RETURN_THEN_DELETE whose export failed for good (a table it reads gone): the task is
/// FAILED in RETURNING and the package lists it as not returned. Once the table is back and
/// the task retried, the export runs again and its part reaches the package, which then
/// downloads whole and is confirmed, and the erasure completes the contract end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_contract_end_return_is_retried_into_the_package() {
    let pair = broken_pair().await;
    let id = end_now(&pair, "return-then-delete").await;
    let failed = until(&pair, &id, 60, "the return failed", |c| {
        state(c) == RequestState::Failed
    })
    .await;
    assert_eq!(
        accounting(&failed),
        Some((TaskState::Failed, ContractPhase::Returning)),
        "{failed:#?}"
    );
    let package = dsrctl(&pair, "operator", &["--output", "json", "package", &id])
        .await
        .json();
    let not_returned = format!("{}/accounting (FAILED)", crate::harness::PROCESSOR);
    assert_eq!(
        package["not_returned"],
        serde_json::json!([not_returned]),
        "{package:#}"
    );

    restore(&pair).await;
    let retried = retry(&pair, &id).await;
    assert_eq!(retried["state"], "IN_PROGRESS", "{retried}");
    let returned = until(&pair, &id, 60, "the part returned", |c| {
        accounting(c) == Some((TaskState::InProgress, ContractPhase::AwaitingConfirmation))
    })
    .await;
    assert_eq!(state(&returned), RequestState::InProgress, "{returned:#?}");

    let out = pair.dir().join("returned");
    let out = out.to_str().expect("path");
    dsrctl(&pair, "operator", &["download", &id, "--out", out])
        .await
        .ok();
    let exported = std::fs::read_to_string(
        pair.dir()
            .join("returned")
            .join(crate::harness::PROCESSOR)
            .join("accounting/customers.json"),
    )
    .expect("the accounting part's customers");
    assert!(exported.contains("customer_no"), "{exported}");
    dsrctl(
        &pair,
        "operator",
        &["contracts", "confirm", &id, "--package", out],
    )
    .await
    .ok();
    let done = until(&pair, &id, 60, "the contract end completed", |c| {
        state(c) == RequestState::Completed
    })
    .await;
    assert_eq!(
        accounting(&done),
        Some((TaskState::Completed, ContractPhase::Done)),
        "{done:#?}"
    );
    let customers = count(&pair.accounting_url, "SELECT COUNT(*) FROM customers").await;
    assert_eq!(customers, 0);
    pair.stop().await;
}
