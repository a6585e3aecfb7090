//! The holder database's foreign keys, read from its catalog in one query
//! ([`ForeignKeys::read`]) by each caller when it needs them: a scoped request, for the keys
//! whose `ON DELETE` or `ON UPDATE` action would change an out-of-scope table's rows
//! ([`super::categories`]); each step of a contract end's erasure after a return, for the
//! keys of the rows its `ON DELETE CASCADE` keys take; and the connector when it connects,
//! to refuse such a cascade that would delete rows the rules keep ([`problems`]).
//!
//! A cascade deletes the rows whose foreign key refers to a deleted row whatever the rules
//! say of them: from a table an erasure deletes from, onto rows it leaves in place (a `keep`
//! table, an `anonymize` one, any table with `retain`, a delete table whose retained children
//! keep its rows), it would take rows that an obligation keeps, while the report counts them
//! kept. The rules hold a parent row back
//! only for their own child rows (the parent's rule children, on the link's columns): a
//! child kept under `retain` keeps its parent row, and an anonymized child that clears its
//! link runs before the parent's DELETE (children first), so that it no longer refers to it.
//! Anything else, and every cascade a cascade sets off, is refused: a chain that comes back to
//! the deleting table deletes rows of it that no rule's statement selected, whose children
//! the rules did not see to.

use std::collections::{BTreeSet, VecDeque};

use dsrelay_runtime::store::{Backend, Db};

use super::categories::{DeleteAction, UpdateAction};
use super::plan::Cascade;
use super::rules::{Action, AnonymizeWith, ParentLink, SqlConnectorConfig, TableRule};
use super::schema::lookup_name;

/// A foreign key's action that changes its child's rows when the referenced row is deleted
/// or its referenced columns change ([`ForeignKeys::delete_actions`],
/// [`ForeignKeys::update_actions`]); the others (`NO ACTION`, `RESTRICT`) refuse instead.
const CHANGING: [&str; 3] = ["CASCADE", "SET NULL", "SET DEFAULT"];

/// One foreign key of the database as its catalog describes it ([`ForeignKeys::read`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ForeignKey {
    child: String,
    parent: String,
    /// The child's columns in key order.
    columns: Vec<String>,
    /// The parent's column each of `columns` references; `None` where a SQLite key naming
    /// no parent column has no declared primary-key column at that position (a key to the
    /// parent's rowid, or to a primary key of fewer columns).
    parent_columns: Vec<Option<String>>,
    /// Its `ON DELETE` and `ON UPDATE` actions, in capitals (`CASCADE`, `SET NULL`, `SET
    /// DEFAULT`, `RESTRICT`, `NO ACTION`).
    on_delete: String,
    on_update: String,
}

/// Every foreign key of the database, read from its catalog in one query, from which the
/// erasure's cascades and a scoped request's conflicts are each taken.
#[derive(Debug, Clone)]
pub(crate) struct ForeignKeys(Vec<ForeignKey>);

impl ForeignKeys {
    /// Every foreign key of `db`, the tables named as the catalog names them. On PostgreSQL
    /// a table the statements find by its name (the first of the name on the search path)
    /// is named so, any other by its schema too (`audit.log`), so that no rule's plain name
    /// reads as it; a partitioned table's key is read once, on it, as the rules name it. On
    /// SQLite, every table of the main database, and a key naming no parent column refers
    /// to the parent's primary key, whose columns are read in its order. A table's key on
    /// itself is included. In the order of the catalog's key ids (on SQLite, per child table
    /// by name).
    pub(crate) async fn read(db: &Db) -> Result<Self, sqlx::Error> {
        let sql = match db.backend {
            // A key naming no columns refers to the parent's primary key ("to" is NULL).
            Backend::Sqlite => {
                "SELECT m.name, CAST(f.id AS BIGINT), f.\"table\", f.\"from\", \
                 COALESCE(f.\"to\", (SELECT p.name FROM pragma_table_info(f.\"table\") p \
                 WHERE p.pk = f.seq + 1)), upper(f.on_delete), upper(f.on_update) \
                 FROM sqlite_master m JOIN pragma_foreign_key_list(m.name) f \
                 WHERE m.type = 'table' \
                 ORDER BY m.name, f.id, f.seq"
            }
            // PostgreSQL copies a partitioned table's key onto each partition, and a key
            // referring to a partitioned table into one referring to each partition
            // (`conparentid`, the key copied): the copies name partitions, which no rule
            // names, for rows the key covers.
            Backend::Postgres => {
                "SELECT CASE WHEN to_regclass(quote_ident(cc.relname)) = cc.oid \
                 THEN CAST(cc.relname AS TEXT) \
                 ELSE quote_ident(cn.nspname) || '.' || quote_ident(cc.relname) END, \
                 CAST(c.oid AS BIGINT), \
                 CASE WHEN to_regclass(quote_ident(pc.relname)) = pc.oid \
                 THEN CAST(pc.relname AS TEXT) \
                 ELSE quote_ident(pn.nspname) || '.' || quote_ident(pc.relname) END, \
                 CAST(a.attname AS TEXT), CAST(pa.attname AS TEXT), \
                 CASE c.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' \
                 WHEN 'd' THEN 'SET DEFAULT' WHEN 'r' THEN 'RESTRICT' ELSE 'NO ACTION' END, \
                 CASE c.confupdtype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' \
                 WHEN 'd' THEN 'SET DEFAULT' WHEN 'r' THEN 'RESTRICT' ELSE 'NO ACTION' END \
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
                 WHERE c.contype = 'f' AND c.conparentid = 0 \
                 ORDER BY c.oid, k.ord"
            }
        };
        type Link = (String, i64, String, String, Option<String>, String, String);
        let links: Vec<Link> = sqlx::query_as(sql).fetch_all(&db.pool).await?;
        let mut keys: Vec<((String, i64), ForeignKey)> = Vec::new();
        for (child, id, parent, column, parent_column, on_delete, on_update) in links {
            // SQLite numbers the keys per table.
            let this = (child.clone(), id);
            match keys.last_mut() {
                Some((k, key)) if *k == this => {
                    key.columns.push(column);
                    key.parent_columns.push(parent_column);
                }
                _ => keys.push((
                    this,
                    ForeignKey {
                        child,
                        parent,
                        columns: vec![column],
                        parent_columns: vec![parent_column],
                        on_delete,
                        on_update,
                    },
                )),
            }
        }
        Ok(Self(keys.into_iter().map(|(_, key)| key).collect()))
    }

    /// The keys whose `ON DELETE CASCADE` deletes rows of their child table with a row of
    /// their parent. A key whose columns cannot all be paired with its parent's is left
    /// out: it is not a cascade of known columns.
    pub(crate) fn cascading_deletes(&self) -> Vec<Cascade> {
        (self.0.iter())
            .filter(|k| k.on_delete == "CASCADE")
            .filter_map(|k| {
                Some(Cascade {
                    child: k.child.clone(),
                    columns: k.columns.clone(),
                    parent: k.parent.clone(),
                    parent_columns: k.parent_columns.iter().cloned().collect::<Option<_>>()?,
                })
            })
            .collect()
    }

    /// The keys whose `ON DELETE` action changes their child's rows ([`CHANGING`]), one per
    /// child table, parent table and action, in that order.
    pub(crate) fn delete_actions(&self) -> Vec<DeleteAction> {
        let mut out: Vec<DeleteAction> = (self.0.iter())
            .filter(|k| CHANGING.contains(&k.on_delete.as_str()))
            .map(|k| DeleteAction {
                child: k.child.clone(),
                parent: k.parent.clone(),
                action: k.on_delete.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.child, &a.parent, &a.action).cmp(&(&b.child, &b.parent, &b.action)));
        out.dedup();
        out
    }

    /// The keys whose `ON UPDATE` action changes their child's rows ([`CHANGING`]), by child
    /// table, with the columns whose parent column is known: one referencing a table without
    /// a declared primary key (its rowid, which no statement writes) is left out.
    pub(crate) fn update_actions(&self) -> Vec<UpdateAction> {
        let mut out: Vec<UpdateAction> = (self.0.iter())
            .filter(|k| CHANGING.contains(&k.on_update.as_str()))
            .filter_map(|k| {
                let (child_columns, parent_columns): (Vec<String>, Vec<String>) =
                    (k.columns.iter().zip(&k.parent_columns))
                        .filter_map(|(c, p)| Some((c.clone(), p.clone()?)))
                        .unzip();
                (!child_columns.is_empty()).then(|| UpdateAction {
                    child: k.child.clone(),
                    child_columns,
                    parent: k.parent.clone(),
                    parent_columns,
                    action: k.on_update.clone(),
                })
            })
            .collect();
        // Stable: a table's keys stay in the catalog's order.
        out.sort_by(|a, b| a.child.cmp(&b.child));
        out
    }
}

/// Every foreign key of `db` whose `ON DELETE CASCADE` deletes rows of its child table with
/// a row of its parent ([`ForeignKeys::read`], [`ForeignKeys::cascading_deletes`]).
pub(super) async fn read(db: &Db) -> Result<Vec<Cascade>, sqlx::Error> {
    Ok(ForeignKeys::read(db).await?.cascading_deletes())
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
/// rows kept under `retain` (a delete table's too: its rows within the period stay), or a
/// delete table's rows that its retained children keep
/// ([`SqlConnectorConfig::retained_children`]).
fn kept_why(config: &SqlConnectorConfig, rule: &TableRule) -> Option<String> {
    match (rule.action, &rule.retain) {
        (Action::Keep, _) => Some("action keep".to_string()),
        (Action::Anonymize, _) => Some("action anonymize".to_string()),
        (Action::Delete, Some(_)) => Some("retain".to_string()),
        (Action::Delete, None) => {
            let children: Vec<String> = (config.retained_children(rule).iter())
                .map(|(child, _)| format!("{:?}", child.table))
                .collect();
            (!children.is_empty())
                .then(|| format!("kept for its retained children ({})", children.join(", ")))
        }
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

/// A chain of cascades from a table the rules delete from onto a table whose rows an
/// erasure leaves in place.
struct Finding<'c> {
    /// The deleting table's index in the rules.
    at: usize,
    source: &'c TableRule,
    kept: &'c TableRule,
    /// Why its rows stay ([`kept_why`]).
    why: String,
    path: Vec<&'c Cascade>,
}

/// The cascades of `cascades` ([`read`]) by which deleting a row of a table the rules delete
/// from (action delete, with or without `retain`) deletes rows of a configured table whose
/// rows an erasure leaves in place ([`kept_why`]), directly or through a chain through any
/// tables, listed or not, the deleting table itself too; one per deleting and kept table,
/// with its shortest chain. A table's cascade onto itself counts only where the table keeps
/// rows: the rows it deletes take its kept rows with them.
fn findings<'c>(
    backend: Backend,
    config: &'c SqlConnectorConfig,
    cascades: &'c [Cascade],
) -> Vec<Finding<'c>> {
    let key = |name: &str| lookup_name(backend, name);
    let mut out = Vec::new();
    for (at, source) in config.tables.iter().enumerate() {
        if source.action != Action::Delete {
            continue;
        }
        let mut reported = BTreeSet::new();
        // Without the source table: its rows a chain comes back to are rows its statements
        // did not select, so their cascades are followed again, none held by the rules.
        let mut expanded = BTreeSet::new();
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
                    .and_then(|r| Some((r, kept_why(config, r)?)))
                    .filter(|(r, _)| reported.insert(key(&r.table)));
                if let Some((kept, why)) = kept {
                    let path = longer.clone();
                    out.push(Finding {
                        at,
                        source,
                        kept,
                        why,
                        path,
                    });
                }
                if expanded.insert(key(&c.child)) {
                    open.push_back(longer);
                }
            }
        }
    }
    out
}

/// Per [`findings`], the problem, naming the tables, the foreign keys and what to do.
pub(super) fn problems(
    backend: Backend,
    config: &SqlConnectorConfig,
    cascades: &[Cascade],
) -> Vec<String> {
    let found = findings(backend, config, cascades);
    (found.iter())
        .map(|f| describe(f, child_advice(backend, config, cascades, &found, f)))
        .collect()
}

/// For a one-column cascade straight from the deleting table, the rule child
/// the kept table could become so that the rules see to the cascade ([`held_by_the_rules`]):
/// kept under its `retain`, or anonymized clearing the link. Only advice that validation
/// and this check then accept: the rules so changed must validate as they do now, and refuse
/// no cascade they do not refuse now (making a table a retained child keeps its parent's
/// rows, onto which another cascade may come). Whether the link column takes NULL is not
/// known here: the connect-time column check says so where it does not. `None` for a `keep`
/// table, one that is already a child or a parent, or a chain.
fn child_advice(
    backend: Backend,
    config: &SqlConnectorConfig,
    cascades: &[Cascade],
    found: &[Finding<'_>],
    f: &Finding<'_>,
) -> Option<String> {
    let key = |name: &str| lookup_name(backend, name);
    let ([c], source, kept) = (&f.path[..], f.source, f.kept) else {
        return None;
    };
    let ([column], [parent_column]) = (&c.columns[..], &c.parent_columns[..]) else {
        return None;
    };
    if kept.action == Action::Keep
        || kept.parent.is_some()
        || source.parent.is_some()
        || key(&kept.table) == key(&source.table)
    {
        return None;
    }
    let mut changed = config.clone();
    let rule = (changed.tables.iter_mut()).find(|t| key(&t.table) == key(&kept.table))?;
    rule.parent = Some(ParentLink {
        table: source.table.clone(),
        column: column.clone(),
        parent_column: parent_column.clone(),
        export_matched_only: false,
    });
    let anonymized = rule.action == Action::Anonymize;
    if anonymized {
        rule.anonymize.insert(column.clone(), AnonymizeWith::Null);
    }
    let valid = config.validate();
    if changed.validate().iter().any(|p| !valid.contains(p)) {
        return None;
    }
    let pair = |f: &Finding<'_>| (key(&f.source.table), key(&f.kept.table));
    let now: BTreeSet<_> = found.iter().map(pair).collect();
    let after = findings(backend, &changed, cascades);
    if after
        .iter()
        .any(|a| pair(a) == pair(f) || !now.contains(&pair(a)))
    {
        return None;
    }
    let (s, k) = (&source.table, &kept.table);
    let parent = format!(
        "parent = {{ table = {s:?}, column = {column:?}, parent_column = {parent_column:?} }}"
    );
    Some(match anonymized {
        true => format!(
            "make {k:?} a child of {s:?} in the rules ({parent}) whose anonymize clears \
             {column:?} ({column} = \"null\"), so that its rows no longer refer to the deleted \
             ones"
        ),
        false => format!(
            "make {k:?} a child of {s:?} in the rules ({parent}) with retain, so that its \
             kept rows keep their parent row"
        ),
    })
}

/// The problem of `f`, with the advice of [`child_advice`] when there is one.
fn describe(f: &Finding<'_>, child: Option<String>) -> String {
    let names = |v: &[String]| v.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>();
    let keys: Vec<String> = (f.path.iter())
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
    let (s, k) = (&f.source.table, &f.kept.table);
    let which = match f.path.len() {
        1 => "the foreign key",
        _ => "one of these foreign keys",
    };
    let fix: Vec<String> = (child.into_iter())
        .chain([format!(
            "change {which} to ON DELETE RESTRICT, NO ACTION or SET NULL"
        )])
        .collect();
    format!(
        "tables[{}] ({s}): deleting a row of {s:?} also deletes the rows of {k:?} that depend \
         on it through {}, though an erasure leaves them in place ({}); {}",
        f.at,
        keys.join(", then "),
        f.why,
        fix.join(", or ")
    )
}

#[cfg(test)]
mod foreign_key_tests {
    //! The three views of one catalog read, on a schema with a key of each kind.

    use dsrelay_runtime::store::{Backend, Db};

    use super::super::categories::{DeleteAction, UpdateAction};
    use super::super::plan::Cascade;
    use super::super::tests::{exec, fresh_postgres_database, on_both_backends};
    use super::ForeignKeys;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// Each key's actions and columns reach the view they belong to: a key naming no parent
    /// column resolves to the parent's primary key in its order (a composite one too), a
    /// table's key on itself is kept, and on SQLite a key to a table without a declared
    /// primary key is a delete action only (neither a cascade of known columns nor an update
    /// action).
    async fn one_read_gives_each_view_its_keys(url: String) {
        let db = Db::connect(&url).await.unwrap();
        for sql in [
            "CREATE TABLE p (id BIGINT PRIMARY KEY, code TEXT UNIQUE)",
            "CREATE TABLE pair (a BIGINT, b BIGINT, PRIMARY KEY (a, b))",
            "CREATE TABLE c1 (id BIGINT PRIMARY KEY, \
             p_id BIGINT REFERENCES p (id) ON DELETE CASCADE ON UPDATE SET NULL)",
            "CREATE TABLE c2 (id BIGINT PRIMARY KEY, \
             p_code TEXT REFERENCES p (code) ON DELETE SET NULL ON UPDATE CASCADE, \
             p_id BIGINT REFERENCES p ON DELETE RESTRICT)",
            "CREATE TABLE c3 (id BIGINT PRIMARY KEY, x BIGINT, y BIGINT, \
             FOREIGN KEY (y, x) REFERENCES pair ON DELETE SET DEFAULT ON UPDATE CASCADE)",
            "CREATE TABLE tree (id BIGINT PRIMARY KEY, \
             up BIGINT REFERENCES tree (id) ON DELETE CASCADE)",
        ] {
            exec(&db, sql).await;
        }
        let sqlite = db.backend == Backend::Sqlite;
        if sqlite {
            exec(&db, "CREATE TABLE loose (code TEXT)").await;
            exec(
                &db,
                "CREATE TABLE c4 (id BIGINT PRIMARY KEY, \
                 code TEXT REFERENCES loose ON DELETE CASCADE ON UPDATE CASCADE)",
            )
            .await;
        }
        let keys = ForeignKeys::read(&db).await.unwrap();

        let mut cascades = keys.cascading_deletes();
        cascades.sort_by(|a, b| a.child.cmp(&b.child));
        let cascade = |child: &str, columns, parent: &str, parent_columns| Cascade {
            child: child.to_string(),
            columns: strings(columns),
            parent: parent.to_string(),
            parent_columns: strings(parent_columns),
        };
        assert_eq!(
            cascades,
            [
                cascade("c1", &["p_id"], "p", &["id"]),
                cascade("tree", &["up"], "tree", &["id"]),
            ]
        );

        let delete = |child: &str, parent: &str, action: &str| DeleteAction {
            child: child.to_string(),
            parent: parent.to_string(),
            action: action.to_string(),
        };
        let mut deletes = vec![
            delete("c1", "p", "CASCADE"),
            delete("c2", "p", "SET NULL"),
            delete("c3", "pair", "SET DEFAULT"),
        ];
        if sqlite {
            deletes.push(delete("c4", "loose", "CASCADE"));
        }
        deletes.push(delete("tree", "tree", "CASCADE"));
        assert_eq!(keys.delete_actions(), deletes);

        let update =
            |child: &str, columns, parent: &str, parent_columns, action: &str| UpdateAction {
                child: child.to_string(),
                child_columns: strings(columns),
                parent: parent.to_string(),
                parent_columns: strings(parent_columns),
                action: action.to_string(),
            };
        assert_eq!(
            keys.update_actions(),
            [
                update("c1", &["p_id"], "p", &["id"], "SET NULL"),
                update("c2", &["p_code"], "p", &["code"], "CASCADE"),
                update("c3", &["y", "x"], "pair", &["a", "b"], "CASCADE"),
            ]
        );
    }

    on_both_backends!(one_read_gives_each_view_its_keys);
}
