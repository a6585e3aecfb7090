//! The holder database's `ON DELETE CASCADE` foreign keys, read from its catalog in one
//! query ([`read`]): by each step of a contract end's erasure after a return, for the keys
//! of the rows they take, and when the connector connects, to refuse one that would delete
//! rows the rules keep ([`problems`]).
//!
//! A cascade deletes the rows whose foreign key refers to a deleted row whatever the rules
//! say of them: from a table an erasure deletes from, onto rows it leaves in place (a `keep`
//! table, an `anonymize` one, any table with `retain`), it would take rows that an
//! obligation keeps, while the report counts them kept. The rules hold a parent row back
//! only for their own child rows (the parent's rule children, on the link's columns): a
//! child kept under `retain` keeps its parent row, and an anonymized child that clears its
//! link runs before the parent's DELETE (children first), so that it no longer refers to it.
//! Anything else, and every cascade a cascade sets off, is refused.

use std::collections::{BTreeSet, VecDeque};

use dsrelay_runtime::store::{Backend, Db};

use super::plan::Cascade;
use super::rules::{Action, SqlConnectorConfig, TableRule};
use super::schema::lookup_name;

/// Every foreign key of the database whose `ON DELETE CASCADE` deletes rows of its child
/// table with a row of its parent, the tables named as the catalog names them. On
/// PostgreSQL a table the statements find by its name (the first of the name on the search
/// path) is named so, any other by its schema too (`"audit".log`), so that no rule's plain
/// name reads as it; on SQLite, every table of the main database. A table's key on itself is
/// included. A key whose columns cannot all be paired with its parent's is left out.
pub(super) async fn read(db: &Db) -> Result<Vec<Cascade>, sqlx::Error> {
    let sql = match db.backend {
        // A key naming no columns refers to the parent's primary key ("to" is NULL).
        Backend::Sqlite => {
            "SELECT m.name, CAST(f.id AS TEXT), f.\"table\", f.\"from\", \
             COALESCE(f.\"to\", (SELECT p.name FROM pragma_table_info(f.\"table\") p \
             WHERE p.pk = f.seq + 1)) \
             FROM sqlite_master m JOIN pragma_foreign_key_list(m.name) f \
             WHERE m.type = 'table' AND upper(f.on_delete) = 'CASCADE' \
             ORDER BY m.name, f.id, f.seq"
        }
        Backend::Postgres => {
            "SELECT CASE WHEN to_regclass(quote_ident(cc.relname)) = cc.oid \
             THEN CAST(cc.relname AS TEXT) \
             ELSE quote_ident(cn.nspname) || '.' || quote_ident(cc.relname) END, \
             CAST(c.oid AS TEXT), \
             CASE WHEN to_regclass(quote_ident(pc.relname)) = pc.oid \
             THEN CAST(pc.relname AS TEXT) \
             ELSE quote_ident(pn.nspname) || '.' || quote_ident(pc.relname) END, \
             CAST(a.attname AS TEXT), CAST(pa.attname AS TEXT) \
             FROM pg_catalog.pg_constraint c \
             CROSS JOIN LATERAL unnest(c.conkey, c.confkey) WITH ORDINALITY \
             AS k(child_no, parent_no, ord) \
             JOIN pg_catalog.pg_class cc ON cc.oid = c.conrelid \
             JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace \
             JOIN pg_catalog.pg_class pc ON pc.oid = c.confrelid \
             JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid \
             AND a.attnum = k.child_no \
             JOIN pg_catalog.pg_attribute pa ON pa.attrelid = c.confrelid \
             AND pa.attnum = k.parent_no \
             WHERE c.contype = 'f' AND c.confdeltype = 'c' \
             ORDER BY c.oid, k.ord"
        }
    };
    type Link = (String, String, String, String, Option<String>);
    let links: Vec<Link> = sqlx::query_as(sql).fetch_all(&db.pool).await?;
    let mut cascades: Vec<Cascade> = Vec::new();
    let mut paired = Vec::new();
    let mut last = None;
    for (child, id, parent, column, parent_column) in links {
        // SQLite numbers the keys per table.
        let this = (child.clone(), id);
        if last.as_ref() != Some(&this) {
            last = Some(this);
            cascades.push(Cascade {
                child,
                columns: Vec::new(),
                parent,
                parent_columns: Vec::new(),
            });
            paired.push(true);
        }
        if let (Some(c), Some(ok)) = (cascades.last_mut(), paired.last_mut()) {
            c.columns.push(column);
            match parent_column {
                Some(p) => c.parent_columns.push(p),
                None => *ok = false,
            }
        }
    }
    Ok((cascades.into_iter().zip(paired))
        .filter(|(c, ok)| *ok && !c.columns.is_empty())
        .map(|(c, _)| c)
        .collect())
}

/// Of `cascades` ([`read`]), those between two tables `config` lists (not a table's key on
/// itself), the tables named as the rules spell them.
pub(super) fn between_configured(
    backend: Backend,
    config: &SqlConnectorConfig,
    cascades: Vec<Cascade>,
) -> Vec<Cascade> {
    let rule = |name: &str| rule_of(backend, config, name).map(|r| r.table.clone());
    (cascades.into_iter())
        .filter_map(|c| {
            let (child, parent) = (rule(&c.child)?, rule(&c.parent)?);
            (child != parent).then_some(Cascade { child, parent, ..c })
        })
        .collect()
}

/// The rule of the table `name` (as the catalog spells it) as the statements find it.
fn rule_of<'c>(
    backend: Backend,
    config: &'c SqlConnectorConfig,
    name: &str,
) -> Option<&'c TableRule> {
    let name = lookup_name(backend, name);
    (config.tables.iter()).find(|t| lookup_name(backend, &t.table) == name)
}

/// Why the rows of `rule`'s table stay after an erasure, when they do: `keep`, `anonymize`,
/// or rows kept under `retain` (a delete table's too: its rows within the period stay).
fn kept_why(rule: &TableRule) -> Option<&'static str> {
    match (rule.action, &rule.retain) {
        (Action::Keep, _) => Some("action keep"),
        (Action::Anonymize, _) => Some("action anonymize"),
        (Action::Delete, Some(_)) => Some("retain"),
        (Action::Delete, None) => None,
    }
}

/// Whether the rules see to it that `cascade`, from `source`'s table, takes no row its child
/// keeps when `source`'s own DELETE runs: the child is `source`'s rule child on exactly the
/// cascade's columns, `source` a top-level table (so the child runs first), and each child
/// row the erasure leaves either keeps its parent row (kept under `retain`,
/// [`SqlConnectorConfig::retained_children`]) or no longer refers to it (an anonymized row
/// whose link is cleared). A row the cascade deletes is no row the rules' statements held
/// back: this is so only for the first cascade of a chain.
fn held_by_the_rules(
    backend: Backend,
    config: &SqlConnectorConfig,
    source: &TableRule,
    cascade: &Cascade,
) -> bool {
    let Some(child) = rule_of(backend, config, &cascade.child) else {
        return false;
    };
    let Some(link) = &child.parent else {
        return false;
    };
    let same = |a: &str, b: &str| lookup_name(backend, a) == lookup_name(backend, b);
    let on_link = source.parent.is_none()
        && same(&link.table, &source.table)
        && matches!(&cascade.columns[..], [c] if same(c, &link.column))
        && matches!(&cascade.parent_columns[..], [p] if same(p, &link.parent_column));
    on_link
        && match child.action {
            Action::Keep => false,
            Action::Delete => child.retain.is_some(),
            Action::Anonymize => child.anonymize.keys().any(|c| same(c, &link.column)),
        }
}

/// The cascades of `cascades` ([`read`]) by which deleting a row of a table the rules delete
/// from (action delete, with or without `retain`) deletes rows of a configured table whose
/// rows an erasure leaves in place ([`kept_why`]), directly or through a chain through any
/// tables, listed or not; one problem per deleting and kept table, naming the foreign keys
/// and what to do. A table's cascade onto itself counts only where the table keeps rows
/// (delete with `retain`): the rows it deletes take its kept rows with them.
pub(super) fn problems(
    backend: Backend,
    config: &SqlConnectorConfig,
    cascades: &[Cascade],
) -> Vec<String> {
    let key = |name: &str| lookup_name(backend, name);
    let mut out = Vec::new();
    for (i, source) in config.tables.iter().enumerate() {
        if source.action != Action::Delete {
            continue;
        }
        let mut reported = BTreeSet::new();
        let mut expanded = BTreeSet::from([key(&source.table)]);
        // Breadth first, so that each kept table is named with its shortest chain.
        let mut open: VecDeque<Vec<&Cascade>> = VecDeque::from([Vec::new()]);
        while let Some(path) = open.pop_front() {
            let from = key(path.last().map_or(&source.table, |c| &c.child));
            for c in cascades.iter().filter(|c| key(&c.parent) == from) {
                if path.is_empty() && held_by_the_rules(backend, config, source, c) {
                    continue;
                }
                let mut longer = path.clone();
                longer.push(c);
                let kept = rule_of(backend, config, &c.child)
                    .and_then(|r| Some((r, kept_why(r)?)))
                    .filter(|(r, _)| reported.insert(key(&r.table)));
                if let Some((rule, why)) = kept {
                    let at = format!("tables[{i}] ({})", source.table);
                    out.push(describe(&at, source, rule, why, &longer));
                }
                if expanded.insert(key(&c.child)) {
                    open.push_back(longer);
                }
            }
        }
    }
    out
}

/// The problem of `path`, a chain of cascades from `source`'s table onto `kept`'s.
fn describe(
    at: &str,
    source: &TableRule,
    kept: &TableRule,
    why: &str,
    path: &[&Cascade],
) -> String {
    let names = |v: &[String]| v.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>();
    let keys: Vec<String> = (path.iter())
        .map(|c| {
            format!(
                "{:?} ({}) REFERENCES {:?} ({}) ON DELETE CASCADE",
                c.child,
                names(&c.columns).join(", "),
                c.parent,
                names(&c.parent_columns).join(", ")
            )
        })
        .collect();
    let (s, k) = (&source.table, &kept.table);
    let mut fix = Vec::new();
    match path {
        [c] if c.columns.len() == 1
            && source.parent.is_none()
            && kept.action != Action::Keep
            && kept.table != source.table =>
        {
            let parent = format!(
                "parent = {{ table = {s:?}, column = {:?}, parent_column = {:?} }}",
                c.columns[0], c.parent_columns[0]
            );
            fix.push(match kept.retain {
                None => format!(
                    "make {k:?} a child of {s:?} in the rules ({parent}) whose anonymize \
                     clears {:?}, so that its rows no longer refer to the deleted ones",
                    c.columns[0]
                ),
                Some(_) => format!(
                    "make {k:?} a child of {s:?} in the rules ({parent}) with retain, so \
                     that its kept rows keep their parent row"
                ),
            });
        }
        _ => {}
    }
    let which = match path.len() {
        1 => "the foreign key",
        _ => "one of these foreign keys",
    };
    fix.push(format!(
        "change {which} to ON DELETE RESTRICT, NO ACTION or SET NULL"
    ));
    format!(
        "{at}: deleting a row of {s:?} also deletes the rows of {k:?} that depend on it \
         through {}, though an erasure leaves them in place ({why}); {}",
        keys.join(", then "),
        fix.join(", or ")
    )
}
