//! The example adapter's configuration: a TOML file, then `DSRELAY_ADAPTER__*` environment
//! variables (`DSRELAY_ADAPTER__CONFIRM_DELAY_MS=1500`,
//! `DSRELAY_ADAPTER__ALLOWED_IDENTITIES='["spiffe://..."]'`).

use std::path::Path;

use dsrelay_runtime::config::ConfigErrors;
use dsrelay_runtime::tls::TlsFiles;
use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override the file.
pub const ENV_PREFIX: &str = "DSRELAY_ADAPTER";

/// The longest confirmation delay accepted (one day, ms).
pub const MAX_CONFIRM_DELAY_MS: u64 = 86_400_000;

/// Everything the adapter needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, used by `main` (tests bind their own listener).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `sqlite://path` (default) or `postgres://...`: the newsletter's own database.
    #[serde(default = "default_database_url")]
    pub database_url: String,
    /// The adapter's certificate and the CA its callers' certificates must chain to.
    pub tls: TlsFiles,
    /// The certificate identities (processors) that may call the adapter.
    pub allowed_identities: Vec<String>,
    /// When above 0, an erasure is answered ACCEPTED and carried out and confirmed only after
    /// this many milliseconds.
    #[serde(default)]
    pub confirm_delay_ms: u64,
    /// Log one JSON object per line instead of human-readable text.
    #[serde(default)]
    pub log_json: bool,
}

fn default_listen() -> String {
    "127.0.0.1:50071".into()
}

fn default_database_url() -> String {
    "sqlite://.dsrelay/example-adapter.db".into()
}

impl Config {
    /// Loads the file (if any) and the process's `DSRELAY_ADAPTER__*` variables, then
    /// validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigErrors> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with the environment given (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let mut config: Self = dsrelay_runtime::config::load(file, ENV_PREFIX, env)?;
        if let Some(dir) = file.and_then(Path::parent) {
            config.tls = config.tls.relative_to(dir);
        }
        config.validate()?;
        Ok(config)
    }

    /// Every problem with the configuration, reported together.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            errors.push(format!("listen: {:?} is not host:port", self.listen));
        }
        let url = &self.database_url;
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            errors.push("database_url: must start with sqlite: or postgres://".to_string());
        }
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

    #[test]
    fn file_env_defaults_and_relative_tls() {
        let dir = tempfile::tempdir().unwrap();
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
        assert_eq!(c.listen, "127.0.0.1:7");
        assert_eq!(c.database_url, default_database_url());
        assert_eq!(c.tls.ca, dir.path().join("pki/ca.pem"));
        assert_eq!(c.allowed_identities.len(), 1);
    }

    #[test]
    fn reports_every_problem() {
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
            ("DSRELAY_ADAPTER__TLS__CA".to_string(), "a".to_string()),
            ("DSRELAY_ADAPTER__TLS__CERT".to_string(), "b".to_string()),
            ("DSRELAY_ADAPTER__TLS__KEY".to_string(), "c".to_string()),
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
}
