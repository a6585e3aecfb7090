//! Paged exports (`GetExportPage`): a completed RETURN_OF_DATA or TRANSFER task keeps only
//! the ids of the subscribers and of the kept billing records it covers, a completed
//! contract-end export only its controller and the arrival clock it counted at (see
//! migration 0007), reading no row that arrived after; each page reads their rows live, by
//! keyset (`id > last id sent`, in id order), and never holds more than one page.
//!
//! The export is every subscriber record, then every delivery record of those subscribers,
//! then every billing record: for a subject's export those linked to the subscribers
//! (`subscriber_id`) and those an earlier erasure of the subject kept (detached from the
//! erased subscriber, found by the buyer's address as billed when the request was
//! executed), for a contract end's all of the controller's, the detached ones included.
//!
//! A page token names the position (the section and the last id sent) and is bound to its
//! task by a digest of the task id, so a token of another task is refused. Tokens do not
//! expire: a position stays meaningful as rows come and go (a deleted row is simply not
//! sent, and rows added after the position are, except a contract end's arrivals). The
//! billing section came after the first tokens were issued, as a new section letter in the
//! same format (`p1`): a token issued before it names a position in the subscribers or
//! deliveries, still decodes, and its export goes on into the billing records, so exports
//! under way across an upgrade end complete. Only a rollback to an adapter without the
//! section refuses a token naming it.

use dsrelay_proto::v1::{IdentityEncoding, RequestKind};
use dsrelay_runtime::identity::digest;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::newsletter::{Subscriber, NAME, SUBSCRIBER_COLUMNS};

/// The page size when the caller leaves `max_bytes` at 0.
pub(crate) const DEFAULT_PAGE_BYTES: u32 = 1024 * 1024;
/// The smallest `max_bytes` accepted besides 0.
pub(crate) const MIN_PAGE_BYTES: u32 = 1024;
/// The largest `max_bytes` accepted.
pub(crate) const MAX_PAGE_BYTES: u32 = 16 * 1024 * 1024;

/// Rows read per query while a page is filled; a page reads at most one batch more than it
/// sends.
const BATCH: i64 = 256;

/// Version prefix of the page tokens this adapter issues.
const TOKEN_VERSION: &str = "p1";

/// What an export covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Covered {
    /// A data subject's export: these subscribers (with their deliveries and linked billing
    /// records) and these billing records kept after an earlier erasure of the subject.
    Subject {
        subscribers: Vec<i64>,
        kept: Vec<i64>,
    },
    /// Every subscriber of this controller, with their deliveries and the controller's
    /// billing records (a contract end's export): those whose arrival marker is at most
    /// `arrived_upto`, the arrival clock when the export counted, so that the pages hold
    /// what it counted (`None` for an export from before migration 0007: all, live).
    Controller {
        controller: String,
        arrived_upto: Option<i64>,
    },
}

/// Where a page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// Subscribers with an id above this.
    Subscribers(i64),
    /// Deliveries with an id above this.
    Deliveries(i64),
    /// Billing records with an id above this.
    Billing(i64),
}

impl Position {
    /// The start of the section after this one; `None` after the last.
    fn next_section(self) -> Option<Self> {
        match self {
            Self::Subscribers(_) => Some(Self::Deliveries(0)),
            Self::Deliveries(_) => Some(Self::Billing(0)),
            Self::Billing(_) => None,
        }
    }

    /// The position just after the row `id` of this section.
    fn past(self, id: i64) -> Self {
        match self {
            Self::Subscribers(_) => Self::Subscribers(id),
            Self::Deliveries(_) => Self::Deliveries(id),
            Self::Billing(_) => Self::Billing(id),
        }
    }
}

/// Binds tokens to their task without putting the task id in them.
fn task_tag(task_id: &str) -> String {
    let mut tag = digest(IdentityEncoding::Sha256, task_id).unwrap_or_default();
    tag.truncate(16);
    tag
}

/// The token of `position` in the export of `task_id`.
pub(crate) fn encode_token(task_id: &str, position: Position) -> String {
    let (section, after) = match position {
        Position::Subscribers(after) => ("s", after),
        Position::Deliveries(after) => ("d", after),
        Position::Billing(after) => ("b", after),
    };
    format!("{TOKEN_VERSION}.{}.{section}.{after}", task_tag(task_id))
}

/// Why a page token was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TokenError {
    /// Not a token this adapter issued.
    Malformed,
    /// Issued for another task.
    OtherTask,
}

/// The position `token` names in the export of `task_id`; the empty token is the start.
pub(crate) fn decode_token(task_id: &str, token: &str) -> Result<Position, TokenError> {
    if token.is_empty() {
        return Ok(Position::Subscribers(0));
    }
    let mut parts = token.split('.');
    let (Some(TOKEN_VERSION), Some(tag), Some(section), Some(after), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    let after: i64 = after.parse().map_err(|_| TokenError::Malformed)?;
    if after < 0 || tag.len() != 16 {
        return Err(TokenError::Malformed);
    }
    let position = match section {
        "s" => Position::Subscribers(after),
        "d" => Position::Deliveries(after),
        "b" => Position::Billing(after),
        _ => return Err(TokenError::Malformed),
    };
    if tag != task_tag(task_id) {
        return Err(TokenError::OtherTask);
    }
    Ok(position)
}

/// Whether `kind` (a stored kind number) exports data.
pub(crate) fn is_export(kind: i64) -> bool {
    kind == RequestKind::ReturnOfData as i64 || kind == RequestKind::Transfer as i64
}

/// One record of the export, as the subject reads it.
#[derive(Debug, Serialize)]
#[serde(tag = "record", rename_all = "snake_case")]
enum Record<'a> {
    /// A subscriber row.
    Subscriber {
        holder: &'static str,
        #[serde(flatten)]
        subscriber: &'a Subscriber,
    },
    /// One issue sent to a subscriber.
    Delivery {
        email: String,
        issue: String,
        sent_at_ms: i64,
        opened: bool,
    },
    /// An invoice or VAT OSS sale record of the paid edition.
    #[serde(rename = "billing_record")]
    Billing {
        /// The billed subscriber's address now; `None` once the subscriber was erased and
        /// the record kept (`buyer` still names who was billed).
        email: Option<String>,
        kind: String,
        reference: String,
        /// The buyer as billed, which the record keeps whatever happens to the subscriber.
        buyer: String,
        amount_cents: i64,
        booked_at_ms: i64,
        /// When the law releases it and it is deleted: the storage period (GDPR art.
        /// 15(1)(d)).
        kept_until_ms: i64,
    },
}

/// One page: the encoded records and where the next page starts (`None`: this is the last).
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) records: Vec<Vec<u8>>,
    pub(crate) next: Option<Position>,
}

/// A record larger than the page the caller takes.
#[derive(Debug)]
pub(crate) struct RecordTooLarge(pub(crate) usize);

/// Reads the page at `position` of the export of the `covered` subscribers: whole records up to
/// `max_bytes` together.
pub(crate) async fn read_page(
    conn: &mut sqlx::AnyConnection,
    covered: &Covered,
    mut position: Position,
    max_bytes: usize,
) -> anyhow::Result<Result<Page, RecordTooLarge>> {
    let mut records = Vec::new();
    let mut used = 0usize;
    loop {
        let rows = batch(conn, covered, position).await?;
        if rows.is_empty() {
            match position.next_section() {
                Some(next) => {
                    position = next;
                    continue;
                }
                None => {
                    return Ok(Ok(Page {
                        records,
                        next: None,
                    }))
                }
            }
        }
        for row in &rows {
            let (id, record) = encode(row, position)?;
            if used + record.len() > max_bytes {
                if records.is_empty() {
                    return Ok(Err(RecordTooLarge(record.len())));
                }
                return Ok(Ok(Page {
                    records,
                    next: Some(position),
                }));
            }
            used += record.len();
            records.push(record);
            position = position.past(id);
        }
    }
}

/// The next [`BATCH`] rows after `position`, in id order.
async fn batch(
    conn: &mut sqlx::AnyConnection,
    covered: &Covered,
    position: Position,
) -> sqlx::Result<Vec<AnyRow>> {
    // Subscriber rows and deliveries are selected through the subscriber row `s`; billing
    // records through their own columns, since a detached one has no subscriber row.
    let (subscriber_id, controller, arrival) = match position {
        Position::Subscribers(_) => ("s.id", "s.controller", "s.arrival"),
        Position::Deliveries(_) => ("s.id", "s.controller", "d.arrival"),
        Position::Billing(_) => ("b.subscriber_id", "b.controller", "b.arrival"),
    };
    // Placeholders `$2` on, one per id bound; `$1` is the position.
    let list = |from: usize, n: usize| -> String {
        (from..from + n)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let filter = match covered {
        Covered::Subject { subscribers, kept } => {
            let kept = kept_in(position, kept);
            let linked = (!subscribers.is_empty())
                .then(|| format!("{subscriber_id} IN ({})", list(2, subscribers.len())));
            let detached = (!kept.is_empty())
                .then(|| format!("b.id IN ({})", list(2 + subscribers.len(), kept.len())));
            match (linked, detached) {
                (None, None) => return Ok(Vec::new()),
                (Some(one), None) | (None, Some(one)) => one,
                (Some(linked), Some(detached)) => format!("({linked} OR {detached})"),
            }
        }
        Covered::Controller { .. } => format!("{controller} = $2 AND {arrival} <= $3"),
    };
    let (sql, after) = match position {
        Position::Subscribers(after) => (
            format!(
                "SELECT {SUBSCRIBER_COLUMNS} FROM subscribers s WHERE s.id > $1 AND {filter} \
                 ORDER BY s.id LIMIT {BATCH}"
            ),
            after,
        ),
        Position::Deliveries(after) => (
            format!(
                "SELECT d.id, s.email, d.issue, d.sent_at, d.opened FROM deliveries d \
                 JOIN subscribers s ON s.id = d.subscriber_id \
                 WHERE d.id > $1 AND {filter} ORDER BY d.id LIMIT {BATCH}"
            ),
            after,
        ),
        Position::Billing(after) => (
            format!(
                "SELECT b.id, s.email, b.kind, b.reference, b.buyer, b.amount_cents, \
                 b.booked_at, b.kept_until FROM billing_records b \
                 LEFT JOIN subscribers s ON s.id = b.subscriber_id \
                 WHERE b.id > $1 AND {filter} ORDER BY b.id LIMIT {BATCH}"
            ),
            after,
        ),
    };
    let mut query = sqlx::query(&sql).bind(after);
    match covered {
        Covered::Subject { subscribers, kept } => {
            for id in subscribers.iter().chain(kept_in(position, kept)) {
                query = query.bind(*id);
            }
        }
        Covered::Controller {
            controller,
            arrived_upto,
        } => {
            query = query
                .bind(controller.as_str())
                .bind(arrived_upto.unwrap_or(i64::MAX))
        }
    }
    query.fetch_all(&mut *conn).await
}

/// The kept billing records a subject's export reads at `position`: only the billing
/// section has them.
fn kept_in(position: Position, kept: &[i64]) -> &[i64] {
    match position {
        Position::Billing(_) => kept,
        _ => &[],
    }
}

/// The row's id and its record as JSON.
fn encode(row: &AnyRow, position: Position) -> anyhow::Result<(i64, Vec<u8>)> {
    Ok(match position {
        Position::Subscribers(_) => {
            let s = Subscriber::from_row(row)?;
            let record = serde_json::to_vec(&Record::Subscriber {
                holder: NAME,
                subscriber: &s,
            })?;
            (s.id, record)
        }
        Position::Deliveries(_) => {
            let id: i64 = row.try_get("id")?;
            let record = serde_json::to_vec(&Record::Delivery {
                email: row.try_get("email")?,
                issue: row.try_get("issue")?,
                sent_at_ms: row.try_get("sent_at")?,
                opened: row.try_get::<i64, _>("opened")? != 0,
            })?;
            (id, record)
        }
        Position::Billing(_) => {
            let id: i64 = row.try_get("id")?;
            let record = serde_json::to_vec(&Record::Billing {
                email: row.try_get("email")?,
                kind: row.try_get("kind")?,
                reference: row.try_get("reference")?,
                buyer: row.try_get("buyer")?,
                amount_cents: row.try_get("amount_cents")?,
                booked_at_ms: row.try_get("booked_at")?,
                kept_until_ms: row.try_get("kept_until")?,
            })?;
            (id, record)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_task() {
        for p in [
            Position::Subscribers(7),
            Position::Deliveries(0),
            Position::Billing(12),
        ] {
            let t = encode_token("c/r/newsletter", p);
            assert_eq!(decode_token("c/r/newsletter", &t), Ok(p));
            assert_eq!(
                decode_token("c/r2/newsletter", &t),
                Err(TokenError::OtherTask)
            );
        }
        assert_eq!(decode_token("t", ""), Ok(Position::Subscribers(0)));
        // Tokens issued before the billing section still name their positions.
        let tag = task_tag("t");
        assert_eq!(
            decode_token("t", &format!("p1.{tag}.s.4")),
            Ok(Position::Subscribers(4))
        );
        assert_eq!(
            decode_token("t", &format!("p1.{tag}.d.9")),
            Ok(Position::Deliveries(9))
        );
        let good = encode_token("t", Position::Deliveries(3));
        for bad in [
            "x",
            "p1.abc.s.1",
            &good.replace(".d.", ".x."),
            &good.replace(".3", ".-3"),
            &good.replace(".3", ".3.4"),
            &good.replace("p1", "p2"),
        ] {
            assert_eq!(decode_token("t", bad), Err(TokenError::Malformed), "{bad}");
        }
    }
}
