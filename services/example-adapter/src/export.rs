//! Paged exports (`GetExportPage`): a completed RETURN_OF_DATA or TRANSFER task keeps only
//! the ids of the subscribers it covers, a completed contract-end export only its controller;
//! each page reads their rows live, by keyset (`id > last id sent`, in id order), and never
//! holds more than one page.
//!
//! The export is every subscriber record, then every delivery record of those subscribers.
//! A page token names the position (the section and the last id sent) and is bound to its
//! task by a digest of the task id, so a token of another task is refused. Tokens do not
//! expire: a position stays meaningful as rows come and go (a deleted row is simply not
//! sent, and rows added after the position are).

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

/// Which subscribers an export covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Covered {
    /// These subscribers (a data subject's export).
    Ids(Vec<i64>),
    /// Every subscriber of this controller (a contract end's export).
    Controller(String),
}

/// Where a page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// Subscribers with an id above this.
    Subscribers(i64),
    /// Deliveries with an id above this.
    Deliveries(i64),
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
            match position {
                Position::Subscribers(_) => {
                    position = Position::Deliveries(0);
                    continue;
                }
                Position::Deliveries(_) => {
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
            position = match position {
                Position::Subscribers(_) => Position::Subscribers(id),
                Position::Deliveries(_) => Position::Deliveries(id),
            };
        }
    }
}

/// The next [`BATCH`] rows after `position`, in id order.
async fn batch(
    conn: &mut sqlx::AnyConnection,
    covered: &Covered,
    position: Position,
) -> sqlx::Result<Vec<AnyRow>> {
    // The condition on the subscriber row `s` that selects the covered subscribers.
    let filter = match covered {
        Covered::Ids(ids) if ids.is_empty() => return Ok(Vec::new()),
        Covered::Ids(ids) => {
            let list: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 2)).collect();
            format!("s.id IN ({})", list.join(", "))
        }
        Covered::Controller(_) => "s.controller = $2".to_string(),
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
    };
    let mut query = sqlx::query(&sql).bind(after);
    match covered {
        Covered::Ids(ids) => {
            for id in ids {
                query = query.bind(*id);
            }
        }
        Covered::Controller(controller) => query = query.bind(controller.as_str()),
    }
    query.fetch_all(&mut *conn).await
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_task() {
        for p in [Position::Subscribers(7), Position::Deliveries(0)] {
            let t = encode_token("c/r/newsletter", p);
            assert_eq!(decode_token("c/r/newsletter", &t), Ok(p));
            assert_eq!(
                decode_token("c/r2/newsletter", &t),
                Err(TokenError::OtherTask)
            );
        }
        assert_eq!(decode_token("t", ""), Ok(Position::Subscribers(0)));
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
