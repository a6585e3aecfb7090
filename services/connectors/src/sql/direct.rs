//! Reading an export from a SQLite file on a connection of the export's own, on one thread of
//! the blocking pool that reads, encodes and hands the export writer its blocks.
//!
//! Through sqlx, every SQLite connection runs on a thread of its own that sends each row to
//! the task reading it; the task took rows more slowly than SQLite yielded them, so every row
//! woke the parked thread, and waking, parking and copying each row into sqlx's `AnyRow`
//! cost more than reading and encoding it (docs/benchmarks.md, session 16). Writes and the
//! reads that decide them stay on sqlx: this reads, on a connection that refuses writes
//! (`query_only`), except for a contract end's export, whose connection is left writable for
//! its record of the rows it returns (see [`read`]).
//!
//! The read is one transaction, as through sqlx: every table of an export comes from the same
//! snapshot, which WAL gives a reader without blocking the connector's writer. A contract
//! end's export records the keys of its rows in a TEMP table in that transaction, and
//! copies them into the file's table in a short write transaction once it has read.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};

use super::execute::{Cell, ReadTx, TableFiles};
use super::plan::Statement;
use super::rules::TableRule;
use crate::export::ExportSink;
use crate::{ConnectorError, ExportedFile};

/// How long a statement waits for a lock before SQLITE_BUSY, as the sqlx connections do.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One read transaction on a connection of its own.
pub(super) struct Reading {
    conn: Connection,
    /// Set when the export's caller has gone away (its future was dropped): the thread stops
    /// at the next row instead of writing files nobody will read.
    abandoned: Arc<AtomicBool>,
}

/// Sets its flag when dropped: the caller's future ended before the thread did.
struct Abandon(Arc<AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `work` in a read transaction on `path`, on the blocking pool; `work` may block on the
/// runtime (`Handle::current().block_on`) for the export writer. `writes` (a contract end's
/// record of the rows it returns, which names the table of the keys `keys_table`) run first
/// in the transaction, into a TEMP table of that name, which hides the database's own on
/// this connection: a TEMP table is a database of its own, so writing it takes no lock on
/// the holder's file and the transaction stays a read of one snapshot, which WAL gives
/// without blocking the holder's writers. Once `work` is done, one short write transaction
/// replaces the job's keys in the file's table with them. Without `writes` the connection
/// refuses writes. When either fails, it is rolled back as the connection closes.
pub(super) async fn read<T, W>(
    path: &Path,
    keys_table: &str,
    writes: Vec<Statement>,
    work: W,
) -> Result<T, ConnectorError>
where
    T: Send + 'static,
    W: FnOnce(&mut Reading) -> Result<T, ConnectorError> + Send + 'static,
{
    let path: PathBuf = path.to_owned();
    let keys = super::plan::quote(keys_table);
    let abandoned = Arc::new(AtomicBool::new(false));
    let guard = Abandon(abandoned.clone());
    let done = tokio::task::spawn_blocking(move || {
        let mut reading = Reading {
            conn: open(&path, writes.is_empty())?,
            abandoned,
        };
        reading
            .conn
            .execute_batch("BEGIN")
            .map_err(|e| classify("starting the export's read", &e))?;
        if !writes.is_empty() {
            let create = format!(
                "CREATE TEMP TABLE {keys} (job TEXT NOT NULL, tbl TEXT NOT NULL, \
                 k TEXT NOT NULL, PRIMARY KEY (job, tbl, k))"
            );
            let doing = "recording what the export returns";
            reading
                .conn
                .execute_batch(&create)
                .map_err(|e| classify(doing, &e))?;
            for write in &writes {
                reading
                    .prepare(write, doing)?
                    .raw_execute()
                    .map_err(|e| classify(doing, &e))?;
            }
        }
        let out = work(&mut reading)?;
        reading
            .conn
            .execute_batch("COMMIT")
            .map_err(|e| classify("finishing the export", &e))?;
        if !writes.is_empty() {
            // The connector's own table only: the holder's writers wait for this alone.
            let store = format!(
                "BEGIN IMMEDIATE; \
                 DELETE FROM main.{keys} WHERE job IN (SELECT job FROM temp.{keys}); \
                 INSERT INTO main.{keys} (job, tbl, k) SELECT job, tbl, k FROM temp.{keys}; \
                 COMMIT"
            );
            reading
                .conn
                .execute_batch(&store)
                .map_err(|e| classify("storing what the export returned", &e))?;
        }
        Ok(out)
    })
    .await;
    drop(guard);
    done.map_err(|e| ConnectorError::Transient(format!("the export's reading thread ended: {e}")))?
}

/// A connection to `path`, which reads only when `read_only`: `query_only` makes a write
/// sent here by mistake fail instead of competing with the connector's writer. One that
/// writes replaces the keys an earlier run recorded, so `secure_delete` zeroes what that
/// frees, as on the connector's other connections ([`Db::connect`]).
///
/// [`Db::connect`]: dsrelay_runtime::store::Db::connect
fn open(path: &Path, read_only: bool) -> Result<Connection, ConnectorError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| classify(&format!("opening {} to export", path.display()), &e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .and_then(|()| match read_only {
            true => conn.execute_batch("PRAGMA query_only=ON;"),
            false => conn.execute_batch("PRAGMA secure_delete=ON;"),
        })
        .map_err(|e| classify(&format!("setting up {} to export", path.display()), &e))?;
    Ok(conn)
}

impl Reading {
    /// `s` prepared with its `$N` parameters bound (as text, as the sqlx path binds them).
    fn prepare(
        &self,
        s: &Statement,
        doing: &str,
    ) -> Result<rusqlite::Statement<'_>, ConnectorError> {
        let mut prepared = self.conn.prepare(&s.sql).map_err(|e| classify(doing, &e))?;
        for i in 1..=prepared.parameter_count() {
            let name = prepared.parameter_name(i).unwrap_or("?");
            let value = name
                .strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| s.binds.get(n.checked_sub(1)?))
                .ok_or_else(|| {
                    ConnectorError::Permanent(format!(
                        "{doing}: the statement's parameter {name} has no value"
                    ))
                })?;
            prepared
                .raw_bind_parameter(i, value.as_str())
                .map_err(|e| classify(doing, &e))?;
        }
        Ok(prepared)
    }
}

impl ReadTx for Reading {
    async fn count(&mut self, s: &Statement, doing: &str) -> Result<i64, ConnectorError> {
        let mut prepared = self.prepare(s, doing)?;
        let mut rows = prepared.raw_query();
        match rows.next().map_err(|e| classify(doing, &e))? {
            Some(row) => row.get::<_, i64>(0).map_err(|e| classify(doing, &e)),
            None => Ok(0),
        }
    }

    async fn rows(
        &mut self,
        rule: &TableRule,
        select: &Statement,
        sink: &ExportSink,
        on_row: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(u64, Vec<ExportedFile>), ConnectorError> {
        let table = rule.table.as_str();
        let doing = format!("exporting {table}");
        let abandoned = self.abandoned.clone();
        let mut prepared = self.prepare(select, &doing)?;
        let mut rows = prepared.raw_query();
        let mut files = TableFiles::new(rule, sink);
        while let Some(row) = rows.next().map_err(|e| classify(&doing, &e))? {
            if abandoned.load(Ordering::Relaxed) {
                return Err(ConnectorError::Transient(format!(
                    "{doing}: the export was abandoned by its caller"
                )));
            }
            let values = rule
                .export
                .iter()
                .enumerate()
                .map(|(i, column)| {
                    let value = row
                        .get_ref(i)
                        .map_err(|e| classify(&format!("exporting {table}.{column}"), &e))?;
                    cell(value).map_err(|e| {
                        ConnectorError::Permanent(format!(
                            "exporting {table}.{column}: the text is not UTF-8: {e}"
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            files.push(&values).await?;
            on_row(files.count());
        }
        files.finish().await
    }
}

/// A value as SQLite stores it: integers, reals, text and blobs, as the sqlx path reads them
/// (`cell` in `execute`, which takes the type from the value, not the column).
pub(super) fn cell(value: ValueRef<'_>) -> Result<Cell<'_>, std::str::Utf8Error> {
    Ok(match value {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(n) => Cell::Int(n),
        ValueRef::Real(f) if f.is_finite() => Cell::Float(f),
        ValueRef::Real(_) => Cell::Null,
        ValueRef::Text(t) => Cell::Text(std::str::from_utf8(t)?),
        ValueRef::Blob(b) => Cell::Blob(b),
    })
}

/// Sorts a SQLite error into worth-retrying (another connection holds a lock the read needs)
/// or not; `doing` says what was being done.
fn classify(doing: &str, err: &rusqlite::Error) -> ConnectorError {
    let message = format!("{doing}: {err}");
    match err.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            ConnectorError::Transient(message)
        }
        _ => ConnectorError::Permanent(message),
    }
}
