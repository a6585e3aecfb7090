//! The check, when the connector connects, that every table and column the rules name is in
//! the holder's database and can take what the rules write into it, and the types of those
//! columns ([`ColumnTypes`]).
//!
//! SQLite reads a double-quoted identifier that names no column as a string literal, so a
//! misspelt column fails nothing there: `lower("emial") = lower($1)` is never true (every
//! erasure answers NOT_FOUND), a misspelt export column exports its own name as the value,
//! and a misspelt child link finds no children to delete. PostgreSQL would fail the requests
//! instead, one by one. Either way the operator learns it best before the first request.
//!
//! The same goes for a value the rules write that the column cannot take ([`unwritable`]):
//! `redacted`'s text into a column whose declared type holds no text, `null` into a NOT NULL
//! column, a flag into a column no flag fits. PostgreSQL fails each such request on the type
//! or the constraint, SQLite the NOT NULL alike and the text in a STRICT table's INTEGER,
//! REAL or BLOB column (any other SQLite column stores the text). Both refuse them at
//! connect. Only the declared type is checked: a domain's or a column's CHECK constraint is
//! not, nor a domain's NOT NULL.

use std::collections::BTreeMap;
use std::sync::Arc;

use dsrelay_runtime::store::{Backend, Db};

use super::cascades;
use super::plan::{self, quote};
use super::rules::{AnonymizeWith, SqlConnectorConfig, REDACTED};

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
    /// By table, then column: a lookup by borrowed names allocates nothing.
    BTreeMap<String, BTreeMap<String, ColumnType>>,
    /// Every column of each table the rules name, in the catalog's order: what a contract
    /// end returns of a table without `export` columns, so that what its erasure removes
    /// was returned.
    BTreeMap<String, Vec<String>>,
    /// Each table's row key ([`ColumnTypes::row_key`]).
    BTreeMap<String, String>,
);

/// What the statements need to know of one column's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ColumnType {
    /// The type as the database declares it (`numeric(12,2)`, `uuid`): what a written value
    /// is cast to. Shared, so that a lookup's copy allocates nothing.
    pub(super) declared: Arc<str>,
    /// How a bound identity value is compared with it.
    pub(super) compare: Compare,
    /// Whether sqlx's `Any` driver decodes its values; the others are read as text.
    pub(super) native: bool,
    /// How a batch key of this type is compared with its batches' bounds.
    pub(super) key_order: KeyOrder,
    /// Whether `redacted`'s text ([`REDACTED`]) can be written into it.
    pub(super) text: TextFit,
    /// How a restriction's or objection's flag is written into it.
    pub(super) flag: Flag,
    /// Whether it may hold NULL, as its column's declaration says (a NOT NULL of a domain
    /// is not seen).
    pub(super) nullable: bool,
    /// SQLite: the column's affinity, which decides what it stores a written text as.
    pub(super) affinity: Option<&'static str>,
    /// SQLite: whether its table is STRICT, where a column stores only values of its type.
    pub(super) strict: bool,
}

/// Whether a column takes the text `redacted` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TextFit {
    /// A PostgreSQL type of the string category (`text`, `varchar`, `citext`, a domain over
    /// one), and every SQLite column but those below: SQLite stores the text as it is in a
    /// column of any affinity.
    Text,
    /// A PostgreSQL `character varying(n)` or `character(n)` shorter than the text: its
    /// length.
    Short(u32),
    /// Any other PostgreSQL type, which fails the statement, and an INTEGER, REAL or BLOB
    /// column of a SQLite STRICT table, which fails it as well.
    NotText,
}

/// How a restriction's or objection's 0/1 flag is written into a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flag {
    /// As the number 1 or 0: integer and other numeric columns, a string type (PostgreSQL
    /// assigns the number's text to any type of the string category), and every SQLite
    /// column.
    Number,
    /// As TRUE or FALSE: a PostgreSQL boolean, which takes no number.
    Boolean,
    /// A PostgreSQL type that takes neither (DATE, UUID, ...).
    Unusable,
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

/// How a batch key is compared with the bounds of its batches, which are read from it as
/// text. The boundary query orders by the same expression the batches compare, so that
/// both follow one order (the column's collation included) and the batches partition the
/// rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyOrder {
    /// The column as it is, the bound as bound: SQLite converts a bound compared with a
    /// column of INTEGER, REAL, NUMERIC or TEXT affinity as it converts a value stored
    /// there, so the comparison is the column's own and its index serves it.
    AsIs,
    /// The column as it is, the bound cast to the declared type (PostgreSQL, `"id" >
    /// CAST($1 AS uuid)`), so that the column's index serves it: the types whose text
    /// reads back as the same value and that have an ordering.
    Cast,
    /// Both as text, which no index on the bare column serves: a SQLite column without
    /// affinity, whose values keep the storage class they were written with (an integer
    /// sorts before every text, so a bound read as text would skip the integers after
    /// it), and a PostgreSQL type of another kind than those above.
    AsText,
    /// Both as the hex of their bytes (`hex("id") > $1`), which no index serves: a SQLite
    /// column found holding a BLOB when an erasure starts (the contract end's batches
    /// choose it, not the schema). A blob sorts after every text whatever the column's
    /// affinity, so a bound read back as text would never pass it, and its text form need
    /// not be UTF-8; its hex is text that sorts as its bytes do.
    Hex,
}

impl Default for ColumnType {
    /// A column the catalog did not describe: used as it is.
    fn default() -> Self {
        Self {
            declared: Arc::from(""),
            compare: Compare::AsIs,
            native: true,
            key_order: KeyOrder::AsText,
            text: TextFit::Text,
            flag: Flag::Number,
            nullable: true,
            affinity: None,
            strict: false,
        }
    }
}

impl ColumnType {
    /// PostgreSQL's `declared` type, named by `format_type` with and without its modifier
    /// (`own`), the type a domain is over (`base`; the type itself otherwise), and whether
    /// `base` is of the string category (`pg_type.typcategory` 'S': text, varchar, char,
    /// name, and an extension's such as citext), which takes a text and a number's text.
    pub(super) fn postgres(declared: Arc<str>, own: &str, base: &str, string: bool) -> Self {
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
        let key_order = match base {
            "text"
            | "character varying"
            | "character"
            | "smallint"
            | "integer"
            | "bigint"
            | "numeric"
            | "uuid"
            | "date"
            | "timestamp without time zone"
            | "timestamp with time zone" => KeyOrder::Cast,
            _ => KeyOrder::AsText,
        };
        let text = match base {
            _ if !string => TextFit::NotText,
            // A domain's declared name carries no length.
            "character varying" | "character" if own == base => match length(&declared) {
                Some(n) if n < REDACTED.chars().count() as u32 => TextFit::Short(n),
                _ => TextFit::Text,
            },
            _ => TextFit::Text,
        };
        let flag = match base {
            "boolean" => Flag::Boolean,
            _ if string => Flag::Number,
            "smallint" | "integer" | "bigint" | "numeric" | "real" | "double precision" => {
                Flag::Number
            }
            _ => Flag::Unusable,
        };
        Self {
            declared,
            compare,
            native,
            key_order,
            text,
            flag,
            nullable: true,
            affinity: None,
            strict: false,
        }
    }

    /// SQLite's declared type, whose affinity decides how a batch key is compared: by the
    /// rules of SQLite's "Determination Of Column Affinity", INT gives INTEGER; else CHAR,
    /// CLOB or TEXT gives TEXT; else BLOB or no type at all gives none (BLOB); else REAL,
    /// FLOA or DOUB gives REAL; else NUMERIC (a DATE, a BOOLEAN, a DECIMAL, a UUID). A
    /// column of any affinity stores `redacted`'s text as it is (a `STRING`, `JSON` or
    /// `DATETIME` column often holds text anyway); only a `strict` table's columns, whose
    /// declared type is INT, INTEGER, REAL, TEXT, BLOB or ANY, refuse it unless TEXT or ANY.
    fn sqlite(declared: &str, strict: bool) -> Self {
        let name = declared.to_ascii_uppercase();
        let has = |part: &str| name.contains(part);
        let affinity = if has("INT") {
            "INTEGER"
        } else if ["CHAR", "CLOB", "TEXT"].into_iter().any(has) {
            "TEXT"
        } else if has("BLOB") || name.trim().is_empty() {
            "BLOB"
        } else if ["REAL", "FLOA", "DOUB"].into_iter().any(has) {
            "REAL"
        } else {
            "NUMERIC"
        };
        Self {
            declared: Arc::from(declared),
            key_order: match affinity {
                "BLOB" => KeyOrder::AsText,
                _ => KeyOrder::AsIs,
            },
            text: match (strict, name.trim()) {
                (true, "INT" | "INTEGER" | "REAL" | "BLOB") => TextFit::NotText,
                _ => TextFit::Text,
            },
            affinity: Some(affinity),
            strict,
            ..Self::default()
        }
    }

    /// The type in a message: as declared, and on SQLite with its affinity or STRICT table.
    fn described(&self) -> String {
        match self.affinity {
            Some(_) if self.strict => format!("{} (in a STRICT table)", self.declared),
            Some(affinity) => format!("{} ({affinity} affinity)", self.declared),
            None => self.declared.to_string(),
        }
    }

    /// The flag `value` (0 or 1) as written into the column ([`Flag`]).
    pub(super) fn flag_value(&self, value: u8) -> &'static str {
        match (self.flag, value) {
            (Flag::Boolean, 0) => "FALSE",
            (Flag::Boolean, _) => "TRUE",
            (_, 0) => "0",
            (_, _) => "1",
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
        let mut types = Self::default();
        for (t, c, ty) in columns {
            types
                .0
                .entry(t.to_string())
                .or_default()
                .insert(c.to_string(), ty);
        }
        types
    }

    /// Every column of `table` as the catalog listed it when the connector connected.
    pub(super) fn all_columns(&self, table: &str) -> &[String] {
        self.1.get(table).map_or(&[], Vec::as_slice)
    }

    /// The SQL expression, over a row of `table` (named by its quoted name), of the text
    /// that tells the row apart from the table's others, computed in the holder's database
    /// the same way when a contract end's export records what it returned and when the
    /// erasure after it looks a row up. On SQLite each primary key column's `quote()`, which
    /// tags its type and escapes it (1, '1' and X'31' read apart), joined by `,`, or for a
    /// row whose key is NULL (which SQLite allows) `rowid ` and its row id; on
    /// PostgreSQL one column cast to text, or for a key of several columns each one's text
    /// preceded by its length and `:` (a NULL as `-`), compared bytewise (`COLLATE "C"`, as
    /// the table of the keys stores it). A table without a primary key has SQLite's
    /// `rowid` or PostgreSQL's `ctid`. A key tells rows apart at one time only: a key used
    /// again makes a new row read as the returned one it replaced (SQLite's INTEGER PRIMARY
    /// KEY without AUTOINCREMENT after the highest row was deleted, a natural key given
    /// again, a `rowid` or `ctid` freed and reused, VACUUM renumbering `rowid`s), and a
    /// `ctid` changes whenever its row is updated, when the row then reads as an arrival.
    /// `None` for a table not read at connect, and for one without a primary key that has
    /// no `rowid` or `ctid` of its own (a view, a partitioned table), whose rows cannot be
    /// told apart.
    pub(super) fn row_key(&self, table: &str) -> Option<&str> {
        self.2.get(table).map(String::as_str)
    }

    /// `column` of `table`, as the rules spell them; the default for one not described.
    pub(super) fn of(&self, table: &str, column: &str) -> ColumnType {
        (self.0.get(table))
            .and_then(|columns| columns.get(column))
            .cloned()
            .unwrap_or_default()
    }
}

/// Fails, naming each table and column, when `db` lacks a table or column of the rules, and
/// naming each foreign key, when an `ON DELETE CASCADE` would delete rows the rules keep
/// ([`cascades::problems`]); otherwise answers their types.
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
        let mut columns = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for p in &present {
            columns.insert(p.name.clone(), p.column_type(db.backend));
            by_name.entry(lookup_name(db.backend, &p.name)).or_insert(p);
        }
        types.1.insert(
            table.to_string(),
            present.iter().map(|p| p.name.clone()).collect(),
        );
        let key = primary_key(db, table).await?;
        let addressed = key.is_empty() && has_row_address(db, table).await?;
        let rowid = match db.backend {
            Backend::Sqlite if null_key_possible(&key, &present) => {
                sqlite_rowid(db, table, &present).await
            }
            _ => None,
        };
        if let Some(k) = row_key(db.backend, table, &key, addressed, rowid) {
            types.2.insert(table.to_string(), k);
        }
        for (at, what, column) in named {
            match find_column(db, table, &by_name, column).await {
                Some(ty) => {
                    columns.insert(column.to_string(), ty);
                }
                None => problems.push(format!(
                    "{at}: {what} {column:?} is not a column of table {table:?}"
                )),
            }
        }
        types.0.insert(table.to_string(), columns);
    }
    problems.extend(unwritable(config, &types));
    let all = (cascades::read(db).await)
        .map_err(|e| anyhow::anyhow!("reading the ON DELETE CASCADE foreign keys: {e}"))?;
    problems.extend(cascades::problems(db.backend, config, &all));
    if !problems.is_empty() {
        anyhow::bail!(
            "the holder database does not match the sql connector's rules: {}",
            problems.join("; ")
        );
    }
    Ok(types)
}

/// What the rules write that a column of theirs cannot take, each naming the rule, the
/// column, its type and what to write instead: `redacted`'s text into a column that holds no
/// text or too little of it, `null` into a NOT NULL column, a restriction's or objection's
/// flag into a column no flag fits. Only what the erasure writes counts: a delete table's
/// `keep_columns` and link stay as they are in its kept rows ([`plan::anonymize_written`]).
/// Columns the database lacks are reported before.
fn unwritable(config: &SqlConnectorConfig, types: &ColumnTypes) -> Vec<String> {
    let mut out = Vec::new();
    for (i, rule) in config.tables.iter().enumerate() {
        let at = format!("tables[{i}] ({})", rule.table);
        for (column, with) in plan::anonymize_written(rule) {
            let ty = types.of(&rule.table, column);
            let instead = match ty.nullable {
                true => "use \"null\" instead, or leave the column out of anonymize",
                false => {
                    "the column is NOT NULL, so \"null\" would fail as well: leave it out of \
                     anonymize"
                }
            };
            let text = format!("\"redacted\", which writes the text {REDACTED:?}");
            match (with, ty.text) {
                (AnonymizeWith::Redacted, TextFit::Text) => {}
                (AnonymizeWith::Redacted, TextFit::Short(_)) => out.push(format!(
                    "{at}: anonymize column {column:?} is {text}, but the column is of type \
                     {}, too short for its {} characters; {instead}",
                    ty.described(),
                    REDACTED.chars().count()
                )),
                (AnonymizeWith::Redacted, TextFit::NotText) => out.push(format!(
                    "{at}: anonymize column {column:?} is {text}, but the column is of type \
                     {}; {instead}",
                    ty.described()
                )),
                (AnonymizeWith::Null, _) if ty.nullable => {}
                (AnonymizeWith::Null, fit) => out.push(format!(
                    "{at}: anonymize column {column:?} is \"null\", but the column is NOT NULL; \
                     {}leave the column out of anonymize, or allow NULL in it",
                    // Not on SQLite unless of TEXT affinity, though any non-STRICT column
                    // takes the text: a number column is better left out.
                    match fit {
                        TextFit::Text if ty.affinity.is_none_or(|a| a == "TEXT") => {
                            "use \"redacted\" (it holds text), "
                        }
                        TextFit::Text | TextFit::Short(_) | TextFit::NotText => "",
                    }
                )),
            }
        }
        let flags = [
            ("restrict_column", &rule.restrict_column),
            ("suppress_column", &rule.suppress_column),
        ];
        for (what, column) in flags {
            let Some(column) = column else { continue };
            let ty = types.of(&rule.table, column);
            if ty.flag == Flag::Unusable {
                out.push(format!(
                    "{at}: {what} {column:?} is of type {}, which no flag can be written into; \
                     use a boolean, integer or text column",
                    ty.described()
                ));
            }
        }
    }
    out
}

/// The length `n` of a declared `character varying(n)` or `character(n)`.
fn length(declared: &str) -> Option<u32> {
    let (_, rest) = declared.split_once('(')?;
    rest.strip_suffix(')')?.trim().parse().ok()
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
    /// PostgreSQL: `base`'s `pg_type.typcategory` ('S' for a string type); SQLite: empty.
    category: String,
    /// 1 when the column is declared NOT NULL, else 0.
    notnull: i64,
    /// SQLite: whether its table is STRICT (read apart, see [`columns_of`]).
    #[sqlx(default)]
    strict: bool,
}

impl Present {
    /// Its type, as the statements use it on `backend`.
    fn column_type(&self, backend: Backend) -> ColumnType {
        let ty = match backend {
            Backend::Postgres => ColumnType::postgres(
                self.declared.as_str().into(),
                &self.own,
                &self.base,
                self.category == "S",
            ),
            Backend::Sqlite => ColumnType::sqlite(&self.declared, self.strict),
        };
        ColumnType {
            nullable: self.notnull == 0,
            ..ty
        }
    }
}

/// How `backend` finds a column by `name`: PostgreSQL keeps the case of the quoted names
/// the statements use; SQLite compares identifiers ignoring ASCII case, quoted or not.
pub(super) fn lookup_name(backend: Backend, name: &str) -> String {
    match backend {
        Backend::Postgres => name.to_string(),
        Backend::Sqlite => name.to_ascii_lowercase(),
    }
}

/// The columns of `table` as the statements' unquoted-then-quoted name finds it.
async fn columns_of(db: &Db, table: &str) -> anyhow::Result<Vec<Present>> {
    let (sql, name) = match db.backend {
        // table_xinfo, unlike table_info, also lists generated columns.
        Backend::Sqlite => (
            "SELECT name, type AS declared, '' AS own, '' AS base, '' AS category, \
             CAST(\"notnull\" AS BIGINT) AS \"notnull\" FROM pragma_table_xinfo($1)",
            table.to_string(),
        ),
        // The statements name tables unqualified, so they find them through the search path;
        // to_regclass resolves the quoted name the same way, where information_schema would
        // need the schema guessed and hides the columns the user holds no privilege on.
        Backend::Postgres => (
            "SELECT CAST(a.attname AS TEXT) AS name, \
             format_type(a.atttypid, a.atttypmod) AS declared, \
             format_type(a.atttypid, NULL) AS own, \
             format_type(b.oid, NULL) AS base, CAST(b.typcategory AS TEXT) AS category, \
             CAST(CASE WHEN a.attnotnull THEN 1 ELSE 0 END AS BIGINT) AS \"notnull\" \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             JOIN pg_catalog.pg_type b ON b.oid = COALESCE(NULLIF(t.typbasetype, 0), a.atttypid) \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            quote(table),
        ),
    };
    let mut present = sqlx::query_as::<_, Present>(sql)
        .bind(name.clone())
        .fetch_all(&db.pool)
        .await
        .map_err(|e| anyhow::anyhow!("reading the columns of table {table:?}: {e}"))?;
    if db.backend == Backend::Sqlite && !present.is_empty() {
        // table_list came with SQLite 3.37, as STRICT tables did: where it fails there are
        // none. A temporary table of the name is found before the main one, as the
        // statements find it.
        let strict: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(\"strict\" AS BIGINT) FROM pragma_table_list($1) \
             ORDER BY schema = 'temp' DESC, schema = 'main' DESC LIMIT 1",
        )
        .bind(name)
        .fetch_optional(&db.pool)
        .await
        .ok()
        .flatten();
        for p in &mut present {
            p.strict = strict == Some(1);
        }
    }
    Ok(present)
}

/// The columns of `table`'s primary key, in the key's order; empty when it has none.
async fn primary_key(db: &Db, table: &str) -> anyhow::Result<Vec<String>> {
    let (sql, name) = match db.backend {
        Backend::Sqlite => (
            "SELECT name FROM pragma_table_info($1) WHERE pk > 0 ORDER BY pk",
            table.to_string(),
        ),
        Backend::Postgres => (
            "SELECT CAST(a.attname AS TEXT) FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid \
             AND a.attnum = ANY (i.indkey) \
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
             ORDER BY array_position(CAST(i.indkey AS int2[]), a.attnum)",
            quote(table),
        ),
    };
    sqlx::query_scalar(sql)
        .bind(name)
        .fetch_all(&db.pool)
        .await
        .map_err(|e| anyhow::anyhow!("reading the primary key of table {table:?}: {e}"))
}

/// Whether `table` is a plain table, whose rows have an address of their own (SQLite's
/// `rowid`, PostgreSQL's `ctid`, unique in a table that is not partitioned): a view has none.
async fn has_row_address(db: &Db, table: &str) -> anyhow::Result<bool> {
    let (sql, name) = match db.backend {
        // A WITHOUT ROWID table has a primary key, so it is never asked about.
        Backend::Sqlite => (
            "SELECT CAST(COUNT(*) AS BIGINT) FROM sqlite_master WHERE type = 'table' \
             AND name = $1",
            table.to_string(),
        ),
        Backend::Postgres => (
            "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_catalog.pg_class \
             WHERE oid = to_regclass($1) AND relkind = 'r'",
            quote(table),
        ),
    };
    let found: i64 = sqlx::query_scalar(sql)
        .bind(name)
        .fetch_one(&db.pool)
        .await
        .map_err(|e| anyhow::anyhow!("reading what kind of table {table:?} is: {e}"))?;
    Ok(found > 0)
}

/// Whether a column of the primary key `key` is not declared NOT NULL, so that on SQLite a
/// row's key may be NULL (in any primary key but an INTEGER PRIMARY KEY, which this also
/// answers true for, and a WITHOUT ROWID table's). PostgreSQL's are always NOT NULL.
fn null_key_possible(key: &[String], present: &[Present]) -> bool {
    (key.iter()).any(|k| present.iter().any(|p| p.name == *k && p.notnull == 0))
}

/// The name by which SQLite's `table`, whose declared columns are `present`, gives its row
/// id: the first of `rowid`, `oid` and `_rowid_` that is no declared column (which would
/// hide it) and that the table has (a WITHOUT ROWID table has none); `None` without one.
async fn sqlite_rowid(db: &Db, table: &str, present: &[Present]) -> Option<&'static str> {
    for alias in SQLITE_ROWID {
        if present.iter().any(|p| p.name.eq_ignore_ascii_case(alias)) {
            continue;
        }
        let probe = format!("SELECT {t}.{alias} FROM {t} WHERE 1 = 0", t = quote(table));
        if sqlx::query(&probe).execute(&db.pool).await.is_ok() {
            return Some(alias);
        }
    }
    None
}

/// The row key of `table` ([`ColumnTypes::row_key`]) whose primary key is `key`; without
/// one, its `rowid` or `ctid` when it has one (`addressed`), else `None`. On SQLite,
/// `rowid` names the table's row id (see [`sqlite_rowid`]) when a key column may hold NULL:
/// a row whose key is NULL is keyed by its row id instead.
pub(super) fn row_key(
    backend: Backend,
    table: &str,
    key: &[String],
    addressed: bool,
    rowid: Option<&str>,
) -> Option<String> {
    let t = quote(table);
    let expr = match (backend, key) {
        (_, []) if !addressed => return None,
        (Backend::Sqlite, []) => format!("CAST({t}.rowid AS TEXT)"),
        (Backend::Postgres, []) => format!("CAST({t}.ctid AS TEXT)"),
        // quote() is self-delimiting (a number, X'..' or a '..' string whose quotes are
        // doubled), so the joined texts of two keys read alike only when their values do. A
        // NULL makes the key NULL, which no row could be recorded by: such a row would read
        // as an arrival to every erasure after a return, each new export leaving it out
        // again. Its row id stands in where the table has one (a WITHOUT ROWID table's key
        // is never NULL), after a prefix no quote() text begins with.
        (Backend::Sqlite, columns) => {
            let key = columns
                .iter()
                .map(|c| {
                    let v = format!("{t}.{}", quote(c));
                    format!("(CASE WHEN {v} IS NOT NULL THEN quote({v}) END)")
                })
                .collect::<Vec<_>>()
                .join(" || ',' || ");
            match rowid {
                Some(r) => format!("COALESCE({key}, 'rowid ' || CAST({t}.{r} AS TEXT))"),
                None => key,
            }
        }
        (Backend::Postgres, [column]) => format!("CAST({t}.{} AS TEXT)", quote(column)),
        (Backend::Postgres, columns) => columns
            .iter()
            .map(|c| {
                let v = format!("CAST({t}.{} AS TEXT)", quote(c));
                format!("COALESCE(LENGTH({v}) || ':' || {v}, '-')")
            })
            .collect::<Vec<_>>()
            .join(" || "),
    };
    Some(match backend {
        Backend::Sqlite => expr,
        Backend::Postgres => format!("({expr}) COLLATE \"C\""),
    })
}

/// The type of `column` of `table`, whose declared columns are `by_name` (keyed by
/// [`lookup_name`]); `None` when the table has no such column.
async fn find_column(
    db: &Db,
    table: &str,
    by_name: &BTreeMap<String, &Present>,
    column: &str,
) -> Option<ColumnType> {
    if let Some(p) = by_name.get(&lookup_name(db.backend, column)) {
        return Some(p.column_type(db.backend));
    }
    // SQLite's row id is no declared column, and a WITHOUT ROWID table has none: a
    // qualified name, never read as a string, tells.
    let rowid = SQLITE_ROWID.iter().any(|r| r.eq_ignore_ascii_case(column));
    if db.backend != Backend::Sqlite || !rowid {
        return None;
    }
    let probe = format!(
        "SELECT {t}.{c} FROM {t} WHERE 1 = 0",
        t = quote(table),
        c = quote(column)
    );
    let found = sqlx::query(&probe).execute(&db.pool).await.is_ok();
    found.then(|| ColumnType::sqlite("INTEGER", false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in types of PostgreSQL's string category among those the tests name.
    fn string(base: &str) -> bool {
        matches!(
            base,
            "text" | "character varying" | "character" | "name" | "citext"
        )
    }

    /// How each PostgreSQL type is compared, read and written, as `format_type` names it.
    #[test]
    fn postgres_types_decide_compare_read_and_write() {
        let ty = |declared: &str, own: &str, base: &str| {
            let t = ColumnType::postgres(declared.into(), own, base, string(base));
            (t.compare, t.native, t.key_order, t.written("$1"))
        };
        let same = |p: &str| p.to_string();
        use Compare::*;
        use KeyOrder::{AsText as Text, Cast};
        for (declared, own, base, expected) in [
            ("text", "text", "text", (AsIs, true, Cast, same("$1"))),
            (
                "character varying(40)",
                "character varying",
                "character varying",
                (AsIs, true, Cast, same("$1")),
            ),
            // CHAR(n) compares with text, but the driver does not decode it.
            (
                "character(6)",
                "character",
                "character",
                (AsIs, false, Cast, same("$1")),
            ),
            (
                "bigint",
                "bigint",
                "bigint",
                (Integer, true, Cast, same("CAST($1 AS bigint)")),
            ),
            (
                "integer",
                "integer",
                "integer",
                (Integer, true, Cast, same("CAST($1 AS integer)")),
            ),
            (
                "date",
                "date",
                "date",
                (AsText, false, Cast, same("CAST($1 AS date)")),
            ),
            (
                "timestamp with time zone",
                "timestamp with time zone",
                "timestamp with time zone",
                (
                    AsText,
                    false,
                    Cast,
                    same("CAST($1 AS timestamp with time zone)"),
                ),
            ),
            (
                "numeric(12,2)",
                "numeric",
                "numeric",
                (AsText, false, Cast, same("CAST($1 AS numeric(12,2))")),
            ),
            (
                "uuid",
                "uuid",
                "uuid",
                (AsText, false, Cast, same("CAST($1 AS uuid)")),
            ),
            (
                "boolean",
                "boolean",
                "boolean",
                (AsText, true, Text, same("CAST($1 AS boolean)")),
            ),
            // A domain is compared as its base type, read as text, written as itself.
            (
                "member_number",
                "member_number",
                "bigint",
                (Integer, false, Cast, same("CAST($1 AS member_number)")),
            ),
        ] {
            assert_eq!(ty(declared, own, base), expected, "{declared}");
        }
    }

    /// A SQLite batch key is compared as it is wherever the column has an affinity, which
    /// converts a bound as it converts a stored value; without one, as text.
    #[test]
    fn sqlite_affinity_decides_how_a_batch_key_is_compared() {
        for (declared, expected) in [
            ("INTEGER", KeyOrder::AsIs),
            ("bigint", KeyOrder::AsIs),
            ("TEXT", KeyOrder::AsIs),
            ("varchar(36)", KeyOrder::AsIs),
            ("UUID", KeyOrder::AsIs),
            ("NUMERIC(12,2)", KeyOrder::AsIs),
            ("DOUBLE", KeyOrder::AsIs),
            ("BLOB", KeyOrder::AsText),
            ("", KeyOrder::AsText),
        ] {
            assert_eq!(
                ColumnType::sqlite(declared, false).key_order,
                expected,
                "{declared:?}"
            );
        }
    }

    /// `redacted`'s text goes into PostgreSQL string types long enough for it (whatever their
    /// name: `citext`, `name`, a domain over one) and into any SQLite column but a STRICT
    /// table's INTEGER, REAL or BLOB one; a flag is TRUE or FALSE in a PostgreSQL boolean, 1
    /// or 0 where a number or its text is taken, and nowhere else.
    #[test]
    fn types_decide_what_redacted_and_a_flag_write() {
        use Flag::{Boolean, Number, Unusable};
        use TextFit::{NotText, Short, Text};
        for (declared, own, base, expected) in [
            ("text", "text", "text", (Text, Number)),
            (
                "character varying(8)",
                "character varying",
                "character varying",
                (Text, Number),
            ),
            (
                "character varying",
                "character varying",
                "character varying",
                (Text, Number),
            ),
            (
                "character varying(7)",
                "character varying",
                "character varying",
                (Short(7), Number),
            ),
            ("character(1)", "character", "character", (Short(1), Number)),
            // A domain's declared name tells no length.
            (
                "short_code",
                "short_code",
                "character varying",
                (Text, Number),
            ),
            ("integer", "integer", "integer", (NotText, Number)),
            ("numeric(12,2)", "numeric", "numeric", (NotText, Number)),
            (
                "double precision",
                "double precision",
                "double precision",
                (NotText, Number),
            ),
            ("boolean", "boolean", "boolean", (NotText, Boolean)),
            ("opt_out", "opt_out", "boolean", (NotText, Boolean)),
            ("date", "date", "date", (NotText, Unusable)),
            ("uuid", "uuid", "uuid", (NotText, Unusable)),
            ("jsonb", "jsonb", "jsonb", (NotText, Unusable)),
            // Named by neither format_type nor a list of ours, but of the string category.
            ("citext", "citext", "citext", (Text, Number)),
            ("email_address", "email_address", "citext", (Text, Number)),
            ("name", "name", "name", (Text, Number)),
        ] {
            let t = ColumnType::postgres(declared.into(), own, base, string(base));
            assert_eq!((t.text, t.flag), expected, "{declared}");
        }
        for (flag, value, written) in [(Boolean, 1, "TRUE"), (Boolean, 0, "FALSE")] {
            let t = ColumnType {
                flag,
                ..ColumnType::default()
            };
            assert_eq!(t.flag_value(value), written);
        }
        assert_eq!(ColumnType::default().flag_value(1), "1");
        assert_eq!(ColumnType::default().flag_value(0), "0");
        // SQLite stores the text in a column of any affinity, but for a STRICT table's.
        for (declared, affinity, in_strict) in [
            ("TEXT", "TEXT", Text),
            ("VARCHAR(5)", "TEXT", Text),
            ("CLOB", "TEXT", Text),
            ("", "BLOB", Text),
            ("ANY", "NUMERIC", Text),
            ("BLOB", "BLOB", NotText),
            ("INTEGER", "INTEGER", NotText),
            ("int", "INTEGER", NotText),
            ("CHARINT", "INTEGER", Text),
            ("REAL", "REAL", NotText),
            ("DOUBLE", "REAL", Text),
            ("DATE", "NUMERIC", Text),
            ("BOOLEAN", "NUMERIC", Text),
            ("STRING", "NUMERIC", Text),
            ("JSON", "NUMERIC", Text),
            ("UUID", "NUMERIC", Text),
            ("DATETIME", "NUMERIC", Text),
        ] {
            for (strict, expected) in [(false, Text), (true, in_strict)] {
                let t = ColumnType::sqlite(declared, strict);
                assert_eq!(
                    (t.text, t.flag, t.affinity),
                    (expected, Number, Some(affinity)),
                    "{declared:?} strict {strict}"
                );
            }
        }
    }
}
