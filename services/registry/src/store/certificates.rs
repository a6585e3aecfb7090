//! Deletion certificates as received with acknowledgements, with the registry's verdict,
//! written in the acknowledgement's transaction together with their event.
//!
//! A verified certificate is kept as signed: it is the proof of the erasure. A rejected one
//! certifies nothing, and everything it carries but the registry's verdict is the
//! processor's text (the body, and the signature and key id, which nothing checked): it is
//! kept until its request is forgotten ([`forgotten_rejected`]), as a task's notes are.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Result;
use dsrelay_proto::v1::{EventType, RequestState};
use dsrelay_runtime::store::{placeholders, values_row};
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
    /// The certificate it follows up, from the body (`None` when it names none, or the body
    /// is unreadable).
    pub follows: Option<String>,
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

/// How the rule of every rejection [`against_stored`] gives is introduced (after the reason
/// a certificate rejected when received already had): what is rejected so stays rejected
/// when served ([`CertificateRow::rejection_against_stored`]).
const AGAINST_STORED: &str = "checked against the certificates stored before it";

impl CertificateRow {
    /// The part of its rejection that says which rule against the certificates stored before
    /// it (`against_stored`) it broke, which no key configured later changes (after any other
    /// reason it was rejected for when received); `None` when it broke none.
    pub fn rejection_against_stored(&self) -> Option<&str> {
        let at = self.rejection.find(AGAINST_STORED)?;
        (self.verified == 0).then(|| &self.rejection[at..])
    }
}

/// A stored certificate, as [`against_stored`] reads it.
#[derive(sqlx::FromRow)]
struct Known {
    request_id: String,
    processor: String,
    subprocessor: String,
    sequence: i64,
    certificate_id: String,
}

/// A task, as `(request_id, processor, subprocessor)`.
type TaskOf = (String, String, String);

/// The certificates a check of the next one in a batch compares it with: each task's
/// verified ones, their ids by sequence (a verified id is a UUID, which a rejection may
/// name: a rejected one's is the processor's unchecked text), and the tasks, sequences and
/// bodies of all stored under each certificate id.
#[derive(Default)]
struct Compared {
    tasks: BTreeMap<TaskOf, BTreeMap<i64, String>>,
    ids: HashMap<String, Vec<(TaskOf, i64, Vec<u8>)>>,
}

/// The certificates stored under `n` ids (`certificates_by_id`, migration 0023, reads
/// them): a batch's check reads the rows its ids name, not every certificate.
fn stored_under_ids(n: usize) -> String {
    format!(
        "SELECT request_id, processor, subprocessor, sequence, certificate_id, body \
         FROM certificates WHERE certificate_id IN ({})",
        placeholders(1, n)
    )
}

/// The certificates of `fresh` (each `(processor, update)`, the acknowledgements new to the
/// store, in their order) whose bodies named an id, checked against the certificates stored
/// and those before them in `fresh`, as each is to be stored: a verified certificate that
/// breaks a rule is rejected, with which rule and the certificate ids it concerns, and one
/// rejected already (for its key or its body) has the rule added to its rejection, so that
/// a key configured later does not make it verified unchecked (`CertificateRow::rejection_against_stored`). `None` for an update
/// without a certificate. Call it under the lock of the updates' requests, so that no
/// other transaction stores a certificate of their tasks meanwhile.
///
/// The rules follow from how a processor issues certificates: each with a new id, the
/// first of a task without `follows` and every later one naming the one the task had
/// before (the latest by sequence). The registry need not receive them in that order (an
/// acknowledgement the registry refused is retried after its follow-up is sent), so a
/// `follows` naming a certificate not stored yet is left for it to arrive; and the one it
/// names may be stored rejected (for a key configured wrong then), so it need not be
/// verified.
pub(super) async fn against_stored(
    tx: &mut Tx,
    fresh: &[(&str, &TaskUpdate)],
    forgotten: &BTreeSet<String>,
) -> Result<Vec<Option<ReceivedCertificate>>> {
    let mut ids = BTreeSet::new();
    let mut requests = BTreeSet::new();
    // A certificate rejected for its key or body is checked too (when its body named an
    // id): a key configured later would otherwise make it verified unchecked.
    for (_, ack) in fresh {
        if let Some(c) = (ack.certificate.as_ref()).filter(|c| !c.certificate_id.is_empty()) {
            requests.insert(ack.request_id.clone());
            ids.insert(c.certificate_id.clone());
            ids.extend(c.follows.clone());
        }
    }
    ids.remove("");
    let mut compared = Compared::default();
    // One statement per 500 requests or ids: the verified certificates of the batch's tasks
    // (ids only, not their bodies), then all stored under the ids the batch names.
    let requests: Vec<&String> = requests.iter().collect();
    for chunk in requests.chunks(500) {
        let sql = format!(
            "SELECT request_id, processor, subprocessor, sequence, certificate_id \
             FROM certificates WHERE verified = 1 AND request_id IN ({})",
            placeholders(1, chunk.len())
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query_as::<_, Known>(&sql);
        for v in chunk {
            q = q.bind(v.as_str());
        }
        for known in q.fetch_all(tx.conn()).await? {
            let task = (known.request_id, known.processor, known.subprocessor);
            let stored = compared.tasks.entry(task).or_default();
            stored.insert(known.sequence, known.certificate_id);
        }
    }
    let ids: Vec<&String> = ids.iter().collect();
    for chunk in ids.chunks(500) {
        let text = stored_under_ids(chunk.len());
        let sql = tx.backend.numbered(&text);
        let mut q = sqlx::query_as::<_, (String, String, String, i64, String, Vec<u8>)>(&sql);
        for v in chunk {
            q = q.bind(v.as_str());
        }
        for (request_id, processor, subprocessor, sequence, id, body) in
            q.fetch_all(tx.conn()).await?
        {
            let task = (request_id, processor, subprocessor);
            let stored = compared.ids.entry(id).or_default();
            stored.push((task, sequence, body));
        }
    }
    let mut out = Vec::with_capacity(fresh.len());
    for (processor, ack) in fresh {
        let Some(c) = &ack.certificate else {
            out.push(None);
            continue;
        };
        let task = (
            ack.request_id.clone(),
            processor.to_string(),
            ack.subprocessor.clone(),
        );
        let mut c = c.clone();
        // A rejected one of a forgotten request keeps no body to check again later.
        let recheckable = c.verified || !forgotten.contains(&ack.request_id);
        if !c.certificate_id.is_empty() && recheckable {
            if let Some(rule) =
                broken_rule(&compared, &task, ack.sequence, &c, c.follows.as_deref())
            {
                tracing::warn!(
                    processor,
                    request_id = %ack.request_id,
                    subprocessor = %ack.subprocessor,
                    rejection = %rule,
                    "deletion certificate rejected"
                );
                c.rejection = match c.verified {
                    true => format!("{AGAINST_STORED}: {rule}"),
                    false => format!("{}; {AGAINST_STORED}: {rule}", c.rejection),
                };
                c.verified = false;
            }
        }
        // Stored as `record_all` stores it: a rejected one of a forgotten request without
        // its id.
        let id = match !c.verified && forgotten.contains(&ack.request_id) {
            true => String::new(),
            false => c.certificate_id.clone(),
        };
        if c.verified {
            let verified = compared.tasks.entry(task.clone()).or_default();
            verified.insert(ack.sequence, id.clone());
        }
        if !id.is_empty() {
            let stored = (task, ack.sequence, c.body.clone());
            compared.ids.entry(id).or_default().push(stored);
        }
        out.push(Some(c));
    }
    Ok(out)
}

/// The rule a certificate `c` of acknowledgement `sequence` of `task`, whose body names
/// `follows`, breaks against the certificates `compared` holds, if any.
fn broken_rule(
    compared: &Compared,
    task: &TaskOf,
    sequence: i64,
    c: &ReceivedCertificate,
    follows: Option<&str>,
) -> Option<String> {
    let id = c.certificate_id.as_str();
    let under = |id: &str| compared.ids.get(id).map(Vec::as_slice).unwrap_or_default();
    if under(id).iter().any(|(_, _, body)| *body != c.body) {
        return Some(format!(
            "its certificate_id {id} is already stored with another body: a certificate's id \
             is unique"
        ));
    }
    let empty = BTreeMap::new();
    let rows = compared.tasks.get(task).unwrap_or(&empty);
    let Some(follows) = follows else {
        // The processor names the task's certificate before this one, which it issued
        // before this acknowledgement's step.
        return rows.range(..sequence).next_back().map(|(at, before)| {
            format!(
                "it names no certificate in follows, but this task's certificate {before} came \
                 with its acknowledgement {at}, before this one ({sequence})"
            )
        });
    };
    if follows == id {
        return Some(format!("its follows names certificate {id}, itself"));
    }
    let named = under(follows);
    // Its own task's first: another's stored under the same id was rejected as reusing it.
    let Some((_, at, _)) = named.iter().find(|(t, _, _)| t == task) else {
        let same_request = named.iter().find(|(t, _, _)| t.0 == task.0);
        let (other, _, _) = same_request.or(named.first())?;
        let whose = match other.0 == task.0 {
            true => "another task of this request",
            false => "another request",
        };
        return Some(format!(
            "its follows names certificate {follows}, which is stored for {whose}"
        ));
    };
    if *at >= sequence {
        return Some(format!(
            "its follows names certificate {follows}, which came with this task's \
             acknowledgement {at}, not before this one ({sequence})"
        ));
    }
    let between = rows.range(at + 1..sequence).next_back();
    between.map(|(later, latest)| {
        format!(
            "its follows names certificate {follows}, but this task's latest certificate \
             before this one ({sequence}) is {latest}, of its acknowledgement {later}"
        )
    })
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
    use dsrelay_runtime::store::{Backend, Db};

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
                follows: None,
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

    /// The plan of the check's read of the certificates under a batch's ids, over many
    /// certificates: the ids' index, not every row (a batch's check walking the whole table
    /// would grow with every certificate the registry ever stored).
    async fn by_id_plan(url: &str) -> String {
        let store = store_at(url).await;
        let db = &store.db;
        let (series, bytes) = match db.backend {
            Backend::Sqlite => (
                "(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s \
                 WHERE n < 5000) SELECT n FROM s) AS g"
                    .to_string(),
                "X'00'",
            ),
            Backend::Postgres => ("generate_series(1, 5000) AS g(n)".to_string(), "'\\x00'"),
        };
        sqlx::query(&format!(
            "INSERT INTO certificates (request_id, processor, subprocessor, sequence, \
             certificate_id, body, signature, key_id, verified, rejection, received_at) \
             SELECT 'r' || g.n, 'p', 's', 2, 'c' || g.n, {bytes}, {bytes}, 'k', 1, '', g.n \
             FROM {series}"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
        let explain = match db.backend {
            // As the registry runs it: SQLite's tables are never analyzed.
            Backend::Sqlite => "EXPLAIN QUERY PLAN",
            Backend::Postgres => {
                sqlx::query("ANALYZE certificates")
                    .execute(&db.pool)
                    .await
                    .unwrap();
                "EXPLAIN"
            }
        };
        let text = stored_under_ids(2);
        let sql = db.backend.numbered(&text);
        let rows = sqlx::query(&format!("{explain} {sql}"))
            .bind("c17")
            .bind("c4000")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        let column = match db.backend {
            Backend::Sqlite => "detail",
            Backend::Postgres => "QUERY PLAN",
        };
        rows.iter()
            .map(|r| sqlx::Row::try_get::<String, _>(r, column).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn the_check_reads_certificates_by_id_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        let plan = by_id_plan(&url).await;
        assert!(plan.contains("certificates_by_id"), "{plan}");
    }

    #[tokio::test]
    async fn the_check_reads_certificates_by_id_on_postgres() {
        on_postgres(|url, _| async move {
            let plan = by_id_plan(&url).await;
            assert!(plan.contains("certificates_by_id"), "{plan}");
            assert!(!plan.contains("Seq Scan on certificates"), "{plan}");
        })
        .await;
    }
}
