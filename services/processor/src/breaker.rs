//! The unreachable-holder breaker: after a transient failure a holder is marked unreachable
//! for the retry's backoff, and its other tasks wait without calling it, so that one holder
//! that is down costs one timeout, not one per task. When the mark runs out one task probes
//! the holder while the others keep waiting; any answer from the holder clears the mark.
//!
//! A mark also keeps since when the holder has been failing (a failed probe renews the mark
//! without moving that), its last error, and how many times each task waited for it: the
//! runner acknowledges waits 1, 2, 4, 8... with the mark's words
//! ([`crate::task_machine::worth_acknowledging`]), so the count starts again once the
//! holder answers.
//!
//! A mark that has run out with no probe out, while no task is left to try the holder (its
//! tasks were cancelled, gave up at their due date or finished otherwise:
//! [`Store::tasks_left_to_try`](crate::store::Store::tasks_left_to_try)), is dropped by the
//! check [`run`] makes every [`CHECK_INTERVAL`]: nothing would call the holder again, so
//! nothing else would ever clear it. The holder's reachability is then unknown, not known
//! good: the next task to come calls it as the probe, and a transient failure marks it
//! again. A mark with a task left stays until a probe answers.
//!
//! The marks live in this process: each replica learns of a down holder by itself, and a
//! restart clears them. A mark's opening is logged at WARN and its clearing (an answer, or
//! dropped with no task left) at INFO, once each, not per call; [`Breaker::marks`] lists the
//! open ones for the metrics (`dsrelay_subprocessor_unreachable`) and ListSubprocessors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dsrelay_runtime::clock::{date_label, Clock};
use dsrelay_runtime::log_text::withheld;
use tokio::sync::watch;

use crate::app::Shared;
use crate::store::TaskKey;

/// How often [`run`] looks for marks that ran out with no task left to try their holder.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Holders marked unreachable, by subprocessor name.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    marks: Mutex<HashMap<String, Mark>>,
    /// Times a clearing's outage: [`Breaker::answered`] is told no instant.
    clock: Clock,
    /// Keys the hash that stands for a holder's error in the log lines: its words may quote
    /// the subject ([`dsrelay_runtime::log_text`]).
    log_key: Vec<u8>,
}

/// An open mark, as [`Breaker::marks`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unreachable {
    /// The subprocessor's name.
    pub holder: String,
    /// When (ms) its first failure of this run of failures came.
    pub since: i64,
    /// Its last transient error, as the mark keeps it.
    pub error: String,
}

#[derive(Debug, Clone)]
struct Mark {
    /// Until then (ms) nobody calls the holder.
    open_until: i64,
    /// While a probe is out, until when (ms) it may take; then another task probes, so a
    /// probe that was lost (its runner crashed) does not keep the holder shut.
    probe_until: Option<i64>,
    /// When the holder's first failure of this run of failures came (ms).
    since: i64,
    /// Its last transient error.
    error: String,
    /// Waits so far of each task held back by this mark, the one being let in included.
    waits: HashMap<TaskKey, i64>,
}

impl Mark {
    /// Whether the mark has run out at `now` with no probe out (or a probe whose time is
    /// up): what the check that drops marks no task is left to try looks for.
    fn ran_out(&self, now: i64) -> bool {
        self.open_until <= now && self.probe_until.is_none_or(|u| u <= now)
    }
}

/// A mark that ran out with no probe out, as [`Breaker::ran_out`] saw it: what
/// [`Breaker::drop_untried`] checks it still stands as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RanOut {
    /// The subprocessor's name.
    pub holder: String,
    /// The mark's end, start and probe as seen: a task let through as the probe, or a new
    /// failure, changes one of them meanwhile.
    open_until: i64,
    since: i64,
    probe_until: Option<i64>,
}

/// Why a task may not call its holder now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Down {
    /// When (ms) to look at the task again: the mark's end, or shortly while a probe is out.
    pub until: i64,
    /// Since when (ms) the holder has been failing.
    pub since: i64,
    /// Its last transient error.
    pub error: String,
    /// This task's waits for the holder so far, this one included.
    pub waits: i64,
}

impl Breaker {
    /// No marks; `clock` times the outages, `log_key` keys the hashes of errors in log lines.
    pub(crate) fn new(clock: Clock, log_key: &[u8]) -> Self {
        Self {
            marks: Mutex::default(),
            clock,
            log_key: log_key.to_vec(),
        }
    }

    /// Whether `task` may call `holder` at `now`: `None` to call it, or why to wait (and the
    /// wait is counted). Once a mark has run out the first caller is let through as the
    /// probe, for up to `probe_ms`; the others look again after `recheck_ms`.
    pub(crate) fn admit(
        &self,
        holder: &str,
        task: &TaskKey,
        now: i64,
        probe_ms: i64,
        recheck_ms: i64,
    ) -> Option<Down> {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let mark = marks.get_mut(holder)?;
        let until = if mark.open_until > now {
            mark.open_until
        } else {
            match mark.probe_until {
                Some(until) if until > now => (now + recheck_ms).min(until),
                _ => {
                    mark.probe_until = Some(now + probe_ms);
                    return None;
                }
            }
        };
        let waits = mark.waits.entry(task.clone()).or_insert(0);
        *waits += 1;
        Some(Down {
            until,
            since: mark.since,
            error: mark.error.clone(),
            waits: *waits,
        })
    }

    /// The holder failed transiently at `now` with `error`: nobody calls it before `until`
    /// (ms). A holder marked already keeps since when it fails, and its tasks' waits; one not
    /// marked yet is logged at WARN.
    pub(crate) fn failed(&self, holder: &str, now: i64, until: i64, error: &str) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let opened = !marks.contains_key(holder);
        let mark = marks.entry(holder.to_string()).or_insert_with(|| Mark {
            open_until: until,
            probe_until: None,
            since: now,
            error: String::new(),
            waits: HashMap::new(),
        });
        mark.open_until = until;
        mark.probe_until = None;
        // Enough to say what is wrong; the task's last error keeps a call's whole words.
        mark.error = crate::text::fit(error, 200).into_owned();
        drop(marks);
        if opened {
            // Only transient failures mark a holder; the words stay out of the line.
            let error = withheld(&self.log_key, error);
            let since = date_label(now);
            tracing::warn!(
                subprocessor = %holder,
                %since,
                %error,
                until = %date_label(until),
                "subprocessor {holder} unreachable since {since}: transient error ({error}); \
                 its tasks wait without calling it, one probes it when the mark runs out"
            );
        }
    }

    /// [`Breaker::failed`] with no error to tell, since `until`.
    #[cfg(test)]
    pub(crate) fn unreachable(&self, holder: &str, until: i64) {
        self.failed(holder, until, until, "");
    }

    /// The holder answered (whatever it said): it is reachable, and its tasks' waits are over.
    /// A mark it clears is logged at INFO with how long the holder was unreachable.
    pub(crate) fn answered(&self, holder: &str) {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mark) = marks.remove(holder) else {
            return;
        };
        drop(marks);
        let outage_ms = (self.clock.now_ms() - mark.since).max(0);
        let since = date_label(mark.since);
        tracing::info!(
            subprocessor = %holder,
            %since,
            outage_ms,
            "subprocessor {holder} reachable again after {} s (unreachable since {since})",
            outage_ms / 1000
        );
    }

    /// The marks that have run out at `now` with no probe out (none let through, or its time
    /// is up): those whose holder nothing may call again, if no task is left to try it.
    pub(crate) fn ran_out(&self, now: i64) -> Vec<RanOut> {
        let marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ran_out: Vec<RanOut> = marks
            .iter()
            .filter(|(_, m)| m.ran_out(now))
            .map(|(holder, m)| RanOut {
                holder: holder.clone(),
                open_until: m.open_until,
                since: m.since,
                probe_until: m.probe_until,
            })
            .collect();
        drop(marks);
        ran_out.sort_by(|a, b| a.holder.cmp(&b.holder));
        ran_out
    }

    /// Drops the mark `seen`, found with no task left to try its holder, if it still stands
    /// as [`Breaker::ran_out`] saw it at `now` (no task let through as the probe since, no new
    /// failure, no answer): answers whether it did. Logged at INFO with the outage's length so
    /// far, saying that the holder's reachability is unknown until the next task tries it.
    pub(crate) fn drop_untried(&self, seen: &RanOut, now: i64) -> bool {
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let unchanged = marks.get(&seen.holder).is_some_and(|m| {
            (m.open_until, m.since, m.probe_until)
                == (seen.open_until, seen.since, seen.probe_until)
                && m.ran_out(now)
        });
        if !unchanged {
            return false;
        }
        marks.remove(&seen.holder);
        drop(marks);
        let holder = &seen.holder;
        let outage_ms = (now - seen.since).max(0);
        let since = date_label(seen.since);
        tracing::info!(
            subprocessor = %holder,
            %since,
            outage_ms,
            "subprocessor {holder}'s unreachable mark dropped after {} s (unreachable since \
             {since}): no task is left to try it; its reachability is unknown, and the next \
             task for it will try it",
            outage_ms / 1000
        );
        true
    }

    /// The open marks, by holder name: a holder is listed from its first transient failure
    /// until it answers, or its mark is dropped with no task left to try it
    /// ([`Breaker::drop_untried`]), probes and waits alike.
    pub(crate) fn marks(&self) -> Vec<Unreachable> {
        let marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut open: Vec<Unreachable> = marks
            .iter()
            .map(|(holder, m)| Unreachable {
                holder: holder.clone(),
                since: m.since,
                error: m.error.clone(),
            })
            .collect();
        drop(marks);
        open.sort_by(|a, b| a.holder.cmp(&b.holder));
        open
    }

    /// The open mark of `holder`, if it has one.
    pub(crate) fn mark(&self, holder: &str) -> Option<Unreachable> {
        let marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        marks.get(holder).map(|m| Unreachable {
            holder: holder.to_string(),
            since: m.since,
            error: m.error.clone(),
        })
    }
}

/// Every [`CHECK_INTERVAL`] until `stop`, drops the marks no task is left to try
/// ([`drop_untried_marks`]); a failed check is logged and made again at the next.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        if let Err(e) = drop_untried_marks(&shared).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "looking for unreachable marks with no task left to try their holder failed; \
                 looking again at the next check"
            );
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
}

/// One check: each mark that has run out with no probe out, whose holder has no task left
/// that will call it
/// ([`Store::tasks_left_to_try`](crate::store::Store::tasks_left_to_try)), is dropped.
/// Answers how many were. A mark whose holder has tasks left stays: one of them probes it.
pub(crate) async fn drop_untried_marks(shared: &Shared) -> anyhow::Result<usize> {
    let breaker = &shared.unavailable_until;
    let mut dropped = 0;
    for seen in breaker.ran_out(shared.clock.now_ms()) {
        let now = shared.clock.now_ms();
        if shared.store.tasks_left_to_try(&seen.holder, now).await? {
            continue;
        }
        // A task that came meanwhile and was let through as the probe, or failed and renewed
        // the mark, keeps it: `drop_untried` drops only the mark as it was seen.
        dropped += usize::from(breaker.drop_untried(&seen, shared.clock.now_ms()));
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(request_id: &str) -> TaskKey {
        TaskKey {
            controller: "acme".into(),
            request_id: request_id.into(),
            subprocessor: "mail".into(),
        }
    }

    /// `admit`'s answer: until when to wait, `None` to call.
    fn until(b: &Breaker, holder: &str, now: i64) -> Option<i64> {
        b.admit(holder, &task("r-1"), now, 1_000, 100)
            .map(|d| d.until)
    }

    #[test]
    fn a_holder_never_marked_is_called() {
        let b = Breaker::default();
        assert_eq!(until(&b, "mail", 0), None);
        assert_eq!(until(&b, "mail", 0), None);
    }

    #[test]
    fn a_marked_holder_is_waited_for_then_probed_by_one_task() {
        let b = Breaker::default();
        b.unreachable("mail", 5_000);
        assert_eq!(until(&b, "mail", 1_000), Some(5_000));
        // Another holder is not affected.
        assert_eq!(until(&b, "accounting", 1_000), None);
        // The mark ran out: one probe goes, the others look again shortly.
        assert_eq!(until(&b, "mail", 5_000), None);
        assert_eq!(until(&b, "mail", 5_010), Some(5_110));
        assert_eq!(until(&b, "mail", 5_950), Some(6_000));
        // The probe failed again: a new mark, no probe out.
        b.unreachable("mail", 9_000);
        assert_eq!(until(&b, "mail", 6_100), Some(9_000));
        // The next probe answered: everyone calls again.
        assert_eq!(until(&b, "mail", 9_000), None);
        b.answered("mail");
        assert_eq!(until(&b, "mail", 9_001), None);
        assert_eq!(until(&b, "mail", 9_001), None);
    }

    #[test]
    fn a_lost_probe_lets_another_task_probe() {
        let b = Breaker::default();
        b.unreachable("mail", 1_000);
        assert_eq!(until(&b, "mail", 1_000), None);
        assert_eq!(until(&b, "mail", 1_500), Some(1_600));
        assert_eq!(until(&b, "mail", 2_000), None);
    }

    /// Each task's waits are counted apart, across a failed probe, until the holder answers;
    /// the mark keeps since when the holder fails and its last words.
    #[test]
    fn waits_are_counted_per_task_until_the_holder_answers() {
        let b = Breaker::default();
        b.failed("mail", 100, 5_000, "connection refused");
        let wait = |r, now| b.admit("mail", &task(r), now, 1_000, 100);
        let first = wait("r-1", 1_000).expect("waits");
        assert_eq!(first.since, 100);
        assert_eq!(first.error, "connection refused");
        assert_eq!(first.waits, 1);
        assert_eq!(wait("r-1", 1_100).map(|d| d.waits), Some(2));
        assert_eq!(wait("r-2", 1_100).map(|d| d.waits), Some(1));
        // A failed probe renews the mark: since stays, the error is the new one.
        b.failed("mail", 5_500, 9_000, "timed out");
        let again = wait("r-1", 6_000).expect("waits");
        assert_eq!((again.since, again.error.as_str()), (100, "timed out"));
        assert_eq!((again.until, again.waits), (9_000, 3));
        b.answered("mail");
        b.failed("mail", 10_000, 12_000, "refused");
        let next = wait("r-1", 10_500).expect("waits");
        assert_eq!((next.since, next.waits), (10_000, 1));
    }

    /// A mark is seen as run out only once its time is up with no probe out (none let
    /// through, or a lost one's time up too); it is dropped, logged once at INFO, only while
    /// it stands as seen. Before, nothing but an answer removed a mark.
    #[test]
    fn a_ran_out_mark_is_dropped_only_as_it_was_seen() {
        let logs = dsrelay_runtime::testing::captured_logs();
        let holder = "breaker-drop-mail";
        let b = Breaker::new(Clock::system(), b"k");
        let holders =
            |seen: &[RanOut]| -> Vec<String> { seen.iter().map(|r| r.holder.clone()).collect() };
        b.failed(holder, 100, 5_000, "connection refused");
        b.failed("breaker-drop-other", 100, 9_000, "refused");
        assert!(b.ran_out(4_999).is_empty());
        let seen = b.ran_out(5_000);
        assert_eq!(holders(&seen), [holder]);

        // A task let through as the probe since: the mark stays, and is not seen while the
        // probe is out.
        let probe = b.admit(holder, &task("r-1"), 5_100, 1_000, 100);
        assert_eq!(probe, None);
        assert!(!b.drop_untried(&seen[0], 5_200));
        assert!(b.ran_out(5_200).is_empty());
        // The probe was lost: seen again once its time is up.
        let seen = b.ran_out(6_100);
        assert_eq!(holders(&seen), [holder]);
        // A new failure since renews the mark: it stays.
        b.failed(holder, 6_200, 8_000, "timed out");
        assert!(!b.drop_untried(&seen[0], 8_000));
        assert!(b.mark(holder).is_some());

        let seen = b.ran_out(8_000);
        assert_eq!(holders(&seen), [holder]);
        assert!(b.drop_untried(&seen[0], 8_000));
        assert!(!b.drop_untried(&seen[0], 8_000));
        assert_eq!(b.mark(holder), None);
        let open: Vec<String> = b.marks().into_iter().map(|m| m.holder).collect();
        assert_eq!(open, ["breaker-drop-other"]);
        // With no mark the holder is called.
        assert_eq!(b.admit(holder, &task("r-2"), 8_001, 1_000, 100), None);

        let dropped = lines_about(&logs, holder, "subprocessor ");
        let dropped: Vec<_> = dropped.iter().filter(|l| l["level"] == "INFO").collect();
        assert_eq!(dropped.len(), 1, "{dropped:#?}");
        let fields = &dropped[0]["fields"];
        assert_eq!(
            fields["message"],
            format!(
                "subprocessor {holder}'s unreachable mark dropped after 7 s (unreachable since \
                 {}): no task is left to try it; its reachability is unknown, and the next \
                 task for it will try it",
                date_label(100)
            )
        );
        assert_eq!(fields["outage_ms"], 7_900);
    }

    /// The captured lines about `holder` whose message starts with `start`.
    fn lines_about(
        logs: &dsrelay_runtime::testing::CapturedLogs,
        holder: &str,
        start: &str,
    ) -> Vec<serde_json::Value> {
        logs.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["fields"]["subprocessor"] == holder)
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(start))
            })
            .collect()
    }

    /// A mark's opening is logged once at WARN, its clearing once at INFO with the outage's
    /// length, whatever the calls between; the holder's words stay out of the lines. Before,
    /// neither was logged, and the marks could not be listed.
    #[test]
    fn a_mark_is_logged_when_it_opens_and_when_it_clears_and_listed_meanwhile() {
        let logs = dsrelay_runtime::testing::captured_logs();
        let holder = "breaker-log-mail";
        let clock = Clock::system();
        let b = Breaker::new(clock.clone(), b"k");
        let since = clock.now_ms();
        let words = "row of breaker.loki@example.fi locked";
        b.failed(holder, since, since + 1_000, words);
        // A failed probe, and answers of other holders, log nothing about this one.
        b.failed(holder, since + 2_000, since + 9_000, "timed out");
        b.answered("breaker-log-other");
        assert_eq!(
            b.marks(),
            [Unreachable {
                holder: holder.into(),
                since,
                error: "timed out".into(),
            }]
        );
        assert_eq!(b.mark(holder).map(|m| m.since), Some(since));
        assert_eq!(b.mark("breaker-log-other"), None);
        clock.advance(180_000);
        b.answered(holder);
        b.answered(holder);
        assert!(b.marks().is_empty());

        let text = logs.text();
        assert!(!text.contains("breaker.loki"), "{text}");
        let opened = lines_about(&logs, holder, "subprocessor ");
        let opened: Vec<_> = opened.iter().filter(|l| l["level"] == "WARN").collect();
        assert_eq!(opened.len(), 1, "{opened:#?}");
        let fields = &opened[0]["fields"];
        let message = fields["message"].as_str().unwrap_or_default();
        let expected = format!(
            "subprocessor {holder} unreachable since {}: transient error ({} bytes withheld, \
             keyed hash ",
            date_label(since),
            words.len()
        );
        assert!(message.starts_with(&expected), "{message}");
        assert_eq!(fields["since"], date_label(since));
        let cleared = lines_about(&logs, holder, "subprocessor ");
        let cleared: Vec<_> = cleared.iter().filter(|l| l["level"] == "INFO").collect();
        assert_eq!(cleared.len(), 1, "{cleared:#?}");
        let fields = &cleared[0]["fields"];
        assert_eq!(
            fields["message"],
            format!(
                "subprocessor {holder} reachable again after 180 s (unreachable since {})",
                date_label(since)
            )
        );
        let outage = fields["outage_ms"].as_i64().unwrap_or_default();
        assert!((180_000..190_000).contains(&outage), "{outage}");
    }
}
