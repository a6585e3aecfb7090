//! ListSubprocessors reports a tabular holder's tables with the categories each holds, as
//! a scoped request narrows them: the categories its rule names, or, for a table naming
//! none, its subprocessor's (marked `inherited`). A holder that is not tabular lists none.

use std::collections::HashMap;
use std::sync::Arc;

use dsrelay_connectors::sql::{create_sample_accounting_db, sample_config};
use dsrelay_connectors::{Connector, ConnectorConfig};
use dsrelay_proto::v1::subprocessor::HeldTable;
use dsrelay_proto::v1::ListSubprocessorsRequest;
use dsrelay_runtime::pki::dev_identity;

use crate::api_test_support::serve_processor_api;
use crate::App;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_holder_lists_its_tables_with_their_categories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let accounting_url = format!("sqlite://{}/accounting.db", dir.display());
    create_sample_accounting_db(&accounting_url)
        .await
        .expect("sample database");
    let mut rules = sample_config(&accounting_url);
    for t in &mut rules.tables {
        t.categories = match t.table.as_str() {
            "customers" | "contacts" => Some(vec!["contact".into()]),
            "invoices" => Some(vec!["invoicing".into(), "contact".into()]),
            _ => None,
        };
    }
    let sql = ConnectorConfig::Sql(rules);
    let sql_connector = dsrelay_connectors::build(&sql)
        .await
        .expect("sql connector");

    let url = format!("sqlite://{}/processor.db", dir.display());
    let mut config = crate::contract_tests::config(dir, &url, &["acme"]);
    config.controllers[0].identity = dev_identity("registry", "controller");
    let mut accounting = config.subprocessors[0].clone();
    accounting.name = "accounting".into();
    accounting.categories = vec!["contact".into(), "invoicing".into()];
    accounting.connector = sql;
    config.subprocessors.push(accounting);
    let noop = dsrelay_connectors::build(&config.subprocessors[0].connector)
        .await
        .expect("noop connector");
    let connectors = HashMap::from([
        ("crm".to_string(), noop as Arc<dyn Connector>),
        ("accounting".to_string(), sql_connector),
    ]);
    let app = App::with_connectors(config, connectors).await.expect("app");

    let (mut client, stop) = serve_processor_api(&app.shared(), dir).await;
    let list = client
        .list_subprocessors(ListSubprocessorsRequest {})
        .await
        .expect("ListSubprocessors")
        .into_inner();

    let names: Vec<&str> = (list.subprocessors.iter())
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["crm", "accounting"]);
    assert!(list.subprocessors[0].tables.is_empty(), "{list:?}");
    let table = |name: &str, categories: &[&str], inherited: bool| HeldTable {
        name: name.into(),
        data_categories: categories.iter().map(|c| c.to_string()).collect(),
        inherited,
    };
    assert_eq!(
        list.subprocessors[1].tables,
        [
            table("contacts", &["contact"], false),
            table("invoices", &["invoicing", "contact"], false),
            table("ledger_entries", &["contact", "invoicing"], true),
            table("customers", &["contact"], false),
        ]
    );
    let _ = stop.send(());
}
