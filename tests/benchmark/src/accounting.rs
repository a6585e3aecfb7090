//! The sample accounting schema of the `sql` connector filled with many customers, for the
//! scenarios whose SQL subprocessor holds real data (`contract`, `onehop`), and the check
//! that an erasure of some of them did exactly what the sample rules say.
//!
//! Customer `i` (from 1) has the customer number `C-{i}`, one contact, one paid invoice and
//! one ledger entry from 2010, each with id `i`: past every retention period of the sample
//! rules, so that an erasure deletes the customer, the contact and the invoice and
//! anonymizes the ledger entry at once. The same file works on SQLite and PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use dsrelay_connectors::sql::REDACTED;
use dsrelay_runtime::store::{Backend, Db};

/// Customers per INSERT statement while filling.
const PER_STATEMENT: u64 = 500;
/// INSERT statements (of each table) per transaction while filling.
const STATEMENTS_PER_COMMIT: usize = 200;

/// Customer `i`'s customer number, the identity an erasure of them can name.
pub(crate) fn customer_number(i: u64) -> String {
    format!("C-{i}")
}

fn customer_name(i: u64) -> String {
    format!("Asiakas {i}")
}

fn customer_email(i: u64) -> String {
    format!("asiakas.{i}@example.fi")
}

fn contact_email(i: u64) -> String {
    format!("yhteys.{i}@example.fi")
}

fn ledger_description(i: u64) -> String {
    format!("myynti asiakas {i}")
}

/// The sample accounting schema at `url` (SQLite or PostgreSQL) with its sample rows replaced
/// by `subjects` customers (see the module doc). Returns the rows written.
pub(crate) async fn fill(url: &str, subjects: u64) -> Result<u64> {
    dsrelay_connectors::sql::create_sample_accounting_db(url).await?;
    let db = Db::connect(url).await?;
    for table in ["contacts", "invoices", "ledger_entries", "customers"] {
        sqlx::query(&format!("DELETE FROM {table}"))
            .execute(&db.pool)
            .await?;
    }
    let mut next = 0u64;
    while next < subjects {
        let mut tx = db.pool.begin().await?;
        for _ in 0..STATEMENTS_PER_COMMIT {
            let n = PER_STATEMENT.min(subjects - next);
            if n == 0 {
                break;
            }
            let ids = next + 1..=next + n;
            let rows =
                |f: &dyn Fn(u64) -> String| ids.clone().map(f).collect::<Vec<_>>().join(", ");
            let statements = [
                format!(
                    "INSERT INTO customers (id, customer_no, name, email, phone, address) VALUES {}",
                    rows(&|i| format!(
                        "({i}, '{}', '{}', '{}', '+35840{i:07}', 'Katu {i}, 00100 Helsinki')",
                        customer_number(i),
                        customer_name(i),
                        customer_email(i)
                    ))
                ),
                format!(
                    "INSERT INTO contacts (id, customer_id, name, email, phone) VALUES {}",
                    rows(&|i| format!(
                        "({i}, {i}, 'Yhteyshenkilö {i}', '{}', NULL)",
                        contact_email(i)
                    ))
                ),
                format!(
                    "INSERT INTO invoices (id, customer_id, customer_name, customer_email, \
                     amount_cents, issued_on, status) VALUES {}",
                    rows(&|i| format!(
                        "({i}, {i}, '{}', '{}', {}, '2010-05-01', 'paid')",
                        customer_name(i),
                        customer_email(i),
                        1000 + i % 90_000
                    ))
                ),
                format!(
                    "INSERT INTO ledger_entries (id, customer_id, booked_on, account, \
                     amount_cents, description) VALUES {}",
                    rows(&|i| format!(
                        "({i}, {i}, '2010-05-01', '3000', {}, '{}')",
                        1000 + i % 90_000,
                        ledger_description(i)
                    ))
                ),
            ];
            for s in statements {
                sqlx::query(&s)
                    .execute(&mut *tx)
                    .await
                    .context("filling the accounting database")?;
            }
            next += n;
        }
        tx.commit().await?;
    }
    if db.backend == Backend::Sqlite {
        // A file copy (the contract end's bare run) is then taken from the main file alone.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&db.pool)
            .await?;
    } else {
        // Fresh statistics, so that the planner uses the indexes from the first erasure on.
        sqlx::query("ANALYZE").execute(&db.pool).await?;
    }
    db.pool.close().await;
    Ok(subjects * 4)
}

/// The customers left at `url`.
pub(crate) async fn count_customers(url: &str) -> Result<i64> {
    let db = Db::connect(url).await?;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM customers")
        .fetch_one(&db.pool)
        .await?;
    db.pool.close().await;
    Ok(n)
}

/// Checks the database at `url`, filled by [`fill`] with `subjects` customers, after the
/// customers in `erased` were erased and nobody else was: every erased customer's customer
/// row, contact and invoice gone and their ledger entry anonymized (no customer, description
/// [`REDACTED`]); every other customer's four rows exactly as filled. Fails naming the first
/// few rows that differ.
pub(crate) async fn check_erased(url: &str, subjects: u64, erased: &BTreeSet<u64>) -> Result<()> {
    let db = Db::connect(url).await?;
    let result = check_in(&db, subjects, erased).await;
    db.pool.close().await;
    result
}

async fn check_in(db: &Db, subjects: u64, erased: &BTreeSet<u64>) -> Result<()> {
    type Text = Option<String>;
    let mut wrong = Vec::new();
    let mut note = |what: String| {
        if wrong.len() < 5 {
            wrong.push(what);
        }
    };
    let customers: BTreeMap<i64, (String, String, Text)> =
        sqlx::query_as::<_, (i64, String, String, Text)>(
            "SELECT id, customer_no, name, email FROM customers",
        )
        .fetch_all(&db.pool)
        .await
        .context("reading the customers")?
        .into_iter()
        .map(|(id, no, name, email)| (id, (no, name, email)))
        .collect();
    let by_customer = |sql: &'static str| async move {
        let rows: Vec<(i64, Option<i64>, Text)> = sqlx::query_as(sql)
            .fetch_all(&db.pool)
            .await
            .with_context(|| format!("reading: {sql}"))?;
        anyhow::Ok(
            rows.into_iter()
                .map(|(id, customer, text)| (id, (customer, text)))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    let contacts = by_customer("SELECT id, customer_id, email FROM contacts").await?;
    let invoices = by_customer("SELECT id, customer_id, customer_email FROM invoices").await?;
    let ledger = by_customer("SELECT id, customer_id, description FROM ledger_entries").await?;
    for i in 1..=subjects {
        let id = i as i64;
        let mine = Some(id);
        if erased.contains(&i) {
            if customers.contains_key(&id) {
                note(format!("erased customer {i} is still in customers"));
            }
            if contacts.contains_key(&id) {
                note(format!("erased customer {i}'s contact is still there"));
            }
            if invoices.contains_key(&id) {
                note(format!("erased customer {i}'s invoice is still there"));
            }
            match ledger.get(&id) {
                Some((None, Some(d))) if d == REDACTED => {}
                other => note(format!(
                    "erased customer {i}'s ledger entry is {other:?}, not anonymized"
                )),
            }
        } else {
            let expected = (
                customer_number(i),
                customer_name(i),
                Some(customer_email(i)),
            );
            if customers.get(&id) != Some(&expected) {
                note(format!(
                    "customer {i}, never erased, is {:?}",
                    customers.get(&id)
                ));
            }
            for (table, rows, text) in [
                ("contact", &contacts, contact_email(i)),
                ("invoice", &invoices, customer_email(i)),
                ("ledger entry", &ledger, ledger_description(i)),
            ] {
                if rows.get(&id) != Some(&(mine, Some(text))) {
                    note(format!(
                        "customer {i}, never erased: their {table} is {:?}",
                        rows.get(&id)
                    ));
                }
            }
        }
    }
    let kept = subjects - erased.len() as u64;
    let counts = [
        ("customers", customers.len() as u64, kept),
        ("contacts", contacts.len() as u64, kept),
        ("invoices", invoices.len() as u64, kept),
        ("ledger_entries", ledger.len() as u64, subjects),
    ];
    for (table, found, expected) in counts {
        if found != expected {
            note(format!("{table} has {found} rows, not {expected}"));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "the holder's database does not show exactly the {} erasures: {}",
            erased.len(),
            wrong.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(url: &str, statements: &[String]) {
        let db = Db::connect(url).await.unwrap();
        for s in statements {
            sqlx::query(s).execute(&db.pool).await.unwrap();
        }
        db.pool.close().await;
    }

    #[tokio::test]
    async fn the_check_sees_exactly_the_erasures() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/accounting.db", dir.path().display());
        assert_eq!(fill(&url, 20).await.unwrap(), 80);
        let nobody = BTreeSet::new();
        check_erased(&url, 20, &nobody).await.unwrap();

        // What the sample rules do to customer 3 (the connector's own tests hold it to them).
        run(
            &url,
            &[
                "DELETE FROM contacts WHERE customer_id = 3".into(),
                "DELETE FROM invoices WHERE customer_id = 3".into(),
                format!(
                    "UPDATE ledger_entries SET customer_id = NULL, description = '{REDACTED}' \
                     WHERE customer_id = 3"
                ),
                "DELETE FROM customers WHERE id = 3".into(),
            ],
        )
        .await;
        let three = BTreeSet::from([3]);
        check_erased(&url, 20, &three).await.unwrap();
        let e = check_erased(&url, 20, &nobody).await.unwrap_err();
        assert!(format!("{e}").contains("customer 3, never erased"), "{e}");
        let e = check_erased(&url, 20, &BTreeSet::from([3, 4]))
            .await
            .unwrap_err();
        assert!(
            format!("{e}").contains("erased customer 4 is still in customers"),
            "{e}"
        );

        // Half an erasure, and a row of someone never asked about.
        run(
            &url,
            &[
                "DELETE FROM contacts WHERE customer_id = 7".into(),
                "UPDATE ledger_entries SET description = 'x' WHERE customer_id = 9".into(),
            ],
        )
        .await;
        let e = check_erased(&url, 20, &BTreeSet::from([3, 7]))
            .await
            .unwrap_err();
        let e = format!("{e}");
        assert!(e.contains("erased customer 7 is still in customers"), "{e}");
        assert!(
            e.contains("customer 9, never erased: their ledger entry"),
            "{e}"
        );
    }
}
