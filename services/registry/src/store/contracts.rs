//! Contract ends as stored: their terms (the `contracts` table, kept apart from the request's
//! body, which forgetting removes), the operator's later choice and confirmation of the
//! returned package, and the one `update` delivery row each change re-arms so that the
//! dispatcher sends the terms as they stand. The contract end itself is stored by `intake`,
//! with its request and delivery.

use std::collections::BTreeMap;

use anyhow::Result;
use dsrelay_proto::v1::{ContractEnd, ContractEndChoice, EventType, RequestState};

use super::events::{insert_event, EventDetail};
use super::outbox::describe_terms;
use super::{DeliveryRow, Operation, Store, Tx};
use crate::fold::request_is_terminal;

/// The columns of [`ContractRow`], from `contracts c JOIN requests r`.
const CONTRACT_COLUMNS: &str = "c.request_id, c.processor, \
    CAST(c.choice AS BIGINT) AS choice, c.effective_at, c.grace_ends_at, \
    CAST(c.return_confirmed AS BIGINT) AS return_confirmed, c.manifest_sha256, c.version, \
    c.transfer_recipient, \
    c.updated_at, CAST(r.state AS BIGINT) AS state, r.received_at, \
    r.updated_at AS request_updated_at, r.trace_id, \
    (SELECT d.last_error FROM deliveries d WHERE d.request_id = c.request_id \
     AND d.processor = c.processor AND d.op = 'update' AND d.done_at IS NULL \
     AND d.refusals > 0) AS terms_refused";

/// A contract end with what its view needs of its request.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ContractRow {
    /// The contract end's request id.
    pub request_id: String,
    /// The processor (registry-side name).
    pub processor: String,
    /// ContractEndChoice (proto enum value).
    pub choice: i64,
    /// Effective date (ms).
    pub effective_at: i64,
    /// End of the grace period (ms).
    pub grace_ends_at: i64,
    /// 1 once the operator confirmed the returned package.
    pub return_confirmed: i64,
    /// The SHA-256 of the manifest.json confirmed.
    pub manifest_sha256: Option<String>,
    /// The transfer recipient the data is returned to; empty for a package to the registry.
    pub transfer_recipient: String,
    /// Changes of the terms so far, plus one.
    pub version: i64,
    /// When the terms last changed (ms).
    pub updated_at: i64,
    /// The request's folded state (proto enum value).
    pub state: i64,
    /// When the contract end was created (ms).
    pub received_at: i64,
    /// When the request last changed (ms).
    pub request_updated_at: i64,
    /// W3C trace id.
    pub trace_id: String,
    /// The last error of the update's delivery, once the processor refused the terms as they
    /// stand (the update row is re-armed, its refusals cleared, at every change).
    pub terms_refused: Option<String>,
}

impl ContractRow {
    /// The choice as the enum; a value this build does not know reads as UNSPECIFIED.
    pub fn choice(&self) -> ContractEndChoice {
        i32::try_from(self.choice)
            .ok()
            .and_then(|c| ContractEndChoice::try_from(c).ok())
            .unwrap_or(ContractEndChoice::Unspecified)
    }

    /// The request's state as the enum.
    pub fn state(&self) -> RequestState {
        super::rows::request_state(i32::try_from(self.state).unwrap_or_default())
    }

    /// The terms as the protocol carries them.
    pub fn terms(&self) -> ContractEnd {
        ContractEnd {
            choice: self.choice() as i32,
            effective_at: Some(dsrelay_proto::timestamp_from_millis(self.effective_at)),
            grace_ends_at: Some(dsrelay_proto::timestamp_from_millis(self.grace_ends_at)),
            return_confirmed: self.return_confirmed != 0,
            transfer_recipient: self.transfer_recipient.clone(),
        }
    }
}

/// A change an operator makes to a contract end's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContractChange {
    /// The choice made during the grace period (from NONE only), with the transfer recipient
    /// the data is returned to (empty for a package to the registry).
    Choose(ContractEndChoice, String),
    /// Receipt of the returned data confirmed, with the package manifest's SHA-256 (hex), or
    /// empty when the data went to a transfer recipient (its receipts are the proof).
    ConfirmReturn(String),
}

/// Those of the contract ends `ids` whose terms return the data to a transfer recipient
/// (RETURN_THEN_DELETE with a recipient named), with that recipient's name: the only
/// contract ends a transfer receipt may come for, and the name it must give. One query per
/// 500 ids; none for no id. Acknowledge and the store's check of the reports in processors'
/// answers both decide with it.
pub(super) async fn transferring_of(
    conn: &mut sqlx::AnyConnection,
    backend: dsrelay_runtime::store::Backend,
    ids: &[&str],
) -> Result<BTreeMap<String, String>> {
    let mut transferring = BTreeMap::new();
    for chunk in ids.chunks(500) {
        let sql = format!(
            "SELECT request_id, transfer_recipient FROM contracts WHERE choice = $1 \
             AND transfer_recipient <> '' AND request_id IN ({})",
            super::placeholders(2, chunk.len())
        );
        let sql = backend.numbered(&sql);
        let mut q = sqlx::query_as::<_, (String, String)>(&sql)
            .bind(ContractEndChoice::ReturnThenDelete as i64);
        for id in chunk {
            q = q.bind(*id);
        }
        transferring.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(transferring)
}

impl Store {
    /// Those of the contract ends `ids` that return the data to a transfer recipient
    /// (`transferring_of`), read beside the writer.
    pub async fn contract_ends_transferring(
        &self,
        ids: &[&str],
    ) -> Result<BTreeMap<String, String>> {
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut conn = self.db.reader.acquire().await?;
        transferring_of(&mut conn, self.db.backend, ids).await
    }

    /// The contract end `id`, if `id` is one.
    pub async fn contract(&self, id: &str) -> Result<Option<ContractRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {CONTRACT_COLUMNS} FROM contracts c JOIN requests r ON r.id = c.request_id \
             WHERE c.request_id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.db.reader)
        .await?)
    }

    /// The contract end `id` with its deliveries and tasks, read from one snapshot, so that
    /// its state agrees with its tasks' (read one after the other, a task's last acknowledgement applied in
    /// between showed every task final under a request still IN_PROGRESS).
    pub async fn contract_with_tasks(
        &self,
        id: &str,
    ) -> Result<
        Option<(
            ContractRow,
            Vec<DeliveryRow>,
            Vec<dsrelay_proto::v1::TaskStatus>,
        )>,
    > {
        let mut tx = self.snapshot().await?;
        let row: Option<ContractRow> = sqlx::query_as(&format!(
            "SELECT {CONTRACT_COLUMNS} FROM contracts c JOIN requests r ON r.id = c.request_id \
             WHERE c.request_id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let deliveries = super::queries::read_deliveries(&mut *tx, id).await?;
        let tasks = super::queries::read_tasks(&mut *tx, id).await?;
        tx.commit().await?;
        Ok(Some((row, deliveries, tasks)))
    }

    /// Every contract end (or `processor`'s), newest first, with each one's tasks, read from
    /// one snapshot (see [`Store::contract_with_tasks`]).
    pub async fn contracts_with_tasks(
        &self,
        processor: Option<&str>,
    ) -> Result<(
        Vec<ContractRow>,
        std::collections::HashMap<String, Vec<dsrelay_proto::v1::TaskStatus>>,
    )> {
        let mut tx = self.snapshot().await?;
        let rows = read_contracts(&mut *tx, processor).await?;
        let ids: Vec<String> = rows.iter().map(|r| r.request_id.clone()).collect();
        let tasks = super::queries::read_tasks_of(&mut *tx, self.db.backend, &ids).await?;
        tx.commit().await?;
        Ok((rows, tasks))
    }

    /// Applies `change` to the contract end `id` if it still may be (a choice only over
    /// NONE, a confirmation only of an unconfirmed RETURN_THEN_DELETE, neither once the
    /// request has finished), re-arms its update row and records the event, in one
    /// transaction. Returns whether it changed anything; the caller, which checked the terms
    /// just before, answers that the contract end changed meanwhile.
    pub async fn change_contract(
        &self,
        id: &str,
        change: &ContractChange,
        actor: &str,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.begin().await?;
        let Some(state) = tx.request_state(id, true).await? else {
            return Ok(false);
        };
        if request_is_terminal(state) {
            tx.rollback().await?;
            return Ok(false);
        }
        let (changed, event, message) = match change {
            ContractChange::Choose(choice, recipient) => {
                let n = sqlx::query(
                    "UPDATE contracts SET choice = $1, version = version + 1, updated_at = $2, \
                     transfer_recipient = $5 WHERE request_id = $3 AND choice = $4",
                )
                .bind(*choice as i64)
                .bind(now)
                .bind(id)
                .bind(ContractEndChoice::None as i64)
                .bind(recipient)
                .execute(tx.conn())
                .await?
                .rows_affected();
                (
                    n,
                    EventType::ContractUpdated,
                    format!(
                        "choice made by {actor}: {}",
                        choice
                            .as_str_name()
                            .trim_start_matches("CONTRACT_END_CHOICE_")
                    ),
                )
            }
            ContractChange::ConfirmReturn(sha256) => {
                let n = sqlx::query(
                    "UPDATE contracts SET return_confirmed = 1, manifest_sha256 = $1, \
                     version = version + 1, updated_at = $2 \
                     WHERE request_id = $3 AND choice = $4 AND return_confirmed = 0",
                )
                .bind(sha256)
                .bind(now)
                .bind(id)
                .bind(ContractEndChoice::ReturnThenDelete as i64)
                .execute(tx.conn())
                .await?
                .rows_affected();
                (
                    n,
                    EventType::ReturnConfirmed,
                    if sha256.is_empty() {
                        format!("return confirmed by {actor}: the recipient's receipts")
                    } else {
                        format!("return confirmed by {actor}: manifest sha256 {sha256}")
                    },
                )
            }
        };
        if changed == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        let processor = rearm_update(&mut tx, id, now).await?;
        let terms = read_terms(&mut tx, id).await?;
        insert_event(
            &mut tx,
            id,
            event,
            now,
            state,
            EventDetail {
                actor: actor.to_string(),
                processor,
                message: format!(
                    "{message}; terms now{}",
                    terms.as_ref().map(describe_terms).unwrap_or_default()
                ),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// Arms the contract end's one update row (made at its first change, re-armed at every later
/// one: never a second row), due now. Returns the processor.
async fn rearm_update(tx: &mut Tx, id: &str, now: i64) -> Result<String> {
    let processor: String =
        sqlx::query_scalar("SELECT processor FROM contracts WHERE request_id = $1")
            .bind(id)
            .fetch_one(tx.conn())
            .await?;
    sqlx::query(
        "INSERT INTO deliveries (request_id, processor, op, next_attempt_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (request_id, processor, op) DO UPDATE SET \
         done_at = NULL, attempts = 0, next_attempt_at = excluded.next_attempt_at, \
         last_error = NULL, refusals = 0, dead_lettered_at = NULL",
    )
    .bind(id)
    .bind(&processor)
    .bind(Operation::Update.as_str())
    .bind(now)
    .execute(tx.conn())
    .await?;
    Ok(processor)
}

/// The terms as they stand in `tx`.
async fn read_terms(tx: &mut Tx, id: &str) -> Result<Option<ContractEnd>> {
    let row: Option<ContractRow> = sqlx::query_as(&format!(
        "SELECT {CONTRACT_COLUMNS} FROM contracts c JOIN requests r ON r.id = c.request_id \
         WHERE c.request_id = $1"
    ))
    .bind(id)
    .fetch_optional(tx.conn())
    .await?;
    Ok(row.map(|r| r.terms()))
}

/// Every contract end (or `processor`'s), newest first, through `db` (the pool, or a
/// snapshot's transaction).
async fn read_contracts<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    processor: Option<&str>,
) -> Result<Vec<ContractRow>> {
    let filter = if processor.is_some() {
        "WHERE c.processor = $1 "
    } else {
        ""
    };
    let sql = format!(
        "SELECT {CONTRACT_COLUMNS} FROM contracts c JOIN requests r ON r.id = c.request_id \
         {filter}ORDER BY r.received_at DESC, r.id DESC"
    );
    let mut q = sqlx::query_as(&sql);
    if let Some(p) = processor {
        q = q.bind(p);
    }
    Ok(q.fetch_all(db).await?)
}
