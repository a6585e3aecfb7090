//! Erasure in accounting and ERP databases (SQLite or PostgreSQL) by declarative table rules.
//!
//! Each rule names a table and what to do with the subject's rows there: delete them, or
//! anonymize some columns (for rows a retention duty keeps, such as issued invoices). A table
//! finds the subject's rows either directly, by matching identity values against columns
//! (`match`), or through a parent table's matched rows (`parent`).
//!
//! One request runs in one transaction: child tables first, so that they are still reachable
//! through their parent's rows, then the matched tables. Identifiers come only from the
//! validated configuration and are quoted; identity values are always bound as parameters.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use dsrelay_proto::v1::{IdentityEncoding, IdentityType, SubjectIdentity};
use dsrelay_runtime::identity::normalize;
use dsrelay_runtime::store::{Backend, Db};
use serde::{Deserialize, Serialize};

use crate::ConnectorError;

/// The sample accounting schema and seed data (valid in SQLite and PostgreSQL).
pub const SAMPLE_ACCOUNTING_SQL: &str = include_str!("../sample/accounting.sql");

/// The erasure rules for the sample accounting database, without the `url`.
pub const SAMPLE_ACCOUNTING_RULES: &str = include_str!("../sample/accounting-rules.toml");

/// The literal that `redacted` writes into a column.
pub const REDACTED: &str = "[erased]";

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
    /// Delete the rows, or anonymize them when the law requires keeping them.
    pub action: Action,
    /// For a table without identity columns of its own: find its rows through the rows the
    /// parent table matches.
    #[serde(default)]
    pub parent: Option<ParentLink>,
    /// Identity type (`email`, `phone`, `customer_number`, `national_id`) to the column that
    /// holds it, for tables that identify the subject themselves.
    #[serde(default, rename = "match")]
    pub match_columns: BTreeMap<String, String>,
    /// For `anonymize`: the columns to overwrite and with what. Columns left out keep their
    /// value, which is how amounts and dates survive for the bookkeeping.
    #[serde(default)]
    pub anonymize: BTreeMap<String, AnonymizeWith>,
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

/// What a rule does with the rows it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Delete the rows.
    Delete,
    /// Keep the rows but overwrite the columns listed in `anonymize`.
    Anonymize,
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
            match rule.action {
                Action::Anonymize if rule.anonymize.is_empty() => out.push(format!(
                    "{at}: action anonymize needs a non-empty anonymize map (column = \"null\" \
                     or \"redacted\")"
                )),
                Action::Delete if !rule.anonymize.is_empty() => out.push(format!(
                    "{at}: anonymize columns are given but the action is delete; use action = \
                     \"anonymize\" or remove them"
                )),
                _ => {}
            }
        }
        out
    }

    /// The identity types some table can match, by configuration key, for messages.
    fn usable_keys(&self) -> BTreeSet<&str> {
        self.tables
            .iter()
            .flat_map(|t| t.match_columns.keys().map(String::as_str))
            .collect()
    }
}

/// The rules of [`SAMPLE_ACCOUNTING_RULES`] for the sample database at `url`.
///
/// Built in code rather than parsed from the file so that it cannot fail at run time; a test
/// checks that the two agree.
pub fn sample_config(url: &str) -> SqlConnectorConfig {
    let s = |v: &str| v.to_string();
    let customers_parent = ParentLink {
        table: s("customers"),
        column: s("customer_id"),
        parent_column: s("id"),
    };
    SqlConnectorConfig {
        url: s(url),
        tables: vec![
            TableRule {
                table: s("contacts"),
                action: Action::Delete,
                parent: Some(customers_parent.clone()),
                match_columns: BTreeMap::new(),
                anonymize: BTreeMap::new(),
            },
            TableRule {
                table: s("invoices"),
                action: Action::Anonymize,
                parent: Some(customers_parent),
                match_columns: BTreeMap::new(),
                anonymize: [
                    (s("customer_name"), AnonymizeWith::Null),
                    (s("customer_email"), AnonymizeWith::Null),
                    (s("customer_id"), AnonymizeWith::Null),
                ]
                .into_iter()
                .collect(),
            },
            TableRule {
                table: s("customers"),
                action: Action::Delete,
                parent: None,
                match_columns: [
                    (s("email"), s("email")),
                    (s("customer_number"), s("customer_no")),
                    (s("phone"), s("phone")),
                    (s("national_id"), s("national_id")),
                ]
                .into_iter()
                .collect(),
                anonymize: BTreeMap::new(),
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
}

/// Erases data subjects in one SQL database according to a [`SqlConnectorConfig`].
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

    /// Deletes or anonymizes the subject's rows in every configured table, in one
    /// transaction. Only RAW identities of a type some table matches are used.
    ///
    /// Running it again after success finds nothing and answers `found: false`.
    pub async fn erase(&self, identities: &[SubjectIdentity]) -> Result<ErasureReport, ConnectorError> {
        let statements = plan_erasure(&self.config, identities)?;
        let mut tx = self
            .db
            .pool
            .begin()
            .await
            .map_err(|e| classify("starting a transaction", &e))?;
        let mut total: i64 = 0;
        let mut notes = Vec::with_capacity(statements.len());
        for planned in &statements {
            let Some(sql) = &planned.sql else {
                notes.push(format!(
                    "{}: skipped (no identity of a type it matches)",
                    planned.table
                ));
                continue;
            };
            let mut query = sqlx::query(sql);
            for value in &planned.binds {
                query = query.bind(value.clone());
            }
            let done = query
                .execute(&mut *tx)
                .await
                .map_err(|e| classify(&format!("{} {}", planned.verb_ing(), planned.table), &e))?;
            let rows = i64::try_from(done.rows_affected()).unwrap_or(i64::MAX);
            total = total.saturating_add(rows);
            tracing::debug!(table = %planned.table, action = planned.verb(), rows, "sql rule applied");
            notes.push(format!("{}: {} {rows}", planned.table, planned.verb()));
        }
        tx.commit()
            .await
            .map_err(|e| classify("committing the erasure", &e))?;
        Ok(ErasureReport {
            records_affected: total,
            note: notes.join("; "),
            found: total > 0,
        })
    }
}

/// One statement of an erasure, or a table skipped because no identity applies to it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PlannedStatement {
    table: String,
    action: Action,
    /// `None` when the table (or its parent) matches none of the request's identity types.
    sql: Option<String>,
    binds: Vec<String>,
}

impl PlannedStatement {
    fn verb(&self) -> &'static str {
        match self.action {
            Action::Delete => "deleted",
            Action::Anonymize => "anonymized",
        }
    }

    fn verb_ing(&self) -> &'static str {
        match self.action {
            Action::Delete => "deleting from",
            Action::Anonymize => "anonymizing",
        }
    }
}

/// The statements for erasing the subject known by `identities`, children first.
fn plan_erasure(
    config: &SqlConnectorConfig,
    identities: &[SubjectIdentity],
) -> Result<Vec<PlannedStatement>, ConnectorError> {
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
    // Children before the tables they hang off: their rows are found through the parent's
    // rows, which must still be there.
    let ordered = config
        .tables
        .iter()
        .filter(|t| t.parent.is_some())
        .chain(config.tables.iter().filter(|t| t.parent.is_none()));
    let mut out = Vec::with_capacity(config.tables.len());
    for rule in ordered {
        let mut binds = Vec::new();
        let set = match rule.action {
            Action::Delete => None,
            Action::Anonymize => Some(
                rule.anonymize
                    .iter()
                    .map(|(column, with)| match with {
                        AnonymizeWith::Null => format!("{} = NULL", quote(column)),
                        AnonymizeWith::Redacted => {
                            binds.push(REDACTED.to_string());
                            format!("{} = ${}", quote(column), binds.len())
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        };
        let filter = match &rule.parent {
            None => match_clause(&rule.match_columns, &raw, &mut binds),
            Some(link) => config
                .tables
                .iter()
                .find(|t| t.table == link.table)
                .and_then(|parent| match_clause(&parent.match_columns, &raw, &mut binds))
                .map(|parent_filter| {
                    format!(
                        "{} IN (SELECT {} FROM {} WHERE {parent_filter})",
                        quote(&link.column),
                        quote(&link.parent_column),
                        quote(&link.table)
                    )
                }),
        };
        let sql = filter.map(|filter| match &set {
            None => format!("DELETE FROM {} WHERE {filter}", quote(&rule.table)),
            Some(set) => format!("UPDATE {} SET {set} WHERE {filter}", quote(&rule.table)),
        });
        out.push(PlannedStatement {
            table: rule.table.clone(),
            action: rule.action,
            binds: if sql.is_some() { binds } else { Vec::new() },
            sql,
        });
    }
    Ok(out)
}

/// `(a = $n OR b = $m ...)` over every identity whose type the table matches, with the values
/// appended to `binds`; `None` when no identity applies.
fn match_clause(
    columns: &BTreeMap<String, String>,
    identities: &[(IdentityType, String)],
    binds: &mut Vec<String>,
) -> Option<String> {
    let mut terms = Vec::new();
    for (ty, value) in identities {
        let Some(column) = match_key(*ty).and_then(|k| columns.get(k)) else {
            continue;
        };
        binds.push(value.clone());
        let n = binds.len();
        // Stored addresses keep whatever case they were typed in; the value is already
        // lowercased by normalize().
        terms.push(if *ty == IdentityType::Email {
            format!("lower({}) = ${n}", quote(column))
        } else {
            format!("{} = ${n}", quote(column))
        });
    }
    (!terms.is_empty()).then(|| format!("({})", terms.join(" OR ")))
}

fn match_key(ty: IdentityType) -> Option<&'static str> {
    MATCH_KEYS.iter().find(|(_, t)| *t == ty).map(|(k, _)| *k)
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
    use super::*;

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

    async fn count(db: &Db, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
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
    );

    async fn erases_subject_by_email(url: String) {
        let (connector, db) = sample(&url).await;
        // Mixed case and padding, as a partner might send it; the seed stores it in yet
        // another case.
        let out = connector
            .erase(&[email(" MAIJA.meikalainen@example.FI ")])
            .await
            .unwrap();
        assert_eq!(
            out,
            ErasureReport {
                records_affected: 6,
                note: "contacts: deleted 2; invoices: anonymized 3; customers: deleted 1".into(),
                found: true,
            }
        );
        assert!(!out.note.to_lowercase().contains("maija"));
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 4);
        assert_eq!(
            count(&db, &format!("{C} FROM customers WHERE id = 1")).await,
            0
        );
        // The namesake with another address is someone else.
        assert_eq!(
            count(&db, &format!("{C} FROM customers WHERE id = 5")).await,
            1
        );
        assert_eq!(count(&db, &format!("{C} FROM contacts")).await, 3);
        assert_eq!(
            count(&db, &format!("{C} FROM contacts WHERE customer_id = 1")).await,
            0
        );
        // Invoices are kept for the bookkeeping, without the personal data.
        assert_eq!(count(&db, &format!("{C} FROM invoices")).await, 8);
        assert_eq!(
            count(
                &db,
                &format!(
                    "{C} FROM invoices WHERE id IN (101, 102, 103) AND customer_id IS NULL \
                     AND customer_name IS NULL AND customer_email IS NULL \
                     AND amount_cents > 0 AND issued_on LIKE '2024-%'"
                )
            )
            .await,
            3
        );
        assert_eq!(
            count(
                &db,
                &format!(
                    "{C} FROM invoices WHERE customer_id IS NOT NULL \
                     AND customer_name IS NOT NULL AND customer_email IS NOT NULL"
                )
            )
            .await,
            5
        );

        let again = connector
            .erase(&[email("maija.meikalainen@example.fi")])
            .await
            .unwrap();
        assert_eq!(again.records_affected, 0);
        assert!(!again.found);
        assert_eq!(
            again.note,
            "contacts: deleted 0; invoices: anonymized 0; customers: deleted 0"
        );
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 4);
    }

    async fn erases_subject_by_customer_number(url: String) {
        let (connector, db) = sample(&url).await;
        let out = connector
            .erase(&[ident(
                IdentityType::CustomerNumber,
                IdentityEncoding::Raw,
                "C-1002",
            )])
            .await
            .unwrap();
        assert_eq!(out.records_affected, 4);
        assert!(out.found);
        assert_eq!(
            out.note,
            "contacts: deleted 1; invoices: anonymized 2; customers: deleted 1"
        );
        assert_eq!(
            count(
                &db,
                &format!("{C} FROM customers WHERE customer_no = 'C-1002'")
            )
            .await,
            0
        );
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 4);
        assert_eq!(count(&db, &format!("{C} FROM contacts")).await, 4);
        assert_eq!(
            count(&db, &format!("{C} FROM invoices WHERE customer_id IS NULL")).await,
            2
        );
        assert_eq!(count(&db, &format!("{C} FROM invoices")).await, 8);
    }

    async fn several_identities_of_one_subject_count_once(url: String) {
        let (connector, db) = sample(&url).await;
        let out = connector
            .erase(&[
                email("maija.meikalainen@example.fi"),
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
            ])
            .await
            .unwrap();
        assert_eq!(out.records_affected, 6);
        assert_eq!(
            out.note,
            "contacts: deleted 2; invoices: anonymized 3; customers: deleted 1"
        );
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 4);
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
        let err = connector.erase(&[hashed, other]).await.unwrap_err();
        assert_eq!(
            err,
            ConnectorError::Permanent(
                "the sql connector needs a raw identity of type customer_number, email, \
                 national_id, phone (configured match columns); hashed identities cannot be \
                 matched in SQL"
                    .into()
            )
        );
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 5);
    }

    async fn sql_errors_roll_back_every_table(url: String) {
        let (_, db) = sample(&url).await;
        let mut config = sample_config(&url);
        // The invoices rule runs after contacts; its error must undo the contacts deletion.
        config.tables[1]
            .anonymize
            .insert("no_such_column".into(), AnonymizeWith::Redacted);
        let connector = SqlConnector::connect(config).await.unwrap();
        let err = connector
            .erase(&[email("maija.meikalainen@example.fi")])
            .await
            .unwrap_err();
        let ConnectorError::Permanent(message) = &err else {
            panic!("expected a permanent error, got {err:?}");
        };
        assert!(message.starts_with("anonymizing invoices: "), "{message}");
        assert!(message.contains("no_such_column"), "{message}");
        assert!(!message.to_lowercase().contains("maija"), "{message}");
        assert_eq!(count(&db, &format!("{C} FROM contacts")).await, 5);
        assert_eq!(count(&db, &format!("{C} FROM customers")).await, 5);
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
        let err = connector
            .erase(&[email("maija.meikalainen@example.fi")])
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        assert!(err.to_string().contains("database is locked"), "{err}");
        sqlx::query("ROLLBACK").execute(&mut *writer).await.unwrap();
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
        assert_eq!(parsed, sample_config("sqlite://data/accounting.db"));
        assert_eq!(parsed.validate(), Vec::<String>::new());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<SqlConnectorConfig>(
            "url = \"sqlite::memory:\"\n[[tables]]\ntable = \"t\"\naction = \"delete\"\n\
             match = { email = \"email\" }\ncascade = true\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("cascade"), "{err}");
    }

    #[test]
    fn validation_rejects_unsafe_identifiers_and_unlisted_parents() {
        let mut config = sample_config("sqlite::memory:");
        config.tables[2].table = "customers; drop table x".into();
        let problems = config.validate();
        assert!(
            problems.iter().any(
                |p| p.starts_with("tables[2] (customers; drop table x): table")
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
        config.tables[1].anonymize.clear();
        config.tables[1]
            .anonymize
            .insert("x\"y".into(), AnonymizeWith::Null);
        config.tables[2]
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
            "tables[1] (invoices): anonymize column \"x\\\"y\" is not a plain identifier",
            "tables[2] (customers): match key \"loyalty\" is not an identity type",
            "tables[3] (contacts): the table is listed twice",
            "tables[3] (contacts): parent table \"invoices\" must have match",
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
        )
        .unwrap();
        let sql: Vec<_> = plan.iter().map(|p| p.sql.clone().unwrap()).collect();
        assert_eq!(
            sql,
            [
                "DELETE FROM \"contacts\" WHERE \"customer_id\" IN (SELECT \"id\" FROM \
                 \"customers\" WHERE (lower(\"email\") = $1 OR \"customer_no\" = $2))",
                "UPDATE \"invoices\" SET \"customer_email\" = NULL, \"customer_id\" = NULL, \
                 \"customer_name\" = NULL WHERE \"customer_id\" IN (SELECT \"id\" FROM \
                 \"customers\" WHERE (lower(\"email\") = $1 OR \"customer_no\" = $2))",
                "DELETE FROM \"customers\" WHERE (lower(\"email\") = $1 OR \"customer_no\" = $2)",
            ]
        );
        assert_eq!(plan[0].binds, ["maija@example.fi", "C-1001"]);

        let mut config = sample_config("sqlite::memory:");
        config.tables[1]
            .anonymize
            .insert("customer_name".into(), AnonymizeWith::Redacted);
        let plan = plan_erasure(&config, &[email("a@b.fi")]).unwrap();
        assert_eq!(
            plan[1].sql.as_deref(),
            Some(
                "UPDATE \"invoices\" SET \"customer_email\" = NULL, \"customer_id\" = NULL, \
                 \"customer_name\" = $1 WHERE \"customer_id\" IN (SELECT \"id\" FROM \
                 \"customers\" WHERE (lower(\"email\") = $2))"
            )
        );
        assert_eq!(plan[1].binds, [REDACTED, "a@b.fi"]);
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

impl crate::Connector for SqlConnector {
    fn kind_name(&self) -> &'static str {
        "sql"
    }

    fn supports(&self, kind: dsrelay_proto::v1::RequestKind) -> bool {
        kind == dsrelay_proto::v1::RequestKind::Erasure
    }

    fn run<'a>(
        &'a self,
        task: &'a crate::Task,
    ) -> crate::BoxFuture<'a, Result<crate::Outcome, ConnectorError>> {
        Box::pin(async move {
            let report = self.erase(&task.identities).await?;
            Ok(if report.found {
                crate::Outcome::Completed {
                    records_affected: report.records_affected,
                    note: report.note,
                    export: None,
                }
            } else {
                crate::Outcome::NotFound { note: report.note }
            })
        })
    }
}
