//! A processor built by [`App::build`] with a `sql` holder whose PostgreSQL database cannot be
//! reached at start: it starts, serves ListSubprocessors and its other holders' tasks, and
//! the holder's task waits until the database answers (the processor's store on SQLite and on
//! PostgreSQL, the holder on the PostgreSQL server of `DSRELAY_TEST_POSTGRES_URL`). A holder
//! whose URL is malformed or whose schema does not match the rules still stops the start. Before, a holder that refused connections at start stopped
//! the processor, after 30 s of trying.

use dsrelay_connectors::sql::{create_sample_accounting_db, sample_config};
use dsrelay_connectors::ConnectorConfig;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::{
    DeliverRequest, IdentityEncoding, IdentityType, ListSubprocessorsRequest, RequestKind,
    SubjectIdentity, Subprocessor, TaskState,
};
use dsrelay_runtime::pki::dev_identity;
use dsrelay_runtime::store::Db;
use dsrelay_runtime::testing::{captured_logs, postgres_server};

use crate::api_test_support::serve_processor_api;
use crate::app::Shared;
use crate::config::{Config, SubprocessorConfig};
use crate::store::TaskKey;
use crate::App;
use std::sync::Arc;

/// A database and a login role of its own on the test server, which are dropped by
/// [`Holder::drop_all`]. The role is no superuser, so that the database's connection limit
/// holds it back.
struct Holder {
    server: String,
    name: String,
    /// The holder's URL, as the role.
    url: String,
}

impl Holder {
    /// Creates the database and role, and in it the sample accounting database.
    async fn create(server: &str) -> Self {
        let name = format!("holder_{:016x}", fastrand::u64(..));
        let admin = Db::connect(server).await.expect("postgres");
        for statement in [
            format!("CREATE ROLE \"{name}\" LOGIN PASSWORD 'holder-pw'"),
            format!("CREATE DATABASE \"{name}\" OWNER \"{name}\""),
        ] {
            sqlx::query(&statement)
                .execute(&admin.pool)
                .await
                .expect(&statement);
        }
        admin.close().await;
        let url = server_url(server, &format!("{name}:holder-pw"), &name);
        Self {
            server: server.to_string(),
            name,
            url,
        }
    }

    /// Runs `statement` on the server as its administrator.
    async fn admin(&self, statement: &str) {
        let admin = Db::connect(&self.server).await.expect("postgres");
        sqlx::query(statement)
            .execute(&admin.pool)
            .await
            .expect(statement);
        admin.close().await;
    }

    /// Refuses every new connection of the role (too many connections for the database)
    /// and ends those it has.
    async fn refuse_connections(&self) {
        let name = &self.name;
        self.admin(&format!("ALTER DATABASE \"{name}\" CONNECTION LIMIT 0"))
            .await;
        self.admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'"
        ))
        .await;
    }

    async fn accept_connections(&self) {
        let name = &self.name;
        self.admin(&format!("ALTER DATABASE \"{name}\" CONNECTION LIMIT -1"))
            .await;
    }

    async fn drop_all(self) {
        let name = &self.name;
        self.admin(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
        self.admin(&format!("DROP ROLE IF EXISTS \"{name}\"")).await;
    }
}

/// `server` with its user and password replaced by `user_info` and its database by
/// `database`, its query (the server's TLS settings) kept.
fn server_url(server: &str, user_info: &str, database: &str) -> String {
    let (scheme, rest) = server.split_once("://").expect("a scheme");
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, format!("?{query}")),
        None => (rest, String::new()),
    };
    let host_and_path = before_query
        .rsplit_once('@')
        .map_or(before_query, |(_, h)| h);
    let host = host_and_path.split('/').next().unwrap_or(host_and_path);
    format!("{scheme}://{user_info}@{host}/{database}{query}")
}

/// The processor's configuration (the `crm` noop holder, controller `acme` as the
/// development PKI's registry) with the `sql` holder `accounting` at `holder_url`.
fn config_with_sql_holder(dir: &std::path::Path, database_url: &str, holder_url: &str) -> Config {
    let mut config = crate::contract_tests::config(dir, database_url, &["acme"]);
    config.controllers[0].identity = dev_identity("registry", "controller");
    config.subprocessors.push(SubprocessorConfig {
        name: "accounting".into(),
        categories: vec!["contact".into()],
        country: String::new(),
        transfer_mechanism: Default::default(),
        description: String::new(),
        connector: ConnectorConfig::Sql(sample_config(holder_url)),
    });
    config
}

/// The subprocessor `name` as ListSubprocessors answers it now.
async fn listed(
    client: &mut ProcessorServiceClient<tonic::transport::Channel>,
    name: &str,
) -> Subprocessor {
    let list = client
        .list_subprocessors(ListSubprocessorsRequest {})
        .await
        .expect("ListSubprocessors")
        .into_inner();
    let found = list.subprocessors.into_iter().find(|s| s.name == name);
    found.unwrap_or_else(|| panic!("{name} is listed"))
}

/// Claims the runnable tasks and takes one step of each; how many there were.
async fn step(shared: &Arc<Shared>) -> usize {
    let jobs = (shared.store)
        .claim_tasks(shared.clock.now_ms(), 10, 30_000)
        .await
        .expect("claim");
    let claimed = jobs.len();
    for job in jobs {
        crate::runner::run_task(shared, job).await.expect("step");
    }
    claimed
}

/// The state of `request_id`'s task at `subprocessor`, and the error it last failed with.
async fn task(shared: &Shared, request_id: &str, subprocessor: &str) -> (TaskState, String) {
    let key = TaskKey {
        controller: "acme".into(),
        request_id: request_id.into(),
        subprocessor: subprocessor.into(),
    };
    let row = shared.store.manual_task(&key).await.expect("read");
    let row = row.expect("the task");
    (row.task.state, row.last_error)
}

/// The sql holder's database refuses its role's connections (too many connections for the
/// database) when the processor starts: the processor starts anyway, saying so at warn for
/// the subprocessor, and ListSubprocessors answers. An erasure for both holders completes
/// at `crm`; at `accounting` it fails transiently, which marks the holder unreachable (as
/// ListSubprocessors then shows) and leaves the task waiting. Once the database takes
/// connections again, the task's next try connects the connector and erases.
async fn a_holder_refusing_connections_at_start_is_connected_on_its_first_task(
    database_url: &str,
    dir: &std::path::Path,
) {
    let Some(server) = postgres_server() else {
        return;
    };
    let logs = captured_logs();
    let holder = Holder::create(&server).await;
    create_sample_accounting_db(&holder.url)
        .await
        .expect("sample");
    holder.refuse_connections().await;

    let app = App::build(config_with_sql_holder(dir, database_url, &holder.url))
        .await
        .expect("the processor starts while its sql holder refuses connections");
    let text = logs.text();
    // This test's own line: under `cargo test` the other database's variant logs into the
    // same capture.
    let warned = text.lines().find(|l| {
        l.contains("the holder's database cannot be reached") && l.contains(&holder.name)
    });
    let warned = warned.unwrap_or_else(|| panic!("no warning: {text}"));
    // The kind is told by the SQLSTATE; the server's own words, which quote the database's
    // name, are withheld.
    assert!(
        warned.contains("too many connections (SQLSTATE 53300)"),
        "{warned}"
    );
    assert!(warned.contains("accounting"), "{warned}");
    assert!(warned.contains(&holder.name), "{warned}");
    assert!(warned.contains("bytes withheld"), "{warned}");
    assert!(
        !warned.contains(&format!("\"{}\"", holder.name)),
        "{warned}"
    );
    assert!(!warned.contains("too many connections for"), "{warned}");
    let shared = app.shared();
    let (mut client, stop) = serve_processor_api(&shared, dir).await;
    let accounting = listed(&mut client, "accounting").await;
    assert_eq!(accounting.unreachable_since, None);
    // What the rules alone say is answered before the connector is connected.
    assert!(!accounting.tables.is_empty(), "{accounting:?}");

    let now = shared.clock.now_ms();
    let request_id = format!("r-lazy-{:08x}", fastrand::u32(..));
    let req = DeliverRequest {
        request_id: request_id.clone(),
        kind: RequestKind::Erasure as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: "maija.meikalainen@example.fi".into(),
            label: String::new(),
        }],
        due_at: Some(timestamp_from_millis(now + 30 * 86_400_000)),
        ..Default::default()
    };
    let both = ["crm".to_string(), "accounting".to_string()];
    (shared.store)
        .accept("acme", &req, &both, None, now)
        .await
        .expect("accept");
    assert_eq!(step(&shared).await, 2);
    let crm = task(&shared, &request_id, "crm").await;
    assert_eq!(crm.0, TaskState::Completed, "{crm:?}");
    let (state, error) = task(&shared, &request_id, "accounting").await;
    assert_eq!(state, TaskState::InProgress, "{error}");
    assert!(error.contains("too many connections"), "{error}");
    let accounting = listed(&mut client, "accounting").await;
    assert!(accounting.unreachable_since.is_some(), "{accounting:?}");
    assert!(
        accounting
            .unreachable_error
            .contains("too many connections"),
        "{accounting:?}"
    );

    // Past any backoff, with the database open again, the task's next try erases.
    holder.accept_connections().await;
    let mut answered = None;
    for _ in 0..20 {
        shared.clock.advance(86_400_000);
        step(&shared).await;
        let (state, error) = task(&shared, &request_id, "accounting").await;
        if state != TaskState::InProgress {
            answered = Some((state, error));
            break;
        }
    }
    let (state, error) = answered.expect("the accounting task was answered");
    assert!(
        matches!(state, TaskState::Completed | TaskState::Retained),
        "{state:?} {error}"
    );
    let accounting = listed(&mut client, "accounting").await;
    assert_eq!(accounting.unreachable_since, None, "{accounting:?}");
    let _ = stop.send(());
    drop(client);
    drop(shared);
    drop(app);
    holder.drop_all().await;
}

/// A holder whose URL names a closed port on 127.0.0.1 (the connection refused) does not
/// stop the start. One whose URL is malformed or whose database lacks the rules' tables
/// still does, saying why. (An authentication refusal is not tried: the test server may
/// trust its local connections.)
async fn only_a_holder_down_for_a_reason_that_may_pass_lets_the_processor_start(
    database_url: &str,
    dir: &std::path::Path,
) {
    let Some(server) = postgres_server() else {
        return;
    };
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let refused = format!("postgres://holder:pw@127.0.0.1:{port}/accounting");
    App::build(config_with_sql_holder(dir, database_url, &refused))
        .await
        .expect("a refused connection lets the processor start");

    let holder = Holder::create(&server).await;
    let empty = holder.url.clone();
    let malformed = format!("postgres://holder:p@ss@127.0.0.1:{port}/accounting");
    for (url, expected) in [
        (malformed.as_str(), "percent-encoded"),
        (empty.as_str(), "customers"),
    ] {
        let err = App::build(config_with_sql_holder(dir, database_url, url))
            .await
            .err()
            .unwrap_or_else(|| panic!("{url}: the processor started"));
        let err = format!("{err:#}");
        assert!(err.contains("connecting subprocessor accounting"), "{err}");
        assert!(err.contains(expected), "{err}");
    }
    holder.drop_all().await;
}

/// `server` with its database replaced by `database`, its user, password and query kept.
fn with_database(server: &str, database: &str) -> String {
    let (scheme, rest) = server.split_once("://").expect("a scheme");
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, format!("?{query}")),
        None => (rest, String::new()),
    };
    let authority = before_query.split('/').next().unwrap_or(before_query);
    format!("{scheme}://{authority}/{database}{query}")
}

/// A holder with two controllers' own databases, one of which cannot be reached for a
/// reason that may pass (a closed port) and the other has a problem that cannot (a SQLite
/// file that is missing; on the test server, a database that does not exist): the start
/// fails naming the latter, whichever controller's database is tried first.
async fn a_holder_database_failing_for_good_stops_the_start_while_another_is_down(
    database_url: &str,
    dir: &std::path::Path,
) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let down = format!("postgres://holder:pw@127.0.0.1:{port}/accounting");
    let missing_file = dir.join("no-such-folder/accounting.db");
    let mut broken = vec![(
        format!("sqlite://{}", missing_file.display()),
        "not found".to_string(),
    )];
    if let Some(server) = postgres_server() {
        let name = format!("holder_missing_{:016x}", fastrand::u64(..));
        broken.push((with_database(&server, &name), name));
    }
    for (broken_url, expected) in &broken {
        for (first, second) in [("acme", "beta"), ("beta", "acme")] {
            let mut config = config_with_sql_holder(dir, database_url, &down);
            let ConnectorConfig::Sql(sql) = &mut config.subprocessors[1].connector else {
                panic!("accounting is the sql holder");
            };
            for (name, url) in [(first, broken_url.as_str()), (second, down.as_str())] {
                sql.controllers.insert(
                    name.to_string(),
                    dsrelay_connectors::sql::ControllerScope {
                        condition: None,
                        url: Some(url.to_string()),
                    },
                );
            }
            let err = App::build(config)
                .await
                .err()
                .unwrap_or_else(|| panic!("{broken_url} as {first}: the processor started"));
            let err = format!("{err:#}");
            assert!(err.contains("connecting subprocessor accounting"), "{err}");
            assert!(
                err.contains(&format!("database of controller {first:?}")),
                "{err}"
            );
            assert!(err.contains(expected.as_str()), "{err}");
        }
    }
}

on_both!(
    a_holder_refusing_connections_at_start_is_connected_on_its_first_task,
    only_a_holder_down_for_a_reason_that_may_pass_lets_the_processor_start,
    a_holder_database_failing_for_good_stops_the_start_while_another_is_down,
);
