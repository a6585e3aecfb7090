//! Submit refuses a rectification whose correction would set an identity (`email`, `phone`,
//! `customer_number`, `national_id`) to a value no raw identity of its type may be, through
//! the real registry (its server over mutual TLS with the development PKI's certificates,
//! its store on SQLite and PostgreSQL).
//!
//! Before, "not-an-email" as a new `email` was accepted: the SQL holder wrote it where it
//! finds the subject by e-mail, so her later requests found nothing, while the example
//! adapter refused it and left the request half applied.

use std::path::Path;

use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    FieldCorrection, IdentityEncoding, IdentityType, RequestKind, RequestParameters,
    SubjectIdentity, SubmitRequest,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup};

fn rectification(key: &str, field: &str, new_value: &str) -> SubmitRequest {
    SubmitRequest {
        kind: RequestKind::Rectification as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: "maija@example.fi".into(),
            label: String::new(),
        }],
        parameters: Some(RequestParameters {
            corrections: vec![FieldCorrection {
                field: field.into(),
                new_value: new_value.into(),
            }],
            ..Default::default()
        }),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn a_correction_of_an_identity_is_refused_at_submit(database_url: &str, dir: &Path) {
    let registry = Registry::start(dir, database_url, Setup::default()).await;
    let mut crm = RequestServiceClient::new(registry.channel("partner-crm"));

    for (i, (field, value, says)) in [
        ("email", "not-an-email", "it has no @"),
        ("Phone", "call me maybe", "is not a phone number"),
    ]
    .into_iter()
    .enumerate()
    {
        let refused = crm
            .submit(rectification(&format!("bad-{i}"), field, value))
            .await
            .expect_err("a correction no raw identity may be");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        let v = refused
            .get_details_bad_request()
            .expect("field violations")
            .field_violations;
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].field, "parameters.corrections[0].new_value");
        assert!(v[0].description.contains(says), "{v:?}");
        assert!(!v[0].description.contains(value), "{v:?}");
        assert!(!refused.message().contains(value), "{refused:?}");
    }

    // A valid new address, trimmed as holders trim it, is taken.
    let id = crm
        .submit(rectification(
            "good",
            "email",
            " maija.virtanen@example.fi ",
        ))
        .await
        .expect("a valid correction")
        .into_inner()
        .request_id;
    let stored = registry.get(&id).await;
    assert_eq!(stored.kind, RequestKind::Rectification as i32, "{stored:?}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_of_an_identity_is_refused_at_submit_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_correction_of_an_identity_is_refused_at_submit(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correction_of_an_identity_is_refused_at_submit_on_postgres() {
    on_postgres(|url, dir| async move {
        a_correction_of_an_identity_is_refused_at_submit(&url, &dir).await;
    })
    .await;
}
