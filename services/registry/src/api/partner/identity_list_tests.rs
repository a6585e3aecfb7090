//! List by the subject's identities: each identity normalised and hashed as Submit stores
//! it, a partner's requests only for that partner, every partner's for an operator, forgotten
//! requests too, identities held to Submit's rules, and page tokens bound to the identities.

use std::path::Path;

use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    IdentityEncoding, IdentityType, ListRequestsRequest, RequestKind, SubjectIdentity,
    SubmitRequest,
};
use dsrelay_runtime::store::Db;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup};

fn raw(ty: IdentityType, value: &str) -> SubjectIdentity {
    SubjectIdentity {
        r#type: ty as i32,
        encoding: IdentityEncoding::Raw as i32,
        value: value.into(),
        label: String::new(),
    }
}

fn email(value: &str) -> SubjectIdentity {
    raw(IdentityType::Email, value)
}

/// Submits an erasure about `identities` as `client`'s partner under `key`; its id.
async fn submit(
    client: &mut RequestServiceClient<Channel>,
    key: &str,
    identities: Vec<SubjectIdentity>,
) -> String {
    client
        .submit(SubmitRequest {
            kind: RequestKind::Erasure as i32,
            identities,
            idempotency_key: key.into(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id
}

/// The ids `client` lists about `identities` on one page of `page_size` from `page_token`,
/// and the next page's token.
async fn listed(
    client: &mut RequestServiceClient<Channel>,
    identities: Vec<SubjectIdentity>,
    page_size: u32,
    page_token: &str,
) -> Result<(Vec<String>, String), tonic::Status> {
    let page = client
        .list(ListRequestsRequest {
            identities,
            page_size,
            page_token: page_token.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let ids = page.requests.into_iter().map(|r| r.request_id).collect();
    Ok((ids, page.next_page_token))
}

/// The fields a refusal names.
fn fields(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

async fn requests_are_found_by_identity(url: &str, dir: &Path) {
    let setup = Setup {
        more_partners: &["webform"],
        ..Setup::default()
    };
    let registry = Registry::start(dir, url, setup).await;
    let mut crm = RequestServiceClient::new(registry.channel("partner-crm"));
    let mut webform = RequestServiceClient::new(registry.channel("partner-webform"));
    let mut ops = RequestServiceClient::new(registry.channel("operator"));
    let maija = submit(
        &mut crm,
        "maija",
        vec![email("maija.meikäläinen@example.fi")],
    )
    .await;
    let teemu = submit(&mut crm, "teemu", vec![email("teemu@example.fi")]).await;
    let phone = submit(
        &mut crm,
        "phone",
        vec![raw(IdentityType::Phone, "+358 40 123 4567")],
    )
    .await;
    let elsewhere = submit(
        &mut webform,
        "maija",
        vec![email("MAIJA.MEIKÄLÄINEN@example.fi")],
    )
    .await;

    // In another case, beyond ASCII too, as Submit lowercases it; newest first.
    let asked = || vec![email("Maija.Meikäläinen@EXAMPLE.fi")];
    let all = listed(&mut ops, asked(), 0, "").await.expect("ops");
    assert_eq!(all, (vec![elsewhere.clone(), maija.clone()], String::new()));
    // A partner finds its own only.
    let own = listed(&mut crm, asked(), 0, "").await.expect("crm").0;
    assert_eq!(own, [maija.as_str()]);
    let own = listed(&mut webform, asked(), 0, "")
        .await
        .expect("webform")
        .0;
    assert_eq!(own, [elsewhere.as_str()]);
    // Another address, the same one without its umlauts, or its SHA256 form (another
    // encoding, as Submit stores it apart) find nothing.
    for other in [
        email("maija.meikalainen@example.fi"),
        email("maija@example.fi"),
        SubjectIdentity {
            encoding: IdentityEncoding::Sha256 as i32,
            value: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                "maija.meikäläinen@example.fi",
            )),
            ..email("")
        },
    ] {
        let none = listed(&mut ops, vec![other.clone()], 0, "")
            .await
            .expect("ops");
        assert_eq!(none.0, Vec::<String>::new(), "{other:?}");
    }
    // Any of several; a phone number however it is spaced.
    let either = vec![
        raw(IdentityType::Phone, "+358401234567"),
        email("teemu@example.fi"),
    ];
    let found = listed(&mut crm, either, 0, "").await.expect("either").0;
    assert_eq!(found, [phone.clone(), teemu.clone()]);

    // Forgotten: the raw identities go, the keyed hashes stay, and so it is still found.
    let db = Db::connect(url).await.expect("connect");
    sqlx::query("UPDATE requests SET body = NULL, forgotten_at = 1 WHERE id = $1")
        .bind(&maija)
        .execute(&db.pool)
        .await
        .expect("forget");
    let own = listed(&mut crm, asked(), 0, "").await.expect("forgotten").0;
    assert_eq!(own, [maija.as_str()]);

    // Paging: a token goes on with the same identities, in any order or form, and with no
    // other.
    let (first, token) = listed(&mut ops, asked(), 1, "").await.expect("page 1");
    assert_eq!(first, [elsewhere.as_str()]);
    assert!(!token.is_empty());
    let same = vec![
        email("teemu@example.fi"),
        email("maija.meikäläinen@example.fi"),
    ];
    let (_, with_teemu) = listed(&mut ops, same.clone(), 1, "").await.expect("two");
    let (second, _) = listed(&mut ops, same.into_iter().rev().collect(), 1, &with_teemu)
        .await
        .expect("the same identities in another order");
    assert_eq!(second, [teemu.as_str()]);
    let (second, end) = listed(&mut ops, asked(), 1, &token).await.expect("page 2");
    assert_eq!(second, [maija.as_str()]);
    assert_eq!(end, "");
    let (_, plain_token) = listed(&mut ops, vec![], 1, "")
        .await
        .expect("no identities");
    for (identities, token) in [
        (vec![email("teemu@example.fi")], &token),
        (vec![], &token),
        (asked(), &plain_token),
    ] {
        let refused = listed(&mut ops, identities, 1, token).await.unwrap_err();
        assert_eq!(fields(&refused), ["page_token"], "{refused:?}");
        assert!(refused.message().contains("other filters"), "{refused:?}");
    }

    // Held to Submit's rules, with its violations, and the other arguments' at once.
    let mut labelled = email("maija@example.fi");
    labelled.label = "work".into();
    let broken = vec![
        email("not an address"),
        labelled,
        raw(IdentityType::CustomerNumber, "--"),
        SubjectIdentity {
            r#type: 0,
            ..email("maija@example.fi")
        },
    ];
    let refused = ops
        .list(ListRequestsRequest {
            identities: broken,
            page_size: 501,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        fields(&refused),
        [
            "identities[0].value",
            "identities[3].type",
            "identities[1].label",
            "identities[2].value",
            "page_size",
        ],
        "{refused:?}"
    );
    let too_many = vec![email("maija@example.fi"); 17];
    let refused = crm
        .list(ListRequestsRequest {
            identities: too_many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(fields(&refused), ["identities"], "{refused:?}");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_found_by_identity_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    requests_are_found_by_identity(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_found_by_identity_on_postgres() {
    on_postgres(|url, dir| async move {
        requests_are_found_by_identity(&url, &dir).await;
    })
    .await;
}
