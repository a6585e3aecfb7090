//! docker-compose.yml against the code: no Docker engine runs where the tests run, so the file
//! is parsed and every service, port, file, volume and variable it uses is checked against
//! what the services actually read. Each service's effective configuration (its mounted
//! deploy/*.toml plus the compose environment) must load and validate; `deny_unknown_fields`
//! makes a misspelt variable fail there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use dsrelay_connectors::sql::sample_config;
use dsrelay_processor::config::ConnectorConfig;
use dsrelay_runtime::pki::DevPki;
use serde_norway::Value;

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The Jaeger UI port, the one port published for an image whose configuration is not ours.
const JAEGER_UI_PORT: u16 = 16686;

struct Compose {
    doc: Value,
}

/// A volume entry in short syntax.
#[derive(Debug)]
struct Mount {
    source: String,
    target: String,
}

impl Mount {
    fn is_bind(&self) -> bool {
        self.source.starts_with("./") || self.source.starts_with('/')
    }
}

impl Compose {
    fn load() -> Self {
        Self {
            doc: yaml("docker-compose.yml"),
        }
    }

    fn services(&self) -> BTreeMap<String, &Value> {
        self.doc["services"]
            .as_mapping()
            .expect("services")
            .iter()
            .map(|(k, v)| (k.as_str().expect("service name").to_string(), v))
            .collect()
    }

    fn service(&self, name: &str) -> &Value {
        self.doc["services"]
            .get(name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The environment (map form; every value a string, as compose wants).
    fn env(&self, service: &str) -> BTreeMap<String, String> {
        match self.service(service).get("environment") {
            None => BTreeMap::new(),
            Some(e) => e
                .as_mapping()
                .unwrap_or_else(|| panic!("{service}: write environment as a map"))
                .iter()
                .map(|(k, v)| {
                    let k = k.as_str().expect("variable name").to_string();
                    let v = v
                        .as_str()
                        .unwrap_or_else(|| panic!("{service}: {k} must be a string (quote it)"))
                        .to_string();
                    (k, v)
                })
                .collect(),
        }
    }

    fn mounts(&self, service: &str) -> Vec<Mount> {
        let Some(list) = self.service(service).get("volumes") else {
            return Vec::new();
        };
        list.as_sequence()
            .expect("volumes list")
            .iter()
            .map(|v| {
                let s = v.as_str().expect("short volume syntax");
                let parts: Vec<&str> = s.split(':').collect();
                assert!(
                    parts.len() == 2 || (parts.len() == 3 && ["ro", "rw"].contains(&parts[2])),
                    "{service}: volume {s:?}"
                );
                Mount {
                    source: parts[0].to_string(),
                    target: parts[1].to_string(),
                }
            })
            .collect()
    }

    /// Published (host, container) ports.
    fn ports(&self, service: &str) -> Vec<(u16, u16)> {
        let Some(list) = self.service(service).get("ports") else {
            return Vec::new();
        };
        list.as_sequence()
            .expect("ports list")
            .iter()
            .map(|p| {
                let s = p
                    .as_str()
                    .unwrap_or_else(|| panic!("{service}: quote ports"));
                let parts: Vec<&str> = s.trim_end_matches("/tcp").split(':').collect();
                let n = parts.len();
                assert!(
                    n == 2 || n == 3,
                    "{service}: port {s:?} must be [ip:]host:container"
                );
                let port = |x: &str| x.parse::<u16>().unwrap_or_else(|_| panic!("{s:?}"));
                (port(parts[n - 2]), port(parts[n - 1]))
            })
            .collect()
    }

    fn command(&self, service: &str) -> Vec<String> {
        self.service(service)
            .get("command")
            .map(|c| {
                c.as_sequence()
                    .expect("command as a list")
                    .iter()
                    .map(|a| a.as_str().expect("argument").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The repository file mounted at `target` in `service`.
    fn mounted_file(&self, service: &str, target: &str) -> PathBuf {
        let m = self
            .mounts(service)
            .into_iter()
            .find(|m| m.target == target && m.is_bind())
            .unwrap_or_else(|| panic!("{service}: nothing from the repository is at {target}"));
        root().join(m.source.trim_start_matches("./"))
    }

    /// The named volume whose mount holds `path` in `service`.
    fn volume_holding(&self, service: &str, path: &Path) -> String {
        self.mounts(service)
            .into_iter()
            .find(|m| !m.is_bind() && path.starts_with(&m.target))
            .unwrap_or_else(|| panic!("{service}: no volume holds {}", path.display()))
            .source
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().expect("port")
}

/// (host, port) of `scheme://host:port[/...]`.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").expect("scheme").1;
    let authority = rest.split('/').next().unwrap();
    let authority = authority.rsplit('@').next().unwrap();
    let (host, port) = authority.rsplit_once(':').expect("explicit port");
    (host.to_string(), port.parse().expect("port"))
}

/// (user, password, host, port, database) of a PostgreSQL URL.
fn postgres_parts(url: &str) -> (String, String, String, u16, String) {
    let rest = url.strip_prefix("postgres://").expect("postgres URL");
    let (cred, tail) = rest.split_once('@').expect("user:password@");
    let (user, password) = cred.split_once(':').expect("user:password");
    let (authority, db) = tail.split_once('/').expect("/database");
    let (host, port) = authority.rsplit_once(':').expect("host:port");
    (
        user.into(),
        password.into(),
        host.into(),
        port.parse().expect("port"),
        db.split('?').next().unwrap().into(),
    )
}

/// The variables of `service` that configure it, checked by kind: `<PREFIX>_CONFIG` names a
/// mounted file; `<PREFIX>__*` are config keys (checked by loading); OTEL_* must be ones the
/// runtime reads; RUST_LOG sets levels. Anything else is an error.
fn check_variables(env: &BTreeMap<String, String>, prefix: &str, main_rs: &str) {
    for name in env.keys() {
        let ok = name.starts_with(&format!("{prefix}__"))
            || name == "RUST_LOG"
            || dsrelay_runtime::telemetry::OTEL_VARIABLES.contains(&name.as_str())
            || (name == &format!("{prefix}_CONFIG")
                && read(main_rs).contains(&format!("env = \"{prefix}_CONFIG\"")));
        assert!(ok, "{name} is read by nothing in the code");
    }
}

/// Where a service's config file is and the effective configuration's environment.
fn service_config(
    compose: &Compose,
    service: &str,
    prefix: &str,
) -> (PathBuf, Vec<(String, String)>) {
    let env = compose.env(service);
    let target = env
        .get(&format!("{prefix}_CONFIG"))
        .unwrap_or_else(|| panic!("{service}: {prefix}_CONFIG names the config file"));
    let file = compose.mounted_file(service, target);
    assert!(file.is_file(), "{} is missing", file.display());
    (file, env.into_iter().collect())
}

/// The service's database URL names a compose PostgreSQL service with a database, user and
/// password it creates.
fn check_postgres_url(compose: &Compose, url: &str, init_sql: Option<&str>) {
    let (user, password, host, port, db) = postgres_parts(url);
    assert_eq!(port, 5432, "{url}");
    let env = compose.env(&host);
    assert!(
        compose.service(&host)["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("postgres:")),
        "{host} is not a PostgreSQL service"
    );
    assert_eq!(env.get("POSTGRES_USER"), Some(&user), "{url}");
    assert_eq!(env.get("POSTGRES_PASSWORD"), Some(&password), "{url}");
    if env.get("POSTGRES_DB") != Some(&db) {
        // Another database on the server: an init script mounted there must create it.
        let script = init_sql.unwrap_or_else(|| panic!("nothing creates database {db}"));
        let mounted = compose.mounts(&host).into_iter().any(|m| {
            m.source == format!("./{script}")
                && m.target.starts_with("/docker-entrypoint-initdb.d/")
        });
        assert!(mounted, "{script} is not an init script of {host}");
        assert!(
            read(script).contains(&format!("CREATE DATABASE {db};")),
            "{script} does not create {db}"
        );
    }
}

/// The service's published ports are its gRPC port and its admin port.
fn check_ports(compose: &Compose, service: &str, listen: &str, admin: Option<&str>) {
    let mut config_ports = BTreeSet::from([port_of(listen)]);
    config_ports.extend(admin.map(port_of));
    let published: BTreeSet<u16> = compose.ports(service).iter().map(|p| p.1).collect();
    assert_eq!(
        published, config_ports,
        "{service}: published vs configured ports"
    );
    // The health check asks the admin port.
    let check = compose.service(service)["healthcheck"]["test"]
        .as_sequence()
        .expect("healthcheck")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let admin = admin.expect("admin_listen is set in compose");
    assert!(
        check.contains(&format!("127.0.0.1:{}/healthz", port_of(admin))),
        "{service}: {check}"
    );
}

/// The OTLP endpoint is the collector's receiver; the collector forwards to Jaeger's OTLP.
fn check_otel(compose: &Compose, env: &BTreeMap<String, String>, service: &str) {
    assert_eq!(
        env.get("OTEL_SERVICE_NAME").map(String::as_str),
        Some(format!("dsrelay-{service}").as_str())
    );
    let endpoint = env
        .get("OTEL_EXPORTER_OTLP_ENDPOINT")
        .expect("OTEL_EXPORTER_OTLP_ENDPOINT");
    let (host, port) = host_port(endpoint);
    let collector = yaml(compose_collector_config(compose).as_str());
    let grpc = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        .as_str()
        .expect("collector OTLP/gRPC receiver");
    assert_eq!(
        port,
        port_of(grpc),
        "{endpoint} is not the collector's gRPC receiver"
    );
    assert!(
        compose.services().contains_key(&host),
        "{endpoint}: no service {host}"
    );
    assert_eq!(
        compose.service(&host)["image"]
            .as_str()
            .map(|i| i.starts_with("otel/opentelemetry-collector")),
        Some(true)
    );
    assert_eq!(
        env.get("OTEL_EXPORTER_OTLP_PROTOCOL").map(String::as_str),
        Some("grpc"),
        "the services export OTLP over gRPC"
    );
    assert!(
        compose.service(service)["depends_on"]
            .get(host.as_str())
            .is_some(),
        "{service} starts after {host}"
    );
}

/// The repository path of the collector's configuration, from its mount and command.
fn compose_collector_config(compose: &Compose) -> String {
    let arg = compose
        .command("otel-collector")
        .into_iter()
        .find_map(|a| a.strip_prefix("--config=").map(str::to_string))
        .expect("--config=");
    compose
        .mounted_file("otel-collector", &arg)
        .strip_prefix(root())
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn compose_services_and_volumes_exist() {
    let compose = Compose::load();
    let services = compose.services();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "accounting-db",
            "jaeger",
            "otel-collector",
            "pki",
            "postgres",
            "processor",
            "registry",
            "registry-retailer"
        ])
    );
    let declared: BTreeSet<String> = compose.doc["volumes"]
        .as_mapping()
        .expect("top-level volumes")
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let mut used = BTreeSet::new();
    let dockerfile = read("Dockerfile");
    for (name, service) in &services {
        for m in compose.mounts(name) {
            if m.is_bind() {
                let path = root().join(m.source.trim_start_matches("./"));
                assert!(path.is_file(), "{name}: {} is missing", m.source);
            } else {
                assert!(
                    declared.contains(&m.source),
                    "{name}: volume {} is not declared",
                    m.source
                );
                used.insert(m.source);
            }
        }
        if let Some(deps) = service.get("depends_on") {
            let deps: Vec<String> = match deps {
                Value::Sequence(s) => s.iter().map(|d| d.as_str().unwrap().to_string()).collect(),
                Value::Mapping(m) => m.keys().map(|d| d.as_str().unwrap().to_string()).collect(),
                _ => panic!("{name}: depends_on"),
            };
            for d in deps {
                assert!(services.contains_key(&d), "{name} depends on unknown {d}");
            }
        }
        if let Some(build) = service.get("build") {
            assert_eq!(build.as_str(), Some("."), "{name}: build context");
            // Our image: every program a service runs is one the Dockerfile builds.
            let program = compose.command(name).first().cloned().expect("command");
            assert!(
                dockerfile.contains(&format!("target/release/{program}")),
                "{name}: the Dockerfile does not build {program}"
            );
        }
    }
    assert_eq!(used, declared, "every declared volume is used");
    // Ports published by images that are not ours: the collector's receivers, Jaeger's UI.
    let collector = yaml(&compose_collector_config(&compose));
    let receivers: BTreeSet<u16> = ["grpc", "http"]
        .iter()
        .map(|p| {
            port_of(
                collector["receivers"]["otlp"]["protocols"][*p]["endpoint"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect();
    for (_, container) in compose.ports("otel-collector") {
        assert!(
            receivers.contains(&container),
            "collector port {container} receives nothing"
        );
    }
    assert_eq!(
        compose.ports("jaeger"),
        vec![(JAEGER_UI_PORT, JAEGER_UI_PORT)]
    );
    assert_eq!(
        compose
            .env("jaeger")
            .get("COLLECTOR_OTLP_ENABLED")
            .map(String::as_str),
        Some("true")
    );
    let exporter = collector["exporters"]["otlp/jaeger"]["endpoint"]
        .as_str()
        .expect("collector exports to Jaeger");
    let (host, _) = host_port(&format!("grpc://{exporter}"));
    assert_eq!(host, "jaeger");
    let pipeline = &collector["service"]["pipelines"]["traces"];
    assert_eq!(pipeline["receivers"][0].as_str(), Some("otlp"));
    assert_eq!(pipeline["exporters"][0].as_str(), Some("otlp/jaeger"));
    // The sample accounting database is loaded from the repository's SQL.
    assert!(compose.mounts("accounting-db").iter().any(|m| m.source
        == "./services/connectors/sample/accounting.sql"
        && m.target.starts_with("/docker-entrypoint-initdb.d/")));
}

/// The PKI the `pki` service writes, and the host names the services reach each other by.
fn check_pki(
    compose: &Compose,
    service: &str,
    tls: &dsrelay_runtime::tls::TlsFiles,
    stem: &str,
    peer_host: &str,
) {
    let cmd = compose.command("pki");
    assert_eq!(&cmd[..3], ["dsrctl", "pki", "init"]);
    let arg = |flag: &str| -> Vec<&str> {
        cmd.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    };
    let dir = arg("--dir");
    assert_eq!(dir.len(), 1);
    assert!(
        arg("--dns-name").contains(&peer_host),
        "certificates are not valid for {peer_host}"
    );
    // The party's own folder, installed by the pki service, is what the service mounts.
    let installed: Vec<&str> = arg("--install")
        .into_iter()
        .filter_map(|a| a.strip_prefix(&format!("{stem}=")))
        .collect();
    assert_eq!(installed.len(), 1, "{service}: no --install {stem}=DIR");
    let own = compose.volume_holding("pki", Path::new(installed[0]));
    let mounted_at = compose
        .mounts(service)
        .into_iter()
        .find(|m| m.source == own)
        .unwrap_or_else(|| panic!("{service} does not mount {own}"));
    let pki = DevPki {
        dir: PathBuf::from(&mounted_at.target),
    };
    assert_eq!(tls, &pki.files(stem), "{service}: TLS files");
    assert_eq!(compose.volume_holding(service, &tls.ca), own);
    assert_eq!(compose.volume_holding(service, &tls.key), own);
    // The CA key lives only in the full set, which the service does not mount.
    let full = compose.volume_holding("pki", Path::new(dir[0]));
    assert_ne!(
        own, full,
        "{service}: its own folder must not be the full set"
    );
    assert!(
        compose.mounts(service).iter().all(|m| m.source != full),
        "{service} mounts the full PKI with the CA key"
    );
}

/// The compose registries: (service, PKI stem, the processor's name for its controller).
const REGISTRIES: [(&str, &str, &str); 2] = [
    ("registry", "registry", "controller"),
    ("registry-retailer", "registry-retailer", "retailer"),
];

#[test]
fn compose_registry_configuration_loads() {
    for (service, stem, _) in REGISTRIES {
        check_registry(service, stem);
    }
}

fn check_registry(service: &str, stem: &str) {
    let compose = Compose::load();
    let prefix = dsrelay_registry::config::ENV_PREFIX;
    let env = compose.env(service);
    check_variables(&env, prefix, "services/registry/src/main.rs");
    let (file, vars) = service_config(&compose, service, prefix);
    let config: dsrelay_registry::Config =
        dsrelay_runtime::config::load(Some(&file), prefix, vars).unwrap_or_else(|e| panic!("{e}"));
    config.validate().unwrap_or_else(|e| panic!("{e}"));
    let set: Vec<&String> = env
        .keys()
        .filter(|k| k.starts_with(&format!("{prefix}__")))
        .collect();
    assert!(set.len() >= 3, "{set:?}");
    check_ports(
        &compose,
        service,
        &config.service.listen,
        config.service.admin_listen.as_deref(),
    );
    check_postgres_url(
        &compose,
        &config.service.database_url,
        Some("deploy/postgres-init.sql"),
    );
    check_otel(&compose, &env, service);
    // Its processor is the compose service, on that service's gRPC port.
    let processor: dsrelay_processor::Config = dsrelay_runtime::config::load(
        Some(&service_config(&compose, "processor", dsrelay_processor::config::ENV_PREFIX).0),
        dsrelay_processor::config::ENV_PREFIX,
        compose.env("processor"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.processors.len(), 1);
    let (host, port) = host_port(&config.processors[0].endpoint);
    assert_eq!(
        (host.as_str(), port),
        ("processor", port_of(&processor.service.listen))
    );
    check_pki(&compose, service, &config.service.tls, stem, service);
    // Audit checkpoints: signed with the registry's own key from its PKI folder, written to
    // its data volume beside the packages (not to the read-only PKI).
    let installed = DevPki {
        dir: config.service.tls.ca.parent().expect("pki folder").into(),
    };
    assert!(config.audit.checkpoints, "{service}: audit checkpoints off");
    assert_eq!(
        config.audit.checkpoint_key.as_deref(),
        Some(installed.signing_key(stem).as_path())
    );
    let file = config
        .audit
        .checkpoint_file
        .as_deref()
        .expect("checkpoint_file");
    assert_eq!(
        compose.volume_holding(service, file),
        compose.volume_holding(service, &config.package_dir)
    );
    assert_eq!(
        config.processors[0].identity,
        dsrelay_runtime::pki::dev_identity("processor", &config.processors[0].name)
    );
}

#[test]
fn compose_processor_configuration_loads() {
    let compose = Compose::load();
    let prefix = dsrelay_processor::config::ENV_PREFIX;
    let env = compose.env("processor");
    check_variables(&env, prefix, "services/processor/src/main.rs");
    let (file, vars) = service_config(&compose, "processor", prefix);
    let config: dsrelay_processor::Config =
        dsrelay_runtime::config::load(Some(&file), prefix, vars).unwrap_or_else(|e| panic!("{e}"));
    config.validate().unwrap_or_else(|e| panic!("{e}"));
    check_ports(
        &compose,
        "processor",
        &config.service.listen,
        config.service.admin_listen.as_deref(),
    );
    check_postgres_url(
        &compose,
        &config.service.database_url,
        Some("deploy/postgres-init.sql"),
    );
    check_otel(&compose, &env, "processor");
    // Two controllers, each at its compose registry, known by that registry's identity; and
    // every subprocessor says which of its data is whose, or the processor would not start.
    assert_eq!(config.controllers.len(), REGISTRIES.len());
    for (service, stem, name) in REGISTRIES {
        let registry: dsrelay_registry::Config = dsrelay_runtime::config::load(
            Some(&service_config(&compose, service, dsrelay_registry::config::ENV_PREFIX).0),
            dsrelay_registry::config::ENV_PREFIX,
            compose.env(service),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let controller = config
            .controllers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no controller {name}"));
        let (host, port) = host_port(&controller.registry_endpoint);
        assert_eq!(
            (host.as_str(), port),
            (service, port_of(&registry.service.listen))
        );
        let pki = DevPki {
            dir: PathBuf::from("/"),
        };
        let role_name = dsrelay_runtime::pki::DEV_PARTIES
            .iter()
            .find(|(s, _, _)| *s == stem)
            .map(|(_, role, name)| dsrelay_runtime::pki::dev_identity(role, name))
            .expect("a development party");
        assert_eq!(controller.identity, role_name, "{service}");
        assert_eq!(
            registry.service.tls.cert.file_name(),
            pki.cert(stem).file_name()
        );
    }
    // The processor's own start-up check, over what each sample connector scopes.
    let errors = config.scoping_errors(|name| {
        let s = config.subprocessors.iter().find(|s| s.name == name)?;
        match &s.connector {
            ConnectorConfig::Sql(c) => {
                Some(c.controllers.keys().cloned().collect()).filter(|v: &Vec<_>| !v.is_empty())
            }
            ConnectorConfig::Noop(c) => c.controllers.clone(),
            other => panic!(
                "{}: an unexpected connector in the sample {other:?}",
                s.name
            ),
        }
    });
    assert!(errors.is_empty(), "{errors:?}");
    check_pki(
        &compose,
        "processor",
        &config.service.tls,
        "processor",
        "processor",
    );
    // The accounting subprocessor: the sample rules, on the compose accounting database.
    let sql = config
        .subprocessors
        .iter()
        .find_map(|s| match &s.connector {
            ConnectorConfig::Sql(c) => Some(c),
            _ => None,
        })
        .expect("an SQL subprocessor");
    let mut rules = sql.clone();
    rules.controllers.clear();
    assert_eq!(
        rules,
        sample_config(&sql.url),
        "deploy/processor.toml keeps the sample rules"
    );
    check_postgres_url(&compose, &sql.url, None);
    for (name, scope) in &sql.controllers {
        let url = scope
            .url
            .as_deref()
            .unwrap_or_else(|| panic!("{name}: the sample gives each controller a database"));
        check_postgres_url(&compose, url, Some("deploy/accounting-retailer.sql"));
    }
    assert!(
        compose.service("processor")["depends_on"]
            .get(postgres_parts(&sql.url).2.as_str())
            .is_some(),
        "the processor starts after its subprocessor's database"
    );
}

#[test]
fn readme_documents_compose() {
    let readme = read("README.md");
    assert!(readme.contains("## Running with docker-compose"));
    assert!(readme.contains("docker compose up --build"));
}
