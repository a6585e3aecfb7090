//! Receipts: the connector's own table in the holder's database, one row per erasure task,
//! per retention run of one ([`retention_key`]) and per rectification task, written in the
//! transaction of the work itself.
//!
//! The processor runs a task again when an earlier call's answer was never recorded (it or
//! its database stopped while the holder worked). Reading the holder afterwards cannot tell
//! "erased by that call" from "never there", nor find a subject whose matched e-mail that
//! call corrected, so a retry would answer NOT_FOUND (or 0 records) for work its own task
//! did. The receipt answers instead: the work stores its report under its task's key; when
//! the key is already there, the earlier call committed, this call's work is rolled back,
//! and the stored report is the answer. A receipt holds the task key and the report
//! (counts, the note, what is kept and until when): no identity or corrected values.
//!
//! Beside it, the table of what contract ends' exports returned ([`ensure_returned_table`]):
//! the keys of the rows each export wrote, which the erasure after the return checks and
//! confines itself to (see `bulk`).

use dsrelay_runtime::store::{Backend, Db};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::{Any, Transaction};

use super::execute::classify;
use super::plan::quote;
use crate::ConnectorError;

/// The receipt table's name when the configuration names none.
pub const DEFAULT_RECEIPTS_TABLE: &str = "dsrelay_erasure_receipts";

/// The receipt key of the run of `task_id` at the retain-until date `until_ms`: each run
/// erases what its date released, so each needs a receipt of its own, apart from the first
/// run's (keyed by the task id alone). Request ids are printable ASCII without spaces, so
/// the suffix cannot be read as part of another task's id.
pub(super) fn retention_key(task_id: &str, until_ms: i64) -> String {
    format!("{task_id} retention {until_ms}")
}

/// Makes sure `table` exists in `db` and that the connector can use it: read first, so that
/// a table the database administrator created beforehand needs no CREATE grant, then
/// created when missing ([`created_or_found`]: replicas of a processor starting together on
/// one holder database may create it at once).
pub(super) async fn ensure_table(db: &Db, table: &str) -> anyhow::Result<()> {
    let t = quote(table);
    let probe = format!("SELECT task_key, report, erased_at FROM {t} WHERE 1 = 0");
    if sqlx::query(&probe).execute(&db.pool).await.is_ok() {
        return Ok(());
    }
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {t} (task_key TEXT PRIMARY KEY, report TEXT NOT NULL, \
         erased_at BIGINT NOT NULL)"
    );
    if let Err(e) = created_or_found(db, &create, &probe).await {
        anyhow::bail!(
            "creating the erasure receipt table {table:?} in the holder database: {e}; the \
             connector's database user needs the right to create it (on PostgreSQL: GRANT \
             CREATE ON SCHEMA <schema> TO <user>), or create it beforehand with `{create}` and \
             GRANT SELECT, INSERT ON {t} TO <user>"
        );
    }
    if let Err(e) = sqlx::query(&probe).execute(&db.pool).await {
        anyhow::bail!(
            "reading the erasure receipt table {table:?} in the holder database: {e}; GRANT \
             SELECT, INSERT ON {t} TO the connector's database user"
        );
    }
    Ok(())
}

/// Makes sure `table`, the keys of the rows contract ends' exports returned (`job`: the
/// export's job id, `tbl`: the configured table, `k`: the row's key text, see
/// [`super::schema::ColumnTypes::row_key`]), exists in `db` and can be used, as
/// [`ensure_table`] does for the receipts. On PostgreSQL `k` compares bytewise (`COLLATE
/// "C"`, as the keys are written and compared), so that the primary key's index serves the
/// lookups and no collation takes two keys for one.
///
/// A failure is classified as the statements' errors are ([`classify`]): a busy SQLite file
/// or a lost PostgreSQL connection is transient, a missing right or a bad definition
/// permanent.
pub(super) async fn ensure_returned_table(db: &Db, table: &str) -> Result<(), ConnectorError> {
    let t = quote(table);
    let probe = format!("SELECT job, tbl, k FROM {t} WHERE 1 = 0");
    if sqlx::query(&probe).execute(&db.pool).await.is_ok() {
        return Ok(());
    }
    let create = match db.backend {
        Backend::Postgres => format!(
            "CREATE TABLE IF NOT EXISTS {t} (job TEXT NOT NULL, tbl TEXT NOT NULL, \
             k TEXT COLLATE \"C\" NOT NULL, PRIMARY KEY (job, tbl, k))"
        ),
        Backend::Sqlite => format!(
            "CREATE TABLE IF NOT EXISTS {t} (job TEXT NOT NULL, tbl TEXT NOT NULL, \
             k TEXT NOT NULL, PRIMARY KEY (job, tbl, k)) WITHOUT ROWID"
        ),
    };
    let grant = format!("GRANT SELECT, INSERT, DELETE ON {t} TO <user>");
    if let Err(e) = created_or_found(db, &create, &probe).await {
        let doing = format!(
            "creating the table {table:?} of what contract ends returned in the holder \
             database"
        );
        let mut err = classify(&doing, &e);
        if let ConnectorError::Permanent(m) = &mut err {
            m.push_str(&format!(
                "; the connector's database user needs the right to create it (on \
                 PostgreSQL: GRANT CREATE ON SCHEMA <schema> TO <user>), or create it \
                 beforehand with `{create}` and {grant}"
            ));
        }
        return Err(err);
    }
    if let Err(e) = sqlx::query(&probe).execute(&db.pool).await {
        let doing = format!(
            "reading the table {table:?} of what contract ends returned in the holder \
             database"
        );
        let mut err = classify(&doing, &e);
        if let ConnectorError::Permanent(m) = &mut err {
            m.push_str(&format!("; {grant}"));
        }
        return Err(err);
    }
    Ok(())
}

/// Runs `create`; when it fails, `probe` decides: two first exports creating the table at
/// once can fail one on PostgreSQL (a duplicate in `pg_type`, or the table already there)
/// although the table is then there to use. `create`'s error when the probe fails too.
pub(super) async fn created_or_found(
    db: &Db,
    create: &str,
    probe: &str,
) -> Result<(), sqlx::Error> {
    let Err(e) = sqlx::query(create).execute(&db.pool).await else {
        return Ok(());
    };
    match sqlx::query(probe).execute(&db.pool).await {
        Ok(_) => Ok(()),
        Err(_) => Err(e),
    }
}

/// Stores `report` under `key` in `tx`, as the receipt of the erasure that did this work:
/// `None` when the key was new, or the report of an earlier call that committed under it.
/// The caller must then undo this call's work (roll back), so that the task is answered
/// once, as that call did it. A concurrent call of the same task waits on the key until the
/// other transaction ends, then finds its receipt, or stores its own if it rolled back.
///
/// Storing at the end, not claiming the key first, costs one statement (on PostgreSQL a
/// round trip) instead of two on every erasure; the price, redoing the work and rolling it
/// back, is paid only by a retry whose first call committed.
pub(super) async fn store<R: Serialize + DeserializeOwned>(
    tx: &mut Transaction<'static, Any>,
    table: &str,
    key: &str,
    report: &R,
    now_ms: i64,
) -> Result<Option<R>, ConnectorError> {
    let t = quote(table);
    let json = serde_json::to_string(report)
        .map_err(|e| ConnectorError::Permanent(format!("encoding the erasure receipt: {e}")))?;
    let inserted = sqlx::query(&format!(
        "INSERT INTO {t} (task_key, report, erased_at) VALUES ($1, $2, $3) \
         ON CONFLICT (task_key) DO NOTHING"
    ))
    .bind(key)
    .bind(json)
    .bind(now_ms)
    .execute(&mut **tx)
    .await
    .map_err(|e| classify("storing the erasure receipt", &e))?;
    if inserted.rows_affected() > 0 {
        return Ok(None);
    }
    match find(&mut **tx, table, key).await? {
        Some(earlier) => Ok(Some(earlier)),
        None => Err(ConnectorError::Transient(format!(
            "the erasure receipt of this task in {table:?} was taken and is gone"
        ))),
    }
}

/// What a call of `task_key` that failed with `failed` answers: the report of an earlier
/// call that committed under the key, when there is one (this call's work is rolled back,
/// and the task was done), else `failed`. Without it, a retry of a committed erasure could
/// fail on data changed since (a row added without a date), where the erasure it repeats
/// was carried out. A receipt that cannot be read leaves `failed` as the answer.
pub(super) async fn or_earlier<'c, R: DeserializeOwned>(
    on: impl sqlx::Executor<'c, Database = Any>,
    table: &str,
    task_key: Option<&str>,
    failed: ConnectorError,
) -> Result<(R, bool), ConnectorError> {
    let Some(key) = task_key else {
        return Err(failed);
    };
    match find(on, table, key).await {
        Ok(Some(earlier)) => Ok((earlier, true)),
        Ok(None) | Err(_) => Err(failed),
    }
}

/// The report stored under `key`, if the work committed under it (or stored it earlier
/// in the same transaction).
pub(super) async fn find<'c, R: DeserializeOwned>(
    on: impl sqlx::Executor<'c, Database = Any>,
    table: &str,
    key: &str,
) -> Result<Option<R>, ConnectorError> {
    let stored: Option<String> = sqlx::query_scalar(&format!(
        "SELECT report FROM {} WHERE task_key = $1",
        quote(table)
    ))
    .bind(key)
    .fetch_optional(on)
    .await
    .map_err(|e| classify("reading the erasure receipt", &e))?;
    stored
        .map(|stored| {
            serde_json::from_str(&stored).map_err(|e| {
                ConnectorError::Permanent(format!(
                    "the erasure receipt of this task in {table:?} is unreadable: {e}"
                ))
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::tests::fresh_postgres_database;

    /// Replicas of a processor starting together on a fresh holder database create the
    /// receipt table at once, and PostgreSQL's `CREATE TABLE IF NOT EXISTS` can fail one of
    /// them (a duplicate in `pg_type`), which stopped that replica's start. Two at once, a new
    /// table each round: a round that races fails without the probe after the CREATE.
    #[tokio::test]
    async fn postgres_receipt_table_created_by_two_at_once() {
        let test = "postgres_receipt_table_created_by_two_at_once";
        let Some(holder) = fresh_postgres_database(test).await else {
            return;
        };
        let a = Db::connect(&holder.url).await.unwrap();
        let b = Db::connect(&holder.url).await.unwrap();
        for round in 0..40 {
            let table = format!("receipts_{round}");
            let (first, second) = tokio::join!(ensure_table(&a, &table), ensure_table(&b, &table));
            first.unwrap();
            second.unwrap();
        }
        a.pool.close().await;
        b.pool.close().await;
        holder.drop_database().await;
    }
}
