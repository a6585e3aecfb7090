//! Events and the audit trail: every event a request records is also appended to the
//! hash-chained audit trail, in the same transaction (on PostgreSQL queued there and chained
//! just after the commit: see `dsrelay_runtime::audit::table`).

use anyhow::Result;
use dsrelay_proto::v1::{EventType, RequestState};
use dsrelay_runtime::audit;
use dsrelay_runtime::identity::keyed_digest;
use dsrelay_runtime::trace_context;

use super::{Store, Tx};

/// What an event says besides its type, time and the request's state.
#[derive(Debug, Default, Clone)]
pub(super) struct EventDetail {
    /// Who acted, for the audit trail, when not `processor` (the submitting partner).
    pub(super) actor: String,
    pub(super) processor: String,
    pub(super) subprocessor: String,
    /// The task state reported (proto enum value, passed on as the processor sent it).
    pub(super) task_state: i32,
    pub(super) sequence: i64,
    pub(super) attempt: i64,
    /// The registry's own words about what happened.
    pub(super) message: String,
    /// `message` as the audit trail holds it, when `message` quotes text from outside the
    /// registry word for word (a legal basis, the recipient's name in a receipt): the same
    /// words with each such text as [`audit_text`] gives it. Empty when `message` quotes
    /// none, and the entry holds `message` itself.
    pub(super) audit_message: String,
    /// Text from outside the registry that may name the subject (a processor's reason, a
    /// partner's cancel reason, an operator's extension reason, a delivery error). The
    /// event's message shows it after `message` until the request is forgotten, when
    /// forgetting empties the whole message of every event of the types that carry such
    /// text (`Store::forget_request`: the registry's own words of those events too, which
    /// their audit entries keep); the immutable audit trail holds only its keyed hash, so no
    /// raw text that may hold personal data is ever written where it cannot be removed.
    pub(super) free_text: String,
    /// The request is forgotten already: the event shows the words as the audit entry holds
    /// them (`audit_message`, else `message`) and not `free_text`, so that it holds nothing
    /// forgetting removes; the entry is the same either way.
    pub(super) forgotten: bool,
    /// A CONTRACT_END task's progress, shown with the event's task.
    pub(super) progress: Option<dsrelay_proto::v1::ContractProgress>,
}

/// The context of the keyed hashes of free text in audit entries.
const AUDIT_TEXT_DOMAIN: &[u8] = b"dsrelay.audit-text.v1";

/// One event to record with [`insert_events`].
#[derive(Debug)]
pub(super) struct NewEvent {
    pub(super) request_id: String,
    pub(super) event_type: EventType,
    pub(super) at: i64,
    /// The request's state the event shows.
    pub(super) request_state: RequestState,
    pub(super) detail: EventDetail,
}

/// How text from outside the registry stands in an audit entry: `text hmac-sha256:<hex>`,
/// its keyed hash under `key` (the registry's `identity_hash_key`).
pub(super) fn audit_text(key: &[u8], text: &str) -> String {
    format!(
        "text hmac-sha256:{}",
        keyed_digest(key, AUDIT_TEXT_DOMAIN, text.as_bytes())
    )
}

/// Records an event of a request, and its audit entry: the same words, except that free
/// text stands in the entry only as its keyed hash (see [`EventDetail::free_text`],
/// [`EventDetail::audit_message`]).
pub(super) async fn insert_event(
    tx: &mut Tx,
    request_id: &str,
    event_type: EventType,
    at: i64,
    request_state: RequestState,
    d: EventDetail,
) -> Result<()> {
    insert_events(
        tx,
        vec![NewEvent {
            request_id: request_id.to_string(),
            event_type,
            at,
            request_state,
            detail: d,
        }],
    )
    .await
}

/// Records `events` in order, as [`insert_event`] records one, with their audit entries
/// appended together (one read of the trail's head) and the events in multi-row INSERTs.
pub(super) async fn insert_events(tx: &mut Tx, events: Vec<NewEvent>) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut entries = Vec::with_capacity(events.len());
    let mut rows = Vec::with_capacity(events.len());
    for e in events {
        let d = e.detail;
        let actor = if d.actor.is_empty() {
            d.processor.clone()
        } else {
            d.actor
        };
        let audited = if d.audit_message.is_empty() {
            d.message.clone()
        } else {
            d.audit_message
        };
        let message = if d.forgotten {
            audited.clone()
        } else if d.free_text.is_empty() {
            d.message
        } else {
            format!("{}: {}", d.message, d.free_text)
        };
        let detail = if d.free_text.is_empty() {
            audited
        } else {
            format!("{audited}: {}", audit_text(&tx.text_key, &d.free_text))
        };
        entries.push(audit::table::NewEntry {
            occurred_at: e.at,
            request_id: e.request_id.clone(),
            event_type: e.event_type as i32,
            actor,
            detail,
        });
        rows.push((
            e.request_id,
            e.event_type,
            e.at,
            e.request_state,
            d.processor,
            d.subprocessor,
            d.task_state,
            d.sequence,
            d.attempt,
            message,
            d.progress,
        ));
    }
    audit::table::append_all(tx.conn(), entries).await?;
    // The span the events happened in; without a tracer, each request's own trace id.
    let traced = trace_context::traceparent_of(&tracing::Span::current());
    let mut parts = traced.as_deref().unwrap_or("").split('-').skip(1);
    let (trace_id, span_id) = (
        parts.next().map(str::to_string),
        parts.next().map(str::to_string),
    );
    // Every parameter once, in order (the request id twice: for its column and for the
    // trace id's fallback), so that SQLite binds them by position (`Backend::numbered`).
    for chunk in rows.chunks(tx.backend.rows_per_statement(14)) {
        let mut sql = String::from(
            "INSERT INTO events (request_id, type, occurred_at, request_state, processor, \
             subprocessor, task_state, sequence, attempt, message, trace_id, span_id, progress) \
             VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 14;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, \
                 COALESCE(${}, (SELECT trace_id FROM requests WHERE id = ${})), ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8,
                b + 9,
                b + 10,
                b + 11,
                b + 12,
                b + 13,
                b + 14
            ));
        }
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q
                .bind(r.0.clone())
                .bind(r.1 as i64)
                .bind(r.2)
                .bind(r.3 as i64)
                .bind(r.4.clone())
                .bind(r.5.clone())
                .bind(i64::from(r.6))
                .bind(r.7)
                .bind(r.8)
                .bind(r.9.clone())
                .bind(trace_id.clone())
                .bind(r.0.clone())
                .bind(span_id.clone())
                .bind(
                    r.10.as_ref()
                        .map(dsrelay_proto::prost::Message::encode_to_vec),
                );
        }
        q.execute(tx.conn()).await?;
    }
    Ok(())
}

/// Key of the advisory lock that the registry's audit chainers take turns with ("dsrelay" + 1;
/// see `dsrelay_runtime::audit::table`).
pub(crate) const AUDIT_CHAIN_LOCK: i64 = 0x6473_7265_6c61_7901;

impl Store {
    /// The last entry of the audit trail (seq and hash), if any: what a checkpoint signs.
    /// Entries committed before the call are chained first.
    pub async fn audit_head(&self) -> Result<Option<(u64, String)>> {
        self.chain_audit().await?;
        audit::table::head(&self.db.pool).await
    }

    /// Chains the audit entries committed so far (on PostgreSQL; nothing to do on SQLite),
    /// so that a read of the trail that follows sees them.
    pub async fn chain_audit(&self) -> Result<usize> {
        audit::table::chain_pending(&self.db, AUDIT_CHAIN_LOCK).await
    }

    /// The service's audit chainer: chains committed entries as they come until `stop`
    /// turns true (on PostgreSQL; returns at once on SQLite).
    pub async fn run_audit_chainer(&self, stop: tokio::sync::watch::Receiver<bool>) {
        audit::table::run_chainer(self.db.clone(), AUDIT_CHAIN_LOCK, stop).await
    }
}

impl dsrelay_runtime::audit::signer::Trail for Store {
    async fn head(&self) -> Result<Option<(u64, String)>> {
        self.audit_head().await
    }

    // No chaining first: the signer asks only for an entry it signed, chained before that.
    async fn hash_of(&self, seq: u64) -> Result<Option<String>> {
        audit::table::hash_of(&self.db.pool, seq).await
    }
}
