//! GetChain passes on a processor's report that a subprocessor is unreachable: since when to
//! everyone, the holder's words (`unreachable_error`) to operators only, as `last_error`.

use std::path::Path;

use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{GetChainRequest, Subprocessor, SubprocessorList};

use crate::store::ChainReport;
use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup, PROCESSOR};

/// A holder's error may quote what it holds: a partner reading the chain learns that the
/// subprocessor is unreachable and since when, not the words. Before, GetChain copied the
/// processor's list as it came, error included, to every caller.
async fn a_partner_sees_when_a_subprocessor_became_unreachable_not_why(url: &str, dir: &Path) {
    let registry = Registry::start(dir, url, Setup::default()).await;
    let list = SubprocessorList {
        subprocessors: vec![Subprocessor {
            name: "mail-marketing".into(),
            unreachable_since: Some(timestamp_from_millis(1_800_000_000_000)),
            unreachable_error: "no subscriber maija@example.fi here".into(),
            ..Default::default()
        }],
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
            let s = p.expect("the processor").subprocessors.remove(0);
            (s.unreachable_since.map(|t| t.seconds), s.unreachable_error)
        }
    };
    assert_eq!(
        seen("operator").await,
        (
            Some(1_800_000_000),
            "no subscriber maija@example.fi here".to_string()
        )
    );
    assert_eq!(
        seen("partner-crm").await,
        (Some(1_800_000_000), String::new())
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_sees_when_a_subprocessor_became_unreachable_not_why_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    a_partner_sees_when_a_subprocessor_became_unreachable_not_why(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_sees_when_a_subprocessor_became_unreachable_not_why_on_postgres() {
    on_postgres(|url, dir| async move {
        a_partner_sees_when_a_subprocessor_became_unreachable_not_why(&url, &dir).await;
    })
    .await;
}
