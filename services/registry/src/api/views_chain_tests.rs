//! GetChain gives a tabular holder's tables (`Subprocessor.tables`, which tables a scoped
//! request reaches) to operators only: table names are the processor's internal schema
//! details, like its endpoint. The registry stores the processor's answer encoded, so the
//! tables come back from either store as the processor reported them.

use std::path::Path;

use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::subprocessor::HeldTable;
use dsrelay_proto::v1::{GetChainRequest, Subprocessor, SubprocessorList};

use crate::store::ChainReport;
use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup, PROCESSOR};

fn table(name: &str, categories: &[&str], inherited: bool) -> HeldTable {
    HeldTable {
        name: name.into(),
        data_categories: categories.iter().map(|c| c.to_string()).collect(),
        inherited,
    }
}

async fn an_operator_sees_a_holders_tables_and_a_partner_does_not(url: &str, dir: &Path) {
    let registry = Registry::start(dir, url, Setup::default()).await;
    let tables = vec![
        table("customers", &["contact"], false),
        table("invoices", &["invoicing"], false),
        table("audit_log", &["contact", "invoicing"], true),
    ];
    let list = SubprocessorList {
        subprocessors: vec![
            Subprocessor {
                name: "accounting".into(),
                connector: "sql".into(),
                data_categories: vec!["contact".into(), "invoicing".into()],
                tables: tables.clone(),
                ..Default::default()
            },
            Subprocessor {
                name: "mail-marketing".into(),
                connector: "noop".into(),
                data_categories: vec!["marketing".into()],
                ..Default::default()
            },
        ],
    };
    let db = dsrelay_runtime::store::Db::connect(url).await.expect("db");
    crate::store::Store::new(db, b"test")
        .record_chain(PROCESSOR, ChainReport::Listed(list.encode_to_vec()), 1)
        .await
        .expect("chain recorded");
    let seen = |stem: &'static str| {
        let channel = registry.channel(stem);
        async move {
            let chain = RequestServiceClient::new(channel)
                .get_chain(GetChainRequest {})
                .await
                .expect("chain")
                .into_inner();
            let p = chain.processors.into_iter().find(|p| p.name == PROCESSOR);
            p.expect("the processor").subprocessors
        }
    };
    let operator = seen("operator").await;
    assert_eq!(operator[0].tables, tables);
    assert!(operator[1].tables.is_empty(), "{operator:?}");
    let partner = seen("partner-crm").await;
    assert_eq!(partner.len(), 2, "{partner:?}");
    assert!(partner.iter().all(|s| s.tables.is_empty()), "{partner:?}");
    // Everything else of the holder is the partner's to see.
    assert_eq!(partner[0].data_categories, operator[0].data_categories);
    assert_eq!(partner[0].connector, "sql");
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_a_holders_tables_and_a_partner_does_not_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    an_operator_sees_a_holders_tables_and_a_partner_does_not(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_a_holders_tables_and_a_partner_does_not_on_postgres() {
    on_postgres(|url, dir| async move {
        an_operator_sees_a_holders_tables_and_a_partner_does_not(&url, &dir).await;
    })
    .await;
}
