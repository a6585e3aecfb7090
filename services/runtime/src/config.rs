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
//! fields), which is reported with its key and source; a service's configuration is read in
//! two parts, the shared keys and the service's own ([`load_flattened`]), each reporting its
//! first such problem, both in one report. `main` exits with 64 (EX_USAGE) on a
//! bad configuration.

#[cfg(feature = "arbitrary-config")]
pub mod arbitrary;

use std::ops::RangeInclusive;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;
use serde::Serialize;

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

/// The most a key that sizes a pool of work accepts (`tasks.concurrency`,
/// `delivery.batch_size`, ...). Each slot or claimed row costs memory and a task, and far
/// above it a value is a typo, not a tuning: tokio's semaphore panics past about 2^61
/// permits, after the service has started.
pub const MAX_CONCURRENCY: u64 = 65_536;

/// Adds a message naming `key` and the accepted range to `errors` when the count `value`
/// lies outside `range`; e.g. `tasks.concurrency: must be from 1 to 65536; it is 0`.
pub fn check_count(errors: &mut Vec<String>, key: &str, value: u64, range: RangeInclusive<u64>) {
    if !range.contains(&value) {
        errors.push(format!(
            "{key}: must be from {} to {}; it is {value}",
            range.start(),
            range.end()
        ));
    }
}

/// Adds a message naming `key` to `errors` when the count `value` is 0, where at least one
/// is needed; e.g. `acks.max_rejections: must be at least 1; it is 0`.
pub fn check_at_least_one(errors: &mut Vec<String>, key: &str, value: u64) {
    if value == 0 {
        errors.push(format!("{key}: must be at least 1; it is 0"));
    }
}

/// Adds a message naming `key` to `errors` when `endpoint` is not one [`crate::tls::channel`]
/// can call (`https://host:port`, the port 443 when left out): not a URI, another scheme, no
/// host, or a host that is no server name; e.g. `processors[0].endpoint: "https://bad
/// host:x" must be https://host:port`. Checked with the settings, so that it is reported
/// with them rather than when the first call is made.
pub fn check_endpoint(errors: &mut Vec<String>, key: &str, endpoint: &str) {
    let callable = endpoint.parse::<tonic::transport::Uri>().is_ok_and(|uri| {
        // The URI parser takes any port text (`h:x`), and the channel would then call 443.
        let authority = uri.authority().map_or("", |a| a.as_str());
        let after_host = authority.rsplit(['@', ']']).next().unwrap_or(authority);
        uri.scheme_str() == Some("https")
            && (!after_host.contains(':') || uri.port_u16().is_some())
            && uri.host().is_some_and(|host| {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                rustls_pki_types::ServerName::try_from(host).is_ok()
            })
    });
    if !callable {
        errors.push(format!("{key}: {endpoint:?} must be https://host:port"));
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

/// [`check_signing_key`] for the key that signs `audit`'s checkpoints
/// (`audit.checkpoint_key`), when checkpoints are on and a key is named: every service
/// reads it with its other key files. A missing key is [`AuditConfig::errors`]' to report.
///
/// [`AuditConfig::errors`]: crate::audit::signer::AuditConfig::errors
pub fn check_checkpoint_key(errors: &mut Vec<String>, audit: &crate::audit::signer::AuditConfig) {
    if let (true, Some(key)) = (audit.checkpoints, &audit.checkpoint_key) {
        check_signing_key(errors, "audit.checkpoint_key", key);
    }
}

/// Adds a message naming the key (`tls.ca`, `tls.cert`, `tls.key`, `tls.crls[i]`) and the
/// file for each of `tls`'s files that is missing, cannot be read, or holds no PEM item of
/// its kind (a certificate, a private key, a revocation list), so that a party whose files
/// are read only once it is built has them reported with the other settings. What the items
/// say (a key matching its certificate, a list's dates) is left to whoever loads them.
pub fn check_tls_files(errors: &mut Vec<String>, tls: &crate::tls::TlsFiles) {
    use rustls_pki_types::pem::{self, PemObject};
    use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

    /// Every item of `items` read, and at least one.
    fn some<T>(items: impl Iterator<Item = Result<T, pem::Error>>) -> Result<(), pem::Error> {
        let mut found = false;
        for item in items {
            item?;
            found = true;
        }
        found.then_some(()).ok_or(pem::Error::NoItemsFound)
    }
    let certificates = |pem: &[u8]| some(CertificateDer::pem_slice_iter(pem));
    let key = |pem: &[u8]| PrivateKeyDer::from_pem_slice(pem).map(drop);
    let crl = |pem: &[u8]| some(CertificateRevocationListDer::pem_slice_iter(pem));
    type Parse<'a> = &'a dyn Fn(&[u8]) -> Result<(), pem::Error>;
    let mut files: Vec<(String, &Path, &str, Parse)> = vec![
        ("tls.ca".into(), &tls.ca, "certificate", &certificates),
        ("tls.cert".into(), &tls.cert, "certificate", &certificates),
        ("tls.key".into(), &tls.key, "private key", &key),
    ];
    for (i, path) in tls.crls.iter().enumerate() {
        files.push((format!("tls.crls[{i}]"), path, "revocation list", &crl));
    }
    for (name, path, what, parse) in files {
        let shown = path.display();
        if !path.is_file() {
            errors.push(format!("{name}: {shown} is not a readable file"));
            continue;
        }
        match std::fs::read(path) {
            Err(e) => errors.push(format!("{name}: {shown} cannot be read: {e}")),
            Ok(pem) => match parse(&pem) {
                Ok(()) => {}
                Err(pem::Error::NoItemsFound) => {
                    errors.push(format!("{name}: {shown} holds no PEM {what}"))
                }
                Err(e) => errors.push(format!("{name}: {shown} is not a PEM {what}: {e}")),
            },
        }
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
    load_listing(file, prefix, env, &[])
}

/// [`load`] for a configuration that flattens a part into its top level (a service's, see
/// [`crate::settings`]): serde names no known keys for an unknown key there, as it does in
/// every table, so an unknown top-level key is reported with `top_level` as the known ones
/// (none when it is empty).
pub fn load_listing<T: DeserializeOwned>(
    file: Option<&Path>,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
    top_level: &[&str],
) -> Result<T, ConfigErrors> {
    let (figment, marker) = layers(file, prefix, env)?;
    extract(&figment, &figment, &marker, top_level)
}

/// [`load_listing`] that first reads `P`, the part `T` flattens in, on its own from the
/// same layers. serde hands a flattened part its keys as buffered content, which carries no
/// path: a value of the wrong type there (`shutdown_grace_ms = "10s"`) would be reported
/// with neither its key nor the file or variable that set it. Read directly, it is reported
/// like any other key. `P` must not deny unknown fields, as it is handed every key.
///
/// When `P` cannot be read, `T` is still read, with `P`'s top-level keys replaced by
/// `stand_in` (a `P` that reads), and its problems are reported after `P`'s: so a problem of
/// the service's own keys (a wrong type, an unknown or missing key) comes in the same report
/// as one of the shared keys, not only once those are fixed.
pub fn load_flattened<T: DeserializeOwned, P: DeserializeOwned + Serialize>(
    file: Option<&Path>,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
    top_level: &[&str],
    stand_in: &P,
) -> Result<T, ConfigErrors> {
    let (figment, marker) = layers(file, prefix, env)?;
    let Err(ConfigErrors(mut errors)) = extract::<P>(&figment, &figment, &marker, &[]) else {
        return extract(&figment, &figment, &marker, top_level);
    };
    // serde stops at the flattened part's first problem, before the keys it would check after
    // it (the unknown ones): with the shared keys standing in, it gets past that part.
    if let Some(patched) = with_stand_in(&figment, stand_in) {
        if let Err(ConfigErrors(own)) = extract::<T>(&patched, &figment, &marker, top_level) {
            errors.extend(own);
        }
    }
    Err(ConfigErrors(errors))
}

/// The merged layers with every top-level key `P` knows replaced by `stand_in`'s, as one
/// layer; `None` when either is not a table.
fn with_stand_in<P: DeserializeOwned + Serialize>(
    figment: &Figment,
    stand_in: &P,
) -> Option<Figment> {
    let Ok(Value::Dict(_, mut dict)) = figment.find_value("") else {
        return None;
    };
    for key in struct_fields::<P>() {
        dict.remove(*key);
    }
    let Ok(Value::Dict(_, shared)) = Value::serialize(stand_in) else {
        return None;
    };
    dict.extend(shared);
    Some(Figment::from(Serialized::defaults(dict)))
}

/// The file (if given) and every `PREFIX__*` variable of `env` merged in that order, with
/// the marker (`PREFIX__`) the variables were picked by; or every layer's problem.
fn layers(
    file: Option<&Path>,
    prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Figment, String), ConfigErrors> {
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
    Ok((layers.figment, marker))
}

/// Deserializes `T` from `data`, each problem named with its key and its source in `read`
/// (the layers as read, of which `data` may be a patched copy, see [`load_flattened`]).
fn extract<T: DeserializeOwned>(
    data: &Figment,
    read: &Figment,
    marker: &str,
    top_level: &[&str],
) -> Result<T, ConfigErrors> {
    data.extract().map_err(|e| {
        ConfigErrors(
            e.into_iter()
                .map(|mut e| {
                    if !std::ptr::eq(data, read) {
                        // A patched copy's metadata names the copy, not a file or variable.
                        e.metadata = None;
                    }
                    let places = candidates(&e, read);
                    let key = key_of(&e, &places);
                    let source = source_of(&places, &key, read);
                    let what = describe(&e, &key, source, top_level);
                    match list_override::<T>(&e, &key, source, marker, data) {
                        Some(hint) => format!("{what}; {hint}"),
                        None => what,
                    }
                })
                .collect(),
        )
    })
}

/// The names of the fields `T`, a struct without a flattened part, asks its deserializer
/// for (its `deny_unknown_fields` list); empty for any other type. For the known keys of a
/// table that a configuration flattens in, which serde does not tell.
pub fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    /// A deserializer that gives nothing, only notes the fields a struct asks for.
    struct Probe;
    /// What [`Probe`] noted, carried out as its error.
    #[derive(Debug)]
    struct Fields(&'static [&'static str]);
    impl std::fmt::Display for Fields {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fields {:?}", self.0)
        }
    }
    impl std::error::Error for Fields {}
    impl serde::de::Error for Fields {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Self(&[])
        }
    }
    impl<'de> serde::Deserializer<'de> for Probe {
        type Error = Fields;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    T::deserialize(Probe).err().map_or(&[], |fields| fields.0)
}

/// For a key that holds a list, set by a variable in another form (`a,b`, one value, or an
/// entry `KEY__0`): what the variable did and the form its value must have. A variable
/// replaces the list whole, and figment reads a value as a list only when it is written as
/// an array, and a table in it only when it is written as an inline table.
fn list_override<T: DeserializeOwned>(
    e: &figment::Error,
    key: &[String],
    source: Option<&Metadata>,
    marker: &str,
    figment: &Figment,
) -> Option<String> {
    let figment::error::Kind::InvalidType(_, expected) = &e.kind else {
        return None;
    };
    let list = expected == "a sequence"
        || expected.starts_with("a tuple")
        || expected.starts_with("an array");
    let name = source?.name.strip_prefix(VARIABLE_SOURCE)?;
    let below = name.strip_prefix(marker)?.split("__").count();
    if !list || key.is_empty() || below < key.len() {
        return None;
    }
    let shown = key.join(".");
    // The variable of the list itself: `PREFIX__A__B` of `PREFIX__A__B__0`, as written.
    let whole: Vec<&str> = name.split("__").take(key.len() + 1).collect();
    let whole = whole.join("__");
    let example = if entries_are_tables::<T>(figment, key) {
        format!(
            "{whole}='[{{a = 1, b = \"x\"}}, {{a = 2, b = \"y\"}}]', each entry an inline \
             table with the keys of a [[{shown}]] table"
        )
    } else {
        format!("{whole}='[\"a\", \"b\"]' (or [1, 2] for numbers)")
    };
    Some(if below == key.len() {
        format!(
            "{name} overrides key {shown}, a list: its value must be the whole list written \
             as an array, e.g. {example}"
        )
    } else {
        format!(
            "{name} sets an entry of key {shown}, a list, which a variable cannot: set the \
             whole list as an array in {whole}, e.g. {example}"
        )
    })
}

/// Whether `T` takes tables as the entries of the list at `key`: it refuses a string entry
/// for its type and not an empty table (which may lack keys, a problem of another kind).
/// Each trial puts a list of that one entry at `key`; the keys before it passed already, so
/// a problem there is the first `T` meets.
fn entries_are_tables<T: DeserializeOwned>(figment: &Figment, key: &[String]) -> bool {
    let refused = |entry: &str| {
        let trial = Variable {
            name: String::new(),
            key: key.to_vec(),
            value: format!("[{entry}]"),
        };
        match figment.clone().merge(trial).extract::<T>() {
            Ok(_) => false,
            Err(e) => {
                e.path.starts_with(key) && matches!(e.kind, figment::error::Kind::InvalidType(..))
            }
        }
    };
    refused("\"a\"") && !refused("{}")
}

/// The key an error is about. For an unknown key that is the key itself: figment's path
/// stops at the table when the table was read through serde's buffered content (an
/// internally tagged enum such as a connector), and a struct with a flattened part (a
/// service's top level) reports its unknown keys as a plain message, path and all. Below a
/// flattened table (`[tls]`) or a connector's own tables the path stops short of the
/// key's table. So the key is looked for at any depth below the path, and named where it
/// is found once; found nowhere or more than once (`listen` in `[tls]` and at the top),
/// it is left unnamed rather than misplaced.
fn key_of(e: &figment::Error, places: &[Vec<String>]) -> Vec<String> {
    match places {
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

/// The layer that set the key an error is about: the one that set `key` (or the deepest
/// table on its way); for an unknown key found in several `places` (its [`candidates`]),
/// the layer that set them all, if one did.
fn source_of<'a>(
    places: &[Vec<String>],
    key: &[String],
    figment: &'a Figment,
) -> Option<&'a Metadata> {
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
            Err(e) => self.problems.extend(e.into_iter().map(|e| {
                let key = key_of(&e, &candidates(&e, &layer));
                describe(&e, &key, Some(&source), &[])
            })),
        }
    }
}

/// How a variable's layer is named, before the variable's name.
const VARIABLE_SOURCE: &str = "environment variable ";

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
        Metadata::named(format!("{VARIABLE_SOURCE}{}", self.name))
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
fn describe(
    e: &figment::Error,
    key: &[String],
    source: Option<&Metadata>,
    top_level: &[&str],
) -> String {
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
        // An unknown key at the top level of a struct with a flattened part: serde tells
        // not the keys it knows, so those given stand in, as in any other table.
        kind if e.path.is_empty() && !top_level.is_empty() => match unknown_key(kind) {
            Some(name) if key.last().map(String::as_str) == Some(name) => (
                key.join("."),
                format!("unknown key; known here: {}", top_level.join(", ")),
            ),
            Some(name) => (
                String::new(),
                format!(
                    "unknown key `{name}`; known at the top level: {}",
                    top_level.join(", ")
                ),
            ),
            None => (String::new(), kind.to_string()),
        },
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

    /// Unknown at the top level of a struct with a flattened part, a key is listed with
    /// the known ones given, as in any table, whether a file or a variable set it.
    #[test]
    fn an_unknown_top_level_key_lists_the_known_ones() {
        let known = ["_listen", "_tls", "_package_dir", "_subprocessors"];
        assert_eq!(struct_fields::<Shared>(), ["_listen", "_tls"]);
        assert!(struct_fields::<Vec<String>>().is_empty());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        let file = f.display();
        std::fs::write(&f, "_pakage_dir = \"p\"\n").unwrap();
        let err = load_listing::<Service>(Some(&f), "APP", vars(&[]), &known).unwrap_err();
        assert_eq!(
            err.0,
            [format!(
                "{file}: key _pakage_dir: unknown key; known here: _listen, _tls, _package_dir, \
                 _subprocessors"
            )]
        );
        let err = load_listing::<Service>(None, "APP", vars(&[("APP___LISTN", "x")]), &known)
            .unwrap_err();
        assert_eq!(
            err.0,
            [
                "environment variable APP___LISTN: key _listn: unknown key; known here: _listen, \
              _tls, _package_dir, _subprocessors"
            ]
        );
    }

    /// A variable overriding a list in another form is told what it did and the form it
    /// must have; written as an array, it replaces the file's list.
    #[test]
    fn a_list_overridden_by_a_variable_says_the_form_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"a\"\n[db]\nurl = \"x\"\nmax = 1\nnames = [\"f\"]\n",
        )
        .unwrap();
        let example = "APP__DB__NAMES='[\"a\", \"b\"]' (or [1, 2] for numbers)";
        for (value, found) in [("p,q", "string \"p,q\""), ("7", "unsigned int `7`")] {
            let err =
                load::<Sample>(Some(&f), "APP", vars(&[("APP__DB__NAMES", value)])).unwrap_err();
            assert_eq!(
                err.0,
                [format!(
                    "environment variable APP__DB__NAMES: key db.names: invalid type: found \
                     {found}, expected a sequence; APP__DB__NAMES overrides key db.names, a \
                     list: its value must be the whole list written as an array, e.g. {example}"
                )]
            );
        }
        let err = load::<Sample>(Some(&f), "APP", vars(&[("APP__DB__NAMES__0", "p")])).unwrap_err();
        assert_eq!(
            err.0,
            [format!(
                "environment variable APP__DB__NAMES__0: key db.names: invalid type: found map, \
                 expected a sequence; APP__DB__NAMES__0 sets an entry of key db.names, a list, \
                 which a variable cannot: set the whole list as an array in APP__DB__NAMES, \
                 e.g. {example}"
            )]
        );
        // A wrong type in the file, or of an entry in the array, is not the variable's form.
        let err = load::<Sample>(Some(&f), "APP", vars(&[("APP__DB__MAX", "[1]")])).unwrap_err();
        assert!(!err.0[0].contains("a list"), "{err}");
        let s: Sample = load(Some(&f), "APP", vars(&[("APP__DB__NAMES", "[p, q]")])).unwrap();
        assert_eq!(s.db.names, ["p", "q"]);
    }

    /// A list of tables overridden by a variable is shown written with inline tables, which
    /// a variable can carry; a list of strings keeps the example above.
    #[test]
    fn a_list_of_tables_overridden_by_a_variable_is_shown_with_inline_tables() {
        let example = "APP___SUBPROCESSORS='[{a = 1, b = \"x\"}, {a = 2, b = \"y\"}]', each \
                       entry an inline table with the keys of a [[_subprocessors]] table";
        let err = load::<Service>(None, "APP", vars(&[("APP___SUBPROCESSORS", "x")])).unwrap_err();
        assert_eq!(
            err.0,
            [format!(
                "environment variable APP___SUBPROCESSORS: key _subprocessors: invalid type: \
                 found string \"x\", expected a sequence; APP___SUBPROCESSORS overrides key \
                 _subprocessors, a list: its value must be the whole list written as an array, \
                 e.g. {example}"
            )]
        );
        let entry = vars(&[("APP___SUBPROCESSORS__0___CONNECTOR__TYPE", "noop")]);
        let err = load::<Service>(None, "APP", entry).unwrap_err();
        assert_eq!(
            err.0,
            [format!(
                "environment variable APP___SUBPROCESSORS__0___CONNECTOR__TYPE: key \
                 _subprocessors: invalid type: found map, expected a sequence; \
                 APP___SUBPROCESSORS__0___CONNECTOR__TYPE sets an entry of key \
                 _subprocessors, a list, which a variable cannot: set the whole list as an \
                 array in APP___SUBPROCESSORS, e.g. {example}"
            )]
        );
        // Written so, it loads.
        let whole = "[{_connector = {type = \"noop\", _delay_ms = 5}}, \
                     {_connector = {type = \"noop\"}}]";
        let s: Service = load(None, "APP", vars(&[("APP___SUBPROCESSORS", whole)])).unwrap();
        assert_eq!(s._subprocessors.len(), 2);
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
    fn a_count_out_of_range_is_named_with_the_range() {
        let mut errors = Vec::new();
        for value in [0, 1, MAX_CONCURRENCY, MAX_CONCURRENCY + 1, u64::MAX] {
            check_count(&mut errors, "a.concurrency", value, 1..=MAX_CONCURRENCY);
        }
        check_at_least_one(&mut errors, "a.max_refusals", 0);
        check_at_least_one(&mut errors, "a.max_refusals", 1);
        assert_eq!(
            errors,
            [
                "a.concurrency: must be from 1 to 65536; it is 0",
                "a.concurrency: must be from 1 to 65536; it is 65537",
                "a.concurrency: must be from 1 to 65536; it is 18446744073709551615",
                "a.max_refusals: must be at least 1; it is 0",
            ]
        );
    }

    #[test]
    fn an_endpoint_must_be_one_a_channel_can_call() {
        let mut errors = Vec::new();
        for fine in [
            "https://registry.example:50051",
            "https://registry.example",
            "https://127.0.0.1:1",
            "https://[::1]:1",
        ] {
            check_endpoint(&mut errors, "e", fine);
        }
        assert_eq!(errors, Vec::<String>::new());
        for bad in [
            "https://",
            "https://bad host:x",
            "https://h:x",
            "http://h:1",
            "h:1",
            "",
        ] {
            check_endpoint(&mut errors, "e", bad);
        }
        assert_eq!(errors.len(), 6, "{errors:?}");
        assert_eq!(
            errors[1],
            "e: \"https://bad host:x\" must be https://host:port"
        );
    }

    #[test]
    fn a_missing_key_is_named() {
        let err = load::<Sample>(None, "APP", vars(&[("APP__LISTEN", "x")])).unwrap_err();
        assert_eq!(err.0, ["missing field `db`"], "{err}");
    }
}
