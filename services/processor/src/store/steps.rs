//! Group commit for the runner's task steps: concurrent [`Store::transition_leased`] calls
//! queue their steps here, and whichever finds no commit under way starts one, which writes
//! everything queued in a single transaction (each step's task row, then the batch's
//! acknowledgements in one INSERT and its audit entries together) and keeps going while
//! steps are queued. One commit then serves many steps, while each caller still gets its own
//! answer only once its step is durable.
//!
//! The commit runs in a task of its own, so a caller that gives up waiting (its step
//! abandoned) cancels nothing of the others. When a batch's transaction fails, every step of
//! it is written again alone (`dsrelay_runtime::group_commit`), so each caller gets its own
//! step's outcome.

use std::sync::atomic::Ordering;

use anyhow::{anyhow, Result};
use dsrelay_runtime::group_commit::{GroupQueue, Queued};
use dsrelay_runtime::store::{run_each, Backend};
use dsrelay_runtime::trace_context;
use tokio::sync::oneshot;

use super::certificates::Certifying;
use super::rows::TaskKey;
use super::tasks::{finish_step, PreparedStep, Step, StepWrite};
use super::{acks, audit, certificates, Store};
use crate::task_machine::Transition;

/// Most steps written in one transaction.
pub(crate) const MAX_BATCH: usize = 64;

/// One queued step of a claim, and where its answer goes.
pub(super) struct QueuedStep {
    pub(super) key: TaskKey,
    pub(super) expected_sequence: i64,
    pub(super) lease_owner: String,
    pub(super) t: Transition,
    pub(super) now: i64,
    pub(super) attempts: i64,
    pub(super) call_started_at: Option<i64>,
    pub(super) unless_cancelled: bool,
    /// The caller's span, for the acknowledgement (the commit runs in another task).
    pub(super) traceparent: String,
    answer: oneshot::Sender<Result<Option<i64>>>,
}

/// The steps waiting for a commit, and whether one is under way.
pub(super) type StepQueue = GroupQueue<QueuedStep>;

impl Queued for QueuedStep {
    type Answer = Option<i64>;
    fn answer_to(self) -> oneshot::Sender<Result<Option<i64>>> {
        self.answer
    }
}

impl std::fmt::Debug for QueuedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuedStep")
            .field("key", &self.key)
            .field("expected_sequence", &self.expected_sequence)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// [`Store::transition`] for the runner's claim `lease_owner`: nothing moves once another
    /// claim took the task, so a runner whose lease was lost records no outcome over the new
    /// holder's. `call_started_at`: the holder is called right after the move, and the call
    /// is noted with it (see [`Store::call_started`]); `None` clears the note.
    /// `unless_cancelled`: nothing moves either once a cancellation marked the task (an
    /// outcome decided as if none came, to be decided again). Steps of
    /// concurrent claims share one transaction (see the module documentation); this returns
    /// once this step is committed, with its new sequence.
    #[allow(clippy::too_many_arguments)]
    pub async fn transition_leased(
        &self,
        key: &TaskKey,
        expected_sequence: i64,
        lease_owner: &str,
        t: &Transition,
        now: i64,
        attempts: i64,
        call_started_at: Option<i64>,
        unless_cancelled: bool,
    ) -> Result<Option<i64>> {
        let (answer, answered) = oneshot::channel();
        let step = QueuedStep {
            key: key.clone(),
            expected_sequence,
            lease_owner: lease_owner.to_string(),
            t: t.clone(),
            now,
            attempts,
            call_started_at,
            unless_cancelled,
            // The span the change happens in is where the registry's handling of the
            // acknowledgement hangs in the trace.
            traceparent: trace_context::traceparent_of(&tracing::Span::current())
                .unwrap_or_default(),
            answer,
        };
        if self.steps.push(step) {
            let store = self.clone();
            tokio::spawn(async move { store.write_steps().await });
        }
        answered
            .await
            .map_err(|_| anyhow!("the step writer stopped before answering"))?
    }

    /// Commits queued steps, a batch at a time, until none is left.
    async fn write_steps(&self) {
        let store = self.clone();
        self.steps
            .write_all(MAX_BATCH, "task steps", move |batch| {
                let store = store.clone();
                Box::pin(async move { store.record_steps(batch).await })
            })
            .await;
    }

    /// Records `steps` in one transaction: their task rows (one UPDATE each, all in one call
    /// on SQLite, and one more for a step that keeps a retried failure's words,
    /// [`Transition::error`]), then their certificates (one read and one INSERT for all),
    /// each step's upload, then all their acknowledgements in one INSERT and their audit
    /// entries, in the steps' order. A certificate therefore lists the retained data of the
    /// request as the whole batch leaves it. Answers each step's new sequence, `None` for a
    /// step whose task moved on or whose claim was lost (it records nothing).
    pub(super) async fn record_steps(&self, steps: &[QueuedStep]) -> Result<Vec<Option<i64>>> {
        let mut tx = self.begin_audited().await?;
        let issuer = self.issuer.as_deref();
        // Transactions run side by side on PostgreSQL, so rows are locked in one order, as
        // everywhere: the rows of the requests whose steps may issue a certificate first
        // (see `super::lock_requests`), then the tasks' rows in key order (as a
        // cancellation or an update of terms locks a request's tasks); the acknowledgements
        // and entries still follow the callers' order.
        let may_certify: Vec<(&str, &str)> = steps
            .iter()
            .filter(|s| certificates::may_issue(issuer, &s.t))
            .map(|s| (s.key.controller.as_str(), s.key.request_id.as_str()))
            .collect();
        super::lock_requests(&mut tx, &may_certify).await?;
        let mut order: Vec<usize> = (0..steps.len()).collect();
        order.sort_by(|a, b| {
            let key = |i: usize| {
                let k = &steps[i].key;
                (&k.controller, &k.request_id, &k.subprocessor)
            };
            key(*a).cmp(&key(*b))
        });
        let claimed: Vec<Step<'_>> = steps
            .iter()
            .map(|s| Step {
                expected_sequence: s.expected_sequence,
                lease_owner: Some(&s.lease_owner),
                by: "",
                call_started_at: s.call_started_at,
                unless_cancelled: s.unless_cancelled,
            })
            .collect();
        // The task rows first, all in one call on SQLite.
        let writes = order
            .iter()
            .map(|&i| {
                let s = &steps[i];
                StepWrite::new(&tx, &s.key, &claimed[i], &s.t, s.now, s.attempts)
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = Backend::of_connection(&tx);
        let ran = run_each(&mut tx, backend, &writes, StepWrite::sql, StepWrite::bind).await?;
        // The steps whose rows moved, with what their UPDATEs returned; then their
        // certificates, all together once every row is written.
        let moved: Vec<(usize, &StepWrite, sqlx::any::AnyRow)> = order
            .into_iter()
            .zip(&writes)
            .zip(ran)
            .filter_map(|((i, write), ran)| Some((i, write, ran.rows.into_iter().next()?)))
            .collect();
        // A retried failure's words stay with the task for operators (`last_error`), as a
        // postponement keeps them.
        for (i, _, _) in &moved {
            let (key, Some(error)) = (&steps[*i].key, &steps[*i].t.error) else {
                continue;
            };
            sqlx::query(
                "UPDATE tasks SET last_error = $1 WHERE controller = $2 AND request_id = $3 \
                 AND subprocessor = $4",
            )
            .bind(error)
            .bind(&key.controller)
            .bind(&key.request_id)
            .bind(&key.subprocessor)
            .execute(&mut *tx)
            .await?;
        }
        let certifying: Vec<Certifying<'_>> = moved
            .iter()
            .map(|(i, write, _)| write.certifying(&steps[*i].key))
            .collect();
        let issued = certificates::issue_all(&mut tx, issuer, &certifying).await?;
        let mut prepared_steps: Vec<Option<PreparedStep>> =
            std::iter::repeat_with(|| None).take(steps.len()).collect();
        for ((i, write, row), certificate) in moved.into_iter().zip(issued) {
            let s = &steps[i];
            prepared_steps[i] = Some(
                finish_step(
                    &mut tx,
                    &s.key,
                    &claimed[i],
                    write,
                    row,
                    certificate,
                    s.traceparent.clone(),
                )
                .await?,
            );
        }
        let mut sequences = Vec::with_capacity(steps.len());
        let (mut queued, mut entries) = (Vec::new(), Vec::new());
        for prepared in prepared_steps {
            sequences.push(prepared.as_ref().map(|p| p.sequence));
            if let Some(PreparedStep { ack, entry, .. }) = prepared {
                queued.push(ack);
                entries.push(entry);
            }
        }
        let leased = self.handoff.as_ref().and_then(|h| h.lease_for_next());
        let handed = acks::queue_all(&mut tx, &queued, leased).await?;
        audit::append_all(&mut tx, entries).await?;
        tx.commit().await?;
        self.steps.commits.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = &self.handoff {
            h.push(handed);
        }
        Ok(sequences)
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{DeliverRequest, ProcessorAuditEvent, RequestKind, TaskState};
    use dsrelay_runtime::store::{Backend, Db};

    use super::*;
    use crate::store::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    /// Tasks stepped at once.
    const N: usize = 8;

    /// The subprocessor whose step the tests make fail or lose its claim.
    const ODD: usize = 3;

    /// A store with one accepted erasure of [`N`] tasks, all claimed.
    async fn claimed(url: &str) -> (Store, Vec<crate::store::TaskJob>) {
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
        let subprocessors: Vec<String> = (0..N).map(|i| format!("s{i}")).collect();
        let accepted = store
            .accept("acme", &req, &subprocessors, None, 1)
            .await
            .expect("accept");
        // Answered from the one INSERT's RETURNING: the rows as a read finds them.
        let crate::store::Accepted::New(tasks) = accepted else {
            panic!("a new delivery")
        };
        let read = store.tasks("acme", "r-1").await.expect("tasks");
        assert_eq!(format!("{tasks:?}"), format!("{read:?}"));
        assert_eq!(tasks.len(), N);
        let mut jobs = store.claim_tasks(2, N as i64, 60_000).await.expect("claim");
        jobs.sort_by(|a, b| a.task.key.subprocessor.cmp(&b.task.key.subprocessor));
        assert_eq!(jobs.len(), N);
        (store, jobs)
    }

    /// Steps every job at once (task `i` COMPLETED with `i` records), the [`ODD`] one under
    /// `odd_owner` when given; answers each caller's answer, in the jobs' order.
    async fn step_all(
        store: &Store,
        jobs: &[crate::store::TaskJob],
        odd_owner: Option<&str>,
    ) -> Vec<Result<Option<i64>>> {
        let steps = jobs.iter().enumerate().map(|(i, j)| {
            let owner = match odd_owner {
                Some(o) if i == ODD => o.to_string(),
                _ => j.lease_owner.clone(),
            };
            let t = Transition {
                state: TaskState::Completed,
                records_affected: i as i64,
                ..Default::default()
            };
            async move {
                store
                    .transition_leased(&j.task.key, j.task.sequence, &owner, &t, 10, 1, None, false)
                    .await
            }
        });
        futures::future::join_all(steps).await
    }

    /// With the handoff, the acknowledgements of a batch of steps are handed over once
    /// committed, each with its outbox id and its step's acknowledgement, and leased: no claim
    /// takes them until they are released (as a stopping sender releases what it did not
    /// send) or their lease ends. A step that recorded nothing hands nothing over.
    async fn steps_hand_their_acknowledgements_over_leased(url: &str) {
        let (store, jobs) = claimed(url).await;
        let store = store.with_ack_handoff(60_000);
        let answers = step_all(&store, &jobs, Some("another claim")).await;
        let (handed, more) = store.take_handed_acks(100);
        assert!(!more);
        assert_eq!(handed.len(), N - 1, "{handed:?}");
        for (i, (job, answer)) in jobs.iter().zip(answers).enumerate() {
            let sequence = answer.expect("step");
            let found = handed
                .iter()
                .find(|h| h.ack.subprocessor == job.task.key.subprocessor);
            if i == ODD {
                assert!(sequence.is_none() && found.is_none(), "{found:?}");
                continue;
            }
            let found = found.expect("handed over");
            assert_eq!(found.controller, "acme");
            assert_eq!(found.ack.request_id, "r-1");
            assert_eq!(
                sequence.and_then(|s| u64::try_from(s).ok()),
                Some(found.ack.sequence)
            );
            assert_eq!(found.ack.state, TaskState::Completed as i32);
            let records = found.ack.evidence.as_ref().map(|e| e.records_affected);
            assert_eq!(records, Some(i as i64));
        }
        assert!(handed.windows(2).all(|w| w[0].id < w[1].id));
        assert!(store.take_handed_acks(100).0.is_empty());
        let claimed = store
            .claim_acks(i64::MAX / 2, 100, 60_000)
            .await
            .expect("claim");
        assert!(claimed.is_empty(), "claimed while leased: {claimed:?}");
        assert!(handed.iter().all(|h| !h.lease_owner.is_empty()));
        let claims: Vec<(i64, &str)> = handed
            .iter()
            .map(|h| (h.id, h.lease_owner.as_str()))
            .collect();
        store.release_acks(&claims).await.expect("release");
        let mut claimed = store
            .claim_acks(i64::MAX / 2, 100, 60_000)
            .await
            .expect("claim");
        claimed.sort_by_key(|j| j.id);
        // The same rows, each under the new claim's token.
        let unowned = |jobs: &[crate::store::AckJob]| -> Vec<crate::store::AckJob> {
            jobs.iter()
                .map(|j| crate::store::AckJob {
                    lease_owner: String::new(),
                    ..j.clone()
                })
                .collect()
        };
        assert_eq!(
            format!("{:?}", unowned(&claimed)),
            format!("{:?}", unowned(&handed))
        );
        assert!(claimed
            .iter()
            .zip(&handed)
            .all(|(c, h)| c.lease_owner != h.lease_owner));
    }

    /// The subprocessors whose steps the trail records, in its order; the chain is valid.
    async fn recorded(store: &Store) -> Vec<String> {
        let entries = store.audit_entries(0, 100).await.expect("entries");
        assert!(
            dsrelay_runtime::audit::verify(&entries).is_ok(),
            "{entries:#?}"
        );
        entries
            .iter()
            .filter(|e| e.event_type == ProcessorAuditEvent::TaskRecorded as i32)
            .map(|e| {
                let rest = e.detail.split("subprocessor ").nth(1).expect("named");
                rest.split(',').next().expect("name").to_string()
            })
            .collect()
    }

    /// Steps queued together are committed in one transaction, their acknowledgements and
    /// entries in the callers' order, and each caller gets its own task's sequence; a step
    /// whose claim was lost gets `None` and records nothing, without holding the others back.
    async fn concurrent_steps_share_one_commit(url: &str) {
        let (store, jobs) = claimed(url).await;
        let before = store.steps.commits.load(Ordering::Relaxed);
        let answers = step_all(&store, &jobs, Some("another claim")).await;
        assert_eq!(store.steps.commits.load(Ordering::Relaxed) - before, 1);
        let mut expected_names = Vec::new();
        for (i, (job, answer)) in jobs.iter().zip(answers).enumerate() {
            let answer = answer.expect("step");
            let task = store.task(&job.task.key).await.expect("task").expect("row");
            if i == ODD {
                assert_eq!(answer, None);
                assert_eq!((task.state, task.sequence), (TaskState::Pending, 1));
            } else {
                assert_eq!(answer, Some(job.task.sequence + 1));
                assert_eq!(
                    (task.state, task.sequence, task.records_affected),
                    (TaskState::Completed, 2, i as i64)
                );
                expected_names.push(job.task.key.subprocessor.clone());
            }
        }
        assert_eq!(recorded(&store).await, expected_names);
        let acks = store.claim_acks(100, 100, 1_000).await.expect("acks");
        let acked: Vec<(String, u64, i64)> = acks
            .iter()
            .map(|a| {
                (
                    a.ack.subprocessor.clone(),
                    a.ack.sequence,
                    a.ack.evidence.as_ref().expect("evidence").records_affected,
                )
            })
            .collect();
        let wanted: Vec<(String, u64, i64)> = (0..N)
            .filter(|i| *i != ODD)
            .map(|i| (format!("s{i}"), 2, i as i64))
            .collect();
        assert_eq!(acked, wanted);
        store.db.pool.close().await;
    }

    /// A step that cannot be written fails its batch's transaction: every step of it is then
    /// written alone, so the others are recorded and only its caller gets the error.
    async fn a_failing_step_leaves_the_others_recorded(url: &str) {
        let (store, jobs) = claimed(url).await;
        let refuse: &[&str] = match store.db.backend {
            Backend::Postgres => &[
                "CREATE FUNCTION refuse_step() RETURNS trigger AS $$ BEGIN \
                 RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER refuse_step BEFORE UPDATE OF state ON tasks FOR EACH ROW \
                 WHEN (NEW.subprocessor = 's3') EXECUTE FUNCTION refuse_step()",
            ],
            Backend::Sqlite => &["CREATE TRIGGER refuse_step BEFORE UPDATE OF state ON tasks \
                 WHEN NEW.subprocessor = 's3' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"],
        };
        for sql in refuse {
            sqlx::query(sql).execute(&store.db.pool).await.expect(sql);
        }
        let before = store.steps.commits.load(Ordering::Relaxed);
        let answers = step_all(&store, &jobs, None).await;
        // The batch failed; each step was then written alone.
        assert_eq!(
            store.steps.commits.load(Ordering::Relaxed) - before,
            N as u64 - 1
        );
        let mut expected_names = Vec::new();
        for (i, (job, answer)) in jobs.iter().zip(answers).enumerate() {
            let task = store.task(&job.task.key).await.expect("task").expect("row");
            if i == ODD {
                let error = format!("{:#}", answer.expect_err("refused"));
                assert!(error.contains("refused by the test"), "{error}");
                assert_eq!((task.state, task.sequence), (TaskState::Pending, 1));
            } else {
                assert_eq!(answer.expect("step"), Some(2));
                assert_eq!((task.state, task.sequence), (TaskState::Completed, 2));
                expected_names.push(job.task.key.subprocessor.clone());
            }
        }
        assert_eq!(recorded(&store).await, expected_names);
        store.db.pool.close().await;
    }

    /// An acknowledgement whose stored payload does not decode is dead-lettered when it is
    /// claimed, with why; the claim answers the others instead of failing whole.
    async fn an_unreadable_acknowledgement_is_dead_lettered_alone(url: &str) {
        let (store, jobs) = claimed(url).await;
        for answer in step_all(&store, &jobs, None).await {
            answer.expect("step");
        }
        sqlx::query(
            "UPDATE ack_outbox SET payload = $1 WHERE id = (SELECT MIN(id) FROM ack_outbox)",
        )
        .bind(vec![0xffu8, 0xff, 0xff])
        .execute(&store.db.pool)
        .await
        .expect("damage one payload");
        let acks = store.claim_acks(100, 100, 1_000).await.expect("claim");
        assert_eq!(acks.len(), N - 1);
        let dead = store.dead_letters(10, 0).await.expect("dead letters");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert!(
            dead[0].last_rejection.contains("does not decode"),
            "{dead:?}"
        );
        assert!(
            !acks.iter().any(|a| a.id == dead[0].id),
            "the unreadable one is not sent"
        );
        store.db.pool.close().await;
    }

    /// Dead letters are listed a page at a time, each once, oldest first.
    async fn dead_letters_page_by_id(url: &str) {
        let (store, jobs) = claimed(url).await;
        for answer in step_all(&store, &jobs, None).await {
            answer.expect("step");
        }
        let acks = store.claim_acks(100, 100, 1_000).await.expect("claim");
        for a in &acks {
            assert!(store
                .ack_rejected((a.id, &a.lease_owner), 5, "INVALID_ARGUMENT: test", 5, 1)
                .await
                .expect("rejected"));
        }
        let mut listed = Vec::new();
        let mut after = 0;
        loop {
            let page = store.dead_letters(3, after).await.expect("page");
            let Some(last) = page.last() else { break };
            after = last.id;
            listed.extend(page.iter().map(|d| d.id));
        }
        let mut ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
        ids.sort();
        assert_eq!(listed, ids);
        store.db.pool.close().await;
    }

    /// Certificates of steps committed together are issued together (one read, one
    /// INSERT): each lists the retained data of its own request as the whole batch leaves
    /// it, not another request's, and each is stored and sent with its acknowledgement.
    async fn certificates_of_a_batch_list_their_own_requests_retained_data(url: &str) {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        let key = dsrelay_runtime::signing::SigningKey::generate();
        let public = key.public_key();
        let issuer = crate::certificates::Issuer::new(key, "spiffe://test/processor".into());
        let store = Store::new(db, b"test key").with_issuer(Some(std::sync::Arc::new(issuer)));
        let subprocessors: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
        for id in ["r-1", "r-2"] {
            let req = DeliverRequest {
                request_id: id.into(),
                kind: RequestKind::Erasure as i32,
                ..Default::default()
            };
            store
                .accept("acme", &req, &subprocessors, None, 1)
                .await
                .expect("accept");
        }
        let mut jobs = store.claim_tasks(2, 8, 60_000).await.expect("claim");
        jobs.sort_by(|a, b| {
            let k = |j: &crate::store::TaskJob| {
                (
                    j.task.key.request_id.clone(),
                    j.task.key.subprocessor.clone(),
                )
            };
            k(a).cmp(&k(b))
        });
        assert_eq!(jobs.len(), 8);
        // r-1's s0 keeps its data first, alone.
        let retained = Transition {
            state: TaskState::Retained,
            records_affected: 1,
            legal_basis: "bookkeeping act".into(),
            retain_until: Some(1_900_000_000_000),
            ..Default::default()
        };
        let first = &jobs[0];
        assert_eq!(
            store
                .transition_leased(
                    &first.task.key,
                    first.task.sequence,
                    &first.lease_owner,
                    &retained,
                    10,
                    1,
                    None,
                    false
                )
                .await
                .expect("retained"),
            Some(first.task.sequence + 1)
        );
        // Then the seven others complete in one commit.
        let before = store.steps.commits.load(Ordering::Relaxed);
        let completed = Transition {
            state: TaskState::Completed,
            records_affected: 2,
            ..Default::default()
        };
        let store = &store;
        let steps = jobs[1..].iter().map(|j| {
            let t = completed.clone();
            async move {
                store
                    .transition_leased(
                        &j.task.key,
                        j.task.sequence,
                        &j.lease_owner,
                        &t,
                        20,
                        1,
                        None,
                        false,
                    )
                    .await
            }
        });
        for answer in futures::future::join_all(steps).await {
            assert!(answer.expect("step").is_some());
        }
        assert_eq!(store.steps.commits.load(Ordering::Relaxed) - before, 1);
        let acks = store.claim_acks(100, 100, 1_000).await.expect("acks");
        assert_eq!(acks.len(), 8);
        let mut ids = std::collections::BTreeSet::new();
        for a in &acks {
            let c = a.ack.certificate.as_ref().expect("every step certified");
            let doc = dsrelay_runtime::signing::Signed {
                body: c.body.clone(),
                signature: c.signature.clone(),
                key_id: c.key_id.clone(),
            };
            let body = public.verify(&doc).expect("signed by the processor's key");
            assert_eq!(body["request_id"], a.ack.request_id.as_str());
            assert_eq!(body["subprocessor"], a.ack.subprocessor.as_str());
            let kept: Vec<&str> = body["retained"]
                .as_array()
                .expect("a list")
                .iter()
                .map(|r| r["subprocessor"].as_str().expect("named"))
                .collect();
            // r-1's tasks leave its s0 retained (its own certificate too); r-2 keeps nothing.
            let wanted: &[&str] = match a.ack.request_id.as_str() {
                "r-1" => &["s0"],
                _ => &[],
            };
            assert_eq!(kept, wanted, "{}", a.ack.request_id);
            assert!(body.get("follows").is_none());
            ids.insert(body["certificate_id"].as_str().expect("id").to_string());
        }
        let stored: Vec<(String,)> = sqlx::query_as("SELECT id FROM certificates ORDER BY id")
            .fetch_all(&store.db.pool)
            .await
            .expect("stored");
        let stored: std::collections::BTreeSet<String> =
            stored.into_iter().map(|(id,)| id).collect();
        assert_eq!(stored, ids);
        store.db.pool.close().await;
    }

    #[tokio::test]
    async fn certificates_of_a_batch_list_their_own_requests_retained_data_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        certificates_of_a_batch_list_their_own_requests_retained_data(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn certificates_of_a_batch_list_their_own_requests_retained_data_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            certificates_of_a_batch_list_their_own_requests_retained_data(&u).await
        })
        .await;
    }

    /// A sender whose lease ran out while the registry was slow to answer, and whose rows
    /// another claim took, records nothing over the new holder: its rejection counts no
    /// second time toward the dead letter, its failure does not free the rows, and its
    /// release at shutdown leaves the new lease alone. The new holder's own answers count.
    async fn an_ack_sender_that_lost_its_lease_records_nothing(url: &str) {
        let (store, jobs) = claimed(url).await;
        for answer in step_all(&store, &jobs, None).await {
            answer.expect("step");
        }
        // The first sender's lease runs out at once; the second's holds.
        let first = store.claim_acks(100, 100, 0).await.expect("claim");
        assert_eq!(first.len(), N);
        let second = store
            .claim_acks(100, 100, 60_000)
            .await
            .expect("claim again");
        assert_eq!(second.len(), N);
        let (late, current) = (&first[0], &second[0]);
        assert_eq!(late.id, current.id);
        assert_ne!(late.lease_owner, current.lease_owner);
        let rejection = "INVALID_ARGUMENT: test";
        assert!(!store
            .ack_rejected((late.id, &late.lease_owner), 5, rejection, 5, 1)
            .await
            .expect("late rejection"));
        store
            .acks_failed(&[(late.id, &late.lease_owner, 5)], "UNAVAILABLE: late")
            .await
            .expect("late failure");
        store
            .release_acks(&[(late.id, &late.lease_owner)])
            .await
            .expect("late release");
        let row: (i64, Option<String>, i64) = sqlx::query_as(
            "SELECT CAST(rejections AS BIGINT), last_error, CAST(attempts AS BIGINT) \
             FROM ack_outbox WHERE id = $1",
        )
        .bind(late.id)
        .fetch_one(&store.db.pool)
        .await
        .expect("row");
        assert_eq!(row, (0, None, 0), "the late sender's answers were recorded");
        assert!(
            store
                .claim_acks(100, 100, 60_000)
                .await
                .expect("claim")
                .is_empty(),
            "the late release freed rows the second sender holds"
        );
        // The current holder's rejection counts, and dead-letters at the limit of one.
        assert!(store
            .ack_rejected((current.id, &current.lease_owner), 5, rejection, 5, 1)
            .await
            .expect("rejection"));
        // Its failure and release count too.
        let (next, rest) = second[1..].split_first().expect("more");
        store
            .acks_failed(&[(next.id, &next.lease_owner, 50)], "UNAVAILABLE")
            .await
            .expect("failure");
        let claims: Vec<(i64, &str)> = rest
            .iter()
            .map(|a| (a.id, a.lease_owner.as_str()))
            .collect();
        store.release_acks(&claims).await.expect("release");
        let again = store.claim_acks(100, 100, 60_000).await.expect("claim");
        let ids: Vec<i64> = again.iter().map(|a| a.id).collect();
        let expected: Vec<i64> = second[1..].iter().map(|a| a.id).collect();
        assert_eq!(ids, expected);
    }

    #[tokio::test]
    async fn an_ack_sender_that_lost_its_lease_records_nothing_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        an_ack_sender_that_lost_its_lease_records_nothing(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn an_ack_sender_that_lost_its_lease_records_nothing_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            an_ack_sender_that_lost_its_lease_records_nothing(&u).await
        })
        .await;
    }

    #[tokio::test]
    async fn dead_letters_page_by_id_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        dead_letters_page_by_id(&format!("sqlite://{}/p.db", dir.path().display())).await;
    }

    #[tokio::test]
    async fn dead_letters_page_by_id_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move { dead_letters_page_by_id(&u).await })
            .await;
    }

    #[tokio::test]
    async fn an_unreadable_acknowledgement_is_dead_lettered_alone_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        an_unreadable_acknowledgement_is_dead_lettered_alone(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn an_unreadable_acknowledgement_is_dead_lettered_alone_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            an_unreadable_acknowledgement_is_dead_lettered_alone(&u).await
        })
        .await;
    }

    #[tokio::test]
    async fn steps_hand_their_acknowledgements_over_leased_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        steps_hand_their_acknowledgements_over_leased(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn steps_hand_their_acknowledgements_over_leased_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            steps_hand_their_acknowledgements_over_leased(&u).await
        })
        .await;
    }

    #[tokio::test]
    async fn concurrent_steps_share_one_commit_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        concurrent_steps_share_one_commit(&format!("sqlite://{}/p.db", dir.path().display())).await;
    }

    #[tokio::test]
    async fn concurrent_steps_share_one_commit_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            concurrent_steps_share_one_commit(&u).await
        })
        .await;
    }

    #[tokio::test]
    async fn a_failing_step_leaves_the_others_recorded_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        a_failing_step_leaves_the_others_recorded(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn a_failing_step_leaves_the_others_recorded_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            a_failing_step_leaves_the_others_recorded(&u).await
        })
        .await;
    }
}
