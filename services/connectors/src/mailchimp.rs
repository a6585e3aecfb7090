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
//! | ERASURE | `POST /lists/{list}/members/{hash}/actions/delete-permanent`, then `GET` the member | COMPLETED once the `GET` answers 404, otherwise ACCEPTED and asked again |
//! | OBJECTION | `PATCH /lists/{list}/members/{hash}` `{"status":"unsubscribed"}` | COMPLETED |
//! | RETURN_OF_DATA, TRANSFER | `GET /lists/{list}/members/{hash}` | COMPLETED with the member document |
//! | RECTIFICATION | `PATCH` with `email_address` and mapped `merge_fields` | COMPLETED |
//! | RESTRICTION | none: Mailchimp has no way to restrict processing of one member | REFUSED |
//!
//! A member the API does not know is NOT_FOUND, but only after the audience itself was found:
//! Mailchimp answers 404 for a wrong `list_id` too, and reporting "holds no data" because of a
//! typo in the configuration would be a false confirmation.
//!
//! Messages never carry the API key, e-mail addresses or corrected values (Mailchimp echoes
//! addresses in some error details, so those are scrubbed); subscriber hashes are fine, they
//! are what the controller may send anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use dsrelay_proto::v1::{IdentityEncoding, IdentityType, RequestKind, SubjectIdentity};
use dsrelay_runtime::identity::{digest, normalize};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{kind_label, BoxFuture, Connector, ConnectorError, Outcome, Phase, Task};

/// How long to wait after a 429 or 503 whose Retry-After is missing or not a number of
/// seconds: Mailchimp's limits are per minute-ish, so a minute is a safe guess.
const DEFAULT_RETRY_AFTER_MS: u64 = 60_000;
/// The longest Retry-After honoured, so that a misbehaving proxy cannot park a task for days;
/// the processor's own backoff still applies on top.
const MAX_RETRY_AFTER_MS: u64 = 3_600_000;
/// The longest error detail kept from a response, so that an HTML error page from a proxy
/// does not end up whole in a task's reason.
const MAX_DETAIL_CHARS: usize = 300;

/// The configuration of one Mailchimp audience (everything after `type = "mailchimp"`).
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
    /// The audience (list) id the subprocessor keeps the subjects in. Members are per
    /// audience, so one connector serves one audience.
    pub list_id: String,
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
            .field("timeout_ms", &self.timeout_ms)
            .field("merge_fields", &self.merge_fields)
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
                "base_url: {:?} must start with https:// (or http:// for a local test server), \
                 e.g. https://us21.api.mailchimp.com/3.0",
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
            }
        }
        if self.api_key.trim().is_empty() {
            out.push("api_key: must not be empty".to_string());
        }
        if self.list_id.trim().is_empty() {
            out.push("list_id: must not be empty (the audience id)".to_string());
        } else if !is_path_safe(&self.list_id) {
            // It is spliced into every URL path.
            out.push(format!(
                "list_id: {:?} may only contain letters, digits, '-' and '_'",
                self.list_id
            ));
        }
        if self.timeout_ms == 0 {
            out.push("timeout_ms: must be greater than 0".to_string());
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

/// Carries out data-subject requests in one Mailchimp audience; see the module documentation.
#[derive(Debug, Clone)]
pub struct MailchimpConnector {
    config: MailchimpConfig,
    /// `base_url` without a trailing slash.
    base: String,
    client: reqwest::Client,
}

/// What a call answered, for the statuses the callers tell apart.
enum Reply {
    /// 2xx; the JSON body, or `Null` for 204.
    Done(Value),
    /// 404: the member (or the audience) does not exist.
    Missing,
}

impl MailchimpConnector {
    /// Validates `config` and sets up the HTTP client (no call is made yet).
    pub fn new(config: MailchimpConfig) -> anyhow::Result<Self> {
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!(
                "invalid mailchimp connector configuration: {}",
                problems.join("; ")
            );
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .user_agent(concat!("dsrelay-connectors/", env!("CARGO_PKG_VERSION")))
            // The API never redirects; following one would resend the key to wherever a
            // proxy or attacker pointed us.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base = config.base_url.trim_end_matches('/').to_string();
        Ok(Self {
            config,
            base,
            client,
        })
    }

    /// The configuration this connector runs.
    pub fn config(&self) -> &MailchimpConfig {
        &self.config
    }

    fn list_url(&self) -> String {
        format!("{}/lists/{}", self.base, self.config.list_id)
    }

    fn member_url(&self, hash: &str) -> String {
        format!("{}/members/{hash}", self.list_url())
    }

    /// Makes one API call. 404 is an answer ([`Reply::Missing`]), every other non-2xx status
    /// an error sorted into transient or permanent.
    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        what: &str,
        scrub: &Scrubber,
    ) -> Result<Reply, ConnectorError> {
        let mut request = self
            .client
            .request(method, url)
            .basic_auth("dsrelay", Some(&self.config.api_key));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| transport_error(what, e))?;
        let status = response.status();
        tracing::debug!(status = status.as_u16(), what, "mailchimp call");
        if status == StatusCode::NOT_FOUND {
            return Ok(Reply::Missing);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_error(what, e))?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Reply::Done(Value::Null));
            }
            return serde_json::from_slice(&bytes)
                .map(Reply::Done)
                .map_err(|e| {
                    ConnectorError::Permanent(format!(
                        "mailchimp: {what}: HTTP {status} with a body that is not JSON ({e})"
                    ))
                });
        }
        Err(status_error(
            what,
            status,
            retry_after.as_deref(),
            &bytes,
            scrub,
        ))
    }

    /// Fails unless the configured audience exists; called before answering NOT_FOUND, since
    /// Mailchimp's 404 does not say whether the member or the audience is missing.
    async fn ensure_audience(&self, scrub: &Scrubber) -> Result<(), ConnectorError> {
        let url = format!("{}?fields=id", self.list_url());
        match self
            .call(Method::GET, &url, None, "looking up the audience", scrub)
            .await?
        {
            Reply::Done(_) => Ok(()),
            Reply::Missing => Err(ConnectorError::Permanent(format!(
                "mailchimp: audience {} was not found at {}; check list_id and base_url",
                self.config.list_id, self.base
            ))),
        }
    }

    async fn not_found(
        &self,
        hashes: &[String],
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        self.ensure_audience(scrub).await?;
        Ok(Outcome::NotFound {
            note: format!(
                "mailchimp: audience {} has no member {}",
                self.config.list_id,
                hashes.join(", ")
            ),
        })
    }

    async fn erase(&self, hashes: &[String], scrub: &Scrubber) -> Result<Outcome, ConnectorError> {
        let mut deleted = Vec::new();
        for hash in hashes {
            let url = format!("{}/actions/delete-permanent", self.member_url(hash));
            let what = format!("deleting member {hash}");
            // An error here after an earlier member was deleted loses that count on the
            // retry (the member then answers 404); the erasure itself is not lost.
            if let Reply::Done(_) = self.call(Method::POST, &url, None, &what, scrub).await? {
                deleted.push(hash.clone());
            }
        }
        if deleted.is_empty() {
            return self.not_found(hashes, scrub).await;
        }
        let handle = deleted.join(",");
        match self.confirm_erasure(&deleted, scrub).await {
            Ok(outcome) => Ok(outcome),
            // The members are deleted; if the check fails now, a retry from the start would
            // find nothing and answer NOT_FOUND. Keep the handle and ask again instead.
            Err(e) => Ok(Outcome::Accepted {
                handle,
                note: format!(
                    "mailchimp: permanently deleted {}; checking that it is gone failed ({e})",
                    deleted.join(", ")
                ),
            }),
        }
    }

    /// COMPLETED when every member in `deleted` answers 404, otherwise ACCEPTED under the
    /// same handle, so that the processor just asks again later.
    async fn confirm_erasure(
        &self,
        deleted: &[String],
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        let mut lingering = Vec::new();
        for hash in deleted {
            let url = format!("{}?fields=id,status", self.member_url(hash));
            let what = format!("checking that member {hash} is gone");
            if let Reply::Done(_) = self.call(Method::GET, &url, None, &what, scrub).await? {
                lingering.push(hash.as_str());
            }
        }
        let list = &self.config.list_id;
        if lingering.is_empty() {
            Ok(Outcome::Completed {
                records_affected: deleted.len() as i64,
                note: format!(
                    "mailchimp: permanently deleted member {} from audience {list}; the API no \
                     longer returns it",
                    deleted.join(", ")
                ),
                export: None,
            })
        } else {
            Ok(Outcome::Accepted {
                handle: deleted.join(","),
                note: format!(
                    "mailchimp: permanently deleted member {} from audience {list}; the API \
                     still returns {}",
                    deleted.join(", "),
                    lingering.join(", ")
                ),
            })
        }
    }

    /// PATCHes every member with `body`; NOT_FOUND when none exists.
    async fn patch(
        &self,
        hashes: &[String],
        body: &Value,
        done: &str,
        scrub: &Scrubber,
    ) -> Result<Outcome, ConnectorError> {
        let mut notes = Vec::new();
        for hash in hashes {
            let what = format!("updating member {hash}");
            let Reply::Done(member) = self
                .call(
                    Method::PATCH,
                    &self.member_url(hash),
                    Some(body),
                    &what,
                    scrub,
                )
                .await?
            else {
                continue;
            };
            // Changing the address changes the member's id (the hash of the new address).
            match member.get("id").and_then(Value::as_str) {
                Some(id) if id != hash => notes.push(format!("{hash} (now {id})")),
                _ => notes.push(hash.clone()),
            }
        }
        if notes.is_empty() {
            return self.not_found(hashes, scrub).await;
        }
        Ok(Outcome::Completed {
            records_affected: notes.len() as i64,
            note: format!(
                "mailchimp: {done} member {} in audience {}",
                notes.join(", "),
                self.config.list_id
            ),
            export: None,
        })
    }

    async fn export(&self, hashes: &[String], scrub: &Scrubber) -> Result<Outcome, ConnectorError> {
        let mut members = Vec::new();
        for hash in hashes {
            let what = format!("reading member {hash}");
            if let Reply::Done(mut member) = self
                .call(Method::GET, &self.member_url(hash), None, &what, scrub)
                .await?
            {
                // Hypermedia links describe the API, not the subject.
                if let Some(map) = member.as_object_mut() {
                    map.remove("_links");
                }
                members.push(member);
            }
        }
        if members.is_empty() {
            return self.not_found(hashes, scrub).await;
        }
        Ok(Outcome::Completed {
            records_affected: members.len() as i64,
            note: format!(
                "mailchimp: exported {} member(s) of audience {}",
                members.len(),
                self.config.list_id
            ),
            export: Some(json!({
                "source": "mailchimp",
                "list_id": self.config.list_id,
                "members": members,
            })),
        })
    }

    /// The PATCH body for `task`'s corrections; every field must be `email` or mapped.
    fn rectification_body(&self, task: &Task) -> Result<Value, ConnectorError> {
        let corrections = &task.parameters.corrections;
        if corrections.is_empty() {
            return Err(ConnectorError::Permanent(
                "mailchimp: the RECTIFICATION request carries no corrections".to_string(),
            ));
        }
        let mut body = serde_json::Map::new();
        let mut merge = serde_json::Map::new();
        for c in corrections {
            let field = c.field.trim();
            if field.eq_ignore_ascii_case("email") {
                body.insert(
                    "email_address".into(),
                    Value::String(c.new_value.trim().into()),
                );
                continue;
            }
            let tag = self
                .config
                .merge_fields
                .iter()
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(field))
                .map(|(_, tag)| tag);
            let Some(tag) = tag else {
                let mapped: Vec<&str> = std::iter::once("email")
                    .chain(self.config.merge_fields.keys().map(String::as_str))
                    .collect();
                return Err(ConnectorError::Permanent(format!(
                    "mailchimp: the correction of field {field:?} has no merge field in this \
                     audience; map it in merge_fields of the connector configuration (mapped: \
                     {})",
                    mapped.join(", ")
                )));
            };
            merge.insert(tag.clone(), Value::String(c.new_value.clone()));
        }
        if !merge.is_empty() {
            body.insert("merge_fields".into(), Value::Object(merge));
        }
        Ok(Value::Object(body))
    }

    async fn run_task(&self, task: &Task) -> Result<Outcome, ConnectorError> {
        let scrub = Scrubber::for_task(task, &self.config.api_key);
        if let (RequestKind::Erasure, Phase::Confirm { handle }) = (task.kind, &task.phase) {
            let hashes: Vec<String> = handle.split(',').map(str::to_string).collect();
            if !hashes.iter().all(|h| is_subscriber_hash(h)) {
                return Err(ConnectorError::Permanent(format!(
                    "mailchimp: the confirmation handle {handle:?} is not a list of subscriber \
                     hashes"
                )));
            }
            return self.confirm_erasure(&hashes, &scrub).await;
        }
        let hashes = subscriber_hashes(&task.identities)?;
        match task.kind {
            RequestKind::Erasure => self.erase(&hashes, &scrub).await,
            RequestKind::Objection => {
                let body = json!({ "status": "unsubscribed" });
                self.patch(&hashes, &body, "unsubscribed", &scrub).await
            }
            RequestKind::ReturnOfData | RequestKind::Transfer => self.export(&hashes, &scrub).await,
            RequestKind::Rectification => {
                let body = self.rectification_body(task)?;
                let fields: Vec<&str> = body
                    .get("email_address")
                    .map(|_| "email_address")
                    .into_iter()
                    .chain(
                        body.get("merge_fields")
                            .and_then(Value::as_object)
                            .into_iter()
                            .flat_map(|m| m.keys().map(String::as_str)),
                    )
                    .collect();
                let done = format!("corrected {} of", fields.join(", "));
                self.patch(&hashes, &body, &done, &scrub).await
            }
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
        )
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(self.run_task(task))
    }
}

/// The subscriber hashes of the subject's e-mail identities (raw ones hashed, MD5 ones as
/// given), without duplicates; other identities cannot address a member.
fn subscriber_hashes(identities: &[SubjectIdentity]) -> Result<Vec<String>, ConnectorError> {
    let mut out = BTreeSet::new();
    for id in identities {
        if IdentityType::try_from(id.r#type) != Ok(IdentityType::Email) {
            continue;
        }
        let hash = match IdentityEncoding::try_from(id.encoding) {
            Ok(IdentityEncoding::Raw) => {
                let email = normalize(IdentityType::Email, &id.value);
                if email.is_empty() {
                    continue;
                }
                digest(IdentityEncoding::Md5, &email)
            }
            Ok(IdentityEncoding::Md5) => Some(id.value.trim().to_ascii_lowercase()),
            _ => None,
        };
        if let Some(hash) = hash.filter(|h| is_subscriber_hash(h)) {
            out.insert(hash);
        }
    }
    if out.is_empty() {
        return Err(ConnectorError::Permanent(
            "the mailchimp connector needs an e-mail address (raw or MD5) to find the audience \
             member; the request has none (SHA-256/SHA-1 hashes and other identity types \
             cannot address a member)"
                .to_string(),
        ));
    }
    Ok(out.into_iter().collect())
}

/// A transport failure (nothing or no complete answer came back).
fn transport_error(what: &str, err: reqwest::Error) -> ConnectorError {
    let permanent = err.is_builder();
    // The URL holds no secrets, but the message reads better without it; the sources say
    // what actually happened ("Connection refused", "operation timed out").
    let err = err.without_url();
    let mut message = format!("mailchimp: {what}: {err}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    if err.is_timeout() && !message.contains("timed out") {
        message.push_str(" (timed out)");
    }
    if permanent {
        ConnectorError::Permanent(message)
    } else {
        // Refused, reset, timed out, TLS hiccups: all pass by themselves or need the holder
        // to come back, and the processor gives up at the due date anyway.
        ConnectorError::Transient(message)
    }
}

/// The error for a non-2xx, non-404 answer.
fn status_error(
    what: &str,
    status: StatusCode,
    retry_after: Option<&str>,
    body: &[u8],
    scrub: &Scrubber,
) -> ConnectorError {
    let problem = problem_text(body, scrub);
    let message = format!("mailchimp: {what}: HTTP {}{problem}", status.as_u16());
    match status.as_u16() {
        429 => ConnectorError::RetryAfter {
            message,
            after_ms: retry_after_ms(retry_after),
        },
        // A 503 that says when to come back is honoured like a 429; without it, ordinary
        // backoff.
        503 if retry_after
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some() =>
        {
            ConnectorError::RetryAfter {
                message,
                after_ms: retry_after_ms(retry_after),
            }
        }
        500..=599 => ConnectorError::Transient(message),
        401 | 403 => ConnectorError::Permanent(format!(
            "mailchimp: {what}: the API key was refused (HTTP {}{problem}); check api_key and \
             that base_url's data centre matches the key's suffix",
            status.as_u16()
        )),
        _ => ConnectorError::Permanent(message),
    }
}

/// The wait a Retry-After header asks for: seconds, capped at an hour; a minute when the
/// header is missing or is not a number (HTTP dates are not worth parsing for this).
fn retry_after_ms(header: Option<&str>) -> u64 {
    header
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_AFTER_MS, |s| {
            s.saturating_mul(1000).min(MAX_RETRY_AFTER_MS)
        })
}

/// `": Title: detail (field: message, ...)"` from a problem+json body, scrubbed and
/// shortened; empty when the body is not one.
fn problem_text(body: &[u8], scrub: &Scrubber) -> String {
    let Ok(problem) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    let text = |key: &str| problem.get(key).and_then(Value::as_str).unwrap_or_default();
    let mut out = String::new();
    for part in [text("title"), text("detail")] {
        if !part.trim().is_empty() {
            out.push_str(": ");
            out.push_str(part.trim());
        }
    }
    // Validation failures ("Invalid Resource") list the offending fields separately.
    let errors: Vec<String> = problem
        .get("errors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let field = e.get("field").and_then(Value::as_str).unwrap_or("?");
            let message = e.get("message").and_then(Value::as_str).unwrap_or("");
            format!("{field}: {message}")
        })
        .collect();
    if !errors.is_empty() {
        out.push_str(&format!(" ({})", errors.join("; ")));
    }
    let out = scrub.apply(&out);
    if out.chars().count() > MAX_DETAIL_CHARS {
        let cut: String = out.chars().take(MAX_DETAIL_CHARS).collect();
        format!("{cut}...")
    } else {
        out
    }
}

/// Removes personal data and the key from text the API sent back before it becomes part of
/// a task's reason, which is stored and shown to operators and the controller.
struct Scrubber {
    secrets: Vec<String>,
}

impl Scrubber {
    fn for_task(task: &Task, api_key: &str) -> Self {
        let mut secrets: Vec<String> = std::iter::once(api_key.to_string())
            .chain(task.identities.iter().map(|id| id.value.trim().to_string()))
            .chain(
                task.parameters
                    .corrections
                    .iter()
                    .map(|c| c.new_value.trim().to_string()),
            )
            // Very short values ("Al") would blank out ordinary words, and leak little.
            .filter(|s| s.chars().count() >= 3)
            .collect();
        // Longest first, so that a value containing another is removed whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self { secrets }
    }

    fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            out = replace_ascii_case_insensitive(&out, secret, "[redacted]");
        }
        // Addresses the request did not carry (e.g. the one a correction collides with) are
        // still personal data.
        out.split(' ')
            .map(|word| if word.contains('@') { "[e-mail]" } else { word })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `haystack` with every ASCII-case-insensitive occurrence of `needle` replaced. ASCII
/// lowercasing keeps byte offsets, so positions found in the lowered copy are valid in the
/// original.
fn replace_ascii_case_insensitive(haystack: &str, needle: &str, with: &str) -> String {
    let lower_hay = haystack.to_ascii_lowercase();
    let lower_needle = needle.to_ascii_lowercase();
    let mut out = String::with_capacity(haystack.len());
    let mut last = 0;
    for (at, _) in lower_hay.match_indices(&lower_needle) {
        out.push_str(&haystack[last..at]);
        out.push_str(with);
        last = at + needle.len();
    }
    out.push_str(&haystack[last..]);
    out
}

/// A local stand-in for the Mailchimp Marketing API: the paths, methods, status codes,
/// problem+json errors and member documents of the subset the connector uses, over one
/// in-memory audience, with knobs for the failures the connector must survive.
#[cfg(test)]
mod fake {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, MutexGuard};

    use axum::body::Bytes;
    use axum::extract::{Path, Request, State};
    use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
    use axum::middleware::{self, Next};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::Router;
    use dsrelay_proto::v1::{IdentityEncoding, IdentityType};
    use dsrelay_runtime::identity::{digest, normalize};
    use serde_json::{json, Value};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const ERROR_DOCS: &str = "https://mailchimp.com/developer/marketing/docs/errors/";

    /// The audience and the failure knobs.
    #[derive(Default)]
    pub(super) struct Audience {
        pub(super) api_key: String,
        pub(super) list_id: String,
        /// Members by subscriber hash.
        pub(super) members: BTreeMap<String, Value>,
        /// Deleted members the API keeps returning: (document, GETs left).
        ghosts: BTreeMap<String, (Value, u32)>,
        /// How many GETs a member deleted from now on keeps being returned for.
        pub(super) forget_after_gets: u32,
        /// The next this many calls answer 429 with Retry-After: 1.
        pub(super) rate_limited: u32,
        /// The next this many calls answer 503.
        pub(super) unavailable: u32,
        /// The next this many GET calls answer 503 (other methods pass).
        pub(super) unavailable_gets: u32,
        /// Every call wait this long before answering (ms).
        pub(super) delay_ms: u64,
        /// `METHOD /path` of every call, in order.
        pub(super) calls: Vec<String>,
        next_web_id: u64,
    }

    pub(super) struct FakeMailchimp {
        /// Like `https://us21.api.mailchimp.com/3.0`.
        pub(super) base_url: String,
        audience: Arc<Mutex<Audience>>,
        stop: Option<oneshot::Sender<()>>,
        server: Option<JoinHandle<()>>,
    }

    pub(super) fn subscriber_hash(email: &str) -> String {
        digest(
            IdentityEncoding::Md5,
            &normalize(IdentityType::Email, email),
        )
        .unwrap()
    }

    impl FakeMailchimp {
        pub(super) async fn start(api_key: &str, list_id: &str) -> Self {
            let audience = Arc::new(Mutex::new(Audience {
                api_key: api_key.into(),
                list_id: list_id.into(),
                next_web_id: 500_001,
                ..Default::default()
            }));
            let app = Router::new()
                .route("/3.0/lists/{list_id}", get(get_list))
                .route(
                    "/3.0/lists/{list_id}/members/{hash}",
                    get(get_member).patch(patch_member),
                )
                .route(
                    "/3.0/lists/{list_id}/members/{hash}/actions/delete-permanent",
                    post(delete_permanent),
                )
                .fallback(|| async {
                    problem(
                        StatusCode::NOT_FOUND,
                        "Resource Not Found",
                        "The requested resource could not be found.",
                    )
                })
                .layer(middleware::from_fn_with_state(audience.clone(), gate))
                .with_state(audience.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = oneshot::channel::<()>();
            let server = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
            Self {
                base_url: format!("http://{addr}/3.0"),
                audience,
                stop: Some(stop),
                server: Some(server),
            }
        }

        pub(super) fn audience(&self) -> MutexGuard<'_, Audience> {
            self.audience.lock().unwrap()
        }

        /// Subscribes `email` with a first and last name; returns its subscriber hash.
        pub(super) fn subscribe(&self, email: &str, first: &str, last: &str) -> String {
            let mut a = self.audience();
            let hash = subscriber_hash(email);
            let web_id = a.next_web_id;
            a.next_web_id += 1;
            let list_id = a.list_id.clone();
            let doc = member_document(&list_id, &hash, email, first, last, web_id);
            a.members.insert(hash.clone(), doc);
            hash
        }

        pub(super) fn member(&self, hash: &str) -> Option<Value> {
            self.audience().members.get(hash).cloned()
        }

        /// Stops listening and waits until the port is closed.
        pub(super) async fn stop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(server) = self.server.take() {
                server.await.unwrap();
            }
        }
    }

    /// What Mailchimp returns for a member (the fields of `GET .../members/{hash}`).
    fn member_document(
        list_id: &str,
        hash: &str,
        email: &str,
        first: &str,
        last: &str,
        web_id: u64,
    ) -> Value {
        let self_href =
            format!("https://us21.api.mailchimp.com/3.0/lists/{list_id}/members/{hash}");
        json!({
            "id": hash,
            "email_address": email,
            "unique_email_id": &hash[..10],
            "contact_id": format!("{}{}", &hash[16..], &hash[..16]),
            "full_name": format!("{first} {last}"),
            "web_id": web_id,
            "email_type": "html",
            "status": "subscribed",
            "consents_to_one_to_one_messaging": true,
            "merge_fields": {
                "FNAME": first,
                "LNAME": last,
                "ADDRESS": "",
                "PHONE": "",
                "BIRTHDAY": "",
            },
            "interests": {},
            "stats": { "avg_open_rate": 0.42, "avg_click_rate": 0.07 },
            "ip_signup": "",
            "timestamp_signup": "",
            "ip_opt": "198.51.100.23",
            "timestamp_opt": "2024-03-01T09:30:12+00:00",
            "member_rating": 3,
            "last_changed": "2024-03-01T09:30:12+00:00",
            "language": "fi",
            "vip": false,
            "email_client": "Gmail",
            "location": {
                "latitude": 60.17, "longitude": 24.94, "gmtoff": 2, "dstoff": 3,
                "country_code": "FI", "timezone": "Europe/Helsinki", "region": "18"
            },
            "marketing_permissions": [],
            "source": "API - Generic",
            "tags_count": 1,
            "tags": [{ "id": 101, "name": "newsletter" }],
            "list_id": list_id,
            "_links": [
                { "rel": "self", "href": self_href, "method": "GET",
                  "targetSchema": "https://us21.api.mailchimp.com/schema/3.0/Definitions/Lists/Members/Response.json" },
                { "rel": "delete", "href": self_href, "method": "DELETE" }
            ]
        })
    }

    fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
        problem_with_errors(status, title, detail, &[])
    }

    /// Mailchimp's problem+json; `errors` (field, message) only for validation failures.
    fn problem_with_errors(
        status: StatusCode,
        title: &str,
        detail: &str,
        errors: &[(&str, &str)],
    ) -> Response {
        let mut body = json!({
            "type": ERROR_DOCS,
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
            "instance": "9f7e4c2a-1b3d-4e5f-8a6b-7c8d9e0f1a2b",
        });
        if !errors.is_empty() {
            body["errors"] = errors
                .iter()
                .map(|(field, message)| json!({ "field": field, "message": message }))
                .collect();
        }
        (
            status,
            [(
                header::CONTENT_TYPE,
                "application/problem+json; charset=utf-8",
            )],
            body.to_string(),
        )
            .into_response()
    }

    fn member_not_found() -> Response {
        problem(
            StatusCode::NOT_FOUND,
            "Resource Not Found",
            "The requested resource could not be found.",
        )
    }

    /// Records the call, then applies the failure knobs and the API-key check, in the order
    /// Mailchimp's edge does: throttling before authentication.
    async fn gate(
        State(audience): State<Arc<Mutex<Audience>>>,
        request: Request,
        next: Next,
    ) -> Response {
        let (delay_ms, early) = {
            let mut a = audience.lock().unwrap();
            a.calls
                .push(format!("{} {}", request.method(), request.uri().path()));
            let early = if a.rate_limited > 0 {
                a.rate_limited -= 1;
                let mut r = problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too Many Requests",
                    "You have exceeded the limit of 10 simultaneous connections.",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Some(r)
            } else if a.unavailable > 0
                || (a.unavailable_gets > 0 && request.method() == axum::http::Method::GET)
            {
                if a.unavailable > 0 {
                    a.unavailable -= 1;
                } else {
                    a.unavailable_gets -= 1;
                }
                Some(problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service Unavailable",
                    "This service is temporarily unavailable. Please try again later.",
                ))
            } else {
                authorize(request.headers(), &a.api_key)
            };
            (a.delay_ms, early)
        };
        if delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        }
        match early {
            Some(response) => response,
            None => next.run(request).await,
        }
    }

    /// `None` when the basic-auth password is the API key (any user name), else Mailchimp's
    /// 401.
    fn authorize(headers: &HeaderMap, api_key: &str) -> Option<Response> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Some(problem(
                StatusCode::UNAUTHORIZED,
                "API Key Missing",
                "Your request did not include an API key.",
            ));
        };
        let password = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(base64_decode)
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|d| d.split_once(':').map(|(_, p)| p.to_string()));
        if password.as_deref() == Some(api_key) {
            None
        } else {
            Some(problem(
                StatusCode::UNAUTHORIZED,
                "API Key Invalid",
                "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
            ))
        }
    }

    fn base64_decode(text: &str) -> Option<Vec<u8>> {
        let value = |c: u8| -> Option<u32> {
            Some(match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => return None,
            } as u32)
        };
        let bytes = text.trim().trim_end_matches('=').as_bytes();
        let mut out = Vec::new();
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, &c) in chunk.iter().enumerate() {
                n |= value(c)? << (18 - 6 * i);
            }
            let produced = chunk.len() * 6 / 8;
            out.extend_from_slice(&n.to_be_bytes()[1..1 + produced]);
        }
        Some(out)
    }

    fn wrong_list(a: &Audience, list_id: &str) -> Option<Response> {
        (a.list_id != list_id).then(member_not_found)
    }

    async fn get_list(
        State(audience): State<Arc<Mutex<Audience>>>,
        Path(list_id): Path<String>,
    ) -> Response {
        let a = audience.lock().unwrap();
        if let Some(r) = wrong_list(&a, &list_id) {
            return r;
        }
        axum::Json(json!({
            "id": a.list_id,
            "web_id": 123456,
            "name": "Newsletter",
            "stats": { "member_count": a.members.len() },
        }))
        .into_response()
    }

    async fn get_member(
        State(audience): State<Arc<Mutex<Audience>>>,
        Path((list_id, hash)): Path<(String, String)>,
    ) -> Response {
        let mut a = audience.lock().unwrap();
        if let Some(r) = wrong_list(&a, &list_id) {
            return r;
        }
        if let Some(member) = a.members.get(&hash) {
            return axum::Json(member.clone()).into_response();
        }
        if let Some((doc, left)) = a.ghosts.get_mut(&hash) {
            if *left > 0 {
                *left -= 1;
                return axum::Json(doc.clone()).into_response();
            }
        }
        member_not_found()
    }

    async fn delete_permanent(
        State(audience): State<Arc<Mutex<Audience>>>,
        Path((list_id, hash)): Path<(String, String)>,
    ) -> Response {
        let mut a = audience.lock().unwrap();
        if let Some(r) = wrong_list(&a, &list_id) {
            return r;
        }
        match a.members.remove(&hash) {
            Some(doc) => {
                let lag = a.forget_after_gets;
                if lag > 0 {
                    a.ghosts.insert(hash, (doc, lag));
                }
                StatusCode::NO_CONTENT.into_response()
            }
            None => member_not_found(),
        }
    }

    async fn patch_member(
        State(audience): State<Arc<Mutex<Audience>>>,
        Path((list_id, hash)): Path<(String, String)>,
        body: Bytes,
    ) -> Response {
        let mut a = audience.lock().unwrap();
        if let Some(r) = wrong_list(&a, &list_id) {
            return r;
        }
        let Ok(Value::Object(patch)) = serde_json::from_slice::<Value>(&body) else {
            return problem(
                StatusCode::BAD_REQUEST,
                "JSON Parse Error",
                "We encountered an unspecified JSON parsing error.",
            );
        };
        let Some(mut member) = a.members.get(&hash).cloned() else {
            return member_not_found();
        };
        if let Some(status) = patch.get("status") {
            let valid = [
                "subscribed",
                "unsubscribed",
                "cleaned",
                "pending",
                "transactional",
            ];
            match status.as_str() {
                Some(s) if valid.contains(&s) => member["status"] = json!(s),
                _ => {
                    return invalid_resource("status", "Value is not one of the enumerated values")
                }
            }
        }
        if let Some(fields) = patch.get("merge_fields") {
            let Some(fields) = fields.as_object() else {
                return invalid_resource("merge_fields", "Schema describes object, string found");
            };
            for (tag, value) in fields {
                member["merge_fields"][tag] = value.clone();
            }
            let name = |tag: &str| {
                member["merge_fields"][tag]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            };
            member["full_name"] = json!(format!("{} {}", name("FNAME"), name("LNAME")));
        }
        let mut new_hash = hash.clone();
        if let Some(email) = patch.get("email_address") {
            let Some(email) = email
                .as_str()
                .filter(|e| e.contains('@') && e.contains('.'))
            else {
                return invalid_resource("email_address", "Please provide a valid email address.");
            };
            new_hash = subscriber_hash(email);
            if new_hash != hash && a.members.contains_key(&new_hash) {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Member Exists",
                    &format!(
                        "{email} is already a list member. Use PUT to insert or update list \
                         members."
                    ),
                );
            }
            member["email_address"] = json!(email);
            member["id"] = json!(new_hash);
        }
        member["last_changed"] = json!("2025-05-20T12:00:00+00:00");
        a.members.remove(&hash);
        a.members.insert(new_hash, member.clone());
        axum::Json(member).into_response()
    }

    fn invalid_resource(field: &str, message: &str) -> Response {
        problem_with_errors(
            StatusCode::BAD_REQUEST,
            "Invalid Resource",
            "The resource submitted could not be validated. For field-specific details, see the \
             'errors' array.",
            &[(field, message)],
        )
    }

    #[test]
    fn base64_decodes_basic_auth() {
        assert_eq!(base64_decode("dXNlcjprZXk=").unwrap(), b"user:key");
        assert_eq!(
            base64_decode("YW55OnNlY3JldC11czIx").unwrap(),
            b"any:secret-us21"
        );
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert!(base64_decode("*").is_none());
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{FieldCorrection, RequestParameters};

    use super::fake::{subscriber_hash, FakeMailchimp};
    use super::*;
    use crate::config::ConnectorConfig;

    const KEY: &str = "0123456789abcdef0123456789abcdef-us21";
    const LIST: &str = "a1b2c3d4e5";
    const MAIJA: &str = "Maija.Meikalainen@Example.fi";

    fn email(value: &str) -> SubjectIdentity {
        SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: value.into(),
            label: String::new(),
        }
    }

    fn md5_email(hash: &str) -> SubjectIdentity {
        SubjectIdentity {
            encoding: IdentityEncoding::Md5 as i32,
            ..email(hash)
        }
    }

    fn task(kind: RequestKind, identities: Vec<SubjectIdentity>) -> Task {
        Task {
            task_id: "c/r1/newsletter".into(),
            request_id: "r1".into(),
            kind,
            identities,
            categories: Vec::new(),
            parameters: RequestParameters::default(),
            due_at_ms: 2_000_000_000_000,
            now_ms: 1_700_000_000_000,
            phase: Phase::Start,
        }
    }

    fn config(base_url: &str) -> MailchimpConfig {
        MailchimpConfig {
            base_url: base_url.into(),
            api_key: KEY.into(),
            list_id: LIST.into(),
            timeout_ms: 5_000,
            merge_fields: default_merge_fields(),
        }
    }

    async fn setup() -> (FakeMailchimp, MailchimpConnector, String) {
        let fake = FakeMailchimp::start(KEY, LIST).await;
        let hash = fake.subscribe(MAIJA, "Maija", "Meikäläinen");
        fake.subscribe("someone.else@example.fi", "Matti", "Virtanen");
        let connector = MailchimpConnector::new(config(&fake.base_url)).unwrap();
        (fake, connector, hash)
    }

    fn assert_clean(message: &str) {
        let lower = message.to_lowercase();
        assert!(!lower.contains("maija.meikalainen"), "{message}");
        assert!(!lower.contains('@'), "{message}");
        assert!(!message.contains(KEY), "{message}");
    }

    #[tokio::test]
    async fn erasure_deletes_permanently_and_confirms_the_member_is_gone() {
        let (fake, connector, hash) = setup().await;
        // Padded and in another case than stored, as a partner might send it.
        let out = connector
            .run(&task(
                RequestKind::Erasure,
                vec![email(" MAIJA.meikalainen@example.FI ")],
            ))
            .await
            .unwrap();
        let Outcome::Completed {
            records_affected: 1,
            note,
            export: None,
        } = out
        else {
            panic!("{out:?}");
        };
        assert!(note.contains(&hash), "{note}");
        assert_clean(&note);
        assert!(fake.member(&hash).is_none());
        assert_eq!(fake.audience().members.len(), 1);
        assert_eq!(
            fake.audience().calls,
            [
                format!("POST /3.0/lists/{LIST}/members/{hash}/actions/delete-permanent"),
                format!("GET /3.0/lists/{LIST}/members/{hash}"),
            ]
        );
    }

    #[tokio::test]
    async fn erasure_of_an_unknown_member_is_not_found() {
        let (fake, connector, _) = setup().await;
        let out = connector
            .run(&task(
                RequestKind::Erasure,
                vec![email("nobody@example.fi")],
            ))
            .await
            .unwrap();
        let Outcome::NotFound { note } = out else {
            panic!("{out:?}");
        };
        assert!(
            note.contains(&subscriber_hash("nobody@example.fi")),
            "{note}"
        );
        assert_clean(&note);
        assert_eq!(fake.audience().members.len(), 2);
    }

    #[tokio::test]
    async fn a_wrong_list_id_is_permanent_not_a_false_not_found() {
        let (fake, _, _) = setup().await;
        let connector = MailchimpConnector::new(MailchimpConfig {
            list_id: "ffffffffff".into(),
            ..config(&fake.base_url)
        })
        .unwrap();
        let err = connector
            .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectorError::Permanent(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("audience ffffffffff was not found"),
            "{err}"
        );
        assert_eq!(fake.audience().members.len(), 2);
    }

    #[tokio::test]
    async fn an_md5_identity_is_the_subscriber_hash() {
        let (fake, connector, hash) = setup().await;
        let ids = vec![
            md5_email(&hash),
            // Identities that cannot address a member are ignored, not errors.
            SubjectIdentity {
                r#type: IdentityType::Phone as i32,
                ..email("+358401234567")
            },
        ];
        let out = connector
            .run(&task(RequestKind::Erasure, ids))
            .await
            .unwrap();
        assert!(
            matches!(
                out,
                Outcome::Completed {
                    records_affected: 1,
                    ..
                }
            ),
            "{out:?}"
        );
        assert!(fake.member(&hash).is_none());
    }

    #[tokio::test]
    async fn raw_and_md5_of_one_address_count_once_and_two_addresses_twice() {
        let (fake, connector, hash) = setup().await;
        let other = subscriber_hash("someone.else@example.fi");
        let ids = vec![email(MAIJA), md5_email(&hash), md5_email(&other)];
        let out = connector
            .run(&task(RequestKind::Erasure, ids))
            .await
            .unwrap();
        assert!(
            matches!(
                out,
                Outcome::Completed {
                    records_affected: 2,
                    ..
                }
            ),
            "{out:?}"
        );
        assert!(fake.audience().members.is_empty());
    }

    #[tokio::test]
    async fn without_an_email_identity_the_task_fails_permanently() {
        let (_fake, connector, hash) = setup().await;
        let sha256 = SubjectIdentity {
            encoding: IdentityEncoding::Sha256 as i32,
            ..email(&"a".repeat(64))
        };
        let phone = SubjectIdentity {
            r#type: IdentityType::Phone as i32,
            ..email("+358401234567")
        };
        // An MD5 value of the wrong shape cannot be a member id (and must not reach a path).
        let bad_md5 = md5_email(&format!("{hash}/../x"));
        let err = connector
            .run(&task(RequestKind::Erasure, vec![sha256, phone, bad_md5]))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectorError::Permanent(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("needs an e-mail address (raw or MD5)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn slow_forgetting_is_accepted_then_confirmed() {
        let (fake, connector, hash) = setup().await;
        fake.audience().forget_after_gets = 2;
        let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
        let out = connector.run(&t).await.unwrap();
        let Outcome::Accepted { handle, note } = out else {
            panic!("{out:?}");
        };
        assert_eq!(handle, hash);
        assert!(note.contains("still returns"), "{note}");
        assert_clean(&note);
        // The processor asks again with the handle; the second GET still sees the member.
        t.phase = Phase::Confirm {
            handle: handle.clone(),
        };
        let again = connector.run(&t).await.unwrap();
        assert!(
            matches!(&again, Outcome::Accepted { handle: h, .. } if *h == handle),
            "{again:?}"
        );
        let done = connector.run(&t).await.unwrap();
        assert!(
            matches!(
                done,
                Outcome::Completed {
                    records_affected: 1,
                    ..
                }
            ),
            "{done:?}"
        );
        // Confirming deletes nothing more: one POST in all.
        let posts = fake
            .audience()
            .calls
            .iter()
            .filter(|c| c.starts_with("POST"))
            .count();
        assert_eq!(posts, 1);
    }

    #[tokio::test]
    async fn a_failed_check_after_deleting_keeps_the_handle() {
        let (fake, connector, hash) = setup().await;
        // The delete goes through, the check after it fails.
        fake.audience().unavailable_gets = 1;
        let mut t = task(RequestKind::Erasure, vec![email(MAIJA)]);
        let out = connector.run(&t).await.unwrap();
        let Outcome::Accepted { handle, note } = out else {
            panic!("{out:?}");
        };
        assert_eq!(handle, hash);
        assert!(
            note.contains("checking that it is gone failed") && note.contains("503"),
            "{note}"
        );
        assert!(fake.member(&hash).is_none());
        // The confirmation is a transient error while the API is down, then COMPLETED: not
        // the NOT_FOUND a fresh start would find.
        fake.audience().unavailable_gets = 1;
        t.phase = Phase::Confirm { handle };
        let err = connector.run(&t).await.unwrap_err();
        assert!(matches!(err, ConnectorError::Transient(_)), "{err:?}");
        let done = connector.run(&t).await.unwrap();
        assert!(
            matches!(
                done,
                Outcome::Completed {
                    records_affected: 1,
                    ..
                }
            ),
            "{done:?}"
        );
    }

    #[tokio::test]
    async fn rate_limiting_asks_to_retry_after_the_header() {
        let (fake, connector, hash) = setup().await;
        fake.audience().rate_limited = 1;
        let t = task(RequestKind::Erasure, vec![email(MAIJA)]);
        let err = connector.run(&t).await.unwrap_err();
        let ConnectorError::RetryAfter { message, after_ms } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*after_ms, 1000);
        assert!(
            message.contains("429") && message.contains("Too Many Requests"),
            "{message}"
        );
        assert!(err.is_transient());
        assert!(fake.member(&hash).is_some());
        // The limit passed: the retry goes through.
        let out = connector.run(&t).await.unwrap();
        assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
    }

    #[tokio::test]
    async fn service_unavailable_is_transient() {
        let (fake, connector, hash) = setup().await;
        fake.audience().unavailable = 1;
        let err = connector
            .run(&task(RequestKind::Objection, vec![email(MAIJA)]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectorError::Transient(m) if m.contains("503")),
            "{err:?}"
        );
        assert_eq!(fake.member(&hash).unwrap()["status"], "subscribed");
    }

    #[tokio::test]
    async fn a_refused_api_key_is_permanent_and_not_printed() {
        let (fake, _, hash) = setup().await;
        let wrong = "fedcba9876543210fedcba9876543210-us21";
        let connector = MailchimpConnector::new(MailchimpConfig {
            api_key: wrong.into(),
            ..config(&fake.base_url)
        })
        .unwrap();
        let err = connector
            .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
            .await
            .unwrap_err();
        let ConnectorError::Permanent(message) = &err else {
            panic!("{err:?}");
        };
        assert!(message.contains("the API key was refused"), "{message}");
        assert!(message.contains("401"), "{message}");
        assert!(
            !message.contains(wrong) && !message.contains("fedcba"),
            "{message}"
        );
        assert_clean(message);
        assert!(fake.member(&hash).is_some());
        assert!(!format!("{:?}", connector.config()).contains("fedcba"));
    }

    #[tokio::test]
    async fn objection_unsubscribes_the_member() {
        let (fake, connector, hash) = setup().await;
        let out = connector
            .run(&task(RequestKind::Objection, vec![email(MAIJA)]))
            .await
            .unwrap();
        assert!(
            matches!(
                out,
                Outcome::Completed {
                    records_affected: 1,
                    ..
                }
            ),
            "{out:?}"
        );
        let member = fake.member(&hash).unwrap();
        assert_eq!(member["status"], "unsubscribed");
        // Unsubscribing keeps the member (that is what suppresses future mail).
        assert_eq!(member["merge_fields"]["FNAME"], "Maija");
        let out = connector
            .run(&task(
                RequestKind::Objection,
                vec![email("nobody@example.fi")],
            ))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
    }

    #[tokio::test]
    async fn return_of_data_and_transfer_export_the_member_document() {
        let (fake, connector, hash) = setup().await;
        for kind in [RequestKind::ReturnOfData, RequestKind::Transfer] {
            let out = connector
                .run(&task(kind, vec![email(MAIJA)]))
                .await
                .unwrap();
            let Outcome::Completed {
                records_affected: 1,
                note,
                export: Some(export),
            } = out
            else {
                panic!("{out:?}");
            };
            assert_clean(&note);
            assert_eq!(export["source"], "mailchimp");
            assert_eq!(export["list_id"], LIST);
            let members = export["members"].as_array().unwrap();
            assert_eq!(members.len(), 1);
            let m = &members[0];
            assert_eq!(m["id"], hash.as_str());
            assert_eq!(m["email_address"], MAIJA);
            assert_eq!(m["status"], "subscribed");
            assert_eq!(m["merge_fields"]["LNAME"], "Meikäläinen");
            assert_eq!(m["tags"][0]["name"], "newsletter");
            assert_eq!(m["timestamp_opt"], "2024-03-01T09:30:12+00:00");
            assert_eq!(m["location"]["country_code"], "FI");
            assert!(m.get("_links").is_none());
        }
        // Reading changes nothing.
        assert!(fake.member(&hash).is_some());
        let out = connector
            .run(&task(
                RequestKind::ReturnOfData,
                vec![email("nobody@example.fi")],
            ))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
    }

    fn corrections(pairs: &[(&str, &str)]) -> RequestParameters {
        RequestParameters {
            corrections: pairs
                .iter()
                .map(|(field, value)| FieldCorrection {
                    field: (*field).into(),
                    new_value: (*value).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn rectification_changes_the_email_and_merge_fields() {
        let (fake, connector, old_hash) = setup().await;
        let new_email = "maija.virtanen@example.fi";
        let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
        t.parameters = corrections(&[("email", new_email), ("first_name", "Maija-Liisa")]);
        let out = connector.run(&t).await.unwrap();
        let Outcome::Completed {
            records_affected: 1,
            note,
            ..
        } = out
        else {
            panic!("{out:?}");
        };
        // The id is the hash of the address, so it moves with it.
        let new_hash = subscriber_hash(new_email);
        assert!(
            note.contains(&format!("{old_hash} (now {new_hash})")),
            "{note}"
        );
        assert!(
            note.contains("email_address") && note.contains("FNAME"),
            "{note}"
        );
        assert!(
            !note.contains("Liisa") && !note.contains("virtanen"),
            "{note}"
        );
        assert!(fake.member(&old_hash).is_none());
        let member = fake.member(&new_hash).unwrap();
        assert_eq!(member["email_address"], new_email);
        assert_eq!(member["merge_fields"]["FNAME"], "Maija-Liisa");
        assert_eq!(member["merge_fields"]["LNAME"], "Meikäläinen");
        let patch = format!("PATCH /3.0/lists/{LIST}/members/{old_hash}");
        assert_eq!(fake.audience().calls, [patch]);
    }

    #[tokio::test]
    async fn an_unmapped_correction_is_permanent_and_changes_nothing() {
        let (fake, connector, hash) = setup().await;
        let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
        t.parameters = corrections(&[
            ("first_name", "Maija-Liisa"),
            ("address", "Mannerheimintie 1"),
        ]);
        let err = connector.run(&t).await.unwrap_err();
        let ConnectorError::Permanent(message) = &err else {
            panic!("{err:?}");
        };
        assert!(message.contains("\"address\""), "{message}");
        assert!(message.contains("merge_fields"), "{message}");
        assert!(!message.contains("Mannerheimintie"), "{message}");
        assert!(fake.audience().calls.is_empty());
        assert_eq!(
            fake.member(&hash).unwrap()["merge_fields"]["FNAME"],
            "Maija"
        );
    }

    #[tokio::test]
    async fn mailchimp_errors_are_permanent_with_the_detail_scrubbed() {
        let (fake, connector, _) = setup().await;
        // Moving to an address another member has: Mailchimp echoes the address.
        let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
        t.parameters = corrections(&[("email", "someone.else@example.fi")]);
        let err = connector.run(&t).await.unwrap_err();
        let ConnectorError::Permanent(message) = &err else {
            panic!("{err:?}");
        };
        assert!(message.contains("HTTP 400: Member Exists"), "{message}");
        assert!(message.contains("is already a list member"), "{message}");
        assert!(!message.contains("someone.else"), "{message}");
        assert_clean(message);
        // A validation error names the field.
        t.parameters = corrections(&[("email", "not-an-address")]);
        let err = connector.run(&t).await.unwrap_err();
        assert!(err.to_string().contains("Invalid Resource"), "{err}");
        assert!(
            err.to_string().contains("email_address: Please provide"),
            "{err}"
        );
        assert!(!err.to_string().contains("not-an-address"), "{err}");
        assert_eq!(fake.audience().members.len(), 2);
    }

    #[tokio::test]
    async fn restriction_is_not_supported() {
        let (fake, connector, _) = setup().await;
        assert!(!connector.supports(RequestKind::Restriction));
        assert!(!connector.supports(RequestKind::Unspecified));
        for kind in [
            RequestKind::Erasure,
            RequestKind::ReturnOfData,
            RequestKind::Transfer,
            RequestKind::Rectification,
            RequestKind::Objection,
        ] {
            assert!(connector.supports(kind), "{kind:?}");
        }
        // Called anyway, it refuses without touching the audience.
        let out = connector
            .run(&task(RequestKind::Restriction, vec![email(MAIJA)]))
            .await
            .unwrap();
        assert!(
            matches!(&out, Outcome::Refused { reason } if reason.contains("RESTRICTION")),
            "{out:?}"
        );
        assert!(fake.audience().calls.is_empty());
        assert_eq!(connector.kind_name(), "mailchimp");
    }

    #[tokio::test]
    async fn a_stopped_server_is_transient() {
        let (mut fake, connector, _) = setup().await;
        let t = task(RequestKind::ReturnOfData, vec![email(MAIJA)]);
        assert!(connector.run(&t).await.is_ok());
        fake.stop().await;
        let err = connector.run(&t).await.unwrap_err();
        assert!(matches!(err, ConnectorError::Transient(_)), "{err:?}");
        assert_clean(&err.to_string());
    }

    #[tokio::test]
    async fn a_slow_server_times_out_transiently() {
        let (fake, _, _) = setup().await;
        fake.audience().delay_ms = 2_000;
        let connector = MailchimpConnector::new(MailchimpConfig {
            timeout_ms: 100,
            ..config(&fake.base_url)
        })
        .unwrap();
        let err = connector
            .run(&task(RequestKind::ReturnOfData, vec![email(MAIJA)]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectorError::Transient(m) if m.contains("timed out")),
            "{err:?}"
        );
    }

    #[test]
    fn retry_after_is_seconds_with_a_default_and_a_cap() {
        assert_eq!(retry_after_ms(Some("1")), 1_000);
        assert_eq!(retry_after_ms(Some(" 30 ")), 30_000);
        assert_eq!(retry_after_ms(None), 60_000);
        assert_eq!(
            retry_after_ms(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            60_000
        );
        assert_eq!(retry_after_ms(Some("86400")), 3_600_000);
        assert_eq!(retry_after_ms(Some("18446744073709551615")), 3_600_000);
        let scrub = Scrubber {
            secrets: Vec::new(),
        };
        let err = status_error("x", StatusCode::SERVICE_UNAVAILABLE, Some("5"), b"", &scrub);
        assert_eq!(err.retry_after_ms(), Some(5_000));
        let err = status_error("x", StatusCode::BAD_GATEWAY, None, b"<html>", &scrub);
        assert_eq!(
            err,
            ConnectorError::Transient("mailchimp: x: HTTP 502".into())
        );
    }

    #[test]
    fn scrubbing_removes_secrets_in_any_case_and_addresses() {
        let mut t = task(RequestKind::Rectification, vec![email(MAIJA)]);
        t.parameters = corrections(&[("last_name", "Virtanen")]);
        let scrub = Scrubber::for_task(&t, KEY);
        let out = scrub.apply(&format!(
            "MAIJA.MEIKALAINEN@EXAMPLE.FI and x@y.z, key {KEY}, name virtanen"
        ));
        assert_eq!(
            out,
            "[redacted] and [e-mail] key [redacted], name [redacted]"
        );
    }

    #[test]
    fn configuration_parses_with_defaults_and_validates() {
        let toml = format!(
            "type = \"mailchimp\"\nbase_url = \"https://us21.api.mailchimp.com/3.0\"\n\
             api_key = \"{KEY}\"\nlist_id = \"{LIST}\"\n"
        );
        let parsed: ConnectorConfig = toml::from_str(&toml).unwrap();
        let ConnectorConfig::Mailchimp(c) = &parsed else {
            panic!("{parsed:?}");
        };
        assert_eq!(c.timeout_ms, 10_000);
        assert_eq!(c.merge_fields, default_merge_fields());
        assert_eq!(c.merge_fields["phone"], "PHONE");
        assert!(parsed.validate().is_empty(), "{:?}", parsed.validate());
        // The key never shows in Debug output, of the config or the enum around it.
        assert!(!format!("{parsed:?}").contains("0123456789abcdef"));
        assert!(format!("{parsed:?}").contains("[redacted]"));

        let unknown = toml::from_str::<ConnectorConfig>(&format!("{toml}api_secret = \"x\"\n"));
        assert!(unknown.unwrap_err().to_string().contains("api_secret"));

        let bad = MailchimpConfig {
            base_url: "ftp://example".into(),
            api_key: " ".into(),
            list_id: "a/b".into(),
            timeout_ms: 0,
            merge_fields: [
                ("email".to_string(), "EMAIL".to_string()),
                ("name".into(), "F NAME".into()),
            ]
            .into_iter()
            .collect(),
        };
        let problems = bad.validate().join("\n");
        for expected in [
            "base_url",
            "api_key",
            "list_id",
            "timeout_ms",
            "\"email\" cannot be mapped",
            "merge_fields.name",
        ] {
            assert!(problems.contains(expected), "{expected}: {problems}");
        }
        let creds = MailchimpConfig {
            base_url: "https://user:pw@us21.api.mailchimp.com/3.0".into(),
            ..c.clone()
        };
        assert!(creds.validate().join(" ").contains("credentials"));
        let empty_list = MailchimpConfig {
            list_id: String::new(),
            ..c.clone()
        };
        assert!(MailchimpConnector::new(empty_list).is_err());
    }

    #[tokio::test]
    async fn build_makes_a_mailchimp_connector() {
        let fake = FakeMailchimp::start(KEY, LIST).await;
        let hash = fake.subscribe(MAIJA, "Maija", "Meikäläinen");
        let built = crate::build(&ConnectorConfig::Mailchimp(config(&format!(
            "{}/",
            fake.base_url
        ))))
        .await
        .unwrap();
        assert_eq!(built.kind_name(), "mailchimp");
        let out = built
            .run(&task(RequestKind::Erasure, vec![email(MAIJA)]))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
        assert!(fake.member(&hash).is_none());
    }
}
