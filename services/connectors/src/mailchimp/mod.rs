//! Mail-marketing audiences reached through the Mailchimp Marketing API v3 (the subset a
//! data-subject request needs).
//!
//! Mailchimp names an audience member by the *subscriber hash*: the lowercase hex MD5 of the
//! lowercased address. The connector derives it from a raw e-mail identity, or takes an MD5
//! e-mail identity as it is, which is why the protocol accepts MD5 at all: a controller can
//! have a member erased without disclosing the address to the processor.
//!
//! | kind | call | outcome |
//! |---|---|---|
//! | ERASURE | `POST /lists/{list}/members/{hash}/actions/delete-permanent`, then `GET` the member | COMPLETED once the `GET` answers 404, otherwise ACCEPTED and asked again (see below when the delete's answer is lost) |
//! | OBJECTION | `PATCH /lists/{list}/members/{hash}` (`PUT` if absent): unsubscribed | COMPLETED |
//! | RETURN_OF_DATA, TRANSFER | `GET /lists/{list}/members/{hash}`, then its `/notes`, `/activity-feed` and `/events`, page by page | COMPLETED with the export files |
//! | RECTIFICATION | `PATCH` with `email_address` and mapped `merge_fields` | COMPLETED |
//! | RESTRICTION | none: Mailchimp has no way to restrict processing of one member | REFUSED |
//! | CONTRACT_END (bulk) | the controller's whole audience: see `bulk` | exported, or deleted and confirmed gone |
//!
//! # Controllers
//! A processor serving several controllers gives each its own audience: `controllers` in the
//! configuration maps the processor's controller names to audience ids, and every task or
//! contract-end step uses only the audience of the controller it came from (a member with the
//! same address in another controller's audience is untouched). A controller not listed is
//! REFUSED, naming it, before any call. Without `controllers` the connector is unscoped: its
//! one `list_id` serves whichever controller asks, as before.
//!
//! An export writes, per member found, four JSON files into the task's export folder:
//! `member-{hash}.json` (the member document without its hypermedia links), and
//! `notes-{hash}.json`, `activity-{hash}.json` and `events-{hash}.json`, each an array of the
//! items the API lists, fetched `page_size` at a time (`count`/`offset`) until `total_items`
//! is reached and written as each page arrives.
//!
//! A delete whose answer was lost (the call timed out or its connection was cut after it went
//! out, or it answered a 5xx) may have taken effect, and a second delete would then answer
//! 404, which must not read as "never there". Such a member is kept in the ACCEPTED handle
//! marked `?` (`?{hash}`), so the task's next step is a confirmation by reading: `GET`
//! answers 404 → COMPLETED, erased by this task (its note says the answer was lost); the
//! member still there → the delete is sent again. The reading is tried at once, so a lost
//! answer usually costs one `GET` more.
//! The same holds for a task whose earlier call was cut off (`Task::interrupted`: the
//! processor stopped or lost the lease while Mailchimp worked): a 404 to its delete is
//! confirmed by reading as this task's erasure.
//! A lost 404 cannot be told from a lost 204, so a member that was never there reads the
//! same way then; with every answer received, a member never there stays NOT_FOUND.
//! Nor is an error returned that stops an erasure of several members after a delete was sent
//! (its retry would meet 404s): the task is ACCEPTED with the members sent and those still to
//! delete, marked `!` (`!{hash}`); the next step deletes these first (a 404 there is "never
//! there" again), then confirms all by reading.
//!
//! An objection must keep the address from being mailed. Unsubscribing a member does that;
//! an address the audience does not have is added as unsubscribed, with Mailchimp's
//! add-or-update `PUT /lists/{list}/members/{hash}` `{"email_address": ..., "status_if_new":
//! "unsubscribed", "status": "unsubscribed"}`: otherwise the controller's next import would
//! subscribe it, where an import leaves an unsubscribed member unsubscribed. The `PATCH`
//! comes first so that a member's status is all that changes (a `PUT` would also rewrite its
//! address the way the request spells it). A subject given only as the MD5 of an address the
//! audience does not have cannot be added (Mailchimp needs the address): NOT_FOUND, saying
//! that no suppression was possible. An address deleted permanently Mailchimp refuses to add
//! again ("Forgotten Email Not Subscribed"), by the API or an import alike, until the subject
//! signs up again: NOT_FOUND, saying so.
//!
//! A rectification corrects the fields `email` and `merge_fields` map and names the others in the
//! outcome's note (never their values); with none mapped the task is refused, whether or not the
//! subject is in the audience, as it is when no identity can address a member. Correcting the
//! address moves the member to the hash of the new one, so a repeated `PATCH` answers 404 once the
//! first took effect: after a lost answer (a timeout, or a 5xx Mailchimp sent after applying it)
//! the processor runs the task again from the start, and after a cut-off call (`Task::interrupted`)
//! too. Before such a 404 reads as NOT_FOUND, the member at the new address is read, and when it
//! carries every corrected value the task is COMPLETED, its note saying it was confirmed by
//! reading. A retry after a transient error is not marked as one, so this is done after every 404
//! to a change of the address; a subject whose member already carries the corrected values for
//! another reason reads the same, and the audience then holds what the correction asks for.
//!
//! A member the API does not know is NOT_FOUND, but only after the audience itself was found:
//! Mailchimp answers 404 for a wrong `list_id` too, and reporting "holds no data" because of a
//! typo in the configuration would be a false confirmation.
//!
//! Identities that cannot address a member (an e-mail as SHA-256 or SHA-1, a phone number, a
//! customer number, ...) are not searched: with none usable the task is refused (only the
//! partner can give an e-mail, raw or MD5: the forms ListSubprocessors reports), otherwise
//! the outcome's note counts them by kind, so that it is not read as covering the whole
//! subject.
//!
//! Messages never carry the API key, e-mail addresses or corrected values (Mailchimp echoes
//! addresses in some error details, so those are scrubbed); subscriber hashes are fine, they
//! are what the controller may send anyway.
//!
//! # Layout
//! - here: the configuration ([`MailchimpConfig`]) and the connector, which picks the audience
//!   and the calls for a task and turns their answers into an [`Outcome`].
//! - `bulk`: a contract end's steps over a whole audience (count, export, delete).
//! - `api`: the HTTP calls to the API and the mapping of their failures to
//!   [`ConnectorError`].
//! - `scrub`: removing personal data and the key from what the API echoes back.
//! - `fake` (tests, or the `fake-mailchimp` feature): a local Mailchimp API speaking the
//!   real wire format.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use dsrelay_proto::v1::{IdentityEncoding, IdentityType, RequestKind, SubjectIdentity};
use dsrelay_runtime::identity::{digest, normalize};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::export::{JsonArrayWriter, JSON};
use crate::{
    kind_label, BoxFuture, BulkJob, Connector, ConnectorError, ErasedCount, ExportSink,
    ExportedFile, Outcome, Phase, Task,
};

mod api;
mod bulk;
#[cfg(any(test, feature = "fake-mailchimp"))]
pub mod fake;
#[cfg(test)]
mod scoped_tests;
mod scrub;
#[cfg(test)]
mod tests;

use api::{Api, Deletion, MemberList, Reply, Upsert};
use scrub::Scrubber;

/// The configuration of a Mailchimp account's audience, or of one audience per controller
/// (everything after `type = "mailchimp"`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailchimpConfig {
    /// The API root including the version, e.g. `https://us21.api.mailchimp.com/3.0`. The
    /// data-centre prefix must match the API key's suffix (`...-us21`); it is configured
    /// rather than derived so that tests and proxies can point elsewhere.
    pub base_url: String,
    /// The API key, sent as the basic-auth password (Mailchimp ignores the user name). Never
    /// printed: the `Debug` output redacts it.
    pub api_key: String,
    /// The audience (list) id the subprocessor keeps the subjects in, when the connector is
    /// not scoped per controller: then it serves one audience, and all of it belongs to
    /// whichever controller asks. Leave it out (empty) when `controllers` is given.
    #[serde(default)]
    pub list_id: String,
    /// The audience of each controller, keyed by the processor's controller names
    /// (`ControllerConfig.name`): a task of a controller touches only its audience, a contract
    /// end deletes only its audience, and a controller not listed is refused. Empty means not
    /// scoped (`list_id` is the one audience).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub controllers: BTreeMap<String, MailchimpControllerConfig>,
    /// The limit for one HTTP call (ms); a call that takes longer is a transient error and is
    /// retried by the processor.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// RECTIFICATION field names (as the controller sends them) to the audience's merge tags.
    /// Replaces the default (`first_name` = `FNAME`, `last_name` = `LNAME`, `phone` = `PHONE`)
    /// when given, because audiences define their own merge fields. `email` is not listed: it
    /// always changes the member's `email_address`.
    #[serde(default = "default_merge_fields")]
    pub merge_fields: BTreeMap<String, String>,
    /// Items asked for per page when an export lists a member's notes, activity and events,
    /// and members per page when a contract end exports a whole audience (`count`; Mailchimp
    /// allows at most 1000).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

/// The audience of one controller in a scoped Mailchimp connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailchimpControllerConfig {
    /// The audience (list) id that holds this controller's subjects and nobody else's.
    pub list_id: String,
}

/// Mailchimp's largest `count`.
const MAX_PAGE_SIZE: u32 = 1000;

fn default_page_size() -> u32 {
    MAX_PAGE_SIZE
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_merge_fields() -> BTreeMap<String, String> {
    [
        ("first_name", "FNAME"),
        ("last_name", "LNAME"),
        ("phone", "PHONE"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl fmt::Debug for MailchimpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Configurations get logged on start-up and in errors; the key must not travel there.
        f.debug_struct("MailchimpConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"[redacted]")
            .field("list_id", &self.list_id)
            .field("controllers", &self.controllers)
            .field("timeout_ms", &self.timeout_ms)
            .field("merge_fields", &self.merge_fields)
            .field("page_size", &self.page_size)
            .finish()
    }
}

impl MailchimpConfig {
    /// Every problem with the configuration; empty when usable.
    pub fn validate(&self) -> Vec<String> {
        let mut out = Vec::new();
        let rest = self
            .base_url
            .strip_prefix("https://")
            .or_else(|| self.base_url.strip_prefix("http://"));
        match rest {
            None => out.push(format!(
                "base_url: {:?} must start with https:// (or http:// for a test server on a \
                 loopback address), e.g. https://us21.api.mailchimp.com/3.0",
                self.base_url
            )),
            Some(rest) => {
                let authority = rest.split('/').next().unwrap_or_default();
                if authority.is_empty() {
                    out.push("base_url: has no host".to_string());
                }
                // Credentials belong in api_key; in the URL they would show up in messages.
                if authority.contains('@') {
                    out.push(
                        "base_url: must not contain credentials (put the key in api_key)"
                            .to_string(),
                    );
                }
                if rest.contains(['?', '#']) {
                    out.push("base_url: must not have a query or fragment".to_string());
                }
                // The key goes out with every call: in the clear only to this host's own
                // test server.
                let plain = self.base_url.starts_with("http://");
                if plain && !authority.is_empty() && !is_loopback(&self.base_url) {
                    // Not echoed: a key written into it by mistake would show.
                    out.push(
                        "base_url: http:// would send the API key unencrypted; use https:// \
                         (http:// is accepted only for a test server on a loopback address: \
                         127.0.0.0/8, ::1 or localhost)"
                            .to_string(),
                    );
                }
            }
        }
        if self.api_key.trim().is_empty() {
            out.push("api_key: must not be empty".to_string());
        }
        if self.controllers.is_empty() {
            check_list_id("list_id", &self.list_id, &mut out);
        } else if !self.list_id.is_empty() {
            // Which controller an unscoped audience would belong to is the very question
            // scoping answers; two answers are one too many.
            out.push(
                "list_id: must be left out when controllers is given (each controller names \
                 its own audience)"
                    .to_string(),
            );
        }
        let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, controller) in &self.controllers {
            if name.trim().is_empty() {
                out.push("controllers: a controller name is empty".to_string());
            }
            check_list_id(
                &format!("controllers.{name}.list_id"),
                &controller.list_id,
                &mut out,
            );
            // One audience for two controllers would let one's contract end delete the
            // other's members.
            if let Some(other) = owners.insert(controller.list_id.as_str(), name.as_str()) {
                out.push(format!(
                    "controllers.{name}.list_id: audience {} is already controller {other}'s; \
                     each controller needs an audience of its own",
                    controller.list_id
                ));
            }
        }
        let longest = crate::adapter::MAX_TIMEOUT_MS;
        dsrelay_runtime::config::check_ms(&mut out, "timeout_ms", self.timeout_ms, 1..=longest);
        if !(1..=MAX_PAGE_SIZE).contains(&self.page_size) {
            out.push(format!("page_size: must be 1 to {MAX_PAGE_SIZE}"));
        }
        for (field, tag) in &self.merge_fields {
            if field.trim().is_empty() {
                out.push("merge_fields: a field name is empty".to_string());
            }
            if field.trim().eq_ignore_ascii_case("email") {
                out.push(
                    "merge_fields: \"email\" cannot be mapped; it always changes email_address"
                        .to_string(),
                );
            }
            if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                out.push(format!(
                    "merge_fields.{field}: {tag:?} is not a merge tag (letters, digits, '_', \
                     e.g. FNAME)"
                ));
            }
        }
        out
    }
}

/// Whether the host of `url` is a loopback address (127.0.0.0/8, `::1`) or `localhost`, as
/// the HTTP client reads the URL (so `http://127.1` is, and `http://127.0.0.1.example` is
/// not). `false` for a URL it cannot read.
fn is_loopback(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = parsed.host_str() else {
        return false;
    };
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Pushes what is wrong with audience id `list_id`, configured under `key`.
fn check_list_id(key: &str, list_id: &str, out: &mut Vec<String>) {
    if list_id.trim().is_empty() {
        out.push(format!("{key}: must not be empty (the audience id)"));
    } else if !is_path_safe(list_id) {
        // It is spliced into every URL path.
        out.push(format!(
            "{key}: {list_id:?} may only contain letters, digits, '-' and '_'"
        ));
    }
}

fn is_path_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn is_subscriber_hash(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Carries out data-subject requests in the Mailchimp audiences of one account; see the
/// module documentation.
#[derive(Debug, Clone)]
pub(crate) struct MailchimpConnector {
    config: MailchimpConfig,
    /// The one audience of an unscoped connector.
    unscoped: Option<Api>,
    /// The audience of each controller of a scoped connector.
    audiences: BTreeMap<String, Api>,
}

impl MailchimpConnector {
    /// Validates `config` and sets up the HTTP client (no call is made yet).
    pub(crate) fn new(config: MailchimpConfig) -> anyhow::Result<Self> {
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!(
                "invalid mailchimp connector configuration: {}",
                problems.join("; ")
            );
        }
        let unscoped = if config.controllers.is_empty() {
            Some(Api::new(&config, &config.list_id)?)
        } else {
            None
        };
        let audiences = config
            .controllers
            .iter()
            .map(|(name, c)| Ok((name.clone(), Api::new(&config, &c.list_id)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            config,
            unscoped,
            audiences,
        })
    }

    /// The audience of `controller`'s data, or why this connector refuses to touch any.
    fn audience_of(&self, controller: &str) -> Result<&Api, String> {
        if let Some(api) = &self.unscoped {
            return Ok(api);
        }
        self.audiences.get(controller).ok_or_else(|| {
            let known: Vec<&str> = self.audiences.keys().map(String::as_str).collect();
            format!(
                "the mailchimp connector holds no audience of controller {controller:?} (its \
                 controllers: {}); add it under controllers in the connector configuration",
                known.join(", ")
            )
        })
    }

    /// Fails unless the configured audience exists; called before answering NOT_FOUND, since
    /// Mailchimp's 404 does not say whether the member or the audience is missing.
    async fn ensure_audience(&self, api: &Api, scrub: &Scrubber) -> Result<(), ConnectorError> {
        match api.get_list(scrub).await? {
            Reply::Done(_) => Ok(()),
            Reply::Missing => Err(audience_missing(api, CHECK_LIST)),
        }
    }

    async fn not_found(
        &self,
        api: &Api,
        hashes: &[String],
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        self.ensure_audience(api, scrub).await?;
        Ok(Outcome::NotFound {
            note: format!(
                "mailchimp: audience {} has no member {}",
                api.list_id(),
                hashes.join(", ")
            ),
        })
    }

    /// Deletes every member permanently and confirms they are gone. `interrupted`: an
    /// earlier call of this task was cut off, so a 404 may be its delete's doing and is
    /// confirmed by reading like a lost answer, never taken for NOT_FOUND.
    async fn erase(
        &self,
        api: &Api,
        hashes: &[String],
        interrupted: bool,
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        let mut sent = Vec::new();
        let mut lost = Vec::new();
        let deleting = self.delete_each(api, hashes, interrupted, scrub, &mut sent, &mut lost);
        if let Err((at, e)) = deleting.await {
            // With nothing sent, a retry from the start meets the same members.
            if sent.is_empty() {
                return Err(e);
            }
            return Ok(stopped(api, &sent, &hashes[at..], &e));
        }
        if sent.is_empty() {
            return self.not_found(api, hashes, scrub).await;
        }
        match self
            .confirm_erasure(api, &sent, &[], interrupted, scrub)
            .await
        {
            Ok(outcome) => Ok(outcome),
            // The members are deleted (or may be); if the check fails now, a retry from the
            // start would find nothing and answer NOT_FOUND. Keep the handle and ask again.
            Err(e) if lost.is_empty() => Ok(Outcome::Accepted {
                handle: handle_of(&sent, &[]),
                note: format!(
                    "mailchimp: permanently deleted {}; checking that it is gone failed ({e})",
                    hashes_of(&sent)
                ),
            }),
            Err(e) => Ok(Outcome::Accepted {
                handle: handle_of(&sent, &[]),
                note: format!(
                    "mailchimp: the permanent deletion of {} was sent but its answer was lost \
                     ({}); reading whether it is gone failed too ({e})",
                    hashes_of(&sent),
                    lost.join("; ")
                ),
            }),
        }
    }

    /// Sends the permanent deletion of each of `hashes` in turn, adding the members it may
    /// have deleted to `sent` and why answers were lost to `lost`. An error stops it: the
    /// error and the index of the member it stopped at.
    async fn delete_each(
        &self,
        api: &Api,
        hashes: &[String],
        interrupted: bool,
        scrub: &Scrubber,
        sent: &mut Vec<Sent>,
        lost: &mut Vec<String>,
    ) -> Result<(), (usize, ConnectorError)> {
        for (at, hash) in hashes.iter().enumerate() {
            match api
                .delete_permanent(hash, scrub)
                .await
                .map_err(|e| (at, e))?
            {
                Deletion::Deleted => sent.push(Sent::answered(hash)),
                Deletion::Missing if interrupted => {
                    sent.push(Sent::unanswered(hash));
                    lost.push(format!(
                        "an earlier call of this task was cut off, and deleting {hash} now \
                         answers 404"
                    ));
                }
                Deletion::Missing => {}
                Deletion::Unanswered(why) => {
                    sent.push(Sent::unanswered(hash));
                    lost.push(why);
                }
            }
        }
        Ok(())
    }

    /// Deletes the members still `pending`, then: COMPLETED when every member in `sent`
    /// answers 404, otherwise ACCEPTED under the handle of what is left, so that the
    /// processor just asks again later. A member whose delete went unanswered and that is
    /// still there is deleted again: the first delete may never have arrived.
    async fn confirm_erasure(
        &self,
        api: &Api,
        sent: &[Sent],
        pending: &[String],
        interrupted: bool,
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        let mut sent = sent.to_vec();
        // Lost answers show in the handle (`?`); the notes say so from there.
        let mut lost = Vec::new();
        let deleting = self.delete_each(api, pending, interrupted, scrub, &mut sent, &mut lost);
        if let Err((at, e)) = deleting.await {
            // Stopped at the first: the handle stays as it was, and so does the retry.
            if at == 0 {
                return Err(e);
            }
            return Ok(stopped(api, &sent, &pending[at..], &e));
        }
        if sent.is_empty() {
            return self.not_found(api, pending, scrub).await;
        }
        let sent = sent.as_slice();
        let mut lingering = Vec::new();
        for s in sent {
            if let Reply::Missing = api.check_member(&s.hash, scrub).await? {
                continue;
            }
            if !s.unanswered {
                lingering.push(s.clone());
                continue;
            }
            match api.delete_permanent(&s.hash, scrub).await? {
                Deletion::Deleted | Deletion::Missing => lingering.push(Sent::answered(&s.hash)),
                Deletion::Unanswered(_) => lingering.push(s.clone()),
            }
        }
        let list = api.list_id();
        let all = hashes_of(sent);
        if lingering.is_empty() {
            let lost: Vec<&str> = sent
                .iter()
                .filter(|s| s.unanswered)
                .map(|s| s.hash.as_str())
                .collect();
            let note = if lost.is_empty() {
                format!(
                    "mailchimp: permanently deleted member {all} from audience {list}; the API \
                     no longer returns it"
                )
            } else {
                format!(
                    "mailchimp: permanently deleted member {all} from audience {list}; the API \
                     no longer returns it (the answer to this task's deletion of {} was lost, \
                     and reading the member answers 404)",
                    lost.join(", ")
                )
            };
            Ok(Outcome::Completed {
                records_affected: sent.len() as i64,
                note,
                files: Vec::new(),
                erased: vec![ErasedCount {
                    target: format!("audience {list}"),
                    action: "deleted".into(),
                    count: sent.len() as i64,
                }],
            })
        } else {
            // The handle keeps every member, so the count in the end covers them all.
            let handle = handle_of(
                &sent
                    .iter()
                    .map(|s| {
                        lingering
                            .iter()
                            .find(|l| l.hash == s.hash)
                            .unwrap_or(s)
                            .clone()
                    })
                    .collect::<Vec<_>>(),
                &[],
            );
            Ok(Outcome::Accepted {
                handle,
                note: format!(
                    "mailchimp: permanently deleted member {all} from audience {list}; the API \
                     still returns {}",
                    hashes_of(&lingering)
                ),
            })
        }
    }

    /// PATCHes every member with `correction`; NOT_FOUND when none exists. A 404 to a change
    /// of the address is confirmed by reading the member at the corrected address first (see
    /// the module documentation).
    async fn rectify(
        &self,
        api: &Api,
        hashes: &[String],
        correction: &Correction,
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        let mut notes = Vec::new();
        let mut missing = Vec::new();
        let mut now_at = BTreeSet::new();
        for hash in hashes {
            let Reply::Done(member) = api.patch_member(hash, &correction.body, scrub).await? else {
                missing.push(hash.as_str());
                continue;
            };
            // Changing the address changes the member's id (the hash of the new address).
            let id = member.get("id").and_then(Value::as_str).unwrap_or(hash);
            now_at.insert(id.to_string());
            notes.push(match id == hash {
                true => hash.clone(),
                false => format!("{hash} (now {id})"),
            });
        }
        // A member this run moved there, or one the request names itself, was PATCHed already.
        let unread = |moved: &String| {
            !missing.is_empty() && !now_at.contains(moved) && !hashes.contains(moved)
        };
        if let Some(moved) = correction.moved_to().filter(unread) {
            if let Reply::Done(member) = api.get_member(&moved, scrub).await? {
                if correction.is_carried_by(&member) {
                    notes.push(format!(
                        "{} (now {moved}, confirmed by reading: the PATCH answers 404 and member \
                         {moved} carries the corrected values)",
                        missing.join(", ")
                    ));
                }
            }
        }
        let outcome = if notes.is_empty() {
            self.not_found(api, hashes, scrub).await?
        } else {
            Outcome::Completed {
                records_affected: notes.len() as i64,
                note: format!(
                    "mailchimp: corrected {} of member {} in audience {}",
                    correction.fields().join(", "),
                    notes.join(", "),
                    api.list_id()
                ),
                files: Vec::new(),
                erased: Vec::new(),
            }
        };
        Ok(match self.unmapped_note(correction) {
            Some(extra) => outcome.with_note_added(&extra),
            None => outcome,
        })
    }

    /// Unsubscribes each member of `hashes`, and adds each that the audience does not have
    /// as unsubscribed where `addresses` (beside it) has its address, given raw (see the
    /// module documentation).
    async fn object(
        &self,
        api: &Api,
        hashes: &[String],
        addresses: &[Option<&str>],
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        let unsubscribe = json!({ "status": "unsubscribed" });
        let mut unsubscribed = Vec::new();
        let mut added = Vec::new();
        let mut forgotten = Vec::new();
        let mut unaddable = Vec::new();
        for (hash, address) in hashes.iter().zip(addresses) {
            // A member's status is all an objection changes: a PUT would also rewrite its
            // address the way the request spells it.
            if let Reply::Done(_) = api.patch_member(hash, &unsubscribe, scrub).await? {
                unsubscribed.push(hash.as_str());
                continue;
            }
            let Some(address) = address else {
                unaddable.push(hash.as_str());
                continue;
            };
            // `status` too: a member added since the PATCH is updated, not only a new one.
            let body = json!({
                "email_address": address,
                "status_if_new": "unsubscribed",
                "status": "unsubscribed",
            });
            match api.put_member(hash, &body, scrub).await? {
                Upsert::Done(_) => added.push(hash.as_str()),
                Upsert::Forgotten => forgotten.push(hash.as_str()),
                Upsert::Missing => return Err(audience_missing(api, CHECK_LIST)),
            }
        }
        let list = api.list_id();
        let mut notes = Vec::new();
        if !unsubscribed.is_empty() {
            notes.push(format!(
                "unsubscribed member {} in audience {list}",
                unsubscribed.join(", ")
            ));
        }
        if !added.is_empty() {
            notes.push(format!(
                "suppressed {} in audience {list}: not a member, so added as unsubscribed, \
                 which keeps an import from subscribing it",
                added.join(", ")
            ));
        }
        if !forgotten.is_empty() {
            notes.push(format!(
                "audience {list} has no member {}: it was permanently deleted, and Mailchimp \
                 adds it again only by the subject's own sign-up, never by the API or an import",
                forgotten.join(", ")
            ));
        }
        if !unaddable.is_empty() {
            notes.push(format!(
                "audience {list} has no member {}, and no suppression was possible: given only \
                 as MD5, it cannot be added as unsubscribed (Mailchimp needs the address)",
                unaddable.join(", ")
            ));
        }
        let note = format!("mailchimp: {}", notes.join("; "));
        let done = unsubscribed.len() + added.len();
        if done == 0 {
            // A 404 to the PATCH does not say whether the member or the audience is missing.
            self.ensure_audience(api, scrub).await?;
            return Ok(Outcome::NotFound { note });
        }
        Ok(Outcome::Completed {
            records_affected: done as i64,
            note,
            files: Vec::new(),
            erased: Vec::new(),
        })
    }

    /// Writes each member found, with its notes, activity and events, into `sink` (see the
    /// module documentation).
    async fn export(
        &self,
        api: &Api,
        hashes: &[String],
        sink: &ExportSink,
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        let mut files = Vec::new();
        let mut notes = Vec::new();
        for hash in hashes {
            let Reply::Done(mut member) = api.get_member(hash, scrub).await? else {
                continue;
            };
            // Hypermedia links describe the API, not the subject.
            if let Some(map) = member.as_object_mut() {
                map.remove("_links");
            }
            let mut file = sink.file(&format!("member-{hash}.json"), JSON).await?;
            let bytes = serde_json::to_vec(&member).map_err(|e| {
                ConnectorError::Permanent(format!("mailchimp: encoding member {hash}: {e}"))
            })?;
            file.write(&bytes).await?;
            files.push(file.finish().await?);
            let mut counts = Vec::new();
            for list in MemberList::ALL {
                let (file, n) = self.export_list(api, hash, list, sink, scrub).await?;
                files.push(file);
                counts.push(format!("{n} {}", list.key()));
            }
            notes.push(format!("{hash} ({})", counts.join(", ")));
        }
        if notes.is_empty() {
            return self.not_found(api, hashes, scrub).await;
        }
        Ok(Outcome::Completed {
            records_affected: notes.len() as i64,
            note: format!(
                "mailchimp: exported member {} of audience {}",
                notes.join(", "),
                api.list_id()
            ),
            files,
            erased: Vec::new(),
        })
    }

    /// Pages through one of a member's lists into `{name}-{hash}.json`; the file and how many
    /// items it holds.
    async fn export_list(
        &self,
        api: &Api,
        hash: &str,
        list: MemberList,
        sink: &ExportSink,
        scrub: &Scrubber,
    ) -> Result<(ExportedFile, u64), ConnectorError> {
        let name = format!("{}-{hash}.json", list.file());
        let mut out = JsonArrayWriter::new(sink.file(&name, JSON).await?).await?;
        let count = self.config.page_size;
        let mut offset: u64 = 0;
        loop {
            let page = match api.list_page(hash, list, count, offset, scrub).await? {
                Reply::Done(page) => page,
                // Deleted between the calls: what was written stands.
                Reply::Missing => break,
            };
            let items = page.get(list.key()).and_then(Value::as_array);
            let Some(items) = items else {
                return Err(ConnectorError::Permanent(format!(
                    "mailchimp: the {} of member {hash} came without a {:?} array",
                    list.file(),
                    list.key()
                )));
            };
            for item in items {
                let mut item = item.clone();
                if let Some(map) = item.as_object_mut() {
                    map.remove("_links");
                }
                out.push(&item).await?;
            }
            offset += items.len() as u64;
            let total = page.get("total_items").and_then(Value::as_u64).unwrap_or(0);
            // An empty page ends it too, so that a wrong total cannot loop for ever.
            if items.is_empty() || offset >= total {
                break;
            }
        }
        let n = out.count();
        Ok((out.finish().await?, n))
    }

    /// The PATCH for `task`'s corrections, leaving out the fields no merge field maps. When
    /// that leaves nothing, the inner error is the reason to refuse the task: the audience
    /// has no such field, which neither an operator nor a retry can change. A permanent
    /// error for no corrections (Submit lets none through).
    fn correction(&self, task: &Task) -> Result<Result<Correction, String>, ConnectorError> {
        let corrections = &task.parameters.corrections;
        if corrections.is_empty() {
            return Err(ConnectorError::Permanent(
                "mailchimp: the RECTIFICATION request carries no corrections".to_string(),
            ));
        }
        let mut body = serde_json::Map::new();
        let mut merge = serde_json::Map::new();
        let mut email = None;
        let mut unmapped = Vec::new();
        for c in corrections {
            let field = c.field.trim();
            if field.eq_ignore_ascii_case("email") {
                let address = c.new_value.trim().to_string();
                body.insert("email_address".into(), Value::String(address.clone()));
                email = Some(address);
                continue;
            }
            let tag = self
                .config
                .merge_fields
                .iter()
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(field))
                .map(|(_, tag)| tag);
            match tag {
                Some(tag) => {
                    merge.insert(tag.clone(), Value::String(c.new_value.clone()));
                }
                None => unmapped.push(format!("{field:?}")),
            }
        }
        if !merge.is_empty() {
            body.insert("merge_fields".into(), Value::Object(merge));
        }
        if body.is_empty() {
            return Ok(Err(format!(
                "mailchimp: no merge field of this audience maps the corrected field {}; map it \
                 in merge_fields of the connector configuration (mapped: {})",
                unmapped.join(", "),
                self.mapped_fields()
            )));
        }
        Ok(Ok(Correction {
            body: Value::Object(body),
            email,
            unmapped,
        }))
    }

    /// The fields a correction can name here, for messages.
    fn mapped_fields(&self) -> String {
        std::iter::once("email")
            .chain(self.config.merge_fields.keys().map(String::as_str))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What the outcome's note adds about the corrections left out; `None` without any.
    fn unmapped_note(&self, correction: &Correction) -> Option<String> {
        (!correction.unmapped.is_empty()).then(|| {
            format!(
                "not corrected: {} (no merge field of this audience maps it; map it in \
                 merge_fields of the connector configuration; mapped: {})",
                correction.unmapped.join(", "),
                self.mapped_fields()
            )
        })
    }

    async fn run_task(&self, task: &Task) -> Result<Outcome, ConnectorError> {
        let api = match self.audience_of(&task.controller) {
            Ok(api) => api,
            Err(reason) => return Ok(Outcome::Refused { reason }),
        };
        let scrub = Scrubber::for_task(task, &self.config.api_key);
        let outcome = self.run_searched(api, task, &scrub).await?;
        // The subject's identities are not all searchable here; an outcome read as covering
        // them all would claim more than was checked.
        Ok(with_unsearched(outcome, &task.identities))
    }

    /// Carries out `task` with the identities that can address a member.
    async fn run_searched(
        &self,
        api: &Api,
        task: &Task,
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        if let (RequestKind::Erasure, Phase::Confirm { handle }) = (task.kind, &task.phase) {
            let Some((sent, pending)) = sent_of(handle) else {
                return Err(ConnectorError::Permanent(format!(
                    "mailchimp: the confirmation handle {handle:?} is not a list of subscriber \
                     hashes"
                )));
            };
            return self
                .confirm_erasure(api, &sent, &pending, task.interrupted, scrub)
                .await;
        }
        let (hashes, addresses) = match subscriber_hashes(&task.identities) {
            Ok(found) => found,
            // Only the partner can give an address: the holder refuses the input, which no
            // operator here could fix.
            Err(reason) => return Ok(Outcome::Refused { reason }),
        };
        match task.kind {
            RequestKind::Erasure => self.erase(api, &hashes, task.interrupted, scrub).await,
            RequestKind::Objection => self.object(api, &hashes, &addresses, scrub).await,
            RequestKind::ReturnOfData | RequestKind::Transfer => {
                self.export(api, &hashes, task.export_sink()?, scrub).await
            }
            // Decided by the configuration before any member is looked up: refused whether or
            // not the subject is in the audience.
            RequestKind::Rectification => match self.correction(task)? {
                Ok(correction) => self.rectify(api, &hashes, &correction, scrub).await,
                Err(reason) => Ok(Outcome::Refused { reason }),
            },
            other => Ok(Outcome::Refused {
                reason: format!(
                    "the mailchimp connector does not support {}",
                    kind_label(other)
                ),
            }),
        }
    }
}

impl Connector for MailchimpConnector {
    fn kind_name(&self) -> &'static str {
        "mailchimp"
    }

    fn supports(&self, kind: RequestKind) -> bool {
        // RESTRICTION: Mailchimp cannot keep a member while stopping all processing of it;
        // unsubscribing is the OBJECTION, and claiming more would be false.
        matches!(
            kind,
            RequestKind::Erasure
                | RequestKind::Objection
                | RequestKind::ReturnOfData
                | RequestKind::Transfer
                | RequestKind::Rectification
                | RequestKind::ContractEnd
        )
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(self.run_task(task))
    }

    fn matchable_identities(&self) -> Vec<(IdentityType, IdentityEncoding)> {
        // What `subscriber_hash_of` turns into a subscriber hash.
        vec![
            (IdentityType::Email, IdentityEncoding::Raw),
            (IdentityType::Email, IdentityEncoding::Md5),
        ]
    }

    fn scoped_controllers(&self) -> Option<Vec<String>> {
        self.unscoped
            .is_none()
            .then(|| self.audiences.keys().cloned().collect())
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(self.run_bulk_job(job))
    }
}

/// The [`audience_missing`] tail of the steps that act on one data subject.
const CHECK_LIST: &str = "check list_id and base_url";

/// The error for an audience that is not there: Mailchimp answers 404 for a wrong `list_id`.
/// `tail` follows the "; " and tells the caller what to check.
fn audience_missing(api: &Api, tail: &str) -> ConnectorError {
    ConnectorError::Permanent(format!(
        "mailchimp: audience {} was not found at {}; {tail}",
        api.list_id(),
        api.base()
    ))
}

/// A rectification's PATCH, and the corrections it leaves out.
#[derive(Debug, Clone)]
struct Correction {
    /// The PATCH body: `email_address` and the mapped `merge_fields`.
    body: Value,
    /// The corrected address, when the e-mail is corrected.
    email: Option<String>,
    /// The fields no merge field maps, quoted as the request names them (never their values).
    unmapped: Vec<String>,
}

impl Correction {
    /// The member fields the PATCH changes: `email_address` and merge tags, for notes.
    fn fields(&self) -> Vec<&str> {
        let email = self.body.get("email_address").map(|_| "email_address");
        let merge = self.body.get("merge_fields").and_then(Value::as_object);
        email
            .into_iter()
            .chain(merge.into_iter().flat_map(|m| m.keys().map(String::as_str)))
            .collect()
    }

    /// The subscriber hash of the corrected address, when the e-mail is corrected.
    fn moved_to(&self) -> Option<String> {
        let email = normalize(IdentityType::Email, self.email.as_deref()?);
        digest(IdentityEncoding::Md5, &email)
    }

    /// Whether `member` already carries every corrected value.
    fn is_carried_by(&self, member: &Value) -> bool {
        let address = |v: &Value| v.as_str().map(|a| normalize(IdentityType::Email, a));
        let email_done = match self.body.get("email_address") {
            Some(wanted) => address(wanted) == member.get("email_address").and_then(address),
            None => true,
        };
        let merge = self.body.get("merge_fields").and_then(Value::as_object);
        email_done
            && merge.into_iter().flatten().all(|(tag, value)| {
                member.get("merge_fields").and_then(|m| m.get(tag)) == Some(value)
            })
    }
}

/// A member whose permanent deletion this task sent, as an erasure's handle keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    /// The subscriber hash.
    hash: String,
    /// No answer came back to the delete: it may or may not have taken effect.
    unanswered: bool,
}

impl Sent {
    fn answered(hash: &str) -> Self {
        Self {
            hash: hash.to_string(),
            unanswered: false,
        }
    }

    fn unanswered(hash: &str) -> Self {
        Self {
            hash: hash.to_string(),
            unanswered: true,
        }
    }
}

/// ACCEPTED for an erasure that error `e` stopped after some deletes were sent: a retry from
/// the start would take their 404 for members never there, so the handle keeps them (to be
/// confirmed by reading) and the members still to delete (deleted by the next step).
fn stopped(api: &Api, sent: &[Sent], pending: &[String], e: &ConnectorError) -> Outcome {
    Outcome::Accepted {
        handle: handle_of(sent, pending),
        note: format!(
            "mailchimp: sent the permanent deletion of {} in audience {}; deleting {} failed \
             ({e}) and is tried again when the erasure is confirmed",
            hashes_of(sent),
            api.list_id(),
            pending.join(", ")
        ),
    }
}

/// The handle of an erasure's sent deletes: their hashes, comma-separated, each `?`-prefixed
/// when its delete went unanswered, then the members still to delete, each `!`-prefixed.
fn handle_of(sent: &[Sent], pending: &[String]) -> String {
    sent.iter()
        .map(|s| {
            if s.unanswered {
                format!("?{}", s.hash)
            } else {
                s.hash.clone()
            }
        })
        .chain(pending.iter().map(|hash| format!("!{hash}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// The hashes of `sent`, for notes.
fn hashes_of(sent: &[Sent]) -> String {
    sent.iter()
        .map(|s| s.hash.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sent deletes and the members still to delete that a handle of [`handle_of`] names;
/// `None` when it names something else.
fn sent_of(handle: &str) -> Option<(Vec<Sent>, Vec<String>)> {
    let mut sent = Vec::new();
    let mut pending = Vec::new();
    for item in handle.split(',') {
        if let Some(hash) = item.strip_prefix('!') {
            pending.push(is_subscriber_hash(hash).then(|| hash.to_string())?);
        } else if let Some(hash) = item.strip_prefix('?') {
            sent.push(is_subscriber_hash(hash).then(|| Sent::unanswered(hash))?);
        } else {
            sent.push(is_subscriber_hash(item).then(|| Sent::answered(item))?);
        }
    }
    Some((sent, pending))
}

/// Why an identity cannot address a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Unusable {
    EmailSha256,
    EmailSha1,
    EmailBadMd5,
    EmailEmpty,
    EmailUnknownEncoding,
    Phone,
    CustomerNumber,
    NationalId,
    OtherType,
}

impl Unusable {
    /// How notes name such identities: one, several, and the reason.
    fn words(self) -> (&'static str, &'static str, &'static str) {
        const BY_MD5: &str = "Mailchimp keys members by the MD5 of the address";
        const BY_EMAIL: &str = "Mailchimp finds members only by e-mail address";
        match self {
            Self::EmailSha256 => (
                "e-mail given as SHA-256",
                "e-mails given as SHA-256",
                BY_MD5,
            ),
            Self::EmailSha1 => ("e-mail given as SHA-1", "e-mails given as SHA-1", BY_MD5),
            Self::EmailBadMd5 => (
                "e-mail given as MD5",
                "e-mails given as MD5",
                "not 32 lowercase hex digits, so not a subscriber hash",
            ),
            Self::EmailEmpty => ("e-mail", "e-mails", "empty"),
            Self::EmailUnknownEncoding => (
                "e-mail in an unknown encoding",
                "e-mails in an unknown encoding",
                BY_MD5,
            ),
            Self::Phone => ("phone number", "phone numbers", BY_EMAIL),
            Self::CustomerNumber => ("customer number", "customer numbers", BY_EMAIL),
            Self::NationalId => ("national id", "national ids", BY_EMAIL),
            Self::OtherType => (
                "identity of another type",
                "identities of other types",
                BY_EMAIL,
            ),
        }
    }
}

/// The subscriber hash `id` addresses (a raw e-mail hashed, an MD5 one as given), or why it
/// addresses none.
fn subscriber_hash_of(id: &SubjectIdentity) -> Result<String, Unusable> {
    match IdentityType::try_from(id.r#type) {
        Ok(IdentityType::Email) => {}
        Ok(IdentityType::Phone) => return Err(Unusable::Phone),
        Ok(IdentityType::CustomerNumber) => return Err(Unusable::CustomerNumber),
        Ok(IdentityType::NationalId) => return Err(Unusable::NationalId),
        _ => return Err(Unusable::OtherType),
    }
    match IdentityEncoding::try_from(id.encoding) {
        Ok(IdentityEncoding::Raw) => {
            let email = normalize(IdentityType::Email, &id.value);
            if email.is_empty() {
                return Err(Unusable::EmailEmpty);
            }
            digest(IdentityEncoding::Md5, &email).ok_or(Unusable::EmailUnknownEncoding)
        }
        Ok(IdentityEncoding::Md5) => {
            let hash = id.value.trim().to_ascii_lowercase();
            if is_subscriber_hash(&hash) {
                Ok(hash)
            } else {
                Err(Unusable::EmailBadMd5)
            }
        }
        Ok(IdentityEncoding::Sha256) => Err(Unusable::EmailSha256),
        Ok(IdentityEncoding::Sha1) => Err(Unusable::EmailSha1),
        _ => Err(Unusable::EmailUnknownEncoding),
    }
}

/// What the note of an outcome adds about the subject's identities that were not searched,
/// counted per kind and never quoted; empty when every one was.
fn unsearched(identities: &[SubjectIdentity]) -> String {
    // A SHA-256 or SHA-1 of an address also given raw was searched through the raw one.
    let mut covered = BTreeSet::new();
    for id in identities {
        let raw = IdentityType::try_from(id.r#type) == Ok(IdentityType::Email)
            && IdentityEncoding::try_from(id.encoding) == Ok(IdentityEncoding::Raw);
        let email = normalize(IdentityType::Email, &id.value);
        if raw && !email.is_empty() {
            for enc in [IdentityEncoding::Sha256, IdentityEncoding::Sha1] {
                covered.extend(digest(enc, &email));
            }
        }
    }
    // Distinct values only, as the searched identities are.
    let mut seen = BTreeSet::new();
    for id in identities {
        let Err(why) = subscriber_hash_of(id) else {
            continue;
        };
        let value = id.value.trim().to_lowercase();
        let hashed = matches!(why, Unusable::EmailSha256 | Unusable::EmailSha1);
        if !(hashed && covered.contains(&value)) {
            seen.insert((why, id.r#type, value));
        }
    }
    let mut counts: BTreeMap<Unusable, usize> = BTreeMap::new();
    for (why, _, _) in &seen {
        *counts.entry(*why).or_default() += 1;
    }
    let parts: Vec<String> = counts
        .into_iter()
        .map(|(why, n)| {
            let (one, many, reason) = why.words();
            format!("{n} {} ({reason})", if n == 1 { one } else { many })
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("not searched: {}", parts.join("; "))
    }
}

/// `outcome` with its note saying which of `identities` were not searched.
fn with_unsearched(outcome: Outcome, identities: &[SubjectIdentity]) -> Outcome {
    match unsearched(identities) {
        extra if extra.is_empty() => outcome,
        extra => outcome.with_note_added(&extra),
    }
}

/// The subscriber hashes of the subject's e-mail identities (raw ones hashed, MD5 ones as
/// given), without duplicates, and beside them each one's address where the request gives
/// it raw (only then can an objection add an address the audience lacks); other identities
/// cannot address a member, and [`with_unsearched`] names them in the outcome. With none
/// that can, the reason the connector refuses the task with.
fn subscriber_hashes(
    identities: &[SubjectIdentity],
) -> Result<(Vec<String>, Vec<Option<&str>>), String> {
    let mut out: BTreeMap<String, Option<&str>> = BTreeMap::new();
    for id in identities {
        let Ok(hash) = subscriber_hash_of(id) else {
            continue;
        };
        let raw = IdentityEncoding::try_from(id.encoding) == Ok(IdentityEncoding::Raw);
        let slot = out.entry(hash).or_default();
        if raw && slot.is_none() {
            *slot = Some(id.value.trim());
        }
    }
    if out.is_empty() {
        return Err(
            "the mailchimp connector needs an e-mail address (raw or MD5) to find the audience \
             member; the request has none (SHA-256/SHA-1 hashes and other identity types \
             cannot address a member)"
                .to_string(),
        );
    }
    Ok(out.into_iter().unzip())
}

#[cfg(test)]
mod base_url_tests {
    use super::*;

    fn with_base_url(base_url: &str) -> MailchimpConfig {
        MailchimpConfig {
            base_url: base_url.into(),
            api_key: "0123456789abcdef0123456789abcdef-us21".into(),
            list_id: "abc123".into(),
            controllers: BTreeMap::new(),
            timeout_ms: default_timeout_ms(),
            merge_fields: default_merge_fields(),
            page_size: default_page_size(),
        }
    }

    /// Plain HTTP would carry the API key in the clear: it is taken only for a server on a
    /// loopback address, as the client reads the host, and refused elsewhere saying to use
    /// https://.
    #[test]
    fn http_is_refused_unless_the_host_is_a_loopback_address() {
        for ok in [
            "https://us21.api.mailchimp.com/3.0",
            "http://127.0.0.1:8080/3.0",
            "http://127.5.6.7/3.0",
            "http://127.1:9/3.0",
            "http://[::1]:8080/3.0",
            "http://localhost:8080/3.0",
            "http://LOCALHOST/3.0",
        ] {
            let c = with_base_url(ok);
            assert_eq!(c.validate(), Vec::<String>::new(), "{ok}");
        }
        for bad in [
            "http://us21.api.mailchimp.com/3.0",
            "http://10.0.0.5:8080/3.0",
            "http://0.0.0.0:8080/3.0",
            "http://[::ffff:10.0.0.5]/3.0",
            "http://127.0.0.1.example/3.0",
            "http://localhost.example/3.0",
            "http://[::2]/3.0",
        ] {
            let problems = with_base_url(bad).validate();
            assert_eq!(
                problems,
                [
                    "base_url: http:// would send the API key unencrypted; use https:// \
                  (http:// is accepted only for a test server on a loopback address: \
                  127.0.0.0/8, ::1 or localhost)"
                        .to_string()
                ],
                "{bad}"
            );
        }
        // A connector is not built over it either.
        match MailchimpConnector::new(with_base_url("http://mailchimp.example/3.0")) {
            Ok(_) => panic!("a connector was built over plain HTTP to another host"),
            Err(err) => assert!(err.to_string().contains("use https://"), "{err}"),
        }
    }

    /// The local fake is served over plain HTTP on 127.0.0.1 and stays usable.
    #[tokio::test]
    async fn the_local_fake_over_http_is_accepted() {
        let fake = fake::FakeMailchimp::start("0123456789abcdef0123456789abcdef-us21", "abc123")
            .await
            .unwrap();
        assert!(fake.base_url.starts_with("http://127.0.0.1:"));
        let c = with_base_url(&fake.base_url);
        assert_eq!(c.validate(), Vec::<String>::new());
        MailchimpConnector::new(c).unwrap();
    }
}
