//! The settings every dsrelay service reads: where it listens, where its admin port is, its
//! database, its TLS files and its log format.
//!
//! They sit at the top level of each service's TOML file, next to the service's own keys,
//! and keep their environment variables (`DSRELAY_REGISTRY__LISTEN`, ...). A service's
//! configuration carries them as one flattened field:
//!
//! ```text
//! #[derive(Serialize, Deserialize)]
//! #[serde(deny_unknown_fields)]
//! pub struct Config {
//!     #[serde(flatten, deserialize_with = "service_settings")]
//!     pub service: ServiceSettings,
//!     // the service's own keys
//! }
//!
//! fn service_settings<'de, D: Deserializer<'de>>(d: D) -> Result<ServiceSettings, D::Error> {
//!     ServiceSettings::deserialize_with_defaults(d, &DEFAULTS)
//! }
//! ```
//!
//! Unknown keys stay an error with this shape: serde documents `deny_unknown_fields` as
//! unsupported with `flatten`, but only a flattened *map* or a `deny_unknown_fields` on the
//! flattened struct itself break it. A flattened struct takes the keys it knows, and the
//! outer struct's `deny_unknown_fields` refuses whatever is left over; so `ServiceSettings`
//! must not deny unknown fields itself (it would refuse the service's keys), and a service
//! configuration must not flatten a map. The tests here and in every service's `config`
//! module pin this down.

use std::net::SocketAddr;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{check_ms, ConfigErrors, MAX_DURATION_MS};
use crate::tls::TlsFiles;

/// A service's whole configuration: the shared settings plus its own keys. [`load`] reads
/// every service's the same way.
pub trait ServiceConfig: DeserializeOwned + AsRef<ServiceSettings> {
    /// The service's own top-level keys, listed with the shared ones when a top-level key
    /// is unknown (serde lists none there, the shared keys being flattened in); when empty,
    /// none are listed.
    const KEYS: &'static [&'static str] = &[];
    /// Whether the service opens `database_url`. When not (the example recipient keeps no
    /// database), [`load`] does not look for the files the URL's query names, as a URL that is
    /// never opened cannot fail the service.
    const USES_DATABASE: bool = true;
    /// Resolves relative file paths against `dir`, the folder of the configuration file.
    fn relative_to(&mut self, dir: &Path);
    /// Every problem of the settings themselves, reported together; a service may read the
    /// key files it names here too, so that they are reported with the TLS files.
    fn check(&self) -> Result<(), ConfigErrors>;
}

/// The top-level keys `config` writes that the shared settings do not, for a service's test
/// that its [`ServiceConfig::KEYS`] lists exactly them (and cannot drift from its fields).
pub fn own_keys<C: ServiceConfig + Serialize>(config: &C) -> Vec<String> {
    let keys = |v: serde_json::Value| -> std::collections::BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let shared = keys(serde_json::to_value(config.as_ref()).unwrap_or_default());
    let all = keys(serde_json::to_value(config).unwrap_or_default());
    all.difference(&shared).cloned().collect()
}

/// Reads a service's configuration: the file (if any) and `PREFIX__*` overrides from `env`,
/// paths resolved against the file's folder, then every problem at once: the service's own
/// checks, the TLS files missing on this machine and, for a service that uses its database
/// ([`ServiceConfig::USES_DATABASE`]), the files its `database_url` names that are missing.
pub fn load<C: ServiceConfig>(
    file: Option<&Path>,
    env_prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<C, ConfigErrors> {
    let known: Vec<&str> = match C::KEYS {
        [] => Vec::new(),
        own => (crate::config::struct_fields::<FileSettings>().iter())
            .chain(own)
            .copied()
            .collect(),
    };
    // The shared keys are read on their own first, so that a wrong type among them is
    // named with its key and source (see `load_flattened`).
    let mut config: C = crate::config::load_flattened::<C, FileSettings>(
        file,
        env_prefix,
        env,
        &known,
        &FileSettings::stand_in(),
    )?;
    if let Some(dir) = file.and_then(Path::parent) {
        config.relative_to(dir);
    }
    let mut errors = config.check().err().map_or_else(Vec::new, |e| e.0);
    let settings = config.as_ref();
    errors.extend(if C::USES_DATABASE {
        settings.check_files()
    } else {
        settings.check_tls_files()
    });
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// What every service needs to start, whatever it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSettings {
    /// Address to listen on, used by `main` (tests and `dsrctl dev` bind their own listener).
    pub listen: String,
    /// Plain-HTTP admin port serving `/metrics` (Prometheus text format) and `/healthz`, e.g.
    /// `127.0.0.1:9464`; off when absent. It has no TLS: keep it on loopback or a private
    /// network. An address other than a loopback one needs `admin_token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// The bearer token `/metrics` then requires (`Authorization: Bearer <token>`; at least
    /// 16 bytes); `/healthz` stays open, as it says only that the service runs. Required when
    /// `admin_listen` is not a loopback address; optional otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// `sqlite://path` (the embedded default) or `postgres://...`.
    pub database_url: String,
    /// This service's certificate and the CA its peers must chain to.
    pub tls: TlsFiles,
    /// The trust domain every configured caller's identity must lie in (see
    /// [`crate::trust`]); the one in this service's own certificate when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    /// Log one JSON object per line instead of human-readable text.
    pub log_json: bool,
    /// How long, from SIGTERM, work in flight gets to finish (ms; default
    /// [`DEFAULT_SHUTDOWN_GRACE_MS`]). Work still running then is abandoned and its leases
    /// released, so another replica takes it over at once; the process exits within this
    /// plus [`crate::host::SHUTDOWN_MARGIN`].
    pub shutdown_grace_ms: u64,
    /// The longest a unary call may run at this service (ms; default
    /// [`DEFAULT_CALL_LIMIT_MS`]): then it is ended with DEADLINE_EXCEEDED naming this limit,
    /// so that a stuck handler cannot hold the service's resources. A caller's shorter
    /// deadline still ends it first. Streaming calls are not limited by it as a whole, but an
    /// upload or download stream that stays idle this long (no message from the sender, or
    /// nothing taken by the reader) is ended.
    pub call_limit_ms: u64,
    /// How many threads run the service's asynchronous work (calls, workers, encoding,
    /// TLS): 1 (the default, [`DEFAULT_WORKER_THREADS`]) runs all of it on the main thread
    /// (tokio's current-thread runtime); more makes a work-stealing pool of that many. The
    /// stores' and exports' own threads come on top. One is the default because on a 2-core
    /// machine running the pair it took about 30 % less CPU per request than two, with
    /// more requests completed (`docs/benchmarks.md`): most of a service's CPU goes to its
    /// store's thread and the kernel, and each hand-over between threads wakes one. Raise it
    /// where a service has several cores to itself and its main thread is saturated.
    pub worker_threads: usize,
}

/// The default of `shutdown_grace_ms`: 10 s.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;

/// The default of `call_limit_ms`: 60 s.
pub const DEFAULT_CALL_LIMIT_MS: u64 = 60_000;

/// The default of `worker_threads`: one thread runs everything asynchronous.
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// The most `worker_threads` accepted: beyond it a typo, not a tuning.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The shortest `admin_token` accepted: guessing it must not be practical.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// Where a service listens and stores unless its configuration says otherwise; each service
/// has its own, so that a pair started side by side on one host does not collide.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    /// The default of `listen`.
    pub listen: &'static str,
    /// The default of `database_url`.
    pub database_url: &'static str,
}

/// The shared keys as they appear in a file, before the service's defaults fill the gaps.
#[derive(Deserialize, Serialize)]
#[serde(rename = "ServiceSettings")]
struct FileSettings {
    listen: Option<String>,
    admin_listen: Option<String>,
    admin_token: Option<String>,
    database_url: Option<String>,
    tls: TlsFiles,
    trust_domain: Option<String>,
    #[serde(default)]
    log_json: bool,
    shutdown_grace_ms: Option<u64>,
    call_limit_ms: Option<u64>,
    worker_threads: Option<usize>,
}

impl FileSettings {
    /// Shared keys that read, standing in for those of a file whose shared keys do not, so
    /// that its service keys are checked too (see [`crate::config::load_flattened`]).
    fn stand_in() -> Self {
        Self {
            listen: None,
            admin_listen: None,
            admin_token: None,
            database_url: None,
            tls: TlsFiles::new("", "", ""),
            trust_domain: None,
            log_json: false,
            shutdown_grace_ms: None,
            call_limit_ms: None,
            worker_threads: None,
        }
    }
}

impl ServiceSettings {
    /// Settings with the given address, database and TLS files, no admin port and text logs.
    pub fn new(listen: impl Into<String>, database_url: impl Into<String>, tls: TlsFiles) -> Self {
        Self {
            listen: listen.into(),
            admin_listen: None,
            admin_token: None,
            database_url: database_url.into(),
            tls,
            trust_domain: None,
            log_json: false,
            shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
            call_limit_ms: DEFAULT_CALL_LIMIT_MS,
            worker_threads: DEFAULT_WORKER_THREADS,
        }
    }

    /// Reads the shared keys, taking `listen` and `database_url` from `defaults` when absent.
    /// Meant for `#[serde(flatten, deserialize_with = ...)]` in a service's configuration.
    pub fn deserialize_with_defaults<'de, D: Deserializer<'de>>(
        deserializer: D,
        defaults: &Defaults,
    ) -> Result<Self, D::Error> {
        let file = FileSettings::deserialize(deserializer)?;
        Ok(Self {
            listen: file.listen.unwrap_or_else(|| defaults.listen.to_string()),
            admin_listen: file.admin_listen,
            admin_token: file.admin_token,
            database_url: file
                .database_url
                .unwrap_or_else(|| defaults.database_url.to_string()),
            tls: file.tls,
            trust_domain: file.trust_domain,
            log_json: file.log_json,
            shutdown_grace_ms: file.shutdown_grace_ms.unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS),
            call_limit_ms: file.call_limit_ms.unwrap_or(DEFAULT_CALL_LIMIT_MS),
            worker_threads: file.worker_threads.unwrap_or(DEFAULT_WORKER_THREADS),
        })
    }

    /// Resolves relative TLS paths against `dir` (the folder of the configuration file).
    pub fn relative_to(&mut self, dir: &Path) {
        self.tls = self.tls.clone().relative_to(dir);
    }

    /// Every problem that can be seen in the settings themselves: address syntax and the
    /// database URL's scheme. It does not look at the file system, so a configuration meant
    /// for another machine (a container's) can be checked too.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        // Parsed, not resolved: a host name (`localhost:50051`) is refused here.
        let not_an_address = |key: &str, example: &str, value: &str| {
            format!("{key}: must be an IP address and port, e.g. {example}; it is {value:?}")
        };
        if self.listen.parse::<SocketAddr>().is_err() {
            errors.push(not_an_address("listen", "0.0.0.0:50051", &self.listen));
        }
        if let Some(a) = &self.admin_listen {
            match a.parse::<SocketAddr>() {
                Err(_) => errors.push(not_an_address("admin_listen", "127.0.0.1:9464", a)),
                Ok(addr) if !addr.ip().is_loopback() && self.admin_token.is_none() => {
                    errors.push(format!(
                        "admin_listen: {a} is reachable from other hosts: set admin_token, \
                         which /metrics will then require, or listen on 127.0.0.1"
                    ))
                }
                Ok(_) => {}
            }
        }
        if let Some(token) = &self.admin_token {
            if token.len() < MIN_ADMIN_TOKEN {
                errors.push(format!(
                    "admin_token: must be at least {MIN_ADMIN_TOKEN} bytes (it has {})",
                    token.len()
                ));
            }
        }
        // Here rather than in each service, so that every service built on these settings
        // (the example adapter and recipient too) bounds them alike.
        for (key, value) in [
            ("shutdown_grace_ms", self.shutdown_grace_ms),
            ("call_limit_ms", self.call_limit_ms),
        ] {
            check_ms(&mut errors, key, value, 1..=MAX_DURATION_MS);
        }
        check_ms(
            &mut errors,
            "tls.reload_interval_ms",
            self.tls.reload_interval_ms,
            0..=MAX_DURATION_MS,
        );
        if !(1..=MAX_WORKER_THREADS).contains(&self.worker_threads) {
            errors.push(format!(
                "worker_threads: must be from 1 to {MAX_WORKER_THREADS} (it is {})",
                self.worker_threads
            ));
        }
        // The URL is not repeated: it may carry a password.
        let url = &self.database_url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            errors.push("database_url: must start with sqlite: or postgres://".to_string());
        }
        errors
    }

    /// The TLS files, and the files a PostgreSQL `database_url` names (its `sslrootcert`,
    /// `sslcert` and `sslkey`), that are missing on this machine, as configuration errors;
    /// checked when a service loads its configuration, so a wrong path is reported with every
    /// other problem instead of failing the start later.
    pub fn check_files(&self) -> Vec<String> {
        let mut errors = self.check_tls_files();
        errors.extend(crate::store::database_file_errors(&self.database_url));
        errors
    }

    /// The TLS files missing on this machine, as [`ServiceSettings::check_files`] reports
    /// them, without the database's: for a service that never opens `database_url`.
    pub fn check_tls_files(&self) -> Vec<String> {
        (self.tls.paths().into_iter())
            .filter(|(_, path)| !path.is_file())
            .map(|(key, path)| format!("{key}: {} is not a readable file", path.display()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    const DEFAULTS: Defaults = Defaults {
        listen: "127.0.0.1:1",
        database_url: "sqlite://x.db",
    };

    fn settings<'de, D: Deserializer<'de>>(d: D) -> Result<ServiceSettings, D::Error> {
        ServiceSettings::deserialize_with_defaults(d, &DEFAULTS)
    }

    /// A service configuration shaped like the real ones.
    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[serde(flatten, deserialize_with = "settings")]
        service: ServiceSettings,
        #[serde(default)]
        batch: u32,
    }

    const TLS: &str = "[tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n";

    fn parse(text: &str) -> Result<Sample, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn shared_keys_sit_at_the_top_level_with_defaults() {
        let s = parse(&format!("batch = 3\nlog_json = true\n{TLS}")).unwrap();
        assert_eq!(s.batch, 3);
        assert_eq!(s.service.listen, "127.0.0.1:1");
        assert_eq!(s.service.database_url, "sqlite://x.db");
        assert_eq!(s.service.admin_listen, None);
        assert!(s.service.log_json);
        assert_eq!(s.service.tls.key, Path::new("c.key"));
        assert_eq!(s.service.shutdown_grace_ms, DEFAULT_SHUTDOWN_GRACE_MS);
        let s = parse(&format!("shutdown_grace_ms = 2500\n{TLS}")).unwrap();
        assert_eq!(s.service.shutdown_grace_ms, 2500);
        let s = parse(&format!("shutdown_grace_ms = 0\n{TLS}")).unwrap();
        assert!(s.service.validate().contains(
            &"shutdown_grace_ms: must be from 1 ms to 2592000000 ms (30 days); it is 0".to_string()
        ));
        assert_eq!(s.service.call_limit_ms, DEFAULT_CALL_LIMIT_MS);
        let s = parse(&format!(
            "call_limit_ms = 1500
{TLS}"
        ))
        .unwrap();
        assert_eq!(s.service.call_limit_ms, 1500);
        let s = parse(&format!(
            "call_limit_ms = 0
{TLS}"
        ))
        .unwrap();
        assert!(s.service.validate().contains(
            &"call_limit_ms: must be from 1 ms to 2592000000 ms (30 days); it is 0".to_string()
        ));
        // Bounded above here, so that every service on these settings refuses 31 days.
        let s = parse(&format!(
            "shutdown_grace_ms = 2678400000\ncall_limit_ms = 2678400000\n{TLS}"
        ))
        .unwrap();
        assert_eq!(
            s.service.validate(),
            [
                "shutdown_grace_ms: must be from 1 ms to 2592000000 ms (30 days); it is \
                 2678400000",
                "call_limit_ms: must be from 1 ms to 2592000000 ms (30 days); it is 2678400000",
            ]
        );
        assert_eq!(s.service.worker_threads, DEFAULT_WORKER_THREADS);
        let s = parse(&format!("worker_threads = 3\n{TLS}")).unwrap();
        assert_eq!(s.service.worker_threads, 3);
        assert!(
            s.service.validate().is_empty(),
            "{:?}",
            s.service.validate()
        );
        for bad in [0, MAX_WORKER_THREADS + 1] {
            let s = parse(&format!("worker_threads = {bad}\n{TLS}")).unwrap();
            assert_eq!(
                s.service.validate(),
                [format!(
                    "worker_threads: must be from 1 to {MAX_WORKER_THREADS} (it is {bad})"
                )]
            );
        }
        let s = parse(&format!(
            "listen = \"0.0.0.0:5\"\nadmin_listen = \"127.0.0.1:6\"\n{TLS}"
        ))
        .unwrap();
        assert_eq!(s.service.listen, "0.0.0.0:5");
        assert_eq!(s.service.admin_listen.as_deref(), Some("127.0.0.1:6"));
    }

    #[test]
    fn an_admin_port_off_loopback_needs_a_token() {
        let mut s = ServiceSettings::new(
            "127.0.0.1:1",
            "sqlite://x.db",
            parse(TLS).unwrap().service.tls,
        );
        s.admin_listen = Some("127.0.0.1:9464".into());
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        s.admin_listen = Some("[::1]:9464".into());
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        s.admin_listen = Some("0.0.0.0:9464".into());
        let errors = s.validate();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("set admin_token"), "{errors:?}");
        s.admin_token = Some("short".into());
        let errors = s.validate();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("admin_token: must be at least 16 bytes"),
            "{errors:?}"
        );
        s.admin_token = Some("a-long-enough-admin-token".into());
        assert!(s.validate().is_empty(), "{:?}", s.validate());
        // Read from a file like the other shared keys.
        let s = parse(&format!(
            "admin_listen = \"0.0.0.0:6\"\nadmin_token = \"a-long-enough-admin-token\"\n{TLS}"
        ))
        .unwrap();
        assert_eq!(
            s.service.admin_token.as_deref(),
            Some("a-long-enough-admin-token")
        );
    }

    impl AsRef<ServiceSettings> for Sample {
        fn as_ref(&self) -> &ServiceSettings {
            &self.service
        }
    }

    impl ServiceConfig for Sample {
        fn relative_to(&mut self, _: &Path) {}
        fn check(&self) -> Result<(), ConfigErrors> {
            Ok(())
        }
    }

    /// [`Sample`] of a service that never opens its `database_url`.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoDatabase {
        #[serde(flatten, deserialize_with = "settings")]
        service: ServiceSettings,
    }

    impl AsRef<ServiceSettings> for NoDatabase {
        fn as_ref(&self) -> &ServiceSettings {
            &self.service
        }
    }

    impl ServiceConfig for NoDatabase {
        const USES_DATABASE: bool = false;
        fn relative_to(&mut self, _: &Path) {}
        fn check(&self) -> Result<(), ConfigErrors> {
            Ok(())
        }
    }

    /// The files a `database_url` names are looked for only by a service that opens it; its
    /// TLS files are looked for either way.
    #[test]
    fn only_a_service_using_its_database_checks_the_files_its_url_names() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "c.pem", "c.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        // Absolute, as these samples resolve no relative path.
        let at = |f: &str| dir.path().join(f);
        let f = at("s.toml");
        std::fs::write(
            &f,
            format!(
                "database_url = \"postgres://h/db?sslrootcert=/nonexistent/root.pem\"\n\
                 [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                at("ca.pem"),
                at("c.pem"),
                at("c.key")
            ),
        )
        .unwrap();
        let err = load::<Sample>(Some(&f), "APP", []).unwrap_err();
        assert_eq!(
            err.0,
            ["database_url: sslrootcert /nonexistent/root.pem is not a readable file"]
        );
        load::<NoDatabase>(Some(&f), "APP", []).unwrap();
        std::fs::remove_file(dir.path().join("c.key")).unwrap();
        let err = load::<NoDatabase>(Some(&f), "APP", []).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].starts_with("tls.key: "), "{err}");
    }

    /// A shared key of the wrong type is named with the file or variable that set it, as a
    /// service's own key is, though serde reads the shared keys through a flattened part.
    #[test]
    fn a_wrong_type_in_a_shared_key_names_the_key_and_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        let file = f.display();
        let from_file = [
            (
                "listen = 55151\n",
                "listen",
                "found signed int `55151`, expected a string",
            ),
            (
                "shutdown_grace_ms = \"10s\"\n",
                "shutdown_grace_ms",
                "found string \"10s\", expected u64",
            ),
            (
                "[tls]\nca = 5\n",
                "tls.ca",
                "found signed int `5`, expected path string",
            ),
            (
                "[tls]\nreload_interval_ms = \"5s\"\n",
                "tls.reload_interval_ms",
                "found string \"5s\", expected u64",
            ),
        ];
        for (text, key, what) in from_file {
            // The [tls] table's other keys, after the one under test when it is in [tls].
            let tls = TLS.replace("ca = \"ca.pem\"\n", "").replace("[tls]\n", "");
            let text = if text.starts_with("[tls]") {
                format!("{text}{tls}")
            } else {
                format!("{text}{TLS}")
            };
            std::fs::write(&f, &text).unwrap();
            let err = load::<Sample>(Some(&f), "APP", []).unwrap_err();
            assert_eq!(err.0.len(), 1, "{text}: {err}");
            let wanted = format!("{file}: key {key}: invalid type: {what}");
            assert_eq!(err.0[0], wanted, "{text}");
        }
        std::fs::write(&f, TLS).unwrap();
        for (variable, value, key, what) in [
            (
                "APP__SHUTDOWN_GRACE_MS",
                "-1",
                "shutdown_grace_ms",
                "invalid value signed int `-1`, expected u64",
            ),
            (
                "APP__WORKER_THREADS",
                "x",
                "worker_threads",
                "invalid type: found string \"x\"",
            ),
            (
                "APP__LOG_JSON",
                "yes",
                "log_json",
                "invalid type: found string \"yes\"",
            ),
            (
                "APP__TLS__ALLOW_EXPIRED_CRL",
                "maybe",
                "tls.allow_expired_crl",
                "invalid type: found string \"maybe\"",
            ),
            (
                "APP__TLS__RELOAD_INTERVAL_MS",
                "-1",
                "tls.reload_interval_ms",
                "invalid value signed int `-1`, expected u64",
            ),
        ] {
            let env = [(variable.to_string(), value.to_string())];
            let err = load::<Sample>(Some(&f), "APP", env).unwrap_err();
            assert_eq!(err.0.len(), 1, "{variable}: {err}");
            let wanted = format!("environment variable {variable}: key {key}: {what}");
            assert!(
                err.0[0].starts_with(&wanted),
                "{}\nwanted {wanted}",
                err.0[0]
            );
        }
    }

    /// A problem of the shared keys and one of the service's own come in one report, so an
    /// operator does not meet the second only after fixing the first and starting again.
    #[test]
    fn shared_and_service_key_problems_are_reported_together() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        let file = f.display();
        let cases = [
            // A wrong type in a shared key and in a service key.
            (
                format!("shutdown_grace_ms = \"10s\"\nbatch = \"x\"\n{TLS}"),
                format!("{file}: key batch: invalid type: found string \"x\", expected u32"),
            ),
            // An unknown top-level key, which serde checks after the flattened part.
            (
                format!("worker_threads = \"x\"\nlisten_on = \"y\"\n{TLS}"),
                format!("{file}: unknown field `listen_on`"),
            ),
            // The shared table missing its required key.
            (
                "batch_size = 2\n[tls]\nca = \"a\"\ncert = \"b\"\n".to_string(),
                format!("{file}: unknown field `batch_size`"),
            ),
        ];
        for (text, service) in cases {
            std::fs::write(&f, &text).unwrap();
            let err = load::<Sample>(Some(&f), "APP", []).unwrap_err();
            assert_eq!(err.0.len(), 2, "{text}: {err}");
            assert!(err.0[1].starts_with(&service), "{text}: {err}");
        }
        // Set by variables, each is named with its variable.
        std::fs::write(&f, TLS).unwrap();
        let env = [("APP__CALL_LIMIT_MS", "soon"), ("APP__BATCH", "many")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        let err = load::<Sample>(Some(&f), "APP", env).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(
            err.0[0].starts_with("environment variable APP__CALL_LIMIT_MS: key call_limit_ms"),
            "{err}"
        );
        assert!(
            err.0[1].starts_with("environment variable APP__BATCH: key batch: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse(&format!("batch = 3\nlisten_on = \"x\"\n{TLS}")).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `listen_on`"),
            "{err}"
        );
        // Inside the shared settings' own tables too.
        let err = parse(&format!("{TLS}port = 1\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field `port`"), "{err}");
        let err = parse("batch = 1\n").unwrap_err();
        assert!(err.to_string().contains("missing field `tls`"), "{err}");
    }

    #[test]
    fn serializes_back_to_the_same_flat_file() {
        let s = parse(&format!("batch = 3\n{TLS}")).unwrap();
        let text = toml::to_string(&s).unwrap();
        assert!(text.starts_with("listen = \"127.0.0.1:1\"\n"), "{text}");
        assert!(!text.contains("admin_listen"), "{text}");
        let again = parse(&text).unwrap();
        assert_eq!(again.service, s.service);
        assert_eq!(again.batch, 3);
    }

    #[test]
    fn validation_reports_every_problem() {
        let mut s = ServiceSettings::new(
            "nowhere",
            "mysql://u:secret@h/db",
            TlsFiles::new(
                "/nonexistent/ca.pem",
                "/nonexistent/c.pem",
                "/nonexistent/c.key",
            ),
        );
        s.admin_listen = Some("9464".into());
        let errors = s.validate();
        assert_eq!(errors.len(), 3, "{errors:?}");
        for (e, key) in errors
            .iter()
            .zip(["listen", "admin_listen", "database_url"])
        {
            assert!(e.starts_with(key), "{key}: {errors:?}");
        }
        assert!(!errors.iter().any(|e| e.contains("secret")), "{errors:?}");
        assert_eq!(
            errors[..2],
            [
                "listen: must be an IP address and port, e.g. 0.0.0.0:50051; it is \"nowhere\"",
                "admin_listen: must be an IP address and port, e.g. 127.0.0.1:9464; it is \"9464\"",
            ]
        );
        // A host name is not an address.
        s.listen = "localhost:55151".into();
        s.admin_listen = Some("localhost:9464".into());
        let errors = s.validate();
        assert!(
            errors[0].ends_with("it is \"localhost:55151\""),
            "{errors:?}"
        );
        assert!(
            errors[1].ends_with("it is \"localhost:9464\""),
            "{errors:?}"
        );
        let missing = s.check_files();
        assert_eq!(missing.len(), 3, "{missing:?}");
        assert!(missing[0].starts_with("tls.ca: /nonexistent/ca.pem"));
        // With the files a PostgreSQL URL names.
        s.database_url = "postgres://u:secret@h/db?sslrootcert=/nonexistent/root.pem".into();
        assert_eq!(
            s.check_files()[3..],
            ["database_url: sslrootcert /nonexistent/root.pem is not a readable file"]
        );

        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "c.pem", "c.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let mut s = parse(TLS).unwrap().service;
        s.relative_to(dir.path());
        assert_eq!(s.validate(), Vec::<String>::new());
        assert_eq!(s.check_files(), Vec::<String>::new());
        assert_eq!(s.tls.ca, dir.path().join("ca.pem"));
    }
}
