//! `dsrctl audit verify`: reads the registry's audit trail page by page and checks its hash
//! chain with [`dsrelay_runtime::audit`], the same code the registry hashes with.

use dsrelay_runtime::audit::{ChainBreak, Entry, Verifier};
use dsrelay_sdk::proto::ListAuditEntriesRequest;
use serde::Serialize;

use crate::cli::AuditVerifyArgs;
use crate::commands::{Io, Registry};
use crate::output::{emit, Render};
use crate::table::clean;
use crate::Failure;

/// Entries asked for per call.
const PAGE_SIZE: u32 = 1000;

/// The outcome of a verification.
#[derive(Debug, Serialize)]
pub(crate) struct VerifyView {
    intact: bool,
    /// When intact: how many entries, and the last one's seq and hash (an anchor for
    /// `--anchor` later).
    #[serde(skip_serializing_if = "Option::is_none")]
    entries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_hash: Option<String>,
    /// When broken: where and how.
    #[serde(rename = "break", skip_serializing_if = "Option::is_none")]
    broken: Option<BreakView>,
}

#[derive(Debug, Serialize)]
struct BreakView {
    seq: u64,
    kind: &'static str,
    detail: String,
}

impl From<&ChainBreak> for BreakView {
    fn from(b: &ChainBreak) -> Self {
        Self {
            seq: b.seq,
            kind: b.kind.as_str(),
            detail: b.detail.clone(),
        }
    }
}

impl Render for VerifyView {
    fn to_table(&self) -> String {
        match &self.broken {
            None => format!(
                "audit trail intact: {} entries, last hash {}\n",
                self.entries.unwrap_or_default(),
                self.last_hash.as_deref().unwrap_or_default()
            ),
            Some(b) => format!(
                "audit trail broken at entry {}: {}: {}\n",
                b.seq,
                b.kind,
                clean(&b.detail)
            ),
        }
    }
}

/// Verifies the whole trail; 0 when intact, 1 when broken.
pub(crate) async fn verify(
    registry: &Registry,
    args: &AuditVerifyArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let mut verifier = Verifier::new();
    if let Some((seq, hash)) = &args.anchor {
        verifier = verifier.anchor(*seq, hash.clone());
    }
    let mut client = registry.client.raw();
    let mut after_seq = 0;
    let outcome = 'pages: loop {
        let page = client
            .list_audit_entries(ListAuditEntriesRequest {
                after_seq,
                page_size: PAGE_SIZE,
            })
            .await
            .map_err(|s| registry.failed(s))?
            .into_inner();
        for e in page.entries {
            let entry = Entry {
                seq: e.seq,
                occurred_at: e
                    .occurred_at
                    .as_ref()
                    .map(dsrelay_proto::millis_from_timestamp)
                    .unwrap_or_default(),
                request_id: e.request_id,
                event_type: e.event_type,
                actor: e.actor,
                detail: e.detail,
                prev_hash: e.prev_hash,
                hash: e.hash,
            };
            if let Err(b) = verifier.push(entry) {
                break 'pages Err(b);
            }
        }
        // 0 at the end; a token that does not advance would loop forever.
        if page.next_after_seq <= after_seq {
            break 'pages verifier.finish();
        }
        after_seq = page.next_after_seq;
    };
    let view = match outcome {
        Ok(intact) => VerifyView {
            intact: true,
            entries: Some(intact.entries),
            last_seq: Some(intact.last_seq),
            last_hash: Some(intact.last_hash),
            broken: None,
        },
        Err(b) => VerifyView {
            intact: false,
            entries: None,
            last_seq: None,
            last_hash: None,
            broken: Some(BreakView::from(&b)),
        },
    };
    emit(io.out, io.format, &view, false)?;
    Ok(if view.intact { 0 } else { crate::EXIT_FAILURE })
}
