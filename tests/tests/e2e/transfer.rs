//! Transfers (GDPR art. 20(2)) through the real services: the processor sends each task's
//! export straight to the example recipient over mutual TLS, checking its identity; the
//! recipient's receipt comes back in the COMPLETED acknowledgement and shows in `Get` and
//! `dsrctl get`. A recipient killed mid-stream is resumed where it stopped; one that is down
//! is retried until the due date, then the task fails with the reason; one presenting another
//! identity is sent nothing.
//!
//! A corrupted chunk sent straight to the recipient is refused with DATA_LOSS and never
//! stored: the example recipient's own tests show it
//! (`services/example-recipient/tests/api.rs`,
//! `a_corrupted_chunk_or_file_is_refused_and_never_stored`).

use std::path::Path;
use std::time::Duration;

use dsrelay_connectors::ExportedFile;
use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, Acknowledgement, DeliverRequest, Evidence, ExportFileHeader,
    GetStatusRequest, Request, RequestKind, RequestParameters, RequestState, Scope, SubmitRequest,
    TaskState, TransferReceipt,
};
use dsrelay_runtime::pki::{dev_identity, DevCa};
use dsrelay_runtime::store::Db;
use sha2::{Digest, Sha256};
use tonic::Code;

use crate::exports::recorded_files;
use crate::harness::{
    email, erasure, spawn_pair, wait_until, Backend, Holder, PairOptions, RecipientOptions, Role,
    TestPair, NEWSLETTER, RECIPIENT,
};

/// In the sample accounting database (customer 1) and the newsletter's seed.
const MAIJA: &str = "maija.meikalainen@example.fi";

/// A transfer of Maija's data to [`RECIPIENT`].
fn transfer() -> SubmitRequest {
    SubmitRequest {
        kind: RequestKind::Transfer as i32,
        parameters: Some(RequestParameters {
            transfer_recipient: RECIPIENT.into(),
            ..Default::default()
        }),
        ..erasure(MAIJA)
    }
}

async fn submit(pair: &TestPair) -> String {
    pair.crm()
        .submit(transfer())
        .await
        .expect("submit")
        .into_inner()
        .request_id
}

/// Every task COMPLETED with a receipt, and so the request.
fn received(view: &Request) -> bool {
    view.state == RequestState::Completed as i32
        && !view.tasks.is_empty()
        && view.tasks.iter().all(|t| {
            t.state == TaskState::Completed as i32
                && t.evidence
                    .as_ref()
                    .is_some_and(|e| e.confirmed && e.transfer_receipt.is_some())
        })
}

/// Every task still IN_PROGRESS, its reason containing `why`.
fn waiting_because(why: &'static str) -> impl Fn(&Request) -> bool {
    move |view| {
        !view.tasks.is_empty()
            && view
                .tasks
                .iter()
                .all(|t| t.state == TaskState::InProgress as i32 && t.reason.contains(why))
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The headers the processor sent for `files`: what the receipt's manifest is computed over.
fn headers(id: &str, subprocessor: &str, files: &[ExportedFile]) -> Vec<ExportFileHeader> {
    files
        .iter()
        .map(|f| ExportFileHeader {
            request_id: id.into(),
            subprocessor: subprocessor.into(),
            name: f.name.clone(),
            media_type: f.media_type.clone(),
            categories: f.categories.clone(),
            size: f.size,
            sha256: f.sha256.clone(),
        })
        .collect()
}

/// Checks that the recipient holds every file the processor exported for `subprocessor`,
/// byte for byte, and that the task's receipt is the one for exactly those files, signed by
/// the recipient with the key the registry's `[[recipients]]` entry names.
async fn check_received(pair: &TestPair, view: &Request, subprocessor: &str) -> TransferReceipt {
    let id = &view.request_id;
    let files = recorded_files(pair.processor.database_url(), id, subprocessor).await;
    assert!(!files.is_empty(), "{subprocessor} exported nothing");
    let folder = pair.received_from_processor().join(id).join(subprocessor);
    for f in &files {
        let data = std::fs::read(folder.join(&f.name))
            .unwrap_or_else(|e| panic!("{subprocessor}/{} at the recipient: {e}", f.name));
        assert_eq!(
            (data.len() as u64, sha256_hex(&data)),
            (f.size, f.sha256.clone()),
            "{subprocessor}/{}",
            f.name
        );
    }
    let task = view
        .tasks
        .iter()
        .find(|t| t.subprocessor == subprocessor)
        .expect("task");
    let receipt = task
        .evidence
        .as_ref()
        .and_then(|e| e.transfer_receipt.clone())
        .expect("receipt");
    assert_eq!(receipt.request_id, *id);
    assert_eq!(receipt.subprocessor, subprocessor);
    assert_eq!(receipt.recipient, RECIPIENT);
    assert_eq!(receipt.files as usize, files.len());
    assert_eq!(receipt.bytes, files.iter().map(|f| f.size).sum::<u64>());
    assert_eq!(
        receipt.manifest_sha256,
        dsrelay_runtime::transfer_manifest::sha256(
            id,
            subprocessor,
            &headers(id, subprocessor, &files)
        )
    );
    assert!(receipt.received_at.is_some());
    let public = std::fs::read_to_string(pair.pki().signing_public_key("recipient")).unwrap();
    let public = dsrelay_runtime::signing::PublicKey::parse(&public).unwrap();
    let keys = dsrelay_runtime::signing::KeyRing::new(public, vec![]).unwrap();
    assert_eq!(
        dsrelay_runtime::transfer_receipt::verify(&receipt, &keys),
        Ok(()),
        "{receipt:?}"
    );
    // The recipient's own record of the part says the same.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join(".receipt.json")).unwrap()).unwrap();
    assert_eq!(written["manifest_sha256"], receipt.manifest_sha256.as_str());
    // The processor kept the files only until they were delivered.
    let at_processor = pair.export_dir(id, subprocessor);
    assert!(
        !at_processor.exists(),
        "{at_processor:?} kept after delivery"
    );
    receipt
}

/// Files (not the recipient's dot-files) under `dir`, recursively.
fn data_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(data_files(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

async fn a_transfer_reaches_the_recipient(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::Accounting, Holder::Newsletter],
        recipient: Some(RecipientOptions::default()),
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let id = submit(&pair).await;
    let mut crm = pair.crm();
    let view = wait_until(&mut crm, &id, Duration::from_secs(30), received).await;
    assert_eq!(view.tasks.len(), 2, "{view:#?}");
    let accounting = check_received(&pair, &view, "accounting").await;
    check_received(&pair, &view, NEWSLETTER).await;
    for t in &view.tasks {
        let note = &t.evidence.as_ref().unwrap().note;
        assert!(
            note.starts_with(&format!("export received by recipient {RECIPIENT}")),
            "{note}"
        );
    }
    // Nothing of a transfer goes to the registry's package store.
    assert!(!pair.package_dir().join(&id).exists());

    // The operator sees the receipts in `dsrctl get`.
    let run = crate::harness::dsrctl::dsrctl(&pair, "operator", &["get", &id]).await;
    let out = run.ok();
    assert!(out.contains("Transfer receipts\n"), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains(&accounting.manifest_sha256))
        .unwrap_or_else(|| panic!("no receipt line for accounting:\n{out}"));
    for cell in [
        "accounting",
        RECIPIENT,
        &accounting.bytes.to_string(),
        &accounting.files.to_string(),
    ] {
        assert!(line.contains(cell), "{cell} missing in {line:?}");
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_reaches_the_recipient_with_a_receipt_on_sqlite() {
    a_transfer_reaches_the_recipient(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_reaches_the_recipient_with_a_receipt_on_postgres() {
    a_transfer_reaches_the_recipient(Backend::Postgres).await;
}

/// Gives customer 1 of the sample accounting database 3000 invoices of about 1 kB each, so
/// its export files run to several MiB: several chunks each.
async fn make_the_export_big(accounting_url: &str) {
    let db = Db::connect(accounting_url).await.expect("accounting db");
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
         INSERT INTO invoices (id, customer_id, customer_name, customer_email, amount_cents, \
         issued_on, status) SELECT 10000 + i, 1, 'Maija ' || hex(zeroblob(500)), \
         'maija.meikalainen@example.fi', i, '2025-01-01', 'paid' FROM n",
    )
    .execute(&db.pool)
    .await
    .expect("inserting invoices");
    db.pool.close().await;
}

/// The largest `*.partial` file under `dir` (bytes), 0 when there is none.
fn largest_partial(dir: &Path) -> u64 {
    data_files(dir)
        .iter()
        .filter(|p| p.ends_with(".partial"))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// A pair on SQLite with the accounting holder and a recipient process that stores a chunk
/// every 400 ms, and a TRANSFER of a big export under way: its first MiB is at the
/// recipient. The pair and the request id.
async fn transfer_half_stored() -> (TestPair, String) {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        recipient: Some(RecipientOptions {
            process: true,
            chunk_delay_ms: 400,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    make_the_export_big(&pair.accounting_url).await;
    let id = submit(&pair).await;
    let folder = pair.received_from_processor().join(&id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while largest_partial(&folder) < 1024 * 1024 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no chunk reached the recipient"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (pair, id)
}

/// The recipient is SIGKILLed while a file is half stored and started again on the same
/// address and folder: the processor asks where the file stands and sends only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_resumes_after_the_recipient_is_killed_mid_stream() {
    let (mut pair, id) = transfer_half_stored().await;
    pair.recipient().kill().await;
    let before = pair.recipient().log();
    assert!(
        !resumed_offsets(&before).iter().any(|o| *o > 0),
        "nothing resumed before the kill:\n{before}"
    );
    // Down for a moment: the processor's attempts in between fail and are retried.
    tokio::time::sleep(Duration::from_millis(500)).await;
    pair.recipient().start().await;

    let mut crm = pair.crm();
    let view = wait_until(&mut crm, &id, Duration::from_secs(60), received).await;
    let receipt = check_received(&pair, &view, "accounting").await;
    assert!(receipt.bytes > 4 * 1024 * 1024, "a big export: {receipt:?}");
    // The restarted recipient was sent a file from where it had stopped, not from byte 0.
    let log = pair.recipient().log();
    let offsets = resumed_offsets(&log[before.len()..]);
    assert!(
        offsets.iter().any(|o| *o > 0),
        "no file resumed after the restart: {offsets:?}\n{log}"
    );
    pair.stop().await;
}

/// A part's files go two at a time, and a file changed at the processor is still found: the
/// recipient is killed while the big export is being sent, the last of the eight accounting
/// files gets one byte changed meanwhile, and once the recipient is back the attempt that
/// resumes the files finds the change while another file is in flight. The task fails naming
/// that file, and no receipt is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_of_a_file_changed_while_others_are_sent_fails_naming_it() {
    let (mut pair, id) = transfer_half_stored().await;
    pair.recipient().kill().await;
    let written = recorded_files(pair.processor.database_url(), &id, "accounting").await;
    assert_eq!(written.len(), 8, "{written:?}");
    let last = written[7].name.clone();
    let path = pair.export_dir(&id, "accounting").join(&last);
    let mut bytes = std::fs::read(&path).expect("the export file, not delivered yet");
    bytes[0] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    pair.recipient().start().await;

    let mut crm = pair.crm();
    let view = wait_until(&mut crm, &id, Duration::from_secs(60), |r| {
        r.tasks.iter().any(|t| t.state == TaskState::Failed as i32)
    })
    .await;
    let task = &view.tasks[0];
    assert!(
        task.reason
            .contains(&format!("{last} changed at the processor")),
        "{view:#?}"
    );
    assert!(
        task.evidence
            .as_ref()
            .is_none_or(|e| e.transfer_receipt.is_none()),
        "{view:#?}"
    );
    pair.stop().await;
}

/// The `from_offset` of every "receiving a file" line of a recipient's log.
fn resumed_offsets(log: &str) -> Vec<u64> {
    without_colours(log)
        .lines()
        .filter(|l| l.contains("receiving a file"))
        .filter_map(|l| {
            let rest = &l[l.find("from_offset=")? + "from_offset=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// `log` without the terminal colour codes a log line may carry (`ESC [ ... m`).
fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A recipient that never comes up: the task waits IN_PROGRESS saying what is missing and
/// until when it is retried; past the due date (the processor's clock moved there) it fails
/// with the last reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_a_recipient_that_is_down_fails_at_the_due_date() {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        recipient: Some(RecipientOptions::default()),
        down: vec![Role::Recipient],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let id = submit(&pair).await;
    let mut crm = pair.crm();
    let view = wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        waiting_because("to recipient new-bookkeeper: attempt"),
    )
    .await;
    let reason = &view.tasks[0].reason;
    assert!(reason.starts_with("sending 8 file(s) ("), "{reason}");
    assert!(reason.contains(", retrying until "), "{reason}");
    assert_eq!(view.state, RequestState::InProgress as i32);
    // `dsrctl get` shows the operator why.
    let out = crate::harness::dsrctl::dsrctl(&pair, "operator", &["get", &id]).await;
    assert!(
        out.ok().contains("to recipient new-bookkeeper: attempt"),
        "{}",
        out.stdout
    );

    let clock = pair.processor.clock().expect("in-process processor");
    clock.advance(40 * 24 * 3600 * 1000);
    let view = wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        r.state == RequestState::Failed as i32
    })
    .await;
    let reason = &view.tasks[0].reason;
    assert_eq!(view.tasks[0].state, TaskState::Failed as i32);
    assert!(
        reason.starts_with("gave up at the due date after ",)
            && reason.contains("to deliver the export to recipient new-bookkeeper: "),
        "{reason}"
    );
    // Nothing will send it any more: the processor does not keep the copy (the forget
    // worker's sweep removes what a retired upload left).
    let exported = pair.export_dir(&id, "accounting");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while exported.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a failed transfer's export stayed: {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pair.stop().await;
}

/// The registry expects another identity than the recipient's certificate carries: the
/// processor refuses to talk to it, so not a byte arrives, and the task says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_a_recipient_with_another_identity_sends_nothing() {
    let impostor = dev_identity("recipient", "someone-else");
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        recipient: Some(RecipientOptions {
            expected_identity: Some(impostor.clone()),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let id = submit(&pair).await;
    let mut crm = pair.crm();
    let view = wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        waiting_because("is not the expected"),
    )
    .await;
    let reason = &view.tasks[0].reason;
    assert!(reason.contains(&impostor), "{reason}");
    // Give it a few more attempts: still nothing at the recipient.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let files = data_files(&pair.recipient_dir());
    assert!(files.is_empty(), "the recipient got {files:?}");
    pair.stop().await;
}

/// The processor holds a receipt to the registry's rules for the recipient's signature: the
/// recipient answers unsigned receipts while the registry has its public key, so the
/// processor refuses them and keeps the task IN_PROGRESS, saying why, with nothing
/// dead-lettered (the registry would have refused the acknowledgement); once the recipient
/// signs again, the next attempt completes the task with the signed receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_waits_for_a_receipt_the_registry_would_take() {
    let mut pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        recipient: Some(RecipientOptions {
            process: true,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let config = pair.recipient().config_file().to_path_buf();
    let signing = std::fs::read_to_string(&config).expect("recipient config");
    let key_line = signing
        .lines()
        .find(|l| l.starts_with("signing_key"))
        .expect("the recipient signs")
        .to_string();
    pair.recipient().stop().await;
    std::fs::write(&config, signing.replace(&key_line, "")).unwrap();
    pair.recipient().start().await;

    let id = submit(&pair).await;
    let mut crm = pair.crm();
    let view = wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        waiting_because("is not signed by the recipient"),
    )
    .await;
    let reason = &view.tasks[0].reason;
    assert!(reason.contains("is not one the registry takes"), "{reason}");
    let parked: i64 = crate::harness::count(
        pair.processor.database_url(),
        "SELECT COUNT(*) FROM ack_outbox WHERE dead_lettered_at IS NOT NULL",
    )
    .await;
    assert_eq!(parked, 0, "an acknowledgement was dead-lettered");

    pair.recipient().stop().await;
    std::fs::write(&config, &signing).unwrap();
    pair.recipient().start().await;
    let view = wait_until(&mut crm, &id, Duration::from_secs(60), received).await;
    check_received(&pair, &view, "accounting").await;
    pair.stop().await;
}

/// A recipient that names itself wrongly closes the part with a receipt the processor
/// refuses, and a closed part answers that receipt again, so setting the name right is not
/// enough: once its operator also removes the part's folder, as the refusal's note says, the
/// processor's next attempt sends the part anew and the transfer completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_a_misnamed_recipient_completes_once_it_is_named_right_and_the_part_removed() {
    let mut pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        recipient: Some(RecipientOptions {
            process: true,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let config = pair.recipient().config_file().to_path_buf();
    let right = std::fs::read_to_string(&config).expect("recipient config");
    let name_line = right
        .lines()
        .find(|l| l.starts_with("name"))
        .expect("the recipient is named")
        .to_string();
    pair.recipient().stop().await;
    std::fs::write(
        &config,
        right.replace(&name_line, "name = \"other-recipient\""),
    )
    .unwrap();
    pair.recipient().start().await;

    let id = submit(&pair).await;
    let mut crm = pair.crm();
    let view = wait_until(
        &mut crm,
        &id,
        Duration::from_secs(30),
        waiting_because("it names recipient \"other-recipient\""),
    )
    .await;
    let reason = &view.tasks[0].reason;
    assert!(
        reason.contains("operator discards that part"),
        "the note says what ends it: {reason}"
    );

    pair.recipient().stop().await;
    std::fs::write(&config, &right).unwrap();
    let part = pair.received_from_processor().join(&id);
    assert!(part.is_dir(), "the closed part is at {}", part.display());
    std::fs::remove_dir_all(&part).unwrap();
    pair.recipient().start().await;
    let view = wait_until(&mut crm, &id, Duration::from_secs(60), received).await;
    check_received(&pair, &view, "accounting").await;
    pair.stop().await;
}

/// A COMPLETED report of a TRANSFER task must carry the recipient's receipt; the registry
/// refuses one without it, and one whose receipt is for another task, naming the fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_completed_without_a_receipt_is_refused_by_the_registry() {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let id = submit(&pair).await;
    let mut crm = pair.crm();
    wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        r.state == RequestState::InProgress as i32
    })
    .await;
    let mut acks = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"));
    let completed = |evidence: Evidence| Acknowledgement {
        request_id: id.clone(),
        subprocessor: "accounting".into(),
        sequence: 99,
        state: TaskState::Completed as i32,
        evidence: Some(evidence),
        ..Default::default()
    };
    let refused = acks
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![completed(Evidence {
                confirmed: true,
                ..Default::default()
            })],
        })
        .await
        .expect("answered per acknowledgement")
        .into_inner();
    assert_eq!(refused.applied, 0, "{refused:?}");
    assert_eq!(refused.rejected.len(), 1, "{refused:?}");
    assert_eq!(
        refused.rejected[0].code,
        Code::InvalidArgument as i32,
        "{refused:?}"
    );
    let fields: Vec<String> = refused.rejected[0]
        .violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(fields, ["acknowledgements[0].evidence.transfer_receipt"]);

    let refused = acks
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![completed(Evidence {
                confirmed: true,
                transfer_receipt: Some(TransferReceipt {
                    request_id: "another".into(),
                    subprocessor: "accounting".into(),
                    manifest_sha256: "AB".repeat(32),
                    recipient: RECIPIENT.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })],
        })
        .await
        .expect("answered per acknowledgement")
        .into_inner();
    assert_eq!(refused.applied, 0, "{refused:?}");
    let fields: Vec<String> = refused
        .rejected
        .iter()
        .flat_map(|x| &x.violations)
        .map(|v| v.field.clone())
        .collect();
    assert_eq!(
        fields,
        [
            "acknowledgements[0].evidence.transfer_receipt.request_id",
            "acknowledgements[0].evidence.transfer_receipt.manifest_sha256"
        ]
    );
    // Neither changed the task.
    let view = wait_until(&mut crm, &id, Duration::from_secs(5), |_| true).await;
    assert!(view
        .tasks
        .iter()
        .all(|t| t.state != TaskState::Completed as i32));
    pair.stop().await;
}

/// Another processor's COMPLETED report of a TRANSFER without a receipt is refused as not
/// routed to it (PERMISSION_DENIED), exactly as for a request that does not exist, and not
/// for the missing receipt: what a processor is told never says another's request exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_processors_transfer_report_is_refused_as_not_routed() {
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Accounting],
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.crm();
    // Only `payroll-bureau` holds invoicing data: `web-agency`, a configured processor of
    // the registry, is not sent the request.
    let id = crm
        .submit(SubmitRequest {
            scope: Some(Scope {
                data_categories: vec!["invoicing".into()],
            }),
            ..transfer()
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        r.state == RequestState::InProgress as i32
    })
    .await;
    let pki = pair.pki();
    let ca = DevCa::load(
        &std::fs::read_to_string(pki.ca()).expect("ca.pem"),
        &std::fs::read_to_string(pki.dir.join("ca.key")).expect("ca.key"),
    )
    .expect("the development CA");
    let agency = ca
        .issue(
            "dsrelay web-agency",
            &dev_identity("processor", "web-agency"),
        )
        .expect("a certificate for web-agency");
    std::fs::write(pki.cert("web-agency"), agency.cert_pem).expect("write cert");
    std::fs::write(pki.key("web-agency"), agency.key_pem).expect("write key");
    let mut acks = AcknowledgementServiceClient::new(pair.channel_to_registry("web-agency"));
    let report = |request_id: &str| Acknowledgement {
        request_id: request_id.to_string(),
        subprocessor: "accounting".into(),
        sequence: 99,
        state: TaskState::Completed as i32,
        evidence: Some(Evidence {
            confirmed: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let absent = uuid::Uuid::now_v7().to_string();
    let answer = acks
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![report(&id), report(&absent)],
        })
        .await
        .expect("answered per acknowledgement")
        .into_inner();
    assert_eq!(answer.applied, 0, "{answer:?}");
    let refusals: Vec<(u32, i32, usize)> = answer
        .rejected
        .iter()
        .map(|r| (r.index, r.code, r.violations.len()))
        .collect();
    assert_eq!(
        refusals,
        [
            (0, Code::PermissionDenied as i32, 0),
            (1, Code::PermissionDenied as i32, 0)
        ],
        "{answer:?}"
    );
    for (r, request_id) in answer.rejected.iter().zip([&id, &absent]) {
        assert_eq!(
            r.message,
            format!("request {request_id} was not delivered to processor web-agency"),
            "{answer:?}"
        );
    }
    pair.stop().await;
}

/// A TRANSFER delivered without a recipient (the registry no longer configures the one the
/// partner named) has nowhere to go: its tasks fail saying so, and nothing is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_delivered_without_a_recipient_fails_its_tasks() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let id = uuid::Uuid::now_v7().to_string();
    let mut processor = ProcessorServiceClient::new(pair.channel_to_processor("registry"));
    processor
        .deliver(DeliverRequest {
            request_id: id.clone(),
            kind: RequestKind::Transfer as i32,
            identities: vec![email(MAIJA)],
            parameters: Some(RequestParameters {
                transfer_recipient: "gone-bookkeeper".into(),
                ..Default::default()
            }),
            recipient: None,
            ..Default::default()
        })
        .await
        .expect("deliver");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let tasks = loop {
        let tasks = processor
            .get_status(GetStatusRequest {
                request_id: id.clone(),
            })
            .await
            .expect("status")
            .into_inner()
            .tasks;
        if !tasks.is_empty() && tasks.iter().all(|t| t.state == TaskState::Failed as i32) {
            break tasks;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tasks did not fail: {tasks:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(tasks.len(), 2, "{tasks:#?}");
    for t in &tasks {
        assert!(
            t.reason.contains("the transfer came without a recipient"),
            "{}",
            t.reason
        );
        assert!(!pair.export_dir(&id, &t.subprocessor).exists());
    }
    pair.stop().await;
}

/// A transfer cancelled while the recipient is storing its export's big file (slowly)
/// stops there: the part is never closed (the recipient logs no "transfer received"), no
/// receipt comes back, and the task and the request are CANCELLED. The cancellation used to
/// let every file go and the part be closed, the request ending COMPLETED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_cancelled_mid_stream_is_not_closed_at_the_recipient() {
    let (mut pair, id) = transfer_half_stored().await;
    let mut crm = pair.crm();
    crm.cancel(dsrelay_proto::v1::CancelRequest {
        request_id: id.clone(),
        reason: "the subject withdrew".into(),
    })
    .await
    .expect("cancel");
    let finished = |view: &Request| {
        !view.tasks.is_empty()
            && view.tasks.iter().all(|t| {
                t.state != TaskState::InProgress as i32 && t.state != TaskState::Pending as i32
            })
    };
    let view = wait_until(&mut crm, &id, Duration::from_secs(60), finished).await;
    let log = without_colours(&pair.recipient().log());
    assert!(
        !log.contains("transfer received"),
        "the part was closed:\n{log}"
    );
    let task = &view.tasks[0];
    assert_eq!(task.state, TaskState::Cancelled as i32, "{view:#?}");
    assert!(
        task.reason
            .contains(&format!("is not delivered to recipient {RECIPIENT}")),
        "{view:#?}"
    );
    assert!(
        task.evidence
            .as_ref()
            .is_none_or(|e| e.transfer_receipt.is_none()),
        "{view:#?}"
    );
    assert_eq!(view.state, RequestState::Cancelled as i32, "{view:#?}");
    pair.stop().await;
}
