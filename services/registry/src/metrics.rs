//! The registry's metrics: counters kept in the process, and gauges read from the store when
//! scraped (so they hold across restarts and between replicas sharing a database).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `dsrelay_requests` | gauge | `kind`, `state` |
//! | `dsrelay_requests_overdue` | gauge | |
//! | `dsrelay_outbox_depth` | gauge | `op` (`deliver`, `cancel`, `update`, `extend`) |
//! | `dsrelay_outbox_oldest_age_seconds` | gauge | `op` |
//! | `dsrelay_outbox_dead_lettered` | gauge | `op` |
//! | `dsrelay_delivery_attempts_total` | counter | `processor` |
//! | `dsrelay_delivery_failures_total` | counter | `processor` |
//! | `dsrelay_deliveries_dead_lettered_total` | counter | `processor` |
//! | `dsrelay_acknowledgement_latency_seconds` | histogram | `processor` |
//! | `dsrelay_acknowledgements_total` | counter | `result` (`applied`, `duplicate`) |
//! | `dsrelay_acknowledgements_rejected_total` | counter | `processor`, `reason` (`invalid`, `not_routed`) |
//! | `dsrelay_status_check_failures_total` | counter | `processor` |
//! | `dsrelay_submits_refused_total` | counter | `partner` |

use anyhow::Result;
use dsrelay_proto::v1::{RequestKind, RequestState};
use dsrelay_runtime::metrics::{
    encode, CounterVec, GaugeFamily, HistogramVec, Registry, LATENCY_BUCKETS,
};
use sqlx::Row;

use crate::app::Shared;
use crate::config::Config;
use crate::fold::OPEN_STATES;
use crate::store::{OP_CANCEL, OP_DELIVER, OP_EXTEND, OP_UPDATE};

/// The counters and histograms the handlers and the dispatcher update.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// The families below, for the exposition.
    registry: Registry,
    /// Deliver, Cancel, UpdateContractEnd and ExtendDueDate calls made, by processor.
    pub delivery_attempts: CounterVec,
    /// Of those, the ones that failed (or could not be made).
    pub delivery_failures: CounterVec,
    /// Outbox rows (deliveries, cancellations, contract end updates, due date extensions)
    /// dead-lettered after repeated refusal.
    pub deliveries_dead_lettered: CounterVec,
    /// From a task's state change at the processor to the registry applying it.
    pub ack_latency: HistogramVec,
    /// Acknowledgements received, applied or duplicate.
    pub acknowledgements: CounterVec,
    /// Acknowledgements of a batch answered in its `rejected` list, by why: a processor whose
    /// count keeps growing is resending one it cannot fix (it dead-letters it in the end).
    pub acknowledgements_rejected: CounterVec,
    /// The reconciler's GetStatus calls that failed (or could not be made), by processor:
    /// otherwise seen only in the log ("status check failed").
    pub status_check_failures: CounterVec,
    /// Submits refused by the partner's Submit quota (`[submit_quota]`), by partner.
    pub submits_refused: CounterVec,
}

impl Metrics {
    /// Every series starts at zero for the configured processors.
    pub(crate) fn new(config: &Config) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            delivery_attempts: CounterVec::register(
                &mut registry,
                "dsrelay_delivery_attempts",
                "Deliver, Cancel, UpdateContractEnd and ExtendDueDate calls made to processors.",
                &["processor"],
            ),
            delivery_failures: CounterVec::register(
                &mut registry,
                "dsrelay_delivery_failures",
                "Deliver, Cancel, UpdateContractEnd and ExtendDueDate calls that failed; the \
                 outbox retries them with backoff.",
                &["processor"],
            ),
            deliveries_dead_lettered: CounterVec::register(
                &mut registry,
                "dsrelay_deliveries_dead_lettered",
                "Deliver, Cancel, UpdateContractEnd and ExtendDueDate rows dead-lettered after \
                 delivery.max_refusals refusals by the processor; they are no longer sent.",
                &["processor"],
            ),
            ack_latency: HistogramVec::register(
                &mut registry,
                "dsrelay_acknowledgement_latency_seconds",
                "Time from a task's state change at the processor (Acknowledgement.occurred_at) \
                 to the registry applying it.",
                &["processor"],
                LATENCY_BUCKETS,
            ),
            acknowledgements: CounterVec::register(
                &mut registry,
                "dsrelay_acknowledgements",
                "Acknowledgements received from processors: applied, or duplicates of ones \
                 applied before.",
                &["result"],
            ),
            acknowledgements_rejected: CounterVec::register(
                &mut registry,
                "dsrelay_acknowledgements_rejected",
                "Acknowledgements rejected one by one: invalid (a field breaks the protocol's \
                 rules) or not_routed (the request was not delivered to that processor).",
                &["processor", "reason"],
            ),
            status_check_failures: CounterVec::register(
                &mut registry,
                "dsrelay_status_check_failures",
                "GetStatus calls of the reconciler that failed; the request is checked again \
                 in a later round.",
                &["processor"],
            ),
            submits_refused: CounterVec::register(
                &mut registry,
                "dsrelay_submits_refused",
                "Submits refused RESOURCE_EXHAUSTED by the partner's Submit quota \
                 ([submit_quota]) of this registry process; nothing of them was stored.",
                &["partner"],
            ),
            registry,
        };
        for p in &config.processors {
            m.delivery_attempts.inc_by(&[&p.name], 0);
            m.delivery_failures.inc_by(&[&p.name], 0);
            m.deliveries_dead_lettered.inc_by(&[&p.name], 0);
            m.ack_latency.touch(&[&p.name]);
            m.status_check_failures.inc_by(&[&p.name], 0);
            for reason in REJECTION_REASONS {
                m.acknowledgements_rejected.inc_by(&[&p.name, reason], 0);
            }
        }
        for partner in crate::quota::limited_partners(config) {
            m.submits_refused.inc_by(&[partner], 0);
        }
        m.acknowledgements.inc_by(&["applied"], 0);
        m.acknowledgements.inc_by(&["duplicate"], 0);
        m
    }

    /// Records an Acknowledge call's outcome: latencies of the acknowledgements applied, given
    /// as their `occurred_at` (ms), and the counts.
    ///
    /// The store reports counts, not which acknowledgement was a duplicate; a call whose
    /// acknowledgements were all duplicates adds no latency, and a mixed call (rare: a batch
    /// resent after a lost answer with new ones added) adds all of them.
    pub(crate) fn acknowledged(
        &self,
        processor: &str,
        occurred_at_ms: &[Option<i64>],
        applied: u32,
        duplicates: u32,
        now_ms: i64,
    ) {
        self.acknowledgements
            .inc_by(&["applied"], u64::from(applied));
        self.acknowledgements
            .inc_by(&["duplicate"], u64::from(duplicates));
        if applied == 0 {
            return;
        }
        for at in occurred_at_ms.iter().flatten() {
            // Clocks differ between hosts: a change "from the future" counts as immediate.
            let seconds = now_ms.saturating_sub(*at).max(0) as f64 / 1000.0;
            self.ack_latency.observe(&[processor], seconds);
        }
    }
}

/// The `reason` labels of `dsrelay_acknowledgements_rejected_total`.
pub(crate) const REJECTION_REASONS: [&str; 2] = [REJECTED_INVALID, REJECTED_NOT_ROUTED];
/// An acknowledgement that breaks a field rule (INVALID_ARGUMENT).
pub(crate) const REJECTED_INVALID: &str = "invalid";
/// An acknowledgement of a request not delivered to its sender (PERMISSION_DENIED).
pub(crate) const REJECTED_NOT_ROUTED: &str = "not_routed";

/// A kind or state as a label value: the proto enum name without its prefix.
fn label(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_string()
}

const KINDS: &[RequestKind] = &[
    RequestKind::Erasure,
    RequestKind::ReturnOfData,
    RequestKind::Transfer,
    RequestKind::Rectification,
    RequestKind::Restriction,
    RequestKind::Objection,
    RequestKind::ContractEnd,
];

const STATES: &[RequestState] = &[
    RequestState::Received,
    RequestState::Dispatched,
    RequestState::InProgress,
    RequestState::Completed,
    RequestState::PartiallyCompleted,
    RequestState::Failed,
    RequestState::Cancelled,
];

/// The whole exposition: gauges from the store, then the in-process families.
pub(crate) async fn render(shared: &Shared, now_ms: i64) -> Result<String> {
    let pool = &shared.store.db().reader;

    // A registry of this scrape alone: the store gauges are read anew each time.
    let mut gauges = Registry::default();
    let requests = GaugeFamily::register(
        &mut gauges,
        "dsrelay_requests",
        "Requests by kind and state (from the store).",
    );
    let kind_label = |k: i32| {
        RequestKind::try_from(k).map_or_else(
            |_| k.to_string(),
            |k| label(k.as_str_name(), "REQUEST_KIND_"),
        )
    };
    let state_label = |s: i32| {
        RequestState::try_from(s).map_or_else(
            |_| s.to_string(),
            |s| label(s.as_str_name(), "REQUEST_STATE_"),
        )
    };
    for k in KINDS {
        for s in STATES {
            requests.set(
                &[
                    ("kind", &kind_label(*k as i32)),
                    ("state", &state_label(*s as i32)),
                ],
                0.0,
            );
        }
    }
    let rows = sqlx::query(
        "SELECT CAST(kind AS BIGINT) AS kind, CAST(state AS BIGINT) AS state, \
         CAST(COUNT(*) AS BIGINT) AS n FROM requests GROUP BY kind, state",
    )
    .fetch_all(pool)
    .await?;
    for r in &rows {
        let kind = kind_label(r.try_get::<i64, _>("kind")? as i32);
        let state = state_label(r.try_get::<i64, _>("state")? as i32);
        requests.set(
            &[("kind", &kind), ("state", &state)],
            r.try_get::<i64, _>("n")? as f64,
        );
    }

    let open: Vec<String> = OPEN_STATES
        .iter()
        .map(|s| (*s as i32).to_string())
        .collect();
    let overdue: i64 = sqlx::query_scalar(&format!(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM requests WHERE due_at < $1 AND state IN ({})",
        open.join(", ")
    ))
    .bind(now_ms)
    .fetch_one(pool)
    .await?;
    GaugeFamily::register(
        &mut gauges,
        "dsrelay_requests_overdue",
        "Requests past their due date that the controller still owes an answer.",
    )
    .set(&[], overdue as f64);

    // A delivery row is queued with its request; a cancellation when the request is
    // cancelled (its finished_at); a contract end's update when its terms last changed; a
    // due date's extension when the operator extended it (armed_at). An update or extension
    // waiting behind a dead-lettered delivery to the same processor is as stuck as that
    // delivery, which the dead-letter gauge counts: it is left out here.
    let rows = sqlx::query(
        "SELECT d.op, CAST(COUNT(*) AS BIGINT) AS n, \
         MIN(CASE WHEN d.op = $1 THEN r.received_at \
         WHEN d.op = $2 THEN (SELECT c.updated_at FROM contracts c \
         WHERE c.request_id = d.request_id) \
         WHEN d.op = $3 THEN COALESCE(d.armed_at, r.updated_at) \
         ELSE COALESCE(r.finished_at, r.updated_at) END) AS oldest \
         FROM deliveries d JOIN requests r ON r.id = d.request_id \
         WHERE d.done_at IS NULL AND d.dead_lettered_at IS NULL \
         AND NOT (d.op IN ($2, $3) AND EXISTS (SELECT 1 FROM deliveries x \
         WHERE x.request_id = d.request_id AND x.processor = d.processor AND x.op = $1 \
         AND x.done_at IS NULL AND x.dead_lettered_at IS NOT NULL)) GROUP BY d.op",
    )
    .bind(OP_DELIVER)
    .bind(OP_UPDATE)
    .bind(OP_EXTEND)
    .fetch_all(pool)
    .await?;
    let depth = GaugeFamily::register(
        &mut gauges,
        "dsrelay_outbox_depth",
        "Deliveries, cancellations, contract-end updates and due-date extensions queued for their processor (dead-lettered ones apart, and those waiting behind a dead-lettered delivery).",
    );
    let age = GaugeFamily::register(
        &mut gauges,
        "dsrelay_outbox_oldest_age_seconds",
        "Age of the oldest queued delivery, cancellation, contract-end update or due-date extension (dead-lettered ones apart, and those waiting behind a dead-lettered delivery); 0 when none waits.",
    );
    // Dead-lettered rows wait for an operator, not for the dispatcher: counted apart, so
    // that one of them does not hold the age gauge rising until it is requeued.
    let dead_rows = sqlx::query(
        "SELECT op, CAST(COUNT(*) AS BIGINT) AS n FROM deliveries \
         WHERE done_at IS NULL AND dead_lettered_at IS NOT NULL GROUP BY op",
    )
    .fetch_all(pool)
    .await?;
    let dead = GaugeFamily::register(
        &mut gauges,
        "dsrelay_outbox_dead_lettered",
        "Deliveries, cancellations, contract-end updates and due-date extensions dead-lettered and not requeued.",
    );
    for op in [OP_DELIVER, OP_CANCEL, OP_UPDATE, OP_EXTEND] {
        depth.set(&[("op", op)], 0.0);
        age.set(&[("op", op)], 0.0);
        dead.set(&[("op", op)], 0.0);
    }
    for r in &rows {
        let op: String = r.try_get("op")?;
        depth.set(&[("op", &op)], r.try_get::<i64, _>("n")? as f64);
        if let Some(oldest) = r.try_get::<Option<i64>, _>("oldest")? {
            age.set(
                &[("op", &op)],
                now_ms.saturating_sub(oldest).max(0) as f64 / 1000.0,
            );
        }
    }
    for r in &dead_rows {
        let op: String = r.try_get("op")?;
        dead.set(&[("op", &op)], r.try_get::<i64, _>("n")? as f64);
    }

    encode(&[&gauges, &shared.metrics.registry])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        let config: Config = toml::from_str(
            "identity_hash_key = \"k\"\n[tls]\nca = \"ca.pem\"\ncert = \"r.pem\"\nkey = \"r.key\"\n",
        )
        .unwrap();
        Metrics::new(&config)
    }

    #[test]
    fn an_acknowledgement_from_the_far_past_or_future_does_not_break_the_latency() {
        let m = metrics();
        m.acknowledged(
            "p",
            &[Some(i64::MIN), Some(i64::MAX), Some(1_000)],
            3,
            0,
            i64::MAX,
        );
        m.acknowledged("p", &[Some(i64::MAX)], 1, 0, i64::MIN);
        let text = encode(&[&m.registry]).unwrap();
        assert!(
            text.contains("dsrelay_acknowledgement_latency_seconds_count{processor=\"p\"} 4"),
            "{text}"
        );
    }
}
