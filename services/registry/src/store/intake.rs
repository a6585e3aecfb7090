//! Storing submitted requests: each with its outbox rows and first event in one transaction,
//! or the request an idempotency key already names. Several requests may share a transaction
//! (and its commit) when concurrent Submits are stored together.

use anyhow::Result;
use dsrelay_proto::v1::{EventType, RequestKind, RequestState};

use super::events::{insert_events, EventDetail, NewEvent};
use super::{values_row, Operation, Store, Tx};
use crate::fold::request_is_terminal;

/// What a Submit's insert found.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    /// Stored as new.
    New,
    /// The same key and body were submitted before, as this request.
    Existing(String),
    /// The same key was used before with another body, for this request.
    Conflict(String),
    /// A contract end was not stored: this contract end with the same processor has not
    /// finished.
    Running(String),
}

/// The terms of a new contract end, stored with its request.
#[derive(Debug, Clone)]
pub struct NewContract {
    /// ContractEndChoice (proto enum value).
    pub choice: i32,
    /// When the contract ends (ms).
    pub effective_at: i64,
    /// When the grace period ends (ms).
    pub grace_ends_at: i64,
    /// The transfer recipient the data is returned to; empty for a package to the registry.
    pub transfer_recipient: String,
}

/// A new request to store.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// Request id.
    pub id: String,
    /// Partner name.
    pub partner: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// HMAC-SHA256 of the encoded body under the identity hash key (`api/partner.rs`), which
    /// idempotency compares.
    pub body_hash: String,
    /// Encoded SubmitRequest.
    pub body: Vec<u8>,
    /// JSON array of keyed identity hashes.
    pub identity_hashes: String,
    /// Kind (proto enum value).
    pub kind: i32,
    /// Received (ms).
    pub received_at: i64,
    /// Due (ms).
    pub due_at: i64,
    /// W3C trace id.
    pub trace_id: String,
    /// W3C traceparent of the intake span, when tracing.
    pub traceparent: Option<String>,
    /// Processors to deliver to.
    pub processors: Vec<String>,
}

/// A request to store and, for a contract end, its terms (with exactly one processor).
pub type Intaken = (NewRequest, Option<NewContract>);

impl Store {
    /// Stores a new request with its outbox rows, or finds the one its idempotency key names.
    pub async fn insert_request(&self, r: &NewRequest) -> Result<Inserted> {
        self.insert_intaken(r, None).await
    }

    /// [`Store::insert_request`] for a contract end (`contract` set) or a Submit.
    async fn insert_intaken(
        &self,
        r: &NewRequest,
        contract: Option<&NewContract>,
    ) -> Result<Inserted> {
        for _ in 0..2 {
            let mut tx = self.begin().await?;
            match insert_one(&mut tx, r, contract).await? {
                Some(outcome) => {
                    tx.commit().await?;
                    self.remember_routes([(r, &outcome)]);
                    return Ok(outcome);
                }
                // A concurrent Submit with the same key won the race: look again.
                None => continue,
            }
        }
        anyhow::bail!("idempotency key race did not settle")
    }

    /// Stores several requests in ONE transaction, so concurrent Submits share a commit (and
    /// its fsync). Answers in order. If the shared transaction cannot be used (a race on an
    /// idempotency key with another replica), each request is stored on its own instead.
    pub async fn insert_requests(&self, rs: &[NewRequest]) -> Result<Vec<Inserted>> {
        let batch: Vec<Intaken> = rs.iter().map(|r| (r.clone(), None)).collect();
        self.insert_batch(&batch).await
    }

    /// [`Store::insert_requests`] for what the intake queue holds: Submits and contract ends
    /// (with their terms) alike, in one transaction. Fails on the first request that cannot
    /// be stored; [`Store::insert_each`] answers each alone.
    pub async fn insert_batch(&self, rs: &[Intaken]) -> Result<Vec<Inserted>> {
        self.insert_each(rs).await?.into_iter().collect()
    }

    /// Stores `rs` in one transaction and answers each one's outcome. When that
    /// transaction cannot take one of them, each is stored in a transaction of its own, so
    /// one that cannot be stored never takes the others down with it, and each is answered
    /// with its own outcome: stored, or why not. Fails as a whole only when the batch's
    /// transaction cannot begin or commit, and then none of them was stored.
    pub async fn insert_each(&self, rs: &[Intaken]) -> Result<Vec<Result<Inserted>>> {
        if let [(r, c)] = rs {
            return Ok(vec![self.insert_intaken(r, c.as_ref()).await]);
        }
        let mut tx = self.begin().await?;
        let together = if rs.iter().all(|(_, c)| c.is_none()) {
            let submits: Vec<&NewRequest> = rs.iter().map(|(r, _)| r).collect();
            insert_many(&mut tx, &submits).await.ok().flatten()
        } else {
            let mut out = Vec::with_capacity(rs.len());
            for (r, c) in rs {
                match insert_one(&mut tx, r, c.as_ref()).await {
                    Ok(Some(outcome)) => out.push(outcome),
                    Ok(None) | Err(_) => break,
                }
            }
            (out.len() == rs.len()).then_some(out)
        };
        let Some(out) = together else {
            drop(tx);
            let mut one_by_one = Vec::with_capacity(rs.len());
            for (r, c) in rs {
                one_by_one.push(self.insert_intaken(r, c.as_ref()).await);
            }
            return Ok(one_by_one);
        };
        tx.commit().await?;
        self.remember_routes(rs.iter().map(|(r, _)| r).zip(&out));
        Ok(out.into_iter().map(Ok).collect())
    }

    /// Remembers the routes of the requests stored as new by a committed transaction.
    fn remember_routes<'a>(
        &self,
        stored: impl IntoIterator<Item = (&'a NewRequest, &'a Inserted)>,
    ) {
        self.routes.remember(
            stored
                .into_iter()
                .filter(|(_, outcome)| matches!(outcome, Inserted::New))
                .flat_map(|(r, _)| {
                    let kind = RequestKind::try_from(r.kind).unwrap_or(RequestKind::Unspecified);
                    r.processors
                        .iter()
                        .map(move |p| (p.as_str(), r.id.as_str(), kind))
                }),
        );
    }
}

/// Stores Submits (no contract end among them) with their outbox rows and first events in
/// `tx`, in a fixed number of statements whatever their number (the batch in chunks of
/// [`Backend::rows_per_statement`](dsrelay_runtime::store::Backend::rows_per_statement)):
/// one read of the keys already used, per partner; multi-row INSERTs of the requests and
/// of their outbox rows; the events and their audit entries written together. Answers in order, as [`insert_one`] would one by one: a key used before,
/// or earlier in the batch, finds that request. `None` (or an error) when an insert lost a
/// race on a key to another replica: the caller stores each on its own.
async fn insert_many(tx: &mut Tx, rs: &[&NewRequest]) -> Result<Option<Vec<Inserted>>> {
    use std::collections::{BTreeMap, HashMap};

    let mut keys: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in rs {
        keys.entry(r.partner.as_str())
            .or_default()
            .push(r.idempotency_key.as_str());
    }
    // (partner, key) -> (request id, body hash)
    let mut used: HashMap<(String, String), (String, String)> = HashMap::new();
    for (partner, keys) in &keys {
        for chunk in keys.chunks(tx.backend.rows_per_statement(1)) {
            let sql = format!(
                "SELECT idempotency_key, id, body_hash FROM requests WHERE partner = $1 \
                 AND idempotency_key IN ({})",
                super::placeholders(2, chunk.len())
            );
            let sql = tx.backend.numbered(&sql);
            let mut q = sqlx::query_as::<_, (String, String, String)>(&sql).bind(*partner);
            for k in chunk {
                q = q.bind(*k);
            }
            for (key, id, hash) in q.fetch_all(tx.conn()).await? {
                used.insert((partner.to_string(), key), (id, hash));
            }
        }
    }
    let mut out = Vec::with_capacity(rs.len());
    let mut new: Vec<&NewRequest> = Vec::new();
    for r in rs {
        let key = (r.partner.clone(), r.idempotency_key.clone());
        if let Some((id, hash)) = used.get(&key) {
            out.push(if *hash == r.body_hash {
                Inserted::Existing(id.clone())
            } else {
                Inserted::Conflict(id.clone())
            });
            continue;
        }
        used.insert(key, (r.id.clone(), r.body_hash.clone()));
        new.push(r);
        out.push(Inserted::New);
    }
    if !store_new(tx, &new).await? {
        return Ok(None);
    }
    Ok(Some(out))
}

/// Writes new requests with their outbox rows and SUBMITTED events (and audit entries), in
/// multi-row statements of as many rows as
/// [`Backend::rows_per_statement`](dsrelay_runtime::store::Backend::rows_per_statement)
/// allows. `false` when a request's key was taken meanwhile by another replica (nothing
/// usable is left in `tx` then).
async fn store_new(tx: &mut Tx, new: &[&NewRequest]) -> Result<bool> {
    // Every value bound once per column, in column order, even where it repeats (updated_at
    // and checked_at are received_at): SQLite then binds by position (`Backend::numbered`).
    for chunk in new.chunks(tx.backend.rows_per_statement(15)) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| {
                let b = 1 + i * 15;
                values_row(b..b + 15)
            })
            .collect();
        let sql = format!(
            "INSERT INTO requests (id, partner, idempotency_key, body_hash, body, \
             identity_hashes, kind, state, received_at, due_at, trace_id, updated_at, \
             checked_at, finished_at, traceparent) VALUES {}",
            rows.join(", ")
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query(&sql);
        for r in chunk {
            q = q
                .bind(&r.id)
                .bind(&r.partner)
                .bind(&r.idempotency_key)
                .bind(&r.body_hash)
                .bind(r.body.clone())
                .bind(&r.identity_hashes)
                .bind(i64::from(r.kind))
                .bind(initial_state(r) as i64)
                .bind(r.received_at)
                .bind(r.due_at)
                .bind(&r.trace_id)
                .bind(r.received_at)
                .bind(r.received_at)
                .bind(r.processors.is_empty().then_some(r.received_at))
                .bind(r.traceparent.clone());
        }
        match q.execute(tx.conn()).await {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    let outbox: Vec<(&str, &str, i64)> = new
        .iter()
        .flat_map(|r| {
            r.processors
                .iter()
                .map(|p| (r.id.as_str(), p.as_str(), r.received_at))
        })
        .collect();
    for chunk in outbox.chunks(tx.backend.rows_per_statement(4)) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| values_row(1 + i * 4..5 + i * 4))
            .collect();
        let sql = format!(
            "INSERT INTO deliveries (request_id, processor, op, next_attempt_at) VALUES {}",
            rows.join(", ")
        );
        let sql = tx.backend.numbered(&sql);
        let mut q = sqlx::query(&sql);
        for (id, processor, at) in chunk {
            q = q
                .bind(*id)
                .bind(*processor)
                .bind(Operation::Deliver.as_str())
                .bind(*at);
        }
        q.execute(tx.conn()).await?;
    }
    let events = new
        .iter()
        .map(|r| NewEvent {
            request_id: r.id.clone(),
            event_type: EventType::Submitted,
            at: r.received_at,
            request_state: initial_state(r),
            detail: submitted_detail(r),
        })
        .collect();
    insert_events(tx, events).await?;
    Ok(true)
}

/// A new request's state: RECEIVED, or COMPLETED at once when no processor holds its data.
fn initial_state(r: &NewRequest) -> RequestState {
    if r.processors.is_empty() {
        RequestState::Completed
    } else {
        RequestState::Received
    }
}

/// The SUBMITTED event's words.
fn submitted_detail(r: &NewRequest) -> EventDetail {
    let message = if r.processors.is_empty() {
        "accepted; no processor holds data in its scope".to_string()
    } else {
        format!("accepted; routed to {}", r.processors.join(", "))
    };
    EventDetail {
        actor: r.partner.clone(),
        message,
        ..Default::default()
    }
}

/// Stores one request with its outbox rows and first event in `tx`, or finds the request
/// its idempotency key names. `None` when the insert lost a race on the key (the caller
/// looks again in a new transaction).
async fn insert_one(
    tx: &mut Tx,
    r: &NewRequest,
    contract: Option<&NewContract>,
) -> Result<Option<Inserted>> {
    let existing: Option<(String, String)> = sqlx::query_as(
        "SELECT id, body_hash FROM requests WHERE partner = $1 AND idempotency_key = $2",
    )
    .bind(&r.partner)
    .bind(&r.idempotency_key)
    .fetch_optional(tx.conn())
    .await?;
    if let Some((id, hash)) = existing {
        return Ok(Some(if hash == r.body_hash {
            Inserted::Existing(id)
        } else {
            Inserted::Conflict(id)
        }));
    }
    if let (Some(_), [processor]) = (contract, r.processors.as_slice()) {
        // Replicas on PostgreSQL: two contract ends with one processor arriving at once would
        // each find none running under READ COMMITTED. Held until the transaction ends, so
        // the second waits, then sees the first. (SQLite's one writer keeps them apart.)
        if let Some(lock) = tx.backend.transaction_lock() {
            sqlx::query(lock)
                .bind(contract_lock_key(processor))
                .fetch_one(tx.conn())
                .await?;
        }
        if let Some(running) = running_contract(tx, processor).await? {
            return Ok(Some(Inserted::Running(running)));
        }
    }
    if !store_new(tx, &[r]).await? {
        return Ok(None);
    }
    if let Some(c) = contract {
        anyhow::ensure!(
            r.processors.len() == 1,
            "a contract end goes to exactly one processor"
        );
        sqlx::query(
            "INSERT INTO contracts (request_id, processor, choice, effective_at, \
             grace_ends_at, updated_at, transfer_recipient) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&r.id)
        .bind(&r.processors[0])
        .bind(i64::from(c.choice))
        .bind(c.effective_at)
        .bind(c.grace_ends_at)
        .bind(r.received_at)
        .bind(&c.transfer_recipient)
        .execute(tx.conn())
        .await?;
    }
    Ok(Some(Inserted::New))
}

/// The advisory lock key of contract ends with `processor`: FNV-1a of its name, in a domain
/// of its own so that it does not meet the audit chain's key.
fn contract_lock_key(processor: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"dsrelay contract end\0".iter().chain(processor.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// The contract end with `processor` that has not finished, if any. One PARTIALLY_COMPLETED
/// has: its holders did all they may until their retained data's dates, which can be ten
/// years on, and a new contract with that processor may end before then.
async fn running_contract(tx: &mut Tx, processor: &str) -> Result<Option<String>> {
    let over = [
        RequestState::Completed,
        RequestState::Failed,
        RequestState::Cancelled,
        RequestState::PartiallyCompleted,
    ];
    debug_assert!(over[..3].iter().all(|s| request_is_terminal(*s)));
    Ok(sqlx::query_scalar(
        "SELECT c.request_id FROM contracts c JOIN requests r ON r.id = c.request_id \
         WHERE c.processor = $1 AND r.state NOT IN ($2, $3, $4, $5) \
         ORDER BY r.received_at DESC LIMIT 1",
    )
    .bind(processor)
    .bind(over[0] as i64)
    .bind(over[1] as i64)
    .bind(over[2] as i64)
    .bind(over[3] as i64)
    .fetch_optional(tx.conn())
    .await?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dsrelay_proto::v1::{ContractEndChoice, RequestKind};
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::store::{POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
    use crate::test_postgres::on_postgres;

    fn contract_end(id: &str) -> NewRequest {
        NewRequest {
            id: id.into(),
            partner: "operator".into(),
            idempotency_key: format!("key-{id}"),
            body_hash: format!("hash-{id}"),
            body: b"{}".to_vec(),
            identity_hashes: "[]".into(),
            kind: RequestKind::ContractEnd as i32,
            received_at: 0,
            due_at: 1_000,
            trace_id: "0".repeat(32),
            traceparent: None,
            processors: vec!["p1".into()],
        }
    }

    /// Two replicas ending the contract with one processor at once: the second waits for the
    /// first's transaction, then finds its contract end running, where both used to find
    /// none and both were stored.
    #[tokio::test]
    async fn one_contract_end_per_processor_across_replicas_on_postgres() {
        on_postgres(|url, _| async move {
            let db = Db::connect(&url).await.unwrap();
            db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
                .await
                .unwrap();
            let first = Store::new(db, b"test key");
            let second = Store::new(Db::connect(&url).await.unwrap(), b"test key");
            let terms = NewContract {
                choice: ContractEndChoice::Delete as i32,
                effective_at: 0,
                grace_ends_at: 0,
                transfer_recipient: String::new(),
            };
            let mut tx = first.begin().await.unwrap();
            let stored = insert_one(&mut tx, &contract_end("c1"), Some(&terms))
                .await
                .unwrap();
            assert!(matches!(stored, Some(Inserted::New)), "{stored:?}");
            let other = {
                let terms = terms.clone();
                tokio::spawn(async move {
                    let mut tx = second.begin().await.unwrap();
                    let outcome = insert_one(&mut tx, &contract_end("c2"), Some(&terms))
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    outcome
                })
            };
            // Given time to get past its check, it would have stored a second one.
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.commit().await.unwrap();
            let outcome = other.await.unwrap();
            assert!(
                matches!(&outcome, Some(Inserted::Running(id)) if id == "c1"),
                "{outcome:?}"
            );
            // Ended PARTIALLY_COMPLETED (retained data waits for its dates): a new contract
            // end with the processor may be made.
            sqlx::query("UPDATE requests SET state = $1 WHERE id = 'c1'")
                .bind(dsrelay_proto::v1::RequestState::PartiallyCompleted as i64)
                .execute(&first.db.pool)
                .await
                .unwrap();
            let mut tx = first.begin().await.unwrap();
            let outcome = insert_one(&mut tx, &contract_end("c3"), Some(&terms))
                .await
                .unwrap();
            assert!(matches!(outcome, Some(Inserted::New)), "{outcome:?}");
        })
        .await;
    }
}
