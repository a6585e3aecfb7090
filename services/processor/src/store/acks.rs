//! The acknowledgement outbox: every state change of a task queues one acknowledgement in
//! the same transaction, and the sender claims, sends and retires them. One the registry
//! rejects is retried with backoff (the registry may be fixed) and, after
//! `acks.max_rejections` rejections, dead-lettered: kept, never sent again until an operator
//! requeues it. A dead letter does not stop its request from being forgotten; forgetting
//! removes its free text (see `store::forget`). A dead letter whose task GetStatus has since
//! reported at its sequence or later is marked superseded ([`Store::status_answered`]): the
//! registry has read that state, so it stays listed but no longer counts as needing action.

use anyhow::Result;
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{Acknowledgement, ProcessorAuditEvent};
use dsrelay_runtime::store::placeholders;
use sqlx::AnyConnection;

use super::audit::{self, Record};
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
    /// for the whole batch, then its entries appended together, in the order of `ids`.
    pub async fn acks_sent(&self, ids: &[i64], now: i64) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_audited().await?;
        let mut sent: Vec<(i64, String, String, String, i64)> = Vec::with_capacity(ids.len());
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
        }
        let position = |id: i64| ids.iter().position(|i| *i == id);
        sent.sort_by_key(|(id, ..)| position(*id));
        let entries = sent
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
    /// `reported`, each task's (subprocessor, sequence): every dead letter of those
    /// tasks parked by then whose sequence is at or below the one reported for its task is
    /// marked superseded with that answer, unless an earlier answer marked it already.
    /// Returns how many were marked. Dead letters are few, so the answer's usual case (none
    /// for the request) is one read, and takes no write lock.
    pub async fn status_answered(
        &self,
        controller: &str,
        request_id: &str,
        reported: &[(&str, i64)],
        now: i64,
    ) -> Result<u64> {
        let parked: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT id, subprocessor, sequence FROM ack_outbox \
             WHERE dead_lettered_at IS NOT NULL AND sent_at IS NULL AND superseded_at IS NULL \
             AND controller = $1 AND request_id = $2",
        )
        .bind(controller)
        .bind(request_id)
        .fetch_all(&self.db.reader)
        .await?;
        let superseded: Vec<(i64, i64)> = parked
            .iter()
            .filter_map(|(id, subprocessor, sequence)| {
                let (_, seq) = reported.iter().find(|(s, _)| *s == subprocessor.as_str())?;
                (seq >= sequence).then_some((*id, *seq))
            })
            .collect();
        if superseded.is_empty() {
            return Ok(0);
        }
        let mut tx = self.db.pool.begin().await?;
        let mut marked = 0;
        for (id, sequence) in superseded {
            // Matched again under the write: a row requeued (or marked) since the read is
            // left as it now is.
            marked += sqlx::query(
                "UPDATE ack_outbox SET superseded_at = $1 WHERE id = $3 \
                 AND dead_lettered_at IS NOT NULL AND sent_at IS NULL \
                 AND superseded_at IS NULL AND sequence <= $2",
            )
            .bind(now)
            .bind(sequence)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(marked)
    }

    /// Dead-lettered acknowledgements with an id above `after_id`, oldest first, at most
    /// `limit`, superseded ones included (marked).
    pub async fn dead_letters(&self, limit: i64, after_id: i64) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT id, controller, request_id, subprocessor, sequence, \
             CAST(rejections AS BIGINT) AS rejections, \
             last_error, rejected_at, dead_lettered_at, superseded_at FROM ack_outbox \
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
                })
            })
            .collect()
    }

    /// How many dead-lettered acknowledgements still need an operator: superseded ones
    /// ([`DeadLetter::superseded_at`]) are not counted.
    pub async fn dead_letter_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM ack_outbox \
             WHERE dead_lettered_at IS NOT NULL AND sent_at IS NULL AND superseded_at IS NULL",
        )
        .fetch_one(&self.db.reader)
        .await?)
    }

    /// Puts dead-lettered acknowledgement `id` back in the queue, to be sent at once with a
    /// fresh count of rejections, in the name of the operator `by`. Returns false when no
    /// such dead letter exists. A superseded one is requeued too (sending it again is
    /// harmless); its mark goes, so parked again it counts until a later answer supersedes it.
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
    /// When GetStatus, answering after it was parked, reported its task at its sequence or
    /// later (ms): the registry has read that state, so requeueing it is not needed. `None`
    /// while no such answer was given.
    pub superseded_at: Option<i64>,
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{DeliverRequest, RequestKind, TaskState};
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
            assert_eq!(marked.expect("answered"), 0);
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
            .expect("answered");
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

    /// Through the real services over mutual TLS: a dead letter counts in the gauge and is
    /// listed unmarked; once the registry's GetStatus has read its task at its sequence, it
    /// is still listed, marked with the time of that answer, and the gauge drops to 0.
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
        let mut registry = ProcessorServiceClient::new(channel("registry"));
        let operator = ProcessorOperatorServiceClient::new(channel("operator"));
        let gauge = || async {
            let text = crate::metrics::render(&shared, shared.clock.now_ms())
                .await
                .expect("metrics");
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix("dsrelay_processor_acks_dead_lettered "));
            value.expect("the gauge").parse::<f64>().expect("a number")
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
        let done = Transition {
            state: TaskState::Completed,
            ..Default::default()
        };
        for job in shared
            .store
            .claim_tasks(now, 10, 60_000)
            .await
            .expect("claim")
        {
            let t = &job.task;
            let step = (shared.store).transition_leased(
                &t.key,
                t.sequence,
                &job.lease_owner,
                &done,
                now,
                1,
                None,
                false,
            );
            assert_eq!(step.await.expect("step"), Some(2));
        }
        park_all(&shared.store, now).await;
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
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0].superseded_at, None);
        assert_eq!(gauge().await, 1.0);

        let before = shared.clock.now_ms();
        let status = registry
            .get_status(GetStatusRequest {
                request_id: "r-dead".into(),
            })
            .await
            .expect("GetStatus")
            .into_inner();
        let after = shared.clock.now_ms();
        assert_eq!(status.tasks[0].sequence, letters[0].sequence);
        let letters = list().await;
        assert_eq!(letters.len(), 1, "still listed: {letters:?}");
        let at = letters[0].superseded_at.as_ref().map(millis_from_timestamp);
        let at = at.expect("marked superseded");
        assert!((before..=after).contains(&at), "{at} in {before}..={after}");
        assert_eq!(gauge().await, 0.0);
        let _ = stop.send(());
    }

    on_both!(
        get_status_marks_dead_letters_listed_by_the_operator_api,
        a_status_answer_supersedes_the_dead_letters_it_reports_past,
        a_dead_letter_parked_after_the_answer_is_not_superseded_by_it,
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
