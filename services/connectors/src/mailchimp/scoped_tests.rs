//! Audiences scoped per controller, and contract ends (bulk steps) against the fake API: one
//! controller's work never touches another controller's audience.

use super::fake::{subscriber_hash, FakeMailchimp};
use super::tests::{assert_clean, config, email, task, KEY, MAIJA};
use super::*;
use crate::config::ConnectorConfig;
use crate::{BulkOp, BulkProgress, ProgressReporter};

/// Controller acme's audience (the fake's primary one).
const ACME_LIST: &str = "acme000001";
/// Controller globex's audience.
const GLOBEX_LIST: &str = "globex0002";
const MATTI: &str = "matti.virtanen@example.fi";
const LIISA: &str = "liisa.korhonen@example.fi";
const PEKKA: &str = "pekka.nieminen@example.fi";

fn scoped_config(base_url: &str) -> MailchimpConfig {
    MailchimpConfig {
        list_id: String::new(),
        controllers: [("acme", ACME_LIST), ("globex", GLOBEX_LIST)]
            .into_iter()
            .map(|(name, list)| {
                (
                    name.to_string(),
                    MailchimpControllerConfig {
                        list_id: list.into(),
                    },
                )
            })
            .collect(),
        ..config(base_url)
    }
}

/// Acme's audience: Maija, Matti (unsubscribed) and Liisa; globex's: Maija and Pekka.
async fn two_audiences() -> (FakeMailchimp, MailchimpConnector) {
    let fake = FakeMailchimp::start(KEY, ACME_LIST).await.unwrap();
    fake.subscribe(MAIJA, "Maija", "Meikäläinen");
    let matti = fake.subscribe(MATTI, "Matti", "Virtanen");
    fake.set_status(ACME_LIST, &matti, "unsubscribed");
    fake.subscribe(LIISA, "Liisa", "Korhonen");
    fake.subscribe_to(GLOBEX_LIST, MAIJA, "Maija", "Meikäläinen");
    fake.subscribe_to(GLOBEX_LIST, PEKKA, "Pekka", "Nieminen");
    let connector = MailchimpConnector::new(scoped_config(&fake.base_url)).unwrap();
    (fake, connector)
}

fn globex_members() -> Vec<String> {
    let mut m = vec![subscriber_hash(MAIJA), subscriber_hash(PEKKA)];
    m.sort();
    m
}

fn job(
    controller: &str,
    op: BulkOp,
    export: Option<ExportSink>,
) -> (BulkJob, tokio::sync::watch::Receiver<BulkProgress>) {
    let (progress, seen) = ProgressReporter::new();
    let job = BulkJob {
        job_id: format!("ce1/{controller}/newsletter"),
        request_id: "ce1".into(),
        controller: controller.into(),
        op,
        phase: Phase::Start,
        due_at_ms: 2_000_000_000_000,
        now_ms: 1_700_000_000_000,
        interrupted: false,
        recorded_progress: Default::default(),
        export,
        progress,
        returned: None,
        returned_since_ms: None,
    };
    (job, seen)
}

#[test]
fn scoped_configuration_parses_and_validates() {
    let toml = format!(
        "type = \"mailchimp\"\nbase_url = \"https://us21.api.mailchimp.com/3.0\"\n\
         api_key = \"{KEY}\"\n[controllers.acme]\nlist_id = \"{ACME_LIST}\"\n\
         [controllers.globex]\nlist_id = \"{GLOBEX_LIST}\"\n"
    );
    let parsed: ConnectorConfig = toml::from_str(&toml).unwrap();
    assert!(parsed.validate().is_empty(), "{:?}", parsed.validate());
    let ConnectorConfig::Mailchimp(c) = &parsed else {
        panic!("{parsed:?}");
    };
    assert_eq!(c.controllers["globex"].list_id, GLOBEX_LIST);
    assert!(c.list_id.is_empty());

    let both = MailchimpConfig {
        list_id: "a1b2c3d4e5".into(),
        ..c.clone()
    };
    assert!(
        both.validate()
            .join(" ")
            .contains("list_id: must be left out"),
        "{:?}",
        both.validate()
    );
    let mut shared = c.clone();
    shared.controllers.get_mut("globex").unwrap().list_id = ACME_LIST.into();
    shared.controllers.get_mut("acme").unwrap().list_id = ACME_LIST.into();
    let problems = shared.validate().join(" ");
    assert!(problems.contains("already controller acme's"), "{problems}");
    let mut bad = c.clone();
    bad.controllers.get_mut("acme").unwrap().list_id = "a/b".into();
    assert!(bad
        .validate()
        .join(" ")
        .contains("controllers.acme.list_id"));
    let neither = MailchimpConfig {
        controllers: BTreeMap::new(),
        ..c.clone()
    };
    assert!(neither
        .validate()
        .join(" ")
        .contains("list_id: must not be empty"));
}

#[tokio::test]
async fn scoped_controllers_are_the_configured_names_and_unscoped_is_none() {
    let (fake, connector) = two_audiences().await;
    assert_eq!(
        connector.scoped_controllers(),
        Some(vec!["acme".to_string(), "globex".to_string()])
    );
    let unscoped = MailchimpConnector::new(config(&fake.base_url)).unwrap();
    assert_eq!(unscoped.scoped_controllers(), None);
    assert!(connector.supports(RequestKind::ContractEnd));
}

#[tokio::test]
async fn an_erasure_for_one_controller_leaves_the_same_address_in_the_others_audience() {
    let (fake, connector) = two_audiences().await;
    let hash = subscriber_hash(MAIJA);
    let out = connector
        .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
        .await
        .unwrap();
    let Outcome::Completed { erased, .. } = &out else {
        panic!("{out:?}");
    };
    assert_eq!(erased[0].target, format!("audience {ACME_LIST}"));
    assert!(!fake.members_of(ACME_LIST).unwrap().contains(&hash));
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
    // Every call went to acme's audience.
    let calls = fake.audience().calls.clone();
    assert!(
        calls
            .iter()
            .all(|c| c.contains(&format!("/lists/{ACME_LIST}/"))),
        "{calls:?}"
    );

    // The same request from globex erases globex's member only.
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    t.controller = "globex".into();
    let out = connector.run(&t).await.unwrap();
    assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
    assert_eq!(
        fake.members_of(GLOBEX_LIST).unwrap(),
        [subscriber_hash(PEKKA)]
    );
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 2);
}

#[tokio::test]
async fn a_controller_not_configured_is_refused_without_a_call() {
    let (fake, connector) = two_audiences().await;
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    t.controller = "initech".into();
    let out = connector.run(&t).await.unwrap();
    let Outcome::Refused { reason } = &out else {
        panic!("{out:?}");
    };
    assert!(reason.contains("\"initech\""), "{reason}");
    assert!(reason.contains("acme, globex"), "{reason}");
    let (j, _) = job("initech", BulkOp::Erase, None);
    let out = connector.run_bulk(&j).await.unwrap();
    assert!(
        matches!(&out, Outcome::Refused { reason } if reason.contains("\"initech\"")),
        "{out:?}"
    );
    assert!(fake.audience().calls.is_empty());
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 3);
}

#[tokio::test]
async fn a_bulk_export_has_all_of_the_controllers_members_and_none_of_the_others() {
    let (fake, connector) = two_audiences().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join("ce"), vec![]);
    sink.reset().await.unwrap();
    let (j, seen) = job("acme", BulkOp::Export, Some(sink));
    let out = connector.run_bulk(&j).await.unwrap();
    let Outcome::Completed {
        records_affected: 3,
        note,
        files,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert_clean(note);
    assert!(note.contains("not included"), "{note}");
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].name, "members.json");
    let bytes = std::fs::read(dir.path().join("ce/members.json")).unwrap();
    assert_eq!(files[0].size, bytes.len() as u64);
    let members: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
    let mut addresses: Vec<&str> = members
        .iter()
        .map(|m| m["email_address"].as_str().unwrap())
        .collect();
    addresses.sort();
    assert_eq!(addresses, [MAIJA, LIISA, MATTI]);
    assert!(members.iter().all(|m| m.get("_links").is_none()));
    assert!(members.iter().all(|m| m["list_id"] == ACME_LIST));
    assert!(members
        .iter()
        .any(|m| m["status"] == "unsubscribed" && m["merge_fields"]["LNAME"] == "Virtanen"));
    assert_eq!(
        *seen.borrow(),
        BulkProgress {
            subjects_done: 3,
            subjects_total: 3,
            records_done: 3,
            records_total: 3,
            erased: Vec::new(),
        }
    );
    // Counted first (a page of the members without them), then pages of 2 (the test
    // configuration): two pages for three members.
    let calls = fake.audience().calls.clone();
    assert_eq!(
        calls,
        [
            format!("GET /3.0/lists/{ACME_LIST}/members"),
            format!("GET /3.0/lists/{ACME_LIST}/members"),
            format!("GET /3.0/lists/{ACME_LIST}/members"),
        ]
    );
    // Reading changes nothing.
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 3);
}

#[tokio::test]
async fn a_bulk_erasure_deletes_the_controllers_audience_and_leaves_the_others() {
    let (fake, connector) = two_audiences().await;
    let (j, seen) = job("acme", BulkOp::Erase, None);
    let out = connector.run_bulk(&j).await.unwrap();
    let Outcome::Completed {
        records_affected: 3,
        erased,
        note,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert_clean(note);
    assert_eq!(
        erased,
        &[ErasedCount {
            target: format!("audience {ACME_LIST}"),
            action: "deleted".into(),
            count: 3,
        }]
    );
    assert_eq!(seen.borrow().subjects_done, 3);
    assert_eq!(fake.members_of(ACME_LIST), None);
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
    // A count, one delete, and a read that proves it gone.
    assert_eq!(
        fake.audience().calls,
        [
            format!("GET /3.0/lists/{ACME_LIST}/members"),
            format!("DELETE /3.0/lists/{ACME_LIST}"),
            format!("GET /3.0/lists/{ACME_LIST}"),
        ]
    );

    // Confirming the handle of a deletion reads the audience again.
    let confirm = BulkJob {
        phase: Phase::Confirm {
            handle: format!("audience:{ACME_LIST}:3"),
        },
        ..j.clone()
    };
    let out = connector.run_bulk(&confirm).await.unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 3,
                ..
            }
        ),
        "{out:?}"
    );
    let wrong = BulkJob {
        phase: Phase::Confirm {
            handle: format!("audience:{GLOBEX_LIST}:2"),
        },
        ..j.clone()
    };
    let err = connector.run_bulk(&wrong).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Permanent(_)), "{err:?}");

    // Started again, the audience is missing: never a false confirmation.
    let err = connector.run_bulk(&j).await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Permanent(m) if m.contains("was not found")),
        "{err:?}"
    );
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
}

/// An erasure whose call deleted the audience but was cut off before the processor recorded
/// its answer (SIGKILL, a lost lease, a shutdown dropping it) is called again from the start,
/// marked interrupted: the count's 404 is that call's work, COMPLETED with the members it
/// counted as the processor recorded them, not a permanent "nothing was done".
#[tokio::test]
async fn a_resumed_bulk_erasure_takes_the_missing_audience_as_the_cut_off_calls_work() {
    let (fake, connector) = two_audiences().await;
    let (j, _) = job("acme", BulkOp::Erase, None);
    // The cut-off call: Mailchimp did the work; its answer is lost with the processor.
    connector.run_bulk(&j).await.unwrap();
    assert_eq!(fake.members_of(ACME_LIST), None);
    fake.audience().calls.clear();

    // What the processor recorded of that call: the count it reported before the delete.
    let (resumed, seen) = job("acme", BulkOp::Erase, None);
    let resumed = BulkJob {
        interrupted: true,
        recorded_progress: members_progress(0, 3),
        ..resumed
    };
    let out = connector.run_bulk(&resumed).await.unwrap();
    let Outcome::Completed {
        records_affected: 3,
        erased,
        note,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert_clean(note);
    assert!(
        note.contains("cut off") && note.contains("3 members"),
        "{note}"
    );
    assert_eq!(
        erased,
        &[ErasedCount {
            target: format!("audience {ACME_LIST}"),
            action: "deleted".into(),
            count: 3,
        }]
    );
    assert_eq!(
        *seen.borrow(),
        BulkProgress {
            erased: erased.to_vec(),
            ..members_progress(3, 3)
        }
    );

    // The cut-off call's last progress, its deletion listed, was recorded: the processor
    // lists that, and the answer adds nothing to it.
    let (listed, _) = job("acme", BulkOp::Erase, None);
    let listed = BulkJob {
        interrupted: true,
        recorded_progress: seen.borrow().clone(),
        ..listed
    };
    let out = connector.run_bulk(&listed).await.unwrap();
    let Outcome::Completed {
        records_affected: 3,
        erased,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert!(erased.is_empty(), "{out:?}");

    // No count was recorded: none is certified, and the note says it is unknown.
    let unknown = BulkJob {
        recorded_progress: BulkProgress::default(),
        ..resumed.clone()
    };
    let out = connector.run_bulk(&unknown).await.unwrap();
    let Outcome::Completed {
        records_affected: 0,
        erased,
        note,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert!(erased.is_empty(), "{erased:?}");
    assert!(note.contains("unknown"), "{note}");
    // Each resumed call only read the audience; nothing was sent again.
    assert_eq!(
        fake.audience().calls,
        vec![format!("GET /3.0/lists/{ACME_LIST}/members"); 3]
    );

    // Without a cut-off call the same 404 is still never an erasure.
    let err = connector.run_bulk(&j).await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Permanent(m) if m.contains("was not found")),
        "{err:?}"
    );

    // A call cut off before its delete left the audience: the resumed one deletes it.
    let (globex, _) = job("globex", BulkOp::Erase, None);
    let globex = BulkJob {
        interrupted: true,
        ..globex
    };
    let out = connector.run_bulk(&globex).await.unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 2,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(fake.members_of(GLOBEX_LIST), None);
}

/// Both totals of a bulk step's progress at `done` of `total` members.
fn members_progress(done: u64, total: u64) -> BulkProgress {
    BulkProgress {
        subjects_done: done,
        subjects_total: total,
        records_done: done,
        records_total: total,
        erased: Vec::new(),
    }
}

#[tokio::test]
async fn a_contract_end_counts_the_members_of_every_status() {
    let (fake, connector) = two_audiences().await;
    // Acme's audience gets a member of each status its statistics leave out (pending:
    // signed up, not yet confirmed; transactional: never subscribed to marketing), and a
    // cleaned one: six members, four of them in the statistics.
    for (address, first, last, status) in [
        ("aino.laine@example.fi", "Aino", "Laine", "pending"),
        ("eero.salo@example.fi", "Eero", "Salo", "transactional"),
        ("veera.makinen@example.fi", "Veera", "Mäkinen", "cleaned"),
    ] {
        let hash = fake.subscribe(address, first, last);
        fake.set_status(ACME_LIST, &hash, status);
    }

    // The export reports its total before the first page: here the count passes and the
    // first page fails, so the total is what is left to see.
    {
        let mut a = fake.audience();
        a.healthy_calls = 1;
        a.unavailable_gets = 1;
    }
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join("ce"), vec![]);
    sink.reset().await.unwrap();
    let (j, seen) = job("acme", BulkOp::Export, Some(sink.clone()));
    let err = connector.run_bulk(&j).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(*seen.borrow(), members_progress(0, 6));
    sink.reset().await.unwrap();
    let out = connector.run_bulk(&j).await.unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 6,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(*seen.borrow(), members_progress(6, 6));
    let bytes = std::fs::read(dir.path().join("ce/members.json")).unwrap();
    let members: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
    let mut statuses: Vec<&str> = members
        .iter()
        .map(|m| m["status"].as_str().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [
            "cleaned",
            "pending",
            "subscribed",
            "subscribed",
            "transactional",
            "unsubscribed"
        ]
    );

    // The erasure's count goes into its handle, its progress and the erased count that
    // deletion certificates list. The first check still sees the audience, so the count is
    // also carried through a confirmation.
    fake.audience().list_forget_after_gets = 1;
    let (j, seen) = job("acme", BulkOp::Erase, None);
    let out = connector.run_bulk(&j).await.unwrap();
    let Outcome::Accepted { handle, .. } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, format!("audience:{ACME_LIST}:6"));
    assert_eq!(*seen.borrow(), members_progress(0, 6));
    let confirm = BulkJob {
        phase: Phase::Confirm { handle },
        ..j.clone()
    };
    let out = connector.run_bulk(&confirm).await.unwrap();
    let Outcome::Completed {
        records_affected: 6,
        erased,
        note,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert!(note.contains("with its 6 members"), "{note}");
    assert_eq!(
        erased,
        &[ErasedCount {
            target: format!("audience {ACME_LIST}"),
            action: "deleted".into(),
            count: 6,
        }]
    );
    assert_eq!(
        *seen.borrow(),
        BulkProgress {
            erased: erased.to_vec(),
            ..members_progress(6, 6)
        }
    );
    assert_eq!(fake.members_of(ACME_LIST), None);
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
}

#[tokio::test]
async fn a_compliance_review_during_a_bulk_step_is_permanent_and_deletes_nothing() {
    let (fake, connector) = two_audiences().await;
    fake.audience().compliance_review = true;
    for op in [BulkOp::Erase, BulkOp::Export] {
        let dir = tempfile::tempdir().unwrap();
        let sink = ExportSink::new(dir.path().join("ce"), vec![]);
        sink.reset().await.unwrap();
        let (j, _) = job("globex", op, Some(sink));
        let err = connector.run_bulk(&j).await.unwrap_err();
        assert!(
            matches!(&err, ConnectorError::Permanent(m) if m.contains("compliance review")),
            "{op:?}: {err:?}"
        );
        assert!(!err.is_transient());
    }
    // Each step stopped at its first call, the count.
    assert_eq!(
        fake.audience().calls,
        vec![format!("GET /3.0/lists/{GLOBEX_LIST}/members"); 2]
    );
    fake.audience().compliance_review = false;
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
}

#[tokio::test]
async fn a_rate_limited_bulk_step_asks_to_retry_after_the_header() {
    let (fake, connector) = two_audiences().await;
    fake.audience().rate_limited = 1;
    let (j, _) = job("acme", BulkOp::Erase, None);
    let err = connector.run_bulk(&j).await.unwrap_err();
    assert_eq!(err.retry_after_ms(), Some(1_000), "{err:?}");
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 3);
}

#[tokio::test]
async fn an_audience_still_returned_after_its_deletion_is_accepted_then_confirmed() {
    let (fake, connector) = two_audiences().await;
    // The check right after the delete and the first confirmation still see the audience.
    fake.audience().list_forget_after_gets = 2;
    let (j, seen) = job("acme", BulkOp::Erase, None);
    let out = connector.run_bulk(&j).await.unwrap();
    let Outcome::Accepted { handle, note } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, format!("audience:{ACME_LIST}:3"));
    assert!(note.contains("still returns it"), "{note}");
    assert_eq!(seen.borrow().subjects_done, 0);
    let confirm = BulkJob {
        phase: Phase::Confirm { handle },
        ..j.clone()
    };
    let out = connector.run_bulk(&confirm).await.unwrap();
    assert!(matches!(out, Outcome::Accepted { .. }), "{out:?}");
    let out = connector.run_bulk(&confirm).await.unwrap();
    let Outcome::Completed { erased, .. } = &out else {
        panic!("{out:?}");
    };
    assert_eq!(erased[0].count, 3);
    assert_eq!(seen.borrow().subjects_done, 3);
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
}

#[tokio::test]
async fn a_lost_answer_to_an_audience_delete_is_confirmed_by_reading() {
    let (fake, _) = two_audiences().await;
    let connector = MailchimpConnector::new(MailchimpConfig {
        timeout_ms: 200,
        ..scoped_config(&fake.base_url)
    })
    .unwrap();
    // The count passes; the delete takes effect and answers after the timeout.
    let lose_the_delete = |reading_fails: bool| {
        let mut a = fake.audience();
        a.healthy_calls = 1;
        a.late_answers = 1;
        a.late_answer_ms = 1_000;
        a.unavailable_gets = u32::from(reading_fails);
    };
    lose_the_delete(false);
    let (j, _) = job("acme", BulkOp::Erase, None);
    let out = connector.run_bulk(&j).await.unwrap();
    let Outcome::Completed {
        records_affected: 3,
        note,
        erased,
        ..
    } = &out
    else {
        panic!("{out:?}");
    };
    assert!(
        note.contains("answer to this job's deletion was lost"),
        "{note}"
    );
    assert_eq!(erased[0].count, 3);
    assert_eq!(fake.members_of(ACME_LIST), None);

    // The reading right after fails too: ACCEPTED with the handle, not an error whose retry
    // would count a missing audience and fail for good.
    lose_the_delete(true);
    let (j, _) = job("globex", BulkOp::Erase, None);
    let out = connector.run_bulk(&j).await.unwrap();
    let Outcome::Accepted { handle, note } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, format!("audience:?{GLOBEX_LIST}:2"));
    assert!(note.contains("its answer was lost"), "{note}");
    assert_clean(&note);
    let confirm = BulkJob {
        phase: Phase::Confirm { handle },
        ..j.clone()
    };
    let out = connector.run_bulk(&confirm).await.unwrap();
    let Outcome::Completed { erased, .. } = &out else {
        panic!("{out:?}");
    };
    assert_eq!(erased[0].count, 2);
    assert_eq!(fake.members_of(GLOBEX_LIST), None);
    let deletes = fake
        .audience()
        .calls
        .iter()
        .filter(|c| c.starts_with("DELETE"))
        .count();
    assert_eq!(deletes, 2, "one per audience; confirming only reads");
}

#[tokio::test]
async fn an_audience_delete_that_went_unanswered_and_did_not_land_is_sent_again() {
    let (fake, connector) = two_audiences().await;
    let (j, _) = job("globex", BulkOp::Erase, None);
    let confirm = BulkJob {
        phase: Phase::Confirm {
            handle: format!("audience:?{GLOBEX_LIST}:2"),
        },
        ..j.clone()
    };
    let out = connector.run_bulk(&confirm).await.unwrap();
    let Outcome::Accepted { handle, .. } = out else {
        panic!("{out:?}");
    };
    assert_eq!(
        handle,
        format!("audience:{GLOBEX_LIST}:2"),
        "sent again, and answered"
    );
    assert_eq!(fake.members_of(GLOBEX_LIST), None);
    let confirm = BulkJob {
        phase: Phase::Confirm { handle },
        ..j.clone()
    };
    let out = connector.run_bulk(&confirm).await.unwrap();
    assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 3);
}

/// The erasure after a return: a member who signed up after the export stops it before the
/// delete, the audience whole, with a permanent error saying how many arrived; holding only
/// what was returned, it records its count with the processor, then deletes as before.
#[tokio::test]
async fn a_bulk_erasure_after_a_return_refuses_sign_ups_since_the_export() {
    let (fake, connector) = two_audiences().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join("ce"), vec![]);
    sink.reset().await.unwrap();
    let (export, seen) = job("acme", BulkOp::Export, Some(sink));
    connector.run_bulk(&export).await.unwrap();
    let returned = seen.borrow().clone();
    assert_eq!(returned, members_progress(3, 3));

    let newcomer = fake.subscribe(PEKKA, "Pekka", "Nieminen");
    fake.audience().calls.clear();
    let (erase, _) = job("acme", BulkOp::Erase, None);
    let erase = BulkJob {
        returned: Some(returned),
        ..erase
    };
    let err = connector.run_bulk(&erase).await.unwrap_err();
    let ConnectorError::Permanent(m) = &err else {
        panic!("{err:?}");
    };
    assert!(
        m.starts_with(&format!(
            "mailchimp audience {ACME_LIST}: 1 record(s) (1 subject(s)) of controller acme \
             arrived after the contract end's export"
        )),
        "{m}"
    );
    assert!(m.contains("nothing was erased there"), "{m}");
    assert!(m.contains("ends the contract again"), "{m}");
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 4);
    assert_eq!(
        fake.audience().calls,
        [format!("GET /3.0/lists/{ACME_LIST}/members")]
    );

    // Only what was returned is held again: the count is recorded before the delete, and a
    // recorder that cannot record it stops the erasure there.
    fake.audience().members.remove(&newcomer);
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 3);
    for (answer, deleted) in [(Err("lease lost".to_string()), false), (Ok(()), true)] {
        fake.audience().calls.clear();
        let (progress, _seen, mut asked) = ProgressReporter::recorded();
        let erase = BulkJob {
            progress,
            ..erase.clone()
        };
        let record = async {
            let r = asked.recv().await.expect("asked to record");
            let calls = fake.audience().calls.clone();
            let _ = r.done.send(answer.clone());
            (r.progress, calls)
        };
        let (out, (recorded, calls_then)) = tokio::join!(connector.run_bulk(&erase), record);
        assert_eq!(recorded, members_progress(0, 3));
        assert_eq!(
            calls_then,
            [format!("GET /3.0/lists/{ACME_LIST}/members")],
            "recorded before the delete"
        );
        match (out, deleted) {
            (Ok(Outcome::Completed { erased, .. }), true) => assert_eq!(erased[0].count, 3),
            (Err(e), false) => assert!(e.is_transient(), "{e:?}"),
            (out, _) => panic!("{out:?}"),
        }
        assert_eq!(fake.members_of(ACME_LIST).is_none(), deleted);
    }
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
}

/// Calls the fake API as the audience's sign-up form or its staff would: `method` on the
/// `path` under acme's member `email` (empty for the member itself), with a JSON `body`.
async fn call_as_staff(fake: &FakeMailchimp, method: &str, email: &str, path: &str, body: &str) {
    let hash = subscriber_hash(email);
    let url = format!("{}/lists/{ACME_LIST}/members/{hash}{path}", fake.base_url);
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let answer = reqwest::Client::new()
        .request(method, url)
        .basic_auth("staff", Some(KEY))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = answer.status();
    assert!(
        status.is_success(),
        "{status}: {}",
        answer.text().await.unwrap()
    );
}

/// A member deleted between two pages of an export shifts the later pages forward by one, past
/// a member never read: the export fails transiently, to be run again whole, instead of
/// completing without that member; run again, it has every member left.
#[tokio::test]
async fn a_member_leaving_during_a_bulk_export_fails_it_transiently() {
    let (fake, connector) = two_audiences().await;
    // Pages of 2 in subscriber-hash order: the first member leaves after the first page.
    let mut acme = [MAIJA, MATTI, LIISA];
    acme.sort_by_key(|address| subscriber_hash(address));
    let [leaving, rest @ ..] = acme;
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join("ce"), vec![]);
    sink.reset().await.unwrap();
    let (j, _seen) = job("acme", BulkOp::Export, Some(sink.clone()));
    // The count and the first page are answered; the second page waits for the deletion.
    let (arrived, release) = fake.hold_members_listing(2);
    let leave = async {
        arrived.await.unwrap();
        call_as_staff(&fake, "POST", leaving, "/actions/delete-permanent", "").await;
        release.send(()).unwrap();
    };
    let (result, ()) = tokio::join!(connector.run_bulk(&j), leave);
    let err = result.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "audience {ACME_LIST} changed during the export (3 members when it started, 2 now)"
        )),
        "{message}"
    );
    assert!(
        message.ends_with(
            "a page may have skipped one; the processor runs the export again, until the \
             request's due date"
        ),
        "{message}"
    );
    assert_clean(&message);
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 2);

    sink.reset().await.unwrap();
    let out = connector.run_bulk(&j).await.unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 2,
                ..
            }
        ),
        "{out:?}"
    );
    let bytes = std::fs::read(dir.path().join("ce/members.json")).unwrap();
    let members: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
    let addresses: Vec<&str> = members
        .iter()
        .map(|m| m["email_address"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, rest);
}

/// A member who signs up during an export fails it transiently; the processor starts it again
/// and this run, whole again, returns that member too. The erasure handed that last start's
/// time (as the processor records it) passes its checks and deletes the audience; handed the
/// first start's, it would refuse the very member the last run returned.
#[tokio::test]
async fn a_bulk_erasure_after_an_export_run_again_for_a_sign_up_deletes() {
    let (fake, connector) = two_audiences().await;
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join("ce"), vec![]);
    sink.reset().await.unwrap();
    let (export, seen) = job("acme", BulkOp::Export, Some(sink.clone()));
    let first_start = chrono::Utc::now();
    // The count and the first page are answered; the second page waits for the sign-up.
    let (arrived, release) = fake.hold_members_listing(2);
    let sign_up = async {
        arrived.await.unwrap();
        let body = format!(r#"{{"email_address":"{PEKKA}","status_if_new":"subscribed"}}"#);
        call_as_staff(&fake, "PUT", PEKKA, "", &body).await;
        release.send(()).unwrap();
    };
    let (result, ()) = tokio::join!(connector.run_bulk(&export), sign_up);
    let err = result.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    // The processor starts the export again after a backoff of minutes, not at once: the
    // first start and the sign-up are dated five minutes back, past the check's margin.
    let back = chrono::Duration::minutes(5);
    let first_start = (first_start - back).timestamp_millis();
    {
        let mut audience = fake.audience();
        let member = audience.members.get_mut(&subscriber_hash(PEKKA)).unwrap();
        let changed = member["last_changed"].as_str().unwrap();
        let changed = chrono::DateTime::parse_from_rfc3339(changed).unwrap() - back;
        let changed = changed.to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
        member["last_changed"] = Value::String(changed);
    }
    sink.reset().await.unwrap();
    let last_start = chrono::Utc::now().timestamp_millis();
    let out = connector.run_bulk(&export).await.unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 4,
                ..
            }
        ),
        "{out:?}"
    );
    let returned = seen.borrow().clone();
    assert_eq!(returned, members_progress(4, 4));
    let erasure = |since: i64| BulkJob {
        returned: Some(returned.clone()),
        returned_since_ms: Some(since),
        ..job("acme", BulkOp::Erase, None).0
    };

    let err = connector.run_bulk(&erasure(first_start)).await.unwrap_err();
    let ConnectorError::Permanent(m) = &err else {
        panic!("{err:?}");
    };
    assert!(
        m.contains("1 member(s) of controller acme signed up"),
        "{m}"
    );
    assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 4);

    let out = connector.run_bulk(&erasure(last_start)).await.unwrap();
    let Outcome::Completed { erased, .. } = &out else {
        panic!("{out:?}");
    };
    assert_eq!(erased[0].count, 4);
    assert_eq!(fake.members_of(ACME_LIST), None);
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
}

/// Exports acme's audience as a contract end's return does; the erasure that follows it,
/// handed the export's counts and its start.
async fn returned_erasure(connector: &MailchimpConnector) -> (BulkJob, i64) {
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join("ce"), vec![]);
    sink.reset().await.unwrap();
    let started = chrono::Utc::now().timestamp_millis();
    let (export, seen) = job("acme", BulkOp::Export, Some(sink));
    connector.run_bulk(&export).await.unwrap();
    let returned = seen.borrow().clone();
    assert_eq!(returned, members_progress(3, 3));
    let (erase, _) = job("acme", BulkOp::Erase, None);
    let erase = BulkJob {
        returned: Some(returned),
        returned_since_ms: Some(started),
        ..erase
    };
    (erase, started)
}

/// The erasure after a return that knows when the export started: members who signed up or
/// changed since stop it before the delete even when the totals match (a sign-up offset by a
/// deletion), with a permanent error saying how many; nothing is deleted.
#[tokio::test]
async fn a_bulk_erasure_after_a_return_refuses_members_changed_since_the_export() {
    for change in ["sign-up offset by a deletion", "a member changed"] {
        let (fake, connector) = two_audiences().await;
        let (erase, started) = returned_erasure(&connector).await;
        if change == "a member changed" {
            let body = r#"{"merge_fields":{"LNAME":"Virtanen"}}"#;
            call_as_staff(&fake, "PATCH", MAIJA, "", body).await;
        } else {
            let body = format!(r#"{{"email_address":"{PEKKA}","status_if_new":"subscribed"}}"#);
            call_as_staff(&fake, "PUT", PEKKA, "", &body).await;
            call_as_staff(&fake, "POST", LIISA, "/actions/delete-permanent", "").await;
        }
        assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 3, "{change}");
        fake.audience().calls.clear();
        let err = connector.run_bulk(&erase).await.unwrap_err();
        let ConnectorError::Permanent(m) = &err else {
            panic!("{change}: {err:?}");
        };
        let at = chrono::DateTime::from_timestamp_millis(started).unwrap();
        let at = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        assert!(
            m.starts_with(&format!(
                "mailchimp audience {ACME_LIST}: 1 member(s) of controller acme signed up or \
                 changed since the contract end's export at {at} "
            )),
            "{change}: {m}"
        );
        assert!(
            m.contains("never returned; nothing was erased there"),
            "{m}"
        );
        assert!(
            m.contains("ends the contract again with RETURN_THEN_DELETE"),
            "{m}"
        );
        assert_eq!(fake.members_of(ACME_LIST).unwrap().len(), 3, "{change}");
        let members = format!("GET /3.0/lists/{ACME_LIST}/members");
        assert_eq!(
            fake.audience().calls,
            [members.clone(), members],
            "{change}"
        );
        assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
    }
}

/// Nothing changed since the export, only a member deleted (not in the list, so not counted):
/// the erasure passes its checks and deletes the audience.
#[tokio::test]
async fn a_bulk_erasure_after_a_return_with_no_change_since_deletes() {
    let (fake, connector) = two_audiences().await;
    let (erase, _) = returned_erasure(&connector).await;
    call_as_staff(&fake, "POST", LIISA, "/actions/delete-permanent", "").await;
    let out = connector.run_bulk(&erase).await.unwrap();
    let Outcome::Completed { erased, .. } = &out else {
        panic!("{out:?}");
    };
    assert_eq!(erased[0].count, 2);
    assert_eq!(fake.members_of(ACME_LIST), None);
    assert_eq!(fake.members_of(GLOBEX_LIST).unwrap(), globex_members());
}

/// The fake's `since_last_changed`: members added or changed through the API after the time
/// are listed and counted, arranged ones (an old date) are not, and a value that is not a
/// time answers 400 as Mailchimp does.
#[tokio::test]
async fn the_fake_mailchimp_lists_members_changed_since_a_time() {
    let (fake, _) = two_audiences().await;
    let body = format!(r#"{{"email_address":"{PEKKA}","status_if_new":"pending"}}"#);
    call_as_staff(&fake, "PUT", PEKKA, "", &body).await;
    let get = |since: &str| {
        let url = format!(
            "{}/lists/{ACME_LIST}/members?since_last_changed={since}",
            fake.base_url
        );
        async move {
            let r = reqwest::Client::new()
                .get(url)
                .basic_auth("staff", Some(KEY))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (status, doc) = get("2025-01-01T00:00:00%2B00:00").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["total_items"], 1, "{doc}");
    assert_eq!(doc["members"][0]["email_address"], PEKKA, "{doc}");
    let (_, doc) = get("2024-01-01T00:00:00Z").await;
    assert_eq!(doc["total_items"], 4, "{doc}");
    for bad in ["yesterday", "2025-01-01T00:00:00+00:00"] {
        let (status, doc) = get(bad).await;
        assert_eq!(status, 400, "{bad}: {doc}");
        assert_eq!(doc["errors"][0]["field"], "since_last_changed", "{doc}");
    }
}
