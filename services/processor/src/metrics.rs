//! The processor's metrics: counters kept in the process, and gauges read from the store when
//! scraped (so they hold across restarts and between replicas sharing a database).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `dsrelay_tasks` | gauge | `subprocessor`, `state` |
//! | `dsrelay_ack_outbox_depth` | gauge | |
//! | `dsrelay_ack_outbox_oldest_age_seconds` | gauge | |
//! | `dsrelay_processor_acks_dead_lettered` | gauge | |
//! | `dsrelay_connector_errors_total` | counter | `subprocessor`, `kind` (`transient`, `permanent`) |
//! | `dsrelay_connector_duration_seconds` | histogram | `subprocessor` |
//! | `dsrelay_export_bytes_sent_total` | counter | `subprocessor`, `when` (`while_written`, `after_export`) |
//! | `dsrelay_subprocessor_unreachable` | gauge | `subprocessor` |
//! | `dsrelay_subprocessor_unreachable_since_seconds` | gauge | `subprocessor` |
//!
//! `dsrelay_processor_acks_dead_lettered` counts dead letters not superseded: one whose task
//! GetStatus has since reported at its sequence or later, or whose task's later
//! acknowledgement the registry has accepted, is still listed (marked) by ListDeadLetters,
//! but the registry holds that state, so it needs no operator. One carrying a deletion
//! certificate is never superseded (the registry gets the certificate only with it): the
//! processor requeues it once by itself instead, and, dead-lettered again, it counts until an
//! operator requeues it and the registry takes it (see `store::acks`).
//!
//! `dsrelay_ack_outbox_depth` and `dsrelay_ack_outbox_oldest_age_seconds` count the
//! acknowledgements queued for the sender, not yet stored by the registry: dead letters,
//! superseded or not, are left out (the sender does not send them), and a requeued one counts
//! again.
//!
//! The two `unreachable` gauges are read from this process's marks ([`crate::breaker`]) when
//! scraped, not from the store: each replica shows its own, and a restart clears them.

use anyhow::Result;
use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{Acknowledgement, TaskState};
use dsrelay_runtime::metrics::{
    encode, CounterVec, GaugeFamily, HistogramVec, Registry, LATENCY_BUCKETS,
};
use sqlx::Row;

use crate::app::Shared;
use crate::breaker::Unreachable;
use crate::config::Config;

/// The counters and histograms the task runner updates.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// The families below, for the exposition.
    registry: Registry,
    /// Connector runs that ended in an error, by subprocessor and kind.
    pub connector_errors: CounterVec,
    /// How long connector runs took, by subprocessor.
    pub connector_duration: HistogramVec,
    /// Export bytes delivered, by subprocessor and by whether they went while the connector
    /// wrote them (`crate::head_start`) or after the export was recorded (`crate::uploader`).
    pub export_bytes_sent: CounterVec,
}

impl Metrics {
    /// Every series starts at zero for the configured subprocessors.
    pub(crate) fn new(config: &Config) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            connector_errors: CounterVec::register(
                &mut registry,
                "dsrelay_connector_errors",
                "Connector runs that failed: transient errors are retried until the due date, \
                 permanent ones fail the task.",
                &["subprocessor", "kind"],
            ),
            connector_duration: HistogramVec::register(
                &mut registry,
                "dsrelay_connector_duration_seconds",
                "Duration of one connector run (one step of a task at its holder).",
                &["subprocessor"],
                LATENCY_BUCKETS,
            ),
            export_bytes_sent: CounterVec::register(
                &mut registry,
                "dsrelay_export_bytes_sent",
                "Export bytes the registry or a transfer's recipient took: while the \
                 connector still wrote them (when = while_written), or after the export was \
                 recorded (when = after_export).",
                &["subprocessor", "when"],
            ),
            registry,
        };
        for s in &config.subprocessors {
            m.connector_errors.inc_by(&[&s.name, "transient"], 0);
            m.connector_errors.inc_by(&[&s.name, "permanent"], 0);
            m.connector_duration.touch(&[&s.name]);
            m.export_bytes_sent.inc_by(&[&s.name, "while_written"], 0);
            m.export_bytes_sent.inc_by(&[&s.name, "after_export"], 0);
        }
        m
    }

    /// Counts a connector error.
    pub(crate) fn connector_error(&self, subprocessor: &str, transient: bool) {
        let kind = if transient { "transient" } else { "permanent" };
        self.connector_errors.inc(&[subprocessor, kind]);
    }

    /// Counts `bytes` of an export delivered, `while_written` or after the export.
    pub(crate) fn export_sent(&self, subprocessor: &str, while_written: bool, bytes: u64) {
        let when = if while_written {
            "while_written"
        } else {
            "after_export"
        };
        self.export_bytes_sent.inc_by(&[subprocessor, when], bytes);
    }
}

const STATES: &[TaskState] = &[
    TaskState::Pending,
    TaskState::InProgress,
    TaskState::Completed,
    TaskState::NotFound,
    TaskState::Retained,
    TaskState::Refused,
    TaskState::Failed,
    TaskState::WaitingForOperator,
    TaskState::Cancelled,
];

fn state_label(s: i32) -> String {
    TaskState::try_from(s).map_or_else(
        |_| s.to_string(),
        |s| {
            s.as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_string()
        },
    )
}

/// The whole exposition: gauges from the store, then the in-process families.
pub(crate) async fn render(shared: &Shared, now_ms: i64) -> Result<String> {
    let pool = &shared.store.db().reader;

    // A registry of this scrape alone: the store gauges are read anew each time.
    let mut gauges = Registry::default();
    let tasks = GaugeFamily::register(
        &mut gauges,
        "dsrelay_tasks",
        "Tasks by subprocessor and state (from the store).",
    );
    for s in &shared.config.subprocessors {
        for state in STATES {
            tasks.set(
                &[
                    ("subprocessor", &s.name),
                    ("state", &state_label(*state as i32)),
                ],
                0.0,
            );
        }
    }
    let rows = sqlx::query(
        "SELECT subprocessor, CAST(state AS BIGINT) AS state, CAST(COUNT(*) AS BIGINT) AS n \
         FROM tasks GROUP BY subprocessor, state",
    )
    .fetch_all(pool)
    .await?;
    for r in &rows {
        let subprocessor: String = r.try_get("subprocessor")?;
        let state = state_label(r.try_get::<i64, _>("state")? as i32);
        tasks.set(
            &[("subprocessor", &subprocessor), ("state", &state)],
            r.try_get::<i64, _>("n")? as f64,
        );
    }

    // Dead letters are left out: they wait for an operator, not for the sender, and have a
    // gauge of their own; a superseded one needs nobody at all.
    let depth = shared.store.unsent_ack_count().await?;
    // Rows are numbered in the order they were queued, and each carries the time of its
    // state change.
    let oldest: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE sent_at IS NULL AND dead_lettered_at IS NULL \
         ORDER BY id LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    let age = oldest
        .and_then(|p| Acknowledgement::decode(p.as_slice()).ok())
        .and_then(|a| a.occurred_at)
        .map_or(0.0, |t| {
            (now_ms - dsrelay_proto::millis_from_timestamp(&t)).max(0) as f64 / 1000.0
        });
    GaugeFamily::register(
        &mut gauges,
        "dsrelay_ack_outbox_depth",
        "Acknowledgements queued to be sent to their controller's registry and not yet \
         stored by it. Dead letters are not counted (dsrelay_processor_acks_dead_lettered \
         counts those that need an operator); a requeued one counts again.",
    )
    .set(&[], depth as f64);
    GaugeFamily::register(
        &mut gauges,
        "dsrelay_ack_outbox_oldest_age_seconds",
        "Age of the oldest acknowledgement queued to be sent to its registry and not yet \
         stored by it, dead letters left out; 0 when none waits.",
    )
    .set(&[], age);
    let dead = shared.store.dead_letter_count().await?;
    GaugeFamily::register(
        &mut gauges,
        "dsrelay_processor_acks_dead_lettered",
        "Acknowledgements parked after acks.max_rejections rejections by their registry: \
         not sent until an operator requeues them (dsrctl tasks dead-letters). Superseded ones \
         (their task's state, at their sequence or later, since read by the registry through \
         GetStatus or accepted by it in a later acknowledgement) are not counted; one carrying \
         a deletion certificate is never superseded.",
    )
    .set(&[], dead as f64);
    let names = shared.config.subprocessors.iter().map(|s| s.name.as_str());
    unreachable_gauges(&mut gauges, names, &shared.unavailable_until.marks());

    encode(&[&gauges, &shared.metrics.registry])
}

/// Registers the unreachable marks' gauges in `registry`: 0 for each of `subprocessors`, and
/// for each of `marks` 1 and the Unix time of its holder's first failure.
fn unreachable_gauges<'a>(
    registry: &mut Registry,
    subprocessors: impl Iterator<Item = &'a str>,
    marks: &[Unreachable],
) {
    let down = GaugeFamily::register(
        registry,
        "dsrelay_subprocessor_unreachable",
        "1 while the subprocessor is marked unreachable after a transient failure (its tasks \
         wait without calling it until a probe gets an answer; a mark that ran out with no \
         task left to try the holder is dropped), else 0. Kept in this process: each replica \
         marks on its own, a restart clears the marks.",
    );
    let since = GaugeFamily::register(
        registry,
        "dsrelay_subprocessor_unreachable_since_seconds",
        "Unix time of the first failure of the subprocessor's current unreachable mark; 0 \
         while it is not marked.",
    );
    for name in subprocessors {
        down.set(&[("subprocessor", name)], 0.0);
        since.set(&[("subprocessor", name)], 0.0);
    }
    for m in marks {
        down.set(&[("subprocessor", &m.holder)], 1.0);
        since.set(&[("subprocessor", &m.holder)], m.since as f64 / 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A marked subprocessor reads 1 with the Unix time of its first failure, the others 0
    /// and 0; once its mark clears, it reads 0 too. Before, no gauge showed a mark.
    #[test]
    fn unreachable_gauges_follow_the_marks() {
        let clock = dsrelay_runtime::clock::Clock::system();
        let breaker = crate::breaker::Breaker::new(clock, b"k");
        let scrape = |breaker: &crate::breaker::Breaker| {
            let mut registry = Registry::default();
            let names = ["accounting", "mail"].into_iter();
            unreachable_gauges(&mut registry, names, &breaker.marks());
            encode(&[&registry]).expect("encode")
        };
        breaker.failed("mail", 1_700_000_000_500, 1_700_000_060_000, "refused");
        let text = scrape(&breaker);
        for line in [
            "dsrelay_subprocessor_unreachable{subprocessor=\"mail\"} 1.0",
            "dsrelay_subprocessor_unreachable{subprocessor=\"accounting\"} 0.0",
            "dsrelay_subprocessor_unreachable_since_seconds{subprocessor=\"mail\"} 1700000000.5",
            "dsrelay_subprocessor_unreachable_since_seconds{subprocessor=\"accounting\"} 0.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        assert!(
            text.contains("# TYPE dsrelay_subprocessor_unreachable gauge"),
            "{text}"
        );
        breaker.answered("mail");
        let text = scrape(&breaker);
        for line in [
            "dsrelay_subprocessor_unreachable{subprocessor=\"mail\"} 0.0",
            "dsrelay_subprocessor_unreachable_since_seconds{subprocessor=\"mail\"} 0.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
