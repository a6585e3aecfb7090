//! What a restriction, an objection and a rectification answer about the subject's rows
//! they leave as they are: rows only in tables the kind is not configured for are refused,
//! not denied; rows already as asked are found, not counted; and a correction never gives
//! the subject's identity to another person's row. Each scenario on SQLite and PostgreSQL.

use dsrelay_proto::v1::{IdentityEncoding, IdentityType, RequestKind};
use serde_json::json;

use super::tests::{
    email, everything, fresh_postgres_database, ident, now, on_both_backends, rectification, rows,
    sample, task, MAIJA,
};
use super::*;

/// A contact person of the sample: a subject of their own, found by e-mail only in
/// `contacts`, which no rule restricts, suppresses or corrects.
const PEKKA: &str = "pekka.meikalainen@example.fi";
const TEEMU: &str = "teemu.testaaja@example.fi";

on_both_backends!(
    a_subject_only_in_unconfigured_tables_is_refused_not_denied,
    a_flag_already_held_is_found_and_not_counted,
    a_correction_to_the_value_held_is_found_and_not_counted,
    a_correction_to_another_rows_identity_is_refused,
);

fn start(kind: RequestKind, who: &str) -> Task {
    task(kind, vec![email(who)], now(), Phase::Start)
}

async fn a_subject_only_in_unconfigured_tables_is_refused_not_denied(url: String) {
    let (connector, db) = sample(&url).await;
    let before = everything(&db).await;
    let refused = |reason: &str| Outcome::Refused {
        reason: reason.into(),
    };
    assert_eq!(
        connector
            .run(&start(RequestKind::Restriction, PEKKA))
            .await
            .unwrap(),
        refused(
            "nothing restricted: the subject's rows are only in tables that no rule lets a \
             restriction act on (no restrict_column): contacts: 1"
        )
    );
    let mut lift = start(RequestKind::Restriction, PEKKA);
    lift.parameters.lift_restriction = true;
    assert_eq!(
        connector.run(&lift).await.unwrap(),
        refused(
            "nothing lifted: the subject's rows are only in tables that no rule lets the \
             lifting of a restriction act on (no restrict_column): contacts: 1"
        )
    );
    assert_eq!(
        connector
            .run(&start(RequestKind::Objection, PEKKA))
            .await
            .unwrap(),
        refused(
            "nothing opted out: the subject's rows are only in tables that no rule lets an \
             objection act on (no suppress_column): contacts: 1"
        )
    );
    assert_eq!(
        connector
            .run(&rectification(
                vec![email(PEKKA)],
                &[("email", "pekka@example.fi")]
            ))
            .await
            .unwrap(),
        refused(
            "nothing corrected: the subject's rows are only in tables that no rule lets a \
             rectification of these fields act on (no rectify for email): contacts: 1"
        )
    );
    assert_eq!(everything(&db).await, before, "a refusal changes nothing");
    // The same person's return of data exports the row the refusals name.
    let dir = tempfile::tempdir().unwrap();
    let export = super::tests::export_task(RequestKind::ReturnOfData, PEKKA, dir.path()).await;
    let Outcome::Completed {
        records_affected: 1,
        ..
    } = connector.run(&export).await.unwrap()
    else {
        panic!("expected the contact's row exported");
    };
    // A subject no table holds is still not found.
    for kind in [RequestKind::Restriction, RequestKind::Objection] {
        let out = connector
            .run(&start(kind, "nobody@example.fi"))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::NotFound { .. }), "{out:?}");
    }
}

async fn a_flag_already_held_is_found_and_not_counted(url: String) {
    let (connector, db) = sample(&url).await;
    let flags = "SELECT processing_restricted, marketing_opt_out FROM customers WHERE id = 1";
    let completed = |records_affected: i64, note: &str| Outcome::Completed {
        records_affected,
        note: note.into(),
        files: Vec::new(),
        erased: Vec::new(),
    };
    let restricted = "contacts: holds 1, not restricted (no restrict_column)";
    let lifted = "contacts: holds 1, not lifted (no restrict_column)";
    let opted_out = "contacts: holds 1, not opted out (no suppress_column)";
    // Lifting a restriction never set changes nothing, and the data is there.
    let mut lift = start(RequestKind::Restriction, MAIJA);
    lift.parameters.lift_restriction = true;
    assert_eq!(
        connector.run(&lift).await.unwrap(),
        completed(
            0,
            &format!("customers: restriction lifted 0, 1 already were; {lifted}")
        )
    );
    let restrict = start(RequestKind::Restriction, MAIJA);
    assert_eq!(
        connector.run(&restrict).await.unwrap(),
        completed(1, &format!("customers: restricted 1; {restricted}"))
    );
    assert_eq!(
        connector.run(&restrict).await.unwrap(),
        completed(
            0,
            &format!("customers: restricted 0, 1 already were; {restricted}")
        )
    );
    let object = start(RequestKind::Objection, MAIJA);
    assert_eq!(
        connector.run(&object).await.unwrap(),
        completed(1, &format!("customers: opted out 1; {opted_out}"))
    );
    assert_eq!(
        connector.run(&object).await.unwrap(),
        completed(
            0,
            &format!("customers: opted out 0, 1 already were; {opted_out}")
        )
    );
    assert_eq!(rows(&db, flags).await, [[json!(1), json!(1)]]);
}

/// Runs `sql` on the test's own connection, failing the test with the statement on error.
async fn exec_on(db: &dsrelay_runtime::store::Db, sql: &str) {
    sqlx::query(sql)
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn a_correction_to_the_value_held_is_found_and_not_counted(url: String) {
    let (connector, db) = sample(&url).await;
    let before = everything(&db).await;
    let held = "Mannerheimintie 12 A 3, 00100 Helsinki";
    let out = connector
        .run(&rectification(vec![email(MAIJA)], &[("address", held)]))
        .await
        .unwrap();
    assert_eq!(
        out,
        Outcome::Completed {
            records_affected: 0,
            note: "customers: updated 0 (address), 1 already held the corrected values; \
                   contacts: holds 1, not corrected (no rectify for address)"
                .into(),
            files: Vec::new(),
            erased: Vec::new(),
        }
    );
    assert_eq!(everything(&db).await, before);
    // Of two corrected fields, one new value is enough for the row to change, and a NULL
    // held is a value to correct (`<>` would take it for no difference).
    exec_on(&db, "UPDATE customers SET phone = NULL WHERE id = 1").await;
    let out = connector
        .run(&rectification(
            vec![email(MAIJA)],
            &[("address", held), ("phone", "+358401234567")],
        ))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected: 1,
        ..
    } = out
    else {
        panic!("expected one row corrected, got {out:?}");
    };
    assert_eq!(
        rows(&db, "SELECT phone FROM customers WHERE id = 1").await,
        [[json!("+358401234567")]]
    );
}

async fn a_correction_to_another_rows_identity_is_refused(url: String) {
    let (connector, db) = sample(&url).await;
    let before = everything(&db).await;
    let phone = ident(
        IdentityType::Phone,
        IdentityEncoding::Raw,
        "+358 40 555 6666",
    );
    // Teemu's address as the match compares it (case and spaces aside), his phone number
    // with separators.
    for (field, value, column) in [
        ("email", "  Teemu.Testaaja@EXAMPLE.fi ", "customers.email"),
        ("phone", "+358 (40) 555-6666", "customers.phone"),
    ] {
        let out = connector
            .run(&rectification(vec![email(MAIJA)], &[(field, value)]))
            .await
            .unwrap();
        let Outcome::Refused { reason } = out else {
            panic!("expected REFUSED for {field}, got {out:?}");
        };
        assert!(
            reason.contains(&format!("{field:?}")) && reason.contains(column),
            "{reason}"
        );
        assert!(!reason.to_lowercase().contains("teemu"), "{reason}");
        assert!(!reason.contains("555"), "{reason}");
        assert!(reason.contains("nothing was changed"), "{reason}");
    }
    assert_eq!(everything(&db).await, before, "a refusal changes nothing");
    // Teemu's own requests still find his row alone.
    let out = connector
        .run(&task(
            RequestKind::Restriction,
            vec![email(TEEMU), phone],
            now(),
            Phase::Start,
        ))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        ..
    } = out
    else {
        panic!("expected Teemu's row restricted, got {out:?}");
    };
    assert!(note.starts_with("customers: restricted 1;"), "{note}");
    // A value one of the subject's own rows holds is no other person's: the sample's two
    // Maija rows, both hers by the identities given, may share an address.
    let other_maija = "maija.meikalainen@example.com";
    let out = connector
        .run(&rectification(
            vec![email(MAIJA), email(other_maija)],
            &[("email", other_maija)],
        ))
        .await
        .unwrap();
    let Outcome::Completed {
        records_affected: 1,
        note,
        ..
    } = out
    else {
        panic!("expected Maija's row corrected, got {out:?}");
    };
    assert!(note.starts_with("customers: updated 1 (email);"), "{note}");
    assert_eq!(
        rows(
            &db,
            "SELECT email FROM customers WHERE id IN (1, 5) ORDER BY id"
        )
        .await,
        [[json!(other_maija)], [json!(other_maija)]]
    );
}
