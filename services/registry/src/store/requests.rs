//! Changes a partner or operator makes to a request: cancelling it (which queues a
//! cancellation for every processor it was routed to) and extending its due date.

use anyhow::{Context, Result};
use dsrelay_proto::v1::{EventType, RequestState};

use super::acknowledgements::state_changed_event;
use super::events::{insert_event, insert_events, EventDetail, NewEvent};
use super::rows::task_state;
use super::{Operation, RequestRow, Store, Tx};
use crate::fold::{cancel_stops_nothing, Delivery, OPEN_STATES};

/// What [`Store::cancel`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancelled now.
    Cancelled,
    /// No such request.
    NotFound,
    /// Its state does not allow cancelling, or nothing is left to stop (a FAILED request
    /// whose tasks have all ended or are retained, a contract end whose tasks have ended or
    /// are deleting); the state it is in.
    NotCancellable(RequestState),
}

impl Store {
    /// [`Store::cancel_by`] with no actor named: the audit entry's actor is empty. For
    /// callers that act for no one (tests); the API names its caller.
    pub async fn cancel(&self, id: &str, reason: &str, now: i64) -> Result<CancelOutcome> {
        self.cancel_by(id, reason, "", now).await
    }

    /// [`Store::extend_by`] with no actor named: the audit entry's actor is empty. For
    /// callers that act for no one (tests); the API names its caller.
    pub async fn extend(
        &self,
        row: &RequestRow,
        months: u32,
        reason: &str,
        now: i64,
    ) -> Result<bool> {
        self.extend_by(row, months, reason, "", now).await
    }

    /// Cancels a request: no further deliveries, and a cancellation queued for every
    /// processor. Refused ([`CancelOutcome::NotCancellable`]) unless the request is open and
    /// the cancellation can stop something: a delivery not yet accepted, or a task not
    /// settled (`cancel_stops_nothing`) and not a contract end's deletion under way. A cancellation that turns out to have stopped
    /// nothing gives way to the state the tasks report (`crate::fold::fold_request`).
    /// The CANCELLED event's audit entry names `by` (the partner or operator who asked) as
    /// its actor.
    pub async fn cancel_by(
        &self,
        id: &str,
        reason: &str,
        by: &str,
        now: i64,
    ) -> Result<CancelOutcome> {
        let mut tx = self.begin().await?;
        // Locked: an acknowledgement that finishes the request meanwhile is waited for and
        // seen, never overwritten with CANCELLED.
        let Some(state) = tx.request_state(id, true).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if !crate::fold::request_is_open(state) {
            return Ok(CancelOutcome::NotCancellable(state));
        }
        // A request whose tasks have all ended (or are retained, which no processor's Cancel
        // touches) has nothing left to stop: CANCELLED would claim it stopped before it
        // finished, and no report would come to correct it. A FAILED one is always so: the
        // fold gives FAILED only once every delivery was accepted and every task settled,
        // and what moves after is a retained task's erasure at its date, which a Cancel
        // does not stop either. A task of it the processor's operator retries while another
        // is still failed is not cancelled from here: an operator must act on the failed one
        // first (once none is failed, the request is IN_PROGRESS again, and cancellable).
        if state == RequestState::Failed
            || cancel_stops_nothing(
                &deliveries(&mut tx, id).await?,
                &stoppable_tasks(&mut tx, id).await?,
            )
        {
            return Ok(CancelOutcome::NotCancellable(state));
        }
        sqlx::query(
            "UPDATE requests SET state = $1, cancel_reason = $2, updated_at = $3, \
             finished_at = $3 WHERE id = $4",
        )
        .bind(RequestState::Cancelled as i64)
        .bind(reason)
        .bind(now)
        .bind(id)
        .execute(tx.conn())
        .await?;
        // Undelivered requests are not sent any more; every processor (even one whose
        // delivery may be in flight right now) is told to cancel, and keeps a tombstone. Nor
        // are a contract end's changed terms, or an extended due date, sent to a processor
        // told to cancel.
        sqlx::query(
            "UPDATE deliveries SET done_at = $1, withdrawn_at = $1, \
             last_error = 'cancelled before delivery' \
             WHERE request_id = $2 AND op IN ($3, $4, $5) AND done_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .bind(Operation::Deliver.as_str())
        .bind(Operation::Update.as_str())
        .bind(Operation::Extend.as_str())
        .execute(tx.conn())
        .await?;
        sqlx::query(
            "INSERT INTO deliveries (request_id, processor, op, next_attempt_at) \
             SELECT request_id, processor, $1, $2 FROM deliveries WHERE request_id = $3 \
             AND op = $4 ON CONFLICT DO NOTHING",
        )
        .bind(Operation::Cancel.as_str())
        .bind(now)
        .bind(id)
        .bind(Operation::Deliver.as_str())
        .execute(tx.conn())
        .await?;
        // As every event that moves a request: it shows the state before, and a STATE_CHANGED
        // with the new one follows, which is what a Watch client following states sees.
        insert_events(
            &mut tx,
            vec![
                NewEvent {
                    request_id: id.to_string(),
                    event_type: EventType::Cancelled,
                    at: now,
                    request_state: state,
                    detail: EventDetail {
                        actor: by.to_string(),
                        message: "cancelled".into(),
                        free_text: reason.to_string(),
                        ..Default::default()
                    },
                },
                state_changed_event(id, state, RequestState::Cancelled, now),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled)
    }

    /// Extends the due date by `months`, keeping the reason, if the request is as `row` read
    /// it (no extension made since, still open: `OPEN_STATES`), and queues the new date for
    /// every processor the request is delivered to; answers whether it did. A request
    /// forgotten already (FAILED) is extended as forgetting leaves it: the reason is not
    /// kept, and the event shows the registry's words without it; the audit entry holds its
    /// keyed hash either way.
    /// Nothing is written otherwise, so a concurrent extension is never lost under an answer
    /// of success. An error, with nothing written, when the stored count cannot grow by
    /// `months` without leaving the u32 range. The DEADLINE_EXTENDED event's audit entry names
    /// `by` (the operator who asked) as its actor.
    pub async fn extend_by(
        &self,
        row: &RequestRow,
        months: u32,
        reason: &str,
        by: &str,
        now: i64,
    ) -> Result<bool> {
        // A stored count below zero is no extension made; a count that does not fit, or
        // cannot grow by `months`, is refused rather than wrapped into a shorter due date.
        let total = u32::try_from(row.extension_months.max(0))
            .ok()
            .and_then(|used| used.checked_add(months))
            .with_context(|| {
                format!(
                    "request {}: {} months extended by {months} is out of range",
                    row.id, row.extension_months
                )
            })?;
        let mut reasons: Vec<String> =
            serde_json::from_str(&row.extension_reasons).unwrap_or_default();
        reasons.push(reason.to_string());
        let due = crate::deadline::due_at(row.received_at, total);
        let mut tx = self.begin().await?;
        // A FAILED request is open and may be forgotten: its reason is then not kept (as
        // forgetting leaves reasons), only the audit trail's hash of it. Decided on the row
        // as the UPDATE finds it, so a forgetting that came after `row` was read counts.
        let updated: Option<Option<i64>> = sqlx::query_scalar(
            "UPDATE requests SET extension_months = $1, extension_reasons = CASE \
             WHEN forgotten_at IS NULL THEN $2 ELSE extension_reasons END, due_at = $3, \
             updated_at = $4 WHERE id = $5 AND extension_months = $6 \
             AND state IN ($7, $8, $9, $10) RETURNING forgotten_at",
        )
        .bind(i64::from(total))
        .bind(serde_json::to_string(&reasons).context("encoding reasons")?)
        .bind(due)
        .bind(now)
        .bind(&row.id)
        .bind(row.extension_months)
        .bind(OPEN_STATES[0] as i64)
        .bind(OPEN_STATES[1] as i64)
        .bind(OPEN_STATES[2] as i64)
        .bind(OPEN_STATES[3] as i64)
        .fetch_optional(tx.conn())
        .await?;
        let Some(forgotten_at) = updated else {
            return Ok(false);
        };
        // Every processor the request goes to is sent the new date (its tasks give up at the
        // due date they know): one row each, re-armed by a later extension. A row waits for
        // its processor's delivery ([`Store::claim_deliveries`]), and the date it sends is
        // read when it is claimed, so it is the latest whenever it goes.
        sqlx::query(
            "INSERT INTO deliveries (request_id, processor, op, next_attempt_at, armed_at) \
             SELECT request_id, processor, $1, $2, $2 FROM deliveries \
             WHERE request_id = $3 AND op = $4 \
             ON CONFLICT (request_id, processor, op) DO UPDATE SET \
             done_at = NULL, withdrawn_at = NULL, attempts = 0, \
             next_attempt_at = excluded.next_attempt_at, armed_at = excluded.armed_at, \
             last_error = NULL, refusals = 0, dead_lettered_at = NULL",
        )
        .bind(Operation::Extend.as_str())
        .bind(now)
        .bind(&row.id)
        .bind(Operation::Deliver.as_str())
        .execute(tx.conn())
        .await?;
        insert_event(
            &mut tx,
            &row.id,
            EventType::DeadlineExtended,
            now,
            row.state,
            EventDetail {
                actor: by.to_string(),
                message: format!("due date extended by {months} month(s)"),
                free_text: reason.to_string(),
                forgotten: forgotten_at.is_some(),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// Where each of the request's deliveries stands, read in `tx`.
pub(super) async fn deliveries(tx: &mut Tx, id: &str) -> Result<Vec<Delivery>> {
    let rows: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT done_at, withdrawn_at FROM deliveries WHERE request_id = $1 AND op = $2",
    )
    .bind(id)
    .bind(Operation::Deliver.as_str())
    .fetch_all(tx.conn())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(done, withdrawn)| Delivery::of(done.is_some(), withdrawn.is_some()))
        .collect())
}

/// The states of the request's tasks a cancellation might still stop, read in `tx`: all of
/// them but a contract end's that is deleting or done (its progress says so), whose erasure
/// the processor lets run and report what it did.
async fn stoppable_tasks(tx: &mut Tx, id: &str) -> Result<Vec<dsrelay_proto::v1::TaskState>> {
    use dsrelay_proto::prost::Message;
    use dsrelay_proto::v1::{ContractPhase, ContractProgress};
    let rows: Vec<(i32, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT state, progress FROM tasks WHERE request_id = $1")
            .bind(id)
            .fetch_all(tx.conn())
            .await?;
    let deleting = |progress: &Option<Vec<u8>>| {
        progress
            .as_deref()
            .and_then(|p| ContractProgress::decode(p).ok())
            .is_some_and(|p| matches!(p.phase(), ContractPhase::Deleting | ContractPhase::Done))
    };
    Ok(rows
        .into_iter()
        .filter(|(_, progress)| !deleting(progress))
        .map(|(state, _)| task_state(state))
        .collect())
}

/// The states of the request's tasks, read in `tx`.
pub(super) async fn tasks(tx: &mut Tx, id: &str) -> Result<Vec<dsrelay_proto::v1::TaskState>> {
    let states: Vec<i32> = sqlx::query_scalar("SELECT state FROM tasks WHERE request_id = $1")
        .bind(id)
        .fetch_all(tx.conn())
        .await?;
    Ok(states.into_iter().map(task_state).collect())
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::RequestKind;
    use dsrelay_runtime::store::Db;

    use super::*;
    use crate::store::{NewRequest, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};

    async fn store(dir: &std::path::Path) -> Store {
        let db = Db::connect(&format!("sqlite://{}/registry.db", dir.display()))
            .await
            .unwrap();
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .unwrap();
        Store::new(db, b"test key")
    }

    /// An open request received at `received_at` whose stored extension count is `months`.
    async fn request(store: &Store, id: &str, received_at: i64, months: i64) -> RequestRow {
        store
            .insert_request(&NewRequest {
                id: id.into(),
                partner: "crm".into(),
                idempotency_key: format!("key-{id}"),
                body_hash: format!("hash-{id}"),
                body: b"{}".to_vec(),
                identity_hashes: "[\"h\"]".into(),
                kind: RequestKind::Erasure as i32,
                received_at,
                due_at: crate::deadline::due_at(received_at, 0),
                trace_id: "0".repeat(32),
                traceparent: None,
                processors: vec!["p1".into()],
            })
            .await
            .unwrap();
        sqlx::query("UPDATE requests SET extension_months = $1 WHERE id = $2")
            .bind(months)
            .bind(id)
            .execute(&store.db.pool)
            .await
            .unwrap();
        store.request(id).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_stored_count_out_of_range_never_wraps_into_the_due_date() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        const RECEIVED: i64 = 1_800_000_000_000;

        // Below zero counts as no extension made.
        let row = request(&store, "negative", RECEIVED, -1).await;
        assert!(store.extend(&row, 1, "archives", RECEIVED).await.unwrap());
        let row = store.request("negative").await.unwrap().unwrap();
        assert_eq!(row.extension_months, 1);
        assert_eq!(row.due_at, crate::deadline::due_at(RECEIVED, 1));

        // One that cannot grow is refused, and nothing is written.
        for (id, months) in [("at-max", i64::from(u32::MAX)), ("beyond", i64::MAX)] {
            let row = request(&store, id, RECEIVED, months).await;
            let e = store
                .extend(&row, 1, "archives", RECEIVED)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("out of range"), "{e:#}");
            let after = store.request(id).await.unwrap().unwrap();
            assert_eq!(after.extension_months, months);
            assert_eq!(after.due_at, crate::deadline::due_at(RECEIVED, 0));
        }
    }

    /// An extension goes to each processor after its delivery, carrying the due date as it
    /// stands when it is sent; one sent with a date a later extension replaced stays armed.
    #[tokio::test]
    async fn an_extension_follows_the_delivery_and_sends_the_latest_date() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        const RECEIVED: i64 = 1_800_000_000_000;
        let now = RECEIVED + 1000;
        let row = request(&store, "r1", RECEIVED, 0).await;
        assert!(store.extend(&row, 1, "archives", now).await.unwrap());
        let ops =
            |jobs: &[crate::store::DeliveryJob]| jobs.iter().map(|j| j.op).collect::<Vec<_>>();

        // Not before the delivery has been accepted.
        let jobs = store.claim_deliveries(now, 10, 60_000).await.unwrap();
        assert_eq!(ops(&jobs), [Operation::Deliver]);
        // Its processor took it as one task, still pending (so the request stays open).
        let pending = dsrelay_proto::v1::TaskStatus {
            processor: "p1".into(),
            subprocessor: "s1".into(),
            state: dsrelay_proto::v1::TaskState::Pending as i32,
            sequence: 1,
            ..Default::default()
        };
        assert!(store
            .delivery_succeeded(&jobs[0], &[pending], now)
            .await
            .unwrap());
        let jobs = store.claim_deliveries(now, 10, 60_000).await.unwrap();
        assert_eq!(ops(&jobs), [Operation::Extend]);
        assert_eq!(jobs[0].due_at, crate::deadline::due_at(RECEIVED, 1));

        // Extended again while that one is on its way: its answer does not end the row.
        let row = store.request("r1").await.unwrap().unwrap();
        assert!(store.extend(&row, 1, "more archives", now).await.unwrap());
        assert!(store.delivery_succeeded(&jobs[0], &[], now).await.unwrap());
        let again = store.claim_deliveries(now, 10, 60_000).await.unwrap();
        assert_eq!(ops(&again), [Operation::Extend]);
        assert_eq!(again[0].due_at, crate::deadline::due_at(RECEIVED, 2));
        assert!(store.delivery_succeeded(&again[0], &[], now).await.unwrap());
        assert!(store
            .claim_deliveries(now, 10, 60_000)
            .await
            .unwrap()
            .is_empty());
    }
}
