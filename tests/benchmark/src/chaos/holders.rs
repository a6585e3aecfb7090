//! The subprocessors of the chaos run: SQLite databases the processor's SQL connector erases
//! from, each seeded with one row per subject and a trigger that writes every DELETE and
//! UPDATE of those rows into an `effects` table in the same transaction. The effects table
//! is the holder's own record of what was done to it, however often the processor asked.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use dsrelay_connectors::sql::{Action, SqlConnectorConfig, TableRule};
use dsrelay_runtime::store::Db;

/// Rows per INSERT while seeding.
const PER_STATEMENT: usize = 500;

/// The e-mail address of subject `n`; the idempotency key of its erasure is the part before
/// the `@` (as [`crate::relay::erasure`] builds the address from the key).
pub(crate) fn subject_key(n: u64) -> String {
    format!("chaos-{n:06}")
}

/// One holder: a name (its subprocessor's) and a SQLite database.
pub(crate) struct Holder {
    /// The subprocessor's name in the processor's configuration.
    pub(crate) name: String,
    /// `sqlite://...` of its database.
    pub(crate) url: String,
}

/// What one holder's database says about one subject.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SubjectEffects {
    /// Whether the subject's row is still there.
    pub(crate) present: bool,
    /// DELETEs of its row the trigger recorded.
    pub(crate) deletes: i64,
    /// UPDATEs of its row the trigger recorded (the rule only deletes: any is unexpected).
    pub(crate) updates: i64,
}

impl Holder {
    /// Creates the holder's database in `dir` with `subjects` rows, `chaos-000000@...` on.
    pub(crate) async fn create(dir: &Path, name: &str, subjects: u64) -> Result<Self> {
        let url = format!("sqlite://{}/{name}.db", dir.display());
        let db = Db::connect(&url).await?;
        for statement in [
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE)",
            "CREATE TABLE effects (id INTEGER PRIMARY KEY AUTOINCREMENT, email TEXT NOT NULL, \
             op TEXT NOT NULL)",
            "CREATE TRIGGER customers_deleted AFTER DELETE ON customers \
             BEGIN INSERT INTO effects (email, op) VALUES (OLD.email, 'delete'); END",
            "CREATE TRIGGER customers_updated AFTER UPDATE ON customers \
             BEGIN INSERT INTO effects (email, op) VALUES (OLD.email, 'update'); END",
        ] {
            sqlx::query(statement)
                .execute(&db.pool)
                .await
                .with_context(|| format!("creating the holder {name}"))?;
        }
        let mut tx = db.pool.begin().await?;
        let mut next = 0u64;
        while next < subjects {
            let end = (next + PER_STATEMENT as u64).min(subjects);
            let values = (next..end)
                .map(|n| format!("({}, '{}@example.com')", n + 1, subject_key(n)))
                .collect::<Vec<_>>()
                .join(", ");
            sqlx::query(&format!(
                "INSERT INTO customers (id, email) VALUES {values}"
            ))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("seeding the holder {name}"))?;
            next = end;
        }
        tx.commit().await?;
        db.pool.close().await;
        Ok(Self {
            name: name.to_string(),
            url,
        })
    }

    /// The SQL connector's configuration: erasure deletes the subject's row, matched by
    /// e-mail address.
    pub(crate) fn connector(&self) -> SqlConnectorConfig {
        SqlConnectorConfig {
            url: self.url.clone(),
            tables: vec![TableRule {
                table: "customers".into(),
                action: Action::Delete,
                parent: None,
                match_columns: [("email".to_string(), "email".to_string())]
                    .into_iter()
                    .collect(),
                anonymize: Default::default(),
                export: Vec::new(),
                rectify: Default::default(),
                restrict_column: None,
                suppress_column: None,
                retain: None,
                categories: None,
            }],
            controllers: Default::default(),
            receipts_table: None,
        }
    }

    /// Every seeded subject's key to what the database says about it.
    pub(crate) async fn effects(&self) -> Result<HashMap<String, SubjectEffects>> {
        let db = Db::connect(&self.url).await?;
        let mut out: HashMap<String, SubjectEffects> = HashMap::new();
        let present: Vec<String> = sqlx::query_scalar("SELECT email FROM customers")
            .fetch_all(&db.pool)
            .await?;
        for email in present {
            out.entry(key_of(&email)).or_default().present = true;
        }
        let effects: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT email, op, COUNT(*) FROM effects GROUP BY email, op")
                .fetch_all(&db.pool)
                .await?;
        for (email, op, n) in effects {
            let e = out.entry(key_of(&email)).or_default();
            if op == "delete" {
                e.deletes += n;
            } else {
                e.updates += n;
            }
        }
        db.pool.close().await;
        Ok(out)
    }
}

fn key_of(email: &str) -> String {
    email.split('@').next().unwrap_or(email).to_string()
}
