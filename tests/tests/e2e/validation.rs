//! Kind-specific parameters at the registry, through real mTLS: a parameter that belongs to
//! another kind is refused at Submit naming its field, a TRANSFER must name a recipient the
//! registry is configured with, and one that does is accepted and kept as submitted.

use dsrelay_proto::v1::{
    FieldCorrection, GetRequest, ListRequestsRequest, RequestKind, RequestParameters, SubmitRequest,
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::{erasure, spawn_pair, Backend, Mode, PairOptions, PROCESSOR, RECIPIENT};

/// A request of `kind` for the sample customer carrying `parameters`.
fn submit(kind: RequestKind, parameters: RequestParameters) -> SubmitRequest {
    SubmitRequest {
        kind: kind as i32,
        parameters: Some(parameters),
        ..erasure("maija.meikalainen@example.fi")
    }
}

fn to(recipient: &str) -> RequestParameters {
    RequestParameters {
        transfer_recipient: recipient.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_of_another_kind_and_unknown_recipients_are_refused() {
    let pair = spawn_pair(PairOptions {
        backend: Backend::Sqlite,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.client("partner-crm");

    let cases = [
        (
            "a transfer to an unknown recipient",
            submit(RequestKind::Transfer, to("old-bookkeeper")),
            "parameters.transfer_recipient",
            "\"old-bookkeeper\" is not a configured recipient (known recipients: new-bookkeeper)",
        ),
        (
            "corrections on an erasure",
            submit(
                RequestKind::Erasure,
                RequestParameters {
                    corrections: vec![FieldCorrection {
                        field: "phone".into(),
                        new_value: "+358401234567".into(),
                    }],
                    ..Default::default()
                },
            ),
            "parameters.corrections",
            "only a RECTIFICATION carries corrections (this is ERASURE)",
        ),
        (
            "a recipient on an access request",
            submit(RequestKind::ReturnOfData, to(RECIPIENT)),
            "parameters.transfer_recipient",
            "only a TRANSFER names a recipient (this is RETURN_OF_DATA)",
        ),
        (
            "a lift on an objection",
            submit(
                RequestKind::Objection,
                RequestParameters {
                    lift_restriction: true,
                    ..Default::default()
                },
            ),
            "parameters.lift_restriction",
            "only a RESTRICTION may lift a restriction (this is OBJECTION)",
        ),
    ];
    for (what, req, field, rule) in cases {
        let status = crm
            .submit(req)
            .await
            .expect_err(&format!("{what}: should be refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        let bad = status
            .get_details_bad_request()
            .unwrap_or_else(|| panic!("{what}: no BadRequest details in {status:?}"));
        assert_eq!(bad.field_violations.len(), 1, "{what}: {bad:?}");
        assert_eq!(bad.field_violations[0].field, field, "{what}");
        assert_eq!(bad.field_violations[0].description, rule, "{what}");
        assert!(
            status.message().contains(field),
            "{what}: the message does not name {field}: {:?}",
            status.message()
        );
    }
    let listed = crm
        .list(ListRequestsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.requests.is_empty(),
        "refused requests are not stored: {listed:#?}"
    );

    // A transfer to the configured recipient is stored, routed as any request, and keeps the
    // recipient's name.
    let accepted = crm
        .submit(submit(RequestKind::Transfer, to(RECIPIENT)))
        .await
        .expect("a transfer to a configured recipient")
        .into_inner();
    assert_eq!(accepted.routed_to, [PROCESSOR]);
    let stored = crm
        .get(GetRequest {
            request_id: accepted.request_id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(stored.kind, RequestKind::Transfer as i32);
    assert_eq!(
        stored.parameters.expect("parameters").transfer_recipient,
        RECIPIENT
    );
    pair.stop().await;
}

/// A retry of an accepted Submit answers the request it made, even after the registry's
/// configuration stopped allowing its body (the recipient it names was removed and the
/// registry restarted); the same body under a new key is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_configuration_changed_answers_the_accepted_request() {
    let mut pair = spawn_pair(PairOptions {
        backend: Backend::Sqlite,
        mode: Mode::Processes,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let transfer = SubmitRequest {
        idempotency_key: "transfer-after-reconfiguration".into(),
        ..submit(RequestKind::Transfer, to(RECIPIENT))
    };
    let first = pair
        .client("partner-crm")
        .submit(transfer.clone())
        .await
        .expect("accepted")
        .into_inner();
    assert!(!first.deduplicated, "{first:?}");

    let config = pair.registry.config_file().to_path_buf();
    let text = std::fs::read_to_string(&config).expect("registry config");
    let named = format!("name = \"{RECIPIENT}\"");
    assert_eq!(text.matches(&named).count(), 1, "{text}");
    std::fs::write(&config, text.replace(&named, "name = \"other-bookkeeper\""))
        .expect("rewrite the registry config");
    pair.registry.restart().await;

    let mut crm = pair.client("partner-crm");
    let again = crm
        .submit(transfer.clone())
        .await
        .expect("a retry is answered")
        .into_inner();
    assert!(again.deduplicated, "{again:?}");
    assert_eq!(
        (&again.request_id, again.due_at, &again.trace_id),
        (&first.request_id, first.due_at, &first.trace_id)
    );
    assert_eq!(again.routed_to, [PROCESSOR]);

    let status = crm
        .submit(SubmitRequest {
            idempotency_key: "transfer-after-reconfiguration-2".into(),
            ..transfer
        })
        .await
        .expect_err("a new request to a removed recipient");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = status
        .get_details_bad_request()
        .expect("field violations")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["parameters.transfer_recipient"], "{status:?}");
    pair.stop().await;
}
