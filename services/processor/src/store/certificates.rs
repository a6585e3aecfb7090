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
    let kind: Option<i64> =
        sqlx::query_scalar("SELECT kind FROM requests WHERE controller = $1 AND request_id = $2")
            .bind(&key.controller)
            .bind(&key.request_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(certificate_kind) = kind.and_then(|k| certifies(k, t.state)) else {
        return Ok(None);
    };
    // The request's retained data as of this step, this task's included.
    let kept: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT subprocessor, legal_basis, retain_until FROM tasks WHERE controller = $1 \
         AND request_id = $2 AND state = $3 ORDER BY subprocessor",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(state_value(TaskState::Retained))
    .fetch_all(&mut *tx)
    .await?;
    let follows: Option<String> = sqlx::query_scalar(
        "SELECT id FROM certificates WHERE controller = $1 AND request_id = $2 \
         AND subprocessor = $3 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(&key.controller)
    .bind(&key.request_id)
    .bind(&key.subprocessor)
    .fetch_optional(&mut *tx)
    .await?;
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
