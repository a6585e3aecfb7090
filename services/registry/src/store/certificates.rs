//! Deletion certificates as received with acknowledgements, with the registry's verdict,
//! written in the acknowledgement's transaction together with their event.
//!
//! A verified certificate is kept as signed: it is the proof of the erasure. A rejected one
//! certifies nothing, and everything it carries but the registry's verdict is the
//! processor's text (the body, and the signature and key id, which nothing checked): it is
//! kept until its request is forgotten ([`forgotten_rejected`]), as a task's notes are.

use std::collections::BTreeSet;

use anyhow::Result;
use dsrelay_proto::v1::{EventType, RequestState};
use dsrelay_runtime::store::values_row;
use sha2::{Digest, Sha256};

use super::acknowledgements::TaskUpdate;
use super::events::{EventDetail, NewEvent};
use super::{Store, Tx};

/// A certificate as it arrived, and what checking it found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedCertificate {
    /// The signed body, as sent.
    pub body: Vec<u8>,
    /// The signature, as sent.
    pub signature: Vec<u8>,
    /// The key id it names.
    pub key_id: String,
    /// The certificate's id, from the body (empty when unreadable).
    pub certificate_id: String,
    /// Whether it passed every check.
    pub verified: bool,
    /// Why it did not.
    pub rejection: String,
}

/// A stored certificate.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CertificateRow {
    /// The processor that sent it.
    pub processor: String,
    /// The subprocessor of its task.
    pub subprocessor: String,
    /// The acknowledgement it came with.
    pub sequence: i64,
    /// Its id, from the body.
    pub certificate_id: String,
    /// The signed body.
    pub body: Vec<u8>,
    /// The signature.
    pub signature: Vec<u8>,
    /// The key id it names.
    pub key_id: String,
    /// 1 when verified.
    pub verified: i64,
    /// Why it was rejected.
    pub rejection: String,
    /// When the registry stored it (its clock, milliseconds since the epoch): what decides
    /// whether a key revoked since still verifies it.
    pub received_at: i64,
    /// The task state of the acknowledgement it came with (proto enum value), which a
    /// rejected one is checked against again when served; `None` if that acknowledgement is
    /// not stored.
    pub ack_state: Option<i32>,
}

/// What forgetting leaves of a rejected certificate (`verified` false), as `(key_id,
/// rejection)`: no body, signature or certificate id (stored empty), which are the
/// processor's unchecked text; the key id only when it is one (`sha256:` and 64 lowercase
/// hex digits); and the rejection, followed by the body's SHA-256, so that whoever kept the
/// body can still match it.
pub(super) fn forgotten_rejected(body: &[u8], key_id: &str, rejection: &str) -> (String, String) {
    let key_id = if dsrelay_runtime::signing::is_key_id(key_id) {
        key_id
    } else {
        ""
    };
    let rejection = format!(
        "{rejection} (its body, SHA-256 {}, was removed when the request was forgotten)",
        hex::encode(Sha256::digest(body))
    );
    (key_id.to_string(), rejection)
}

/// Stores the certificates that came with acknowledgements, each `(processor, ack,
/// certificate)`, in one statement per [`rows_per_statement`] of them (a certificate already
/// stored for the same acknowledgement stays as it was). A rejected one of a request
/// `forgotten` already (a task still RETAINED reports later) is stored as forgetting leaves
/// one ([`forgotten_rejected`]), since nothing forgets the request again.
///
/// [`rows_per_statement`]: dsrelay_runtime::store::Backend::rows_per_statement
pub(super) async fn record_all(
    tx: &mut Tx,
    received: &[(&str, &TaskUpdate, &ReceivedCertificate)],
    forgotten: &BTreeSet<String>,
    now: i64,
) -> Result<()> {
    const PARAMS: usize = 11;
    for chunk in received.chunks(tx.backend.rows_per_statement(PARAMS)) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|r| values_row(PARAMS * r + 1..=PARAMS * r + PARAMS))
            .collect();
        let sql = format!(
            "INSERT INTO certificates (request_id, processor, subprocessor, sequence, \
             certificate_id, body, signature, key_id, verified, rejection, received_at) \
             VALUES {} ON CONFLICT DO NOTHING",
            rows.join(", ")
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query(&sql);
        for (processor, ack, c) in chunk {
            let (body, signature, certificate_id, (key_id, rejection)) =
                if !c.verified && forgotten.contains(&ack.request_id) {
                    let left = forgotten_rejected(&c.body, &c.key_id, &c.rejection);
                    (Vec::new(), Vec::new(), String::new(), left)
                } else {
                    let kept = (c.key_id.clone(), c.rejection.clone());
                    (
                        c.body.clone(),
                        c.signature.clone(),
                        c.certificate_id.clone(),
                        kept,
                    )
                };
            q = q
                .bind(ack.request_id.as_str())
                .bind(*processor)
                .bind(ack.subprocessor.as_str())
                .bind(ack.sequence)
                .bind(certificate_id)
                .bind(body)
                .bind(signature)
                .bind(key_id)
                .bind(i64::from(c.verified))
                .bind(rejection)
                .bind(now);
        }
        q.execute(tx.conn()).await?;
    }
    Ok(())
}

/// The event that records whether the certificate `c` that came with `ack` was verified,
/// for the caller to write with its batch's events (its request state is left UNSPECIFIED
/// for the caller to set).
pub(super) fn recorded_event(
    processor: &str,
    ack: &TaskUpdate,
    c: &ReceivedCertificate,
    now: i64,
) -> NewEvent {
    let (event, message) = if c.verified {
        (
            EventType::CertificateStored,
            format!(
                "deletion certificate {} of {} verified and stored",
                c.certificate_id, ack.subprocessor
            ),
        )
    } else {
        (
            EventType::CertificateRejected,
            format!(
                "deletion certificate of {} rejected: {}",
                ack.subprocessor, c.rejection
            ),
        )
    };
    NewEvent {
        request_id: ack.request_id.clone(),
        event_type: event,
        at: now,
        request_state: RequestState::Unspecified,
        detail: EventDetail {
            processor: processor.to_string(),
            subprocessor: ack.subprocessor.clone(),
            task_state: ack.state,
            sequence: ack.sequence,
            message,
            ..Default::default()
        },
    }
}

impl Store {
    /// A request's certificates, each task's together and oldest first by its processor's
    /// sequence, the tasks in the order their first certificate arrived; `processor` and
    /// `subprocessor` narrow them when not empty.
    ///
    /// Not in arrival order: an acknowledgement whose send failed is retried after its
    /// follow-up may have arrived, and its certificate is stored all the same, so the last to
    /// arrive need not be the latest. (The sequence is unique per task, so `id` never decides
    /// within one; tasks are ordered by arrival rather than by name, whose order would depend
    /// on the database's collation.)
    pub async fn certificates(
        &self,
        request_id: &str,
        processor: &str,
        subprocessor: &str,
    ) -> Result<Vec<CertificateRow>> {
        Ok(sqlx::query_as(
            "SELECT processor, subprocessor, sequence, certificate_id, body, signature, key_id, \
             verified, rejection, received_at, (SELECT a.state FROM acknowledgements a \
             WHERE a.request_id = c.request_id AND a.processor = c.processor \
             AND a.subprocessor = c.subprocessor AND a.sequence = c.sequence) AS ack_state \
             FROM certificates c WHERE request_id = $1 \
             AND ($2 = '' OR processor = $2) AND ($3 = '' OR subprocessor = $3) \
             ORDER BY MIN(id) OVER (PARTITION BY processor, subprocessor), sequence, id",
        )
        .bind(request_id)
        .bind(processor)
        .bind(subprocessor)
        .fetch_all(&self.db.reader)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{RequestKind, TaskState};
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::store::{NewRequest, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    use crate::test_postgres::on_postgres;

    async fn store_at(url: &str) -> Store {
        let db = Db::connect(url).await.unwrap();
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .unwrap();
        Store::new(db, b"test key")
    }

    /// Acknowledgement `sequence` of `subprocessor`'s task of r1, with certificate `id`.
    fn ack(subprocessor: &str, sequence: i64, state: TaskState, id: &str) -> TaskUpdate {
        TaskUpdate {
            request_id: "r1".into(),
            subprocessor: subprocessor.into(),
            sequence,
            state: state as i32,
            certificate: Some(ReceivedCertificate {
                body: format!("{{\"certificate_id\":\"{id}\"}}").into_bytes(),
                signature: vec![0; 64],
                key_id: "sha256:00".into(),
                certificate_id: id.into(),
                verified: true,
                rejection: String::new(),
            }),
            ..Default::default()
        }
    }

    /// A RETAINED step's acknowledgement waits for its retry while the COMPLETED follow-up
    /// arrives first: listed by arrival, the stale RETAINED certificate would come last and
    /// `dsrctl certificate get` would hand it out as the latest.
    async fn a_retried_stale_certificate_is_listed_before_its_follow_up(store: Store) {
        store
            .insert_request(&NewRequest {
                id: "r1".into(),
                partner: "crm".into(),
                idempotency_key: "key-r1".into(),
                body_hash: "hash-r1".into(),
                body: b"{}".to_vec(),
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
        let arrivals = [
            ack("accounting", 3, TaskState::Completed, "c2"),
            ack("mail", 2, TaskState::Completed, "m1"),
            ack("accounting", 2, TaskState::Retained, "c1"),
        ];
        for (at, a) in (1000..).zip(&arrivals) {
            let outcome = store.apply_acks("p1", std::slice::from_ref(a), at).await;
            assert_eq!(outcome.unwrap().applied, 1);
        }
        let ids = |rows: Vec<CertificateRow>| -> Vec<(String, i64, String)> {
            rows.into_iter()
                .map(|r| (r.subprocessor, r.sequence, r.certificate_id))
                .collect()
        };
        let task = ids(store.certificates("r1", "p1", "accounting").await.unwrap());
        assert_eq!(
            task,
            [
                ("accounting".to_string(), 2, "c1".to_string()),
                ("accounting".to_string(), 3, "c2".to_string()),
            ]
        );
        // Across tasks, each task's certificates stay together, the tasks in the order their
        // first certificate arrived.
        let all = ids(store.certificates("r1", "", "").await.unwrap());
        let all: Vec<&str> = all.iter().map(|(_, _, id)| id.as_str()).collect();
        assert_eq!(all, ["c1", "c2", "m1"]);
    }

    #[tokio::test]
    async fn certificates_are_listed_in_their_processor_s_order_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_retried_stale_certificate_is_listed_before_its_follow_up(store_at(&url).await).await;
    }

    #[tokio::test]
    async fn certificates_are_listed_in_their_processor_s_order_on_postgres() {
        on_postgres(|url, _dir| async move {
            a_retried_stale_certificate_is_listed_before_its_follow_up(store_at(&url).await).await;
        })
        .await;
    }
}
