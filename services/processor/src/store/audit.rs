//! The processor's audit trail: one hash-chained entry ([`dsrelay_runtime::audit`], the
//! registry's format, so one verifier checks both) per change an auditor asks about, written
//! in that change's own transaction. A change not committed leaves no entry; an entry never
//! names a change that did not happen.
//!
//! # One chain across replicas
//!
//! Chaining an entry reads the last entry and writes the next, so chainers must take turns,
//! but the changes that record entries need not: [`append`] and [`append_all`] hand the
//! entries to `dsrelay_runtime::audit::table::append_all`, which chains them in the change's
//! transaction on SQLite (whose one writer connection holds transactions apart) and on
//! PostgreSQL queues them in `audit_pending` with no lock, for the service's chainer to chain
//! just after the commit under a lock only chainers take. Reads of the trail chain what is
//! committed first ([`Store::chain_audit`]).
//!
//! # No personal data
//!
//! Entries are never changed or removed, not even to forget, so they never hold a subject's
//! identities, and free text that may name one (reasons, notes, legal bases, rejections)
//! stands in them only as `text hmac-sha256:<hex>`, its keyed hash under the processor's
//! `identity_hash_key`.

use std::fmt::Write as _;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use anyhow::Result;
use dsrelay_proto::v1::ProcessorAuditEvent;
pub(crate) use dsrelay_runtime::audit::table::NewEntry;
use dsrelay_runtime::audit::{self, Entry};
use dsrelay_runtime::identity::keyed_digest;
use sqlx::{Any, AnyConnection, Transaction};

use super::Store;

/// Key of the advisory lock that the processor's audit chainers take turns with ("dsrelay" +
/// 2; see `dsrelay_runtime::audit::table`).
pub(crate) const AUDIT_CHAIN_LOCK: i64 = 0x6473_7265_6c61_7902;

/// The context of the keyed hashes of free text in audit entries.
const AUDIT_TEXT_DOMAIN: &[u8] = b"dsrelay.processor.audit-text.v1";

/// A transaction that may append to the audit trail, with the key that hashes free text for
/// its entries: the only kind [`append`] takes. Derefs to its connection, like a
/// [`Transaction`].
pub(crate) struct AuditTx {
    tx: Transaction<'static, Any>,
    text_key: Arc<[u8]>,
}

impl Deref for AuditTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl DerefMut for AuditTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

impl AuditTx {
    /// Commits the change and its entries.
    pub(crate) async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }

    /// Rolls back the change and its entries.
    pub(crate) async fn rollback(self) -> Result<()> {
        Ok(self.tx.rollback().await?)
    }

    /// `text`'s stand-in in an entry: its keyed hash (empty text stays empty).
    pub(crate) fn text(&self, text: &str) -> String {
        if text.is_empty() {
            return String::new();
        }
        let hash = keyed_digest(&self.text_key, AUDIT_TEXT_DOMAIN, text.as_bytes());
        format!("text hmac-sha256:{hash}")
    }
}

/// What an entry says besides its time and type.
pub(crate) struct Record<'a> {
    /// The controller whose request it is (the detail starts with it).
    pub(crate) controller: &'a str,
    /// The request.
    pub(crate) request_id: &'a str,
    /// Who acted: the controller, an operator; empty for the processor's own steps.
    pub(crate) actor: &'a str,
    /// The rest of the detail, in words, free text only through [`AuditTx::text`].
    pub(crate) detail: String,
}

/// Appends one entry in `tx` (see the module documentation).
pub(crate) async fn append(
    tx: &mut AuditTx,
    event: ProcessorAuditEvent,
    at: i64,
    r: Record<'_>,
) -> Result<()> {
    append_all(tx, vec![entry(event, at, r)]).await
}

/// Appends `entries` in `tx`, in order, together ([`audit::table::append_all`]): how a change
/// of several entries records them.
pub(crate) async fn append_all(tx: &mut AuditTx, entries: Vec<NewEntry>) -> Result<()> {
    audit::table::append_all(tx, entries).await
}

/// The entry `r` says, of type `event` at `at`, for [`append_all`].
pub(crate) fn entry(event: ProcessorAuditEvent, at: i64, r: Record<'_>) -> NewEntry {
    let mut detail = format!("controller {}", r.controller);
    if !r.detail.is_empty() {
        let _ = write!(detail, ": {}", r.detail);
    }
    NewEntry {
        occurred_at: at,
        request_id: r.request_id.to_string(),
        event_type: event as i32,
        actor: r.actor.to_string(),
        detail,
    }
}

impl Store {
    /// Begins a transaction that may append to the audit trail.
    pub(crate) async fn begin_audited(&self) -> Result<AuditTx> {
        let tx = self.db.pool.begin().await?;
        Ok(AuditTx {
            tx,
            text_key: self.text_key.clone(),
        })
    }

    /// Up to `limit` entries after `after_seq`, oldest first, once the entries committed
    /// before the call are chained.
    pub async fn audit_entries(&self, after_seq: u64, limit: i64) -> Result<Vec<Entry>> {
        self.chain_audit().await?;
        audit::table::entries(&self.db.reader, after_seq, limit).await
    }

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

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{DeliverRequest, RequestKind, TaskState};
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::store::{Delivered, TaskKey, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    use crate::task_machine::Transition;

    /// The address the free text names; it must never reach the trail.
    const MAIL: &str = "alice@example.fi";

    /// Every kind of change the trail records besides deliveries' steps at a real runner:
    /// an operator's step, an acknowledgement dead-lettered, requeued and accepted, an
    /// export delivered, forgetting; each once (also when a second sender or uploader
    /// repeats the change), in order, in one valid chain, naming its actor, with free text
    /// only as its keyed hash.
    async fn every_change_is_an_entry(url: &str) {
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
        store
            .accept("acme", &req, &["crm".into()], None, 1)
            .await
            .expect("accept");
        let key = TaskKey {
            controller: "acme".into(),
            request_id: "r-1".into(),
            subprocessor: "crm".into(),
        };
        let done = Transition {
            state: TaskState::Completed,
            records_affected: 3,
            note: format!("deleted the rows of {MAIL}"),
            ..Default::default()
        };
        let ops = "spiffe://dsrelay.dev/operator/ops";
        store
            .operator_transition(&key, 1, &done, 2, 1, ops)
            .await
            .expect("step")
            .expect("moved");
        let ack = store
            .claim_acks(3, 10, 1000)
            .await
            .expect("claim")
            .remove(0);
        let rejection = format!("INVALID_ARGUMENT: note names {MAIL}");
        assert!(store
            .ack_rejected((ack.id, &ack.lease_owner), 4, &rejection, 4, 1)
            .await
            .expect("rejected"));
        // Rejected again once dead-lettered (another sender whose lease ran out): no second
        // entry.
        assert!(!store
            .ack_rejected((ack.id, &ack.lease_owner), 4, &rejection, 4, 1)
            .await
            .expect("rejected again"));
        assert!(store
            .requeue_dead_letter(ack.id, ops, 5)
            .await
            .expect("requeue"));
        store.acks_sent(&[ack.id], 6).await.expect("sent");
        // Sent twice (a lease run out, say): one entry.
        store.acks_sent(&[ack.id], 7).await.expect("sent again");
        // A late rejection or failure of a copy another sender had out changes nothing: the
        // registry has it.
        assert!(!store
            .ack_rejected((ack.id, &ack.lease_owner), 8, &rejection, 8, 1)
            .await
            .expect("rejected late"));
        store
            .acks_failed(&[(ack.id, &ack.lease_owner, 8)], "UNAVAILABLE: late")
            .await
            .expect("failed late");
        let row: (Option<i64>, Option<String>) =
            sqlx::query_as("SELECT dead_lettered_at, last_error FROM ack_outbox WHERE id = $1")
                .bind(ack.id)
                .fetch_one(&store.db.pool)
                .await
                .expect("row");
        assert_eq!(row.0, None, "not dead-lettered once accepted");
        assert!(!row.1.as_deref().unwrap_or("").contains("late"), "{row:?}");
        let to = Delivered {
            recipient: None,
            files: 2,
            bytes: 10,
        };
        let mut conn = store.db.pool.acquire().await.expect("connection");
        crate::store::uploads::queue(&mut conn, &key, 7)
            .await
            .expect("queue the upload");
        drop(conn);
        store
            .upload_finished(
                crate::store::uploads::tests::sender(&key, "a sender"),
                2,
                None,
                Some(&to),
                8,
                1,
            )
            .await
            .expect("upload");
        // Finished again by a second uploader (the first one's lease ran out while it was
        // sending): no second entry.
        store
            .upload_finished(
                crate::store::uploads::tests::sender(&key, "a sender"),
                2,
                None,
                Some(&to),
                8,
                1,
            )
            .await
            .expect("upload again");
        let due = store.requests_to_forget(100, None, 10).await.expect("due");
        assert_eq!(due.len(), 1);
        assert!(store
            .forget_request(&due[0], "[]", 100, 9)
            .await
            .expect("forget"));

        let entries = store.audit_entries(0, 100).await.expect("entries");
        assert!(audit::verify(&entries).is_ok(), "{entries:#?}");
        let text = |t: &str| {
            format!(
                "text hmac-sha256:{}",
                keyed_digest(b"test key", AUDIT_TEXT_DOMAIN, t.as_bytes())
            )
        };
        let seen: Vec<(ProcessorAuditEvent, i64, &str, String)> = entries
            .iter()
            .map(|e| {
                let event = ProcessorAuditEvent::try_from(e.event_type).expect("event");
                (event, e.occurred_at, e.actor.as_str(), e.detail.clone())
            })
            .collect();
        use ProcessorAuditEvent::*;
        assert_eq!(
            seen,
            [
                (
                    RequestAccepted,
                    1,
                    "acme",
                    "controller acme: REQUEST_KIND_ERASURE accepted, tasks for crm".into()
                ),
                (
                    TaskRecorded,
                    2,
                    ops,
                    format!(
                        "controller acme: subprocessor crm, change 2, TASK_STATE_COMPLETED, \
                         records 3, note {}",
                        text(&done.note)
                    )
                ),
                (
                    AckDeadLettered,
                    4,
                    "",
                    format!(
                        "controller acme: subprocessor crm, change 2 dead-lettered after 1 \
                         rejections, last {}",
                        text(&rejection)
                    )
                ),
                (
                    AckRequeued,
                    5,
                    ops,
                    "controller acme: subprocessor crm, change 2 requeued".into()
                ),
                (
                    AckAccepted,
                    6,
                    "",
                    "controller acme: subprocessor crm, change 2 accepted by the registry".into()
                ),
                (
                    ExportDelivered,
                    8,
                    "",
                    "controller acme: subprocessor crm, export of 2 files, 10 bytes, delivered \
                     to the registry"
                        .into()
                ),
                (
                    RequestForgotten,
                    9,
                    "",
                    "controller acme: raw identities, body, notes and exports removed; keyed \
                     hashes kept"
                        .into()
                ),
            ]
        );
        assert!(!format!("{entries:?}").contains("example.fi"));
        // The triggers refuse changes and removals.
        for sql in [
            "UPDATE audit_log SET detail = 'nothing' WHERE seq = 2",
            "DELETE FROM audit_log WHERE seq = 7",
        ] {
            assert!(
                sqlx::query(sql).execute(&store.db.pool).await.is_err(),
                "{sql}"
            );
        }
        assert_eq!(store.audit_entries(0, 100).await.expect("entries"), entries);
        // Paged, the same entries.
        let (page, rest) = (
            store.audit_entries(0, 3).await.expect("page"),
            store.audit_entries(3, 100).await.expect("rest"),
        );
        assert_eq!([page, rest].concat(), entries);
        store.db.pool.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_change_is_an_entry_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        every_change_is_an_entry(&format!("sqlite://{}/processor.db", dir.path().display())).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_change_is_an_entry_on_postgres() {
        crate::test_postgres::on_postgres(|u, _| async move { every_change_is_an_entry(&u).await })
            .await;
    }
}
