//! A contract end at a holder that holds nothing of the controller (the no-op stand-in with
//! `answer = "not_found"`, built from the processor's configuration), through the
//! processor's real store and runner (SQLite, and PostgreSQL when
//! `DSRELAY_TEST_POSTGRES_URL` names a server): its erasure step ends the task NOT_FOUND
//! and no deletion certificate is signed, for a DELETE and for a RETURN_THEN_DELETE (whose
//! return delivers an empty part first). Before, the task ended COMPLETED with a signed
//! certificate stating zero records, which an auditor takes for the holder's proof of
//! deletion.

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    ContractEnd, ContractEndChoice, ContractPhase, DeliverRequest, RequestKind, RequestParameters,
    TaskState,
};

use crate::contract_retry_tests::{acks, key, step_now};
use crate::task_machine::{decide, Context, Decision, Destination, Event};
use crate::App;

/// A processor in `dir` on `database_url` whose subprocessor `crm` is the no-op stand-in
/// answering NOT_FOUND, with contract end `id` accepted: `choice`, effective now, its grace
/// period over at once, due in a minute.
async fn with_stand_in(
    dir: &std::path::Path,
    database_url: &str,
    id: &str,
    choice: ContractEndChoice,
) -> App {
    crate::contract_tests::config(dir, database_url, &["acme"]);
    let file = dir.join("processor.toml");
    let text = std::fs::read_to_string(&file).expect("config file");
    let stand_in = text.replace(
        "connector = { type = \"noop\" }",
        "connector = { type = \"noop\", answer = \"not_found\" }",
    );
    assert_ne!(stand_in, text, "the noop connector's line moved");
    std::fs::write(&file, stand_in).expect("config file");
    let config = crate::Config::load_from(Some(&file), Vec::new()).expect("config");
    let app = App::build(config).await.expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: id.into(),
        kind: RequestKind::ContractEnd as i32,
        parameters: Some(RequestParameters {
            contract_end: Some(ContractEnd {
                choice: choice as i32,
                effective_at: Some(timestamp_from_millis(now)),
                grace_ends_at: Some(timestamp_from_millis(now + 3_600_000)),
                return_confirmed: false,
                transfer_recipient: String::new(),
            }),
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(now + 60_000)),
        ..Default::default()
    };
    (shared.store)
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    app
}

/// The certificates signed for `id`.
async fn certificates(shared: &crate::app::Shared, id: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM certificates WHERE request_id = $1")
        .bind(id)
        .fetch_one(&shared.store.db().pool)
        .await
        .expect("certificates")
}

/// `id`'s task ended NOT_FOUND with its contract end done, acknowledged so with no
/// certificate, and none signed.
async fn ended_not_found(shared: &crate::app::Shared, id: &str) {
    let task = (shared.store)
        .task(&key(id))
        .await
        .expect("task")
        .expect("a task");
    assert_eq!(
        (task.state, task.phase, task.records_affected),
        (TaskState::NotFound, ContractPhase::Done, 0),
        "{task:?}"
    );
    let sent = acks(shared, id).await;
    let last = sent.last().expect("acks");
    assert_eq!(last.state(), TaskState::NotFound, "{sent:#?}");
    assert_eq!(
        last.progress.as_ref().map(|p| p.phase()),
        Some(ContractPhase::Done),
        "{last:?}"
    );
    assert!(sent.iter().all(|a| a.certificate.is_none()), "{sent:#?}");
    assert_eq!(certificates(shared, id).await, 0);
}

async fn a_delete_at_a_holder_of_nothing_is_not_found_and_uncertified(
    url: &str,
    dir: &std::path::Path,
) {
    let id = "ce-nothing-delete";
    let app = with_stand_in(dir, url, id, ContractEndChoice::Delete).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    ended_not_found(&shared, id).await;
}

/// The return's empty part is delivered (the registry learns the holder had nothing) and
/// confirmed; the erasure that follows is NOT_FOUND.
async fn a_return_then_delete_at_a_holder_of_nothing_is_not_found_and_uncertified(
    url: &str,
    dir: &std::path::Path,
) {
    let id = "ce-nothing-return";
    let choice = ContractEndChoice::ReturnThenDelete;
    let app = with_stand_in(dir, url, id, choice).await;
    let shared = app.shared();
    assert_eq!(step_now(&shared).await, 1);
    let task = (shared.store)
        .task(&key(id))
        .await
        .expect("task")
        .expect("a task");
    assert_eq!(
        (task.state, task.phase),
        (TaskState::InProgress, ContractPhase::Returning),
        "{task:?}"
    );
    // The empty part delivered, as the uploader records a delivery.
    let mut jobs = (shared.store)
        .claim_uploads(shared.clock.now_ms(), 1, 60_000)
        .await
        .expect("claim");
    let job = jobs.pop().expect("the return's upload is queued");
    assert!(job.files.is_empty(), "{:?}", job.files);
    let now = shared.clock.now_ms();
    let event = Event::Delivered {
        to: Destination::Registry,
        files: 0,
        bytes: 0,
        receipt: None,
    };
    let Decision::Move(delivered) = decide(&task.current(), event, &Context::at(now)) else {
        panic!("a delivered return moves the task");
    };
    let (terms, _) = (shared.store)
        .contract_terms_and_recipient("acme", id)
        .await
        .expect("terms")
        .expect("stored");
    let delivered =
        crate::task_machine::awaiting_confirmation(delivered, id, Destination::Registry, &terms);
    let said = crate::store::Delivered {
        recipient: None,
        files: 0,
        bytes: 0,
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
    let confirm = ContractEnd {
        choice: choice as i32,
        return_confirmed: true,
        ..Default::default()
    };
    shared.clock.advance(1_000);
    (shared.store)
        .update_contract_end("acme", id, &confirm, None, shared.clock.now_ms())
        .await
        .expect("confirm");
    shared.clock.advance(1_000);
    assert_eq!(step_now(&shared).await, 1);
    ended_not_found(&shared, id).await;
}

on_both!(
    a_delete_at_a_holder_of_nothing_is_not_found_and_uncertified,
    a_return_then_delete_at_a_holder_of_nothing_is_not_found_and_uncertified,
);
