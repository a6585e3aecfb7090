//! The deletion certificates the processor issued: written in the transaction of the task
//! steps they certify, and the earlier one of a task named by a follow-up.

use std::collections::BTreeMap;

use anyhow::Result;
use dsrelay_proto::v1::TaskState;
use dsrelay_runtime::signing::Signed;
use dsrelay_runtime::store::{values_row, Backend};
use sqlx::AnyConnection;

use dsrelay_connectors::ExportedFile;
use dsrelay_proto::v1::ContractEndChoice;

use super::rows::{state_value, TaskKey};
use crate::certificates::{
    certifies, contract_end_facts, rfc3339, DeliveredPart, Facts, Issuer, RecordedEnd, Retained,
};
use crate::task_machine::Transition;

/// Whether a step writing `t` may issue a certificate ([`issue_all`]), whatever its kind.
pub(super) fn may_issue(issuer: Option<&Issuer>, t: &Transition) -> bool {
    issuer.is_some() && matches!(t.state, TaskState::Completed | TaskState::Retained)
}

/// A step whose task row is written, and which [`issue_all`] may certify.
pub(super) struct Certifying<'a> {
    pub(super) key: &'a TaskKey,
    /// The task's new sequence.
    pub(super) sequence: i64,
    pub(super) t: &'a Transition,
    pub(super) now: i64,
}

/// Issues and stores the certificate of each step that certifies an erasure or contract end
/// step (see [`certifies`]); answers them in `steps`' order, `None` for the others, for the
/// acknowledgements. Every step's task row must be written already: each certificate lists
/// the request's retained data as all of them leave it (RETAINED tasks, and retention runs
/// whose erasure awaits the holder's confirmation).
///
/// Two statements whatever the number of steps (each call is a hand-off to the connection's
/// thread on SQLite): one read of the requests' kinds and tasks, one INSERT of the
/// certificates.
pub(super) async fn issue_all(
    tx: &mut AnyConnection,
    issuer: Option<&Issuer>,
    steps: &[Certifying<'_>],
) -> Result<Vec<Option<Signed>>> {
    let mut issued: Vec<Option<Signed>> = steps.iter().map(|_| None).collect();
    let Some(issuer) = issuer else {
        return Ok(issued);
    };
    // Most steps certify nothing: spare them the look-up of the request's kind.
    let candidates: Vec<usize> = (0..steps.len())
        .filter(|&i| may_issue(Some(issuer), steps[i].t))
        .collect();
    if candidates.is_empty() {
        return Ok(issued);
    }
    let facts = read_facts(tx, candidates.iter().map(|&i| steps[i].key)).await?;
    let mut rows = Vec::new();
    for i in candidates {
        let Certifying {
            key,
            sequence,
            t,
            now,
        } = &steps[i];
        let request = (key.controller.clone(), key.request_id.clone());
        let Some(request) = facts.get(&request) else {
            continue;
        };
        let Some(kind) = certifies(request.kind, t.state) else {
            continue;
        };
        let contract_end = request.contract_end.as_ref().map(|end| {
            contract_end_facts(&RecordedEnd {
                delivered: request.delivered.get(&key.subprocessor).cloned(),
                ..end.clone()
            })
        });
        let (id, doc) = issuer.issue(Facts {
            kind,
            controller: &key.controller,
            request_id: &key.request_id,
            subprocessor: &key.subprocessor,
            state: t.state,
            records_affected: t.records_affected,
            erased: &t.erased,
            retained: request.retained.clone(),
            follows: request.last_certificate.get(&key.subprocessor).cloned(),
            contract_end,
            now: *now,
        })?;
        rows.push((id, i, *sequence, *now, doc));
    }
    const PARAMS: usize = 9;
    let backend = Backend::of_connection(tx);
    for chunk in rows.chunks(backend.rows_per_statement(PARAMS)) {
        let values: Vec<String> = (0..chunk.len())
            .map(|r| values_row(PARAMS * r + 1..=PARAMS * r + PARAMS))
            .collect();
        let sql = format!(
            "INSERT INTO certificates (id, controller, request_id, subprocessor, sequence, \
             body, signature, key_id, issued_at) VALUES {}",
            values.join(", ")
        );
        let sql = backend.numbered(&sql);
        let mut q = sqlx::query(&sql);
        for (id, i, sequence, now, doc) in chunk {
            let key = steps[*i].key;
            q = q
                .bind(id.as_str())
                .bind(key.controller.as_str())
                .bind(key.request_id.as_str())
                .bind(key.subprocessor.as_str())
                .bind(*sequence)
                .bind(doc.body.clone())
                .bind(doc.signature.clone())
                .bind(doc.key_id.as_str())
                .bind(*now);
        }
        q.execute(&mut *tx).await?;
    }
    for (_, i, _, _, doc) in rows {
        issued[i] = Some(doc);
    }
    Ok(issued)
}

/// What a request's certificates state besides their steps.
#[derive(Debug, Default)]
struct RequestFacts {
    /// The request's kind.
    kind: i64,
    /// Its tasks keeping data under an obligation, by subprocessor.
    retained: Vec<Retained>,
    /// The last certificate of each of its tasks that has one, by subprocessor.
    last_certificate: BTreeMap<String, String>,
    /// A contract end's terms and confirmation (`delivered` left empty: it is per task).
    contract_end: Option<RecordedEnd>,
    /// A contract end's parts its tasks delivered, by subprocessor.
    delivered: BTreeMap<String, DeliveredPart>,
}

/// One task of a request whose certificate is issued, with its request's facts.
#[derive(sqlx::FromRow)]
struct FactsRow {
    controller: String,
    request_id: String,
    kind: i64,
    subprocessor: String,
    state: i64,
    legal_basis: Option<String>,
    retain_until: Option<i64>,
    follows: Option<String>,
    /// The rest only on a contract end (NULL otherwise).
    choice: Option<i64>,
    effective_at: Option<i64>,
    grace_ends_at: Option<i64>,
    return_confirmed: Option<i64>,
    return_confirmed_at: Option<i64>,
    transfer_recipient: Option<String>,
    export_files: Option<String>,
    delivered_at: Option<i64>,
}

/// The facts of the requests of `keys`, by (controller, request id), in one statement: each
/// request's kind and every task of it, with the task's state, legal basis, retention and
/// last certificate; for a contract end, its terms, when its return was confirmed, and each
/// task's delivered export and when its upload was retired by the delivery.
async fn read_facts<'a>(
    tx: &mut AnyConnection,
    keys: impl Iterator<Item = &'a TaskKey>,
) -> Result<BTreeMap<(String, String), RequestFacts>> {
    let requests: Vec<(&str, &str)> = keys
        .map(|k| (k.controller.as_str(), k.request_id.as_str()))
        .collect();
    let (params, matching) = super::requests_matching(&requests, "r.");
    // Only a contract end's export files are read: a return of data's may list thousands,
    // and its certificate-less completion passes here too.
    let sql = format!(
        "SELECT t.controller, t.request_id, r.kind, t.subprocessor, t.state, t.legal_basis, \
         t.retain_until, (SELECT c.id FROM certificates c WHERE c.controller = t.controller \
         AND c.request_id = t.request_id AND c.subprocessor = t.subprocessor \
         ORDER BY c.sequence DESC LIMIT 1) AS follows, \
         e.choice, e.effective_at, e.grace_ends_at, e.return_confirmed, e.return_confirmed_at, \
         e.transfer_recipient, \
         CASE WHEN e.request_id IS NULL THEN NULL ELSE t.export_files END AS export_files, \
         u.done_at AS delivered_at \
         FROM requests r JOIN tasks t ON t.controller = r.controller \
         AND t.request_id = r.request_id \
         LEFT JOIN contract_ends e ON e.controller = r.controller \
         AND e.request_id = r.request_id \
         LEFT JOIN uploads u ON e.request_id IS NOT NULL AND u.controller = t.controller \
         AND u.request_id = t.request_id AND u.subprocessor = t.subprocessor \
         WHERE {matching} \
         ORDER BY t.controller, t.request_id, t.subprocessor"
    );
    let mut q = sqlx::query_as::<_, FactsRow>(&sql);
    for param in params {
        q = q.bind(param);
    }
    let rows = q.fetch_all(&mut *tx).await?;
    let retained = state_value(TaskState::Retained);
    let in_progress = state_value(TaskState::InProgress);
    let mut facts: BTreeMap<(String, String), RequestFacts> = BTreeMap::new();
    for row in rows {
        let key = TaskKey {
            controller: row.controller,
            request_id: row.request_id,
            subprocessor: row.subprocessor,
        };
        let request = facts
            .entry((key.controller.clone(), key.request_id.clone()))
            .or_default();
        request.kind = row.kind;
        if let Some(follows) = row.follows {
            request
                .last_certificate
                .insert(key.subprocessor.clone(), follows);
        }
        if let (Some(choice), Some(effective_at), Some(grace_ends_at)) =
            (row.choice, row.effective_at, row.grace_ends_at)
        {
            request.contract_end = Some(RecordedEnd {
                choice: i32::try_from(choice)
                    .ok()
                    .and_then(|c| ContractEndChoice::try_from(c).ok())
                    .unwrap_or(ContractEndChoice::Unspecified),
                effective_at,
                grace_ends_at,
                return_confirmed: row.return_confirmed.unwrap_or(0) != 0,
                return_confirmed_at: row.return_confirmed_at,
                transfer_recipient: row.transfer_recipient.unwrap_or_default(),
                delivered: None,
            });
        }
        // An export is returned once its upload is retired with it listed: a task whose
        // export went undelivered ends cancelled or failed, never certified.
        if let (Some(files), Some(_)) = (&row.export_files, row.delivered_at) {
            let files: Vec<ExportedFile> = serde_json::from_str(files)?;
            let headers: Vec<_> = (files.iter())
                .map(|f| crate::uploader::header(&key, f))
                .collect();
            let manifest_sha256 = dsrelay_runtime::transfer_manifest::sha256(
                &key.request_id,
                &key.subprocessor,
                &headers,
            );
            request.delivered.insert(
                key.subprocessor.clone(),
                DeliveredPart {
                    manifest_sha256,
                    files: files.len() as u64,
                    bytes: files.iter().map(|f| f.size).sum(),
                    delivered_at: row.delivered_at,
                },
            );
        }
        // A retention run whose erasure the holder accepted but has not confirmed is
        // IN_PROGRESS with its retention kept: the data is still there under it.
        let until = row.retain_until;
        if row.state == retained || (row.state == in_progress && until.is_some()) {
            request.retained.push(Retained {
                subprocessor: key.subprocessor,
                legal_basis: row.legal_basis.unwrap_or_default(),
                until: until.map(rfc3339).unwrap_or_default(),
            });
        }
    }
    Ok(facts)
}
