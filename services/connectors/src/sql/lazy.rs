//! The `sql` connector as the processor builds it: connected at start when its databases
//! answer, and on its first task when one of them could not be reached at start for a reason
//! that may pass, so that one holder's outage does not keep the processor from starting.
//!
//! At start, before anything is opened, every database the connector would open is checked:
//! a SQLite file must exist, as [`SqlConnector::connect`] requires, and a PostgreSQL URL must
//! be one the store accepts (an unencoded `@` in the password or a query parameter the driver
//! ignores fails the start even while its server is down) and is tried with one connection
//! (at most [`PROBE_TIMEOUT`]). A try that fails for a reason that cannot pass by itself (an
//! authentication refusal, a missing database, a name that does not resolve) fails the start
//! with the reason opening that database the store's way gives, whatever the other databases
//! answer. When every try succeeds, the connector is connected by [`SqlConnector::connect`]
//! as before, checks and all (the tries cost a healthy start one connection each, no wait).
//! When none fails for good but one is refused, is full (SQLSTATE class 53: too many
//! connections), has its server starting up or shutting down (57P01, 57P02, 57P03), drops the
//! connection (class 08, a reset, a broken pipe) or does not answer in time, the connector is
//! left unconnected and says so at warn: the kind of failure in the clear, the server's own
//! words withheld ([`ConnectorError::logged`]), since they may quote the holder's data.
//!
//! An unconnected connector answers what its configuration alone decides (the kinds it
//! supports, the identities it matches, its tables, its controllers) and connects when a
//! task or bulk step needs it, making the checks [`SqlConnector::connect`] makes. Until
//! that succeeds, each call fails: transiently when the connector's own classification
//! ([`super::execute::classify`]) says the failure may pass, or when the database still
//! does not answer in time, so that the processor marks the holder unreachable and waits;
//! permanently otherwise (the rules do not match the schema), with the reason. One call
//! connects at a time; a call made meanwhile fails at once, transiently, with the last
//! try's error, rather than queueing behind tries that may each take [`PROBE_TIMEOUT`].

use std::str::FromStr;
use std::time::Duration;

use dsrelay_proto::v1::{IdentityEncoding, IdentityType, RequestKind};
use dsrelay_runtime::store::{redact, Backend};
use sqlx::ConnectOptions;
use tokio::sync::OnceCell;

use super::{SqlConnector, SqlConnectorConfig};
use crate::{BoxFuture, BulkJob, Connector, ConnectorError, HeldTable, Outcome, Task};

/// How long one try of a database's connection may take before the database counts as not
/// answering. A server that answers at all does so far sooner; a host that drops packets
/// would otherwise hold the start for the system's TCP timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `sql` connector, connected now or on first use.
pub(crate) struct LazySqlConnector {
    /// The connector without its databases: what the configuration alone decides is asked
    /// of it, so that it answers as the connected one does.
    unconnected: SqlConnector,
    /// Filled by the first successful connection, at start or on first use.
    connected: OnceCell<SqlConnector>,
    /// Held by the one call that tries to connect: a call finding it held fails at once.
    connecting: tokio::sync::Mutex<()>,
    /// The last try's error when it was transient, which a call failing at once repeats.
    last_failure: std::sync::Mutex<Option<ConnectorError>>,
}

/// Why a database could not be reached.
enum Unreached {
    /// No answer within [`PROBE_TIMEOUT`].
    TimedOut,
    /// The database's or the socket's error.
    Failed(sqlx::Error),
}

impl LazySqlConnector {
    /// The connector for `config`, not connected.
    fn unconnected(config: SqlConnectorConfig) -> Self {
        Self {
            unconnected: SqlConnector {
                config: std::sync::Arc::new(config),
                db: None,
                own: Default::default(),
                batch_subjects: super::bulk::BATCH_SUBJECTS,
            },
            connected: OnceCell::new(),
            connecting: tokio::sync::Mutex::new(()),
            last_failure: std::sync::Mutex::new(None),
        }
    }

    /// Validates `config` and connects as [`SqlConnector::connect`] does, unless a
    /// PostgreSQL database it opens cannot be reached now for a reason that may pass and
    /// none of its databases has a problem that cannot: then the connector starts
    /// unconnected and connects on first use.
    pub(crate) async fn start(config: SqlConnectorConfig) -> anyhow::Result<Self> {
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!(
                "invalid sql connector configuration: {}",
                problems.join("; ")
            );
        }
        let mut unreached = Vec::new();
        for (controller, url) in database_urls(&config) {
            // As `SqlConnector::connect` says which controller's database failed.
            let context = |e: anyhow::Error| match controller {
                Some(name) => {
                    e.context(format!("connecting to the database of controller {name:?}"))
                }
                None => e,
            };
            if Backend::of_url(url)? != Backend::Postgres {
                super::check_holder_file(url).map_err(context)?;
                continue;
            }
            // A URL the store could never connect with (a password holding an unencoded
            // `@`, a query parameter the driver ignores, a TLS file missing) fails the start
            // even while the server is down.
            dsrelay_runtime::store::check_postgres_settings(url).map_err(context)?;
            match probe(url).await {
                Ok(()) => {}
                Err(Unreached::Failed(e)) if !may_pass_at_start(&e) => {
                    // Opened the store's way, the database fails the start with the
                    // store's reason and advice, as connecting the connector would.
                    let db = super::open_holder_db(url).await.map_err(context)?;
                    // It answered this time; the connector opens its own connections.
                    db.close().await;
                }
                Err(why) => unreached.push((controller, url, why)),
            }
        }
        if unreached.is_empty() {
            let connector = SqlConnector::connect(config.clone()).await?;
            let lazy = Self::unconnected(config);
            let _ = lazy.connected.set(connector);
            return Ok(lazy);
        }
        for (controller, url, why) in &unreached {
            let withheld = match why {
                Unreached::TimedOut => None,
                Unreached::Failed(e) => Some(ConnectorError::Transient(e.to_string())),
            };
            tracing::warn!(
                database = %redact(url),
                controller = controller.unwrap_or_default(),
                answer = withheld.as_ref().map(|e| tracing::field::display(e.logged())),
                "the holder's database cannot be reached ({}); the processor starts \
                 without it, and the sql connector connects on the holder's first task, \
                 which waits as for a holder down until it can",
                unreached_kind(why)
            );
        }
        Ok(Self::unconnected(config))
    }

    /// The connector connected to its databases, connecting now when it is not yet. While
    /// another call connects, fails at once instead of waiting for its try.
    async fn connected(&self) -> Result<&SqlConnector, ConnectorError> {
        if let Some(connector) = self.connected.get() {
            return Ok(connector);
        }
        let Ok(_connecting) = self.connecting.try_lock() else {
            let last = self.last_failure.lock().ok().and_then(|last| last.clone());
            return Err(last.unwrap_or_else(|| {
                ConnectorError::Transient(
                    "connecting to the holder's database: another task is connecting it now"
                        .to_string(),
                )
            }));
        };
        // Connected by the call that held the lock before this one.
        if let Some(connector) = self.connected.get() {
            return Ok(connector);
        }
        let result = self.connect_now().await;
        // Only a transient error is repeated: a call failing at once must not fail its task
        // for good while the running try may yet succeed.
        let transient = match &result {
            Err(e @ (ConnectorError::Transient(_) | ConnectorError::RetryAfter { .. })) => {
                Some(e.clone())
            }
            _ => None,
        };
        if let Ok(mut last) = self.last_failure.lock() {
            *last = transient;
        }
        let connector = result?;
        Ok(self.connected.get_or_init(|| async { connector }).await)
    }

    /// The first connection after a start without the databases.
    async fn connect_now(&self) -> Result<SqlConnector, ConnectorError> {
        let config = &*self.unconnected.config;
        for (controller, url) in database_urls(config) {
            if Backend::of_url(url).is_ok_and(|b| b == Backend::Postgres) {
                let what = match controller {
                    Some(name) => {
                        format!("connecting to the holder's database of controller {name:?}")
                    }
                    None => "connecting to the holder's database".to_string(),
                };
                match probe(url).await {
                    Ok(()) => {}
                    Err(Unreached::TimedOut) => {
                        return Err(ConnectorError::Transient(format!(
                            "{what}: no answer within {PROBE_TIMEOUT:?}"
                        )))
                    }
                    Err(Unreached::Failed(e)) => return Err(super::execute::classify(&what, &e)),
                }
            }
        }
        match SqlConnector::connect(config.clone()).await {
            Ok(connector) => {
                tracing::info!("the sql connector connected to the holder's database");
                Ok(connector)
            }
            Err(e) => {
                let what = format!("connecting the sql connector: {e:#}");
                // A database error under the context (a check's query cut off) is sorted as
                // the connector sorts its statements' errors; the rest (the rules do not
                // match the schema) is for an operator to fix.
                let database = e.chain().find_map(|c| c.downcast_ref::<sqlx::Error>());
                Err(match database.map(|d| super::execute::classify("", d)) {
                    Some(ConnectorError::Transient(_)) => ConnectorError::Transient(what),
                    _ => ConnectorError::Permanent(what),
                })
            }
        }
    }
}

/// The databases `config` opens, each with the controller it is the own database of.
fn database_urls(config: &SqlConnectorConfig) -> Vec<(Option<&str>, &str)> {
    let mut urls = Vec::new();
    if super::opens_shared_url(config) {
        urls.push((None, config.url.as_str()));
    }
    for (name, scope) in &config.controllers {
        if let Some(url) = &scope.url {
            urls.push((Some(name.as_str()), url.as_str()));
        }
    }
    urls
}

/// Opens and closes one connection to `url`. `Ok` also when `url` does not parse: opening
/// it the store's way then says why.
async fn probe(url: &str) -> Result<(), Unreached> {
    sqlx::any::install_default_drivers();
    let Ok(options) = sqlx::any::AnyConnectOptions::from_str(url) else {
        return Ok(());
    };
    match tokio::time::timeout(PROBE_TIMEOUT, options.connect()).await {
        Ok(Ok(connection)) => {
            // A courtesy to the server; the store opens its own connections.
            let _ = sqlx::Connection::close(connection).await;
            Ok(())
        }
        Ok(Err(e)) => Err(Unreached::Failed(e)),
        Err(_) => Err(Unreached::TimedOut),
    }
}

/// Whether a first connection's failure may pass without anyone changing the configuration:
/// the server refuses connections, is full, starts up or shuts down, or drops the
/// connection. An authentication refusal is not among them, so that a processor started
/// with a wrong password says so at once rather than on its first task.
fn may_pass_at_start(e: &sqlx::Error) -> bool {
    use std::io::ErrorKind;
    match e {
        sqlx::Error::Io(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::NotConnected
                | ErrorKind::UnexpectedEof
                | ErrorKind::BrokenPipe
                | ErrorKind::TimedOut
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::NetworkDown
        ),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "57P01" | "57P02" | "57P03")
        }
        _ => false,
    }
}

/// What kind of failure `why` is, in words of the connector's own: for the database's error,
/// told by its SQLSTATE or the socket error's kind, never by its text, which may quote the
/// holder's data and is logged only withheld.
fn unreached_kind(why: &Unreached) -> String {
    let e = match why {
        Unreached::TimedOut => return format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
        Unreached::Failed(e) => e,
    };
    match e {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused".to_string()
        }
        sqlx::Error::Io(io) => format!("connection failed: {:?}", io.kind()),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // The code comes from the server too: shown only when it is one.
            let shown = code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric());
            let kind = match &*code {
                "53300" => "too many connections",
                "57P03" => "the server is starting up",
                "57P01" | "57P02" => "the server is shutting down",
                c if c.starts_with("53") => "the server is out of resources",
                c if c.starts_with("08") => "the connection failed",
                _ => "the database refused the connection",
            };
            match shown {
                true => format!("{kind} (SQLSTATE {code})"),
                false => kind.to_string(),
            }
        }
        _ => "the connection failed".to_string(),
    }
}

impl Connector for LazySqlConnector {
    fn kind_name(&self) -> &'static str {
        self.unconnected.kind_name()
    }

    fn supports(&self, kind: RequestKind) -> bool {
        self.unconnected.supports(kind)
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move { self.connected().await?.run(task).await })
    }

    fn matchable_identities(&self) -> Vec<(IdentityType, IdentityEncoding)> {
        self.unconnected.matchable_identities()
    }

    fn held_tables(&self) -> Vec<HeldTable> {
        self.unconnected.held_tables()
    }

    fn scoped_controllers(&self) -> Option<Vec<String>> {
        self.unconnected.scoped_controllers()
    }

    fn scopes_by_category(&self) -> bool {
        self.unconnected.scopes_by_category()
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move { self.connected().await?.run_bulk(job).await })
    }

    fn discard_bulk<'a>(
        &'a self,
        controller: &'a str,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ConnectorError>> {
        Box::pin(async move {
            (self.connected().await?)
                .discard_bulk(controller, job_id)
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::sample_config;
    use futures::FutureExt;

    /// While one call tries to connect (its connection taken by a server that never
    /// answers), a second call fails at once, transiently, without waiting for the first;
    /// the first ends when the server drops the connection, and a later call tries anew.
    #[tokio::test]
    async fn a_call_made_while_another_connects_fails_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let url = format!("postgres://holder:pw@127.0.0.1:{port}/accounting?sslmode=disable");
        let lazy = LazySqlConnector::unconnected(sample_config(&url));
        let first = lazy.connected();
        tokio::pin!(first);
        // Polled until the server holds its connection: the first call is then in its try.
        let socket = tokio::select! {
            accepted = listener.accept() => accepted.expect("accept").0,
            _ = &mut first => panic!("the first call ended before it reached the server"),
        };
        let second = lazy.connected().now_or_never();
        match second {
            Some(Err(ConnectorError::Transient(m))) => {
                assert!(m.contains("another task is connecting"), "{m}")
            }
            Some(other) => panic!("the second call: {:?}", other.map(|_| ())),
            None => panic!("the second call waited for the first"),
        }
        assert!(
            futures::poll!(&mut first).is_pending(),
            "the first call is still trying"
        );
        drop(socket);
        drop(listener);
        let first = first.await.map(|_| ());
        assert!(
            matches!(first, Err(ConnectorError::Transient(_))),
            "{first:?}"
        );
        // The first try over, the next call tries itself: the port is closed now.
        let third = lazy.connected().await.map(|_| ());
        match third {
            Err(ConnectorError::Transient(m)) => {
                assert!(!m.contains("another task is connecting"), "{m}")
            }
            other => panic!("the third call: {other:?}"),
        }
    }
}
