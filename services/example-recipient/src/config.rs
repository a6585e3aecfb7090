//! The example recipient's configuration: a TOML file, then `DSRELAY_RECIPIENT__*` environment
//! variables (`DSRELAY_RECIPIENT__CHUNK_DELAY_MS=200`,
//! `DSRELAY_RECIPIENT__ALLOWED_IDENTITIES='["spiffe://..."]'`).

use std::path::{Path, PathBuf};

use dsrelay_runtime::config::ConfigErrors;
use dsrelay_runtime::settings::{Defaults, ServiceConfig, ServiceSettings};
use serde::{Deserialize, Deserializer, Serialize};

/// Prefix of environment variables that override the file.
pub const ENV_PREFIX: &str = "DSRELAY_RECIPIENT";

/// The longest pause after a chunk accepted (one minute, ms).
pub const MAX_CHUNK_DELAY_MS: u64 = 60_000;

/// Everything the recipient needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where it listens, its TLS files (the CA its callers' certificates must chain to) and
    /// log format: the keys every service shares, at the top level of the file. The
    /// recipient keeps no database: `database_url` is not used.
    #[serde(flatten, deserialize_with = "service_settings")]
    pub service: ServiceSettings,
    /// The recipient's name for itself, put in every receipt: the name the registry's
    /// `[[recipients]]` gives it.
    pub name: String,
    /// The folder received files are written to.
    pub data_dir: PathBuf,
    /// The certificate identities (processors) that may send transfers.
    pub allowed_identities: Vec<String>,
    /// When above 0, a pause of this many milliseconds after every stored chunk (so tests can
    /// interrupt a transfer midway).
    #[serde(default)]
    pub chunk_delay_ms: u64,
    /// The Ed25519 private key (PKCS#8 PEM file) that signs every receipt the recipient
    /// answers. Its public key (the `.pub.pem` file the development PKI writes beside it) goes
    /// to each registry, as `public_key` of this recipient's `[[recipients]]` entry, which then
    /// takes only receipts it signed. Without it receipts are unsigned and a warning is logged
    /// at start; a key that cannot be read stops the start. A relative path is taken from the
    /// configuration file's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<PathBuf>,
}

/// Where the recipient listens unless configured otherwise.
pub const DEFAULTS: Defaults = Defaults {
    listen: "127.0.0.1:50081",
    database_url: "",
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
        "name",
        "data_dir",
        "allowed_identities",
        "chunk_delay_ms",
        "signing_key",
    ];
    // Its `database_url` is never opened, so the files its query names are not looked for.
    const USES_DATABASE: bool = false;

    fn relative_to(&mut self, dir: &Path) {
        self.service.relative_to(dir);
        if self.data_dir.is_relative() {
            self.data_dir = dir.join(&self.data_dir);
        }
        if let Some(key) = &mut self.signing_key {
            *key = dir.join(&*key);
        }
    }

    fn check(&self) -> Result<(), ConfigErrors> {
        let mut errors = self.validate().err().map_or_else(Vec::new, |e| e.0);
        // Read here, not only at start-up, so a bad key is reported with the TLS files.
        if let Some(key) = &self.signing_key {
            dsrelay_runtime::config::check_signing_key(&mut errors, "signing_key", key);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

impl Config {
    /// Loads the file (if any) and the process's `DSRELAY_RECIPIENT__*` variables, then
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
        let mut errors: Vec<String> = self
            .service
            .validate()
            .into_iter()
            // No database: its URL may be anything, empty included.
            .filter(|e| !e.starts_with("database_url"))
            .collect();
        if self.name.trim().is_empty() {
            errors.push("name: the recipient's name for its receipts is required".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            errors.push("data_dir: the folder received files are written to is required".into());
        }
        if self.allowed_identities.is_empty() {
            errors.push(
                "allowed_identities: list the processor identities that may send transfers"
                    .to_string(),
            );
        }
        for (i, id) in self.allowed_identities.iter().enumerate() {
            if id.trim().is_empty() {
                errors.push(format!("allowed_identities[{i}]: must not be empty"));
            }
        }
        if self.chunk_delay_ms > MAX_CHUNK_DELAY_MS {
            errors.push(format!(
                "chunk_delay_ms: must be at most {MAX_CHUNK_DELAY_MS}, got {}",
                self.chunk_delay_ms
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
    fn every_problem_is_reported_at_once() {
        let c = Config {
            service: ServiceSettings::new(
                "127.0.0.1:1",
                "",
                dsrelay_runtime::tls::TlsFiles::new("ca.pem", "r.pem", "r.key"),
            ),
            name: " ".into(),
            data_dir: PathBuf::new(),
            allowed_identities: vec![],
            chunk_delay_ms: MAX_CHUNK_DELAY_MS + 1,
            signing_key: None,
        };
        let errors = c.validate().unwrap_err().0;
        assert!(errors.iter().any(|e| e.starts_with("name:")), "{errors:?}");
        assert!(errors.iter().any(|e| e.starts_with("data_dir:")));
        assert!(errors.iter().any(|e| e.starts_with("allowed_identities:")));
        assert!(errors.iter().any(|e| e.starts_with("chunk_delay_ms:")));
        assert!(!errors.iter().any(|e| e.starts_with("database_url")));
    }

    #[test]
    fn the_example_file_loads_with_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["pki/ca.pem", "pki/recipient.pem", "pki/recipient.key"] {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        let file = dir.path().join("example.toml");
        std::fs::write(&file, include_str!("../example.toml")).unwrap();
        let env = vec![(
            "DSRELAY_RECIPIENT__CHUNK_DELAY_MS".to_string(),
            "200".to_string(),
        )];
        let c = Config::load_from(Some(&file), env).unwrap();
        assert_eq!(c.name, "example-recipient");
        assert_eq!(c.chunk_delay_ms, 200);
        assert_eq!(c.data_dir, dir.path().join("example-recipient"));
        assert_eq!(c.service.tls.cert, dir.path().join("pki/recipient.pem"));
    }

    /// The example file, with TLS files that exist, and `extra` before it.
    fn folder(extra: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["pki/ca.pem", "pki/recipient.pem", "pki/recipient.key"] {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        let file = dir.path().join("example.toml");
        std::fs::write(
            &file,
            format!("{extra}\n{}", include_str!("../example.toml")),
        )
        .unwrap();
        (dir, file)
    }

    /// A misspelt top-level key is listed with the known ones (the shared keys and this
    /// service's), as a misspelt key in a table is.
    #[test]
    fn an_unknown_top_level_key_lists_the_known_ones() {
        let (_dir, file) = folder("chunk_dealy_ms = 5");
        let err = Config::load_from(Some(&file), []).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].starts_with(&format!(
                "{}: key chunk_dealy_ms: unknown key; known here: listen, admin_listen, ",
                file.display()
            )),
            "{err}"
        );
        assert!(err.0[0].contains(", chunk_delay_ms"), "{err}");
    }

    /// `KEYS` lists exactly this service's own top-level keys: those a full configuration
    /// writes beside the shared ones.
    #[test]
    fn the_listed_top_level_keys_are_this_service_s() {
        let (_dir, file) = folder("");
        let mut c = Config::load_from(Some(&file), []).unwrap();
        // Optional keys are written only when set.
        c.signing_key = Some("recipient-signing.key".into());
        let mut listed: Vec<String> = Config::KEYS.iter().map(|k| k.to_string()).collect();
        listed.sort();
        assert_eq!(dsrelay_runtime::settings::own_keys(&c), listed);
    }

    /// The recipient keeps no database, so neither the scheme of `database_url` nor the
    /// files its query names are checked; its TLS files still are.
    #[test]
    fn the_unused_database_url_is_not_checked() {
        let (dir, file) = folder(
            "database_url = \"postgres://u@h/db?sslrootcert=/nonexistent/root.pem&\
             sslkey=/nonexistent/c.key\"",
        );
        let c = Config::load_from(Some(&file), []).unwrap();
        assert!(c.service.database_url.contains("/nonexistent/root.pem"));
        let env = [(
            "DSRELAY_RECIPIENT__DATABASE_URL".to_string(),
            "mysql://h/db".to_string(),
        )];
        Config::load_from(Some(&file), env).unwrap();
        std::fs::remove_file(dir.path().join("pki/ca.pem")).unwrap();
        let err = Config::load_from(Some(&file), []).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].starts_with("tls.ca: "), "{err}");
    }

    /// The signing key is found beside the configuration file; one that cannot be read is
    /// reported with the TLS files, naming the key and its path.
    #[test]
    fn the_signing_key_is_read_beside_the_config_file() {
        let (dir, file) = folder("signing_key = \"pki/recipient-signing.key\"");
        let key = dir.path().join("pki/recipient-signing.key");
        dsrelay_runtime::signing::SigningKey::generate()
            .write(&key)
            .unwrap();
        let c = Config::load_from(Some(&file), []).unwrap();
        assert_eq!(c.signing_key, Some(key.clone()));

        std::fs::write(&key, "not a key").unwrap();
        std::fs::remove_file(dir.path().join("pki/recipient.pem")).unwrap();
        let err = Config::load_from(Some(&file), []).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(
            err.0.iter().any(|e| e.starts_with("signing_key: ")),
            "{err}"
        );
        assert!(err.0.iter().any(|e| e.starts_with("tls.cert: ")), "{err}");
        assert!(err.to_string().contains("recipient-signing.key"), "{err}");
    }
}
