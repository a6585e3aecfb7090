//! The deletion certificates the processor issued: written in the transaction of the task
//! step they certify, and the earlier one of a task named by a follow-up.

use anyhow::Result;
use dsrelay_proto::v1::TaskState;
use dsrelay_runtime::signing::Signed;
use sqlx::AnyConnection;

use super::rows::{state_value, TaskKey};
use crate::certificates::{certifies, rfc3339, Facts, Issuer, Retained};
use crate::task_machine::Transition;

/// Whether a step writing `t` may issue a certificate ([`issue_for`]), whatever its kind.
pub(super) fn may_issue(issuer: Option<&Issuer>, t: &Transition) -> bool {
    issuer.is_some() && matches!(t.state, TaskState::Completed | TaskState::Retained)
}

/// Issues and stores the certificate of `t` when it certifies an erasure or contract end step; returns it
/// for the acknowledgement.
pub(super) async fn issue_for(
    tx: &mut AnyConnection,
    issuer: &Issuer,
    key: &TaskKey,
    sequence: i64,
    t: &Transition,
    now: i64,
) -> Result<Option<Signed>> {
    // Most steps certify nothing: spare them the look-up of the request's kind.
    if !matches!(t.state, TaskState::Completed | TaskState::Retained) {
        return Ok(None);
    }
    // What the certificate states besides the step, in one statement (each call is a
    // hand-off to the connection's thread on SQLite): the request's kind, the certificate
    // this one follows (the task's last), and the request's retained data as of this step,
    // this task's included (one row each; one row of NULLs when none).
    type Read = (
        i64,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
    );
    let rows: Vec<Read> = sqlx::query_as(
        "SELECT r.kind, (SELECT c.id FROM certificates c WHERE c.controller = $1 \
         AND c.request_id = $2 AND c.subprocessor = $3 ORDER BY c.sequence DESC LIMIT 1), \
         t.subprocessor, t.legal_basis, t.retain_until FROM requests r LEFT JOIN tasks t \
         ON t.controller = r.controller AND t.request_id = r.request_id AND t.state = $4 \
         WHERE r.controller = $1 AND r.request_id = $2 ORDER BY t.subprocessor",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .bind(state_value(TaskState::Retained))
    .fetch_all(&mut *tx)
    .await?;
    let Some(certificate_kind) = rows.first().and_then(|r| certifies(r.0, t.state)) else {
        return Ok(None);
    };
    let follows = rows.first().and_then(|r| r.1.clone());
    let kept: Vec<(String, String, Option<i64>)> = rows
        .into_iter()
        .filter_map(|(_, _, subprocessor, legal_basis, until)| {
            Some((subprocessor?, legal_basis.unwrap_or_default(), until))
        })
        .collect();
    let (id, doc) = issuer.issue(Facts {
        kind: certificate_kind,
        controller: &key.controller,
        request_id: &key.request_id,
        subprocessor: &key.subprocessor,
        state: t.state,
        records_affected: t.records_affected,
        erased: &t.erased,
        retained: kept
            .into_iter()
            .map(|(subprocessor, legal_basis, until)| Retained {
                subprocessor,
                legal_basis,
                until: until.map(rfc3339).unwrap_or_default(),
            })
            .collect(),
        follows,
        now,
    })?;
    sqlx::query(
        "INSERT INTO certificates (id, controller, request_id, subprocessor, sequence, body, \
         signature, key_id, issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&id)
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .bind(sequence)
    .bind(doc.body.clone())
    .bind(doc.signature.clone())
    .bind(&doc.key_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(Some(doc))
}
