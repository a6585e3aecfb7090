//! The example adapter's configuration: a TOML file, then `DSRELAY_ADAPTER__*` environment
//! variables (`DSRELAY_ADAPTER__CONFIRM_DELAY_MS=1500`,
//! `DSRELAY_ADAPTER__ALLOWED_IDENTITIES='["spiffe://..."]'`).

use std::path::Path;

use dsrelay_runtime::config::ConfigErrors;
use dsrelay_runtime::settings::{Defaults, ServiceConfig, ServiceSettings};
use serde::{Deserialize, Deserializer, Serialize};

/// Prefix of environment variables that override the file.
pub const ENV_PREFIX: &str = "DSRELAY_ADAPTER";

/// The longest confirmation delay accepted (one day, ms).
pub const MAX_CONFIRM_DELAY_MS: u64 = 86_400_000;

/// Everything the adapter needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where it listens, the newsletter's own database (`sqlite://path` by default, or
    /// `postgres://...`), its TLS files (the CA its callers' certificates must chain to) and
    /// log format: the keys every service shares, at the top level of the file.
    #[serde(flatten, deserialize_with = "service_settings")]
    pub service: ServiceSettings,
    /// The certificate identities (processors) that may call the adapter.
    pub allowed_identities: Vec<String>,
    /// When above 0, an erasure is answered ACCEPTED and carried out and confirmed only after
    /// this many milliseconds.
    #[serde(default)]
    pub confirm_delay_ms: u64,
    /// The controller (the processor's name for it, as sent in `ExecuteRequest.controller`)
    /// that owns the subscribers stored without one: those from before subscribers had a
    /// controller, assigned to it at start, and requests that name no controller (from
    /// processors older than the field). Defaults to `controller`, the name `dsrctl dev up`
    /// gives the development processor's one controller.
    #[serde(default = "default_controller")]
    pub default_controller: String,
}

/// The controller that owns subscribers stored without one, unless configured otherwise.
pub const DEFAULT_CONTROLLER: &str = "controller";

fn default_controller() -> String {
    DEFAULT_CONTROLLER.to_string()
}

/// Where the adapter listens and stores unless configured otherwise.
pub const DEFAULTS: Defaults = Defaults {
    listen: "127.0.0.1:50071",
    database_url: "sqlite://.dsrelay/example-adapter.db",
};

fn service_settings<'de, D: Deserializer<'de>>(d: D) -> Result<ServiceSettings, D::Error> {
    ServiceSettings::deserialize_with_defaults(d, &DEFAULTS)
}

impl AsRef<ServiceSettings> for Config {
    fn as_ref(&self) -> &ServiceSettings {
        &self.service
    }
}

impl ServiceConfig for Config {
    const KEYS: &'static [&'static str] = &[
        "allowed_identities",
        "confirm_delay_ms",
        "default_controller",
    ];

    fn relative_to(&mut self, dir: &Path) {
        self.service.relative_to(dir);
    }

    fn check(&self) -> Result<(), ConfigErrors> {
        self.validate()
    }
}

impl Config {
    /// Loads the file (if any) and the process's `DSRELAY_ADAPTER__*` variables, then
    /// validates and checks that the TLS files are there.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with the environment given (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        dsrelay_runtime::settings::load(file, ENV_PREFIX, env)
    }

    /// Every problem with the configuration that shows without looking at the file system,
    /// reported together.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = self.service.validate();
        if self.allowed_identities.is_empty() {
            errors.push(
                "allowed_identities: list the processor identities that may call the adapter"
                    .to_string(),
            );
        }
        for (i, id) in self.allowed_identities.iter().enumerate() {
            if id.trim().is_empty() {
                errors.push(format!("allowed_identities[{i}]: must not be empty"));
            }
        }
        if self.confirm_delay_ms > MAX_CONFIRM_DELAY_MS {
            errors.push(format!(
                "confirm_delay_ms: must be at most {MAX_CONFIRM_DELAY_MS}, got {}",
                self.confirm_delay_ms
            ));
        }
        if self.default_controller.trim().is_empty() {
            errors.push(
                "default_controller: must name the controller that owns subscribers stored \
                 without one"
                    .to_string(),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    /// Writes placeholder TLS files under `dir`, so loading finds them.
    fn tls_files(dir: &Path, names: &[&str]) {
        for name in names {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
    }

    #[test]
    fn file_env_defaults_and_relative_tls() {
        let dir = tempfile::tempdir().unwrap();
        tls_files(
            dir.path(),
            &["pki/ca.pem", "pki/adapter.pem", "pki/adapter.key"],
        );
        let f = dir.path().join("adapter.toml");
        std::fs::write(
            &f,
            "allowed_identities = [\"spiffe://dsrelay.dev/processor/payroll-bureau\"]\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/adapter.pem\"\nkey = \"pki/adapter.key\"\n",
        )
        .unwrap();
        let env = vec![
            (
                "DSRELAY_ADAPTER__CONFIRM_DELAY_MS".to_string(),
                "1500".to_string(),
            ),
            (
                "DSRELAY_ADAPTER__LISTEN".to_string(),
                "127.0.0.1:7".to_string(),
            ),
        ];
        let c = Config::load_from(Some(&f), env).unwrap();
        assert_eq!(c.confirm_delay_ms, 1500);
        assert_eq!(c.service.listen, "127.0.0.1:7");
        assert_eq!(c.service.database_url, DEFAULTS.database_url);
        assert_eq!(c.service.tls.ca, dir.path().join("pki/ca.pem"));
        assert_eq!(c.allowed_identities.len(), 1);
        assert_eq!(c.default_controller, DEFAULT_CONTROLLER);
    }

    #[test]
    fn reports_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        tls_files(dir.path(), &["a", "b", "c"]);
        let at = |name: &str| dir.path().join(name).display().to_string();
        let env = vec![
            ("DSRELAY_ADAPTER__LISTEN".to_string(), "nowhere".to_string()),
            (
                "DSRELAY_ADAPTER__DATABASE_URL".to_string(),
                "mysql://x".to_string(),
            ),
            (
                "DSRELAY_ADAPTER__ALLOWED_IDENTITIES".to_string(),
                "[]".to_string(),
            ),
            (
                "DSRELAY_ADAPTER__CONFIRM_DELAY_MS".to_string(),
                "999999999".to_string(),
            ),
            ("DSRELAY_ADAPTER__TLS__CA".to_string(), at("a")),
            ("DSRELAY_ADAPTER__TLS__CERT".to_string(), at("b")),
            ("DSRELAY_ADAPTER__TLS__KEY".to_string(), at("c")),
        ];
        let err = Config::load_from(None, env).unwrap_err();
        assert_eq!(err.0.len(), 4, "{err}");
        for key in [
            "listen",
            "database_url",
            "allowed_identities",
            "confirm_delay_ms",
        ] {
            assert!(err.0.iter().any(|e| e.starts_with(key)), "{key}: {err}");
        }
    }

    #[test]
    fn missing_tls_files_and_unknown_keys_are_refused() {
        let env = |extra: &[(&str, &str)]| {
            let mut env: Vec<(String, String)> = [
                ("DSRELAY_ADAPTER__ALLOWED_IDENTITIES", "[\"spiffe://p\"]"),
                ("DSRELAY_ADAPTER__TLS__CA", "/nonexistent/ca.pem"),
                ("DSRELAY_ADAPTER__TLS__CERT", "/nonexistent/adapter.pem"),
                ("DSRELAY_ADAPTER__TLS__KEY", "/nonexistent/adapter.key"),
            ]
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            env.sort();
            env
        };
        let err = Config::load_from(None, env(&[])).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        for key in ["tls.ca", "tls.cert", "tls.key"] {
            assert!(err.0.iter().any(|e| e.starts_with(key)), "{key}: {err}");
        }
        let err =
            Config::load_from(None, env(&[("DSRELAY_ADAPTER__CONFIRM_DELAY", "5")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("key confirm_delay: unknown key; known here: "),
            "{err}"
        );
    }

    /// A file with `allowed_identities` and TLS files that exist, then `extra`.
    fn folder(extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        tls_files(dir.path(), &["ca.pem", "adapter.pem", "adapter.key"]);
        let file = dir.path().join("adapter.toml");
        std::fs::write(
            &file,
            format!(
                "allowed_identities = [\"spiffe://p\"]\n{extra}\n\
                 [tls]\nca = \"ca.pem\"\ncert = \"adapter.pem\"\nkey = \"adapter.key\"\n"
            ),
        )
        .unwrap();
        (dir, file)
    }

    /// A misspelt top-level key is listed with the known ones (the shared keys and this
    /// service's), as a misspelt key in a table is.
    #[test]
    fn an_unknown_top_level_key_lists_the_known_ones() {
        let (_dir, file) = folder("confirm_dealy_ms = 5");
        let err = Config::load_from(Some(&file), []).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].starts_with(&format!(
                "{}: key confirm_dealy_ms: unknown key; known here: listen, admin_listen, ",
                file.display()
            )),
            "{err}"
        );
        assert!(err.0[0].contains(", confirm_delay_ms, "), "{err}");
    }

    /// `KEYS` lists exactly this service's own top-level keys: those a full configuration
    /// writes beside the shared ones.
    #[test]
    fn the_listed_top_level_keys_are_this_service_s() {
        let (_dir, file) = folder("");
        let c = Config::load_from(Some(&file), []).unwrap();
        let mut listed: Vec<String> = Config::KEYS.iter().map(|k| k.to_string()).collect();
        listed.sort();
        assert_eq!(dsrelay_runtime::settings::own_keys(&c), listed);
    }
}
