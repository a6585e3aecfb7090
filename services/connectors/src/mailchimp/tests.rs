//! The connector against the fake Mailchimp API, and the helpers the other modules' tests
//! share.

use dsrelay_proto::v1::{FieldCorrection, RequestParameters};

use super::fake::{subscriber_hash, FakeMailchimp};
use super::*;
use crate::config::ConnectorConfig;

pub(super) const KEY: &str = "0123456789abcdef0123456789abcdef-us21";
pub(super) const LIST: &str = "a1b2c3d4e5";
pub(super) const MAIJA: &str = "Maija.Meikalainen@Example.fi";

pub(super) fn email(value: &str) -> SubjectIdentity {
    SubjectIdentity {
        r#type: IdentityType::Email as i32,
        encoding: IdentityEncoding::Raw as i32,
        value: value.into(),
        label: String::new(),
    }
}

fn md5_email(hash: &str) -> SubjectIdentity {
    SubjectIdentity {
        encoding: IdentityEncoding::Md5 as i32,
        ..email(hash)
    }
}

pub(super) fn task(kind: RequestKind, identities: Vec<SubjectIdentity>) -> Task {
    Task {
        task_id: "c/r1/newsletter".into(),
        request_id: "r1".into(),
        controller: "acme".into(),
        kind,
        identities,
        categories: Vec::new(),
        parameters: RequestParameters::default(),
        due_at_ms: 2_000_000_000_000,
        now_ms: 1_700_000_000_000,
        phase: Phase::Start,
        interrupted: false,
        export: None,
    }
}

pub(super) fn config(base_url: &str) -> MailchimpConfig {
    MailchimpConfig {
        base_url: base_url.into(),
        api_key: KEY.into(),
        list_id: LIST.into(),
        timeout_ms: 5_000,
        merge_fields: default_merge_fields(),
        page_size: 2,
        controllers: BTreeMap::new(),
    }
}

async fn setup() -> (FakeMailchimp, MailchimpConnector, String) {
    let fake = FakeMailchimp::start(KEY, LIST).await.unwrap();
    let hash = fake.subscribe(MAIJA, "Maija", "Meikäläinen");
    fake.subscribe("someone.else@example.fi", "Matti", "Virtanen");
    let connector = MailchimpConnector::new(config(&fake.base_url)).unwrap();
    (fake, connector, hash)
}

pub(super) fn assert_clean(message: &str) {
    let lower = message.to_lowercase();
    assert!(!lower.contains("maija.meikalainen"), "{message}");
    assert!(!lower.contains('@'), "{message}");
    assert!(!message.contains(KEY), "{message}");
}

#[tokio::test]
async fn erasure_deletes_permanently_and_confirms_the_member_is_gone() {
    let (fake, connector, hash) = setup().await;
    // Padded and in another case than stored, as a partner might send it.
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            vec![email(" MAIJA.meikalainen@example.FI ")],
        ))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        files,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    assert!(files.is_empty());
    assert!(note.contains(&hash), "{note}");
    assert_clean(&note);
    assert!(fake.member(&hash).is_none());
    assert_eq!(fake.audience().members.len(), 1);
    assert_eq!(
        fake.audience().calls,
        [
            format!("POST /3.0/lists/{LIST}/members/{hash}/actions/delete-permanent"),
            format!("GET /3.0/lists/{LIST}/members/{hash}"),
        ]
    );
}

#[tokio::test]
async fn erasure_of_an_unknown_member_is_not_found() {
    let (fake, connector, _) = setup().await;
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            vec![email("nobody@example.fi")],
        ))
        .await
        .unwrap();
    let Outcome::NotFound { note } = out else {
        panic!("{out:?}");
    };
    assert!(
        note.contains(&subscriber_hash("nobody@example.fi")),
        "{note}"
    );
    assert_clean(&note);
    assert_eq!(fake.audience().members.len(), 2);
}

#[tokio::test]
async fn a_wrong_list_id_is_permanent_not_a_false_not_found() {
    let (fake, _, _) = setup().await;
    let connector = MailchimpConnector::new(MailchimpConfig {
        list_id: "ffffffffff".into(),
        ..config(&fake.base_url)
    })
    .unwrap();
    let err = connector
        .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Permanent(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("audience ffffffffff was not found"),
        "{err}"
    );
    assert_eq!(fake.audience().members.len(), 2);
}

#[tokio::test]
async fn an_md5_identity_is_the_subscriber_hash() {
    let (fake, connector, hash) = setup().await;
    let ids = vec![
        md5_email(&hash),
        // Identities that cannot address a member are ignored, not errors.
        SubjectIdentity {
            r#type: IdentityType::Phone as i32,
            ..email("+358401234567")
        },
    ];
    let out = connector
        .run(&task(RequestKind::Erasure, ids))
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 1,
                ..
            }
        ),
        "{out:?}"
    );
    assert!(fake.member(&hash).is_none());
}

#[tokio::test]
async fn raw_and_md5_of_one_address_count_once_and_two_addresses_twice() {
    let (fake, connector, hash) = setup().await;
    let other = subscriber_hash("someone.else@example.fi");
    let ids = vec![email(MAIJA), md5_email(&hash), md5_email(&other)];
    let out = connector
        .run(&task(RequestKind::Erasure, ids))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected: 2,
        erased,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    // The certificate of an erasure says where: one count for the audience.
    assert_eq!(erased.len(), 1, "{erased:?}");
    assert_eq!((erased[0].action.as_str(), erased[0].count), ("deleted", 2));
    assert!(erased[0].target.starts_with("audience "), "{erased:?}");
    assert!(fake.audience().members.is_empty());
}

#[tokio::test]
async fn without_an_email_identity_the_task_is_refused() {
    let (_fake, connector, hash) = setup().await;
    let sha256 = SubjectIdentity {
        encoding: IdentityEncoding::Sha256 as i32,
        ..email(&"a".repeat(64))
    };
    let phone = SubjectIdentity {
        r#type: IdentityType::Phone as i32,
        ..email("+358401234567")
    };
    // An MD5 value of the wrong shape cannot be a member id (and must not reach a path).
    let bad_md5 = md5_email(&format!("{hash}/../x"));
    // Only the partner can give an address: a refusal, not a failure for an operator.
    let outcome = connector
        .run(&task(RequestKind::Erasure, vec![sha256, phone, bad_md5]))
        .await
        .unwrap();
    let Outcome::Refused { reason } = outcome else {
        panic!("expected a refusal, got {outcome:?}");
    };
    assert!(
        reason.contains("needs an e-mail address (raw or MD5)"),
        "{reason}"
    );
    // What ListSubprocessors reports it can match.
    assert_eq!(
        connector.matchable_identities(),
        [
            (IdentityType::Email, IdentityEncoding::Raw),
            (IdentityType::Email, IdentityEncoding::Md5)
        ]
    );
}

fn sha256_email(address: &str) -> SubjectIdentity {
    let hash = digest(
        IdentityEncoding::Sha256,
        &normalize(IdentityType::Email, address),
    );
    SubjectIdentity {
        encoding: IdentityEncoding::Sha256 as i32,
        ..email(&hash.unwrap())
    }
}

const NOT_SEARCHED_SHA256: &str = "not searched: 1 e-mail given as SHA-256 (Mailchimp keys \
                                   members by the MD5 of the address)";

#[tokio::test]
async fn an_unsearched_sha256_identity_is_named_in_the_completed_note() {
    let (fake, connector, hash) = setup().await;
    let other = sha256_email("someone.else@example.fi");
    let ids = vec![email(MAIJA), other.clone()];
    let out = connector
        .run(&task(RequestKind::Erasure, ids))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    assert!(note.contains(&hash), "{note}");
    assert!(note.contains(NOT_SEARCHED_SHA256), "{note}");
    assert!(!note.contains(&other.value), "{note}");
    assert_clean(&note);
    // Only the raw address was searched: the other member is untouched.
    assert_eq!(fake.audience().members.len(), 1);

    // The same holds for the kinds that change a member rather than delete it.
    let ids = vec![email("someone.else@example.fi"), sha256_email(MAIJA)];
    let out = connector
        .run(&task(RequestKind::Objection, ids))
        .await
        .unwrap();
    assert!(
        matches!(&out, Outcome::Completed { note, .. } if note.contains(NOT_SEARCHED_SHA256)),
        "{out:?}"
    );
}

#[tokio::test]
async fn an_unsearched_sha256_identity_is_named_in_the_not_found_note() {
    let (fake, connector, _) = setup().await;
    let other = sha256_email(MAIJA);
    let ids = vec![email("nobody@example.fi"), other.clone()];
    let out = connector
        .run(&task(RequestKind::Erasure, ids))
        .await
        .unwrap();
    let Outcome::NotFound { note } = out else {
        panic!("{out:?}");
    };
    assert!(
        note.contains(&subscriber_hash("nobody@example.fi")),
        "{note}"
    );
    assert!(note.contains(NOT_SEARCHED_SHA256), "{note}");
    assert!(!note.contains(&other.value), "{note}");
    assert_clean(&note);
    assert_eq!(fake.audience().members.len(), 2);
}

#[tokio::test]
async fn only_identities_not_searched_in_any_form_are_named() {
    let (fake, connector, _) = setup().await;
    // The first GET after the delete still sees the member, so the note of an ACCEPTED shows.
    fake.audience().forget_after_gets = 1;
    // The SHA-256 of the raw address is covered by it; the phone and customer number are not.
    let ids = vec![
        email(MAIJA),
        sha256_email(MAIJA),
        SubjectIdentity {
            r#type: IdentityType::Phone as i32,
            ..email("+358401234567")
        },
        SubjectIdentity {
            r#type: IdentityType::CustomerNumber as i32,
            ..email("C-1001")
        },
    ];
    let mut t = task(RequestKind::Erasure, ids);
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, note } = out else {
        panic!("{out:?}");
    };
    assert!(
        note.ends_with(
            "not searched: 1 phone number (Mailchimp finds members only by e-mail address); \
             1 customer number (Mailchimp finds members only by e-mail address)"
        ),
        "{note}"
    );
    assert!(
        !note.contains("SHA-256") && !note.contains("C-1001"),
        "{note}"
    );
    assert!(!note.contains("358401234567"), "{note}");
    t.phase = Phase::Confirm { handle };
    let done = connector.run(&t).await.unwrap();
    assert!(
        matches!(&done, Outcome::Completed { note, .. } if note.contains("1 phone number")),
        "{done:?}"
    );
}

#[tokio::test]
async fn slow_forgetting_is_accepted_then_confirmed() {
    let (fake, connector, hash) = setup().await;
    fake.audience().forget_after_gets = 2;
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, note } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, hash);
    assert!(note.contains("still returns"), "{note}");
    assert_clean(&note);
    // The processor asks again with the handle; the second GET still sees the member.
    t.phase = Phase::Confirm {
        handle: handle.clone(),
    };
    let again = connector.run(&t).await.unwrap();
    assert!(
        matches!(&again, Outcome::Accepted { handle: h, .. } if *h == handle),
        "{again:?}"
    );
    let done = connector.run(&t).await.unwrap();
    assert!(
        matches!(
            done,
            Outcome::Completed {
                records_affected: 1,
                ..
            }
        ),
        "{done:?}"
    );
    // Confirming deletes nothing more: one POST in all.
    let posts = fake
        .audience()
        .calls
        .iter()
        .filter(|c| c.starts_with("POST"))
        .count();
    assert_eq!(posts, 1);
}

#[tokio::test]
async fn a_failed_check_after_deleting_keeps_the_handle() {
    let (fake, connector, hash) = setup().await;
    // The delete goes through, the check after it fails.
    fake.audience().unavailable_gets = 1;
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, note } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, hash);
    assert!(
        note.contains("checking that it is gone failed") && note.contains("503"),
        "{note}"
    );
    assert!(fake.member(&hash).is_none());
    // The confirmation is a transient error while the API is down, then COMPLETED: not
    // the NOT_FOUND a fresh start would find.
    fake.audience().unavailable_gets = 1;
    t.phase = Phase::Confirm { handle };
    let err = connector.run(&t).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Transient(_)), "{err:?}");
    let done = connector.run(&t).await.unwrap();
    assert!(
        matches!(
            done,
            Outcome::Completed {
                records_affected: 1,
                ..
            }
        ),
        "{done:?}"
    );
}

#[tokio::test]
async fn rate_limiting_asks_to_retry_after_the_header() {
    let (fake, connector, hash) = setup().await;
    fake.audience().rate_limited = 1;
    let t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    let err = connector.run(&t).await.unwrap_err();
    let ConnectorError::RetryAfter { message, after_ms } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*after_ms, 1000);
    assert!(
        message.contains("429") && message.contains("Too Many Requests"),
        "{message}"
    );
    assert!(err.is_transient());
    assert!(fake.member(&hash).is_some());
    // The limit passed: the retry goes through.
    let out = connector.run(&t).await.unwrap();
    assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
}

#[tokio::test]
async fn service_unavailable_is_transient() {
    let (fake, connector, hash) = setup().await;
    fake.audience().unavailable = 1;
    let err = connector
        .run(&task(RequestKind::Objection, vec![email(MAIJA)]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Transient(m) if m.contains("503")),
        "{err:?}"
    );
    assert_eq!(fake.member(&hash).unwrap()["status"], "subscribed");
}

#[tokio::test]
async fn an_account_under_compliance_review_is_permanent() {
    let (fake, connector, hash) = setup().await;
    fake.audience().compliance_review = true;
    let err = connector
        .run(&task(RequestKind::Objection, vec![email(MAIJA)]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Permanent(m)
            if m.contains("503") && m.contains("compliance review")),
        "{err:?}"
    );
    fake.audience().compliance_review = false;
    assert_eq!(fake.member(&hash).unwrap()["status"], "subscribed");
}

#[tokio::test]
async fn one_account_never_has_more_calls_in_flight_than_mailchimp_allows() {
    let fake = FakeMailchimp::start(KEY, LIST).await.unwrap();
    fake.audience().delay_ms = 100;
    // Two audiences' connectors of one account share its connections.
    let a = api::Api::new(&config(&fake.base_url), LIST).unwrap();
    let b = api::Api::new(&config(&fake.base_url), LIST).unwrap();
    let scrub = scrub::Scrubber::for_task(&task(RequestKind::Erasure, vec![email(MAIJA)]), KEY);
    let calls = (0..3 * api::MAX_CONNECTIONS_PER_ACCOUNT).map(|i| {
        let api = if i % 2 == 0 { &a } else { &b };
        api.get_list(&scrub)
    });
    for reply in futures::future::join_all(calls).await {
        assert!(matches!(reply, Ok(api::Reply::Done(_))));
    }
    let most = fake.audience().max_in_flight as usize;
    assert!(
        (2..=api::MAX_CONNECTIONS_PER_ACCOUNT).contains(&most),
        "{most} calls were in flight at once"
    );
}

#[tokio::test]
async fn a_refused_api_key_is_permanent_and_not_printed() {
    let (fake, _, hash) = setup().await;
    let wrong = "fedcba9876543210fedcba9876543210-us21";
    let connector = MailchimpConnector::new(MailchimpConfig {
        api_key: wrong.into(),
        ..config(&fake.base_url)
    })
    .unwrap();
    let err = connector
        .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
        .await
        .unwrap_err();
    let ConnectorError::Permanent(message) = &err else {
        panic!("{err:?}");
    };
    assert!(message.contains("the API key was refused"), "{message}");
    assert!(message.contains("401"), "{message}");
    assert!(
        !message.contains(wrong) && !message.contains("fedcba"),
        "{message}"
    );
    assert_clean(message);
    assert!(fake.member(&hash).is_some());
    assert!(!format!("{connector:?}").contains("fedcba"));
}

#[tokio::test]
async fn objection_unsubscribes_the_member() {
    let (fake, connector, hash) = setup().await;
    let out = connector
        .run(&task(RequestKind::Objection, vec![email(MAIJA)]))
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Completed {
                records_affected: 1,
                ..
            }
        ),
        "{out:?}"
    );
    let member = fake.member(&hash).unwrap();
    assert_eq!(member["status"], "unsubscribed");
    // Unsubscribing keeps the member (that is what suppresses future mail), and changes its
    // status only: the address keeps its spelling, although the request spells it otherwise.
    assert_eq!(member["merge_fields"]["FNAME"], "Maija");
    assert_eq!(member["email_address"], MAIJA);
    assert_eq!(
        fake.audience().calls,
        [format!("PATCH /3.0/lists/{LIST}/members/{hash}")]
    );
}

/// What the controller's import of `address` does through the API: an add-or-update that
/// would subscribe a new member.
async fn import(fake: &FakeMailchimp, address: &str) -> Value {
    let url = format!(
        "{}/lists/{LIST}/members/{}",
        fake.base_url,
        subscriber_hash(address)
    );
    let body = json!({
        "email_address": address,
        "status_if_new": "subscribed",
        "merge_fields": { "FNAME": "Imported" },
    });
    let response = reqwest::Client::new()
        .put(url)
        .basic_auth("import", Some(KEY))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn objection_for_an_address_not_in_the_audience_suppresses_it() {
    let (fake, connector, _) = setup().await;
    let nobody = "Nobody@Example.fi";
    let hash = subscriber_hash(nobody);
    let t = task(RequestKind::Objection, vec![email(nobody)]);
    let out = connector.run(&t).await.unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    assert!(note.contains(&format!("suppressed {hash}")), "{note}");
    assert_clean(&note);
    let member = fake.member(&hash).unwrap();
    assert_eq!(member["status"], "unsubscribed");
    assert_eq!(member["email_address"], nobody);
    let member_path = format!("/3.0/lists/{LIST}/members/{hash}");
    assert_eq!(
        fake.audience().calls,
        [format!("PATCH {member_path}"), format!("PUT {member_path}")]
    );
    // The controller's next import leaves it unsubscribed.
    let imported = import(&fake, nobody).await;
    assert_eq!(imported["status"], "unsubscribed");
    // Asked again, the suppressed address is a member to unsubscribe.
    let again = connector.run(&t).await.unwrap();
    assert!(
        matches!(&again, Outcome::Completed { note, .. } if note.contains("unsubscribed member")),
        "{again:?}"
    );
    assert_eq!(fake.audience().members.len(), 3);
}

#[tokio::test]
async fn objection_by_md5_alone_cannot_suppress_an_address_not_in_the_audience() {
    let (fake, connector, _) = setup().await;
    let hash = subscriber_hash("nobody@example.fi");
    let out = connector
        .run(&task(RequestKind::Objection, vec![md5_email(&hash)]))
        .await
        .unwrap();
    let Outcome::NotFound { note } = out else {
        panic!("{out:?}");
    };
    assert!(note.contains(&format!("no member {hash}")), "{note}");
    assert!(note.contains("no suppression was possible"), "{note}");
    let calls = fake.audience().calls.clone();
    assert!(calls.iter().all(|c| !c.starts_with("PUT")), "{calls:?}");
    assert_eq!(fake.audience().members.len(), 2);

    // With the address too, the member there is unsubscribed and the absent one suppressed.
    let maija = subscriber_hash(MAIJA);
    let ids = vec![
        md5_email(&maija),
        md5_email(&hash),
        email("nobody@example.fi"),
    ];
    let out = connector
        .run(&task(RequestKind::Objection, ids))
        .await
        .unwrap();
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
    assert_eq!(fake.member(&maija).unwrap()["status"], "unsubscribed");
    assert_eq!(fake.member(&hash).unwrap()["status"], "unsubscribed");
}

#[tokio::test]
async fn objection_after_a_permanent_deletion_is_not_found_and_adds_nothing() {
    let (fake, connector, hash) = setup().await;
    let erased = connector
        .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
        .await
        .unwrap();
    assert!(matches!(erased, Outcome::Completed { .. }), "{erased:?}");
    let out = connector
        .run(&task(RequestKind::Objection, vec![email(MAIJA)]))
        .await
        .unwrap();
    let Outcome::NotFound { note } = out else {
        panic!("{out:?}");
    };
    assert!(note.contains("permanently deleted"), "{note}");
    assert_clean(&note);
    assert!(fake.member(&hash).is_none());
}

#[tokio::test]
async fn objection_in_a_wrong_audience_is_permanent_and_adds_nothing() {
    let (fake, _, _) = setup().await;
    let connector = MailchimpConnector::new(MailchimpConfig {
        list_id: "ffffffffff".into(),
        ..config(&fake.base_url)
    })
    .unwrap();
    let err = connector
        .run(&task(
            RequestKind::Objection,
            vec![email("nobody@example.fi")],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Permanent(m) if m.contains("audience ffffffffff was not")),
        "{err:?}"
    );
    assert_eq!(fake.audience().members.len(), 2);
}

/// An export task whose files go to a fresh folder under `dir`.
async fn export_task(kind: RequestKind, who: &str, dir: &std::path::Path) -> Task {
    let sink = crate::ExportSink::new(dir.join(format!("{kind:?}")), vec!["newsletter".into()]);
    sink.reset().await.unwrap();
    Task {
        export: Some(sink),
        ..task(kind, vec![email(who)])
    }
}

/// The JSON file `name` that `task` wrote, checked against its reported size and digest.
pub(super) fn read_json(task: &Task, files: &[crate::ExportedFile], name: &str) -> Value {
    use sha2::Digest as _;
    let bytes = std::fs::read(task.export.as_ref().unwrap().dir().join(name)).unwrap();
    let meta = files.iter().find(|f| f.name == name).expect(name);
    assert_eq!(meta.size, bytes.len() as u64);
    assert_eq!(meta.sha256, hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(meta.media_type, "application/json");
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn return_of_data_and_transfer_export_the_member_its_notes_activity_and_events() {
    let (fake, connector, hash) = setup().await;
    // Pages of 2 (the test configuration): 5 notes take three pages, 4 activity items two
    // full ones, and no events one empty page.
    for i in 1..=5 {
        fake.add_note(&hash, &format!("soitti asiakaspalveluun {i}"));
    }
    for t in ["signup", "open", "click", "open"] {
        fake.add_activity(&hash, t);
    }
    let other = subscriber_hash("someone.else@example.fi");
    fake.add_note(&other, "not hers");
    let dir = tempfile::tempdir().unwrap();
    for kind in [RequestKind::ReturnOfData, RequestKind::Transfer] {
        fake.audience().calls.clear();
        let t = export_task(kind, MAIJA, dir.path()).await;
        let out = connector.run(&t).await.unwrap();
        let Outcome::Completed {
            records_affected: 1,
            note,
            files,
            ..
        } = out
        else {
            panic!("{out:?}");
        };
        assert_clean(&note);
        assert!(note.contains("(5 notes, 4 activity, 0 events)"), "{note}");
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        assert_eq!(
            names,
            ["member", "notes", "activity", "events"].map(|n| format!("{n}-{hash}.json"))
        );
        let m = read_json(&t, &files, &format!("member-{hash}.json"));
        assert_eq!(m["id"], hash.as_str());
        assert_eq!(m["email_address"], MAIJA);
        assert_eq!(m["status"], "subscribed");
        assert_eq!(m["merge_fields"]["LNAME"], "Meikäläinen");
        assert_eq!(m["tags"][0]["name"], "newsletter");
        assert_eq!(m["timestamp_opt"], "2024-03-01T09:30:12+00:00");
        assert_eq!(m["location"]["country_code"], "FI");
        assert!(m.get("_links").is_none());
        let notes = read_json(&t, &files, &format!("notes-{hash}.json"));
        let texts: Vec<&str> = notes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["note"].as_str().unwrap())
            .collect();
        assert_eq!(
            texts,
            (1..=5)
                .map(|i| format!("soitti asiakaspalveluun {i}"))
                .collect::<Vec<_>>()
        );
        assert!(notes[0].get("_links").is_none());
        let activity = read_json(&t, &files, &format!("activity-{hash}.json"));
        let types: Vec<&str> = activity
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["activity_type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["signup", "open", "click", "open"]);
        assert_eq!(
            read_json(&t, &files, &format!("events-{hash}.json")),
            json!([])
        );
        let calls = fake.audience().calls.clone();
        let member = format!("/3.0/lists/{LIST}/members/{hash}");
        let pages = |path: &str| {
            calls
                .iter()
                .filter(|c| **c == format!("GET {member}/{path}"))
                .count()
        };
        assert_eq!(
            (pages("notes"), pages("activity-feed"), pages("events")),
            (3, 2, 1),
            "{calls:?}"
        );
    }
    // Reading changes nothing.
    assert!(fake.member(&hash).is_some());
    let t = export_task(RequestKind::ReturnOfData, "nobody@example.fi", dir.path()).await;
    let out = connector.run(&t).await.unwrap();
    assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
    let left = std::fs::read_dir(t.export.as_ref().unwrap().dir())
        .unwrap()
        .count();
    assert_eq!(left, 0);
}

pub(super) fn corrections(pairs: &[(&str, &str)]) -> RequestParameters {
    RequestParameters {
        corrections: pairs
            .iter()
            .map(|(field, value)| FieldCorrection {
                field: (*field).into(),
                new_value: (*value).into(),
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn rectification_changes_the_email_and_merge_fields() {
    let (fake, connector, old_hash) = setup().await;
    let new_email = "maija.virtanen@example.fi";
    let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
    t.parameters = corrections(&[("email", new_email), ("first_name", "Maija-Liisa")]);
    let out = connector.run(&t).await.unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    // The id is the hash of the address, so it moves with it.
    let new_hash = subscriber_hash(new_email);
    assert!(
        note.contains(&format!("{old_hash} (now {new_hash})")),
        "{note}"
    );
    assert!(
        note.contains("email_address") && note.contains("FNAME"),
        "{note}"
    );
    assert!(
        !note.contains("Liisa") && !note.contains("virtanen"),
        "{note}"
    );
    assert!(fake.member(&old_hash).is_none());
    let member = fake.member(&new_hash).unwrap();
    assert_eq!(member["email_address"], new_email);
    assert_eq!(member["merge_fields"]["FNAME"], "Maija-Liisa");
    assert_eq!(member["merge_fields"]["LNAME"], "Meikäläinen");
    let patch = format!("PATCH /3.0/lists/{LIST}/members/{old_hash}");
    assert_eq!(fake.audience().calls, [patch]);
}

#[tokio::test]
async fn corrections_without_a_merge_field_are_left_out_and_named() {
    let (fake, connector, old_hash) = setup().await;
    let new_email = "maija.virtanen@example.fi";
    let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
    t.parameters = corrections(&[("email", new_email), ("address", "Mannerheimintie 1")]);
    let out = connector.run(&t).await.unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    let new_hash = subscriber_hash(new_email);
    assert!(
        note.contains(&format!(
            "corrected email_address of member {old_hash} (now {new_hash})"
        )),
        "{note}"
    );
    assert!(note.contains("not corrected: \"address\""), "{note}");
    assert!(note.contains("merge_fields"), "{note}");
    assert!(!note.contains("Mannerheimintie"), "{note}");
    assert_clean(&note);
    let member = fake.member(&new_hash).unwrap();
    assert_eq!(member["email_address"], new_email);
    assert_eq!(member["merge_fields"]["ADDRESS"], "");

    // A subject not in the audience: NOT_FOUND, still naming what could not be corrected.
    let mut t = task(RequestKind::Rectification, vec![email("nobody@example.fi")]);
    t.parameters = corrections(&[("first_name", "N"), ("address", "Mannerheimintie 1")]);
    let out = connector.run(&t).await.unwrap();
    assert!(
        matches!(&out, Outcome::NotFound { note } if note.contains("not corrected: \"address\"")),
        "{out:?}"
    );
}

/// The audience has no such field, which neither an operator nor a retry can change: the
/// holder refuses, whether or not the subject is a member, without a call.
#[tokio::test]
async fn an_unmapped_correction_is_refused_and_changes_nothing() {
    let (fake, connector, hash) = setup().await;
    for who in [MAIJA, "nobody@example.fi"] {
        let mut t = task(RequestKind::Rectification, vec![email(who)]);
        t.parameters = corrections(&[("address", "Mannerheimintie 1"), ("shoe_size", "38")]);
        let out = connector.run(&t).await.unwrap();
        let Outcome::Refused { reason } = &out else {
            panic!("{who}: {out:?}");
        };
        assert!(reason.contains("\"address\", \"shoe_size\""), "{reason}");
        assert!(reason.contains("merge_fields"), "{reason}");
        assert!(!reason.contains("Mannerheimintie"), "{reason}");
    }
    assert!(fake.audience().calls.is_empty());
    assert_eq!(
        fake.member(&hash).unwrap()["merge_fields"]["FNAME"],
        "Maija"
    );
}

#[tokio::test]
async fn a_lost_answer_to_an_address_correction_is_confirmed_by_reading() {
    let new_email = "maija.virtanen@example.fi";
    let new_hash = subscriber_hash(new_email);
    // The PATCH takes effect, and its answer comes too late or as a gateway's 502.
    for gateway in [false, true] {
        let (fake, connector, old_hash) = setup().await;
        let connector = if gateway {
            fake.audience().gateway_errors = 1;
            fake.audience().gateway_error = 502;
            connector
        } else {
            losing_the_next_answer(&fake)
        };
        let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
        t.parameters = corrections(&[("email", new_email), ("first_name", "Maija-Liisa")]);
        let err = connector.run(&t).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(
            fake.member(&old_hash).is_none(),
            "the correction took effect"
        );
        // The processor's retry: the old address answers 404, which is not NOT_FOUND.
        let out = connector.run(&t).await.unwrap();
        let Outcome::Completed {
            records_affected: 1,
            note,
            ..
        } = out
        else {
            panic!("gateway {gateway}: {out:?}");
        };
        assert!(note.contains("confirmed by reading"), "{note}");
        assert!(
            note.contains(&format!("{old_hash} (now {new_hash}")),
            "{note}"
        );
        assert_clean(&note);
        let calls = member_calls(&fake);
        assert_eq!(
            calls,
            [
                format!("PATCH {old_hash}"),
                format!("PATCH {old_hash}"),
                format!("GET {new_hash}"),
            ]
        );
    }
}

#[tokio::test]
async fn a_member_at_the_new_address_without_the_corrected_values_is_not_confirmed() {
    let (fake, connector, _) = setup().await;
    let other = "someone.else@example.fi";
    let mut t = task(RequestKind::Rectification, vec![email("nobody@example.fi")]);
    // Someone else is there, with another first name; nobody was never in the audience.
    t.parameters = corrections(&[("email", other), ("first_name", "Maija")]);
    let out = connector.run(&t).await.unwrap();
    assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
    // No member at the new address either.
    t.parameters = corrections(&[("email", "elsewhere@example.fi")]);
    let out = connector.run(&t).await.unwrap();
    assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
    assert_eq!(
        fake.member(&subscriber_hash(other)).unwrap()["merge_fields"]["FNAME"],
        "Matti"
    );
    let calls = member_calls(&fake);
    for read in [other, "elsewhere@example.fi"] {
        let get = format!("GET {}", subscriber_hash(read));
        assert!(calls.contains(&get), "{calls:?}");
    }
}

#[tokio::test]
async fn mailchimp_errors_are_permanent_with_the_detail_scrubbed() {
    let (fake, connector, _) = setup().await;
    // Moving to an address another member has: Mailchimp echoes the address.
    let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
    t.parameters = corrections(&[("email", "someone.else@example.fi")]);
    let err = connector.run(&t).await.unwrap_err();
    let ConnectorError::Permanent(message) = &err else {
        panic!("{err:?}");
    };
    assert!(message.contains("HTTP 400: Member Exists"), "{message}");
    assert!(message.contains("is already a list member"), "{message}");
    assert!(!message.contains("someone.else"), "{message}");
    assert_clean(message);
    // A validation error names the field.
    t.parameters = corrections(&[("email", "not-an-address")]);
    let err = connector.run(&t).await.unwrap_err();
    assert!(err.to_string().contains("Invalid Resource"), "{err}");
    assert!(
        err.to_string().contains("email_address: Please provide"),
        "{err}"
    );
    assert!(!err.to_string().contains("not-an-address"), "{err}");
    assert_eq!(fake.audience().members.len(), 2);
}

#[tokio::test]
async fn restriction_is_not_supported() {
    let (fake, connector, _) = setup().await;
    assert!(!connector.supports(RequestKind::Restriction));
    assert!(!connector.supports(RequestKind::Unspecified));
    for kind in [
        RequestKind::Erasure,
        RequestKind::ReturnOfData,
        RequestKind::Transfer,
        RequestKind::Rectification,
        RequestKind::Objection,
    ] {
        assert!(connector.supports(kind), "{kind:?}");
    }
    // Called anyway, it refuses without touching the audience.
    let out = connector
        .run(&task(RequestKind::Restriction, vec![email(MAIJA)]))
        .await
        .unwrap();
    assert!(
        matches!(&out, Outcome::Refused { reason } if reason.contains("RESTRICTION")),
        "{out:?}"
    );
    assert!(fake.audience().calls.is_empty());
    assert_eq!(connector.kind_name(), "mailchimp");
}

#[tokio::test]
async fn a_stopped_server_is_transient() {
    let (mut fake, connector, _) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let t = export_task(RequestKind::ReturnOfData, MAIJA, dir.path()).await;
    assert!(connector.run(&t).await.is_ok());
    fake.stop().await;
    t.export.as_ref().unwrap().reset().await.unwrap();
    let err = connector.run(&t).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Transient(_)), "{err:?}");
    assert_clean(&err.to_string());
}

#[tokio::test]
async fn a_slow_server_times_out_transiently() {
    let (fake, _, _) = setup().await;
    fake.audience().delay_ms = 2_000;
    let connector = MailchimpConnector::new(MailchimpConfig {
        timeout_ms: 100,
        ..config(&fake.base_url)
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = export_task(RequestKind::ReturnOfData, MAIJA, dir.path()).await;
    let err = connector.run(&t).await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Transient(m) if m.contains("timed out")),
        "{err:?}"
    );
}

/// A connector whose calls give up after 200 ms, against a fake whose next call takes
/// effect and answers a second late: the delete happens, its answer is lost.
fn losing_the_next_answer(fake: &FakeMailchimp) -> MailchimpConnector {
    let mut a = fake.audience();
    a.late_answers = 1;
    a.late_answer_ms = 1_000;
    MailchimpConnector::new(MailchimpConfig {
        timeout_ms: 200,
        ..config(&fake.base_url)
    })
    .unwrap()
}

#[tokio::test]
async fn a_lost_answer_to_the_delete_is_confirmed_by_reading_as_this_tasks_erasure() {
    let (fake, _, hash) = setup().await;
    let connector = losing_the_next_answer(&fake);
    let out = connector
        .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        erased,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    assert!(note.contains("answer to this task's deletion"), "{note}");
    assert_clean(&note);
    assert_eq!(erased[0].count, 1);
    assert!(fake.member(&hash).is_none());
    assert_eq!(
        fake.audience().calls,
        [
            format!("POST /3.0/lists/{LIST}/members/{hash}/actions/delete-permanent"),
            format!("GET /3.0/lists/{LIST}/members/{hash}"),
        ]
    );
}

#[tokio::test]
async fn a_lost_answer_keeps_the_delete_in_the_handle_so_the_retry_is_not_not_found() {
    let (fake, _, hash) = setup().await;
    let connector = losing_the_next_answer(&fake);
    // The reading right after fails too: the task waits with the delete in its handle.
    fake.audience().unavailable_gets = 1;
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, note } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, format!("?{hash}"));
    assert!(note.contains("its answer was lost"), "{note}");
    assert_clean(&note);
    assert!(fake.member(&hash).is_none(), "the delete took effect");
    // Started afresh, the delete would answer 404 and the task NOT_FOUND; the handle makes
    // the next step a reading, and the erasure this task's own.
    t.phase = Phase::Confirm { handle };
    let done = connector.run(&t).await.unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        ..
    } = done
    else {
        panic!("{done:?}");
    };
    assert!(note.contains("was lost"), "{note}");
    let posts = fake
        .audience()
        .calls
        .iter()
        .filter(|c| c.starts_with("POST"))
        .count();
    assert_eq!(posts, 1, "the retry only reads");
}

#[tokio::test]
async fn after_a_cut_off_call_a_404_is_read_as_this_tasks_erasure() {
    let (fake, connector, hash) = setup().await;
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    // The call the processor never recorded the answer of: the member went.
    assert!(matches!(
        connector.run(&t).await.unwrap(),
        Outcome::Completed { .. }
    ));
    t.interrupted = true;
    let out = connector.run(&t).await.unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        erased,
        ..
    } = out
    else {
        panic!("{out:?}");
    };
    assert!(note.contains("reading the member answers 404"), "{note}");
    assert_eq!(erased[0].count, 1);
    assert!(fake.member(&hash).is_none());
    // Without a cut-off call, the same answers mean the member was never there.
    t.interrupted = false;
    let out = connector.run(&t).await.unwrap();
    assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
}

#[tokio::test]
async fn a_delete_that_went_unanswered_and_did_not_land_is_sent_again() {
    let (fake, connector, hash) = setup().await;
    // The handle of a delete whose answer was lost, for a member that is still there.
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    t.phase = Phase::Confirm {
        handle: format!("?{hash}"),
    };
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, .. } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, hash, "sent again, and answered");
    assert!(fake.member(&hash).is_none());
    t.phase = Phase::Confirm { handle };
    let done = connector.run(&t).await.unwrap();
    assert!(
        matches!(
            done,
            Outcome::Completed {
                records_affected: 1,
                ..
            }
        ),
        "{done:?}"
    );
}

#[tokio::test]
async fn a_subject_never_there_stays_not_found_and_a_bad_handle_is_permanent() {
    let (fake, connector, _) = setup().await;
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            vec![email("nobody@example.fi")],
        ))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    t.phase = Phase::Confirm {
        handle: "?not-a-hash".into(),
    };
    let err = connector.run(&t).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Permanent(_)), "{err:?}");
    assert_eq!(fake.audience().members.len(), 2);
}

/// The POSTs and GETs the fake saw, as `POST {hash}` or `GET {hash}`.
fn member_calls(fake: &FakeMailchimp) -> Vec<String> {
    let members = format!("/3.0/lists/{LIST}/members/");
    fake.audience()
        .calls
        .iter()
        .map(|c| {
            c.replace(&members, "")
                .replace("/actions/delete-permanent", "")
        })
        .collect()
}

#[tokio::test]
async fn an_error_after_a_delete_keeps_it_in_the_handle_so_the_retry_is_not_not_found() {
    let (fake, connector, hash) = setup().await;
    let absent = subscriber_hash("nobody@example.fi");
    assert!(hash < absent, "the member there is deleted first");
    // Deleting the member there answers 204, then the absent one's delete is rate-limited.
    fake.audience().healthy_calls = 1;
    fake.audience().rate_limited = 1;
    let mut t = task(
        RequestKind::Erasure,
        vec![email(MAIJA), email("nobody@example.fi")],
    );
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, note } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, format!("{hash},!{absent}"));
    assert!(note.contains("429") && note.contains(&hash), "{note}");
    assert_clean(&note);
    assert!(fake.member(&hash).is_none());
    // Started afresh, both deletes would answer 404 and the task NOT_FOUND.
    t.phase = Phase::Confirm { handle };
    let done = connector.run(&t).await.unwrap();
    let Outcome::Completed {
        records_affected: 1,
        erased,
        ..
    } = done
    else {
        panic!("{done:?}");
    };
    assert_eq!(erased[0].count, 1, "the absent member is not counted");
    assert_eq!(
        member_calls(&fake),
        [
            format!("POST {hash}"),
            format!("POST {absent}"),
            format!("POST {absent}"),
            format!("GET {hash}"),
        ]
    );
}

#[tokio::test]
async fn an_error_while_confirming_after_a_further_delete_keeps_that_delete_too() {
    let (fake, connector, maija) = setup().await;
    let matti = subscriber_hash("someone.else@example.fi");
    let absent = subscriber_hash("nobody@example.fi");
    let mut t = task(
        RequestKind::Erasure,
        vec![
            email(MAIJA),
            email("someone.else@example.fi"),
            email("nobody@example.fi"),
        ],
    );
    // Each step gets one delete through before it is rate-limited.
    fake.audience().healthy_calls = 1;
    fake.audience().rate_limited = 1;
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, .. } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, format!("{maija},!{matti},!{absent}"));
    t.phase = Phase::Confirm { handle };
    fake.audience().healthy_calls = 1;
    fake.audience().rate_limited = 1;
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, .. } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, format!("{maija},{matti},!{absent}"));
    assert!(fake.audience().members.is_empty());
    // Stopped at its first delete, a confirmation changes nothing and may just be retried.
    fake.audience().rate_limited = 1;
    t.phase = Phase::Confirm { handle };
    let err = connector.run(&t).await.unwrap_err();
    assert_eq!(err.retry_after_ms(), Some(1_000), "{err:?}");
    let done = connector.run(&t).await.unwrap();
    assert!(
        matches!(
            done,
            Outcome::Completed {
                records_affected: 2,
                ..
            }
        ),
        "{done:?}"
    );
}

#[tokio::test]
async fn a_server_error_to_the_delete_is_confirmed_by_reading() {
    for status in [500, 502, 504] {
        let (fake, connector, hash) = setup().await;
        // The delete takes effect and a gateway answers the 5xx.
        fake.audience().gateway_errors = 1;
        fake.audience().gateway_error = status;
        let t = task(RequestKind::Erasure, vec![email(MAIJA)]);
        let out = connector.run(&t).await.unwrap();
        let Outcome::Completed {
            records_affected: 1,
            note,
            ..
        } = out
        else {
            panic!("{status}: {out:?}");
        };
        assert!(note.contains("answer to this task's deletion"), "{note}");
        assert!(fake.member(&hash).is_none());
    }
    // A 5xx from a delete that did not take effect: the reading finds the member, and the
    // delete is sent again.
    let (fake, connector, hash) = setup().await;
    fake.audience().unavailable = 1;
    let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
    let out = connector.run(&t).await.unwrap();
    let Outcome::Accepted { handle, .. } = out else {
        panic!("{out:?}");
    };
    assert_eq!(handle, hash);
    assert!(fake.member(&hash).is_none());
    t.phase = Phase::Confirm { handle };
    let done = connector.run(&t).await.unwrap();
    assert!(matches!(done, Outcome::Completed { .. }), "{done:?}");
    assert_eq!(
        member_calls(&fake),
        [
            format!("POST {hash}"),
            format!("GET {hash}"),
            format!("POST {hash}"),
            format!("GET {hash}"),
        ]
    );
}

#[test]
fn configuration_parses_with_defaults_and_validates() {
    let toml = format!(
        "type = \"mailchimp\"\nbase_url = \"https://us21.api.mailchimp.com/3.0\"\n\
         api_key = \"{KEY}\"\nlist_id = \"{LIST}\"\n"
    );
    let parsed: ConnectorConfig = toml::from_str(&toml).unwrap();
    let ConnectorConfig::Mailchimp(c) = &parsed else {
        panic!("{parsed:?}");
    };
    assert_eq!(c.timeout_ms, 10_000);
    assert_eq!(c.merge_fields, default_merge_fields());
    assert_eq!(c.merge_fields["phone"], "PHONE");
    assert!(parsed.validate().is_empty(), "{:?}", parsed.validate());
    // The key never shows in Debug output, of the config or the enum around it.
    assert!(!format!("{parsed:?}").contains("0123456789abcdef"));
    assert!(format!("{parsed:?}").contains("[redacted]"));

    let unknown = toml::from_str::<ConnectorConfig>(&format!("{toml}api_secret = \"x\"\n"));
    assert!(unknown.unwrap_err().to_string().contains("api_secret"));

    let bad = MailchimpConfig {
        base_url: "ftp://example".into(),
        api_key: " ".into(),
        list_id: "a/b".into(),
        timeout_ms: 0,
        page_size: 0,
        merge_fields: [
            ("email".to_string(), "EMAIL".to_string()),
            ("name".into(), "F NAME".into()),
        ]
        .into_iter()
        .collect(),
        controllers: BTreeMap::new(),
    };
    let problems = bad.validate().join("\n");
    for expected in [
        "base_url",
        "api_key",
        "list_id",
        "timeout_ms",
        "page_size",
        "\"email\" cannot be mapped",
        "merge_fields.name",
    ] {
        assert!(problems.contains(expected), "{expected}: {problems}");
    }
    // A call's limit is bounded above too, as the adapter's is: a day-long call outlives
    // the task's lease.
    let day_long = MailchimpConfig {
        timeout_ms: 86_400_000,
        ..c.clone()
    };
    assert_eq!(
        day_long.validate(),
        vec!["timeout_ms: must be from 1 ms to 300000 ms; it is 86400000".to_string()]
    );
    let creds = MailchimpConfig {
        base_url: "https://user:pw@us21.api.mailchimp.com/3.0".into(),
        ..c.clone()
    };
    assert!(creds.validate().join(" ").contains("credentials"));
    let empty_list = MailchimpConfig {
        list_id: String::new(),
        ..c.clone()
    };
    assert!(MailchimpConnector::new(empty_list).is_err());
}

#[tokio::test]
async fn build_makes_a_mailchimp_connector() {
    let fake = FakeMailchimp::start(KEY, LIST).await.unwrap();
    let hash = fake.subscribe(MAIJA, "Maija", "Meikäläinen");
    let built = crate::build(&ConnectorConfig::Mailchimp(config(&format!(
        "{}/",
        fake.base_url
    ))))
    .await
    .unwrap();
    assert_eq!(built.kind_name(), "mailchimp");
    let out = built
        .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
    assert!(fake.member(&hash).is_none());
}
