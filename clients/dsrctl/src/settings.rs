//! Resolving connection settings: flag, then environment, then config file, then defaults.
//!
//! The environment and working directory are passed in as an [`Environment`] rather than read
//! from the process, so the precedence can be tested without mutating global state.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dsrelay_sdk::runtime::pki;
use dsrelay_sdk::runtime::tls::TlsFiles;
use dsrelay_sdk::ConnectionSettings;
use serde::Deserialize;

use crate::cli::ConnectionArgs;

/// The endpoint used when none is given.
pub const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:50051";
/// Where `dsrctl pki init` puts the development PKI, relative to the working directory.
pub const DEV_PKI_DIR: &str = ".dsrelay/pki";
/// The development PKI party whose certificate dsrctl presents.
const DEV_CLIENT_STEM: &str = "operator";

/// Environment variable names, one per setting.
const ENV_ENDPOINT: &str = "DSRCTL_ENDPOINT";
const ENV_CA: &str = "DSRCTL_CA";
const ENV_CERT: &str = "DSRCTL_CERT";
const ENV_KEY: &str = "DSRCTL_KEY";
const ENV_CRL: &str = "DSRCTL_CRL";
const ENV_SERVER_IDENTITY: &str = "DSRCTL_SERVER_IDENTITY";
const ENV_CONFIG: &str = "DSRCTL_CONFIG";
const ENV_NAMES: [&str; 7] = [
    ENV_ENDPOINT,
    ENV_CA,
    ENV_CERT,
    ENV_KEY,
    ENV_CRL,
    ENV_SERVER_IDENTITY,
    ENV_CONFIG,
];

/// The parts of the process environment dsrctl reads: its `DSRCTL_*` variables and the
/// working directory.
#[derive(Debug, Clone)]
pub struct Environment {
    vars: BTreeMap<String, OsString>,
    cwd: PathBuf,
}

impl Environment {
    /// Reads the `DSRCTL_*` variables and the working directory of this process.
    pub fn from_process() -> Result<Self> {
        let vars = ENV_NAMES
            .iter()
            .filter_map(|name| Some((name.to_string(), std::env::var_os(name)?)))
            .collect();
        let cwd = std::env::current_dir().context("reading the working directory")?;
        Ok(Self { vars, cwd })
    }

    /// An environment with exactly these variables and working directory.
    pub fn new<K, V>(vars: impl IntoIterator<Item = (K, V)>, cwd: impl Into<PathBuf>) -> Self
    where
        K: Into<String>,
        V: Into<OsString>,
    {
        Self {
            vars: vars
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            cwd: cwd.into(),
        }
    }

    /// The working directory relative paths are resolved against.
    pub fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// A variable's value; an empty value counts as unset, so `DSRCTL_CA= dsrctl ...` can
    /// switch a variable off for one command.
    fn var_os(&self, name: &str) -> Option<&OsString> {
        self.vars.get(name).filter(|v| !v.is_empty())
    }

    fn var_string(&self, name: &str) -> Result<Option<String>> {
        self.var_os(name)
            .map(|v| {
                v.clone()
                    .into_string()
                    .map_err(|_| anyhow::anyhow!("{name} is not valid UTF-8"))
            })
            .transpose()
    }

    fn var_path(&self, name: &str) -> Option<PathBuf> {
        self.var_os(name).map(|v| self.cwd.join(v))
    }
}

/// The config file: the same keys as the flags, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    endpoint: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    crl: Option<PathBuf>,
    /// A revocation list checked once the file exists, as the development PKI's
    /// `crl.pem` is: `dsrctl pki revoke` writes it later. `crl` names one that must exist.
    crl_if_present: Option<PathBuf>,
    server_identity: Option<String>,
}

impl FileSettings {
    fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let mut file: Self = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        // Paths in a file are meant relative to the file, so it works from any directory.
        let base = path.parent().unwrap_or(Path::new(""));
        let paths = [
            &mut file.ca,
            &mut file.cert,
            &mut file.key,
            &mut file.crl,
            &mut file.crl_if_present,
        ];
        for p in paths.into_iter().flatten() {
            *p = base.join(&*p);
        }
        Ok(file)
    }
}

/// Works out the connection settings from the flags, `env` and the config file it names.
pub fn resolve(args: &ConnectionArgs, env: &Environment) -> Result<ConnectionSettings> {
    let (endpoint, tls, server_identity) = resolve_parts(args, env)?;
    let Some(server_identity) = server_identity else {
        bail!(
            "no server identity: give --server-identity (or DSRCTL_SERVER_IDENTITY, or \
             server_identity in the --config file), the identity the registry's certificate \
             carries, e.g. spiffe://dsrelay.dev/registry/controller; without it any party the \
             CA certified could pose as the registry"
        );
    };
    Ok(ConnectionSettings {
        endpoint,
        tls,
        server_identity,
    })
}

/// The settings for commands that call a processor, never the registry: resolved as by
/// [`resolve`], but without insisting on the registry's identity, which the processor
/// connection does not check. `server_identity` is the registry's when given or implied by
/// the development PKI (its value picks the default `--processor-identity`), else empty.
pub fn resolve_for_processor(
    args: &ConnectionArgs,
    env: &Environment,
) -> Result<ConnectionSettings> {
    let (endpoint, tls, server_identity) = resolve_parts(args, env)?;
    Ok(ConnectionSettings {
        endpoint,
        tls,
        server_identity: server_identity.unwrap_or_default(),
    })
}

/// The endpoint, the TLS files and the registry's identity when known.
fn resolve_parts(
    args: &ConnectionArgs,
    env: &Environment,
) -> Result<(String, TlsFiles, Option<String>)> {
    let config_path = args
        .config
        .as_ref()
        .map(|p| env.cwd.join(p))
        .or_else(|| env.var_path(ENV_CONFIG));
    let file = match &config_path {
        Some(path) => FileSettings::load(path)?,
        None => FileSettings::default(),
    };

    let endpoint = first_some([
        args.endpoint.clone(),
        env.var_string(ENV_ENDPOINT)?,
        file.endpoint,
    ])
    .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let mut server_identity = first_some([
        args.server_identity.clone(),
        env.var_string(ENV_SERVER_IDENTITY)?,
        file.server_identity,
    ]);
    let path_flag = |flag: &Option<PathBuf>| flag.as_ref().map(|p| env.cwd.join(p));
    let ca = first_some([path_flag(&args.ca), env.var_path(ENV_CA), file.ca]);
    let cert = first_some([path_flag(&args.cert), env.var_path(ENV_CERT), file.cert]);
    let key = first_some([path_flag(&args.key), env.var_path(ENV_KEY), file.key]);
    let crl = first_some([
        path_flag(&args.crl),
        env.var_path(ENV_CRL),
        file.crl,
        file.crl_if_present.filter(|p| p.exists()),
    ]);

    let dev = pki::DevPki {
        dir: env.cwd.join(DEV_PKI_DIR),
    };
    // A party of the development PKI: the operator when no TLS file is given anywhere, or
    // another party (a partner, as `dev up` suggests) whose certificate comes from the PKI's
    // folder without a CA, with its key (by default the `.key` beside it).
    let dev_party = match (&ca, &cert, &key) {
        (None, None, None) => {
            if !dev.cert(DEV_CLIENT_STEM).exists() {
                bail!(
                    "no client certificate: give --ca, --cert and --key (or DSRCTL_CA, \
                     DSRCTL_CERT, DSRCTL_KEY, or a --config file), or run `dsrctl pki init` \
                     here for a development PKI"
                );
            }
            Some(dev.files(DEV_CLIENT_STEM))
        }
        (None, Some(cert), key) if in_folder(cert, &dev.dir) => {
            let key = key.clone().unwrap_or_else(|| cert.with_extension("key"));
            Some(TlsFiles::new(dev.ca(), cert.clone(), key))
        }
        _ => None,
    };
    let mut tls = match (dev_party, ca, cert, key) {
        (Some(mut files), ..) => {
            // The development registry certificate is known, so check it rather than trust
            // any certificate the dev CA signed (the processor's, say).
            server_identity.get_or_insert_with(|| pki::dev_identity("registry", "controller"));
            if dev.crl().exists() {
                files.crls = vec![dev.crl()];
            }
            files
        }
        (None, Some(ca), Some(cert), Some(key)) => TlsFiles::new(ca, cert, key),
        (None, ca, cert, key) => {
            let missing: Vec<&str> = [
                ("ca", ca.is_none()),
                ("cert", cert.is_none()),
                ("key", key.is_none()),
            ]
            .into_iter()
            .filter_map(|(name, missing)| missing.then_some(name))
            .collect();
            let hint = if ca.is_some() {
                // Only without a ca is a certificate of the development PKI taken with the
                // key beside it.
                format!(
                    "give all of ca, cert and key; with ca given, a certificate of the \
                     development PKI in ./{DEV_PKI_DIR} needs its key too, which without ca \
                     is the .key beside it"
                )
            } else {
                format!(
                    "give all of ca, cert and key; a certificate of the development PKI in \
                     ./{DEV_PKI_DIR} needs only cert; none at all uses that PKI's operator"
                )
            };
            bail!(
                "incomplete TLS settings: {} missing ({hint})",
                missing.join(", ")
            );
        }
    };
    if let Some(crl) = crl {
        tls.crls = vec![crl];
    }
    Ok((endpoint, tls, server_identity))
}

/// Whether `file` is in `folder`, as the file system resolves both (`folder` must exist; the
/// file itself need not).
fn in_folder(file: &Path, folder: &Path) -> bool {
    match (
        file.parent().map(std::fs::canonicalize),
        std::fs::canonicalize(folder),
    ) {
        (Some(Ok(parent)), Ok(folder)) => parent == folder,
        _ => false,
    }
}

fn first_some<T, const N: usize>(candidates: [Option<T>; N]) -> Option<T> {
    candidates.into_iter().flatten().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ConnectionArgs {
        ConnectionArgs::default()
    }

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("dsrctl.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const FULL_FILE: &str = "endpoint = \"https://file:1\"\nca = \"f-ca.pem\"\ncert = \"f.pem\"\n\
                             key = \"f.key\"\nserver_identity = \"spiffe://file\"\n";

    #[test]
    fn flags_beat_env_beat_file() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = write_config(tmp.path(), FULL_FILE);
        let env = Environment::new(
            [
                ("DSRCTL_CONFIG", conf.as_os_str().to_owned()),
                ("DSRCTL_ENDPOINT", "https://env:1".into()),
                ("DSRCTL_CERT", "env.pem".into()),
            ],
            "/work",
        );
        let flags = ConnectionArgs {
            endpoint: Some("https://flag:1".into()),
            ..args()
        };
        let s = resolve(&flags, &env).unwrap();
        assert_eq!(s.endpoint, "https://flag:1");
        assert_eq!(s.tls.cert, Path::new("/work/env.pem"));
        // From the file, relative to the file's folder rather than the working directory.
        assert_eq!(s.tls.ca, tmp.path().join("f-ca.pem"));
        assert_eq!(s.tls.key, tmp.path().join("f.key"));
        assert_eq!(s.server_identity, "spiffe://file");

        let s = resolve(&args(), &env).unwrap();
        assert_eq!(s.endpoint, "https://env:1");
    }

    #[test]
    fn config_flag_beats_config_env_and_empty_env_is_unset() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = write_config(tmp.path(), FULL_FILE);
        let env = Environment::new(
            [
                ("DSRCTL_CONFIG", "/nonexistent.toml"),
                ("DSRCTL_ENDPOINT", ""),
            ],
            "/work",
        );
        let flags = ConnectionArgs {
            config: Some(conf),
            ..args()
        };
        let s = resolve(&flags, &env).unwrap();
        assert_eq!(s.endpoint, "https://file:1");
    }

    #[test]
    fn defaults_and_dev_pki() {
        let tmp = tempfile::tempdir().unwrap();
        let env = Environment::new(Vec::<(String, OsString)>::new(), tmp.path());
        let err = resolve(&args(), &env).unwrap_err();
        assert!(err.to_string().contains("pki init"), "{err}");

        let dir = tmp.path().join(DEV_PKI_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("operator.pem"), "").unwrap();
        let s = resolve(&args(), &env).unwrap();
        assert_eq!(s.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(s.tls.ca, dir.join("ca.pem"));
        assert_eq!(s.tls.cert, dir.join("operator.pem"));
        assert_eq!(s.tls.key, dir.join("operator.key"));
        assert!(s.tls.crls.is_empty());
        assert_eq!(
            s.server_identity,
            "spiffe://dsrelay.dev/registry/controller"
        );
        // The development CA's revocation list, once written, is checked.
        std::fs::write(dir.join("crl.pem"), "").unwrap();
        assert_eq!(
            resolve(&args(), &env).unwrap().tls.crls,
            [dir.join("crl.pem")]
        );
        let flags = ConnectionArgs {
            crl: Some("mine.pem".into()),
            ..args()
        };
        assert_eq!(
            resolve(&flags, &env).unwrap().tls.crls,
            [tmp.path().join("mine.pem")]
        );

        // Another party's certificate of the same PKI (`dev up` suggests the partner's)
        // gets its CA, revocation list and registry identity; one from elsewhere does not.
        let partner = ConnectionArgs {
            cert: Some(format!("{DEV_PKI_DIR}/partner-crm.pem").into()),
            key: Some(format!("./{DEV_PKI_DIR}/partner-crm.key").into()),
            ..args()
        };
        let s = resolve(&partner, &env).unwrap();
        assert_eq!(s.tls.ca, dir.join("ca.pem"));
        assert_eq!(s.tls.cert, dir.join("partner-crm.pem"));
        assert_eq!(s.tls.crls, [dir.join("crl.pem")]);
        assert_eq!(
            s.server_identity,
            "spiffe://dsrelay.dev/registry/controller"
        );
        // Its key is the one beside it unless given (the folder's path as dsrctl's help
        // spells it).
        let cert_only = ConnectionArgs {
            cert: Some(format!("{DEV_PKI_DIR}/partner-crm.pem").into()),
            ..args()
        };
        let s = resolve(&cert_only, &env).unwrap();
        assert_eq!(s.tls.ca, dir.join("ca.pem"));
        assert_eq!(s.tls.key, dir.join("partner-crm.key"));
        let elsewhere = ConnectionArgs {
            cert: Some("partner-crm.pem".into()),
            key: Some("partner-crm.key".into()),
            ..args()
        };
        let err = resolve(&elsewhere, &env).unwrap_err().to_string();
        assert!(err.contains("ca missing"), "{err}");

        // An explicit identity still wins over the dev default.
        let flags = ConnectionArgs {
            server_identity: Some("spiffe://other".into()),
            ..args()
        };
        let s = resolve(&flags, &env).unwrap();
        assert_eq!(s.server_identity, "spiffe://other");
    }

    /// `crl_if_present` in a file is the development PKI's rule: the list once it exists.
    /// `crl` (or a flag, or the environment) names one that must be there, and wins.
    #[test]
    fn a_file_s_crl_if_present_is_checked_once_it_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = write_config(
            tmp.path(),
            &format!("{FULL_FILE}crl_if_present = \"pki/crl.pem\"\n"),
        );
        let flags = ConnectionArgs {
            config: Some(conf),
            ..args()
        };
        let env = Environment::new(std::iter::empty::<(&str, &str)>(), "/work");
        assert!(resolve(&flags, &env).unwrap().tls.crls.is_empty());
        std::fs::create_dir_all(tmp.path().join("pki")).unwrap();
        std::fs::write(tmp.path().join("pki/crl.pem"), "").unwrap();
        assert_eq!(
            resolve(&flags, &env).unwrap().tls.crls,
            [tmp.path().join("pki/crl.pem")]
        );
        let env = Environment::new([("DSRCTL_CRL", "env-crl.pem")], "/work");
        assert_eq!(
            resolve(&flags, &env).unwrap().tls.crls,
            [Path::new("/work/env-crl.pem")]
        );
        let conf = write_config(
            tmp.path(),
            &format!("{FULL_FILE}crl = \"mine.pem\"\ncrl_if_present = \"pki/crl.pem\"\n"),
        );
        let flags = ConnectionArgs {
            config: Some(conf),
            ..args()
        };
        let env = Environment::new(std::iter::empty::<(&str, &str)>(), "/work");
        assert_eq!(
            resolve(&flags, &env).unwrap().tls.crls,
            [tmp.path().join("mine.pem")]
        );
    }

    #[test]
    fn partial_tls_and_bad_files_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let env = Environment::new([("DSRCTL_CA", "ca.pem")], tmp.path());
        let err = resolve(&args(), &env).unwrap_err().to_string();
        assert!(err.contains("cert, key missing"), "{err}");

        // A dev-PKI cert with a ca given takes no key from beside it: the message says so.
        let with_ca = ConnectionArgs {
            ca: Some("ca.pem".into()),
            cert: Some(format!("{DEV_PKI_DIR}/partner-crm.pem").into()),
            ..args()
        };
        let no_vars = std::iter::empty::<(&str, &str)>();
        let err = resolve(&with_ca, &Environment::new(no_vars, tmp.path()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key missing"), "{err}");
        assert!(!err.contains("needs only cert"), "{err}");
        assert!(err.contains("with ca given"), "{err}");

        // Given TLS files, the registry's identity must be given too.
        let env = Environment::new(
            [
                ("DSRCTL_CA", "ca.pem"),
                ("DSRCTL_CERT", "me.pem"),
                ("DSRCTL_KEY", "me.key"),
            ],
            tmp.path(),
        );
        let err = resolve(&args(), &env).unwrap_err().to_string();
        assert!(err.contains("no server identity"), "{err}");

        let conf = write_config(tmp.path(), "endpont = \"typo\"\n");
        let flags = ConnectionArgs {
            config: Some(conf),
            ..args()
        };
        let err = format!("{:#}", resolve(&flags, &env).unwrap_err());
        assert!(err.contains("endpont"), "{err}");

        let flags = ConnectionArgs {
            config: Some("missing.toml".into()),
            ..args()
        };
        assert!(resolve(&flags, &env).is_err());
    }
}
