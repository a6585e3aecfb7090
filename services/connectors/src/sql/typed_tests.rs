//! Values written in the column's type: `redacted` only where the column takes text, a
//! restriction's or objection's flag as a boolean where the column is one, and only what the
//! erasure writes checked; and a child table kept under retention that is also matched by
//! its own column; and a SQLite table of the declared types sqlx's `Any` driver refuses,
//! through every path that reads it. Each scenario on SQLite and PostgreSQL where both apply.

use dsrelay_proto::v1::{FieldCorrection, RequestKind, RequestParameters, SubjectIdentity};
use dsrelay_runtime::store::{Backend, Db};
use serde_json::{json, Value};

use super::retention::DAY_MS;
use super::tests::{
    bulk_job, by_content, email, exec, export_task, fresh_postgres_database, ms, now,
    on_both_backends, rectification, rows, rule, run_bulk_watched, sample, written, MAIJA,
};
use super::*;

on_both_backends!(
    redacted_is_refused_where_the_column_holds_no_text,
    a_flag_is_written_in_the_columns_type,
    a_kept_child_row_only_its_own_match_finds_keeps_the_column,
    columns_a_delete_leaves_in_kept_rows_are_not_checked,
    another_customers_invoice_sent_to_the_subjects_address_is_left_alone,
);

/// A task of a request of its own for each kind and first identity: the receipts of a
/// subject's rectification and erasure, or of two subjects' erasures, must not meet.
fn task(kind: RequestKind, identities: Vec<SubjectIdentity>, now_ms: i64, phase: Phase) -> Task {
    let request = format!("{kind:?}-{}", identities[0].value);
    Task {
        task_id: format!("controller/{request}/accounting"),
        request_id: request,
        controller: "acme".into(),
        kind,
        identities,
        categories: Vec::new(),
        parameters: RequestParameters::default(),
        due_at_ms: now_ms + 30 * DAY_MS,
        now_ms,
        phase,
        interrupted: false,
        export: None,
    }
}

/// The sample database, and a connector whose invoices are also matched by their own copy of
/// the e-mail (the sample's rules do not: another customer's invoice may be sent to the
/// same address).
async fn invoices_matched_by_address(url: &str) -> (SqlConnector, Db) {
    let (_, db) = sample(url).await;
    let mut config = sample_config(url);
    (rule(&mut config, "invoices").match_columns).insert("email".into(), "customer_email".into());
    (SqlConnector::connect(config).await.unwrap(), db)
}

/// `redacted` writes the text `[erased]`: a PostgreSQL column of another type fails every
/// erasure of its table on the type, so the rule is refused when the connector connects,
/// naming the table, the column and its type and saying what to write instead; `null` on a
/// NOT NULL column likewise, on SQLite too. SQLite stores the text in a column of any
/// affinity (see `sqlite_stores_redacted_but_in_a_strict_tables_non_text_column`).
async fn redacted_is_refused_where_the_column_holds_no_text(url: String) {
    let (_, db) = sample(&url).await;
    let postgres = db.backend == Backend::Postgres;
    exec(
        &db,
        "CREATE TABLE subscriptions (id BIGINT PRIMARY KEY, customer_id BIGINT, \
         note TEXT NOT NULL, memo TEXT NOT NULL, code VARCHAR(5), seats INTEGER NOT NULL, \
         renews_on DATE, price NUMERIC(12,2), active BOOLEAN, token UUID)",
    )
    .await;
    exec(
        &db,
        "INSERT INTO subscriptions VALUES (1, 1, 'Maija''s plan', 'call before noon', 'M1', \
         3, '2026-01-01', 12.50, TRUE, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11')",
    )
    .await;
    let with = |columns: &[(&str, AnonymizeWith)]| {
        let mut config = sample_config(&url);
        let mut subscriptions = rule(&mut config, "invoices").clone();
        subscriptions.table = "subscriptions".into();
        subscriptions.action = Action::Anonymize;
        subscriptions.retain = None;
        subscriptions.match_columns.clear();
        subscriptions.export = Vec::new();
        subscriptions.anonymize = columns.iter().map(|(c, w)| (c.to_string(), *w)).collect();
        config.tables.insert(0, subscriptions);
        config
    };
    use AnonymizeWith::{Null, Redacted};
    let bad = with(&[
        ("customer_id", Null),
        ("note", Redacted),
        ("memo", Null),
        ("code", Redacted),
        ("seats", Redacted),
        ("renews_on", Redacted),
        ("price", Redacted),
        ("active", Redacted),
        ("token", Redacted),
    ]);
    let err = format!("{:#}", SqlConnector::connect(bad).await.unwrap_err());
    let at = "tables[0] (subscriptions): anonymize column";
    let not_text = |column: &str, ty: &str, nullable: bool| {
        format!(
            "{at} \"{column}\" is \"redacted\", which writes the text \"[erased]\", but the \
             column is of type {ty}; {}",
            match nullable {
                true => "use \"null\" instead, or leave the column out of anonymize",
                false =>
                    "the column is NOT NULL, so \"null\" would fail as well: leave it \
                          out of anonymize",
            }
        )
    };
    let mut expected = vec![format!(
        "{at} \"memo\" is \"null\", but the column is NOT NULL; use \"redacted\" (it holds \
         text), leave the column out of anonymize, or allow NULL in it"
    )];
    // SQLite stores the text in any column of a table that is not STRICT, and does not hold
    // a VARCHAR to its length.
    if postgres {
        expected.extend([
            not_text("active", "boolean", true),
            not_text("price", "numeric(12,2)", true),
            not_text("renews_on", "date", true),
            not_text("seats", "integer", false),
            not_text("token", "uuid", true),
        ]);
        expected.push(format!(
            "{at} \"code\" is \"redacted\", which writes the text \"[erased]\", but the column \
             is of type character varying(5), too short for its 8 characters; use \"null\" \
             instead, or leave the column out of anonymize"
        ));
    }
    for e in &expected {
        assert!(err.contains(e.as_str()), "{e}\nin {err}");
    }
    assert_eq!(err.matches("tables[").count(), expected.len(), "{err}");

    // What the messages ask for: the text column redacted, the others cleared or left.
    let good = with(&[
        ("customer_id", Null),
        ("note", Redacted),
        ("memo", Redacted),
        ("code", Null),
        ("renews_on", Null),
        ("price", Null),
        ("active", Null),
        ("token", Null),
    ]);
    let connector = SqlConnector::connect(good).await.unwrap();
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            vec![email(MAIJA)],
            now(),
            Phase::Start,
        ))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Retained { .. }), "{out:?}");
    assert_eq!(
        rows(
            &db,
            "SELECT note, memo, seats FROM subscriptions WHERE customer_id IS NULL \
             AND code IS NULL AND renews_on IS NULL AND price IS NULL AND active IS NULL \
             AND token IS NULL"
        )
        .await,
        [[json!(REDACTED), json!(REDACTED), json!(3)]]
    );
}

/// RESTRICTION and OBJECTION set a flag column: a PostgreSQL BOOLEAN gets TRUE and FALSE
/// (the integers 1 and 0 fail there on the type), SQLite's BOOLEAN its 1 and 0. A column no
/// flag can be written into (a DATE) is refused on PostgreSQL when the connector connects.
async fn a_flag_is_written_in_the_columns_type(url: String) {
    let (_, db) = sample(&url).await;
    let postgres = db.backend == Backend::Postgres;
    exec(
        &db,
        "ALTER TABLE customers ADD COLUMN restricted BOOLEAN NOT NULL DEFAULT FALSE",
    )
    .await;
    exec(&db, "ALTER TABLE customers ADD COLUMN no_marketing BOOLEAN").await;
    exec(&db, "ALTER TABLE customers ADD COLUMN restricted_on DATE").await;
    let mut config = sample_config(&url);
    let customers = rule(&mut config, "customers");
    customers.restrict_column = Some("restricted".into());
    customers.suppress_column = Some("no_marketing".into());
    let connector = SqlConnector::connect(config.clone()).await.unwrap();
    let (yes, no) = match postgres {
        true => (json!(true), json!(false)),
        false => (json!(1), json!(0)),
    };
    // The Any driver reads no SQLite BOOLEAN; the cast shows the integer stored.
    let flags = match postgres {
        true => "SELECT restricted, no_marketing FROM customers ORDER BY id",
        false => {
            "SELECT CAST(restricted AS INTEGER), CAST(no_marketing AS INTEGER) \
                  FROM customers ORDER BY id"
        }
    };
    let maija_only = |maija: [Value; 2]| {
        let mut all = vec![vec![no.clone(), Value::Null]; 6];
        all[0] = maija.to_vec();
        all
    };
    let mut restrict = task(
        RequestKind::Restriction,
        vec![email(MAIJA)],
        now(),
        Phase::Start,
    );
    let completed = |note: &str| Outcome::Completed {
        records_affected: 1,
        note: note.into(),
        files: Vec::new(),
        erased: Vec::new(),
    };
    assert_eq!(
        connector.run(&restrict).await.unwrap(),
        completed(
            "customers: restricted 1; contacts: holds 1, not restricted (no restrict_column)"
        )
    );
    assert_eq!(
        rows(&db, flags).await,
        maija_only([yes.clone(), Value::Null])
    );
    restrict.parameters.lift_restriction = true;
    assert_eq!(
        connector.run(&restrict).await.unwrap(),
        completed(
            "customers: restriction lifted 1; contacts: holds 1, not lifted (no restrict_column)"
        )
    );
    assert_eq!(
        rows(&db, flags).await,
        maija_only([no.clone(), Value::Null])
    );
    let object = task(
        RequestKind::Objection,
        vec![email(MAIJA)],
        now(),
        Phase::Start,
    );
    assert_eq!(
        connector.run(&object).await.unwrap(),
        completed("customers: opted out 1; contacts: holds 1, not opted out (no suppress_column)")
    );
    assert_eq!(
        rows(&db, flags).await,
        maija_only([no.clone(), yes.clone()])
    );

    rule(&mut config, "customers").restrict_column = Some("restricted_on".into());
    let connected = SqlConnector::connect(config).await;
    match postgres {
        true => {
            let err = format!("{:#}", connected.unwrap_err());
            assert!(
                err.contains(
                    "tables[3] (customers): restrict_column \"restricted_on\" is of type date, \
                     which no flag can be written into; use a boolean, integer or text column"
                ),
                "{err}"
            );
        }
        // SQLite stores the 1 as it is, in any column.
        false => assert!(connected.is_ok(), "{:#}", connected.unwrap_err()),
    }
}

/// A child table kept under retention may also be matched by a column of its own (here the
/// sample's invoices by their copy of the e-mail, which the sample's rules do not do): a row
/// that only this match finds (its parent row no longer has the address, or it has none) keeps
/// the column while it is kept, the only way the retention run finds it again; a row found
/// through the parent row loses it at once, as the parent row keeps the address the request
/// matched it by.
async fn a_kept_child_row_only_its_own_match_finds_keeps_the_column(url: String) {
    const NEW: &str = "maija@uusi.example.fi";
    const OLD: &str = "Maija.Meikalainen@Example.fi";
    let (connector, db) = invoices_matched_by_address(&url).await;
    let mut correct = task(
        RequestKind::Rectification,
        vec![email(MAIJA)],
        now(),
        Phase::Start,
    );
    correct.parameters.corrections = vec![FieldCorrection {
        field: "email".into(),
        new_value: NEW.into(),
    }];
    assert!(matches!(
        connector.run(&correct).await.unwrap(),
        Outcome::Completed { .. }
    ));
    // An invoice with the buyer's address and no customer row.
    exec(
        &db,
        "INSERT INTO invoices (id, customer_id, customer_name, customer_email, amount_cents, \
         issued_on, status) VALUES (120, NULL, 'Kalle Kassa', 'kalle@example.fi', 1500, \
         '2015-05-05', 'paid')",
    )
    .await;
    let erase = |address: &str, now_ms: i64, phase: Phase| {
        let task = task(RequestKind::Erasure, vec![email(address)], now_ms, phase);
        let connector = &connector;
        async move { connector.run(&task).await.unwrap() }
    };
    let invoices = "SELECT id, customer_id, customer_email FROM invoices \
                    WHERE id IN (101, 102, 103, 120) ORDER BY id";

    // By the old address: the contact row and the invoices that carry it. The paid 2015
    // invoice goes at once; the others are kept, with the address they are found by.
    let Outcome::Retained {
        until_ms,
        records_affected,
        note,
        ..
    } = erase(MAIJA, now(), Phase::Start).await
    else {
        panic!("expected RETAINED");
    };
    assert_eq!((until_ms, records_affected), (ms(2031, 1, 1), 2));
    assert_eq!(
        note,
        "contacts: deleted 1; invoices: deleted 1, kept 2, the first until the end of \
         2030-12-31 and the last until the end of 2031-12-31 (0 stripped now of what the \
         obligation does not need); ledger_entries: anonymized 0; customers: deleted 0"
    );
    assert_eq!(
        rows(&db, invoices).await,
        [
            [json!(102), json!(1), json!(OLD)],
            [json!(103), json!(1), json!(OLD)],
            [json!(120), Value::Null, json!("kalle@example.fi")],
        ]
    );
    // The customer row has the new address and was not found by the old one.
    assert_eq!(
        rows(&db, "SELECT name, email FROM customers WHERE id = 1").await,
        [[json!("Maija Meikäläinen"), json!(NEW)]]
    );

    // When their periods are over (the open invoice paid), the retention run finds them by
    // the same address and deletes them.
    exec(&db, "UPDATE invoices SET status = 'paid' WHERE id = 103").await;
    let later = ms(2032, 1, 2);
    let out = erase(MAIJA, later, Phase::RetentionExpired { until_ms: later }).await;
    let Outcome::Completed {
        records_affected, ..
    } = out
    else {
        panic!("expected COMPLETED, got {out:?}");
    };
    assert_eq!(records_affected, 2);
    assert_eq!(
        rows(&db, invoices).await,
        [[json!(120), Value::Null, json!("kalle@example.fi")]]
    );

    // The buyer without a customer row.
    let out = erase("kalle@example.fi", now(), Phase::Start).await;
    let Outcome::Completed { note, .. } = out else {
        panic!("expected COMPLETED, got {out:?}");
    };
    assert_eq!(
        note,
        "contacts: deleted 0; invoices: deleted 1; ledger_entries: anonymized 0; \
         customers: deleted 0"
    );
    assert!(rows(&db, invoices).await.is_empty());
}

/// With the invoices matched by their own copy of the e-mail, a request with both addresses
/// finds Maija's invoices by that copy and through her customer row: kept under retention,
/// they lose the copy, since the customer row, kept for them with the address the request
/// matched it by, finds them again.
#[tokio::test]
async fn kept_child_rows_found_through_the_parent_lose_their_match_column() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/accounting.db", dir.path().display());
    let (connector, db) = invoices_matched_by_address(&url).await;
    exec(
        &db,
        "UPDATE customers SET email = 'maija@uusi.example.fi' WHERE id = 1",
    )
    .await;
    let both = vec![email(MAIJA), email("maija@uusi.example.fi")];
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            both.clone(),
            now(),
            Phase::Start,
        ))
        .await
        .unwrap();
    let Outcome::Retained { note, .. } = out else {
        panic!("expected RETAINED, got {out:?}");
    };
    assert!(
        note.contains(
            "invoices: deleted 1, kept 2, the first until the end of 2030-12-31 and the last \
             until the end of 2031-12-31 (2 stripped now of what the obligation does not need)"
        ),
        "{note}"
    );
    assert_eq!(
        rows(
            &db,
            "SELECT id, customer_email FROM invoices WHERE customer_id = 1 ORDER BY id"
        )
        .await,
        [[json!(102), Value::Null], [json!(103), Value::Null]]
    );
    assert_eq!(
        rows(&db, "SELECT email FROM customers WHERE id = 1").await,
        [[json!("maija@uusi.example.fi")]]
    );
    // Found again through the customer row when they are released.
    exec(&db, "UPDATE invoices SET status = 'paid' WHERE id = 103").await;
    let later = ms(2032, 1, 2);
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            both,
            later,
            Phase::RetentionExpired { until_ms: later },
        ))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Retained { .. }), "{out:?}");
    assert_eq!(
        rows(&db, "SELECT id FROM invoices WHERE customer_id = 1").await,
        Vec::<Vec<Value>>::new()
    );
}

/// A child of the sample's customers, `table`, anonymized by `columns` (its link cleared, as
/// its parent's delete requires).
fn anonymized_child(
    url: &str,
    table: &str,
    columns: &[(&str, AnonymizeWith)],
) -> SqlConnectorConfig {
    let mut config = sample_config(url);
    let mut child = rule(&mut config, "invoices").clone();
    child.table = table.into();
    child.action = Action::Anonymize;
    child.retain = None;
    child.match_columns.clear();
    child.export = Vec::new();
    child.anonymize = [("customer_id", AnonymizeWith::Null)]
        .iter()
        .chain(columns)
        .map(|(c, w)| (c.to_string(), *w))
        .collect();
    config.tables.insert(0, child);
    config
}

/// SQLite stores `redacted`'s text as it is in a column of any affinity, and holders declare
/// text columns as `STRING`, `JSON`, `UUID` or `DATETIME` (NUMERIC affinity): such rules
/// were refused at connect, though they worked. Only a STRICT table's INT, INTEGER, REAL
/// and BLOB columns fail the text, and only they are refused.
#[tokio::test]
async fn sqlite_stores_redacted_but_in_a_strict_tables_non_text_column() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/accounting.db", dir.path().display());
    let (_, db) = sample(&url).await;
    exec(
        &db,
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, customer_id BIGINT, label STRING, \
         data JSON, token UUID, seen DATETIME NOT NULL)",
    )
    .await;
    exec(
        &db,
        "INSERT INTO notes VALUES (1, 1, 'Maija', '{\"a\": 1}', 'a0eebc99', \
         '2026-01-01 10:00')",
    )
    .await;
    use AnonymizeWith::Redacted;
    let redacted = [
        ("label", Redacted),
        ("data", Redacted),
        ("token", Redacted),
        ("seen", Redacted),
    ];
    let connector = SqlConnector::connect(anonymized_child(&url, "notes", &redacted))
        .await
        .unwrap();
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            vec![email(MAIJA)],
            now(),
            Phase::Start,
        ))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Retained { .. }), "{out:?}");
    assert_eq!(
        rows(
            &db,
            // The Any driver reads no SQLite DATETIME column: the cast shows what it holds.
            "SELECT customer_id, label, data, token, CAST(seen AS TEXT), typeof(seen) \
             FROM notes"
        )
        .await,
        [[
            Value::Null,
            json!(REDACTED),
            json!(REDACTED),
            json!(REDACTED),
            json!(REDACTED),
            json!("text")
        ]]
    );

    exec(
        &db,
        "CREATE TABLE strict_notes (id INTEGER PRIMARY KEY, customer_id INTEGER, label TEXT, \
         anything ANY, seats INT, price REAL, raw BLOB) STRICT",
    )
    .await;
    let redacted = [
        ("label", Redacted),
        ("anything", Redacted),
        ("seats", Redacted),
        ("price", Redacted),
        ("raw", Redacted),
    ];
    let err = SqlConnector::connect(anonymized_child(&url, "strict_notes", &redacted))
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    for (column, ty) in [("price", "REAL"), ("raw", "BLOB"), ("seats", "INT")] {
        let e = format!(
            "tables[0] (strict_notes): anonymize column \"{column}\" is \"redacted\", which \
             writes the text \"[erased]\", but the column is of type {ty} (in a STRICT \
             table); use \"null\" instead, or leave the column out of anonymize"
        );
        assert!(err.contains(&e), "{e}\nin {err}");
    }
    assert_eq!(err.matches("tables[").count(), 3, "{err}");
    // What the refusal foresees: SQLite fails the text there.
    let stored = sqlx::query("INSERT INTO strict_notes (id, seats) VALUES (1, '[erased]')")
        .execute(&db.pool)
        .await;
    assert!(stored.is_err(), "{stored:?}");
}

/// PostgreSQL's string category holds more than the types named `text`, `varchar` and
/// `char`: `citext` (an extension's type) and a domain over it take `redacted`'s text and a
/// flag's 1 and 0, yet were refused at connect as holding no text and taking no flag. Where
/// the server lacks the citext extension, `name` (a built-in string type whose name is
/// none of those) shows the same rule.
#[tokio::test]
async fn postgres_string_types_take_redacted_and_a_flag() {
    let Some(pg) = fresh_postgres_database("postgres_string_types_take_redacted").await else {
        return;
    };
    let (_, db) = sample(&pg.url).await;
    let string_type = match sqlx::query("CREATE EXTENSION IF NOT EXISTS citext")
        .execute(&db.pool)
        .await
    {
        Ok(_) => "citext",
        Err(e) => {
            println!("citext is not available ({e}): the test uses the type name");
            "name"
        }
    };
    exec(&db, &format!("CREATE DOMAIN handle AS {string_type}")).await;
    exec(
        &db,
        &format!(
            "CREATE TABLE profiles (id BIGINT PRIMARY KEY, customer_id BIGINT, \
             nick {string_type} NOT NULL, alias handle, restricted {string_type}, \
             opted_out handle)"
        ),
    )
    .await;
    exec(
        &db,
        "INSERT INTO profiles VALUES (1, 1, 'maija', 'mm', '0', '0')",
    )
    .await;
    use AnonymizeWith::Redacted;
    let mut config = anonymized_child(
        &pg.url,
        "profiles",
        &[("nick", Redacted), ("alias", Redacted)],
    );
    config.tables[0].restrict_column = Some("restricted".into());
    config.tables[0].suppress_column = Some("opted_out".into());
    let connector = SqlConnector::connect(config).await.unwrap();
    let profile = "SELECT CAST(customer_id AS TEXT), CAST(nick AS TEXT), CAST(alias AS TEXT), \
                   CAST(restricted AS TEXT), CAST(opted_out AS TEXT) FROM profiles";
    for kind in [RequestKind::Restriction, RequestKind::Objection] {
        let out = connector
            .run(&task(kind, vec![email(MAIJA)], now(), Phase::Start))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
    }
    assert_eq!(
        rows(&db, profile).await,
        [[
            json!("1"),
            json!("maija"),
            json!("mm"),
            json!("1"),
            json!("1")
        ]]
    );
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            vec![email(MAIJA)],
            now(),
            Phase::Start,
        ))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Retained { .. }), "{out:?}");
    assert_eq!(
        rows(&db, profile).await,
        [[
            Value::Null,
            json!(REDACTED),
            json!(REDACTED),
            json!("1"),
            json!("1")
        ]]
    );
    drop(connector);
    pg.drop_database().await;
}

/// A delete table's kept rows keep their link and the columns the obligation needs
/// (`keep_columns`, which must be `anonymize` columns): the erasure writes neither, it deletes
/// the rows when their period ends. Checking them at connect refused rules that work (a NOT
/// NULL amount kept as `null`, the link of a non-text type as `redacted`). The same columns
/// of an anonymize table, whose released rows get them all, are still checked.
async fn columns_a_delete_leaves_in_kept_rows_are_not_checked(url: String) {
    let (_, db) = sample(&url).await;
    let mut config = sample_config(&url);
    let invoices = rule(&mut config, "invoices");
    invoices
        .anonymize
        .insert("amount_cents".into(), AnonymizeWith::Null);
    invoices
        .anonymize
        .insert("customer_id".into(), AnonymizeWith::Redacted);
    invoices.retain.as_mut().unwrap().keep_columns = vec!["amount_cents".into()];
    let connector = SqlConnector::connect(config.clone()).await.unwrap();
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            vec![email(MAIJA)],
            now(),
            Phase::Start,
        ))
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Retained { .. }), "{out:?}");
    assert_eq!(
        rows(
            &db,
            "SELECT id, customer_id, amount_cents, customer_email FROM invoices \
             WHERE id IN (101, 102, 103) ORDER BY id"
        )
        .await,
        [
            [json!(102), json!(1), json!(8990), Value::Null],
            [json!(103), json!(1), json!(45000), Value::Null],
        ]
    );

    rule(&mut config, "invoices").action = Action::Anonymize;
    let err = format!("{:#}", SqlConnector::connect(config).await.unwrap_err());
    assert!(
        err.contains(
            "tables[1] (invoices): anonymize column \"amount_cents\" is \"null\", but the \
             column is NOT NULL; leave the column out of anonymize, or allow NULL in it"
        ),
        "{err}"
    );
}

/// The sample finds invoices through the customer row only: an invoice of another customer
/// sent to the subject's address (a company's, mailed to its contact person; a spouse's) is
/// that customer's record, and neither the subject's erasure nor its export touches it.
async fn another_customers_invoice_sent_to_the_subjects_address_is_left_alone(url: String) {
    let (connector, db) = sample(&url).await;
    exec(
        &db,
        "INSERT INTO invoices (id, customer_id, customer_name, customer_email, amount_cents, \
         issued_on, status) VALUES (140, 4, 'Esimerkki Oy', 'Maija.Meikalainen@Example.fi', \
         5000, '2015-05-05', 'paid')",
    )
    .await;
    let out = connector
        .run(&task(
            RequestKind::Erasure,
            vec![email(MAIJA)],
            now(),
            Phase::Start,
        ))
        .await
        .unwrap();
    let Outcome::Retained { note, .. } = out else {
        panic!("expected RETAINED, got {out:?}");
    };
    assert!(note.contains("invoices: deleted 1, kept 2"), "{note}");
    assert_eq!(
        rows(
            &db,
            "SELECT customer_id, customer_email FROM invoices WHERE id = 140"
        )
        .await,
        [[json!(4), json!("Maija.Meikalainen@Example.fi")]]
    );
}

/// A SQLite holder declares dates `DATETIME`, `DATE` or `TIMESTAMP`, flags `BOOLEAN`, amounts
/// `DECIMAL(10,2)` and text `JSON` or `STRING`: sqlx's `Any` driver refuses a row whose column
/// is declared one of the first four, whatever it holds (its decoder knows no such type). No
/// statement of the connector returns such a column bare through it: an export is read by
/// the file's own reader ([`super::direct`]), which reads each value by its storage class,
/// and the erasure, retention, rectification and receipts read counts, flags computed in
/// the statement and dates cast to text. Each path on one table of those types: a subject's
/// export, a match on a STRING column, a restriction's and objection's flags in BOOLEAN
/// columns, a rectification of a DATE, an erasure kept by a DATETIME (and its receipt), and
/// a contract end's export and erasure.
#[tokio::test]
async fn sqlite_declared_types_are_read_by_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/accounting.db", dir.path().display());
    let (_, db) = sample(&url).await;
    exec(
        &db,
        "CREATE TABLE visits (id INTEGER PRIMARY KEY, customer_id BIGINT, contact STRING, \
         seen DATETIME NOT NULL, day DATE, at TIMESTAMP, member BOOLEAN, \
         restricted BOOLEAN NOT NULL DEFAULT 0, opted_out BOOLEAN NOT NULL DEFAULT 0, \
         price DECIMAL(10,2), data JSON)",
    )
    .await;
    exec(
        &db,
        "INSERT INTO visits (id, customer_id, contact, seen, day, at, member, price, data) \
         VALUES (1, 1, 'Maija.Meikalainen@Example.fi', '2015-01-31 10:00:00', '2015-01-31', \
         '2015-01-31 10:00:00', 1, '12.50', '{\"a\": 1}'), \
         (2, NULL, 'maija.meikalainen@example.fi', '2024-01-31 10:00:00', '2024-01-31', \
         '2024-01-31 10:00:00', 0, 12.5, '[1, 2]'), \
         (3, 2, 'matti.virtanen@example.fi', '2024-02-29 08:30:00', '2024-02-29', \
         '2024-02-29 08:30:00', 1, 7, 'null')",
    )
    .await;
    let mut config = sample_config(&url);
    let mut visits = rule(&mut config, "invoices").clone();
    visits.table = "visits".into();
    // Row 2 has no customer: only its own STRING column finds it.
    visits.match_columns = [("email".to_string(), "contact".to_string())].into();
    visits.anonymize = [("contact".to_string(), AnonymizeWith::Null)].into();
    visits.export = [
        "id", "contact", "seen", "day", "at", "member", "price", "data",
    ]
    .map(String::from)
    .into();
    visits.rectify = [("visit_day".to_string(), "day".to_string())].into();
    visits.restrict_column = Some("restricted".into());
    visits.suppress_column = Some("opted_out".into());
    let retain = visits.retain.as_mut().unwrap();
    retain.from_column = "seen".into();
    retain.while_condition = None;
    retain.while_basis = None;
    config.tables.insert(0, visits);
    let connector = SqlConnector::connect(config).await.unwrap();
    let visit = |id: i64, contact: &str, date: &str, time: &str, member: i64, data: &str| {
        json!({
            "id": id, "contact": contact, "seen": format!("{date} {time}"), "day": date,
            "at": format!("{date} {time}"), "member": member, "price": 12.5, "data": data
        })
    };
    let maija = [
        visit(
            1,
            "Maija.Meikalainen@Example.fi",
            "2015-01-31",
            "10:00:00",
            1,
            "{\"a\": 1}",
        ),
        visit(
            2,
            "maija.meikalainen@example.fi",
            "2024-01-31",
            "10:00:00",
            0,
            "[1, 2]",
        ),
    ];

    // A subject's export.
    let export = export_task(RequestKind::ReturnOfData, MAIJA, dir.path()).await;
    let out = connector.run(&export).await.unwrap();
    let Outcome::Completed { note, files, .. } = out else {
        panic!("expected COMPLETED, got {out:?}");
    };
    assert!(note.starts_with("visits: exported 2; "), "{note}");
    let json: Vec<Value> =
        serde_json::from_slice(&written(&export, &files, "visits.json")).unwrap();
    assert_eq!(by_content(json), by_content(maija.to_vec()));

    // Flags written into BOOLEAN columns, a DATE rectified.
    for kind in [RequestKind::Restriction, RequestKind::Objection] {
        let out = connector
            .run(&task(kind, vec![email(MAIJA)], now(), Phase::Start))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
    }
    let out = connector
        .run(&rectification(
            vec![email(MAIJA)],
            &[("visit_day", "2024-02-01")],
        ))
        .await
        .unwrap();
    let Outcome::Completed { note, .. } = out else {
        panic!("expected COMPLETED, got {out:?}");
    };
    assert_eq!(
        note,
        "visits: updated 2 (visit_day); contacts: holds 1, not corrected (no rectify for \
         visit_day); customers: holds 1, not corrected (no rectify for visit_day)"
    );
    let state = "SELECT id, CAST(day AS TEXT), typeof(day), CAST(restricted AS INTEGER), \
                 CAST(opted_out AS INTEGER) FROM visits ORDER BY id";
    assert_eq!(
        rows(&db, state).await,
        [
            [
                json!(1),
                json!("2024-02-01"),
                json!("text"),
                json!(1),
                json!(1)
            ],
            [
                json!(2),
                json!("2024-02-01"),
                json!("text"),
                json!(1),
                json!(1)
            ],
            [
                json!(3),
                json!("2024-02-29"),
                json!("text"),
                json!(0),
                json!(0)
            ],
        ]
    );

    // An erasure: the 2015 visit is past its six years, the 2024 one kept until the end of
    // 2030 by its DATETIME, with the address only its own match finds it by. A repeated call
    // answers from the receipt.
    let erasure = task(
        RequestKind::Erasure,
        vec![email(MAIJA)],
        now(),
        Phase::Start,
    );
    let out = connector.run(&erasure).await.unwrap();
    let Outcome::Retained {
        ref note,
        records_affected,
        ..
    } = out
    else {
        panic!("expected RETAINED, got {out:?}");
    };
    assert!(
        note.starts_with(
            "visits: deleted 1, kept 1 until the end of 2030-12-31 (0 stripped now of what \
             the obligation does not need)"
        ),
        "{note}"
    );
    assert!(records_affected > 1, "{out:?}");
    let Outcome::Retained { note: again, .. } = connector.run(&erasure).await.unwrap() else {
        panic!("expected RETAINED");
    };
    assert_eq!(
        again,
        format!("erased by an earlier attempt of this task whose answer was lost: {note}")
    );
    let kept = "SELECT id, contact, CAST(seen AS TEXT) FROM visits ORDER BY id";
    assert_eq!(
        rows(&db, kept).await,
        [
            [json!(2), json!(MAIJA), json!("2024-01-31 10:00:00")],
            [
                json!(3),
                json!("matti.virtanen@example.fi"),
                json!("2024-02-29 08:30:00")
            ],
        ]
    );

    // A contract end of the customers' rows: its export, and its erasure, which keeps the
    // 2024 visit by its date.
    exec(
        &db,
        "INSERT INTO visits (id, customer_id, contact, seen, member, price) \
         VALUES (4, 2, 'matti.virtanen@example.fi', '2015-06-30 12:00:00', 0, 12.50)",
    )
    .await;
    let sink = crate::ExportSink::new(dir.path().join("ce"), vec!["billing".into()]);
    sink.reset().await.unwrap();
    let (job, rx) = bulk_job(
        "acme",
        crate::BulkOp::Export,
        Phase::Start,
        now(),
        Some(sink),
    );
    let (out, _) = run_bulk_watched(&connector, job, rx).await;
    let Outcome::Completed { note, .. } = out else {
        panic!("expected COMPLETED, got {out:?}");
    };
    assert!(note.starts_with("visits: exported 2; "), "{note}");
    let json: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("ce/visits.json")).unwrap()).unwrap();
    let mut matti = visit(
        3,
        "matti.virtanen@example.fi",
        "2024-02-29",
        "08:30:00",
        1,
        "null",
    );
    matti["price"] = json!(7);
    let four = json!({
        "id": 4, "contact": "matti.virtanen@example.fi", "seen": "2015-06-30 12:00:00",
        "day": null, "at": null, "member": 0, "price": 12.5, "data": null
    });
    assert_eq!(
        by_content(json.as_array().unwrap().clone()),
        by_content(vec![matti, four])
    );
    let (job, rx) = bulk_job("acme", crate::BulkOp::Erase, Phase::Start, now(), None);
    let (out, _) = run_bulk_watched(&connector, job, rx).await;
    let Outcome::Retained { note, until_ms, .. } = out else {
        panic!("expected RETAINED, got {out:?}");
    };
    assert!(
        note.contains("visits: deleted 1, visits: kept and stripped 1, ")
            && note.contains("; visits: kept 1 until the end of 2030-12-31; "),
        "{note}"
    );
    assert!(until_ms >= ms(2031, 1, 1), "{until_ms}");
    assert_eq!(
        rows(&db, kept).await,
        [
            [json!(2), json!(MAIJA), json!("2024-01-31 10:00:00")],
            [json!(3), Value::Null, json!("2024-02-29 08:30:00")],
        ]
    );
}
