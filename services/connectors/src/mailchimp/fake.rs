//! A local stand-in for the Mailchimp Marketing API v3: the paths, methods, status codes,
//! problem+json errors, audience and member documents, the audience's paged members and the
//! member's paged notes, activity feed and events (`count`/`offset`, `total_items`), the
//! members changed after a time (`since_last_changed`, by each member's `last_changed`: when
//! it was added or last changed through the API; members arranged by the test helpers keep
//! an old fixed date), partial responses of the audience and its members (`fields`), a
//! member's update (`PATCH`) and add-or-update (`PUT`, which refuses an address deleted
//! permanently, as Mailchimp does),
//! and the deletion of a whole audience, of the subset the connector uses, over in-memory
//! audiences of one account (a primary one and any number more), with knobs for the failures
//! the connector must survive (rate limits, outages, slow answers, answers lost or turned into
//! a 5xx after the call took effect, members that linger after deletion), now or after a few
//! calls, and a members listing call held while the test acts between pages.
//!
//! Compiled for this crate's tests, and for other crates' with the `fake-mailchimp` feature:
//! start it with [`FakeMailchimp::start`] and point a
//! [`MailchimpConfig`](super::MailchimpConfig) at [`FakeMailchimp::base_url`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dsrelay_proto::v1::{IdentityEncoding, IdentityType};
use dsrelay_runtime::identity::{digest, normalize};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const ERROR_DOCS: &str = "https://mailchimp.com/developer/marketing/docs/errors/";

/// The audience and the failure knobs.
#[derive(Default)]
pub struct Audience {
    /// The key the basic-auth password must be; any other answers 401.
    pub api_key: String,
    /// The primary audience's id; other ids answer 404 unless in `other_audiences`.
    pub list_id: String,
    /// The primary audience's members by subscriber hash.
    pub members: BTreeMap<String, Value>,
    /// Whether the primary audience was deleted (`DELETE /lists/{list_id}`); it then answers
    /// 404 like any unknown audience.
    pub list_deleted: bool,
    /// Further audiences of the same account: members by subscriber hash, by audience id.
    pub other_audiences: BTreeMap<String, BTreeMap<String, Value>>,
    /// Notes, activity-feed items and events by audience and subscriber hash, oldest first.
    lists: BTreeMap<(String, String, &'static str), Vec<Value>>,
    /// Deleted members the API keeps returning, by audience and subscriber hash: (document,
    /// GETs left).
    ghosts: BTreeMap<(String, String), (Value, u32)>,
    /// Members deleted permanently, by audience and subscriber hash: Mailchimp adds them
    /// again only when the subject signs up again ([`FakeMailchimp::subscribe_to`]).
    forgotten: std::collections::BTreeSet<(String, String)>,
    /// How many GETs a member deleted from now on keeps being returned for.
    pub forget_after_gets: u32,
    /// How many GETs of the audience document an audience deleted from now on keeps being
    /// returned for (with no members), as a deletion that takes a while to show.
    pub list_forget_after_gets: u32,
    /// Deleted audiences the API keeps returning: GETs left, by audience id.
    list_ghosts: BTreeMap<String, u32>,
    /// The next this many calls answer 429 with Retry-After: 1.
    pub rate_limited: u32,
    /// The next this many calls answer 503.
    pub unavailable: u32,
    /// The next this many GET calls answer 503 (other methods pass).
    pub unavailable_gets: u32,
    /// Every call answers 503 "Compliance Related", as for an account under review.
    pub compliance_review: bool,
    /// Every call wait this long before answering (ms).
    pub delay_ms: u64,
    /// The next this many calls take effect at once but are answered only after
    /// `late_answer_ms`: with a client timeout shorter than that, the call happened and its
    /// answer is lost.
    pub late_answers: u32,
    /// How late a late answer comes (ms).
    pub late_answer_ms: u64,
    /// The next this many calls take effect, then answer `gateway_error` instead, as a
    /// gateway that gave up waiting on a backend that finished the work.
    pub gateway_errors: u32,
    /// The status of those answers (500, 502, 504, ...).
    pub gateway_error: u16,
    /// The next this many calls pass by the knobs above (rate limits, compliance review,
    /// outages, late answers, gateway errors), which then apply to the calls after them: a
    /// failure in mid-task.
    pub healthy_calls: u32,
    /// Calls being answered right now.
    pub in_flight: u32,
    /// The most calls there ever were in flight at once.
    pub max_in_flight: u32,
    /// `METHOD /path` of every call, in order.
    pub calls: Vec<String>,
    next_web_id: u64,
    /// Calls of the members listing so far (counts and pages alike, any audience).
    members_listings: usize,
    /// The members listing call to hold ([`FakeMailchimp::hold_members_listing`]).
    listing_hold: Option<ListingHold>,
}

/// A members listing call held until the test lets it be answered.
struct ListingHold {
    /// Which call of the members listing ([`Audience::members_listings`] before it).
    call: usize,
    /// Told when that call has arrived.
    arrived: oneshot::Sender<()>,
    /// Answered (or dropped) when the call may be answered.
    release: oneshot::Receiver<()>,
}

/// A running fake API; [`FakeMailchimp::stop`] closes it, dropping it leaves it running until
/// the runtime ends.
pub struct FakeMailchimp {
    /// Like `https://us21.api.mailchimp.com/3.0`.
    pub base_url: String,
    audience: Arc<Mutex<Audience>>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// Mailchimp's id of the member with address `email`: the MD5 of the lowercased address.
pub fn subscriber_hash(email: &str) -> String {
    digest(
        IdentityEncoding::Md5,
        &normalize(IdentityType::Email, email),
    )
    .expect("md5 is a digest encoding")
}

impl FakeMailchimp {
    /// Serves an empty audience `list_id` on an ephemeral port of 127.0.0.1, accepting
    /// `api_key`.
    pub async fn start(api_key: &str, list_id: &str) -> std::io::Result<Self> {
        let audience = Arc::new(Mutex::new(Audience {
            api_key: api_key.into(),
            list_id: list_id.into(),
            next_web_id: 500_001,
            ..Default::default()
        }));
        let app = Router::new()
            .route("/3.0/lists/{list_id}", get(get_list).delete(delete_list))
            .route("/3.0/lists/{list_id}/members", get(list_members))
            .route(
                "/3.0/lists/{list_id}/members/{hash}",
                get(get_member).patch(patch_member).put(put_member),
            )
            .route(
                "/3.0/lists/{list_id}/members/{hash}/actions/delete-permanent",
                post(delete_permanent),
            )
            .route(
                "/3.0/lists/{list_id}/members/{hash}/notes",
                get(|s, p, q| member_list(s, p, q, NOTES)),
            )
            .route(
                "/3.0/lists/{list_id}/members/{hash}/activity-feed",
                get(|s, p, q| member_list(s, p, q, ACTIVITY)),
            )
            .route(
                "/3.0/lists/{list_id}/members/{hash}/events",
                get(|s, p, q| member_list(s, p, q, EVENTS)),
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Ok(Self {
            base_url: format!("http://{addr}/3.0"),
            audience,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// The audience, to arrange members and failures and to read the calls made.
    pub fn audience(&self) -> MutexGuard<'_, Audience> {
        self.audience.lock().unwrap()
    }

    /// Subscribes `email` with a first and last name to the primary audience; returns its
    /// subscriber hash.
    pub fn subscribe(&self, email: &str, first: &str, last: &str) -> String {
        let list_id = self.audience().list_id.clone();
        self.subscribe_to(&list_id, email, first, last)
    }

    /// Subscribes `email` to audience `list_id`, which is created (as one of
    /// `other_audiences`) when the account has no such audience; returns its subscriber hash.
    pub fn subscribe_to(&self, list_id: &str, email: &str, first: &str, last: &str) -> String {
        let mut a = self.audience();
        let hash = subscriber_hash(email);
        let web_id = a.next_web_id;
        a.next_web_id += 1;
        let doc = member_document(list_id, &hash, email, first, last, web_id);
        a.forgotten.remove(&(list_id.to_string(), hash.clone()));
        if a.members_of(list_id).is_none() {
            a.other_audiences
                .insert(list_id.to_string(), BTreeMap::new());
        }
        if let Some(members) = a.members_of_mut(list_id) {
            members.insert(hash.clone(), doc);
        }
        hash
    }

    /// Sets the `status` (`unsubscribed`, `cleaned`, ...) of member `hash` of audience
    /// `list_id`, if there is one.
    pub fn set_status(&self, list_id: &str, hash: &str, status: &str) {
        let mut a = self.audience();
        if let Some(member) = a.members_of_mut(list_id).and_then(|m| m.get_mut(hash)) {
            member["status"] = json!(status);
        }
    }

    /// The subscriber hashes of audience `list_id`'s members; `None` when the account has
    /// no such audience (never had, or deleted).
    pub fn members_of(&self, list_id: &str) -> Option<Vec<String>> {
        self.audience()
            .members_of(list_id)
            .map(|m| m.keys().cloned().collect())
    }

    /// Adds a note about member `hash`, as the audience's staff would write it.
    pub fn add_note(&self, hash: &str, text: &str) {
        let mut a = self.audience();
        let id = a.list_len(hash, NOTES) + 1;
        let list_id = a.list_id.clone();
        a.push(
            &list_id,
            hash,
            NOTES,
            json!({
                "id": id,
                "created_at": "2024-04-02T10:00:00+00:00",
                "created_by": "Asiakaspalvelu",
                "updated_at": "2024-04-02T10:00:00+00:00",
                "note": text,
                "list_id": list_id,
                "email_id": hash,
                "contact_id": format!("{}{}", &hash[16..], &hash[..16]),
                "_links": [{ "rel": "self", "method": "GET",
                    "href": format!("https://us21.api.mailchimp.com/3.0/lists/{list_id}/members/{hash}/notes/{id}") }],
            }),
        );
    }

    /// Adds an activity-feed item (`open`, `click`, `signup`, ...) to member `hash`.
    pub fn add_activity(&self, hash: &str, activity_type: &str) {
        let mut a = self.audience();
        let n = a.list_len(hash, ACTIVITY);
        let list_id = a.list_id.clone();
        a.push(
            &list_id,
            hash,
            ACTIVITY,
            json!({
                "activity_type": activity_type,
                "created_at_timestamp": format!("2024-05-{:02}T08:00:00+00:00", 1 + n % 28),
                "campaign_id": "f1e2d3c4b5",
                "campaign_title": "Kevätkampanja",
                "url": if activity_type == "click" { "https://example.fi/tarjous" } else { "" },
            }),
        );
    }

    /// Adds a custom event `name` to member `hash`.
    pub fn add_event(&self, hash: &str, name: &str) {
        let mut a = self.audience();
        let list_id = a.list_id.clone();
        a.push(
            &list_id,
            hash,
            EVENTS,
            json!({
                "name": name,
                "occurred_at": "2024-06-01T12:00:00+00:00",
                "properties": { "channel": "web" },
            }),
        );
    }

    /// Holds the members listing call (`GET /lists/{list}/members`, counts and pages alike)
    /// that comes after the next `after` ones, to act between the pages of a paged read: the
    /// first receiver is told when that call has arrived; the call is answered once the
    /// sender is used or dropped, from the audiences as they are then.
    pub fn hold_members_listing(
        &self,
        after: usize,
    ) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (arrived, has_arrived) = oneshot::channel();
        let (release, released) = oneshot::channel();
        let mut a = self.audience();
        a.listing_hold = Some(ListingHold {
            call: a.members_listings + after,
            arrived,
            release: released,
        });
        (has_arrived, release)
    }

    /// The member document under `hash`, if the audience has it.
    pub fn member(&self, hash: &str) -> Option<Value> {
        self.audience().members.get(hash).cloned()
    }

    /// Stops listening and waits until the port is closed.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap();
        }
    }
}

/// The keys of the item arrays of a member's notes, activity feed and events pages.
const NOTES: &str = "notes";
const ACTIVITY: &str = "activity";
const EVENTS: &str = "events";

impl Audience {
    /// The number of items of a primary-audience member's list.
    fn list_len(&self, hash: &str, list: &'static str) -> usize {
        self.lists
            .get(&(self.list_id.clone(), hash.to_string(), list))
            .map_or(0, Vec::len)
    }

    fn push(&mut self, list_id: &str, hash: &str, list: &'static str, item: Value) {
        self.lists
            .entry((list_id.to_string(), hash.to_string(), list))
            .or_default()
            .push(item);
    }

    /// The members of audience `list_id`, if the account has it.
    fn members_of(&self, list_id: &str) -> Option<&BTreeMap<String, Value>> {
        if list_id == self.list_id {
            return (!self.list_deleted).then_some(&self.members);
        }
        self.other_audiences.get(list_id)
    }

    fn members_of_mut(&mut self, list_id: &str) -> Option<&mut BTreeMap<String, Value>> {
        if list_id == self.list_id {
            return (!self.list_deleted).then_some(&mut self.members);
        }
        self.other_audiences.get_mut(list_id)
    }
}

/// `count` and `offset` of a list call; Mailchimp's defaults are 10 and 0.
#[derive(serde::Deserialize)]
struct Paging {
    count: Option<usize>,
    offset: Option<usize>,
}

/// One page of a member's notes, activity feed or events, shaped like Mailchimp's (the
/// items under `list`, `total_items`, the ids and links).
async fn member_list(
    State(audience): State<Arc<Mutex<Audience>>>,
    Path((list_id, hash)): Path<(String, String)>,
    Query(paging): Query<Paging>,
    list: &'static str,
) -> Response {
    let a = audience.lock().unwrap();
    let Some(members) = a.members_of(&list_id) else {
        return member_not_found();
    };
    if !members.contains_key(&hash) {
        return member_not_found();
    }
    let count = paging.count.unwrap_or(10);
    if count > 1000 {
        return invalid_resource("count", "Must be less than or equal to 1000");
    }
    let items = a
        .lists
        .get(&(list_id.clone(), hash.clone(), list))
        .cloned()
        .unwrap_or_default();
    let page: Vec<Value> = items
        .iter()
        .skip(paging.offset.unwrap_or(0))
        .take(count)
        .cloned()
        .collect();
    let mut body = json!({
        list: page,
        "total_items": items.len(),
        "_links": [{ "rel": "self", "method": "GET",
            "href": format!("https://us21.api.mailchimp.com/3.0/lists/{list_id}/members/{hash}") }],
    });
    if list != EVENTS {
        body["list_id"] = json!(list_id);
        body["email_id"] = json!(hash);
    }
    axum::Json(body).into_response()
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
    let self_href = format!("https://us21.api.mailchimp.com/3.0/lists/{list_id}/members/{hash}");
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
    let (delay_ms, late_ms, gateway_error, early) = {
        let mut a = audience.lock().unwrap();
        a.calls
            .push(format!("{} {}", request.method(), request.uri().path()));
        let healthy = a.healthy_calls > 0;
        a.healthy_calls = a.healthy_calls.saturating_sub(1);
        let early = if healthy {
            authorize(request.headers(), &a.api_key)
        } else if a.rate_limited > 0 {
            a.rate_limited -= 1;
            let mut r = problem(
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests",
                "You have exceeded the limit of 10 simultaneous connections.",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Some(r)
        } else if a.compliance_review {
            Some(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Compliance Related",
                "This account is currently undergoing a compliance review. Please contact \
                 support.",
            ))
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
        a.in_flight += 1;
        a.max_in_flight = a.max_in_flight.max(a.in_flight);
        let late_ms = if a.late_answers > 0 && early.is_none() && !healthy {
            a.late_answers -= 1;
            a.late_answer_ms
        } else {
            0
        };
        let gateway_error = if a.gateway_errors > 0 && early.is_none() && !healthy {
            a.gateway_errors -= 1;
            StatusCode::from_u16(a.gateway_error).ok()
        } else {
            None
        };
        (a.delay_ms, late_ms, gateway_error, early)
    };
    if delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
    }
    let mut response = match early {
        Some(response) => response,
        None => next.run(request).await,
    };
    if let Some(status) = gateway_error {
        let title = status.canonical_reason().unwrap_or("Server Error");
        response = problem(
            status,
            title,
            "An unexpected error occurred while processing the request.",
        );
    }
    if late_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(late_ms)).await;
    }
    audience.lock().unwrap().in_flight -= 1;
    response
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
        .and_then(|b| BASE64.decode(b.trim()).ok())
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

fn wrong_list(a: &Audience, list_id: &str) -> Option<Response> {
    a.members_of(list_id).is_none().then(member_not_found)
}

/// `fields` of a call: a comma-separated list of dotted paths to keep (Mailchimp's partial
/// responses).
#[derive(serde::Deserialize)]
struct Fields {
    fields: Option<String>,
}

/// `doc` with only the dotted paths in `fields` (all of it without).
fn only_fields(doc: Value, fields: Option<&str>) -> Value {
    let Some(fields) = fields else {
        return doc;
    };
    let mut out = json!({});
    for path in fields.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let keys: Vec<&str> = path.split('.').collect();
        let mut from = &doc;
        let mut found = true;
        for key in &keys {
            match from.get(key) {
                Some(v) => from = v,
                None => found = false,
            }
        }
        if !found {
            continue;
        }
        let mut to = &mut out;
        for key in &keys[..keys.len() - 1] {
            if !to.get(key).is_some_and(Value::is_object) {
                to[key] = json!({});
            }
            to = &mut to[key];
        }
        to[keys[keys.len() - 1]] = from.clone();
    }
    out
}

/// The audience document (a subset of Mailchimp's fields), honouring `fields`.
async fn get_list(
    State(audience): State<Arc<Mutex<Audience>>>,
    Path(list_id): Path<String>,
    Query(fields): Query<Fields>,
) -> Response {
    let mut a = audience.lock().unwrap();
    let empty = BTreeMap::new();
    let lingering = a.members_of(&list_id).is_none()
        && a.list_ghosts.get_mut(&list_id).is_some_and(|left| {
            let linger = *left > 0;
            *left = left.saturating_sub(1);
            linger
        });
    let members = match a.members_of(&list_id) {
        Some(members) => members,
        None if lingering => &empty,
        None => return member_not_found(),
    };
    let count = |status: &str| {
        members
            .values()
            .filter(|m| m["status"].as_str() == Some(status))
            .count()
    };
    let doc = json!({
        "id": list_id,
        "web_id": 123456,
        "name": "Newsletter",
        "permission_reminder": "You signed up for our newsletter.",
        "email_type_option": false,
        "visibility": "prv",
        "double_optin": false,
        "date_created": "2023-01-10T08:00:00+00:00",
        "list_rating": 3,
        "stats": {
            "member_count": count("subscribed"),
            "total_contacts": members.len(),
            "unsubscribe_count": count("unsubscribed"),
            "cleaned_count": count("cleaned"),
            "member_count_since_send": 0,
            "unsubscribe_count_since_send": 0,
            "cleaned_count_since_send": 0,
            "campaign_count": 4,
            "merge_field_count": 5,
        },
        "_links": [{ "rel": "self", "method": "GET",
            "href": format!("https://us21.api.mailchimp.com/3.0/lists/{list_id}") }],
    });
    axum::Json(only_fields(doc, fields.fields.as_deref())).into_response()
}

/// `DELETE /lists/{list_id}`: the audience and everything in it, for good; 204.
async fn delete_list(
    State(audience): State<Arc<Mutex<Audience>>>,
    Path(list_id): Path<String>,
) -> Response {
    let mut a = audience.lock().unwrap();
    if a.members_of(&list_id).is_none() {
        return member_not_found();
    }
    if list_id == a.list_id {
        a.members.clear();
        a.list_deleted = true;
    } else {
        a.other_audiences.remove(&list_id);
    }
    a.lists.retain(|(l, _, _), _| *l != list_id);
    a.ghosts.retain(|(l, _), _| *l != list_id);
    let lag = a.list_forget_after_gets;
    if lag > 0 {
        a.list_ghosts.insert(list_id, lag);
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `since_last_changed` of a members listing: ISO 8601.
#[derive(serde::Deserialize)]
struct Since {
    since_last_changed: Option<String>,
}

/// `GET /lists/{list_id}/members`: one page of the audience's members, every status, in a
/// stable order, with `total_items` counting every status too, honouring `fields`. With
/// `since_last_changed`, only the members whose `last_changed` is after it, paged and counted
/// alike; a value that is not an ISO 8601 time answers 400. A call the test holds
/// ([`FakeMailchimp::hold_members_listing`]) waits first.
async fn list_members(
    State(audience): State<Arc<Mutex<Audience>>>,
    Path(list_id): Path<String>,
    Query(paging): Query<Paging>,
    Query(fields): Query<Fields>,
    Query(since): Query<Since>,
) -> Response {
    let hold = {
        let mut a = audience.lock().unwrap();
        let call = a.members_listings;
        a.members_listings += 1;
        match &a.listing_hold {
            Some(hold) if hold.call == call => a.listing_hold.take(),
            _ => None,
        }
    };
    if let Some(hold) = hold {
        let _ = hold.arrived.send(());
        let _ = hold.release.await;
    }
    let a = audience.lock().unwrap();
    let Some(members) = a.members_of(&list_id) else {
        return member_not_found();
    };
    let count = paging.count.unwrap_or(10);
    if count > 1000 {
        return invalid_resource("count", "Must be less than or equal to 1000");
    }
    let since = match since.since_last_changed.as_deref().map(time_of) {
        None => None,
        Some(Some(since)) => Some(since),
        Some(None) => {
            return invalid_resource(
                "since_last_changed",
                "This value should be a valid ISO 8601 date, e.g. 2015-10-21T15:41:36+00:00.",
            )
        }
    };
    let members: Vec<&Value> = members
        .values()
        .filter(|m| match since {
            None => true,
            Some(since) => m["last_changed"]
                .as_str()
                .and_then(time_of)
                .is_some_and(|changed| changed > since),
        })
        .collect();
    let page: Vec<Value> = members
        .iter()
        .skip(paging.offset.unwrap_or(0))
        .take(count)
        .map(|m| (*m).clone())
        .collect();
    let doc = json!({
        "members": page,
        "list_id": list_id,
        "total_items": members.len(),
        "_links": [{ "rel": "self", "method": "GET",
            "href": format!("https://us21.api.mailchimp.com/3.0/lists/{list_id}/members") }],
    });
    axum::Json(only_fields(doc, fields.fields.as_deref())).into_response()
}

/// `text` as a time, when it is one in ISO 8601 (RFC 3339) form.
fn time_of(text: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(text).ok()
}

async fn get_member(
    State(audience): State<Arc<Mutex<Audience>>>,
    Path((list_id, hash)): Path<(String, String)>,
) -> Response {
    let mut a = audience.lock().unwrap();
    let Some(members) = a.members_of(&list_id) else {
        return member_not_found();
    };
    if let Some(member) = members.get(&hash) {
        return axum::Json(member.clone()).into_response();
    }
    if let Some((doc, left)) = a.ghosts.get_mut(&(list_id, hash)) {
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
    let Some(members) = a.members_of_mut(&list_id) else {
        return member_not_found();
    };
    match members.remove(&hash) {
        Some(doc) => {
            a.lists.retain(|(l, h, _), _| *l != list_id || *h != hash);
            a.forgotten.insert((list_id.clone(), hash.clone()));
            let lag = a.forget_after_gets;
            if lag > 0 {
                a.ghosts.insert((list_id, hash), (doc, lag));
            }
            StatusCode::NO_CONTENT.into_response()
        }
        None => member_not_found(),
    }
}

/// The body of a member's `PATCH` or `PUT`, when it is a JSON object.
fn member_body(body: &Bytes) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Some(fields),
        _ => None,
    }
}

fn json_parse_error() -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "JSON Parse Error",
        "We encountered an unspecified JSON parsing error.",
    )
}

/// Mailchimp's statuses of a member.
const STATUSES: [&str; 5] = [
    "subscribed",
    "unsubscribed",
    "cleaned",
    "pending",
    "transactional",
];

/// `PATCH /lists/{list_id}/members/{hash}`: changes the fields given of a member there is.
async fn patch_member(
    State(audience): State<Arc<Mutex<Audience>>>,
    Path((list_id, hash)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let mut a = audience.lock().unwrap();
    if let Some(r) = wrong_list(&a, &list_id) {
        return r;
    }
    let Some(patch) = member_body(&body) else {
        return json_parse_error();
    };
    let Some(members) = a.members_of_mut(&list_id) else {
        return member_not_found();
    };
    if !members.contains_key(&hash) {
        return member_not_found();
    }
    update_member(members, &hash, &patch)
}

/// `PUT /lists/{list_id}/members/{hash}`: Mailchimp's add-or-update. A member there is
/// changed as by a `PATCH` (`status` applies, `status_if_new` does not); otherwise one is
/// added with `status_if_new`, unless its address was deleted permanently (400 "Forgotten
/// Email Not Subscribed"). `email_address` is required either way; 200 with the member.
async fn put_member(
    State(audience): State<Arc<Mutex<Audience>>>,
    Path((list_id, hash)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let mut a = audience.lock().unwrap();
    if let Some(r) = wrong_list(&a, &list_id) {
        return r;
    }
    let Some(put) = member_body(&body) else {
        return json_parse_error();
    };
    let Some(email) = put.get("email_address").and_then(Value::as_str) else {
        return invalid_resource("", "Required fields were not provided: email_address");
    };
    let email = email.to_string();
    let forgotten = a.forgotten.contains(&(list_id.clone(), hash.clone()));
    let web_id = a.next_web_id;
    let Some(members) = a.members_of_mut(&list_id) else {
        return member_not_found();
    };
    if members.contains_key(&hash) {
        return update_member(members, &hash, &put);
    }
    if !is_valid_email(&email) {
        return invalid_resource("email_address", "Please provide a valid email address.");
    }
    // The hash names the member to add; Mailchimp derives it from the address.
    if subscriber_hash(&email) != hash {
        return invalid_resource(
            "email_address",
            "The email address does not match the subscriber hash in the URL.",
        );
    }
    if forgotten {
        return problem(
            StatusCode::BAD_REQUEST,
            "Forgotten Email Not Subscribed",
            &format!(
                "{email} was permanently deleted and cannot be re-imported. The contact must \
                 re-subscribe to get back on the list."
            ),
        );
    }
    let status = match put.get("status_if_new").map(Value::as_str) {
        Some(Some(s)) if STATUSES.contains(&s) => s,
        Some(_) => {
            return invalid_resource("status_if_new", "Value is not one of the enumerated values")
        }
        None => return invalid_resource("", "Required fields were not provided: status_if_new"),
    };
    let mut member = member_document(&list_id, &hash, &email, "", "", web_id);
    member["status"] = json!(status);
    member["full_name"] = json!("");
    member["ip_opt"] = json!("");
    member["timestamp_opt"] = json!("");
    member["last_changed"] = json!(now_stamp());
    member["tags_count"] = json!(0);
    member["tags"] = json!([]);
    members.insert(hash.clone(), member);
    // The other fields given apply to the new member as to one there was.
    let mut rest = put.clone();
    rest.remove("status");
    rest.remove("status_if_new");
    let response = update_member(members, &hash, &rest);
    a.next_web_id += 1;
    response
}

/// Now, as Mailchimp writes a member's `last_changed`: `2015-10-21T15:41:36+00:00`.
fn now_stamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
}

fn is_valid_email(email: &str) -> bool {
    email.contains('@') && email.contains('.')
}

/// Changes member `hash` of `members` (which must have it) by the fields of a `PATCH` or
/// `PUT`: `status`, `merge_fields` and `email_address` (which moves it to the address's
/// hash); 200 with the member, or Mailchimp's 400.
fn update_member(
    members: &mut BTreeMap<String, Value>,
    hash: &str,
    patch: &serde_json::Map<String, Value>,
) -> Response {
    let Some(mut member) = members.get(hash).cloned() else {
        return member_not_found();
    };
    if let Some(status) = patch.get("status") {
        match status.as_str() {
            Some(s) if STATUSES.contains(&s) => member["status"] = json!(s),
            _ => return invalid_resource("status", "Value is not one of the enumerated values"),
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
    let mut new_hash = hash.to_string();
    if let Some(email) = patch.get("email_address") {
        let Some(email) = email.as_str().filter(|e| is_valid_email(e)) else {
            return invalid_resource("email_address", "Please provide a valid email address.");
        };
        new_hash = subscriber_hash(email);
        if new_hash != hash && members.contains_key(&new_hash) {
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
    member["last_changed"] = json!(now_stamp());
    members.remove(hash);
    members.insert(new_hash, member.clone());
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
