//! Another partner's request is NOT_FOUND, answered before anything of it is read: through
//! the real registry (its server over mutual TLS with the development PKI's certificates,
//! its store on SQLite, and PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server).
//!
//! Before, Get loaded the request with its deliveries and tasks and only then checked whose
//! it was, so another partner's request took measurably longer to refuse than an id that
//! does not exist, and told that it existed. Here the tables of deliveries and tasks are
//! taken away (renamed) while partners ask: the owner's Get fails for want of them, so it
//! reads them; another partner's is NOT_FOUND, word for word as an unknown id's, so it read
//! neither.

use dsrelay_proto::v1::certificate_service_client::CertificateServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    CancelRequest, GetRequest, ListCertificatesRequest, ListEventsRequest, RequestKind,
    WatchRequest,
};
use dsrelay_runtime::store::Db;
use tonic::Code;

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup};

/// Renames the tables `deliveries{from}` and `tasks{from}` to `deliveries{to}` and `tasks{to}`.
async fn rename(db: &Db, from: &str, to: &str) {
    for table in ["deliveries", "tasks"] {
        sqlx::query(&format!("ALTER TABLE {table}{from} RENAME TO {table}{to}"))
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("rename {table}{from}: {e}"));
    }
}

async fn another_partners_request_is_refused_unread(database_url: &str, dir: &std::path::Path) {
    let setup = Setup {
        more_partners: &["webform"],
        ..Setup::default()
    };
    let registry = Registry::start(dir, database_url, setup).await;
    let id = registry.submit(RequestKind::Erasure, "hidden").await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let mut crm = RequestServiceClient::new(registry.channel("partner-crm"));
    let mut webform = RequestServiceClient::new(registry.channel("partner-webform"));
    let mut certificates = CertificateServiceClient::new(registry.channel("partner-webform"));

    let db = Db::connect(database_url).await.unwrap();
    rename(&db, "", "_hidden").await;
    let owners = crm
        .get(GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect_err("the owner's Get reads the deliveries and tasks taken away");
    assert_ne!(owners.code(), Code::NotFound, "{owners:?}");

    for request_id in [id.as_str(), unknown.as_str()] {
        let want = format!("request {request_id} not found");
        let refusals = [
            webform
                .get(GetRequest {
                    request_id: request_id.into(),
                })
                .await
                .map(drop),
            webform
                .watch(WatchRequest {
                    request_id: request_id.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            webform
                .list_events(ListEventsRequest {
                    request_id: request_id.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            webform
                .cancel(CancelRequest {
                    request_id: request_id.into(),
                    reason: "the subject withdrew it".into(),
                })
                .await
                .map(drop),
            certificates
                .list_certificates(ListCertificatesRequest {
                    request_id: request_id.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ];
        for (i, refused) in refusals.into_iter().enumerate() {
            let status = refused.expect_err("refused");
            assert_eq!(status.code(), Code::NotFound, "call {i}: {status:?}");
            assert_eq!(status.message(), want, "call {i}");
        }
    }

    rename(&db, "_hidden", "").await;
    let shown = registry.get(&id).await;
    assert_eq!(shown.request_id, id);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_partners_request_is_refused_unread_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    another_partners_request_is_refused_unread(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_partners_request_is_refused_unread_on_postgres() {
    on_postgres(|url, dir| async move {
        another_partners_request_is_refused_unread(&url, &dir).await;
    })
    .await;
}
