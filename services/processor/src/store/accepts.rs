//! Group commit for Deliver: concurrent [`Store::accept`] calls (the registry keeps several
//! deliveries in flight) queue their requests, and one writer stores everything queued in a
//! single transaction, each request with its tasks, their audit entries together. Each
//! caller is answered only once its request is durable. As for the runner's steps
//! (`steps`), the writer runs in a task of its own, and when a batch's transaction fails
//! every request of it is stored again alone (`dsrelay_runtime::group_commit`), so one that
//! cannot be stored never takes the others down with it.
//!
//! The batch is written in (controller, request id) byte order, whatever order the calls
//! came in: two replicas writing overlapping batches on PostgreSQL then wait for each
//! other's uniqueness locks in one order, never in a cycle.

use std::sync::atomic::Ordering;

use anyhow::{anyhow, Result};
use dsrelay_proto::v1::DeliverRequest;
use dsrelay_runtime::group_commit::{GroupQueue, Queued};
use tokio::sync::oneshot;

use super::audit;
use super::tasks::{accept_in, Accepted};
use super::Store;

/// Most requests stored in one transaction.
const MAX_BATCH: usize = 64;

/// One queued Deliver, and where its answer goes.
pub(super) struct QueuedAccept {
    controller: String,
    req: DeliverRequest,
    subprocessors: Vec<String>,
    traceparent: Option<String>,
    now: i64,
    answer: oneshot::Sender<Result<Accepted>>,
}

impl Queued for QueuedAccept {
    type Answer = Accepted;
    fn answer_to(self) -> oneshot::Sender<Result<Accepted>> {
        self.answer
    }
}

/// The Deliver calls waiting for a commit.
pub(super) type AcceptQueue = GroupQueue<QueuedAccept>;

impl Store {
    /// Stores a delivered request and one PENDING task per subprocessor, or reports the
    /// existing ones when it was delivered (or cancelled) before. A contract end's terms are
    /// stored with it, and its tasks are SCHEDULED for their start. Concurrent calls share
    /// one transaction (see the module documentation); this returns once the request is
    /// committed.
    pub async fn accept(
        &self,
        controller: &str,
        req: &DeliverRequest,
        subprocessors: &[String],
        traceparent: Option<&str>,
        now: i64,
    ) -> Result<Accepted> {
        let (answer, answered) = oneshot::channel();
        let queued = QueuedAccept {
            controller: controller.to_string(),
            req: req.clone(),
            subprocessors: subprocessors.to_vec(),
            traceparent: traceparent.map(str::to_string),
            now,
            answer,
        };
        if self.accepts.push(queued) {
            let store = self.clone();
            tokio::spawn(async move { store.write_accepts().await });
        }
        answered
            .await
            .map_err(|_| anyhow!("the delivery writer stopped before answering"))?
    }

    /// Commits queued deliveries, a batch at a time, until none is left.
    async fn write_accepts(&self) {
        let store = self.clone();
        self.accepts
            .write_all(MAX_BATCH, "deliveries", move |batch| {
                let store = store.clone();
                Box::pin(async move { store.record_accepts(batch).await })
            })
            .await;
    }

    /// Stores `batch` in one transaction, in key order; answers in the batch's order.
    async fn record_accepts(&self, batch: &[QueuedAccept]) -> Result<Vec<Accepted>> {
        let mut order: Vec<usize> = (0..batch.len()).collect();
        fn key(q: &QueuedAccept) -> (&[u8], &[u8]) {
            (q.controller.as_bytes(), q.req.request_id.as_bytes())
        }
        order.sort_by(|&a, &b| key(&batch[a]).cmp(&key(&batch[b])));
        let mut tx = self.begin_audited().await?;
        let mut answers: Vec<Option<Accepted>> =
            std::iter::repeat_with(|| None).take(batch.len()).collect();
        let mut entries = Vec::new();
        for i in order {
            let q = &batch[i];
            let (accepted, entry) = accept_in(
                &mut tx,
                &q.controller,
                &q.req,
                &q.subprocessors,
                q.traceparent.as_deref(),
                q.now,
            )
            .await?;
            answers[i] = Some(accepted);
            entries.extend(entry);
        }
        if entries.is_empty() {
            // Only deliveries seen before: nothing to commit.
            tx.rollback().await?;
        } else {
            audit::append_all(&mut tx, entries).await?;
            tx.commit().await?;
            self.accepts.commits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(answers.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{ProcessorAuditEvent, RequestKind};
    use dsrelay_runtime::store::{Backend, Db};

    use super::*;
    use crate::store::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    /// Deliveries made at once.
    const N: usize = 8;
    /// The one delivered twice in the same batch, and the one a trigger refuses.
    const ODD: usize = 3;

    async fn store(url: &str) -> Store {
        let db = Db::connect(url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        Store::new(db, b"test key")
    }

    /// Delivers `ids` at once (in this order), each to subprocessors `a` and `b`.
    async fn deliver_all(store: &Store, ids: &[String]) -> Vec<Result<Accepted>> {
        let subprocessors = vec!["a".to_string(), "b".to_string()];
        let calls = ids.iter().map(|id| {
            let req = DeliverRequest {
                request_id: id.clone(),
                kind: RequestKind::Erasure as i32,
                ..Default::default()
            };
            let subprocessors = subprocessors.clone();
            async move { store.accept("acme", &req, &subprocessors, None, 1).await }
        });
        futures::future::join_all(calls).await
    }

    /// The requests whose acceptance the trail records, in its order; the chain is valid.
    async fn accepted_in_trail(store: &Store) -> Vec<String> {
        let entries = store.audit_entries(0, 100).await.expect("entries");
        assert!(
            dsrelay_runtime::audit::verify(&entries).is_ok(),
            "{entries:#?}"
        );
        entries
            .iter()
            .filter(|e| e.event_type == ProcessorAuditEvent::RequestAccepted as i32)
            .map(|e| e.request_id.clone())
            .collect()
    }

    /// Deliveries made at once are stored in one transaction, each caller answered with its
    /// own tasks as a read finds them; a second delivery of a request in the same batch is
    /// answered as a duplicate with the tasks the first one stored; the trail records each
    /// request once, in key order (the order the batch is written in, not the calls').
    async fn concurrent_deliveries_share_one_commit(url: &str) {
        let store = store(url).await;
        // Called in reverse key order, with r-3 delivered twice.
        let mut ids: Vec<String> = (0..N).rev().map(|i| format!("r-{i}")).collect();
        ids.push(format!("r-{ODD}"));
        let before = store.accepts.commits.load(Ordering::Relaxed);
        let answers = deliver_all(&store, &ids).await;
        assert_eq!(store.accepts.commits.load(Ordering::Relaxed) - before, 1);
        let mut duplicates = 0;
        for (id, answer) in ids.iter().zip(answers) {
            let read = store.tasks("acme", id).await.expect("tasks");
            assert_eq!(read.len(), 2, "{id}");
            let tasks = match answer.expect("accept") {
                Accepted::New(t) => t,
                Accepted::Duplicate(t) => {
                    duplicates += 1;
                    assert_eq!(id, &format!("r-{ODD}"));
                    t
                }
            };
            assert_eq!(format!("{tasks:?}"), format!("{read:?}"), "{id}");
        }
        assert_eq!(duplicates, 1);
        let in_key_order: Vec<String> = (0..N).map(|i| format!("r-{i}")).collect();
        assert_eq!(accepted_in_trail(&store).await, in_key_order);
        store.db.pool.close().await;
    }

    /// A delivery that cannot be stored fails its batch's transaction: every delivery of it
    /// is then stored alone, so the others are stored and only its caller gets the error.
    async fn a_failing_delivery_leaves_the_others_stored(url: &str) {
        let store = store(url).await;
        let refuse: &[&str] = match store.db.backend {
            Backend::Postgres => &[
                "CREATE FUNCTION refuse_delivery() RETURNS trigger AS $$ BEGIN \
                 RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER refuse_delivery BEFORE INSERT ON tasks FOR EACH ROW \
                 WHEN (NEW.request_id = 'r-3') EXECUTE FUNCTION refuse_delivery()",
            ],
            Backend::Sqlite => {
                &["CREATE TRIGGER refuse_delivery BEFORE INSERT ON tasks \
                 WHEN NEW.request_id = 'r-3' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"]
            }
        };
        for sql in refuse {
            sqlx::query(sql).execute(&store.db.pool).await.expect(sql);
        }
        let ids: Vec<String> = (0..N).map(|i| format!("r-{i}")).collect();
        let before = store.accepts.commits.load(Ordering::Relaxed);
        let answers = deliver_all(&store, &ids).await;
        // The batch failed; each delivery was then stored alone.
        assert_eq!(
            store.accepts.commits.load(Ordering::Relaxed) - before,
            N as u64 - 1
        );
        for (i, (id, answer)) in ids.iter().zip(answers).enumerate() {
            let stored = store.request_exists("acme", id).await.expect("exists");
            if i == ODD {
                let error = format!("{:#}", answer.expect_err("refused"));
                assert!(error.contains("refused by the test"), "{error}");
                assert!(!stored, "nothing of a refused delivery is kept");
            } else {
                assert!(matches!(answer.expect("accept"), Accepted::New(t) if t.len() == 2));
                assert!(stored);
            }
        }
        let stored: Vec<String> = (0..N)
            .filter(|i| *i != ODD)
            .map(|i| format!("r-{i}"))
            .collect();
        assert_eq!(accepted_in_trail(&store).await, stored);
        store.db.pool.close().await;
    }

    #[tokio::test]
    async fn concurrent_deliveries_share_one_commit_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        concurrent_deliveries_share_one_commit(&format!("sqlite://{}/p.db", dir.path().display()))
            .await;
    }

    #[tokio::test]
    async fn concurrent_deliveries_share_one_commit_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            concurrent_deliveries_share_one_commit(&u).await
        })
        .await;
    }

    #[tokio::test]
    async fn a_failing_delivery_leaves_the_others_stored_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        a_failing_delivery_leaves_the_others_stored(&format!(
            "sqlite://{}/p.db",
            dir.path().display()
        ))
        .await;
    }

    #[tokio::test]
    async fn a_failing_delivery_leaves_the_others_stored_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move {
            a_failing_delivery_leaves_the_others_stored(&u).await
        })
        .await;
    }
}
