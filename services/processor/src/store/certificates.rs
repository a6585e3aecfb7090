//! The deletion certificates the processor issued: written in the transaction of the task
//! step they certify, and the earlier one of a task named by a follow-up.

use anyhow::Result;
use dsrelay_proto::v1::TaskState;
use dsrelay_runtime::signing::Signed;
use dsrelay_runtime::store::Backend;
use sqlx::AnyConnection;

use super::rows::{state_value, TaskKey};
use crate::certificates::{certifies, rfc3339, Facts, Issuer, Retained};
use crate::task_machine::Transition;

/// Whether a step writing `t` may issue a certificate ([`issue_for`]), whatever its kind.
pub(super) fn may_issue(issuer: Option<&Issuer>, t: &Transition) -> bool {
    issuer.is_some() && matches!(t.state, TaskState::Completed | TaskState::Retained)
}

/// Locks the rows of `requests` (controller, request id), in order, on PostgreSQL (on
/// SQLite the one writer holds every other off): taken before any of their tasks' rows by
/// the steps that may issue a certificate, which lists the request's other tasks' retained
/// data as of the step. So steps of one request's tasks that certify take turns, each
/// listing what those committed before it retained, as when every audited transaction ran
/// alone; a step of one request never waits for another's.
pub(super) async fn lock_requests(tx: &mut AnyConnection, requests: &[(&str, &str)]) -> Result<()> {
    let lock = Backend::of_connection(tx).lock_rows();
    if lock.is_empty() || requests.is_empty() {
        return Ok(());
    }
    let mut requests = requests.to_vec();
    requests.sort_unstable();
    requests.dedup();
    let rows: Vec<String> = (0..requests.len())
        .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
        .collect();
    let sql = format!(
        "SELECT 1 AS one FROM requests WHERE (controller, request_id) IN ({}) \
         ORDER BY controller, request_id{lock}",
        rows.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for (controller, request_id) in requests {
        q = q.bind(controller).bind(request_id);
    }
    q.fetch_all(&mut *tx).await?;
    Ok(())
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
