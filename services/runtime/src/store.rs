//! One store handle over SQLite (the embedded default) or PostgreSQL (production), chosen by
//! URL at start-up.
//!
//! Queries are written once, with `$1`-style placeholders that both backends accept, and run
//! through sqlx's `Any` driver. Where the dialects differ (row locks, claiming work with
//! `SKIP LOCKED`, advisory locks) the [`Backend`]'s methods give the text to use, so that every
//! dialect decision is made in one place. Timestamps are stored as milliseconds since the Unix
//! epoch (`BIGINT`), which both backends compare and index alike.
//!
//! # Claims
//!
//! Every claim of queued work (the processor's tasks, acknowledgements and uploads, the
//! registry's deliveries) is one statement, whatever the batch size:
//!
//! ```sql
//! WITH picked AS MATERIALIZED (SELECT key FROM queue WHERE due... ORDER BY next_attempt_at
//!                              LIMIT $n FOR UPDATE SKIP LOCKED)
//! UPDATE queue SET lease_until = now + $lease, attempts = attempts + 1,
//!                  lease_owner = <a random token per row>
//! WHERE key IN (SELECT key FROM picked)
//! RETURNING queue's columns, (SELECT column FROM joined WHERE ...) AS column, ...
//! ```
//!
//! Both backends accept it as written (PostgreSQL ≥ 13, for `gen_random_uuid()` in the lease
//! token; SQLite ≥ 3.35). `MATERIALIZED`
//! makes the picking `SELECT` run once, so a re-scan can never lock other rows than those
//! it picked; the lock clause comes from [`Backend::skip_locked_of`], the clock from
//! [`Backend::now_ms`] and the per-row token from [`Backend::random_token`] (only tasks
//! and uploads count their attempts at the claim). SQLite's `RETURNING` may name only the
//! updated table, so a joined table's columns come from scalar subqueries ([`lookups`]).
//! `RETURNING` gives rows in no particular order: callers sort them as the picking
//! `ORDER BY` did.
//!
//! On PostgreSQL claims go through [`Db::claimer`], connections on which the planner may use
//! neither a bitmap nor a sequential scan. A claim is meant to walk its queue's partial index
//! in the order it picks and stop at its limit. Left to its estimates, which on a table
//! never analyzed (a new deployment before autovacuum's first pass, or a queue analyzed
//! while empty) say a row or two, PostgreSQL picked a bitmap scan of the whole index, then
//! a sort: every claim read every due row and every dead index entry the queue's updates
//! had left, 12–17 ms a claim once 1,800 deliveries waited (session 29).

use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::{AnyPool, ConnectOptions, Executor};

/// How long a caller waits for a pooled connection before its statement fails as out of reach
/// (UNAVAILABLE at the API, retried by the workers). Well under the 30 s deadline the SDK and
/// `dsrctl` give a call, so that a partner whose call meets a database server gone away hears
/// that the service could not reach its database, instead of its own deadline running out at
/// the same moment with nothing said.
pub const POOL_WAIT: Duration = Duration::from_secs(10);

/// How long a pooled connection may sit idle before it is checked (pinged) again when taken.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Pool settings every pool shares. sqlx pings a connection when it goes back to the pool,
/// and by default again when it is taken: on PostgreSQL a round trip before every statement
/// or transaction, on SQLite a hop to the connection's thread and back; an idle request
/// takes about ten connections one after the other on its way to COMPLETED. Only a connection
/// that sat idle longer than [`CHECK_IDLE_AFTER`] since its last ping is checked when taken:
/// one that broke meanwhile (a server restarted) is replaced instead of failing its caller.
/// One that breaks in the moment between fails its statement, which every caller already
/// meets as a database error (retried by the workers, UNAVAILABLE at the API).
///
/// Every pool also waits up to [`POOL_WAIT`] for a connection, and has no idle timeout or lifetime:
/// those start sqlx's pool maintenance task, whose loop over `num_idle()` was seen to spin
/// without yielding (a CI run hung in it at a test's runtime shutdown). A connection needs
/// no recycling here.
fn pool_options() -> AnyPoolOptions {
    AnyPoolOptions::new()
        .acquire_timeout(POOL_WAIT)
        .idle_timeout(None)
        .max_lifetime(None)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > CHECK_IDLE_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// How every connection to `url` is opened: its statements logged at TRACE, those slower
/// than a second at WARN.
fn connect_options(url: &str) -> Result<AnyConnectOptions> {
    Ok(AnyConnectOptions::from_str(url)
        .with_context(|| format!("parsing database url {}", redact(url)))?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1)))
}

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite in WAL mode with `synchronous=FULL`, one writer connection (and readers).
    Sqlite,
    /// PostgreSQL; several replicas may share it.
    Postgres,
}

impl Backend {
    /// The backend `conn` talks to.
    pub fn of_connection(conn: &sqlx::AnyConnection) -> Self {
        if conn.backend_name().eq_ignore_ascii_case("postgresql") {
            Self::Postgres
        } else {
            Self::Sqlite
        }
    }

    /// How many rows of `params_per_row` parameters each one multi-row statement should
    /// carry (at least one).
    pub fn rows_per_statement(self, params_per_row: usize) -> usize {
        let budget = match self {
            Self::Sqlite => SQLITE_PARAMS_PER_STATEMENT,
            Self::Postgres => POSTGRES_PARAMS_PER_STATEMENT,
        };
        (budget / params_per_row.max(1)).max(1)
    }

    /// `sql`, its numbered parameters (`$N`) written the way this backend binds cheapest. On
    /// PostgreSQL, unchanged. On SQLite, a statement whose parameters appear once each as
    /// `$1, $2, ...` in that order gets anonymous `?`; any other gets `?N`. Why: SQLite's
    /// parser looks each `$name` up among the names before it by string comparison, and
    /// sqlx asks the name of every parameter it binds, which SQLite finds by walking the
    /// statement's list of names; with hundreds of parameters in a multi-row statement, both
    /// cost the square of the count (5 % of the registry's CPU in a profile). `?N` in
    /// increasing order is numbered without a comparison, and `?` keeps no name at all, so
    /// sqlx binds it by position. A `$` inside a quoted literal or identifier is left alone.
    pub fn numbered(self, sql: &str) -> std::borrow::Cow<'_, str> {
        if self == Self::Postgres || !sql.contains('$') {
            return std::borrow::Cow::Borrowed(sql);
        }
        let found = numbered_parameters(sql);
        if found.is_empty() {
            return std::borrow::Cow::Borrowed(sql);
        }
        let in_order = found
            .iter()
            .enumerate()
            .all(|(k, &(_, _, n))| n == k as u64 + 1);
        let mut out = String::with_capacity(sql.len());
        let mut last = 0;
        for &(start, end, n) in &found {
            out.push_str(&sql[last..start]);
            out.push('?');
            if !in_order {
                out.push_str(&n.to_string());
            }
            last = end;
        }
        out.push_str(&sql[last..]);
        std::borrow::Cow::Owned(out)
    }

    /// The backend a database url names (`sqlite:...`, `postgres://...`, `postgresql://...`).
    pub fn of_url(url: &str) -> Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            // Without its query: what is misspelt there may be a password.
            bail!(
                "database url {:?} must start with sqlite: or postgres://",
                without_query(&redact(url))
            )
        }
    }

    /// The database's clock in epoch milliseconds, as an SQL expression (BIGINT). Leases are
    /// set and compared on it, never on a replica's clock: replicas sharing a database then
    /// agree on who holds a row however far their own clocks drift, and tests that move a
    /// service's clock move due dates and retries, not leases.
    pub fn now_ms(self) -> &'static str {
        match self {
            Self::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            Self::Postgres => "(extract(epoch from clock_timestamp()) * 1000)::bigint",
        }
    }

    /// Appended to a `SELECT` that reads rows the transaction goes on to decide from, so that a
    /// concurrent transaction deciding from the same rows waits for this one to end. Empty on
    /// SQLite, whose single writer already serializes transactions.
    pub fn lock_rows(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " FOR UPDATE",
        }
    }

    /// Appended to each text column of an `ORDER BY` that sets the order rows are locked
    /// in: byte order, the order Rust sorts keys in, whatever the database's collation
    /// (SQLite's default collation already compares bytes). Transactions that lock several
    /// rows one by one in Rust's order and those that lock them with one ordered `SELECT`
    /// then take them in the same order, so they cannot wait for each other in a cycle.
    pub fn bytewise(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " COLLATE \"C\"",
        }
    }

    /// Appended to a claiming `SELECT` so that rows another replica holds are skipped rather
    /// than waited for, and the rows taken stay locked until commit.
    pub fn skip_locked(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// [`Backend::skip_locked`] for a `SELECT` over a join, locking only the rows of `table`
    /// (its name or alias in the query): the joined rows are read, not claimed.
    pub fn skip_locked_of(self, table: &str) -> String {
        match self {
            Self::Sqlite => String::new(),
            Self::Postgres => format!(" FOR UPDATE OF {table} SKIP LOCKED"),
        }
    }

    /// A new random token for each row a statement writes, as an SQL expression (TEXT): the
    /// lease owner a claim gives every row it takes. 128 random bits on SQLite (32 hex
    /// digits), a version 4 UUID on PostgreSQL (13 or later).
    pub fn random_token(self) -> &'static str {
        match self {
            Self::Sqlite => "lower(hex(randomblob(16)))",
            Self::Postgres => "CAST(gen_random_uuid() AS TEXT)",
        }
    }

    /// A query counting the tables named `$1` in the current schema (0 or 1), as `BIGINT`.
    pub fn table_exists(self) -> &'static str {
        match self {
            Self::Sqlite => {
                "SELECT CAST(COUNT(*) AS BIGINT) FROM sqlite_master \
                 WHERE type = 'table' AND name = $1"
            }
            Self::Postgres => {
                "SELECT CAST(COUNT(*) AS BIGINT) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = $1"
            }
        }
    }

    /// A statement that takes the transaction-scoped advisory lock keyed by `$1` (a `BIGINT`),
    /// held until the transaction ends and re-entrant within it. `None` on SQLite, where the
    /// single writer already holds every transaction apart.
    pub fn transaction_lock(self) -> Option<&'static str> {
        match self {
            Self::Sqlite => None,
            Self::Postgres => Some("SELECT pg_advisory_xact_lock($1)::text AS locked"),
        }
    }
}

/// Numbered parameters one multi-row statement binds at most on SQLite: sqlx looks each one's
/// name up (`sqlite3_bind_parameter_name`, a walk along a list), so binding a statement costs
/// the square of its parameters; a few hundred keep that under the cost of handing one more
/// statement to the connection's thread (statements of 2,400 parameters took 7 % of the
/// registry's samples under load).
const SQLITE_PARAMS_PER_STATEMENT: usize = 400;

/// The same on PostgreSQL, which binds by position: far under its limit of 65,535.
const POSTGRES_PARAMS_PER_STATEMENT: usize = 8_000;

/// How many read-only connections a SQLite file gets beside its one writer.
const SQLITE_READERS: u32 = 4;

/// Connections of the claims' own pool on PostgreSQL: each service has a few workers that
/// claim (tasks, acknowledgements and uploads at a processor, deliveries at a registry).
const CLAIMERS: u32 = 4;

/// A connection pool and the backend behind it.
#[derive(Debug, Clone)]
pub struct Db {
    /// The pool every write, and every read that decides a write, goes through.
    pub pool: AnyPool,
    /// The pool for reads that only answer (Get, List, Watch, metrics). On a SQLite file it
    /// is `SQLITE_READERS` connections of their own, which WAL lets read while the one
    /// writer writes, so an answer never queues behind the writer's transactions; each read
    /// sees every transaction committed before it began. On PostgreSQL, and on an in-memory
    /// SQLite database (which another connection would not see), it is `pool` itself.
    pub reader: AnyPool,
    /// The pool every claim of queued work goes through (see "Claims" above). On PostgreSQL
    /// it is `CLAIMERS` connections of their own on which the planner may not use a bitmap
    /// or sequential scan, so a claim always walks its queue's index in the order it picks
    /// and stops at its limit; elsewhere it is `pool` itself.
    pub claimer: AnyPool,
    /// The backend, for the few dialect differences.
    pub backend: Backend,
    /// The file of a SQLite database, for a reader that opens a connection of its own
    /// (the SQL connector's export); `None` on PostgreSQL and for an in-memory database.
    pub sqlite_file: Option<std::path::PathBuf>,
}

impl Db {
    /// Connects to `url` (`sqlite://path`, `sqlite::memory:`, `postgres://...`). SQLite files
    /// and their folders are created when missing.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of_url(url)?;
        let url = match backend {
            Backend::Sqlite => prepare_sqlite_url(url)?,
            Backend::Postgres => {
                check_postgres_settings(url)?;
                url.to_string()
            }
        };
        let options = connect_options(&url)?;
        let sqlite_file = backend == Backend::Sqlite && !url.contains(":memory:");
        let pool = match backend {
            // SQLite allows one writer; a single connection avoids SQLITE_BUSY on lock
            // upgrades, and WAL + synchronous=FULL makes every commit durable before it returns
            // (nothing accepted is ever lost, even on power loss). secure_delete zeroes what a
            // change frees, so forgotten identities do not linger in free space of the file.
            Backend::Sqlite => {
                pool_options()
                    .max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute(
                                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; \
                                 PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000; \
                                 PRAGMA secure_delete=ON;",
                            )
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(options.clone())
                    .await
            }
            Backend::Postgres => {
                first_connection(&options, &url).await?;
                pool_options()
                    .max_connections(16)
                    .connect_with(options.clone())
                    .await
            }
        }
        .with_context(|| format!("connecting to {}", redact(&url)))?;
        let reader = if sqlite_file {
            // Opened after the writer, which has put the file in WAL mode (a setting the file
            // keeps), so these never block it nor it them. `query_only` makes a write sent
            // here by mistake fail instead of competing with the writer for the lock.
            pool_options()
                .max_connections(SQLITE_READERS)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA busy_timeout=5000; PRAGMA query_only=ON;")
                            .await?;
                        Ok(())
                    })
                })
                .connect_with(options.clone())
                .await
                .with_context(|| format!("connecting readers to {}", redact(&url)))?
        } else {
            pool.clone()
        };
        let claimer = match backend {
            Backend::Postgres => {
                // Set in the connection's start-up message, so no statement runs for it.
                let separator = if url.contains('?') { '&' } else { '?' };
                let url = format!(
                    "{url}{separator}options[enable_bitmapscan]=off&options[enable_seqscan]=off"
                );
                pool_options()
                    .max_connections(CLAIMERS)
                    // Lazily: a database never claimed from (a connector's) opens none.
                    .connect_lazy_with(connect_options(&url)?)
            }
            Backend::Sqlite => pool.clone(),
        };
        let sqlite_file: Option<std::path::PathBuf> = sqlite_file.then(|| sqlite_path(&url).into());
        // Which database a service runs on, said once: a missing or misspelt setting
        // otherwise runs it on a SQLite file in the working folder without a word.
        let shown = match &sqlite_file {
            Some(file) => std::path::absolute(file).unwrap_or_else(|_| file.clone()),
            None => redact(&url).into(),
        };
        tracing::info!(database = %shown.display(), "database opened");
        Ok(Self {
            pool,
            reader,
            claimer,
            backend,
            sqlite_file,
        })
    }

    /// Closes every pool of this handle (waiting for their connections to go back).
    pub async fn close(&self) {
        self.pool.close().await;
        self.reader.close().await;
        self.claimer.close().await;
    }

    /// Applies the migrations for this backend. On PostgreSQL sqlx holds an advisory lock while
    /// migrating, so several replicas may start at once.
    pub async fn migrate(&self, sqlite: &Migrator, postgres: &Migrator) -> Result<()> {
        let migrator = match self.backend {
            Backend::Sqlite => sqlite,
            Backend::Postgres => postgres,
        };
        let mut conn = self.pool.acquire().await.context("applying migrations")?;
        // Read before the run, to say after it which migrations it applied: an upgrade's
        // log then shows that the schema changed, and from which version. No table yet (a
        // new database) reads as none applied. Under the migration lock (PostgreSQL's
        // advisory lock is held again by the run on the same session, and released once
        // each), so that of replicas starting together only the one that migrated says so.
        conn.lock().await.context("applying migrations")?;
        let before: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
        let run = migrator.run(&mut *conn).await;
        if run.is_ok() {
            conn.unlock().await.context("applying migrations")?;
        }
        let Err(e) = run else {
            let applied: Vec<i64> = migrator
                .iter()
                .map(|m| m.version)
                .filter(|v| !before.contains(v))
                .collect();
            let latest = migrator.iter().map(|m| m.version).max().unwrap_or_default();
            match (applied.first(), applied.last()) {
                (Some(first), Some(last)) => tracing::info!(
                    count = applied.len(),
                    from = first,
                    to = last,
                    new_database = before.is_empty(),
                    "database migrations applied"
                ),
                _ => tracing::info!(version = latest, "database schema up to date"),
            }
            return Ok(());
        };
        // A failed run keeps sqlx's migration lock (PostgreSQL: a session's advisory lock)
        // on its connection: closed, the lock goes with it, and nothing after (the hints
        // below, another try) waits for it.
        let _ = conn.close().await;
        let hint = match &e {
            MigrateError::VersionMismatch(_) | MigrateError::VersionMissing(_) => {
                Some(self.unknown_migrations_hint(migrator).await)
            }
            // With a role of its own per service, a service pointed at another's database is
            // refused its tables before any version is compared: say so rather than advise
            // grants that would hand it the other service's tables.
            _ if permission_denied(&e) && self.migrations_unreadable().await => Some(
                "this database's migrations belong to a role this one may not read: it is \
                 probably another service's database, so point database_url at this service's \
                 own; if it is this service's, make this role the owner of the database and \
                 of its tables"
                    .to_string(),
            ),
            // Only a refusal to create in a schema: 42501 is also a missing table
            // privilege or ownership, which this grant would not cure.
            _ if permission_denied(&e) && e.to_string().contains("schema") => {
                let user = sqlx::query_scalar::<_, String>("SELECT CAST(current_user AS TEXT)")
                    .fetch_one(&self.pool)
                    .await
                    .unwrap_or_else(|_| "<user>".to_string());
                Some(format!(
                    "the database user needs CREATE on the schema: GRANT USAGE, CREATE ON \
                     SCHEMA public TO \"{user}\" (or make it the database's owner)"
                ))
            }
            _ if permission_denied(&e) => Some(
                "the database user lacks a privilege on tables already there (created by \
                 another role?): make it the owner of the database and of its tables"
                    .to_string(),
            ),
            _ => None,
        };
        match hint {
            Some(hint) => {
                Err(anyhow::Error::new(e).context(format!("applying migrations; {hint}")))
            }
            None => Err(anyhow::Error::new(e).context("applying migrations")),
        }
    }

    /// Why the migrations applied to this database are not this service's: another
    /// service's schema (none of them is one of ours), or one of ours edited since.
    async fn unknown_migrations_hint(&self, migrator: &Migrator) -> String {
        let applied = sqlx::query_as::<_, (i64, String, Vec<u8>)>(
            "SELECT version, description, checksum FROM _sqlx_migrations ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await;
        let ours = |(version, _, checksum): &(i64, String, Vec<u8>)| {
            migrator
                .iter()
                .any(|m| m.version == *version && *m.checksum == checksum[..])
        };
        match applied {
            Ok(applied) if !applied.is_empty() && !applied.iter().any(ours) => {
                let names: Vec<String> = applied
                    .iter()
                    .take(3)
                    .map(|(version, description, _)| format!("{version} {description}"))
                    .collect();
                let more = if applied.len() > 3 { ", ..." } else { "" };
                format!(
                    "this database holds another service's schema (migrations {}{more}, none of \
                     them this service's): point database_url at this service's own database",
                    names.join(", ")
                )
            }
            Ok(applied) if !applied.is_empty() => "some migrations applied to this database \
                 are not this build's: a migration file was edited after it was applied, or a \
                 newer build migrated the database"
                .to_string(),
            _ => "the database may belong to another service (give each service its own), or \
                  a migration file was edited after it was applied"
                .to_string(),
        }
    }

    /// Whether the database holds a migrations table this role may not read (PostgreSQL).
    async fn migrations_unreadable(&self) -> bool {
        let sql = "SELECT CASE WHEN to_regclass('_sqlx_migrations') IS NULL THEN 0 \
                   WHEN has_table_privilege('_sqlx_migrations', 'SELECT') THEN 0 ELSE 1 END";
        sqlx::query_scalar::<_, i32>(sql)
            .fetch_one(&self.pool)
            .await
            .is_ok_and(|unreadable| unreadable == 1)
    }

    /// This database's [`Backend::skip_locked`].
    pub fn skip_locked(&self) -> &'static str {
        self.backend.skip_locked()
    }
}

/// How long the first connection to a PostgreSQL server may take before the start fails,
/// while the server refuses connections or says it is starting up. Shorter under test so
/// that the refusal test does not wait the whole of it.
const FIRST_CONNECTION_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_secs(2)
} else {
    Duration::from_secs(30)
};

/// The query parameters sqlx-postgres reads (its `options/parse.rs`), spelt as it compares
/// them, case and all; besides these, `options[NAME]`.
const QUERY_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// What [`Db::connect`] checks of a PostgreSQL `url` before it connects: its user and
/// password (`check_postgres_url`), the TLS files it names ([`database_file_errors`]) and
/// that the driver reads it. Public so that a caller that connects later (a holder whose
/// server is down at start) can refuse a URL it could never connect with now.
pub fn check_postgres_settings(url: &str) -> Result<()> {
    check_postgres_url(url)?;
    if let Some(e) = database_file_errors(url).into_iter().next() {
        bail!("{e}");
    }
    connect_options(url).map(|_| ())
}

/// Refuses a URL whose user or password holds a character that ends it early: the driver
/// would connect to the host after the first `@` (or read the rest as a path or fragment)
/// and fail with a lookup of a host nobody meant, or worse, reach one. Refuses, too, a
/// query parameter sqlx does not read (see [`QUERY_PARAMETERS`]): sqlx would connect
/// without it, a misspelt `sslmode` in its default `prefer` mode, and log it with its value
/// at WARN on every connection, a libpq `sslpassword` or a `PassWord` in clear.
fn check_postgres_url(url: &str) -> Result<()> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    // An `@` in the query (a file's path) is the query's business; a `#` anywhere cuts the
    // rest off as a fragment, which the driver ignores.
    let before_query = rest.split('?').next().unwrap_or(rest);
    if before_query.matches('@').count() > 1 || rest.contains('#') {
        bail!(
            "the database URL {}: the user or password (or a path in the query) holds a \
             character that must be percent-encoded there (@ as %40, / as %2F, : as %3A, # as \
             %23, ? as %3F)",
            without_query(&redact(url))
        );
    }
    // Read as sqlx reads it: the keys percent-decoded, `+` a space.
    let options = AnyConnectOptions::from_str(url)
        .with_context(|| format!("parsing database url {}", redact(url)))?;
    for (key, _) in options.database_url.query_pairs() {
        let read = QUERY_PARAMETERS.contains(&&*key)
            || (key.starts_with("options[") && key.ends_with(']'));
        if !read {
            // Its value is not shown: a misspelt `password` is the likeliest unread one.
            bail!(
                "the database URL {}: sqlx, the PostgreSQL driver, does not read the query \
                 parameter {key:?} (it would connect without it, and may log it with its value); \
                 the ones it reads, spelt exactly so: {}, options[...]",
                without_query(&redact(url)),
                QUERY_PARAMETERS.join(", ")
            );
        }
    }
    Ok(())
}

/// The files a PostgreSQL `database_url` names in its query (`sslrootcert`, `sslcert`,
/// `sslkey` and their other spellings) that cannot be read here, one message each naming
/// the parameter and the path: sqlx opens them only once it connects, and then says no more
/// than "No such file or directory". Paths are read as sqlx reads them: percent-decoded, and
/// relative ones from the working folder; a PEM value written inline is no path. With
/// `sslmode=disable` no file is opened, so none is checked. Empty for any other URL, and for
/// one that does not parse ([`Db::connect`] says why).
pub fn database_file_errors(url: &str) -> Vec<String> {
    if Backend::of_url(url).ok() != Some(Backend::Postgres) {
        return Vec::new();
    }
    let Ok(options) = AnyConnectOptions::from_str(url) else {
        return Vec::new();
    };
    let pairs: Vec<(String, String)> = (options.database_url.query_pairs())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let disabled = pairs
        .iter()
        .any(|(k, v)| matches!(k.as_str(), "sslmode" | "ssl-mode") && v == "disable");
    if disabled {
        return Vec::new();
    }
    let files = [
        "sslrootcert",
        "ssl-root-cert",
        "ssl-ca",
        "sslcert",
        "ssl-cert",
        "sslkey",
        "ssl-key",
    ];
    pairs
        .iter()
        .filter(|(key, _)| files.contains(&key.as_str()))
        .filter(|(_, value)| !value.trim().starts_with("-----BEGIN"))
        .filter(|(_, path)| {
            let readable = std::fs::File::open(path).and_then(|f| f.metadata());
            !readable.is_ok_and(|m| m.is_file())
        })
        .map(|(key, path)| format!("database_url: {key} {path} is not a readable file"))
        .collect()
}

/// The wait after the first failed connection; it doubles up to 2 s.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

/// What an operator is told when something other than PostgreSQL may listen at the address.
const WRONG_PORT_ADVICE: &str = "check that database_url names the PostgreSQL server's host \
     and port (5432 unless it was changed), not another service's, such as a dsrelay \
     service's gRPC or admin port or an HTTP server";

/// Opens and closes one connection outside any pool, so that a start-up against a server
/// that refuses or rejects it fails with a reason: the pool would say only that it timed
/// out. A refusal, a server starting up (57P03) or full (53300), or one that closes the
/// connection without a word (a proxy in front of a server not up yet) is tried again until
/// [`FIRST_CONNECTION_TIMEOUT`], as the pool would, since services and their database are
/// often started together. Any other error fails the start at once: a first answer that is
/// none of PostgreSQL's with advice to check the port, an authentication method sqlx cannot
/// do with advice for pg_hba.conf, and the rest (a wrong password, a missing database, a
/// name that does not resolve) with the server's or the socket's own words. Every message
/// names the URL with its passwords hidden ([`redact`]).
async fn first_connection(options: &AnyConnectOptions, url: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + FIRST_CONNECTION_TIMEOUT;
    let mut pause = FIRST_PAUSE;
    loop {
        // The last try, at the deadline, still gets a moment to be refused in.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let left = left.max(Duration::from_millis(500));
        let error = match tokio::time::timeout(left, options.connect()).await {
            Ok(Ok(connection)) => {
                // A courtesy to the server; the pool opens its own connections.
                let _ = sqlx::Connection::close(connection).await;
                return Ok(());
            }
            Ok(Err(e)) => e,
            Err(_) => bail!(
                "connecting to {}: no connection within {} s",
                redact(url),
                FIRST_CONNECTION_TIMEOUT.as_secs()
            ),
        };
        let failure = FirstFailure::of(&error);
        match failure {
            FirstFailure::NotYet | FirstFailure::Unanswered => {}
            FirstFailure::NotPostgres => bail!(
                "connecting to {}: the server at {} did not answer as PostgreSQL ({error}); \
                 {WRONG_PORT_ADVICE}",
                redact(url),
                server_address(options)
            ),
            FirstFailure::AuthenticationMethod => bail!(
                "connecting to {}: {error}; the server at {} asks for an authentication \
                 method that sqlx, the PostgreSQL driver, cannot do (it does password, md5 \
                 and scram-sha-256; not gss, sspi or other SASL mechanisms): make the \
                 server's pg_hba.conf give this user, database and client address one of \
                 those",
                redact(url),
                server_address(options)
            ),
            FirstFailure::Other => bail!("connecting to {}: {error}", redact(url)),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline && failure == FirstFailure::Unanswered {
            bail!(
                "connecting to {}: the server at {} closed the connection without a \
                 PostgreSQL answer: not PostgreSQL, or a proxy whose server is not up \
                 ({error}; still so after {} s of trying); {WRONG_PORT_ADVICE}",
                redact(url),
                server_address(options),
                FIRST_CONNECTION_TIMEOUT.as_secs()
            );
        }
        if now >= deadline {
            bail!(
                "connecting to {}: {error} (still so after {} s of trying)",
                redact(url),
                FIRST_CONNECTION_TIMEOUT.as_secs()
            );
        }
        if pause == FIRST_PAUSE {
            // Said once, so that a start that waits is not taken for a hang.
            tracing::warn!(
                database = %redact(url),
                "the database refuses connections, is starting up or closes them without an \
                 answer ({error}); trying again for up to {} s",
                FIRST_CONNECTION_TIMEOUT.as_secs()
            );
        }
        // The last try comes at the deadline itself.
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// What the first connection's failure says about the server, and whether to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstFailure {
    /// Refused, starting up (57P03) or full (53300): tried again.
    NotYet,
    /// Closed without an answer: tried again, since a proxy (docker-proxy, a port forward,
    /// a load balancer) does this while its PostgreSQL server is not up.
    Unanswered,
    /// A first answer that is none of PostgreSQL's: sqlx's words for it ("unexpected
    /// response from SSLRequest: 0x48") do not tell an operator that database_url names
    /// the wrong port.
    NotPostgres,
    /// A PostgreSQL server that asks for an authentication method sqlx cannot do.
    AuthenticationMethod,
    /// Anything else, told in the server's or the socket's own words.
    Other,
}

/// The beginnings of sqlx-postgres's protocol errors (`err_protocol!`) for a first answer
/// that is none of PostgreSQL's: a byte other than `S` or `N` to the TLS request, an
/// unknown message type, a message that has no place in the start-up, or an impossible
/// length.
const NOT_POSTGRES_ANSWERS: &[&str] = &[
    "unexpected response from SSLRequest",
    "unknown message type",
    "establish: unexpected message",
    "message_len",
];

impl FirstFailure {
    fn of(error: &sqlx::Error) -> Self {
        use std::io::ErrorKind;
        match error {
            sqlx::Error::Io(e) => match e.kind() {
                ErrorKind::ConnectionRefused => Self::NotYet,
                // A write after the other end closed fails with a broken pipe.
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                    Self::Unanswered
                }
                _ => Self::Other,
            },
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("57P03" | "53300")) =>
            {
                Self::NotYet
            }
            // sqlx reads the one-byte answer to its TLS request without checking that a
            // byte came: a connection closed there reads as a zero byte, which no PostgreSQL
            // server sends.
            sqlx::Error::Protocol(m)
                if m.starts_with("unexpected response from SSLRequest: 0x00") =>
            {
                Self::Unanswered
            }
            sqlx::Error::Protocol(m) if NOT_POSTGRES_ANSWERS.iter().any(|p| m.starts_with(p)) => {
                Self::NotPostgres
            }
            // "unknown authentication method: 7" (GSSAPI; 9 SSPI), wrapped in "Postgres
            // protocol error (reading Authentication)", "unsupported authentication method",
            // and "unsupported SASL authentication mechanisms: OAUTHBEARER".
            sqlx::Error::Protocol(m)
                if m.contains("authentication method")
                    || m.contains("SASL authentication mechanisms") =>
            {
                Self::AuthenticationMethod
            }
            _ => Self::Other,
        }
    }
}

/// Where sqlx connects for `options`, for messages (it holds no password): `host:port`, the
/// URL's or its query's `host`, `hostaddr` and `port` (or the `PGHOST` and `PGPORT` sqlx
/// falls back on), or a Unix socket's path.
fn server_address(options: &AnyConnectOptions) -> String {
    let url = &options.database_url;
    let Ok(pg) = sqlx::postgres::PgConnectOptions::from_url(url) else {
        // Not reached after a connection attempt, which parses the URL the same way.
        return url.host_str().unwrap_or("localhost").to_string();
    };
    let (host, port) = (pg.get_host(), pg.get_port());
    // As sqlx makes the socket's path: the directory, then PostgreSQL's file name.
    match pg.get_socket() {
        Some(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
        None if host.starts_with('/') => format!("{host}/.s.PGSQL.{port}"),
        None if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    }
}

/// Whether migrating failed for want of a privilege (SQLSTATE 42501), such as CREATE on
/// schema `public`, which PostgreSQL 15 and later no longer grant to every role.
fn permission_denied(e: &MigrateError) -> bool {
    let error = match e {
        MigrateError::Execute(error) | MigrateError::ExecuteMigration(error, _) => error,
        _ => return false,
    };
    error
        .as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "42501")
}

fn prepare_sqlite_url(url: &str) -> Result<String> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    if rest.starts_with(":memory:") {
        return Ok(url.to_string());
    }
    let path = sqlite_path(url);
    if let Some(parent) = std::path::Path::new(path).parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    Ok(if url.contains('?') {
        url.to_string()
    } else {
        format!("sqlite://{path}?mode=rwc")
    })
}

/// The file a `sqlite:` URL names: what follows the scheme, up to its options. The file
/// [`Db::sqlite_file`] holds, for a caller that must check it before [`Db::connect`] would
/// create it.
pub fn sqlite_path(url: &str) -> &str {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    rest.split('?').next().unwrap_or(rest)
}

/// The byte ranges `(start, end)` of every numbered parameter `$N` in `sql` outside quoted
/// literals and identifiers, with its N, in text order.
fn numbered_parameters(sql: &str) -> Vec<(usize, usize, u64)> {
    let mut found = Vec::new();
    let bytes = sql.as_bytes();
    let (mut i, mut quote) = (0, None::<u8>);
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'$' => {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                if digits > 0 {
                    let end = i + 1 + digits;
                    if let Ok(n) = sql[i + 1..end].parse::<u64>() {
                        found.push((i, end, n));
                    }
                    i = end;
                    continue;
                }
            }
            None => {}
        }
        i += 1;
    }
    found
}

/// `sql` with every numbered parameter `$N` (outside quotes) written `$(N + by)`: how a
/// statement's parameters are moved behind those of the statements joined before it into
/// one text.
pub fn renumbered(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut last = 0;
    for (start, end, n) in numbered_parameters(sql) {
        out.push_str(&sql[last..start]);
        out.push('$');
        out.push_str(&(n + by as u64).to_string());
        last = end;
    }
    out.push_str(&sql[last..]);
    out
}

/// Runs one statement (`sql`, whose parameters are `$1..$per_row`) once for each of `rows`
/// on `conn`, each run's values bound by `bind`, in order; answers each run's changed rows.
/// One call on SQLite, as [`run_each`] says.
pub async fn execute_each<T>(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    sql: &str,
    per_row: usize,
    rows: &[T],
    bind: impl for<'q> Fn(
        sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        &'q T,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
) -> std::result::Result<Vec<u64>, RunFailed> {
    // Each run paired with the text, so that the text's lifetime is one `run_each` can see.
    let runs: Vec<(&str, &T)> = rows.iter().map(|row| (sql, row)).collect();
    let ran = run_each(
        conn,
        backend,
        &runs,
        |run| (run.0, per_row),
        |query, run| bind(query, run.1),
    )
    .await?;
    Ok(ran.into_iter().map(|r| r.changed).collect())
}

/// What one run of [`run_each`] gave back.
#[derive(Default)]
pub struct Ran {
    /// The rows it returned.
    pub rows: Vec<sqlx::any::AnyRow>,
    /// The rows it changed.
    pub changed: u64,
}

/// A run of [`run_each`] failed: which one (its index in the runs), and the database's error.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct RunFailed {
    /// The index of the run that failed.
    pub run: usize,
    /// What the database answered.
    pub error: sqlx::Error,
}

/// Runs one statement for each of `runs`, in order, on `conn`: the statement `sql_of` gives
/// (its text, whose parameters are `$1..$n`, and n), with the values `bind` binds. Answers
/// each run's rows and changed rows; an error says which run failed.
///
/// On SQLite the runs go as one text in one call. Why: sqlx runs a SQLite connection on a
/// thread of its own and hands every call to it and its answer back, which costs about 45
/// µs of CPU and 60 µs of waiting per call on these machines, against about 8 µs for one more
/// statement in the same text (`dsrelay-bench statement-cost`, where the same keyed UPDATE
/// in one multi-row statement came out slower than either). PostgreSQL takes one statement
/// per call when values are bound, so there they go one by one.
pub async fn run_each<T>(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    runs: &[T],
    sql_of: impl Fn(&T) -> (&str, usize),
    bind: impl for<'q> Fn(
        sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        &'q T,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
) -> std::result::Result<Vec<Ran>, RunFailed> {
    let mut out: Vec<Ran> = Vec::with_capacity(runs.len());
    if backend == Backend::Sqlite && runs.len() > 1 {
        let mut text = String::new();
        let mut bound = 0;
        for run in runs {
            let (sql, params) = sql_of(run);
            if !text.is_empty() {
                text.push_str(";\n");
            }
            text.push_str(&renumbered(sql, bound));
            bound += params;
        }
        let query = runs.iter().fold(sqlx::query(&text), &bind);
        collect_runs(conn.fetch_many(query), &mut out).await?;
    } else {
        for run in runs {
            collect_runs(
                conn.fetch_many(bind(sqlx::query(sql_of(run).0), run)),
                &mut out,
            )
            .await?;
        }
    }
    if out.len() != runs.len() {
        return Err(RunFailed {
            run: out.len().min(runs.len().saturating_sub(1)),
            error: sqlx::Error::Protocol(format!(
                "{} statements gave {} results",
                runs.len(),
                out.len()
            )),
        });
    }
    Ok(out)
}

/// Appends to `out` a [`Ran`] for every statement `results` finishes: the rows it returned,
/// then its changed rows, which end it.
async fn collect_runs(
    mut results: impl futures::Stream<
            Item = std::result::Result<
                sqlx::Either<sqlx::any::AnyQueryResult, sqlx::any::AnyRow>,
                sqlx::Error,
            >,
        > + Unpin,
    out: &mut Vec<Ran>,
) -> std::result::Result<(), RunFailed> {
    use futures::TryStreamExt;
    let mut current = Ran::default();
    while let Some(item) = results.try_next().await.map_err(|error| RunFailed {
        run: out.len(),
        error,
    })? {
        match item {
            sqlx::Either::Right(row) => current.rows.push(row),
            sqlx::Either::Left(done) => {
                current.changed = done.rows_affected();
                out.push(std::mem::take(&mut current));
            }
        }
    }
    Ok(())
}

/// The URL with every password replaced by `***`, for messages and logs: the one after
/// the user name (`user:***@host`), and the value of any query parameter that holds one
/// together with everything after it (`?sslmode=require&password=***`): a password with a
/// `&` or `#` written as is would otherwise show its tail. The rest stays as written, so
/// that the operator still recognises the address.
pub fn redact(url: &str) -> String {
    let mut hidden = Vec::with_capacity(2);
    hidden.extend(password_span(url));
    hidden.extend(secret_parameter_value(url).map(|start| start..url.len()));
    hidden.sort_by_key(|span| span.start);
    let mut out = String::with_capacity(url.len());
    let mut shown = 0;
    for span in hidden {
        if span.start >= shown {
            out.push_str(&url[shown..span.start]);
            out.push_str("***");
        }
        shown = shown.max(span.end);
    }
    out.push_str(&url[shown..]);
    out
}

/// `url` up to its query, which is then shown as `?...`: after the scheme's `://`, the first
/// `?` begins it (one in an unencoded password too, which then hides more, not less).
fn without_query(url: &str) -> String {
    let from = url.find("://").map_or(0, |s| s + 3);
    match url[from..].find('?') {
        Some(at) => format!("{}?...", &url[..from + at]),
        None => url.to_string(),
    }
}

/// Where in `url` the password after the user name is: from the `:` after the user to the
/// `@` that ends them.
///
/// That `@` is the last one of the authority (up to the first `/`, `?` or `#` after
/// `://`), so that one in the query (`?user=me@srv`, a file's path) is not taken for it. A
/// password holding `/`, `?`, `#` or `@` written as is (which [`check_postgres_url`]
/// refuses, naming the URL with this) ends the authority early; then the authority is no
/// `host[:port]`, or an `@` or `#` comes before the query, and the last `@` of the whole
/// URL is taken instead, which hides more than the password rather than less.
fn password_span(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(authority_end);
    let in_authority = authority.rfind('@');
    let host_port = &authority[in_authority.map_or(0, |at| at + 1)..];
    let before_query = &after[..after.find('?').unwrap_or(after.len())];
    let plain = is_host_port(host_port)
        && (after.is_empty() || after.starts_with('/'))
        && !before_query.contains(['@', '#']);
    let at = if plain {
        in_authority?
    } else {
        rest.rfind('@')?
    };
    let colon = rest[..at].find(':')?;
    Some(start + colon + 1..start + at)
}

/// Whether `authority` is a host (a name, an address, `[IPv6]`) with an optional numeric
/// port, as opposed to a user and password cut short.
fn is_host_port(authority: &str) -> bool {
    let port = match authority.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((_, port)) => port,
            None => return false,
        },
        None => &authority[authority.find(':').unwrap_or(authority.len())..],
    };
    port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Query parameters whose value is a password: the server's (`password`, which sqlx
/// reads) and the client key's (`sslpassword`, libpq's, which sqlx does not read:
/// [`check_postgres_url`] refuses it, naming the URL, which must not show it).
const SECRET_PARAMETERS: &[&str] = &["password", "sslpassword"];

/// Where in `url` the value of its first [`SECRET_PARAMETERS`] parameter starts: after any
/// `?` or `&` past the scheme, so that one after a `?` in an unencoded password is found
/// too.
fn secret_parameter_value(url: &str) -> Option<usize> {
    let from = url.find("://").map_or(0, |s| s + 3);
    url.bytes()
        .enumerate()
        .skip(from)
        .filter(|&(_, b)| b == b'?' || b == b'&')
        .find_map(|(i, _)| {
            let pair = &url[i + 1..];
            let name_end = pair.find(['=', '&', '?', '#'])?;
            (pair[name_end..].starts_with('=') && is_secret_parameter(&pair[..name_end]))
                .then_some(i + 1 + name_end + 1)
        })
}

/// Whether the query parameter `name` (as written, percent-encoded or not) names a password.
/// Names are compared percent-decoded, as sqlx reads them, but regardless of case, though
/// sqlx reads only `password` so: [`check_postgres_url`] refuses a `PassWord`, naming the
/// URL, which must not show its value either.
fn is_secret_parameter(name: &str) -> bool {
    let bytes = name.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                decoded.push(b);
                i += 3;
            }
            (b'+', _) => {
                decoded.push(b' ');
                i += 1;
            }
            (b, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&decoded);
    SECRET_PARAMETERS
        .iter()
        .any(|secret| decoded.trim().eq_ignore_ascii_case(secret))
}

/// Columns of another table for the `RETURNING` list of a claim (see [the module
/// docs](self#claims)): one scalar subquery per `(expression, alias)`, reading `from` (a
/// table and its alias) where `on` holds, comma-separated. `on` names the updated table by
/// its name, which is all a `RETURNING` list may name on SQLite. A row `on` does not find
/// gives NULLs, as a `LEFT JOIN` would.
pub fn lookups(from: &str, on: &str, columns: &[(&str, &str)]) -> String {
    columns
        .iter()
        .map(|(expr, alias)| format!("(SELECT {expr} FROM {from} WHERE {on}) AS {alias}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$first, $first+1, ...`: `count` numbered placeholders, comma-separated (an `IN` list),
/// which both backends accept.
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One VALUES row of numbered placeholders, `($a, $b, ...)`, for a multi-row statement whose
/// rows bind their parameters at these numbers.
pub fn values_row(params: impl IntoIterator<Item = usize>) -> String {
    let params: Vec<String> = params.into_iter().map(|n| format!("${n}")).collect();
    format!("({})", params.join(", "))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A password with `@` or `#` written as is would send the connection elsewhere.
    #[tokio::test]
    async fn a_password_that_needs_percent_encoding_is_named_so() {
        for url in [
            "postgres://u:p@ss/w:rd#1@127.0.0.1:5432/db",
            "postgres://u:pa#ss@127.0.0.1:5432/db",
        ] {
            let err = format!("{:#}", Db::connect(url).await.err().unwrap());
            assert!(err.contains("must be percent-encoded"), "{err}");
            assert!(!err.contains("ss/w") && !err.contains("pa#"), "{err}");
        }
    }

    /// A URL refused before its query is read (a `#` in it, a scheme of another database)
    /// is shown without its query, where a misspelt password parameter would be in clear.
    #[test]
    fn a_refused_url_is_shown_without_its_query() {
        let err = format!(
            "{:#}",
            check_postgres_url("postgres://u@h/db?passwrod=top#secret").unwrap_err()
        );
        assert!(err.contains("must be percent-encoded"), "{err}");
        assert!(err.contains("postgres://u@h/db?..."), "{err}");
        assert!(!err.contains("top"), "{err}");
        let err = Backend::of_url("postgre://h/db?passwrod=top")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"postgre://h/db?...\""), "{err}");
        assert!(!err.contains("top"), "{err}");
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://a.db"), "sqlite://a.db");
    }

    /// A password may also come as a query parameter, which sqlx reads like the one after
    /// the user name; the other parameters stay readable.
    #[test]
    fn redacts_passwords_in_the_query() {
        for (url, want) in [
            (
                "postgres://u@h/db?password=secret",
                "postgres://u@h/db?password=***",
            ),
            (
                "postgres://u@h:5432/db?sslmode=require&sslpassword=secret&application_name=x",
                "postgres://u@h:5432/db?sslmode=require&sslpassword=***",
            ),
            (
                "postgres://u:one@h/db?PassWord=secret&pass%77ord=secret#f",
                "postgres://u:***@h/db?PassWord=***",
            ),
            (
                "postgres://u@h/db?sslmode=x&pass%77ord=secret&password=more",
                "postgres://u@h/db?sslmode=x&pass%77ord=***",
            ),
            ("postgres://h/db?password=", "postgres://h/db?password=***"),
            (
                "postgres://u@h/db?passwords=kept&user=password",
                "postgres://u@h/db?passwords=kept&user=password",
            ),
            // A password holding `#` or `&` as is: its tail is no other parameter.
            (
                "postgres://h/db?password=ab#cd",
                "postgres://h/db?password=***",
            ),
            (
                "postgres://h/db?password=ab&cd&sslmode=require",
                "postgres://h/db?password=***",
            ),
        ] {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    /// The user and password end at the last `@` of the authority: an `@` in the query (a
    /// user name, a file's path) neither hides the query nor shows its password. A password
    /// with `/`, `?`, `#` or `@` written as is, which ends the authority early, is hidden
    /// whole all the same.
    #[test]
    fn redacts_the_authoritys_password_whatever_the_query_holds() {
        for (url, want) in [
            (
                "postgres://h:5432/db?user=me@srv&password=p1",
                "postgres://h:5432/db?user=me@srv&password=***",
            ),
            (
                "postgres://u:p0@h/db?sslrootcert=/etc/a@b.pem&password=p2",
                "postgres://u:***@h/db?sslrootcert=/etc/a@b.pem&password=***",
            ),
            (
                "postgres://[::1]:5432/db?sslrootcert=/etc/a@b.pem",
                "postgres://[::1]:5432/db?sslrootcert=/etc/a@b.pem",
            ),
            ("postgres://me@corp:pw@h/db", "postgres://me@corp:***@h/db"),
            ("postgres://u:pa?ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p/a?s@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p@a?ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:pa#ss@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u:p@ss/w:rd#1@127.0.0.1:5432/db",
                "postgres://u:***@127.0.0.1:5432/db",
            ),
        ] {
            assert_eq!(redact(url), want, "{url}");
        }
    }

    /// sqlx logs a query parameter it does not know with its value at every connection,
    /// and connects without it: such a parameter (a libpq one, a misspelt or differently
    /// cased one) is refused by name, a password among them withheld.
    #[test]
    fn unknown_query_parameters_are_refused_by_name() {
        for (url, key) in [
            (
                "postgres://u@h/db?sslmode=require&sslpassword=topsecret",
                "sslpassword",
            ),
            ("postgres://u@h/db?PassWord=topsecret", "PassWord"),
            ("postgres://u@h/db?sslmdoe=verify-full", "sslmdoe"),
            (
                "postgres://u@h/db?sslmode=require&passwrod=topsecret",
                "passwrod",
            ),
            (
                "postgres://u@h/db?pasword=topsecret&sslmode=require",
                "pasword",
            ),
            (
                "postgres://u@h/db?options[search_path=s",
                "options[search_path",
            ),
        ] {
            let err = format!("{:#}", check_postgres_url(url).unwrap_err());
            assert!(err.contains(&format!("query parameter {key:?}")), "{err}");
            assert!(
                err.contains("sslrootcert") && err.contains("options[...]"),
                "{err}"
            );
            assert!(!err.contains("topsecret"), "{err}");
            assert!(
                err.contains("the database URL postgres://u@h/db?..."),
                "{err}"
            );
        }
        check_postgres_url(
            "postgres://u:p@h:5432/db?sslmode=verify-full&ssl-mode=require&sslrootcert=a\
             &ssl-root-cert=a&ssl-ca=a&sslcert=a&ssl-cert=a&sslkey=a&ssl-key=a\
             &statement-cache-capacity=1&host=h&hostaddr=127.0.0.1&port=1&dbname=d&user=u\
             &password=p&application_name=x&options=-c%20a%3Db&options[search_path]=s",
        )
        .unwrap();
    }

    /// A file the URL's query names that is not there is reported by parameter and path,
    /// the path percent-decoded as sqlx reads it; an inline PEM value is no path.
    #[test]
    fn the_files_a_database_url_names_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root ca.pem"), "x").unwrap();
        let d = dir.path().display().to_string();
        let there = format!("{}/root%20ca.pem", d.replace(' ', "%20"));
        let url = format!(
            "postgres://u:p@h/db?sslmode=verify-full&sslrootcert={there}\
             &sslcert={d}/c.pem&ssl-key={d}/nowhere/c.key"
        );
        assert_eq!(
            database_file_errors(&url),
            [
                format!("database_url: sslcert {d}/c.pem is not a readable file"),
                format!("database_url: ssl-key {d}/nowhere/c.key is not a readable file"),
            ]
        );
        // A folder is not a file.
        let url = format!("postgres://h/db?ssl-ca={d}");
        assert_eq!(
            database_file_errors(&url),
            [format!("database_url: ssl-ca {d} is not a readable file")]
        );
        let inline = "-----BEGIN%20CERTIFICATE-----x-----END%20CERTIFICATE-----";
        for fine in [
            format!("postgres://u:p@h/db?sslrootcert={there}"),
            format!("postgres://h/db?sslrootcert={inline}"),
            format!("postgres://h/db?sslmode=disable&sslrootcert={d}/missing.pem"),
            format!("sqlite://{d}/x.db?sslrootcert={d}/missing.pem"),
            "postgres://u:p@h/db".to_string(),
        ] {
            assert!(database_file_errors(&fine).is_empty(), "{fine}");
        }
    }

    /// The address named in messages is the one sqlx connects to, query parameters and
    /// Unix sockets included.
    #[test]
    fn the_server_address_is_the_one_connected_to() {
        for (url, want) in [
            ("postgres://u:p@h/db", "h:5432"),
            ("postgres://u:p@h:6000/db", "h:6000"),
            ("postgres://[::1]:6000/db", "[::1]:6000"),
            ("postgres://h/db?host=other&port=6001", "other:6001"),
            ("postgres://h/db?hostaddr=::1", "[::1]:5432"),
            (
                "postgres:///db?host=/run/postgresql",
                "/run/postgresql/.s.PGSQL.5432",
            ),
            ("postgres://%2Frun%2Fpg:6002/db", "/run/pg/.s.PGSQL.6002"),
        ] {
            let options = AnyConnectOptions::from_str(url).unwrap();
            assert_eq!(server_address(&options), want, "{url}");
        }
    }

    /// A URL with an unknown scheme is named in its error without its password.
    #[test]
    fn an_unknown_scheme_is_named_without_its_password() {
        let err = Backend::of_url("postgre://u:secret@h/db?password=other")
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgre://u:***@h/db?..."), "{err}");
        assert!(!err.contains("secret") && !err.contains("other"), "{err}");
    }

    #[test]
    fn the_url_names_the_backend() {
        assert_eq!(Backend::of_url("sqlite::memory:").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::of_url("postgres://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::of_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert!(Backend::of_url("mysql://h/db").is_err());
    }

    #[test]
    fn placeholders_are_numbered_from_first() {
        assert_eq!(placeholders(3, 3), "$3, $4, $5");
        assert_eq!(values_row([2, 1, 3]), "($2, $1, $3)");
    }

    #[test]
    fn sqlite_gets_positional_or_question_numbered_parameters() {
        let sqlite = Backend::Sqlite;
        assert_eq!(
            sqlite.numbered("INSERT INTO t VALUES ($1, $2), ($3, $4)"),
            "INSERT INTO t VALUES (?, ?), (?, ?)"
        );
        // Out of order or repeated: each keeps its number.
        assert_eq!(
            sqlite.numbered("UPDATE t SET a = $2 WHERE b = $1 OR c = $1"),
            "UPDATE t SET a = ?2 WHERE b = ?1 OR c = ?1"
        );
        assert_eq!(sqlite.numbered("SELECT $1, $3"), "SELECT ?1, ?3");
        assert_eq!(sqlite.numbered("SELECT $10, $11"), "SELECT ?10, ?11");
        // Quoted text is not touched; a lone `$` is not a parameter.
        assert_eq!(
            sqlite.numbered("SELECT '$1', \"$2\", $1 || '$'"),
            "SELECT '$1', \"$2\", ? || '$'"
        );
        assert_eq!(sqlite.numbered("SELECT 1"), "SELECT 1");
        let postgres = Backend::Postgres;
        assert_eq!(postgres.numbered("SELECT $1, $2"), "SELECT $1, $2");
    }

    #[test]
    fn renumbered_moves_parameters_outside_quotes() {
        assert_eq!(
            renumbered("UPDATE t SET a = $2 WHERE b = $1 OR c = $10", 3),
            "UPDATE t SET a = $5 WHERE b = $4 OR c = $13"
        );
        assert_eq!(
            renumbered("SELECT '$1', \"$2\", $1 || '$'", 7),
            "SELECT '$1', \"$2\", $8 || '$'"
        );
        assert_eq!(renumbered("SELECT $1", 0), "SELECT $1");
        assert_eq!(renumbered("SELECT 1", 4), "SELECT 1");
    }

    /// What the rewrite must keep: every value bound where its `$N` was, with sqlx binding
    /// the rewritten text, on a real SQLite connection.
    #[tokio::test]
    async fn rewritten_parameters_bind_the_same_values() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        for sql in [
            "SELECT $1 || '-' || $2 || '-' || $3",
            "SELECT $2 || '-' || $1 || '-' || $3 || '-' || $1",
        ] {
            let want: String = sqlx::query_scalar(sql)
                .bind("a")
                .bind("b")
                .bind("c")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            let got: String = sqlx::query_scalar(&Backend::Sqlite.numbered(sql))
                .bind("a")
                .bind("b")
                .bind("c")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            assert_eq!(got, want, "{sql}");
        }
    }

    /// Each run gets its own row's values and answers its own count, in one text or alone.
    #[tokio::test]
    async fn execute_each_binds_every_run_its_own_values() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        let mut conn = db.pool.acquire().await.unwrap();
        sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY, v BIGINT, w TEXT)")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t (id, v, w) VALUES ('a', 0, ''), ('b', 0, ''), ('c', 0, '')")
            .execute(&mut *conn)
            .await
            .unwrap();
        let update = "UPDATE t SET v = $1, w = $3 WHERE id = $2";
        let rows = [(10_i64, "a", "x"), (20, "missing", "y"), (30, "c", "z")];
        for (backend_rows, want) in [(&rows[..], vec![1, 0, 1]), (&rows[2..], vec![1])] {
            let changed = execute_each(
                &mut conn,
                Backend::Sqlite,
                update,
                3,
                backend_rows,
                |q, (v, id, w)| q.bind(*v).bind(*id).bind(*w),
            )
            .await
            .unwrap();
            assert_eq!(changed, want);
        }
        let stored: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT id, v, w FROM t ORDER BY id")
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        assert_eq!(
            stored,
            vec![
                ("a".into(), 10, "x".into()),
                ("b".into(), 0, String::new()),
                ("c".into(), 30, "z".into())
            ]
        );
    }

    #[test]
    fn statements_stay_within_their_parameter_budget() {
        assert_eq!(Backend::Sqlite.rows_per_statement(13), 30);
        assert_eq!(Backend::Postgres.rows_per_statement(13), 615);
        assert_eq!(Backend::Sqlite.rows_per_statement(1000), 1);
        assert_eq!(Backend::Sqlite.rows_per_statement(0), 400);
    }

    #[test]
    fn each_backend_gives_its_lock_clauses() {
        let sqlite = Backend::Sqlite;
        assert_eq!(sqlite.lock_rows(), "");
        assert_eq!(sqlite.skip_locked(), "");
        assert_eq!(sqlite.skip_locked_of("d"), "");
        assert_eq!(sqlite.transaction_lock(), None);
        assert_eq!(sqlite.bytewise(), "");
        let postgres = Backend::Postgres;
        assert_eq!(postgres.bytewise(), " COLLATE \"C\"");
        assert_eq!(postgres.lock_rows(), " FOR UPDATE");
        assert_eq!(postgres.skip_locked_of("d"), " FOR UPDATE OF d SKIP LOCKED");
        assert!(postgres.transaction_lock().is_some());
    }

    #[test]
    fn lookups_are_one_subquery_per_column() {
        assert_eq!(
            lookups(
                "requests r",
                "r.id = jobs.request_id",
                &[("r.body", "body"), ("CAST(r.kind AS BIGINT)", "kind")]
            ),
            "(SELECT r.body FROM requests r WHERE r.id = jobs.request_id) AS body, \
             (SELECT CAST(r.kind AS BIGINT) FROM requests r WHERE r.id = jobs.request_id) AS kind"
        );
        assert_eq!(lookups("t", "true", &[]), "");
    }

    /// A server that refuses the connection is named with the refusal, not with a pool's
    /// timeout after its wait.
    #[tokio::test]
    async fn a_refused_postgres_connection_says_so() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let url = format!("postgres://dsrelay:secret@127.0.0.1:{port}/db");
        let err = format!("{:#}", Db::connect(&url).await.err().unwrap());
        assert!(err.contains("refused"), "{err}");
        assert!(
            err.contains(&format!("dsrelay:***@127.0.0.1:{port}/db")),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        assert!(err.contains("still so after 2 s of trying"), "{err}");
    }

    /// A listener on 127.0.0.1 that reads once from each connection, writes `answer` and
    /// hangs up.
    async fn answering(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let (mut connection, _) = listener.accept().await.unwrap();
                let _ = connection.read(&mut [0u8; 64]).await;
                let _ = connection.write_all(answer).await;
            }
        });
        (port, server)
    }

    /// Something other than PostgreSQL at the URL's port (an HTTP server, a gRPC server) is
    /// named as such with the address, rather than with sqlx's words for an unexpected byte;
    /// one that hangs up without a word (what a proxy does while its server is down), or
    /// whose answer sqlx cannot tell from that, is tried again until the deadline and then
    /// named so.
    #[tokio::test]
    async fn a_server_that_is_not_postgres_is_named_so() {
        // What a gRPC server sends first: HTTP/2's SETTINGS frame.
        const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
        const HTTP: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
        const WRONG: &str = "did not answer as PostgreSQL";
        const CLOSED: &str = "closed the connection without a PostgreSQL answer: not \
                              PostgreSQL, or a proxy whose server is not up";
        let cases = [
            (HTTP, "", WRONG),
            (HTTP, "?sslmode=require&password=xyzzy", WRONG),
            (H2_SETTINGS, "?sslmode=disable", WRONG),
            // The first byte, `H`, starts a message of PostgreSQL's whose length (`TTP/`)
            // is never reached before the end.
            (HTTP, "?sslmode=disable", CLOSED),
            // sqlx reads a zero byte where the answer to its TLS request should be.
            (H2_SETTINGS, "", CLOSED),
            (b"", "", CLOSED),
            (b"", "?sslmode=disable&password=xyzzy", CLOSED),
        ];
        let checks = cases.into_iter().map(|(answer, query, want)| async move {
            let (port, server) = answering(answer).await;
            let url = format!("postgres://u:secret@127.0.0.1:{port}/db{query}");
            let err = format!("{:#}", Db::connect(&url).await.err().unwrap());
            server.abort();
            let case = format!("{:?}{query}: {err}", String::from_utf8_lossy(answer));
            assert!(
                err.contains(&format!("the server at 127.0.0.1:{port} {want}")),
                "{case}"
            );
            assert!(err.contains("check that database_url names"), "{case}");
            assert_eq!(err.contains("still so after 2 s"), want == CLOSED, "{case}");
            assert!(err.contains("u:***@127.0.0.1"), "{case}");
            assert!(!err.contains("secret") && !err.contains("xyzzy"), "{case}");
        });
        futures::future::join_all(checks).await;
    }

    /// The address in the message is the one the query's `host` and `port` name.
    #[tokio::test]
    async fn the_address_named_is_the_querys() {
        let (port, server) = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let url = format!("postgres://u:secret@db.invalid/db?host=127.0.0.1&port={port}");
        let err = format!("{:#}", Db::connect(&url).await.err().unwrap());
        server.abort();
        assert!(
            err.contains(&format!(
                "the server at 127.0.0.1:{port} did not answer as PostgreSQL"
            )),
            "{err}"
        );
    }

    /// A PostgreSQL server that asks for an authentication method sqlx cannot do (GSSAPI,
    /// SSPI, a SASL mechanism other than SCRAM) is a PostgreSQL server: the message points
    /// at its pg_hba.conf.
    #[tokio::test]
    async fn an_authentication_method_sqlx_cannot_do_is_named_so() {
        const GSS: &[u8] = &[b'R', 0, 0, 0, 8, 0, 0, 0, 7];
        const SSPI: &[u8] = &[b'R', 0, 0, 0, 8, 0, 0, 0, 9];
        const OAUTH: &[u8] = b"R\0\0\0\x15\0\0\0\x0aOAUTHBEARER\0\0";
        for answer in [GSS, SSPI, OAUTH] {
            let (port, server) = answering(answer).await;
            let url = format!("postgres://u:secret@127.0.0.1:{port}/db?sslmode=disable");
            let err = format!("{:#}", Db::connect(&url).await.err().unwrap());
            server.abort();
            assert!(err.contains("authentication"), "{err}");
            assert!(err.contains("pg_hba.conf"), "{err}");
            assert!(!err.contains("did not answer as PostgreSQL"), "{err}");
            assert!(!err.contains("still so after"), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }

    /// A proxy in front of a PostgreSQL server that is not up yet (docker-proxy, a port
    /// forward) accepts connections and closes them: it is waited for as a refusal is.
    #[tokio::test]
    async fn a_proxy_whose_server_comes_up_during_the_start_is_waited_for() {
        let Some(server) = crate::testing::postgres_server() else {
            return;
        };
        let target = server_address(&AnyConnectOptions::from_str(&server).unwrap());
        let (scheme, rest) = server.split_once("://").unwrap();
        let at = rest.rfind('@').map_or(0, |at| at + 1);
        let (user, after) = rest.split_at(at);
        let path = after.split_once('/').map_or("", |(_, path)| path);
        // sqlx meets the closing as a zero byte where TLS's answer should be, and without
        // TLS as the end of the stream.
        for query in ["", "?sslmode=disable"] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let up_at = tokio::time::Instant::now() + Duration::from_millis(600);
            let target = target.clone();
            let proxy = tokio::spawn(async move {
                loop {
                    let (mut inbound, _) = listener.accept().await.unwrap();
                    if tokio::time::Instant::now() < up_at {
                        continue;
                    }
                    let target = target.clone();
                    tokio::spawn(async move {
                        let mut outbound = tokio::net::TcpStream::connect(&target).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                }
            });
            let url = format!("{scheme}://{user}127.0.0.1:{port}/{path}{query}");
            let db = Db::connect(&url)
                .await
                .expect("connected once the proxy's server was up");
            sqlx::query("SELECT 1").execute(&db.pool).await.unwrap();
            db.close().await;
            proxy.abort();
        }
    }

    /// A server that starts listening while the service starts (both started together) is
    /// waited for, as the pool would wait, not taken for a refusal.
    #[tokio::test]
    async fn a_server_that_comes_up_during_the_start_is_waited_for() {
        let Some(server) = crate::testing::postgres_server() else {
            return;
        };
        let (scheme, rest) = server.split_once("://").unwrap();
        let at = rest.rfind('@').map_or(0, |at| at + 1);
        let (user, after) = rest.split_at(at);
        let (host, path) = after.split_once('/').unwrap_or((after, ""));
        // A URL may leave the port out.
        let host = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:5432")
        };
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        // A forwarder to the real server that starts listening only after a while.
        let target = host.to_string();
        let forwarder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap();
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                let target = target.clone();
                tokio::spawn(async move {
                    let mut outbound = tokio::net::TcpStream::connect(&target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        let url = format!("{scheme}://{user}127.0.0.1:{port}/{path}");
        let db = Db::connect(&url)
            .await
            .expect("connected once the server listened");
        sqlx::query("SELECT 1").execute(&db.pool).await.unwrap();
        db.close().await;
        forwarder.abort();
    }

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/sub/x.db", dir.path().display());
        let prepared = prepare_sqlite_url(&url).unwrap();
        assert!(prepared.ends_with("?mode=rwc"));
        assert!(dir.path().join("sub").is_dir());
    }
}

#[cfg(test)]
mod migrate_tests {
    use std::borrow::Cow;

    use sqlx::migrate::{Migration, MigrationType};

    use super::*;

    fn migrator(steps: &[(i64, &'static str, &'static str)]) -> Migrator {
        let migrations = steps
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into(),
                    false,
                )
            })
            .collect();
        Migrator {
            migrations: Cow::Owned(migrations),
            ..Migrator::DEFAULT
        }
    }

    async fn sqlite(dir: &tempfile::TempDir) -> Db {
        let url = format!("sqlite://{}", dir.path().join("m.db").display());
        Db::connect(&url).await.unwrap()
    }

    #[tokio::test]
    async fn another_services_database_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(&dir).await;
        let registry = migrator(&[(1, "registry init", "CREATE TABLE deliveries (id BIGINT)")]);
        db.migrate(&registry, &registry).await.unwrap();
        let processor = migrator(&[(1, "processor init", "CREATE TABLE tasks (id BIGINT)")]);
        let err = format!(
            "{:#}",
            db.migrate(&processor, &processor).await.unwrap_err()
        );
        assert!(
            err.contains(
                "this database holds another service's schema (migrations 1 registry init, none \
                 of them this service's): point database_url at this service's own database"
            ),
            "{err}"
        );
    }

    /// An upgrade's log says that it changed the schema, and from which version to which.
    #[tokio::test]
    async fn the_log_says_which_migrations_were_applied() {
        let logs = crate::testing::captured_logs();
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(&dir).await;
        let first = [
            (1, "init", "CREATE TABLE a (id BIGINT)"),
            (2, "more", "CREATE TABLE b (id BIGINT)"),
        ];
        let mut second = first.to_vec();
        second.push((3, "later", "CREATE TABLE c (id BIGINT)"));
        let logged = |steps: &[(i64, &'static str, &'static str)]| {
            let steps = migrator(steps);
            let db = &db;
            let logs = logs.clone();
            async move {
                let start = logs.text().len();
                db.migrate(&steps, &steps).await.unwrap();
                let text = logs.text();
                let line = text[start..]
                    .lines()
                    .find(|line| {
                        line.contains("database migrations applied")
                            || line.contains("database schema up to date")
                    })
                    .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap());
                line.expect("a line about the migrations")["fields"].clone()
            }
        };
        let fields = logged(&first).await;
        assert_eq!(fields["message"], "database migrations applied", "{fields}");
        assert_eq!(
            (
                fields["count"].as_u64(),
                fields["from"].as_i64(),
                fields["to"].as_i64()
            ),
            (Some(2), Some(1), Some(2)),
            "{fields}"
        );
        assert_eq!(fields["new_database"], true, "{fields}");
        let fields = logged(&second).await;
        assert_eq!(fields["message"], "database migrations applied", "{fields}");
        assert_eq!(
            (
                fields["count"].as_u64(),
                fields["from"].as_i64(),
                fields["to"].as_i64()
            ),
            (Some(1), Some(3), Some(3)),
            "{fields}"
        );
        assert_eq!(fields["new_database"], false, "{fields}");
        let fields = logged(&second).await;
        assert_eq!(fields["message"], "database schema up to date", "{fields}");
        assert_eq!(fields["version"], 3, "{fields}");
    }

    #[tokio::test]
    async fn an_edited_migration_is_told_apart_from_another_service() {
        let dir = tempfile::tempdir().unwrap();
        let db = sqlite(&dir).await;
        let before = migrator(&[
            (1, "init", "CREATE TABLE a (id BIGINT)"),
            (2, "more", "CREATE TABLE b (id BIGINT)"),
        ]);
        db.migrate(&before, &before).await.unwrap();
        let edited = migrator(&[
            (1, "init", "CREATE TABLE a (id BIGINT)"),
            (2, "more", "CREATE TABLE b (id BIGINT, x TEXT)"),
        ]);
        let err = format!("{:#}", db.migrate(&edited, &edited).await.unwrap_err());
        assert!(err.contains("a migration file was edited"), "{err}");
        assert!(!err.contains("another service"), "{err}");
    }

    /// A plain login role on a database it does not own (PostgreSQL 15 and later grant it
    /// no CREATE on `public`) is told the grant it needs, and that grant is enough.
    #[tokio::test]
    async fn a_role_without_create_is_told_the_grant() {
        let Some(server) = crate::testing::postgres_server() else {
            return;
        };
        let suffix = format!("{:016x}", fastrand::u64(..));
        let (name, role) = (format!("grants_{suffix}"), format!("plain_{suffix}"));
        let admin = Db::connect(&server).await.unwrap();
        for sql in [
            format!("CREATE DATABASE \"{name}\""),
            format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw'"),
        ] {
            sqlx::query(&sql).execute(&admin.pool).await.unwrap();
        }
        let owner = Db::connect(&format!("{}/{name}", server.rsplit_once('/').unwrap().0))
            .await
            .unwrap();
        // What PostgreSQL 15 and later do by themselves; older servers grant it to all.
        sqlx::query("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            .execute(&owner.pool)
            .await
            .unwrap();
        let (scheme, rest) = server.split_once("://").unwrap();
        let host = rest[rest.rfind('@').map_or(0, |at| at + 1)..]
            .split('/')
            .next()
            .unwrap();
        let steps = migrator(&[(1, "init", "CREATE TABLE t (id BIGINT)")]);

        let db = Db::connect(&format!("{scheme}://{role}:pw@{host}/{name}"))
            .await
            .unwrap();
        let err = format!("{:#}", db.migrate(&steps, &steps).await.unwrap_err());
        assert!(
            err.contains(&format!(
                "the database user needs CREATE on the schema: GRANT USAGE, CREATE ON SCHEMA \
                 public TO \"{role}\""
            )),
            "{err}"
        );
        sqlx::query(&format!(
            "GRANT USAGE, CREATE ON SCHEMA public TO \"{role}\""
        ))
        .execute(&owner.pool)
        .await
        .unwrap();
        db.migrate(&steps, &steps).await.unwrap();
        db.close().await;

        // Another service with a role of its own, pointed here by mistake, given the same
        // grant: told it is probably another service's database, not to take its tables.
        let other = format!("other_{suffix}");
        sqlx::query(&format!("CREATE ROLE \"{other}\" LOGIN PASSWORD 'pw'"))
            .execute(&admin.pool)
            .await
            .unwrap();
        sqlx::query(&format!(
            "GRANT USAGE, CREATE ON SCHEMA public TO \"{other}\""
        ))
        .execute(&owner.pool)
        .await
        .unwrap();
        let theirs = Db::connect(&format!("{scheme}://{other}:pw@{host}/{name}"))
            .await
            .unwrap();
        let processor = migrator(&[(1, "processor init", "CREATE TABLE p (id BIGINT)")]);
        let err = format!(
            "{:#}",
            theirs.migrate(&processor, &processor).await.unwrap_err()
        );
        assert!(err.contains("probably another service's database"), "{err}");
        assert!(!err.contains("GRANT"), "{err}");
        theirs.close().await;

        owner.close().await;
        for sql in [
            format!("DROP DATABASE \"{name}\""),
            format!("DROP ROLE \"{role}\""),
            format!("DROP ROLE \"{other}\""),
        ] {
            sqlx::query(&sql).execute(&admin.pool).await.unwrap();
        }
    }
}

#[cfg(test)]
mod reader_tests {
    use super::*;

    /// What the reader pool is for: while the one writer holds a transaction open, an
    /// answer's read neither waits for it nor sees its uncommitted rows, and sees them once
    /// committed.
    #[tokio::test]
    async fn sqlite_reads_do_not_wait_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("r.db").display());
        let db = Db::connect(&url).await.unwrap();
        db.pool
            .execute("CREATE TABLE t (id BIGINT PRIMARY KEY)")
            .await
            .unwrap();
        let count = |db: Db| async move {
            sqlx::query_scalar::<_, i64>("SELECT CAST(COUNT(*) AS BIGINT) FROM t")
                .fetch_one(&db.reader)
                .await
                .unwrap()
        };

        let mut tx = db.pool.begin().await.unwrap();
        tx.execute("INSERT INTO t (id) VALUES (1)").await.unwrap();
        // The writer's only connection is held by `tx`: through it this read would wait
        // the pool's acquire timeout, POOL_WAIT.
        let during = tokio::time::timeout(Duration::from_secs(5), count(db.clone()))
            .await
            .expect("a read while the writer's transaction is open does not wait for it");
        assert_eq!(during, 0, "the uncommitted row is not seen");
        tx.commit().await.unwrap();
        assert_eq!(count(db.clone()).await, 1, "the committed row is seen");

        let write = sqlx::query("INSERT INTO t (id) VALUES (2)")
            .execute(&db.reader)
            .await;
        assert!(write.is_err(), "the readers refuse writes: {write:?}");
    }

    /// An in-memory database exists only on its one connection, so its reader is that pool.
    #[tokio::test]
    async fn an_in_memory_database_reads_through_its_writer() {
        let db = Db::connect("sqlite::memory:").await.unwrap();
        db.pool
            .execute("CREATE TABLE t (id BIGINT PRIMARY KEY)")
            .await
            .unwrap();
        db.pool
            .execute("INSERT INTO t (id) VALUES (1)")
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("SELECT CAST(COUNT(*) AS BIGINT) FROM t")
            .fetch_one(&db.reader)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
}
