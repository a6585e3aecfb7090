//! Configuration in layers: a TOML file, then environment variables with a prefix.
//!
//! `PREFIX__A__B=value` sets key `b` of table `a`. The value is read as TOML when it parses
//! as a scalar or array (`8`, `true`, `["x"]`), otherwise as a string. Problems are collected
//! and reported together, so an operator fixes them in one round; `main` exits with 64
//! (EX_USAGE) on a bad configuration.

use std::path::Path;

use serde::de::DeserializeOwned;

/// Exit status for a bad configuration or bad command line (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// Reads `file` (if given), applies `PREFIX__*` variables from `env`, and deserializes.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigErrors> {
    let mut errors = Vec::new();
    let mut root = match file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(t) => t,
                Err(e) => {
                    errors.push(format!("{}: {e}", path.display()));
                    toml::Table::new()
                }
            },
            Err(e) => {
                errors.push(format!("cannot read {}: {e}", path.display()));
                toml::Table::new()
            }
        },
        None => toml::Table::new(),
    };
    let marker = format!("{prefix}__");
    for (key, value) in env {
        let Some(path) = key.strip_prefix(&marker) else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(|p| p.is_empty()) {
            errors.push(format!(
                "environment variable {key} has an empty key segment"
            ));
            continue;
        }
        if let Err(e) = set_path(&mut root, &parts, parse_env_value(&value)) {
            errors.push(format!("environment variable {key}: {e}"));
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    T::deserialize(toml::Value::Table(root)).map_err(|e| ConfigErrors(vec![e.to_string()]))
}

fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(table: &mut toml::Table, parts: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = parts.split_last().expect("parts is never empty");
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("{p} is not a table"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Sample {
        listen: String,
        db: Db,
    }
    #[derive(serde::Deserialize, Debug)]
    struct Db {
        url: String,
        max: u32,
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"a\"\n[db]\nurl = \"x\"\nmax = 1\n").unwrap();
        let env = vec![
            ("APP__DB__MAX".to_string(), "8".to_string()),
            ("APP__LISTEN".to_string(), "127.0.0.1:1".to_string()),
            ("OTHER".to_string(), "z".to_string()),
        ];
        let s: Sample = load(Some(&f), "APP", env).unwrap();
        assert_eq!(s.db.max, 8);
        assert_eq!(s.db.url, "x");
        assert_eq!(s.listen, "127.0.0.1:1");
    }

    #[test]
    fn reports_every_problem() {
        let env = vec![
            ("APP__".to_string(), "1".to_string()),
            ("APP__A____B".to_string(), "1".to_string()),
        ];
        let err = load::<Sample>(Some(Path::new("/nonexistent.toml")), "APP", env).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
    }
}
