//! Task state changes from processors: acknowledgement batches, task lists a processor
//! reported on delivery or reconciliation, and refolding a request's state from its
//! deliveries and tasks through [`crate::fold`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use anyhow::{anyhow, Result};
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{
    Acknowledgement, ContractPhase, ContractProgress, EventType, RequestKind, RequestState,
    SubmitRequest, TaskState, TaskStatus, TransferReceipt,
};
use dsrelay_runtime::group_commit::{GroupQueue, Queued};

use tokio::sync::oneshot;

use super::events::{audit_text, insert_event, insert_events, EventDetail, NewEvent};
use super::forget::forgotten_quote;
use super::rows::task_state;
use super::{placeholders, values_row, Operation, Store, Tx};
use crate::fold::{fold_request, request_is_terminal, Delivery};

/// A task state change, from an acknowledgement or a status report.
#[derive(Debug, Clone, Default)]
pub struct TaskUpdate {
    /// Request id.
    pub request_id: String,
    /// Subprocessor.
    pub subprocessor: String,
    /// Sequence number.
    pub sequence: i64,
    /// New state (proto enum value, stored as the processor sent it).
    pub state: i32,
    /// Records affected.
    pub records_affected: i64,
    /// Whether the holder confirmed.
    pub confirmed: bool,
    /// Evidence note.
    pub note: String,
    /// Reason for REFUSED / FAILED.
    pub reason: String,
    /// Legal basis for RETAINED.
    pub legal_basis: String,
    /// Retain-until for RETAINED (ms).
    pub retain_until: Option<i64>,
    /// Connector attempt.
    pub attempt: i64,
    /// W3C traceparent of the processor's task step, when it traces.
    pub traceparent: String,
    /// The deletion certificate that came with the acknowledgement, checked.
    pub certificate: Option<super::ReceivedCertificate>,
    /// The recipient's receipt of a COMPLETED TRANSFER task.
    pub transfer_receipt: Option<TransferReceipt>,
    /// A CONTRACT_END task's progress.
    pub progress: Option<ContractProgress>,
}

impl TaskUpdate {
    /// A PENDING task at sequence 0, before any report a processor makes: what the registry
    /// records of a task whose only report so far was left out (`unproven_completions`).
    fn placeholder(request_id: &str, subprocessor: &str) -> Self {
        Self {
            request_id: request_id.to_string(),
            subprocessor: subprocessor.to_string(),
            sequence: 0,
            state: TaskState::Pending as i32,
            ..Default::default()
        }
    }

    /// This update as the fold sees a task.
    fn now(&self) -> TaskNow {
        TaskNow {
            state: self.state,
            sequence: self.sequence,
            progress: self.progress.as_ref().map(Message::encode_to_vec),
        }
    }

    /// The task this update is about, at `processor`: (request id, processor, subprocessor).
    fn key_at(&self, processor: &str) -> (String, String, String) {
        (
            self.request_id.clone(),
            processor.to_string(),
            self.subprocessor.clone(),
        )
    }

    /// The update in the registry's words, with the processor's texts they quote (a legal
    /// basis, the recipient's name in a receipt) as `quote` gives them; the processor's
    /// `reason` goes in the event's `free_text`.
    fn describe(&self, quote: impl Fn(&str) -> String) -> String {
        let state = TaskState::try_from(self.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("TASK_STATE_")
                    .to_string()
            })
            .unwrap_or_else(|_| self.state.to_string());
        let mut s = format!("{} #{}: {state}", self.subprocessor, self.sequence);
        if self.records_affected > 0 {
            s.push_str(&format!(", {} record(s)", self.records_affected));
        }
        if !self.legal_basis.is_empty() {
            s.push_str(&format!(", retained under {}", quote(&self.legal_basis)));
        }
        if let Some(r) = &self.transfer_receipt {
            s.push_str(&format!(
                ", received by {} ({} file(s), {} bytes)",
                quote(&r.recipient),
                r.files,
                r.bytes
            ));
        }
        if let Some(p) = &self.progress {
            s.push_str(&format!(", {}", phase_name(p.phase)));
        }
        s
    }

    /// The TASK_UPDATED event of this update at `processor`, its words followed by `after`.
    /// The event quotes the processor's texts until the request is forgotten (`forgotten`:
    /// already, and it holds them as the audit entry does); the audit entry, which is never
    /// changed, holds them only as their keyed hash under `text_key`.
    fn event_detail(
        &self,
        processor: &str,
        attempt: i64,
        after: &str,
        text_key: &[u8],
        forgotten: bool,
    ) -> EventDetail {
        EventDetail {
            actor: String::new(),
            processor: processor.to_string(),
            subprocessor: self.subprocessor.clone(),
            task_state: self.state,
            sequence: self.sequence,
            attempt,
            message: format!("{}{after}", self.describe(str::to_string)),
            // Written out only when the words quote something; an empty one is `message`.
            audit_message: if self.legal_basis.is_empty() && self.transfer_receipt.is_none() {
                String::new()
            } else {
                format!("{}{after}", self.describe(|t| audit_text(text_key, t)))
            },
            free_text: self.reason.clone(),
            forgotten,
            progress: self.progress,
        }
    }

    /// This update as forgetting leaves a task ([`super::forget`]), for a request forgotten
    /// already: a RETAINED task of a FAILED or CANCELLED one is still reported on (erased at
    /// its date, or in a status answer), and what is written then is never forgotten again.
    /// No note or reason; the legal basis as its keyed hash under the transaction's text
    /// key, and the receipt as forgetting leaves one ([`super::forget::forget_receipt`]); the
    /// state, counts and date as reported.
    fn as_forgotten(&self, tx: &Tx) -> Self {
        let mut update = self.clone();
        update.note.clear();
        update.reason.clear();
        update.legal_basis = forgotten_quote(&tx.text_key, &self.legal_basis);
        if let Some(r) = &mut update.transfer_receipt {
            super::forget::forget_receipt(r, &tx.text_key);
        }
        update
    }

    /// The update as it is written: as reported, or [`Self::as_forgotten`] when its request
    /// is `forgotten`.
    fn written(&self, tx: &Tx, forgotten: bool) -> Self {
        match forgotten {
            true => self.as_forgotten(tx),
            false => self.clone(),
        }
    }
}

/// A contract phase in the registry's words (`DELETING`).
fn phase_name(phase: i32) -> String {
    ContractPhase::try_from(phase)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("CONTRACT_PHASE_")
                .to_string()
        })
        .unwrap_or_else(|_| format!("phase {phase}"))
}

/// What a task was before an update: its state and its encoded progress.
type Previous = (i32, Option<Vec<u8>>);

/// Whether applying `update` over `previous` is worth a TASK_UPDATED event. An update that
/// repeats the state and the contract phase with only new counts is not: a contract end
/// reports progress every second or so, and events must say something new.
pub(crate) fn says_something_new(previous: Option<&Previous>, update: &TaskUpdate) -> bool {
    let (Some((state, progress)), Some(new)) = (previous, &update.progress) else {
        return true;
    };
    if *state != update.state {
        return true;
    }
    let old_phase = progress
        .as_deref()
        .and_then(|b| ContractProgress::decode(b).ok())
        .map(|p| p.phase);
    old_phase != Some(new.phase)
}

/// The task's state and progress before an update, if it exists.
async fn previous(
    tx: &mut Tx,
    request_id: &str,
    processor: &str,
    subprocessor: &str,
) -> Result<Option<Previous>> {
    Ok(sqlx::query_as(
        "SELECT state, progress FROM tasks WHERE request_id = $1 AND processor = $2 \
         AND subprocessor = $3",
    )
    .bind(request_id)
    .bind(processor)
    .bind(subprocessor)
    .fetch_optional(tx.conn())
    .await?)
}

impl From<&Acknowledgement> for TaskUpdate {
    fn from(a: &Acknowledgement) -> Self {
        let ev = a.evidence.clone().unwrap_or_default();
        Self {
            request_id: a.request_id.clone(),
            subprocessor: a.subprocessor.clone(),
            sequence: a.sequence.min(i64::MAX as u64) as i64,
            state: a.state,
            records_affected: ev.records_affected,
            confirmed: ev.confirmed,
            note: ev.note,
            reason: a.reason.clone(),
            legal_basis: a.legal_basis.clone(),
            retain_until: a
                .retain_until
                .as_ref()
                .map(dsrelay_proto::millis_from_timestamp),
            attempt: i64::from(a.attempt),
            traceparent: a.traceparent.clone(),
            // Checked by the handler, which knows the processor's key.
            certificate: None,
            transfer_receipt: ev.transfer_receipt,
            progress: a.progress,
        }
    }
}

impl From<&TaskStatus> for TaskUpdate {
    fn from(t: &TaskStatus) -> Self {
        let ev = t.evidence.clone().unwrap_or_default();
        Self {
            request_id: String::new(),
            subprocessor: t.subprocessor.clone(),
            sequence: t.sequence.min(i64::MAX as u64) as i64,
            state: t.state,
            records_affected: ev.records_affected,
            confirmed: ev.confirmed,
            note: ev.note,
            reason: t.reason.clone(),
            legal_basis: t.legal_basis.clone(),
            retain_until: t
                .retain_until
                .as_ref()
                .map(dsrelay_proto::millis_from_timestamp),
            attempt: 0,
            traceparent: String::new(),
            certificate: None,
            transfer_receipt: ev.transfer_receipt,
            progress: t.progress,
        }
    }
}

/// What [`Store::apply_acks`] did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Acknowledgements recorded now.
    pub applied: u32,
    /// Acknowledgements already recorded.
    pub duplicates: u32,
    /// Positions (in the batch) of acknowledgements for requests never routed to this
    /// processor; those were not applied, the others were.
    pub not_routed: Vec<usize>,
}

/// An acknowledgement the registry rejected, of a request delivered to its processor, for
/// [`Store::record_rejected_acks`].
#[derive(Debug, Clone, Default)]
pub struct RejectedAck {
    /// Request id.
    pub request_id: String,
    /// Subprocessor.
    pub subprocessor: String,
    /// Sequence number.
    pub sequence: i64,
    /// The state the processor reported (proto enum value, as sent).
    pub state: i32,
    /// The rules it breaks, in the registry's words, quoting nothing the processor sent.
    pub rules: String,
}

/// Most Acknowledge calls applied in one transaction.
pub(crate) const MAX_ACK_CALLS: usize = 32;

/// One Acknowledge call's acknowledgements waiting for a group commit, and where its
/// answer goes.
pub(crate) struct QueuedAcks {
    processor: String,
    acks: Vec<TaskUpdate>,
    /// Which of the requests `acks` concern were delivered to `processor`, when the caller
    /// read that already ([`Store::apply_routed_acks`]); `None` has the transaction read it.
    routed: Option<BTreeSet<String>>,
    now: i64,
    answer: oneshot::Sender<Result<AckOutcome>>,
}

/// The Acknowledge calls waiting for a commit, and whether one is under way.
pub(crate) type AckQueue = GroupQueue<QueuedAcks>;

impl Queued for QueuedAcks {
    type Answer = AckOutcome;
    fn answer_to(self) -> oneshot::Sender<Result<AckOutcome>> {
        self.answer
    }
}

impl std::fmt::Debug for QueuedAcks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedAcks")
            .field("processor", &self.processor)
            .field("acks", &self.acks.len())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Applies acknowledgements from `processor`, skipping (and listing) those that concern
    /// a request never routed to this processor; returns once they are committed.
    ///
    /// Concurrent calls (several processors, a processor's replicas, or a batch sent again
    /// while the first copy is applied) share one transaction: the first to find no commit
    /// under way writes everything queued, in a task of its own, and keeps going while calls
    /// are queued
    /// ([`dsrelay_runtime::group_commit`]; when a shared transaction fails, each call's batch
    /// is applied again alone, so each caller gets its own outcome). The request rows the
    /// calls touch are then locked once, and their fold reads once, for all of them.
    pub async fn apply_acks(
        &self,
        processor: &str,
        acks: &[TaskUpdate],
        now: i64,
    ) -> Result<AckOutcome> {
        self.queue_acks(processor, acks, None, now).await
    }

    /// [`Store::apply_acks`] with the requests of `acks` that were delivered to `processor`
    /// read by the caller beforehand (with their kinds, [`Store::kinds_delivered_to`]), so
    /// that the transaction need not read them: a delivery is never removed, so what was
    /// delivered then still is.
    pub async fn apply_routed_acks(
        &self,
        processor: &str,
        acks: &[TaskUpdate],
        routed: BTreeSet<String>,
        now: i64,
    ) -> Result<AckOutcome> {
        self.queue_acks(processor, acks, Some(routed), now).await
    }

    async fn queue_acks(
        &self,
        processor: &str,
        acks: &[TaskUpdate],
        routed: Option<BTreeSet<String>>,
        now: i64,
    ) -> Result<AckOutcome> {
        let (answer, answered) = oneshot::channel();
        let queued = QueuedAcks {
            processor: processor.to_string(),
            acks: acks.to_vec(),
            routed,
            now,
            answer,
        };
        if self.acks.push(queued) {
            let store = self.clone();
            tokio::spawn(async move { store.write_acks().await });
        }
        answered
            .await
            .map_err(|_| anyhow!("the acknowledgement writer stopped before answering"))?
    }

    /// Commits queued Acknowledge calls, a batch of calls at a time, until none is left.
    async fn write_acks(&self) {
        let store = self.clone();
        self.acks
            .write_all(MAX_ACK_CALLS, "acknowledgement batches", move |calls| {
                let store = store.clone();
                Box::pin(async move { store.record_ack_calls(calls).await })
            })
            .await;
    }

    /// Applies the acknowledgements of `calls` in one transaction; answers each call's
    /// outcome, in order.
    ///
    /// The transaction costs a fixed number of statements, whatever the number of calls and
    /// acknowledgements: per processor one read of its routing, unless every call of it
    /// brought its own (the Acknowledge API's do); one multi-row INSERT of all
    /// the acknowledgements (which tells the new from the duplicates); one read of the
    /// touched requests (locked), then one of their tasks and deliveries together; then,
    /// decided in memory, per processor one multi-row upsert of its tasks that moved (the
    /// last state of each), one UPDATE per state the touched requests move to (most batches
    /// move them to one or two) and one for the requests that stay, and the events and audit
    /// entries written together. Deletion certificates add, per 500 of their requests and
    /// per 500 of the certificate ids they name, one read of the stored certificates they are
    /// checked against (`certificates::against_stored`), and each its INSERT.
    async fn record_ack_calls(&self, calls: &[QueuedAcks]) -> Result<Vec<AckOutcome>> {
        let now = calls.iter().map(|c| c.now).max().unwrap_or_default();
        let mut tx = self.begin().await?;
        // Which requests each processor may acknowledge: what the calls brought, and one
        // read per processor for the calls that brought nothing.
        let mut routed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        let mut ids_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for c in calls {
            let processor = c.processor.as_str();
            let known = routed.entry(processor).or_default();
            match &c.routed {
                Some(r) => known.extend(r.iter().cloned()),
                None => ids_of
                    .entry(processor)
                    .or_default()
                    .extend(c.acks.iter().map(|a| a.request_id.as_str())),
            }
        }
        for (processor, ids) in &ids_of {
            let ids: Vec<&str> = ids.iter().copied().collect();
            let read = routed_requests(&mut tx, processor, &ids).await?;
            routed.entry(processor).or_default().extend(read);
        }
        let mut outcomes: Vec<AckOutcome> = Vec::with_capacity(calls.len());
        // Each routed acknowledgement with the position of its call.
        let mut candidates: Vec<(usize, &str, &TaskUpdate)> = Vec::new();
        for (call, c) in calls.iter().enumerate() {
            let mut outcome = AckOutcome::default();
            let routed = &routed[c.processor.as_str()];
            for (i, ack) in c.acks.iter().enumerate() {
                if routed.contains(ack.request_id.as_str()) {
                    candidates.push((call, c.processor.as_str(), ack));
                } else {
                    outcome.not_routed.push(i);
                }
            }
            outcomes.push(outcome);
        }
        let keys = candidates.iter().map(|&(_, processor, a)| (processor, a));
        let mut recorded = record_acks(&mut tx, keys, now).await?;
        // A key recorded now is applied once: a second copy, in the same call or another
        // call of the transaction, is a duplicate.
        let mut fresh: Vec<(&str, &TaskUpdate)> = Vec::new();
        for (call, processor, a) in candidates {
            let key = (
                a.request_id.clone(),
                processor.to_string(),
                a.subprocessor.clone(),
                a.sequence,
            );
            if recorded.remove(&key) {
                outcomes[call].applied += 1;
                fresh.push((processor, a));
            } else {
                outcomes[call].duplicates += 1;
            }
        }
        if fresh.is_empty() {
            tx.commit().await?;
            self.acks.commits.fetch_add(1, Ordering::Relaxed);
            return Ok(outcomes);
        }
        let touched: Vec<&str> = fresh
            .iter()
            .map(|(_, a)| a.request_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut view = FoldView::read(&mut tx, &touched).await?;
        let reporters = fresh.iter().map(|(p, a)| (a.request_id.as_str(), *p));
        let mut events = view.accept_withdrawn(&mut tx, reporters, now).await?;
        // The last update of each task that moved, per processor, by (request, subprocessor).
        let mut moved: BTreeMap<&str, BTreeMap<(String, String), TaskUpdate>> = BTreeMap::new();
        // The certificates that came with them, as checked against those stored before them
        // (under the lock of their requests, just taken), stored together.
        let checked = super::certificates::against_stored(&mut tx, &fresh, &view.forgotten).await?;
        let mut certificates = Vec::new();
        for (&(processor, ack), checked) in fresh.iter().zip(&checked) {
            let key = (
                ack.request_id.clone(),
                processor.to_string(),
                ack.subprocessor.clone(),
            );
            let before = view.tasks.get(&key);
            if before.is_none_or(|t| t.sequence < ack.sequence) {
                let forgotten = view.forgotten.contains(&ack.request_id);
                let previous = before.map(|t| (t.state, t.progress.clone()));
                let was = previous.as_ref().map(|p| p.0);
                super::failed::note_task(&mut tx, &ack.request_id, processor, was, ack);
                if says_something_new(previous.as_ref(), ack) {
                    let detail =
                        ack.event_detail(processor, ack.attempt, "", &tx.text_key, forgotten);
                    events.push(NewEvent {
                        request_id: ack.request_id.clone(),
                        event_type: EventType::TaskUpdated,
                        at: now,
                        request_state: view.state_of(&ack.request_id),
                        detail,
                    });
                }
                view.tasks.insert(key, ack.now());
                let slot = (ack.request_id.clone(), ack.subprocessor.clone());
                let moved = moved.entry(processor).or_default();
                let mut update = ack.written(&tx, forgotten);
                // A receipt an earlier update of this transaction carried stays with the
                // task, as it would have had each update been written on its own.
                if update.transfer_receipt.is_none() {
                    update.transfer_receipt =
                        moved.get(&slot).and_then(|u| u.transfer_receipt.clone());
                }
                moved.insert(slot, update);
            }
            if let Some(c) = checked {
                let mut event = super::certificates::recorded_event(processor, ack, c, now);
                // Its request state is the one before the fold, as for the task's event.
                event.request_state = view.state_of(&ack.request_id);
                events.push(event);
                certificates.push((processor, ack, c));
            }
        }
        super::certificates::record_all(&mut tx, &certificates, &view.forgotten, now).await?;
        for (processor, updates) in &moved {
            upsert_tasks(&mut tx, processor, updates.values(), now).await?;
        }

        // Fold each touched request from the tasks and deliveries in view.
        let mut changed = Vec::new();
        let mut unchanged = Vec::new();
        for id in &touched {
            let Some(old) = view.requests.get(*id).copied() else {
                continue;
            };
            let new = view.fold(id, old);
            if new == old {
                unchanged.push(*id);
                continue;
            }
            changed.push((*id, new));
            events.push(state_changed_event(id, old, new, now));
        }
        write_request_states(&mut tx, &changed, now, Checked::Now).await?;
        view.withdraw_moot_cancels(&mut tx, &changed, now).await?;
        if !unchanged.is_empty() {
            let sql = format!(
                "UPDATE requests SET checked_at = $1 WHERE id IN ({})",
                placeholders(2, unchanged.len())
            );
            let sql = tx.backend.numbered(&sql);
            let mut q = sqlx::query(&sql).bind(now);
            for id in &unchanged {
                q = q.bind(*id);
            }
            q.execute(tx.conn()).await?;
        }
        insert_events(&mut tx, events).await?;
        tx.commit().await?;
        self.acks.commits.fetch_add(1, Ordering::Relaxed);
        Ok(outcomes)
    }

    /// Records an ACKNOWLEDGEMENT_REJECTED event, with its audit entry, for each of
    /// `rejected` whose key (request, `processor`, subprocessor, sequence) has none yet, and
    /// returns the requests that got one. The caller passes only acknowledgements of requests
    /// delivered to `processor` (a processor must not write events on others' requests); a
    /// request that does not exist gets nothing. A retry of the same acknowledgement finds its
    /// key in `rejected_acknowledgements` and records nothing more, so a processor retrying
    /// until it dead-letters the acknowledgement leaves one event.
    pub async fn record_rejected_acks(
        &self,
        processor: &str,
        rejected: &[RejectedAck],
        now: i64,
    ) -> Result<BTreeSet<String>> {
        // By key, in key order, as `record_acks` writes its rows: one per key even when a
        // batch repeats it, and concurrent calls wait for each other's keys in one order.
        let by_key: BTreeMap<(&str, &str, i64), &RejectedAck> = rejected
            .iter()
            .map(|r| {
                (
                    (r.request_id.as_str(), r.subprocessor.as_str(), r.sequence),
                    r,
                )
            })
            .collect();
        if by_key.is_empty() {
            return Ok(BTreeSet::new());
        }
        let ids: Vec<&str> = by_key
            .keys()
            .map(|k| k.0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut tx = self.begin().await?;
        // Locked as an acknowledgement batch locks them, so the state the event shows is
        // the one the request is in, not one a concurrent batch is moving it from.
        let locked = lock_states(&mut tx, &ids).await?;
        let existing: Vec<(&(&str, &str, i64), &&RejectedAck)> = by_key
            .iter()
            .filter(|(k, _)| locked.states.contains_key(k.0))
            .collect();
        let mut recorded: BTreeSet<(String, String, i64)> = BTreeSet::new();
        for chunk in existing.chunks(tx.backend.rows_per_statement(5)) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| values_row(1 + i * 5..6 + i * 5))
                .collect();
            let sql = format!(
                "INSERT INTO rejected_acknowledgements (request_id, processor, subprocessor, \
                 sequence, rejected_at) VALUES {} ON CONFLICT DO NOTHING \
                 RETURNING request_id, subprocessor, sequence",
                values.join(", ")
            );
            let sql = tx.backend.numbered(&sql);
            let mut q = sqlx::query_as::<_, (String, String, i64)>(&sql);
            for ((id, subprocessor, sequence), _) in chunk {
                q = q
                    .bind(*id)
                    .bind(processor)
                    .bind(*subprocessor)
                    .bind(*sequence)
                    .bind(now);
            }
            recorded.extend(q.fetch_all(tx.conn()).await?);
        }
        let mut events = Vec::new();
        for (key, r) in existing {
            if !recorded.contains(&(key.0.to_string(), key.1.to_string(), key.2)) {
                continue;
            }
            let (state, forgotten) = locked.of(key.0);
            let reported = TaskState::try_from(r.state)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("TASK_STATE_")
                        .to_string()
                })
                .unwrap_or_else(|_| r.state.to_string());
            events.push(NewEvent {
                request_id: r.request_id.clone(),
                event_type: EventType::AcknowledgementRejected,
                at: now,
                request_state: state,
                detail: EventDetail {
                    processor: processor.to_string(),
                    subprocessor: r.subprocessor.clone(),
                    task_state: r.state,
                    sequence: r.sequence,
                    message: format!(
                        "acknowledgement {} #{}: {reported} rejected: {}",
                        r.subprocessor, r.sequence, r.rules
                    ),
                    forgotten,
                    ..Default::default()
                },
            });
        }
        let requests = events.iter().map(|e| e.request_id.clone()).collect();
        insert_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok(requests)
    }

    /// Transactions the acknowledgement writer committed so far (set against the
    /// Acknowledge calls, what its group commit saved).
    pub fn acknowledgement_commits(&self) -> u64 {
        self.acks.commits.load(Ordering::Relaxed)
    }

    /// Folds a processor's reported task list (from reconciliation) like acknowledgements
    /// whose sequence numbers are newer than ours.
    ///
    /// When nothing was new, the next check waits as long again as the request has been
    /// unchanged (`updated_at`), at most `max_backoff_ms`: quiet requests are asked less and
    /// less often. With `max_backoff_ms` 0 the check counts as made at `now`, as one that
    /// finds something new does: the reconciler passes 0 when the request's check at
    /// another of its processors in the same round failed, found something new, or is
    /// still to come, so one processor's answer never pushes back the check of another.
    pub async fn reconcile(
        &self,
        request_id: &str,
        processor: &str,
        tasks: &[TaskStatus],
        now: i64,
        max_backoff_ms: i64,
    ) -> Result<usize> {
        let mut tx = self.begin().await?;
        // Locked first, as acknowledgements lock it before the tasks they fold: a concurrent
        // acknowledgement's step is waited for and seen.
        let (state, forgotten) = lock_states(&mut tx, &[request_id]).await?.of(request_id);
        let mut changed = 0;
        if !tasks.is_empty() && state == RequestState::Cancelled {
            // See `FoldView::accept_withdrawn`.
            if let Some(event) =
                accept_withdrawn_delivery(&mut tx, request_id, processor, now).await?
            {
                insert_events(&mut tx, vec![event]).await?;
            }
        }
        let updates: Vec<TaskUpdate> = tasks
            .iter()
            .map(|t| TaskUpdate {
                request_id: request_id.to_string(),
                ..TaskUpdate::from(t)
            })
            .collect();
        let unproven = unproven_completions(
            &mut tx,
            updates
                .iter()
                .map(|u| (processor, u))
                .collect::<Vec<_>>()
                .as_slice(),
            now,
        )
        .await?;
        for update in updates {
            let before = previous(&mut tx, request_id, processor, &update.subprocessor).await?;
            if unproven.contains(&update.key_at(processor)) {
                // As in `apply_accepted`: a task first heard of here is kept open.
                if before.is_none() {
                    let placeholder = TaskUpdate::placeholder(request_id, &update.subprocessor);
                    upsert_task(&mut tx, request_id, processor, &placeholder, now).await?;
                }
                continue;
            }
            let written = update.written(&tx, forgotten);
            if upsert_task(&mut tx, request_id, processor, &written, now).await?
                && says_something_new(before.as_ref(), &update)
            {
                changed += 1;
                let state = tx.current_state(request_id).await?;
                let detail =
                    update.event_detail(processor, 0, " (reconciled)", &tx.text_key, forgotten);
                insert_event(
                    &mut tx,
                    request_id,
                    EventType::TaskUpdated,
                    now,
                    state,
                    detail,
                )
                .await?;
            }
        }
        refold(&mut tx, request_id, now).await?;
        if changed > 0 {
            mark_checked(&mut tx, request_id, now).await?;
        } else {
            sqlx::query(
                "UPDATE requests SET checked_at = $1 + \
                 CASE WHEN $1 - updated_at < $2 THEN $1 - updated_at ELSE $2 END \
                 WHERE id = $3",
            )
            .bind(now)
            .bind(max_backoff_ms.max(0))
            .bind(request_id)
            .execute(tx.conn())
            .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }
}

/// The (request id, processor, subprocessor) of the reports among `reports` (each with the
/// processor that made it) that claim what the registry has no proof of: a COMPLETED TRANSFER
/// task without the recipient's receipt, a COMPLETED RETURN_OF_DATA task without its part
/// stored here, a receipt on a request that transfers nothing (any kind but TRANSFER, and a
/// contract end whose terms name no transfer recipient), which shown with the task would
/// read as proof that data arrived somewhere, and a receipt naming another recipient than
/// the one the request transfers the data to (a TRANSFER's `parameters.transfer_recipient`,
/// a contract end's terms'), which would show that one as holding the data; a receipt naming
/// a sender other than the processor's certificate identity (its `[[processors]]` `identity`,
/// `Store::with_processor_identities`; a receipt naming no sender passes), which may be the
/// one another processor's part got for the same request and subprocessor; a receipt of a
/// recipient `[[recipients]]` no longer lists, which nothing here can check (it may have
/// been taken out for a leaked key); and a receipt of a recipient whose `[[recipients]]`
/// entry has a `public_key` that does not verify its signature (`Store::with_receipt_keys`),
/// which would be the processor's word alone (a key revoked at or before `now`, the time the
/// answer reached the registry, verifies nothing). A TRANSFER forgotten with its body no longer
/// names its recipient: its receipts are taken under any name `[[recipients]]` lists.
/// Acknowledge refuses all of those by name (see `api::acknowledgement`); a report in
/// a processor's answer to a call or a status check is left out, logged, so the task stays
/// where it was. No statement when no report is COMPLETED or carries a receipt; else at
/// most four per 500 requests, the last two only for the requests whose reports carry a
/// receipt.
async fn unproven_completions(
    tx: &mut Tx,
    reports: &[(&str, &TaskUpdate)],
    now: i64,
) -> Result<BTreeSet<(String, String, String)>> {
    let checked: Vec<(&str, &TaskUpdate)> = reports
        .iter()
        .copied()
        .filter(|(_, u)| u.state == TaskState::Completed as i32 || u.transfer_receipt.is_some())
        .collect();
    if checked.is_empty() {
        return Ok(BTreeSet::new());
    }
    let ids: Vec<&str> = checked
        .iter()
        .map(|(_, u)| u.request_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut kinds: BTreeMap<String, i64> = BTreeMap::new();
    for chunk in ids.chunks(500) {
        let sql = format!(
            "SELECT id, kind FROM requests WHERE id IN ({})",
            placeholders(1, chunk.len())
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query_as::<_, (String, i64)>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        kinds.extend(q.fetch_all(tx.conn()).await?);
    }
    let is = |id: &str, kind: RequestKind| kinds.get(id) == Some(&(kind as i64));
    let returns: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| is(id, RequestKind::ReturnOfData))
        .collect();
    let backend = tx.backend;
    let parts = super::packages::parts_of(tx.conn(), backend, &returns).await?;
    // The contract ends whose terms return the data to a transfer recipient, read only for
    // those whose reports carry a receipt.
    let contract_ends: Vec<&str> = checked
        .iter()
        .filter(|(_, u)| {
            u.transfer_receipt.is_some() && is(&u.request_id, RequestKind::ContractEnd)
        })
        .map(|(_, u)| u.request_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let transferring_contract_ends =
        super::contracts::transferring_of(tx.conn(), backend, &contract_ends).await?;
    let receipted_transfers: Vec<&str> = checked
        .iter()
        .filter(|(_, u)| u.transfer_receipt.is_some() && is(&u.request_id, RequestKind::Transfer))
        .map(|(_, u)| u.request_id.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut recipients = transfer_recipients_of(tx.conn(), backend, &receipted_transfers).await?;
    recipients.extend(
        transferring_contract_ends
            .iter()
            .map(|(id, name)| (id.clone(), Some(name.clone()))),
    );
    let mut unproven = BTreeSet::new();
    for (processor, u) in checked {
        let key = u.key_at(processor);
        let id = u.request_id.as_str();
        let completed = u.state == TaskState::Completed as i32;
        let transfers =
            is(id, RequestKind::Transfer) || transferring_contract_ends.contains_key(id);
        // `None` only for a request forgotten with its body: its recipient is unknown here.
        let named = recipients.get(id).and_then(Option::as_deref);
        let lacking = if u.transfer_receipt.is_some() && !transfers {
            "a transfer receipt on a request that transfers nothing to a recipient"
        } else if u
            .transfer_receipt
            .as_ref()
            .is_some_and(|r| named.is_some_and(|n| r.recipient != n))
        {
            "a transfer receipt naming another recipient than the request's"
        } else if (u.transfer_receipt.as_ref())
            .is_some_and(|r| tx.processor_identities.other_sender(processor, r))
        {
            "a transfer receipt naming another sender than the processor's certificate identity"
        } else if (u.transfer_receipt.as_ref())
            .is_some_and(|r| tx.receipt_keys.unlisted(&r.recipient))
        {
            "a transfer receipt of a recipient the registry's [[recipients]] does not list"
        } else if let Some(why) = (u.transfer_receipt.as_ref())
            .and_then(|r| super::signature_problem(&tx.receipt_keys, r, now))
        {
            tracing::warn!(
                request_id = %u.request_id,
                %processor,
                subprocessor = %u.subprocessor,
                "the transfer receipt {why}"
            );
            "a transfer receipt its recipient's key does not verify"
        } else if completed && is(id, RequestKind::Transfer) && u.transfer_receipt.is_none() {
            "a COMPLETED state without the recipient's receipt"
        } else if completed && is(id, RequestKind::ReturnOfData) && !parts.contains(&key) {
            "a COMPLETED state without its part of the package stored at the registry"
        } else {
            continue;
        };
        tracing::warn!(
            request_id = %u.request_id,
            %processor,
            subprocessor = %u.subprocessor,
            sequence = u.sequence,
            "a processor reported {lacking}; the report is left out"
        );
        unproven.insert(key);
    }
    Ok(unproven)
}

/// The recipient each of the TRANSFER requests `ids` transfers its data to, by request id:
/// its `parameters.transfer_recipient`, read from its stored body (empty when the body names
/// none, or does not decode); `None` once the body was forgotten. One query per 500 ids;
/// none for no id.
async fn transfer_recipients_of(
    conn: &mut sqlx::AnyConnection,
    backend: dsrelay_runtime::store::Backend,
    ids: &[&str],
) -> Result<BTreeMap<String, Option<String>>> {
    let mut recipients = BTreeMap::new();
    for chunk in ids.chunks(500) {
        let sql = format!(
            "SELECT id, body FROM requests WHERE id IN ({})",
            placeholders(1, chunk.len())
        );
        let sql = backend.numbered(&sql);
        let mut q = sqlx::query_as::<_, (String, Option<Vec<u8>>)>(&sql);
        for id in chunk {
            q = q.bind(*id);
        }
        for (id, body) in q.fetch_all(&mut *conn).await? {
            let named = body.map(|b| {
                SubmitRequest::decode(b.as_slice())
                    .ok()
                    .and_then(|s| s.parameters)
                    .map(|p| p.transfer_recipient)
                    .unwrap_or_default()
            });
            recipients.insert(id, named);
        }
    }
    Ok(recipients)
}

impl Store {
    /// `transfer_recipients_of` the TRANSFER requests `ids`, for Acknowledge's check of
    /// the receipts' recipient names, as the store checks those of processors' answers.
    pub async fn transfer_recipients(
        &self,
        ids: &[&str],
    ) -> Result<BTreeMap<String, Option<String>>> {
        let mut conn = self.db.reader.acquire().await?;
        transfer_recipients_of(&mut conn, self.db.backend, ids).await
    }
}

/// Which of `ids` were routed to `processor` (have its Deliver row): one statement.
async fn routed_requests(tx: &mut Tx, processor: &str, ids: &[&str]) -> Result<BTreeSet<String>> {
    if ids.is_empty() {
        return Ok(BTreeSet::new());
    }
    let sql = format!(
        "SELECT DISTINCT request_id FROM deliveries WHERE processor = $1 AND op = $2 \
         AND request_id IN ({})",
        placeholders(3, ids.len())
    );
    let sql = tx.backend.numbered(&sql);
    let mut q = sqlx::query_scalar::<_, String>(&sql)
        .bind(processor)
        .bind(Operation::Deliver.as_str());
    for id in ids {
        q = q.bind(*id);
    }
    Ok(q.fetch_all(tx.conn()).await?.into_iter().collect())
}

/// Records the acknowledgements (the exactly-once record), each with its processor, in
/// multi-row INSERTs; returns the keys (request, processor, subprocessor, sequence) recorded
/// now, not those recorded before.
///
/// The rows go in key order: two transactions recording overlapping batches (a batch sent
/// again to another replica while the first is still applying it) then wait for each
/// other's keys in one order, never in a cycle.
async fn record_acks<'a>(
    tx: &mut Tx,
    acks: impl Iterator<Item = (&'a str, &'a TaskUpdate)>,
    now: i64,
) -> Result<BTreeSet<(String, String, String, i64)>> {
    let mut acks: Vec<(&str, &TaskUpdate)> = acks.collect();
    acks.sort_by(|(p, a), (q, b)| {
        (&a.request_id, p, &a.subprocessor, a.sequence).cmp(&(
            &b.request_id,
            q,
            &b.subprocessor,
            b.sequence,
        ))
    });
    let mut recorded = BTreeSet::new();
    // The time bound again in every row: each parameter once, in order, so that SQLite
    // binds them by position (`Backend::numbered`).
    for chunk in acks.chunks(tx.backend.rows_per_statement(6)) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| values_row(1 + i * 6..7 + i * 6))
            .collect();
        let sql = format!(
            "INSERT INTO acknowledgements (request_id, processor, subprocessor, sequence, \
             state, received_at) VALUES {} ON CONFLICT DO NOTHING \
             RETURNING request_id, processor, subprocessor, sequence",
            values.join(", ")
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query_as::<_, (String, String, String, i64)>(&sql);
        for (processor, a) in chunk {
            q = q
                .bind(&a.request_id)
                .bind(*processor)
                .bind(&a.subprocessor)
                .bind(a.sequence)
                .bind(i64::from(a.state))
                .bind(now);
        }
        recorded.extend(q.fetch_all(tx.conn()).await?);
    }
    Ok(recorded)
}

/// A task as the fold sees it.
struct TaskNow {
    state: i32,
    sequence: i64,
    progress: Option<Vec<u8>>,
}

/// What folding the touched requests needs, read once: their states (locked), every task
/// of theirs (by request, processor, subprocessor) and where each delivery stands; and
/// which of them are forgotten, whose reports are written as forgetting leaves them.
struct FoldView {
    requests: BTreeMap<String, RequestState>,
    forgotten: BTreeSet<String>,
    tasks: BTreeMap<(String, String, String), TaskNow>,
    /// Where each delivery stands, by (request, processor).
    delivered: BTreeMap<(String, String), Delivery>,
    /// The requests with a Cancel not done yet (pending, in flight or dead-lettered): those
    /// [`withdraw_moot_cancels`] may have to withdraw.
    cancel_undone: BTreeSet<String>,
}

impl FoldView {
    /// Locks the requests of `ids` (sorted, distinct) and reads them with their tasks and
    /// deliveries: two statements.
    async fn read(tx: &mut Tx, ids: &[&str]) -> Result<Self> {
        let requests = lock_states(tx, ids).await?;
        Self::read_with(tx, ids, requests).await
    }

    /// The tasks and deliveries of `ids`, whose request rows `locked` holds (read under
    /// their lock in this transaction), in one statement.
    async fn read_with(tx: &mut Tx, ids: &[&str], locked: Locked) -> Result<Self> {
        // Both in one statement, each row saying which it is (a Cancel's 'c', which only a
        // cancelled request has): a delivery's subprocessor is empty, whether it was
        // withdrawn stands in the state's column and whether it is done in the sequence's.
        let n = ids.len();
        let sql = format!(
            "SELECT 't', request_id, processor, subprocessor, state, sequence, progress \
             FROM tasks WHERE request_id IN ({}) \
             UNION ALL \
             SELECT CASE WHEN op = ${} THEN 'd' ELSE 'c' END, request_id, processor, '', \
             CASE WHEN withdrawn_at IS NULL THEN 0 ELSE 1 END, \
             CASE WHEN done_at IS NULL THEN 0 ELSE 1 END, NULL \
             FROM deliveries WHERE op IN (${}, ${}) AND request_id IN ({})",
            placeholders(1, n),
            n + 1,
            n + 1,
            n + 2,
            placeholders(n + 3, n)
        );
        let sql = tx.backend.numbered(&sql);
        let mut q =
            sqlx::query_as::<_, (String, String, String, String, i32, i64, Option<Vec<u8>>)>(&sql);
        for id in ids {
            q = q.bind(*id);
        }
        q = q
            .bind(Operation::Deliver.as_str())
            .bind(Operation::Cancel.as_str());
        for id in ids {
            q = q.bind(*id);
        }
        let mut tasks = BTreeMap::new();
        let mut delivered = BTreeMap::new();
        let mut cancel_undone = BTreeSet::new();
        for (src, r, p, s, state, sequence, progress) in q.fetch_all(tx.conn()).await? {
            if src == "d" {
                delivered.insert((r, p), Delivery::of(sequence != 0, state != 0));
            } else if src == "c" {
                if sequence == 0 {
                    cancel_undone.insert(r);
                }
            } else {
                tasks.insert(
                    (r, p, s),
                    TaskNow {
                        state,
                        sequence,
                        progress,
                    },
                );
            }
        }
        Ok(Self {
            requests: locked.states,
            forgotten: locked.forgotten,
            tasks,
            delivered,
            cancel_undone,
        })
    }

    /// Withdraws the Cancels not done yet of the requests of `changed` that the fold made
    /// COMPLETED ([`withdraw_moot_cancels`]); no statement when none has one.
    async fn withdraw_moot_cancels(
        &self,
        tx: &mut Tx,
        changed: &[(&str, RequestState)],
        now: i64,
    ) -> Result<()> {
        let ids: Vec<&str> = changed
            .iter()
            .filter(|(id, state)| {
                *state == RequestState::Completed && self.cancel_undone.contains(*id)
            })
            .map(|(id, _)| *id)
            .collect();
        withdraw_moot_cancels(tx, &ids, now).await
    }

    /// A request's state before the fold, `UNSPECIFIED` if it does not exist.
    fn state_of(&self, id: &str) -> RequestState {
        self.requests
            .get(id)
            .copied()
            .unwrap_or(RequestState::Unspecified)
    }

    /// The request's state folded from its deliveries and tasks as they now stand, and
    /// from `old`, the state it had: a cancellation or an answer is kept as the fold says.
    fn fold(&self, id: &str, old: RequestState) -> RequestState {
        let delivered: Vec<Delivery> = self
            .delivered
            .range((id.to_string(), String::new())..)
            .take_while(|((r, _), _)| r == id)
            .map(|(_, d)| *d)
            .collect();
        let tasks: Vec<TaskState> = self
            .tasks
            .range((id.to_string(), String::new(), String::new())..)
            .take_while(|((r, _, _), _)| r == id)
            .map(|(_, t)| task_state(t.state))
            .collect();
        fold_request(old, &delivered, &tasks)
    }

    /// Records as accepted the deliveries a cancellation withdrew whose processor has now
    /// reported tasks of the request (`reporters`: request, processor): its Deliver was in
    /// flight when the request was cancelled, and the processor accepted it. Left withdrawn,
    /// the request would say CANCELLED for good though that processor's holders did the
    /// work. Only a cancelled request has withdrawn deliveries (forgetting withdraws only a
    /// cancelled one's), so others cost no statement. Answers the DELIVERED events to write,
    /// each showing the request's state before the fold.
    async fn accept_withdrawn<'a>(
        &mut self,
        tx: &mut Tx,
        reporters: impl IntoIterator<Item = (&'a str, &'a str)>,
        now: i64,
    ) -> Result<Vec<NewEvent>> {
        let mut events = Vec::new();
        for (request_id, processor) in reporters.into_iter().collect::<BTreeSet<_>>() {
            let key = (request_id.to_string(), processor.to_string());
            if self.state_of(request_id) != RequestState::Cancelled
                || self.delivered.get(&key) != Some(&Delivery::Withdrawn)
            {
                continue;
            }
            let Some(event) = accept_withdrawn_delivery(tx, request_id, processor, now).await?
            else {
                continue;
            };
            self.delivered.insert(key, Delivery::Accepted);
            events.push(event);
        }
        Ok(events)
    }
}

/// Withdraws the Cancels not done yet and not in flight (pending, or dead-lettered) of
/// `ids`, requests that have just become COMPLETED: every task ended before the
/// cancellation got through, so there is nothing left to stop, and a Cancel still queued or
/// dead-lettered would be sent, listed and counted for nothing. One in flight (claimed: its
/// `lease_owner` set) is left to its answer, which records it delivered, or not, as it was;
/// withdrawn, it would read "no longer sent" though it was.
async fn withdraw_moot_cancels(tx: &mut Tx, ids: &[&str], now: i64) -> Result<()> {
    for chunk in ids.chunks(tx.backend.rows_per_statement(1)) {
        let sql = format!(
            "UPDATE deliveries SET done_at = $1, withdrawn_at = $1, last_error = $2 \
             WHERE op = $3 AND done_at IS NULL AND lease_owner IS NULL \
             AND request_id IN ({})",
            placeholders(4, chunk.len())
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query(&sql)
            .bind(now)
            .bind(
                "no longer sent: every task of the request had ended (COMPLETED) before the \
                 cancellation got through, so there was nothing left to stop",
            )
            .bind(Operation::Cancel.as_str());
        for id in chunk {
            q = q.bind(*id);
        }
        let withdrawn = q.execute(tx.conn()).await?.rows_affected();
        if withdrawn > 0 {
            tracing::info!(
                withdrawn,
                requests = chunk.len(),
                "Cancels withdrawn: their requests completed before the cancellation got \
                 through"
            );
        }
    }
    Ok(())
}

/// Clears the withdrawal of `processor`'s Deliver of `request_id` (see
/// [`FoldView::accept_withdrawn`]); answers its DELIVERED event if it was withdrawn (showing
/// the request CANCELLED, as it is before the fold). Its `done_at` stays the cancellation's
/// time: the processor's answer never reached the registry.
async fn accept_withdrawn_delivery(
    tx: &mut Tx,
    request_id: &str,
    processor: &str,
    now: i64,
) -> Result<Option<NewEvent>> {
    let cleared = sqlx::query(
        "UPDATE deliveries SET withdrawn_at = NULL, last_error = NULL \
         WHERE request_id = $1 AND processor = $2 AND op = $3 AND withdrawn_at IS NOT NULL",
    )
    .bind(request_id)
    .bind(processor)
    .bind(Operation::Deliver.as_str())
    .execute(tx.conn())
    .await?
    .rows_affected();
    Ok((cleared > 0).then(|| NewEvent {
        request_id: request_id.to_string(),
        event_type: EventType::Delivered,
        at: now,
        request_state: RequestState::Cancelled,
        detail: EventDetail {
            processor: processor.to_string(),
            message: format!(
                "accepted by {processor} before the cancellation reached it: it reported \
                 tasks of the request"
            ),
            ..Default::default()
        },
    }))
}

/// Request rows a transaction locked, as it read them: their states, and which of them are
/// forgotten already (read with the lock, so no forgetting is under way on them).
#[derive(Default)]
pub(super) struct Locked {
    states: BTreeMap<String, RequestState>,
    forgotten: BTreeSet<String>,
}

impl Locked {
    /// Request `id`'s state (UNSPECIFIED if it does not exist) and whether it is forgotten.
    pub(super) fn of(&self, id: &str) -> (RequestState, bool) {
        let state = self.states.get(id).copied();
        (
            state.unwrap_or(RequestState::Unspecified),
            self.forgotten.contains(id),
        )
    }
}

/// Locks the request rows of `ids` (sorted, distinct) and reads their states and whether
/// each is forgotten, in one statement. Two processors' acknowledgements for one request
/// may be applied by concurrent transactions; each must fold with the other's tasks in
/// view, so the request rows are locked before the tasks are read. A request that does not
/// exist is not in what it answers.
pub(super) async fn lock_states(tx: &mut Tx, ids: &[&str]) -> Result<Locked> {
    if ids.is_empty() {
        return Ok(Locked::default());
    }
    let sql = format!(
        "SELECT id, state, forgotten_at FROM requests WHERE id IN ({}) ORDER BY id{}{}",
        placeholders(1, ids.len()),
        tx.backend.bytewise(),
        tx.backend.lock_rows()
    );
    let sql = tx.backend.numbered(&sql);
    let mut q = sqlx::query_as::<_, (String, i32, Option<i64>)>(&sql);
    for id in ids {
        q = q.bind(*id);
    }
    let mut locked = Locked::default();
    for (id, state, forgotten_at) in q.fetch_all(tx.conn()).await? {
        if forgotten_at.is_some() {
            locked.forgotten.insert(id.clone());
        }
        locked.states.insert(id, super::rows::request_state(state));
    }
    Ok(locked)
}

/// One processor's answer to a delivery the registry records as accepted: the tasks it
/// reported, and the words of its DELIVERED event.
pub(super) struct Accepted<'a> {
    pub(super) request_id: &'a str,
    pub(super) processor: &'a str,
    pub(super) tasks: &'a [TaskStatus],
    pub(super) delivered: EventDetail,
}

/// Records what accepted deliveries reported, in a fixed number of statements whatever their
/// number: the touched requests' tasks and deliveries read in one statement (the caller
/// locked the requests and read their states, `locked`, then marked the deliveries' rows),
/// the reported tasks applied like acknowledgements (a
/// report older than what the registry has moves nothing; the answer to a Deliver sent again
/// reports the tasks as they stand), one multi-row upsert per processor of the tasks that
/// moved, one UPDATE per state the requests move to, and the events written together. Per
/// request, each DELIVERED event (showing the state before the fold) is followed by a
/// TASK_UPDATED for each task its report moved past its first state (so a step learned from
/// a delivery's answer is in the request's events as an acknowledgement's would be; the
/// acknowledgement that follows is then not new), and the STATE_CHANGED comes last.
pub(super) async fn apply_accepted(
    tx: &mut Tx,
    accepted: &[Accepted<'_>],
    locked: Locked,
    now: i64,
) -> Result<()> {
    if accepted.is_empty() {
        return Ok(());
    }
    let touched: Vec<&str> = accepted
        .iter()
        .map(|a| a.request_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut view = FoldView::read_with(tx, &touched, locked).await?;
    let reporters = accepted
        .iter()
        .filter(|a| !a.tasks.is_empty())
        .map(|a| (a.request_id, a.processor));
    // Each right after the DELIVERED event of the answer that showed it.
    let mut found_accepted: BTreeMap<(String, String), NewEvent> = view
        .accept_withdrawn(tx, reporters, now)
        .await?
        .into_iter()
        .map(|e| ((e.request_id.clone(), e.detail.processor.clone()), e))
        .collect();
    let reported: Vec<Vec<TaskUpdate>> = accepted
        .iter()
        .map(|a| {
            a.tasks
                .iter()
                .map(|t| TaskUpdate {
                    request_id: a.request_id.to_string(),
                    ..TaskUpdate::from(t)
                })
                .collect()
        })
        .collect();
    let unproven = unproven_completions(
        tx,
        &accepted
            .iter()
            .zip(&reported)
            .flat_map(|(a, updates)| updates.iter().map(|u| (a.processor, u)))
            .collect::<Vec<_>>(),
        now,
    )
    .await?;
    let mut events = Vec::new();
    // The last report of each task that moved, per processor.
    let mut moved: BTreeMap<&str, BTreeMap<(String, String), TaskUpdate>> = BTreeMap::new();
    for (a, updates) in accepted.iter().zip(reported) {
        events.push(NewEvent {
            request_id: a.request_id.to_string(),
            event_type: EventType::Delivered,
            at: now,
            request_state: view.state_of(a.request_id),
            detail: a.delivered.clone(),
        });
        let key = (a.request_id.to_string(), a.processor.to_string());
        events.extend(found_accepted.remove(&key));
        for update in updates {
            let key = (
                a.request_id.to_string(),
                a.processor.to_string(),
                update.subprocessor.clone(),
            );
            if unproven.contains(&update.key_at(a.processor)) {
                // A task first heard of here is still one of the request's: left unknown, it
                // would not hold the request open, and a fold over the others could say
                // COMPLETED.
                if let std::collections::btree_map::Entry::Vacant(slot) = view.tasks.entry(key) {
                    let placeholder = TaskUpdate::placeholder(a.request_id, &update.subprocessor);
                    slot.insert(placeholder.now());
                    moved.entry(a.processor).or_default().insert(
                        (a.request_id.to_string(), update.subprocessor.clone()),
                        placeholder,
                    );
                }
                continue;
            }
            let before = view.tasks.get(&key);
            if before.is_some_and(|t| t.sequence >= update.sequence) {
                continue;
            }
            let forgotten = view.forgotten.contains(a.request_id);
            let previous = before.map(|t| (t.state, t.progress.clone()));
            let was = previous.as_ref().map(|p| p.0);
            super::failed::note_task(tx, a.request_id, a.processor, was, &update);
            if update.sequence > 1 && says_something_new(previous.as_ref(), &update) {
                events.push(NewEvent {
                    request_id: a.request_id.to_string(),
                    event_type: EventType::TaskUpdated,
                    at: now,
                    request_state: view.state_of(a.request_id),
                    detail: update.event_detail(
                        a.processor,
                        0,
                        " (reported on delivery)",
                        &tx.text_key,
                        forgotten,
                    ),
                });
            }
            view.tasks.insert(key, update.now());
            let update = update.written(tx, forgotten);
            moved.entry(a.processor).or_default().insert(
                (a.request_id.to_string(), update.subprocessor.clone()),
                update,
            );
        }
    }
    for (processor, updates) in &moved {
        upsert_tasks(tx, processor, updates.values(), now).await?;
    }
    let mut changed = Vec::new();
    for id in &touched {
        let Some(old) = view.requests.get(*id).copied() else {
            continue;
        };
        let new = view.fold(id, old);
        if new == old {
            continue;
        }
        changed.push((*id, new));
        events.push(state_changed_event(id, old, new, now));
    }
    write_request_states(tx, &changed, now, Checked::Unchanged).await?;
    view.withdraw_moot_cancels(tx, &changed, now).await?;
    // Each request's events together, in the order above (a stable sort keeps it).
    events.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    insert_events(tx, events).await
}

/// Writes each task's new state in multi-row upserts; a report older than what is stored
/// never moves a task back. Answers how many tasks were written.
async fn upsert_tasks<'a>(
    tx: &mut Tx,
    processor: &str,
    updates: impl Iterator<Item = &'a TaskUpdate>,
    now: i64,
) -> Result<u64> {
    let updates: Vec<&TaskUpdate> = updates.collect();
    let mut written = 0;
    for chunk in updates.chunks(tx.backend.rows_per_statement(14)) {
        // Columns: request, processor, subprocessor, state, sequence, records, confirmed,
        // note, reason, legal basis, retained until, updated, receipt, progress; the
        // processor and the time bound again in every row, so that each parameter appears
        // once, in order, and SQLite binds them by position (`Backend::numbered`).
        let values: Vec<String> = (0..chunk.len())
            .map(|i| values_row(1 + i * 14..15 + i * 14))
            .collect();
        let sql = format!(
            "{UPSERT_TASK_HEAD} {} {UPSERT_TASK_TAIL}",
            values.join(", ")
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query(&sql);
        for t in chunk {
            let receipt = t.transfer_receipt.as_ref().map(|r| {
                // A signature is kept only where it was checked, so that a stored one means
                // verified: one of a recipient with no key here could be any bytes.
                let mut r = r.clone();
                if tx.receipt_keys.of(&r.recipient).is_none() {
                    r.signature.clear();
                    r.key_id.clear();
                }
                r.encode_to_vec()
            });
            q = q
                .bind(&t.request_id)
                .bind(processor)
                .bind(&t.subprocessor)
                .bind(i64::from(t.state))
                .bind(t.sequence)
                .bind(t.records_affected)
                .bind(i64::from(t.confirmed))
                .bind(&t.note)
                .bind(&t.reason)
                .bind(&t.legal_basis)
                .bind(t.retain_until)
                .bind(now)
                .bind(receipt)
                .bind(t.progress.as_ref().map(Message::encode_to_vec));
        }
        written += q.execute(tx.conn()).await?.rows_affected();
    }
    Ok(written)
}

/// The STATE_CHANGED event of a request moving from `old` to `new`.
pub(super) fn state_changed_event(
    id: &str,
    old: RequestState,
    new: RequestState,
    now: i64,
) -> NewEvent {
    NewEvent {
        request_id: id.to_string(),
        event_type: EventType::StateChanged,
        at: now,
        request_state: new,
        detail: EventDetail {
            message: format!(
                "{} -> {}",
                old.as_str_name().trim_start_matches("REQUEST_STATE_"),
                new.as_str_name().trim_start_matches("REQUEST_STATE_")
            ),
            ..Default::default()
        },
    }
}

/// The task upsert's text before its VALUES rows ([`upsert_tasks`]).
const UPSERT_TASK_HEAD: &str = "INSERT INTO tasks (request_id, processor, subprocessor, state, \
     sequence, records_affected, confirmed, note, reason, legal_basis, retain_until, \
     updated_at, transfer_receipt, progress) VALUES";

/// The task upsert's text after its VALUES rows.
const UPSERT_TASK_TAIL: &str = "ON CONFLICT (request_id, processor, subprocessor) DO UPDATE SET \
     state = excluded.state, sequence = excluded.sequence, \
     records_affected = excluded.records_affected, confirmed = excluded.confirmed, \
     note = excluded.note, reason = excluded.reason, legal_basis = excluded.legal_basis, \
     retain_until = excluded.retain_until, updated_at = excluded.updated_at, \
     transfer_receipt = COALESCE(excluded.transfer_receipt, tasks.transfer_receipt), \
     progress = excluded.progress \
     WHERE tasks.sequence < excluded.sequence";

/// Notes that the request was heard of now, so the reconciler leaves it alone for a while.
async fn mark_checked(tx: &mut Tx, id: &str, now: i64) -> Result<()> {
    sqlx::query("UPDATE requests SET checked_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// Inserts the task or moves it forward; returns whether anything changed. A report older
/// than what we have never moves a task back.
pub(super) async fn upsert_task(
    tx: &mut Tx,
    request_id: &str,
    processor: &str,
    t: &TaskUpdate,
    now: i64,
) -> Result<bool> {
    let mut update = t.clone();
    update.request_id = request_id.to_string();
    Ok(upsert_tasks(tx, processor, std::iter::once(&update), now).await? > 0)
}

/// Whether writing a request's new state also counts as checking it (`checked_at`), as an
/// acknowledgement does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checked {
    Now,
    Unchanged,
}

/// Writes the new states of `changed` (request id, state), whose rows the caller has
/// locked: one UPDATE per state they move to, not one per request (a batch's requests
/// mostly move to the same one or two). A request that finishes records when; one that a
/// new task reopens is unfinished again, so its package's expiry and its forgetting count
/// from its next finish.
async fn write_request_states(
    tx: &mut Tx,
    changed: &[(&str, RequestState)],
    now: i64,
    checked: Checked,
) -> Result<()> {
    let mut by_state: BTreeMap<RequestState, Vec<&str>> = BTreeMap::new();
    for (id, state) in changed {
        by_state.entry(*state).or_default().push(id);
    }
    let checked = match checked {
        Checked::Now => ", checked_at = $2",
        Checked::Unchanged => "",
    };
    super::failed::note_requests(tx, changed).await?;
    for (state, ids) in by_state {
        let finished = request_is_terminal(state).then_some(now);
        for chunk in ids.chunks(tx.backend.rows_per_statement(1)) {
            let sql = format!(
                "UPDATE requests SET state = $1, updated_at = $2, \
                 finished_at = $3{checked} WHERE id IN ({})",
                placeholders(4, chunk.len())
            );
            let sql = tx.backend.numbered(&sql);
            let mut q = sqlx::query(&sql)
                .bind(state as i64)
                .bind(now)
                .bind(finished);
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(tx.conn()).await?;
        }
    }
    Ok(())
}

/// Recomputes a request's state from its deliveries and tasks; records a change.
pub(super) async fn refold(tx: &mut Tx, id: &str, now: i64) -> Result<()> {
    // Two processors' acknowledgements for one request may be applied by concurrent
    // transactions; each must fold with the other's tasks in view, so the request row is
    // locked before they are read.
    let Some(old) = tx.request_state(id, true).await? else {
        return Ok(());
    };
    let delivered = super::requests::deliveries(tx, id).await?;
    let tasks = super::requests::tasks(tx, id).await?;
    let new = fold_request(old, &delivered, &tasks);
    if new == old {
        return Ok(());
    }
    write_request_states(tx, &[(id, new)], now, Checked::Unchanged).await?;
    if new == RequestState::Completed {
        withdraw_moot_cancels(tx, &[id], now).await?;
    }
    insert_events(tx, vec![state_changed_event(id, old, new, now)]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(state: TaskState, phase: Option<ContractPhase>) -> TaskUpdate {
        TaskUpdate {
            state: state as i32,
            progress: phase.map(|p| ContractProgress {
                phase: p as i32,
                records_done: 7,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn before(state: TaskState, phase: ContractPhase) -> Previous {
        let p = ContractProgress {
            phase: phase as i32,
            ..Default::default()
        };
        (state as i32, Some(p.encode_to_vec()))
    }

    #[test]
    fn only_new_counts_say_nothing_new() {
        use ContractPhase::*;
        use TaskState::*;
        let deleting = before(InProgress, Deleting);
        assert!(!says_something_new(
            Some(&deleting),
            &update(InProgress, Some(Deleting))
        ));
        // A new phase, a new state, a first report, or a task without progress all speak.
        assert!(says_something_new(
            Some(&deleting),
            &update(InProgress, Some(Done))
        ));
        assert!(says_something_new(
            Some(&deleting),
            &update(Completed, Some(Deleting))
        ));
        assert!(says_something_new(
            None,
            &update(InProgress, Some(Deleting))
        ));
        assert!(says_something_new(
            Some(&(InProgress as i32, None)),
            &update(InProgress, Some(Deleting))
        ));
        assert!(says_something_new(
            Some(&(InProgress as i32, None)),
            &update(InProgress, None)
        ));
    }

    /// The stored body of a TRANSFER request to `recipient`, as Submit stores it.
    fn transfer_body(recipient: &str) -> Vec<u8> {
        SubmitRequest {
            kind: RequestKind::Transfer as i32,
            parameters: Some(dsrelay_proto::v1::RequestParameters {
                transfer_recipient: recipient.into(),
                ..Default::default()
            }),
            idempotency_key: "key".into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// A TRANSFER request `id` to `recipient`, routed to processor `p1`.
    fn transfer_request(id: &str, recipient: &str) -> super::super::NewRequest {
        super::super::NewRequest {
            id: id.into(),
            partner: "crm".into(),
            idempotency_key: format!("key-{id}"),
            body_hash: format!("hash-{id}"),
            body: transfer_body(recipient),
            identity_hashes: "[\"h\"]".into(),
            kind: RequestKind::Transfer as i32,
            received_at: 0,
            due_at: 1_000_000,
            trace_id: "0".repeat(32),
            traceparent: None,
            processors: vec!["p1".into()],
        }
    }

    async fn store(dir: &std::path::Path) -> Store {
        store_at(&format!("sqlite://{}/registry.db", dir.display())).await
    }

    /// The texts a processor sends that a TASK_UPDATED event quotes (a legal basis, the
    /// recipient's name in a receipt) may name the subject: the event shows them until the
    /// request is forgotten, the audit trail, which is never changed, only their keyed hash.
    #[tokio::test]
    async fn quoted_processor_texts_reach_the_audit_trail_only_as_keyed_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        // The receipt names the request's own recipient (`unproven_completions`).
        let recipient = "the bookkeeper of jane.doe@example.org";
        store
            .insert_request(&transfer_request("r1", recipient))
            .await
            .unwrap();
        let basis = "tax law, as agreed with jane.doe@example.org";
        let retained = TaskUpdate {
            request_id: "r1".into(),
            subprocessor: "accounting".into(),
            sequence: 2,
            state: TaskState::Retained as i32,
            legal_basis: basis.into(),
            retain_until: Some(2_000_000),
            ..Default::default()
        };
        let routed = BTreeSet::from(["r1".to_string()]);
        let outcome = store
            .apply_routed_acks("p1", &[retained], routed, 1000)
            .await
            .unwrap();
        assert_eq!(outcome.applied, 1);
        let received = TaskStatus {
            subprocessor: "crm".into(),
            state: TaskState::Completed as i32,
            sequence: 2,
            evidence: Some(dsrelay_proto::v1::Evidence {
                transfer_receipt: Some(TransferReceipt {
                    request_id: "r1".into(),
                    subprocessor: "crm".into(),
                    files: 1,
                    bytes: 3,
                    recipient: recipient.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        store
            .reconcile("r1", "p1", &[received], 2000, 60_000)
            .await
            .unwrap();

        let updated = EventType::TaskUpdated as i32;
        let messages: Vec<String> = sqlx::query_scalar(
            "SELECT message FROM events WHERE request_id = 'r1' AND type = $1 ORDER BY id",
        )
        .bind(updated)
        .fetch_all(&store.db.pool)
        .await
        .unwrap();
        assert_eq!(
            messages,
            [
                format!("accounting #2: RETAINED, retained under {basis}"),
                format!(
                    "crm #2: COMPLETED, received by {recipient} (1 file(s), 3 bytes) (reconciled)"
                ),
            ]
        );
        store.chain_audit().await.unwrap();
        let details: Vec<String> = sqlx::query_scalar(
            "SELECT detail FROM audit_log WHERE request_id = 'r1' AND event_type = $1 \
             ORDER BY seq",
        )
        .bind(updated)
        .fetch_all(&store.db.pool)
        .await
        .unwrap();
        let hashed = |t: &str| audit_text(b"test key", t);
        assert_eq!(
            details,
            [
                format!("accounting #2: RETAINED, retained under {}", hashed(basis)),
                format!(
                    "crm #2: COMPLETED, received by {} (1 file(s), 3 bytes) (reconciled)",
                    hashed(recipient)
                ),
            ]
        );
        assert!(
            details.iter().all(|d| !d.contains("jane.doe")),
            "{details:?}"
        );
    }

    async fn store_at(url: &str) -> Store {
        let db = dsrelay_runtime::store::Db::connect(url).await.unwrap();
        db.migrate(
            &super::super::SQLITE_MIGRATIONS,
            &super::super::POSTGRES_MIGRATIONS,
        )
        .await
        .unwrap();
        Store::new(db, b"test key")
    }

    /// The recipient the requests of [`a_receipt_from_another_recipient_is_left_out`] name.
    const RECIPIENT: &str = "new-bookkeeper";

    /// A processor's answers (to Deliver, and to status checks) report a TRANSFER task
    /// COMPLETED, and a contract end's task returned, with a receipt from a recipient the
    /// request does not name: left out, as Acknowledge refuses them, so the task stays where
    /// it was and the request is not COMPLETED; with the request's own recipient they are
    /// applied. A request forgotten with its body no longer names one: its receipts are
    /// taken. Before, the store checked the name nowhere and folded the request COMPLETED
    /// with `evil-recipient` shown as the one holding the data.
    async fn a_receipt_from_another_recipient_is_left_out(store: Store) {
        use dsrelay_proto::v1::{ContractEndChoice, Evidence};
        let new = |id: &str, kind: RequestKind, body: Vec<u8>| super::super::NewRequest {
            id: id.into(),
            partner: "crm".into(),
            idempotency_key: format!("key-{id}"),
            body_hash: format!("hash-{id}"),
            body,
            identity_hashes: "[\"h\"]".into(),
            kind: kind as i32,
            received_at: 0,
            due_at: 1_000_000,
            trace_id: "0".repeat(32),
            traceparent: None,
            processors: vec!["p1".into()],
        };
        let terms = super::super::NewContract {
            choice: ContractEndChoice::ReturnThenDelete as i32,
            effective_at: 0,
            grace_ends_at: 0,
            transfer_recipient: RECIPIENT.into(),
        };
        let transfer = |id: &str| {
            (
                new(id, RequestKind::Transfer, transfer_body(RECIPIENT)),
                None,
            )
        };
        let contract = (new("c1", RequestKind::ContractEnd, Vec::new()), Some(terms));
        let intaken = [transfer("t1"), transfer("t2"), transfer("t3"), contract];
        store.insert_batch(&intaken).await.unwrap();
        let report = |id: &str, sequence: u64, state: TaskState, recipient: &str| TaskStatus {
            processor: "p1".into(),
            subprocessor: "crm".into(),
            state: state as i32,
            sequence,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(TransferReceipt {
                    request_id: id.into(),
                    subprocessor: "crm".into(),
                    manifest_sha256: "ab".repeat(32),
                    bytes: 3,
                    files: 1,
                    recipient: recipient.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let completed = |id: &str, sequence, recipient: &str| {
            report(id, sequence, TaskState::Completed, recipient)
        };
        let jobs = store
            .claim_deliveries(3_000_000, 100, 60_000)
            .await
            .unwrap();
        let answer = |id: &str, tasks: Vec<TaskStatus>| {
            let job = jobs.iter().find(|j| j.request_id == id).unwrap().clone();
            let store = store.clone();
            async move { assert!(store.delivery_succeeded(&job, &tasks, 1_000).await.unwrap()) }
        };
        let state = |id: &'static str| {
            let store = store.clone();
            async move { store.request(id).await.unwrap().unwrap().state }
        };
        let task = |id: &'static str| {
            let store = store.clone();
            async move {
                let tasks = store.tasks(id).await.unwrap();
                assert_eq!(tasks.len(), 1, "{tasks:?}");
                let t = tasks.into_iter().next().unwrap();
                let shown = (t.evidence.as_ref())
                    .and_then(|e| e.transfer_receipt.as_ref())
                    .map(|r| r.recipient.clone());
                (TaskState::try_from(t.state).unwrap(), t.sequence, shown)
            }
        };
        let pending = (TaskState::Pending, 0, None);

        // The Deliver answer's report is left out; the task first heard of there is kept open.
        answer("t1", vec![completed("t1", 2, "evil-recipient")]).await;
        assert_eq!(task("t1").await, pending);
        assert_ne!(state("t1").await, RequestState::Completed);
        // So is a status check's.
        let reported = [completed("t1", 3, "evil-recipient")];
        store
            .reconcile("t1", "p1", &reported, 2_000, 60_000)
            .await
            .unwrap();
        assert_eq!(task("t1").await, pending);
        assert_ne!(state("t1").await, RequestState::Completed);
        // The same report naming the request's recipient is applied, on either path.
        let reported = [completed("t1", 3, RECIPIENT)];
        store
            .reconcile("t1", "p1", &reported, 3_000, 60_000)
            .await
            .unwrap();
        let done = |sequence| (TaskState::Completed, sequence, Some(RECIPIENT.to_string()));
        assert_eq!(task("t1").await, done(3));
        assert_eq!(state("t1").await, RequestState::Completed);
        answer("t2", vec![completed("t2", 2, RECIPIENT)]).await;
        assert_eq!(task("t2").await, done(2));
        assert_eq!(state("t2").await, RequestState::Completed);

        // Forgotten with its body, the request no longer names its recipient: taken.
        answer("t3", Vec::new()).await;
        sqlx::query("UPDATE requests SET body = NULL WHERE id = 't3'")
            .execute(&store.db.pool)
            .await
            .unwrap();
        let reported = [completed("t3", 2, "another-recipient")];
        store
            .reconcile("t3", "p1", &reported, 4_000, 60_000)
            .await
            .unwrap();
        let shown = Some("another-recipient".to_string());
        assert_eq!(task("t3").await, (TaskState::Completed, 2, shown));

        // A contract end's receipt must name its terms' recipient.
        let returned =
            |sequence, recipient: &str| report("c1", sequence, TaskState::InProgress, recipient);
        answer("c1", vec![returned(2, "evil-recipient")]).await;
        assert_eq!(task("c1").await, pending);
        let reported = [returned(3, RECIPIENT)];
        store
            .reconcile("c1", "p1", &reported, 5_000, 60_000)
            .await
            .unwrap();
        let shown = Some(RECIPIENT.to_string());
        assert_eq!(task("c1").await, (TaskState::InProgress, 3, shown));
    }

    /// With the recipient's key known, a processor's answer whose receipt the recipient did
    /// not sign is left out (the task stays where it was), as Acknowledge refuses it; the
    /// signed one is applied. Before, the store took it on the processor's word.
    async fn an_unsigned_receipt_is_left_out(store: Store) {
        use dsrelay_proto::v1::Evidence;
        use dsrelay_runtime::signing::{KeyRing, SigningKey};
        let key = SigningKey::generate();
        let ring = KeyRing::new(key.public_key(), Vec::new()).unwrap();
        let store = store.with_receipt_keys([(RECIPIENT.to_string(), Some(ring))].into());
        let request = transfer_request("t1", RECIPIENT);
        store.insert_batch(&[(request, None)]).await.unwrap();
        let unsigned = TransferReceipt {
            request_id: "t1".into(),
            subprocessor: "crm".into(),
            manifest_sha256: "ab".repeat(32),
            bytes: 3,
            files: 1,
            recipient: RECIPIENT.into(),
            ..Default::default()
        };
        let completed = |sequence: u64, r: TransferReceipt| TaskStatus {
            processor: "p1".into(),
            subprocessor: "crm".into(),
            state: TaskState::Completed as i32,
            sequence,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(r),
                ..Default::default()
            }),
            ..Default::default()
        };
        let jobs = store
            .claim_deliveries(3_000_000, 100, 60_000)
            .await
            .unwrap();
        let tasks = [completed(2, unsigned.clone())];
        assert!(store
            .delivery_succeeded(&jobs[0], &tasks, 1_000)
            .await
            .unwrap());
        let state = || async { store.tasks("t1").await.unwrap()[0].state };
        assert_eq!(state().await, TaskState::Pending as i32);
        let signed = dsrelay_runtime::transfer_receipt::sign(unsigned, &key).unwrap();
        let reported = [completed(3, signed.clone())];
        store
            .reconcile("t1", "p1", &reported, 2_000, 60_000)
            .await
            .unwrap();
        let tasks = store.tasks("t1").await.unwrap();
        assert_eq!(tasks[0].state, TaskState::Completed as i32, "{tasks:?}");
        let shown = tasks[0]
            .evidence
            .as_ref()
            .unwrap()
            .transfer_receipt
            .as_ref();
        assert_eq!(shown, Some(&signed));
    }

    /// A recipient taken out of `[[recipients]]` (a leaked key, a contract ended) after the
    /// request named it: a processor's answer carrying its receipt, unsigned since nothing
    /// here holds its key, is left out, as Acknowledge refuses it; listed again without a
    /// key, the same answer is applied. Before, the receipt was taken unsigned.
    async fn a_receipt_of_an_unlisted_recipient_is_left_out(store: Store) {
        use dsrelay_proto::v1::Evidence;
        let unlisted = store
            .clone()
            .with_receipt_keys([("someone-else".to_string(), None)].into());
        let request = transfer_request("t1", RECIPIENT);
        unlisted.insert_batch(&[(request, None)]).await.unwrap();
        let completed = |sequence: u64| TaskStatus {
            processor: "p1".into(),
            subprocessor: "crm".into(),
            state: TaskState::Completed as i32,
            sequence,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(TransferReceipt {
                    request_id: "t1".into(),
                    subprocessor: "crm".into(),
                    manifest_sha256: "ab".repeat(32),
                    bytes: 3,
                    files: 1,
                    recipient: RECIPIENT.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let jobs = unlisted
            .claim_deliveries(3_000_000, 100, 60_000)
            .await
            .unwrap();
        assert!(unlisted
            .delivery_succeeded(&jobs[0], &[completed(2)], 1_000)
            .await
            .unwrap());
        let state = || async { store.tasks("t1").await.unwrap()[0].state };
        assert_eq!(state().await, TaskState::Pending as i32);
        unlisted
            .reconcile("t1", "p1", &[completed(3)], 2_000, 60_000)
            .await
            .unwrap();
        assert_eq!(state().await, TaskState::Pending as i32);

        let listed = store.with_receipt_keys([(RECIPIENT.to_string(), None)].into());
        listed
            .reconcile("t1", "p1", &[completed(4)], 3_000, 60_000)
            .await
            .unwrap();
        assert_eq!(
            listed.tasks("t1").await.unwrap()[0].state,
            TaskState::Completed as i32
        );
    }

    /// The identity [`a_receipt_from_another_sender_is_left_out`] configures for `p1`.
    const P1: &str = "spiffe://example.org/processor/p1";

    /// A processor's answers (to Deliver, and to status checks) carrying a receipt that names
    /// another sender than the processor's certificate identity (a receipt another processor's
    /// part got for the same request and subprocessor) are left out, as Acknowledge refuses
    /// them, so the task stays where it was; one naming the processor's own identity, or no
    /// sender, is applied. Before, the store took a receipt whatever sender it named.
    async fn a_receipt_from_another_sender_is_left_out(store: Store) {
        use dsrelay_proto::v1::Evidence;
        let store = store.with_processor_identities([("p1".to_string(), P1.to_string())].into());
        let intaken = [
            (transfer_request("t1", RECIPIENT), None),
            (transfer_request("t2", RECIPIENT), None),
        ];
        store.insert_batch(&intaken).await.unwrap();
        let completed = |id: &str, sequence: u64, sender: &str| TaskStatus {
            processor: "p1".into(),
            subprocessor: "crm".into(),
            state: TaskState::Completed as i32,
            sequence,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(TransferReceipt {
                    request_id: id.into(),
                    subprocessor: "crm".into(),
                    manifest_sha256: "ab".repeat(32),
                    bytes: 3,
                    files: 1,
                    recipient: RECIPIENT.into(),
                    sender: sender.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let jobs = store
            .claim_deliveries(3_000_000, 100, 60_000)
            .await
            .unwrap();
        let job = |id: &str| jobs.iter().find(|j| j.request_id == id).unwrap().clone();
        let task = |id: &'static str| {
            let store = store.clone();
            async move {
                let tasks = store.tasks(id).await.unwrap();
                assert_eq!(tasks.len(), 1, "{tasks:?}");
                let t = tasks.into_iter().next().unwrap();
                (TaskState::try_from(t.state).unwrap(), t.sequence)
            }
        };
        let other = "spiffe://example.org/processor/p2";

        // The Deliver answer's report is left out; the task first heard of there is kept open.
        let tasks = [completed("t1", 2, other)];
        assert!(store
            .delivery_succeeded(&job("t1"), &tasks, 1_000)
            .await
            .unwrap());
        assert_eq!(task("t1").await, (TaskState::Pending, 0));
        // So is a status check's.
        let reported = [completed("t1", 3, other)];
        store
            .reconcile("t1", "p1", &reported, 2_000, 60_000)
            .await
            .unwrap();
        assert_eq!(task("t1").await, (TaskState::Pending, 0));
        assert_ne!(
            store.request("t1").await.unwrap().unwrap().state,
            RequestState::Completed
        );
        // Naming the processor's own identity, the same report is applied.
        let reported = [completed("t1", 4, P1)];
        store
            .reconcile("t1", "p1", &reported, 3_000, 60_000)
            .await
            .unwrap();
        assert_eq!(task("t1").await, (TaskState::Completed, 4));
        // And naming no sender (a recipient signing the version 1 body), on a Deliver answer.
        let tasks = [completed("t2", 2, "")];
        assert!(store
            .delivery_succeeded(&job("t2"), &tasks, 4_000)
            .await
            .unwrap());
        assert_eq!(task("t2").await, (TaskState::Completed, 2));
    }

    #[tokio::test]
    async fn a_receipt_from_another_sender_is_left_out_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_receipt_from_another_sender_is_left_out(store_at(&url).await).await;
    }

    #[tokio::test]
    async fn a_receipt_from_another_sender_is_left_out_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            a_receipt_from_another_sender_is_left_out(store_at(&url).await).await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_receipt_of_an_unlisted_recipient_is_left_out_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_receipt_of_an_unlisted_recipient_is_left_out(store_at(&url).await).await;
    }

    #[tokio::test]
    async fn a_receipt_of_an_unlisted_recipient_is_left_out_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            a_receipt_of_an_unlisted_recipient_is_left_out(store_at(&url).await).await;
        })
        .await;
    }

    #[tokio::test]
    async fn an_unsigned_receipt_is_left_out_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        an_unsigned_receipt_is_left_out(store_at(&url).await).await;
    }

    #[tokio::test]
    async fn an_unsigned_receipt_is_left_out_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            an_unsigned_receipt_is_left_out(store_at(&url).await).await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_receipt_from_another_recipient_is_left_out_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_receipt_from_another_recipient_is_left_out(store_at(&url).await).await;
    }

    #[tokio::test]
    async fn a_receipt_from_another_recipient_is_left_out_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            a_receipt_from_another_recipient_is_left_out(store_at(&url).await).await;
        })
        .await;
    }
}
