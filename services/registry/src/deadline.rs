//! Due dates: one calendar month from receipt, extendable by at most two more (GDPR art.
//! 12(3)). Months are added in UTC; where the day does not exist in the target month (31
//! January + 1 month) the last day of that month is used, as chrono does.

use chrono::{DateTime, Months};

/// Months a controller has to answer before any extension.
pub const BASE_MONTHS: u32 = 1;
/// The most an operator may extend by, in total.
pub const MAX_EXTENSION_MONTHS: u32 = 2;

/// The due date (ms) of a request received at `received_ms` with `extension_months` added.
pub fn due_at(received_ms: i64, extension_months: u32) -> i64 {
    DateTime::from_timestamp_millis(received_ms)
        .and_then(|t| t.checked_add_months(Months::new(BASE_MONTHS + extension_months)))
        .map(|t| t.timestamp_millis())
        .unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn ms(y: i32, m: u32, d: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn one_calendar_month() {
        assert_eq!(due_at(ms(2026, 11, 23), 0), ms(2026, 12, 23));
        assert_eq!(due_at(ms(2026, 1, 31), 0), ms(2026, 2, 28));
        assert_eq!(due_at(ms(2026, 11, 23), 2), ms(2027, 2, 23));
    }
}
