//! The check, when the connector connects, that every table and column the rules name is in
//! the holder's database.
//!
//! SQLite reads a double-quoted identifier that names no column as a string literal, so a
//! misspelt column fails nothing there: `lower("emial") = lower($1)` is never true (every
//! erasure answers NOT_FOUND), a misspelt export column exports its own name as the value,
//! and a misspelt child link finds no children to delete. PostgreSQL would fail the requests
//! instead, one by one. Either way the operator learns it best before the first request.

use std::collections::BTreeMap;

use dsrelay_runtime::store::{Backend, Db};

use super::plan::quote;
use super::rules::SqlConnectorConfig;

/// Names SQLite accepts for a rowid table's row id without a declared column of that name.
const SQLITE_ROWID: [&str; 3] = ["rowid", "oid", "_rowid_"];

/// Fails, naming each table and column, when `db` lacks a table or column of the rules.
pub(super) async fn check_columns(db: &Db, config: &SqlConnectorConfig) -> anyhow::Result<()> {
    let mut by_table: BTreeMap<&str, Vec<(String, &str, &str)>> = BTreeMap::new();
    for (i, rule) in config.tables.iter().enumerate() {
        let at = format!("tables[{i}] ({})", rule.table);
        for (what, table, column) in rule.columns() {
            by_table
                .entry(table)
                .or_default()
                .push((at.clone(), what, column));
        }
    }
    let mut problems = Vec::new();
    for (table, named) in by_table {
        let present = columns_of(db, table).await?;
        // Every rule names a column of its own table (a match column or its parent link), so
        // a table without columns is one the database does not have.
        if present.is_empty() {
            problems.push(format!(
                "table {table:?} is not in the database (or not visible to its user)"
            ));
            continue;
        }
        for (at, what, column) in named {
            if !has_column(db, table, &present, column).await {
                problems.push(format!(
                    "{at}: {what} {column:?} is not a column of table {table:?}"
                ));
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "the holder database does not match the sql connector's rules: {}",
            problems.join("; ")
        );
    }
    Ok(())
}

/// The columns of `table` as the statements' unquoted-then-quoted name finds it.
async fn columns_of(db: &Db, table: &str) -> anyhow::Result<Vec<String>> {
    let (sql, name) = match db.backend {
        // table_xinfo, unlike table_info, also lists generated columns.
        Backend::Sqlite => ("SELECT name FROM pragma_table_xinfo($1)", table.to_string()),
        // The statements name tables unqualified, so they find them through the search path;
        // to_regclass resolves the quoted name the same way, where information_schema would
        // need the schema guessed and hides the columns the user holds no privilege on.
        Backend::Postgres => (
            "SELECT CAST(attname AS TEXT) FROM pg_catalog.pg_attribute \
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            quote(table),
        ),
    };
    sqlx::query_scalar::<_, String>(sql)
        .bind(name)
        .fetch_all(&db.pool)
        .await
        .map_err(|e| anyhow::anyhow!("reading the columns of table {table:?}: {e}"))
}

/// Whether `column` names a column of `table`, whose declared columns are `present`.
async fn has_column(db: &Db, table: &str, present: &[String], column: &str) -> bool {
    match db.backend {
        // PostgreSQL keeps the case of the quoted names the statements use.
        Backend::Postgres => present.iter().any(|p| p == column),
        // SQLite compares identifiers ignoring ASCII case, quoted or not.
        Backend::Sqlite if present.iter().any(|p| p.eq_ignore_ascii_case(column)) => true,
        // The row id is no declared column, and a WITHOUT ROWID table has none: a qualified
        // name, never read as a string, tells.
        Backend::Sqlite if SQLITE_ROWID.iter().any(|r| r.eq_ignore_ascii_case(column)) => {
            let probe = format!(
                "SELECT {t}.{c} FROM {t} WHERE 1 = 0",
                t = quote(table),
                c = quote(column)
            );
            sqlx::query(&probe).execute(&db.pool).await.is_ok()
        }
        Backend::Sqlite => false,
    }
}
