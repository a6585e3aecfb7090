//! Planning: the statements a request runs, built from the rules and the subject's
//! identities. Pure, so the SQL text and its parameters are tested without a database.
//!
//! Identifiers come only from the validated configuration and are quoted; identity values,
//! corrected values, dates and batch bounds are always bound as parameters (`$1`, `$2`, ...).
//! The only SQL text taken from the configuration is `retain.while` and a controller's
//! `condition`, spliced as written.

use std::collections::{BTreeMap, BTreeSet};

use dsrelay_proto::v1::{FieldCorrection, IdentityEncoding, IdentityType, SubjectIdentity};
use dsrelay_runtime::identity::normalize;
use dsrelay_runtime::store::Backend;
use sqlx::any::AnyArguments;
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::Any;

use super::rules::{
    Action, AnonymizeWith, Retention, SqlConnectorConfig, TableRule, MATCH_KEYS, REDACTED,
};
use super::schema::{ColumnType, ColumnTypes, Compare, KeyOrder};
use crate::ConnectorError;

/// One SQL statement and the values of its `$1`, `$2`, ... parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Statement {
    pub(super) sql: String,
    pub(super) binds: Vec<String>,
}

impl Statement {
    /// The statement with its values bound, for `execute` and `fetch_all`.
    pub(super) fn query(&self) -> Query<'_, Any, AnyArguments<'_>> {
        self.binds
            .iter()
            .fold(sqlx::query(&self.sql), |q, v| q.bind(v.clone()))
    }

    /// The statement with its values bound, reading rows into `T`.
    pub(super) fn query_as<T>(&self) -> QueryAs<'_, Any, T, AnyArguments<'_>>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
    {
        self.binds
            .iter()
            .fold(sqlx::query_as(&self.sql), |q, v| q.bind(v.clone()))
    }

    /// The statement with its values bound, reading the first column as `T`.
    pub(super) fn query_scalar<T>(&self) -> QueryScalar<'_, Any, T, AnyArguments<'_>>
    where
        (T,): for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow>,
    {
        self.binds
            .iter()
            .fold(sqlx::query_scalar(&self.sql), |q, v| q.bind(v.clone()))
    }
}

/// The values bound so far while a statement is built.
#[derive(Debug, Default)]
pub(super) struct Binds(Vec<String>);

impl Binds {
    /// Binds `value` and returns its placeholder.
    pub(super) fn add(&mut self, value: impl Into<String>) -> String {
        self.0.push(value.into());
        format!("${}", self.0.len())
    }

    pub(super) fn finish(self, sql: String) -> Statement {
        Statement { sql, binds: self.0 }
    }
}

/// A RAW identity of a type some table matches, normalized (an e-mail only trimmed: its case
/// forms are made where it is matched, see [`email_match`]).
pub(super) type Identity = (IdentityType, String);

/// Whose rows the statements select.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Scope<'a> {
    /// The subject's identities; `None` selects all of the controller's rows (a contract
    /// end).
    pub(super) subject: Option<&'a [Identity]>,
    /// The controller's condition on the matched (top-level) tables' rows, when its data
    /// shares the database with other controllers'.
    pub(super) condition: Option<&'a str>,
    /// One batch of a bulk job: the rows of one top-level table in a range of its batch key,
    /// and the child rows found through them.
    pub(super) batch: Option<&'a Batch>,
    /// The holder's column types, which decide how a column is compared, read and written
    /// ([`ColumnTypes`]); `None`: every column as it is.
    pub(super) types: Option<&'a ColumnTypes>,
    /// The erasure after a return whose export recorded the rows it returned: its
    /// statements take only those rows ([`plan_table_erasure`]).
    pub(super) returned: Option<ReturnedKeys<'a>>,
}

/// Where a contract end's export recorded the keys of the rows it returned
/// ([`plan_record_returned`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct ReturnedKeys<'a> {
    /// The connector's table of them ([`SqlConnectorConfig::returned_table`]).
    pub(super) table: &'a str,
    /// The export's job id, which they are recorded under.
    pub(super) job: &'a str,
    /// For the erasure: the `ON DELETE CASCADE`s between configured tables, through which a
    /// DELETE would take unrecorded rows, so that their parent rows are held back
    /// ([`cascade_holds`]); empty where the catalog was not read.
    pub(super) cascades: &'a [Cascade],
}

impl Scope<'_> {
    /// The type of `table`'s `column`.
    fn column(&self, table: &str, column: &str) -> ColumnType {
        self.types.map(|t| t.of(table, column)).unwrap_or_default()
    }

    /// The row key of `table` ([`ColumnTypes::row_key`]).
    fn row_key(&self, table: &str) -> Option<&str> {
        self.types.and_then(|t| t.row_key(table))
    }

    /// Whether `table`'s rows are keyed by PostgreSQL's `ctid` ([`super::schema::row_key`]),
    /// which an update changes: the table has no primary key. A primary key and SQLite's
    /// `rowid` stay when a row is updated.
    fn key_moves(&self, table: &str) -> bool {
        let ctid = super::schema::row_key(Backend::Postgres, table, &[], true, None);
        self.row_key(table)
            .is_some_and(|k| Some(k) == ctid.as_deref())
    }

    /// Whether a row of `table` is one the export recorded ([`Scope::returned`]): an EXISTS
    /// correlated with the row, so that each database probes the keys' primary key index
    /// per row instead of reading the export's keys for every statement. `None` without
    /// recorded keys; never true for a table whose row key is unknown.
    pub(super) fn recorded(&self, table: &str, b: &mut Binds) -> Option<String> {
        let returned = self.returned?;
        let Some(key) = self.row_key(table) else {
            return Some("1 = 0".to_string());
        };
        let r = quote(returned.table);
        Some(format!(
            "EXISTS (SELECT 1 FROM {r} WHERE {r}.job = {} AND {r}.tbl = {} AND {r}.k = {key})",
            b.add(returned.job),
            b.add(table)
        ))
    }
}

/// A range of a top-level table's batch key, `(after, through]`, where the last batch
/// (`through` None) also takes the rows whose key is NULL, so that the batches of a run
/// partition the rows. The key is compared in its own type where its type allows
/// ([`KeyOrder`]: the bounds, bound as text, converted or cast to it), so that a batch reads
/// its range from the key's index; otherwise as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Batch {
    /// The top-level table.
    pub(super) table: String,
    /// Its batch key column.
    pub(super) key: String,
    /// The last key of the previous batch; `None` for the first.
    pub(super) after: Option<String>,
    /// The last key of this batch; `None` for the last.
    pub(super) through: Option<String>,
    /// The key's type, by which it is compared with the bounds.
    pub(super) key_type: ColumnType,
}

impl Batch {
    /// The key as the batch conditions and the boundary queries compare it.
    pub(super) fn key_expr(&self) -> String {
        let column = format!("{}.{}", quote(&self.table), quote(&self.key));
        match self.key_type.key_order {
            KeyOrder::AsIs | KeyOrder::Cast => column,
            KeyOrder::AsText => format!("CAST({column} AS TEXT)"),
            KeyOrder::Hex => format!("hex({column})"),
        }
    }

    /// A bound as the key is compared with it.
    pub(super) fn bound(&self, value: &str, b: &mut Binds) -> String {
        let p = b.add(value);
        match self.key_type.key_order {
            KeyOrder::Cast => format!("CAST({p} AS {})", self.key_type.declared),
            KeyOrder::AsIs | KeyOrder::AsText | KeyOrder::Hex => p,
        }
    }

    fn condition(&self, b: &mut Binds) -> String {
        let key = self.key_expr();
        let mut terms = Vec::new();
        if let Some(after) = &self.after {
            terms.push(format!("{key} > {}", self.bound(after, b)));
        }
        match &self.through {
            Some(through) => terms.push(format!("{key} <= {}", self.bound(through, b))),
            None if !terms.is_empty() => {
                let after = terms.remove(0);
                terms.push(format!("({key} IS NULL OR {after})"));
            }
            None => {}
        }
        if terms.is_empty() {
            "1 = 1".to_string()
        } else {
            terms.join(" AND ")
        }
    }
}

/// One table's part of an erasure, in the order the tables are handled.
#[derive(Debug)]
pub(super) struct ErasureStep<'a> {
    pub(super) rule: &'a TableRule,
    /// `None` for tables no identity of the request applies to. For a `keep` table, `main`
    /// only counts the subject's rows.
    pub(super) work: Option<ErasureWork>,
}

/// The statements of one table's part of an erasure.
#[derive(Debug)]
pub(super) struct ErasureWork {
    /// For `retain` tables: each subject row's date (as text) and whether `while` holds (1/0),
    /// read as [`super::retention::DatedRow`].
    pub(super) probe: Option<Statement>,
    /// For tables that can keep rows: how many of the subject's rows are kept now.
    pub(super) count_kept: Option<Statement>,
    /// Anonymizes in the kept rows what the obligation does not need.
    pub(super) anonymize_kept: Option<Statement>,
    /// The table's action on the rows that are not kept; for a `keep` table, the count of the
    /// subject's rows (answered as one row), which the erasure leaves as they are.
    pub(super) main: Statement,
    /// After a return whose export recorded its rows ([`Scope::returned`]): counts the rows
    /// `main` and `anonymize_kept` would take but do not, as the export did not record
    /// them; in a child keyed other than by `ctid`, every row it did not record, as such a
    /// row holds its parent back; and each row a cascade would have taken unrecorded
    /// ([`cascade_held`]) that the table's own filter takes.
    pub(super) unreturned: Option<Statement>,
    /// After a return whose export recorded its rows, when a chain of cascades ends at the
    /// table: counts the unrecorded rows a cascade would have taken that the table's own
    /// filter does not take ([`cascade_held_rows`]). No export returns them, so they are
    /// not arrivals: the rows they hang from stay until they are removed otherwise.
    pub(super) cascaded_only: Option<Statement>,
    /// After a return whose export recorded its rows, for a table keyed by `ctid`
    /// ([`Scope::key_moves`]): per anonymizing statement (`main`, `anonymize_kept`), a
    /// SELECT of the keys of the rows it will take (locking them), while the statement
    /// returns their new keys; the caller replaces the first with the second in the same
    /// transaction, so that a slot freed later does not pass a new row off as returned.
    pub(super) moves_keys: Option<MovedKeys>,
    /// With [`Self::returns_keys`] (and only then): `main`'s WHERE condition (its `sql`)
    /// and its values,
    /// from which [`plan_cascaded_keys`] finds, before `main` runs, the rows its DELETE
    /// takes through an `ON DELETE CASCADE`.
    pub(super) deletes_where: Option<Statement>,
    /// The child tables whose kept rows keep this table's rows.
    pub(super) held_for: Vec<String>,
}

impl ErasureWork {
    /// After a return whose export recorded its rows, for a table whose action deletes:
    /// `main` returns the key of each row it deletes, whose recorded key the caller deletes
    /// in the same transaction, so that the keys go with their rows and the keys of rows
    /// still held (kept, left) stay. Not before `main`: its confinement reads them.
    pub(super) fn returns_keys(&self) -> bool {
        self.deletes_where.is_some()
    }
}

/// The old keys' SELECTs of [`ErasureWork::moves_keys`].
#[derive(Debug)]
pub(super) struct MovedKeys {
    /// `main`'s, when it anonymizes.
    pub(super) main: Option<Statement>,
    /// `anonymize_kept`'s, when there is one.
    pub(super) kept: Option<Statement>,
}

/// `UPDATE table SET set WHERE condition` (bound by `b`) returning `key`, and the SELECT of
/// `key` in the rows it takes, locked ([`ErasureWork::moves_keys`]); without a key, the
/// update alone. The SELECT binds the SET's values too, unused.
fn returning_moved(
    table: &str,
    set: &str,
    condition: &str,
    key: Option<&str>,
    b: Binds,
) -> (Statement, Option<Statement>) {
    let update = format!("UPDATE {table} SET {set} WHERE {condition}");
    let Some(key) = key else {
        return (b.finish(update), None);
    };
    let old = Statement {
        sql: format!("SELECT {key} FROM {table} WHERE {condition} FOR UPDATE"),
        binds: b.0.clone(),
    };
    (b.finish(format!("{update} RETURNING {key}")), Some(old))
}

/// The statements for erasing the rows of `scope` as of `now_ms`, children first.
pub(super) fn plan_erasure<'a>(
    config: &'a SqlConnectorConfig,
    scope: Scope<'_>,
    now_ms: i64,
) -> Vec<ErasureStep<'a>> {
    config
        .children_first()
        .map(|rule| ErasureStep {
            rule,
            work: match rule.action {
                Action::Keep => plan_keep_count(config, rule, scope),
                Action::Delete | Action::Anonymize => {
                    plan_table_erasure(config, rule, scope, now_ms)
                }
            },
        })
        .collect()
}

/// A `keep` table's part of an erasure: counting the subject's rows there, which stay as they
/// are but are the subject's data all the same (an erasure that finds only them is refused,
/// not NOT_FOUND); `None` when no identity of the subject applies to the table.
fn plan_keep_count(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
) -> Option<ErasureWork> {
    let mut b = Binds::default();
    let filter = subject_filter(config, rule, scope, &mut b)?;
    let main = b.finish(format!(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM {} WHERE {filter}",
        quote(&rule.table)
    ));
    Some(ErasureWork {
        probe: None,
        count_kept: None,
        anonymize_kept: None,
        main,
        unreturned: None,
        cascaded_only: None,
        moves_keys: None,
        deletes_where: None,
        held_for: Vec::new(),
    })
}

/// One table's part of an erasure of the rows of `scope`; `None` when no identity of the
/// subject applies to the table.
pub(super) fn plan_table_erasure(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    now_ms: i64,
) -> Option<ErasureWork> {
    let table = quote(&rule.table);
    // None when no identity of the request applies to the table: then it is skipped.
    subject_filter(config, rule, scope, &mut Binds::default())?;
    let filter = |b: &mut Binds| subject_filter(config, rule, scope, b).unwrap_or_default();
    let keep = |b: &mut Binds| keep_condition(config, rule, now_ms, b);
    let keeps = keep(&mut Binds::default()).is_some();
    // After a return: only rows the export recorded, and a row that a child arrived under
    // since stays as it is, so that the child stays found through it (and no foreign key
    // fails the batch, or cascades to the child).
    let confined = |b: &mut Binds| {
        let mut terms: Vec<String> = scope.recorded(&rule.table, b).into_iter().collect();
        if scope.returned.is_some() {
            terms.extend(arrived_children(config, rule, scope, now_ms, b));
        }
        terms
    };

    let returned_key = match (scope.returned, rule.action) {
        (Some(_), Action::Delete) => scope.row_key(&rule.table),
        _ => None,
    };
    let moved_key = match scope.returned {
        Some(_) if scope.key_moves(&rule.table) => scope.row_key(&rule.table),
        _ => None,
    };
    let mut deletes_where = None;
    let (main, main_moved) = {
        let mut b = Binds::default();
        let set = (rule.action == Action::Anonymize).then(|| {
            anonymize_clauses(rule.anonymize.iter().map(|(c, w)| (c.as_str(), *w)), &mut b)
        });
        let mut conditions = vec![filter(&mut b)];
        if let Some(kept) = keep(&mut b) {
            conditions.push(format!("{kept} = 0"));
        }
        conditions.extend(confined(&mut b));
        let returning = returned_key.map_or(String::new(), |k| format!(" RETURNING {k}"));
        match set {
            None => {
                if returned_key.is_some() {
                    conditions.extend(cascade_holds(config, rule, scope, &mut b));
                }
                let condition = conditions.join(" AND ");
                if returned_key.is_some() {
                    deletes_where = Some(Statement {
                        sql: condition.clone(),
                        binds: b.0.clone(),
                    });
                }
                let delete = format!("DELETE FROM {table} WHERE {condition}{returning}");
                (b.finish(delete), None)
            }
            Some((set, pending)) => {
                conditions.push(pending);
                let condition = conditions.join(" AND ");
                returning_moved(&table, &set, &condition, moved_key, b)
            }
        }
    };

    let anonymize = keeps
        && !kept_anonymization(config, rule, scope, &mut Binds::default())
            .0
            .is_empty();
    let kept_parts = |b: &mut Binds| kept_anonymization(config, rule, scope, b);
    let (anonymize_kept, kept_moved) = match anonymize.then(|| {
        let mut b = Binds::default();
        let (set, pending) = kept_parts(&mut b);
        let f = filter(&mut b);
        let kept = keep(&mut b).unwrap_or_default();
        let confined: String = (confined(&mut b).iter())
            .map(|t| format!(" AND {t}"))
            .collect();
        let condition = format!("{f} AND {kept} = 1 AND ({pending}){confined}");
        returning_moved(&table, &set.join(", "), &condition, moved_key, b)
    }) {
        Some((update, moved)) => (Some(update), moved),
        None => (None, None),
    };
    // The rows of the scope the two statements above would take but for their confinement
    // to recorded rows: those that arrived since the export. In a child that holds its
    // parent back ([`arrived_children`]), every unrecorded row, taken or not; and the rows
    // its filter takes for which a cascade holds a row back ([`cascade_held_rows`]).
    let holds_parent = holds_parent_back(config, rule, scope);
    let unreturned = scope.returned.map(|_| {
        let mut b = Binds::default();
        let f = filter(&mut b);
        let recorded = scope.recorded(&rule.table, &mut b).unwrap_or_default();
        let takes = match holds_parent {
            true => "1 = 1".to_string(),
            false => taken(config, rule, scope, now_ms, &mut b),
        };
        let own = format!("{f} AND NOT ({recorded}) AND {takes}");
        let rows = match cascade_held_rows(config, rule, scope, now_ms, true, &mut b) {
            None => own,
            Some(held) => format!("({own}) OR {held}"),
        };
        b.finish(format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {table} WHERE {rows}"
        ))
    });
    let cascaded_only = scope.returned.and_then(|_| {
        let mut b = Binds::default();
        let held = cascade_held_rows(config, rule, scope, now_ms, false, &mut b)?;
        Some(b.finish(format!(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM {table} WHERE {held}"
        )))
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
        // The aliases are the fields of `DatedRow`.
        b.finish(format!(
            "SELECT CAST({table}.{} AS TEXT) AS dated, {holds} AS held FROM {table} WHERE {f}",
            quote(&r.from_column)
        ))
    });
    Some(ErasureWork {
        probe,
        count_kept,
        anonymize_kept,
        main,
        unreturned,
        cascaded_only,
        moves_keys: moved_key.map(|_| MovedKeys {
            main: main_moved,
            kept: kept_moved,
        }),
        deletes_where,
        held_for: config
            .retained_children(rule)
            .into_iter()
            .map(|(child, _)| child.table.clone())
            .collect(),
    })
}

/// What `rule`'s kept rows get (`SET` terms, none when nothing is written in them) and the
/// condition of a kept row not yet anonymized. Kept rows must stay findable: through the
/// link to the parent, or by the columns the request's identities match.
fn kept_anonymization(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    b: &mut Binds,
) -> (Vec<String>, String) {
    let left = left_in_kept_rows(rule);
    let mut matched: BTreeSet<&str> = BTreeSet::new();
    for (ty, _) in scope.subject.unwrap_or_default() {
        if let Some(column) = match_key(*ty).and_then(|k| rule.match_columns.get(k)) {
            matched.insert(column);
        }
    }
    let anonymize_now: Vec<(&str, AnonymizeWith)> = rule
        .anonymize
        .iter()
        .map(|(c, w)| (c.as_str(), *w))
        .filter(|(c, _)| !left.contains(c) && !matched.contains(c))
        .collect();
    // A child row that its parent's matched rows also reach is found again through them (the
    // parent row stays for it, keeping the columns the request matched it by), so it needs
    // its own match columns no longer; a row only its own match finds (a row carrying an
    // address the parent row no longer has) keeps them until it is released.
    let through = |b: &mut Binds| through_parent_filter(config, rule, scope, b);
    let by_parent: Vec<(&str, AnonymizeWith)> = match through(&mut Binds::default()) {
        Some(_) => (rule.anonymize.iter())
            .map(|(c, w)| (c.as_str(), *w))
            .filter(|(c, _)| matched.contains(c) && !left.contains(c))
            .collect(),
        None => Vec::new(),
    };
    // What the kept rows get, and the condition of a kept row not yet anonymized.
    let (at_once, mut pending) = anonymize_parts(anonymize_now.iter().copied(), b);
    let mut set: Vec<String> = at_once.iter().map(|(q, v)| format!("{q} = {v}")).collect();
    if !by_parent.is_empty() {
        let reached = through(b).unwrap_or_default();
        let (values, cleared) = anonymize_parts(by_parent.iter().copied(), b);
        for (q, value) in values {
            set.push(format!(
                "{q} = CASE WHEN {reached} THEN {value} ELSE {q} END"
            ));
        }
        pending.push(format!("({reached} AND ({}))", cleared.join(" OR ")));
    }
    (set, pending.join(" OR "))
}

/// For a top-level table after a return: per child table the erasure handles, that none of
/// the row's child rows there is one the export did not record (it arrived since), whatever
/// its columns hold: erasing the parent would orphan it, or cascade to it, unreturned. Only
/// in a child keyed by `ctid` must the unrecorded row also be one the child's statements
/// would take, as this erasure's anonymizing update gives its rows new keys, which the
/// export did not record, though they are no arrivals.
fn arrived_children(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    now_ms: i64,
    b: &mut Binds,
) -> Vec<String> {
    if rule.parent.is_some() {
        return Vec::new();
    }
    (config.tables.iter())
        .filter(|t| t.action != Action::Keep)
        .filter_map(|t| Some((t, t.parent.as_ref()?)))
        .filter(|(_, link)| link.table == rule.table)
        .flat_map(|(child, link)| {
            let c = quote(&child.table);
            let under = format!(
                "{c}.{} = {}.{}",
                quote(&link.column),
                quote(&rule.table),
                quote(&link.parent_column),
            );
            let recorded = scope.recorded(&child.table, b).unwrap_or_default();
            let takes = match scope.key_moves(&child.table) {
                true => taken(config, child, scope, now_ms, b),
                false => "1 = 1".to_string(),
            };
            let mut terms = vec![format!(
                "NOT EXISTS (SELECT 1 FROM {c} WHERE {under} AND NOT ({recorded}) AND {takes})"
            )];
            // A child row that a cascade's arrival holds back ([`cascade_holds`]) holds the
            // row back too, so that it stays found through it.
            let holds = cascade_holds(config, child, scope, b);
            if !holds.is_empty() {
                terms.push(format!(
                    "NOT EXISTS (SELECT 1 FROM {c} WHERE {under} AND NOT ({}))",
                    holds.join(" AND ")
                ));
            }
            terms
        })
        .collect()
}

/// A row of `table` (as the statement names it) that the export did not record and that
/// holds back a row whose DELETE would take it through an `ON DELETE CASCADE`: every
/// unrecorded one, in a table keyed by `ctid` too (unlike [`arrived_children`]), as the
/// cascade deletes a row its table's statements would keep. `None` for a table the
/// erasure does not handle (a `keep` table, or one no rule names): the export records no
/// keys there.
fn cascade_unrecorded(
    config: &SqlConnectorConfig,
    table: &str,
    scope: Scope<'_>,
    b: &mut Binds,
) -> Option<String> {
    (config.tables.iter()).find(|t| t.table == table && t.action != Action::Keep)?;
    let recorded = scope.recorded(table, b)?;
    Some(format!("NOT ({recorded})"))
}

/// `link`'s foreign key as a condition joining a row of its child to one of its parent.
fn cascade_join(link: &Cascade) -> String {
    let (child, parent) = (quote(&link.child), quote(&link.parent));
    (link.columns.iter().zip(&link.parent_columns))
        .map(|(c, p)| format!("{child}.{} = {parent}.{}", quote(c), quote(p)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Whether `rule`'s table is one whose DELETE returns keys after a return: it deletes, and
/// its rows have a key ([`Scope::row_key`]). Only such a DELETE is held back for the rows
/// its cascades would take ([`cascade_holds`]).
fn deletes_by_key(rule: &TableRule, scope: Scope<'_>) -> bool {
    rule.action == Action::Delete && scope.row_key(&rule.table).is_some()
}

/// For a table whose DELETE returns keys, after a return ([`ReturnedKeys::cascades`]): per chain
/// of cascades its DELETE sets off ([`cascade_paths`]), that no row the chain would take is
/// one the export did not record ([`cascade_unrecorded`]): the DELETE would erase it
/// unreturned, so the row stays, with the chain's rows, and the unrecorded row is reported
/// ([`cascade_held`]). Each condition is correlated with the row, one EXISTS per link: an
/// index on each foreign key's columns serves it; without one the child table is read per
/// row, as the cascade itself reads it.
fn cascade_holds(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    b: &mut Binds,
) -> Vec<String> {
    let mut holds = Vec::new();
    if !deletes_by_key(rule, scope) {
        return holds;
    }
    let cascades = scope.returned.map(|r| r.cascades).unwrap_or_default();
    for path in cascade_paths(cascades, &rule.table) {
        let Some(last) = path.last() else {
            continue;
        };
        // Built inside out: only the innermost condition binds values, and it comes last.
        let Some(mut rows) = cascade_unrecorded(config, &last.child, scope, b) else {
            continue;
        };
        for link in path.iter().rev() {
            rows = format!(
                "EXISTS (SELECT 1 FROM {} WHERE {} AND {rows})",
                quote(&link.child),
                cascade_join(link)
            );
        }
        holds.push(format!("NOT {rows}"));
    }
    holds
}

/// For `rule`'s table after a return: per chain of cascades ending at it from a table whose
/// DELETE returns keys, a row of it that [`cascade_holds`] holds a row of that table back
/// for: unrecorded, under a recorded row of the chain's first table that the erasure would
/// otherwise delete (the subject's, kept by no obligation), whether or not the table's own
/// statements would take it ([`cascade_held_rows`] tells the two apart). The chains are
/// read from the row up, one EXISTS per link, by the parents' keys.
fn cascade_held(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    now_ms: i64,
    b: &mut Binds,
) -> Vec<String> {
    let mut held = Vec::new();
    let cascades = scope.returned.map(|r| r.cascades).unwrap_or_default();
    let deleting = (config.tables.iter()).filter(|t| deletes_by_key(t, scope));
    for top in deleting {
        for path in cascade_paths(cascades, &top.table) {
            if path.last().map(|l| l.child.as_str()) != Some(rule.table.as_str()) {
                continue;
            }
            // No identity of the request applies to the first table: it deletes nothing.
            if subject_filter(config, top, scope, &mut Binds::default()).is_none() {
                continue;
            }
            // Text in the order of the values: the row's own condition, then the first
            // table's, innermost.
            let Some(own) = cascade_unrecorded(config, &rule.table, scope, b) else {
                continue;
            };
            let filter = subject_filter(config, top, scope, b).unwrap_or_default();
            let recorded = scope.recorded(&top.table, b).unwrap_or_default();
            let kept = keep_condition(config, top, now_ms, b)
                .map(|k| format!(" AND {k} = 0"))
                .unwrap_or_default();
            let mut rows = format!("{filter} AND {recorded}{kept}");
            for link in path.iter() {
                rows = format!(
                    "EXISTS (SELECT 1 FROM {} WHERE {} AND {rows})",
                    quote(&link.parent),
                    cascade_join(link)
                );
            }
            held.push(format!("({own} AND {rows})"));
        }
    }
    held
}

/// [`cascade_held`]'s rows of `rule`'s table that its own filter takes (`by_own`: rows an
/// export would have returned, so arrivals) or, otherwise, those it does not take (a NULL
/// in a matched column too), which belong to the subjects' rows only through the cascades:
/// no return includes them. `None` when no chain of cascades ends at the table.
pub(super) fn cascade_held_rows(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    now_ms: i64,
    by_own: bool,
    b: &mut Binds,
) -> Option<String> {
    if cascade_held(config, rule, scope, now_ms, &mut Binds::default()).is_empty() {
        return None;
    }
    // Text in the order of the values: the filter, then the chains.
    let filter = match (subject_filter(config, rule, scope, b), by_own) {
        (Some(f), true) => f,
        (Some(f), false) => format!("CASE WHEN {f} THEN 0 ELSE 1 END = 1"),
        (None, true) => return None,
        (None, false) => "1 = 1".to_string(),
    };
    let held = cascade_held(config, rule, scope, now_ms, b).join(" OR ");
    Some(format!("({filter} AND ({held}))"))
}

/// The chains of `cascades` that a DELETE from `table` sets off: each cascade from it, and
/// each from a table a chain reaches, never through a table twice.
pub(super) fn cascade_paths<'c>(cascades: &'c [Cascade], table: &str) -> Vec<Vec<&'c Cascade>> {
    let mut paths = Vec::new();
    let mut open: Vec<Vec<&Cascade>> = vec![Vec::new()];
    while let Some(path) = open.pop() {
        let from = path.last().map_or(table, |c| c.child.as_str());
        for c in cascades.iter().filter(|c| c.parent == from) {
            let seen = c.child == table || path.iter().any(|p| p.child == c.child);
            if !seen {
                let mut longer = path.clone();
                longer.push(c);
                open.push(longer.clone());
                paths.push(longer);
            }
        }
    }
    paths
}

/// Whether every row of `rule`'s table that the export did not record holds its parent row
/// back ([`arrived_children`]), so that it is an arrival whatever its columns hold: a child
/// of a top-level table the erasure handles, not keyed by `ctid`.
pub(super) fn holds_parent_back(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
) -> bool {
    rule.parent.as_ref().is_some_and(|link| {
        !scope.key_moves(&rule.table)
            && (config.tables.iter())
                .any(|t| t.table == link.table && t.parent.is_none() && t.action != Action::Keep)
    })
}

/// The rows of `rule`'s table in `scope` that its erasure statements ([`plan_table_erasure`])
/// would take, as a condition on a row, leaving out the subject filter and the confinement
/// to recorded rows: for the table's action, the rows no obligation keeps (an anonymized
/// table's only while not yet anonymized); and the kept rows not yet stripped of what the
/// obligation does not need.
fn taken(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    now_ms: i64,
    b: &mut Binds,
) -> String {
    let keep = |b: &mut Binds| keep_condition(config, rule, now_ms, b);
    let keeps = keep(&mut Binds::default()).is_some();
    let mut main = Vec::new();
    if let Some(kept) = keep(b) {
        main.push(format!("{kept} = 0"));
    }
    main.extend(anonymize_pending(rule, b));
    let mut takes = vec![match main.is_empty() {
        true => "1 = 1".to_string(),
        false => main.join(" AND "),
    }];
    if keeps {
        let (set, pending) = kept_anonymization(config, rule, scope, b);
        if !set.is_empty() {
            let kept = keep(b).unwrap_or_default();
            takes.push(format!("({kept} = 1 AND ({pending}))"));
        }
    }
    format!("(({}))", takes.join(") OR ("))
}

/// Counts the rows of `rule`'s table in `scope` that an erasure at `now_ms` has not handled
/// yet: those its statements would take ([`taken`]) and, with `kept_as_they_are`, those it
/// keeps without writing them (kept rows that get nothing, every row of a `keep` table),
/// which a contract end counts as handled only as it finishes. Rows it already anonymized,
/// or kept and stripped, are not among them: a contract end's call resuming one that was
/// cut off must not count them again. Like [`taken`], it leaves out the confinement to
/// recorded rows.
pub(super) fn plan_count_unhandled(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    now_ms: i64,
    kept_as_they_are: bool,
) -> Statement {
    let mut b = Binds::default();
    let filter = subject_filter(config, rule, scope, &mut b).unwrap_or_default();
    let unhandled = match rule.action {
        Action::Keep if kept_as_they_are => "1 = 1".to_string(),
        Action::Keep => "1 = 0".to_string(),
        _ => {
            let mut terms = vec![taken(config, rule, scope, now_ms, &mut b)];
            let strips = !kept_anonymization(config, rule, scope, &mut Binds::default())
                .0
                .is_empty();
            if kept_as_they_are && !strips {
                terms.extend(
                    keep_condition(config, rule, now_ms, &mut b).map(|k| format!("{k} = 1")),
                );
            }
            terms.join(" OR ")
        }
    };
    b.finish(format!(
        "SELECT CAST(COUNT(*) AS BIGINT) FROM {} WHERE {filter} AND ({unhandled})",
        quote(&rule.table)
    ))
}

/// The columns an erasure never writes in the rows of `rule` it keeps, whatever the request:
/// the link to the parent, through which they are found again, and those the obligation
/// needs (`retain.keep_columns`).
fn left_in_kept_rows(rule: &TableRule) -> BTreeSet<&str> {
    let link = rule.parent.iter().map(|l| l.column.as_str());
    let needed = rule.retain.iter().flat_map(|r| &r.keep_columns);
    link.chain(needed.map(String::as_str)).collect()
}

/// The `anonymize` columns of `rule` that some erasure writes, with what: all of them where
/// the action is anonymize (its released rows get them all); where it is delete, only kept
/// rows are written, and never their [`left_in_kept_rows`] columns; none where it is keep.
pub(super) fn anonymize_written(rule: &TableRule) -> Vec<(&str, AnonymizeWith)> {
    let left = match rule.action {
        Action::Anonymize => BTreeSet::new(),
        Action::Delete => left_in_kept_rows(rule),
        Action::Keep => return Vec::new(),
    };
    (rule.anonymize.iter())
        .map(|(c, w)| (c.as_str(), *w))
        .filter(|(c, _)| !left.contains(c))
        .collect()
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
    let (set, pending) = anonymize_parts(columns, b);
    let set: Vec<String> = set
        .iter()
        .map(|(q, value)| format!("{q} = {value}"))
        .collect();
    (set.join(", "), format!("({})", pending.join(" OR ")))
}

/// Each of `columns`, quoted, with the value it gets, and its "not yet anonymized"
/// condition. The text of `redacted` goes only into columns that take it: the connector
/// refuses the rule for any other when it connects ([`super::schema`]).
fn anonymize_parts<'c>(
    columns: impl Iterator<Item = (&'c str, AnonymizeWith)>,
    b: &mut Binds,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut set = Vec::new();
    let mut pending = Vec::new();
    for (column, with) in columns {
        let q = quote(column);
        match with {
            AnonymizeWith::Null => {
                pending.push(format!("{q} IS NOT NULL"));
                set.push((q, "NULL".to_string()));
            }
            AnonymizeWith::Redacted => {
                let p = b.add(REDACTED);
                pending.push(format!("({q} IS NULL OR {q} <> {p})"));
                set.push((q, p));
            }
        }
    }
    (set, pending)
}

/// For a table whose action is anonymize, the condition of a row not yet anonymized, which
/// its erasure would still take; `None` for any other table.
pub(super) fn anonymize_pending(rule: &TableRule, b: &mut Binds) -> Option<String> {
    (rule.action == Action::Anonymize).then(|| {
        let columns = rule.anonymize.iter().map(|(c, w)| (c.as_str(), *w));
        anonymize_clauses(columns, b).1
    })
}

/// Marks `returned`'s job as one whose export recorded the keys of its rows, even none: a
/// row of no configured table (`tbl` and `k` empty), which stays while the keys of rows still
/// held do, so that a repeated call of the erasure after the return never takes the job for
/// one without recorded keys.
pub(super) fn plan_record_marker(returned: ReturnedKeys<'_>) -> Statement {
    let mut b = Binds::default();
    let job = b.add(returned.job);
    b.finish(format!(
        "INSERT INTO {} (job, tbl, k) VALUES ({job}, '', '') ON CONFLICT DO NOTHING",
        quote(returned.table)
    ))
}

/// Records under `returned` the row keys ([`ColumnTypes::row_key`]) of the rows of `rule`
/// that [`plan_export`] reads for `scope`, as a contract end's export does in the
/// transaction of its reads; `None` when no identity applies to the table or its row key is
/// unknown. A row whose primary key is NULL is recorded by its SQLite row id; where declared
/// columns hide every name of the row id (or in a WITHOUT ROWID table) it cannot be told
/// apart, so it is not recorded.
pub(super) fn plan_record_returned(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    returned: ReturnedKeys<'_>,
) -> Option<Statement> {
    let key = scope.row_key(&rule.table)?;
    let mut b = Binds::default();
    let job = b.add(returned.job);
    let table = b.add(rule.table.as_str());
    let filter = subject_filter(config, rule, scope, &mut b)?;
    // Two rows whose keys read alike (SQLite: 1 and '1' in a key column without affinity)
    // are one key: both were returned.
    Some(b.finish(format!(
        "INSERT INTO {} (job, tbl, k) SELECT {job}, {table}, {key} FROM {} \
         WHERE {filter} AND {key} IS NOT NULL ON CONFLICT DO NOTHING",
        quote(returned.table),
        quote(&rule.table),
    )))
}

/// A foreign key of `child` whose `ON DELETE CASCADE` deletes the rows whose `columns`
/// equal the `parent_columns` of a row deleted from `parent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cascade {
    pub(super) child: String,
    pub(super) columns: Vec<String>,
    pub(super) parent: String,
    pub(super) parent_columns: Vec<String>,
}

/// The keys (its row key `key`) of the rows of the last table of `path` that the cascades of
/// `path`, one after the other, delete with the rows of the first link's parent that
/// `deleted` selects ([`ErasureWork::deletes_where`]). Read before that DELETE, in its
/// transaction (after it the rows are gone), and deleted from what the export recorded
/// after it: deleted before it, they would make the rows read as arrivals to its
/// [`cascade_holds`]. The rows are found through the deleted parents alone (uncorrelated
/// `IN`s, which an index on each foreign key's columns serves; without one the child table is
/// read whole, as the cascade itself reads it).
pub(super) fn plan_cascaded_keys(
    deleted: &Statement,
    path: &[&Cascade],
    key: &str,
) -> Option<Statement> {
    let first = path.first()?;
    let columns = |table: &str, columns: &[String]| {
        (columns.iter())
            .map(|c| format!("{}.{}", quote(table), quote(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut rows = format!(
        "SELECT {} FROM {} WHERE {}",
        columns(&first.parent, &first.parent_columns),
        quote(&first.parent),
        deleted.sql
    );
    for (i, link) in path.iter().enumerate() {
        let selected = match path.get(i + 1) {
            Some(next) => columns(&link.child, &next.parent_columns),
            None => key.to_string(),
        };
        rows = format!(
            "SELECT {selected} FROM {} WHERE ({}) IN ({rows})",
            quote(&link.child),
            columns(&link.child, &link.columns)
        );
    }
    Some(Statement {
        sql: rows,
        binds: deleted.binds.clone(),
    })
}

/// The export of `rule`'s rows of `scope`, its `export` columns in order; `None` when no
/// identity applies to the table.
///
/// The rows come in the order the database reads them (on SQLite, through the index of the
/// column the rows are found by, the order they were inserted in), not sorted: a sort
/// cannot yield its first row before it has read the last, and for a large export it spills
/// every row to temporary files first (the benchmark's 1 GiB of invoices: 4.5 s exported
/// sorted, 2.6 s unsorted; `docs/benchmarks.md`, session 14). A package says what the
/// subject's data is, not in which order.
pub(super) fn plan_export(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
) -> Option<Statement> {
    let mut binds = Binds::default();
    let own_only =
        scope.subject.is_some() && rule.parent.as_ref().is_some_and(|l| l.export_matched_only);
    let filter = match own_only {
        // The parent's other child rows describe other people.
        true => own_match_filter(rule, scope, &mut binds)?,
        false => subject_filter(config, rule, scope, &mut binds)?,
    };
    // A type sqlx's Any driver cannot decode (DATE, NUMERIC, UUID, ...) is read as the
    // database writes it as text.
    let columns: Vec<String> = (rule.export.iter())
        .map(|c| match scope.column(&rule.table, c).native {
            true => quote(c),
            false => format!("CAST({} AS TEXT)", quote(c)),
        })
        .collect();
    Some(binds.finish(format!(
        "SELECT {} FROM {} WHERE {filter}",
        columns.join(", "),
        quote(&rule.table),
    )))
}

/// The update writing `corrections` (column, value) into `rule`'s rows of the subject that
/// do not already hold them all (so that the count it reports is of rows it changed);
/// `None` when no identity applies to the table.
pub(super) fn plan_rectify(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    backend: Backend,
    corrections: &[(&String, &str)],
) -> Option<Statement> {
    let mut binds = Binds::default();
    let set: Vec<String> = corrections
        .iter()
        .map(|(column, value)| {
            let p = binds.add(*value);
            let value = scope.column(&rule.table, column).written(&p);
            format!("{} = {value}", quote(column))
        })
        .collect();
    let filter = subject_filter(config, rule, scope, &mut binds)?;
    // Bound again rather than reusing the SET's placeholders: each placeholder is bound
    // once, in order, on both backends.
    let differs: Vec<String> = corrections
        .iter()
        .map(|(column, value)| {
            let p = binds.add(*value);
            let value = scope.column(&rule.table, column).written(&p);
            distinct(backend, &quote(column), &value)
        })
        .collect();
    Some(binds.finish(format!(
        "UPDATE {} SET {} WHERE {filter} AND ({})",
        quote(&rule.table),
        set.join(", "),
        differs.join(" OR ")
    )))
}

/// The update setting the flag `column` of `rule`'s rows of the subject to `value` (0 or 1),
/// written in the column's type (TRUE or FALSE into a PostgreSQL boolean), in the rows that
/// do not hold it yet (so that the count it reports is of rows it changed); `None` when no
/// identity applies to the table.
pub(super) fn plan_flag(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    backend: Backend,
    column: &str,
    value: u8,
) -> Option<Statement> {
    let mut binds = Binds::default();
    let filter = subject_filter(config, rule, scope, &mut binds)?;
    // The value is a constant of the code, not request data.
    let value = scope.column(&rule.table, column).flag_value(value);
    // PostgreSQL compares a column only with a value of its own type: a quoted literal
    // takes the column's (a '1' reads as 1, as '1' and as true), where the bare number
    // would not compare with a text column. SQLite gives the bare number the column's
    // affinity.
    let held = match backend {
        Backend::Postgres => format!("'{value}'"),
        Backend::Sqlite => value.to_string(),
    };
    Some(binds.finish(format!(
        "UPDATE {} SET {} = {value} WHERE {filter} AND {}",
        quote(&rule.table),
        quote(column),
        distinct(backend, &quote(column), &held)
    )))
}

/// `column` does not hold `value`, a NULL counting as a value of its own: a NULL flag or
/// field is changed by writing a value into it.
fn distinct(backend: Backend, column: &str, value: &str) -> String {
    match backend {
        Backend::Postgres => format!("{column} IS DISTINCT FROM {value}"),
        Backend::Sqlite => format!("{column} IS NOT {value}"),
    }
}

/// How many of the subject's rows each of `rules`' tables holds, in one statement (a column
/// per table, in the order given); the tables no identity of the subject applies to are left
/// out, and `None` when that leaves none. `as_exported`: a child table whose `parent` link
/// says its export returns only the rows its own match finds is counted so too (the
/// parent's other child rows describe other people); otherwise the rows are those an
/// update of the subject's rows selects.
pub(super) fn plan_held_counts<'r>(
    config: &SqlConnectorConfig,
    rules: &[&'r TableRule],
    scope: Scope<'_>,
    as_exported: bool,
) -> Option<(Statement, Vec<&'r TableRule>)> {
    let mut binds = Binds::default();
    let mut counted = Vec::new();
    let mut columns = Vec::new();
    for rule in rules {
        let own_only = as_exported && rule.parent.as_ref().is_some_and(|l| l.export_matched_only);
        let filter = match own_only {
            true => own_match_filter(rule, scope, &mut binds),
            false => subject_filter(config, rule, scope, &mut binds),
        };
        let Some(filter) = filter else {
            continue;
        };
        columns.push(format!(
            "CAST((SELECT COUNT(*) FROM {} WHERE {filter}) AS BIGINT)",
            quote(&rule.table)
        ));
        counted.push(*rule);
    }
    (!counted.is_empty()).then(|| {
        (
            binds.finish(format!("SELECT {}", columns.join(", "))),
            counted,
        )
    })
}

/// Whether a row of `rule`'s table other than the subject's (of `scope`) already holds, in
/// its match `column`, the identity `value` of type `ty`, compared as the match compares
/// (an e-mail trimmed and lowercased, a phone number without separators): the statement
/// yields a row when one does. Confined to the controller's rows, the only ones its
/// requests match. `None` when the value cannot be matched in the column (a value an integer
/// column cannot hold, which writing it fails anyway).
pub(super) fn plan_identity_taken(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    (key, column): (&str, &str),
    identity: &Identity,
) -> Option<Statement> {
    let mut binds = Binds::default();
    let only_column = TableRule {
        match_columns: [(key.to_string(), column.to_string())].into(),
        ..rule.clone()
    };
    let value = std::slice::from_ref(identity);
    let holder = Scope {
        subject: Some(value),
        ..scope
    };
    let holds = match rule.parent {
        Some(_) => own_match_filter(&only_column, holder, &mut binds)?,
        None => top_level_filter(&only_column, holder, &mut binds)?,
    };
    // A NULL in a column the subject's filter reads leaves the filter NULL, not false: such
    // a row is not the subject's.
    let others = match subject_filter(config, rule, scope, &mut binds) {
        Some(subject) => format!(" AND NOT COALESCE(({subject}), 1 = 0)"),
        None => String::new(),
    };
    Some(binds.finish(format!(
        "SELECT CAST(1 AS BIGINT) FROM {} WHERE {holds}{others} LIMIT 1",
        quote(&rule.table)
    )))
}

/// The identity a corrected `value` written into the match column of `key` would be found
/// by, normalized as a request's is ([`searchable`]); `None` when the key is no identity
/// type or the value is empty once normalized.
pub(super) fn corrected_identity(key: &str, value: &str) -> Option<Identity> {
    let ty = MATCH_KEYS.iter().find(|(k, _)| *k == key)?.1;
    let value = match ty {
        IdentityType::Email => value.trim().to_string(),
        _ => normalize(ty, value),
    };
    (!value.is_empty()).then_some((ty, value))
}

/// The forms of identity the configured match columns can match: RAW values of their types
/// ([`crate::Connector::matchable_identities`]).
pub(super) fn matchable(config: &SqlConnectorConfig) -> Vec<(IdentityType, IdentityEncoding)> {
    let usable_keys = config.usable_keys();
    MATCH_KEYS
        .iter()
        .filter(|(key, _)| usable_keys.contains(key))
        .map(|(_, ty)| (*ty, IdentityEncoding::Raw))
        .collect()
}

/// The RAW identities of a type some table matches, normalized ([`Identity`]); when there
/// are none, why, naming the identity types the match columns take (and, when some given
/// identity was hashed, that SQL cannot match those): the reason the connector refuses
/// such a task with.
pub(super) fn matched_identities(
    config: &SqlConnectorConfig,
    identities: &[SubjectIdentity],
) -> Result<Vec<Identity>, String> {
    let usable_keys = config.usable_keys();
    let raw: Vec<Identity> = identities
        .iter()
        .filter_map(|id| searchable(&usable_keys, id).ok())
        .collect();
    if raw.is_empty() {
        let wanted: Vec<&str> = usable_keys.into_iter().collect();
        let hashed = identities.iter().any(|id| {
            matches!(
                IdentityEncoding::try_from(id.encoding),
                Ok(IdentityEncoding::Sha256 | IdentityEncoding::Sha1 | IdentityEncoding::Md5)
            )
        });
        return Err(format!(
            "the sql connector needs a raw identity of type {} (configured match columns){}",
            wanted.join(", "),
            if hashed {
                "; hashed identities cannot be matched in SQL"
            } else {
                ""
            }
        ));
    }
    Ok(raw)
}

/// The identities [`matched_identities`] leaves out, and those a match column of an integer
/// type (`types`) cannot be compared with ([`match_clause`]), described without their
/// values, for the outcome's note: an answer about the subject must say what it did not
/// search by. `None` when every identity was used.
pub(super) fn unsearched(
    config: &SqlConnectorConfig,
    types: &ColumnTypes,
    identities: &[SubjectIdentity],
) -> Option<String> {
    let usable_keys = config.usable_keys();
    let mut left_out = Vec::new();
    for id in identities {
        let (ty, value) = match searchable(&usable_keys, id) {
            Ok(usable) => usable,
            Err(why) => {
                left_out.push(why);
                continue;
            }
        };
        for rule in &config.tables {
            let Some(column) = match_key(ty).and_then(|k| rule.match_columns.get(k)) else {
                continue;
            };
            if not_comparable(ty, types.of(&rule.table, column).compare, &value) {
                left_out.push(format!(
                    "{} in {}.{column} (not an integer, which the column holds)",
                    type_name(ty),
                    rule.table
                ));
            }
        }
    }
    (!left_out.is_empty()).then(|| format!("not searched: {}", left_out.join("; ")))
}

/// Whether the identity `value` of type `ty` is left out of the match of a column compared
/// as `compare`: a value that is no integer, for an integer column (its cast would fail the
/// statement, and with it the request's other identities). E-mails and phone numbers are
/// compared as text.
fn not_comparable(ty: IdentityType, compare: Compare, value: &str) -> bool {
    let text = matches!(ty, IdentityType::Email | IdentityType::Phone);
    compare == Compare::Integer && !text && value.parse::<i64>().is_err()
}

/// `ty` in words: "customer number".
fn type_name(ty: IdentityType) -> String {
    ty.as_str_name()
        .trim_start_matches("IDENTITY_TYPE_")
        .to_ascii_lowercase()
        .replace('_', " ")
}

/// `id` as the match uses it (a RAW value of a type some table matches, normalized; see
/// [`Identity`]), or why it is left out, in words that do not carry its value. One decision
/// for both [`matched_identities`] and [`unsearched`], so the search and the note agree.
fn searchable(usable_keys: &BTreeSet<&str>, id: &SubjectIdentity) -> Result<Identity, String> {
    let ty = IdentityType::try_from(id.r#type).unwrap_or(IdentityType::Unspecified);
    let name = || type_name(ty);
    if IdentityEncoding::try_from(id.encoding) != Ok(IdentityEncoding::Raw) {
        let encoding = IdentityEncoding::try_from(id.encoding).map_or("an unknown encoding", |e| {
            e.as_str_name().trim_start_matches("IDENTITY_ENCODING_")
        });
        return Err(format!(
            "{} given as {encoding} (SQL matches raw values only)",
            name()
        ));
    }
    if match_key(ty).filter(|k| usable_keys.contains(k)).is_none() {
        return Err(format!("{} (no table here matches it)", name()));
    }
    // An e-mail keeps its case here: normalize()'s Unicode lowercasing alone would miss an
    // address stored with a non-ASCII capital (see email_match).
    let value = match ty {
        IdentityType::Email => id.value.trim().to_string(),
        _ => normalize(ty, &id.value),
    };
    if value.is_empty() {
        return Err(format!("{} (empty once normalized)", name()));
    }
    Ok((ty, value))
}

/// A rectification's corrections as the tables map them ([`check_corrections`]).
pub(super) struct Corrections<'a> {
    /// (field, value) with the configuration's lowercase field, each field once.
    pub(super) mapped: Vec<(&'a str, &'a str)>,
    /// What the outcome's note adds about the fields no table maps (their names, never
    /// their values); `None` when every field is mapped.
    pub(super) unmapped: Option<String>,
}

/// The corrections some table maps, and a note naming those none maps. Those left out do
/// not stop the rest: the holder corrects what it holds, and the operator has nothing to
/// fix for a field it never had. When none is mapped, the inner error is the reason to
/// refuse the task: this holder has no such field, which neither an operator nor a retry
/// can change, and the configuration alone says so, whether or not the subject is here. A
/// permanent error for no corrections or a field corrected twice (Submit lets neither
/// through).
///
/// For a request scoped to categories, `config` holds the tables of its scope and
/// `left_out` the whole configuration with the requested categories: a field that only
/// tables outside the scope map is named so (a rectification of their categories corrects
/// it), not as one no table maps.
pub(super) fn check_corrections<'a>(
    config: &'a SqlConnectorConfig,
    corrections: &'a [FieldCorrection],
    left_out: Option<(&SqlConnectorConfig, &[String])>,
) -> Result<Result<Corrections<'a>, String>, ConnectorError> {
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
    // Fields only out-of-scope tables map, and those tables.
    let mut outside = Vec::new();
    let mut outside_tables: Vec<&str> = Vec::new();
    for c in corrections {
        let field = c.field.trim();
        // The configuration's spelling: fields are lowercase there.
        let Some(&known) = mapped.iter().find(|m| m.eq_ignore_ascii_case(field)) else {
            let elsewhere: Vec<&str> = left_out
                .iter()
                .flat_map(|(full, _)| &full.tables)
                .filter(|t| t.rectify.keys().any(|k| k.eq_ignore_ascii_case(field)))
                .map(|t| t.table.as_str())
                .collect();
            match elsewhere.is_empty() {
                true => unknown.push(format!("{field:?}")),
                false => {
                    outside.push(format!("{field:?}"));
                    for t in elsewhere {
                        if !outside_tables.contains(&t) {
                            outside_tables.push(t);
                        }
                    }
                }
            }
            continue;
        };
        if out.iter().any(|(f, _)| *f == known) {
            return Err(ConnectorError::Permanent(format!(
                "the field {known:?} is corrected more than once"
            )));
        }
        out.push((known, c.new_value.as_str()));
    }
    let known: Vec<&str> = mapped.into_iter().collect();
    let categories = left_out.map(|(_, c)| c.join(", ")).unwrap_or_default();
    let only_outside = (!outside.is_empty()).then(|| {
        format!(
            "mapped only in tables outside the request's categories ({categories}): {}",
            outside_tables.join(", ")
        )
    });
    if out.is_empty() {
        let mut parts = Vec::new();
        if !unknown.is_empty() {
            parts.push(format!(
                "no table maps the corrected field(s) {}",
                unknown.join(", ")
            ));
        }
        if let Some(only_outside) = &only_outside {
            parts.push(format!(
                "the corrected field(s) {} are {only_outside}; ask for a rectification of \
                 their categories",
                outside.join(", ")
            ));
        }
        let can = if known.is_empty() {
            "nothing".to_string()
        } else {
            known.join(", ")
        };
        let holder = match left_out {
            Some(_) => "the tables of the request's categories",
            None => "this database",
        };
        return Ok(Err(format!(
            "{}; {holder} can correct {can}",
            parts.join("; ")
        )));
    }
    let mut notes = Vec::new();
    if !unknown.is_empty() {
        notes.push(format!(
            "not corrected: {} (no table of this database maps it; map it in a table's \
             rectify of the connector configuration; mapped: {})",
            unknown.join(", "),
            known.join(", ")
        ));
    }
    if let Some(only_outside) = only_outside {
        notes.push(format!(
            "not corrected: {} ({only_outside})",
            outside.join(", ")
        ));
    }
    Ok(Ok(Corrections {
        mapped: out,
        unmapped: (!notes.is_empty()).then(|| notes.join("; ")),
    }))
}

/// The condition selecting the rows of `scope` in `rule`'s table: its own; for a child
/// table, those its own match finds or its parent's through the link. `None` when no
/// identity of the subject applies.
pub(super) fn subject_filter(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    binds: &mut Binds,
) -> Option<String> {
    if rule.parent.is_none() {
        return top_level_filter(rule, scope, binds);
    }
    let own = own_match_filter(rule, scope, binds);
    let through_parent = through_parent_filter(config, rule, scope, binds);
    match (own, through_parent) {
        (Some(own), Some(through)) => Some(format!("({own} OR {through})")),
        (own, through) => own.or(through),
    }
}

/// The rows of a child table that hang off its parent's rows of `scope`; `None` for a
/// top-level table and when no identity of the subject applies to the parent.
fn through_parent_filter(
    config: &SqlConnectorConfig,
    rule: &TableRule,
    scope: Scope<'_>,
    binds: &mut Binds,
) -> Option<String> {
    let link = rule.parent.as_ref()?;
    let parent = config.tables.iter().find(|t| t.table == link.table)?;
    let parent_filter = top_level_filter(parent, scope, binds)?;
    Some(format!(
        "{} IN (SELECT {} FROM {} WHERE {parent_filter})",
        quote(&link.column),
        quote(&link.parent_column),
        quote(&link.table)
    ))
}

/// The rows of a child table that its own match finds for the subject of `scope`, confined
/// to the parent rows of the controller's condition and the batch (which are stated over the
/// top-level tables); `None` without a subject or when no identity applies to the table.
fn own_match_filter(rule: &TableRule, scope: Scope<'_>, binds: &mut Binds) -> Option<String> {
    let link = rule.parent.as_ref()?;
    let identities = scope.subject?;
    let types = |column: &str| scope.column(&rule.table, column);
    let matched = match_clause(&rule.match_columns, identities, &types, binds)?;
    let mut confined = Vec::new();
    if let Some(condition) = scope.condition {
        confined.push(format!("({condition})"));
    }
    if let Some(batch) = scope.batch.filter(|b| b.table == link.table) {
        confined.push(batch.condition(binds));
    }
    if confined.is_empty() {
        return Some(matched);
    }
    Some(format!(
        "({matched} AND {} IN (SELECT {} FROM {} WHERE {}))",
        quote(&link.column),
        quote(&link.parent_column),
        quote(&link.table),
        confined.join(" AND ")
    ))
}

/// The rows of `scope` in a matched (top-level) table: the subject's match, the controller's
/// condition and the batch's range, all that apply.
fn top_level_filter(rule: &TableRule, scope: Scope<'_>, binds: &mut Binds) -> Option<String> {
    let mut terms = Vec::new();
    if let Some(identities) = scope.subject {
        let types = |column: &str| scope.column(&rule.table, column);
        terms.push(match_clause(
            &rule.match_columns,
            identities,
            &types,
            binds,
        )?);
    }
    if let Some(condition) = scope.condition {
        terms.push(format!("({condition})"));
    }
    if let Some(batch) = scope.batch.filter(|b| b.table == rule.table) {
        terms.push(batch.condition(binds));
    }
    Some(if terms.is_empty() {
        "1 = 1".to_string()
    } else {
        terms.join(" AND ")
    })
}

/// `(a = $n OR b = $m ...)` over every identity whose type the table matches, with the values
/// bound, each column compared as its type (`types`) allows ([`Compare`]); `None` when no
/// identity applies. A value an integer column cannot hold is left out ([`unsearched`] says
/// so).
fn match_clause(
    columns: &BTreeMap<String, String>,
    identities: &[Identity],
    types: &dyn Fn(&str) -> ColumnType,
    binds: &mut Binds,
) -> Option<String> {
    let mut terms = Vec::new();
    for (ty, value) in identities {
        let Some(column) = match_key(*ty).and_then(|k| columns.get(k)) else {
            continue;
        };
        let compare = types(column).compare;
        if not_comparable(*ty, compare, value) {
            continue;
        }
        // E-mails and phone numbers are text functions' arguments whatever the column holds.
        let text = match compare {
            Compare::AsIs => quote(column),
            Compare::Integer | Compare::AsText => format!("CAST({} AS TEXT)", quote(column)),
        };
        terms.push(match (ty, compare) {
            (IdentityType::Email, _) => email_match(&text, value, binds),
            (IdentityType::Phone, _) => {
                format!("{} = {}", without_separators(&text), binds.add(value))
            }
            (_, Compare::Integer) => {
                format!("{} = CAST({} AS BIGINT)", quote(column), binds.add(value))
            }
            (_, Compare::AsIs | Compare::AsText) => format!("{text} = {}", binds.add(value)),
        });
    }
    (!terms.is_empty()).then(|| format!("({})", terms.join(" OR ")))
}

/// The match of an e-mail column (`stored`, quoted, or cast to text) with the request's
/// address `value`.
///
/// The request's address is trimmed, and a stored one may carry the spaces it was typed or
/// pasted with, so the column is trimmed too (`trim()` drops spaces only, on both backends).
/// Stored addresses keep whatever case they were typed in, and the database's lower() changes
/// only ASCII letters on SQLite (and on PostgreSQL under the C collation): a stored
/// 'ÄNNI@X.FI' lowers to 'Änni@x.fi'. No one form of the request's address meets every
/// stored form, so lower(column) is compared with up to three, each through the same lower():
/// the address as given (a stored address whose non-ASCII letters are cased as the
/// request's), with its non-ASCII letters in lower case, and with them in capitals. Where
/// lower() is Unicode-aware the first alone meets every case. Only letters with a one-letter
/// non-ASCII counterpart change ([`non_ascii_case`]), so that no form names another mailbox
/// ('ß' is no "SS"). lower(trim(column)) stays as it is on the left, so that an index on that
/// expression serves `=` and `IN` alike (one on lower(column) does not).
fn email_match(stored: &str, value: &str, binds: &mut Binds) -> String {
    let mut forms = vec![value.to_string()];
    for form in [
        non_ascii_case(value, |c| c.to_lowercase()),
        non_ascii_case(value, |c| c.to_uppercase()),
    ] {
        if !forms.contains(&form) {
            forms.push(form);
        }
    }
    let lowered: Vec<String> = forms
        .into_iter()
        .map(|form| format!("lower({})", binds.add(form)))
        .collect();
    let stored = format!("lower(trim({stored}))");
    match lowered.as_slice() {
        [one] => format!("{stored} = {one}"),
        many => format!("{stored} IN ({})", many.join(", ")),
    }
}

/// `value` with each non-ASCII letter that `map` turns into one other non-ASCII letter so
/// turned; ASCII (which lower() handles) and letters whose counterpart is longer or ASCII
/// ('ß' and "SS", 'ſ' and 'S') stay as they are.
fn non_ascii_case<I: Iterator<Item = char>>(value: &str, map: impl Fn(char) -> I) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii() {
                return c;
            }
            let mut mapped = map(c);
            match (mapped.next(), mapped.next()) {
                (Some(m), None) if !m.is_ascii() => m,
                _ => c,
            }
        })
        .collect()
}

/// The separators people write phone numbers with.
const PHONE_SEPARATORS: [&str; 6] = [" ", "-", "(", ")", ".", "/"];

/// The text expression `text` (a quoted phone column, or one cast to text) without the
/// separators of [`PHONE_SEPARATORS`]. The request's phone number is normalized in Rust to
/// its digits and '+' ('+358 40 123 4567' to '+358401234567'), but a holder stores numbers
/// as they were typed, so the column must lose its separators too or a stored
/// '+358 40 123 4567' would never match, not even the same text. SQL has no
/// "keep only these characters", so the separators the identity validation admits (space,
/// '-', '(' and ')') and those common in stored numbers ('.' and '/') are removed one by
/// one; the same REPLACE works on both backends. An index on the bare column does not serve
/// this match, and ORed with the other identities' terms it makes every statement of the
/// request read the whole table; an index on this very expression does serve it. The module
/// documentation gives that index, and a test checks it against this function.
fn without_separators(text: &str) -> String {
    PHONE_SEPARATORS
        .iter()
        .fold(text.to_string(), |inner, sep| {
            format!("REPLACE({inner}, '{sep}', '')")
        })
}

/// The index the module documentation tells operators to create for a phone match column
/// `phone` of `customers`.
#[cfg(test)]
pub(super) fn documented_phone_index() -> String {
    format!(
        "CREATE INDEX customers_phone_digits ON customers (({}))",
        without_separators(&quote("phone"))
    )
}

fn match_key(ty: IdentityType) -> Option<&'static str> {
    MATCH_KEYS.iter().find(|(_, t)| *t == ty).map(|(k, _)| *k)
}

/// Double-quotes a validated identifier. Validation already excludes quotes; quoting keeps
/// reserved words (a table named `order`) usable.
pub(super) fn quote(identifier: &str) -> String {
    format!("\"{identifier}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::sample_config;
    use crate::sql::tests::{email, ident, now};

    /// Every column used as it is, as on SQLite.
    fn as_is(_: &str) -> ColumnType {
        ColumnType::default()
    }

    /// The sample's rules, with its invoices (a child table kept under retention) also
    /// matched by their own copy of the e-mail, as a child table may be.
    #[test]
    fn plans_bind_values_and_quote_identifiers() {
        let mut config = sample_config("sqlite::memory:");
        assert_eq!(config.tables[1].table, "invoices");
        (config.tables[1].match_columns).insert("email".into(), "customer_email".into());
        let raw = matched_identities(
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
        let scope = Scope {
            subject: Some(&raw),
            ..Scope::default()
        };
        let plan = plan_erasure(&config, scope, now());
        let tables: Vec<&str> = plan.iter().map(|s| s.rule.table.as_str()).collect();
        assert_eq!(
            tables,
            ["contacts", "invoices", "ledger_entries", "customers"]
        );
        let work = |i: usize| plan[i].work.as_ref().unwrap();
        // A contact is found by its own e-mail too, or through the customer.
        assert_eq!(
            work(0).main,
            Statement {
                sql: "DELETE FROM \"contacts\" WHERE ((lower(trim(\"email\")) = lower($1)) OR \
                      \"customer_id\" IN (SELECT \"id\" FROM \"customers\" WHERE \
                      (lower(trim(\"email\")) = lower($2) OR \"customer_no\" = $3)))"
                    .into(),
                binds: vec![
                    "Maija@Example.fi".into(),
                    "Maija@Example.fi".into(),
                    "C-1001".into()
                ],
            }
        );
        assert!(work(0).probe.is_none() && work(0).count_kept.is_none());
        // An invoice likewise, by its own copy of the address.
        let customers_at = |e: usize| {
            format!(
                "\"customer_id\" IN (SELECT \"id\" FROM \"customers\" WHERE \
                 (lower(trim(\"email\")) = lower(${e}) OR \"customer_no\" = ${}))",
                e + 1
            )
        };
        let invoices_of = |e: usize| {
            format!(
                "((lower(trim(\"customer_email\")) = lower(${e})) OR {})",
                customers_at(e + 1)
            )
        };
        let invoices_kept = |d: usize| {
            format!(
                "(CASE WHEN (CAST(\"invoices\".\"issued_on\" AS TEXT) >= ${d} OR \
                 (status IN ('open', 'collection'))) THEN 1 ELSE 0 END)"
            )
        };
        assert_eq!(
            work(1).main,
            Statement {
                sql: format!(
                    "DELETE FROM \"invoices\" WHERE {} AND {} = 0",
                    invoices_of(1),
                    invoices_kept(4)
                ),
                binds: vec![
                    "Maija@Example.fi".into(),
                    "Maija@Example.fi".into(),
                    "C-1001".into(),
                    "2020-01-01".into()
                ],
            }
        );
        // Kept, it loses the address only where the customer row reaches it, as the kept
        // customer row finds it again; elsewhere the address is what finds it.
        let anonymize_kept = work(1).anonymize_kept.as_ref().unwrap();
        assert_eq!(
            anonymize_kept.sql,
            format!(
                "UPDATE \"invoices\" SET \"customer_email\" = CASE WHEN {reached} THEN NULL \
                 ELSE \"customer_email\" END WHERE {} AND {} = 1 AND (({reached} AND \
                 (\"customer_email\" IS NOT NULL)))",
                invoices_of(3),
                invoices_kept(6),
                reached = customers_at(1)
            )
        );
        assert_eq!(
            anonymize_kept.binds,
            [
                "Maija@Example.fi",
                "C-1001",
                "Maija@Example.fi",
                "Maija@Example.fi",
                "C-1001",
                "2020-01-01"
            ]
        );
        assert_eq!(
            work(1).probe.as_ref().unwrap().sql,
            format!(
                "SELECT CAST(\"invoices\".\"issued_on\" AS TEXT) AS dated, CASE WHEN (status \
                 IN ('open', 'collection')) THEN 1 ELSE 0 END AS held FROM \"invoices\" WHERE \
                 {}",
                invoices_of(1)
            )
        );
        // The ledger keeps the description and its link while kept: nothing to do now.
        assert!(work(2).anonymize_kept.is_none());
        assert_eq!(
            work(2).main.sql,
            format!(
                "UPDATE \"ledger_entries\" SET \"customer_id\" = NULL, \"description\" = $1 \
                 WHERE \"customer_id\" IN (SELECT \"id\" FROM \"customers\" WHERE \
                 (lower(trim(\"email\")) = lower($2) OR \"customer_no\" = $3)) AND (CASE WHEN \
                 (CAST(\"ledger_entries\".\"booked_on\" AS TEXT) >= $4) THEN 1 ELSE 0 END) = 0 \
                 AND (\"customer_id\" IS NOT NULL OR (\"description\" IS NULL OR \
                 \"description\" <> $1))"
            )
        );
        assert_eq!(
            work(2).main.binds,
            [REDACTED, "Maija@Example.fi", "C-1001", "2016-01-01"]
        );
        // The customer row is kept while a child row is; the e-mail that found it stays.
        let customers = work(3).anonymize_kept.as_ref().unwrap();
        assert_eq!(
            customers.sql,
            "UPDATE \"customers\" SET \"address\" = NULL, \"name\" = $1, \"national_id\" = \
             NULL, \"phone\" = NULL WHERE (lower(trim(\"email\")) = lower($2) OR \
             \"customer_no\" = $3) AND (CASE WHEN EXISTS (SELECT 1 FROM \"invoices\" WHERE \
             \"invoices\".\"customer_id\" = \"customers\".\"id\" AND \
             (CAST(\"invoices\".\"issued_on\" AS TEXT) >= $4 OR \
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
                "Maija@Example.fi",
                "C-1001",
                "2020-01-01",
                "2016-01-01"
            ]
        );
        assert_eq!(work(3).held_for, ["invoices", "ledger_entries"]);
    }

    /// On PostgreSQL an integer match column is compared with the value cast (its index
    /// serves that), a value that is no integer is left out; another non-text column is
    /// compared as text; an export reads a type the driver cannot decode as text; a
    /// rectification casts the value to a non-text column's type.
    #[test]
    fn postgres_columns_are_compared_read_and_written_by_their_types() {
        let typed = |declared: &str, own: &str, base: &str| {
            ColumnType::postgres(declared.into(), own, base, false)
        };
        let types = ColumnTypes::of_columns([
            (
                "customers",
                "customer_no",
                typed("bigint", "bigint", "bigint"),
            ),
            ("customers", "national_id", typed("uuid", "uuid", "uuid")),
            ("customers", "phone", typed("bigint", "bigint", "bigint")),
            ("customers", "name", typed("text", "text", "text")),
            ("customers", "address", typed("date", "date", "date")),
        ]);
        let columns: BTreeMap<String, String> = [
            ("customer_number", "customer_no"),
            ("national_id", "national_id"),
            ("phone", "phone"),
            ("email", "email"),
        ]
        .map(|(k, c)| (k.to_string(), c.to_string()))
        .into();
        let of = |column: &str| types.of("customers", column);
        let clause = |raw: &[Identity]| {
            let mut binds = Binds::default();
            (match_clause(&columns, raw, &of, &mut binds), binds.0)
        };
        let raw = |ty, value: &str| (ty, value.to_string());
        assert_eq!(
            clause(&[
                raw(IdentityType::CustomerNumber, "1001"),
                raw(
                    IdentityType::NationalId,
                    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
                ),
                raw(IdentityType::Phone, "+358401234567"),
            ]),
            (
                Some(
                    "(\"customer_no\" = CAST($1 AS BIGINT) OR CAST(\"national_id\" AS TEXT) = $2 \
                     OR REPLACE(REPLACE(REPLACE(REPLACE(REPLACE(REPLACE(CAST(\"phone\" AS TEXT), \
                     ' ', ''), '-', ''), '(', ''), ')', ''), '.', ''), '/', '') = $3)"
                        .to_string()
                ),
                vec![
                    "1001".to_string(),
                    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_string(),
                    "+358401234567".to_string(),
                ]
            )
        );
        // No integer: left out, and the other identities still match.
        assert_eq!(
            clause(&[
                raw(IdentityType::CustomerNumber, "C-1001"),
                raw(IdentityType::Email, "Maija@Example.fi"),
            ]),
            (
                Some("(lower(trim(\"email\")) = lower($1))".to_string()),
                vec!["Maija@Example.fi".to_string()]
            )
        );
        assert_eq!(
            clause(&[raw(IdentityType::CustomerNumber, "C-1001")]),
            (None, vec![])
        );
        let mut config = sample_config("postgres://h/db");
        config.tables.retain(|t| t.table == "customers");
        let customers = &mut config.tables[0];
        customers.match_columns =
            [("customer_number".to_string(), "customer_no".to_string())].into();
        customers.export = vec!["customer_no".into(), "name".into(), "address".into()];
        let given = [ident(
            IdentityType::CustomerNumber,
            IdentityEncoding::Raw,
            "C-1001",
        )];
        let note = unsearched(&config, &types, &given);
        assert_eq!(
            note.as_deref(),
            Some(
                "not searched: customer number in customers.customer_no (not an integer, \
                 which the column holds)"
            )
        );
        let raw = [raw(IdentityType::CustomerNumber, "1001")];
        let scope = Scope {
            subject: Some(&raw),
            types: Some(&types),
            ..Scope::default()
        };
        let rule = &config.tables[0];
        assert_eq!(
            plan_export(&config, rule, scope).unwrap().sql,
            "SELECT \"customer_no\", \"name\", CAST(\"address\" AS TEXT) FROM \"customers\" \
             WHERE (\"customer_no\" = CAST($1 AS BIGINT))"
        );
        let (name, address) = ("name".to_string(), "address".to_string());
        assert_eq!(
            plan_rectify(
                &config,
                rule,
                scope,
                Backend::Postgres,
                &[(&name, "Maija"), (&address, "2024-03-02")]
            )
            .unwrap(),
            Statement {
                sql: "UPDATE \"customers\" SET \"name\" = $1, \"address\" = \
                      CAST($2 AS date) WHERE (\"customer_no\" = CAST($3 AS BIGINT)) AND \
                      (\"name\" IS DISTINCT FROM $4 OR \"address\" IS DISTINCT FROM \
                      CAST($5 AS date))"
                    .into(),
                binds: vec![
                    "Maija".into(),
                    "2024-03-02".into(),
                    "1001".into(),
                    "Maija".into(),
                    "2024-03-02".into()
                ],
            }
        );
    }

    #[test]
    fn a_phone_column_loses_its_separators_before_the_match() {
        let config = sample_config("sqlite::memory:");
        let spaced = ident(
            IdentityType::Phone,
            IdentityEncoding::Raw,
            "+358 40 123 4567",
        );
        let raw = matched_identities(&config, &[spaced]).unwrap();
        assert_eq!(raw, [(IdentityType::Phone, "+358401234567".to_string())]);
        let columns = [("phone".to_string(), "tel".to_string())].into();
        let mut binds = Binds::default();
        assert_eq!(
            match_clause(&columns, &raw, &as_is, &mut binds).unwrap(),
            "(REPLACE(REPLACE(REPLACE(REPLACE(REPLACE(REPLACE(\"tel\", ' ', ''), '-', ''), \
             '(', ''), ')', ''), '.', ''), '/', '') = $1)"
        );
        assert_eq!(binds.0, ["+358401234567"]);
    }

    #[test]
    fn an_email_with_non_ascii_letters_is_matched_in_its_case_forms() {
        let columns = [("email".to_string(), "email".to_string())].into();
        let clause = |value: &str| {
            let mut binds = Binds::default();
            let raw = [(IdentityType::Email, value.to_string())];
            (
                match_clause(&columns, &raw, &as_is, &mut binds).unwrap(),
                binds.0,
            )
        };
        // As given, its non-ASCII letters lowered, and in capitals; each lowered by SQL.
        assert_eq!(
            clause("äiti.Öljy@X.fi"),
            (
                "(lower(trim(\"email\")) IN (lower($1), lower($2), lower($3)))".to_string(),
                vec![
                    "äiti.Öljy@X.fi".to_string(),
                    "äiti.öljy@X.fi".to_string(),
                    "Äiti.Öljy@X.fi".to_string(),
                ]
            )
        );
        // A form equal to another is bound once.
        assert_eq!(
            clause("Äiti@x.fi"),
            (
                "(lower(trim(\"email\")) IN (lower($1), lower($2)))".to_string(),
                vec!["Äiti@x.fi".to_string(), "äiti@x.fi".to_string()]
            )
        );
        // ASCII, and letters whose other case is no single non-ASCII letter ('ß', "SS";
        // 'ſ', 'S'), have one form: no form may name another mailbox.
        for value in ["Maija@Example.fi", "straße@x.de", "ſam@x.fi"] {
            assert_eq!(
                clause(value),
                (
                    "(lower(trim(\"email\")) = lower($1))".to_string(),
                    vec![value.to_string()]
                )
            );
        }
    }

    /// The statement of each ```sql block of `text` (`//!` lines or Markdown), compacted.
    fn sql_blocks(text: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut block: Option<String> = None;
        for line in text.lines() {
            let line = line.trim_start().trim_start_matches("//!").trim();
            if let Some(sql) = block.as_mut() {
                if line == "```" {
                    blocks.push(compact(sql));
                    block = None;
                } else {
                    sql.push_str(line);
                    sql.push('\n');
                }
            } else if line == "```sql" {
                block = Some(String::new());
            }
        }
        blocks
    }

    /// `sql` without whitespace outside quotes and its closing ';': how a statement is laid
    /// out across lines does not change it.
    fn compact(sql: &str) -> String {
        let mut out = String::new();
        let mut quoted = false;
        for c in sql.chars() {
            quoted ^= c == '\'';
            if quoted || c == '\'' || !c.is_whitespace() {
                out.push(c);
            }
        }
        out.trim_end_matches(';').to_string()
    }

    /// An expression index serves only the expression it was created on, so the one the
    /// documentation gives must be the one the match uses, character for character
    /// (whitespace aside).
    #[test]
    fn the_documented_phone_index_is_on_the_expression_the_match_uses() {
        let index = compact(&documented_phone_index());
        for (doc, text) in [
            ("sql/mod.rs", include_str!("mod.rs")),
            ("README.md", include_str!("../../../../README.md")),
        ] {
            let blocks = sql_blocks(text);
            assert!(blocks.contains(&index), "{doc}: {index} not in {blocks:?}");
        }
        // And the match compares exactly that expression.
        let columns = [("phone".to_string(), "phone".to_string())].into();
        let raw = [(IdentityType::Phone, "+358401234567".to_string())];
        let clause = match_clause(&columns, &raw, &as_is, &mut Binds::default()).unwrap();
        assert_eq!(
            clause,
            format!("({} = $1)", without_separators(&quote("phone")))
        );
        assert!(index.contains(&compact(&without_separators(&quote("phone")))));
    }

    #[test]
    fn controller_conditions_and_batches_scope_the_top_level_rows() {
        let config = sample_config("sqlite::memory:");
        let batch = Batch {
            table: "customers".into(),
            key: "id".into(),
            after: Some("10".into()),
            through: None,
            key_type: ColumnType::postgres("bigint".into(), "bigint", "bigint", false),
        };
        let scope = Scope {
            subject: None,
            condition: Some("tenant = 'a'"),
            batch: Some(&batch),
            types: None,
            returned: None,
        };
        let plan = plan_erasure(&config, scope, now());
        // A child: through the parent's rows in the condition and the batch, which, being the
        // last, also takes the rows without a key.
        assert_eq!(
            plan[0].work.as_ref().unwrap().main,
            Statement {
                sql: "DELETE FROM \"contacts\" WHERE \"customer_id\" IN (SELECT \"id\" FROM \
                      \"customers\" WHERE (tenant = 'a') AND (\"customers\".\"id\" IS NULL OR \
                      \"customers\".\"id\" > CAST($1 AS bigint)))"
                    .into(),
                binds: vec!["10".into()],
            }
        );
        // With a subject, the condition joins the match; a text key is compared as text.
        let raw = matched_identities(&config, &[email("Maija@Example.fi")]).unwrap();
        let batch = Batch {
            through: Some("20".into()),
            key_type: ColumnType::default(),
            ..batch
        };
        let scope = Scope {
            subject: Some(&raw),
            condition: Some("tenant = 'a'"),
            batch: Some(&batch),
            types: None,
            returned: None,
        };
        let customers = config
            .tables
            .iter()
            .find(|t| t.table == "customers")
            .unwrap();
        assert_eq!(
            plan_flag(
                &config,
                customers,
                scope,
                Backend::Sqlite,
                "marketing_opt_out",
                1
            )
            .unwrap(),
            Statement {
                sql: "UPDATE \"customers\" SET \"marketing_opt_out\" = 1 WHERE \
                      (lower(trim(\"email\")) = lower($1)) AND (tenant = 'a') AND \
                      CAST(\"customers\".\"id\" AS TEXT) > $2 AND \
                      CAST(\"customers\".\"id\" AS TEXT) <= $3 AND \
                      \"marketing_opt_out\" IS NOT 1"
                    .into(),
                binds: vec!["Maija@Example.fi".into(), "10".into(), "20".into()],
            }
        );
    }
}
