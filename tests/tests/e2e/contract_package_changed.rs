//! A contract end's package downloaded while one holder's return had failed, then changed
//! by that holder's retried part, through the real registry and processor binaries: `dsrctl
//! download` into the folder of the older version is refused (exit 1) rather than reported
//! finished with the stale "not returned", the registry refuses a confirmation with that
//! folder saying to download into a new one, and the new folder's package is confirmed.

use std::time::Duration;

use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::{Contract, ContractPhase, GetContractRequest, RequestState, TaskState};

use crate::harness::dsrctl::dsrctl;
use crate::harness::{spawn_pair, Holder, Mode, PairOptions, TestPair, CONTROLLER, PROCESSOR};

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

/// Polls the contract end until `done` holds, failing with its last view after 60 s.
async fn until(pair: &TestPair, id: &str, what: &str, done: impl Fn(&Contract) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let c = contract(pair, id).await;
        if done(&c) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached\n{c:#?}\n--- processor log ---\n{}",
            pair.processor.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The state and phase of `subprocessor`'s part.
fn part(c: &Contract, subprocessor: &str) -> Option<(TaskState, ContractPhase)> {
    let t = c.tasks.iter().find(|t| t.subprocessor == subprocessor)?;
    let phase = t.progress.as_ref().map_or(0, |p| p.phase);
    Some((
        TaskState::try_from(t.state).unwrap_or_default(),
        ContractPhase::try_from(phase).unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_package_changed_by_a_retried_part_is_downloaded_into_a_new_folder() {
    let pair = spawn_pair(PairOptions {
        mode: Mode::Processes,
        holders: vec![Holder::Accounting, Holder::MailMarketing],
        ..Default::default()
    })
    .await
    .expect("pair");
    let books = &pair.accounting_url;
    // The accounting export fails for good until the table is back.
    execute(books, "ALTER TABLE contacts RENAME TO contacts_moved").await;
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
            "--now",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let id = ended["contract_id"]
        .as_str()
        .expect("contract id")
        .to_string();
    until(&pair, &id, "accounting failed, mail returned", |c| {
        part(c, "accounting") == Some((TaskState::Failed, ContractPhase::Returning))
            && part(c, "mail-marketing")
                .is_some_and(|(_, p)| p == ContractPhase::AwaitingConfirmation)
    })
    .await;
    let old = pair.dir().join("older");
    let old = old.to_str().expect("path");
    let run = dsrctl(&pair, "operator", &["download", &id, "--out", old]).await;
    assert!(run.ok().contains("accounting (FAILED)"), "{}", run.stdout);

    execute(books, "ALTER TABLE contacts_moved RENAME TO contacts").await;
    dsrctl(
        &pair,
        "operator",
        &[
            "tasks",
            "retry",
            "--processor",
            &format!("https://localhost:{}", pair.processor.addr().port()),
            CONTROLLER,
            &id,
            "accounting",
            "--note",
            "contacts table restored",
        ],
    )
    .await
    .ok();
    until(&pair, &id, "the accounting part returned", |c| {
        part(c, "accounting") == Some((TaskState::InProgress, ContractPhase::AwaitingConfirmation))
    })
    .await;

    // The folder of the older version: refused, not "finished already" with the stale list.
    let run = dsrctl(&pair, "operator", &["download", &id, "--out", old]).await;
    run.expect_code(1);
    assert!(!run.stdout.contains("finished already"), "{}", run.stdout);
    assert!(
        run.stderr.contains("holds an older version of the package")
            && run.stderr.contains("download into a new folder"),
        "{}",
        run.stderr
    );
    let confirm = dsrctl(
        &pair,
        "operator",
        &["contracts", "confirm", &id, "--package", old],
    )
    .await;
    confirm.expect_code(2);
    assert!(
        confirm
            .stderr
            .contains("download it again into a new folder"),
        "{}",
        confirm.stderr
    );

    let new = pair.dir().join("newer");
    let new = new.to_str().expect("path");
    let run = dsrctl(&pair, "operator", &["download", &id, "--out", new]).await;
    assert!(!run.ok().contains("not returned"), "{}", run.stdout);
    dsrctl(
        &pair,
        "operator",
        &["contracts", "confirm", &id, "--package", new],
    )
    .await
    .ok();
    until(&pair, &id, "the contract end finished", |c| {
        matches!(
            RequestState::try_from(c.state),
            Ok(RequestState::Completed | RequestState::PartiallyCompleted)
        )
    })
    .await;
    pair.stop().await;
}
