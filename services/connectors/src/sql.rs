//! Data-subject requests in accounting and ERP databases (SQLite or PostgreSQL), carried out by
//! declarative table rules.
//!
//! Each rule names a table and says, for that table:
//! - how the subject's rows are found: directly, by matching identity values against columns
//!   (`match`), or through a parent table's matched rows (`parent`);
//! - what erasure does with them (`action`): delete them, anonymize some columns
//!   (`anonymize`), or `keep` them untouched;
//! - whether a legal obligation keeps them for a while (`retain`, see below);
//! - which columns a RETURN_OF_DATA or TRANSFER export contains (`export`);
//! - which column a RECTIFICATION of a logical field (`email`, `name`, ...) changes
//!   (`rectify`);
//! - which 0/1 column a RESTRICTION sets or lifts (`restrict_column`) and which one an
//!   OBJECTION to direct marketing sets (`suppress_column`).
//!
//! The connector supports a request kind when some table is configured for it (ERASURE when
//! some table is not `keep`).
//!
//! # Legal retention
//!
//! A `retain` rule keeps the table's rows until the end of the fiscal year that contains the
//! date in `from_column`, plus `years` years (the Finnish Accounting Act: books ten years,
//! vouchers six), and also as long as the SQL condition `while` holds for a row (an open
//! invoice, a debt in collection). An erasure then:
//! - applies the table's action at once to the rows whose period is over;
//! - anonymizes in the kept rows the `anonymize` columns the obligation does not need (all
//!   but `keep_columns`, and never the columns the rows are found by);
//! - keeps a matched (parent) row as long as a child row found through it is kept, so that the
//!   rest can be found again; meanwhile its `anonymize` columns are cleared too, except the
//!   match columns the request's identities use;
//! - answers [`Outcome::Retained`] with the bases of the rules that keep rows and the moment the
//!   next kept row is released. The processor runs the task again then
//!   ([`Phase::RetentionExpired`]), which erases what was released and answers
//!   [`Outcome::Retained`] again while anything is kept, or [`Outcome::Completed`].
//!
//! Each part is thus erased as soon as its own obligation ends, not when the longest one does.
//! Rows kept only by `while` are checked again `recheck_days` after each run. Dates are read in
//! Rust from the rows (as `YYYY-MM-DD`, also from a PostgreSQL `DATE` column), never from the
//! system clock: "now" is [`Task::now_ms`], in UTC.
//!
//! # Safety
//!
//! A request runs in one transaction: child tables first, so that they are still reachable
//! through their parent's rows, then the matched tables. Identifiers come only from the
//! validated configuration and are quoted; identity values, corrected values and dates are
//! always bound as parameters. The only SQL text taken from the configuration is
//! `retain.while`, spliced as written: it is trusted operator configuration, never user input.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use dsrelay_proto::v1::{
    FieldCorrection, IdentityEncoding, IdentityType, RequestKind, SubjectIdentity,
};
use dsrelay_runtime::identity::normalize;
use dsrelay_runtime::store::{Backend, Db};
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyRow, AnyTypeInfoKind};
use sqlx::{Any, Row, Transaction, ValueRef as _};

use crate::{ConnectorError, Outcome, Phase, Task};

/// The sample accounting schema and seed data (valid in SQLite and PostgreSQL).
pub const SAMPLE_ACCOUNTING_SQL: &str = include_str!("../sample/accounting.sql");

/// The rules for the sample accounting database, without the `url`.
pub const SAMPLE_ACCOUNTING_RULES: &str = include_str!("../sample/accounting-rules.toml");

/// The literal that `redacted` writes into a column.
pub const REDACTED: &str = "[erased]";

/// How long rows kept only by a `while` condition wait for the next check, unless configured.
pub const DEFAULT_RECHECK_DAYS: u32 = 30;

const DAY_MS: i64 = 86_400_000;

/// The identity types a `match` table may use, by their configuration key. `OTHER` is left out
/// because its values mean different things from one request to the next (see its label).
const MATCH_KEYS: [(&str, IdentityType); 4] = [
    ("email", IdentityType::Email),
    ("phone", IdentityType::Phone),
    ("customer_number", IdentityType::CustomerNumber),
    ("national_id", IdentityType::NationalId),
];

/// The configuration of one SQL subprocessor (everything after `type = "sql"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConnectorConfig {
    /// Where the data lives: `sqlite://path` or `postgres://user@host/db`. The connector needs
    /// its own URL because the holder's database is not the processor's store.
    pub url: String,
    /// The tables holding the subject's data and what to do in each; a table not listed here
    /// is never touched.
    pub tables: Vec<TableRule>,
}

/// What to do with the subject's rows in one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    /// The table name: a plain identifier, because it is spliced into SQL (quoted).
    pub table: String,
    /// What erasure does: delete the rows, anonymize them, or keep them.
    pub action: Action,
    /// For a table without identity columns of its own: find its rows through the rows the
    /// parent table matches.
    #[serde(default)]
    pub parent: Option<ParentLink>,
    /// Identity type (`email`, `phone`, `customer_number`, `national_id`) to the column that
    /// holds it, for tables that identify the subject themselves.
    #[serde(default, rename = "match")]
    pub match_columns: BTreeMap<String, String>,
    /// The columns to overwrite and with what: for `anonymize`, what erasure overwrites; for
    /// any action, what is overwritten at once in rows that are kept under `retain` (or, in a
    /// matched table, kept because child rows are). Columns left out keep their value, which
    /// is how amounts and dates survive for the bookkeeping.
    #[serde(default)]
    pub anonymize: BTreeMap<String, AnonymizeWith>,
    /// The columns a RETURN_OF_DATA or TRANSFER export contains; a table without them is not
    /// exported. Columns must be of integer, floating-point, boolean or text types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export: Vec<String>,
    /// Logical field of a RECTIFICATION (`email`, `phone`, `name`, `address`, ...) to the
    /// column holding it here. Only tables listing a field are changed by its correction.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rectify: BTreeMap<String, String>,
    /// An integer column that RESTRICTION sets to 1 and a lift sets back to 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restrict_column: Option<String>,
    /// An integer column that an OBJECTION to direct marketing sets to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress_column: Option<String>,
    /// A legal obligation to keep the rows for a while (see the module documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<Retention>,
}

/// How a child table's rows hang off its parent's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentLink {
    /// The parent table; it must be listed too and have `match`, so that the subject's rows
    /// can be found there.
    pub table: String,
    /// The column of this (child) table that refers to the parent.
    pub column: String,
    /// The parent's column that `column` refers to, usually its primary key.
    pub parent_column: String,
}

/// What erasure does with the rows a rule finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Delete the rows.
    Delete,
    /// Keep the rows but overwrite the columns listed in `anonymize`.
    Anonymize,
    /// Never touch the rows in an erasure (the table is listed for export, rectification,
    /// restriction or objection, or to find child rows through it).
    Keep,
}

/// The value an anonymized column gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymizeWith {
    /// SQL `NULL`, for nullable columns.
    Null,
    /// The text `[erased]`, for `NOT NULL` text columns and to show a reader what happened.
    Redacted,
}

/// A legal obligation to keep a table's rows: until the end of the fiscal year containing
/// `from_column`'s date plus `years` years, and as long as `while` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// The law or contract, as reported to the controller (e.g. "Kirjanpitolaki 1336/1997
    /// 2:10 §").
    pub basis: String,
    /// Whole years after the end of the fiscal year (1..=100).
    pub years: u32,
    /// The column with the row's date (`YYYY-MM-DD` text, or a date).
    pub from_column: String,
    /// The last day of the fiscal year as `MM-DD` (not `02-29`); `12-31` when left out.
    #[serde(default = "default_fiscal_year_end")]
    pub fiscal_year_end: String,
    /// A SQL condition over the table's columns, e.g. `status IN ('open', 'collection')`: rows
    /// matching it are kept as long as it holds, even after the period. Spliced into the
    /// statements as written, so it is trusted operator configuration, never user input.
    #[serde(default, rename = "while", skip_serializing_if = "Option::is_none")]
    pub while_condition: Option<String>,
    /// The basis reported for rows kept only by `while`; `basis` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub while_basis: Option<String>,
    /// Days until rows kept only by `while` are checked again (1..=3650).
    #[serde(default = "default_recheck_days")]
    pub recheck_days: u32,
    /// `anonymize` columns the obligation needs: left as they are while the row is kept and
    /// overwritten by the action afterwards.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_columns: Vec<String>,
}

fn default_fiscal_year_end() -> String {
    "12-31".to_string()
}

fn default_recheck_days() -> u32 {
    DEFAULT_RECHECK_DAYS
}

impl Retention {
    /// The fiscal year's last day as (month, day); validation guarantees the format.
    fn fiscal_end(&self) -> (u32, u32) {
        parse_month_day(&self.fiscal_year_end).unwrap_or((12, 31))
    }

    /// The last day a row dated `date` must be kept.
    fn last_day(&self, date: Date) -> Date {
        let (month, day) = self.fiscal_end();
        let fiscal_year = if (date.1, date.2) <= (month, day) {
            date.0
        } else {
            date.0 + 1
        };
        (fiscal_year + i64::from(self.years), month, day)
    }

    /// The moment a row dated `date` is released: midnight (UTC) after its last day.
    fn expires_at_ms(&self, date: Date) -> i64 {
        (days_from_civil(self.last_day(date)) + 1).saturating_mul(DAY_MS)
    }

    /// Rows dated before this day (compared as `YYYY-MM-DD` text) are released at `now_ms`;
    /// the same rule as [`Retention::expires_at_ms`] `<= now_ms`, in a form SQL can compare.
    fn release_before(&self, now_ms: i64) -> String {
        let today = civil_from_days(now_ms.div_euclid(DAY_MS));
        let (month, day) = self.fiscal_end();
        // The latest fiscal year end whose period is over by today.
        let last_over = if (month, day) < (today.1, today.2) {
            today.0
        } else {
            today.0 - 1
        };
        let fiscal_year = last_over - i64::from(self.years);
        format_date(civil_from_days(
            days_from_civil((fiscal_year, month, day)) + 1,
        ))
    }
}

/// A calendar date: (year, month 1..=12, day 1..=31).
type Date = (i64, u32, u32);

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil((y, m, d): Date) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` days after 1970-01-01.
fn civil_from_days(days: i64) -> Date {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// The date at the start of `text` (`YYYY-MM-DD`, optionally followed by a time).
fn parse_iso_date(text: &str) -> Option<Date> {
    let b = text.trim().as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let s = b.get(r)?;
        if !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    if b.get(10).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let (y, m, d) = (i64::from(digits(0..4)?), digits(5..7)?, digits(8..10)?);
    ((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m)).then_some((y, m, d))
}

/// `MM-DD`, valid in every year (so not `02-29`).
fn parse_month_day(text: &str) -> Option<(u32, u32)> {
    let (y, m, d) = parse_iso_date(&format!("2001-{text}"))?;
    (text.len() == 5 && y == 2001).then_some((m, d))
}

fn format_date((y, m, d): Date) -> String {
    format!("{y:04}-{m:02}-{d:02}")
}

impl SqlConnectorConfig {
    /// Every rule the configuration breaks, each naming the table and the rule; empty when
    /// the configuration is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.url.trim().is_empty() {
            out.push("url: must not be empty (sqlite://path or postgres://...)".to_string());
        }
        if self.tables.is_empty() {
            out.push("tables: at least one table rule is required".to_string());
        }
        let mut seen = BTreeSet::new();
        for (i, rule) in self.tables.iter().enumerate() {
            let at = format!("tables[{i}] ({})", rule.table);
            let mut ident = |what: &str, name: &str| {
                if !is_identifier(name) {
                    out.push(format!(
                        "{at}: {what} {name:?} is not a plain identifier \
                         ([A-Za-z_][A-Za-z0-9_]*, at most 63 characters)"
                    ));
                }
            };
            ident("table", &rule.table);
            for column in rule.match_columns.values() {
                ident("match column", column);
            }
            for column in rule.anonymize.keys() {
                ident("anonymize column", column);
            }
            if let Some(parent) = &rule.parent {
                ident("parent table", &parent.table);
                ident("parent column", &parent.column);
                ident("parent parent_column", &parent.parent_column);
            }
            for column in &rule.export {
                ident("export column", column);
            }
            for column in rule.rectify.values() {
                ident("rectify column", column);
            }
            if let Some(column) = &rule.restrict_column {
                ident("restrict_column", column);
            }
            if let Some(column) = &rule.suppress_column {
                ident("suppress_column", column);
            }
            if let Some(retain) = &rule.retain {
                ident("retain from_column", &retain.from_column);
                for column in &retain.keep_columns {
                    ident("retain keep column", column);
                }
            }
            if !seen.insert(rule.table.as_str()) {
                out.push(format!("{at}: the table is listed twice; give it one rule"));
            }
            for key in rule.match_columns.keys() {
                if !MATCH_KEYS.iter().any(|(k, _)| k == key) {
                    out.push(format!(
                        "{at}: match key {key:?} is not an identity type \
                         (use email, phone, customer_number or national_id)"
                    ));
                }
            }
            match (&rule.parent, rule.match_columns.is_empty()) {
                (Some(_), false) => out.push(format!(
                    "{at}: has both match and parent; give it one way to find the subject's rows"
                )),
                (None, true) => out.push(format!(
                    "{at}: needs either match (identity columns) or parent (a listed table it \
                     hangs off)"
                )),
                (Some(parent), true) => {
                    match self.tables.iter().find(|t| t.table == parent.table) {
                        None => out.push(format!(
                            "{at}: parent table {:?} is not listed in tables",
                            parent.table
                        )),
                        Some(p) if p.match_columns.is_empty() => out.push(format!(
                            "{at}: parent table {:?} must have match (parents of parents are \
                             not supported)",
                            parent.table
                        )),
                        Some(_) => {}
                    }
                }
                (None, false) => {}
            }
            // Rows kept under an obligation: the table's own, or a matched table's rows kept
            // for retained children. Both may anonymize columns whatever the action.
            let keeps_rows = rule.retain.is_some() || !self.retained_children(rule).is_empty();
            match rule.action {
                Action::Anonymize if rule.anonymize.is_empty() => out.push(format!(
                    "{at}: action anonymize needs a non-empty anonymize map (column = \"null\" \
                     or \"redacted\")"
                )),
                Action::Delete if !rule.anonymize.is_empty() && !keeps_rows => out.push(format!(
                    "{at}: anonymize columns are given but the action is delete and no rows \
                     are kept under retain; use action = \"anonymize\" or remove them"
                )),
                Action::Keep if !rule.anonymize.is_empty() => out.push(format!(
                    "{at}: anonymize columns are given but the action is keep; remove them"
                )),
                Action::Keep if rule.retain.is_some() => out.push(format!(
                    "{at}: retain is given but the action is keep, which never erases; remove \
                     it or choose delete or anonymize"
                )),
                _ => {}
            }
            let mut exported = BTreeSet::new();
            for column in &rule.export {
                if !exported.insert(column) {
                    out.push(format!("{at}: export column {column:?} is listed twice"));
                }
            }
            for field in rule.rectify.keys() {
                let ok = !field.is_empty()
                    && field.len() <= 64
                    && field
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    out.push(format!(
                        "{at}: rectify field {field:?} must be 1..=64 characters of a-z, 0-9 \
                         and _ (the logical field name of a correction, e.g. email)"
                    ));
                }
            }
            if let Some(retain) = &rule.retain {
                validate_retention(&at, rule, retain, &mut out);
            }
        }
        out
    }

    /// The rules that find their rows through `parent` and keep some under `retain`.
    fn retained_children(&self, parent: &TableRule) -> Vec<(&TableRule, &ParentLink)> {
        if parent.parent.is_some() {
            return Vec::new();
        }
        self.tables
            .iter()
            .filter(|t| t.action != Action::Keep && t.retain.is_some())
            .filter_map(|t| Some((t, t.parent.as_ref()?)))
            .filter(|(_, link)| link.table == parent.table)
            .collect()
    }

    /// The identity types some table can match, by configuration key, for messages.
    fn usable_keys(&self) -> BTreeSet<&str> {
        self.tables
            .iter()
            .flat_map(|t| t.match_columns.keys().map(String::as_str))
            .collect()
    }

    /// Whether this configuration can carry out requests of `kind`.
    pub fn supports(&self, kind: RequestKind) -> bool {
        let any = |f: fn(&TableRule) -> bool| self.tables.iter().any(f);
        match kind {
            RequestKind::Erasure => any(|t| t.action != Action::Keep),
            RequestKind::ReturnOfData | RequestKind::Transfer => any(|t| !t.export.is_empty()),
            RequestKind::Rectification => any(|t| !t.rectify.is_empty()),
            RequestKind::Restriction => any(|t| t.restrict_column.is_some()),
            RequestKind::Objection => any(|t| t.suppress_column.is_some()),
            RequestKind::Unspecified => false,
        }
    }

    /// The rules in the order a request handles them: tables found through a parent first,
    /// because their rows are found through the parent's rows, which must still be there.
    fn children_first(&self) -> impl Iterator<Item = &TableRule> {
        self.tables
            .iter()
            .filter(|t| t.parent.is_some())
            .chain(self.tables.iter().filter(|t| t.parent.is_none()))
    }
}

fn validate_retention(at: &str, rule: &TableRule, retain: &Retention, out: &mut Vec<String>) {
    if retain.basis.trim().is_empty() {
        out.push(format!(
            "{at}: retain basis must name the law or contract that requires keeping the rows"
        ));
    }
    if !(1..=100).contains(&retain.years) {
        out.push(format!("{at}: retain years must be 1..=100"));
    }
    if parse_month_day(&retain.fiscal_year_end).is_none() {
        out.push(format!(
            "{at}: retain fiscal_year_end {:?} must be MM-DD, a day that every year has \
             (e.g. 12-31)",
            retain.fiscal_year_end
        ));
    }
    if !(1..=3650).contains(&retain.recheck_days) {
        out.push(format!("{at}: retain recheck_days must be 1..=3650"));
    }
    match &retain.while_condition {
        Some(condition) => {
            if let Err(why) = check_condition(condition) {
                out.push(format!("{at}: retain while {why}"));
            }
        }
        None if retain.while_basis.is_some() => out.push(format!(
            "{at}: retain while_basis is given without a while condition"
        )),
        None => {}
    }
    if retain
        .while_basis
        .as_ref()
        .is_some_and(|b| b.trim().is_empty())
    {
        out.push(format!("{at}: retain while_basis must not be empty"));
    }
    for column in &retain.keep_columns {
        if !rule.anonymize.contains_key(column) {
            out.push(format!(
                "{at}: retain keep column {column:?} is not in anonymize; list only anonymize \
                 columns the obligation needs"
            ));
        }
    }
}

/// Catches the mistakes that would break the statements a `while` condition is spliced into.
/// Not a defence against hostile SQL: the condition is trusted configuration.
fn check_condition(condition: &str) -> Result<(), &'static str> {
    if condition.trim().is_empty() {
        return Err("must not be empty");
    }
    if condition.len() > 1000 {
        return Err("must be at most 1000 characters");
    }
    let mut depth = 0i32;
    let mut quoted = false;
    let mut previous = ' ';
    for c in condition.chars() {
        if c == '\'' {
            quoted = !quoted;
        } else if !quoted {
            match c {
                ';' => return Err("must be one condition, without ;"),
                '$' => return Err("must not contain $ (parameters and dollar quoting)"),
                '-' if previous == '-' => return Err("must not contain comments (--)"),
                '*' if previous == '/' => return Err("must not contain comments (/*)"),
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth < 0 {
                        return Err("has unbalanced parentheses");
                    }
                }
                _ => {}
            }
        }
        previous = c;
    }
    if quoted {
        return Err("has an unterminated string literal");
    }
    if depth != 0 {
        return Err("has unbalanced parentheses");
    }
    Ok(())
}

/// The rules of [`SAMPLE_ACCOUNTING_RULES`] for the sample database at `url`.
///
/// Built in code rather than parsed from the file so that it cannot fail at run time; a test
/// checks that the two agree.
pub fn sample_config(url: &str) -> SqlConnectorConfig {
    let s = |v: &str| v.to_string();
    let strings = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let rule = |table: &str, action: Action| TableRule {
        table: s(table),
        action,
        parent: Some(ParentLink {
            table: s("customers"),
            column: s("customer_id"),
            parent_column: s("id"),
        }),
        match_columns: BTreeMap::new(),
        anonymize: BTreeMap::new(),
        export: Vec::new(),
        rectify: BTreeMap::new(),
        restrict_column: None,
        suppress_column: None,
        retain: None,
    };
    let books = |basis: &str, years: u32, from_column: &str| Retention {
        basis: s(basis),
        years,
        from_column: s(from_column),
        fiscal_year_end: s("12-31"),
        while_condition: None,
        while_basis: None,
        recheck_days: DEFAULT_RECHECK_DAYS,
        keep_columns: Vec::new(),
    };
    SqlConnectorConfig {
        url: s(url),
        tables: vec![
            rule("contacts", Action::Delete),
            TableRule {
                anonymize: [(s("customer_email"), AnonymizeWith::Null)]
                    .into_iter()
                    .collect(),
                export: strings(&[
                    "id",
                    "issued_on",
                    "amount_cents",
                    "status",
                    "customer_name",
                    "customer_email",
                ]),
                retain: Some(Retention {
                    while_condition: Some(s("status IN ('open', 'collection')")),
                    while_basis: Some(s(
                        "Avoin saatava tai perintä (laki saatavien perinnästä 513/1999) / \
                         open receivable or debt collection in progress",
                    )),
                    ..books(
                        "Kirjanpitolaki 1336/1997 2:10 § (tositteet 6 vuotta tilikauden \
                         päättymisestä / vouchers: 6 years after the end of the fiscal year)",
                        6,
                        "issued_on",
                    )
                }),
                ..rule("invoices", Action::Delete)
            },
            TableRule {
                anonymize: [
                    (s("customer_id"), AnonymizeWith::Null),
                    (s("description"), AnonymizeWith::Redacted),
                ]
                .into_iter()
                .collect(),
                retain: Some(Retention {
                    keep_columns: strings(&["description"]),
                    ..books(
                        "Kirjanpitolaki 1336/1997 2:10 § (kirjanpitokirjat 10 vuotta \
                         tilikauden päättymisestä / books: 10 years after the end of the \
                         fiscal year)",
                        10,
                        "booked_on",
                    )
                }),
                ..rule("ledger_entries", Action::Anonymize)
            },
            TableRule {
                parent: None,
                match_columns: [
                    (s("email"), s("email")),
                    (s("customer_number"), s("customer_no")),
                    (s("phone"), s("phone")),
                    (s("national_id"), s("national_id")),
                ]
                .into_iter()
                .collect(),
                anonymize: [
                    (s("name"), AnonymizeWith::Redacted),
                    (s("email"), AnonymizeWith::Null),
                    (s("phone"), AnonymizeWith::Null),
                    (s("national_id"), AnonymizeWith::Null),
                    (s("address"), AnonymizeWith::Null),
                ]
                .into_iter()
                .collect(),
                export: strings(&[
                    "customer_no",
                    "name",
                    "email",
                    "phone",
                    "national_id",
                    "address",
                    "processing_restricted",
                    "marketing_opt_out",
                ]),
                rectify: [
                    (s("email"), s("email")),
                    (s("phone"), s("phone")),
                    (s("name"), s("name")),
                    (s("address"), s("address")),
                ]
                .into_iter()
                .collect(),
                restrict_column: Some(s("processing_restricted")),
                suppress_column: Some(s("marketing_opt_out")),
                ..rule("customers", Action::Delete)
            },
        ],
    }
}

/// Creates the sample accounting schema and seed data at `url` unless a `customers` table
/// already exists there.
pub async fn create_sample_accounting_db(url: &str) -> anyhow::Result<()> {
    let db = Db::connect(url).await?;
    let result = create_sample_in(&db).await;
    // Closing explicitly lets SQLite checkpoint and PostgreSQL drop the sessions now rather
    // than whenever the pool happens to be dropped.
    db.pool.close().await;
    result
}

async fn create_sample_in(db: &Db) -> anyhow::Result<()> {
    let exists = match db.backend {
        Backend::Sqlite => {
            "SELECT CAST(COUNT(*) AS BIGINT) FROM sqlite_master \
             WHERE type = 'table' AND name = 'customers'"
        }
        Backend::Postgres => {
            "SELECT CAST(COUNT(*) AS BIGINT) FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_name = 'customers'"
        }
    };
    let found: i64 = sqlx::query_scalar(exists)
        .fetch_one(&db.pool)
        .await
        .context("checking for the customers table")?;
    if found > 0 {
        return Ok(());
    }
    // One transaction, so that a failure leaves no half-built schema that the existence
    // check above would then mistake for a complete one.
    let mut tx = db.pool.begin().await.context("starting a transaction")?;
    for statement in sample_statements() {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .with_context(|| {
                let head: String = statement.chars().take(60).collect();
                format!("creating the sample accounting database: {head}...")
            })?;
    }
    tx.commit()
        .await
        .context("committing the sample database")?;
    Ok(())
}

/// The statements of the sample SQL. Drivers run one statement per prepared query, hence the
/// split; the file promises no semicolons inside comments or values.
fn sample_statements() -> impl Iterator<Item = &'static str> {
    SAMPLE_ACCOUNTING_SQL.split(';').map(str::trim).filter(|s| {
        s.lines()
            .any(|l| !l.trim().is_empty() && !l.trim().starts_with("--"))
    })
}

/// What an erasure did in one database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErasureReport {
    /// How many rows were erased or anonymized.
    pub records_affected: i64,
    /// A human-readable account of the work, safe to store and show: it never contains the
    /// subject's identity values.
    pub note: String,
    /// False when the database holds no data on the subject.
    pub found: bool,
    /// Set when rows are kept under a legal obligation.
    pub retained: Option<RetentionReport>,
}

/// What an erasure keeps under `retain` rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    /// The bases of the rules that keep rows, children first as the tables are handled,
    /// joined with `"; "`.
    pub legal_basis: String,
    /// When the next kept row is released (ms since the epoch): the moment to erase again.
    pub until_ms: i64,
    /// How many rows the rules keep (matched rows kept for them not counted).
    pub rows: i64,
}

/// What an export, rectification, restriction or objection did.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkReport {
    /// Rows exported or changed; 0 means the subject was not found.
    pub records_affected: i64,
    /// A human-readable account of the work, without identity or corrected values.
    pub note: String,
    /// For exports: table name to the subject's rows, each an object of the `export` columns.
    pub export: Option<serde_json::Value>,
}

/// Carries out data-subject requests in one SQL database according to a
/// [`SqlConnectorConfig`].
#[derive(Debug, Clone)]
pub struct SqlConnector {
    config: SqlConnectorConfig,
    db: Db,
}

impl SqlConnector {
    /// Validates `config` and connects to its database.
    pub async fn connect(config: SqlConnectorConfig) -> anyhow::Result<Self> {
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!(
                "invalid sql connector configuration: {}",
                problems.join("; ")
            );
        }
        let db = Db::connect(&config.url).await?;
        Ok(Self { config, db })
    }

    /// The configuration this connector runs.
    pub fn config(&self) -> &SqlConnectorConfig {
        &self.config
    }

    async fn begin(&self) -> Result<Transaction<'static, Any>, ConnectorError> {
        self.db
            .pool
            .begin()
            .await
            .map_err(|e| classify("starting a transaction", &e))
    }

    /// Erases the subject's rows in every configured table as of `now_ms`, in one
    /// transaction: rows no obligation keeps get the table's action; kept rows lose the
    /// personal data the obligation does not need (see the module documentation). Only RAW
    /// identities of a type some table matches are used.
    ///
    /// Running it again finds only what is still kept, and answers `found: false` once
    /// nothing is left.
    pub async fn erase(
        &self,
        identities: &[SubjectIdentity],
        now_ms: i64,
    ) -> Result<ErasureReport, ConnectorError> {
        let plan = plan_erasure(&self.config, identities, now_ms)?;
        let mut tx = self.begin().await?;
        let mut total: i64 = 0;
        let mut found = false;
        let mut notes = Vec::with_capacity(plan.len());
        let mut kept_rows: i64 = 0;
        let mut next_release: Option<i64> = None;
        let mut bases: Vec<&str> = Vec::new();
        for step in &plan {
            let rule = step.rule;
            let table = rule.table.as_str();
            let Some(work) = &step.work else {
                notes.push(if rule.action == Action::Keep {
                    format!("{table}: kept (action keep)")
                } else {
                    format!("{table}: skipped (no identity of a type it matches)")
                });
                continue;
            };
            let retained = match (&work.probe, &rule.retain) {
                (Some(probe), Some(retain)) => {
                    let rows = fetch_dates(&mut tx, probe)
                        .await
                        .map_err(|e| classify(&format!("reading the dates of {table}"), &e))?;
                    Some(assess(table, retain, &rows, now_ms)?)
                }
                _ => None,
            };
            let kept = match &work.count_kept {
                Some(count) => fetch_count(&mut tx, count)
                    .await
                    .map_err(|e| classify(&format!("counting the kept rows of {table}"), &e))?,
                None => 0,
            };
            let anonymized = match &work.anonymize_kept {
                Some(update) => execute(&mut tx, update)
                    .await
                    .map_err(|e| classify(&format!("anonymizing {table}"), &e))?,
                None => 0,
            };
            let done = execute(&mut tx, &work.main)
                .await
                .map_err(|e| classify(&format!("{} {table}", rule.action.doing()), &e))?;
            total = total.saturating_add(done).saturating_add(anonymized);
            found |= done > 0 || kept > 0;
            tracing::debug!(
                table,
                action = rule.action.done(),
                rows = done,
                kept,
                anonymized,
                "sql rule applied"
            );

            let mut note = format!("{table}: {} {done}", rule.action.done());
            if kept > 0 {
                note.push_str(&format!(", kept {kept}"));
                if let Some(k) = &retained {
                    if let Some(day) = k.last_day {
                        note.push_str(&format!(" until the end of {}", format_date(day)));
                    }
                    if k.by_condition > 0 {
                        note.push_str(&format!(
                            " ({} while its retain condition holds, checked again on {})",
                            k.by_condition,
                            format_date(civil_from_days(k.recheck_at_ms.div_euclid(DAY_MS)))
                        ));
                    }
                }
                if retained.as_ref().is_none_or(|k| k.rows == 0) && !work.held_for.is_empty() {
                    note.push_str(&format!(
                        " for the kept rows of {}",
                        work.held_for.join(", ")
                    ));
                }
                if work.anonymize_kept.is_some() {
                    note.push_str(&format!(" (anonymized {anonymized})"));
                }
            }
            notes.push(note);
            if let Some(k) = retained {
                kept_rows += k.rows;
                if let Some(at) = k.next_release_ms {
                    next_release = Some(next_release.map_or(at, |n| n.min(at)));
                }
                for basis in k.bases {
                    if !bases.contains(&basis) {
                        bases.push(basis);
                    }
                }
            }
        }
        tx.commit()
            .await
            .map_err(|e| classify("committing the erasure", &e))?;
        Ok(ErasureReport {
            records_affected: total,
            note: notes.join("; "),
            found,
            retained: (kept_rows > 0).then(|| RetentionReport {
                legal_basis: bases.join("; "),
                until_ms: next_release.unwrap_or(now_ms),
                rows: kept_rows,
            }),
        })
    }

    /// The subject's rows of every table with `export` columns, as
    /// `{"table": [{"column": value, ...}, ...], ...}`, read in one transaction.
    pub async fn export(
        &self,
        identities: &[SubjectIdentity],
    ) -> Result<WorkReport, ConnectorError> {
        let raw = usable_identities(&self.config, identities)?;
        let mut tx = self.begin().await?;
        let mut tables = serde_json::Map::new();
        let mut total: i64 = 0;
        let mut notes = Vec::new();
        for rule in self.config.tables.iter().filter(|t| !t.export.is_empty()) {
            let mut binds = Binds::default();
            let Some(filter) = subject_filter(&self.config, rule, &raw, &mut binds) else {
                notes.push(format!(
                    "{}: skipped (no identity of a type it matches)",
                    rule.table
                ));
                continue;
            };
            let columns: Vec<String> = rule.export.iter().map(|c| quote(c)).collect();
            let order: Vec<String> = (1..=columns.len()).map(|i| i.to_string()).collect();
            let select = binds.finish(format!(
                "SELECT {} FROM {} WHERE {filter} ORDER BY {}",
                columns.join(", "),
                quote(&rule.table),
                order.join(", ")
            ));
            let fetched = bind_all(sqlx::query(&select.sql), &select.binds)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| classify(&format!("exporting {}", rule.table), &e))?;
            let mut rows = Vec::with_capacity(fetched.len());
            for row in &fetched {
                let mut object = serde_json::Map::new();
                for (i, column) in rule.export.iter().enumerate() {
                    let value = json_value(row, i)
                        .map_err(|e| classify(&format!("exporting {}.{column}", rule.table), &e))?;
                    object.insert(column.clone(), value);
                }
                rows.push(serde_json::Value::Object(object));
            }
            notes.push(format!("{}: exported {}", rule.table, rows.len()));
            total = total.saturating_add(i64::try_from(rows.len()).unwrap_or(i64::MAX));
            tables.insert(rule.table.clone(), serde_json::Value::Array(rows));
        }
        tx.commit()
            .await
            .map_err(|e| classify("finishing the export", &e))?;
        Ok(WorkReport {
            records_affected: total,
            note: notes.join("; "),
            export: Some(serde_json::Value::Object(tables)),
        })
    }

    /// Writes the corrected values into the columns the `rectify` maps name, in every table
    /// that maps the field, in one transaction. A field no table maps is a permanent error,
    /// and nothing is changed.
    pub async fn rectify(
        &self,
        identities: &[SubjectIdentity],
        corrections: &[FieldCorrection],
    ) -> Result<WorkReport, ConnectorError> {
        let corrections = check_corrections(&self.config, corrections)?;
        let raw = usable_identities(&self.config, identities)?;
        let mut tx = self.begin().await?;
        let mut total: i64 = 0;
        let mut notes = Vec::new();
        for rule in self.config.children_first() {
            let applicable: Vec<(&str, &String, &str)> = corrections
                .iter()
                .filter_map(|(field, value)| Some((*field, rule.rectify.get(*field)?, *value)))
                .collect();
            if applicable.is_empty() {
                continue;
            }
            let fields: Vec<&str> = applicable.iter().map(|(f, _, _)| *f).collect();
            let mut binds = Binds::default();
            let set: Vec<String> = applicable
                .iter()
                .map(|(_, column, value)| format!("{} = {}", quote(column), binds.add(*value)))
                .collect();
            let Some(filter) = subject_filter(&self.config, rule, &raw, &mut binds) else {
                notes.push(format!(
                    "{}: skipped (no identity of a type it matches)",
                    rule.table
                ));
                continue;
            };
            let update = binds.finish(format!(
                "UPDATE {} SET {} WHERE {filter}",
                quote(&rule.table),
                set.join(", ")
            ));
            let done = execute(&mut tx, &update)
                .await
                .map_err(|e| classify(&format!("rectifying {}", rule.table), &e))?;
            total = total.saturating_add(done);
            notes.push(format!(
                "{}: updated {done} ({})",
                rule.table,
                fields.join(", ")
            ));
        }
        tx.commit()
            .await
            .map_err(|e| classify("committing the rectification", &e))?;
        Ok(WorkReport {
            records_affected: total,
            note: notes.join("; "),
            export: None,
        })
    }

    /// Sets (`lift: false`) or lifts a restriction of processing: the `restrict_column` of the
    /// subject's rows becomes 1 or 0.
    pub async fn restrict(
        &self,
        identities: &[SubjectIdentity],
        lift: bool,
    ) -> Result<WorkReport, ConnectorError> {
        let (value, verb) = if lift {
            (0, "restriction lifted")
        } else {
            (1, "restricted")
        };
        self.set_flag(identities, |t| t.restrict_column.as_ref(), value, verb)
            .await
    }

    /// Records an objection to direct marketing: the `suppress_column` of the subject's rows
    /// becomes 1.
    pub async fn suppress(
        &self,
        identities: &[SubjectIdentity],
    ) -> Result<WorkReport, ConnectorError> {
        self.set_flag(identities, |t| t.suppress_column.as_ref(), 1, "opted out")
            .await
    }

    async fn set_flag(
        &self,
        identities: &[SubjectIdentity],
        column_of: fn(&TableRule) -> Option<&String>,
        value: u8,
        verb: &str,
    ) -> Result<WorkReport, ConnectorError> {
        let raw = usable_identities(&self.config, identities)?;
        let mut tx = self.begin().await?;
        let mut total: i64 = 0;
        let mut notes = Vec::new();
        for rule in self.config.children_first() {
            let Some(column) = column_of(rule) else {
                continue;
            };
            let mut binds = Binds::default();
            let Some(filter) = subject_filter(&self.config, rule, &raw, &mut binds) else {
                notes.push(format!(
                    "{}: skipped (no identity of a type it matches)",
                    rule.table
                ));
                continue;
            };
            // The value is a constant of the code, not request data.
            let update = binds.finish(format!(
                "UPDATE {} SET {} = {value} WHERE {filter}",
                quote(&rule.table),
                quote(column)
            ));
            let done = execute(&mut tx, &update)
                .await
                .map_err(|e| classify(&format!("updating {}.{column}", rule.table), &e))?;
            total = total.saturating_add(done);
            notes.push(format!("{}: {verb} {done}", rule.table));
        }
        tx.commit()
            .await
            .map_err(|e| classify("committing the change", &e))?;
        Ok(WorkReport {
            records_affected: total,
            note: notes.join("; "),
            export: None,
        })
    }
}

impl crate::Connector for SqlConnector {
    fn kind_name(&self) -> &'static str {
        "sql"
    }

    fn supports(&self, kind: RequestKind) -> bool {
        self.config.supports(kind)
    }

    fn run<'a>(&'a self, task: &'a Task) -> crate::BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            let kind = task.kind;
            if !self.config.supports(kind) {
                return Ok(Outcome::Refused {
                    reason: format!(
                        "the sql connector is not configured for {}",
                        crate::kind_label(kind)
                    ),
                });
            }
            let ids = &task.identities;
            match (&task.phase, kind) {
                (Phase::Confirm { .. }, _) => Err(ConnectorError::Permanent(
                    "the sql connector finishes its work in one run; there is nothing to confirm"
                        .into(),
                )),
                (Phase::Start | Phase::RetentionExpired, RequestKind::Erasure) => {
                    let report = self.erase(ids, task.now_ms).await?;
                    Ok(erasure_outcome(report, &task.phase))
                }
                (Phase::RetentionExpired, _) => Err(ConnectorError::Permanent(format!(
                    "only erasures keep data under retention, not {}",
                    crate::kind_label(kind)
                ))),
                (Phase::Start, RequestKind::ReturnOfData | RequestKind::Transfer) => {
                    Ok(work_outcome(self.export(ids).await?))
                }
                (Phase::Start, RequestKind::Rectification) => Ok(work_outcome(
                    self.rectify(ids, &task.parameters.corrections).await?,
                )),
                (Phase::Start, RequestKind::Restriction) => Ok(work_outcome(
                    self.restrict(ids, task.parameters.lift_restriction).await?,
                )),
                (Phase::Start, RequestKind::Objection) => {
                    Ok(work_outcome(self.suppress(ids).await?))
                }
                (Phase::Start, RequestKind::Unspecified) => Ok(Outcome::Refused {
                    reason: "the request kind is unspecified".into(),
                }),
            }
        })
    }
}

fn erasure_outcome(report: ErasureReport, phase: &Phase) -> Outcome {
    match report.retained {
        Some(kept) => Outcome::Retained {
            legal_basis: kept.legal_basis,
            until_ms: kept.until_ms,
            records_affected: report.records_affected,
            note: report.note,
        },
        // The first run found the subject; finding nothing later means nothing is left.
        None if report.found || *phase == Phase::RetentionExpired => Outcome::Completed {
            records_affected: report.records_affected,
            note: if report.found {
                report.note
            } else {
                format!("nothing left to erase: {}", report.note)
            },
            export: None,
        },
        None => Outcome::NotFound { note: report.note },
    }
}

fn work_outcome(report: WorkReport) -> Outcome {
    if report.records_affected > 0 {
        Outcome::Completed {
            records_affected: report.records_affected,
            note: report.note,
            export: report.export,
        }
    } else {
        Outcome::NotFound { note: report.note }
    }
}

/// The corrections as (field, value), lowercased fields; every field must be mapped by some
/// table and appear once.
fn check_corrections<'a>(
    config: &'a SqlConnectorConfig,
    corrections: &'a [FieldCorrection],
) -> Result<Vec<(&'a str, &'a str)>, ConnectorError> {
    if corrections.is_empty() {
        return Err(ConnectorError::Permanent(
            "the rectification carries no corrections".into(),
        ));
    }
    let mapped: BTreeSet<&'a str> = config
        .tables
        .iter()
        .flat_map(|t| t.rectify.keys().map(String::as_str))
        .collect();
    let mut out: Vec<(&'a str, &'a str)> = Vec::with_capacity(corrections.len());
    let mut unknown = Vec::new();
    for c in corrections {
        let field = c.field.trim();
        // The configuration's spelling: fields are lowercase there.
        let Some(&known) = mapped.iter().find(|m| m.eq_ignore_ascii_case(field)) else {
            unknown.push(format!("{field:?}"));
            continue;
        };
        if out.iter().any(|(f, _)| *f == known) {
            return Err(ConnectorError::Permanent(format!(
                "the field {known:?} is corrected more than once"
            )));
        }
        out.push((known, c.new_value.as_str()));
    }
    if !unknown.is_empty() {
        let known: Vec<&str> = mapped.into_iter().collect();
        return Err(ConnectorError::Permanent(format!(
            "no table maps the corrected field(s) {}; this database can correct {}",
            unknown.join(", "),
            if known.is_empty() {
                "nothing".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    Ok(out)
}

impl Action {
    fn done(self) -> &'static str {
        match self {
            Action::Delete => "deleted",
            Action::Anonymize => "anonymized",
            Action::Keep => "kept",
        }
    }

    fn doing(self) -> &'static str {
        match self {
            Action::Delete => "deleting from",
            Action::Anonymize => "anonymizing",
            Action::Keep => "keeping",
        }
    }
}

/// One SQL statement and the values of its `$1`, `$2`, ... parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    sql: String,
    binds: Vec<String>,
}

/// The values bound so far while a statement is built.
#[derive(Debug, Default)]
struct Binds(Vec<String>);

impl Binds {
    /// Binds `value` and returns its placeholder.
    fn add(&mut self, value: impl Into<String>) -> String {
        self.0.push(value.into());
        format!("${}", self.0.len())
    }

    fn finish(self, sql: String) -> Statement {
        Statement { sql, binds: self.0 }
    }
}

/// One table's part of an erasure, in the order the tables are handled.
#[derive(Debug)]
struct ErasureStep<'a> {
    rule: &'a TableRule,
    /// `None` for `keep` tables and tables no identity of the request applies to.
    work: Option<ErasureWork>,
}

#[derive(Debug)]
struct ErasureWork {
    /// For `retain` tables: each subject row's date (as text) and whether `while` holds (1/0).
    probe: Option<Statement>,
    /// For tables that can keep rows: how many of the subject's rows are kept now.
    count_kept: Option<Statement>,
    /// Anonymizes in the kept rows what the obligation does not need.
    anonymize_kept: Option<Statement>,
    /// The table's action on the rows that are not kept.
    main: Statement,
    /// The child tables whose kept rows keep this table's rows.
    held_for: Vec<String>,
}

/// The statements for erasing the subject known by `identities` as of `now_ms`, children
/// first.
fn plan_erasure<'a>(
    config: &'a SqlConnectorConfig,
    identities: &[SubjectIdentity],
    now_ms: i64,
) -> Result<Vec<ErasureStep<'a>>, ConnectorError> {
    let raw = usable_identities(config, identities)?;
    Ok(config
        .children_first()
        .map(|rule| ErasureStep {
            rule,
            work: match rule.action {
                Action::Keep => None,
                Action::Delete | Action::Anonymize => {
                    plan_table_erasure(config, rule, &raw, now_ms)
                }
            },
        })
        .collect())
}

fn plan_table_erasure(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    raw: &[(IdentityType, String)],
    now_ms: i64,
) -> Option<ErasureWork> {
    let table = quote(&rule.table);
    // None when no identity of the request applies to the table: then it is skipped.
    subject_filter(config, rule, raw, &mut Binds::default())?;
    let filter = |b: &mut Binds| subject_filter(config, rule, raw, b).unwrap_or_default();
    let keep = |b: &mut Binds| keep_condition(config, rule, now_ms, b);
    let keeps = keep(&mut Binds::default()).is_some();

    let main = {
        let mut b = Binds::default();
        let set = (rule.action == Action::Anonymize).then(|| {
            anonymize_clauses(rule.anonymize.iter().map(|(c, w)| (c.as_str(), *w)), &mut b)
        });
        let mut conditions = vec![filter(&mut b)];
        if let Some(kept) = keep(&mut b) {
            conditions.push(format!("{kept} = 0"));
        }
        match set {
            None => b.finish(format!(
                "DELETE FROM {table} WHERE {}",
                conditions.join(" AND ")
            )),
            Some((set, pending)) => {
                conditions.push(pending);
                b.finish(format!(
                    "UPDATE {table} SET {set} WHERE {}",
                    conditions.join(" AND ")
                ))
            }
        }
    };

    // Kept rows must stay findable: through the link to the parent, or by the columns the
    // request's identities match.
    let mut findable: BTreeSet<&str> = BTreeSet::new();
    if let Some(link) = &rule.parent {
        findable.insert(&link.column);
    }
    for (ty, _) in raw {
        if let Some(column) = match_key(*ty).and_then(|k| rule.match_columns.get(k)) {
            findable.insert(column);
        }
    }
    let needed: BTreeSet<&str> = rule
        .retain
        .iter()
        .flat_map(|r| r.keep_columns.iter().map(String::as_str))
        .collect();
    let anonymize_now: Vec<(&str, AnonymizeWith)> = rule
        .anonymize
        .iter()
        .map(|(c, w)| (c.as_str(), *w))
        .filter(|(c, _)| !findable.contains(c) && !needed.contains(c))
        .collect();
    let anonymize_kept = (keeps && !anonymize_now.is_empty()).then(|| {
        let mut b = Binds::default();
        let (set, pending) = anonymize_clauses(anonymize_now.into_iter(), &mut b);
        let f = filter(&mut b);
        let kept = keep(&mut b).unwrap_or_default();
        b.finish(format!(
            "UPDATE {table} SET {set} WHERE {f} AND {kept} = 1 AND {pending}"
        ))
    });
    let count_kept = keeps.then(|| {
        let mut b = Binds::default();
        let f = filter(&mut b);
        let kept = keep(&mut b).unwrap_or_default();
        b.finish(format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {table} WHERE {f} AND {kept} = 1"
        ))
    });
    let probe = rule.retain.as_ref().map(|r| {
        let mut b = Binds::default();
        let f = filter(&mut b);
        let holds = match &r.while_condition {
            Some(condition) => format!("CASE WHEN ({condition}) THEN 1 ELSE 0 END"),
            None => "0".to_string(),
        };
        b.finish(format!(
            "SELECT CAST({table}.{} AS TEXT), {holds} FROM {table} WHERE {f}",
            quote(&r.from_column)
        ))
    });
    Some(ErasureWork {
        probe,
        count_kept,
        anonymize_kept,
        main,
        held_for: config
            .retained_children(rule)
            .into_iter()
            .map(|(child, _)| child.table.clone())
            .collect(),
    })
}

/// `(CASE WHEN <kept> THEN 1 ELSE 0 END)` for a table whose rows can be kept: by its own
/// `retain`, or (for a matched table) because a child row found through the row is kept.
/// Never NULL, so that `= 0` and `= 1` split the rows in two.
fn keep_condition(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    now_ms: i64,
    b: &mut Binds,
) -> Option<String> {
    let mut terms = Vec::new();
    if let Some(retain) = &rule.retain {
        terms.push(retained_condition(&rule.table, retain, now_ms, b));
    }
    for (child, link) in config.retained_children(rule) {
        let Some(retain) = &child.retain else {
            continue;
        };
        let c = quote(&child.table);
        terms.push(format!(
            "EXISTS (SELECT 1 FROM {c} WHERE {c}.{} = {}.{} AND {})",
            quote(&link.column),
            quote(&rule.table),
            quote(&link.parent_column),
            retained_condition(&child.table, retain, now_ms, b)
        ));
    }
    (!terms.is_empty()).then(|| format!("(CASE WHEN {} THEN 1 ELSE 0 END)", terms.join(" OR ")))
}

/// Whether a row of `table` is kept by `retain` at `now_ms`: its date is not past the period
/// (compared as ISO text, see [`Retention::release_before`]), or `while` holds.
fn retained_condition(table: &str, retain: &Retention, now_ms: i64, b: &mut Binds) -> String {
    let date = format!(
        "CAST({}.{} AS TEXT) >= {}",
        quote(table),
        quote(&retain.from_column),
        b.add(retain.release_before(now_ms))
    );
    match &retain.while_condition {
        Some(condition) => format!("({date} OR ({condition}))"),
        None => format!("({date})"),
    }
}

/// `SET` list and "not yet anonymized" condition (so that rows already done are not counted
/// again) for `columns`.
fn anonymize_clauses<'c>(
    columns: impl Iterator<Item = (&'c str, AnonymizeWith)>,
    b: &mut Binds,
) -> (String, String) {
    let mut set = Vec::new();
    let mut pending = Vec::new();
    for (column, with) in columns {
        let q = quote(column);
        match with {
            AnonymizeWith::Null => {
                set.push(format!("{q} = NULL"));
                pending.push(format!("{q} IS NOT NULL"));
            }
            AnonymizeWith::Redacted => {
                let p = b.add(REDACTED);
                set.push(format!("{q} = {p}"));
                pending.push(format!("({q} IS NULL OR {q} <> {p})"));
            }
        }
    }
    (set.join(", "), format!("({})", pending.join(" OR ")))
}

/// What a `retain` table keeps of the subject's rows.
#[derive(Debug, Default)]
struct Kept<'a> {
    rows: i64,
    /// When the first kept row is released (or checked again).
    next_release_ms: Option<i64>,
    /// The last day of the period of the row kept longest by its date.
    last_day: Option<Date>,
    /// Rows past their period kept only by `while`.
    by_condition: i64,
    recheck_at_ms: i64,
    bases: Vec<&'a str>,
}

/// Which of the subject's rows (`(date, while holds)`) `retain` keeps at `now_ms`, and until
/// when: the same rule as the statements', computed in Rust so that both backends agree.
fn assess<'a>(
    table: &str,
    retain: &'a Retention,
    rows: &[(Option<String>, i64)],
    now_ms: i64,
) -> Result<Kept<'a>, ConnectorError> {
    let recheck_at_ms = now_ms.saturating_add(i64::from(retain.recheck_days) * DAY_MS);
    let mut kept = Kept {
        recheck_at_ms,
        ..Kept::default()
    };
    for (text, holds) in rows {
        let Some(date) = text.as_deref().and_then(parse_iso_date) else {
            return Err(ConnectorError::Permanent(format!(
                "{table}: a row of the subject has no date in {} (YYYY-MM-DD expected), so \
                 its retention cannot be computed",
                retain.from_column
            )));
        };
        let expires_at = retain.expires_at_ms(date);
        let (until, basis) = if expires_at > now_ms {
            kept.last_day = kept.last_day.max(Some(retain.last_day(date)));
            (expires_at, retain.basis.as_str())
        } else if *holds != 0 {
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

/// The RAW identities of a type some table matches, normalized; a permanent error when
/// there are none.
fn usable_identities(
    config: &SqlConnectorConfig,
    identities: &[SubjectIdentity],
) -> Result<Vec<(IdentityType, String)>, ConnectorError> {
    let usable_keys = config.usable_keys();
    let raw: Vec<(IdentityType, String)> = identities
        .iter()
        .filter(|id| IdentityEncoding::try_from(id.encoding) == Ok(IdentityEncoding::Raw))
        .filter_map(|id| {
            let ty = IdentityType::try_from(id.r#type).ok()?;
            let key = match_key(ty)?;
            let value = normalize(ty, &id.value);
            (usable_keys.contains(key) && !value.is_empty()).then_some((ty, value))
        })
        .collect();
    if raw.is_empty() {
        let wanted: Vec<&str> = usable_keys.into_iter().collect();
        return Err(ConnectorError::Permanent(format!(
            "the sql connector needs a raw identity of type {} (configured match columns); \
             hashed identities cannot be matched in SQL",
            wanted.join(", ")
        )));
    }
    Ok(raw)
}

/// The condition selecting the subject's rows of `rule`: its own match columns, or its
/// parent's through the link; `None` when no identity applies.
fn subject_filter(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    identities: &[(IdentityType, String)],
    binds: &mut Binds,
) -> Option<String> {
    match &rule.parent {
        None => match_clause(&rule.match_columns, identities, binds),
        Some(link) => {
            let parent = config.tables.iter().find(|t| t.table == link.table)?;
            let parent_filter = match_clause(&parent.match_columns, identities, binds)?;
            Some(format!(
                "{} IN (SELECT {} FROM {} WHERE {parent_filter})",
                quote(&link.column),
                quote(&link.parent_column),
                quote(&link.table)
            ))
        }
    }
}

/// `(a = $n OR b = $m ...)` over every identity whose type the table matches, with the values
/// bound; `None` when no identity applies.
fn match_clause(
    columns: &BTreeMap<String, String>,
    identities: &[(IdentityType, String)],
    binds: &mut Binds,
) -> Option<String> {
    let mut terms = Vec::new();
    for (ty, value) in identities {
        let Some(column) = match_key(*ty).and_then(|k| columns.get(k)) else {
            continue;
        };
        let p = binds.add(value.clone());
        // Stored addresses keep whatever case they were typed in; the value is already
        // lowercased by normalize().
        terms.push(if *ty == IdentityType::Email {
            format!("lower({}) = {p}", quote(column))
        } else {
            format!("{} = {p}", quote(column))
        });
    }
    (!terms.is_empty()).then(|| format!("({})", terms.join(" OR ")))
}

fn match_key(ty: IdentityType) -> Option<&'static str> {
    MATCH_KEYS.iter().find(|(_, t)| *t == ty).map(|(k, _)| *k)
}

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    binds: &[String],
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    for value in binds {
        query = query.bind(value.clone());
    }
    query
}

async fn execute(tx: &mut Transaction<'static, Any>, s: &Statement) -> Result<i64, sqlx::Error> {
    let done = bind_all(sqlx::query(&s.sql), &s.binds)
        .execute(&mut **tx)
        .await?;
    Ok(i64::try_from(done.rows_affected()).unwrap_or(i64::MAX))
}

async fn fetch_count(
    tx: &mut Transaction<'static, Any>,
    s: &Statement,
) -> Result<i64, sqlx::Error> {
    let row = bind_all(sqlx::query(&s.sql), &s.binds)
        .fetch_one(&mut **tx)
        .await?;
    row.try_get(0)
}

async fn fetch_dates(
    tx: &mut Transaction<'static, Any>,
    s: &Statement,
) -> Result<Vec<(Option<String>, i64)>, sqlx::Error> {
    let rows = bind_all(sqlx::query(&s.sql), &s.binds)
        .fetch_all(&mut **tx)
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// Column `i` of `row` as JSON, by the type the database reports.
fn json_value(row: &AnyRow, i: usize) -> Result<serde_json::Value, sqlx::Error> {
    use serde_json::Value;
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let kind = raw.type_info().kind();
    Ok(match kind {
        AnyTypeInfoKind::Null => Value::Null,
        AnyTypeInfoKind::Bool => Value::Bool(row.try_get(i)?),
        AnyTypeInfoKind::SmallInt | AnyTypeInfoKind::Integer | AnyTypeInfoKind::BigInt => {
            Value::from(row.try_get::<i64, _>(i)?)
        }
        AnyTypeInfoKind::Real | AnyTypeInfoKind::Double => {
            serde_json::Number::from_f64(row.try_get::<f64, _>(i)?)
                .map_or(Value::Null, Value::Number)
        }
        AnyTypeInfoKind::Text => Value::String(row.try_get(i)?),
        AnyTypeInfoKind::Blob => Value::String(
            row.try_get::<Vec<u8>, _>(i)?
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        ),
    })
}

fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= 63
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Double-quotes a validated identifier. Validation already excludes quotes; quoting keeps
/// reserved words (a table named `order`) usable.
fn quote(identifier: &str) -> String {
    format!("\"{identifier}\"")
}

/// Sorts a database error into worth-retrying or not; `context` says what was being done.
fn classify(context: &str, err: &sqlx::Error) -> ConnectorError {
    let message = format!("{context}: {err}");
    if is_transient(err) {
        ConnectorError::Transient(message)
    } else {
        ConnectorError::Permanent(message)
    }
}

fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let message = db.message().to_ascii_lowercase();
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            // SQLite reports extended result codes; the low byte is the primary one, and
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6) mean another writer holds the database.
            let sqlite_busy = code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6));
            // PostgreSQL: connection exceptions (08), serialization failures and deadlocks,
            // insufficient resources (53), shutdown or start-up (57P0x), lock not available.
            let postgres_transient = code.starts_with("08")
                || code.starts_with("53")
                || matches!(
                    code.as_str(),
                    "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03"
                );
            sqlite_busy
                || postgres_transient
                || message.contains("database is locked")
                || message.contains("database table is locked")
        }
        other => {
            let text = other.to_string().to_ascii_lowercase();
            text.contains("connection refused")
                || text.contains("connection reset")
                || text.contains("timed out")
        }
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::RequestParameters;
    use serde_json::json;

    use super::*;
    use crate::Connector as _;

    const VOUCHERS: &str = "Kirjanpitolaki 1336/1997 2:10 § (tositteet 6 vuotta tilikauden \
                            päättymisestä / vouchers: 6 years after the end of the fiscal year)";
    const BOOKS: &str = "Kirjanpitolaki 1336/1997 2:10 § (kirjanpitokirjat 10 vuotta tilikauden \
                         päättymisestä / books: 10 years after the end of the fiscal year)";
    const OPEN: &str = "Avoin saatava tai perintä (laki saatavien perinnästä 513/1999) / open \
                        receivable or debt collection in progress";
    const MAIJA: &str = "maija.meikalainen@example.fi";

    fn ident(ty: IdentityType, enc: IdentityEncoding, value: &str) -> SubjectIdentity {
        SubjectIdentity {
            r#type: ty as i32,
            encoding: enc as i32,
            value: value.into(),
            label: String::new(),
        }
    }

    fn email(value: &str) -> SubjectIdentity {
        ident(IdentityType::Email, IdentityEncoding::Raw, value)
    }

    /// Midnight (UTC) starting the day.
    fn ms(y: i64, m: u32, d: u32) -> i64 {
        days_from_civil((y, m, d)) * DAY_MS
    }

    /// "Now" in the tests: 2026-11-23 12:00 UTC.
    fn now() -> i64 {
        ms(2026, 11, 23) + 12 * 3_600_000
    }

    fn task(
        kind: RequestKind,
        identities: Vec<SubjectIdentity>,
        now_ms: i64,
        phase: Phase,
    ) -> Task {
        Task {
            task_id: "controller/r-1/accounting".into(),
            request_id: "r-1".into(),
            kind,
            identities,
            categories: Vec::new(),
            parameters: RequestParameters::default(),
            due_at_ms: now_ms + 30 * DAY_MS,
            now_ms,
            phase,
        }
    }

    async fn count(db: &Db, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Every row `sql` returns, every column as JSON.
    async fn rows(db: &Db, sql: &str) -> Vec<Vec<serde_json::Value>> {
        let fetched = sqlx::query(sql)
            .fetch_all(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        fetched
            .iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| json_value(row, i).unwrap())
                    .collect()
            })
            .collect()
    }

    /// Everyone else's rows, to show that the subject's requests leave them alone.
    async fn others(db: &Db) -> Vec<Vec<Vec<serde_json::Value>>> {
        let mut out = Vec::new();
        for sql in [
            "SELECT * FROM customers WHERE id <> 1 ORDER BY id",
            "SELECT * FROM invoices WHERE customer_id <> 1 ORDER BY id",
            "SELECT * FROM contacts WHERE customer_id <> 1 ORDER BY id",
            "SELECT * FROM ledger_entries WHERE customer_id <> 1 ORDER BY id",
        ] {
            out.push(rows(db, sql).await);
        }
        out
    }

    async fn sample(url: &str) -> (SqlConnector, Db) {
        create_sample_accounting_db(url).await.unwrap();
        // Twice, to show that an existing database is left alone.
        create_sample_accounting_db(url).await.unwrap();
        let connector = SqlConnector::connect(sample_config(url)).await.unwrap();
        let check = Db::connect(url).await.unwrap();
        (connector, check)
    }

    const C: &str = "SELECT CAST(COUNT(*) AS BIGINT)";

    /// Runs each named scenario as two tests, `<name>::sqlite` and `<name>::postgres`.
    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    let dir = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}/accounting.db", dir.path().display());
                    super::$name(url).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let Some(db) = super::fresh_postgres_database(stringify!($name)).await else {
                        return;
                    };
                    super::$name(db.url.clone()).await;
                    db.drop_database().await;
                }
            }
        )*};
    }

    on_both_backends!(
        erases_subject_by_email,
        erases_subject_by_customer_number,
        several_identities_of_one_subject_count_once,
        hashed_only_identities_are_permanent_errors,
        sql_errors_roll_back_every_table,
        retention_expires_in_stages,
        exports_configured_columns_per_table,
        rectifies_mapped_columns,
        restricts_lifts_and_suppresses,
    );

    async fn erases_subject_by_email(url: String) {
        let (connector, db) = sample(&url).await;
        let before = others(&db).await;
        // Mixed case and padding, as a partner might send it; the seed stores it in yet
        // another case.
        let out = connector
            .erase(&[email(" MAIJA.meikalainen@example.FI ")], now())
            .await
            .unwrap();
        assert_eq!(
            out,
            ErasureReport {
                records_affected: 7,
                note: "contacts: deleted 2; \
                       invoices: deleted 1, kept 2 until the end of 2031-12-31 (anonymized 2); \
                       ledger_entries: anonymized 1, kept 1 until the end of 2034-12-31; \
                       customers: deleted 0, kept 1 for the kept rows of invoices, \
                       ledger_entries (anonymized 1)"
                    .into(),
                found: true,
                retained: Some(RetentionReport {
                    legal_basis: format!("{VOUCHERS}; {BOOKS}"),
                    until_ms: ms(2031, 1, 1),
                    rows: 3,
                }),
            }
        );
        assert!(!out.note.to_lowercase().contains("maija"));
        assert_eq!(
            others(&db).await,
            before,
            "other customers' rows are untouched"
        );

        // The customer row stays while her invoices and ledger entries are kept, findable by
        // the address the request used and otherwise anonymized.
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 6);
        assert_eq!(
            rows(
                &db,
                "SELECT customer_no, name, email, phone, national_id, address FROM customers \
                 WHERE id = 1"
            )
            .await,
            [[
                json!("C-1001"),
                json!(REDACTED),
                json!("Maija.Meikalainen@Example.fi"),
                json!(null),
                json!(null),
                json!(null)
            ]]
        );
        assert_eq!(count(&db, &format!("{C} FROM contacts")).await, 4);
        assert_eq!(
            count(&db, &format!("{C} FROM contacts WHERE customer_id = 1")).await,
            0
        );
        // The 2015 invoice is past its six years: gone. The others are kept, without the
        // e-mail copy but with the name and the link.
        assert_eq!(
            rows(
                &db,
                "SELECT id, customer_id, customer_name, customer_email, amount_cents, status \
                 FROM invoices WHERE id IN (101, 102, 103) ORDER BY id"
            )
            .await,
            [
                [
                    json!(102),
                    json!(1),
                    json!("Maija Meikäläinen"),
                    json!(null),
                    json!(8990),
                    json!("paid")
                ],
                [
                    json!(103),
                    json!(1),
                    json!("Maija Meikäläinen"),
                    json!(null),
                    json!(45000),
                    json!("open")
                ],
            ]
        );
        // The 2015 ledger entry is past its ten years: anonymized, amounts kept. The 2024
        // one is kept as booked.
        assert_eq!(
            rows(
                &db,
                "SELECT id, customer_id, description, amount_cents FROM ledger_entries \
                 WHERE id IN (301, 302) ORDER BY id"
            )
            .await,
            [
                [json!(301), json!(null), json!(REDACTED), json!(12400)],
                [
                    json!(302),
                    json!(1),
                    json!("Myynti, lasku 102, Maija Meikäläinen"),
                    json!(8990)
                ],
            ]
        );

        // Again, as the processor would if it asked twice: only what is kept is found.
        let again = connector.erase(&[email(MAIJA)], now()).await.unwrap();
        assert_eq!(again.records_affected, 0);
        assert!(again.found);
        assert_eq!(again.retained.map(|r| r.until_ms), Some(ms(2031, 1, 1)));
        assert_eq!(
            again.note,
            "contacts: deleted 0; \
             invoices: deleted 0, kept 2 until the end of 2031-12-31 (anonymized 0); \
             ledger_entries: anonymized 0, kept 1 until the end of 2034-12-31; \
             customers: deleted 0, kept 1 for the kept rows of invoices, ledger_entries \
             (anonymized 0)"
        );
        assert_eq!(others(&db).await, before);
    }

    async fn erases_subject_by_customer_number(url: String) {
        let (connector, db) = sample(&url).await;
        let out = connector
            .erase(
                &[ident(
                    IdentityType::CustomerNumber,
                    IdentityEncoding::Raw,
                    "C-1002",
                )],
                now(),
            )
            .await
            .unwrap();
        assert_eq!(out.records_affected, 4);
        assert!(out.found);
        assert_eq!(
            out.note,
            "contacts: deleted 1; \
             invoices: deleted 0, kept 2 until the end of 2030-12-31 (anonymized 2); \
             ledger_entries: anonymized 0, kept 1 until the end of 2034-12-31; \
             customers: deleted 0, kept 1 for the kept rows of invoices, ledger_entries \
             (anonymized 1)"
        );
        assert_eq!(
            out.retained,
            Some(RetentionReport {
                legal_basis: format!("{VOUCHERS}; {BOOKS}"),
                until_ms: ms(2031, 1, 1),
                rows: 3,
            })
        );
        // Found by the customer number, so that is what stays; the e-mail goes too.
        assert_eq!(
            rows(
                &db,
                "SELECT customer_no, name, email, phone, national_id, address FROM customers \
                 WHERE id = 2"
            )
            .await,
            [[
                json!("C-1002"),
                json!(REDACTED),
                json!(null),
                json!(null),
                json!(null),
                json!(null)
            ]]
        );
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 6);
        assert_eq!(count(&db, &format!("{C} FROM contacts")).await, 5);
        assert_eq!(
            count(
                &db,
                &format!("{C} FROM invoices WHERE customer_id = 2 AND customer_email IS NULL")
            )
            .await,
            2
        );
        assert_eq!(count(&db, &format!("{C} FROM invoices")).await, 9);
    }

    async fn several_identities_of_one_subject_count_once(url: String) {
        let (connector, db) = sample(&url).await;
        let out = connector
            .erase(
                &[
                    email(MAIJA),
                    // Spaces as people type them; normalisation strips them to the stored form.
                    ident(
                        IdentityType::Phone,
                        IdentityEncoding::Raw,
                        "+358 40 123 4567",
                    ),
                    ident(
                        IdentityType::CustomerNumber,
                        IdentityEncoding::Raw,
                        "C-1001",
                    ),
                    ident(
                        IdentityType::NationalId,
                        IdentityEncoding::Raw,
                        "150585-912K",
                    ),
                    // Unusable here, and ignored because the others suffice.
                    ident(
                        IdentityType::Email,
                        IdentityEncoding::Sha256,
                        &"a".repeat(64),
                    ),
                ],
                now(),
            )
            .await
            .unwrap();
        assert_eq!(out.records_affected, 7);
        assert_eq!(
            out.note,
            "contacts: deleted 2; \
             invoices: deleted 1, kept 2 until the end of 2031-12-31 (anonymized 2); \
             ledger_entries: anonymized 1, kept 1 until the end of 2034-12-31; \
             customers: deleted 0, kept 1 for the kept rows of invoices, ledger_entries \
             (anonymized 1)"
        );
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 6);
        // Every identity column found her, so all of them stay until the end.
        assert_eq!(
            rows(
                &db,
                "SELECT name, email, phone, national_id, address FROM customers WHERE id = 1"
            )
            .await,
            [[
                json!(REDACTED),
                json!("Maija.Meikalainen@Example.fi"),
                json!("+358401234567"),
                json!("150585-912K"),
                json!(null)
            ]]
        );
    }

    async fn hashed_only_identities_are_permanent_errors(url: String) {
        let (connector, db) = sample(&url).await;
        let hashed = ident(
            IdentityType::Email,
            IdentityEncoding::Md5,
            "0123456789abcdef0123456789abcdef",
        );
        let other = SubjectIdentity {
            label: "loyalty-card".into(),
            ..ident(IdentityType::Other, IdentityEncoding::Raw, "LC-42")
        };
        let err = connector
            .erase(&[hashed.clone(), other.clone()], now())
            .await
            .unwrap_err();
        let expected = ConnectorError::Permanent(
            "the sql connector needs a raw identity of type customer_number, email, \
             national_id, phone (configured match columns); hashed identities cannot be \
             matched in SQL"
                .into(),
        );
        assert_eq!(err, expected);
        // The other kinds need them too.
        assert_eq!(
            connector
                .export(std::slice::from_ref(&hashed))
                .await
                .unwrap_err(),
            expected
        );
        assert_eq!(connector.suppress(&[other]).await.unwrap_err(), expected);
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 6);
    }

    async fn sql_errors_roll_back_every_table(url: String) {
        let (_, db) = sample(&url).await;
        let mut config = sample_config(&url);
        // The invoices rule runs after contacts; its error must undo the contacts deletion.
        assert_eq!(config.tables[1].table, "invoices");
        config.tables[1]
            .anonymize
            .insert("no_such_column".into(), AnonymizeWith::Redacted);
        let connector = SqlConnector::connect(config).await.unwrap();
        let err = connector.erase(&[email(MAIJA)], now()).await.unwrap_err();
        let ConnectorError::Permanent(message) = &err else {
            panic!("expected a permanent error, got {err:?}");
        };
        assert!(message.starts_with("anonymizing invoices: "), "{message}");
        assert!(message.contains("no_such_column"), "{message}");
        assert!(!message.to_lowercase().contains("maija"), "{message}");
        assert_eq!(count(&db, &format!("{C} FROM contacts")).await, 6);
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 6);
        assert_eq!(count(&db, &format!("{C} FROM invoices")).await, 9);
    }

    async fn retention_expires_in_stages(url: String) {
        let (connector, db) = sample(&url).await;
        let before = others(&db).await;
        let run = |now_ms: i64, phase: Phase| {
            let task = task(RequestKind::Erasure, vec![email(MAIJA)], now_ms, phase);
            let connector = &connector;
            async move { connector.run(&task).await.unwrap() }
        };
        let retained = |outcome: Outcome| match outcome {
            Outcome::Retained {
                legal_basis,
                until_ms,
                records_affected,
                note,
            } => (legal_basis, until_ms, records_affected, note),
            other => panic!("expected RETAINED, got {other:?}"),
        };

        // Now: the invoice of 2024 is the first kept row to be released, at the start of 2031.
        let (basis, until, affected, _) = retained(run(now(), Phase::Start).await);
        assert_eq!(basis, format!("{VOUCHERS}; {BOOKS}"));
        assert_eq!((until, affected), (ms(2031, 1, 1), 7));

        // A moment before, the processor would not wake up; nothing is released yet.
        let (_, until, affected, _) = retained(run(until - 1, Phase::RetentionExpired).await);
        assert_eq!((until, affected), (ms(2031, 1, 1), 0));
        assert_eq!(
            count(&db, &format!("{C} FROM invoices WHERE id = 102")).await,
            1
        );

        // 2031: the 2024 invoice goes; the 2025 one is kept to the end of 2031.
        let (basis, until, affected, note) =
            retained(run(ms(2031, 1, 1), Phase::RetentionExpired).await);
        assert_eq!(basis, format!("{VOUCHERS}; {BOOKS}"));
        assert_eq!((until, affected), (ms(2032, 1, 1), 1));
        assert!(
            note.starts_with(
                "contacts: deleted 0; invoices: deleted 1, kept 1 until the end of 2031-12-31"
            ),
            "{note}"
        );
        assert_eq!(
            count(&db, &format!("{C} FROM invoices WHERE id = 102")).await,
            0
        );

        // 2032: the invoice is past its six years but still open: kept, checked again in 30
        // days, under the basis of the condition.
        let (basis, until, affected, note) =
            retained(run(ms(2032, 1, 1), Phase::RetentionExpired).await);
        assert_eq!(basis, format!("{OPEN}; {BOOKS}"));
        assert_eq!((until, affected), (ms(2032, 1, 31), 0));
        assert!(
            note.contains(
                "invoices: deleted 0, kept 1 (1 while its retain condition holds, checked \
                 again on 2032-01-31) (anonymized 0)"
            ),
            "{note}"
        );
        let (_, until, _, _) = retained(run(ms(2032, 1, 31), Phase::RetentionExpired).await);
        assert_eq!(until, ms(2032, 3, 1));
        assert_eq!(
            count(&db, &format!("{C} FROM invoices WHERE id = 103")).await,
            1
        );

        // Paid: nothing keeps it any more, and only the books remain.
        sqlx::query("UPDATE invoices SET status = 'paid' WHERE id = 103")
            .execute(&db.pool)
            .await
            .unwrap();
        let (basis, until, affected, _) =
            retained(run(ms(2032, 3, 1), Phase::RetentionExpired).await);
        assert_eq!(basis, BOOKS);
        assert_eq!((until, affected), (ms(2035, 1, 1), 1));
        assert_eq!(
            count(&db, &format!("{C} FROM invoices WHERE customer_id = 1")).await,
            0
        );
        assert_eq!(
            count(&db, &format!("{C} FROM customers WHERE id = 1")).await,
            1
        );

        // 2035: the books are released, and with nothing kept the customer row goes too.
        assert_eq!(
            run(ms(2035, 1, 1), Phase::RetentionExpired).await,
            Outcome::Completed {
                records_affected: 2,
                note: "contacts: deleted 0; invoices: deleted 0; ledger_entries: anonymized 1; \
                       customers: deleted 1"
                    .into(),
                export: None,
            }
        );
        assert_eq!(
            count(&db, &format!("{C} FROM customers WHERE id = 1")).await,
            0
        );
        assert_eq!(
            rows(
                &db,
                "SELECT id, customer_id, description, amount_cents FROM ledger_entries \
                 WHERE id IN (301, 302) ORDER BY id"
            )
            .await,
            [
                [json!(301), json!(null), json!(REDACTED), json!(12400)],
                [json!(302), json!(null), json!(REDACTED), json!(8990)],
            ]
        );
        assert_eq!(
            others(&db).await,
            before,
            "other customers' rows are untouched"
        );

        // Woken again by mistake: nothing is left, which completes; a new request finds
        // nothing.
        let Outcome::Completed {
            records_affected: 0,
            note,
            ..
        } = run(ms(2035, 1, 2), Phase::RetentionExpired).await
        else {
            panic!("expected COMPLETED");
        };
        assert!(note.starts_with("nothing left to erase: "), "{note}");
        assert!(matches!(
            run(ms(2035, 1, 2), Phase::Start).await,
            Outcome::NotFound { .. }
        ));
    }

    async fn exports_configured_columns_per_table(url: String) {
        let (connector, db) = sample(&url).await;
        let before = count(&db, &format!("{C} FROM customers")).await;
        let expected = json!({
            "customers": [{
                "customer_no": "C-1001",
                "name": "Maija Meikäläinen",
                "email": "Maija.Meikalainen@Example.fi",
                "phone": "+358401234567",
                "national_id": "150585-912K",
                "address": "Mannerheimintie 12 A 3, 00100 Helsinki",
                "processing_restricted": 0,
                "marketing_opt_out": 0,
            }],
            "invoices": [
                {"id": 101, "issued_on": "2015-03-10", "amount_cents": 12400, "status": "paid",
                 "customer_name": "Maija Meikäläinen",
                 "customer_email": "Maija.Meikalainen@Example.fi"},
                {"id": 102, "issued_on": "2024-03-02", "amount_cents": 8990, "status": "paid",
                 "customer_name": "Maija Meikäläinen",
                 "customer_email": "Maija.Meikalainen@Example.fi"},
                {"id": 103, "issued_on": "2025-06-30", "amount_cents": 45000, "status": "open",
                 "customer_name": "Maija Meikäläinen",
                 "customer_email": "Maija.Meikalainen@Example.fi"},
            ],
        });
        // Contacts and ledger entries have no export columns: not exported.
        for kind in [RequestKind::ReturnOfData, RequestKind::Transfer] {
            let out = connector
                .run(&task(kind, vec![email(MAIJA)], now(), Phase::Start))
                .await
                .unwrap();
            assert_eq!(
                out,
                Outcome::Completed {
                    records_affected: 4,
                    note: "invoices: exported 3; customers: exported 1".into(),
                    export: Some(expected.clone()),
                }
            );
        }
        let out = connector
            .run(&task(
                RequestKind::ReturnOfData,
                vec![email("nobody@example.fi")],
                now(),
                Phase::Start,
            ))
            .await
            .unwrap();
        assert_eq!(
            out,
            Outcome::NotFound {
                note: "invoices: exported 0; customers: exported 0".into()
            }
        );
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, before);
    }

    fn rectification(identities: Vec<SubjectIdentity>, fields: &[(&str, &str)]) -> Task {
        let mut task = task(RequestKind::Rectification, identities, now(), Phase::Start);
        task.parameters.corrections = fields
            .iter()
            .map(|(field, value)| FieldCorrection {
                field: field.to_string(),
                new_value: value.to_string(),
            })
            .collect();
        task
    }

    async fn rectifies_mapped_columns(url: String) {
        let (connector, db) = sample(&url).await;
        let before = others(&db).await;
        let out = connector
            .run(&rectification(
                vec![email(MAIJA)],
                &[
                    ("Email", "maija.uusi@example.fi"),
                    ("address", "Uusikatu 1, 00100 Helsinki"),
                ],
            ))
            .await
            .unwrap();
        assert_eq!(
            out,
            Outcome::Completed {
                records_affected: 1,
                note: "customers: updated 1 (email, address)".into(),
                export: None,
            }
        );
        // Only tables that map a field change: the invoices' copies are vouchers.
        assert_eq!(
            rows(
                &db,
                "SELECT email, address, name FROM customers WHERE id = 1"
            )
            .await,
            [[
                json!("maija.uusi@example.fi"),
                json!("Uusikatu 1, 00100 Helsinki"),
                json!("Maija Meikäläinen")
            ]]
        );
        assert_eq!(
            count(
                &db,
                &format!("{C} FROM invoices WHERE customer_email = 'Maija.Meikalainen@Example.fi'")
            )
            .await,
            3
        );

        // A field no table maps: nothing changes, and the error names it.
        let err = connector
            .run(&rectification(
                vec![email("maija.uusi@example.fi")],
                &[("name", "Maija Uusi"), ("shoe_size", "38")],
            ))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ConnectorError::Permanent(
                "no table maps the corrected field(s) \"shoe_size\"; this database can correct \
                 address, email, name, phone"
                    .into()
            )
        );
        assert_eq!(
            count(
                &db,
                &format!("{C} FROM customers WHERE name = 'Maija Meikäläinen'")
            )
            .await,
            2
        );
        let err = connector
            .run(&rectification(
                vec![email(MAIJA)],
                &[("name", "a"), ("name", "b")],
            ))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("\"name\" is corrected more than once"),
            "{err}"
        );

        // Where a second table maps the field, both change.
        let mut config = sample_config(&url);
        config.tables[1]
            .rectify
            .insert("email".into(), "customer_email".into());
        let both = SqlConnector::connect(config).await.unwrap();
        let out = both
            .run(&rectification(
                vec![ident(
                    IdentityType::CustomerNumber,
                    IdentityEncoding::Raw,
                    "C-1001",
                )],
                &[("email", "maija@example.org")],
            ))
            .await
            .unwrap();
        assert_eq!(
            out,
            Outcome::Completed {
                records_affected: 4,
                note: "invoices: updated 3 (email); customers: updated 1 (email)".into(),
                export: None,
            }
        );
        assert_eq!(
            count(
                &db,
                &format!("{C} FROM invoices WHERE customer_email = 'maija@example.org'")
            )
            .await,
            3
        );
        assert_eq!(
            others(&db).await,
            before,
            "other customers' rows are untouched"
        );

        let out = connector
            .run(&rectification(
                vec![email("nobody@example.fi")],
                &[("phone", "+358400000000")],
            ))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
    }

    async fn restricts_lifts_and_suppresses(url: String) {
        let (connector, db) = sample(&url).await;
        let flags = "SELECT processing_restricted, marketing_opt_out FROM customers WHERE id = 1";
        let mut restrict = task(
            RequestKind::Restriction,
            vec![email(MAIJA)],
            now(),
            Phase::Start,
        );
        assert_eq!(
            connector.run(&restrict).await.unwrap(),
            Outcome::Completed {
                records_affected: 1,
                note: "customers: restricted 1".into(),
                export: None,
            }
        );
        assert_eq!(rows(&db, flags).await, [[json!(1), json!(0)]]);
        restrict.parameters.lift_restriction = true;
        assert_eq!(
            connector.run(&restrict).await.unwrap(),
            Outcome::Completed {
                records_affected: 1,
                note: "customers: restriction lifted 1".into(),
                export: None,
            }
        );
        assert_eq!(rows(&db, flags).await, [[json!(0), json!(0)]]);
        let object = task(
            RequestKind::Objection,
            vec![email(MAIJA)],
            now(),
            Phase::Start,
        );
        assert_eq!(
            connector.run(&object).await.unwrap(),
            Outcome::Completed {
                records_affected: 1,
                note: "customers: opted out 1".into(),
                export: None,
            }
        );
        assert_eq!(rows(&db, flags).await, [[json!(0), json!(1)]]);
        assert_eq!(
            count(
                &db,
                &format!(
                    "{C} FROM customers WHERE processing_restricted <> 0 OR marketing_opt_out <> 0"
                )
            )
            .await,
            1
        );
        let nobody = task(
            RequestKind::Objection,
            vec![email("nobody@example.fi")],
            now(),
            Phase::Start,
        );
        assert_eq!(
            connector.run(&nobody).await.unwrap(),
            Outcome::NotFound {
                note: "customers: opted out 0".into()
            }
        );
        // Only erasures are kept under retention.
        let mut expired = object.clone();
        expired.phase = Phase::RetentionExpired;
        assert!(matches!(
            connector.run(&expired).await,
            Err(ConnectorError::Permanent(_))
        ));
    }

    #[tokio::test]
    async fn locked_sqlite_database_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/accounting.db", dir.path().display());
        let (connector, _) = sample(&url).await;
        let other = Db::connect(&url).await.unwrap();
        let mut writer = other.pool.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *writer)
            .await
            .unwrap();
        // Waits out the 5 s busy timeout Db sets, then gives up.
        let err = connector.erase(&[email(MAIJA)], now()).await.unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("database is locked"), "{err}");
        sqlx::query("ROLLBACK").execute(&mut *writer).await.unwrap();
    }

    #[tokio::test]
    async fn supports_follows_the_configuration() {
        let config = sample_config("sqlite::memory:");
        for kind in [
            RequestKind::Erasure,
            RequestKind::ReturnOfData,
            RequestKind::Transfer,
            RequestKind::Rectification,
            RequestKind::Restriction,
            RequestKind::Objection,
        ] {
            assert!(config.supports(kind), "{kind:?}");
        }
        assert!(!config.supports(RequestKind::Unspecified));

        // Erasure only.
        let dir = tempfile::tempdir().unwrap();
        let mut config = sample_config(&format!("sqlite://{}/a.db", dir.path().display()));
        config.tables.retain(|t| t.table == "customers");
        let customers = &mut config.tables[0];
        customers.anonymize.clear();
        customers.export.clear();
        customers.rectify.clear();
        customers.restrict_column = None;
        customers.suppress_column = None;
        assert_eq!(config.validate(), Vec::<String>::new());
        let connector = SqlConnector::connect(config.clone()).await.unwrap();
        for kind in [
            RequestKind::ReturnOfData,
            RequestKind::Transfer,
            RequestKind::Rectification,
            RequestKind::Restriction,
            RequestKind::Objection,
            RequestKind::Unspecified,
        ] {
            assert!(!crate::Connector::supports(&connector, kind), "{kind:?}");
            // Asked anyway: refused, without touching the database.
            let out = connector
                .run(&task(kind, vec![email(MAIJA)], now(), Phase::Start))
                .await
                .unwrap();
            assert!(matches!(out, Outcome::Refused { .. }), "{out:?}");
        }
        assert!(crate::Connector::supports(&connector, RequestKind::Erasure));

        // A table that is only exported: no erasure.
        config.tables[0].action = Action::Keep;
        config.tables[0].export = vec!["email".into()];
        assert!(!config.supports(RequestKind::Erasure));
        assert!(config.supports(RequestKind::ReturnOfData));
        assert_eq!(config.validate(), Vec::<String>::new());
    }

    #[test]
    fn classifies_sqlx_errors() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(classify("x", &sqlx::Error::Io(refused)).is_transient());
        assert!(classify("x", &sqlx::Error::PoolTimedOut).is_transient());
        assert!(!classify("x", &sqlx::Error::RowNotFound).is_transient());
        let err = classify("deleting from t", &sqlx::Error::ColumnNotFound("c".into()));
        assert_eq!(
            err,
            ConnectorError::Permanent("deleting from t: no column found for name: c".into())
        );
    }

    #[test]
    fn sample_rules_file_matches_sample_config() {
        let mut table: toml::Table = toml::from_str(SAMPLE_ACCOUNTING_RULES).unwrap();
        table.insert("url".into(), "sqlite://data/accounting.db".into());
        let parsed: SqlConnectorConfig = table.try_into().unwrap();
        let config = sample_config("sqlite://data/accounting.db");
        assert_eq!(parsed, config);
        assert_eq!(parsed.validate(), Vec::<String>::new());
        // dsrctl writes it out as TOML.
        let written = toml::to_string(&config).unwrap();
        assert_eq!(
            toml::from_str::<SqlConnectorConfig>(&written).unwrap(),
            config
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<SqlConnectorConfig>(
            "url = \"sqlite::memory:\"\n[[tables]]\ntable = \"t\"\naction = \"delete\"\n\
             match = { email = \"email\" }\ncascade = true\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("cascade"), "{err}");
        let err = toml::from_str::<SqlConnectorConfig>(
            "url = \"sqlite::memory:\"\n[[tables]]\ntable = \"t\"\naction = \"delete\"\n\
             match = { email = \"email\" }\n[tables.retain]\nbasis = \"b\"\nyears = 1\n\
             from_column = \"d\"\nuntil = \"x\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("until"), "{err}");
        // Defaults of the optional retention fields.
        let config = toml::from_str::<SqlConnectorConfig>(
            "url = \"sqlite::memory:\"\n[[tables]]\ntable = \"t\"\naction = \"delete\"\n\
             match = { email = \"email\" }\nretain = { basis = \"b\", years = 1, from_column = \"d\" }\n",
        )
        .unwrap();
        let retain = config.tables[0].retain.clone().unwrap();
        assert_eq!(retain.fiscal_year_end, "12-31");
        assert_eq!(retain.recheck_days, DEFAULT_RECHECK_DAYS);
        assert_eq!(config.validate(), Vec::<String>::new());
    }

    #[test]
    fn validation_rejects_unsafe_identifiers_and_unlisted_parents() {
        let mut config = sample_config("sqlite::memory:");
        assert_eq!(config.tables[3].table, "customers");
        config.tables[3].table = "customers; drop table x".into();
        let problems = config.validate();
        assert!(
            problems.iter().any(
                |p| p.starts_with("tables[3] (customers; drop table x): table")
                    && p.contains("not a plain identifier")
            ),
            "{problems:?}"
        );
        // With the customers rule renamed, the children's parent is no longer listed.
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("tables[0] (contacts):")
                    && p.contains("parent table \"customers\" is not listed")),
            "{problems:?}"
        );

        let mut config = sample_config("sqlite::memory:");
        config.tables[0].parent = None;
        config.tables[2].anonymize.clear();
        config.tables[2].retain = None;
        config.tables[2]
            .anonymize
            .insert("x\"y".into(), AnonymizeWith::Null);
        config.tables[3]
            .match_columns
            .insert("loyalty".into(), "card".into());
        config.tables.push(TableRule {
            parent: Some(ParentLink {
                table: "invoices".into(),
                column: "invoice_id".into(),
                parent_column: "id".into(),
            }),
            ..config.tables[0].clone()
        });
        let problems = config.validate();
        let expect = [
            "tables[0] (contacts): needs either match",
            "tables[2] (ledger_entries): anonymize column \"x\\\"y\" is not a plain identifier",
            "tables[3] (customers): match key \"loyalty\" is not an identity type",
            "tables[4] (contacts): the table is listed twice",
            "tables[4] (contacts): parent table \"invoices\" must have match",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(e)),
                "{e} in {problems:?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:?}");

        assert!(is_identifier("_a1"));
        assert!(is_identifier(&"a".repeat(63)));
        assert!(!is_identifier(&"a".repeat(64)));
        assert!(!is_identifier("1a"));
        assert!(!is_identifier(""));
        assert!(!is_identifier("ä"));
    }

    #[test]
    fn validation_rejects_bad_export_rectify_flag_and_retention_rules() {
        let mut config = sample_config("sqlite::memory:");
        // contacts: delete with anonymize columns, nothing kept.
        config.tables[0]
            .anonymize
            .insert("name".into(), AnonymizeWith::Redacted);
        config.tables[0].export = vec!["name".into(), "e mail".into(), "name".into()];
        let invoices = config.tables[1].retain.as_mut().unwrap();
        invoices.basis = " ".into();
        invoices.years = 0;
        invoices.fiscal_year_end = "02-29".into();
        invoices.while_condition = Some("status = 'open'; DROP TABLE invoices".into());
        invoices.recheck_days = 0;
        invoices.keep_columns = vec!["customer_name".into()];
        invoices.from_column = "issued on".into();
        let ledger = config.tables[2].retain.as_mut().unwrap();
        ledger.while_basis = Some("x".into());
        let customers = &mut config.tables[3];
        customers.rectify.insert("E-mail".into(), "email".into());
        customers.restrict_column = Some("restricted?".into());
        customers.suppress_column = Some(String::new());
        config.tables.push(TableRule {
            table: "audit".into(),
            action: Action::Keep,
            parent: None,
            match_columns: [("email".to_string(), "email".to_string())]
                .into_iter()
                .collect(),
            anonymize: [("email".to_string(), AnonymizeWith::Null)]
                .into_iter()
                .collect(),
            export: Vec::new(),
            rectify: BTreeMap::new(),
            restrict_column: None,
            suppress_column: None,
            retain: config.tables[2].retain.clone(),
        });
        let problems = config.validate();
        let expect = [
            "tables[0] (contacts): export column \"e mail\" is not a plain identifier",
            "tables[0] (contacts): anonymize columns are given but the action is delete and no \
             rows are kept",
            "tables[0] (contacts): export column \"name\" is listed twice",
            "tables[1] (invoices): retain from_column \"issued on\" is not a plain identifier",
            "tables[1] (invoices): retain basis must name the law",
            "tables[1] (invoices): retain years must be 1..=100",
            "tables[1] (invoices): retain fiscal_year_end \"02-29\" must be MM-DD",
            "tables[1] (invoices): retain recheck_days must be 1..=3650",
            "tables[1] (invoices): retain while must be one condition, without ;",
            "tables[1] (invoices): retain keep column \"customer_name\" is not in anonymize",
            "tables[2] (ledger_entries): retain while_basis is given without a while condition",
            "tables[3] (customers): restrict_column \"restricted?\" is not a plain identifier",
            "tables[3] (customers): suppress_column \"\" is not a plain identifier",
            "tables[3] (customers): rectify field \"E-mail\" must be 1..=64 characters",
            "tables[4] (audit): anonymize columns are given but the action is keep",
            "tables[4] (audit): retain while_basis is given without a while condition",
            "tables[4] (audit): retain keep column \"description\" is not in anonymize",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(e)),
                "{e} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");

        // keep with retain (and nothing else wrong).
        let mut config = sample_config("sqlite::memory:");
        config.tables[2].action = Action::Keep;
        config.tables[2].anonymize.clear();
        config.tables[2]
            .retain
            .as_mut()
            .unwrap()
            .keep_columns
            .clear();
        assert_eq!(
            config.validate(),
            [
                "tables[2] (ledger_entries): retain is given but the action is keep, which never \
              erases; remove it or choose delete or anonymize"
            ]
        );
    }

    #[test]
    fn while_conditions_are_checked_for_mistakes() {
        assert_eq!(check_condition("status IN ('open', 'collection')"), Ok(()));
        assert_eq!(check_condition("note = 'a;b -- (c'"), Ok(()));
        assert_eq!(check_condition(" "), Err("must not be empty"));
        assert_eq!(
            check_condition("a = 1 -- x"),
            Err("must not contain comments (--)")
        );
        assert_eq!(
            check_condition("a = 1 /* x */"),
            Err("must not contain comments (/*)")
        );
        assert_eq!(
            check_condition("a = $1"),
            Err("must not contain $ (parameters and dollar quoting)")
        );
        assert_eq!(
            check_condition("a = 1) OR (1 = 1"),
            Err("has unbalanced parentheses")
        );
        assert_eq!(check_condition("(a = 1"), Err("has unbalanced parentheses"));
        assert_eq!(
            check_condition("a = 'x"),
            Err("has an unterminated string literal")
        );
    }

    #[test]
    fn retention_periods_end_with_the_fiscal_year() {
        let config = sample_config("sqlite::memory:");
        let vouchers = config.tables[1].retain.clone().unwrap();
        let books = config.tables[2].retain.clone().unwrap();
        assert_eq!(vouchers.last_day((2024, 3, 2)), (2030, 12, 31));
        assert_eq!(vouchers.expires_at_ms((2024, 3, 2)), ms(2031, 1, 1));
        assert_eq!(vouchers.last_day((2024, 12, 31)), (2030, 12, 31));
        assert_eq!(books.last_day((2016, 1, 1)), (2026, 12, 31));
        assert_eq!(vouchers.release_before(now()), "2020-01-01");
        assert_eq!(books.release_before(now()), "2016-01-01");
        // A fiscal year ending in June.
        let june = Retention {
            fiscal_year_end: "06-30".into(),
            ..vouchers.clone()
        };
        assert_eq!(june.last_day((2024, 6, 30)), (2030, 6, 30));
        assert_eq!(june.last_day((2024, 7, 1)), (2031, 6, 30));

        // The SQL form (dates before release_before) and the Rust form (expires_at <= now)
        // agree, whatever the fiscal year, period, day and hour.
        let dates: Vec<(Date, String)> = (ms(2012, 1, 1) / DAY_MS..ms(2019, 1, 1) / DAY_MS)
            .step_by(3)
            .map(|d| (civil_from_days(d), format_date(civil_from_days(d))))
            .collect();
        for end in ["12-31", "06-30", "01-01", "02-28", "03-01"] {
            for years in [1, 6, 10] {
                let retain = Retention {
                    fiscal_year_end: end.into(),
                    years,
                    ..vouchers.clone()
                };
                let mut now_ms = ms(2013, 1, 1) - 1;
                while now_ms < ms(2030, 1, 1) {
                    let before = retain.release_before(now_ms);
                    for (date, text) in &dates {
                        assert_eq!(
                            *text < before,
                            retain.expires_at_ms(*date) <= now_ms,
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
        assert_eq!(parse_iso_date("2024-02-29"), Some((2024, 2, 29)));
        assert_eq!(parse_iso_date("2024-03-02 10:00:00+00"), Some((2024, 3, 2)));
        assert_eq!(parse_iso_date("2024-03-02T10:00:00Z"), Some((2024, 3, 2)));
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
        assert_eq!(days_from_civil((1970, 1, 1)), 0);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for day in (-800_000..800_000).step_by(37) {
            assert_eq!(days_from_civil(civil_from_days(day)), day);
        }
        assert_eq!(now(), 1_795_435_200_000);
    }

    #[test]
    fn plans_bind_values_and_quote_identifiers() {
        let config = sample_config("sqlite::memory:");
        let plan = plan_erasure(
            &config,
            &[
                email("Maija@Example.fi"),
                ident(
                    IdentityType::CustomerNumber,
                    IdentityEncoding::Raw,
                    "C-1001",
                ),
            ],
            now(),
        )
        .unwrap();
        let tables: Vec<&str> = plan.iter().map(|s| s.rule.table.as_str()).collect();
        assert_eq!(
            tables,
            ["contacts", "invoices", "ledger_entries", "customers"]
        );
        let work = |i: usize| plan[i].work.as_ref().unwrap();
        let customers_of = "IN (SELECT \"id\" FROM \"customers\" WHERE (lower(\"email\") = $1 \
                            OR \"customer_no\" = $2))";
        assert_eq!(
            work(0).main,
            Statement {
                sql: format!("DELETE FROM \"contacts\" WHERE \"customer_id\" {customers_of}"),
                binds: vec!["maija@example.fi".into(), "C-1001".into()],
            }
        );
        assert!(work(0).probe.is_none() && work(0).count_kept.is_none());
        let invoices_kept = "(CASE WHEN (CAST(\"invoices\".\"issued_on\" AS TEXT) >= $3 OR \
                             (status IN ('open', 'collection'))) THEN 1 ELSE 0 END)";
        assert_eq!(
            work(1).main,
            Statement {
                sql: format!(
                    "DELETE FROM \"invoices\" WHERE \"customer_id\" {customers_of} AND \
                     {invoices_kept} = 0"
                ),
                binds: vec![
                    "maija@example.fi".into(),
                    "C-1001".into(),
                    "2020-01-01".into()
                ],
            }
        );
        assert_eq!(
            work(1).anonymize_kept.as_ref().unwrap().sql,
            format!(
                "UPDATE \"invoices\" SET \"customer_email\" = NULL WHERE \"customer_id\" \
                 {customers_of} AND {invoices_kept} = 1 AND (\"customer_email\" IS NOT NULL)"
            )
        );
        assert_eq!(
            work(1).probe.as_ref().unwrap().sql,
            format!(
                "SELECT CAST(\"invoices\".\"issued_on\" AS TEXT), CASE WHEN (status IN \
                 ('open', 'collection')) THEN 1 ELSE 0 END FROM \"invoices\" WHERE \
                 \"customer_id\" {customers_of}"
            )
        );
        // The ledger keeps the description and its link while kept: nothing to do now.
        assert!(work(2).anonymize_kept.is_none());
        assert_eq!(
            work(2).main.sql,
            format!(
                "UPDATE \"ledger_entries\" SET \"customer_id\" = NULL, \"description\" = $1 \
                 WHERE \"customer_id\" IN (SELECT \"id\" FROM \"customers\" WHERE \
                 (lower(\"email\") = $2 OR \"customer_no\" = $3)) AND (CASE WHEN \
                 (CAST(\"ledger_entries\".\"booked_on\" AS TEXT) >= $4) THEN 1 ELSE 0 END) = 0 \
                 AND (\"customer_id\" IS NOT NULL OR (\"description\" IS NULL OR \
                 \"description\" <> $1))"
            )
        );
        assert_eq!(
            work(2).main.binds,
            [REDACTED, "maija@example.fi", "C-1001", "2016-01-01"]
        );
        // The customer row is kept while a child row is; the e-mail that found it stays.
        let customers = work(3).anonymize_kept.as_ref().unwrap();
        assert_eq!(
            customers.sql,
            "UPDATE \"customers\" SET \"address\" = NULL, \"name\" = $1, \"national_id\" = \
             NULL, \"phone\" = NULL WHERE (lower(\"email\") = $2 OR \"customer_no\" = $3) AND \
             (CASE WHEN EXISTS (SELECT 1 FROM \"invoices\" WHERE \"invoices\".\"customer_id\" \
             = \"customers\".\"id\" AND (CAST(\"invoices\".\"issued_on\" AS TEXT) >= $4 OR \
             (status IN ('open', 'collection')))) OR EXISTS (SELECT 1 FROM \"ledger_entries\" \
             WHERE \"ledger_entries\".\"customer_id\" = \"customers\".\"id\" AND \
             (CAST(\"ledger_entries\".\"booked_on\" AS TEXT) >= $5)) THEN 1 ELSE 0 END) = 1 \
             AND (\"address\" IS NOT NULL OR (\"name\" IS NULL OR \"name\" <> $1) OR \
             \"national_id\" IS NOT NULL OR \"phone\" IS NOT NULL)"
        );
        assert_eq!(
            customers.binds,
            [
                REDACTED,
                "maija@example.fi",
                "C-1001",
                "2020-01-01",
                "2016-01-01"
            ]
        );
        assert_eq!(work(3).held_for, ["invoices", "ledger_entries"]);
    }

    /// A fresh, uniquely named PostgreSQL database for one test.
    struct PostgresTestDb {
        admin_url: String,
        name: String,
        url: String,
    }

    impl PostgresTestDb {
        async fn drop_database(self) {
            let admin = Db::connect(&self.admin_url).await.unwrap();
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&admin.pool)
            .await
            .unwrap();
            admin.pool.close().await;
        }
    }

    /// Creates a database on the server named by `DSRELAY_TEST_POSTGRES_URL`. Without it the
    /// PostgreSQL variant is skipped locally but fails in CI, so that CI cannot go green
    /// without having exercised PostgreSQL.
    async fn fresh_postgres_database(test: &str) -> Option<PostgresTestDb> {
        let admin_url = match std::env::var("DSRELAY_TEST_POSTGRES_URL") {
            Ok(url) if !url.trim().is_empty() => url,
            _ => {
                if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
                    panic!(
                        "PostgreSQL is required in CI: set DSRELAY_TEST_POSTGRES_URL to a \
                         server where the tests may CREATE DATABASE ({test})"
                    );
                }
                println!("skipped {test} on PostgreSQL: DSRELAY_TEST_POSTGRES_URL is not set");
                return None;
            }
        };
        let name = format!("t_{:016x}", fastrand::u64(..));
        let admin = Db::connect(&admin_url).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin.pool)
            .await
            .unwrap();
        admin.pool.close().await;
        let url = with_database(&admin_url, &name);
        Some(PostgresTestDb {
            admin_url,
            name,
            url,
        })
    }

    /// `url` with its database name replaced by `name`, keeping any query string.
    fn with_database(url: &str, name: &str) -> String {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (url, String::new()),
        };
        let authority_start = base.find("://").map_or(0, |i| i + 3);
        let server = match base[authority_start..].find('/') {
            Some(i) => &base[..authority_start + i],
            None => base,
        };
        format!("{server}/{name}{query}")
    }

    #[test]
    fn replaces_database_name_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t_1"),
            "postgres://u:p@h:5432/t_1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t_1"), "postgres://h/t_1");
    }
}
