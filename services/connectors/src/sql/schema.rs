//! The check, when the connector connects, that every table and column the rules name is in
//! the holder's database, and the types of those columns ([`ColumnTypes`]).
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

/// The types, as the catalog declares them, of the columns the rules name, keyed by the
/// rules' spelling of table and column, and of every other column of their tables.
///
/// On PostgreSQL a statement cannot treat every column as text: sqlx's `Any` driver decodes
/// only booleans, integers, floats, text and bytes (a DATE, NUMERIC or UUID fails the row),
/// and a text parameter compared with or written into a BIGINT column fails the statement
/// (`operator does not exist: bigint = text`). SQLite converts a bound text by the column's
/// affinity and reads every value by its own storage class, so there only the batch keys
/// use what is learned here.
#[derive(Debug, Default)]
pub(super) struct ColumnTypes(
    BTreeMap<(String, String), ColumnType>,
    /// Every column of each table the rules name, in the catalog's order: what a contract
    /// end returns of a table without `export` columns, so that what its erasure removes
    /// was returned.
    BTreeMap<String, Vec<String>>,
);

/// What the statements need to know of one column's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ColumnType {
    /// The type as the database declares it (`numeric(12,2)`, `uuid`): what a written value
    /// is cast to.
    pub(super) declared: String,
    /// How a bound identity value is compared with it.
    pub(super) compare: Compare,
    /// Whether sqlx's `Any` driver decodes its values; the others are read as text.
    pub(super) native: bool,
    /// Whether it holds integers: a batch key compared as one reads its range from an index.
    pub(super) integer: bool,
}

/// How a bound text is compared with (and written into) a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compare {
    /// The column as it is, the value as bound: text columns, and every SQLite column.
    AsIs,
    /// The column as it is, the value cast to BIGINT once Rust has read it as an integer (a
    /// value that is none is left out of the match), so an index on the column serves it.
    Integer,
    /// The column cast to text: any other PostgreSQL type, where a cast of the value could
    /// fail the whole statement. An index on the bare column does not serve this.
    AsText,
}

impl Default for ColumnType {
    /// A column the catalog did not describe: used as it is.
    fn default() -> Self {
        Self {
            declared: String::new(),
            compare: Compare::AsIs,
            native: true,
            integer: false,
        }
    }
}

impl ColumnType {
    /// PostgreSQL's `declared` type, named by `format_type` with and without its modifier
    /// (`own`), and the type a domain is over (`base`; the type itself otherwise).
    pub(super) fn postgres(declared: String, own: &str, base: &str) -> Self {
        let compare = match base {
            "text" | "character varying" | "character" => Compare::AsIs,
            "smallint" | "integer" | "bigint" => Compare::Integer,
            _ => Compare::AsText,
        };
        // The types `Any` maps (sqlx-postgres `any.rs`); a domain is reported by its own
        // name, which it does not know.
        let native = matches!(
            own,
            "boolean"
                | "smallint"
                | "integer"
                | "bigint"
                | "real"
                | "double precision"
                | "bytea"
                | "text"
                | "character varying"
        );
        Self {
            declared,
            compare,
            native,
            integer: compare == Compare::Integer,
        }
    }

    /// SQLite's declared type: integers where its affinity is INTEGER (the name contains
    /// "INT").
    fn sqlite(declared: String) -> Self {
        Self {
            integer: declared.to_ascii_uppercase().contains("INT"),
            declared,
            ..Self::default()
        }
    }

    /// The placeholder `p` as a value written into the column: cast to the declared type
    /// where a text would not be assigned to it.
    pub(super) fn written(&self, p: &str) -> String {
        match self.compare {
            Compare::AsIs => p.to_string(),
            Compare::Integer | Compare::AsText => format!("CAST({p} AS {})", self.declared),
        }
    }
}

impl ColumnTypes {
    /// The types of the (table, column) pairs given.
    #[cfg(test)]
    pub(super) fn of_columns<'a>(
        columns: impl IntoIterator<Item = (&'a str, &'a str, ColumnType)>,
    ) -> Self {
        Self(
            columns
                .into_iter()
                .map(|(t, c, ty)| ((t.to_string(), c.to_string()), ty))
                .collect(),
            BTreeMap::new(),
        )
    }

    /// Every column of `table` as the catalog listed it when the connector connected.
    pub(super) fn all_columns(&self, table: &str) -> &[String] {
        self.1.get(table).map_or(&[], Vec::as_slice)
    }

    /// `column` of `table`, as the rules spell them; the default for one not described.
    pub(super) fn of(&self, table: &str, column: &str) -> ColumnType {
        self.0
            .get(&(table.to_string(), column.to_string()))
            .cloned()
            .unwrap_or_default()
    }
}

/// Fails, naming each table and column, when `db` lacks a table or column of the rules;
/// otherwise answers their types.
pub(super) async fn check_columns(
    db: &Db,
    config: &SqlConnectorConfig,
) -> anyhow::Result<ColumnTypes> {
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
    let mut types = ColumnTypes::default();
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
        let mut all = Vec::with_capacity(present.len());
        for p in &present {
            if let Some(ty) = find_column(db, table, &present, &p.name).await {
                types
                    .0
                    .insert((table.to_string(), p.name.clone()), ty.clone());
                all.push(p.name.clone());
            }
        }
        types.1.insert(table.to_string(), all);
        for (at, what, column) in named {
            match find_column(db, table, &present, column).await {
                Some(ty) => {
                    types.0.insert((table.to_string(), column.to_string()), ty);
                }
                None => problems.push(format!(
                    "{at}: {what} {column:?} is not a column of table {table:?}"
                )),
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "the holder database does not match the sql connector's rules: {}",
            problems.join("; ")
        );
    }
    Ok(types)
}

/// One column of a table as the catalog describes it.
#[derive(Debug, sqlx::FromRow)]
struct Present {
    name: String,
    /// The declared type, with its modifier (`numeric(12,2)`); SQLite's as written.
    declared: String,
    /// PostgreSQL: the type without its modifier; SQLite: empty.
    own: String,
    /// PostgreSQL: the type a domain is over, else `own`; SQLite: empty.
    base: String,
}

/// The columns of `table` as the statements' unquoted-then-quoted name finds it.
async fn columns_of(db: &Db, table: &str) -> anyhow::Result<Vec<Present>> {
    let (sql, name) = match db.backend {
        // table_xinfo, unlike table_info, also lists generated columns.
        Backend::Sqlite => (
            "SELECT name, type AS declared, '' AS own, '' AS base \
             FROM pragma_table_xinfo($1)",
            table.to_string(),
        ),
        // The statements name tables unqualified, so they find them through the search path;
        // to_regclass resolves the quoted name the same way, where information_schema would
        // need the schema guessed and hides the columns the user holds no privilege on.
        Backend::Postgres => (
            "SELECT CAST(a.attname AS TEXT) AS name, \
             format_type(a.atttypid, a.atttypmod) AS declared, \
             format_type(a.atttypid, NULL) AS own, \
             format_type(COALESCE(NULLIF(t.typbasetype, 0), a.atttypid), NULL) AS base \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            quote(table),
        ),
    };
    sqlx::query_as::<_, Present>(sql)
        .bind(name)
        .fetch_all(&db.pool)
        .await
        .map_err(|e| anyhow::anyhow!("reading the columns of table {table:?}: {e}"))
}

/// The type of `column` of `table`, whose declared columns are `present`; `None` when the
/// table has no such column.
async fn find_column(
    db: &Db,
    table: &str,
    present: &[Present],
    column: &str,
) -> Option<ColumnType> {
    match db.backend {
        // PostgreSQL keeps the case of the quoted names the statements use.
        Backend::Postgres => present
            .iter()
            .find(|p| p.name == column)
            .map(|p| ColumnType::postgres(p.declared.clone(), &p.own, &p.base)),
        // SQLite compares identifiers ignoring ASCII case, quoted or not.
        Backend::Sqlite => match present.iter().find(|p| p.name.eq_ignore_ascii_case(column)) {
            Some(p) => Some(ColumnType::sqlite(p.declared.clone())),
            // The row id is no declared column, and a WITHOUT ROWID table has none: a
            // qualified name, never read as a string, tells.
            None if SQLITE_ROWID.iter().any(|r| r.eq_ignore_ascii_case(column)) => {
                let probe = format!(
                    "SELECT {t}.{c} FROM {t} WHERE 1 = 0",
                    t = quote(table),
                    c = quote(column)
                );
                let found = sqlx::query(&probe).execute(&db.pool).await.is_ok();
                found.then(|| ColumnType::sqlite("INTEGER".into()))
            }
            None => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How each PostgreSQL type is compared, read and written, as `format_type` names it.
    #[test]
    fn postgres_types_decide_compare_read_and_write() {
        let ty = |declared: &str, own: &str, base: &str| {
            let t = ColumnType::postgres(declared.into(), own, base);
            (t.compare, t.native, t.integer, t.written("$1"))
        };
        let same = |p: &str| p.to_string();
        use Compare::*;
        for (declared, own, base, expected) in [
            ("text", "text", "text", (AsIs, true, false, same("$1"))),
            (
                "character varying(40)",
                "character varying",
                "character varying",
                (AsIs, true, false, same("$1")),
            ),
            // CHAR(n) compares with text, but the driver does not decode it.
            (
                "character(6)",
                "character",
                "character",
                (AsIs, false, false, same("$1")),
            ),
            (
                "bigint",
                "bigint",
                "bigint",
                (Integer, true, true, same("CAST($1 AS bigint)")),
            ),
            (
                "integer",
                "integer",
                "integer",
                (Integer, true, true, same("CAST($1 AS integer)")),
            ),
            (
                "date",
                "date",
                "date",
                (AsText, false, false, same("CAST($1 AS date)")),
            ),
            (
                "timestamp with time zone",
                "timestamp with time zone",
                "timestamp with time zone",
                (
                    AsText,
                    false,
                    false,
                    same("CAST($1 AS timestamp with time zone)"),
                ),
            ),
            (
                "numeric(12,2)",
                "numeric",
                "numeric",
                (AsText, false, false, same("CAST($1 AS numeric(12,2))")),
            ),
            (
                "uuid",
                "uuid",
                "uuid",
                (AsText, false, false, same("CAST($1 AS uuid)")),
            ),
            (
                "boolean",
                "boolean",
                "boolean",
                (AsText, true, false, same("CAST($1 AS boolean)")),
            ),
            // A domain is compared as its base type, read as text, written as itself.
            (
                "member_number",
                "member_number",
                "bigint",
                (Integer, false, true, same("CAST($1 AS member_number)")),
            ),
        ] {
            assert_eq!(ty(declared, own, base), expected, "{declared}");
        }
    }
}
