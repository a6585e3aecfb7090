//! The sample accounting database (customers, contacts, invoices, ledger entries) and its
//! rules, for `dsrctl dev`, the end-to-end tests and this crate's own tests.

use std::collections::BTreeMap;

use anyhow::Context;
use dsrelay_runtime::store::Db;

use super::rules::{
    Action, AnonymizeWith, ParentLink, Retention, SqlConnectorConfig, TableRule,
    DEFAULT_RECHECK_DAYS,
};

/// The sample accounting schema and seed data (valid in SQLite and PostgreSQL).
pub const SAMPLE_ACCOUNTING_SQL: &str = include_str!("../../sample/accounting.sql");

/// The rules for the sample accounting database, without the `url`.
pub const SAMPLE_ACCOUNTING_RULES: &str = include_str!("../../sample/accounting-rules.toml");

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
            export_matched_only: false,
        }),
        match_columns: BTreeMap::new(),
        anonymize: BTreeMap::new(),
        export: Vec::new(),
        rectify: BTreeMap::new(),
        restrict_column: None,
        suppress_column: None,
        retain: None,
        categories: None,
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
            TableRule {
                parent: Some(ParentLink {
                    table: s("customers"),
                    column: s("customer_id"),
                    parent_column: s("id"),
                    export_matched_only: true,
                }),
                match_columns: [(s("email"), s("email")), (s("phone"), s("phone"))]
                    .into_iter()
                    .collect(),
                export: strings(&["name", "email", "phone"]),
                ..rule("contacts", Action::Delete)
            },
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
                export: strings(&["booked_on", "amount_cents", "description"]),
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
        controllers: BTreeMap::new(),
        receipts_table: None,
    }
}

/// Creates the sample accounting schema and seed data at `url` unless a `customers` table
/// already exists there.
pub async fn create_sample_accounting_db(url: &str) -> anyhow::Result<()> {
    let db = Db::connect(url).await?;
    let result = create_sample_in(&db).await;
    // Closing explicitly lets SQLite checkpoint and PostgreSQL drop the sessions now rather
    // than whenever the pool happens to be dropped.
    db.close().await;
    result
}

async fn create_sample_in(db: &Db) -> anyhow::Result<()> {
    let found: i64 = sqlx::query_scalar(db.backend.table_exists())
        .bind("customers")
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
