//! What the newsletter must keep after an erasure, and for how long: the paid edition's
//! billing records.
//!
//! The newsletter is a Finnish publisher whose fiscal year is the calendar year. Each sale of
//! the paid edition leaves an invoice, a voucher that the bookkeeping law keeps six years
//! after the end of the year it was booked in; a sale to a consumer in another member state
//! is also a record of the VAT One-Stop Shop, kept ten years after the end of the year of the
//! sale. A record is released at midnight (UTC) after its last day, the moment stored with it
//! as `kept_until`. So a subscriber's data goes in stages: at the erasure everything but the
//! unreleased records (which keep the buyer as billed, detached from the erased subscriber),
//! then the invoices, then the OSS records.
//!
//! An erasure that keeps records answers RETAINED until the earliest release, naming the
//! bases of everything kept. The processor runs the erasure again at that date under the key
//! `<task id>#retention-expired-<date in ms>` (the adapter API documents this key for
//! ExecuteBulk's job id; the processor's adapter connector builds Execute's the same way). A
//! run under a key naming a date this adapter answered for the same caller, request and
//! controller is a retention run: it releases, among the records that answer kept, those
//! released by the later of the adapter's clock and that date. The date counts because the
//! processor calls when it has come by its own clock: an adapter whose clock is behind would
//! otherwise keep the records and answer a date already past, which the processor can only
//! fail. A date the adapter never answered is not trusted: such a run is an erasure like any
//! other, judged by the adapter's clock alone.

use chrono::{DateTime, Datelike, NaiveDate};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

/// What the processor appends to a task or job id, with the date, for a retention run.
const RETENTION_EXPIRED_SUFFIX: &str = "#retention-expired-";

/// A key of the processor's retention runs, taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetentionRun<'a> {
    /// The id of the task (or bulk job) whose erasure kept data.
    pub(crate) task_id: &'a str,
    /// The retain-until date the run is for (ms since the epoch).
    pub(crate) until_ms: i64,
}

impl<'a> RetentionRun<'a> {
    /// `key` taken apart, if it is `<task id>#retention-expired-<ms>` with `<ms>` written as
    /// the processor writes it (so that one run has one key).
    pub(crate) fn parse(key: &'a str) -> Option<Self> {
        let (task_id, ms) = key.rsplit_once(RETENTION_EXPIRED_SUFFIX)?;
        let until_ms: i64 = ms.parse().ok()?;
        (until_ms.to_string() == ms && !task_id.is_empty()).then_some(Self { task_id, until_ms })
    }

    /// Whether `key`, a key stored with an earlier answer, belongs to this run's task: the
    /// task's own first run, or one of its retention runs.
    pub(crate) fn follows(&self, key: &str) -> bool {
        key == self.task_id || RetentionRun::parse(key).is_some_and(|r| r.task_id == self.task_id)
    }
}

/// The kinds of billing records, each kept under its own obligation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BillingKind {
    /// An invoice of the paid edition: a voucher of the bookkeeping.
    Invoice,
    /// A sale to a consumer in another member state, as recorded for the VAT One-Stop Shop.
    OssSale,
}

impl BillingKind {
    /// The name stored in `billing_records.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invoice => "invoice",
            Self::OssSale => "vat-oss-sale",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Invoice, Self::OssSale]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

    /// Why a record of this kind is kept, as a RETAINED answer names it.
    pub fn legal_basis(self) -> &'static str {
        match self {
            Self::Invoice => "Kirjanpitolaki 2:10 § (invoices, 6 years after the fiscal year)",
            Self::OssSale => {
                "Council Directive 2006/112/EC art. 369(2) (VAT One-Stop Shop records, 10 \
                 years after the year of the sale)"
            }
        }
    }

    /// How many years after the end of the year it was booked in a record is kept.
    fn years(self) -> i32 {
        match self {
            Self::Invoice => 6,
            Self::OssSale => 10,
        }
    }

    /// The moment a record booked at `booked_at_ms` is released: midnight (UTC) starting the
    /// year after its last one. `None` for a booking date no calendar of chrono's holds.
    pub fn kept_until(self, booked_at_ms: i64) -> Option<i64> {
        let booked = DateTime::from_timestamp_millis(booked_at_ms)?;
        let released = NaiveDate::from_ymd_opt(booked.year() + self.years() + 1, 1, 1)?;
        Some(released.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
    }
}

fn unknown_kind(kind: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: "kind".into(),
        source: format!("unknown billing record kind {kind:?}").into(),
    }
}

/// One billing record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingRecord {
    /// Row id.
    pub id: i64,
    /// The subscriber billed; `None` once that subscriber was erased and the record kept.
    pub subscriber_id: Option<i64>,
    /// Which obligation keeps it.
    pub kind: BillingKind,
    /// The invoice number.
    pub reference: String,
    /// When the law releases it (ms since the epoch).
    pub kept_until: i64,
}

/// The columns [`BillingRecord::from_row`] reads.
pub(crate) const BILLING_COLUMNS: &str = "id, subscriber_id, kind, reference, kept_until";

impl BillingRecord {
    pub(crate) fn from_row(r: &AnyRow) -> sqlx::Result<Self> {
        let kind: String = r.try_get("kind")?;
        Ok(Self {
            id: r.try_get("id")?,
            subscriber_id: r.try_get("subscriber_id")?,
            kind: BillingKind::parse(&kind).ok_or_else(|| unknown_kind(&kind))?,
            reference: r.try_get("reference")?,
            kept_until: r.try_get("kept_until")?,
        })
    }
}

/// What an erasure keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kept {
    /// How many records.
    pub(crate) records: i64,
    /// The earliest release among them: the date of the next retention run.
    pub(crate) until_ms: i64,
    /// The obligations that keep them, the earliest released first.
    kinds: Vec<BillingKind>,
}

impl Kept {
    /// What `rows` keep, each the kind, release and number of some records; `None` when
    /// they are no records.
    fn of(rows: impl IntoIterator<Item = (BillingKind, i64, i64)>) -> Option<Self> {
        let mut firsts: Vec<(i64, BillingKind)> = Vec::new();
        let mut records = 0;
        for (kind, until, n) in rows {
            records += n;
            match firsts.iter_mut().find(|(_, k)| *k == kind) {
                Some((first, _)) => *first = (*first).min(until),
                None => firsts.push((until, kind)),
            }
        }
        firsts.sort();
        Some(Self {
            records,
            until_ms: firsts.first()?.0,
            kinds: firsts.into_iter().map(|(_, k)| k).collect(),
        })
    }

    /// The legal bases of everything kept, for the RETAINED answer.
    pub(crate) fn legal_basis(&self) -> String {
        self.kinds
            .iter()
            .map(|k| k.legal_basis())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Before the subscribers `ids` are deleted: deletes their billing records released by
/// `cutoff_ms` and detaches the others from them. Returns how many went and the ids kept.
///
/// A kept record stays findable by a later request (`buyer_email`, see
/// `crate::newsletter`) only while its address can name no one but the subscriber it was
/// detached from: the key is cleared when the address billed is not the subscriber's
/// address at the erasure (corrected since, perhaps now someone else's), and, when an
/// earlier erasure kept records under the subscriber's address, on both those and this
/// subscriber's (the address served two subscriber rows, which may be two people).
pub(crate) async fn release_of_subscribers(
    tx: &mut Transaction<'_, Any>,
    ids: &[i64],
    cutoff_ms: i64,
) -> sqlx::Result<(i64, Vec<i64>)> {
    let mut released = 0;
    let mut kept = Vec::new();
    for id in ids {
        forget_ambiguous_keys(tx, *id).await?;
        released += sqlx::query(
            "DELETE FROM billing_records WHERE subscriber_id = $1 AND kept_until <= $2",
        )
        .bind(id)
        .bind(cutoff_ms)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        kept.extend(
            sqlx::query_scalar::<_, i64>(
                "SELECT id FROM billing_records WHERE subscriber_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&mut **tx)
            .await?,
        );
        sqlx::query("UPDATE billing_records SET subscriber_id = NULL WHERE subscriber_id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok((count(released), kept))
}

/// Clears the lookup key of the subscriber `id`'s billing records unless it is the
/// subscriber's address, and, where kept records of an earlier erasure have that address
/// as their key, clears theirs and all of the subscriber's.
async fn forget_ambiguous_keys(tx: &mut Transaction<'_, Any>, id: i64) -> sqlx::Result<()> {
    let Some((controller, email)): Option<(String, String)> =
        sqlx::query_as("SELECT controller, email FROM subscribers WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
    else {
        return Ok(());
    };
    // Addresses are unique per controller, so these were detached from an earlier row.
    let reused = sqlx::query(
        "UPDATE billing_records SET buyer_email = NULL WHERE controller = $1 \
         AND subscriber_id IS NULL AND buyer_email = $2",
    )
    .bind(&controller)
    .bind(&email)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    sqlx::query(
        "UPDATE billing_records SET buyer_email = NULL WHERE subscriber_id = $1 \
         AND ($3 OR buyer_email IS NULL OR buyer_email <> $2)",
    )
    .bind(id)
    .bind(&email)
    .bind(reused > 0)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A retention run: deletes the records `ids` (those an earlier answer kept) released by
/// `cutoff_ms`. Returns how many went and the ids still kept (a record deleted meanwhile, by
/// a contract end, is neither).
pub(crate) async fn release_ids(
    tx: &mut Transaction<'_, Any>,
    ids: &[i64],
    cutoff_ms: i64,
) -> sqlx::Result<(i64, Vec<i64>)> {
    let mut released = 0;
    let mut kept = Vec::new();
    for id in ids {
        released += sqlx::query("DELETE FROM billing_records WHERE id = $1 AND kept_until <= $2")
            .bind(id)
            .bind(cutoff_ms)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM billing_records WHERE id = $1")
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
        if left > 0 {
            kept.push(*id);
        }
    }
    Ok((count(released), kept))
}

/// What the records `ids` keep.
pub(crate) async fn kept_of_ids(
    tx: &mut Transaction<'_, Any>,
    ids: &[i64],
) -> sqlx::Result<Option<Kept>> {
    let mut rows = Vec::new();
    for id in ids {
        let row = sqlx::query(&format!(
            "SELECT {BILLING_COLUMNS} FROM billing_records WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(r) = row {
            let r = BillingRecord::from_row(&r)?;
            rows.push((r.kind, r.kept_until, 1));
        }
    }
    Ok(Kept::of(rows))
}

/// A contract end's erasure, before the controller's subscribers are deleted: deletes every
/// billing record of `controller` released by `cutoff_ms` and detaches the others, clearing
/// the lookup key of every record of the controller, in two statements. Returns how many
/// went. With every subscriber gone at once, the simplest sound rule is that no later
/// request of a subject finds them by address; a contract end's export still holds them.
pub(crate) async fn release_controller(
    tx: &mut Transaction<'_, Any>,
    controller: &str,
    cutoff_ms: i64,
) -> sqlx::Result<i64> {
    let released =
        sqlx::query("DELETE FROM billing_records WHERE controller = $1 AND kept_until <= $2")
            .bind(controller)
            .bind(cutoff_ms)
            .execute(&mut **tx)
            .await?
            .rows_affected();
    sqlx::query(
        "UPDATE billing_records SET subscriber_id = NULL, buyer_email = NULL \
         WHERE controller = $1",
    )
    .bind(controller)
    .execute(&mut **tx)
    .await?;
    Ok(count(released))
}

/// What the billing records of `controller` keep, counted per kind in one statement.
pub(crate) async fn kept_of_controller(
    tx: &mut Transaction<'_, Any>,
    controller: &str,
) -> sqlx::Result<Option<Kept>> {
    let rows = sqlx::query(
        "SELECT kind, COUNT(*) AS n, MIN(kept_until) AS first FROM billing_records \
         WHERE controller = $1 GROUP BY kind",
    )
    .bind(controller)
    .fetch_all(&mut **tx)
    .await?;
    let mut kept = Vec::new();
    for r in &rows {
        let kind: String = r.try_get("kind")?;
        let kind = BillingKind::parse(&kind).ok_or_else(|| unknown_kind(&kind))?;
        kept.push((kind, r.try_get("first")?, r.try_get("n")?));
    }
    Ok(Kept::of(kept))
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    fn ms(y: i32, m: u32, d: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0)
            .single()
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn records_are_released_after_the_last_year_of_their_period() {
        // Booked in 2024: the invoice is kept through 2030, the OSS record through 2034.
        for booked in [ms(2024, 1, 1), ms(2024, 6, 15) + 1234, ms(2025, 1, 1) - 1] {
            assert_eq!(
                BillingKind::Invoice.kept_until(booked),
                Some(ms(2031, 1, 1))
            );
            assert_eq!(
                BillingKind::OssSale.kept_until(booked),
                Some(ms(2035, 1, 1))
            );
        }
        assert_eq!(
            BillingKind::Invoice.kept_until(ms(2025, 1, 1)),
            Some(ms(2032, 1, 1))
        );
        assert_eq!(BillingKind::Invoice.kept_until(i64::MAX), None);
    }

    #[test]
    fn reads_the_keys_of_retention_runs() {
        let run = RetentionRun::parse("c/r1/newsletter#retention-expired-1924992000000").unwrap();
        assert_eq!(run.task_id, "c/r1/newsletter");
        assert_eq!(run.until_ms, 1_924_992_000_000);
        assert!(run.follows("c/r1/newsletter"));
        assert!(run.follows("c/r1/newsletter#retention-expired-1800000000000"));
        assert!(run.follows("c/r1/newsletter#retention-expired-1924992000000"));
        assert!(!run.follows("c/r1/other"));
        assert!(!run.follows("c/r1/newsletter#retention-expired-x"));
        assert!(!run.follows("c/r1/other#retention-expired-1800000000000"));
        // A task id of its own may hold a '#'.
        let run = RetentionRun::parse("a#b#retention-expired-5").unwrap();
        assert_eq!((run.task_id, run.until_ms), ("a#b", 5));
        for not_one in [
            "c/r1/newsletter",
            "c/r1/newsletter#retention-expired",
            "c/r1/newsletter#retention-expired-",
            "c/r1/newsletter#retention-expired-05",
            "c/r1/newsletter#retention-expired-+5",
            "c/r1/newsletter#retention-expired-5x",
            "#retention-expired-5",
        ] {
            assert_eq!(RetentionRun::parse(not_one), None, "{not_one}");
        }
    }

    #[test]
    fn what_is_kept_is_named_by_its_earliest_release() {
        assert_eq!(Kept::of([]), None);
        let kept = Kept::of([
            (BillingKind::OssSale, ms(2035, 1, 1), 1),
            (BillingKind::Invoice, ms(2032, 1, 1), 1),
            (BillingKind::Invoice, ms(2031, 1, 1), 2),
        ])
        .unwrap();
        assert_eq!((kept.records, kept.until_ms), (4, ms(2031, 1, 1)));
        assert_eq!(
            kept.legal_basis(),
            format!(
                "{}; {}",
                BillingKind::Invoice.legal_basis(),
                BillingKind::OssSale.legal_basis()
            )
        );
        let late = Kept::of([(BillingKind::OssSale, ms(2035, 1, 1), 1)]).unwrap();
        assert_eq!(late.legal_basis(), BillingKind::OssSale.legal_basis());
        // Both bases together fit the acknowledgement's 1024 bytes.
        assert!(kept.legal_basis().len() < 1024);
    }
}
