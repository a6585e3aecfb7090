//! A contract end in Mailchimp: a whole audience, the controller's, deleted with a handful of
//! calls however many members it has, and exported a page of members per call.
//!
//! - Both steps first count the audience's members of every status (`GET
//!   /lists/{list}/members?count=1&fields=total_items`: `total_items`) and report it as the
//!   total. The audience's own statistics (`GET /lists/{list}`: `stats.member_count` and the
//!   rest) are not used: they leave out pending and transactional members, which a deletion
//!   removes all the same.
//! - [`BulkOp::Export`]: `GET /lists/{list}/members`, `page_size` members per page
//!   (`count`/`offset`) until `total_items` is reached, into one `members.json`: a JSON array
//!   of the member documents as the single export writes them (without hypermedia links),
//!   written as each page arrives. A page whose `total_items` differs from the count taken
//!   first, or an end with another number of members written, is a transient error: a member
//!   left or arrived meanwhile, which can shift later pages past a member never written, and
//!   the export is run again whole. A leaving offset by an arrival between two pages keeps
//!   the count and is not seen here; the erasure's check of members changed since the
//!   export, when the processor recorded its start, refuses the arrival. Members' notes,
//!   activity feed and events are not included: Mailchimp lists them only member by member,
//!   one call each, which a bulk step must not do. The note of the outcome says so.
//! - [`BulkOp::Erase`] (also with [`Phase::RetentionExpired`]: Mailchimp keeps nothing under a
//!   legal obligation): `DELETE /lists/{list}`, which removes the audience with all its
//!   members for good, then `GET /lists/{list}`: COMPLETED once it answers 404, otherwise
//!   ACCEPTED under a handle and checked again ([`Phase::Confirm`]). The answer of the delete
//!   alone is never taken as proof.
//! - A delete whose answer was lost (a large audience can take longer than `timeout_ms`, or
//!   the connection is cut, or a 5xx comes) may have taken effect: the step goes on to the
//!   reading as after an answer, and when that fails too, it is ACCEPTED under a handle marked
//!   `?` (`audience:?{list}:{count}`) instead of an error whose retry would count a missing
//!   audience. Its confirmation reads: 404 → COMPLETED, deleted by this job; the audience still
//!   there → the delete is sent again, since the first may never have arrived.
//! - An audience that is already missing when a step starts is a permanent error, not an
//!   erasure: Mailchimp's 404 cannot tell a deleted audience from a wrong `list_id`. Except
//!   when an earlier call of the erasure was cut off before its answer was recorded
//!   ([`BulkJob::interrupted`]: the processor stopped or lost the task while Mailchimp
//!   worked): its delete may have gone through, so the 404 is taken as its work, COMPLETED
//!   with the members that call counted as the processor recorded them
//!   ([`BulkJob::recorded_progress`]), or saying the count is unknown when none was.
//! - The erasure that follows a return ([`BulkJob::returned`]) is checked before the delete,
//!   which removes the audience whole; a check that fails is a permanent error and nothing
//!   is deleted. First the count against the members the export wrote: more members now
//!   (sign-ups since the export) stop it. Totals miss a sign-up offset by a deletion, so when
//!   the processor recorded when the export started ([`BulkJob::returned_since_ms`]), the
//!   members changed since are counted too (the count above with `since_last_changed`; an
//!   added member counts as changed when it was added), and any stops it: their data as it
//!   is now was never returned. The time asked for is a minute before the export's start
//!   ([`CLOCK_MARGIN_MS`]), so that a difference between the processor's clock and
//!   Mailchimp's cannot hide a change; a member changed in that minute before the export is
//!   refused too, the safe side. Members deleted meanwhile are
//!   not in the list and do not count. Past the checks the count is recorded with the
//!   processor ([`crate::ProgressReporter::record_now`]) before the delete is sent. A member
//!   who signs up between the checks and the delete is deleted with the audience, never
//!   returned: no check can see it.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use super::api::{Api, Deletion, Reply};
use super::scrub::Scrubber;
use super::{audience_missing, MailchimpConnector};
use crate::export::{JsonArrayWriter, JSON};
use crate::{BulkJob, BulkOp, BulkProgress, ConnectorError, ErasedCount, Outcome, Phase};

/// How much earlier than the export's start (by the processor's clock) the erasure's check
/// asks Mailchimp for members changed since: the clocks of the two may differ, and a change
/// seen as before the export that came after it would be deleted unreturned.
const CLOCK_MARGIN_MS: i64 = 60_000;

/// The file a bulk export writes.
const MEMBERS_FILE: &str = "members.json";

/// Starts the handle of an audience deletion waiting for its check: `audience:{list}:{count}`,
/// or `audience:?{list}:{count}` when the delete's answer was lost.
const HANDLE_PREFIX: &str = "audience:";

impl MailchimpConnector {
    /// Takes one step of `job` in the audience of its controller.
    pub(super) async fn run_bulk_job(&self, job: &BulkJob) -> Result<Outcome, ConnectorError> {
        let api = match self.audience_of(&job.controller) {
            Ok(api) => api,
            Err(reason) => return Ok(Outcome::Refused { reason }),
        };
        let scrub = Scrubber::for_key(&self.config.api_key);
        match (job.op, &job.phase) {
            (BulkOp::Erase, Phase::Confirm { handle }) => {
                let (count, unanswered) = parse_handle(handle, api.list_id())?;
                confirm_deleted(api, count, unanswered, job, &scrub).await
            }
            (BulkOp::Erase, Phase::Start | Phase::RetentionExpired { .. }) => {
                erase_audience(api, job, &scrub).await
            }
            (BulkOp::Export, Phase::Start) => self.export_audience(api, job, &scrub).await,
            (BulkOp::Export, phase) => Err(ConnectorError::Permanent(format!(
                "mailchimp: an audience export has no {phase:?} step (it is never accepted)"
            ))),
        }
    }

    async fn export_audience(
        &self,
        api: &Api,
        job: &BulkJob,
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        let sink = job.export.as_ref().ok_or_else(|| {
            ConnectorError::Permanent(
                "mailchimp: no export folder was given for the contract end's export".to_string(),
            )
        })?;
        let total = count_members(api, scrub).await?;
        job.progress.report(progress(0, total));
        let list = api.list_id();
        let mut out = JsonArrayWriter::new(sink.file(MEMBERS_FILE, JSON).await?).await?;
        let mut offset: u64 = 0;
        loop {
            let page = match api
                .members_page(self.config.page_size, offset, scrub)
                .await?
            {
                Reply::Done(page) => page,
                Reply::Missing => {
                    return Err(ConnectorError::Permanent(format!(
                        "mailchimp: audience {list} disappeared while it was being exported"
                    )))
                }
            };
            let Some(members) = page.get("members").and_then(Value::as_array) else {
                return Err(ConnectorError::Permanent(format!(
                    "mailchimp: a page of audience {list}'s members came without a \"members\" \
                     array"
                )));
            };
            for member in members {
                let mut member = member.clone();
                // Hypermedia links describe the API, not the subject.
                if let Some(map) = member.as_object_mut() {
                    map.remove("_links");
                }
                out.push(&member).await?;
            }
            offset += members.len() as u64;
            // Pages are read by offset: a member who left shifts the later ones forward past
            // a member never read, one who arrived shifts a member read into the next page
            // again. Either changes the count, and the export is run again whole.
            match page.get("total_items").and_then(Value::as_u64) {
                Some(items) if items == total => {}
                Some(items) => {
                    let counts = format!("{total} members when it started, {items} now");
                    return Err(changed_during_export(list, &counts));
                }
                None => {
                    return Err(ConnectorError::Permanent(format!(
                        "mailchimp: a page of audience {list}'s members came without \
                         \"total_items\", so a member leaving or arriving during the export \
                         cannot be seen; the export was stopped"
                    )))
                }
            }
            job.progress
                .report(progress(out.count(), total.max(out.count())));
            // An empty page ends it too, so that a wrong total cannot loop for ever.
            if members.is_empty() || offset >= total {
                break;
            }
        }
        let n = out.count();
        if n != total {
            let counts = format!("{total} members when it started, {n} written");
            return Err(changed_during_export(list, &counts));
        }
        let file = out.finish().await?;
        Ok(Outcome::Completed {
            records_affected: n as i64,
            note: format!(
                "mailchimp: exported the {n} members of audience {list} into {MEMBERS_FILE}; \
                 members' notes, activity feed and events are not included (Mailchimp lists \
                 them only one member per call)"
            ),
            files: vec![file],
            erased: Vec::new(),
        })
    }
}

/// The transient error of an export of audience `list` whose member `counts` disagree: a
/// member left or arrived, and its pages, read by offset, may have skipped one.
fn changed_during_export(list: &str, counts: &str) -> ConnectorError {
    ConnectorError::Transient(format!(
        "mailchimp: audience {list} changed during the export ({counts}): a member left or \
         arrived, so a page may have skipped one; the processor runs the export again, until \
         the request's due date"
    ))
}

/// [`member_count`], where a missing audience is a permanent error.
async fn count_members(api: &Api, scrub: &Scrubber) -> Result<u64, ConnectorError> {
    member_count(api, scrub)
        .await?
        .ok_or_else(|| audience_missing(api, NOTHING_DONE))
}

/// The [`audience_missing`] tail when the audience answered 404 before a step did anything.
const NOTHING_DONE: &str = "nothing was done (check list_id and base_url, or whether an \
                            earlier run already deleted it)";

/// The audience's members, every status: the total of its members' pages; `None` when the
/// audience answers 404.
async fn member_count(api: &Api, scrub: &Scrubber) -> Result<Option<u64>, ConnectorError> {
    let list = api.list_id();
    let Reply::Done(doc) = api.member_total(scrub).await? else {
        return Ok(None);
    };
    // The count becomes the erased count of a deletion certificate: without one, nothing is
    // deleted rather than a guess certified.
    let Some(total) = doc.get("total_items").and_then(Value::as_u64) else {
        return Err(ConnectorError::Permanent(format!(
            "mailchimp: counting audience {list}'s members: the answer has no \"total_items\"; \
             nothing was done"
        )));
    };
    Ok(Some(total))
}

async fn erase_audience(
    api: &Api,
    job: &BulkJob,
    scrub: &Scrubber,
) -> Result<Outcome, ConnectorError> {
    let count = match member_count(api, scrub).await? {
        Some(count) => count,
        // This 404 reads the audience as the check below does: after a cut-off call, it is
        // that call's deletion, and failing here would leave the data gone uncertified.
        None if job.interrupted => return Ok(deleted_by_cut_off_call(api.list_id(), job)),
        None => return Err(audience_missing(api, NOTHING_DONE)),
    };
    match &job.returned {
        // Past the check: recorded before the delete, so that a retry or a resumed call is
        // not checked again.
        Some(returned) => {
            let held = progress(0, count);
            let holder = format!("mailchimp audience {}", api.list_id());
            crate::check_returned(returned, &held, &holder, &job.controller)?;
            if let Some(since_ms) = job.returned_since_ms {
                refuse_changes_since(api, since_ms, &job.controller, scrub).await?;
            }
            job.progress.record_now(held).await?;
        }
        None => job.progress.report(progress(0, count)),
    }
    // Missing here means it went between the count and now; the check below decides.
    let lost = match api.delete_list(scrub).await? {
        Deletion::Deleted | Deletion::Missing => None,
        Deletion::Unanswered(why) => Some(why),
    };
    match confirm_deleted(api, count, lost.is_some(), job, scrub).await {
        Ok(outcome) => Ok(outcome),
        // The audience is deleted (or may be); a retry from the start would find it missing
        // and fail. Keep the handle and ask again instead.
        Err(e) => {
            let list = api.list_id();
            let note = match &lost {
                None => format!(
                    "mailchimp: deleted audience {list}; checking that it is gone \
                     failed ({e})"
                ),
                Some(why) => format!(
                    "mailchimp: the deletion of audience {list} was sent but its answer was \
                     lost ({why}); reading whether it is gone failed too ({e})"
                ),
            };
            Ok(Outcome::Accepted {
                handle: handle(list, count, lost.is_some()),
                note,
            })
        }
    }
}

/// A permanent error when members of the audience changed or signed up after the export
/// that started at `export_ms` (less [`CLOCK_MARGIN_MS`]): what they hold now was never
/// returned to `controller`.
async fn refuse_changes_since(
    api: &Api,
    export_ms: i64,
    controller: &str,
    scrub: &Scrubber,
) -> Result<(), ConnectorError> {
    let list = api.list_id();
    let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms);
    let (Some(export), Some(since)) =
        (at(export_ms), at(export_ms.saturating_sub(CLOCK_MARGIN_MS)))
    else {
        return Err(ConnectorError::Permanent(format!(
            "mailchimp audience {list}: the contract end's export start the processor \
             recorded ({export_ms} ms since the epoch) is not a time this check can ask \
             about; nothing was erased there. The controller ends the contract again with \
             RETURN_THEN_DELETE to have the data returned and erased"
        )));
    };
    let Reply::Done(doc) = api.member_total_since(since, scrub).await? else {
        return Err(audience_missing(api, NOTHING_DONE));
    };
    let Some(changed) = doc.get("total_items").and_then(Value::as_u64) else {
        return Err(ConnectorError::Permanent(format!(
            "mailchimp: counting audience {list}'s members changed since the contract end's \
             export: the answer has no \"total_items\"; nothing was done"
        )));
    };
    if changed == 0 {
        return Ok(());
    }
    let export = export.to_rfc3339_opts(SecondsFormat::Secs, true);
    Err(ConnectorError::Permanent(format!(
        "mailchimp audience {list}: {changed} member(s) of controller {controller} signed up \
         or changed since the contract end's export at {export} (or in the minute before it, \
         counted for the difference between the processor's clock and Mailchimp's), so what \
         they hold now was never returned; nothing was erased there. To have them returned \
         before they are deleted, the controller ends the contract again with \
         RETURN_THEN_DELETE; ending it with DELETE erases them without a return"
    )))
}

/// COMPLETED when the audience answers 404, otherwise ACCEPTED under a handle of the same
/// count. `unanswered`: the delete's answer was lost, so an audience still there may never
/// have got it, and it is sent again.
async fn confirm_deleted(
    api: &Api,
    count: u64,
    unanswered: bool,
    job: &BulkJob,
    scrub: &Scrubber,
) -> Result<Outcome, ConnectorError> {
    let list = api.list_id();
    if let Reply::Done(_) = api.get_list(scrub).await? {
        if !unanswered {
            return Ok(Outcome::Accepted {
                handle: handle(list, count, false),
                note: format!("mailchimp: deleted audience {list}; the API still returns it"),
            });
        }
        let again = api.delete_list(scrub).await?;
        return Ok(Outcome::Accepted {
            handle: handle(list, count, matches!(again, Deletion::Unanswered(_))),
            note: format!(
                "mailchimp: the answer to deleting audience {list} was lost and the API still \
                 returned it; the deletion was sent again"
            ),
        });
    }
    let lost = if unanswered {
        " (the answer to this job's deletion was lost, and reading the audience answers 404)"
    } else {
        ""
    };
    let note = format!(
        "mailchimp: deleted audience {list} with its {count} members; the API no longer \
         returns it{lost}"
    );
    Ok(audience_deleted(list, count, note, job))
}

/// COMPLETED for audience `list` deleted with its `count` members, reported as the job's
/// progress and certified.
fn audience_deleted(list: &str, count: u64, note: String, job: &BulkJob) -> Outcome {
    let records = i64::try_from(count).unwrap_or(i64::MAX);
    let erased = vec![ErasedCount {
        target: format!("audience {list}"),
        action: "deleted".into(),
        count: records,
    }];
    job.progress.report(BulkProgress {
        erased: erased.clone(),
        ..progress(count, count)
    });
    Outcome::Completed {
        records_affected: records,
        note,
        files: Vec::new(),
        // After a cut-off call whose last progress was recorded, that call's deletion is
        // listed there already.
        erased: job.beyond_recorded(erased),
    }
}

/// COMPLETED for the audience an erasure's cut-off call deleted (it answers 404 now), with
/// the members that call counted as the processor recorded them; without a recorded count,
/// none is certified and the note says so.
fn deleted_by_cut_off_call(list: &str, job: &BulkJob) -> Outcome {
    let head = format!(
        "mailchimp: audience {list} answers 404 after an earlier call of this erasure was cut \
         off before its answer was recorded; taken as deleted by that call"
    );
    let counted = job.recorded_progress.subjects_total;
    if counted == 0 {
        return Outcome::Completed {
            records_affected: 0,
            note: format!(
                "{head}; how many members it had is unknown (no count of it was recorded)"
            ),
            files: Vec::new(),
            erased: Vec::new(),
        };
    }
    let note = format!("{head}, with its {counted} members as an earlier call counted them");
    audience_deleted(list, counted, note, job)
}

fn handle(list: &str, count: u64, unanswered: bool) -> String {
    let lost = if unanswered { "?" } else { "" };
    format!("{HANDLE_PREFIX}{lost}{list}:{count}")
}

/// The member count of a handle made by [`handle`] for audience `list`, and whether the
/// delete's answer was lost.
fn parse_handle(handle: &str, list: &str) -> Result<(u64, bool), ConnectorError> {
    handle
        .strip_prefix(HANDLE_PREFIX)
        .map(|rest| match rest.strip_prefix('?') {
            Some(rest) => (rest, true),
            None => (rest, false),
        })
        .and_then(|(rest, unanswered)| Some((rest.split_once(':')?, unanswered)))
        .filter(|((l, _), _)| *l == list)
        .and_then(|((_, n), unanswered)| Some((n.parse().ok()?, unanswered)))
        .ok_or_else(|| {
            ConnectorError::Permanent(format!(
                "mailchimp: the confirmation handle {handle:?} is not a deletion of audience \
                 {list}"
            ))
        })
}

/// Members are both the subjects and the records of an audience.
fn progress(done: u64, total: u64) -> BulkProgress {
    BulkProgress {
        subjects_done: done,
        subjects_total: total,
        records_done: done,
        records_total: total,
        erased: Vec::new(),
    }
}
