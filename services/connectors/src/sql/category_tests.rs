//! Tables' data categories: a request scoped to categories acts on, and exports, only the
//! tables holding one of them, reads an out-of-scope parent only to find its children, and
//! refuses an erasure the database's foreign keys would carry into other categories. Each
//! scenario on SQLite and on PostgreSQL.

use std::collections::BTreeMap;

use dsrelay_proto::v1::{RequestKind, RequestParameters};
use dsrelay_runtime::store::Db;

use super::tests::{email, fresh_postgres_database, now, on_both_backends, rows};
use super::*;
use crate::{ExportSink, ExportedFile};

const SUBJECT: &str = "anna@example.fi";

/// Customer 1 is the subject: an invoice, a newsletter row found only through her customer
/// row (its own e-mail is empty), a campaign row, a note. Customer 2 is someone else.
const SCHEMA: [&str; 14] = [
    "CREATE TABLE customers (id BIGINT PRIMARY KEY, email TEXT, name TEXT)",
    "CREATE TABLE invoices (id BIGINT PRIMARY KEY, customer_id BIGINT REFERENCES customers (id), \
     amount BIGINT)",
    "CREATE TABLE newsletter (id BIGINT PRIMARY KEY, \
     customer_id BIGINT REFERENCES customers (id), email TEXT, topic TEXT)",
    "CREATE TABLE campaigns (id BIGINT PRIMARY KEY, email TEXT, campaign TEXT)",
    "CREATE TABLE notes (id BIGINT PRIMARY KEY, email TEXT, body TEXT)",
    "INSERT INTO customers VALUES (1, 'anna@example.fi', 'Anna'), (2, 'bob@example.fi', 'Bob')",
    "INSERT INTO invoices VALUES (10, 1, 1200), (11, 2, 900)",
    "INSERT INTO newsletter VALUES (20, 1, NULL, 'offers'), (21, 2, 'bob@example.fi', 'news')",
    "INSERT INTO campaigns VALUES (30, 'anna@example.fi', 'spring'), \
     (31, 'bob@example.fi', 'spring')",
    "INSERT INTO notes VALUES (40, 'anna@example.fi', 'called'), (41, 'bob@example.fi', 'x')",
    // A table no rule names, to show that nothing else is looked at.
    "CREATE TABLE audit (id BIGINT PRIMARY KEY, what TEXT)",
    "INSERT INTO audit VALUES (1, 'kept')",
    "CREATE TABLE unrelated (id BIGINT PRIMARY KEY)",
    "INSERT INTO unrelated VALUES (1)",
];

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn rule(table: &str, categories: Option<&[&str]>, export: &[&str]) -> TableRule {
    TableRule {
        table: table.into(),
        action: Action::Delete,
        match_columns: BTreeMap::from([("email".to_string(), "email".to_string())]),
        export: strings(export),
        categories: categories.map(strings),
        ..Default::default()
    }
}

fn child_of_customers(mut rule: TableRule) -> TableRule {
    rule.parent = Some(ParentLink {
        table: "customers".into(),
        column: "customer_id".into(),
        parent_column: "id".into(),
        export_matched_only: false,
    });
    rule
}

/// Customers hold contact data, invoices billing, newsletter and campaigns marketing; notes,
/// without categories, hold every category of the subprocessor.
fn rules(url: &str, with_notes: bool) -> SqlConnectorConfig {
    let mut invoices = child_of_customers(rule("invoices", Some(&["billing"]), &["id", "amount"]));
    invoices.match_columns.clear();
    let mut tables = vec![
        rule("customers", Some(&["contact"]), &["email", "name"]),
        invoices,
        child_of_customers(rule("newsletter", Some(&["marketing"]), &["topic"])),
        rule(
            "campaigns",
            Some(&["marketing", "profiling"]),
            &["campaign"],
        ),
    ];
    if with_notes {
        tables.push(rule("notes", None, &["body"]));
    }
    SqlConnectorConfig {
        url: url.into(),
        tables,
        controllers: BTreeMap::new(),
        receipts_table: None,
    }
}

async fn holder(url: &str, extra: &[&str]) -> Db {
    let db = Db::connect(url).await.unwrap();
    for sql in SCHEMA.iter().chain(extra) {
        sqlx::query(sql)
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    db
}

fn task(kind: RequestKind, categories: &[&str], export: Option<ExportSink>) -> Task {
    Task {
        task_id: format!("acme/r-{kind:?}-{}/books", categories.join("-")),
        request_id: "r-1".into(),
        controller: "acme".into(),
        kind,
        identities: vec![email(SUBJECT)],
        categories: strings(categories),
        parameters: RequestParameters::default(),
        due_at_ms: now(),
        now_ms: now(),
        phase: Phase::Start,
        interrupted: false,
        export,
    }
}

/// The ids left in each table, in the order of `tables`.
async fn ids(db: &Db, tables: &[&str]) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    for table in tables {
        let left = rows(db, &format!("SELECT id FROM {table} ORDER BY id")).await;
        out.push(left.iter().map(|r| r[0].as_i64().unwrap()).collect());
    }
    out
}

const ALL: [&str; 6] = [
    "customers",
    "invoices",
    "newsletter",
    "campaigns",
    "notes",
    "audit",
];

on_both_backends!(
    a_scoped_erasure_erases_only_the_tables_of_its_categories,
    an_unscoped_erasure_erases_every_table_as_before,
    an_erasure_that_would_orphan_or_cascade_into_other_categories_is_refused,
    a_scope_no_table_holds_is_refused_and_changes_nothing,
    a_scoped_export_writes_only_its_tables_labelled_with_their_categories,
    tables_with_empty_duplicate_or_unprintable_categories_are_refused_at_connect,
    an_update_a_foreign_key_carries_into_other_categories_is_refused,
    a_scoped_refusal_names_the_tables_left_out_and_fields_mapped_elsewhere,
    scoped_labels_do_not_depend_on_unrelated_tables,
);

/// Marketing: the newsletter row found through her customer row, her campaign and her note
/// (notes hold every category) go; her customer row, the parent that led to the newsletter,
/// and her invoice stay, and the note names the tables the scope left out.
async fn a_scoped_erasure_erases_only_the_tables_of_its_categories(url: String) {
    let db = holder(&url, &[]).await;
    let connector = SqlConnector::connect(rules(&url, true)).await.unwrap();
    let outcome = connector
        .run(&task(RequestKind::Erasure, &["marketing"], None))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected,
        note,
        erased,
        ..
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(records_affected, 3, "{note}");
    assert_eq!(
        ids(&db, &ALL).await,
        [
            vec![1, 2],
            vec![10, 11],
            vec![21],
            vec![31],
            vec![41],
            vec![1]
        ]
    );
    let targets: Vec<&str> = erased.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["newsletter", "campaigns", "notes"], "{erased:?}");
    assert_eq!(
        note,
        "newsletter: deleted 1; campaigns: deleted 1; notes: deleted 1; left out by the \
         request's categories (marketing): customers, invoices"
    );
    // Her customer row is untouched: name and e-mail as they were.
    assert_eq!(
        rows(&db, "SELECT email, name FROM customers WHERE id = 1").await,
        [vec![serde_json::json!(SUBJECT), serde_json::json!("Anna")]]
    );

    // Billing next: an invoice found through the customer row, which again stays.
    let outcome = connector
        .run(&task(RequestKind::Erasure, &["billing"], None))
        .await
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::Completed { records_affected: 1, note, .. }
            if note.starts_with("invoices: deleted 1; ")),
        "{outcome:?}"
    );
    assert_eq!(
        ids(&db, &["customers", "invoices"]).await,
        [vec![1, 2], vec![11]]
    );
}

/// Without a scope (and with one naming every category) every table is erased, as before
/// tables had categories.
async fn an_unscoped_erasure_erases_every_table_as_before(url: String) {
    let db = holder(&url, &[]).await;
    let connector = SqlConnector::connect(rules(&url, true)).await.unwrap();
    let outcome = connector
        .run(&task(RequestKind::Erasure, &[], None))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected,
        note,
        ..
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(records_affected, 5, "{note}");
    assert!(!note.contains("left out"), "{note}");
    assert_eq!(
        ids(&db, &ALL).await,
        [vec![2], vec![11], vec![21], vec![31], vec![41], vec![1]]
    );
}

/// Contact alone would delete her customer row, under which her invoice and newsletter
/// rows (billing, marketing) hang by their parent link: refused, naming them, nothing
/// changed. A foreign key whose ON DELETE CASCADE or SET NULL reaches another category's
/// table, also through a table the rules do not name, is refused the same way; the erasure
/// of that category itself, which deletes no row under which another hangs, runs.
async fn an_erasure_that_would_orphan_or_cascade_into_other_categories_is_refused(url: String) {
    let db = holder(
        &url,
        &[
            "CREATE TABLE accounts (id BIGINT PRIMARY KEY, email TEXT)",
            "CREATE TABLE sessions (id BIGINT PRIMARY KEY, \
             account_id BIGINT REFERENCES accounts (id) ON DELETE CASCADE)",
            "CREATE TABLE clicks (id BIGINT PRIMARY KEY, email TEXT, \
             session_id BIGINT REFERENCES sessions (id) ON DELETE CASCADE)",
            "CREATE TABLE scores (id BIGINT PRIMARY KEY, email TEXT, \
             account_id BIGINT REFERENCES accounts (id) ON DELETE SET NULL)",
            "INSERT INTO accounts VALUES (1, 'anna@example.fi')",
            "INSERT INTO sessions VALUES (1, 1)",
            "INSERT INTO clicks VALUES (1, 'anna@example.fi', 1)",
            "INSERT INTO scores VALUES (1, 'anna@example.fi', 1)",
        ],
    )
    .await;
    let connector = SqlConnector::connect(rules(&url, false)).await.unwrap();
    let outcome = connector
        .run(&task(RequestKind::Erasure, &["contact"], None))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Refused {
            reason: "an erasure of the categories contact is not carried out here, as it \
                     would change data of other categories: deleting from customers would \
                     leave the rows of invoices, newsletter (their parent link) without their \
                     parent; ask for an erasure of those categories too (or of all), or give \
                     the tables categories that the erasure may take together; left out by the \
                     request's categories (contact): invoices, newsletter, campaigns"
                .into()
        }
    );
    let before = vec![
        vec![1, 2],
        vec![10, 11],
        vec![20, 21],
        vec![30, 31],
        vec![40, 41],
        vec![1],
    ];
    assert_eq!(ids(&db, &ALL).await, before);

    // Accounts (contact) through sessions, which no rule names, onto clicks (marketing),
    // and onto scores (profiling) by SET NULL.
    let mut config = rules(&url, false);
    config.tables = vec![
        rule("accounts", Some(&["contact"]), &["email"]),
        rule("clicks", Some(&["marketing"]), &["id"]),
        rule("scores", Some(&["profiling"]), &["id"]),
    ];
    let connector = SqlConnector::connect(config).await.unwrap();
    let outcome = connector
        .run(&task(RequestKind::Erasure, &["contact"], None))
        .await
        .unwrap();
    let Outcome::Refused { reason } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.contains(
            "deleting from accounts would change through the database's foreign keys the \
             rows of clicks (ON DELETE CASCADE), scores (ON DELETE SET NULL)"
        ),
        "{reason}"
    );
    assert_eq!(
        ids(&db, &["accounts", "sessions", "clicks", "scores"]).await,
        [vec![1], vec![1], vec![1], vec![1]]
    );
    // Marketing and profiling delete from tables no other hangs from.
    let outcome = connector
        .run(&task(
            RequestKind::Erasure,
            &["marketing", "profiling"],
            None,
        ))
        .await
        .unwrap();
    assert!(
        matches!(
            &outcome,
            Outcome::Completed {
                records_affected: 2,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(
        ids(&db, &["accounts", "sessions", "clicks", "scores"]).await,
        [vec![1], vec![1], vec![], vec![]]
    );
    // With every category the cascade stays within the erasure: it runs.
    let outcome = connector
        .run(&task(
            RequestKind::Erasure,
            &["contact", "marketing", "profiling"],
            None,
        ))
        .await
        .unwrap();
    assert!(
        matches!(
            &outcome,
            Outcome::Completed {
                records_affected: 1,
                ..
            }
        ),
        "{outcome:?}"
    );
}

/// A scope naming no category any table holds is refused, naming the scope and the tables'
/// categories, neither completed nor not found; so is a kind no table of the scope is
/// configured for. Nothing changes.
async fn a_scope_no_table_holds_is_refused_and_changes_nothing(url: String) {
    let db = holder(&url, &[]).await;
    let connector = SqlConnector::connect(rules(&url, false)).await.unwrap();
    let outcome = connector
        .run(&task(RequestKind::Erasure, &["health"], None))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Refused {
            reason: "no table of this holder holds the request's categories (health); its \
                     tables hold: customers (contact); invoices (billing); newsletter \
                     (marketing); campaigns (marketing, profiling)"
                .into()
        }
    );
    let mut config = rules(&url, false);
    config.tables[3].export.clear();
    let connector = SqlConnector::connect(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = ExportSink::new(dir.path().join("t"), strings(&["profiling"]));
    let outcome = connector
        .run(&task(RequestKind::ReturnOfData, &["profiling"], Some(sink)))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Refused {
            reason: "the sql connector is not configured for RETURN_OF_DATA in the tables of \
                     the request's categories (profiling): campaigns; left out by the \
                     request's categories (profiling): customers, invoices, newsletter"
                .into()
        }
    );
    assert!(!dir.path().join("t/campaigns.json").exists());
    assert_eq!(
        ids(&db, &ALL).await,
        [
            vec![1, 2],
            vec![10, 11],
            vec![20, 21],
            vec![30, 31],
            vec![40, 41],
            vec![1]
        ]
    );
}

/// Runs an export scoped to `categories` into a sink labelling with every held category;
/// answers its files' names with their labels, sorted.
async fn export(
    connector: &SqlConnector,
    categories: &[&str],
) -> (Vec<(String, Vec<String>)>, String) {
    let dir = tempfile::tempdir().unwrap();
    let held = strings(&["billing", "contact", "marketing", "profiling"]);
    let sink = ExportSink::new(dir.path().join("t"), held);
    sink.reset().await.unwrap();
    let outcome = connector
        .run(&task(RequestKind::Transfer, categories, Some(sink)))
        .await
        .unwrap();
    let Outcome::Completed { files, note, .. } = outcome else {
        panic!("{outcome:?}");
    };
    let mut on_disk: Vec<String> = std::fs::read_dir(dir.path().join("t"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut labels: Vec<(String, Vec<String>)> = (files.iter())
        .map(|f: &ExportedFile| (f.name.clone(), f.categories.clone()))
        .collect();
    labels.sort();
    let names: Vec<String> = labels.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names, on_disk, "every file written is reported");
    (labels, note)
}

/// Marketing: the newsletter (found through the out-of-scope customer row), the campaigns
/// met with the request (marketing, not profiling) and the notes (every held category) are
/// written; customers and invoices are not. Unscoped, each table's files carry its own
/// categories.
async fn a_scoped_export_writes_only_its_tables_labelled_with_their_categories(url: String) {
    let _db = holder(&url, &[]).await;
    let connector = SqlConnector::connect(rules(&url, true)).await.unwrap();
    let all = strings(&["billing", "contact", "marketing", "profiling"]);
    let (labels, note) = export(&connector, &["marketing"]).await;
    let file = |name: &str, c: &[&str]| (name.to_string(), strings(c));
    assert_eq!(
        labels,
        [
            file("campaigns.csv", &["marketing"]),
            file("campaigns.json", &["marketing"]),
            file("newsletter.csv", &["marketing"]),
            file("newsletter.json", &["marketing"]),
            ("notes.csv".to_string(), all.clone()),
            ("notes.json".to_string(), all.clone()),
        ]
    );
    assert!(
        note.ends_with("left out by the request's categories (marketing): customers, invoices"),
        "{note}"
    );

    let (labels, note) = export(&connector, &[]).await;
    assert_eq!(
        labels,
        [
            file("campaigns.csv", &["marketing", "profiling"]),
            file("campaigns.json", &["marketing", "profiling"]),
            file("customers.csv", &["contact"]),
            file("customers.json", &["contact"]),
            file("invoices.csv", &["billing"]),
            file("invoices.json", &["billing"]),
            file("newsletter.csv", &["marketing"]),
            file("newsletter.json", &["marketing"]),
            ("notes.csv".to_string(), all.clone()),
            ("notes.json".to_string(), all),
        ]
    );
    assert!(!note.contains("left out"), "{note}");
}

/// An empty list (which would put the table in no scope), a category named twice and one
/// with a control character are refused when the connector connects, naming the table.
async fn tables_with_empty_duplicate_or_unprintable_categories_are_refused_at_connect(url: String) {
    let _db = holder(&url, &[]).await;
    let mut config = rules(&url, false);
    config.tables[0].categories = Some(Vec::new());
    config.tables[2].categories = Some(strings(&["marketing", "marketing"]));
    config.tables[3].categories = Some(strings(&["market\u{7}ing", " "]));
    let err = format!("{:#}", SqlConnector::connect(config).await.unwrap_err());
    for expected in [
        "tables[0] (customers): categories must not be empty",
        "tables[2] (newsletter): categories[1] \"marketing\" is listed twice",
        "tables[3] (campaigns): categories[0] \"market\\u{7}ing\"",
        "tables[3] (campaigns): categories[1] \" \" is required",
    ] {
        assert!(err.contains(expected), "{expected} in {err}");
    }
    let long = "c".repeat(rules::MAX_CATEGORY + 1);
    let mut config = rules(&url, false);
    config.tables[1].categories = Some(vec![long]);
    let err = format!("{:#}", SqlConnector::connect(config).await.unwrap_err());
    assert!(err.contains("tables[1] (invoices): categories[0]"), "{err}");
}

/// A rectification task of `categories` correcting `fields`, a task of its own (a task's
/// receipt answers its repeated calls).
fn rectification(categories: &[&str], fields: &[(&str, &str)]) -> Task {
    let mut t = task(RequestKind::Rectification, categories, None);
    let named: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
    t.task_id = format!(
        "acme/r-rect-{}-{}/books",
        categories.join("-"),
        named.join("-")
    );
    t.parameters.corrections = (fields.iter())
        .map(|(field, value)| dsrelay_proto::v1::FieldCorrection {
            field: field.to_string(),
            new_value: value.to_string(),
        })
        .collect();
    t
}

/// Members (contact) are referenced by subscriptions' e-mail (marketing) with ON UPDATE
/// CASCADE, and by badges' member id (profiling; a key naming no column, so the parent's
/// primary key) the same way.
const MEMBERS: [&str; 6] = [
    "CREATE TABLE members (id BIGINT PRIMARY KEY, email TEXT UNIQUE, name TEXT)",
    "CREATE TABLE subscriptions (id BIGINT PRIMARY KEY, \
     email TEXT REFERENCES members (email) ON UPDATE CASCADE, topic TEXT)",
    "CREATE TABLE badges (id BIGINT PRIMARY KEY, \
     member_id BIGINT REFERENCES members ON UPDATE CASCADE, badge TEXT)",
    "INSERT INTO members VALUES (1, 'anna@example.fi', 'Anna'), (2, 'bob@example.fi', 'Bob')",
    "INSERT INTO subscriptions VALUES (1, 'anna@example.fi', 'offers'), \
     (2, 'bob@example.fi', 'news')",
    "INSERT INTO badges VALUES (1, 1, 'gold')",
];

fn members_rules(url: &str, members_action: Action) -> SqlConnectorConfig {
    let mut members = rule("members", Some(&["contact"]), &["email", "name"]);
    members.action = members_action;
    members.rectify = BTreeMap::from([
        ("email".to_string(), "email".to_string()),
        ("name".to_string(), "name".to_string()),
        ("number".to_string(), "id".to_string()),
    ]);
    if members_action == Action::Anonymize {
        members.anonymize = BTreeMap::from([("email".to_string(), AnonymizeWith::Null)]);
    }
    let mut badges = rule("badges", Some(&["profiling"]), &["badge"]);
    badges.match_columns.clear();
    badges.parent = Some(ParentLink {
        table: "members".into(),
        column: "member_id".into(),
        parent_column: "id".into(),
        export_matched_only: false,
    });
    badges.action = Action::Keep;
    let mut config = rules(url, false);
    config.tables = vec![
        members,
        rule("subscriptions", Some(&["marketing"]), &["topic"]),
        badges,
    ];
    config
}

async fn members_rows(db: &Db) -> Vec<Vec<Vec<serde_json::Value>>> {
    vec![
        rows(db, "SELECT id, email, name FROM members ORDER BY id").await,
        rows(db, "SELECT id, email, topic FROM subscriptions ORDER BY id").await,
        rows(db, "SELECT id, member_id, badge FROM badges ORDER BY id").await,
    ]
}

/// A contact rectification of the e-mail, which subscriptions (marketing) reference with
/// ON UPDATE CASCADE, is refused naming the table and column, as is one of the member
/// number (the primary key badges reference) and a contact erasure anonymizing the
/// e-mail; nothing changes. A correction of the name, which no key references, runs and
/// changes no out-of-scope row; an unscoped correction of the e-mail cascades, as the
/// database does.
async fn an_update_a_foreign_key_carries_into_other_categories_is_refused(url: String) {
    let db = holder(&url, &MEMBERS).await;
    let before = members_rows(&db).await;
    let connector = SqlConnector::connect(members_rules(&url, Action::Keep))
        .await
        .unwrap();
    let left_out = "left out by the request's categories (contact): subscriptions, badges";
    let outcome = connector
        .run(&rectification(&["contact"], &[("email", "anna@new.fi")]))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Refused {
            reason: format!(
                "a rectification of the categories contact is not carried out here, as it \
                 would change data of other categories: writing email of members would \
                 change through the database's foreign keys the rows of subscriptions \
                 (email, ON UPDATE CASCADE); ask for a rectification of those categories \
                 too (or of all), or give the tables categories that the rectification may \
                 take together; {left_out}"
            )
        }
    );
    let outcome = connector
        .run(&rectification(&["contact"], &[("number", "7")]))
        .await
        .unwrap();
    let Outcome::Refused { reason } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.contains(
            "writing id of members would change through the database's foreign keys the \
             rows of badges (member_id, ON UPDATE CASCADE)"
        ),
        "{reason}"
    );
    assert_eq!(members_rows(&db).await, before);

    // The name: nothing references it.
    let outcome = connector
        .run(&rectification(&["contact"], &[("name", "Anna K")]))
        .await
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::Completed { records_affected: 1, note, .. }
            if note.ends_with(left_out)),
        "{outcome:?}"
    );
    let mut expected = before.clone();
    expected[0][0][2] = serde_json::json!("Anna K");
    assert_eq!(members_rows(&db).await, expected);

    // An erasure anonymizing the e-mail would cascade the same way.
    let connector = SqlConnector::connect(members_rules(&url, Action::Anonymize))
        .await
        .unwrap();
    let outcome = connector
        .run(&task(RequestKind::Erasure, &["contact"], None))
        .await
        .unwrap();
    let Outcome::Refused { reason } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.starts_with(
            "an erasure of the categories contact is not carried out here, as it would \
             change data of other categories: writing email of members would change through \
             the database's foreign keys the rows of subscriptions (email, ON UPDATE CASCADE)"
        ) && reason.ends_with(left_out),
        "{reason}"
    );
    assert_eq!(members_rows(&db).await, expected);

    // Unscoped, the database carries the new e-mail into subscriptions.
    let outcome = connector
        .run(&rectification(&[], &[("email", "anna@new.fi")]))
        .await
        .unwrap();
    assert!(matches!(&outcome, Outcome::Completed { .. }), "{outcome:?}");
    assert_eq!(
        rows(&db, "SELECT email FROM subscriptions WHERE id = 1").await,
        [vec![serde_json::json!("anna@new.fi")]]
    );
}

/// Every refusal of a scoped request ends by naming the tables the scope left out: one
/// without an identity to search by, and a rectification whose fields only out-of-scope
/// tables map, which says so rather than that no table maps them. A field mapped only
/// outside the scope beside one mapped inside is named so in the note.
async fn a_scoped_refusal_names_the_tables_left_out_and_fields_mapped_elsewhere(url: String) {
    let db = holder(&url, &[]).await;
    let mut config = rules(&url, false);
    config.tables[0].rectify = BTreeMap::from([("name".to_string(), "name".to_string())]);
    config.tables[2].rectify = BTreeMap::from([("topic".to_string(), "topic".to_string())]);
    let connector = SqlConnector::connect(config).await.unwrap();
    let left_out = "left out by the request's categories (marketing): customers, invoices";

    let outcome = connector
        .run(&rectification(
            &["marketing"],
            &[("name", "Anna K"), ("shoe_size", "38")],
        ))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Refused {
            reason: format!(
                "no table maps the corrected field(s) \"shoe_size\"; the corrected field(s) \
                 \"name\" are mapped only in tables outside the request's categories \
                 (marketing): customers; ask for a rectification of their categories; the \
                 tables of the request's categories can correct topic; {left_out}"
            )
        }
    );

    let outcome = connector
        .run(&rectification(
            &["marketing"],
            &[("name", "Anna K"), ("topic", "deals")],
        ))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected,
        note,
        ..
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(*records_affected, 1, "{note}");
    assert!(
        note.ends_with(&format!(
            "not corrected: \"name\" (mapped only in tables outside the request's categories \
             (marketing): customers); {left_out}"
        )),
        "{note}"
    );
    assert_eq!(
        rows(&db, "SELECT name FROM customers WHERE id = 1").await,
        [vec![serde_json::json!("Anna")]]
    );
    assert_eq!(
        rows(&db, "SELECT topic FROM newsletter ORDER BY id").await,
        [
            vec![serde_json::json!("deals")],
            vec![serde_json::json!("news")]
        ]
    );

    // Nothing to search by: a hashed e-mail.
    let mut t = task(RequestKind::Erasure, &["marketing"], None);
    t.identities = vec![super::tests::ident(
        dsrelay_proto::v1::IdentityType::Email,
        dsrelay_proto::v1::IdentityEncoding::Sha256,
        "00",
    )];
    let outcome = connector.run(&t).await.unwrap();
    let Outcome::Refused { reason } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.ends_with(left_out), "{reason}");
    assert_eq!(
        ids(&db, &["newsletter", "campaigns"]).await,
        [vec![20, 21], vec![30, 31]]
    );
}

/// A scoped export labels a table's files with its categories met with the requested ones
/// whether or not some unrelated table is out of scope; a table without categories keeps
/// the processor's label.
async fn scoped_labels_do_not_depend_on_unrelated_tables(url: String) {
    let _db = holder(&url, &[]).await;
    let all = strings(&["billing", "contact", "marketing", "profiling"]);
    let file = |name: &str, c: &[String]| (name.to_string(), c.to_vec());
    let marketing = strings(&["marketing"]);
    let expected = vec![
        file("campaigns.csv", &marketing),
        file("campaigns.json", &marketing),
        file("notes.csv", &all),
        file("notes.json", &all),
    ];

    // Every table in scope.
    let mut config = rules(&url, true);
    config
        .tables
        .retain(|t| t.table == "campaigns" || t.table == "notes");
    let connector = SqlConnector::connect(config).await.unwrap();
    let (labels, note) = export(&connector, &["marketing"]).await;
    assert_eq!(labels, expected);
    assert!(!note.contains("left out"), "{note}");
    // Both of its categories asked: both named.
    let (labels, _) = export(&connector, &["marketing", "profiling"]).await;
    assert_eq!(
        labels[0],
        file("campaigns.csv", &strings(&["marketing", "profiling"]))
    );

    // With an unrelated out-of-scope table beside them: the same labels.
    let mut config = rules(&url, true);
    config
        .tables
        .retain(|t| t.table == "campaigns" || t.table == "notes");
    let mut other = rule("audit", Some(&["billing"]), &["what"]);
    other.match_columns = BTreeMap::from([("email".to_string(), "what".to_string())]);
    config.tables.insert(0, other);
    let connector = SqlConnector::connect(config).await.unwrap();
    let (labels, note) = export(&connector, &["marketing"]).await;
    assert_eq!(labels, expected);
    assert!(
        note.ends_with("left out by the request's categories (marketing): audit"),
        "{note}"
    );
}
