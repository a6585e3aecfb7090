//! List by due date (`due_before`): open requests due before an instant, with the other
//! filters, paged with a token bound to the instant, and a malformed instant refused.

use std::path::Path;

use dsrelay_proto::prost_types::Timestamp;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    IdentityEncoding, IdentityType, ListRequestsRequest, RequestKind, RequestState,
    SubjectIdentity, SubmitRequest,
};
use dsrelay_runtime::store::{now_ms, Db};
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup};

const HOUR: i64 = 3_600_000;

/// Submits a request of `kind` as `client`'s partner under `key`; its id.
async fn submit(
    client: &mut RequestServiceClient<Channel>,
    kind: RequestKind,
    key: &str,
) -> String {
    client
        .submit(SubmitRequest {
            kind: kind as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: "maija@example.fi".into(),
                label: String::new(),
            }],
            idempotency_key: key.into(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id
}

/// The ids `client` lists with `request` (page token and size included), and the next page's
/// token.
async fn listed(
    client: &mut RequestServiceClient<Channel>,
    request: ListRequestsRequest,
) -> Result<(Vec<String>, String), tonic::Status> {
    let page = client.list(request).await?.into_inner();
    let ids = page.requests.into_iter().map(|r| r.request_id).collect();
    Ok((ids, page.next_page_token))
}

/// Due before `ms`.
fn due_before(ms: i64) -> ListRequestsRequest {
    ListRequestsRequest {
        due_before: Some(timestamp_from_millis(ms)),
        ..Default::default()
    }
}

/// The fields and rules of an INVALID_ARGUMENT.
fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

async fn due_soon_requests_are_listed(url: &str, dir: &Path) {
    let setup = Setup {
        more_partners: &["webform"],
        ..Setup::default()
    };
    let registry = Registry::start(dir, url, setup).await;
    let mut crm = RequestServiceClient::new(registry.channel("partner-crm"));
    let mut webform = RequestServiceClient::new(registry.channel("partner-webform"));
    let mut ops = RequestServiceClient::new(registry.channel("operator"));
    let now = now_ms();
    // Oldest first: (key, partner's client, kind, state, due at). No processor answers, so
    // nothing moves these requests from the states written here.
    let erasure = RequestKind::Erasure;
    let plan = [
        ("soon", erasure, RequestState::Received, now + HOUR),
        ("failed", erasure, RequestState::Failed, now + 2 * HOUR),
        (
            "objection",
            RequestKind::Objection,
            RequestState::InProgress,
            now + 3 * HOUR,
        ),
        ("overdue", erasure, RequestState::Dispatched, now - HOUR),
        ("later", erasure, RequestState::Received, now + 240 * HOUR),
        ("completed", erasure, RequestState::Completed, now + HOUR),
        (
            "partial",
            erasure,
            RequestState::PartiallyCompleted,
            now + HOUR,
        ),
        ("cancelled", erasure, RequestState::Cancelled, now + HOUR),
        ("theirs", erasure, RequestState::Received, now + HOUR),
    ];
    let db = Db::connect(url).await.expect("connect");
    let mut ids = std::collections::HashMap::new();
    for (i, (key, kind, state, due)) in plan.into_iter().enumerate() {
        let client = if key == "theirs" {
            &mut webform
        } else {
            &mut crm
        };
        let id = submit(client, kind, key).await;
        // Received a second apart, so that newest first is one order.
        sqlx::query("UPDATE requests SET state = $1, due_at = $2, received_at = $3 WHERE id = $4")
            .bind(state as i64)
            .bind(due)
            .bind(now - 100_000 + i as i64 * 1_000)
            .bind(&id)
            .execute(&db.pool)
            .await
            .expect("set the request's state and due date");
        ids.insert(key, id);
    }
    let id = |key: &str| ids[key].clone();
    let ids_of = |keys: &[&str]| keys.iter().map(|k| id(k)).collect::<Vec<_>>();
    let day = now + 24 * HOUR;

    // Alone: the open ones due within the day, overdue included, newest first; a partner
    // sees its own.
    let all = listed(&mut ops, due_before(day)).await.expect("ops");
    assert_eq!(
        all,
        (
            ids_of(&["theirs", "overdue", "objection", "failed", "soon"]),
            String::new()
        )
    );
    let own = listed(&mut crm, due_before(day)).await.expect("crm").0;
    assert_eq!(own, ids_of(&["overdue", "objection", "failed", "soon"]));
    // Further out, the later one too; earlier, only the overdue one.
    let fortnight = listed(&mut crm, due_before(now + 336 * HOUR)).await;
    assert_eq!(
        fortnight.expect("fortnight").0,
        ids_of(&["later", "overdue", "objection", "failed", "soon"])
    );
    let past = listed(&mut crm, due_before(now)).await.expect("past").0;
    assert_eq!(past, ids_of(&["overdue"]));

    // Strictly before the instant, to the nanosecond: a request due at it is not listed, one
    // due half a millisecond before it is.
    let at_soon = listed(&mut crm, due_before(now + HOUR))
        .await
        .expect("at")
        .0;
    assert_eq!(at_soon, ids_of(&["overdue"]));
    let mut just_after = timestamp_from_millis(now + HOUR);
    just_after.nanos += 500_000;
    let after = ListRequestsRequest {
        due_before: Some(just_after),
        ..Default::default()
    };
    let just = listed(&mut crm, after).await.expect("just after").0;
    assert_eq!(just, ids_of(&["overdue", "soon"]));

    // With states and kind: both conditions. A closed state asked for finds nothing.
    let with = |states: Vec<RequestState>, kind: RequestKind| ListRequestsRequest {
        states: states.into_iter().map(|s| s as i32).collect(),
        kind: kind as i32,
        ..due_before(day)
    };
    let failed = listed(
        &mut ops,
        with(vec![RequestState::Failed], RequestKind::Unspecified),
    );
    assert_eq!(failed.await.expect("failed").0, ids_of(&["failed"]));
    let objections = listed(&mut ops, with(vec![], RequestKind::Objection)).await;
    assert_eq!(objections.expect("kind").0, ids_of(&["objection"]));
    let received_erasures = with(vec![RequestState::Received], RequestKind::Erasure);
    let received = listed(&mut ops, received_erasures).await.expect("both").0;
    assert_eq!(received, ids_of(&["theirs", "soon"]));
    let closed = with(
        vec![
            RequestState::Completed,
            RequestState::PartiallyCompleted,
            RequestState::Cancelled,
        ],
        RequestKind::Unspecified,
    );
    let closed = listed(&mut ops, closed).await.expect("closed").0;
    assert_eq!(closed, Vec::<String>::new());

    // With overdue_only: past the due date and before the instant.
    let overdue = ListRequestsRequest {
        overdue_only: true,
        ..due_before(day)
    };
    let both = listed(&mut ops, overdue.clone()).await.expect("overdue").0;
    assert_eq!(both, ids_of(&["overdue"]));
    let earlier = ListRequestsRequest {
        overdue_only: true,
        ..due_before(now - 2 * HOUR)
    };
    let none = listed(&mut ops, earlier).await.expect("earlier").0;
    assert_eq!(none, Vec::<String>::new());

    // Paging: a token goes on with the same instant, and no other.
    let page = |token: &str, request: ListRequestsRequest| ListRequestsRequest {
        page_size: 2,
        page_token: token.into(),
        ..request
    };
    let mut paged = Vec::new();
    let mut token = String::new();
    let mut tokens = Vec::new();
    loop {
        let (ids, next) = listed(&mut ops, page(&token, due_before(day)))
            .await
            .expect("a page");
        assert!(ids.len() <= 2, "{ids:?}");
        paged.extend(ids);
        if next.is_empty() {
            break;
        }
        tokens.push(next.clone());
        token = next;
        assert!(tokens.len() < 5, "paging does not end: {tokens:?}");
    }
    assert_eq!(paged, all.0);
    let first = tokens[0].clone();
    let (plain, _) = listed(&mut ops, page("", ListRequestsRequest::default()))
        .await
        .expect("no due_before");
    assert_eq!(plain.len(), 2);
    let (_, plain_token) = listed(&mut ops, page("", ListRequestsRequest::default()))
        .await
        .expect("no due_before");
    for (request, token) in [
        (due_before(day + 1), &first),
        (ListRequestsRequest::default(), &first),
        (overdue.clone(), &first),
        (due_before(day), &plain_token),
    ] {
        let refused = listed(&mut ops, page(token, request.clone()))
            .await
            .expect_err("a token of other filters");
        let v = violations(&refused);
        assert_eq!(v.len(), 1, "{refused:?}");
        assert_eq!(v[0].0, "page_token", "{refused:?}");
        assert!(
            refused.message().contains("other filters"),
            "{request:?}: {refused:?}"
        );
    }

    // A malformed instant is refused naming the field and what to send; nothing is listed.
    for (bad, field) in [
        (
            Timestamp {
                seconds: now / 1000,
                nanos: -1,
            },
            "due_before.nanos",
        ),
        (
            Timestamp {
                seconds: now / 1000,
                nanos: 1_000_000_000,
            },
            "due_before.nanos",
        ),
        (
            Timestamp {
                seconds: 0,
                nanos: 0,
            },
            "due_before",
        ),
        (
            Timestamp {
                seconds: now,
                nanos: 0,
            },
            "due_before",
        ),
        (
            Timestamp {
                seconds: i64::MAX,
                nanos: 999_999_999,
            },
            "due_before",
        ),
        (
            Timestamp {
                seconds: i64::MIN,
                nanos: 0,
            },
            "due_before",
        ),
    ] {
        let request = ListRequestsRequest {
            due_before: Some(bad),
            ..Default::default()
        };
        let refused = listed(&mut crm, request).await.expect_err("a bad instant");
        let v = violations(&refused);
        assert_eq!(v.len(), 1, "{bad:?}: {refused:?}");
        assert_eq!(v[0].0, field, "{bad:?}: {refused:?}");
        assert!(v[0].1.starts_with("must be"), "{bad:?}: {refused:?}");
    }
    let refused = listed(
        &mut crm,
        ListRequestsRequest {
            due_before: Some(Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await
    .expect_err("the year 1970");
    assert!(
        refused
            .message()
            .contains("between the years 2000 and 9999"),
        "{refused:?}"
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_soon_requests_are_listed_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    due_soon_requests_are_listed(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_soon_requests_are_listed_on_postgres() {
    on_postgres(|url, dir| async move {
        due_soon_requests_are_listed(&url, &dir).await;
    })
    .await;
}
