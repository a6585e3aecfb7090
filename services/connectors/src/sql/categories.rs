//! A request's category scope at a SQL holder: which tables it acts on, which it only reads
//! to find the subject, and which requests it refuses because the database would change an
//! out-of-scope table's rows (see "Data categories" in the module documentation).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use dsrelay_proto::v1::RequestKind;
use dsrelay_runtime::store::Backend;

use super::plan::anonymize_written;
use super::rules::{Action, SqlConnectorConfig, TableRule};
use super::schema::lookup_name;

/// The rules as a request scoped to some categories sees them.
#[derive(Debug)]
pub(crate) struct Narrowed {
    /// The tables in scope, each `categories` met with the requested ones, and the
    /// out-of-scope parents of in-scope children ([`Self::lookup_only`]), in the order the
    /// configuration lists them; the other tables are left out.
    pub(crate) config: SqlConnectorConfig,
    /// Out-of-scope parents kept only so that their in-scope children are found through
    /// their matched rows: `keep`, with nothing to export, correct or flag, and left out of
    /// an erasure's statements, counts and note.
    pub(crate) lookup_only: BTreeSet<String>,
    /// Every configured table the scope leaves out (the lookup-only ones too); empty when
    /// the scope only narrows the tables' categories.
    pub(crate) left_out: Vec<String>,
    /// The request's categories.
    pub(crate) requested: Vec<String>,
}

impl Narrowed {
    /// What the note of an answer adds: the tables the scope left out, when there are any.
    pub(crate) fn note(&self) -> Option<String> {
        (!self.left_out.is_empty()).then(|| {
            format!(
                "left out by the request's categories ({}): {}",
                self.requested.join(", "),
                self.left_out.join(", ")
            )
        })
    }
}

/// Whether `rule` holds one of `requested`: a table without `categories` holds them all.
fn in_scope(rule: &TableRule, requested: &[String]) -> bool {
    (rule.categories.as_ref()).is_none_or(|c| c.iter().any(|x| requested.contains(x)))
}

/// `config` as a request scoped to `requested` sees it; `None` when the scope changes
/// nothing (no scope, or every table in it holding none but requested categories); the
/// reason to refuse when no table holds any of `requested`. A scope leaving no table out
/// still meets the tables' categories with the requested ones, so that a table's export
/// files are labelled the same whether or not some unrelated table is out of scope.
pub(crate) fn narrow(
    config: &SqlConnectorConfig,
    requested: &[String],
) -> Result<Option<Narrowed>, String> {
    let within = |t: &TableRule| {
        (t.categories.as_ref()).is_none_or(|c| c.iter().all(|x| requested.contains(x)))
    };
    if requested.is_empty() || config.tables.iter().all(within) {
        return Ok(None);
    }
    if !config.tables.iter().any(|t| in_scope(t, requested)) {
        let held: Vec<String> = (config.tables.iter())
            .map(|t| {
                let categories = t.categories.as_deref().unwrap_or_default();
                format!("{} ({})", t.table, categories.join(", "))
            })
            .collect();
        return Err(format!(
            "no table of this holder holds the request's categories ({}); its tables hold: {}",
            requested.join(", "),
            held.join("; ")
        ));
    }
    let parents_in_scope: BTreeSet<&str> = (config.tables.iter())
        .filter(|t| in_scope(t, requested))
        .filter_map(|t| t.parent.as_ref().map(|p| p.table.as_str()))
        .collect();
    let mut tables = Vec::with_capacity(config.tables.len());
    let mut lookup_only = BTreeSet::new();
    let mut left_out = Vec::new();
    for rule in &config.tables {
        if in_scope(rule, requested) {
            let categories = rule.categories.as_ref().map(|c| {
                (c.iter())
                    .filter(|x| requested.contains(x))
                    .cloned()
                    .collect()
            });
            tables.push(TableRule {
                categories,
                ..rule.clone()
            });
            continue;
        }
        left_out.push(rule.table.clone());
        if parents_in_scope.contains(rule.table.as_str()) {
            lookup_only.insert(rule.table.clone());
            tables.push(TableRule {
                table: rule.table.clone(),
                action: Action::Keep,
                parent: None,
                match_columns: rule.match_columns.clone(),
                anonymize: BTreeMap::new(),
                export: Vec::new(),
                rectify: BTreeMap::new(),
                restrict_column: None,
                suppress_column: None,
                retain: None,
                categories: rule.categories.clone(),
            });
        }
    }
    Ok(Some(Narrowed {
        config: SqlConnectorConfig {
            tables,
            ..config.clone()
        },
        lookup_only,
        left_out,
        requested: requested.to_vec(),
    }))
}

/// A foreign key's `ON DELETE` action that changes the child's rows, with its tables as the
/// catalog names them ([`super::cascades::ForeignKeys::delete_actions`]). A table's key on
/// itself is included; the conflicts ignore it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeleteAction {
    pub(crate) child: String,
    pub(crate) parent: String,
    /// `CASCADE`, `SET NULL` or `SET DEFAULT`.
    pub(crate) action: String,
}

/// A foreign key whose `ON UPDATE` action changes its child's rows when a column it
/// references changes, with its tables as the catalog names them and its columns in key
/// order (`child_columns[i]` references `parent_columns[i]`)
/// ([`super::cascades::ForeignKeys::update_actions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpdateAction {
    pub(crate) child: String,
    pub(crate) child_columns: Vec<String>,
    pub(crate) parent: String,
    pub(crate) parent_columns: Vec<String>,
    /// `CASCADE`, `SET NULL` or `SET DEFAULT`.
    pub(crate) action: String,
}

/// The columns of in-scope tables a scoped request of `kind` may write, per table (as the
/// rules name them): an erasure's anonymized columns (of an `anonymize` table, and those a
/// `delete` table's kept rows are stripped of), a rectification's `rectify` columns of the
/// `corrected` fields, a restriction's or objection's flag column. Rows an erasure deletes
/// are [`erasure_conflicts`]' matter; an export writes nothing.
pub(crate) fn written_columns(
    narrowed: &Narrowed,
    kind: RequestKind,
    corrected: &[&str],
) -> BTreeMap<String, BTreeSet<String>> {
    let config = &narrowed.config;
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in (config.tables.iter()).filter(|t| !narrowed.lookup_only.contains(&t.table)) {
        let columns: Vec<&str> = match kind {
            RequestKind::Erasure => match rule.action {
                Action::Anonymize => rule.anonymize.keys().map(String::as_str).collect(),
                Action::Delete
                    if rule.retain.is_some() || !config.retained_children(rule).is_empty() =>
                {
                    (anonymize_written(rule).into_iter())
                        .map(|(c, _)| c)
                        .collect()
                }
                Action::Delete | Action::Keep => Vec::new(),
            },
            RequestKind::Rectification => (corrected.iter())
                .filter_map(|f| rule.rectify.get(*f).map(String::as_str))
                .collect(),
            RequestKind::Restriction => rule.restrict_column.iter().map(String::as_str).collect(),
            RequestKind::Objection => rule.suppress_column.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        if !columns.is_empty() {
            (out.entry(rule.table.clone()).or_default())
                .extend(columns.into_iter().map(str::to_string));
        }
    }
    out
}

/// Why a scoped request writing `written` (per in-scope table, its columns) must not run,
/// when it must not: a written column that a foreign key of an out-of-scope table references
/// with an `ON UPDATE` action (followed through the columns that action changes, also in
/// tables the rules do not name), which would change that table's rows. `what` names the
/// request ("a rectification"), `noun` its kind ("rectification").
pub(crate) fn update_conflicts(
    backend: Backend,
    narrowed: &Narrowed,
    written: &BTreeMap<String, BTreeSet<String>>,
    actions: &[UpdateAction],
    (what, noun): (&str, &str),
) -> Option<String> {
    refusal(
        narrowed,
        what,
        noun,
        update_conflict_list(backend, narrowed, written, actions),
    )
}

fn update_conflict_list(
    backend: Backend,
    narrowed: &Narrowed,
    written: &BTreeMap<String, BTreeSet<String>>,
    actions: &[UpdateAction],
) -> Vec<String> {
    let name = |t: &str| lookup_name(backend, t);
    let out_of_scope: BTreeMap<String, &str> = (narrowed.left_out.iter())
        .map(|t| (name(t), t.as_str()))
        .collect();
    let mut conflicts = Vec::new();
    for (table, columns) in written {
        for column in columns {
            // Every (table, column) the write changes through the database's own actions.
            let start = (name(table), name(column));
            let mut seen = BTreeSet::from([start.clone()]);
            let mut queue = VecDeque::from([start]);
            let mut reached = Vec::new();
            while let Some((from, changed)) = queue.pop_front() {
                let fired = actions.iter().filter(|a| {
                    name(&a.parent) == from && a.parent_columns.iter().any(|c| name(c) == changed)
                });
                for a in fired {
                    let child = name(&a.child);
                    if let Some(t) = out_of_scope.get(&child) {
                        let what = format!(
                            "{t} ({}, ON UPDATE {})",
                            a.child_columns.join(", "),
                            a.action
                        );
                        if !reached.contains(&what) {
                            reached.push(what);
                        }
                    }
                    for c in &a.child_columns {
                        if seen.insert((child.clone(), name(c))) {
                            queue.push_back((child.clone(), name(c)));
                        }
                    }
                }
            }
            if !reached.is_empty() {
                reached.sort();
                conflicts.push(format!(
                    "writing {column} of {table} would change through the database's foreign \
                     keys the rows of {}",
                    reached.join(", ")
                ));
            }
        }
    }
    conflicts
}

/// The refusal of a scoped request of `what` ("an erasure") for `conflicts`, when there
/// are any.
fn refusal(narrowed: &Narrowed, what: &str, noun: &str, conflicts: Vec<String>) -> Option<String> {
    (!conflicts.is_empty()).then(|| {
        format!(
            "{what} of the categories {} is not carried out here, as it would change data \
             of other categories: {}; ask for {what} of those categories too (or of all), \
             or give the tables categories that the {noun} may take together",
            narrowed.requested.join(", "),
            conflicts.join("; ")
        )
    })
}

/// Why a scoped erasure must not run, when it must not: a table it deletes from whose rows
/// rows of an out-of-scope table hang off, by the rules' `parent` link (the delete would
/// leave them referring to nothing, or fail on a foreign key) or by a foreign key whose
/// `ON DELETE` action (followed through cascades, also through unconfigured tables) would
/// delete or change them; and a column it anonymizes that an out-of-scope table's foreign
/// key references with an `ON UPDATE` action ([`update_conflicts`]). Named per table, so
/// that the operator can see what to change.
pub(crate) fn erasure_conflicts(
    backend: Backend,
    config: &SqlConnectorConfig,
    narrowed: &Narrowed,
    actions: &[DeleteAction],
    updates: &[UpdateAction],
) -> Option<String> {
    let mut conflicts = delete_conflict_list(backend, config, narrowed, actions);
    let written = written_columns(narrowed, RequestKind::Erasure, &[]);
    conflicts.extend(update_conflict_list(backend, narrowed, &written, updates));
    refusal(narrowed, "an erasure", "erasure", conflicts)
}

fn delete_conflict_list(
    backend: Backend,
    config: &SqlConnectorConfig,
    narrowed: &Narrowed,
    actions: &[DeleteAction],
) -> Vec<String> {
    let name = |t: &str| lookup_name(backend, t);
    let out_of_scope: BTreeMap<String, &str> = (narrowed.left_out.iter())
        .map(|t| (name(t), t.as_str()))
        .collect();
    let deleting: Vec<&TableRule> = (narrowed.config.tables.iter())
        .filter(|t| t.action == Action::Delete && !narrowed.lookup_only.contains(&t.table))
        .collect();
    let mut conflicts = Vec::new();
    for rule in &deleting {
        let children: Vec<&str> = (config.tables.iter())
            .filter(|c| c.parent.as_ref().is_some_and(|p| p.table == rule.table))
            .filter(|c| out_of_scope.contains_key(&name(&c.table)))
            .map(|c| c.table.as_str())
            .collect();
        if !children.is_empty() {
            conflicts.push(format!(
                "deleting from {} would leave the rows of {} (their parent link) without \
                 their parent",
                rule.table,
                children.join(", ")
            ));
        }
        // Every table a delete from `rule` changes through the database's own actions.
        let mut seen = BTreeSet::from([name(&rule.table)]);
        let mut queue = VecDeque::from([name(&rule.table)]);
        let mut reached = Vec::new();
        while let Some(from) = queue.pop_front() {
            for a in actions.iter().filter(|a| name(&a.parent) == from) {
                let child = name(&a.child);
                if child == from {
                    continue;
                }
                if let Some(table) = out_of_scope.get(&child) {
                    let what = format!("{table} (ON DELETE {})", a.action);
                    if !reached.contains(&what) {
                        reached.push(what);
                    }
                }
                // Only a deletion goes on to the child's own children.
                if a.action == "CASCADE" && seen.insert(child.clone()) {
                    queue.push_back(child);
                }
            }
        }
        if !reached.is_empty() {
            reached.sort();
            conflicts.push(format!(
                "deleting from {} would change through the database's foreign keys the rows \
                 of {}",
                rule.table,
                reached.join(", ")
            ));
        }
    }
    conflicts
}
