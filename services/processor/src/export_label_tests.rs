//! The categories an export's files are labelled with: a holder whose connector is handed the
//! request's scope answers for those categories only, and its files say so; any other holder
//! exports all it holds of the subject, and its files name every category it holds, not only
//! the requested ones (a scoped transfer otherwise told its recipient that a file holding a
//! national id and a phone number was invoicing data).

use std::collections::HashMap;
use std::sync::Arc;

use dsrelay_connectors::{BoxFuture, BulkJob, Connector, ConnectorError, Outcome, Task};
use dsrelay_proto::v1::RequestKind;

use crate::store::TaskKey;
use crate::App;

/// A holder that exports nothing; only whether it takes the scope matters here.
struct Holder {
    scopes: bool,
}

impl Connector for Holder {
    fn kind_name(&self) -> &'static str {
        "label-holder"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, _task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("not called here".into())) })
    }

    fn run_bulk<'a>(&'a self, _job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async { Err(ConnectorError::Permanent("not called here".into())) })
    }

    fn scopes_by_category(&self) -> bool {
        self.scopes
    }
}

async fn labels(scopes: bool, requested: &[String]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/processor.db", dir.path().display());
    let mut config = crate::contract_tests::config(dir.path(), &url, &["acme"]);
    config.subprocessors[0].categories = vec!["contact".into(), "invoicing".into()];
    let connectors = HashMap::from([(
        "crm".to_string(),
        Arc::new(Holder { scopes }) as Arc<dyn Connector>,
    )]);
    let app = App::with_connectors(config, connectors).await.expect("app");
    let key = TaskKey {
        controller: "acme".into(),
        request_id: "r-label".into(),
        subprocessor: "crm".into(),
    };
    let sink = super::export_sink(&app.shared(), &key, requested)
        .await
        .expect("sink");
    sink.categories().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_takes_the_scope_labels_its_files_with_the_requested_categories() {
    let requested = vec!["invoicing".to_string()];
    assert_eq!(labels(true, &requested).await, ["invoicing"]);
    assert_eq!(labels(true, &[]).await, ["contact", "invoicing"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_exports_all_it_holds_labels_its_files_with_every_held_category() {
    let requested = vec!["invoicing".to_string()];
    assert_eq!(labels(false, &requested).await, ["contact", "invoicing"]);
    assert_eq!(labels(false, &[]).await, ["contact", "invoicing"]);
}
