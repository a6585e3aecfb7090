//! The acknowledgement outbox: every state change of a task queues one acknowledgement in
//! the same transaction, and the sender claims, sends and retires them. One the registry
//! rejects is retried with backoff (the registry may be fixed) and, after
//! `acks.max_rejections` rejections, dead-lettered: kept, never sent again until an operator
//! requeues it. A dead letter does not stop its request from being forgotten; forgetting
//! removes its free text (see `store::forget`).
//!
//! The processor learns that the registry holds a dead letter's task at the letter's sequence
//! or later one of two ways: GetStatus reports the task there ([`Store::status_answered`]),
//! or the registry accepts a later acknowledgement of the same task ([`Store::acks_sent`]).
//! What happens to the letter then depends on what it carries:
//!
//! - Nothing the registry cannot read elsewhere: it is marked superseded. It stays listed but
//!   no longer counts as needing action.
//! - A deletion certificate: it is never superseded, since GetStatus's task status has no
//!   place for one and a later acknowledgement carries its own, so the registry holds its
//!   task but not this certificate. Instead the processor requeues it once by itself (fresh
//!   count, audited as a requeue by the actor `processor`, `auto_requeued_at` set): the
//!   registry that rejected it now knows its task. Dead-lettered again, it waits for an
//!   operator; the processor never requeues the same row a second time, so this cannot loop.
//! - A payload this build cannot decode: left as it is, for an operator (this build can
//!   neither tell what it carries nor send it).
//!
//! The other payloads an acknowledgement adds to its state (the evidence with its transfer
//! receipt, a contract end's progress) are in GetStatus's answer too.

use anyhow::Result;
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{Acknowledgement, ProcessorAuditEvent};
use dsrelay_runtime::store::placeholders;
use sqlx::AnyConnection;

use super::audit::{self, AuditTx, NewEntry, Record};
use super::rows::{AckJob, AckRecord, TaskKey};
use super::Store;
use sqlx::{FromRow, Row};

/// An acknowledgement to queue: `ack`, of `key`'s change number `sequence`, due at `at`.
pub(super) struct NewAck {
    pub(super) key: TaskKey,
    pub(super) sequence: i64,
    pub(super) ack: Acknowledgement,
    pub(super) at: i64,
}

/// Queues `acks` inside the transaction that makes their changes: one multi-row INSERT
/// per [`Backend::rows_per_statement`](dsrelay_runtime::store::Backend::rows_per_statement)
/// rows, in order, so the outbox ids follow the changes. With `leased_ms`, each row is
/// written already leased for that long (on the database's clock, as a claim leases) and
/// returned as a job to hand to this process's sender ([`Handoff`]); without, the rows wait
/// for a claim and nothing is returned.
pub(super) async fn queue_all(
    tx: &mut AnyConnection,
    acks: &[NewAck],
    leased_ms: Option<i64>,
) -> Result<Vec<AckJob>> {
    let backend = dsrelay_runtime::store::Backend::of_connection(tx);
    let rows = backend.rows_per_statement(6);
    // A leased row's lease column and value, and what comes back to hand over.
    let (lease_column, lease, returning) = match leased_ms {
        Some(ms) => (
            ", lease_until, lease_owner",
            format!(
                ", {} + {ms}, {}",
                super::db_now_in(tx),
                backend.random_token()
            ),
            " RETURNING id, controller, attempts, payload, lease_owner",
        ),
        None => ("", String::new(), ""),
    };
    let mut jobs = Vec::new();
    for chunk in acks.chunks(rows) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| {
                let params: Vec<String> =
                    (6 * i + 1..=6 * i + 6).map(|n| format!("${n}")).collect();
                format!("({}{lease})", params.join(", "))
            })
            .collect();
        let sql = format!(
            "INSERT INTO ack_outbox (controller, request_id, subprocessor, sequence, payload, \
             next_attempt_at{lease_column}) VALUES {}{returning}",
            rows.join(", "),
        );
        let sql = backend.numbered(&sql);
        let mut q = sqlx::query(&sql);
        for a in chunk {
            q = q
                .bind(&a.key.controller)
                .bind(&a.key.request_id)
                .bind(&a.key.subprocessor)
                .bind(a.sequence)
                .bind(a.ack.encode_to_vec())
                .bind(a.at);
        }
        if leased_ms.is_none() {
            q.execute(&mut *tx).await?;
            continue;
        }
        // The rows as a claim returns them (the payload decodes: it was encoded just now).
        for row in q.fetch_all(&mut *tx).await? {
            jobs.push(AckJob::try_from(AckRecord::from_row(&row)?)?);
        }
    }
    jobs.sort_by_key(|j| j.id);
    Ok(jobs)
}

/// Most acknowledgements waiting in a [`Handoff`] before further ones are left to claims.
const MAX_HANDED: usize = 2_000;

/// Acknowledgements the runner's steps queued already leased to this process, for its
/// sender to send at once, without a claim (a statement and a commit) between the step's
/// commit and the call to the registry. A row handed here is an outbox row like any other:
/// should this process stop before sending it, any sender claims it once its lease ends.
#[derive(Debug)]
pub(super) struct Handoff {
    /// How long a handed row stays leased (`acks.lease_ms`).
    lease_ms: i64,
    jobs: std::sync::Mutex<std::collections::VecDeque<AckJob>>,
}

impl Handoff {
    pub(super) fn new(lease_ms: i64) -> Self {
        Self {
            lease_ms,
            jobs: std::sync::Mutex::default(),
        }
    }

    /// The lease to write a transaction's acknowledgements with, or `None` (left to a claim)
    /// while the sender has [`MAX_HANDED`] or more waiting: a sender held up by a registry
    /// that does not answer keeps the rest in the outbox, not in memory.
    pub(super) fn lease_for_next(&self) -> Option<i64> {
        let waiting = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        (waiting < MAX_HANDED).then_some(self.lease_ms)
    }

    /// Adds the jobs of a committed transaction.
    pub(super) fn push(&self, jobs: Vec<AckJob>) {
        if jobs.is_empty() {
            return;
        }
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(jobs);
    }

    /// Up to `limit` jobs, oldest first, and whether more are left.
    pub(super) fn take(&self, limit: usize) -> (Vec<AckJob>, bool) {
        let mut jobs = self
            .jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = limit.min(jobs.len());
        let taken: Vec<AckJob> = jobs.drain(..n).collect();
        (taken, !jobs.is_empty())
    }
}

/// Outbox ids per statement of [`Store::acks_sent`] and [`Store::release_acks`]: a batch of
/// the sender's (`acks.batch_size`) is one statement, well under both backends' limits on
/// parameters.
const IDS_PER_STATEMENT: usize = 1000;

impl Store {
    /// Reserves up to `limit` queued acknowledgements due at `now` (the processor's clock)
    /// for `lease_ms`, oldest first, in one statement, each under a new lease token of its
    /// own ([`AckJob::lease_owner`]). The lease is set and compared on the database's clock
    /// ([`Backend::now_ms`](dsrelay_runtime::store::Backend::now_ms)), so replicas agree on
    /// when it ends whatever their own clocks say.
    pub async fn claim_acks(&self, now: i64, limit: i64, lease_ms: i64) -> Result<Vec<AckJob>> {
        let db_now = self.db.backend.now_ms();
        // One statement whatever `limit` is (see dsrelay_runtime::store's "Claims").
        let mut rows: Vec<AckRecord> = sqlx::query_as(&format!(
            "WITH picked AS MATERIALIZED (SELECT id FROM ack_outbox WHERE sent_at IS NULL \
             AND dead_lettered_at IS NULL AND next_attempt_at <= $1 \
             AND lease_until <= {db_now} ORDER BY id LIMIT $2{lock}) \
             UPDATE ack_outbox SET lease_until = {db_now} + $3, lease_owner = {token} \
             WHERE id IN (SELECT id FROM picked) \
             RETURNING id, controller, attempts, payload, lease_owner",
            lock = self.db.skip_locked(),
            token = self.db.backend.random_token(),
        ))
        .bind(now)
        .bind(limit)
        .bind(lease_ms)
        .fetch_all(&self.db.claimer)
        .await?;
        rows.sort_by_key(|r| r.id);
        let mut jobs = Vec::with_capacity(rows.len());
        for r in rows {
            let (id, owner) = (r.id, r.lease_owner.clone().unwrap_or_default());
            match AckJob::try_from(r) {
                Ok(job) => jobs.push(job),
                // A payload this build cannot read (written by a newer one, or damaged) can
                // never be sent: failing the whole claim would stop every acknowledgement
                // behind it, so it is dead-lettered at once, for an operator to see.
                Err(e) => {
                    let why = format!("the stored acknowledgement does not decode: {e}");
                    tracing::error!(outbox_id = id, error = %why, "acknowledgement dead-lettered");
                    self.ack_rejected((id, &owner), now, &why, now, 1).await?;
                }
            }
        }
        Ok(jobs)
    }

    /// Marks acknowledgements as received by the registry, each with its audit entry (an
    /// acknowledgement marked before is left as it is, and gets no second entry): one UPDATE
    /// for the whole batch, then its entries appended together, in the order of `ids`. In the
    /// same transaction, every dead letter of their tasks (same controller, request and
    /// subprocessor) at a lower sequence, parked, not superseded and never requeued by the
    /// processor, is settled at `now` (see the module's doc): marked superseded, or, carrying
    /// a deletion certificate, requeued, its entry after the acceptances'. One more read per
    /// batch, and a write only when it finds such a letter.
    pub async fn acks_sent(&self, ids: &[i64], now: i64) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_audited().await?;
        let mut sent: Vec<(i64, String, String, String, i64)> = Vec::with_capacity(ids.len());
        // Entries of the dead letters requeued because of these acceptances, written after
        // the acceptances' own.
        let mut requeued = Vec::new();
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE ack_outbox SET sent_at = $1, lease_until = 0 WHERE id IN ({}) \
                 AND sent_at IS NULL RETURNING id, controller, request_id, subprocessor, sequence",
                placeholders(2, chunk.len())
            );
            let sql = self.db.backend.numbered(&sql);
            let mut q = sqlx::query_as(&sql).bind(now);
            for id in chunk {
                q = q.bind(id);
            }
            sent.extend(q.fetch_all(&mut *tx).await?);
            // The registry now holds these acknowledgements' states, so each parked, unmarked
            // dead letter of their tasks at an earlier sequence is settled.
            let sql = held_after_sent(chunk.len());
            let sql = self.db.backend.numbered(&sql);
            let mut q = sqlx::query_as(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            let held: Vec<Held> = q.fetch_all(&mut *tx).await?;
            let (_, entries) = settle(
                &mut tx,
                &held,
                now,
                "the registry accepted a later change of its task",
            )
            .await?;
            requeued.extend(entries);
        }
        let position = |id: i64| ids.iter().position(|i| *i == id);
        sent.sort_by_key(|(id, ..)| position(*id));
        let mut entries: Vec<NewEntry> = sent
            .into_iter()
            .map(|(_, controller, request_id, subprocessor, sequence)| {
                audit::entry(
                    ProcessorAuditEvent::AckAccepted,
                    now,
                    Record {
                        controller: &controller,
                        request_id: &request_id,
                        actor: "",
                        detail: format!(
                            "subprocessor {subprocessor}, change {sequence} accepted by the registry"
                        ),
                    },
                )
            })
            .collect();
        entries.extend(requeued);
        audit::append_all(&mut tx, entries).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends the lease of claimed acknowledgements not yet answered (the service is
    /// stopping), so they are sent again at once, by another replica or the next start:
    /// each `(id, lease token)` only while its token still holds the row.
    pub async fn release_acks<S: AsRef<str>>(&self, claims: &[(i64, S)]) -> Result<()> {
        for chunk in claims.chunks(IDS_PER_STATEMENT / 2) {
            let pairs: Vec<String> = (0..chunk.len())
                .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
                .collect();
            let sql = format!(
                "UPDATE ack_outbox SET lease_until = 0, lease_owner = NULL \
                 WHERE (id, lease_owner) IN (VALUES {}) AND sent_at IS NULL",
                pairs.join(", ")
            );
            let sql = self.db.backend.numbered(&sql);
            let mut q = sqlx::query(&sql);
            for (id, owner) in chunk {
                q = q.bind(id).bind(owner.as_ref());
            }
            q.execute(&self.db.pool).await?;
        }
        Ok(())
    }

    /// How many acknowledgements wait to be sent (dead letters not counted).
    pub async fn unsent_ack_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM ack_outbox \
             WHERE sent_at IS NULL AND dead_lettered_at IS NULL",
        )
        .fetch_one(&self.db.reader)
        .await?)
    }

    /// Records a failed send of `(id, lease token, next attempt at)`; each acknowledgement
    /// is retried at its own backoff. One another claim took since (this sender's lease ran
    /// out) is left to that claim's sender.
    pub async fn acks_failed(&self, jobs: &[(i64, &str, i64)], error: &str) -> Result<()> {
        let mut tx = self.db.pool.begin().await?;
        for (id, owner, next_at) in jobs {
            sqlx::query(
                "UPDATE ack_outbox SET attempts = attempts + 1, next_attempt_at = $1, \
                 lease_until = 0, lease_owner = NULL, last_error = $2 \
                 WHERE id = $3 AND lease_owner = $4 AND sent_at IS NULL",
            )
            .bind(next_at)
            .bind(error)
            .bind(id)
            .bind(*owner)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records the registry's rejection of acknowledgement `id` sent under the lease token
    /// `owner`: retried at `next_at`, or dead-lettered now when this is rejection number
    /// `max_rejections`. Returns whether it was dead-lettered by this call: a rejection of
    /// one already dead-lettered, already accepted by the registry, or taken by another
    /// claim since (this sender's lease ran out, and the new holder's answer is the one
    /// that counts) changes nothing and records no entry.
    pub async fn ack_rejected(
        &self,
        (id, owner): (i64, &str),
        next_at: i64,
        rejection: &str,
        now: i64,
        max_rejections: u32,
    ) -> Result<bool> {
        let mut tx = self.begin_audited().await?;
        let row = sqlx::query(
            "UPDATE ack_outbox SET attempts = attempts + 1, rejections = rejections + 1, \
             next_attempt_at = $1, lease_until = 0, lease_owner = NULL, last_error = $2, \
             rejected_at = $3, \
             dead_lettered_at = CASE WHEN rejections + 1 >= $4 THEN $3 ELSE NULL END \
             WHERE id = $5 AND lease_owner = $6 AND dead_lettered_at IS NULL \
             AND sent_at IS NULL \
             RETURNING dead_lettered_at, controller, request_id, subprocessor, \
             sequence, CAST(rejections AS BIGINT) AS rejections",
        )
        .bind(next_at)
        .bind(rejection)
        .bind(now)
        .bind(i64::from(max_rejections))
        .bind(id)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = row else {
            tx.rollback().await?;
            return Ok(false);
        };
        if r.try_get::<Option<i64>, _>("dead_lettered_at")?.is_none() {
            tx.commit().await?;
            return Ok(false);
        }
        let (controller, request_id): (String, String) =
            (r.try_get("controller")?, r.try_get("request_id")?);
        let detail = format!(
            "subprocessor {}, change {} dead-lettered after {} rejections, last {}",
            r.try_get::<String, _>("subprocessor")?,
            r.try_get::<i64, _>("sequence")?,
            r.try_get::<i64, _>("rejections")?,
            tx.text(rejection)
        );
        let record = Record {
            controller: &controller,
            request_id: &request_id,
            actor: "",
            detail,
        };
        audit::append(&mut tx, ProcessorAuditEvent::AckDeadLettered, now, record).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records that GetStatus answered `controller`'s request `request_id` at `now` with
    /// `reported`, each task's (subprocessor, sequence): every dead letter of those tasks
    /// parked by then whose sequence is at or below the one reported for its task, not
    /// superseded and never requeued by the processor, is settled with that answer (see the
    /// module's doc): marked superseded, or, carrying a deletion certificate, requeued. Dead
    /// letters are few, so the answer's usual case (none for the request) is one read, and
    /// takes no write lock.
    pub async fn status_answered(
        &self,
        controller: &str,
        request_id: &str,
        reported: &[(&str, i64)],
        now: i64,
    ) -> Result<Settled> {
        let parked: Vec<(i64, i64, Vec<u8>, String, i64)> = sqlx::query_as(PARKED_OF_REQUEST)
            .bind(controller)
            .bind(request_id)
            .fetch_all(&self.db.reader)
            .await?;
        let held: Vec<Held> = parked
            .into_iter()
            .filter(|(.., subprocessor, sequence)| {
                reported
                    .iter()
                    .any(|(s, seq)| *s == subprocessor.as_str() && seq >= sequence)
            })
            .map(|(id, parked_at, payload, ..)| (id, parked_at, payload))
            .collect();
        if held.is_empty() {
            return Ok(Settled::default());
        }
        let mut tx = self.begin_audited().await?;
        let (settled, entries) = settle(
            &mut tx,
            &held,
            now,
            "GetStatus reported its task at this change or later",
        )
        .await?;
        audit::append_all(&mut tx, entries).await?;
        tx.commit().await?;
        Ok(settled)
    }

    /// Dead-lettered acknowledgements with an id above `after_id`, oldest first, at most
    /// `limit`, superseded ones included (marked), each saying whether it carries a deletion
    /// certificate.
    pub async fn dead_letters(&self, limit: i64, after_id: i64) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, controller, request_id, subprocessor, sequence, \
             CAST(rejections AS BIGINT) AS rejections, \
             last_error, rejected_at, dead_lettered_at, superseded_at, auto_requeued_at, \
             payload FROM ack_outbox \
             WHERE dead_lettered_at IS NOT NULL AND sent_at IS NULL AND id > $2 \
             ORDER BY id LIMIT $1",
        )
        .bind(limit)
        .bind(after_id)
        .fetch_all(&self.db.reader)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    id: r.try_get("id")?,
                    controller: r.try_get("controller")?,
                    request_id: r.try_get("request_id")?,
                    subprocessor: r.try_get("subprocessor")?,
                    sequence: r.try_get("sequence")?,
                    rejections: r.try_get("rejections")?,
                    last_rejection: r
                        .try_get::<Option<String>, _>("last_error")?
                        .unwrap_or_default(),
                    rejected_at: r.try_get::<Option<i64>, _>("rejected_at")?.unwrap_or(0),
                    dead_lettered_at: r
                        .try_get::<Option<i64>, _>("dead_lettered_at")?
                        .unwrap_or(0),
                    superseded_at: r.try_get("superseded_at")?,
                    carries_certificate: carries_certificate(&r.try_get::<Vec<u8>, _>("payload")?)
                        == Some(true),
                    auto_requeued_at: r.try_get("auto_requeued_at")?,
                })
            })
            .collect()
    }

    /// How many dead-lettered acknowledgements still need an operator: superseded ones
    /// ([`DeadLetter::superseded_at`]) are not counted. One carrying a deletion certificate is
    /// never superseded, so it counts until it is sent.
    pub async fn dead_letter_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(PARKED_COUNT)
            .fetch_one(&self.db.reader)
            .await?)
    }

    /// Clears the superseded mark of every parked, unsent dead letter carrying a deletion
    /// certificate, and returns how many it cleared. The build that brought the mark
    /// (migration 0029) set it on every dead letter GetStatus reported past, certified ones
    /// too; this one never does (see the module's doc), and skips marked rows when settling
    /// and counting, so such a letter would otherwise never be requeued by the processor nor
    /// counted. Cleared, it counts again and the next settle of its task requeues it once.
    /// SQL cannot read the payload, so this decodes each superseded letter's: run it once
    /// when the service starts, after migrating. A payload that does not decode is left
    /// marked (nothing says what it carries). Each row is matched again under the write by
    /// its id and the time it was parked, so one requeued or parked again since is left as
    /// it now is.
    pub async fn unmark_certified_dead_letters(&self) -> Result<u64> {
        use futures::TryStreamExt;
        let mut certified: Vec<(i64, i64)> = Vec::new();
        // Streamed, since superseded letters are kept and only grow: only the ids of the
        // certified ones are held.
        let mut rows = sqlx::query_as::<_, Held>(
            "SELECT id, dead_lettered_at, payload FROM ack_outbox \
             WHERE dead_lettered_at IS NOT NULL AND sent_at IS NULL \
             AND superseded_at IS NOT NULL",
        )
        .fetch(&self.db.reader);
        while let Some((id, parked_at, payload)) = rows.try_next().await? {
            if carries_certificate(&payload) == Some(true) {
                certified.push((id, parked_at));
            }
        }
        drop(rows);
        if certified.is_empty() {
            return Ok(0);
        }
        certified.sort_unstable();
        let mut tx = self.db.pool.begin().await?;
        let mut cleared = 0;
        for chunk in certified.chunks(LETTERS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE ack_outbox SET superseded_at = NULL \
                 WHERE (id, dead_lettered_at) IN (VALUES {}) AND sent_at IS NULL \
                 AND superseded_at IS NOT NULL",
                pairs(1, chunk.len())
            );
            let sql = self.db.backend.numbered(&sql);
            let mut q = sqlx::query(&sql);
            for (id, parked_at) in chunk {
                q = q.bind(id).bind(parked_at);
            }
            cleared += q.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        if cleared > 0 {
            tracing::info!(
                cleared,
                "superseded marks cleared on dead letters carrying a deletion certificate"
            );
        }
        Ok(cleared)
    }

    /// Puts dead-lettered acknowledgement `id` back in the queue, to be sent at once with a
    /// fresh count of rejections, in the name of the operator `by`. Returns false when no
    /// such dead letter exists. A superseded one is requeued too (sending it again is
    /// harmless); its mark goes, so parked again it counts until it is superseded again. A
    /// mark that the processor requeued it by itself stays: it never does so twice.
    pub async fn requeue_dead_letter(&self, id: i64, by: &str, now: i64) -> Result<bool> {
        let mut tx = self.begin_audited().await?;
        let row: Option<(String, String, String, i64)> = sqlx::query_as(
            "UPDATE ack_outbox SET dead_lettered_at = NULL, rejections = 0, attempts = 0, \
             next_attempt_at = $1, lease_until = 0, superseded_at = NULL \
             WHERE id = $2 AND dead_lettered_at IS NOT NULL AND sent_at IS NULL \
             RETURNING controller, request_id, subprocessor, sequence",
        )
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((controller, request_id, subprocessor, sequence)) = row else {
            tx.rollback().await?;
            return Ok(false);
        };
        let record = Record {
            controller: &controller,
            request_id: &request_id,
            actor: by,
            detail: format!("subprocessor {subprocessor}, change {sequence} requeued"),
        };
        audit::append(&mut tx, ProcessorAuditEvent::AckRequeued, now, record).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// An acknowledgement the registry rejected `acks.max_rejections` times, parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Outbox row id: what an operator names to requeue it.
    pub id: i64,
    /// The controller it is for.
    pub controller: String,
    /// The request.
    pub request_id: String,
    /// The subprocessor of the task.
    pub subprocessor: String,
    /// The task's change number it reports.
    pub sequence: i64,
    /// Rejections so far.
    pub rejections: i64,
    /// The registry's last answer about it.
    pub last_rejection: String,
    /// When that answer came (ms).
    pub rejected_at: i64,
    /// When it was parked (ms).
    pub dead_lettered_at: i64,
    /// When, after it was parked, the registry came to hold its task at its sequence or later
    /// (ms): GetStatus reported the task there, or the registry accepted a later
    /// acknowledgement of the task, whichever came first. Requeueing it is not needed. `None`
    /// while neither happened, and always for one carrying a deletion certificate.
    pub superseded_at: Option<i64>,
    /// It carries a deletion certificate, which the registry gets only with this
    /// acknowledgement: once the registry is fixed, it must be requeued.
    pub carries_certificate: bool,
    /// When the processor requeued it by itself (ms), the registry having come to hold its
    /// task; it does so at most once per row. `None` while it did not.
    pub auto_requeued_at: Option<i64>,
}

/// What settling dead letters did: see [`Store::status_answered`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Dead letters marked superseded.
    pub superseded: u64,
    /// Dead letters carrying a deletion certificate, put back in the queue by the processor.
    pub requeued: u64,
}

/// A parked acknowledgement whose task the registry holds at its sequence or later: (id,
/// when it was parked, payload).
type Held = (i64, i64, Vec<u8>);

/// The parked, unmarked dead letters, never requeued by the processor, of the tasks of the
/// `n` outbox ids bound from `$1` that the registry accepted, at a lower sequence than the
/// accepted one: (id, when it was parked, payload), in no order ([`settle`] orders what it
/// writes). Run on every batch the sender marks sent, so it must stay driven by
/// `ack_outbox_parked` (migration 0030), which holds only parked, unmarked letters: with
/// none, it reads one empty index page. No `ORDER BY id`: on SQLite that has the planner
/// walk the whole table in id order instead.
fn held_after_sent(n: usize) -> String {
    format!(
        "SELECT id, dead_lettered_at, payload FROM ack_outbox \
         WHERE dead_lettered_at IS NOT NULL AND sent_at IS NULL \
         AND superseded_at IS NULL AND auto_requeued_at IS NULL \
         AND EXISTS (SELECT 1 FROM ack_outbox AS later \
         WHERE later.id IN ({}) AND later.sent_at IS NOT NULL \
         AND later.controller = ack_outbox.controller \
         AND later.request_id = ack_outbox.request_id \
         AND later.subprocessor = ack_outbox.subprocessor \
         AND later.sequence > ack_outbox.sequence)",
        placeholders(1, n)
    )
}

/// The parked, unmarked dead letters, never requeued by the processor, of request `$2` of
/// controller `$1`: (id, when it was parked, payload, subprocessor, sequence), by id. Read
/// through an index (SQLite takes the outbox's key on (controller, request, subprocessor,
/// sequence), PostgreSQL `ack_outbox_parked`), so it never reads the whole table; its
/// sort is of the one request's rows.
const PARKED_OF_REQUEST: &str = "SELECT id, dead_lettered_at, payload, subprocessor, sequence \
     FROM ack_outbox WHERE dead_lettered_at IS NOT NULL AND sent_at IS NULL \
     AND superseded_at IS NULL AND auto_requeued_at IS NULL \
     AND controller = $1 AND request_id = $2 ORDER BY id";

/// How many parked, unmarked dead letters there are: a count of `ack_outbox_parked`.
const PARKED_COUNT: &str = "SELECT CAST(COUNT(*) AS BIGINT) FROM ack_outbox \
     WHERE dead_lettered_at IS NOT NULL AND sent_at IS NULL AND superseded_at IS NULL";

/// `n` pairs of parameters, `($first, $first+1), ...`, for a row-value `IN (VALUES ...)`.
fn pairs(first: usize, n: usize) -> String {
    (0..n)
        .map(|i| format!("(${}, ${})", first + 2 * i, first + 2 * i + 1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether the stored acknowledgement `payload` carries a deletion certificate: the one thing
/// it may bring that the registry has no other way to get. `None` when it does not decode.
fn carries_certificate(payload: &[u8]) -> Option<bool> {
    Acknowledgement::decode(payload)
        .ok()
        .map(|a| a.certificate.is_some())
}

/// Dead letters per statement of [`settle`]: two parameters each.
const LETTERS_PER_STATEMENT: usize = IDS_PER_STATEMENT / 2;

/// Settles at `now`, in `tx`, the dead letters `held` (see the module's doc), `why` saying
/// how the registry came to hold their tasks: those carrying nothing else are marked
/// superseded, those carrying a deletion certificate are requeued with a fresh count and
/// `auto_requeued_at` set, and their entries are returned for the caller to append. Each is
/// matched again under the write by its id and the time it was parked, so one requeued,
/// marked or parked again since it was read is left as it now is.
async fn settle(
    tx: &mut AuditTx,
    held: &[Held],
    now: i64,
    why: &str,
) -> Result<(Settled, Vec<NewEntry>)> {
    let mut supersede = Vec::new();
    let mut requeue = Vec::new();
    for (id, parked_at, payload) in held {
        match carries_certificate(payload) {
            Some(false) => supersede.push((*id, *parked_at)),
            Some(true) => requeue.push((*id, *parked_at)),
            None => {}
        }
    }
    let backend = dsrelay_runtime::store::Backend::of_connection(tx);
    let mut settled = Settled::default();
    for chunk in supersede.chunks(LETTERS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE ack_outbox SET superseded_at = $1 \
             WHERE (id, dead_lettered_at) IN (VALUES {}) AND sent_at IS NULL \
             AND superseded_at IS NULL",
            pairs(2, chunk.len())
        );
        let sql = backend.numbered(&sql);
        let mut q = sqlx::query(&sql).bind(now);
        for (id, parked_at) in chunk {
            q = q.bind(id).bind(parked_at);
        }
        settled.superseded += q.execute(&mut **tx).await?.rows_affected();
    }
    let mut rows: Vec<(i64, String, String, String, i64)> = Vec::new();
    for chunk in requeue.chunks(LETTERS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE ack_outbox SET dead_lettered_at = NULL, rejections = 0, attempts = 0, \
             next_attempt_at = $1, lease_until = 0, superseded_at = NULL, auto_requeued_at = $1 \
             WHERE (id, dead_lettered_at) IN (VALUES {}) AND sent_at IS NULL \
             AND superseded_at IS NULL AND auto_requeued_at IS NULL \
             RETURNING id, controller, request_id, subprocessor, sequence",
            pairs(2, chunk.len())
        );
        let sql = backend.numbered(&sql);
        let mut q = sqlx::query_as(&sql).bind(now);
        for (id, parked_at) in chunk {
            q = q.bind(id).bind(parked_at);
        }
        rows.extend(q.fetch_all(&mut **tx).await?);
    }
    rows.sort_by_key(|(id, ..)| *id);
    settled.requeued = rows.len() as u64;
    let entries = rows
        .into_iter()
        .map(|(_, controller, request_id, subprocessor, sequence)| {
            audit::entry(
                ProcessorAuditEvent::AckRequeued,
                now,
                Record {
                    controller: &controller,
                    request_id: &request_id,
                    actor: "processor",
                    detail: format!(
                        "subprocessor {subprocessor}, change {sequence} requeued: it carries a \
                         deletion certificate and {why}"
                    ),
                },
            )
        })
        .collect();
    Ok((settled, entries))
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{DeliverRequest, ProcessorAuditEvent, RequestKind, TaskState};
    use dsrelay_runtime::store::Db;

    use super::{AckJob, DeadLetter, Handoff, Store, MAX_HANDED};
    use crate::store::{Transition, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    /// A store with request `r-1` of `acme` delivered to `s0` and `s1`, both tasks COMPLETED
    /// (sequence 2), and every acknowledgement queued for them dead-lettered at 5.
    async fn dead_lettered(url: &str) -> Store {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        let req = DeliverRequest {
            request_id: "r-1".into(),
            kind: RequestKind::Erasure as i32,
            ..Default::default()
        };
        let subprocessors = ["s0".to_string(), "s1".to_string()];
        store
            .accept("acme", &req, &subprocessors, None, 1)
            .await
            .expect("accept");
        let done = Transition {
            state: TaskState::Completed,
            ..Default::default()
        };
        for job in store.claim_tasks(2, 10, 60_000).await.expect("claim") {
            let t = &job.task;
            let step = store.transition_leased(
                &t.key,
                t.sequence,
                &job.lease_owner,
                &done,
                3,
                1,
                None,
                false,
            );
            assert_eq!(step.await.expect("step"), Some(2));
        }
        park_all(&store, 5).await;
        store
    }

    /// Claims every acknowledgement due and has the registry reject each once, with
    /// `max_rejections` 1: each is dead-lettered at `now`.
    async fn park_all(store: &Store, now: i64) {
        // The service's store hands its steps' acknowledgements to its sender, leased.
        let (mut acks, _) = store.take_handed_acks(100);
        acks.extend(
            store
                .claim_acks(now, 100, 60_000)
                .await
                .expect("claim acks"),
        );
        assert!(!acks.is_empty());
        for a in acks {
            let rejected = store.ack_rejected(
                (a.id, &a.lease_owner),
                now,
                "INVALID_ARGUMENT: test",
                now,
                1,
            );
            assert!(rejected.await.expect("rejected"));
        }
    }

    /// The dead letters listed, as (subprocessor, sequence, superseded at), in id order.
    async fn listed(store: &Store) -> Vec<(String, i64, Option<i64>)> {
        let letters: Vec<DeadLetter> = store.dead_letters(100, 0).await.expect("list");
        letters
            .into_iter()
            .map(|d| (d.subprocessor, d.sequence, d.superseded_at))
            .collect()
    }

    /// A dead letter counts until GetStatus reports its task at its sequence or later; an
    /// answer at an earlier sequence, about another task, another request or another
    /// controller leaves it as it is. Superseded, it is still listed, with the time of the
    /// answer that superseded it (a later answer does not move it), and its count drops.
    async fn a_status_answer_supersedes_the_dead_letters_it_reports_past(
        url: &str,
        _: &std::path::Path,
    ) {
        let store = dead_lettered(url).await;
        let before = listed(&store).await;
        assert!(before.iter().all(|(_, _, at)| at.is_none()), "{before:?}");
        assert!(
            before.iter().any(|(s, seq, _)| s == "s0" && *seq == 2),
            "{before:?}"
        );
        assert!(
            before.iter().any(|(s, seq, _)| s == "s1" && *seq == 2),
            "{before:?}"
        );
        let all = before.len() as i64;
        assert_eq!(store.dead_letter_count().await.expect("count"), all);

        // Not these tasks, or not far enough.
        let high = [("s0", 9), ("s1", 9)];
        for (controller, request) in [("other", "r-1"), ("acme", "r-2")] {
            let marked = store.status_answered(controller, request, &high, 10).await;
            assert_eq!(marked.expect("answered"), super::Settled::default());
        }
        let early = [("s0", 1)];
        store
            .status_answered("acme", "r-1", &early, 10)
            .await
            .expect("answered");
        let after_early = listed(&store).await;
        for (s, seq, at) in &after_early {
            // Only s0's letters at sequence 1 (its creation's, if one was queued) go.
            let wanted = (s == "s0" && *seq <= 1).then_some(10);
            assert_eq!(*at, wanted, "{after_early:?}");
        }
        let early_marked = after_early.iter().filter(|(.., at)| at.is_some()).count() as i64;
        assert_eq!(
            store.dead_letter_count().await.expect("count"),
            all - early_marked
        );

        // s0 reported at its sequence: all of s0's letters are superseded, s1's are not.
        let s0 = [("s0", 2)];
        let marked = store
            .status_answered("acme", "r-1", &s0, 20)
            .await
            .expect("answered")
            .superseded;
        let after = listed(&store).await;
        assert_eq!(after.len(), before.len(), "nothing is hidden");
        for (s, seq, at) in &after {
            let wanted = match (s.as_str(), *seq) {
                ("s0", 1) => Some(10),
                ("s0", _) => Some(20),
                _ => None,
            };
            assert_eq!(*at, wanted, "{after:?}");
        }
        let s0_count = after.iter().filter(|(s, ..)| s == "s0").count() as i64;
        assert_eq!(marked as i64, s0_count - early_marked);
        assert_eq!(
            store.dead_letter_count().await.expect("count"),
            all - s0_count
        );
        store.db.pool.close().await;
    }

    /// A dead letter parked after an answer is not superseded by it: a superseded one
    /// requeued (which still works) and parked again counts, unmarked, until the next answer.
    async fn a_dead_letter_parked_after_the_answer_is_not_superseded_by_it(
        url: &str,
        _: &std::path::Path,
    ) {
        let store = dead_lettered(url).await;
        let both = [("s0", 2), ("s1", 2)];
        store
            .status_answered("acme", "r-1", &both, 10)
            .await
            .expect("answered");
        assert_eq!(store.dead_letter_count().await.expect("count"), 0);
        let letters = store.dead_letters(100, 0).await.expect("list");
        let again = letters
            .iter()
            .find(|d| d.subprocessor == "s1" && d.sequence == 2)
            .expect("s1's completion");
        assert_eq!(again.superseded_at, Some(10));
        assert!(store
            .requeue_dead_letter(again.id, "op", 30)
            .await
            .expect("requeue"));
        park_all(&store, 40).await;
        let parked = store.dead_letters(100, 0).await.expect("list");
        let parked = parked
            .iter()
            .find(|d| d.id == again.id)
            .expect("parked again");
        assert_eq!((parked.dead_lettered_at, parked.superseded_at), (40, None));
        assert_eq!(store.dead_letter_count().await.expect("count"), 1);
        // The next answer supersedes it again.
        store
            .status_answered("acme", "r-1", &both, 50)
            .await
            .expect("answered");
        let parked = store.dead_letters(100, 0).await.expect("list");
        let parked = parked.iter().find(|d| d.id == again.id).expect("listed");
        assert_eq!(parked.superseded_at, Some(50));
        assert_eq!(store.dead_letter_count().await.expect("count"), 0);
        store.db.pool.close().await;
    }

    /// Through the real services over mutual TLS, at a processor that signs certificates:
    /// an ERASURE task's IN_PROGRESS and COMPLETED acknowledgements are dead-lettered, and
    /// ListDeadLetters says the second carries a certificate. Once the registry's GetStatus
    /// has read the task at the COMPLETED's sequence, the IN_PROGRESS one is still listed,
    /// marked with the time of that answer, and the COMPLETED one is queued again (the outbox
    /// gauges count it, the dead letters' gauge does not). Parked again, it is listed unmarked
    /// and counted, and the next answer leaves it so. The outbox gauges never count a dead
    /// letter, superseded or not.
    async fn get_status_marks_dead_letters_listed_by_the_operator_api(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        use dsrelay_proto::millis_from_timestamp;
        use dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient;
        use dsrelay_proto::v1::processor_operator_service_server::ProcessorOperatorServiceServer;
        use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
        use dsrelay_proto::v1::processor_service_server::ProcessorServiceServer;
        use dsrelay_proto::v1::{GetStatusRequest, ListDeadLettersRequest};
        use dsrelay_runtime::pki::{dev_identity, DevPki};

        let mut config = crate::contract_tests::config(dir, database_url, &["acme"]);
        config.controllers[0].identity = dev_identity("registry", "controller");
        config.operators = vec![dev_identity("operator", "ops")];
        let app = crate::App::with_connectors(config, Default::default())
            .await
            .expect("app");
        let shared = app.shared();
        let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
        let server_tls = pki.files("processor").server_config().expect("server tls");
        let router = dsrelay_runtime::server::builder(server_tls)
            .expect("server")
            .add_service(ProcessorServiceServer::new(crate::api::Api::new(
                shared.clone(),
            )))
            .add_service(ProcessorOperatorServiceServer::new(
                crate::operator_api::OperatorApi::new(shared.clone()),
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
            let _ = stopped.await;
        }));
        let channel = |as_who: &str| {
            let tls = pki.files(as_who).client_config().expect("client tls");
            dsrelay_runtime::tls::channel(
                &format!("https://localhost:{port}"),
                Some(dev_identity("processor", "payroll-bureau")),
                &tls,
            )
            .expect("channel")
        };
        let registry = ProcessorServiceClient::new(channel("registry"));
        let operator = ProcessorOperatorServiceClient::new(channel("operator"));
        let gauge = |name: &'static str| {
            let shared = shared.clone();
            async move {
                let text = crate::metrics::render(&shared, shared.clock.now_ms())
                    .await
                    .expect("metrics");
                let prefix = format!("{name} ");
                let value = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
                value.expect("the gauge").parse::<f64>().expect("a number")
            }
        };
        let gauges = || async {
            [
                gauge("dsrelay_processor_acks_dead_lettered").await,
                gauge("dsrelay_ack_outbox_depth").await,
                gauge("dsrelay_ack_outbox_oldest_age_seconds").await,
            ]
        };

        let now = shared.clock.now_ms();
        let req = DeliverRequest {
            request_id: "r-dead".into(),
            kind: RequestKind::Erasure as i32,
            ..Default::default()
        };
        (shared.store)
            .accept("acme", &req, &["crm".to_string()], None, now)
            .await
            .expect("accept");
        let mut jobs = (shared.store)
            .claim_tasks(now, 10, 60_000)
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 1);
        let job = jobs.remove(0);
        for (sequence, t) in [(1, in_progress()), (2, completed())] {
            let step = (shared.store).transition_leased(
                &job.task.key,
                sequence,
                &job.lease_owner,
                &t,
                now,
                1,
                None,
                false,
            );
            assert_eq!(step.await.expect("step"), Some(sequence + 1));
            park_all(&shared.store, now).await;
        }
        let list = || {
            let mut operator = operator.clone();
            async move {
                let asked = operator.list_dead_letters(ListDeadLettersRequest::default());
                asked
                    .await
                    .expect("ListDeadLetters")
                    .into_inner()
                    .dead_letters
            }
        };
        let letters = list().await;
        let marks: Vec<(u64, bool, bool)> = letters
            .iter()
            .map(|d| (d.sequence, d.carries_certificate, d.superseded_at.is_some()))
            .collect();
        assert_eq!(marks, [(2, false, false), (3, true, false)]);
        let certified = letters[1].id;
        assert_eq!(gauges().await, [2.0, 0.0, 0.0]);

        let get_status = || {
            let mut registry = registry.clone();
            async move {
                let asked = registry.get_status(GetStatusRequest {
                    request_id: "r-dead".into(),
                });
                asked.await.expect("GetStatus").into_inner()
            }
        };
        let before = shared.clock.now_ms();
        let status = get_status().await;
        let after = shared.clock.now_ms();
        assert_eq!(status.tasks[0].sequence, 3);
        let letters = list().await;
        assert_eq!(letters.len(), 1, "the certified one is queued: {letters:?}");
        assert_eq!(
            (letters[0].sequence, letters[0].carries_certificate),
            (2, false)
        );
        let at = letters[0].superseded_at.as_ref().map(millis_from_timestamp);
        let at = at.expect("marked superseded");
        assert!((before..=after).contains(&at), "{at} in {before}..={after}");
        let [dead, depth, _] = gauges().await;
        assert_eq!([dead, depth], [0.0, 1.0]);

        park_all(&shared.store, shared.clock.now_ms()).await;
        for _ in 0..2 {
            let letters = list().await;
            let marks: Vec<(i64, bool, bool)> = letters
                .iter()
                .map(|d| (d.id, d.carries_certificate, d.superseded_at.is_some()))
                .collect();
            assert_eq!(
                marks,
                [(letters[0].id, false, true), (certified, true, false)]
            );
            assert_eq!(gauges().await, [1.0, 0.0, 0.0]);
            get_status().await;
        }
        let _ = stop.send(());
    }

    /// Tasks `acme`/`r-1` at `s0` and `s1`, `acme`/`r-2` at `s0` and `other`/`r-1` at `s0`,
    /// each moved to IN_PROGRESS (sequence 2) with every acknowledgement queued so far
    /// dead-lettered at 5, then COMPLETED (sequence 3) at 6: the completions' acknowledgements
    /// are returned, leased to the caller, by (controller, request, subprocessor).
    async fn parked_then_completed(url: &str) -> (Store, Vec<((String, String, String), AckJob)>) {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        let delivered = [
            ("acme", "r-1", &["s0", "s1"][..]),
            ("acme", "r-2", &["s0"][..]),
            ("other", "r-1", &["s0"][..]),
        ];
        for (controller, request_id, subprocessors) in delivered {
            let req = DeliverRequest {
                request_id: request_id.into(),
                kind: RequestKind::Erasure as i32,
                ..Default::default()
            };
            let subprocessors: Vec<String> = subprocessors.iter().map(|s| s.to_string()).collect();
            store
                .accept(controller, &req, &subprocessors, None, 1)
                .await
                .expect("accept");
        }
        let moving = Transition {
            state: TaskState::InProgress,
            ..Default::default()
        };
        let mut claimed = Vec::new();
        for job in store.claim_tasks(2, 10, 60_000).await.expect("claim") {
            let t = &job.task;
            let step = store.transition_leased(
                &t.key,
                t.sequence,
                &job.lease_owner,
                &moving,
                3,
                1,
                None,
                false,
            );
            assert_eq!(step.await.expect("step"), Some(2));
            claimed.push(job);
        }
        assert_eq!(claimed.len(), 4);
        park_all(&store, 5).await;
        let done = Transition {
            state: TaskState::Completed,
            ..Default::default()
        };
        for job in &claimed {
            let step = store.transition_leased(
                &job.task.key,
                2,
                &job.lease_owner,
                &done,
                6,
                1,
                None,
                false,
            );
            assert_eq!(step.await.expect("step"), Some(3));
        }
        let (mut acks, _) = store.take_handed_acks(100);
        acks.extend(store.claim_acks(6, 100, 60_000).await.expect("claim acks"));
        let completions: Vec<_> = acks
            .into_iter()
            .map(|a| {
                assert_eq!(a.ack.sequence, 3, "{a:?}");
                let task = (
                    a.controller.clone(),
                    a.ack.request_id.clone(),
                    a.ack.subprocessor.clone(),
                );
                (task, a)
            })
            .collect();
        assert_eq!(completions.len(), 4, "{completions:?}");
        (store, completions)
    }

    /// The completion acknowledgement of `controller`/`request_id` at `subprocessor`.
    fn completion<'a>(
        completions: &'a [((String, String, String), AckJob)],
        controller: &str,
        request_id: &str,
        subprocessor: &str,
    ) -> &'a AckJob {
        let found = completions.iter().find(|((c, r, s), _)| {
            (c.as_str(), r.as_str(), s.as_str()) == (controller, request_id, subprocessor)
        });
        &found.expect("the task's completion").1
    }

    /// A listed dead letter: ((controller, request, subprocessor), sequence, superseded at).
    type Letter = ((String, String, String), i64, Option<i64>);

    /// The dead letters listed, in id order.
    async fn listed_by_task(store: &Store) -> Vec<Letter> {
        let letters: Vec<DeadLetter> = store.dead_letters(100, 0).await.expect("list");
        letters
            .into_iter()
            .map(|d| {
                let task = (d.controller, d.request_id, d.subprocessor);
                (task, d.sequence, d.superseded_at)
            })
            .collect()
    }

    fn unmarked(letters: &[Letter]) -> i64 {
        letters.iter().filter(|(.., at)| at.is_none()).count() as i64
    }

    /// The registry accepting a later acknowledgement of a task supersedes, when it is
    /// recorded, every earlier dead letter of that task, and no dead letter of another
    /// subprocessor, another request or another controller: they stay listed and the gauge's
    /// count drops by as many.
    async fn an_accepted_later_acknowledgement_supersedes_the_tasks_dead_letters(
        url: &str,
        _: &std::path::Path,
    ) {
        let (store, completions) = parked_then_completed(url).await;
        let before = listed_by_task(&store).await;
        assert_eq!(unmarked(&before), before.len() as i64, "{before:?}");
        assert_eq!(
            store.dead_letter_count().await.expect("count"),
            before.len() as i64
        );
        let task = |c: &str, r: &str, s: &str| (c.to_string(), r.to_string(), s.to_string());
        let accepted = task("acme", "r-1", "s0");
        for t in [
            &accepted,
            &task("acme", "r-1", "s1"),
            &task("acme", "r-2", "s0"),
        ] {
            assert!(
                before.iter().any(|(lt, seq, _)| lt == t && *seq == 2),
                "{t:?} has its sequence-2 letter: {before:?}"
            );
        }

        let later = completion(&completions, "acme", "r-1", "s0");
        store.acks_sent(&[later.id], 10).await.expect("sent");
        let after = listed_by_task(&store).await;
        assert_eq!(after.len(), before.len(), "nothing is hidden: {after:?}");
        for (t, seq, at) in &after {
            let wanted = (*t == accepted).then_some(10);
            assert_eq!(*at, wanted, "{t:?} at {seq}: {after:?}");
        }
        let marked = after.iter().filter(|(t, ..)| *t == accepted).count() as i64;
        assert_eq!(
            store.dead_letter_count().await.expect("count"),
            before.len() as i64 - marked
        );
        store.db.pool.close().await;
    }

    /// A dead letter at a higher sequence than the acknowledgement the registry accepts is not
    /// superseded by it, while those at lower ones are; one superseded already (here by a
    /// GetStatus answer) keeps the time it was first superseded at.
    async fn an_accepted_acknowledgement_leaves_later_and_already_superseded_letters(
        url: &str,
        _: &std::path::Path,
    ) {
        let (store, completions) = parked_then_completed(url).await;
        let task = |c: &str, r: &str, s: &str| (c.to_string(), r.to_string(), s.to_string());

        // r-2's completion (sequence 3) is parked too; its sequence-2 letter is requeued,
        // sent again and accepted.
        let r2 = task("acme", "r-2", "s0");
        let parked = completion(&completions, "acme", "r-2", "s0");
        let rejected = store.ack_rejected(
            (parked.id, &parked.lease_owner),
            7,
            "INVALID_ARGUMENT: test",
            7,
            1,
        );
        assert!(rejected.await.expect("rejected"));
        let letters = store.dead_letters(100, 0).await.expect("list");
        let second = letters
            .iter()
            .find(|d| {
                (&d.controller, &d.request_id, &d.subprocessor) == (&r2.0, &r2.1, &r2.2)
                    && d.sequence == 2
            })
            .expect("r-2's sequence-2 letter");
        assert!(store
            .requeue_dead_letter(second.id, "op", 8)
            .await
            .expect("requeue"));
        let resent = store.claim_acks(8, 100, 60_000).await.expect("claim acks");
        assert_eq!(resent.iter().map(|a| a.id).collect::<Vec<_>>(), [second.id]);

        // r-1 at s1 is superseded by a GetStatus answer first.
        let s1 = task("acme", "r-1", "s1");
        let answered = store.status_answered("acme", "r-1", &[("s1", 2)], 20);
        assert!(answered.await.expect("answered").superseded > 0);
        let count_before = store.dead_letter_count().await.expect("count");

        let s1_later = completion(&completions, "acme", "r-1", "s1");
        store
            .acks_sent(&[second.id, s1_later.id], 30)
            .await
            .expect("sent");
        let after = listed_by_task(&store).await;
        let mut r2_marked = 0;
        for (t, seq, at) in &after {
            let wanted = if *t == r2 {
                // Sequence 2 is no dead letter now; 3 is above what was accepted.
                assert_ne!(*seq, 2, "{after:?}");
                (*seq < 2).then_some(30)
            } else if *t == s1 {
                Some(20)
            } else {
                None
            };
            r2_marked += i64::from(*t == r2 && at.is_some());
            assert_eq!(*at, wanted, "{t:?} at {seq}: {after:?}");
        }
        assert!(
            after
                .iter()
                .any(|(t, seq, at)| *t == r2 && *seq == 3 && at.is_none()),
            "r-2's completion is still parked, unmarked: {after:?}"
        );
        assert_eq!(
            store.dead_letter_count().await.expect("count"),
            count_before - r2_marked
        );
        store.db.pool.close().await;
    }

    /// A store that signs deletion certificates, with request `r-1` of `acme` delivered to
    /// `s0` as an ERASURE and claimed: the claim's job.
    async fn certifying(url: &str) -> (Store, crate::store::TaskJob) {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let key = dsrelay_runtime::signing::SigningKey::generate();
        let issuer = crate::certificates::Issuer::new(key, "spiffe://test/processor".into());
        let store = Store::new(db, b"test key").with_issuer(Some(std::sync::Arc::new(issuer)));
        let req = DeliverRequest {
            request_id: "r-1".into(),
            kind: RequestKind::Erasure as i32,
            ..Default::default()
        };
        store
            .accept("acme", &req, &["s0".to_string()], None, 1)
            .await
            .expect("accept");
        let mut jobs = store.claim_tasks(2, 10, 60_000).await.expect("claim");
        assert_eq!(jobs.len(), 1);
        (store, jobs.remove(0))
    }

    /// Moves `job`'s task, at `sequence`, to `t` at `now`.
    async fn step(store: &Store, job: &crate::store::TaskJob, sequence: i64, t: &Transition) {
        let stepped = store.transition_leased(
            &job.task.key,
            sequence,
            &job.lease_owner,
            t,
            3 + sequence,
            1,
            None,
            false,
        );
        assert_eq!(stepped.await.expect("step"), Some(sequence + 1));
    }

    /// The acknowledgements waiting to be sent at `now`, each rejected once with
    /// `max_rejections` 1; returns how many were parked.
    async fn park_due(store: &Store, now: i64) -> usize {
        let (mut acks, _) = store.take_handed_acks(100);
        acks.extend(
            store
                .claim_acks(now, 100, 60_000)
                .await
                .expect("claim acks"),
        );
        for a in &acks {
            let rejected = store.ack_rejected(
                (a.id, &a.lease_owner),
                now,
                "PERMISSION_DENIED: not routed",
                now,
                1,
            );
            assert!(rejected.await.expect("rejected"));
        }
        acks.len()
    }

    /// The dead letters' requeues in the audit trail, oldest first: (actor, detail).
    async fn requeues(store: &Store) -> Vec<(String, String)> {
        let entries = store.audit_entries(0, 1000).await.expect("audit");
        entries
            .into_iter()
            .filter(|e| e.event_type == ProcessorAuditEvent::AckRequeued as i32)
            .map(|e| (e.actor, e.detail))
            .collect()
    }

    fn in_progress() -> Transition {
        Transition {
            state: TaskState::InProgress,
            ..Default::default()
        }
    }

    fn completed() -> Transition {
        Transition {
            state: TaskState::Completed,
            records_affected: 2,
            ..Default::default()
        }
    }

    /// GetStatus reporting a task at a dead letter's sequence supersedes the letters that
    /// carry no certificate but never one that carries the task's deletion certificate: that
    /// one is requeued by the processor, once (fresh count, `auto_requeued_at`, an audited
    /// requeue by "processor"). Dead-lettered again, later answers leave it unmarked and
    /// counted, even after an operator's requeue parks it once more.
    async fn a_status_answer_requeues_a_certified_dead_letter_once(url: &str, _: &std::path::Path) {
        let (store, job) = certifying(url).await;
        step(&store, &job, 1, &in_progress()).await;
        assert_eq!(park_due(&store, 5).await, 1);
        step(&store, &job, 2, &completed()).await;
        assert_eq!(park_due(&store, 6).await, 1);
        let letters = store.dead_letters(100, 0).await.expect("list");
        let marks: Vec<(i64, bool)> = letters
            .iter()
            .map(|d| (d.sequence, d.carries_certificate))
            .collect();
        assert_eq!(marks, [(2, false), (3, true)]);
        let (plain, certified) = (letters[0].id, letters[1].id);
        assert_eq!(store.dead_letter_count().await.expect("count"), 2);
        assert_eq!(store.unsent_ack_count().await.expect("unsent"), 0);

        let settled = store.status_answered("acme", "r-1", &[("s0", 3)], 10).await;
        let wanted = super::Settled {
            superseded: 1,
            requeued: 1,
        };
        assert_eq!(settled.expect("answered"), wanted);
        let letters = store.dead_letters(100, 0).await.expect("list");
        let listed: Vec<(i64, Option<i64>)> =
            letters.iter().map(|d| (d.id, d.superseded_at)).collect();
        assert_eq!(listed, [(plain, Some(10))], "the certified one is queued");
        assert_eq!(store.dead_letter_count().await.expect("count"), 0);
        assert_eq!(store.unsent_ack_count().await.expect("unsent"), 1);
        let audited = requeues(&store).await;
        assert_eq!(audited.len(), 1, "{audited:?}");
        assert_eq!(audited[0].0, "processor");
        assert!(
            audited[0].1.contains("s0, change 3 requeued"),
            "{audited:?}"
        );

        // Sent at once with its certificate, and parked again after one rejection.
        let resent = store.claim_acks(10, 100, 60_000).await.expect("claim");
        assert_eq!(resent.iter().map(|a| a.id).collect::<Vec<_>>(), [certified]);
        assert!(resent[0].ack.certificate.is_some());
        assert_eq!(resent[0].attempts, 0, "a fresh count");
        let rejected = store.ack_rejected((certified, &resent[0].lease_owner), 11, "again", 11, 1);
        assert!(rejected.await.expect("rejected"));
        for at in [20, 40] {
            let settled = store.status_answered("acme", "r-1", &[("s0", 3)], at).await;
            assert_eq!(settled.expect("answered"), super::Settled::default());
            let letters = store.dead_letters(100, 0).await.expect("list");
            let again = letters.iter().find(|d| d.id == certified).expect("parked");
            assert_eq!(again.superseded_at, None);
            assert_eq!(again.auto_requeued_at, Some(10));
            assert!(again.carries_certificate);
            assert_eq!(store.dead_letter_count().await.expect("count"), 1);
            assert_eq!(store.unsent_ack_count().await.expect("unsent"), 0);
            if at == 20 {
                // An operator's requeue works and keeps the mark; parked again, it waits.
                assert!(store
                    .requeue_dead_letter(certified, "op", 30)
                    .await
                    .expect("requeue"));
                assert_eq!(park_due(&store, 31).await, 1);
            }
        }
        let audited = requeues(&store).await;
        let actors: Vec<&str> = audited.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(actors, ["processor", "op"], "no second automatic requeue");
        store.db.pool.close().await;
    }

    /// The registry accepting a later acknowledgement of a task supersedes its earlier dead
    /// letters that carry no certificate and requeues, once, one that carries a deletion
    /// certificate (here a RETAINED's, followed by the COMPLETED's own): its entry follows the
    /// acceptance's. Parked again, the same acceptance recorded again leaves it unmarked.
    async fn an_accepted_later_acknowledgement_requeues_a_certified_dead_letter_once(
        url: &str,
        _: &std::path::Path,
    ) {
        let (store, job) = certifying(url).await;
        step(&store, &job, 1, &in_progress()).await;
        assert_eq!(park_due(&store, 5).await, 1);
        let retained = Transition {
            state: TaskState::Retained,
            records_affected: 1,
            legal_basis: "bookkeeping act".into(),
            retain_until: Some(1_900_000_000_000),
            ..Default::default()
        };
        step(&store, &job, 2, &retained).await;
        assert_eq!(park_due(&store, 6).await, 1);
        step(&store, &job, 3, &completed()).await;
        let (mut acks, _) = store.take_handed_acks(100);
        acks.extend(store.claim_acks(7, 100, 60_000).await.expect("claim acks"));
        assert_eq!(acks.len(), 1);
        let (completion, sequence) = (acks[0].id, acks[0].ack.sequence);
        assert_eq!(sequence, 4);
        let letters = store.dead_letters(100, 0).await.expect("list");
        let marks: Vec<(i64, bool)> = letters
            .iter()
            .map(|d| (d.sequence, d.carries_certificate))
            .collect();
        assert_eq!(marks, [(2, false), (3, true)]);
        let (plain, certified) = (letters[0].id, letters[1].id);

        let before = store.audit_entries(0, 1000).await.expect("audit").len();
        store.acks_sent(&[completion], 10).await.expect("sent");
        let letters = store.dead_letters(100, 0).await.expect("list");
        let listed: Vec<(i64, Option<i64>)> =
            letters.iter().map(|d| (d.id, d.superseded_at)).collect();
        assert_eq!(listed, [(plain, Some(10))], "the certified one is queued");
        assert_eq!(store.dead_letter_count().await.expect("count"), 0);
        assert_eq!(store.unsent_ack_count().await.expect("unsent"), 1);
        let entries = store.audit_entries(0, 1000).await.expect("audit");
        let added: Vec<(i32, &str)> = entries[before..]
            .iter()
            .map(|e| (e.event_type, e.actor.as_str()))
            .collect();
        assert_eq!(
            added,
            [
                (ProcessorAuditEvent::AckAccepted as i32, ""),
                (ProcessorAuditEvent::AckRequeued as i32, "processor"),
            ]
        );
        assert!(entries[before + 1].detail.contains("s0, change 3 requeued"));

        let resent = store.claim_acks(10, 100, 60_000).await.expect("claim");
        assert_eq!(resent.iter().map(|a| a.id).collect::<Vec<_>>(), [certified]);
        let rejected = store.ack_rejected((certified, &resent[0].lease_owner), 11, "again", 11, 1);
        assert!(rejected.await.expect("rejected"));
        store
            .acks_sent(&[completion], 20)
            .await
            .expect("sent again");
        let settled = store.status_answered("acme", "r-1", &[("s0", 4)], 21).await;
        assert_eq!(settled.expect("answered"), super::Settled::default());
        let letters = store.dead_letters(100, 0).await.expect("list");
        let again = letters.iter().find(|d| d.id == certified).expect("parked");
        assert_eq!(
            (again.superseded_at, again.auto_requeued_at),
            (None, Some(10))
        );
        assert_eq!(store.dead_letter_count().await.expect("count"), 1);
        assert_eq!(
            requeues(&store).await.len(),
            1,
            "no second automatic requeue"
        );
        store.db.pool.close().await;
    }

    /// A row as the build of migration 0029 left it: a dead letter carrying a deletion
    /// certificate, marked superseded by a GetStatus answer, never requeued. Unmarking clears
    /// that mark only (the plain letter beside it stays superseded, and a second run finds
    /// nothing), so it counts again, and the next answer requeues it, once.
    async fn a_certified_letter_the_old_build_superseded_is_unmarked_then_requeued(
        url: &str,
        _: &std::path::Path,
    ) {
        let (store, job) = certifying(url).await;
        step(&store, &job, 1, &in_progress()).await;
        assert_eq!(park_due(&store, 5).await, 1);
        step(&store, &job, 2, &completed()).await;
        assert_eq!(park_due(&store, 6).await, 1);
        sqlx::query("UPDATE ack_outbox SET superseded_at = 7 WHERE dead_lettered_at IS NOT NULL")
            .execute(&store.db.pool)
            .await
            .expect("superseded as the old build did");
        let letters = store.dead_letters(100, 0).await.expect("list");
        let marks: Vec<(i64, bool, Option<i64>, Option<i64>)> = letters
            .iter()
            .map(|d| {
                let marks = (d.superseded_at, d.auto_requeued_at);
                (d.sequence, d.carries_certificate, marks.0, marks.1)
            })
            .collect();
        assert_eq!(marks, [(2, false, Some(7), None), (3, true, Some(7), None)]);
        let (plain, certified) = (letters[0].id, letters[1].id);
        assert_eq!(store.dead_letter_count().await.expect("count"), 0);
        let settled = store.status_answered("acme", "r-1", &[("s0", 3)], 8).await;
        assert_eq!(settled.expect("answered"), super::Settled::default());

        let cleared = store.unmark_certified_dead_letters().await;
        assert_eq!(cleared.expect("unmarked"), 1);
        let letters = store.dead_letters(100, 0).await.expect("list");
        let listed: Vec<(i64, Option<i64>)> =
            letters.iter().map(|d| (d.id, d.superseded_at)).collect();
        assert_eq!(listed, [(plain, Some(7)), (certified, None)]);
        assert_eq!(store.dead_letter_count().await.expect("count"), 1);
        let again = store.unmark_certified_dead_letters().await;
        assert_eq!(again.expect("unmarked again"), 0);

        let settled = store.status_answered("acme", "r-1", &[("s0", 3)], 10).await;
        let wanted = super::Settled {
            superseded: 0,
            requeued: 1,
        };
        assert_eq!(settled.expect("answered"), wanted);
        assert_eq!(store.dead_letter_count().await.expect("count"), 0);
        let resent = store.claim_acks(10, 100, 60_000).await.expect("claim");
        assert_eq!(resent.iter().map(|a| a.id).collect::<Vec<_>>(), [certified]);
        assert!(resent[0].ack.certificate.is_some());
        let audited = requeues(&store).await;
        let actors: Vec<&str> = audited.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(actors, ["processor"]);
        store.db.pool.close().await;
    }

    /// Sent acknowledgements in the plan tests' outbox, one in [`PARKED_EVERY`] of them
    /// parked instead.
    const MANY: i64 = 20_000;
    /// See [`MANY`].
    const PARKED_EVERY: i64 = 1_000;

    /// The plans each database makes for the dead letters' reads over [`MANY`]
    /// acknowledgements, nearly all sent long ago: (the settle read of `acks_sent` for a
    /// batch of 100, the read of `status_answered`, `dead_letter_count`'s), each as its
    /// lines joined.
    async fn parked_plans(url: &str) -> [String; 3] {
        use dsrelay_runtime::store::Backend;
        use sqlx::Row;
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let store = Store::new(db, b"test key");
        let db = &store.db;
        let (series, payload) = match db.backend {
            Backend::Sqlite => (
                format!(
                    "(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s \
                     WHERE n < {MANY}) SELECT n FROM s) AS g"
                ),
                "CAST('' AS BLOB)",
            ),
            Backend::Postgres => (
                format!("generate_series(1, {MANY}) AS g(n)"),
                "CAST('' AS BYTEA)",
            ),
        };
        sqlx::query(&format!(
            "INSERT INTO ack_outbox (controller, request_id, subprocessor, sequence, payload, \
             next_attempt_at, sent_at, dead_lettered_at) \
             SELECT 'acme', 'r' || (g.n / 4), 's' || (g.n % 4), 1, {payload}, g.n, \
             CASE WHEN g.n % {PARKED_EVERY} = 0 THEN NULL ELSE g.n END, \
             CASE WHEN g.n % {PARKED_EVERY} = 0 THEN 5 ELSE NULL END FROM {series}"
        ))
        .execute(&db.pool)
        .await
        .expect("many acknowledgements");
        let (explain, column) = match db.backend {
            // As the processor runs it: SQLite's tables are never analyzed.
            Backend::Sqlite => ("EXPLAIN QUERY PLAN", "detail"),
            Backend::Postgres => {
                sqlx::query("ANALYZE ack_outbox")
                    .execute(&db.pool)
                    .await
                    .expect("analyze");
                ("EXPLAIN", "QUERY PLAN")
            }
        };
        let lines = |rows: Vec<sqlx::any::AnyRow>| {
            rows.iter()
                .map(|r| r.try_get::<String, _>(column).expect("a plan line"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let held = format!(
            "{explain} {}",
            db.backend.numbered(&super::held_after_sent(100))
        );
        let mut q = sqlx::query(&held);
        for id in 1..=100_i64 {
            q = q.bind(id);
        }
        let held = lines(q.fetch_all(&db.pool).await.expect("the plan"));
        let of_request = format!("{explain} {}", super::PARKED_OF_REQUEST);
        let q = sqlx::query(&of_request).bind("acme").bind("r250");
        let of_request = lines(q.fetch_all(&db.pool).await.expect("the plan"));
        let count = format!("{explain} {}", super::PARKED_COUNT);
        let q = sqlx::query(&count);
        let count = lines(q.fetch_all(&db.pool).await.expect("the plan"));
        store.db.pool.close().await;
        [held, of_request, count]
    }

    /// On SQLite, a whole-table read shows as a `SCAN` of the table (under either name) not
    /// through an index; a `SEARCH` reads only the index's range.
    fn scans_the_table_on_sqlite(plan: &str) -> bool {
        plan.lines().any(|l| {
            let l = l.trim_start_matches(['|', '`', '-', ' ']);
            (l.starts_with("SCAN ack_outbox") || l.starts_with("SCAN later"))
                && !l.contains("USING INDEX ack_outbox_parked")
        })
    }

    /// The settle read of every batch marked sent and the dead letters' count read only the
    /// parked letters' index, not the outbox; `status_answered`'s read goes through the
    /// outbox's key for its one request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letter_reads_use_the_parked_index_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/processor.db", dir.path().display());
        let [held, of_request, count] = parked_plans(&url).await;
        assert!(held.contains("USING INDEX ack_outbox_parked"), "{held}");
        assert!(!scans_the_table_on_sqlite(&held), "{held}");
        assert!(
            of_request.contains(
                "USING INDEX sqlite_autoindex_ack_outbox_1 (controller=? AND request_id=?)"
            ),
            "{of_request}"
        );
        assert!(!scans_the_table_on_sqlite(&of_request), "{of_request}");
        assert!(count.contains("USING INDEX ack_outbox_parked"), "{count}");
        assert!(!scans_the_table_on_sqlite(&count), "{count}");
    }

    /// As on SQLite, with PostgreSQL's statistics of the outbox gathered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letter_reads_use_the_parked_index_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            let plans = parked_plans(&url).await;
            for plan in &plans {
                assert!(!plan.contains("Seq Scan on ack_outbox"), "{plan}");
            }
            let [held, _, count] = plans;
            assert!(held.contains("ack_outbox_parked"), "{held}");
            assert!(count.contains("ack_outbox_parked"), "{count}");
        })
        .await;
    }

    on_both!(
        a_certified_letter_the_old_build_superseded_is_unmarked_then_requeued,
        get_status_marks_dead_letters_listed_by_the_operator_api,
        a_status_answer_supersedes_the_dead_letters_it_reports_past,
        a_dead_letter_parked_after_the_answer_is_not_superseded_by_it,
        an_accepted_later_acknowledgement_supersedes_the_tasks_dead_letters,
        an_accepted_acknowledgement_leaves_later_and_already_superseded_letters,
        a_status_answer_requeues_a_certified_dead_letter_once,
        an_accepted_later_acknowledgement_requeues_a_certified_dead_letter_once,
    );

    fn job(id: i64) -> AckJob {
        AckJob {
            id,
            controller: "acme".into(),
            attempts: 0,
            ack: Default::default(),
            lease_owner: String::new(),
        }
    }

    /// Handed jobs come out oldest first, a batch at a time; once [`MAX_HANDED`] wait, the
    /// next transaction's acknowledgements are left to claims until the sender takes some.
    #[test]
    fn a_handoff_is_bounded_and_keeps_its_order() {
        let h = Handoff::new(30_000);
        assert_eq!(h.lease_for_next(), Some(30_000));
        h.push((0..MAX_HANDED as i64 - 1).map(job).collect());
        assert_eq!(h.lease_for_next(), Some(30_000));
        h.push(vec![job(MAX_HANDED as i64 - 1)]);
        assert_eq!(h.lease_for_next(), None);
        let (first, more) = h.take(3);
        assert!(more);
        assert_eq!(first.iter().map(|j| j.id).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(h.lease_for_next(), Some(30_000));
        let (rest, more) = h.take(usize::MAX);
        assert!(!more);
        assert_eq!(rest.len(), MAX_HANDED - 3);
        assert_eq!(rest.first().map(|j| j.id), Some(3));
    }
}
