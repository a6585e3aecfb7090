//! What each request kind does to the newsletter's subscribers, inside the caller's
//! transaction. Requests reaching here are validated (see [`crate::api`]).
//!
//! Subscribers are found by e-mail address or phone number, raw or hashed (SHA-256, SHA-1,
//! MD5 of the normalised value); other identity types are not held here. A scope that names
//! none of [`DATA_CATEGORIES`] finds nothing. One subscriber row is one record (its
//! deliveries go with it: exported after it, erased with it). Its billing records are records
//! of their own, exported with it while they are linked to it, which an erasure deletes or,
//! while the law keeps them, detaches and keeps (see [`crate::retention`]); a retention run
//! touches only those an earlier answer kept.
//!
//! A kept record is still data on the subject: a later request finds it by the buyer's
//! e-mail address as billed, which the record keeps (raw, or hashed as subscribers are; a
//! phone number finds none, since the record holds none). An export returns it; a later
//! erasure answers RETAINED for it (releasing it when due), as the first did; rectification,
//! restriction and objection leave it as billed, answering COMPLETED with no record changed
//! when it is all the newsletter holds on the subject.
//!
//! An address names whoever holds it, and one may pass to someone else, so a kept record is
//! found only while its address can name no one but the erased subscriber: the erasure
//! keeps the key only when it is the subscriber's address then, no subscriber of the
//! controller may hold it now, and an erasure of a later holder clears it (see
//! [`retention::release_of_subscribers`]). This errs towards not finding: the subject's
//! request by the address they corrected to, or by their address once they subscribed with
//! it again, leaves their kept records out (as does any request after a contract end); those
//! records are still released by the retention runs and returned by a contract end's export.
//! What it cannot tell is who asks: once an erased subscriber's mailbox passes to someone
//! who never subscribes here, a request by that address finds what the subscriber left.
//!
//! Every subscriber belongs to one controller (`subscribers.controller`, the processor's name
//! for it): a request finds only the subscribers of the controller it names, and a contract
//! end ([`erase_controller`]) deletes all of one controller's subscribers and their
//! deliveries with two statements, whatever their number, and its billing records as far as
//! the law lets it (two more).

use std::collections::BTreeMap;

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    BulkErasedCount, BulkJobProgress, BulkOperation, Evidence, ExecuteBulkRequest,
    ExecuteBulkResponse, ExecuteOutcome, ExecuteRequest, ExecuteResponse, FieldCorrection,
    IdentityEncoding, IdentityType, RequestKind,
};
use dsrelay_runtime::identity::{digest, normalize};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::retention::{self, Kept};

/// The adapter's name in Describe and in exports.
pub(crate) const NAME: &str = "example newsletter";

/// The data categories the newsletter holds.
pub(crate) const DATA_CATEGORIES: [&str; 2] = ["contact", "marketing"];

/// The request kinds the newsletter carries out (CONTRACT_END through ExecuteBulk).
pub(crate) const SUPPORTED_KINDS: [RequestKind; 7] = [
    RequestKind::Erasure,
    RequestKind::ReturnOfData,
    RequestKind::Transfer,
    RequestKind::Rectification,
    RequestKind::Restriction,
    RequestKind::Objection,
    RequestKind::ContractEnd,
];

/// One subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscriber {
    /// Row id.
    #[serde(skip)]
    pub id: i64,
    /// Lowercased e-mail address.
    pub email: String,
    /// Full name.
    pub name: String,
    /// Normalised phone number, if given.
    pub phone: Option<String>,
    /// Receives the newsletter.
    pub subscribed: bool,
    /// Processing restricted (GDPR art. 18): kept, not used.
    pub restricted: bool,
}

/// The columns [`Subscriber::from_row`] reads.
pub(crate) const SUBSCRIBER_COLUMNS: &str = "id, email, name, phone, subscribed, restricted";

impl Subscriber {
    pub(crate) fn from_row(r: &AnyRow) -> sqlx::Result<Self> {
        Ok(Self {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            name: r.try_get("name")?,
            phone: r.try_get("phone")?,
            subscribed: r.try_get::<i64, _>("subscribed")? != 0,
            restricted: r.try_get::<i64, _>("restricted")? != 0,
        })
    }
}

/// The result of running a request: the answer, for an accepted erasure the subscriber
/// ids still to delete, for a completed export the subscriber ids and kept billing record ids
/// its pages read, and for a retained erasure the billing record ids kept (the retention
/// run's work; for an accepted one, those an earlier erasure kept).
#[derive(Debug, Clone)]
pub(crate) struct Work {
    pub(crate) response: ExecuteResponse,
    pub(crate) pending: Option<Vec<i64>>,
    pub(crate) exported: Option<Vec<i64>>,
    pub(crate) exported_kept: Option<Vec<i64>>,
    pub(crate) retained: Option<Vec<i64>>,
}

impl From<ExecuteResponse> for Work {
    fn from(response: ExecuteResponse) -> Self {
        Self {
            response,
            pending: None,
            exported: None,
            exported_kept: None,
            retained: None,
        }
    }
}

fn respond(
    outcome: ExecuteOutcome,
    records: i64,
    note: String,
    confirmed: bool,
) -> ExecuteResponse {
    ExecuteResponse {
        outcome: outcome as i32,
        evidence: Some(Evidence {
            records_affected: records,
            note,
            confirmed,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// COMPLETED with `records` records.
pub(crate) fn completed(records: i64, note: String) -> ExecuteResponse {
    respond(ExecuteOutcome::Completed, records, note, true)
}

fn not_found(note: String) -> ExecuteResponse {
    respond(ExecuteOutcome::NotFound, 0, note, true)
}

/// RETAINED: `records` records erased, `kept` kept.
fn retained(records: i64, note: String, kept: &Kept) -> ExecuteResponse {
    ExecuteResponse {
        legal_basis: kept.legal_basis(),
        retain_until: Some(timestamp_from_millis(kept.until_ms)),
        ..respond(ExecuteOutcome::Retained, records, note, true)
    }
}

fn with_reason(outcome: ExecuteOutcome, reason: String) -> ExecuteResponse {
    ExecuteResponse {
        reason: reason.clone(),
        ..respond(outcome, 0, reason, true)
    }
}

/// Carries out `req` in `tx` among the subscribers of `req.controller` (which the caller has
/// filled in). With `confirm_delay_ms > 0` an erasure only records what to delete and answers
/// ACCEPTED. An erasure releases the billing records due by `cutoff_ms`; `follows` makes it a
/// retention run, over the billing record ids the answer it follows kept, done at once.
pub(crate) async fn execute(
    tx: &mut Transaction<'_, Any>,
    req: &ExecuteRequest,
    confirm_delay_ms: u64,
    cutoff_ms: i64,
    follows: Option<&[i64]>,
) -> sqlx::Result<Work> {
    let kind = RequestKind::try_from(req.kind).unwrap_or(RequestKind::Unspecified);
    let categories = req
        .scope
        .as_ref()
        .map(|s| s.data_categories.as_slice())
        .unwrap_or_default();
    if !categories.is_empty()
        && !categories
            .iter()
            .any(|c| DATA_CATEGORIES.contains(&c.as_str()))
    {
        return Ok(not_found(format!(
            "the newsletter holds only {} data, none of the requested categories",
            DATA_CATEGORIES.join(" and ")
        ))
        .into());
    }
    let usable = req.identities.iter().any(|i| {
        matches!(
            IdentityType::try_from(i.r#type),
            Ok(IdentityType::Email | IdentityType::Phone)
        )
    });
    if !usable {
        return Ok(with_reason(
            ExecuteOutcome::Refused,
            "the newsletter finds subscribers only by e-mail address or phone number; \
             none was given"
                .into(),
        )
        .into());
    }
    // What cannot be done for anyone is refused before the subject is looked up, so that
    // the answer does not depend on whether they are here.
    if kind == RequestKind::Rectification {
        if let Some(refusal) = uncorrectable(req) {
            return Ok(with_reason(ExecuteOutcome::Refused, refusal).into());
        }
    }
    if let (RequestKind::Erasure, Some(kept)) = (kind, follows) {
        // The subject's subscriber rows went at the first run; only what it kept is left.
        return retention_run(tx, kept, cutoff_ms).await;
    }
    let subscribers = find(tx, req).await?;
    let kept = find_kept(tx, req).await?;
    if subscribers.is_empty() && kept.is_empty() {
        return Ok(not_found("no subscriber matches the given identities".into()).into());
    }
    let ids: Vec<i64> = subscribers.iter().map(|s| s.id).collect();
    let n = subscribers.len() as i64;
    let only_kept = |done: &str| {
        completed(
            0,
            format!(
                "{done}: the newsletter holds only {} billing record(s) of the subject, kept \
                 as billed under a legal obligation and used for nothing else",
                kept.len()
            ),
        )
        .into()
    };
    Ok(match kind {
        // What an earlier erasure kept is all there is: released when due, as its
        // retention runs release it.
        RequestKind::Erasure if subscribers.is_empty() => {
            let mut work = retention_run(tx, &kept, cutoff_ms).await?;
            if let Some(evidence) = work.response.evidence.as_mut() {
                evidence.note.insert_str(
                    0,
                    "no subscriber matches; an earlier erasure kept the subject's billing \
                     records: ",
                );
            }
            work
        }
        RequestKind::Erasure if confirm_delay_ms > 0 => Work {
            response: respond(
                ExecuteOutcome::Accepted,
                n,
                format!(
                    "erasure of {n} subscriber(s) accepted; carried out within \
                     {confirm_delay_ms} ms"
                ),
                false,
            ),
            pending: Some(ids),
            exported: None,
            exported_kept: None,
            retained: (!kept.is_empty()).then_some(kept),
        },
        RequestKind::Erasure => erase(tx, &ids, &kept, cutoff_ms).await?,
        RequestKind::ReturnOfData | RequestKind::Transfer => {
            // The data is not read here: GetExportPage reads it page by page (see
            // `crate::export`), so no export is ever held whole.
            let deliveries = count_linked(tx, "deliveries", &ids).await?;
            let billing = count_linked(tx, "billing_records", &ids).await? + kept.len() as i64;
            let what = exported(n, deliveries, billing);
            let note = match kind {
                RequestKind::Transfer => format!(
                    "exported {what} for transfer to {}",
                    req.parameters
                        .as_ref()
                        .map(|p| p.transfer_recipient.as_str())
                        .unwrap_or_default()
                ),
                _ => format!("exported {what}"),
            };
            Work {
                response: ExecuteResponse {
                    export_paged: true,
                    // The kept records are records of their own, with no subscriber row.
                    ..completed(n + kept.len() as i64, note)
                },
                pending: None,
                exported: Some(ids),
                exported_kept: Some(kept),
                retained: None,
            }
        }
        // A booked record is not rewritten: it stays as billed until the law releases it.
        RequestKind::Rectification if subscribers.is_empty() => only_kept("nothing corrected"),
        // Kept records are already used for the obligation alone, and an objection (GDPR
        // art. 21) does not reach processing the law requires.
        RequestKind::Restriction | RequestKind::Objection if subscribers.is_empty() => {
            only_kept("nothing changed")
        }
        RequestKind::Rectification => rectify(tx, req, &subscribers).await?.into(),
        // The subscribers are found whether or not their flag changes: one already as asked
        // is COMPLETED with nothing counted, never NOT_FOUND.
        RequestKind::Restriction => {
            let lift = req.parameters.as_ref().is_some_and(|p| p.lift_restriction);
            let changed = set_flag(tx, "restricted", i64::from(!lift), &ids).await?;
            let (what, already) = if lift {
                ("lifted the restriction of", "not restricted")
            } else {
                ("restricted", "already restricted")
            };
            let note = with_unchanged(
                format!("{what} {changed} subscriber(s)"),
                n - changed,
                already,
            );
            completed(changed, note).into()
        }
        RequestKind::Objection => {
            let changed = set_flag(tx, "subscribed", 0, &ids).await?;
            let note = with_unchanged(
                format!("unsubscribed {changed} subscriber(s) from the newsletter"),
                n - changed,
                "already unsubscribed",
            );
            completed(changed, note).into()
        }
        RequestKind::ContractEnd => with_reason(
            ExecuteOutcome::Refused,
            "a contract end is not a task of one subject; it is carried out with ExecuteBulk"
                .into(),
        )
        .into(),
        RequestKind::Unspecified => {
            with_reason(ExecuteOutcome::Failed, "no request kind given".into()).into()
        }
    })
}

/// The subscribers of the request's controller that any of its identities matches, by id.
async fn find(
    tx: &mut Transaction<'_, Any>,
    req: &ExecuteRequest,
) -> sqlx::Result<Vec<Subscriber>> {
    let mut found = BTreeMap::new();
    let mut all: Option<Vec<Subscriber>> = None;
    for identity in &req.identities {
        let ty = IdentityType::try_from(identity.r#type).unwrap_or(IdentityType::Unspecified);
        let column = match ty {
            IdentityType::Email => "email",
            IdentityType::Phone => "phone",
            _ => continue,
        };
        let encoding =
            IdentityEncoding::try_from(identity.encoding).unwrap_or(IdentityEncoding::Unspecified);
        if encoding == IdentityEncoding::Raw {
            let rows = sqlx::query(&format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE {column} = $1 \
                 AND controller = $2"
            ))
            .bind(normalize(ty, &identity.value))
            .bind(&req.controller)
            .fetch_all(&mut **tx)
            .await?;
            for r in &rows {
                let s = Subscriber::from_row(r)?;
                found.insert(s.id, s);
            }
        } else {
            // A hash can only be compared: hash every subscriber's value. Fine for a small
            // example; a real service would keep indexed hash columns.
            if all.is_none() {
                let rows = sqlx::query(&format!(
                    "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers WHERE controller = $1"
                ))
                .bind(&req.controller)
                .fetch_all(&mut **tx)
                .await?;
                all = Some(
                    rows.iter()
                        .map(Subscriber::from_row)
                        .collect::<sqlx::Result<_>>()?,
                );
            }
            for s in all.iter().flatten() {
                let value = match ty {
                    IdentityType::Email => Some(s.email.as_str()),
                    _ => s.phone.as_deref(),
                };
                let hashed = value.and_then(|v| digest(encoding, &normalize(ty, v)));
                if hashed.as_deref() == Some(identity.value.as_str()) {
                    found.insert(s.id, s.clone());
                }
            }
        }
    }
    Ok(found.into_values().collect())
}

/// The billing records of the request's controller that an erasure kept (detached from
/// their subscriber) and whose lookup key any e-mail identity of the request names, by id.
/// None whose address a subscriber of the controller holds now: uniqueness per controller
/// means that row took the address after the record's subscriber was erased (a new sign-up
/// or a correction), and may be someone else.
async fn find_kept(tx: &mut Transaction<'_, Any>, req: &ExecuteRequest) -> sqlx::Result<Vec<i64>> {
    let mut found = std::collections::BTreeSet::new();
    let mut all: Option<Vec<(i64, String)>> = None;
    for identity in &req.identities {
        if IdentityType::try_from(identity.r#type) != Ok(IdentityType::Email) {
            continue;
        }
        let encoding =
            IdentityEncoding::try_from(identity.encoding).unwrap_or(IdentityEncoding::Unspecified);
        if encoding == IdentityEncoding::Raw {
            let ids: Vec<i64> = sqlx::query_scalar(&format!(
                "SELECT b.id FROM billing_records b WHERE {KEPT} AND b.buyer_email = $2"
            ))
            .bind(&req.controller)
            .bind(normalize(IdentityType::Email, &identity.value))
            .fetch_all(&mut **tx)
            .await?;
            found.extend(ids);
            continue;
        }
        // As for subscribers: a hash can only be compared with the hash of each address.
        if all.is_none() {
            all = Some(
                sqlx::query_as(&format!(
                    "SELECT b.id, b.buyer_email FROM billing_records b WHERE {KEPT} \
                     AND b.buyer_email IS NOT NULL"
                ))
                .bind(&req.controller)
                .fetch_all(&mut **tx)
                .await?,
            );
        }
        for (id, address) in all.iter().flatten() {
            let hashed = digest(encoding, &normalize(IdentityType::Email, address));
            if hashed.as_deref() == Some(identity.value.as_str()) {
                found.insert(*id);
            }
        }
    }
    Ok(found.into_iter().collect())
}

/// The filter of [`find_kept`] on `billing_records b`, `$1` the controller.
const KEPT: &str = "b.controller = $1 AND b.subscriber_id IS NULL AND NOT EXISTS \
     (SELECT 1 FROM subscribers s WHERE s.controller = b.controller AND s.email = b.buyer_email)";

/// How many rows of `table` (deliveries or billing records) are linked to the subscribers
/// `ids`.
async fn count_linked(
    tx: &mut Transaction<'_, Any>,
    table: &'static str,
    ids: &[i64],
) -> sqlx::Result<i64> {
    let mut total = 0;
    for id in ids {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM {table} WHERE subscriber_id = $1"
        ))
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
        total += n;
    }
    Ok(total)
}

/// What an export holds, for its note. Billing records are named only where there are some,
/// so that an export without any reads as before they were exported.
fn exported(subscribers: i64, deliveries: i64, billing: i64) -> String {
    if billing == 0 {
        return format!("{subscribers} subscriber record(s) and {deliveries} delivery record(s)");
    }
    format!(
        "{subscribers} subscriber record(s), {deliveries} delivery record(s) and {billing} \
         billing record(s)"
    )
}

/// Erases the subscribers `ids`: their billing records released by `cutoff_ms` are deleted,
/// the others kept (RETAINED until the first is released), the rest of their data deleted.
/// The records `earlier` (those an earlier erasure of the subject kept) are released by
/// `cutoff_ms` the same way, and the answer covers those still kept too.
pub(crate) async fn erase(
    tx: &mut Transaction<'_, Any>,
    ids: &[i64],
    earlier: &[i64],
    cutoff_ms: i64,
) -> sqlx::Result<Work> {
    let (mut released, mut kept) = retention::release_of_subscribers(tx, ids, cutoff_ms).await?;
    let (released_earlier, still_kept) = retention::release_ids(tx, earlier, cutoff_ms).await?;
    released += released_earlier;
    kept.extend(still_kept);
    kept.sort_unstable();
    kept.dedup();
    let deleted = delete(tx, ids).await?;
    let mut note = format!("deleted {deleted} subscriber(s)");
    if released > 0 {
        note.push_str(&format!(
            " and {released} billing record(s) past their retention"
        ));
    }
    conclude(tx, deleted + released, note, kept).await
}

/// A retention run: deletes the billing records `kept` released by `cutoff_ms`.
async fn retention_run(
    tx: &mut Transaction<'_, Any>,
    kept: &[i64],
    cutoff_ms: i64,
) -> sqlx::Result<Work> {
    let (released, kept) = retention::release_ids(tx, kept, cutoff_ms).await?;
    let note = format!("deleted {released} billing record(s) whose retention ended");
    conclude(tx, released, note, kept).await
}

/// The answer of an erasure that erased `records` records and keeps the billing records
/// `kept`: COMPLETED when it keeps none.
async fn conclude(
    tx: &mut Transaction<'_, Any>,
    records: i64,
    mut note: String,
    kept: Vec<i64>,
) -> sqlx::Result<Work> {
    let Some(what) = retention::kept_of_ids(tx, &kept).await? else {
        return Ok(completed(records, note).into());
    };
    note.push_str(&format!(
        "; kept {} billing record(s) under a legal obligation",
        what.records
    ));
    Ok(Work {
        response: retained(records, note, &what),
        pending: None,
        exported: None,
        exported_kept: None,
        retained: Some(kept),
    })
}

/// Deletes the subscribers `ids` and their deliveries; returns how many subscribers went.
/// Their billing records must be released or detached first.
async fn delete(tx: &mut Transaction<'_, Any>, ids: &[i64]) -> sqlx::Result<i64> {
    let mut deleted = 0;
    for id in ids {
        sqlx::query("DELETE FROM deliveries WHERE subscriber_id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
        deleted += sqlx::query("DELETE FROM subscribers WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?
            .rows_affected();
    }
    Ok(i64::try_from(deleted).unwrap_or(i64::MAX))
}

/// `note`, saying how many of the subject's subscribers (`unchanged`) the request found
/// already as it asked (`already`), when any.
fn with_unchanged(note: String, unchanged: i64, already: &str) -> String {
    match unchanged {
        0 => note,
        n => format!("{note}; {n} {already}"),
    }
}

/// Sets `column` (NOT NULL) of the subscribers `ids` to `value`; returns how many it
/// changed: a subscriber that already held the value is not counted.
async fn set_flag(
    tx: &mut Transaction<'_, Any>,
    column: &'static str,
    value: i64,
    ids: &[i64],
) -> sqlx::Result<i64> {
    let mut changed = 0;
    for id in ids {
        changed += sqlx::query(&format!(
            "UPDATE subscribers SET {column} = $1 WHERE id = $2 AND {column} <> $1"
        ))
        .bind(value)
        .bind(id)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    }
    Ok(i64::try_from(changed).unwrap_or(i64::MAX))
}

/// The subscriber fields a rectification can correct, as `FieldCorrection.field` names them
/// (compared trimmed and lowercased).
const CORRECTABLE: [&str; 3] = ["email", "name", "phone"];

/// The field a correction names, as [`CORRECTABLE`] spells it.
fn corrected_field(c: &FieldCorrection) -> String {
    c.field.trim().to_ascii_lowercase()
}

/// The refusal's text when the rectification `req` corrects none of the fields the
/// newsletter holds (whoever the subject is), naming those fields and the ones it can
/// correct; `None` when it corrects at least one.
fn uncorrectable(req: &ExecuteRequest) -> Option<String> {
    let corrections = req
        .parameters
        .as_ref()
        .map(|p| p.corrections.as_slice())
        .unwrap_or_default();
    if corrections
        .iter()
        .any(|c| CORRECTABLE.contains(&corrected_field(c).as_str()))
    {
        return None;
    }
    let named: Vec<String> = corrections
        .iter()
        .map(|c| format!("{:?}", c.field.trim()))
        .collect();
    Some(format!(
        "the newsletter holds none of the corrected field(s) {}; it can correct {}",
        named.join(", "),
        CORRECTABLE.join(", ")
    ))
}

/// Applies the corrections of fields held here (the request corrects at least one, see
/// [`uncorrectable`]); others are reported as not held. Conflicts are checked before
/// anything changes, so a FAILED answer changed nothing.
async fn rectify(
    tx: &mut Transaction<'_, Any>,
    req: &ExecuteRequest,
    subscribers: &[Subscriber],
) -> sqlx::Result<ExecuteResponse> {
    let corrections = req
        .parameters
        .as_ref()
        .map(|p| p.corrections.as_slice())
        .unwrap_or_default();
    let mut apply = Vec::new();
    let mut not_held = Vec::new();
    for c in corrections {
        let field = corrected_field(c);
        match field.as_str() {
            "email" => apply.push(("email", normalize(IdentityType::Email, &c.new_value))),
            "phone" => apply.push(("phone", normalize(IdentityType::Phone, &c.new_value))),
            "name" => apply.push(("name", c.new_value.trim().to_string())),
            _ => not_held.push(field),
        }
    }
    for (column, value) in &apply {
        if *column != "email" {
            continue;
        }
        if subscribers.len() > 1 {
            return Ok(with_reason(
                ExecuteOutcome::Failed,
                format!(
                    "the identities match {} subscribers; an e-mail address can be corrected \
                     for one only",
                    subscribers.len()
                ),
            ));
        }
        // Addresses are unique per controller: another controller's subscriber with the
        // same address is someone else's business.
        let taken: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM subscribers WHERE email = $1 AND id <> $2 AND controller = $3",
        )
        .bind(value)
        .bind(subscribers[0].id)
        .bind(&req.controller)
        .fetch_one(&mut **tx)
        .await?;
        if taken > 0 {
            return Ok(with_reason(
                ExecuteOutcome::Failed,
                "another subscriber already uses the corrected e-mail address".into(),
            ));
        }
    }
    for (column, value) in &apply {
        for s in subscribers {
            sqlx::query(&format!(
                "UPDATE subscribers SET {column} = $1 WHERE id = $2"
            ))
            .bind(value)
            .bind(s.id)
            .execute(&mut **tx)
            .await?;
        }
    }
    let fields: Vec<&str> = apply.iter().map(|(c, _)| *c).collect();
    let mut note = format!(
        "corrected {} of {} subscriber(s)",
        fields.join(", "),
        subscribers.len()
    );
    if !not_held.is_empty() {
        note.push_str(&format!("; not held here: {}", not_held.join(", ")));
    }
    Ok(completed(subscribers.len() as i64, note))
}

/// What [`count_controller`] counts of a controller.
struct Counted {
    subscribers: i64,
    deliveries: i64,
    /// Billing records, detached ones included.
    billing: i64,
    /// The buyers as billed (`buyer`: name and address) of the detached billing records.
    detached_buyers: i64,
}

/// How many subscribers, deliveries and billing records (detached ones included)
/// `controller` has whose arrival marker (see migration 0007) `arrived` admits (`"<= $2"`
/// with `i64::MAX` for all of them), and how many buyers the detached ones among those
/// billing records were billed to.
async fn count_controller(
    tx: &mut Transaction<'_, Any>,
    controller: &str,
    arrived: &'static str,
    marker: i64,
) -> sqlx::Result<Counted> {
    let subscribers: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM subscribers WHERE controller = $1 AND arrival {arrived}"
    ))
    .bind(controller)
    .bind(marker)
    .fetch_one(&mut **tx)
    .await?;
    let deliveries: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM deliveries WHERE arrival {arrived} AND subscriber_id IN \
         (SELECT id FROM subscribers WHERE controller = $1)"
    ))
    .bind(controller)
    .bind(marker)
    .fetch_one(&mut **tx)
    .await?;
    let billing: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM billing_records WHERE controller = $1 AND arrival {arrived}"
    ))
    .bind(controller)
    .bind(marker)
    .fetch_one(&mut **tx)
    .await?;
    let detached_buyers: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(DISTINCT buyer) FROM billing_records WHERE controller = $1 \
         AND subscriber_id IS NULL AND arrival {arrived}"
    ))
    .bind(controller)
    .bind(marker)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Counted {
        subscribers,
        deliveries,
        billing,
        detached_buyers,
    })
}

/// The arrival clock's value: every row marked up to it is committed, and any row inserted
/// later is marked past it (see migration 0007).
async fn arrival_clock(tx: &mut Transaction<'_, Any>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT last FROM arrival_clock WHERE id = 1")
        .fetch_one(&mut **tx)
        .await
}

/// What [`count_bulk`] counted of a bulk job's controller, for [`bulk`].
pub(crate) struct Held {
    subscribers: i64,
    deliveries: i64,
    billing: i64,
    /// The data subjects: the subscribers, and one per buyer as billed of the billing
    /// records an erasure kept and detached from their subscriber. Such a record keeps no
    /// link to whom it was detached from, only its buyer as billed, so one subject's records
    /// billed under two names or addresses count as two subjects.
    subjects: i64,
    /// For an EXPORT: the arrival clock's value its counts and pages stop at, which the
    /// task keeps for its pages and for the erasure that follows it.
    pub(crate) arrived_upto: Option<i64>,
}

/// Counts the controller of the bulk job `req` (validated) once, for [`bulk`], and checks an
/// ERASE that follows a return before anything is erased: `Err` with the refusal's text
/// when it would erase what was never returned. `export_upto` is the `arrived_upto` of the
/// export that ERASE follows, when the adapter has it (see [`arrivals`]); without it the
/// check compares totals ([`unreturned`]).
pub(crate) async fn count_bulk(
    tx: &mut Transaction<'_, Any>,
    req: &ExecuteBulkRequest,
    export_upto: Option<i64>,
) -> sqlx::Result<Result<Held, String>> {
    let controller = req.controller.as_str();
    let export = req.operation == BulkOperation::Export as i32;
    // An export counts only what its pages will read: rows up to the clock read here.
    let arrived_upto = if export {
        Some(arrival_clock(tx).await?)
    } else {
        None
    };
    // Only an ERASE that follows a return is handed its export's clock (`export_upto`).
    if let Some(upto) = export_upto {
        if let Some(refusal) = arrivals(tx, controller, upto).await? {
            return Ok(Err(refusal));
        }
    }
    let counted =
        count_controller(tx, controller, "<= $2", arrived_upto.unwrap_or(i64::MAX)).await?;
    let held = Held {
        subscribers: counted.subscribers,
        deliveries: counted.deliveries,
        billing: counted.billing,
        subjects: counted.subscribers + counted.detached_buyers,
        arrived_upto,
    };
    if export_upto.is_some() {
        return Ok(Ok(held));
    }
    Ok(match unreturned(req, &held) {
        Some(refusal) => Err(refusal),
        None => Ok(held),
    })
}

/// Whether `req` is an ERASE that follows a return (`ExecuteBulkRequest.returned`) and is
/// no retention run: the erasure that is checked against what was returned.
pub(crate) fn follows_return(req: &ExecuteBulkRequest) -> bool {
    req.returned.is_some() && req.operation == BulkOperation::Erase as i32 && !req.retention_expired
}

/// The check of an ERASE that follows an export which kept its arrival clock `upto`: the
/// refusal's text when `controller` holds any row marked past it (a subscriber, delivery or
/// billing record inserted after the export counted, which its pages did not return, or one
/// given to the controller at start since), with how many of each; `None` when it holds
/// none. A row changed otherwise since the export (rectified, detached) keeps its marker: it
/// was returned as it was then, is no arrival, and is erased as it is now.
///
/// It first takes the clock's lock, which an insert into those tables needs (see migration
/// 0007): an insert under way is waited for and counted, and none can follow until the
/// erasure commits, so the erasure then deletes of the controller only rows the export
/// returned, in their current form.
async fn arrivals(
    tx: &mut Transaction<'_, Any>,
    controller: &str,
    upto: i64,
) -> sqlx::Result<Option<String>> {
    sqlx::query("UPDATE arrival_clock SET last = last WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    let Counted {
        subscribers,
        deliveries,
        billing,
        ..
    } = count_controller(tx, controller, "> $2", upto).await?;
    let records = subscribers + deliveries + billing;
    if records == 0 {
        return Ok(None);
    }
    Ok(Some(format!(
        "{records} record(s) of controller {controller} arrived after the contract end's \
         export and were never returned: {subscribers} subscriber(s), {deliveries} delivery \
         record(s) and {billing} billing record(s); nothing was erased. The controller can \
         end the contract again to have them returned"
    )))
}

/// The check of an ERASE that follows a return (`ExecuteBulkRequest.returned`) whose export
/// kept no arrival clock here (one from before migration 0007, or a return made another
/// way): the controller's data `held` counted as such an export counted it (subscribers as
/// subjects, as every export did before [`Held::subjects`] counted the buyers of detached
/// billing records too; subscribers, deliveries and billing records as records) against the
/// export's done counts. The refusal's text when more is held now than was returned; `None`
/// when not, or when the request is no such erasure.
fn unreturned(req: &ExecuteBulkRequest, held: &Held) -> Option<String> {
    if !follows_return(req) {
        return None;
    }
    let returned = req.returned.as_ref()?;
    let controller = req.controller.as_str();
    let to_u64 = |n: i64| u64::try_from(n).unwrap_or(0);
    let (subjects, records) = (
        to_u64(held.subscribers),
        to_u64(held.subscribers + held.deliveries + held.billing),
    );
    let more_subjects = subjects.saturating_sub(returned.subjects_done);
    let more_records = records.saturating_sub(returned.records_done);
    if more_subjects == 0 && more_records == 0 {
        return None;
    }
    Some(format!(
        "{more_records} record(s) ({more_subjects} subscriber(s)) of controller {controller} \
         arrived after the contract end's export and were never returned, if not more: that \
         many more are held now than were returned (held now: {records} record(s) of \
         {subjects} subscriber(s); returned: {} of {}), and an arrival offset by a deletion \
         does not show in these counts; nothing was erased. The controller can end the \
         contract again to have them returned",
        returned.records_done, returned.subjects_done
    ))
}

/// Deletes every subscriber of `controller` and their deliveries, in two statements; returns
/// how many subscribers and deliveries went.
pub(crate) async fn erase_controller(
    tx: &mut Transaction<'_, Any>,
    controller: &str,
) -> sqlx::Result<(i64, i64)> {
    let deliveries = sqlx::query(
        "DELETE FROM deliveries WHERE subscriber_id IN \
         (SELECT id FROM subscribers WHERE controller = $1)",
    )
    .bind(controller)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    let subscribers = sqlx::query("DELETE FROM subscribers WHERE controller = $1")
        .bind(controller)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    Ok((n(subscribers), n(deliveries)))
}

/// Carries out the bulk job `req` (validated) in `tx` with its controller's subscribers,
/// deliveries and billing records as [`count_bulk`] counted them (`held`): either leaves
/// them to be read with GetExportPage (EXPORT) or deletes the subscribers and deliveries
/// with the billing records released by `cutoff_ms` (ERASE). Answers COMPLETED with the
/// counts, or RETAINED when billing records are kept; a retention-expired erasure is the
/// same at its `cutoff_ms`, and finds only kept billing records left.
pub(crate) async fn bulk(
    tx: &mut Transaction<'_, Any>,
    req: &ExecuteBulkRequest,
    held: Held,
    cutoff_ms: i64,
) -> sqlx::Result<ExecuteBulkResponse> {
    let controller = req.controller.as_str();
    let Held {
        subscribers,
        deliveries,
        billing,
        subjects,
        ..
    } = held;
    let to_u64 = |n: i64| u64::try_from(n).unwrap_or(0);
    // An export's are the records its pages hold, which the connector reports as the
    // export's count; an erasure's the records it handled, whatever it did with each, as
    // the SQL connector counts them: the billing records it keeps too (its `erased` counts
    // say what became of them).
    let records = to_u64(subscribers + deliveries + billing);
    let progress = BulkJobProgress {
        subjects_done: to_u64(subjects),
        subjects_total: to_u64(subjects),
        records_done: records,
        records_total: records,
        erased: Vec::new(),
    };
    let completed = |note: String, progress: BulkJobProgress| ExecuteBulkResponse {
        outcome: ExecuteOutcome::Completed as i32,
        note,
        progress: Some(progress),
        ..Default::default()
    };
    Ok(
        match BulkOperation::try_from(req.operation).unwrap_or(BulkOperation::Unspecified) {
            BulkOperation::Export => ExecuteBulkResponse {
                export_paged: true,
                ..completed(
                    format!(
                        "exported {} of controller {controller}",
                        exported(subscribers, deliveries, billing)
                    ),
                    progress,
                )
            },
            BulkOperation::Erase => {
                let billing = retention::release_controller(tx, controller, cutoff_ms).await?;
                let (subscribers, deliveries) = erase_controller(tx, controller).await?;
                let kept = retention::kept_of_controller(tx, controller).await?;
                if subscribers == 0 && deliveries == 0 && billing == 0 && kept.is_none() {
                    // Nothing of the controller was here (a second contract end, or one
                    // after every subscriber left): a deletion of nothing is no deletion
                    // to certify.
                    return Ok(ExecuteBulkResponse {
                        outcome: ExecuteOutcome::NotFound as i32,
                        note: format!("holds no data of controller {controller}"),
                        progress: Some(progress),
                        ..Default::default()
                    });
                }
                let erased = |target: &str, count: i64| BulkErasedCount {
                    target: target.into(),
                    action: "deleted".into(),
                    count,
                };
                let mut counts = vec![
                    erased("subscribers", subscribers),
                    erased("deliveries", deliveries),
                ];
                let mut note = format!(
                    "deleted {subscribers} subscriber(s) and {deliveries} delivery record(s)"
                );
                // Listed only where the controller has billing records, so that a
                // controller without any reads as before.
                if billing > 0 || kept.is_some() {
                    counts.push(erased("billing records", billing));
                    note.push_str(&format!(" and {billing} billing record(s)"));
                }
                note.push_str(&format!(" of controller {controller}"));
                // All of it in one transaction: the job's progress is done once it answers,
                // its counts by place the whole job's, as a repeated job_id answers them.
                let progress = BulkJobProgress {
                    erased: counts.clone(),
                    ..progress
                };
                let Some(kept) = kept else {
                    return Ok(ExecuteBulkResponse {
                        erased: counts,
                        ..completed(note, progress)
                    });
                };
                note.push_str(&format!(
                    "; kept {} billing record(s) under a legal obligation",
                    kept.records
                ));
                ExecuteBulkResponse {
                    outcome: ExecuteOutcome::Retained as i32,
                    legal_basis: kept.legal_basis(),
                    retain_until: Some(timestamp_from_millis(kept.until_ms)),
                    erased: counts,
                    ..completed(note, progress)
                }
            }
            BulkOperation::Unspecified => ExecuteBulkResponse {
                outcome: ExecuteOutcome::Failed as i32,
                reason: "no bulk operation given".into(),
                ..Default::default()
            },
        },
    )
}

#[cfg(test)]
mod tests {
    use dsrelay_runtime::store::{now_ms, Db};

    use super::*;
    use crate::retention::BillingKind;
    use crate::store::Store;

    const GLOBEX: &str = "globex";
    const PEKKA: &str = "pekka.nieminen@example.fi";

    /// A fresh database on the test PostgreSQL server (the server's URL, the database's
    /// name and URL), or `None` without one.
    async fn fresh_postgres_database() -> Option<(String, String, String)> {
        let server = std::env::var("DSRELAY_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())?;
        let name = format!("adapter_subjects_{}", now_ms());
        let db = Db::connect(&server).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&db.pool)
            .await
            .unwrap();
        db.pool.close().await;
        let (base, _) = server.rsplit_once('/').expect("server url has a path");
        let query = (server.split_once('?'))
            .map(|(_, q)| format!("?{q}"))
            .unwrap_or_default();
        let url = format!("{base}/{name}{query}");
        Some((server, name, url))
    }

    fn bulk(job_id: &str, operation: BulkOperation) -> ExecuteBulkRequest {
        ExecuteBulkRequest {
            job_id: job_id.into(),
            request_id: job_id.split('#').next().unwrap().into(),
            controller: GLOBEX.into(),
            operation: operation as i32,
            ..Default::default()
        }
    }

    fn counts(r: &ExecuteBulkResponse) -> (u64, u64, u64, u64) {
        let p = r.progress.clone().expect("progress");
        (
            p.subjects_done,
            p.subjects_total,
            p.records_done,
            p.records_total,
        )
    }

    /// A contract end's erasure keeps two billing records of one subscriber, detached from
    /// him. A second contract end with the controller then reported 0 subjects of unknown
    /// beside the 2 records it knew, as only subscribers counted as subjects. The kept
    /// records' buyer now counts as one: 1 of 1 subjects, in the export and in the erasure.
    async fn kept_billing_records_count_as_their_buyers_subjects(url: &str) {
        let store = Store::open(url).await.unwrap();
        store
            .add_subscriber(GLOBEX, PEKKA, "Pekka N.")
            .await
            .unwrap();
        let other = "maija.m@example.fi";
        store
            .add_subscriber(GLOBEX, other, "Maija M.")
            .await
            .unwrap();
        let now = now_ms();
        for kind in [BillingKind::Invoice, BillingKind::OssSale] {
            (store.add_billing_record(PEKKA, kind, "INV-1", 990, now))
                .await
                .unwrap();
        }
        let caller = "processor";
        let first = store
            .execute_bulk(caller, &bulk("ce-1", BulkOperation::Erase), now)
            .await
            .unwrap();
        assert_eq!(first.outcome, ExecuteOutcome::Retained as i32, "{first:?}");
        assert_eq!(counts(&first), (2, 2, 4, 4));

        let export = store
            .execute_bulk(caller, &bulk("ce-2", BulkOperation::Export), now)
            .await
            .unwrap();
        assert_eq!(counts(&export), (1, 1, 2, 2));
        let erase = ExecuteBulkRequest {
            returned: export.progress.clone(),
            ..bulk("ce-2#erase", BulkOperation::Erase)
        };
        let erased = store.execute_bulk(caller, &erase, now).await.unwrap();
        assert_eq!(
            erased.outcome,
            ExecuteOutcome::Retained as i32,
            "{erased:?}"
        );
        assert_eq!(counts(&erased), (1, 1, 2, 2));
    }

    /// A contract end's erasure where the controller has nothing left (here: a second
    /// contract end after the first erased everything) is NOT_FOUND, not a COMPLETED
    /// deletion of nothing that the processor would certify.
    #[tokio::test]
    async fn erasing_a_controller_with_nothing_left_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/newsletter.db", dir.path().display());
        let store = Store::open(&url).await.unwrap();
        store
            .add_subscriber(GLOBEX, PEKKA, "Pekka N.")
            .await
            .unwrap();
        let now = now_ms();
        let first = store
            .execute_bulk("processor", &bulk("ce-1", BulkOperation::Erase), now)
            .await
            .unwrap();
        assert_eq!(first.outcome, ExecuteOutcome::Completed as i32, "{first:?}");
        let second = store
            .execute_bulk("processor", &bulk("ce-2", BulkOperation::Erase), now)
            .await
            .unwrap();
        assert_eq!(
            second.outcome,
            ExecuteOutcome::NotFound as i32,
            "{second:?}"
        );
        assert!(second.erased.is_empty(), "{second:?}");
        // A repeated job answers as it first did.
        let again = store
            .execute_bulk("processor", &bulk("ce-1", BulkOperation::Erase), now)
            .await
            .unwrap();
        assert_eq!(again.outcome, ExecuteOutcome::Completed as i32, "{again:?}");
    }

    #[tokio::test]
    async fn kept_billing_records_count_as_their_buyers_subjects_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/newsletter.db", dir.path().display());
        kept_billing_records_count_as_their_buyers_subjects(&url).await;
    }

    #[tokio::test]
    async fn kept_billing_records_count_as_their_buyers_subjects_on_postgres() {
        let Some((server, name, url)) = fresh_postgres_database().await else {
            return;
        };
        kept_billing_records_count_as_their_buyers_subjects(&url).await;
        let db = Db::connect(&server).await.unwrap();
        let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        sqlx::query(&drop).execute(&db.pool).await.unwrap();
    }
}
