//! `dsrctl audit verify`: reads the registry's audit trail (or, with `--processor`, a
//! processor's own) page by page and checks its hash chain with [`dsrelay_runtime::audit`],
//! the same code both services hash with, and against the service's signed checkpoints when
//! given them. `dsrctl audit checkpoints`: prints the checkpoints, to keep. `dsrctl audit
//! list`: prints one page of the trail.

use anyhow::Context as _;
use dsrelay_runtime::audit::checkpoint::{self, Checkpoint, CheckpointError};
use dsrelay_runtime::audit::{ChainBreak, Entry, Verifier};
use dsrelay_runtime::signing::{PublicKey, Signed, VerifyError};
use dsrelay_sdk::proto::processor_operator_service_client::ProcessorOperatorServiceClient;
use dsrelay_sdk::proto::{
    ListAuditCheckpointsRequest, ListAuditEntriesRequest, ListProcessorAuditCheckpointsRequest,
    ListProcessorAuditEntriesRequest,
};
use serde::Serialize;
use tonic::transport::Channel;

use crate::cli::{
    AuditCheckpointsArgs, AuditListArgs, AuditTrailArgs, AuditVerifyArgs, Cli, ProcessorArgs,
};
use crate::commands::{Io, Registry};
use crate::output::{emit, event_type_name, processor_audit_event_name, time_cell, Render, Time};
use crate::settings::{self, Environment};
use crate::table::{clean, Table};
use crate::Failure;

/// Entries asked for per call.
const PAGE_SIZE: u32 = 1000;

/// Whose trail is read: the registry's, or a processor's through its operator API.
pub(crate) enum Trail {
    /// The registry the connection settings name (boxed: its client is large).
    Registry(Box<Registry>),
    /// A processor.
    Processor {
        client: ProcessorOperatorServiceClient<Channel>,
        endpoint: String,
    },
}

/// One page of checkpoints: the signed documents, the seq to ask after next (0 at the end),
/// and the key id the service says signs them now.
type CheckpointPage = (Vec<Signed>, u64, String);

impl Trail {
    /// The trail `args` name; nothing is sent yet.
    pub(crate) fn connect(
        cli: &Cli,
        env: &Environment,
        args: &AuditTrailArgs,
    ) -> Result<Self, Failure> {
        let Some(processor) = &args.processor else {
            return Ok(Self::Registry(Box::new(Registry::connect(cli, env)?)));
        };
        let settings =
            settings::resolve_for_processor(&cli.connection, env).map_err(Failure::Setup)?;
        let target = ProcessorArgs {
            processor: processor.clone(),
            processor_identity: args.processor_identity.clone(),
        };
        Ok(Self::Processor {
            client: ProcessorOperatorServiceClient::new(super::tasks::connect(&target, &settings)?),
            endpoint: processor.clone(),
        })
    }

    /// Whose trail, in words.
    fn owner(&self) -> &'static str {
        match self {
            Self::Registry(_) => "registry",
            Self::Processor { .. } => "processor",
        }
    }

    /// Where the trail is read.
    fn endpoint(&self) -> &str {
        match self {
            Self::Registry(r) => &r.endpoint,
            Self::Processor { endpoint, .. } => endpoint,
        }
    }

    /// A page of `what` after `after_seq` that named `next_after_seq` as the next: anything
    /// but 0 (the end) must advance, or asking again would never end, and stopping there
    /// would judge only part of the trail.
    fn check_advance(
        &self,
        what: &str,
        after_seq: u64,
        next_after_seq: u64,
    ) -> Result<(), Failure> {
        if next_after_seq == 0 || next_after_seq > after_seq {
            return Ok(());
        }
        Err(Failure::BadAnswer(format!(
            "the {} at {} answered the page of {what} after seq {after_seq} with \
             next_after_seq {next_after_seq}, which does not advance past it; stopping, as \
             asking again would never end",
            self.owner(),
            self.endpoint()
        )))
    }

    fn failed(&self, status: tonic::Status) -> Failure {
        match self {
            Self::Registry(r) => r.failed(status),
            Self::Processor { endpoint, .. } => Failure::Rpc {
                status,
                endpoint: endpoint.clone(),
                server: "processor",
            },
        }
    }

    /// An entry's event in words: the two trails number their events differently.
    fn event_name(&self, raw: i32) -> String {
        match self {
            Self::Registry(_) => event_type_name(raw),
            Self::Processor { .. } => processor_audit_event_name(raw),
        }
    }

    /// Up to `page_size` entries (0: the service's default) after `after_seq`, and the seq
    /// to ask after next (0 at the end).
    async fn entries(
        &mut self,
        after_seq: u64,
        page_size: u32,
    ) -> Result<(Vec<Entry>, u64), Failure> {
        let time = |t: Option<&dsrelay_proto::prost_types::Timestamp>| {
            t.map(dsrelay_proto::millis_from_timestamp)
                .unwrap_or_default()
        };
        let answer = match self {
            Self::Registry(r) => r
                .client
                .raw()
                .list_audit_entries(ListAuditEntriesRequest {
                    after_seq,
                    page_size,
                })
                .await
                .map(|page| {
                    let page = page.into_inner();
                    let entries = page.entries.into_iter().map(|e| Entry {
                        seq: e.seq,
                        occurred_at: time(e.occurred_at.as_ref()),
                        request_id: e.request_id,
                        event_type: e.event_type,
                        actor: e.actor,
                        detail: e.detail,
                        prev_hash: e.prev_hash,
                        hash: e.hash,
                    });
                    (entries.collect(), page.next_after_seq)
                }),
            Self::Processor { client, .. } => client
                .list_audit_entries(ListProcessorAuditEntriesRequest {
                    after_seq,
                    page_size,
                })
                .await
                .map(|page| {
                    let page = page.into_inner();
                    let entries = page.entries.into_iter().map(|e| Entry {
                        seq: e.seq,
                        occurred_at: time(e.occurred_at.as_ref()),
                        request_id: e.request_id,
                        event_type: e.event,
                        actor: e.actor,
                        detail: e.detail,
                        prev_hash: e.prev_hash,
                        hash: e.hash,
                    });
                    (entries.collect(), page.next_after_seq)
                }),
        };
        answer.map_err(|s| self.failed(s))
    }

    /// Up to [`PAGE_SIZE`] checkpoints over a seq after `after_seq`.
    async fn checkpoints(&mut self, after_seq: u64) -> Result<CheckpointPage, Failure> {
        let answer = match self {
            Self::Registry(r) => r
                .client
                .raw()
                .list_audit_checkpoints(ListAuditCheckpointsRequest {
                    after_seq,
                    page_size: PAGE_SIZE,
                })
                .await
                .map(|page| {
                    let page = page.into_inner();
                    let signed = page.checkpoints.into_iter().map(|c| Signed {
                        body: c.body.into_bytes(),
                        signature: c.signature,
                        key_id: c.key_id,
                    });
                    (signed.collect(), page.next_after_seq, page.key_id)
                }),
            Self::Processor { client, .. } => client
                .list_audit_checkpoints(ListProcessorAuditCheckpointsRequest {
                    after_seq,
                    page_size: PAGE_SIZE,
                })
                .await
                .map(|page| {
                    let page = page.into_inner();
                    let signed = page.checkpoints.into_iter().map(|c| Signed {
                        body: c.body.into_bytes(),
                        signature: c.signature,
                        key_id: c.key_id,
                    });
                    (signed.collect(), page.next_after_seq, page.key_id)
                }),
        };
        answer.map_err(|s| self.failed(s))
    }
}

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
    /// How many of them each key given signed, in the order the keys first signed one
    /// (those that signed none last); present with `checkpoints`.
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_keys: Option<Vec<KeyCount>>,
    /// When broken: where and how.
    #[serde(rename = "break", skip_serializing_if = "Option::is_none")]
    broken: Option<BreakView>,
    /// When the checkpoints themselves do not check out (which one and why), or none were
    /// there to check against. The trail is then not judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_error: Option<String>,
}

/// How many checkpoints one key signed.
#[derive(Debug, Serialize)]
struct KeyCount {
    key_id: String,
    checkpoints: u64,
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
                match (self.checkpoints, self.checkpoint_keys.as_deref()) {
                    // Several keys given: which signed how many, since one may have signed
                    // none (given by mistake, or a rotation not yet reached).
                    (Some(n), Some(keys @ [_, _, ..])) => {
                        let each: Vec<String> = keys
                            .iter()
                            .enumerate()
                            .map(|(i, k)| {
                                let signed = if i == 0 { "signed " } else { "" };
                                format!("{} {signed}with key {}", k.checkpoints, k.key_id)
                            })
                            .collect();
                        format!(", {n} signed checkpoints kept ({})", each.join(", "))
                    }
                    (Some(n), _) => format!(", {n} signed checkpoints kept"),
                    (None, _) => String::new(),
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

/// Verifies the whole trail; 0 when intact, 1 when broken or when the checkpoints asked for
/// do not check out or are none.
pub(crate) async fn verify(
    trail: &mut Trail,
    args: &AuditVerifyArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let mut verifier = Verifier::new();
    if let Some((seq, hash)) = &args.anchor {
        verifier = verifier.anchor(*seq, hash.clone());
    }
    let checkpoints = match checkpoints_to_check(trail, args).await? {
        None => None,
        Some(Ok(list)) => Some(list),
        Some(Err(e)) => {
            let view = VerifyView {
                intact: false,
                entries: None,
                last_seq: None,
                last_hash: None,
                checkpoints: None,
                checkpoint_keys: None,
                broken: None,
                checkpoint_error: Some(e),
            };
            return super::verdict(emit(io.out, io.format, &view, false), crate::EXIT_FAILURE);
        }
    };
    if let Some((list, _)) = &checkpoints {
        verifier = verifier.checkpoints(list);
    }
    let mut after_seq = 0;
    let outcome = 'pages: loop {
        let (entries, next_after_seq) = trail.entries(after_seq, PAGE_SIZE).await?;
        for entry in entries {
            if let Err(b) = verifier.push(entry) {
                break 'pages Err(b);
            }
        }
        if next_after_seq == 0 {
            break 'pages verifier.finish();
        }
        trail.check_advance("audit entries", after_seq, next_after_seq)?;
        after_seq = next_after_seq;
    };
    let view = match outcome {
        Ok(intact) => VerifyView {
            intact: true,
            entries: Some(intact.entries),
            last_seq: Some(intact.last_seq),
            last_hash: Some(intact.last_hash),
            checkpoints: checkpoints.as_ref().map(|(c, _)| c.len() as u64),
            checkpoint_keys: checkpoints.as_ref().map(|(c, given)| key_counts(c, given)),
            broken: None,
            checkpoint_error: None,
        },
        Err(b) => VerifyView {
            intact: false,
            entries: None,
            last_seq: None,
            last_hash: None,
            checkpoints: None,
            checkpoint_keys: None,
            broken: Some(BreakView::from(&b)),
            checkpoint_error: None,
        },
    };
    let code = if view.intact { 0 } else { crate::EXIT_FAILURE };
    super::verdict(emit(io.out, io.format, &view, false), code)
}

/// How many of `checked` each of the `given` key ids signed: those that signed some in the
/// order they first did, then those that signed none.
fn key_counts(checked: &[Checkpoint], given: &[String]) -> Vec<KeyCount> {
    let mut counts = checkpoint::signers(checked.iter().map(|c| c.key_id.as_str()));
    for id in given {
        if !counts.iter().any(|(k, _)| k == id) {
            counts.push((id.clone(), 0));
        }
    }
    counts
        .into_iter()
        .map(|(key_id, checkpoints)| KeyCount {
            key_id,
            checkpoints,
        })
        .collect()
}

/// The keys `--checkpoint-key` names, each once; a key given twice is a usage error, since
/// it is likely the place of another key (the one before a rotation) given by mistake.
fn checkpoint_keys(given: &[String]) -> Result<Vec<PublicKey>, Failure> {
    let mut keys: Vec<PublicKey> = Vec::with_capacity(given.len());
    for (i, value) in given.iter().enumerate() {
        let key = PublicKey::from_config(value)
            .with_context(|| match given.len() {
                1 => "--checkpoint-key".to_string(),
                _ => format!("--checkpoint-key {value}"),
            })
            .map_err(Failure::Setup)?;
        if let Some(j) = keys.iter().position(|k| *k == key) {
            return Err(Failure::Usage(format!(
                "--checkpoint-key {} ({value}) is --checkpoint-key {} ({}) again: key {}; \
                 give each key the checkpoints were signed with once",
                i + 1,
                j + 1,
                given[j],
                key.key_id()
            )));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// What a checkpoint signed with a key not given says besides: after a rotation, every key
/// is needed.
fn rotation_hint(e: &CheckpointError, owner: &str) -> String {
    match e {
        CheckpointError::BadSignature(_, VerifyError::WrongKey { .. })
        | CheckpointError::UnknownKey { .. } => format!(
            "{e}; if the {owner}'s checkpoint key was rotated, give the public key of each key \
             its checkpoints were signed with, one --checkpoint-key each"
        ),
        e => e.to_string(),
    }
}

/// The checkpoints `args` name, their signatures checked, with the key ids given: `None` when
/// none were asked for, `Some(Err)` naming the first that does not check out, or saying
/// there are none. A `--checkpoints` file over another service's trail is a usage error.
async fn checkpoints_to_check(
    trail: &mut Trail,
    args: &AuditVerifyArgs,
) -> Result<Option<Result<(Vec<Checkpoint>, Vec<String>), String>>, Failure> {
    let (signed, source) = match (&args.checkpoints, args.fetch_checkpoints) {
        (None, false) => return Ok(None),
        (Some(file), _) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))
                .map_err(Failure::Setup)?;
            match checkpoint::parse_lines(&text) {
                Ok(signed) => (signed, format!("{} holds", file.display())),
                Err(e) => return Ok(Some(Err(e.to_string()))),
            }
        }
        (None, true) => (
            fetch_checkpoints(trail, 0).await?.0,
            format!("the {} at {} served", trail.owner(), trail.endpoint()),
        ),
    };
    // clap requires a key with either source.
    if args.checkpoint_key.is_empty() {
        return Err(Failure::Usage(format!(
            "name the {}'s checkpoint key with --checkpoint-key",
            trail.owner()
        )));
    }
    let keys = checkpoint_keys(&args.checkpoint_key)?;
    let given: Vec<String> = keys.iter().map(PublicKey::key_id).collect();
    // Checked against none, any trail would pass: a service under audit could serve none.
    if signed.is_empty() {
        return Ok(Some(Err(format!(
            "none to check against: {source} no signed checkpoint"
        ))));
    }
    match checkpoint::check(&signed, &keys, trail.owner()) {
        // A file of the other service's checkpoints was named by mistake; one the service
        // itself served is its answer, judged like any other that does not check out.
        Err(e @ CheckpointError::OtherService { .. }) if args.checkpoints.is_some() => {
            Err(Failure::Usage(format!(
                "{e}: --checkpoints must name the {}'s checkpoint file",
                trail.owner()
            )))
        }
        checked => Ok(Some(
            checked
                .map(|list| (list, given))
                .map_err(|e| rotation_hint(&e, trail.owner())),
        )),
    }
}

/// Every checkpoint over a seq after `after_seq`, page by page, with the key id the
/// service says signs them.
async fn fetch_checkpoints(
    trail: &mut Trail,
    mut after_seq: u64,
) -> Result<(Vec<Signed>, String), Failure> {
    let mut all = Vec::new();
    loop {
        let (signed, next_after_seq, key_id) = trail.checkpoints(after_seq).await?;
        all.extend(signed);
        if next_after_seq == 0 {
            return Ok((all, key_id));
        }
        trail.check_advance("checkpoints", after_seq, next_after_seq)?;
        after_seq = next_after_seq;
    }
}

/// Prints the service's checkpoints after `--after-seq`, one line each (the file form),
/// whatever `--output` says: that is the form `audit verify --checkpoints` reads, and each
/// line is a JSON document already.
pub(crate) async fn checkpoints(
    trail: &mut Trail,
    args: &AuditCheckpointsArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let (signed, key_id) = fetch_checkpoints(trail, args.after_seq).await?;
    let mut lines = String::new();
    for s in &signed {
        let line = s
            .to_json_line()
            .with_context(|| format!("a checkpoint the {} sent", trail.owner()))
            .map_err(Failure::Setup)?;
        lines.push_str(&line);
        lines.push('\n');
    }
    writeln!(
        io.err,
        "{}",
        checkpoints_note(&signed, &key_id, trail.owner())
    )?;
    io.out.write_all(lines.as_bytes())?;
    Ok(0)
}

/// What `audit checkpoints` says on stderr: how many checkpoints each key (by the key id each
/// names, not checked here) signed, and with what to check them. `current` is the key id the
/// service says it signs with now.
fn checkpoints_note(signed: &[Signed], current: &str, owner: &str) -> String {
    let keys = checkpoint::signers(signed.iter().map(|s| s.key_id.as_str()));
    // The service's words: printed without what could move the terminal's cursor.
    let current = clean(current);
    let now = |ids: &[&str]| match current.as_str() {
        "" => String::new(),
        c if ids == [c] => String::new(),
        c => format!(" (the {owner} signs with key {c} now)"),
    };
    match keys.as_slice() {
        [] => format!(
            "0 checkpoints{}: check them with a public key you got from the {owner}'s \
             operator, not from the {owner}",
            now(&[])
        ),
        [(id, n)] => format!(
            "{n} checkpoints, signed with key {}{}: check them with a public key you got from \
             the {owner}'s operator, not from the {owner}",
            clean(id),
            now(&[id.as_str()])
        ),
        several => {
            let each: Vec<String> = several
                .iter()
                .enumerate()
                .map(|(i, (id, n))| {
                    let signed = if i == 0 { "signed " } else { "" };
                    format!("{n} {signed}with key {}", clean(id))
                })
                .collect();
            format!(
                "{} checkpoints, {}{}: check them with the public keys of those keys, which \
                 you got from the {owner}'s operator, not from the {owner} (one \
                 --checkpoint-key each for audit verify)",
                signed.len(),
                each.join(", "),
                now(&[])
            )
        }
    }
}

/// How many characters of an entry's detail the table shows: the rest of the row stays on
/// one line, and `--output json` has the whole of it.
const DETAIL_CHARS: usize = 60;

/// One entry of `audit list`.
#[derive(Debug, Serialize)]
struct AuditEntryView {
    seq: u64,
    occurred_at: Option<Time>,
    event: String,
    request_id: String,
    actor: String,
    detail: String,
    prev_hash: String,
    hash: String,
}

/// A page of `audit list`.
#[derive(Debug, Serialize)]
pub(crate) struct AuditListView {
    /// Whose trail: `registry` or `processor`.
    trail: &'static str,
    entries: Vec<AuditEntryView>,
    /// Pass as `--after-seq` for the next page; 0 when this page reached the end.
    next_after_seq: u64,
    /// The `--after-seq` this page was asked with, to say what an empty page was after.
    #[serde(skip)]
    after_seq: u64,
}

/// `text` cut to [`DETAIL_CHARS`] characters, marked where it was cut.
fn shorten(text: &str) -> String {
    if text.chars().count() <= DETAIL_CHARS {
        return text.to_string();
    }
    let mut short: String = text.chars().take(DETAIL_CHARS - 1).collect();
    short.push('…');
    short
}

impl Render for AuditListView {
    fn to_table(&self) -> String {
        let mut out = if self.entries.is_empty() {
            // A bare header would look like output cut short.
            match self.after_seq {
                0 => format!("the {}'s audit trail has no entries\n", self.trail),
                seq => format!("no audit entry after seq {seq}\n"),
            }
        } else {
            let mut t = Table::new(["SEQ", "TIME", "EVENT", "REQUEST", "ACTOR", "DETAIL"]);
            for e in &self.entries {
                t.row([
                    e.seq.to_string(),
                    time_cell(e.occurred_at),
                    e.event.clone(),
                    e.request_id.clone(),
                    e.actor.clone(),
                    shorten(&clean(&e.detail)),
                ]);
            }
            t.render()
        };
        if self.next_after_seq != 0 {
            out.push_str(&format!("next page: --after-seq {}\n", self.next_after_seq));
        }
        out
    }
}

/// Prints one page of the trail after `--after-seq`.
pub(crate) async fn list(
    trail: &mut Trail,
    args: &AuditListArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let (entries, next_after_seq) = trail
        .entries(args.after_seq, args.limit.unwrap_or(0))
        .await?;
    trail.check_advance("audit entries", args.after_seq, next_after_seq)?;
    let entries = entries
        .into_iter()
        .map(|e| AuditEntryView {
            seq: e.seq,
            // 0 is what an entry without a time was read as (see `entries`).
            occurred_at: (e.occurred_at != 0)
                .then(|| dsrelay_proto::timestamp_from_millis(e.occurred_at))
                .and_then(|t| Time::from_proto(Some(&t))),
            event: trail.event_name(e.event_type),
            request_id: e.request_id,
            actor: e.actor,
            detail: e.detail,
            prev_hash: e.prev_hash,
            hash: e.hash,
        })
        .collect();
    let view = AuditListView {
        trail: trail.owner(),
        entries,
        next_after_seq,
        after_seq: args.after_seq,
    };
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}
