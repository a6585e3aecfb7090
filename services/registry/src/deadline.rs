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

/// Days after the end of a contract end's grace period by which its data must be gone
/// under any choice: its request's due date is `grace_ends_at` plus these.
pub const CONTRACT_END_DUE_DAYS: i64 = 30;

/// When the grace period of a contract effective at `effective_ms` ends: `grace_months`
/// calendar months later, months added as for due dates.
pub fn grace_ends_at(effective_ms: i64, grace_months: u32) -> i64 {
    DateTime::from_timestamp_millis(effective_ms)
        .and_then(|t| t.checked_add_months(Months::new(grace_months)))
        .map(|t| t.timestamp_millis())
        .unwrap_or(i64::MAX)
}

/// The due date of a contract end whose grace period ends at `grace_ends_ms`: the latest
/// moment its data may still exist under any choice.
pub fn contract_end_due_at(grace_ends_ms: i64) -> i64 {
    grace_ends_ms.saturating_add(CONTRACT_END_DUE_DAYS * 24 * 3600 * 1000)
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

    #[test]
    fn a_contract_end_is_due_thirty_days_after_its_grace_period() {
        let grace = grace_ends_at(ms(2026, 8, 31), 6);
        assert_eq!(grace, ms(2027, 2, 28));
        assert_eq!(contract_end_due_at(grace), ms(2027, 3, 30));
        assert_eq!(grace_ends_at(i64::MAX, 6), i64::MAX);
        assert_eq!(contract_end_due_at(i64::MAX), i64::MAX);
    }
}
