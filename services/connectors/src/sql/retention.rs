//! The retention calendar: when a row dated D is released under a [`Retention`] rule, both as a
//! moment in Rust and as a date SQL can compare, and which of the subject's rows a rule keeps.
//!
//! All dates are UTC calendar days. The two forms must agree to the millisecond, because the
//! statements decide which rows are erased and Rust decides what the task reports; a test
//! walks both over years of dates, fiscal year ends and clock times.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, NaiveTime};

use super::rules::Retention;
use crate::ConnectorError;

/// One day in milliseconds, for the processor's clock ([`crate::Task::now_ms`]).
pub(super) const DAY_MS: i64 = 86_400_000;

impl Retention {
    /// The fiscal year's last day as (month, day); validation guarantees the format.
    fn fiscal_end(&self) -> (u32, u32) {
        parse_month_day(&self.fiscal_year_end).unwrap_or((12, 31))
    }

    /// The last day a row dated `date` must be kept: the end of its fiscal year, `years`
    /// years on.
    pub(super) fn last_day(&self, date: NaiveDate) -> NaiveDate {
        let (month, day) = self.fiscal_end();
        let fiscal_year = if (date.month(), date.day()) <= (month, day) {
            date.year()
        } else {
            date.year() + 1
        };
        // Out of chrono's range only for years no real row has; keeping such a row forever
        // errs on the side of the obligation.
        NaiveDate::from_ymd_opt(fiscal_year, month, day)
            .and_then(|end| end.checked_add_months(Months::new(12 * self.years)))
            .unwrap_or(NaiveDate::MAX)
    }

    /// The moment a row dated `date` is released: midnight (UTC) after its last day.
    pub(super) fn expires_at_ms(&self, date: NaiveDate) -> i64 {
        start_ms(self.last_day(date)).saturating_add(DAY_MS)
    }

    /// Rows dated before this day (compared as `YYYY-MM-DD` text) are released at `now_ms`;
    /// the same rule as [`Retention::expires_at_ms`] `<= now_ms`, in a form SQL can compare.
    pub(super) fn release_before(&self, now_ms: i64) -> String {
        let today = day_of(now_ms);
        let (month, day) = self.fiscal_end();
        // The latest fiscal year end whose period is over by today, then the first day after
        // the fiscal year that ended `years` years before it.
        let first_kept = NaiveDate::from_ymd_opt(today.year(), month, day)
            .and_then(|end| {
                if end < today {
                    Some(end)
                } else {
                    end.checked_sub_months(Months::new(12))
                }
            })
            .and_then(|over| over.checked_sub_months(Months::new(12 * self.years)))
            .and_then(|fiscal_end| fiscal_end.checked_add_days(Days::new(1)));
        // Only a clock beyond chrono's range gets here; every text compares >= "", so nothing
        // is released.
        first_kept.map_or_else(String::new, |d| d.to_string())
    }
}

/// The UTC calendar day containing `ms` (ms since the epoch), clamped to chrono's range.
pub(super) fn day_of(ms: i64) -> NaiveDate {
    DateTime::from_timestamp_millis(ms).map_or(
        if ms < 0 {
            NaiveDate::MIN
        } else {
            NaiveDate::MAX
        },
        |t| t.date_naive(),
    )
}

/// Midnight (UTC) starting `day`, in ms since the epoch.
pub(super) fn start_ms(day: NaiveDate) -> i64 {
    day.and_time(NaiveTime::MIN).and_utc().timestamp_millis()
}

/// The date at the start of `text` (`YYYY-MM-DD`, optionally followed by a time), as rows
/// hold it: ISO text, or what PostgreSQL prints for a `DATE` or timestamp cast to text.
pub(super) fn parse_iso_date(text: &str) -> Option<NaiveDate> {
    let text = text.trim();
    let b = text.as_bytes();
    // chrono alone would also take `2024-3-2` and signed or longer years; rows compared as
    // text in SQL must have exactly this shape.
    let shaped = b.len() >= 10
        && b[..10].iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
        && !b.get(10).is_some_and(u8::is_ascii_digit);
    if !shaped {
        return None;
    }
    NaiveDate::parse_from_str(&text[..10], "%Y-%m-%d").ok()
}

/// How long kept rows stay, for a note: " until the end of `last`", or, when the first is
/// released sooner, both days, so that a next run dated by the first release is explained.
pub(super) fn kept_until(first: Option<NaiveDate>, last: NaiveDate) -> String {
    match first {
        Some(first) if first < last => {
            format!(", the first until the end of {first} and the last until the end of {last}")
        }
        _ => format!(" until the end of {last}"),
    }
}

/// `MM-DD` as (month, day), valid in every year (so not `02-29`).
pub(super) fn parse_month_day(text: &str) -> Option<(u32, u32)> {
    if text.len() != 5 {
        return None;
    }
    // 2001 is not a leap year: a day it has, every year has.
    let date = parse_iso_date(&format!("2001-{text}"))?;
    Some((date.month(), date.day()))
}

/// What a `retain` table keeps of the subject's rows.
#[derive(Debug, Default)]
pub(super) struct Kept<'a> {
    /// How many of the subject's rows the rule keeps now.
    pub(super) rows: i64,
    /// When the first kept row is released (or checked again).
    pub(super) next_release_ms: Option<i64>,
    /// The last day of the period of the row released first by its date.
    pub(super) first_day: Option<NaiveDate>,
    /// The last day of the period of the row kept longest by its date.
    pub(super) last_day: Option<NaiveDate>,
    /// Rows past their period kept only by `while`.
    pub(super) by_condition: i64,
    /// When rows kept only by `while` are looked at again.
    pub(super) recheck_at_ms: i64,
    /// The bases of what is kept, each once, in the order first met.
    pub(super) bases: Vec<&'a str>,
}

/// One of the subject's rows as a `retain` table's probe reads it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(super) struct DatedRow {
    /// The row's `from_column` as text; `None` when the row has no date.
    pub(super) dated: Option<String>,
    /// 1 while the rule's `while` condition holds for the row, else 0.
    pub(super) held: i64,
}

/// Which of the subject's rows `retain` keeps at `now_ms`, and until when: the same rule as
/// the statements', computed in Rust so that both backends agree.
pub(super) fn assess<'a>(
    table: &str,
    retain: &'a Retention,
    rows: &[DatedRow],
    now_ms: i64,
) -> Result<Kept<'a>, ConnectorError> {
    let recheck_at_ms = now_ms.saturating_add(i64::from(retain.recheck_days) * DAY_MS);
    let mut kept = Kept {
        recheck_at_ms,
        ..Kept::default()
    };
    for row in rows {
        let Some(date) = row.dated.as_deref().and_then(parse_iso_date) else {
            return Err(ConnectorError::Permanent(format!(
                "{table}: a row of the subject has no date in {} (YYYY-MM-DD expected), so \
                 its retention cannot be computed",
                retain.from_column
            )));
        };
        let expires_at = retain.expires_at_ms(date);
        let (until, basis) = if expires_at > now_ms {
            let day = retain.last_day(date);
            kept.first_day = Some(kept.first_day.map_or(day, |d| d.min(day)));
            kept.last_day = kept.last_day.max(Some(day));
            (expires_at, retain.basis.as_str())
        } else if row.held != 0 {
            kept.by_condition += 1;
            (
                recheck_at_ms,
                retain.while_basis.as_deref().unwrap_or(&retain.basis),
            )
        } else {
            continue;
        };
        kept.rows += 1;
        kept.next_release_ms = Some(kept.next_release_ms.map_or(until, |n| n.min(until)));
        if !kept.bases.contains(&basis) {
            kept.bases.push(basis);
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::sample_config;
    use crate::sql::tests::{date, ms, now};

    #[test]
    fn retention_periods_end_with_the_fiscal_year() {
        let config = sample_config("sqlite::memory:");
        let vouchers = config.tables[1].retain.clone().unwrap();
        let books = config.tables[2].retain.clone().unwrap();
        assert_eq!(vouchers.last_day(date(2024, 3, 2)), date(2030, 12, 31));
        assert_eq!(vouchers.expires_at_ms(date(2024, 3, 2)), ms(2031, 1, 1));
        assert_eq!(vouchers.last_day(date(2024, 12, 31)), date(2030, 12, 31));
        assert_eq!(books.last_day(date(2016, 1, 1)), date(2026, 12, 31));
        assert_eq!(vouchers.release_before(now()), "2020-01-01");
        assert_eq!(books.release_before(now()), "2016-01-01");
        // A fiscal year ending in June.
        let june = Retention {
            fiscal_year_end: "06-30".into(),
            ..vouchers.clone()
        };
        assert_eq!(june.last_day(date(2024, 6, 30)), date(2030, 6, 30));
        assert_eq!(june.last_day(date(2024, 7, 1)), date(2031, 6, 30));

        // The SQL form (dates before release_before) and the Rust form (expires_at <= now)
        // agree, whatever the fiscal year, period, day and hour.
        let dates: Vec<(NaiveDate, String)> = date(2012, 1, 1)
            .iter_days()
            .take_while(|d| *d < date(2019, 1, 1))
            .step_by(3)
            .map(|d| (d, d.to_string()))
            .collect();
        for end in ["12-31", "06-30", "01-01", "02-28", "03-01"] {
            for years in [1, 6, 10] {
                let retain = Retention {
                    fiscal_year_end: end.into(),
                    years,
                    ..vouchers.clone()
                };
                // Each date's moment depends on the rule only, not on the clock.
                let expiries: Vec<(&String, i64)> = dates
                    .iter()
                    .map(|(date, text)| (text, retain.expires_at_ms(*date)))
                    .collect();
                let mut now_ms = ms(2013, 1, 1) - 1;
                while now_ms < ms(2030, 1, 1) {
                    let before = retain.release_before(now_ms);
                    for (text, expires_at) in &expiries {
                        assert_eq!(
                            **text < before,
                            *expires_at <= now_ms,
                            "{end} +{years}: {text} at {now_ms} (release before {before})"
                        );
                    }
                    now_ms += 11 * DAY_MS + 3_600_000 * 5 + 1;
                }
            }
        }
    }

    #[test]
    fn dates_parse_and_convert() {
        assert_eq!(parse_iso_date("2024-02-29"), Some(date(2024, 2, 29)));
        assert_eq!(
            parse_iso_date("2024-03-02 10:00:00+00"),
            Some(date(2024, 3, 2))
        );
        assert_eq!(
            parse_iso_date("2024-03-02T10:00:00Z"),
            Some(date(2024, 3, 2))
        );
        for bad in [
            "2023-02-29",
            "2024-3-2",
            "20240302",
            "",
            "2024-03-021",
            "2024-13-01",
            "2024-00-10",
        ] {
            assert_eq!(parse_iso_date(bad), None, "{bad}");
        }
        assert_eq!(parse_month_day("12-31"), Some((12, 31)));
        assert_eq!(parse_month_day("02-29"), None);
        assert_eq!(parse_month_day("2-28"), None);
        assert_eq!(parse_month_day("12-31 "), None);
        assert_eq!(start_ms(date(1970, 1, 1)), 0);
        assert_eq!(day_of(-1), date(1969, 12, 31));
        assert_eq!(day_of(ms(2024, 2, 29) + DAY_MS - 1), date(2024, 2, 29));
        assert_eq!(now(), 1_795_435_200_000);
    }
}
