//! What the registry takes from outside is held to the rules a reader of it needs, through
//! the real registry (its server over mutual TLS with the development PKI's certificates,
//! its store on SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server):
//! a subprocessor's name to the upload API's rule, and every free text free of Unicode
//! format characters (a right-to-left override reorders what `dsrctl get` shows).
//!
//! Before, Acknowledge applied a task named `../../etc`, whose part no upload could store,
//! and a bidirectional override in a name, a reason, a note or a correction was stored and
//! shown raw.

use std::path::Path;

use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    Acknowledgement, CancelRequest, Evidence, ExtendDeadlineRequest, FieldCorrection,
    IdentityEncoding, IdentityType, RequestKind, RequestParameters, SubjectIdentity, SubmitRequest,
    TaskState,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup};

/// The right-to-left override of the report.
const RLO: char = '\u{202E}';

/// The one field a refusal names, and its rule.
fn violation(status: &tonic::Status) -> (String, String) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let v = status
        .get_details_bad_request()
        .expect("field violations")
        .field_violations;
    assert_eq!(v.len(), 1, "{v:?}");
    (v[0].field.clone(), v[0].description.clone())
}

fn submit(note: &str, corrections: Vec<FieldCorrection>) -> SubmitRequest {
    let kind = if corrections.is_empty() {
        RequestKind::Erasure
    } else {
        RequestKind::Rectification
    };
    SubmitRequest {
        kind: kind as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: "maija@example.fi".into(),
            label: String::new(),
        }],
        parameters: Some(RequestParameters {
            corrections,
            ..Default::default()
        }),
        idempotency_key: format!("text-{}", fastrand::u64(..)),
        note: note.into(),
        ..Default::default()
    }
}

async fn outside_text_is_held_to_the_readers_rules(database_url: &str, dir: &Path) {
    let registry = Registry::start(dir, database_url, Setup::default()).await;
    let mut crm = RequestServiceClient::new(registry.channel("partner-crm"));
    let mut ops = RequestServiceClient::new(registry.channel("operator"));

    // The partner's texts.
    let refused = crm
        .submit(submit(&format!("ticket {RLO}1144-MRC"), vec![]))
        .await
        .expect_err("a note with an override");
    let (field, rule) = violation(&refused);
    assert_eq!(field, "note");
    assert!(rule.contains("U+202E"), "{rule}");
    let correction = |field: &str, value: &str| FieldCorrection {
        field: field.into(),
        new_value: value.into(),
    };
    let refused = crm
        .submit(submit(
            "",
            vec![correction("name", &format!("Virtanen{RLO}"))],
        ))
        .await
        .expect_err("a correction with an override");
    assert_eq!(violation(&refused).0, "parameters.corrections[0].new_value");
    let id = registry.submit(RequestKind::Erasure, "text").await;
    let refused = crm
        .cancel(CancelRequest {
            request_id: id.clone(),
            reason: format!("the subject {RLO}withdrew it"),
        })
        .await
        .expect_err("a cancel reason with an override");
    assert_eq!(violation(&refused).0, "reason");
    let refused = ops
        .extend_deadline(ExtendDeadlineRequest {
            request_id: id.clone(),
            months: 1,
            reason: format!("complex{}request", '\u{200B}'),
        })
        .await
        .expect_err("an extension reason with a zero width space");
    let (field, rule) = violation(&refused);
    assert_eq!(field, "reason");
    assert!(rule.contains("U+200B"), "{rule}");

    // The processor's.
    let ack = |subprocessor: &str, sequence: u64| Acknowledgement {
        request_id: id.clone(),
        subprocessor: subprocessor.into(),
        sequence,
        state: TaskState::InProgress as i32,
        ..Default::default()
    };
    let bidi = format!("deleted{RLO} 3 rows");
    let answer = registry
        .acknowledge(vec![
            ack("../../etc", 1),
            ack(&format!("bidi{RLO}evil"), 1),
            Acknowledgement {
                reason: bidi.clone(),
                ..ack("accounting", 1)
            },
            Acknowledgement {
                evidence: Some(Evidence {
                    note: bidi.clone(),
                    ..Default::default()
                }),
                ..ack("accounting", 2)
            },
            Acknowledgement {
                reason: "the holder is slow".into(),
                ..ack("mail", 1)
            },
        ])
        .await;
    assert_eq!(answer.applied, 1, "{answer:?}");
    let named: Vec<(u32, String, String)> = answer
        .rejected
        .iter()
        .map(|r| {
            assert_eq!(r.code, Code::InvalidArgument as i32, "{r:?}");
            assert_eq!(r.violations.len(), 1, "{r:?}");
            let v = &r.violations[0];
            (r.index, v.field.clone(), v.rule.clone())
        })
        .collect();
    let fields: Vec<(u32, &str)> = named.iter().map(|(i, f, _)| (*i, f.as_str())).collect();
    assert_eq!(
        fields,
        [
            (0, "acknowledgements[0].subprocessor"),
            (1, "acknowledgements[1].subprocessor"),
            (2, "acknowledgements[2].reason"),
            (3, "acknowledgements[3].evidence.note"),
        ]
    );
    assert!(named[0].2.contains("ASCII letters"), "{named:?}");
    assert!(named[2].2.contains("U+202E") && named[3].2.contains("U+202E"));
    let shown = registry.get(&id).await;
    let tasks: Vec<&str> = shown
        .tasks
        .iter()
        .map(|t| t.subprocessor.as_str())
        .collect();
    assert_eq!(tasks, ["mail"], "{shown:?}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_text_is_held_to_the_readers_rules_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    outside_text_is_held_to_the_readers_rules(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_text_is_held_to_the_readers_rules_on_postgres() {
    on_postgres(|url, dir| async move {
        outside_text_is_held_to_the_readers_rules(&url, &dir).await;
    })
    .await;
}
