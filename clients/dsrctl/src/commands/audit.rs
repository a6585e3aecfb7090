//! `dsrctl audit verify`: reads the registry's audit trail page by page and checks its hash
//! chain with [`dsrelay_runtime::audit`], the same code the registry hashes with, and against
//! the registry's signed checkpoints when given them. `dsrctl audit checkpoints`: prints the
//! checkpoints, to keep.

use anyhow::Context as _;
use dsrelay_runtime::audit::checkpoint::{self, Checkpoint};
use dsrelay_runtime::audit::{ChainBreak, Entry, Verifier};
use dsrelay_runtime::signing::{PublicKey, Signed};
use dsrelay_sdk::proto::{ListAuditCheckpointsRequest, ListAuditEntriesRequest};
use serde::Serialize;

use crate::cli::{AuditCheckpointsArgs, AuditVerifyArgs};
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
    /// How many signed checkpoints the trail was checked against (none asked for: absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoints: Option<u64>,
    /// When broken: where and how.
    #[serde(rename = "break", skip_serializing_if = "Option::is_none")]
    broken: Option<BreakView>,
    /// When the checkpoints themselves do not check out: which one and why. The trail is
    /// then not judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_error: Option<String>,
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
        if let Some(e) = &self.checkpoint_error {
            return format!("checkpoints do not verify: {}\n", clean(e));
        }
        match &self.broken {
            None => format!(
                "audit trail intact: {} entries, last hash {}{}\n",
                self.entries.unwrap_or_default(),
                self.last_hash.as_deref().unwrap_or_default(),
                match self.checkpoints {
                    Some(n) => format!(", {n} signed checkpoints kept"),
                    None => String::new(),
                }
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
    let checkpoints = match checkpoints_to_check(registry, args).await? {
        None => None,
        Some(Ok(list)) => Some(list),
        Some(Err(e)) => {
            let view = VerifyView {
                intact: false,
                entries: None,
                last_seq: None,
                last_hash: None,
                checkpoints: None,
                broken: None,
                checkpoint_error: Some(e.to_string()),
            };
            emit(io.out, io.format, &view, false)?;
            return Ok(crate::EXIT_FAILURE);
        }
    };
    if let Some(list) = &checkpoints {
        verifier = verifier.checkpoints(list);
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
            checkpoints: checkpoints.as_ref().map(|c| c.len() as u64),
            broken: None,
            checkpoint_error: None,
        },
        Err(b) => VerifyView {
            intact: false,
            entries: None,
            last_seq: None,
            last_hash: None,
            checkpoints: None,
            broken: Some(BreakView::from(&b)),
            checkpoint_error: None,
        },
    };
    emit(io.out, io.format, &view, false)?;
    Ok(if view.intact { 0 } else { crate::EXIT_FAILURE })
}

/// The checkpoints `args` name, their signatures checked: `None` when none were asked for,
/// `Some(Err)` naming the first that does not check out.
async fn checkpoints_to_check(
    registry: &Registry,
    args: &AuditVerifyArgs,
) -> Result<Option<Result<Vec<Checkpoint>, checkpoint::CheckpointError>>, Failure> {
    let signed = match (&args.checkpoints, args.fetch_checkpoints) {
        (None, false) => return Ok(None),
        (Some(file), _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))
                .map_err(Failure::Setup)?;
            match checkpoint::parse_lines(&text) {
                Ok(signed) => signed,
                Err(e) => return Ok(Some(Err(e))),
            }
        }
        (None, true) => fetch_checkpoints(registry, 0).await?.0,
    };
    // clap requires the key with either source.
    let key = args.checkpoint_key.as_deref().ok_or_else(|| {
        Failure::Usage("name the registry's checkpoint key with --checkpoint-key".into())
    })?;
    let key = PublicKey::from_config(key)
        .context("--checkpoint-key")
        .map_err(Failure::Setup)?;
    Ok(Some(checkpoint::check(&signed, &key)))
}

/// Every checkpoint over a seq after `after_seq`, page by page, with the key id the
/// registry says signs them.
async fn fetch_checkpoints(
    registry: &Registry,
    mut after_seq: u64,
) -> Result<(Vec<Signed>, String), Failure> {
    let mut client = registry.client.raw();
    let mut all = Vec::new();
    loop {
        let page = client
            .list_audit_checkpoints(ListAuditCheckpointsRequest {
                after_seq,
                page_size: PAGE_SIZE,
            })
            .await
            .map_err(|s| registry.failed(s))?
            .into_inner();
        all.extend(page.checkpoints.into_iter().map(|c| Signed {
            body: c.body.into_bytes(),
            signature: c.signature,
            key_id: c.key_id,
        }));
        // 0 at the end; a token that does not advance would loop forever.
        if page.next_after_seq <= after_seq {
            return Ok((all, page.key_id));
        }
        after_seq = page.next_after_seq;
    }
}

/// The checkpoints as fetched, in their file form.
#[derive(Debug, Serialize)]
pub(crate) struct CheckpointsView {
    /// Each checkpoint as one line of the checkpoint file.
    #[serde(skip)]
    lines: Vec<String>,
    /// The same, parsed: `{body, signature, key_id}`.
    checkpoints: Vec<serde_json::Value>,
    /// The key id the registry says signs them now.
    key_id: String,
}

impl Render for CheckpointsView {
    fn to_table(&self) -> String {
        self.lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// Prints the registry's checkpoints after `--after-seq`, one line each (the file form).
pub(crate) async fn checkpoints(
    registry: &Registry,
    args: &AuditCheckpointsArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let (signed, key_id) = fetch_checkpoints(registry, args.after_seq).await?;
    let mut lines = Vec::with_capacity(signed.len());
    let mut parsed = Vec::with_capacity(signed.len());
    for s in &signed {
        let line = s
            .to_json_line()
            .context("a checkpoint the registry sent")
            .map_err(Failure::Setup)?;
        parsed.push(serde_json::from_str(&line).map_err(|e| Failure::Setup(e.into()))?);
        lines.push(line);
    }
    writeln!(
        io.err,
        "{} checkpoints, signed with key {key_id}: check them with a public key you got from \
         the registry's operator, not from the registry",
        lines.len()
    )?;
    let view = CheckpointsView {
        lines,
        checkpoints: parsed,
        key_id,
    };
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}
