//! Bad input at the registry: every broken rule is answered INVALID_ARGUMENT naming the field
//! and the rule (in the message and as google.rpc.BadRequest details), unknown ids NOT_FOUND,
//! forbidden state changes FAILED_PRECONDITION; and garbage never yields INTERNAL or takes the
//! service down.

use std::fmt::Debug;

use dsrelay_proto::prost::bytes::{Buf, BufMut};
use dsrelay_proto::prost::Message;
use dsrelay_proto::prost_types::Timestamp;
use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Acknowledgement, CancelRequest, ContractEndChoice,
    DeletionCertificate, EndContractRequest, Evidence, ExtendDeadlineRequest, FieldCorrection,
    GetRequest, IdentityEncoding, IdentityType, ListRequestsRequest, RequestKind,
    RequestParameters, RequestState, Scope, SubjectIdentity, SubmitRequest, SubmitResponse,
    TaskState, WatchRequest,
};
use dsrelay_proto::LATEST_INSTANT_SECONDS;
use dsrelay_runtime::identity::digest;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt;

use crate::harness::{email, erasure, spawn_pair, Backend, PairOptions, TestPair, PROCESSOR};

/// The seed of the garbage generators; override with DSRELAY_FUZZ_SEED to explore.
const DEFAULT_SEED: u64 = 0x000d_5e1a_7bad_1e55;

fn seed() -> u64 {
    std::env::var("DSRELAY_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

/// A pair whose registry also routes to an absent processor, so that a request without a scope
/// never finishes and can be cancelled or extended at leisure.
async fn start(backend: Backend) -> Option<TestPair> {
    spawn_pair(PairOptions {
        backend,
        with_absent_processor: true,
        ..Default::default()
    })
    .await
}

/// Asserts INVALID_ARGUMENT whose violations are exactly `expected` (field, substrings of the
/// rule), in order, both in the BadRequest details and in the message.
fn expect_invalid<T: Debug>(what: &str, result: Result<T, Status>, expected: &[(&str, &[&str])]) {
    let status = match result {
        Ok(v) => panic!("{what}: expected INVALID_ARGUMENT, the call succeeded: {v:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    let bad = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("{what}: no BadRequest details in {status:?}"));
    let fields: Vec<&str> = bad
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    let want: Vec<&str> = expected.iter().map(|(f, _)| *f).collect();
    assert_eq!(fields, want, "{what}: {status:?}");
    for ((field, rules), v) in expected.iter().zip(&bad.field_violations) {
        assert!(
            status.message().contains(field),
            "{what}: message does not name {field}: {:?}",
            status.message()
        );
        for rule in *rules {
            assert!(
                v.description.contains(rule),
                "{what}: rule of {field} does not say {rule:?}: {:?}",
                v.description
            );
            assert!(
                status.message().contains(rule),
                "{what}: message does not say {rule:?}: {:?}",
                status.message()
            );
        }
    }
}

/// Asserts that an Acknowledge call succeeded and rejected its entries with INVALID_ARGUMENT,
/// naming exactly `expected` fields (in order, across entries) with the rules given.
fn expect_rejected(
    what: &str,
    result: Result<tonic::Response<AcknowledgeResponse>, Status>,
    expected: &[(&str, &[&str])],
) -> AcknowledgeResponse {
    let r = match result {
        Ok(r) => r.into_inner(),
        Err(s) => panic!("{what}: expected per-entry rejections, the call failed: {s:?}"),
    };
    assert_eq!(r.applied, 0, "{what}: {r:?}");
    let invalid: Vec<_> = r
        .rejected
        .iter()
        .filter(|x| x.code == Code::InvalidArgument as i32)
        .collect();
    assert!(
        !invalid.is_empty(),
        "{what}: nothing rejected as invalid: {r:?}"
    );
    for x in &invalid {
        let prefix = format!("acknowledgements[{}].", x.index);
        assert!(
            x.violations.iter().all(|v| v.field.starts_with(&prefix)),
            "{what}: a violation is filed under another entry: {x:?}"
        );
    }
    let got: Vec<_> = invalid.iter().flat_map(|x| &x.violations).collect();
    let fields: Vec<&str> = got.iter().map(|v| v.field.as_str()).collect();
    let want: Vec<&str> = expected.iter().map(|(f, _)| *f).collect();
    assert_eq!(fields, want, "{what}: {r:?}");
    for ((field, rules), v) in expected.iter().zip(&got) {
        for rule in *rules {
            assert!(
                v.rule.contains(rule),
                "{what}: rule of {field} does not say {rule:?}: {:?}",
                v.rule
            );
        }
    }
    r
}

fn expect_code<T: Debug>(what: &str, result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, the call succeeded: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            s
        }
    }
}

fn ident(ty: IdentityType, enc: IdentityEncoding, value: &str) -> SubjectIdentity {
    SubjectIdentity {
        r#type: ty as i32,
        encoding: enc as i32,
        value: value.into(),
        label: String::new(),
    }
}

/// A valid erasure changed by `f`.
fn with(f: impl FnOnce(&mut SubmitRequest)) -> SubmitRequest {
    let mut r = erasure("maija@example.fi");
    f(&mut r);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_names_the_field_and_rule_of_each_violation() {
    let pair = start(Backend::Sqlite).await.expect("sqlite pair");
    let mut crm = pair.client("partner-crm");
    let sha256 = digest(IdentityEncoding::Sha256, "maija@example.fi").expect("digest");
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, SubmitRequest, Vec<(&str, &[&str])>)> = vec![
        (
            "no identities",
            with(|r| r.identities.clear()),
            vec![("identities", &["at least one"])],
        ),
        (
            "unknown kind",
            with(|r| r.kind = 99),
            vec![("kind", &["must be one of", "ERASURE", "got 99"])],
        ),
        (
            "negative kind",
            with(|r| r.kind = -1),
            vec![("kind", &["must be one of", "got -1"])],
        ),
        (
            "kind UNSPECIFIED",
            with(|r| r.kind = RequestKind::Unspecified as i32),
            vec![("kind", &["must be one of", "got 0"])],
        ),
        (
            "malformed e-mail",
            with(|r| r.identities = vec![email("maija.example.fi")]),
            vec![("identities[0].value", &["e-mail"])],
        ),
        (
            "e-mail with a space",
            with(|r| r.identities = vec![email("maija meikäläinen@example.fi")]),
            vec![("identities[0].value", &["e-mail"])],
        ),
        (
            "value over 320 bytes",
            with(|r| {
                r.identities = vec![ident(
                    IdentityType::CustomerNumber,
                    IdentityEncoding::Raw,
                    &"1".repeat(321),
                )]
            }),
            vec![("identities[0].value", &["at most 320 bytes"])],
        ),
        (
            "multi-byte value over 320 bytes",
            with(|r| {
                r.identities = vec![ident(
                    IdentityType::NationalId,
                    IdentityEncoding::Raw,
                    &"ä".repeat(161),
                )]
            }),
            vec![("identities[0].value", &["at most 320 bytes"])],
        ),
        (
            "empty value",
            with(|r| r.identities = vec![email("")]),
            vec![("identities[0].value", &["must not be empty"])],
        ),
        (
            "17 identities",
            with(|r| {
                r.identities = (0..17)
                    .map(|i| email(&format!("subject{i}@example.fi")))
                    .collect()
            }),
            vec![("identities", &["at most 16", "got 17"])],
        ),
        (
            "SHA-256 of the wrong length",
            with(|r| {
                r.identities = vec![ident(
                    IdentityType::Email,
                    IdentityEncoding::Sha256,
                    &sha256[1..],
                )]
            }),
            vec![("identities[0].value", &["64 lowercase hex"])],
        ),
        (
            "SHA-256 in uppercase",
            with(|r| {
                r.identities = vec![ident(
                    IdentityType::Email,
                    IdentityEncoding::Sha256,
                    &sha256.to_ascii_uppercase(),
                )]
            }),
            vec![("identities[0].value", &["64 lowercase hex"])],
        ),
        (
            "MD5 with a SHA-1's length",
            with(|r| {
                r.identities = vec![ident(
                    IdentityType::Email,
                    IdentityEncoding::Md5,
                    &"a".repeat(40),
                )]
            }),
            vec![("identities[0].value", &["32 lowercase hex"])],
        ),
        (
            "SHA-1 with non-hex",
            with(|r| {
                r.identities = vec![ident(
                    IdentityType::Email,
                    IdentityEncoding::Sha1,
                    &"g".repeat(40),
                )]
            }),
            vec![("identities[0].value", &["40 lowercase hex"])],
        ),
        (
            "identity type and encoding unspecified",
            with(|r| {
                r.identities = vec![SubjectIdentity {
                    r#type: 0,
                    encoding: 42,
                    value: "x".into(),
                    label: String::new(),
                }]
            }),
            vec![
                ("identities[0].type", &["must be one of", "got 0"]),
                ("identities[0].encoding", &["must be one of", "got 42"]),
            ],
        ),
        (
            "OTHER without label",
            with(|r| {
                r.identities = vec![ident(
                    IdentityType::Other,
                    IdentityEncoding::Raw,
                    "card-0001",
                )]
            }),
            vec![("identities[0].label", &["required for type OTHER"])],
        ),
        (
            "label over 64 bytes",
            with(|r| {
                let mut i = ident(IdentityType::Other, IdentityEncoding::Raw, "card-0001");
                i.label = "l".repeat(65);
                r.identities = vec![i];
            }),
            vec![("identities[0].label", &["at most 64 bytes"])],
        ),
        (
            "idempotency key empty",
            with(|r| r.idempotency_key.clear()),
            vec![("idempotency_key", &["1 to 128 bytes"])],
        ),
        (
            "idempotency key of 129 bytes",
            with(|r| r.idempotency_key = "k".repeat(129)),
            vec![("idempotency_key", &["1 to 128 bytes"])],
        ),
        (
            "idempotency key with a space",
            with(|r| r.idempotency_key = "crm 123".into()),
            vec![("idempotency_key", &["may contain only"])],
        ),
        (
            "idempotency key with non-ASCII",
            with(|r| r.idempotency_key = "crm-ä".into()),
            vec![("idempotency_key", &["may contain only"])],
        ),
        (
            "note over 1024 bytes",
            with(|r| r.note = "n".repeat(1025)),
            vec![("note", &["at most 1024 bytes"])],
        ),
        (
            "unknown scope category",
            with(|r| {
                r.scope = Some(Scope {
                    data_categories: vec!["marketing".into(), "marketting".into()],
                })
            }),
            vec![(
                "scope.data_categories[1]",
                &[
                    "\"marketting\"",
                    "known categories",
                    "contact",
                    "invoicing",
                    "marketing",
                ],
            )],
        ),
        (
            "33 scope categories",
            with(|r| {
                r.scope = Some(Scope {
                    data_categories: vec!["contact".into(); 33],
                })
            }),
            vec![("scope.data_categories", &["at most 32"])],
        ),
        (
            "rectification without corrections",
            with(|r| r.kind = RequestKind::Rectification as i32),
            vec![("parameters.corrections", &["1 to 32 corrections"])],
        ),
        (
            "rectification with a bad correction",
            with(|r| {
                r.kind = RequestKind::Rectification as i32;
                r.parameters = Some(RequestParameters {
                    corrections: vec![FieldCorrection {
                        field: String::new(),
                        new_value: "v".repeat(1025),
                    }],
                    ..Default::default()
                });
            }),
            vec![
                ("parameters.corrections[0].field", &["1 to 64 bytes"]),
                (
                    "parameters.corrections[0].new_value",
                    &["at most 1024 bytes"],
                ),
            ],
        ),
        (
            "transfer without recipient",
            with(|r| r.kind = RequestKind::Transfer as i32),
            vec![(
                "parameters.transfer_recipient",
                &["1 to 256 bytes", "known recipients: new-bookkeeper"],
            )],
        ),
        (
            "transfer recipient over 256 bytes",
            with(|r| {
                r.kind = RequestKind::Transfer as i32;
                r.parameters = Some(RequestParameters {
                    transfer_recipient: "r".repeat(257),
                    ..Default::default()
                });
            }),
            vec![("parameters.transfer_recipient", &["1 to 256 bytes"])],
        ),
    ];
    for (what, req, expected) in cases {
        expect_invalid(what, crm.submit(req).await, &expected);
    }

    // Nothing of the above was stored.
    let listed = crm
        .list(ListRequestsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.requests.is_empty(), "{listed:#?}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_reports_every_violation_in_one_status() {
    let pair = start(Backend::Sqlite).await.expect("sqlite pair");
    let mut crm = pair.client("partner-crm");
    let req = SubmitRequest {
        kind: 99,
        identities: vec![
            email("maija@example.fi"),
            email("not an address"),
            ident(IdentityType::Email, IdentityEncoding::Sha256, "ABC"),
            ident(IdentityType::Other, IdentityEncoding::Raw, "x"),
        ],
        scope: Some(Scope {
            data_categories: vec!["nope".into()],
        }),
        parameters: None,
        idempotency_key: "has space".into(),
        note: "n".repeat(2000),
    };
    expect_invalid(
        "many violations",
        crm.submit(req).await,
        &[
            ("kind", &["got 99"]),
            ("identities[1].value", &["e-mail"]),
            ("identities[2].value", &["64 lowercase hex"]),
            ("identities[3].label", &["required for type OTHER"]),
            ("idempotency_key", &["may contain only"]),
            ("note", &["at most 1024 bytes"]),
            ("scope.data_categories[0]", &["known categories"]),
        ],
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_paging_cancel_and_deadline_arguments_are_checked() {
    let pair = start(Backend::Sqlite).await.expect("sqlite pair");
    let mut crm = pair.client("partner-crm");
    let mut operator = pair.client("operator");
    let unknown = "01900000-0000-7000-8000-00000000dead".to_string();
    let long = "x".repeat(65);

    for (label, id) in [("unknown", &unknown), ("64-byte unknown", &"y".repeat(64))] {
        let s = expect_code(
            &format!("Get of an {label} id"),
            crm.get(GetRequest {
                request_id: id.clone(),
            })
            .await,
            Code::NotFound,
        );
        assert!(s.message().contains(id.as_str()), "{s:?}");
        expect_code(
            &format!("Cancel of an {label} id"),
            crm.cancel(CancelRequest {
                request_id: id.clone(),
                reason: "why not".into(),
            })
            .await,
            Code::NotFound,
        );
        expect_code(
            &format!("Watch of an {label} id"),
            crm.watch(WatchRequest {
                request_id: id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
            Code::NotFound,
        );
        expect_code(
            &format!("ExtendDeadline of an {label} id"),
            operator
                .extend_deadline(ExtendDeadlineRequest {
                    request_id: id.clone(),
                    months: 1,
                    reason: "big request".into(),
                })
                .await,
            Code::NotFound,
        );
    }
    for (label, id) in [("65-byte", &long), ("empty", &String::new())] {
        let id_rule: (&str, &[&str]) = ("request_id", &["1 to 64 bytes"]);
        expect_invalid(
            &format!("Get of a {label} id"),
            crm.get(GetRequest {
                request_id: id.clone(),
            })
            .await,
            &[id_rule],
        );
        expect_invalid(
            &format!("Cancel of a {label} id"),
            crm.cancel(CancelRequest {
                request_id: id.clone(),
                reason: "why not".into(),
            })
            .await,
            &[id_rule],
        );
        expect_invalid(
            &format!("Watch of a {label} id"),
            crm.watch(WatchRequest {
                request_id: id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
            &[id_rule],
        );
        expect_invalid(
            &format!("ExtendDeadline of a {label} id"),
            operator
                .extend_deadline(ExtendDeadlineRequest {
                    request_id: id.clone(),
                    months: 1,
                    reason: "big request".into(),
                })
                .await,
            &[id_rule],
        );
    }

    // Paging and filters.
    expect_invalid(
        "List with page_size 501 and a garbage token",
        crm.list(ListRequestsRequest {
            page_size: 501,
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
        &[
            ("page_size", &["500"]),
            ("page_token", &["not a token from a previous page"]),
        ],
    );
    expect_invalid(
        "List with a token that is almost right",
        crm.list(ListRequestsRequest {
            page_token: "soon_01900000-0000-7000-8000-000000000000".into(),
            ..Default::default()
        })
        .await,
        &[("page_token", &["not a token from a previous page"])],
    );
    expect_invalid(
        "List with bad filters",
        crm.list(ListRequestsRequest {
            states: vec![RequestState::Completed as i32, 0, 99],
            kind: 99,
            page_size: u32::MAX,
            ..Default::default()
        })
        .await,
        &[
            ("page_size", &["500"]),
            ("states[1]", &["0 is not a request state"]),
            ("states[2]", &["99 is not a request state"]),
            ("kind", &["99 is not a request kind"]),
        ],
    );

    // A request that stays open (it waits for the absent processor).
    let id = crm
        .submit(erasure("open@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    // A real token pages on.
    crm.submit(erasure("open2@example.fi"))
        .await
        .expect("submit");
    let first = crm
        .list(ListRequestsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("first page")
        .into_inner();
    assert_eq!(first.requests.len(), 1);
    assert!(!first.next_page_token.is_empty());
    let second = crm
        .list(ListRequestsRequest {
            page_size: 1,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .expect("second page")
        .into_inner();
    assert_eq!(second.requests.len(), 1);
    assert_ne!(second.requests[0].request_id, first.requests[0].request_id);

    // ExtendDeadline: months must be 1 or 2 in all, with a reason.
    let extend = |months: u32, reason: &str| ExtendDeadlineRequest {
        request_id: id.clone(),
        months,
        reason: reason.into(),
    };
    for months in [0, 3, u32::MAX] {
        expect_invalid(
            &format!("ExtendDeadline by {months} months"),
            operator
                .extend_deadline(extend(months, "big request"))
                .await,
            &[("months", &["months asked, 1 to 2 months may be added"])],
        );
    }
    for reason in ["", "   ", &"r".repeat(1025)] {
        expect_invalid(
            &format!("ExtendDeadline with reason of {} bytes", reason.len()),
            operator.extend_deadline(extend(1, reason)).await,
            &[("reason", &["1 to 1024 bytes"])],
        );
    }
    let before = crm
        .get(GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    let extended = operator
        .extend_deadline(extend(2, "the subject asked for a lot"))
        .await
        .expect("extend by two months")
        .into_inner();
    assert!(extended.due_at.expect("due").seconds > before.due_at.expect("due").seconds);
    assert_eq!(extended.extension_reasons, ["the subject asked for a lot"]);
    expect_invalid(
        "ExtendDeadline beyond two months in all",
        operator.extend_deadline(extend(1, "more")).await,
        &[("months", &["no extension is left"])],
    );

    // Cancel: a reason is required; the first cancel succeeds, a second is refused.
    for reason in ["", " \t\n", &"r".repeat(1025)] {
        expect_invalid(
            &format!("Cancel with reason of {} bytes", reason.len()),
            crm.cancel(CancelRequest {
                request_id: id.clone(),
                reason: reason.into(),
            })
            .await,
            &[("reason", &["1 to 1024 bytes"])],
        );
    }
    let cancelled = crm
        .cancel(CancelRequest {
            request_id: id.clone(),
            reason: "the subject withdrew".into(),
        })
        .await
        .expect("first cancel")
        .into_inner();
    assert_eq!(cancelled.state, RequestState::Cancelled as i32);
    assert_eq!(cancelled.cancel_reason, "the subject withdrew");
    let s = expect_code(
        "second cancel",
        crm.cancel(CancelRequest {
            request_id: id.clone(),
            reason: "again".into(),
        })
        .await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("CANCELLED"), "{s:?}");
    assert!(s.message().contains("can no longer be cancelled"), "{s:?}");
    let s = expect_code(
        "ExtendDeadline by 0 months of a cancelled request",
        operator
            .extend_deadline(ExtendDeadlineRequest {
                request_id: id.clone(),
                months: 0,
                reason: "x".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(s.message().contains("months"), "{s:?}");
    // A fresh request, extended after it was cancelled.
    let fresh = crm
        .submit(erasure("open3@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    crm.cancel(CancelRequest {
        request_id: fresh.clone(),
        reason: "withdrawn".into(),
    })
    .await
    .expect("cancel");
    let s = expect_code(
        "ExtendDeadline of a cancelled request",
        operator
            .extend_deadline(ExtendDeadlineRequest {
                request_id: fresh,
                months: 1,
                reason: "too late".into(),
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(s.message().contains("is CANCELLED"), "{s:?}");
    pair.stop().await;
}

/// Checks for INVALID_ARGUMENT with BadRequest details whose violations all concern fields
/// starting with `prefix` (and, when given, whose first rule says `rule`): however many rules
/// are broken, the answer must stay a well-formed status that an ordinary client (16 KiB
/// header limit, as hyper's and gRPC C-core's) can read. Returns what is wrong, if anything.
fn bounded_invalid<T: Debug>(
    what: &str,
    result: Result<T, Status>,
    prefix: &str,
    rule: Option<&str>,
) -> Option<String> {
    let status = match result {
        Ok(_) => {
            return Some(format!(
                "{what}: expected INVALID_ARGUMENT, the call succeeded"
            ))
        }
        Err(s) => s,
    };
    if status.code() != Code::InvalidArgument {
        return Some(format!("{what}: expected INVALID_ARGUMENT, got {status:?}"));
    }
    let Some(bad) = status.get_details_bad_request() else {
        return Some(format!("{what}: no BadRequest details in {status:?}"));
    };
    let fields_ok = !bad.field_violations.is_empty()
        && bad
            .field_violations
            .iter()
            .all(|v| v.field.starts_with(prefix));
    let rule_ok = rule.is_none_or(|r| bad.field_violations[0].description.contains(r));
    (!fields_ok || !rule_ok).then(|| format!("{what}: unexpected violations {bad:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_or_long_violations_still_answer_invalid_argument() {
    let pair = start(Backend::Sqlite).await.expect("sqlite pair");
    let mut crm = pair.client("partner-crm");
    let mut problems = Vec::new();

    // Within the documented limits (32 categories of at most 64 bytes), all unknown.
    let req = with(|r| {
        r.scope = Some(Scope {
            data_categories: (0..32)
                .map(|i| format!("{i:02}{}", "€".repeat(20)))
                .collect(),
        })
    });
    problems.extend(bounded_invalid(
        "Submit with 32 unknown 62-byte categories",
        crm.submit(req).await,
        "scope.data_categories",
        None,
    ));
    // A category beyond the documented 64 bytes is refused for its length.
    for len in [65, 20_000] {
        let req = with(|r| {
            r.scope = Some(Scope {
                data_categories: vec!["c".repeat(len)],
            })
        });
        problems.extend(bounded_invalid(
            &format!("Submit with a {len}-byte category"),
            crm.submit(req).await,
            "scope.data_categories[0]",
            Some("at most 64 bytes"),
        ));
    }

    // A List with a thousand bad state filters.
    problems.extend(bounded_invalid(
        "List with 1000 bad states",
        crm.list(ListRequestsRequest {
            states: vec![99; 1000],
            ..Default::default()
        })
        .await,
        "states[",
        None,
    ));

    // 500 acknowledgements, each breaking four rules: each is rejected on its own, and the
    // answer stays far below the 4 MiB a client decodes.
    let mut acks = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"));
    match acks
        .acknowledge(AcknowledgeRequest {
            acknowledgements: vec![Acknowledgement::default(); 500],
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let size = dsrelay_proto::prost::Message::encoded_len(&r);
            let all_invalid = r.rejected.len() == 500
                && r.rejected.iter().enumerate().all(|(i, x)| {
                    x.index as usize == i
                        && x.code == Code::InvalidArgument as i32
                        && x.violations.len() == 4
                        && x.violations
                            .iter()
                            .all(|v| v.field.starts_with(&format!("acknowledgements[{i}]")))
                });
            if r.applied != 0 || !all_invalid || size > 512 * 1024 {
                problems.push(format!(
                    "Acknowledge with 500 bad acknowledgements: applied {}, {} rejected, \
                     {size} bytes",
                    r.applied,
                    r.rejected.len()
                ));
            }
        }
        Err(s) => problems.push(format!(
            "Acknowledge with 500 bad acknowledgements: expected per-entry rejections, got {s:?}"
        )),
    }
    assert!(problems.is_empty(), "{problems:#?}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_are_checked() {
    let pair = start(Backend::Sqlite).await.expect("sqlite pair");
    let mut acks = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"));
    let good = Acknowledgement {
        request_id: "01900000-0000-7000-8000-000000000000".into(),
        subprocessor: "accounting".into(),
        sequence: 1,
        state: TaskState::InProgress as i32,
        ..Default::default()
    };
    let one = |f: &dyn Fn(&mut Acknowledgement)| {
        let mut a = good.clone();
        f(&mut a);
        AcknowledgeRequest {
            acknowledgements: vec![a],
        }
    };
    expect_invalid(
        "no acknowledgements",
        acks.acknowledge(AcknowledgeRequest::default()).await,
        &[("acknowledgements", &["1 to 500"])],
    );
    expect_invalid(
        "501 acknowledgements",
        acks.acknowledge(AcknowledgeRequest {
            acknowledgements: vec![good.clone(); 501],
        })
        .await,
        &[("acknowledgements", &["1 to 500"])],
    );
    expect_rejected(
        "sequence 0",
        acks.acknowledge(one(&|a| a.sequence = 0)).await,
        &[(
            "acknowledgements[0].sequence",
            &["from 1 to 9223372036854775807", "got 0"],
        )],
    );
    expect_rejected(
        "sequence beyond i64",
        acks.acknowledge(one(&|a| a.sequence = u64::MAX)).await,
        &[(
            "acknowledgements[0].sequence",
            &["from 1 to 9223372036854775807", "got 18446744073709551615"],
        )],
    );
    expect_rejected(
        "state UNSPECIFIED",
        acks.acknowledge(one(&|a| a.state = TaskState::Unspecified as i32))
            .await,
        &[("acknowledgements[0].state", &["must be a task state"])],
    );
    expect_rejected(
        "state 99",
        acks.acknowledge(one(&|a| a.state = 99)).await,
        &[("acknowledgements[0].state", &["must be a task state"])],
    );
    expect_rejected(
        "empty request id and subprocessor",
        acks.acknowledge(one(&|a| {
            a.request_id.clear();
            a.subprocessor.clear();
        }))
        .await,
        &[
            ("acknowledgements[0].request_id", &["1 to 64 bytes"]),
            (
                "acknowledgements[0].subprocessor",
                &["1 to 128 ASCII letters"],
            ),
        ],
    );
    expect_rejected(
        "over-long reason and note",
        acks.acknowledge(one(&|a| {
            a.reason = "r".repeat(4097);
            a.evidence = Some(Evidence {
                note: "n".repeat(4097),
                ..Default::default()
            });
        }))
        .await,
        &[
            ("acknowledgements[0].reason", &["at most 4096 bytes"]),
            ("acknowledgements[0].evidence.note", &["at most 4096 bytes"]),
        ],
    );
    // Violations in several acknowledgements of one call are all reported, each under its
    // own entry; the valid one beside them is judged on its own (its request was never
    // delivered to this processor, so it is refused for that alone).
    let mut second = good.clone();
    second.sequence = 0;
    second.state = 0;
    let r = expect_rejected(
        "violations in two acknowledgements",
        acks.acknowledge(AcknowledgeRequest {
            acknowledgements: vec![good.clone(), second.clone(), second],
        })
        .await,
        &[
            (
                "acknowledgements[1].sequence",
                &["from 1 to 9223372036854775807"],
            ),
            ("acknowledgements[1].state", &["must be a task state"]),
            (
                "acknowledgements[2].sequence",
                &["from 1 to 9223372036854775807"],
            ),
            ("acknowledgements[2].state", &["must be a task state"]),
        ],
    );
    let first = &r.rejected[0];
    assert_eq!(
        (first.index, first.code, first.violations.len()),
        (0, Code::PermissionDenied as i32, 0),
        "{r:?}"
    );
    assert!(first.message.contains(&good.request_id), "{first:?}");
    assert_eq!(r.rejected.len(), 3, "{r:?}");
    pair.stop().await;
}

/// A string of up to `max` bytes chosen to annoy: empty, control characters, random code
/// points, look-alikes of valid values, injection attempts, long runs of multi-byte characters.
fn garbage_string(rng: &mut fastrand::Rng, max: usize) -> String {
    const NASTY: &[&str] = &[
        "'; DROP TABLE requests; --",
        "%s%s%n%x",
        "../../../etc/passwd",
        "\0",
        " ",
        " leading",
        "trailing ",
        "a@b@c.fi",
        "@",
        "x@.fi",
        "maija@example.fi",
        "Maija@Example.FI",
        "+358 40 123 4567",
        "null",
        "\u{202e}evil",
        "\u{feff}",
        "contact",
        "marketing",
        "web-analytics",
        "crm-key-1",
        "{\"json\": true}",
        "\\u0000",
    ];
    const CONTROL: &[char] = &[
        '\0',
        '\u{1}',
        '\n',
        '\r',
        '\t',
        '\u{1b}',
        '\u{7f}',
        '\u{85}',
        '\u{2028}',
        '\u{200b}',
        '\u{fffd}',
        '\u{10ffff}',
    ];
    let target = if rng.u8(..4) == 0 {
        rng.usize(..=max)
    } else {
        rng.usize(..=max.min(80))
    };
    let mut s = String::new();
    match rng.u8(..9) {
        0 => {}
        1 => s.push_str(NASTY[rng.usize(..NASTY.len())]),
        2 => {
            while s.len() < target {
                s.push(CONTROL[rng.usize(..CONTROL.len())]);
            }
        }
        3 => {
            while s.len() < target {
                s.push(rng.char(..));
            }
        }
        4 => {
            while s.len() < target {
                s.push(rng.alphanumeric());
            }
        }
        5 => {
            let c = ['ä', '€', '😀', 'x', ' '][rng.usize(..5)];
            while s.len() < target {
                s.push(c);
            }
        }
        6 => {
            // Hex-ish, of about the length of a digest.
            let len = [31, 32, 33, 39, 40, 41, 63, 64, 65][rng.usize(..9)];
            for _ in 0..len {
                s.push(b"0123456789abcdefABCDEFg"[rng.usize(..23)] as char);
            }
        }
        7 => {
            let n = rng.u32(1..=10_000_000);
            s = format!("{n}@example.fi");
        }
        _ => {
            while s.len() < target {
                match rng.u8(..3) {
                    0 => s.push_str(NASTY[rng.usize(..NASTY.len())]),
                    1 => s.push(CONTROL[rng.usize(..CONTROL.len())]),
                    _ => s.push(rng.char(..)),
                }
            }
        }
    }
    while s.len() > max {
        s.pop();
    }
    s
}

fn garbage_enum(rng: &mut fastrand::Rng) -> i32 {
    match rng.u8(..8) {
        0 => rng.i32(..),
        1 => -rng.i32(1..=1000),
        2 => i32::MIN,
        3 => i32::MAX,
        _ => rng.i32(0..=7),
    }
}

fn garbage_submit(rng: &mut fastrand::Rng) -> SubmitRequest {
    const KEYS: &[&str] = &["shared-1", "shared-2", "shared-3"];
    let mostly_valid = rng.u8(..3) == 0;
    let mut req = if mostly_valid {
        // Mostly valid, so that some calls succeed (and are deduplicated or conflict).
        let mut r = erasure(&format!("s{}@example.fi", rng.u32(..1000)));
        if rng.bool() {
            r.idempotency_key = KEYS[rng.usize(..KEYS.len())].into();
        }
        r
    } else {
        SubmitRequest::default()
    };
    // Mostly valid requests get one field or so spoiled; the others many or all.
    let (all, one_in) = if mostly_valid {
        (false, 6)
    } else {
        (rng.u8(..3) != 0, 2)
    };
    if all || rng.u8(..one_in) == 0 {
        req.kind = garbage_enum(rng);
    }
    if all || rng.u8(..one_in) == 0 {
        let n = if rng.bool() {
            rng.usize(..=3)
        } else {
            rng.usize(..=40)
        };
        req.identities = (0..n)
            .map(|_| SubjectIdentity {
                r#type: garbage_enum(rng),
                encoding: garbage_enum(rng),
                value: garbage_string(rng, 5000),
                label: garbage_string(rng, 200),
            })
            .collect();
    }
    if all || rng.u8(..one_in) == 0 {
        req.scope = rng.bool().then(|| Scope {
            data_categories: (0..rng.usize(..=40))
                .map(|_| garbage_string(rng, 100))
                .collect(),
        });
    }
    if all || rng.u8(..one_in) == 0 {
        req.parameters = rng.bool().then(|| RequestParameters {
            corrections: (0..rng.usize(..=40))
                .map(|_| FieldCorrection {
                    field: garbage_string(rng, 100),
                    new_value: garbage_string(rng, 5000),
                })
                .collect(),
            lift_restriction: rng.bool(),
            transfer_recipient: garbage_string(rng, 5000),
            contract_end: None,
        });
    }
    if all || rng.u8(..one_in) == 0 {
        req.idempotency_key = match rng.u8(..4) {
            0 => KEYS[rng.usize(..KEYS.len())].into(),
            1 => format!("fuzz-{}", rng.u64(..)),
            _ => garbage_string(rng, 5000),
        };
    }
    if all || rng.u8(..one_in) == 0 {
        req.note = garbage_string(rng, 5000);
    }
    req
}

/// A `traceparent` header value: sometimes valid, mostly not (visible ASCII only, as HTTP
/// requires).
fn garbage_traceparent(rng: &mut fastrand::Rng) -> String {
    match rng.u8(..4) {
        0 => format!("00-{:032x}-{:016x}-01", rng.u128(..), rng.u64(..)),
        1 => "00-00000000000000000000000000000000-0000000000000000-00".into(),
        _ => (0..rng.usize(..200))
            .map(|_| rng.u8(0x20..0x7f) as char)
            .collect(),
    }
}

async fn health(channel: Channel, service: &str) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("health check of {service:?}: {s:?}"))
        .into_inner()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_submits_get_clean_answers_and_the_registry_stays_up() {
    let pair = start(Backend::Sqlite).await.expect("sqlite pair");
    let channel = pair.channel_to_registry("partner-crm");
    let mut crm = RequestServiceClient::new(channel.clone());
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut ok, mut invalid, mut exists) = (0, 0, 0);
    let mut unexpected = Vec::new();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..300 {
        let body = garbage_submit(&mut rng);
        let shown = {
            let mut s = format!("{body:?}");
            s.truncate(s.floor_char_boundary_compat(3000));
            s
        };
        let mut req = tonic::Request::new(body);
        if rng.bool() {
            let tp = garbage_traceparent(&mut rng);
            req.metadata_mut().insert(
                "traceparent",
                tp.parse().expect("visible ASCII is a valid header"),
            );
        }
        match crm.submit(req).await {
            Ok(r) => {
                let r = r.into_inner();
                assert!(!r.request_id.is_empty());
                assert_eq!(r.trace_id.len(), 32, "{r:?}");
                ok += 1;
            }
            Err(s) if s.code() == Code::InvalidArgument => {
                let bad = s.get_details_bad_request().unwrap_or_else(|| {
                    panic!("seed {seed} call {i}: INVALID_ARGUMENT without details: {s:?}")
                });
                assert!(
                    !bad.field_violations.is_empty(),
                    "seed {seed} call {i}: {s:?}"
                );
                invalid += 1;
            }
            Err(s) if s.code() == Code::AlreadyExists => exists += 1,
            // Collected rather than fatal, so that one run shows every kind of failure.
            Err(s) => {
                *kinds
                    .entry(format!("{:?}: {}", s.code(), s.message()))
                    .or_insert(0) += 1;
                unexpected.push(format!("call {i}: {s:?}\n  for {shown}"));
            }
        }
    }
    eprintln!(
        "garbage submits (seed {seed}): {ok} ok, {invalid} invalid, {exists} conflicts, {} \
         unexpected",
        unexpected.len()
    );
    assert!(
        ok > 0 && invalid > 0,
        "the generator should produce both: {ok} ok, {invalid} invalid"
    );

    for service in ["", "dsrelay.v1.RequestService"] {
        assert_eq!(
            health(channel.clone(), service).await,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    // And it still does its job.
    crm.submit(erasure("after-the-storm@example.fi"))
        .await
        .expect("a good submit after the garbage");
    pair.stop().await;
    assert!(
        unexpected.is_empty(),
        "seed {seed}: {} calls were answered neither OK, INVALID_ARGUMENT nor ALREADY_EXISTS \
         ({kinds:?}); first ones:\n{}",
        unexpected.len(),
        unexpected
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Sends and receives raw bytes, to put undecodable or spoiled bodies on the wire.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

async fn raw_submit(channel: &Channel, payload: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    grpc.unary(
        tonic::Request::new(payload),
        PathAndQuery::from_static("/dsrelay.v1.RequestService/Submit"),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_garbage_bodies_are_refused_without_harm() {
    let pair = start(Backend::Sqlite).await.expect("sqlite pair");
    let channel = pair.channel_to_registry("partner-crm");
    let mut rng = fastrand::Rng::with_seed(seed());

    // Decodable bodies reach the handler and are answered like any other.
    let good = erasure("raw@example.fi").encode_to_vec();
    let mut with_unknown_fields = good.clone();
    with_unknown_fields.extend_from_slice(&[0xa0, 0x06, 0x01]); // field 100, varint 1
    let answer = raw_submit(&channel, with_unknown_fields)
        .await
        .expect("unknown fields are skipped");
    let answer = SubmitResponse::decode(answer.as_slice()).expect("a SubmitResponse");
    assert!(!answer.request_id.is_empty());
    let s = raw_submit(&channel, Vec::new())
        .await
        .expect_err("an empty body is an empty SubmitRequest");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    // Undecodable bodies: the codec answers before the handler runs, INVALID_ARGUMENT naming
    // the message type (tonic-prost's own codec would say INTERNAL).
    let mut undecodable: Vec<Vec<u8>> = vec![
        vec![0x08], // truncated varint
        vec![
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ], // over-long varint
        vec![0x2a, 0x02, 0xff, 0xfe], // idempotency_key: invalid UTF-8
        vec![0x12, 0xff, 0xff, 0xff, 0xff, 0x0f], // identity with a huge length
        vec![0x0f], // wire type 7
        [0xa3, 0x01].repeat(1000), // 1000 nested groups of field 20
        vec![0xff; 64],
    ];
    for _ in 0..20 {
        let len = rng.usize(1..4096);
        undecodable.push((0..len).map(|_| rng.u8(..)).collect());
    }
    let (mut decoded, mut refused) = (0, 0);
    for (i, payload) in undecodable.into_iter().enumerate() {
        let head: Vec<u8> = payload.iter().copied().take(16).collect();
        match raw_submit(&channel, payload).await {
            // Random bytes can happen to decode; then validation answers.
            Ok(_) => decoded += 1,
            Err(s)
                if s.code() == Code::InvalidArgument
                    && s.message()
                        .starts_with("the message is not a valid protobuf SubmitRequest") =>
            {
                refused += 1
            }
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::AlreadyExists) => {
                decoded += 1
            }
            Err(s) => panic!("payload {i} (starts {head:02x?}): unexpected {s:?}"),
        }
    }
    eprintln!("raw garbage: {decoded} decoded and answered, {refused} refused as undecodable");
    assert!(refused >= 6, "{refused}");

    // A body over the decode limit is refused by size, naming the limit.
    let s = raw_submit(
        &channel,
        vec![0; dsrelay_registry::MAX_API_MESSAGE_BYTES + 1],
    )
    .await
    .expect_err("an oversized body is refused");
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    assert!(
        s.message()
            .contains(&dsrelay_registry::MAX_API_MESSAGE_BYTES.to_string()),
        "{s:?}"
    );

    assert_eq!(
        health(channel.clone(), "dsrelay.v1.RequestService").await,
        ServingStatus::Serving as i32
    );
    RequestServiceClient::new(channel)
        .submit(erasure("after-raw@example.fi"))
        .await
        .expect("a good submit after the garbage");
    pair.stop().await;
}

/// Free text (cancel and extension reasons, notes, labels, corrections, acknowledgement
/// reasons) may hold any Unicode, including NUL and other control characters: each call is
/// either stored or refused as INVALID_ARGUMENT, never INTERNAL, on either store.
async fn control_characters_in_free_text(backend: Backend) {
    let Some(pair) = start(backend).await else {
        return;
    };
    let mut crm = pair.client("partner-crm");
    let mut operator = pair.client("operator");
    let nasty = "nul\0 esc\u{1b} del\u{7f} bom\u{feff} rtl\u{202e} nl\n";
    // Collected, so that one run shows every call that fails.
    let mut problems = Vec::new();
    let mut acceptable = |what: &str, r: Result<(), Status>| {
        if let Err(s) = r {
            if s.code() != Code::InvalidArgument {
                problems.push(format!("{what}: {:?}: {}", s.code(), s.message()));
            }
        }
    };

    let mut req = erasure("text@example.fi");
    req.note = nasty.into();
    let mut other = ident(IdentityType::Other, IdentityEncoding::Raw, "card-1");
    other.label = nasty.into();
    req.identities.push(other);
    acceptable(
        "Submit with control characters in note and label",
        crm.submit(req).await.map(|_| ()),
    );

    let mut rect = erasure("rect@example.fi");
    rect.kind = RequestKind::Rectification as i32;
    rect.parameters = Some(RequestParameters {
        corrections: vec![FieldCorrection {
            field: "name".into(),
            new_value: nasty.into(),
        }],
        ..Default::default()
    });
    acceptable(
        "Submit of a correction with control characters",
        crm.submit(rect).await.map(|_| ()),
    );

    let id = crm
        .submit(erasure("text2@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    acceptable(
        "ExtendDeadline with control characters in the reason",
        operator
            .extend_deadline(ExtendDeadlineRequest {
                request_id: id.clone(),
                months: 1,
                reason: nasty.into(),
            })
            .await
            .map(|_| ()),
    );
    acceptable(
        "Cancel with control characters in the reason",
        crm.cancel(CancelRequest {
            request_id: id.clone(),
            reason: nasty.into(),
        })
        .await
        .map(|_| ()),
    );
    // Whatever was stored can be read back.
    crm.get(GetRequest {
        request_id: id.clone(),
    })
    .await
    .expect("get");
    crm.list(ListRequestsRequest::default())
        .await
        .expect("list");

    // A processor's acknowledgement carrying control characters.
    let routed = crm
        .submit(erasure("text3@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let mut acks = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"));
    acceptable(
        "Acknowledge with control characters in reason and note",
        acks.acknowledge(AcknowledgeRequest {
            acknowledgements: vec![Acknowledgement {
                request_id: routed.clone(),
                subprocessor: "fuzz\0sub".into(),
                sequence: 1,
                state: TaskState::Failed as i32,
                reason: nasty.into(),
                legal_basis: nasty.into(),
                evidence: Some(Evidence {
                    note: nasty.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        })
        .await
        .map(|_| ()),
    );
    operator
        .get(GetRequest { request_id: routed })
        .await
        .expect("get after the acknowledgement");
    pair.stop().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_free_text_on_sqlite() {
    control_characters_in_free_text(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_free_text_on_postgres() {
    control_characters_in_free_text(Backend::Postgres).await;
}

/// A certificate whose id the store cannot hold (PostgreSQL refuses NUL in text) or that is
/// far too long is refused with its acknowledgement alone, naming the id inside the body; the
/// acknowledgement batched beside it is applied. Answered INTERNAL instead, the whole call
/// would be resent by the processor forever, with everything batched in it.
async fn an_unstorable_certificate_id_refuses_only_its_acknowledgement(backend: Backend) {
    let Some(pair) = start(backend).await else {
        return;
    };
    let id = pair
        .client("partner-crm")
        .submit(erasure("certified@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let mut acks = AcknowledgementServiceClient::new(pair.channel_to_registry("processor"));
    let certified = |sequence: u64, certificate_id: &str| Acknowledgement {
        request_id: id.clone(),
        subprocessor: "accounting".into(),
        sequence,
        state: TaskState::InProgress as i32,
        certificate: Some(DeletionCertificate {
            body: serde_json::to_vec(&serde_json::json!({ "certificate_id": certificate_id }))
                .expect("json"),
            signature: vec![0; 64],
            key_id: "k".into(),
        }),
        ..Default::default()
    };
    let field = "acknowledgements[0].certificate.body.certificate_id";
    for (n, (what, bad, rule)) in [
        ("NUL", "a\0".to_string(), "control characters"),
        ("ESC", "a\u{1b}b".to_string(), "control characters"),
        ("60 KB", "c".repeat(60_000), "1 to 128 bytes"),
        ("blank", " ".to_string(), "is required"),
    ]
    .into_iter()
    .enumerate()
    {
        let sequence = 1_000 + 2 * n as u64;
        let r = acks
            .acknowledge(AcknowledgeRequest {
                acknowledgements: vec![
                    certified(sequence, &bad),
                    certified(sequence + 1, &format!("c-{n}")),
                ],
            })
            .await
            .unwrap_or_else(|s| panic!("{what}: expected a per-entry rejection, got {s:?}"))
            .into_inner();
        assert_eq!(r.applied, 1, "{what}: {r:?}");
        assert_eq!(r.rejected.len(), 1, "{what}: {r:?}");
        let x = &r.rejected[0];
        assert_eq!(
            (x.index, x.code),
            (0, Code::InvalidArgument as i32),
            "{what}: {r:?}"
        );
        let fields: Vec<&str> = x.violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, [field], "{what}: {r:?}");
        assert!(x.violations[0].rule.contains(rule), "{what}: {x:?}");
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstorable_certificate_id_refuses_only_its_acknowledgement_on_sqlite() {
    an_unstorable_certificate_id_refuses_only_its_acknowledgement(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstorable_certificate_id_refuses_only_its_acknowledgement_on_postgres() {
    an_unstorable_certificate_id_refuses_only_its_acknowledgement(Backend::Postgres).await;
}

/// A contract end dated outside the years 2000 to 9999 (typically milliseconds sent as
/// seconds) is refused naming `effective_at`, and does not stand in the way of a real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_end_in_no_real_year_is_refused() {
    let pair = start(Backend::Sqlite).await.expect("sqlite pair");
    let mut ops = ContractServiceClient::new(pair.channel_to_registry("operator"));
    let end = |effective_at: Option<Timestamp>, key: &str| EndContractRequest {
        processor: PROCESSOR.into(),
        choice: ContractEndChoice::Delete as i32,
        effective_now: effective_at.is_none(),
        effective_at,
        idempotency_key: key.into(),
        transfer_recipient: String::new(),
    };
    for (n, seconds) in [1_800_000_000_000, LATEST_INSTANT_SECONDS + 1, i64::MAX]
        .into_iter()
        .enumerate()
    {
        expect_invalid(
            &format!("effective_at {seconds} seconds"),
            ops.end_contract(end(
                Some(Timestamp { seconds, nanos: 0 }),
                &format!("far-{n}"),
            ))
            .await,
            &[("effective_at", &["2000 and 9999", &seconds.to_string()])],
        );
    }
    // A real year, but the contract end would be due after 9999 (the default grace period
    // of 6 months and the 30 days after it): refused at once, not accepted and then refused
    // by the processor at every delivery.
    let december_9999 = LATEST_INSTANT_SECONDS - 30 * 24 * 3600;
    expect_invalid(
        "effective_at in December 9999",
        ops.end_contract(end(
            Some(Timestamp {
                seconds: december_9999,
                nanos: 0,
            }),
            "late",
        ))
        .await,
        &[("effective_at", &["year 9999", "latest effective date"])],
    );
    ops.end_contract(end(None, "now"))
        .await
        .expect("a real contract end after the refused ones");
    pair.stop().await;
}

/// `str::floor_char_boundary` is unstable; this is the stable equivalent for truncating
/// debug output.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, index: usize) -> usize;
}

impl FloorCharBoundary for String {
    fn floor_char_boundary_compat(&self, index: usize) -> usize {
        if index >= self.len() {
            return self.len();
        }
        (0..=index)
            .rev()
            .find(|i| self.is_char_boundary(*i))
            .unwrap_or(0)
    }
}
