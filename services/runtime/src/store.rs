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
//! and uploads count their attempts at the claim). SQLite's `RETURNING` may name only the updated table, so
//! a joined table's columns come from scalar subqueries ([`lookups`]). `RETURNING` gives
//! rows in no particular order: callers sort them as the picking `ORDER BY` did.
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
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{AnyPool, ConnectOptions, Executor};

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
/// Every pool also waits up to 30 s for a connection, and has no idle timeout or lifetime:
/// those start sqlx's pool maintenance task, whose loop over `num_idle()` was seen to spin
/// without yielding (a CI run hung in it at a test's runtime shutdown). A connection needs
/// no recycling here.
fn pool_options() -> AnyPoolOptions {
    AnyPoolOptions::new()
        .acquire_timeout(Duration::from_secs(30))
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
            bail!("database url {url:?} must start with sqlite: or postgres://")
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
    /// is [`SQLITE_READERS`] connections of their own, which WAL lets read while the one
    /// writer writes, so an answer never queues behind the writer's transactions; each read
    /// sees every transaction committed before it began. On PostgreSQL, and on an in-memory
    /// SQLite database (which another connection would not see), it is `pool` itself.
    pub reader: AnyPool,
    /// The pool every claim of queued work goes through (see "Claims" above). On PostgreSQL
    /// it is [`CLAIMERS`] connections of their own on which the planner may not use a bitmap
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
                check_postgres_url(url)?;
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
        let Err(e) = migrator.run(&mut *conn).await else {
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

/// Refuses a URL whose user or password holds a character that ends it early: the driver
/// would connect to the host after the first `@` (or read the rest as a path or fragment)
/// and fail with a lookup of a host nobody meant, or worse, reach one.
fn check_postgres_url(url: &str) -> Result<()> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    // An `@` in the query (a file's path) is the query's business; a `#` anywhere cuts the
    // rest off as a fragment, which the driver ignores.
    let before_query = rest.split('?').next().unwrap_or(rest);
    if before_query.matches('@').count() > 1 || rest.contains('#') {
        bail!(
            "database_url {}: the user or password (or a path in the query) holds a character \
             that must be percent-encoded there (@ as %40, / as %2F, : as %3A, # as %23, ? as \
             %3F)",
            redact(url)
        );
    }
    Ok(())
}

/// The wait after the first failed connection; it doubles up to 2 s.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

/// Opens and closes one connection outside any pool, so that a start-up against a server
/// that refuses or rejects it fails with the server's or the socket's own error: the pool
/// would say only that it timed out. A refusal, or a server starting up (57P03) or full
/// (53300), is tried again until [`FIRST_CONNECTION_TIMEOUT`], as the pool would, since
/// services and their database are often started together; any other error (a wrong
/// password, a missing database, a name that does not resolve) fails the start at once.
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
        let passing = match &error {
            sqlx::Error::Io(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            sqlx::Error::Database(db) => {
                matches!(db.code().as_deref(), Some("57P03" | "53300"))
            }
            _ => false,
        };
        if !passing {
            bail!("connecting to {}: {error}", redact(url));
        }
        let now = tokio::time::Instant::now();
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
                "the database refuses connections or is starting up ({error}); trying again \
                 for up to {} s",
                FIRST_CONNECTION_TIMEOUT.as_secs()
            );
        }
        // The last try comes at the deadline itself.
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_secs(2));
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

/// The file a `sqlite:` URL names: what follows the scheme, up to its options.
fn sqlite_path(url: &str) -> &str {
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

/// The URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
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

/// The PostgreSQL server of this crate's own tests (`DSRELAY_TEST_POSTGRES_URL`), as the
/// services' `testing::on_postgres` reads it: `None`, said, when it is not set, which fails
/// in CI.
#[cfg(test)]
fn test_postgres_server() -> Option<String> {
    let server = std::env::var("DSRELAY_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty());
    if server.is_none() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")),
            "PostgreSQL is required in CI: set DSRELAY_TEST_POSTGRES_URL"
        );
        eprintln!("SKIPPED on PostgreSQL: DSRELAY_TEST_POSTGRES_URL is not set");
    }
    server
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

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://a.db"), "sqlite://a.db");
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

    /// A server that starts listening while the service starts (both started together) is
    /// waited for, as the pool would wait, not taken for a refusal.
    #[tokio::test]
    async fn a_server_that_comes_up_during_the_start_is_waited_for() {
        let Some(server) = test_postgres_server() else {
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
        let Some(server) = test_postgres_server() else {
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
        // the pool's 30 s acquire timeout.
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
