//! Who cancelled a request or extended its due date: the audit trail's CANCELLED and
//! DEADLINE_EXTENDED entries name the caller, as SUBMITTED names the partner, and the
//! extension's log line names it (`by`), as the cancellation's does.

use std::path::Path;

use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    CancelRequest, EventType, ExtendDeadlineRequest, ListAuditEntriesRequest, RequestKind,
};
use dsrelay_runtime::testing::captured_logs;
use serde_json::Value;

use crate::test_postgres::on_postgres;
use crate::test_registry::{Registry, Setup};

/// A request extended by the operator and cancelled by its partner, another cancelled by
/// the operator: each entry names who acted. Before, both kinds of entry had an empty actor
/// and the extension was logged nowhere.
async fn cancellations_and_extensions_name_who_acted(url: &str, dir: &Path) {
    let logs = captured_logs();
    let registry = Registry::start(dir, url, Setup::default()).await;
    let by_partner = registry.submit(RequestKind::Erasure, "actor-crm").await;
    let by_operator = registry.submit(RequestKind::Erasure, "actor-ops").await;
    let mut crm = RequestServiceClient::new(registry.channel("partner-crm"));
    let mut ops = RequestServiceClient::new(registry.channel("operator"));
    ops.extend_deadline(ExtendDeadlineRequest {
        request_id: by_partner.clone(),
        months: 1,
        reason: "the holder's books are archived".into(),
    })
    .await
    .expect("extend");
    let cancel = |id: &str| CancelRequest {
        request_id: id.into(),
        reason: "sent twice".into(),
    };
    crm.cancel(cancel(&by_partner)).await.expect("crm cancels");
    ops.cancel(cancel(&by_operator)).await.expect("ops cancels");

    let entries = ops
        .list_audit_entries(ListAuditEntriesRequest::default())
        .await
        .expect("audit entries")
        .into_inner()
        .entries;
    let actors = |id: &str, ty: EventType| {
        entries
            .iter()
            .filter(|e| e.request_id == id && e.event_type == ty as i32)
            .map(|e| e.actor.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(actors(&by_partner, EventType::Submitted), ["crm"]);
    assert_eq!(actors(&by_partner, EventType::DeadlineExtended), ["ops"]);
    assert_eq!(actors(&by_partner, EventType::Cancelled), ["crm"]);
    assert_eq!(actors(&by_operator, EventType::Cancelled), ["ops"]);

    let logged = |message: &str, id: &str| {
        logs.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["fields"]["message"] == message && l["fields"]["request_id"] == id)
            .map(|l| l["fields"]["by"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(logged("due date extended", &by_partner), ["ops"]);
    assert_eq!(logged("request cancelled", &by_partner), ["crm"]);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellations_and_extensions_name_who_acted_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/registry.db", dir.path().display());
    cancellations_and_extensions_name_who_acted(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellations_and_extensions_name_who_acted_on_postgres() {
    on_postgres(|url, dir| async move {
        cancellations_and_extensions_name_who_acted(&url, &dir).await;
    })
    .await;
}
