//! The processor's durable state: requests, tasks, the acknowledgement outbox and the
//! upload outbox. A task's state change, the acknowledgement reporting it and, for a written
//! export (of a return of data, a transfer or a contract end), its upload are written in one
//! transaction; which change to make is decided by `crate::task_machine`, never here.
//!
//! - `rows`: the types the store hands out, and the raw rows they are read from.
//! - `tasks`: requests and tasks: accept, cancel, claim (each claim under its own lease
//!   token, which renewals, transitions and postponements of the claimed step match; task
//!   leases are set and compared on the database's clock, [`Backend::now_ms`]), transition,
//!   operator views.
//! - `accepts`: group commit of Deliver: concurrent deliveries are stored in one
//!   transaction, each answered once its request is committed.
//! - `steps`: group commit of the runner's steps: concurrent claims' transitions share one
//!   transaction, each answered once its step is committed.
//!   Both wait in `dsrelay_runtime::group_commit`'s queue.
//! - `acks`: the acknowledgement outbox.
//! - `uploads`: the upload outbox: RETURN_OF_DATA and contract end exports waiting to reach
//!   the registry, TRANSFER exports waiting to reach their recipient.
//! - `certificates`: the deletion certificates issued with erasure and contract end steps.
//! - `contracts`: contract ends' terms, updates of them, progress acknowledgements and the
//!   operators' list.
//! - `forget`: removing finished requests' raw identities, body and free text.
//! - `holder_discards`: contract end tasks that will not go on whose holder is still to
//!   discard what their export recorded there.
//! - `holder_tasks`: whether a holder has any task left that will call it (the unreachable
//!   marks' check).
//! - `audit`: the hash-chained audit trail, appended to in the transaction of each change
//!   an auditor asks about.

mod accepts;
mod acks;
mod audit;
mod certificates;
mod contracts;
mod forget;
mod holder_discards;
mod holder_tasks;
mod rows;
mod steps;
mod tasks;
mod uploads;

use std::sync::Arc;

use dsrelay_runtime::store::{Backend, Db};

use crate::certificates::Issuer;

pub use crate::task_machine::{Refusal, Terms, Transition};
pub use acks::DeadLetter;
pub(crate) use contracts::to_proto as terms_to_proto;
pub use contracts::{ContractEndRow, Updated};
pub use forget::Forgettable;
pub(crate) use forget::FINAL;
pub use holder_discards::HolderDiscard;
pub use rows::{AckJob, ManualRow, TaskJob, TaskKey, TaskRow};
pub use tasks::{
    retry_refusal, Accepted, DueDateExtended, ManualCursor, Retried, RetryRefusal, RetryStanding,
};
pub use uploads::{Delivered, NextAttempt, UploadClaim, UploadFinish, UploadJob};

/// The migrations for each backend, embedded at build time.
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
/// See [`SQLITE_MIGRATIONS`].
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The database's clock ([`Backend::now_ms`]) for the database behind `conn` (inside a
/// transaction, where the store's backend is not at hand).
pub(crate) fn db_now_in(conn: &sqlx::AnyConnection) -> &'static str {
    let postgres = conn.backend_name() == <sqlx::Postgres as sqlx::Database>::NAME;
    if postgres {
        Backend::Postgres
    } else {
        Backend::Sqlite
    }
    .now_ms()
}

/// The processor store.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    /// Signs the deletion certificate of each erasure step (of an ERASURE or of a contract
    /// end); `None` issues none.
    issuer: Option<Arc<Issuer>>,
    /// Keys the hashes that stand for free text in audit entries (`identity_hash_key`).
    text_key: Arc<[u8]>,
    /// The runner's steps waiting to share a commit ([`steps`]).
    steps: Arc<steps::StepQueue>,
    /// Deliver calls waiting to share a commit ([`accepts`]).
    accepts: Arc<accepts::AcceptQueue>,
    /// The acknowledgements of the runner's steps, queued already leased and handed to this
    /// process's sender ([`Store::with_ack_handoff`]); `None` leaves them all to its claims.
    handoff: Option<Arc<acks::Handoff>>,
}

impl Store {
    /// Wraps a migrated database, hashing free text in audit entries with `text_key`; it
    /// issues no certificates.
    pub fn new(db: Db, text_key: &[u8]) -> Self {
        Self {
            db,
            issuer: None,
            text_key: text_key.into(),
            steps: Arc::default(),
            accepts: Arc::default(),
            handoff: None,
        }
    }

    /// The store, queueing the acknowledgements of the runner's steps leased for `lease_ms`
    /// to this process's sender, which takes them with [`Store::take_handed_acks`] instead of
    /// claiming them: the service's sender does; a store whose handed acknowledgements no one
    /// takes leaves them to any sender's claim once their lease ends.
    pub fn with_ack_handoff(self, lease_ms: u64) -> Self {
        let lease_ms = i64::try_from(lease_ms).unwrap_or(i64::MAX);
        Self {
            handoff: Some(Arc::new(acks::Handoff::new(lease_ms))),
            ..self
        }
    }

    /// Up to `limit` acknowledgements handed to this process's sender, oldest first, and
    /// whether more are left; none without [`Store::with_ack_handoff`].
    pub fn take_handed_acks(&self, limit: usize) -> (Vec<AckJob>, bool) {
        self.handoff
            .as_ref()
            .map_or((Vec::new(), false), |h| h.take(limit))
    }

    /// The store, issuing a certificate with every COMPLETED or RETAINED erasure step (of an
    /// ERASURE or of a contract end).
    pub fn with_issuer(self, issuer: Option<Arc<Issuer>>) -> Self {
        Self { issuer, ..self }
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// Locks the rows of `requests` (controller, request id), sorted, until the transaction ends,
/// on PostgreSQL (on SQLite the one writer holds every other transaction off). Taken before
/// any of their tasks' rows by the transactions that decide on a request's tasks as a whole:
/// a step that may issue a certificate (which lists the request's other tasks' retained data
/// as of the step), an update of a contract end's terms. So those take turns per request,
/// each seeing what the ones before it committed, and lock in one order: byte order
/// ([`Backend::bytewise`]), the order a batch of steps writes its tasks in.
async fn lock_requests(
    tx: &mut sqlx::AnyConnection,
    requests: &[(&str, &str)],
) -> anyhow::Result<()> {
    let backend = Backend::of_connection(tx);
    let (lock, bytes) = (backend.lock_rows(), backend.bytewise());
    if lock.is_empty() || requests.is_empty() {
        return Ok(());
    }
    let (params, matching) = requests_matching(requests, "");
    let sql = format!(
        "SELECT 1 AS one FROM requests WHERE {matching} \
         ORDER BY controller{bytes}, request_id{bytes}{lock}"
    );
    let mut q = sqlx::query(&sql);
    for param in params {
        q = q.bind(param);
    }
    q.fetch_all(&mut *tx).await?;
    Ok(())
}

/// A condition that holds for exactly the rows of `requests` (controller, request id), on
/// the columns `controller` and `request_id` prefixed with `alias` (`""` or `"r."`), with
/// the parameters it binds from `$1`, in order: `(controller = $1 AND request_id IN ($2,
/// $3)) OR ...`, one group per controller. Not a row-value `IN` of pairs: when every pair
/// names one controller, PostgreSQL factors it out, looks up only the key's first column
/// and tests every request id of the batch against every request of that controller, which
/// on tables not yet analyzed cost milliseconds per statement and grows with the table. An
/// `IN` list on the key's second column is one index lookup per request id.
fn requests_matching<'a>(requests: &[(&'a str, &'a str)], alias: &str) -> (Vec<&'a str>, String) {
    let mut requests = requests.to_vec();
    requests.sort_unstable();
    requests.dedup();
    let mut params: Vec<&'a str> = Vec::with_capacity(requests.len() + 1);
    let mut groups: Vec<String> = Vec::new();
    for chunk in requests.chunk_by(|a, b| a.0 == b.0) {
        params.push(chunk[0].0);
        let controller = params.len();
        let ids: Vec<String> = chunk
            .iter()
            .map(|(_, request_id)| {
                params.push(request_id);
                format!("${}", params.len())
            })
            .collect();
        groups.push(format!(
            "({alias}controller = ${controller} AND {alias}request_id IN ({}))",
            ids.join(", ")
        ));
    }
    (params, groups.join(" OR "))
}

#[cfg(test)]
mod tests {
    use super::requests_matching;

    #[test]
    fn requests_are_matched_by_one_id_list_per_controller() {
        let (params, matching) =
            requests_matching(&[("b", "r2"), ("a", "r1"), ("b", "r1"), ("a", "r1")], "r.");
        assert_eq!(params, ["a", "r1", "b", "r1", "r2"]);
        assert_eq!(
            matching,
            "(r.controller = $1 AND r.request_id IN ($2)) OR \
             (r.controller = $3 AND r.request_id IN ($4, $5))"
        );
        let (params, matching) = requests_matching(&[("c", "x")], "");
        assert_eq!(params, ["c", "x"]);
        assert_eq!(matching, "(controller = $1 AND request_id IN ($2))");
    }
}
