//! Forgetting a finished request: its raw identities, body, the free text kept with it and
//! its tasks, and the acknowledgements already sent (and the free text of those
//! dead-lettered), once every task reached a final state and `forget_after_days` have
//! passed; keyed identity hashes stay, and a legal basis, and where a TRANSFER's data went,
//! stay only as their keyed hash.

use anyhow::Result;
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{Acknowledgement, RequestKind, TaskState, TransferReceipt};

use super::audit::AuditTx;
use super::rows::{request_kind, state_value};
use super::Store;

/// Task states that never change again. RETAINED is not among them: the holder still keeps
/// data, and the processor needs the identities to erase it at each of its release dates.
pub(crate) const FINAL: [TaskState; 5] = [
    TaskState::Completed,
    TaskState::NotFound,
    TaskState::Refused,
    TaskState::Failed,
    TaskState::Cancelled,
];

/// A request the processor may forget, with what it still holds.
#[derive(Debug, sqlx::FromRow)]
pub struct Forgettable {
    /// The controller that delivered it.
    pub controller: String,
    /// The registry's request id.
    pub request_id: String,
    /// The encoded DeliverRequest (the raw identities), if still there.
    pub body: Option<Vec<u8>>,
    /// When it was accepted (ms): the order [`Store::requests_to_forget`] lists them in.
    pub accepted_at: i64,
}

/// The condition, on `requests r`, under which a request may be forgotten with `$1` the
/// cutoff (ms): accepted (or cancelled) by then, every task final since by then, nothing
/// left to send (acknowledgements, uploads). A dead-lettered acknowledgement does not hold
/// the request back: nothing sends it until an operator requeues it, which may be never,
/// and the raw identities are not needed to send it.
fn forgettable_where() -> String {
    let finals = FINAL
        .iter()
        .map(|s| state_value(*s).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "r.forgotten_at IS NULL AND r.accepted_at <= $1 \
         AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.controller = r.controller \
           AND t.request_id = r.request_id AND (t.state NOT IN ({finals}) OR t.updated_at > $1)) \
         AND NOT EXISTS (SELECT 1 FROM ack_outbox a WHERE a.controller = r.controller \
           AND a.request_id = r.request_id AND a.sent_at IS NULL \
           AND a.dead_lettered_at IS NULL) \
         AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.controller = r.controller \
           AND u.request_id = r.request_id AND u.done_at IS NULL)"
    )
}

/// What a dead-lettered acknowledgement of a forgotten request says instead of the holder's
/// free text, which may name the subject.
pub(crate) const FORGOTTEN_TEXT: &str = "(removed when the processor forgot the request)";

/// Removes the free text (the holder's note, the reason) from `r`'s dead-lettered
/// acknowledgements, inside the forgetting transaction `tx`, and replaces a legal basis with
/// its keyed hash as the audit trail holds it (so a requeue still says a basis was given),
/// and so the recipient's name in a `transfer`'s receipt ([`hash_recipient`]), keeping what
/// a requeue still sends: the state, sequence, counts, retain-until, certificate, the rest
/// of the receipt. Locks the request's unsent acknowledgements first (PostgreSQL), so a
/// requeue committing meanwhile is seen: returns false when one of them is no longer
/// dead-lettered, and the request is not forgotten yet.
async fn strip_dead_letters(
    tx: &mut AuditTx,
    r: &Forgettable,
    transfer: bool,
    backend: dsrelay_runtime::store::Backend,
) -> Result<bool> {
    let unsent: Vec<(i64, Vec<u8>, Option<i64>)> = sqlx::query_as(&format!(
        "SELECT id, payload, dead_lettered_at FROM ack_outbox WHERE controller = $1 \
         AND request_id = $2 AND sent_at IS NULL ORDER BY id{}",
        backend.lock_rows()
    ))
    .bind(&r.controller)
    .bind(&r.request_id)
    .fetch_all(&mut **tx)
    .await?;
    if unsent.iter().any(|(_, _, dead)| dead.is_none()) {
        return Ok(false);
    }
    for (id, payload, _) in unsent {
        // A payload that does not decode was never sendable; nothing of it is kept.
        let stripped = match Acknowledgement::decode(payload.as_slice()) {
            Ok(mut ack) => {
                if let Some(evidence) = ack.evidence.as_mut() {
                    if !evidence.note.is_empty() {
                        evidence.note = FORGOTTEN_TEXT.into();
                    }
                }
                if !ack.reason.is_empty() {
                    ack.reason = FORGOTTEN_TEXT.into();
                }
                ack.legal_basis = tx.text(&ack.legal_basis);
                let receipt = ack
                    .evidence
                    .as_mut()
                    .and_then(|e| e.transfer_receipt.as_mut());
                if let Some(receipt) = receipt.filter(|_| transfer) {
                    hash_recipient(tx, receipt);
                }
                ack.encode_to_vec()
            }
            Err(_) => Vec::new(),
        };
        sqlx::query("UPDATE ack_outbox SET payload = $1, last_error = NULL WHERE id = $2")
            .bind(stripped)
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(true)
}

/// The texts of a task that forgetting replaces with their keyed hash: read once, before
/// the replacing starts.
#[derive(sqlx::FromRow)]
struct TaskTexts {
    subprocessor: String,
    /// Hashed when not empty.
    legal_basis: String,
    /// Its recipient's name hashed when the request is a TRANSFER.
    transfer_receipt: Option<Vec<u8>>,
}

/// Replaces the recipient's name in a TRANSFER's `receipt` with its keyed hash, as
/// [`hash_transfer_recipient`] leaves the request's, and empties the recipient's signature
/// and key id, which covered that name (and name the recipient), as the registry leaves a
/// forgotten request's receipts.
fn hash_recipient(tx: &AuditTx, receipt: &mut TransferReceipt) {
    receipt.recipient = tx.text(&receipt.recipient);
    receipt.signature.clear();
    receipt.key_id.clear();
}

/// Replaces where `r`'s data went, when it is a TRANSFER, with its keyed hash (as
/// [`AuditTx::text`] writes it), inside the forgetting transaction `tx`: the recipient the
/// registry named (name, endpoint, certificate identity) and the recipient's name in the
/// receipts of its `tasks` (as read before). They tell where the subject moved their data,
/// and nothing still needs them: the upload that used them is retired (or the request would
/// not be forgotten) and a final task is never claimed again. Hashed, not emptied, so the
/// request still shows that a recipient was named, one whoever holds the key can match
/// against a name. A contract end's recipient stays: the controller's successor, not a
/// subject's choice, and an update of the terms is still checked against it. Answers
/// whether `r` is a TRANSFER.
async fn hash_transfer_recipient(
    tx: &mut AuditTx,
    r: &Forgettable,
    tasks: &[TaskTexts],
) -> Result<bool> {
    type Recipient = (i64, Option<String>, Option<String>, Option<String>);
    let (kind, name, endpoint, identity): Recipient = sqlx::query_as(
        "SELECT kind, recipient_name, recipient_endpoint, recipient_identity FROM requests \
         WHERE controller = $1 AND request_id = $2",
    )
    .bind(&r.controller)
    .bind(&r.request_id)
    .fetch_one(&mut **tx)
    .await?;
    if request_kind(kind) != RequestKind::Transfer {
        return Ok(false);
    }
    let [name, endpoint, identity] = [name, endpoint, identity].map(|t| t.map(|t| tx.text(&t)));
    sqlx::query(
        "UPDATE requests SET recipient_name = $1, recipient_endpoint = $2, \
         recipient_identity = $3 WHERE controller = $4 AND request_id = $5",
    )
    .bind(name)
    .bind(endpoint)
    .bind(identity)
    .bind(&r.controller)
    .bind(&r.request_id)
    .execute(&mut **tx)
    .await?;
    for t in tasks {
        let Some(bytes) = &t.transfer_receipt else {
            continue;
        };
        // Written from a decoded message, so it decodes again; one that did not could hold
        // anything, and goes (a read shows it as no receipt either way).
        let receipt = TransferReceipt::decode(bytes.as_slice())
            .ok()
            .map(|mut receipt| {
                hash_recipient(tx, &mut receipt);
                receipt.encode_to_vec()
            });
        sqlx::query(
            "UPDATE tasks SET transfer_receipt = $1 WHERE controller = $2 AND request_id = $3 \
             AND subprocessor = $4",
        )
        .bind(receipt)
        .bind(&r.controller)
        .bind(&r.request_id)
        .bind(&t.subprocessor)
        .execute(&mut **tx)
        .await?;
    }
    Ok(true)
}

impl Store {
    /// Up to `limit` requests not forgotten yet whose tasks all reached a final state at or
    /// before `cutoff` (ms) and have nothing left to send, the longest accepted first (ties
    /// in key order), those after `after` only.
    pub async fn requests_to_forget(
        &self,
        cutoff: i64,
        after: Option<&Forgettable>,
        limit: i64,
    ) -> Result<Vec<Forgettable>> {
        // Keyed on the order itself, so a batch goes on after the last one's end whether or
        // not its requests could be forgotten.
        let after_clause = match after {
            Some(_) => "AND (r.accepted_at, r.controller, r.request_id) > ($3, $4, $5) ",
            None => "",
        };
        let sql = format!(
            "SELECT r.controller, r.request_id, r.body, r.accepted_at FROM requests r \
             WHERE {} {after_clause}\
             ORDER BY r.accepted_at, r.controller, r.request_id LIMIT $2",
            forgettable_where()
        );
        let mut q = sqlx::query_as(&sql).bind(cutoff).bind(limit);
        if let Some(c) = after {
            q = q
                .bind(c.accepted_at)
                .bind(&c.controller)
                .bind(&c.request_id);
        }
        Ok(q.fetch_all(&self.db.pool).await?)
    }

    /// Removes the request's body and cancel reason, keeping `identity_hashes` (a JSON
    /// array), and its tasks' notes, reasons, errors, connector handles and export file
    /// lists, the payloads of its sent acknowledgements (they repeat the notes), and the
    /// note and reason in its dead-lettered ones (the rest stays, for a requeue). A legal
    /// basis, of a task or a dead-lettered acknowledgement, is replaced by its keyed hash
    /// (`text hmac-sha256:<hex>`, as the audit trail holds it): it may name the subject, and
    /// the hash still shows that one was given. So is a TRANSFER's recipient, in the request
    /// and in its receipts (`hash_transfer_recipient`). Returns false, changing nothing,
    /// when the request no longer qualifies (a task moved, or it was forgotten already).
    pub async fn forget_request(
        &self,
        r: &Forgettable,
        identity_hashes: &str,
        cutoff: i64,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.begin_audited().await?;
        // Locked first, as an operator's retry locks it (PostgreSQL): the UPDATE's
        // subquery then sees a retry that committed while this waited, and leaves its task
        // alone; without the lock it would keep what it saw before the retry.
        super::lock_requests(&mut tx, &[(&r.controller, &r.request_id)]).await?;
        // `forgotten_at IS NULL` on the row updated, not only in the subquery: replicas
        // forgetting side by side (PostgreSQL) wait for each other's lock on this row, and
        // only the row's own condition is checked again once the other one committed (the
        // subquery keeps what the statement first saw), so the second one changes nothing
        // and records no second entry.
        let changed = sqlx::query(&format!(
            "UPDATE requests SET body = NULL, cancel_reason = NULL, identity_hashes = $2, \
             forgotten_at = $3 WHERE controller = $4 AND request_id = $5 \
             AND forgotten_at IS NULL AND EXISTS \
             (SELECT 1 FROM requests r WHERE r.controller = $4 AND r.request_id = $5 AND {})",
            forgettable_where()
        ))
        .bind(cutoff)
        .bind(identity_hashes)
        .bind(now)
        .bind(&r.controller)
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "UPDATE tasks SET note = '', reason = '', last_error = NULL, handle = NULL, \
             export_files = NULL WHERE controller = $1 AND request_id = $2",
        )
        .bind(&r.controller)
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?;
        // Forgotten, a FAILED task is never retried: a contract end's that failed after its
        // export began leaves at its holder what the export recorded for the erasure after
        // it, which the forget worker's sweep has the holder discard (`crate::holder_discard`).
        sqlx::query(
            "UPDATE tasks SET holder_discard_at = $1 WHERE controller = $2 AND request_id = $3 \
             AND state = $4 AND export_started_at IS NOT NULL AND holder_discard_at IS NULL",
        )
        .bind(now)
        .bind(&r.controller)
        .bind(&r.request_id)
        .bind(state_value(TaskState::Failed))
        .execute(&mut *tx)
        .await?;
        let tasks: Vec<TaskTexts> = sqlx::query_as(
            "SELECT subprocessor, legal_basis, transfer_receipt FROM tasks WHERE controller = $1 \
             AND request_id = $2 AND (legal_basis <> '' OR transfer_receipt IS NOT NULL)",
        )
        .bind(&r.controller)
        .bind(&r.request_id)
        .fetch_all(&mut *tx)
        .await?;
        for t in tasks.iter().filter(|t| !t.legal_basis.is_empty()) {
            sqlx::query(
                "UPDATE tasks SET legal_basis = $1 WHERE controller = $2 AND request_id = $3 \
                 AND subprocessor = $4",
            )
            .bind(tx.text(&t.legal_basis))
            .bind(&r.controller)
            .bind(&r.request_id)
            .bind(&t.subprocessor)
            .execute(&mut *tx)
            .await?;
        }
        let transfer = hash_transfer_recipient(&mut tx, r, &tasks).await?;
        if !strip_dead_letters(&mut tx, r, transfer, self.db.backend).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "UPDATE ack_outbox SET payload = $1, last_error = NULL \
             WHERE controller = $2 AND request_id = $3 AND sent_at IS NOT NULL",
        )
        .bind(Vec::<u8>::new())
        .bind(&r.controller)
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE uploads SET last_error = NULL WHERE controller = $1 AND request_id = $2",
        )
        .bind(&r.controller)
        .bind(&r.request_id)
        .execute(&mut *tx)
        .await?;
        let record = super::audit::Record {
            controller: &r.controller,
            request_id: &r.request_id,
            actor: "",
            detail: "raw identities, body, notes and exports removed; keyed hashes kept".into(),
        };
        let event = dsrelay_proto::v1::ProcessorAuditEvent::RequestForgotten;
        super::audit::append(&mut tx, event, now, record).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// After forgetting on SQLite, empties the write-ahead log, whose old page versions still
    /// hold what was forgotten (`secure_delete`, set on every connection, zeroes freed space
    /// in the database file). PostgreSQL keeps old row versions until VACUUM reclaims them.
    /// Returns false when a reader kept part of the log in use: call again later.
    pub async fn scrub_log(&self) -> Result<bool> {
        if self.db.backend != dsrelay_runtime::store::Backend::Sqlite {
            return Ok(true);
        }
        // One row: (busy, frames in the log, frames checkpointed); busy is 1 when a reader
        // or writer stopped it from finishing.
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.db.pool)
            .await?;
        Ok(busy == 0)
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{DeliverRequest, RequestKind};
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::store::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    async fn store(dir: &std::path::Path) -> Store {
        store_at(&format!("sqlite://{}/processor.db", dir.display())).await
    }

    async fn store_at(url: &str) -> Store {
        let db = Db::connect(url).await.unwrap();
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .unwrap();
        Store::new(db, b"test key")
    }

    /// A request accepted at 0 with one task per `(subprocessor, state, updated_at)`.
    async fn request(store: &Store, id: &str, tasks: &[(&str, TaskState, i64)]) {
        let req = DeliverRequest {
            request_id: id.into(),
            kind: RequestKind::Erasure as i32,
            ..Default::default()
        };
        let subprocessors: Vec<String> = tasks.iter().map(|t| t.0.to_string()).collect();
        store
            .accept("c", &req, &subprocessors, None, 0)
            .await
            .unwrap();
        for (s, state, at) in tasks {
            sqlx::query(
                "UPDATE tasks SET state = $1, updated_at = $2, note = 'erased subject@x' \
                 WHERE request_id = $3 AND subprocessor = $4",
            )
            .bind(state_value(*state))
            .bind(*at)
            .bind(id)
            .bind(*s)
            .execute(&store.db.pool)
            .await
            .unwrap();
        }
    }

    /// A cancellation arriving after the request was forgotten does not bring free text
    /// back: the reason is not stored.
    #[tokio::test]
    async fn a_cancellation_after_forgetting_stores_no_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        request(&store, "done", &[("a", TaskState::Completed, 100)]).await;
        let due = store.requests_to_forget(500, None, 10).await.unwrap();
        assert!(store.forget_request(&due[0], "[]", 500, 900).await.unwrap());
        store
            .cancel("c", "done", "asked by subject@x", 950)
            .await
            .unwrap();
        let (reason, cancelled_at): (Option<String>, Option<i64>) = sqlx::query_as(
            "SELECT cancel_reason, cancelled_at FROM requests WHERE request_id = 'done'",
        )
        .fetch_one(&store.db.pool)
        .await
        .unwrap();
        assert_eq!((reason, cancelled_at), (None, Some(950)));
    }

    fn ids(due: &[Forgettable]) -> Vec<&str> {
        due.iter().map(|r| r.request_id.as_str()).collect()
    }

    #[tokio::test]
    async fn requests_with_open_or_retained_tasks_or_unsent_acks_are_kept() {
        use TaskState::*;
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        request(
            &store,
            "done",
            &[("a", Completed, 100), ("b", NotFound, 200)],
        )
        .await;
        request(
            &store,
            "failed",
            &[("a", Failed, 100), ("b", Cancelled, 100)],
        )
        .await;
        request(
            &store,
            "retained",
            &[("a", Completed, 100), ("b", Retained, 100)],
        )
        .await;
        request(
            &store,
            "open",
            &[("a", Completed, 100), ("b", InProgress, 100)],
        )
        .await;
        request(&store, "recent", &[("a", Refused, 501)]).await;
        request(&store, "unsent", &[("a", Completed, 100)]).await;
        sqlx::query(
            "INSERT INTO ack_outbox (controller, request_id, subprocessor, sequence, payload, \
             next_attempt_at) VALUES ('c', 'unsent', 'a', 2, x'00', 0)",
        )
        .execute(&store.db.pool)
        .await
        .unwrap();
        let due = store.requests_to_forget(500, None, 10).await.unwrap();
        assert_eq!(ids(&due), ["done", "failed"]);
        assert!(due[0].body.is_some());

        assert!(store
            .forget_request(&due[0], "[\"h\"]", 500, 900)
            .await
            .unwrap());
        assert!(!store
            .forget_request(&due[0], "[\"h\"]", 500, 900)
            .await
            .unwrap());
        let (body, hashes, at): (Option<Vec<u8>>, Option<String>, Option<i64>) = sqlx::query_as(
            "SELECT body, identity_hashes, forgotten_at FROM requests WHERE request_id = 'done'",
        )
        .fetch_one(&store.db.pool)
        .await
        .unwrap();
        assert_eq!(
            (body, hashes.as_deref(), at),
            (None, Some("[\"h\"]"), Some(900))
        );
        let notes: Vec<String> =
            sqlx::query_scalar("SELECT note FROM tasks WHERE request_id = 'done'")
                .fetch_all(&store.db.pool)
                .await
                .unwrap();
        assert_eq!(notes, ["", ""]);
        // A task that moved after selection stops the forgetting.
        sqlx::query(
            "UPDATE tasks SET state = $1 WHERE request_id = 'failed' AND subprocessor = 'a'",
        )
        .bind(state_value(Retained))
        .execute(&store.db.pool)
        .await
        .unwrap();
        assert!(!store.forget_request(&due[1], "[]", 500, 900).await.unwrap());
        assert!(ids(&store.requests_to_forget(500, None, 10).await.unwrap()).is_empty());
        // The retained one is forgotten once its task is erased (COMPLETED) and the window
        // passed since.
        sqlx::query("UPDATE tasks SET state = $1, updated_at = 600 WHERE request_id = 'retained'")
            .bind(state_value(Completed))
            .execute(&store.db.pool)
            .await
            .unwrap();
        assert!(ids(&store.requests_to_forget(500, None, 10).await.unwrap()).is_empty());
        // All accepted at 0: in key order.
        assert_eq!(
            ids(&store.requests_to_forget(600, None, 10).await.unwrap()),
            ["recent", "retained"]
        );
    }

    /// Two replicas forgetting the same request side by side: the one that waited for the
    /// other's lock on the request finds it forgotten, changes nothing and records no entry.
    #[tokio::test]
    async fn a_request_forgotten_meanwhile_is_not_forgotten_again_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            use TaskState::*;
            let store = store_at(&url).await;
            request(&store, "done", &[("a", Completed, 100)]).await;
            let due = store.requests_to_forget(500, None, 10).await.unwrap();
            assert_eq!(ids(&due), ["done"]);
            // The other replica's forgetting, not committed yet.
            let mut other = store.db.pool.begin().await.unwrap();
            sqlx::query("UPDATE requests SET forgotten_at = 800 WHERE request_id = 'done'")
                .execute(&mut *other)
                .await
                .unwrap();
            let forgetting = {
                let store = store.clone();
                tokio::spawn(async move {
                    let r = Forgettable {
                        controller: "c".into(),
                        request_id: "done".into(),
                        body: None,
                        accepted_at: 0,
                    };
                    store.forget_request(&r, "[]", 500, 900).await.unwrap()
                })
            };
            crate::test_postgres::until_waiting_for_a_lock(&store.db.pool).await;
            other.commit().await.unwrap();
            assert!(!forgetting.await.unwrap());
            let entries = store.audit_entries(0, 100).await.unwrap();
            let forgotten = dsrelay_proto::v1::ProcessorAuditEvent::RequestForgotten as i32;
            assert!(!entries.iter().any(|e| e.event_type == forgotten));
            let at: Option<i64> =
                sqlx::query_scalar("SELECT forgotten_at FROM requests WHERE request_id = 'done'")
                    .fetch_one(&store.db.pool)
                    .await
                    .unwrap();
            assert_eq!(at, Some(800));
            store.db.pool.close().await;
        })
        .await;
    }

    /// An acknowledgement the registry kept rejecting, parked for an operator, as the
    /// rejection that dead-lettered it leaves it, its note and reason naming the subject.
    async fn dead_letter(store: &Store, id: &str) {
        let ack = Acknowledgement {
            request_id: id.into(),
            subprocessor: "a".into(),
            sequence: 2,
            state: TaskState::Refused as i32,
            reason: "subject@x is a party to a dispute".into(),
            evidence: Some(dsrelay_proto::v1::Evidence {
                records_affected: 3,
                note: "found subject@x in 3 rows".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        sqlx::query(
            "INSERT INTO ack_outbox (controller, request_id, subprocessor, sequence, payload, \
             next_attempt_at, last_error, dead_lettered_at) \
             VALUES ('c', $1, 'a', 2, $2, 0, 'rejected: subject@x', 300)",
        )
        .bind(id)
        .bind(ack.encode_to_vec())
        .execute(&store.db.pool)
        .await
        .unwrap();
    }

    async fn payload(store: &Store, id: &str) -> Vec<u8> {
        sqlx::query_scalar("SELECT payload FROM ack_outbox WHERE request_id = $1")
            .bind(id)
            .fetch_one(&store.db.pool)
            .await
            .unwrap()
    }

    /// A dead-lettered acknowledgement, which nothing sends until an operator requeues it,
    /// does not keep the request's raw identities: the request is forgotten at its time,
    /// and the acknowledgement keeps what it reports without the holder's free text, so a
    /// requeue after that still tells the registry the outcome.
    async fn a_dead_letter_does_not_hold_forgetting_back(url: &str) {
        let store = store_at(url).await;
        request(&store, "parked", &[("a", TaskState::Refused, 100)]).await;
        dead_letter(&store, "parked").await;
        let due = store.requests_to_forget(500, None, 10).await.unwrap();
        assert_eq!(ids(&due), ["parked"]);
        assert!(store.forget_request(&due[0], "[]", 500, 900).await.unwrap());
        let body: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body FROM requests WHERE request_id = 'parked'")
                .fetch_one(&store.db.pool)
                .await
                .unwrap();
        assert_eq!(body, None);
        let kept = payload(&store, "parked").await;
        assert!(
            !String::from_utf8_lossy(&kept).contains("subject@x"),
            "{kept:?}"
        );
        let ack = Acknowledgement::decode(kept.as_slice()).unwrap();
        assert_eq!(
            (ack.state, ack.sequence, ack.reason.as_str()),
            (TaskState::Refused as i32, 2, FORGOTTEN_TEXT)
        );
        let evidence = ack.evidence.unwrap();
        assert_eq!(
            (evidence.records_affected, evidence.note.as_str()),
            (3, FORGOTTEN_TEXT)
        );
        let error: Option<String> =
            sqlx::query_scalar("SELECT last_error FROM ack_outbox WHERE request_id = 'parked'")
                .fetch_one(&store.db.pool)
                .await
                .unwrap();
        assert_eq!(error, None);
        // Still the operator's to requeue.
        let letters = store.dead_letters(10, 0).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert!(store
            .requeue_dead_letter(letters[0].id, "op", 1000)
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn a_dead_letter_does_not_hold_forgetting_back_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/processor.db", dir.path().display());
        a_dead_letter_does_not_hold_forgetting_back(&url).await;
    }

    #[tokio::test]
    async fn a_dead_letter_does_not_hold_forgetting_back_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            a_dead_letter_does_not_hold_forgetting_back(&url).await;
        })
        .await;
    }

    /// A legal basis may name the subject (a dispute they are party to): forgetting replaces
    /// it with its keyed hash, the very one the audit trail holds for the step that reported
    /// it, in a dead-lettered acknowledgement (the RETAINED report the registry kept
    /// rejecting, the task COMPLETED since) and in a task row, so both still show that a basis
    /// was given. The state, counts and date a requeue reports stay.
    async fn a_legal_basis_is_kept_as_its_keyed_hash(url: &str) {
        let store = store_at(url).await;
        request(&store, "kept", &[("a", TaskState::Pending, 0)]).await;
        let key = crate::store::TaskKey {
            controller: "c".into(),
            request_id: "kept".into(),
            subprocessor: "a".into(),
        };
        let basis = "accounting law; subject@x disputes invoice 7";
        let retained = crate::store::Transition {
            state: TaskState::Retained,
            records_affected: 3,
            confirmed: true,
            legal_basis: basis.into(),
            retain_until: Some(400),
            next_attempt_at: Some(400),
            ..Default::default()
        };
        let seq = store
            .transition(&key, 1, &retained, 100, 1)
            .await
            .unwrap()
            .unwrap();
        sqlx::query("UPDATE ack_outbox SET dead_lettered_at = 150 WHERE sequence = $1")
            .bind(seq)
            .execute(&store.db.pool)
            .await
            .unwrap();
        let completed = crate::store::Transition {
            state: TaskState::Completed,
            records_affected: 5,
            confirmed: true,
            ..Default::default()
        };
        let seq = store
            .transition(&key, seq, &completed, 200, 2)
            .await
            .unwrap()
            .unwrap();
        sqlx::query("UPDATE ack_outbox SET sent_at = 250 WHERE sequence = $1")
            .bind(seq)
            .execute(&store.db.pool)
            .await
            .unwrap();
        // A second task whose row still holds a basis in its final state.
        request(&store, "kept-too", &[("b", TaskState::Refused, 100)]).await;
        sqlx::query("UPDATE tasks SET legal_basis = $1 WHERE request_id = 'kept-too'")
            .bind(basis)
            .execute(&store.db.pool)
            .await
            .unwrap();

        let hash = {
            let tx = store.begin_audited().await.unwrap();
            let hash = tx.text(basis);
            tx.rollback().await.unwrap();
            hash
        };
        assert!(hash.starts_with("text hmac-sha256:"), "{hash}");
        let entries = store.audit_entries(0, 100).await.unwrap();
        assert!(
            entries.iter().any(|e| e.detail.contains(&hash)),
            "the audit trail holds the basis as {hash}: {entries:?}"
        );

        let due = store.requests_to_forget(500, None, 10).await.unwrap();
        assert_eq!(ids(&due), ["kept", "kept-too"]);
        for r in &due {
            assert!(store.forget_request(r, "[]", 500, 900).await.unwrap());
        }
        let parked: Vec<u8> = sqlx::query_scalar(
            "SELECT payload FROM ack_outbox WHERE request_id = 'kept' \
             AND dead_lettered_at IS NOT NULL",
        )
        .fetch_one(&store.db.pool)
        .await
        .unwrap();
        let ack = Acknowledgement::decode(parked.as_slice()).unwrap();
        assert_eq!(ack.legal_basis, hash);
        assert_eq!(
            (ack.state(), ack.retain_until.map(|t| t.seconds)),
            (TaskState::Retained, Some(0))
        );
        assert_eq!(ack.evidence.map(|e| e.records_affected), Some(3));
        let bases: Vec<String> =
            sqlx::query_scalar("SELECT legal_basis FROM tasks ORDER BY request_id")
                .fetch_all(&store.db.pool)
                .await
                .unwrap();
        assert_eq!(bases, ["", hash.as_str()]);
        let raw: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE legal_basis LIKE '%subject@x%'",
        )
        .fetch_one(&store.db.pool)
        .await
        .unwrap();
        assert_eq!(raw, 0);
    }

    #[tokio::test]
    async fn a_legal_basis_is_kept_as_its_keyed_hash_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/processor.db", dir.path().display());
        a_legal_basis_is_kept_as_its_keyed_hash(&url).await;
    }

    #[tokio::test]
    async fn a_legal_basis_is_kept_as_its_keyed_hash_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            a_legal_basis_is_kept_as_its_keyed_hash(&url).await;
        })
        .await;
    }

    /// Where a TRANSFER's data went says where the subject moved it: forgetting leaves the
    /// recipient the registry named (name, endpoint, identity) and the name in each receipt,
    /// in a task and in a dead-lettered acknowledgement, only as its keyed hash. Not before:
    /// while the export is still to go, the request is not forgotten and the upload reaches
    /// the recipient as named. Afterwards the receipts keep their proof, a requeue is still
    /// sent, and the audit trail, which names the recipient and is never changed, verifies.
    async fn a_transfer_recipient_is_kept_as_its_keyed_hash(url: &str) {
        use std::collections::HashMap;

        use dsrelay_proto::v1::TransferRecipient;
        let store = store_at(url).await;
        let name = "new-bookkeeper";
        let recipient = TransferRecipient {
            name: name.into(),
            endpoint: "https://transfers.new-bookkeeper.example:443".into(),
            identity: "spiffe://new-bookkeeper.example/receiver".into(),
            ..Default::default()
        };
        let req = DeliverRequest {
            request_id: "moved".into(),
            kind: RequestKind::Transfer as i32,
            recipient: Some(recipient.clone()),
            ..Default::default()
        };
        let subprocessors = ["a".to_string(), "b".to_string()];
        store
            .accept("c", &req, &subprocessors, None, 0)
            .await
            .unwrap();
        let key = |s: &str| crate::store::TaskKey {
            controller: "c".into(),
            request_id: "moved".into(),
            subprocessor: s.into(),
        };
        let receipt = |s: &str| TransferReceipt {
            request_id: "moved".into(),
            subprocessor: s.into(),
            manifest_sha256: "ab".repeat(32),
            bytes: 300,
            files: 2,
            recipient: name.into(),
            ..Default::default()
        };
        let exported = crate::store::Transition {
            state: TaskState::InProgress,
            export_files: Some(Vec::new()),
            upload: true,
            ..Default::default()
        };
        let seq = store
            .transition(&key("a"), 1, &exported, 50, 1)
            .await
            .unwrap()
            .unwrap();
        // `b`'s part arrived; its report is the one the registry kept rejecting.
        let arrived = |s: &str| crate::store::Transition {
            state: TaskState::Completed,
            confirmed: true,
            transfer_receipt: Some(receipt(s)),
            ..Default::default()
        };
        let parked = store
            .transition(&key("b"), 1, &arrived("b"), 60, 1)
            .await
            .unwrap()
            .unwrap();
        sqlx::query("UPDATE ack_outbox SET dead_lettered_at = 70 WHERE subprocessor = 'b'")
            .execute(&store.db.pool)
            .await
            .unwrap();

        // `a`'s export still has to reach the recipient, as named: nothing may forget it yet.
        assert!(ids(&store.requests_to_forget(500, None, 10).await.unwrap()).is_empty());
        let jobs = store.claim_uploads(100, 10, 60_000).await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].recipient.as_ref(), Some(&recipient));
        let delivered = crate::store::Delivered {
            recipient: Some(name),
            files: 2,
            bytes: 300,
        };
        let finished = store
            .upload_finished(
                jobs[0].claim(),
                seq,
                Some(&arrived("a")),
                Some(&delivered),
                200,
                1,
            )
            .await
            .unwrap();
        assert!(
            matches!(finished, crate::store::UploadFinish::Retired { .. }),
            "{finished:?}"
        );
        sqlx::query("UPDATE ack_outbox SET sent_at = 300 WHERE dead_lettered_at IS NULL")
            .execute(&store.db.pool)
            .await
            .unwrap();

        let due = store.requests_to_forget(500, None, 10).await.unwrap();
        assert_eq!(ids(&due), ["moved"]);
        assert!(store.forget_request(&due[0], "[]", 500, 900).await.unwrap());

        let hashes = {
            let tx = store.begin_audited().await.unwrap();
            let hashes: HashMap<String, String> = [name, &recipient.endpoint, &recipient.identity]
                .map(|t| (t.to_string(), tx.text(t)))
                .into();
            tx.rollback().await.unwrap();
            hashes
        };
        let hashed = |text: &str| {
            let hash = hashes[text].clone();
            assert!(hash.starts_with("text hmac-sha256:"), "{hash}");
            hash
        };
        let kept: (Option<String>, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT recipient_name, recipient_endpoint, recipient_identity FROM requests \
             WHERE request_id = 'moved'",
        )
        .fetch_one(&store.db.pool)
        .await
        .unwrap();
        assert_eq!(
            kept,
            (
                Some(hashed(name)),
                Some(hashed(&recipient.endpoint)),
                Some(hashed(&recipient.identity))
            )
        );
        for s in ["a", "b"] {
            let task = store.task(&key(s)).await.unwrap().unwrap();
            let kept = task.transfer_receipt.expect("the proof stays");
            assert_eq!(
                kept,
                TransferReceipt {
                    recipient: hashed(name),
                    ..receipt(s)
                }
            );
        }
        let parked_payload: Vec<u8> =
            sqlx::query_scalar("SELECT payload FROM ack_outbox WHERE dead_lettered_at IS NOT NULL")
                .fetch_one(&store.db.pool)
                .await
                .unwrap();
        let ack = Acknowledgement::decode(parked_payload.as_slice()).unwrap();
        assert_eq!(ack.sequence, u64::try_from(parked).unwrap());
        let sent = ack.evidence.and_then(|e| e.transfer_receipt);
        assert_eq!(sent.map(|r| r.recipient), Some(hashed(name)));

        // Nowhere in what forgetting leaves, in any column, in any form.
        for (table, columns) in [
            (
                "requests",
                "recipient_name, recipient_endpoint, recipient_identity, body",
            ),
            ("tasks", "note, reason, last_error, transfer_receipt"),
            ("ack_outbox", "payload, last_error"),
            ("uploads", "last_error"),
            ("audit_log", "detail"),
        ] {
            let rows: Vec<sqlx::any::AnyRow> =
                sqlx::query(&format!("SELECT {columns} FROM {table}"))
                    .fetch_all(&store.db.pool)
                    .await
                    .unwrap();
            for row in &rows {
                use sqlx::Row;
                for i in 0..row.len() {
                    let text = row
                        .try_get::<Option<String>, _>(i)
                        .ok()
                        .flatten()
                        .or_else(|| {
                            let bytes = row.try_get::<Option<Vec<u8>>, _>(i).ok().flatten();
                            bytes.map(|b| String::from_utf8_lossy(&b).into_owned())
                        })
                        .unwrap_or_default();
                    assert!(
                        !text.contains("bookkeeper"),
                        "{table} column {i} keeps the recipient: {text:?}"
                    );
                }
            }
        }

        let letters = store.dead_letters(10, 0).await.unwrap();
        assert!(store
            .requeue_dead_letter(letters[0].id, "op", 1000)
            .await
            .unwrap());
        let entries = store.audit_entries(0, 100).await.unwrap();
        assert!(
            dsrelay_runtime::audit::verify(&entries).is_ok(),
            "{entries:#?}"
        );
    }

    #[tokio::test]
    async fn a_transfer_recipient_is_kept_as_its_keyed_hash_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/processor.db", dir.path().display());
        a_transfer_recipient_is_kept_as_its_keyed_hash(&url).await;
    }

    #[tokio::test]
    async fn a_transfer_recipient_is_kept_as_its_keyed_hash_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            a_transfer_recipient_is_kept_as_its_keyed_hash(&url).await;
        })
        .await;
    }

    /// An operator's requeue committing while the request is forgotten (replicas, or the
    /// operator API beside the forget worker) is waited for: the acknowledgement is to be
    /// sent again, so the request is not forgotten yet and the acknowledgement is sent as
    /// it was.
    #[tokio::test]
    async fn a_requeue_committing_meanwhile_stops_the_forgetting_on_postgres() {
        crate::test_postgres::on_postgres(|url, _| async move {
            let store = store_at(&url).await;
            request(&store, "parked", &[("a", TaskState::Refused, 100)]).await;
            dead_letter(&store, "parked").await;
            let before = payload(&store, "parked").await;
            let due = store.requests_to_forget(500, None, 10).await.unwrap();
            assert_eq!(ids(&due), ["parked"]);
            let mut requeue = store.db.pool.begin().await.unwrap();
            sqlx::query(
                "UPDATE ack_outbox SET dead_lettered_at = NULL WHERE request_id = 'parked'",
            )
            .execute(&mut *requeue)
            .await
            .unwrap();
            let forgetting = {
                let store = store.clone();
                let r = Forgettable {
                    controller: "c".into(),
                    request_id: "parked".into(),
                    body: None,
                    accepted_at: 0,
                };
                tokio::spawn(async move { store.forget_request(&r, "[]", 500, 900).await })
            };
            crate::test_postgres::until_waiting_for_a_lock(&store.db.pool).await;
            requeue.commit().await.unwrap();
            assert!(!forgetting.await.unwrap().unwrap());
            let at: Option<i64> =
                sqlx::query_scalar("SELECT forgotten_at FROM requests WHERE request_id = 'parked'")
                    .fetch_one(&store.db.pool)
                    .await
                    .unwrap();
            assert_eq!(at, None);
            assert_eq!(payload(&store, "parked").await, before);
            store.db.pool.close().await;
        })
        .await;
    }
}
