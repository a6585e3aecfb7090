//! Contract ends through the real registry and the real processor, end to end: an operator
//! ends a contract with `dsrctl contracts`, the registry delivers it, the processor runs each
//! subprocessor's bulk step over all of that controller's data (the SQL connector on the
//! sample accounting database, the example adapter, a no-op holder), and the registry shows
//! the outcome, the progress and the signed certificates. The processor serves a second
//! controller whose data sits at the same holders and must come through untouched.

use std::time::Duration;

use dsrelay_proto::v1::certificate_service_client::CertificateServiceClient;
use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::{
    CompleteManualTaskRequest, Contract, ContractPhase, GetContractRequest,
    ListCertificatesRequest, RefuseManualTaskRequest, RequestState, TaskRef, TaskState,
};
use dsrelay_runtime::signing::PublicKey;

use crate::harness::dsrctl::dsrctl;
use crate::harness::{
    spawn_pair, Backend, Holder, PairOptions, RecipientOptions, TestPair, CONTROLLER, NEWSLETTER,
    OTHER_CONTROLLER, PROCESSOR, RECIPIENT,
};
use crate::metrics::{scrape, value};

/// Every row of the sample accounting database, table by table, in a fixed order: what
/// "untouched" is compared on.
async fn dump(url: &str) -> Vec<String> {
    let db = dsrelay_runtime::store::Db::connect(url)
        .await
        .expect("connect");
    let mut rows = Vec::new();
    let tables: [(&str, &[&str]); 4] = [
        (
            "customers",
            &[
                "customer_no",
                "name",
                "COALESCE(email, '')",
                "COALESCE(phone, '')",
                "COALESCE(national_id, '')",
                "COALESCE(address, '')",
            ],
        ),
        (
            "invoices",
            &[
                "CAST(COALESCE(customer_id, -1) AS TEXT)",
                "COALESCE(customer_name, '')",
                "COALESCE(customer_email, '')",
                "CAST(amount_cents AS TEXT)",
                "issued_on",
                "status",
            ],
        ),
        (
            "contacts",
            &["CAST(customer_id AS TEXT)", "name", "COALESCE(email, '')"],
        ),
        (
            "ledger_entries",
            &[
                "CAST(COALESCE(customer_id, -1) AS TEXT)",
                "booked_on",
                "description",
            ],
        ),
    ];
    for (table, columns) in tables {
        let found: Vec<(i64, String)> = sqlx::query_as(&format!(
            "SELECT id, {} FROM {table} ORDER BY id",
            columns.join(" || '|' || ")
        ))
        .fetch_all(&db.pool)
        .await
        .expect("dump");
        rows.extend(
            found
                .into_iter()
                .map(|(id, r)| format!("{table}#{id}: {r}")),
        );
    }
    db.pool.close().await;
    rows
}

async fn customers(url: &str) -> i64 {
    crate::harness::count(url, "SELECT COUNT(*) FROM customers").await
}

fn contracts(pair: &TestPair) -> ContractServiceClient<tonic::transport::Channel> {
    ContractServiceClient::new(pair.channel_to_registry("operator"))
}

async fn contract(pair: &TestPair, id: &str) -> Contract {
    contracts(pair)
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

fn phases(c: &Contract) -> Vec<(String, ContractPhase)> {
    c.tasks
        .iter()
        .map(|t| {
            let phase = t
                .progress
                .as_ref()
                .and_then(|p| ContractPhase::try_from(p.phase).ok())
                .unwrap_or(ContractPhase::Unspecified);
            (t.subprocessor.clone(), phase)
        })
        .collect()
}

/// Ends the contract with `choice` (a dsrctl choice), effective now; returns its id.
async fn end_contract(pair: &TestPair, choice: &str) -> String {
    let ended = dsrctl(
        pair,
        "operator",
        &[
            "contracts",
            "end",
            "--processor",
            PROCESSOR,
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

/// The certificates of the contract end: each verified by the registry, of kind
/// `contract_end`, for this controller; verified here once more with the processor's public
/// key.
async fn check_certificates(pair: &TestPair, id: &str, subprocessors: &[&str]) {
    let list = CertificateServiceClient::new(pair.channel_to_registry("operator"))
        .list_certificates(ListCertificatesRequest {
            request_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("certificates")
        .into_inner()
        .certificates;
    let key = PublicKey::from_config(
        pair.pki()
            .signing_public_key("processor")
            .to_str()
            .expect("path"),
    )
    .expect("public key");
    let mut certified: Vec<&str> = Vec::new();
    for stored in &list {
        assert!(stored.verified, "{stored:?}");
        let cert = stored.certificate.as_ref().expect("certificate");
        let body: serde_json::Value = serde_json::from_slice(&cert.body).expect("json body");
        assert_eq!(body["kind"], "contract_end", "{body}");
        assert_eq!(body["controller"], CONTROLLER, "{body}");
        assert_eq!(body["request_id"], id, "{body}");
        let signed = dsrelay_runtime::signing::Signed {
            body: cert.body.clone(),
            signature: cert.signature.clone(),
            key_id: cert.key_id.clone(),
        };
        key.verify(&signed).expect("the processor's signature");
        certified.push(stored.subprocessor.as_str());
    }
    certified.sort();
    certified.dedup();
    assert_eq!(certified, subprocessors, "{list:#?}");
}

/// DELETE, effective now: every holder erases all of the controller's data in bulk; what
/// the Accounting Act keeps is RETAINED with its basis and date; the second controller's
/// books and newsletter subscribers come through byte for byte.
async fn delete_now(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![
            Holder::Accounting,
            Holder::MailMarketing,
            Holder::Newsletter,
        ],
        second_controller: true,
        scope_holders: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let other_before = dump(&pair.other_accounting_url).await;
    assert_eq!(customers(&pair.accounting_url).await, 6);

    let id = end_contract(&pair, "delete").await;
    let done = until(&pair, &id, 60, "every task final", |c| {
        !c.tasks.is_empty()
            && c.tasks.iter().all(|t| {
                matches!(
                    TaskState::try_from(t.state),
                    Ok(TaskState::Completed | TaskState::Retained)
                )
            })
    })
    .await;
    // The sample books keep vouchers and entries inside their periods, and open invoices.
    assert_eq!(state(&done), RequestState::PartiallyCompleted, "{done:#?}");
    for t in &done.tasks {
        let phase = t.progress.as_ref().map(|p| p.phase);
        assert_eq!(phase, Some(ContractPhase::Done as i32), "{t:?}");
        match t.subprocessor.as_str() {
            "accounting" => {
                assert_eq!(t.state, TaskState::Retained as i32, "{t:?}");
                assert!(t.legal_basis.contains("Kirjanpitolaki"), "{t:?}");
                assert!(t.retain_until.is_some(), "{t:?}");
                let p = t.progress.as_ref().expect("progress");
                assert_eq!(p.subjects_total, 6, "{p:?}");
            }
            _ => assert_eq!(t.state, TaskState::Completed as i32, "{t:?}"),
        }
    }
    // Only the customers whose books are still kept remain, and none of them is findable by
    // anything but the controller's own database.
    let left = customers(&pair.accounting_url).await;
    assert!((1..6).contains(&left), "{left} customers left");
    assert_eq!(
        crate::harness::count(&pair.accounting_url, "SELECT COUNT(*) FROM contacts").await,
        0
    );
    assert_eq!(
        dump(&pair.other_accounting_url).await,
        other_before,
        "the other controller's books changed"
    );
    check_certificates(&pair, &id, &["accounting", "mail-marketing", "newsletter"]).await;

    // The operator's views say the same.
    let shown = dsrctl(&pair, "operator", &["contracts", "show", &id]).await;
    let text = shown.ok();
    assert!(
        text.contains("accounting") && text.contains("RETAINED"),
        "{text}"
    );
    let scheduled = dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "scheduled",
            "--processor",
            &format!("https://localhost:{}", pair.processor.addr().port()),
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let text = scheduled.to_string();
    assert!(text.contains(&id), "{text}");
    assert!(!text.contains(OTHER_CONTROLLER), "{text}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_end_delete_now_leaves_the_other_controller_s_data_sqlite() {
    delete_now(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_end_delete_now_leaves_the_other_controller_s_data_postgres() {
    delete_now(Backend::Postgres).await;
}

/// The processor's operator completes the paper archive's task of the contract end `id`.
async fn complete_by_hand(pair: &TestPair, id: &str, note: &str) {
    pair.processor_operator()
        .complete_manual_task(CompleteManualTaskRequest {
            task: Some(TaskRef {
                controller: CONTROLLER.into(),
                request_id: id.into(),
                subprocessor: "paper-archive".into(),
            }),
            not_found: false,
            records_affected: 3,
            evidence_note: note.into(),
        })
        .await
        .expect("CompleteManualTask");
}

/// After the return is confirmed: waits for the paper archive's deletion, which is by hand
/// too, has its operator complete it, and waits for the contract end to finish.
async fn delete_by_hand_then_finish(pair: &TestPair, id: &str, note: &str) -> Contract {
    until(
        pair,
        id,
        60,
        "the paper archive's deletion waits for its operator",
        |c| {
            waits_for_an_operator(c)
                && c.tasks.iter().any(|t| {
                    t.subprocessor == "paper-archive"
                        && t.progress.as_ref().map(|p| p.phase)
                            == Some(ContractPhase::Deleting as i32)
                })
        },
    )
    .await;
    complete_by_hand(pair, id, note).await;
    let done = until(pair, id, 60, "deleted after confirmation", |c| {
        matches!(
            state(c),
            RequestState::Completed | RequestState::PartiallyCompleted
        )
    })
    .await;
    // The operator's confirmed count is the deletion's progress, as on its certificate.
    let paper = (done.tasks.iter())
        .find(|t| t.subprocessor == "paper-archive")
        .expect("paper-archive's task");
    let p = paper.progress.as_ref().expect("progress");
    assert_eq!((p.records_done, p.records_total), (3, 3), "{paper:?}");
    let shown = dsrctl(pair, "operator", &["contracts", "show", id]).await;
    assert!(shown.ok().contains("3/3 handled"), "{}", shown.stdout);
    done
}

fn waits_for_an_operator(c: &Contract) -> bool {
    c.tasks.iter().any(|t| {
        t.subprocessor == "paper-archive" && t.state == TaskState::WaitingForOperator as i32
    })
}

/// RETURN_THEN_DELETE: the whole data set comes back as a package the operator downloads and
/// verifies (the paper archive's part is the record of the folders handed back by hand);
/// nothing is deleted until the operator confirms that package; then it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_end_returns_the_data_and_deletes_only_after_confirmation() {
    let mut pair = spawn_pair(PairOptions {
        holders: vec![
            Holder::Accounting,
            Holder::MailMarketing,
            Holder::PaperArchive,
            Holder::Newsletter,
        ],
        admin: true,
        // Only the sweep at start: what the erasure must remove itself is not removed by
        // the forget worker first.
        processor_forget_sweep_ms: Some(3_600_000),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let before = dump(&pair.accounting_url).await;
    // The newsletter's subscribers go through the adapter, whose export and erasure are two
    // bulk jobs under two keys.
    let newsletter = dsrelay_example_adapter::store::Store::open(pair.adapter().database_url())
        .await
        .expect("the adapter's database");
    let subscribers = newsletter.subscribers().await.expect("subscribers").len();
    assert!(subscribers > 0, "the adapter's seed has subscribers");
    let id = end_contract(&pair, "return-then-delete").await;
    until(
        &pair,
        &id,
        60,
        "the paper archive waits for its operator",
        waits_for_an_operator,
    )
    .await;
    complete_by_hand(
        &pair,
        &id,
        "handed the customer folders back to the controller",
    )
    .await;
    let waiting = until(&pair, &id, 60, "every part returned", |c| {
        !c.tasks.is_empty()
            && phases(c)
                .iter()
                .all(|(_, p)| *p == ContractPhase::AwaitingConfirmation)
    })
    .await;
    for t in &waiting.tasks {
        assert_eq!(t.state, TaskState::InProgress as i32, "{t:?}");
    }
    // Returned, not deleted: the state is a promise.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dump(&pair.accounting_url).await, before);
    assert_eq!(
        newsletter.subscribers().await.expect("subscribers").len(),
        subscribers
    );

    let out = pair.dir().join("returned");
    let run = dsrctl(
        &pair,
        "operator",
        &["download", &id, "--out", out.to_str().expect("path")],
    )
    .await;
    run.ok();
    let listing = walk(&out);
    let customers_json = std::fs::read_to_string(
        out.join(PROCESSOR)
            .join("accounting")
            .join("customers.json"),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{PROCESSOR}/accounting/customers.json: {e}\n{}\n{listing:?}",
            run.stdout
        )
    });
    for name in ["C-1001", "C-1002", "C-1006"] {
        assert!(customers_json.contains(name), "{name} in {customers_json}");
    }
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            out.join(PROCESSOR)
                .join("paper-archive")
                .join("returned-by-hand.json"),
        )
        .unwrap_or_else(|e| panic!("the paper archive's record: {e}\n{listing:?}")),
    )
    .expect("json record");
    // The accounting connector's export went to the registry while it was written (the
    // mail-marketing part is empty for this controller).
    let metrics = scrape(&pair.processor.admin_addr().expect("admin").to_string()).await;
    {
        let sub = "accounting";
        let written: u64 = std::fs::read_dir(out.join(PROCESSOR).join(sub))
            .unwrap_or_else(|e| panic!("{sub}: {e}\n{listing:?}"))
            .map(|f| f.expect("entry").metadata().expect("metadata").len())
            .sum();
        assert!(written > 0, "{sub} returned nothing: {listing:?}");
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
    assert_eq!(record["returned_by_hand"], true, "{record}");
    assert_eq!(record["records"], 3, "{record}");
    assert_eq!(
        record["note"], "handed the customer folders back to the controller",
        "{record}"
    );
    // The returned export's copy as a crash right after its delivery was recorded leaves it
    // (the uploader removed it once delivered): the erasure removes it before it runs, so
    // no certificate says the data gone while a copy stays at the processor.
    let exported = pair.export_dir(&id, "accounting");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while exported.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a delivered export stayed: {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::create_dir_all(&exported).expect("export folder");
    std::fs::write(exported.join("customers.json"), br#"[{"name":"C-1001"}]"#).expect("file");
    dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "confirm",
            &id,
            "--package",
            out.to_str().expect("path"),
        ],
    )
    .await
    .ok();
    let done =
        delete_by_hand_then_finish(&pair, &id, "shredded the copies kept in cabinet B2").await;
    assert_eq!(state(&done), RequestState::PartiallyCompleted, "{done:#?}");
    assert!(
        !exported.exists(),
        "the returned export's copy outlived the erasure: {exported:?}"
    );
    assert!(customers(&pair.accounting_url).await < 6);
    assert!(
        out.join(PROCESSOR).join(NEWSLETTER).is_dir(),
        "the newsletter's part was returned: {listing:?}"
    );
    let newsletter_task = done.tasks.iter().find(|t| t.subprocessor == NEWSLETTER);
    assert_eq!(
        newsletter_task.map(|t| t.state),
        Some(TaskState::Completed as i32),
        "{done:#?}"
    );
    assert_eq!(
        newsletter.subscribers().await.expect("subscribers").len(),
        0,
        "the newsletter's subscribers are erased after the confirmation"
    );
    pair.stop().await;
}

/// RETURN_THEN_DELETE where one holder's return ends without its part (its operator refuses
/// it): the package holds the other parts and can be downloaded, but ConfirmReturn is refused
/// naming that holder, since its data was neither returned nor deleted; nothing is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_that_ended_without_its_part_cannot_be_confirmed() {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting, Holder::PaperArchive],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let before = dump(&pair.accounting_url).await;
    let id = end_contract(&pair, "return-then-delete").await;
    until(
        &pair,
        &id,
        60,
        "the paper archive waits for its operator",
        waits_for_an_operator,
    )
    .await;
    pair.processor_operator()
        .refuse_manual_task(RefuseManualTaskRequest {
            task: Some(TaskRef {
                controller: CONTROLLER.into(),
                request_id: id.clone(),
                subprocessor: "paper-archive".into(),
            }),
            reason: "the archive room is sealed by the fire brigade".into(),
        })
        .await
        .expect("RefuseManualTask");
    until(
        &pair,
        &id,
        60,
        "accounting returned, the archive's return refused",
        |c| {
            c.tasks.iter().any(|t| {
                t.subprocessor == "accounting"
                    && t.progress.as_ref().map(|p| p.phase)
                        == Some(ContractPhase::AwaitingConfirmation as i32)
            }) && c.tasks.iter().any(|t| {
                t.subprocessor == "paper-archive"
                    && (t.state == TaskState::Refused as i32 || t.state == TaskState::Failed as i32)
            })
        },
    )
    .await;
    let out = pair.dir().join("returned");
    dsrctl(
        &pair,
        "operator",
        &["download", &id, "--out", out.to_str().expect("path")],
    )
    .await
    .ok();
    let confirm = dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "confirm",
            &id,
            "--package",
            out.to_str().expect("path"),
        ],
    )
    .await;
    confirm.expect_code(2);
    assert!(
        confirm.stderr.contains("FAILED_PRECONDITION")
            && confirm
                .stderr
                .contains(&format!("{PROCESSOR}/paper-archive (REFUSED)")),
        "{}",
        confirm.stderr
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dump(&pair.accounting_url).await, before);
    pair.stop().await;
}

/// No choice: the data is kept until the grace period ends, shown as scheduled at both
/// services; then the processor deletes it without anyone asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_end_without_a_choice_deletes_when_the_grace_period_ends() {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting, Holder::MailMarketing],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let before = dump(&pair.accounting_url).await;
    let id = end_contract(&pair, "none").await;
    let scheduled = until(&pair, &id, 30, "both tasks scheduled", |c| {
        c.tasks.len() == 2
            && phases(c)
                .iter()
                .all(|(_, p)| *p == ContractPhase::Scheduled)
    })
    .await;
    let grace_ends = scheduled
        .contract_end
        .as_ref()
        .and_then(|t| t.grace_ends_at)
        .map(|t| dsrelay_proto::millis_from_timestamp(&t))
        .expect("grace_ends_at");
    for t in &scheduled.tasks {
        let at = t
            .progress
            .as_ref()
            .and_then(|p| p.scheduled_at)
            .map(|t| dsrelay_proto::millis_from_timestamp(&t));
        assert_eq!(at, Some(grace_ends), "{t:?}");
    }
    let now = pair.processor.clock().expect("processor clock").now_ms();
    let months = (grace_ends - now) as f64 / (30.44 * 86_400_000.0);
    assert!((5.9..6.1).contains(&months), "{months} months of grace");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dump(&pair.accounting_url).await, before);

    // The grace period passes at the processor.
    pair.processor
        .clock()
        .expect("processor clock")
        .advance(grace_ends - now + 1000);
    let done = until(
        &pair,
        &id,
        60,
        "deleted at the end of the grace period",
        |c| {
            matches!(
                state(c),
                RequestState::Completed | RequestState::PartiallyCompleted
            )
        },
    )
    .await;
    assert!(
        done.tasks
            .iter()
            .all(|t| t.progress.as_ref().map(|p| p.phase) == Some(ContractPhase::Done as i32)),
        "{done:#?}"
    );
    assert!(customers(&pair.accounting_url).await < 6);
    pair.stop().await;
}

/// Every file under `dir`, relative to it.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap_or(&p).display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// RETURN_THEN_DELETE to a transfer recipient (the controller's successor): the accounting
/// holder's export, and the record of the paper archive's return done by hand, go straight to
/// the example recipient, whose receipts come back with the tasks; nothing is deleted until the controller confirms, without a digest (the receipts
/// are the proof), and then it is. A recipient that is not configured, or one named with
/// DELETE, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_end_cetransfer_returns_the_data_to_a_recipient() {
    use dsrelay_proto::v1::{ConfirmReturnRequest, ContractEndChoice, EndContractRequest};
    use sha2::{Digest, Sha256};

    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting, Holder::PaperArchive],
        recipient: Some(RecipientOptions::default()),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let refused = |r: Result<tonic::Response<Contract>, tonic::Status>, needle: &str| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains(needle), "{needle:?} in {s:?}");
    };
    let end = |choice: ContractEndChoice, recipient: &str| EndContractRequest {
        processor: PROCESSOR.into(),
        choice: choice as i32,
        effective_now: true,
        idempotency_key: format!("refused-{recipient}-{}", choice as i32),
        transfer_recipient: recipient.into(),
        ..Default::default()
    };
    let mut ops = contracts(&pair);
    refused(
        ops.end_contract(end(ContractEndChoice::ReturnThenDelete, "stranger"))
            .await,
        RECIPIENT,
    );
    refused(
        ops.end_contract(end(ContractEndChoice::Delete, RECIPIENT))
            .await,
        "RETURN_THEN_DELETE",
    );

    let before = dump(&pair.accounting_url).await;
    let ended = dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "end",
            "--processor",
            PROCESSOR,
            "--choice",
            "return-then-delete",
            "--transfer-recipient",
            RECIPIENT,
            "--now",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(ended["transfer_recipient"], RECIPIENT, "{ended}");
    let id = ended["contract_id"].as_str().expect("id").to_string();
    until(
        &pair,
        &id,
        60,
        "the paper archive waits for its operator",
        waits_for_an_operator,
    )
    .await;
    complete_by_hand(&pair, &id, "handed the folders to the new bookkeeper").await;
    let waiting = until(&pair, &id, 60, "returned to the recipient", |c| {
        !c.tasks.is_empty()
            && phases(c)
                .iter()
                .all(|(_, p)| *p == ContractPhase::AwaitingConfirmation)
    })
    .await;
    for t in &waiting.tasks {
        assert_eq!(t.state, TaskState::InProgress as i32, "{t:?}");
        let r = t
            .evidence
            .as_ref()
            .and_then(|e| e.transfer_receipt.as_ref());
        assert_eq!(
            r.map(|r| r.subprocessor.as_str()),
            Some(t.subprocessor.as_str())
        );
    }
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            pair.received_from_processor()
                .join(&id)
                .join("paper-archive")
                .join("returned-by-hand.json"),
        )
        .expect("the paper archive's record at the recipient"),
    )
    .expect("json record");
    assert_eq!(record["returned_by_hand"], true, "{record}");
    let task = waiting
        .tasks
        .iter()
        .find(|t| t.subprocessor == "accounting")
        .expect("accounting task");
    let receipt = task
        .evidence
        .as_ref()
        .and_then(|e| e.transfer_receipt.clone())
        .expect("the recipient's receipt");
    assert_eq!(receipt.recipient, RECIPIENT);
    assert_eq!(receipt.request_id, id);
    // The files are at the recipient, and its own record of the part is the receipt's.
    let folder = pair.received_from_processor().join(&id).join("accounting");
    let customers_json = std::fs::read_to_string(folder.join("customers.json"))
        .unwrap_or_else(|e| panic!("customers.json at the recipient: {e}"));
    for name in ["C-1001", "C-1002", "C-1006"] {
        assert!(customers_json.contains(name), "{name} in {customers_json}");
    }
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join(".receipt.json")).expect("receipt"))
            .expect("json");
    assert_eq!(written["manifest_sha256"], receipt.manifest_sha256.as_str());
    let stored: u64 = std::fs::read_dir(&folder)
        .expect("folder")
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.metadata().expect("metadata").len())
        .sum();
    assert_eq!(stored, receipt.bytes);
    // Returned, not deleted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dump(&pair.accounting_url).await, before);
    let shown = dsrctl(&pair, "operator", &["contracts", "show", &id]).await;
    assert!(
        shown.ok().contains(&receipt.manifest_sha256),
        "{}",
        shown.stdout
    );

    // A package digest is no proof here.
    let digest = hex::encode(Sha256::digest(b"{}"));
    refused(
        ops.confirm_return(ConfirmReturnRequest {
            contract_id: id.clone(),
            manifest_sha256: digest,
        })
        .await,
        "receipts",
    );
    dsrctl(&pair, "operator", &["contracts", "confirm", &id])
        .await
        .ok();
    let done = delete_by_hand_then_finish(&pair, &id, "shredded the copies").await;
    assert!(done.contract_end.expect("terms").return_confirmed);
    assert!(customers(&pair.accounting_url).await < 6);
    pair.stop().await;
}

/// RETURN_THEN_DELETE where a customer reaches the accounting database after its export:
/// the erasure the confirmation releases finds more than was returned, erases nothing
/// there, and its task FAILS (never COMPLETED) with a reason the operator reads, saying how
/// many records arrived and what can be done; every row stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_end_erases_nothing_that_arrived_after_the_return() {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let id = end_contract(&pair, "return-then-delete").await;
    until(&pair, &id, 60, "every part returned", |c| {
        !c.tasks.is_empty()
            && phases(c)
                .iter()
                .all(|(_, p)| *p == ContractPhase::AwaitingConfirmation)
    })
    .await;
    let db = dsrelay_runtime::store::Db::connect(&pair.accounting_url)
        .await
        .expect("connect");
    sqlx::query(
        "INSERT INTO customers (id, customer_no, name, email) \
         VALUES (9001, 'C-9001', 'Uusi Asiakas', 'uusi.asiakas@example.fi')",
    )
    .execute(&db.pool)
    .await
    .expect("a customer after the export");
    db.pool.close().await;
    let before = dump(&pair.accounting_url).await;

    let out = pair.dir().join("returned");
    dsrctl(
        &pair,
        "operator",
        &["download", &id, "--out", out.to_str().expect("path")],
    )
    .await
    .ok();
    dsrctl(
        &pair,
        "operator",
        &[
            "contracts",
            "confirm",
            &id,
            "--package",
            out.to_str().expect("path"),
        ],
    )
    .await
    .ok();
    let done = until(&pair, &id, 60, "the erasure refused", |c| {
        c.tasks
            .iter()
            .any(|t| t.subprocessor == "accounting" && t.state == TaskState::Failed as i32)
    })
    .await;
    let task = done
        .tasks
        .iter()
        .find(|t| t.subprocessor == "accounting")
        .expect("the accounting task");
    assert_eq!(
        task.progress.as_ref().map(|p| p.phase),
        Some(ContractPhase::Deleting as i32),
        "{task:?}"
    );
    for said in [
        "1 record(s) (1 subject(s)) of controller",
        "are not among the rows the contract end's export returned",
        "nothing was erased there",
        "the controller ends the contract again with RETURN_THEN_DELETE",
    ] {
        assert!(task.reason.contains(said), "{said}: {}", task.reason);
    }
    assert_ne!(state(&done), RequestState::Completed, "{done:#?}");
    assert_eq!(dump(&pair.accounting_url).await, before, "rows were erased");
    let shown = dsrctl(&pair, "operator", &["get", &id]).await;
    let shown = shown.ok();
    assert!(
        shown.contains("FAILED") && shown.contains("nothing was erased there"),
        "{shown}"
    );
    pair.stop().await;
}
