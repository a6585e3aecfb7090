//! The declarative configuration of an SQL subprocessor: its table rules, what each rule asks
//! for, and the validation that every rule is usable and safe to splice into SQL.

use std::collections::{BTreeMap, BTreeSet};

use dsrelay_proto::v1::RequestKind;
use dsrelay_runtime::identity::text_violation;
use dsrelay_runtime::store::Backend;
use serde::{Deserialize, Serialize};

use super::retention::parse_month_day;

/// The literal that `redacted` writes into a column.
pub const REDACTED: &str = "[erased]";

/// How long rows kept only by a `while` condition wait for the next check, unless configured.
pub const DEFAULT_RECHECK_DAYS: u32 = 30;

/// The identity types a `match` table may use, by their configuration key: the runtime's
/// identity fields, which corrections are checked by too. `OTHER` is not among them because
/// its values mean different things from one request to the next (see its label).
pub(super) use dsrelay_runtime::identity::IDENTITY_FIELDS as MATCH_KEYS;

/// The configuration of one SQL subprocessor (everything after `type = "sql"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConnectorConfig {
    /// Where the data lives: `sqlite://path` or `postgres://user@host/db`. The connector needs
    /// its own URL because the holder's database is not the processor's store. When every
    /// controller has a database of its own (`controllers`), it is not opened.
    pub url: String,
    /// The tables holding the subject's data and what to do in each; a table not listed here
    /// is never touched.
    pub tables: Vec<TableRule>,
    /// The processor's controller names (`ControllerConfig.name`) to where each one's data is
    /// in this holder. Empty: the data is not scoped, and all of it belongs to whichever
    /// controller asks. Otherwise every request is confined to its controller's data, and a
    /// controller not listed is refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub controllers: BTreeMap<String, ControllerScope>,
    /// The table the connector keeps its erasure receipts in, in each database it erases in
    /// (default `dsrelay_erasure_receipts`): one row per erasure task, written with the
    /// erasure, so that a retry whose earlier call committed answers with that call's counts
    /// instead of NOT_FOUND. Created when the connector connects if it is missing; the table
    /// of what a contract end's export returned, named after it (`<name>_returned`), is
    /// created by the first contract end's export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipts_table: Option<String>,
}

/// Where one controller's data is: rows of the shared database a condition selects, or a
/// database of its own. Exactly one of the two is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerScope {
    /// A SQL condition over the columns of the matched (top-level) tables, e.g.
    /// `tenant = 'acme'`, ANDed into every statement's selection of their rows; child tables
    /// are reached through their parent's selected rows. It must hold for the same rows
    /// before and after an erasure, so it must not use `anonymize` columns. Spliced into the
    /// statements as written, like `retain.while`: trusted operator configuration, never user
    /// input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// The controller's own database (`sqlite://path` or `postgres://...`), with the tables
    /// of `tables`; every row of a configured table there is the controller's. Connected
    /// when the connector starts, as `url` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// What to do with the subject's rows in one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRule {
    /// The table name: a plain identifier, because it is spliced into SQL (quoted).
    pub table: String,
    /// What erasure does: delete the rows, anonymize them, or keep them.
    pub action: Action,
    /// A table whose rows hang off a matched table's: its rows are also found through the
    /// rows the parent table matches, and handled before the parent's.
    #[serde(default)]
    pub parent: Option<ParentLink>,
    /// Identity type (`email`, `phone`, `customer_number`, `national_id`) to the column that
    /// holds it, for tables that identify the subject themselves. A child table (`parent`)
    /// may have them too: its rows are then those its own match finds or those of the
    /// parent's matched rows, so that a contact person or an address copied into an invoice
    /// is found even when the parent row is someone else's or no longer carries it.
    #[serde(default, rename = "match")]
    pub match_columns: BTreeMap<String, String>,
    /// The columns to overwrite and with what: for `anonymize`, what erasure overwrites; for
    /// any action, what is overwritten at once in rows that are kept under `retain` (or, in a
    /// matched table, kept because child rows are). Columns left out keep their value, which
    /// is how amounts and dates survive for the bookkeeping.
    #[serde(default)]
    pub anonymize: BTreeMap<String, AnonymizeWith>,
    /// The columns a RETURN_OF_DATA or TRANSFER export contains; a table without them is not
    /// exported there. A contract end's export also includes every table its erasure deletes
    /// or anonymizes, with all of its columns when it has no `export`, so that nothing is
    /// erased that was not returned. Columns of integer, floating-point, boolean and text
    /// types are exported as they are, blobs as hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export: Vec<String>,
    /// Logical field of a RECTIFICATION (`email`, `phone`, `name`, `address`, ...) to the
    /// column holding it here. Only tables listing a field are changed by its correction.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rectify: BTreeMap<String, String>,
    /// A flag column that RESTRICTION sets to 1 and a lift sets back to 0 (TRUE and FALSE in a
    /// PostgreSQL boolean). A column of another type than boolean, number or text is refused
    /// when the connector connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restrict_column: Option<String>,
    /// A flag column that an OBJECTION to direct marketing sets to 1 (TRUE in a PostgreSQL
    /// boolean), refused at connect as `restrict_column` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress_column: Option<String>,
    /// A legal obligation to keep the rows for a while (see the module documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<Retention>,
    /// The data categories the table holds (`["invoicing"]`), each one of the
    /// subprocessor's; left out, the table holds every category of its subprocessor. A
    /// request scoped to categories acts on, and exports, only the tables holding one of
    /// them, and each table's export files are labelled with its own categories (for a
    /// scoped request, those of them it asked for; see the module documentation). Not
    /// empty, no category twice, each 1 to 64 bytes of text without control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub categories: Option<Vec<String>>,
}

/// Tests' starting point: a rule for no table that keeps its rows and names no column.
/// Only tests have it: a rule read from configuration must name its table and action (serde
/// has no default for either), and production code spells out every field of a rule it
/// builds, so that a field added later is decided on there rather than defaulted unseen.
#[cfg(test)]
impl Default for TableRule {
    fn default() -> Self {
        Self {
            table: String::new(),
            action: Action::Keep,
            parent: None,
            match_columns: BTreeMap::new(),
            anonymize: BTreeMap::new(),
            export: Vec::new(),
            rectify: BTreeMap::new(),
            restrict_column: None,
            suppress_column: None,
            retain: None,
            categories: None,
        }
    }
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
    /// Whether a subject's export includes only the rows this table's own `match` finds, not
    /// every row of the subject's parent rows: for child rows that describe other people
    /// (a customer company's contact persons), who are not the subject. Erasure still takes
    /// every child row of an erased parent row.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export_matched_only: bool,
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
    /// restriction or objection, or to find child rows through it). The erasure counts the
    /// subject's rows there: beside rows it erases, in its note; when they are the only rows
    /// it finds, it erased nothing and is refused, the reason naming the tables and counts
    /// (not COMPLETED, which promises erasure, nor NOT_FOUND, which denies the data).
    Keep,
}

impl Action {
    /// The past tense, for notes ("deleted 2").
    pub(super) fn done(self) -> &'static str {
        match self {
            Action::Delete => "deleted",
            Action::Anonymize => "anonymized",
            Action::Keep => Self::KEPT,
        }
    }

    /// What [`crate::ErasedCount::action`] says of rows kept as they are: a `keep` table's
    /// rows at a contract end, and rows an obligation keeps that the run clears nothing in
    /// (nothing to clear, or cleared by an earlier run). Not erased, so never counted in
    /// `records_affected`.
    pub(super) const KEPT: &'static str = "kept";

    /// What [`crate::ErasedCount::action`] says of rows an obligation keeps that lost the
    /// columns it does not need: kept, not erased, so not counted as erased or anonymized
    /// (`records_affected`); counted there once, when a later run erases them.
    pub(super) const KEPT_AND_STRIPPED: &'static str = "kept and stripped";

    /// The progressive, for error contexts ("deleting from invoices: ..."); an erasure only
    /// counts the subject's rows of a `keep` table.
    pub(super) fn doing(self) -> &'static str {
        match self {
            Action::Delete => "deleting from",
            Action::Anonymize => "anonymizing",
            Action::Keep => "counting the subject's rows of",
        }
    }
}

/// The value an anonymized column gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnonymizeWith {
    /// SQL `NULL`, for nullable columns of any type (one declared NOT NULL is refused when
    /// the connector connects).
    Null,
    /// The text `[erased]`, for `NOT NULL` text columns and to show a reader what happened.
    /// Only for columns that take text: the connector refuses it when it connects for a
    /// PostgreSQL column whose declared type is not of the string category (a number, date,
    /// boolean or UUID) or is a `varchar(n)` or `char(n)` shorter than the text, and for a
    /// SQLite STRICT table's INT, INTEGER, REAL or BLOB column (any other SQLite column
    /// stores the text as it is), naming the column and its type: use `null` there, or leave
    /// the column out. A delete table's `keep_columns` and link, never written, are not
    /// checked.
    Redacted,
}

/// A legal obligation to keep a table's rows: until the end of the fiscal year containing
/// `from_column`'s date plus `years` years, and as long as `while` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// The law or contract, as reported to the controller (e.g. "Kirjanpitolaki 1336/1997
    /// 2:10 §") and listed in deletion certificates word for word: at most 1024 bytes,
    /// without control characters other than tab and line breaks.
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
    /// The basis reported for rows kept only by `while`; `basis` when left out. Held to the
    /// same limits as `basis`.
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

/// What the table of a contract end's returned rows adds to the receipts table's name.
const RETURNED_SUFFIX: &str = "_returned";

/// The most bytes a `retain` basis may have: the processor reports the bases in
/// `Acknowledgement.legal_basis`, which holds at most this many and cuts a longer text.
const MAX_BASIS: usize = 1024;

fn default_recheck_days() -> u32 {
    DEFAULT_RECHECK_DAYS
}

impl SqlConnectorConfig {
    /// The table of the erasure receipts: `receipts_table`, or its default.
    pub fn receipts_table(&self) -> &str {
        self.receipts_table
            .as_deref()
            .unwrap_or(super::receipt::DEFAULT_RECEIPTS_TABLE)
    }

    /// The table of the rows a contract end's export returned, beside the receipts and
    /// named after them: `<receipts table>_returned`.
    pub fn returned_table(&self) -> String {
        format!("{}{RETURNED_SUFFIX}", self.receipts_table())
    }

    /// Every rule the configuration breaks, each naming the table and the rule; empty when
    /// the configuration is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(table) = &self.receipts_table {
            if !is_identifier(table) {
                out.push(format!(
                    "receipts_table: {table:?} must be a plain identifier (a letter or _, then \
                     letters, digits or _, at most 63)"
                ));
            } else if table.len() + RETURNED_SUFFIX.len() > 63 {
                // PostgreSQL would cut the longer name to 63 bytes, onto another table's.
                out.push(format!(
                    "receipts_table: {table:?} is too long: the connector names the table of \
                     what a contract end returned after it ({:?}), which must fit in 63 \
                     characters, so at most {} are left for it",
                    self.returned_table(),
                    63 - RETURNED_SUFFIX.len()
                ));
            }
            if self.tables.iter().any(|t| &t.table == table) {
                out.push(format!(
                    "receipts_table: {table:?} is a configured table; the receipts need a \
                     table of their own"
                ));
            }
        }
        let returned = self.returned_table();
        if self.tables.iter().any(|t| t.table == returned) {
            out.push(format!(
                "tables: {returned:?} is the connector's own table of what a contract end \
                 returned (named after receipts_table); rename receipts_table"
            ));
        }
        if self.url.trim().is_empty() {
            out.push("url: must not be empty (sqlite://path or postgres://...)".to_string());
        } else if let Err(e) = Backend::of_url(&self.url) {
            // Here, so that a scheme the connector cannot open refuses the start with the
            // other settings rather than failing it at connect.
            out.push(format!("url: {e}"));
        }
        if self.tables.is_empty() {
            out.push("tables: at least one table rule is required".to_string());
        }
        for (name, scope) in &self.controllers {
            let at = format!("controllers.{name:?}");
            if name.trim().is_empty() {
                out.push("controllers: a controller name must not be empty".to_string());
            }
            match (&scope.condition, &scope.url) {
                (Some(_), Some(_)) | (None, None) => out.push(format!(
                    "{at}: give exactly one of condition (rows of the shared database) and \
                     url (a database of its own)"
                )),
                (Some(condition), None) => {
                    if let Err(why) = check_condition(condition) {
                        out.push(format!("{at}: condition {why}"));
                    }
                }
                (None, Some(url)) => {
                    if url.trim().is_empty() {
                        out.push(format!(
                            "{at}: url must not be empty (sqlite://path or postgres://...)"
                        ));
                    } else if let Err(e) = Backend::of_url(url) {
                        out.push(format!("{at}: url: {e}"));
                    }
                }
            }
        }
        let mut seen = BTreeSet::new();
        for (i, rule) in self.tables.iter().enumerate() {
            let at = format!("tables[{i}] ({})", rule.table);
            validate_identifiers(&at, rule, &mut out);
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
            self.validate_lookup(&at, rule, &mut out);
            self.validate_action(&at, rule, &mut out);
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
            if let Some(categories) = &rule.categories {
                validate_categories(&at, categories, &mut out);
            }
        }
        out
    }

    /// How the rule finds the subject's rows: by its own `match`, through a listed, matched
    /// top-level parent, or both.
    fn validate_lookup(&self, at: &str, rule: &TableRule, out: &mut Vec<String>) {
        let Some(parent) = &rule.parent else {
            if rule.match_columns.is_empty() {
                out.push(format!(
                    "{at}: needs either match (identity columns) or parent (a listed table it \
                     hangs off)"
                ));
            }
            return;
        };
        if parent.export_matched_only && rule.match_columns.is_empty() {
            out.push(format!(
                "{at}: parent export_matched_only needs match columns of the table's own"
            ));
        }
        match self.tables.iter().find(|t| t.table == parent.table) {
            None => out.push(format!(
                "{at}: parent table {:?} is not listed in tables",
                parent.table
            )),
            Some(p) if p.match_columns.is_empty() || p.parent.is_some() => out.push(format!(
                "{at}: parent table {:?} must have match and no parent of its own (parents \
                 of parents are not supported)",
                parent.table
            )),
            Some(p) => validate_staying_child(at, rule, parent, p, out),
        }
    }

    /// The action and the `anonymize` map must agree.
    fn validate_action(&self, at: &str, rule: &TableRule, out: &mut Vec<String>) {
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
    }

    /// The rules that find their rows through `parent` and keep some under `retain`.
    pub(super) fn retained_children(&self, parent: &TableRule) -> Vec<(&TableRule, &ParentLink)> {
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
    pub(super) fn usable_keys(&self) -> BTreeSet<&str> {
        self.tables
            .iter()
            .flat_map(|t| t.match_columns.keys().map(String::as_str))
            .collect()
    }

    /// Whether this configuration can carry out requests of `kind`.
    pub fn supports(&self, kind: RequestKind) -> bool {
        let any = |f: fn(&TableRule) -> bool| self.tables.iter().any(f);
        match kind {
            RequestKind::ReturnOfData | RequestKind::Transfer => any(|t| !t.export.is_empty()),
            RequestKind::Rectification => any(|t| !t.rectify.is_empty()),
            RequestKind::Restriction => any(|t| t.restrict_column.is_some()),
            RequestKind::Objection => any(|t| t.suppress_column.is_some()),
            // Erasing is the step every contract end ends with; an export (of a return) needs
            // tables with `export` and writes nothing without them.
            RequestKind::Erasure | RequestKind::ContractEnd => any(|t| t.action != Action::Keep),
            RequestKind::Unspecified => false,
        }
    }

    /// The rules in the order a request handles them: tables found through a parent first,
    /// because their rows are found through the parent's rows, which must still be there.
    pub(super) fn children_first(&self) -> impl Iterator<Item = &TableRule> {
        self.tables
            .iter()
            .filter(|t| t.parent.is_some())
            .chain(self.tables.iter().filter(|t| t.parent.is_none()))
    }
}

/// A child table whose rows stay after an erasure (`keep`, or `anonymize` without clearing
/// its link) while the parent's delete removes the rows they refer to: a foreign key would
/// fail every erasure of such a parent row, and without one the rows would stay unreachable
/// through their parent. Rows kept under `retain` keep their parent row instead
/// ([`SqlConnectorConfig::retained_children`]).
fn validate_staying_child(
    at: &str,
    rule: &TableRule,
    link: &ParentLink,
    parent: &TableRule,
    out: &mut Vec<String>,
) {
    if parent.action != Action::Delete {
        return;
    }
    let why = match rule.action {
        Action::Keep => "its action is keep",
        Action::Anonymize if !rule.anonymize.contains_key(&link.column) => {
            "its anonymize leaves the link column"
        }
        _ => return,
    };
    out.push(format!(
        "{at}: {why}, so its rows would keep referring to the {:?} rows its parent's delete \
         removes (a foreign key fails the erasure); clear {:?} in anonymize, choose delete, \
         or give {:?} action anonymize or keep",
        link.table, link.column, link.table
    ));
}

/// Every name the rule splices into SQL must be a plain identifier.
fn validate_identifiers(at: &str, rule: &TableRule, out: &mut Vec<String>) {
    let mut ident = |what: &str, name: &str| {
        if !is_identifier(name) {
            out.push(format!(
                "{at}: {what} {name:?} is not a plain identifier \
                 ([A-Za-z_][A-Za-z0-9_]*, at most 63 characters)"
            ));
        }
    };
    ident("table", &rule.table);
    if let Some(parent) = &rule.parent {
        ident("parent table", &parent.table);
    }
    for (what, _, column) in rule.columns() {
        ident(what, column);
    }
}

impl TableRule {
    /// Every column the rule names, as (what it is in the rule, its table, the column). One
    /// list for the identifier check and the connect-time check that the columns exist, so
    /// that a column added to the rules cannot escape either.
    pub(super) fn columns(&self) -> Vec<(&'static str, &str, &str)> {
        fn of<'a>(
            what: &'static str,
            table: &'a str,
            columns: impl IntoIterator<Item = &'a String>,
        ) -> impl Iterator<Item = (&'static str, &'a str, &'a str)> {
            columns.into_iter().map(move |c| (what, table, c.as_str()))
        }
        let t = self.table.as_str();
        let retain = self.retain.as_ref();
        let mut out: Vec<_> = of("match column", t, self.match_columns.values()).collect();
        out.extend(of("anonymize column", t, self.anonymize.keys()));
        out.extend(of(
            "parent column",
            t,
            self.parent.iter().map(|p| &p.column),
        ));
        out.extend(of("export column", t, &self.export));
        out.extend(of("rectify column", t, self.rectify.values()));
        out.extend(of("restrict_column", t, &self.restrict_column));
        out.extend(of("suppress_column", t, &self.suppress_column));
        out.extend(of("retain from_column", t, retain.map(|r| &r.from_column)));
        out.extend(of(
            "retain keep column",
            t,
            retain.into_iter().flat_map(|r| &r.keep_columns),
        ));
        if let Some(parent) = &self.parent {
            out.push((
                "parent parent_column",
                parent.table.as_str(),
                &parent.parent_column,
            ));
        }
        out
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
    // A basis goes into acknowledgements and certificates as it is written here; the
    // processor would cut a longer one and replace a control character with U+FFFD, so the
    // certificate would no longer quote the law word for word.
    let bases = [
        ("basis", Some(&retain.basis)),
        ("while_basis", retain.while_basis.as_ref()),
    ];
    for (key, basis) in bases {
        let Some(basis) = basis else {
            continue;
        };
        if let Some(v) = text_violation(key, basis, MAX_BASIS, false) {
            out.push(format!(
                "{at}: retain {} {}; write the law or contract as certificates should quote it",
                v.field, v.rule
            ));
        }
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

/// What is wrong with a `retain.while` or controller condition; the message completes
/// "retain while ..." or "condition ...".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum ConditionError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most 1000 characters")]
    TooLong,
    #[error("must be one condition, without ;")]
    Semicolon,
    #[error("must not contain $ (parameters and dollar quoting)")]
    Dollar,
    #[error("must not contain comments (--)")]
    LineComment,
    #[error("must not contain comments (/*)")]
    BlockComment,
    #[error("has unbalanced parentheses")]
    UnbalancedParentheses,
    #[error("has an unterminated string literal")]
    UnterminatedString,
}

/// Catches the mistakes that would break the statements a `while` or controller condition is
/// spliced into.
/// Not a defence against hostile SQL: the condition is trusted configuration.
pub(super) fn check_condition(condition: &str) -> Result<(), ConditionError> {
    if condition.trim().is_empty() {
        return Err(ConditionError::Empty);
    }
    if condition.len() > 1000 {
        return Err(ConditionError::TooLong);
    }
    let mut depth = 0i32;
    let mut quoted = false;
    let mut previous = ' ';
    for c in condition.chars() {
        if c == '\'' {
            quoted = !quoted;
        } else if !quoted {
            match c {
                ';' => return Err(ConditionError::Semicolon),
                '$' => return Err(ConditionError::Dollar),
                '-' if previous == '-' => return Err(ConditionError::LineComment),
                '*' if previous == '/' => return Err(ConditionError::BlockComment),
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(ConditionError::UnbalancedParentheses);
                    }
                }
                _ => {}
            }
        }
        previous = c;
    }
    if quoted {
        return Err(ConditionError::UnterminatedString);
    }
    if depth != 0 {
        return Err(ConditionError::UnbalancedParentheses);
    }
    Ok(())
}

/// The most bytes a table's data category may have, as the registry allows in a scope.
pub(super) const MAX_CATEGORY: usize = 64;

/// A table's `categories`: named once each, by the rules a request's scope follows, so that a
/// scope can meet them; an empty list would put the table in no request's scope, where
/// leaving `categories` out puts it in every one.
fn validate_categories(at: &str, categories: &[String], out: &mut Vec<String>) {
    if categories.is_empty() {
        out.push(format!(
            "{at}: categories must not be empty; list the data categories the table holds, \
             or leave categories out for a table holding every category of its subprocessor"
        ));
    }
    for (i, category) in categories.iter().enumerate() {
        if let Some(v) = text_violation("category", category, MAX_CATEGORY, true) {
            out.push(format!(
                "{at}: categories[{i}] {category:?} {}; name a data category of the \
                 subprocessor",
                v.rule
            ));
        } else if categories[..i].contains(category) {
            out.push(format!(
                "{at}: categories[{i}] {category:?} is listed twice; list each category once"
            ));
        }
    }
}

/// Whether `name` may be spliced into SQL (quoted): `[A-Za-z_][A-Za-z0-9_]*`, at most 63
/// characters (PostgreSQL's limit).
pub(super) fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && name.len() <= 63
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::sample_config;

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

    /// A basis goes into certificates word for word: one the processor would have to alter
    /// (a control character it replaces, a length it cuts) is refused as the configuration
    /// is loaded, naming the table and key; tab and line breaks pass, as they do there.
    #[test]
    fn a_basis_the_certificate_could_not_quote_is_refused() {
        // Each basis as a TOML basic string's contents, its escapes as TOML reads them.
        let config = |basis: &str, while_basis: &str| {
            let text = format!(
                "type = \"sql\"\nurl = \"sqlite::memory:\"\n[[tables]]\ntable = \"t\"\n\
                 action = \"delete\"\nmatch = {{ email = \"email\" }}\n[tables.retain]\n\
                 basis = \"{basis}\"\nyears = 1\nfrom_column = \"d\"\n\
                 while = \"open = 1\"\nwhile_basis = \"{while_basis}\"\n"
            );
            toml::from_str::<crate::config::ConnectorConfig>(&text).unwrap()
        };
        let problems = config(r"Kirjanpitolaki\u0001 2:10 §", r"Perintälaki\u007F").validate();
        assert_eq!(
            problems,
            [
                "tables[0] (t): retain basis must not contain control characters (other than \
                 tab and line breaks): found U+0001; write the law or contract as certificates \
                 should quote it",
                "tables[0] (t): retain while_basis must not contain control characters (other \
                 than tab and line breaks): found U+007F; write the law or contract as \
                 certificates should quote it",
            ]
        );
        let long = "§".repeat(MAX_BASIS / 2 + 1);
        assert_eq!(
            config(&long, "b").validate(),
            [
                "tables[0] (t): retain basis must be at most 1024 bytes; write the law or \
              contract as certificates should quote it"
            ]
        );
        let fits = "x".repeat(MAX_BASIS);
        assert_eq!(config(&fits, r"a\tb\r\nc").validate(), Vec::<String>::new());
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
        config.tables[0].match_columns.clear();
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
                export_matched_only: false,
            }),
            ..config.tables[0].clone()
        });
        let problems = config.validate();
        let expect = [
            "tables[0] (contacts): needs either match",
            "tables[2] (ledger_entries): anonymize column \"x\\\"y\" is not a plain identifier",
            "tables[2] (ledger_entries): its anonymize leaves the link column, so its rows \
             would keep referring to the \"customers\" rows its parent's delete removes",
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
            retain: config.tables[2].retain.clone(),
            ..Default::default()
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
                "tables[2] (ledger_entries): its action is keep, so its rows would keep \
                 referring to the \"customers\" rows its parent's delete removes (a foreign key \
                 fails the erasure); clear \"customer_id\" in anonymize, choose delete, or give \
                 \"customers\" action anonymize or keep",
                "tables[2] (ledger_entries): retain is given but the action is keep, which never \
              erases; remove it or choose delete or anonymize"
            ]
        );
    }

    /// A child may match the subject itself; a child that stays after its parent's delete
    /// (keep, or anonymize keeping its link) is refused, not left to fail every erasure on
    /// the foreign key.
    #[test]
    fn children_may_match_and_must_not_outlive_a_deleted_parent() {
        let config = sample_config("sqlite::memory:");
        assert!(config.tables[0].parent.is_some() && !config.tables[0].match_columns.is_empty());
        assert_eq!(config.validate(), Vec::<String>::new());

        let mut config = sample_config("sqlite::memory:");
        config.tables[0].match_columns.clear();
        config.tables[0].action = Action::Keep;
        config.tables[2].anonymize.remove("customer_id");
        let problems = config.validate();
        let expect = [
            "tables[0] (contacts): parent export_matched_only needs match columns",
            "tables[0] (contacts): its action is keep, so its rows would keep referring",
            "tables[2] (ledger_entries): its anonymize leaves the link column",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(e)),
                "{e} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");

        // Under a parent that is never deleted, a child may stay.
        let mut config = sample_config("sqlite::memory:");
        config.tables[0].action = Action::Keep;
        config.tables[3].action = Action::Anonymize;
        assert_eq!(config.validate(), Vec::<String>::new());
    }

    /// A URL the connector could not open is refused with the other settings, with the
    /// message connecting gives and without its password; each scheme connecting takes passes.
    #[test]
    fn a_url_of_another_database_is_refused_at_validation() {
        for good in [
            "sqlite::memory:",
            "sqlite://holder.db",
            "postgres://u@h/db",
            "postgresql://u@h/db",
        ] {
            let mut config = sample_config(good);
            config.controllers.insert(
                "globex".into(),
                ControllerScope {
                    condition: None,
                    url: Some(good.into()),
                },
            );
            assert_eq!(config.validate(), Vec::<String>::new(), "{good}");
        }
        let mut config = sample_config("mysql://u:secret@x/y");
        config.controllers.insert(
            "globex".into(),
            ControllerScope {
                condition: None,
                url: Some("postgre://h/db".into()),
            },
        );
        let problems = config.validate();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("url: database url \"mysql://"),
            "{problems:?}"
        );
        assert!(
            problems[0].ends_with("must start with sqlite: or postgres://"),
            "{problems:?}"
        );
        assert!(!problems[0].contains("secret"), "{problems:?}");
        assert_eq!(
            problems[1],
            "controllers.\"globex\": url: database url \"postgre://h/db\" must start with \
             sqlite: or postgres://"
        );
        let connecting = Backend::of_url("mysql://u:secret@x/y").unwrap_err();
        assert_eq!(problems[0], format!("url: {connecting}"));
    }

    #[test]
    fn while_conditions_are_checked_for_mistakes() {
        // "ok" for a usable condition, else the message completing "retain while ...".
        let why = |c: &str| check_condition(c).map_or_else(|e| e.to_string(), |()| "ok".into());
        assert_eq!(why("status IN ('open', 'collection')"), "ok");
        assert_eq!(why("note = 'a;b -- (c'"), "ok");
        assert_eq!(why(" "), "must not be empty");
        assert_eq!(why("a = 1 -- x"), "must not contain comments (--)");
        assert_eq!(why("a = 1 /* x */"), "must not contain comments (/*)");
        assert_eq!(
            why("a = $1"),
            "must not contain $ (parameters and dollar quoting)"
        );
        assert_eq!(why("a = 1) OR (1 = 1"), "has unbalanced parentheses");
        assert_eq!(why("(a = 1"), "has unbalanced parentheses");
        assert_eq!(why("a = 'x"), "has an unterminated string literal");
    }
}
