//! Configuration in layers, merged by [`figment`]: a TOML file, then environment variables
//! with a prefix.
//!
//! `PREFIX__A__B=value` sets key `b` of table `a` (the prefix is matched exactly, the key
//! segments are lowercased).
//! The value is read the way figment reads environment values: integers, floats, `true` and
//! `false`, arrays (`[1, 2]`), tables (`{a = 1}`) and quoted strings as such, anything else
//! as a string. Each variable is its own layer, so a message names the variable a bad value
//! came from.
//!
//! Problems are collected and reported together, so an operator fixes them in one round: a
//! file that cannot be read or parsed and every malformed variable name, each naming its
//! source. Only when the layers are sound is the result deserialized, and serde stops at the
//! first value it cannot use (a wrong type, an unknown key: the service configs deny unknown
//! fields), which is reported with its key and source. `main` exits with 64 (EX_USAGE) on a
//! bad configuration.

#[cfg(feature = "arbitrary-config")]
pub mod arbitrary;

use std::ops::RangeInclusive;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;

use crate::backoff::Backoff;

/// Exit status for a bad configuration or bad command line (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

/// One day in milliseconds.
const DAY_MS: u64 = 86_400_000;

/// The longest duration a `*_ms` setting accepts unless it has a tighter bound of its own:
/// 30 days. Every interval, lease, timeout and backoff of the services is far below it; a
/// value above it is a typo, not a tuning, and added to a clock reading (ms since the epoch,
/// as `i64`) it would overflow or land in the far future.
pub const MAX_DURATION_MS: u64 = 30 * DAY_MS;

/// The longest deadline of one outgoing call (`*.call_timeout_ms`) accepted: one hour. A call
/// is one request and its answer; the peer ends its unary calls after its own
/// `call_limit_ms` (default 60 s) anyway.
pub const MAX_CALL_TIMEOUT_MS: u64 = 3_600_000;

/// The longest retention (`forget_after_days`, `package_ttl_days`) accepted: ten years, in
/// days. Beyond it the personal data would, in practice, be kept for ever.
pub const MAX_RETENTION_DAYS: u32 = 3650;

/// Adds a message naming `key` and the accepted range to `errors` when the duration `value`
/// (ms) lies outside `range`; e.g. `tasks.lease_ms: must be from 1 ms to 2592000000 ms (30
/// days); it is 0`.
pub fn check_ms(errors: &mut Vec<String>, key: &str, value: u64, range: RangeInclusive<u64>) {
    if !range.contains(&value) {
        errors.push(format!(
            "{key}: must be from {} to {}; it is {value}",
            describe_ms(*range.start()),
            describe_ms(*range.end())
        ));
    }
}

/// Checks the retry spacing of table `table` (e.g. `tasks`): `backoff.initial_ms` and
/// `backoff.max_ms` from 1 ms to [`MAX_DURATION_MS`]. At 0 every retry of a failing call
/// follows the last after 1 ms, a busy loop against a peer that is down; far above the
/// maximum, a retry time added to the clock overflows.
pub fn check_backoff(errors: &mut Vec<String>, table: &str, backoff: &Backoff) {
    let range = 1..=MAX_DURATION_MS;
    check_ms(
        errors,
        &format!("{table}.backoff.initial_ms"),
        backoff.initial_ms,
        range.clone(),
    );
    check_ms(
        errors,
        &format!("{table}.backoff.max_ms"),
        backoff.max_ms,
        range,
    );
}

/// Adds a message naming `key` to `errors` when `path` holds no signing key this service can
/// load (missing, unreadable, not an Ed25519 PKCS#8 PEM key), so that it is reported with
/// the configuration's other problems rather than failing the start on its own later.
pub fn check_signing_key(errors: &mut Vec<String>, key: &str, path: &Path) {
    if let Err(e) = crate::signing::SigningKey::load(path) {
        errors.push(format!("{key}: {e:#}"));
    }
}

/// `ms` as `N ms`, followed by whole days or hours in parentheses when it is a multiple.
fn describe_ms(ms: u64) -> String {
    const HOUR_MS: u64 = 3_600_000;
    let unit = |n: u64, one: &str| format!(" ({n} {one}{})", if n == 1 { "" } else { "s" });
    let whole = match ms {
        0 => String::new(),
        _ if ms.is_multiple_of(DAY_MS) => unit(ms / DAY_MS, "day"),
        _ if ms.is_multiple_of(HOUR_MS) => unit(ms / HOUR_MS, "hour"),
        _ => String::new(),
    };
    format!("{ms} ms{whole}")
}

/// Reads `file` (if given), applies `PREFIX__*` variables from `env`, and deserializes.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigErrors> {
    let mut layers = Layers::default();
    if let Some(path) = file {
        // `file_exact`: a named file that is missing is an error, not an empty layer.
        layers.add(Toml::file_exact(path));
    }
    let marker = format!("{prefix}__");
    for (name, value) in env {
        if let Some(path) = name.strip_prefix(&marker) {
            let key = path.split("__").map(str::to_ascii_lowercase).collect();
            layers.add(Variable { name, key, value });
        }
    }
    if !layers.problems.is_empty() {
        return Err(ConfigErrors(layers.problems));
    }
    let figment = layers.figment;
    figment.extract().map_err(|e| {
        ConfigErrors(
            e.into_iter()
                .map(|e| {
                    let key = key_of(&e, &figment);
                    describe(&e, &key, source_of(&e, &key, &figment))
                })
                .collect(),
        )
    })
}

/// The key an error is about. For an unknown key that is the key itself: figment's path
/// stops at the table when the table was read through serde's buffered content (an
/// internally tagged enum such as a connector), and a struct with a flattened part (a
/// service's top level) reports its unknown keys as a plain message, path and all. Below a
/// flattened table (`[tls]`) or a connector's own tables the path stops short of the
/// key's table. So the key is looked for at any depth below the path, and named where it
/// is found once; found nowhere or more than once (`listen` in `[tls]` and at the top),
/// it is left unnamed rather than misplaced.
fn key_of(e: &figment::Error, figment: &Figment) -> Vec<String> {
    match &candidates(e, figment)[..] {
        [one] => one.clone(),
        _ => e.path.clone(),
    }
}

/// Where the key `e` reports unknown may be: every place below the error's path that
/// holds a key of its name (the path itself when it ends in the name). Empty for an error
/// about something else.
fn candidates(e: &figment::Error, figment: &Figment) -> Vec<Vec<String>> {
    let Some(name) = unknown_key(&e.kind) else {
        return Vec::new();
    };
    if e.path.last().map(String::as_str) == Some(name) {
        return vec![e.path.clone()];
    }
    let mut found = Vec::new();
    if let (_, Some(below)) = walk(figment, &e.path) {
        find_key(&below, name, &mut e.path.clone(), &mut found);
    }
    found
}

/// The layer that set the key `e` is about: the one that set `key` (or the deepest table
/// on its way); for an unknown key found in several places, the layer that set them all,
/// if one did.
fn source_of<'a>(e: &figment::Error, key: &[String], figment: &'a Figment) -> Option<&'a Metadata> {
    let places = candidates(e, figment);
    if places.len() < 2 {
        return walk(figment, key).0;
    }
    let mut sources = places.iter().map(|p| walk(figment, p).0);
    let first = sources.next()?;
    sources.all(|s| s == first).then_some(first)?
}

/// Adds to `found` the path (from `at`) of every key `name` in `value`, at any depth.
fn find_key(value: &Value, name: &str, at: &mut Vec<String>, found: &mut Vec<Vec<String>>) {
    let children: Vec<(String, &Value)> = match value {
        Value::Dict(_, dict) => dict.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(_, array) => (array.iter().enumerate())
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (segment, child) in children {
        at.push(segment);
        if at.last().map(String::as_str) == Some(name) {
            found.push(at.clone());
        }
        find_key(child, name, at, found);
        at.pop();
    }
}

/// The name of the unknown key `kind` reports, if it reports one.
fn unknown_key(kind: &figment::error::Kind) -> Option<&str> {
    match kind {
        figment::error::Kind::UnknownField(name, _) => Some(name),
        // serde's own wording for a struct with a flattened field and `deny_unknown_fields`.
        figment::error::Kind::Message(m) => m.strip_prefix("unknown field `")?.strip_suffix('`'),
        _ => None,
    }
}

/// The layer that set `key`, or the one that set the deepest table on its way, and the
/// value at `key` when the settings hold it. figment's own `find_metadata` and `find_value`
/// cannot pass through arrays (`subprocessors.0.connector`).
fn walk<'a>(figment: &'a Figment, key: &[String]) -> (Option<&'a Metadata>, Option<Value>) {
    let Ok(root) = figment.find_value("") else {
        return (None, None);
    };
    let mut tag = root.tag();
    let mut value = Some(root);
    for segment in key {
        let inner = match value.take() {
            Some(Value::Dict(_, mut dict)) => dict.remove(segment),
            Some(Value::Array(_, array)) => segment
                .parse::<usize>()
                .ok()
                .and_then(|i| array.into_iter().nth(i)),
            _ => None,
        };
        let Some(inner) = inner else { break };
        tag = inner.tag();
        value = Some(inner);
    }
    // `value` is left only when every segment was found.
    let held = value;
    (figment.get_metadata(tag), held)
}

/// The layers merged so far, and the problems of those that could not be read.
#[derive(Default)]
struct Layers {
    figment: Figment,
    problems: Vec<String>,
}

impl Layers {
    /// Merges `provider` over the layers before it, or records why it cannot be read.
    ///
    /// Each layer is read on its own first: figment 0.10 chains the errors of failing
    /// providers such that only two survive a merge of three, and every problem is wanted.
    fn add(&mut self, provider: impl Provider) {
        let source = provider.metadata();
        let layer = Figment::from(provider);
        match layer.data() {
            Ok(_) => self.figment = std::mem::take(&mut self.figment).merge(layer),
            Err(e) => self.problems.extend(
                e.into_iter()
                    .map(|e| describe(&e, &key_of(&e, &layer), Some(&source))),
            ),
        }
    }
}

/// One `PREFIX__A__B=value` variable as a layer of its own.
struct Variable {
    /// The variable's full name, for messages.
    name: String,
    /// The key path it sets, lowercased.
    key: Vec<String>,
    value: String,
}

impl Provider for Variable {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variable {}", self.name))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let (last, tables) = match self.key.split_last() {
            Some(split) if !self.key.iter().any(String::is_empty) => split,
            _ => return Err("has an empty key segment".to_string().into()),
        };
        // figment's value parser slices strings at character counts as if they were byte
        // offsets once it meets a backslash: past a non-ASCII character that panics or
        // garbles the value, so such values are refused rather than misread.
        if let Some(at) = self.value.rfind('\\') {
            if !self.value[..at].is_ascii() {
                return Err(
                    "has a backslash after a non-ASCII character, which cannot be \
                     read from the environment; set this key in the file instead"
                        .to_string()
                        .into(),
                );
            }
        }
        let value: Value = self.value.parse().unwrap_or_else(|e| match e {});
        let dict = tables
            .iter()
            .rev()
            .fold(Dict::from([(last.clone(), value)]), |inner, table| {
                Dict::from([(table.clone(), Value::from(inner))])
            });
        Ok(Profile::Default.collect(dict))
    }
}

/// One problem as `source: key k: what`.
///
/// `source` is the layer that set the key when known: an error's own metadata is that of
/// the table it sits in, which may come from another layer (an unknown key set by a
/// variable in a table from the file).
fn describe(e: &figment::Error, key: &[String], source: Option<&Metadata>) -> String {
    let (key, what) = match &e.kind {
        // The key names the unknown one, unless it could not be placed (see `key_of`).
        figment::error::Kind::UnknownField(name, expected) => (
            key.join("."),
            if key.last() == Some(name) {
                format!("unknown key; known here: {}", expected.join(", "))
            } else {
                format!("unknown key `{name}`; known here: {}", expected.join(", "))
            },
        ),
        // serde's message names the key itself (and not the keys the struct knows, which
        // serde does not tell for a struct with a flattened part): only its table is added.
        kind => (e.path.join("."), kind.to_string()),
    };
    let source = source.or(e.metadata.as_ref()).map(|md| match &md.source {
        Some(Source::File(path)) => path.display().to_string(),
        _ => md.name.to_string(),
    });
    match (source, key.is_empty()) {
        (Some(s), false) => format!("{s}: key {key}: {what}"),
        (Some(s), true) => format!("{s}: {what}"),
        (None, false) => format!("key {key}: {what}"),
        (None, true) => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        listen: String,
        db: Db,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Db {
        url: String,
        max: u32,
        #[serde(default)]
        names: Vec<String>,
    }

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sample_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"a\"\n[db]\nurl = \"x\"\nmax = 1\n").unwrap();
        f
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = sample_file(&dir);
        let env = vars(&[
            ("APP__DB__MAX", "8"),
            ("APP__LISTEN", "127.0.0.1:1"),
            ("APP__DB__NAMES", "[\"p\", \"q\"]"),
            ("app__db__max", "9"),
            ("OTHER", "z"),
        ]);
        let s: Sample = load(Some(&f), "APP", env).unwrap();
        assert_eq!(s.db.max, 8);
        assert_eq!(s.db.url, "x");
        assert_eq!(s.db.names, ["p", "q"]);
        assert_eq!(s.listen, "127.0.0.1:1");
    }

    #[test]
    fn reports_every_problem() {
        let env = vars(&[("APP__", "1"), ("APP__A____B", "1")]);
        let err = load::<Sample>(Some(Path::new("/nonexistent.toml")), "APP", env).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(err.0[0].starts_with("/nonexistent.toml: "), "{err}");
        assert_eq!(
            err.0[1],
            "environment variable APP__: has an empty key segment"
        );
        assert_eq!(
            err.0[2],
            "environment variable APP__A____B: has an empty key segment"
        );
    }

    #[test]
    fn a_file_that_does_not_parse_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "listen = \n").unwrap();
        let err = load::<Sample>(Some(&f), "APP", vars(&[])).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].starts_with(&format!("{}: ", f.display())), "{err}");
    }

    #[test]
    fn a_backslash_after_non_ascii_text_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let f = sample_file(&dir);
        // A value like the one a property test found, on which figment's parser panicked.
        let found = "\"\u{71a}\u{10ec2}\u{10a12}P'\u{1ee7b}\u{1e7ed}\u{10bad}\u{128a}$\u{1170b}1&4\u{1e900}\\&\"";
        for value in [found, "\"päivä\\n\"", "[\"\\n\", \"ä\\t\"]"] {
            let err =
                load::<Sample>(Some(&f), "APP", vars(&[("APP__DB__URL", value)])).unwrap_err();
            assert_eq!(
                err.0,
                [
                    "environment variable APP__DB__URL: has a backslash after a non-ASCII \
                  character, which cannot be read from the environment; set this key in the \
                  file instead"
                ],
                "{value}"
            );
        }
        // Backslashes before any non-ASCII text, and non-ASCII text without one, still load.
        for (value, read) in [("\"a\\\\b\"", "a\\b"), ("päivä", "päivä"), ("\\ä", "\\ä")] {
            let s: Sample = load(Some(&f), "APP", vars(&[("APP__DB__URL", value)])).unwrap();
            assert_eq!(s.db.url, read, "{value}");
        }
    }

    #[test]
    fn a_bad_value_names_its_key_and_variable() {
        let dir = tempfile::tempdir().unwrap();
        let f = sample_file(&dir);
        let err = load::<Sample>(Some(&f), "APP", vars(&[("APP__DB__MAX", "many")])).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].starts_with("environment variable APP__DB__MAX: key db.max: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_naming_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let f = sample_file(&dir);
        let err = load::<Sample>(Some(&f), "APP", vars(&[("APP__DB__MAXX", "2")])).unwrap_err();
        assert_eq!(
            err.0,
            ["environment variable APP__DB__MAXX: key db.maxx: unknown key; known here: url, max, names"]
        );

        std::fs::write(
            &f,
            "listen = \"a\"\nlisten_port = 1\n[db]\nurl = \"x\"\nmax = 1\n",
        )
        .unwrap();
        let err = load::<Sample>(Some(&f), "APP", vars(&[])).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].starts_with(&format!("{}: key listen_port: unknown key", f.display())),
            "{err}"
        );
    }

    /// Shaped like a service's configuration: shared keys flattened in, and a table read
    /// through serde's buffered content (an internally tagged enum, like a connector).
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Service {
        #[serde(flatten)]
        _shared: Shared,
        #[serde(default)]
        _package_dir: Option<String>,
        #[serde(default)]
        _subprocessors: Vec<Subprocessor>,
    }
    #[derive(serde::Deserialize, Debug)]
    struct Shared {
        #[serde(default)]
        _listen: Option<String>,
        #[serde(default)]
        _tls: Option<Tls>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Tls {
        #[serde(default)]
        _cert: Option<String>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Subprocessor {
        _connector: Connector,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Connector {
        Noop(#[allow(dead_code)] Noop),
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Noop {
        #[serde(default)]
        _delay_ms: u64,
        #[serde(default)]
        _tables: Vec<Rule>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Rule {
        #[serde(default)]
        _action: Option<String>,
    }

    #[test]
    fn every_unknown_key_is_named_with_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        let file = f.display();
        std::fs::write(&f, "_pakage_dir = \"p\"\n").unwrap();
        let err = load::<Service>(Some(&f), "APP", vars(&[])).unwrap_err();
        assert_eq!(err.0, [format!("{file}: unknown field `_pakage_dir`")]);

        let err = load::<Service>(None, "APP", vars(&[("APP___LISTN", "x")])).unwrap_err();
        assert_eq!(
            err.0,
            ["environment variable APP___LISTN: unknown field `_listn`"]
        );

        std::fs::write(
            &f,
            "[[_subprocessors]]\n_connector = { type = \"noop\", urll = \"x\" }\n",
        )
        .unwrap();
        let err = load::<Service>(Some(&f), "APP", vars(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [format!(
                "{file}: key _subprocessors.0._connector.urll: unknown key; known here: _delay_ms, _tables"
            )]
        );

        // Below a flattened part the path stops short: the key is found where it is.
        std::fs::write(&f, "[_tls]\n_cerrt = \"x\"\n").unwrap();
        let err = load::<Service>(Some(&f), "APP", vars(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [format!(
                "{file}: key _tls._cerrt: unknown key; known here: _cert"
            )]
        );
        // Nor does it stop short in an array below the path.
        std::fs::write(
            &f,
            "[[_subprocessors]]\n[_subprocessors._connector]\ntype = \"noop\"\n\
             [[_subprocessors._connector._tables]]\n_actionn = \"x\"\n",
        )
        .unwrap();
        let err = load::<Service>(Some(&f), "APP", vars(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [format!(
                "{file}: key _subprocessors.0._connector._tables.0._actionn: unknown key; known \
                 here: _action"
            )]
        );
        // Where it could be more than one key (a top-level key written below `[_tls]`, or
        // set in it by a variable), none is named.
        std::fs::write(&f, "_listen = \"a\"\n[_tls]\n_listen = \"b\"\n").unwrap();
        let err = load::<Service>(Some(&f), "APP", vars(&[])).unwrap_err();
        assert_eq!(
            err.0,
            [format!("{file}: unknown key `_listen`; known here: _cert")]
        );
    }

    #[test]
    fn a_duration_out_of_range_is_named_with_the_range() {
        let mut errors = Vec::new();
        check_ms(&mut errors, "a.lease_ms", 0, 1..=MAX_DURATION_MS);
        check_ms(&mut errors, "a.lease_ms", 1, 1..=MAX_DURATION_MS);
        check_ms(
            &mut errors,
            "a.lease_ms",
            MAX_DURATION_MS,
            1..=MAX_DURATION_MS,
        );
        check_ms(
            &mut errors,
            "b.timeout_ms",
            u64::MAX,
            0..=MAX_CALL_TIMEOUT_MS,
        );
        check_ms(&mut errors, "c.every_ms", 1, 2..=1500);
        assert_eq!(
            errors,
            [
                "a.lease_ms: must be from 1 ms to 2592000000 ms (30 days); it is 0",
                "b.timeout_ms: must be from 0 ms to 3600000 ms (1 hour); it is \
                 18446744073709551615",
                "c.every_ms: must be from 2 ms to 1500 ms; it is 1",
            ]
        );
    }

    #[test]
    fn a_missing_key_is_named() {
        let err = load::<Sample>(None, "APP", vars(&[("APP__LISTEN", "x")])).unwrap_err();
        assert_eq!(err.0, ["missing field `db`"], "{err}");
    }
}
