//! Deliver refuses a rectification whose correction would set an identity (`email`, `phone`,
//! `customer_number`, `national_id`) to a value no raw identity of its type may be, as the
//! registry's Submit does, so that a registry of an older build cannot have a holder write
//! it: the SQL connector would write "not-an-email" where it finds the subject by e-mail,
//! leaving her unfindable there, while the example adapter refused the same value. Served
//! over mutual TLS on 127.0.0.1, with the store on SQLite and PostgreSQL.

use std::path::Path;

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    DeliverRequest, FieldCorrection, GetStatusRequest, IdentityEncoding, IdentityType, RequestKind,
    RequestParameters, SubjectIdentity,
};
use dsrelay_runtime::pki::dev_identity;
use tonic::Code;

use crate::api_test_support::serve_processor_api;
use crate::App;

fn rectification(id: &str, field: &str, new_value: &str, now: i64) -> DeliverRequest {
    DeliverRequest {
        request_id: id.into(),
        kind: RequestKind::Rectification as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: "maija@example.fi".into(),
            label: String::new(),
        }],
        parameters: Some(RequestParameters {
            corrections: vec![
                FieldCorrection {
                    field: "name".into(),
                    new_value: "Maija Virtanen".into(),
                },
                FieldCorrection {
                    field: field.into(),
                    new_value: new_value.into(),
                },
            ],
            ..Default::default()
        }),
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    }
}

async fn a_correction_of_an_identity_is_held_to_its_rules(database_url: &str, dir: &Path) {
    let mut config = crate::contract_tests::config(dir, database_url, &["acme"]);
    config.controllers[0].identity = dev_identity("registry", "controller");
    let app = App::build(config).await.expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let (mut client, stop) = serve_processor_api(&shared, dir).await;

    for (i, (field, value, says)) in [
        ("email", "not-an-email", "it has no @"),
        (" Phone ", "call me maybe", "is not a phone number"),
        ("CUSTOMER_NUMBER", " --- ", "at least one letter or digit"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("fix-{i}");
        let refused = client
            .deliver(rectification(&id, field, value, now))
            .await
            .expect_err("a correction no raw identity may be");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        // The message lists every violation, "field: rule", joined by "; ": only this one.
        let message = refused.message();
        let (field, rule) = message
            .strip_prefix("invalid request: ")
            .and_then(|m| m.split_once(": "))
            .expect("one violation");
        assert_eq!(field, "parameters.corrections[1].new_value", "{message}");
        assert!(!rule.contains("; "), "{message}");
        assert!(rule.contains(says), "{message}");
        assert!(
            !message.contains(value.trim()),
            "the value is echoed: {message}"
        );
        // Refused before anything was stored.
        let status = client
            .get_status(GetStatusRequest {
                request_id: id.clone(),
            })
            .await
            .expect_err("not delivered");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }

    // The same corrections, trimmed as holders trim them, with valid values: delivered.
    for (i, (field, value)) in [
        ("email", " maija.virtanen@example.fi "),
        (" Phone ", "+358 40-123 4567"),
        ("customer_number", "C-1001"),
        // Not an identity: any text.
        ("address", "not-an-email"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("ok-{i}");
        let delivered = client
            .deliver(rectification(&id, field, value, now))
            .await
            .expect("a valid correction is delivered")
            .into_inner();
        assert!(!delivered.duplicate, "{delivered:?}");
        assert_eq!(delivered.tasks.len(), 1, "{delivered:?}");
    }
    let _ = stop.send(());
}

on_both!(a_correction_of_an_identity_is_held_to_its_rules);
