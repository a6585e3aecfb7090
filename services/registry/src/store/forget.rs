//! Forgetting a finished request: its raw identities, body and the free text kept with it
//! are removed once its dispute window has passed; the keyed identity hashes stay.

use anyhow::Result;
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{EventType, RequestState, TransferReceipt};

use super::certificates::forgotten_rejected;
use super::events::{audit_text, insert_event, EventDetail};
use super::rows::Operation;
use super::{Store, Tx};
use crate::fold::request_is_terminal;

/// The request states after which a request may be forgotten: the terminal ones.
/// PARTIALLY_COMPLETED is not among them (a holder still keeps data under a legal
/// obligation, and the request may still change).
const FORGETTABLE: [RequestState; 3] = [
    RequestState::Completed,
    RequestState::Failed,
    RequestState::Cancelled,
];

/// A delivery's last error when the attempt failed after its request was forgotten: the
/// processor's answer may quote what was forgotten, so the row keeps the registry's words
/// instead (the audit entry holds the answer's keyed hash).
pub(super) const FORGOTTEN_ERROR: &str =
    "failed: the answer is not kept, the request was forgotten";

/// A processor's text that the registry's words quote (a legal basis, the recipient's name
/// in a receipt) as forgetting leaves it: its keyed hash, as the audit trail holds it; an
/// empty one stays empty, as nothing was said. Also how a report applied to a request
/// already forgotten is written (`acknowledgements`), so that it leaves nothing to forget.
pub(super) fn forgotten_quote(key: &[u8], text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        audit_text(key, text)
    }
}

/// Leaves a transfer receipt as forgetting does: its recipient's name, which tells where
/// the subject moved their data, replaced by its keyed hash under `text_key`, and its
/// signature and key id emptied, since they covered that name (and the key id names the
/// recipient too). The digest, counts and time stay: that a part arrived somewhere.
pub(super) fn forget_receipt(r: &mut TransferReceipt, text_key: &[u8]) {
    r.recipient = forgotten_quote(text_key, &r.recipient);
    r.signature.clear();
    r.key_id.clear();
}

/// Replaces, in the tasks of request `id`, the processor's texts that the registry's words
/// quote (a legal basis, the recipient's name in a transfer receipt) with their keyed hash,
/// as the audit trail already holds them ([`audit_text`]). Hashed, not emptied like a note:
/// a FAILED or CANCELLED request is forgotten even with a task still RETAINED, whose data a
/// holder may keep for years, and the hash still shows that it is kept under a stated basis,
/// one that whoever holds the key can match against the processor's text (kept there until
/// the task is final). A receipt keeps its proof (digest, counts, time) and a recipient
/// ([`forget_receipt`]).
async fn hash_quoted_texts(tx: &mut Tx, id: &str) -> Result<()> {
    let quoted: Vec<(String, String, String, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT processor, subprocessor, legal_basis, transfer_receipt FROM tasks \
         WHERE request_id = $1 AND (legal_basis <> '' OR transfer_receipt IS NOT NULL)",
    )
    .bind(id)
    .fetch_all(tx.conn())
    .await?;
    for (processor, subprocessor, basis, receipt) in quoted {
        let basis = forgotten_quote(&tx.text_key, &basis);
        // Written by this registry from a decoded message, so it decodes again; one that did
        // not could hold anything, and goes.
        let receipt = receipt
            .and_then(|b| TransferReceipt::decode(b.as_slice()).ok())
            .map(|mut r| {
                forget_receipt(&mut r, &tx.text_key);
                r.encode_to_vec()
            });
        sqlx::query(
            "UPDATE tasks SET legal_basis = $1, transfer_receipt = $2 WHERE request_id = $3 \
             AND processor = $4 AND subprocessor = $5",
        )
        .bind(basis)
        .bind(receipt)
        .bind(id)
        .bind(processor)
        .bind(subprocessor)
        .execute(tx.conn())
        .await?;
    }
    Ok(())
}

/// Leaves each rejected certificate of request `id` as [`forgotten_rejected`] does: its body,
/// signature and claimed id are the processor's text, unchecked, and may name the subject.
/// A verified one stays as signed: it is the proof of the erasure, and the signature covers
/// every byte of it.
async fn forget_rejected_certificates(tx: &mut Tx, id: &str) -> Result<()> {
    let rejected: Vec<(i64, Vec<u8>, String, String)> = sqlx::query_as(
        "SELECT id, body, key_id, rejection FROM certificates \
         WHERE request_id = $1 AND verified = 0",
    )
    .bind(id)
    .fetch_all(tx.conn())
    .await?;
    for (row, body, key_id, rejection) in rejected {
        let (key_id, rejection) = forgotten_rejected(&body, &key_id, &rejection);
        sqlx::query(
            "UPDATE certificates SET body = $1, signature = $2, certificate_id = '', \
             key_id = $3, rejection = $4 WHERE id = $5",
        )
        .bind(Vec::<u8>::new())
        .bind(Vec::<u8>::new())
        .bind(key_id)
        .bind(rejection)
        .bind(row)
        .execute(tx.conn())
        .await?;
    }
    Ok(())
}

/// A request's place in the order forgetting takes them (finished, then id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetPosition {
    /// The request id.
    pub id: String,
    /// When it finished (ms).
    pub finished_at: i64,
}

impl Store {
    /// Requests not forgotten yet that finished (a terminal state) at or before `cutoff`
    /// (ms), oldest first, after `after`: a sweep goes on past requests it could not forget
    /// instead of reading them again.
    pub async fn requests_to_forget(
        &self,
        cutoff: i64,
        after: Option<&ForgetPosition>,
        limit: i64,
    ) -> Result<Vec<ForgetPosition>> {
        let states = FORGETTABLE
            .iter()
            .map(|s| (*s as i32).to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let (after_at, after_id) = after.map_or((i64::MIN, ""), |p| (p.finished_at, &p.id));
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT id, finished_at FROM requests WHERE forgotten_at IS NULL \
             AND finished_at IS NOT NULL AND finished_at <= $1 AND state IN ({states}) \
             AND (finished_at > $2 OR (finished_at = $2 AND id > $3)) \
             ORDER BY finished_at, id LIMIT $4"
        ))
        .bind(cutoff)
        .bind(after_at)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, finished_at)| ForgetPosition { id, finished_at })
            .collect())
    }

    /// Removes the request's raw identities and body, the free text that may name its
    /// subject (task notes and reasons, cancel and extension reasons, delivery errors, event
    /// messages, what a rejected certificate carries (`forget_rejected_certificates`); a
    /// task's legal basis and its receipt's recipient name are left only as their keyed
    /// hash, see `hash_quoted_texts`), and records an IDENTITIES_FORGOTTEN event. A
    /// Deliver still pending (only possible for a cancelled request) is given up: it could
    /// carry no identities any more. A processor may still report afterwards (on a task still
    /// RETAINED, or answering a pending Cancel): the report is written as this leaves a task
    /// (`acknowledgements`), since nothing forgets the request again. So is a failed attempt
    /// to send that Cancel ([`Store::delivery_failed`]), and an extension of a FAILED
    /// request, which is still open ([`Store::extend`]): no error or reason in clear.
    /// Returns false, changing nothing, when the request is not terminal, finished after
    /// `cutoff`, or was forgotten already.
    pub async fn forget_request(
        &self,
        id: &str,
        cutoff: i64,
        now: i64,
        message: &str,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let Some(state) = tx.request_state(id, true).await? else {
            tx.rollback().await?;
            return Ok(false);
        };
        let changed = sqlx::query(
            "UPDATE requests SET body = NULL, cancel_reason = NULL, extension_reasons = '[]', \
             forgotten_at = $1, updated_at = $1 \
             WHERE id = $2 AND forgotten_at IS NULL AND finished_at IS NOT NULL \
             AND finished_at <= $3",
        )
        .bind(now)
        .bind(id)
        .bind(cutoff)
        .execute(tx.conn())
        .await?
        .rows_affected();
        if changed == 0 || !request_is_terminal(state) {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("UPDATE tasks SET note = '', reason = '' WHERE request_id = $1")
            .bind(id)
            .execute(tx.conn())
            .await?;
        hash_quoted_texts(&mut tx, id).await?;
        forget_rejected_certificates(&mut tx, id).await?;
        sqlx::query("UPDATE deliveries SET last_error = NULL WHERE request_id = $1")
            .bind(id)
            .execute(tx.conn())
            .await?;
        // An undelivered request was cancelled; a due date still to be sent belongs to a
        // request that is over (its processor down since the extension), with nothing left
        // to extend. A FAILED request is still open: extending it after this re-arms the
        // row, and the new date goes out, since its processors may still be retrying.
        sqlx::query(
            "UPDATE deliveries SET done_at = $1, withdrawn_at = $1, last_error = CASE \
             WHEN op = $3 THEN 'not delivered: the request was cancelled and forgotten' \
             ELSE 'not sent: the request was over and forgotten' END \
             WHERE request_id = $2 AND op IN ($3, $4) AND done_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .bind(Operation::Deliver.as_str())
        .bind(Operation::Extend.as_str())
        .execute(tx.conn())
        .await?;
        // These events' messages repeat reasons, notes and errors; the others are the
        // registry's own words. The audit trail holds such text only as its keyed hash
        // (`detail`) and is not touched here, so the chain still verifies.
        let free_text = [
            EventType::DeliveryFailed,
            EventType::DeliveryDeadLettered,
            EventType::TaskUpdated,
            EventType::DeadlineExtended,
            EventType::Cancelled,
        ]
        .iter()
        .map(|t| (*t as i32).to_string())
        .collect::<Vec<_>>()
        .join(", ");
        sqlx::query(&format!(
            "UPDATE events SET message = '' WHERE request_id = $1 AND type IN ({free_text})"
        ))
        .bind(id)
        .execute(tx.conn())
        .await?;
        insert_event(
            &mut tx,
            id,
            EventType::IdentitiesForgotten,
            now,
            state,
            EventDetail {
                actor: "registry".into(),
                message: message.to_string(),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// After forgetting on SQLite, moves every page out of the write-ahead log and empties
    /// it, so the old versions of the rewritten pages (which still hold what was forgotten)
    /// leave the disk; `secure_delete` (set on the writer connection, the only one that changes
    /// the file) zeroes freed space in the database file itself. PostgreSQL keeps old row versions until VACUUM reclaims them.
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
    use std::collections::BTreeSet;

    use dsrelay_proto::v1::{RequestKind, TaskState, TaskStatus};
    use dsrelay_runtime::store::Db;
    use sha2::Digest;

    use super::*;
    use crate::store::{
        CancelOutcome, FailureRecorded, NewRequest, TaskUpdate, POSTGRES_MIGRATIONS,
        SQLITE_MIGRATIONS,
    };
    use crate::test_postgres::on_postgres;

    async fn store_at(url: &str) -> Store {
        let db = Db::connect(url).await.unwrap();
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .unwrap();
        Store::new(db, b"test key")
    }

    async fn store(dir: &std::path::Path) -> Store {
        store_at(&format!("sqlite://{}/registry.db", dir.display())).await
    }

    /// A request in `state`, finished at `finished_at`, with a body naming its subject.
    async fn request(store: &Store, id: &str, state: RequestState, finished_at: Option<i64>) {
        store
            .insert_request(&NewRequest {
                id: id.into(),
                partner: "crm".into(),
                idempotency_key: format!("key-{id}"),
                body_hash: format!("hash-{id}"),
                body: b"subject@example.org".to_vec(),
                identity_hashes: "[\"h\"]".into(),
                kind: RequestKind::Erasure as i32,
                received_at: 0,
                due_at: 1_000_000,
                trace_id: "0".repeat(32),
                traceparent: None,
                processors: vec!["p1".into()],
            })
            .await
            .unwrap();
        sqlx::query(
            "UPDATE requests SET state = $1, finished_at = $2, cancel_reason = 'asked by \
             subject@example.org' WHERE id = $3",
        )
        .bind(state as i32)
        .bind(finished_at)
        .bind(id)
        .execute(&store.db.pool)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn only_terminal_requests_past_the_cutoff_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        request(&store, "completed-old", RequestState::Completed, Some(100)).await;
        request(&store, "failed-old", RequestState::Failed, Some(200)).await;
        request(
            &store,
            "cancelled-at-cutoff",
            RequestState::Cancelled,
            Some(500),
        )
        .await;
        request(&store, "completed-new", RequestState::Completed, Some(501)).await;
        request(
            &store,
            "partial",
            RequestState::PartiallyCompleted,
            Some(100),
        )
        .await;
        request(&store, "open", RequestState::InProgress, None).await;
        let ids = |due: Vec<ForgetPosition>| due.into_iter().map(|p| p.id).collect::<Vec<_>>();
        let due = store.requests_to_forget(500, None, 10).await.unwrap();
        assert_eq!(
            ids(due.clone()),
            ["completed-old", "failed-old", "cancelled-at-cutoff"]
        );
        assert_eq!(
            store.requests_to_forget(500, None, 1).await.unwrap().len(),
            1
        );
        // Pages go on after a position, so requests that cannot be forgotten are passed.
        assert_eq!(
            ids(store
                .requests_to_forget(500, Some(&due[0]), 10)
                .await
                .unwrap()),
            ["failed-old", "cancelled-at-cutoff"]
        );

        // The cutoff is checked again when forgetting, and so is the state.
        assert!(!store
            .forget_request("completed-new", 500, 900, "m")
            .await
            .unwrap());
        assert!(!store
            .forget_request("partial", 500, 900, "m")
            .await
            .unwrap());
        assert!(!store
            .forget_request("missing", 500, 900, "m")
            .await
            .unwrap());
        assert!(store
            .forget_request("failed-old", 500, 900, "m")
            .await
            .unwrap());
        assert!(!store
            .forget_request("failed-old", 500, 900, "m")
            .await
            .unwrap());
        let (body, reason, forgotten_at, hashes): (
            Option<Vec<u8>>,
            Option<String>,
            Option<i64>,
            String,
        ) = sqlx::query_as(
            "SELECT body, cancel_reason, forgotten_at, identity_hashes FROM requests \
                 WHERE id = 'failed-old'",
        )
        .fetch_one(&store.db.pool)
        .await
        .unwrap();
        assert_eq!((body, reason, forgotten_at), (None, None, Some(900)));
        assert_eq!(hashes, "[\"h\"]");
        let kept: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT body FROM requests WHERE id = 'partial'")
                .fetch_one(&store.db.pool)
                .await
                .unwrap();
        assert!(kept.is_some());
        assert_eq!(
            ids(store.requests_to_forget(500, None, 10).await.unwrap()),
            ["completed-old", "cancelled-at-cutoff"]
        );
        let events: Vec<i32> = sqlx::query_scalar(
            "SELECT type FROM events WHERE request_id = 'failed-old' ORDER BY id",
        )
        .fetch_all(&store.db.pool)
        .await
        .unwrap();
        assert_eq!(
            events.last(),
            Some(&(EventType::IdentitiesForgotten as i32))
        );
        assert!(store.scrub_log().await.unwrap());
    }

    const SUBJECT: &str = "jane.doe@example.org";

    /// A TRANSFER request to `p1`, delivered, whose tasks end FAILED (`mail`), RETAINED
    /// under a basis naming the subject (`accounting`) and COMPLETED with a receipt whose
    /// recipient names her (`crm`): the request is FAILED, so forgotten, while `accounting`
    /// still keeps data.
    async fn failed_with_a_retained_task(store: &Store) {
        with_a_retained_task(store, TaskState::Failed).await;
    }

    /// [`failed_with_a_retained_task`] with `mail` reported in `mail` instead of FAILED.
    async fn with_a_retained_task(store: &Store, mail: TaskState) {
        store
            .insert_request(&NewRequest {
                id: "r1".into(),
                partner: "crm".into(),
                idempotency_key: "key-r1".into(),
                body_hash: "hash-r1".into(),
                body: SUBJECT.as_bytes().to_vec(),
                identity_hashes: "[\"h\"]".into(),
                kind: RequestKind::Transfer as i32,
                received_at: 0,
                due_at: 1_000_000,
                trace_id: "0".repeat(32),
                traceparent: None,
                processors: vec!["p1".into()],
            })
            .await
            .unwrap();
        sqlx::query("UPDATE deliveries SET done_at = 500 WHERE request_id = 'r1' AND op = $1")
            .bind(Operation::Deliver.as_str())
            .execute(&store.db.pool)
            .await
            .unwrap();
        let update = |subprocessor: &str, state: TaskState| TaskUpdate {
            request_id: "r1".into(),
            subprocessor: subprocessor.into(),
            sequence: 2,
            state: state as i32,
            ..Default::default()
        };
        let acks = [
            TaskUpdate {
                reason: format!("the mail server does not know {SUBJECT}"),
                ..update("mail", mail)
            },
            TaskUpdate {
                legal_basis: format!("tax law, as agreed with {SUBJECT}"),
                retain_until: Some(2_000_000),
                ..update("accounting", TaskState::Retained)
            },
            TaskUpdate {
                transfer_receipt: Some(TransferReceipt {
                    request_id: "r1".into(),
                    subprocessor: "crm".into(),
                    manifest_sha256: "ab".repeat(32),
                    files: 1,
                    bytes: 3,
                    recipient: format!("the bookkeeper of {SUBJECT}"),
                    ..Default::default()
                }),
                ..update("crm", TaskState::Completed)
            },
        ];
        let routed = BTreeSet::from(["r1".to_string()]);
        let outcome = store
            .apply_routed_acks("p1", &acks, routed, 1000)
            .await
            .unwrap();
        assert_eq!(outcome.applied, 3);
    }

    /// The task columns that hold what processors wrote, each task's as text (the receipt's
    /// bytes lossily, where the recipient's name stands as UTF-8).
    async fn task_texts(store: &Store) -> Vec<String> {
        let rows: Vec<(String, String, String, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT note, reason, legal_basis, transfer_receipt FROM tasks \
             WHERE request_id = 'r1' ORDER BY subprocessor",
        )
        .fetch_all(&store.db.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(note, reason, basis, receipt)| {
                let receipt = String::from_utf8_lossy(&receipt.unwrap_or_default()).into_owned();
                format!("{note} | {reason} | {basis} | {receipt}")
            })
            .collect()
    }

    /// A task's legal basis and its receipt's recipient name are the processor's words and
    /// may name the subject: forgetting leaves each only as the keyed hash the audit trail
    /// holds, also on a task still RETAINED, whose state, date and the rest of the receipt
    /// stay; the view Get, List and Watch give shows them so.
    async fn forgetting_leaves_quoted_texts_only_as_their_keyed_hash(store: Store) {
        failed_with_a_retained_task(&store).await;
        let state: i32 = sqlx::query_scalar("SELECT state FROM requests WHERE id = 'r1'")
            .fetch_one(&store.db.pool)
            .await
            .unwrap();
        assert_eq!(state, RequestState::Failed as i32);
        let before = task_texts(&store).await;
        assert_eq!(
            before.iter().filter(|t| t.contains(SUBJECT)).count(),
            3,
            "{before:?}"
        );

        assert!(store.forget_request("r1", 1000, 5000, "m").await.unwrap());
        let after = task_texts(&store).await;
        assert!(after.iter().all(|t| !t.contains(SUBJECT)), "{after:?}");
        let hashed = |t: &str| audit_text(b"test key", t);
        let basis = hashed(&format!("tax law, as agreed with {SUBJECT}"));
        let recipient = hashed(&format!("the bookkeeper of {SUBJECT}"));
        let tasks = store.tasks("r1").await.unwrap();
        let task =
            |name: &str| -> &TaskStatus { tasks.iter().find(|t| t.subprocessor == name).unwrap() };
        let retained = task("accounting");
        assert_eq!(retained.state, TaskState::Retained as i32);
        assert_eq!(retained.legal_basis, basis);
        assert_eq!(
            retained.retain_until,
            Some(dsrelay_proto::timestamp_from_millis(2_000_000))
        );
        let receipt = task("crm")
            .evidence
            .as_ref()
            .and_then(|e| e.transfer_receipt.as_ref())
            .unwrap();
        assert_eq!(receipt.recipient, recipient);
        assert_eq!(
            (
                receipt.manifest_sha256.as_str(),
                receipt.files,
                receipt.bytes
            ),
            ("ab".repeat(32).as_str(), 1, 3)
        );
        let failed = task("mail");
        assert_eq!(
            (failed.reason.as_str(), failed.legal_basis.as_str()),
            ("", "")
        );
        assert!(failed.evidence.as_ref().unwrap().transfer_receipt.is_none());

        // The same hashes as the audit trail's entries, so one is found from the other.
        store.chain_audit().await.unwrap();
        let details: Vec<String> = sqlx::query_scalar(
            "SELECT detail FROM audit_log WHERE request_id = 'r1' AND event_type = $1",
        )
        .bind(EventType::TaskUpdated as i32)
        .fetch_all(&store.db.pool)
        .await
        .unwrap();
        for hash in [&basis, &recipient] {
            assert!(
                details.iter().any(|d| d.contains(hash.as_str())),
                "{details:?}"
            );
        }
    }

    /// Forgetting hashes a receipt's recipient, signed or not, and empties its signature and
    /// key id, which covered the name (and name the recipient); the proof of arrival stays.
    #[test]
    fn forgetting_hashes_a_receipt_s_recipient_and_drops_its_signature() {
        use dsrelay_runtime::signing::SigningKey;
        let receipt = TransferReceipt {
            request_id: "r1".into(),
            subprocessor: "crm".into(),
            manifest_sha256: "ab".repeat(32),
            files: 1,
            bytes: 3,
            recipient: format!("the archive of {SUBJECT}"),
            ..Default::default()
        };
        let signed =
            dsrelay_runtime::transfer_receipt::sign(receipt.clone(), &SigningKey::generate())
                .unwrap();
        for r in [signed, receipt] {
            let mut forgotten = r.clone();
            forget_receipt(&mut forgotten, b"k");
            assert_eq!(forgotten.recipient, audit_text(b"k", &r.recipient));
            assert!(forgotten.signature.is_empty() && forgotten.key_id.is_empty());
            assert_eq!(
                (forgotten.bytes, forgotten.files, &forgotten.manifest_sha256),
                (r.bytes, r.files, &r.manifest_sha256)
            );
        }
    }

    #[tokio::test]
    async fn forgetting_leaves_quoted_texts_only_as_their_keyed_hash_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        forgetting_leaves_quoted_texts_only_as_their_keyed_hash(store(dir.path()).await).await;
    }

    #[tokio::test]
    async fn forgetting_leaves_quoted_texts_only_as_their_keyed_hash_on_postgres() {
        on_postgres(|url, _| async move {
            forgetting_leaves_quoted_texts_only_as_their_keyed_hash(store_at(&url).await).await;
        })
        .await;
    }

    /// What the registry keeps as text about `r1` besides its body: its tasks' columns (as
    /// [`task_texts`] gives them), its events' messages and its audit entries.
    async fn texts_kept(store: &Store) -> Vec<String> {
        let mut texts = task_texts(store).await;
        let messages: Vec<String> =
            sqlx::query_scalar("SELECT message FROM events WHERE request_id = 'r1'")
                .fetch_all(&store.db.pool)
                .await
                .unwrap();
        store.chain_audit().await.unwrap();
        let details: Vec<String> =
            sqlx::query_scalar("SELECT detail FROM audit_log WHERE request_id = 'r1'")
                .fetch_all(&store.db.pool)
                .await
                .unwrap();
        texts.extend(messages);
        texts.extend(details);
        texts
    }

    /// The TASK_UPDATED events of `r1` from `since` (ms) on, as [`events_since`] gives them.
    async fn task_updates_since(store: &Store, since: i64) -> Vec<(String, String)> {
        events_since(store, EventType::TaskUpdated, since).await
    }

    /// The `event_type` events of `r1` from `since` (ms) on, each as (event message, audit
    /// entry), in order.
    async fn events_since(
        store: &Store,
        event_type: EventType,
        since: i64,
    ) -> Vec<(String, String)> {
        let messages: Vec<String> = sqlx::query_scalar(
            "SELECT message FROM events WHERE request_id = 'r1' AND type = $1 \
             AND occurred_at >= $2 ORDER BY id",
        )
        .bind(event_type as i32)
        .bind(since)
        .fetch_all(&store.db.pool)
        .await
        .unwrap();
        store.chain_audit().await.unwrap();
        let details: Vec<String> = sqlx::query_scalar(
            "SELECT detail FROM audit_log WHERE request_id = 'r1' AND event_type = $1 \
             AND occurred_at >= $2 ORDER BY seq",
        )
        .bind(event_type as i32)
        .bind(since)
        .fetch_all(&store.db.pool)
        .await
        .unwrap();
        messages.into_iter().zip(details).collect()
    }

    /// A FAILED request is forgotten with a task still RETAINED, and its processor reports
    /// afterwards: the retained task erased at its date (through the Acknowledge API's entry
    /// point), then a status answer (reconciliation). Each report is written as forgetting
    /// leaves a task, and its event shows the registry's words with the quoted texts as
    /// their keyed hash; the state, sequence, counts and the receipt's proof are recorded.
    async fn reports_after_forgetting_are_written_as_forgetting_leaves_them(store: Store) {
        failed_with_a_retained_task(&store).await;
        assert!(store.forget_request("r1", 1000, 5000, "m").await.unwrap());
        let basis = format!("tax law, as agreed with {SUBJECT}");
        let recipient = format!("the archive of {SUBJECT}");
        let erased = TaskUpdate {
            request_id: "r1".into(),
            subprocessor: "accounting".into(),
            sequence: 3,
            state: TaskState::Completed as i32,
            records_affected: 4,
            confirmed: true,
            note: format!("erased the invoices of {SUBJECT}"),
            reason: format!("retention for {SUBJECT} ended"),
            legal_basis: basis.clone(),
            transfer_receipt: Some(TransferReceipt {
                request_id: "r1".into(),
                subprocessor: "accounting".into(),
                manifest_sha256: "cd".repeat(32),
                files: 1,
                bytes: 3,
                recipient: recipient.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let reason = erased.reason.clone();
        let routed = BTreeSet::from(["r1".to_string()]);
        let outcome = store
            .apply_routed_acks("p1", &[erased], routed, 6000)
            .await
            .unwrap();
        assert_eq!(outcome.applied, 1);
        let status = TaskStatus {
            subprocessor: "mail".into(),
            state: TaskState::Failed as i32,
            sequence: 3,
            reason: format!("the mail server still does not know {SUBJECT}"),
            evidence: Some(dsrelay_proto::v1::Evidence {
                note: format!("asked again about {SUBJECT}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        let changed = store
            .reconcile("r1", "p1", &[status], 7000, 60_000)
            .await
            .unwrap();
        assert_eq!(changed, 1);

        let kept = texts_kept(&store).await;
        assert!(kept.iter().all(|t| !t.contains(SUBJECT)), "{kept:?}");
        let hashed = |t: &str| audit_text(b"test key", t);
        let tasks = store.tasks("r1").await.unwrap();
        let task =
            |name: &str| -> &TaskStatus { tasks.iter().find(|t| t.subprocessor == name).unwrap() };
        let accounting = task("accounting");
        assert_eq!(
            (
                accounting.state,
                accounting.sequence,
                accounting.retain_until
            ),
            (TaskState::Completed as i32, 3, None)
        );
        assert_eq!(accounting.legal_basis, hashed(&basis));
        let evidence = accounting.evidence.as_ref().unwrap();
        assert_eq!((evidence.note.as_str(), evidence.records_affected), ("", 4));
        let receipt = evidence.transfer_receipt.as_ref().unwrap();
        assert_eq!(receipt.recipient, hashed(&recipient));
        assert_eq!(
            (
                receipt.manifest_sha256.as_str(),
                receipt.files,
                receipt.bytes
            ),
            ("cd".repeat(32).as_str(), 1, 3)
        );
        let mail = task("mail");
        assert_eq!(
            (mail.state, mail.sequence, mail.reason.as_str()),
            (TaskState::Failed as i32, 3, "")
        );
        assert_eq!(mail.evidence.as_ref().unwrap().note, "");
        let state: i32 = sqlx::query_scalar("SELECT state FROM requests WHERE id = 'r1'")
            .fetch_one(&store.db.pool)
            .await
            .unwrap();
        assert_eq!(state, RequestState::Failed as i32);

        // The event holds the audit entry's words; the reason only the entry, as its hash.
        let words = format!(
            "accounting #3: COMPLETED, 4 record(s), retained under {}, received by {} \
             (1 file(s), 3 bytes)",
            hashed(&basis),
            hashed(&recipient)
        );
        let mail_reason = format!("the mail server still does not know {SUBJECT}");
        assert_eq!(
            task_updates_since(&store, 6000).await,
            [
                (words.clone(), format!("{words}: {}", hashed(&reason))),
                (
                    "mail #3: FAILED (reconciled)".to_string(),
                    format!("mail #3: FAILED (reconciled): {}", hashed(&mail_reason))
                ),
            ]
        );
    }

    #[tokio::test]
    async fn reports_after_forgetting_are_written_as_forgetting_leaves_them_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        reports_after_forgetting_are_written_as_forgetting_leaves_them(store(dir.path()).await)
            .await;
    }

    #[tokio::test]
    async fn reports_after_forgetting_are_written_as_forgetting_leaves_them_on_postgres() {
        on_postgres(|url, _| async move {
            reports_after_forgetting_are_written_as_forgetting_leaves_them(store_at(&url).await)
                .await;
        })
        .await;
    }

    /// A cancellation still to be sent when its request is forgotten is sent afterwards, and
    /// the processor's answer reports the task it keeps: written as forgetting leaves it.
    async fn an_answer_after_forgetting_is_written_as_forgetting_leaves_it(store: Store) {
        // Cancelled while `mail` still runs, so the cancellation stops something.
        with_a_retained_task(&store, TaskState::InProgress).await;
        let cancelled = store.cancel("r1", "asked by the partner", 1500).await;
        assert_eq!(cancelled.unwrap(), CancelOutcome::Cancelled);
        assert!(store.forget_request("r1", 1500, 5000, "m").await.unwrap());
        let jobs = store.claim_deliveries(6000, 10, 60_000).await.unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert_eq!(jobs[0].op, Operation::Cancel);
        let basis = format!("tax law, as agreed again with {SUBJECT}");
        let kept = TaskStatus {
            subprocessor: "accounting".into(),
            state: TaskState::Retained as i32,
            sequence: 3,
            legal_basis: basis.clone(),
            retain_until: Some(dsrelay_proto::timestamp_from_millis(3_000_000)),
            evidence: Some(dsrelay_proto::v1::Evidence {
                note: format!("the invoices of {SUBJECT} stay"),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(store
            .delivery_succeeded(&jobs[0], &[kept], 6000)
            .await
            .unwrap());

        let texts = texts_kept(&store).await;
        assert!(texts.iter().all(|t| !t.contains(SUBJECT)), "{texts:?}");
        let hashed = audit_text(b"test key", &basis);
        let tasks = store.tasks("r1").await.unwrap();
        let accounting = tasks
            .iter()
            .find(|t| t.subprocessor == "accounting")
            .unwrap();
        assert_eq!(
            (accounting.state, accounting.sequence),
            (TaskState::Retained as i32, 3)
        );
        assert_eq!(accounting.legal_basis, hashed);
        assert_eq!(
            accounting.retain_until,
            Some(dsrelay_proto::timestamp_from_millis(3_000_000))
        );
        let words =
            format!("accounting #3: RETAINED, retained under {hashed} (reported on delivery)");
        assert_eq!(
            task_updates_since(&store, 6000).await,
            [(words.clone(), words)]
        );
    }

    #[tokio::test]
    async fn an_answer_after_forgetting_is_written_as_forgetting_leaves_it_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        an_answer_after_forgetting_is_written_as_forgetting_leaves_it(store(dir.path()).await)
            .await;
    }

    #[tokio::test]
    async fn an_answer_after_forgetting_is_written_as_forgetting_leaves_it_on_postgres() {
        on_postgres(|url, _| async move {
            an_answer_after_forgetting_is_written_as_forgetting_leaves_it(store_at(&url).await)
                .await;
        })
        .await;
    }

    /// A FAILED request is still open, so its due date may be extended after it was
    /// forgotten, also from a row read before (the forgetting came between the read and the
    /// write): the extension counts and the date moves, but the reason is kept only as the
    /// audit entry's hash, and the earlier reason forgetting removed does not come back.
    async fn an_extension_after_forgetting_keeps_no_reason_in_clear(store: Store) {
        failed_with_a_retained_task(&store).await;
        let row = store.request("r1").await.unwrap().unwrap();
        let first = format!("the archives of {SUBJECT} are offline");
        assert!(store.extend(&row, 1, &first, 2000).await.unwrap());
        let read = store.request("r1").await.unwrap().unwrap();
        assert!(read.extension_reasons.contains(SUBJECT));
        assert!(store.forget_request("r1", 1000, 5000, "m").await.unwrap());

        let reason = format!("the backups of {SUBJECT} are offline too");
        assert!(store.extend(&read, 1, &reason, 6000).await.unwrap());
        let after = store.request("r1").await.unwrap().unwrap();
        assert_eq!(
            (after.extension_months, after.due_at, after.state),
            (2, crate::deadline::due_at(0, 2), RequestState::Failed)
        );
        assert_eq!(after.extension_reasons, "[]");
        let texts = texts_kept(&store).await;
        assert!(texts.iter().all(|t| !t.contains(SUBJECT)), "{texts:?}");
        let words = "due date extended by 1 month(s)".to_string();
        assert_eq!(
            events_since(&store, EventType::DeadlineExtended, 6000).await,
            [(
                words.clone(),
                format!("{words}: {}", audit_text(b"test key", &reason))
            )]
        );
    }

    #[tokio::test]
    async fn an_extension_after_forgetting_keeps_no_reason_in_clear_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        an_extension_after_forgetting_keeps_no_reason_in_clear(store(dir.path()).await).await;
    }

    #[tokio::test]
    async fn an_extension_after_forgetting_keeps_no_reason_in_clear_on_postgres() {
        on_postgres(|url, _| async move {
            an_extension_after_forgetting_keeps_no_reason_in_clear(store_at(&url).await).await;
        })
        .await;
    }

    /// A cancellation still to be sent when its request is forgotten fails afterwards, then
    /// is dead-lettered: the row and the events hold the registry's words, the processor's
    /// answer only its hash in the audit entries; before the forgetting, the answer shows.
    async fn a_failed_cancel_after_forgetting_keeps_no_error_in_clear(store: Store) {
        with_a_retained_task(&store, TaskState::InProgress).await;
        let cancelled = store.cancel("r1", "asked by the partner", 1500).await;
        assert_eq!(cancelled.unwrap(), CancelOutcome::Cancelled);
        let last_error = || async {
            let errors: Vec<Option<String>> = sqlx::query_scalar(
                "SELECT last_error FROM deliveries WHERE request_id = 'r1' AND op = $1",
            )
            .bind(Operation::Cancel.as_str())
            .fetch_all(&store.db.pool)
            .await
            .unwrap();
            errors
        };
        let claim = |now| store.claim_deliveries(now, 10, 60_000);
        let jobs = claim(1500).await.unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert_eq!(jobs[0].op, Operation::Cancel);
        let early = format!("no such subject: {SUBJECT}");
        let recorded = store.delivery_failed(&jobs[0], &early, 2000, 1500, None);
        assert_eq!(recorded.await.unwrap(), FailureRecorded::Retrying);
        assert_eq!(last_error().await, [Some(early.clone())]);
        assert!(store.forget_request("r1", 1500, 5000, "m").await.unwrap());
        assert_eq!(last_error().await, [None]);

        let jobs = claim(6000).await.unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        let late = format!("still no such subject: {SUBJECT}");
        let recorded = store.delivery_failed(&jobs[0], &late, 7000, 6000, None);
        assert_eq!(recorded.await.unwrap(), FailureRecorded::Retrying);
        assert_eq!(last_error().await, [Some(FORGOTTEN_ERROR.to_string())]);
        let jobs = claim(7000).await.unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        let refused = format!("refused: {SUBJECT} is unknown");
        let recorded = store.delivery_failed(&jobs[0], &refused, 8000, 7000, Some(1));
        assert_eq!(recorded.await.unwrap(), FailureRecorded::DeadLettered);

        assert_eq!(last_error().await, [Some(FORGOTTEN_ERROR.to_string())]);
        let parked = store.dead_lettered_deliveries(10, None).await.unwrap();
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].last_error.as_deref(), Some(FORGOTTEN_ERROR));
        let texts = texts_kept(&store).await;
        assert!(texts.iter().all(|t| !t.contains(SUBJECT)), "{texts:?}");
        let hashed = |t: &str| audit_text(b"test key", t);
        let failed = "cancel to p1 failed".to_string();
        assert_eq!(
            events_since(&store, EventType::DeliveryFailed, 6000).await,
            [
                (failed.clone(), format!("{failed}: {}", hashed(&late))),
                (failed.clone(), format!("{failed}: {}", hashed(&refused))),
            ]
        );
        let dead = "cancel to p1 dead-lettered after 1 refusals, no longer sent".to_string();
        assert_eq!(
            events_since(&store, EventType::DeliveryDeadLettered, 6000).await,
            [(dead.clone(), format!("{dead}: {}", hashed(&refused)))]
        );
    }

    #[tokio::test]
    async fn a_failed_cancel_after_forgetting_keeps_no_error_in_clear_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        a_failed_cancel_after_forgetting_keeps_no_error_in_clear(store(dir.path()).await).await;
    }

    #[tokio::test]
    async fn a_failed_cancel_after_forgetting_keeps_no_error_in_clear_on_postgres() {
        on_postgres(|url, _| async move {
            a_failed_cancel_after_forgetting_keeps_no_error_in_clear(store_at(&url).await).await;
        })
        .await;
    }

    /// The certificates of `r1`: (sequence, certificate_id, body, signature, key_id,
    /// verified, rejection), by sequence.
    #[allow(clippy::type_complexity)]
    async fn certificate_rows(
        store: &Store,
    ) -> Vec<(i64, String, Vec<u8>, Vec<u8>, String, i64, String)> {
        sqlx::query_as(
            "SELECT sequence, certificate_id, body, signature, key_id, verified, rejection \
             FROM certificates WHERE request_id = 'r1' ORDER BY sequence",
        )
        .fetch_all(&store.db.pool)
        .await
        .unwrap()
    }

    /// A rejected certificate's body, signature, key id and claimed id are the processor's
    /// text, unchecked, and may name the subject: forgetting removes them and keeps the
    /// rejection, with the body's SHA-256; one arriving after the forgetting is stored so.
    /// A verified certificate stays as signed. Before, nothing forgot a certificate.
    async fn forgetting_removes_what_a_rejected_certificate_carries(store: Store) {
        failed_with_a_retained_task(&store).await;
        let body = format!("{{\"certificate_id\":\"{SUBJECT}\",\"note\":\"{SUBJECT}\"}}");
        let key_id = format!("sha256:{}", "ab".repeat(32));
        let certified = |sequence: i64, verified: bool, key_id: &str| TaskUpdate {
            request_id: "r1".into(),
            subprocessor: "accounting".into(),
            sequence,
            state: TaskState::Retained as i32,
            retain_until: Some(2_000_000),
            certificate: Some(crate::store::ReceivedCertificate {
                body: body.clone().into_bytes(),
                signature: SUBJECT.as_bytes().to_vec(),
                key_id: key_id.into(),
                certificate_id: SUBJECT.into(),
                follows: None,
                verified,
                rejection: if verified {
                    String::new()
                } else {
                    "the signature does not match the document".into()
                },
            }),
            ..Default::default()
        };
        let routed = || BTreeSet::from(["r1".to_string()]);
        let acks = [certified(3, false, SUBJECT), certified(4, true, &key_id)];
        let outcome = store.apply_routed_acks("p1", &acks, routed(), 2000);
        assert_eq!(outcome.await.unwrap().applied, 2);
        assert!(store.forget_request("r1", 3000, 5000, "m").await.unwrap());
        let later = [certified(5, false, &key_id)];
        let outcome = store.apply_routed_acks("p1", &later, routed(), 6000);
        assert_eq!(outcome.await.unwrap().applied, 1);

        let sha = hex::encode(sha2::Sha256::digest(body.as_bytes()));
        let rejection = format!(
            "the signature does not match the document (its body, SHA-256 {sha}, was removed \
             when the request was forgotten)"
        );
        let rows = certificate_rows(&store).await;
        assert_eq!(
            rows,
            [
                (
                    3,
                    String::new(),
                    vec![],
                    vec![],
                    String::new(),
                    0,
                    rejection.clone()
                ),
                (
                    4,
                    SUBJECT.to_string(),
                    body.clone().into_bytes(),
                    SUBJECT.as_bytes().to_vec(),
                    key_id.clone(),
                    1,
                    String::new()
                ),
                (
                    5,
                    String::new(),
                    vec![],
                    vec![],
                    key_id.clone(),
                    0,
                    rejection
                ),
            ]
        );
    }

    #[tokio::test]
    async fn forgetting_removes_what_a_rejected_certificate_carries_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        forgetting_removes_what_a_rejected_certificate_carries(store(dir.path()).await).await;
    }

    #[tokio::test]
    async fn forgetting_removes_what_a_rejected_certificate_carries_on_postgres() {
        on_postgres(|url, _| async move {
            forgetting_removes_what_a_rejected_certificate_carries(store_at(&url).await).await;
        })
        .await;
    }
}
