//! The drain and the check: Jepsen's total-queue rule over what the submitters were told,
//! what the registry and the processor stored, and what the holders' own records say.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{EventType, GetRequest, Request, RequestState, TaskState};
use dsrelay_runtime::store::Db;
use tonic::transport::Channel;

use super::holders::Holder;
use super::submit::Submitted;
use super::PROCESSOR;
use crate::progress;

/// Whether `state` is final (COMPLETED and every state after it).
fn is_final(state: i32) -> bool {
    state >= RequestState::Completed as i32
}

/// The registry's view of `id` (None: the registry does not know it).
async fn get(client: &RequestServiceClient<Channel>, id: &str) -> Result<Option<Request>> {
    let mut request = tonic::Request::new(GetRequest {
        request_id: id.to_string(),
    });
    request.set_timeout(Duration::from_secs(10));
    match client.clone().get(request).await {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => bail!("reading request {id}: {:?}: {}", s.code(), s.message()),
    }
}

/// Waits until every accepted request is final at the registry, or `bound` passes, or the
/// killer stops (it failed).
pub(super) async fn drain<T>(
    client: &RequestServiceClient<Channel>,
    submitted: &[Submitted],
    bound: Duration,
    killer: &tokio::task::JoinHandle<T>,
) -> Result<()> {
    let deadline = Instant::now() + bound;
    let mut open: Vec<&str> = submitted.iter().filter_map(|s| s.id.as_deref()).collect();
    let mut last_report = Instant::now();
    while !open.is_empty() {
        if killer.is_finished() {
            // Its error is reported by whoever awaits it.
            return Ok(());
        }
        let mut still = Vec::new();
        for id in open {
            // A failed read (a restart in between) leaves the request open for the next round.
            match get(client, id).await {
                Ok(Some(r)) if is_final(r.state) => {}
                // A request the registry does not know is lost: the check reports it.
                Ok(None) => {}
                _ => still.push(id),
            }
        }
        open = still;
        if open.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            progress(format!(
                "chaos: {} accepted requests not final after the drain bound",
                open.len()
            ));
            return Ok(());
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            progress(format!(
                "chaos: draining, {} requests not final",
                open.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// What the check found.
#[derive(Debug, Default)]
pub(super) struct Report {
    /// Final states of the accepted requests.
    states: BTreeMap<String, u64>,
    /// Accepted ids the registry does not know.
    lost: Vec<String>,
    /// Accepted requests not final after the drain.
    unfinished: Vec<String>,
    /// Keys with more than one request (at the registry, or two ids answered).
    duplicated: Vec<String>,
    /// Requests the processor holds beyond the registry's (a delivery taken twice).
    processor_requests: i64,
    /// The processor's tasks and the connector attempts their rows count.
    pub(super) tasks: i64,
    attempts: i64,
    /// Per holder: rows deleted (the trigger's count).
    effects: Vec<(String, i64)>,
    /// (key, holder) whose row was deleted more than once, or changed by an UPDATE.
    applied_twice: Vec<String>,
    /// (key, holder) of an accepted erasure whose row was never deleted.
    not_applied: Vec<String>,
    /// Subjects never asked for whose rows were touched.
    unasked_touched: Vec<String>,
    /// (key, holder) whose task's reported outcome contradicts the holder's data.
    false_outcomes: Vec<String>,
    /// Of those, NOT_FOUND reported by a task's second or later connector attempt over a
    /// row that was deleted: an earlier attempt deleted it, and the processor was killed
    /// before it stored the outcome (issue 12 point 3).
    not_found_after_retry: Vec<String>,
    /// Whether those fail the run.
    fail_on_not_found_after_retry: bool,
    /// The most connector attempts the run's kills explain, and how it was reckoned; more
    /// fails the run.
    pub(super) attempts_bound: Option<(i64, String)>,
    /// Acknowledgements the processor made, and of those how many it has not sent.
    acks_made: i64,
    acks_unsent: i64,
    /// Acknowledgements the registry received (once each: its primary key).
    acks_received: i64,
    /// (request, holder, sequence) the processor sent that the registry never received.
    acks_lost: Vec<String>,
    /// (request, holder, sequence) the registry received that the processor never made.
    acks_unknown: Vec<String>,
    /// (request, holder, sequence) the registry recorded more than one task event for.
    acks_applied_twice: Vec<String>,
}

impl Report {
    pub(super) fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.unfinished.is_empty()
            && self.duplicated.is_empty()
            && self.applied_twice.is_empty()
            && self.not_applied.is_empty()
            && self.unasked_touched.is_empty()
            && self.false_outcomes.is_empty()
            && (self.not_found_after_retry.is_empty() || !self.fail_on_not_found_after_retry)
            && self.acks_lost.is_empty()
            && self.acks_unknown.is_empty()
            && self.acks_applied_twice.is_empty()
            && self
                .attempts_bound
                .as_ref()
                .is_none_or(|(bound, _)| self.attempts <= *bound)
    }

    pub(super) fn print(&self) {
        let states = self
            .states
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!("final states: {states}");
        println!(
            "processor: {} requests, {} tasks, {} connector attempts (claims counted in the \
             task rows)",
            self.processor_requests, self.tasks, self.attempts
        );
        if let Some((bound, why)) = &self.attempts_bound {
            println!(
                "connector calls: {} for {} tasks, {} beyond one per task; at most {bound} \
                 allowed ({why}){}",
                self.attempts,
                self.tasks,
                self.attempts - self.tasks,
                if self.attempts > *bound {
                    " EXCEEDED"
                } else {
                    ""
                }
            );
        }
        println!(
            "acknowledgements: {} made by the processor ({} unsent), {} received by the registry",
            self.acks_made, self.acks_unsent, self.acks_received
        );
        let effects = self
            .effects
            .iter()
            .map(|(h, n)| format!("{h} {n} rows deleted"))
            .collect::<Vec<_>>()
            .join(", ");
        println!("effects: {effects}");
        let line = |what: &str, v: &[String]| {
            let first: Vec<&str> = v.iter().take(5).map(String::as_str).collect();
            if v.is_empty() {
                format!("{what} 0")
            } else {
                format!("{what} {} (e.g. {})", v.len(), first.join(", "))
            }
        };
        println!("{}", line("lost:", &self.lost));
        println!("{}", line("duplicated:", &self.duplicated));
        println!("{}", line("not final:", &self.unfinished));
        println!("{}", line("effects applied twice:", &self.applied_twice));
        println!("{}", line("effects not applied:", &self.not_applied));
        println!(
            "{}",
            line("unasked subjects touched:", &self.unasked_touched)
        );
        println!(
            "{}",
            line("outcomes contradicting the holder:", &self.false_outcomes)
        );
        println!("{}", line("acknowledgements lost:", &self.acks_lost));
        println!(
            "{}",
            line("acknowledgements never made:", &self.acks_unknown)
        );
        println!(
            "{}",
            line("acknowledgements applied twice:", &self.acks_applied_twice)
        );
        println!(
            "{}{}",
            line(
                "NOT_FOUND after a retry over a row the task deleted (issue 12 point 3):",
                &self.not_found_after_retry
            ),
            if self.fail_on_not_found_after_retry || self.not_found_after_retry.is_empty() {
                ""
            } else {
                " [tolerated: --allow-not-found-after-retry]"
            }
        );
    }
}

fn state_name(state: i32) -> String {
    RequestState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("REQUEST_STATE_").into())
        .unwrap_or_else(|_| state.to_string())
}

fn task_name(state: i32) -> String {
    TaskState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("TASK_STATE_").into())
        .unwrap_or_else(|_| state.to_string())
}

/// Checks the drained run.
pub(super) async fn check(
    client: &RequestServiceClient<Channel>,
    submitted: &[Submitted],
    holders: &[Holder],
    requests: u64,
    registry_db: &str,
    processor_db: &str,
    allow_not_found_after_retry: bool,
) -> Result<Report> {
    let mut report = Report {
        fail_on_not_found_after_retry: !allow_not_found_after_retry,
        ..Default::default()
    };
    // Each accepted id as the registry's partner API tells it.
    let mut views: HashMap<String, Request> = HashMap::new();
    for s in submitted {
        let Some(id) = &s.id else { continue };
        match get(client, id).await? {
            None => report.lost.push(format!("{} ({id})", s.key)),
            Some(r) => {
                if r.idempotency_key != s.key {
                    report.duplicated.push(format!(
                        "{} answered as {id}, which is {}'s",
                        s.key, r.idempotency_key
                    ));
                }
                if !is_final(r.state) {
                    report.unfinished.push(format!("{} ({id})", s.key));
                }
                *report.states.entry(state_name(r.state)).or_default() += 1;
                views.insert(s.key.clone(), r);
            }
        }
    }

    // One request per key at the registry, and it is the one its submitter was told of.
    let registry = Db::connect(registry_db).await?;
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT idempotency_key, id FROM requests WHERE idempotency_key LIKE 'chaos-%'",
    )
    .fetch_all(&registry.pool)
    .await?;
    registry.pool.close().await;
    let mut by_key: HashMap<&str, Vec<&str>> = HashMap::new();
    for (key, id) in &rows {
        by_key.entry(key).or_default().push(id);
    }
    let answered: HashMap<&str, &str> = submitted
        .iter()
        .filter_map(|s| Some((s.key.as_str(), s.id.as_deref()?)))
        .collect();
    for (key, ids) in &by_key {
        if ids.len() > 1 {
            report
                .duplicated
                .push(format!("{key}: {} requests at the registry", ids.len()));
        } else if let Some(answered) = answered.get(key) {
            if *answered != ids[0] {
                report
                    .duplicated
                    .push(format!("{key}: answered {answered}, stored {}", ids[0]));
            }
        }
    }

    // The processor: one request per delivered request, and its connector attempts.
    let processor = Db::connect(processor_db).await?;
    let (n, tasks, attempts): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM requests), COUNT(*), \
         CAST(COALESCE(SUM(attempts), 0) AS BIGINT) FROM tasks",
    )
    .fetch_one(&processor.pool)
    .await?;
    let task_rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT request_id, subprocessor, CAST(attempts AS BIGINT) FROM tasks")
            .fetch_all(&processor.pool)
            .await?;
    processor.pool.close().await;
    let attempts_of: HashMap<(String, String), i64> = task_rows
        .into_iter()
        .map(|(request, sub, n)| ((request, sub), n))
        .collect();
    report.processor_requests = n;
    report.tasks = tasks;
    report.attempts = attempts;
    if n > rows.len() as i64 {
        report.duplicated.push(format!(
            "the processor holds {n} requests, the registry {}",
            rows.len()
        ));
    }

    acknowledgements(&mut report, registry_db, processor_db).await?;

    // The holders: each accepted subject's row deleted once, by a task that says so; every
    // other subject's row untouched.
    let asked: HashSet<&str> = answered.keys().copied().collect();
    for holder in holders {
        let effects = holder.effects().await?;
        report.effects.push((
            holder.name.clone(),
            effects.values().map(|e| e.deletes).sum(),
        ));
        for (key, e) in &effects {
            if e.deletes > 1 || e.updates > 0 {
                report.applied_twice.push(format!(
                    "{key} at {}: {} deletes, {} updates",
                    holder.name, e.deletes, e.updates
                ));
            }
            if !asked.contains(key.as_str()) && (e.deletes > 0 || e.updates > 0 || !e.present) {
                // Only subjects from `requests` on were never asked for; a Submit that was
                // never answered may still have been stored and carried out.
                let unasked = key
                    .strip_prefix("chaos-")
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_none_or(|n| n >= requests);
                if unasked {
                    report
                        .unasked_touched
                        .push(format!("{key} at {}", holder.name));
                }
            }
        }
        for s in submitted.iter().filter(|s| s.id.is_some()) {
            let e = effects.get(&s.key).copied().unwrap_or_default();
            if e.deletes == 0 && e.present {
                report
                    .not_applied
                    .push(format!("{} at {}", s.key, holder.name));
            }
            let task = views.get(&s.key).and_then(|r| {
                r.tasks
                    .iter()
                    .find(|t| t.processor == PROCESSOR && t.subprocessor == holder.name)
            });
            let Some(task) = task else {
                if views.contains_key(&s.key) {
                    report
                        .false_outcomes
                        .push(format!("{} at {}: no task reported", s.key, holder.name));
                }
                continue;
            };
            let done = e.deletes >= 1 && !e.present;
            let said_done = task.state == TaskState::Completed as i32;
            let retried = s.id.as_ref().is_some_and(|id| {
                attempts_of
                    .get(&(id.clone(), holder.name.clone()))
                    .is_some_and(|n| *n > 1)
            });
            if done && task.state == TaskState::NotFound as i32 && retried {
                report
                    .not_found_after_retry
                    .push(format!("{} at {}", s.key, holder.name));
            } else if said_done != done {
                report.false_outcomes.push(format!(
                    "{} at {}: reported {} ({}), the row was {}",
                    s.key,
                    holder.name,
                    task_name(task.state),
                    task.reason,
                    if done { "deleted" } else { "not deleted" }
                ));
            }
        }
    }
    Ok(report)
}

/// Each acknowledgement the processor sent received by the registry, none it never made,
/// and each applied once (at most one task event per acknowledgement).
async fn acknowledgements(
    report: &mut Report,
    registry_db: &str,
    processor_db: &str,
) -> Result<()> {
    type Key = (String, String, i64);
    let processor = Db::connect(processor_db).await?;
    let made: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT request_id, subprocessor, CAST(sequence AS BIGINT), \
         CAST(CASE WHEN sent_at IS NULL THEN 0 ELSE 1 END AS BIGINT) FROM ack_outbox",
    )
    .fetch_all(&processor.pool)
    .await?;
    processor.pool.close().await;
    let registry = Db::connect(registry_db).await?;
    let received: Vec<Key> = sqlx::query_as(
        "SELECT request_id, subprocessor, CAST(sequence AS BIGINT) FROM acknowledgements \
         WHERE processor = $1",
    )
    .bind(PROCESSOR)
    .fetch_all(&registry.pool)
    .await?;
    let twice: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT request_id, subprocessor, CAST(sequence AS BIGINT), COUNT(*) FROM events \
         WHERE type = $1 AND processor = $2 \
         GROUP BY request_id, subprocessor, sequence HAVING COUNT(*) > 1",
    )
    .bind(EventType::TaskUpdated as i64)
    .bind(PROCESSOR)
    .fetch_all(&registry.pool)
    .await?;
    registry.pool.close().await;

    let key = |(r, s, n): &Key| format!("{r} at {s} #{n}");
    let received_set: HashSet<&Key> = received.iter().collect();
    let made_set: HashSet<Key> = made
        .iter()
        .map(|(r, s, n, _)| (r.clone(), s.clone(), *n))
        .collect();
    report.acks_made = made.len() as i64;
    report.acks_unsent = made.iter().filter(|m| m.3 == 0).count() as i64;
    report.acks_received = received.len() as i64;
    for (r, s, n, sent) in &made {
        let k = (r.clone(), s.clone(), *n);
        if *sent == 1 && !received_set.contains(&k) {
            report.acks_lost.push(key(&k));
        }
    }
    for k in &received {
        if !made_set.contains(k) {
            report.acks_unknown.push(key(k));
        }
    }
    for (r, s, n, times) in twice {
        report
            .acks_applied_twice
            .push(format!("{} ({times} events)", key(&(r, s, n))));
    }
    Ok(())
}
