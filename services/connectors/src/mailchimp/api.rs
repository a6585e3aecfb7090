//! The calls to the Mailchimp Marketing API v3 the connector makes, and the mapping of their
//! failures to [`ConnectorError`]: transport failures and 5xx are transient, 429 (and 503
//! with Retry-After) say when to come back, a 503 "Compliance Related" (the account is under
//! review) and the rest are permanent with Mailchimp's problem+json detail, scrubbed.
//!
//! The deletes ([`Api::delete_permanent`], [`Api::delete_list`]) answer
//! [`Deletion::Unanswered`] instead of an error when the call may have taken effect: its
//! answer never came (timed out, connection cut after sending), or a 5xx came, which a
//! gateway or a busy backend also sends after the work was done.
//!
//! Mailchimp allows 10 simultaneous connections per account and answers 429 past that, so
//! every audience of one API key in this process shares [`MAX_CONNECTIONS_PER_ACCOUNT`]
//! permits for calls in flight.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::scrub::Scrubber;
use super::MailchimpConfig;
use crate::ConnectorError;

/// How long to wait after a 429 or 503 whose Retry-After is missing or not a number of
/// seconds: Mailchimp's limits are per minute-ish, so a minute is a safe guess.
const DEFAULT_RETRY_AFTER_MS: u64 = 60_000;
/// The longest Retry-After honoured, so that a misbehaving proxy cannot park a task for days;
/// the processor waits the longer of it and its own backoff.
const MAX_RETRY_AFTER_MS: u64 = 3_600_000;
/// Calls in flight at once per Mailchimp account: the API's documented limit.
pub(super) const MAX_CONNECTIONS_PER_ACCOUNT: usize = 10;
/// The longest error detail kept from a response, so that an HTML error page from a proxy
/// does not end up whole in a task's reason.
const MAX_DETAIL_CHARS: usize = 300;

/// What a call answered, for the statuses the callers tell apart.
pub(super) enum Reply {
    /// 2xx; the JSON body, or `Null` for 204.
    Done(Value),
    /// 404: the member (or the audience) does not exist.
    Missing,
}

/// What a `delete-permanent` call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Deletion {
    /// 2xx: the member (or the audience) is deleted.
    Deleted,
    /// 404: no such member or audience (now).
    Missing,
    /// The call went out but its answer never came back (timed out, or the connection was
    /// cut after sending), or came as a 5xx: Mailchimp may have deleted the member (or the
    /// audience). Only reading it tells, and a second delete would answer 404 if the first
    /// one took effect. Why, for notes.
    Unanswered(String),
}

/// What an add-or-update (`PUT`) of a member came to.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Upsert {
    /// 2xx: the member as it now is, added or updated.
    Done(Value),
    /// 404: the audience does not exist (an upsert never misses its member).
    Missing,
    /// 400 "Forgotten Email Not Subscribed": the address was permanently deleted from the
    /// audience, and Mailchimp refuses to add it again through the API or an import; only the
    /// subject's own sign-up brings it back.
    Forgotten,
}

/// The lists under a member that an access request covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MemberList {
    /// `/notes`: notes the audience's staff wrote about the member.
    Notes,
    /// `/activity-feed`: what the member did and what was done to it (opens, clicks,
    /// sign-ups, changes).
    Activity,
    /// `/events`: custom events recorded for the member.
    Events,
}

impl MemberList {
    /// Every list, in export order.
    pub(super) const ALL: [Self; 3] = [Self::Notes, Self::Activity, Self::Events];

    /// The path under the member.
    fn path(self) -> &'static str {
        match self {
            Self::Notes => "notes",
            Self::Activity => "activity-feed",
            Self::Events => "events",
        }
    }

    /// The key of the item array in a page.
    pub(super) fn key(self) -> &'static str {
        match self {
            Self::Notes => "notes",
            Self::Activity => "activity",
            Self::Events => "events",
        }
    }

    /// The file name's stem.
    pub(super) fn file(self) -> &'static str {
        match self {
            Self::Notes => "notes",
            Self::Activity => "activity",
            Self::Events => "events",
        }
    }
}

/// The API key, kept out of `Debug` output: configurations and connectors get logged.
#[derive(Clone)]
struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// One audience's API: the endpoints the connector uses, under one HTTP client.
#[derive(Debug, Clone)]
pub(super) struct Api {
    /// `base_url` without a trailing slash.
    base: String,
    list_id: String,
    api_key: ApiKey,
    client: reqwest::Client,
    /// Permits for calls in flight, shared with every audience of the same account.
    account: Arc<tokio::sync::Semaphore>,
}

/// The permits of the account `api_key` belongs to. Keyed by a digest so that no key stays
/// in memory longer than its connector needs it.
fn account_permits(api_key: &str) -> Arc<tokio::sync::Semaphore> {
    static ACCOUNTS: LazyLock<Mutex<HashMap<[u8; 32], Arc<tokio::sync::Semaphore>>>> =
        LazyLock::new(Default::default);
    use sha2::Digest;
    let account: [u8; 32] = sha2::Sha256::digest(api_key.as_bytes()).into();
    ACCOUNTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(account)
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS_PER_ACCOUNT)))
        .clone()
}

impl Api {
    /// The client for audience `list_id` of `config`'s account; makes no call yet.
    pub(super) fn new(config: &MailchimpConfig, list_id: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .user_agent(concat!("dsrelay-connectors/", env!("CARGO_PKG_VERSION")))
            // The API never redirects; following one would resend the key to wherever a
            // proxy or attacker pointed us.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            base: config.base_url.trim_end_matches('/').to_string(),
            list_id: list_id.to_string(),
            api_key: ApiKey(config.api_key.clone()),
            account: account_permits(&config.api_key),
            client,
        })
    }

    /// The API root, for messages that tell an operator where the audience was looked for.
    pub(super) fn base(&self) -> &str {
        &self.base
    }

    /// The audience this client calls.
    pub(super) fn list_id(&self) -> &str {
        &self.list_id
    }

    fn list_url(&self) -> String {
        format!("{}/lists/{}", self.base, self.list_id)
    }

    fn member_url(&self, hash: &str) -> String {
        format!("{}/members/{hash}", self.list_url())
    }

    /// `GET /lists/{list}?fields=id`: whether the audience exists.
    pub(super) async fn get_list(&self, scrub: &Scrubber) -> Result<Reply, ConnectorError> {
        let url = format!("{}?fields=id", self.list_url());
        self.call(Method::GET, &url, None, "looking up the audience", scrub)
            .await
    }

    /// `GET /lists/{list}/members?count=1&fields=total_items`: `total_items`, the number of
    /// the audience's members of every status. The audience's `stats` are no substitute:
    /// they leave out pending and transactional members.
    pub(super) async fn member_total(&self, scrub: &Scrubber) -> Result<Reply, ConnectorError> {
        // One member at most, and `fields` drops even that: only the count comes back.
        let url = format!("{}/members?count=1&fields=total_items", self.list_url());
        self.call(
            Method::GET,
            &url,
            None,
            "counting the audience's members",
            scrub,
        )
        .await
    }

    /// `GET /lists/{list}/members?since_last_changed=&count=1&fields=total_items`:
    /// `total_items`, the number of the audience's members of every status whose information
    /// changed after `since` (whole seconds; an added member's changed when it was added).
    pub(super) async fn member_total_since(
        &self,
        since: DateTime<Utc>,
        scrub: &Scrubber,
    ) -> Result<Reply, ConnectorError> {
        // Mailchimp's ISO 8601 form (`2015-10-21T15:41:36+00:00`), its `+` escaped: a bare
        // one reads as a space in a query, which the API refuses.
        let since = since.format("%Y-%m-%dT%H:%M:%S%%2B00:00");
        let url = format!(
            "{}/members?since_last_changed={since}&count=1&fields=total_items",
            self.list_url()
        );
        let what = "counting the audience's members changed since the contract end's export";
        self.call(Method::GET, &url, None, what, scrub).await
    }

    /// `GET /lists/{list}/members?count=&offset=`: one page of the audience's members, every
    /// status, with `total_items` (no `fields`, so every field of the listing comes back).
    pub(super) async fn members_page(
        &self,
        count: u32,
        offset: u64,
        scrub: &Scrubber,
    ) -> Result<Reply, ConnectorError> {
        let url = format!("{}/members?count={count}&offset={offset}", self.list_url());
        let what = format!("reading the audience's members from {offset}");
        self.call(Method::GET, &url, None, &what, scrub).await
    }

    /// `DELETE /lists/{list}`: the audience with all its members, for good. A call whose
    /// answer was lost is [`Deletion::Unanswered`]: deleting a large audience can outlast the
    /// call's timeout, and a retry's 404 must not read as a wrong `list_id`.
    pub(super) async fn delete_list(&self, scrub: &Scrubber) -> Result<Deletion, ConnectorError> {
        let url = self.list_url();
        deletion(
            self.send(Method::DELETE, &url, None, "deleting the audience", scrub)
                .await,
        )
    }

    /// `GET /lists/{list}/members/{hash}`: the member document.
    pub(super) async fn get_member(
        &self,
        hash: &str,
        scrub: &Scrubber,
    ) -> Result<Reply, ConnectorError> {
        let what = format!("reading member {hash}");
        self.call(Method::GET, &self.member_url(hash), None, &what, scrub)
            .await
    }

    /// `GET /lists/{list}/members/{hash}/{notes|activity-feed|events}?count=&offset=`: one
    /// page of a member's list.
    pub(super) async fn list_page(
        &self,
        hash: &str,
        list: MemberList,
        count: u32,
        offset: u64,
        scrub: &Scrubber,
    ) -> Result<Reply, ConnectorError> {
        let url = format!(
            "{}/{}?count={count}&offset={offset}",
            self.member_url(hash),
            list.path()
        );
        let what = format!("reading the {} of member {hash}", list.file());
        self.call(Method::GET, &url, None, &what, scrub).await
    }

    /// `GET /lists/{list}/members/{hash}?fields=id,status`: whether the member is still there.
    pub(super) async fn check_member(
        &self,
        hash: &str,
        scrub: &Scrubber,
    ) -> Result<Reply, ConnectorError> {
        let url = format!("{}?fields=id,status", self.member_url(hash));
        let what = format!("checking that member {hash} is gone");
        self.call(Method::GET, &url, None, &what, scrub).await
    }

    /// `POST /lists/{list}/members/{hash}/actions/delete-permanent`. A call whose answer was
    /// lost is [`Deletion::Unanswered`], not an error: the caller must not take a retry's 404
    /// for a member that was never there.
    pub(super) async fn delete_permanent(
        &self,
        hash: &str,
        scrub: &Scrubber,
    ) -> Result<Deletion, ConnectorError> {
        let url = format!("{}/actions/delete-permanent", self.member_url(hash));
        let what = format!("deleting member {hash}");
        deletion(self.send(Method::POST, &url, None, &what, scrub).await)
    }

    /// `PATCH /lists/{list}/members/{hash}` with `body`: the changed member document.
    pub(super) async fn patch_member(
        &self,
        hash: &str,
        body: &Value,
        scrub: &Scrubber,
    ) -> Result<Reply, ConnectorError> {
        let what = format!("updating member {hash}");
        self.call(
            Method::PATCH,
            &self.member_url(hash),
            Some(body),
            &what,
            scrub,
        )
        .await
    }

    /// `PUT /lists/{list}/members/{hash}` with `body`: adds the member, or updates it when the
    /// audience has it (Mailchimp's add-or-update).
    pub(super) async fn put_member(
        &self,
        hash: &str,
        body: &Value,
        scrub: &Scrubber,
    ) -> Result<Upsert, ConnectorError> {
        let what = format!("adding or updating member {hash}");
        let url = self.member_url(hash);
        match self.send(Method::PUT, &url, Some(body), &what, scrub).await {
            Ok(Reply::Done(member)) => Ok(Upsert::Done(member)),
            Ok(Reply::Missing) => Ok(Upsert::Missing),
            Err(Failure::Forgotten(_)) => Ok(Upsert::Forgotten),
            Err(Failure::Unanswered(e) | Failure::ServerError(e) | Failure::Refused(e)) => Err(e),
        }
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
        self.send(method, url, body, what, scrub)
            .await
            .map_err(|f| match f {
                Failure::Unanswered(e)
                | Failure::ServerError(e)
                | Failure::Refused(e)
                | Failure::Forgotten(e) => e,
            })
    }

    /// [`Api::call`], telling a call that may have taken effect without its answer coming
    /// back from one that did not.
    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        what: &str,
        scrub: &Scrubber,
    ) -> Result<Reply, Failure> {
        // Held until the body is read: the connection is busy until then. The semaphore is
        // never closed, so acquiring only waits.
        let _permit = self.account.acquire().await.map_err(|_| {
            Failure::Refused(ConnectorError::Transient(format!(
                "mailchimp: {what}: the connector is stopping"
            )))
        })?;
        let mut request = self
            .client
            .request(method.clone(), url)
            .basic_auth("dsrelay", Some(&self.api_key.0));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            // Not connected: the call never reached Mailchimp. Otherwise it may have.
            if e.is_connect() || e.is_builder() {
                Failure::Refused(transport_error(what, e))
            } else {
                Failure::Unanswered(transport_error(what, e))
            }
        })?;
        let status = response.status();
        // Not `what`: it names the member by its subscriber hash, an unkeyed MD5 of the
        // address that anyone can test a guessed address against.
        tracing::debug!(status = status.as_u16(), %method, "mailchimp call");
        if status == StatusCode::NOT_FOUND {
            return Ok(Reply::Missing);
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let bytes = response.bytes().await.map_err(|e| {
            // The status came: a success is the answer even if its body was cut short.
            if status.is_success() {
                Failure::Unanswered(transport_error(what, e))
            } else if status.is_server_error() {
                Failure::ServerError(transport_error(what, e))
            } else {
                Failure::Refused(transport_error(what, e))
            }
        })?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Reply::Done(Value::Null));
            }
            return serde_json::from_slice(&bytes)
                .map(Reply::Done)
                .map_err(|e| {
                    Failure::Refused(ConnectorError::Permanent(format!(
                        "mailchimp: {what}: HTTP {status} with a body that is not JSON ({e})"
                    )))
                });
        }
        let error = status_error(what, status, retry_after.as_deref(), &bytes, scrub);
        if status == StatusCode::BAD_REQUEST
            && problem_title_is(&bytes, "forgottenemailnotsubscribed")
        {
            return Err(Failure::Forgotten(error));
        }
        // A compliance review refuses every call up front; other 5xx say nothing of whether
        // the work was done.
        if status.is_server_error() && !matches!(error, ConnectorError::Permanent(_)) {
            return Err(Failure::ServerError(error));
        }
        Err(Failure::Refused(error))
    }
}

/// What a delete's [`Api::send`] came to.
fn deletion(sent: Result<Reply, Failure>) -> Result<Deletion, ConnectorError> {
    match sent {
        Ok(Reply::Done(_)) => Ok(Deletion::Deleted),
        Ok(Reply::Missing) => Ok(Deletion::Missing),
        Err(Failure::Unanswered(e) | Failure::ServerError(e)) => {
            Ok(Deletion::Unanswered(e.to_string()))
        }
        Err(Failure::Refused(e) | Failure::Forgotten(e)) => Err(e),
    }
}

/// Why a call has no [`Reply`].
enum Failure {
    /// Mailchimp answered with an error status other than [`Failure::ServerError`], or the
    /// call never reached it.
    Refused(ConnectorError),
    /// A 5xx that is not a permanent refusal: the call may have taken effect all the same.
    ServerError(ConnectorError),
    /// The call went out and no answer came back: it may have taken effect.
    Unanswered(ConnectorError),
    /// 400 "Forgotten Email Not Subscribed" ([`Upsert::Forgotten`]); an error to callers
    /// that do not add members.
    Forgotten(ConnectorError),
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
    if status.as_u16() == 503 && is_compliance_review(body) {
        // No wait brings the account back: Mailchimp's support must clear the review.
        return ConnectorError::Permanent(format!(
            "{message}; the Mailchimp account is under a compliance review and refuses every \
             call until Mailchimp's support clears it"
        ));
    }
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

/// Whether a problem+json body is Mailchimp's "ComplianceRelated" error (title "Compliance
/// Related").
fn is_compliance_review(body: &[u8]) -> bool {
    problem_title_is(body, "compliancerelated")
}

/// Whether a problem+json body's title is `squeezed` when compared without case, spaces or
/// punctuation: Mailchimp's error glossary and its answers spell titles differently.
fn problem_title_is(body: &[u8], squeezed: &str) -> bool {
    let Ok(problem) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let title = problem
        .get("title")
        .and_then(Value::as_str)
        .unwrap_or_default();
    title
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .eq(squeezed.chars())
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let scrub = Scrubber::nothing();
        let err = status_error("x", StatusCode::SERVICE_UNAVAILABLE, Some("5"), b"", &scrub);
        assert_eq!(err.retry_after_ms(), Some(5_000));
        let err = status_error("x", StatusCode::BAD_GATEWAY, None, b"<html>", &scrub);
        assert_eq!(
            err,
            ConnectorError::Transient("mailchimp: x: HTTP 502".into())
        );
    }
}
