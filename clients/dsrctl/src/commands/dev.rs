//! `dsrctl dev up`: the whole pair on the embedded default, in this process.
//!
//! On first start it writes the development PKI, the sample accounting database and the
//! configuration files into the folder: `registry.toml` and `processor.toml`, which it runs;
//! `recipient.toml`, for `dsrelay-example-recipient --config`; `dsrctl.toml`, for
//! `dsrctl --config` from anywhere (the operator's certificate). Later starts reuse them, so
//! edits stick. Environment overrides (`DSRELAY_REGISTRY__*`, `DSRELAY_PROCESSOR__*`) apply as
//! for the service binaries. Once both services listen it prints commands to try, with the
//! flags they need to reach this pair from the working directory, started as this dsrctl
//! was ([`Programs`]). Once `dsrctl pki revoke` wrote the PKI's revocation list, both
//! services check it from their next start.

use std::ffi::OsStr;
use std::path::Path;

use anyhow::{Context, Result};
use dsrelay_connectors::noop::NoopAnswer;
use dsrelay_connectors::sql::{create_sample_accounting_db, sample_config};
use dsrelay_processor::config::{
    ConnectorConfig, ControllerConfig, NoopConfig, SubprocessorConfig, TransferMechanismConfig,
};
use dsrelay_registry::config::{AuditConfig, IdentityRole, ProcessorConfig, RecipientConfig, Role};
use dsrelay_runtime::pki::{dev_identity, DevPki};
use dsrelay_runtime::settings::ServiceSettings;

use crate::cli::{DevUpArgs, OutputFormat};
use crate::commands::hint::shell_word;
use crate::commands::Io;
use crate::settings::{Environment, DEFAULT_ENDPOINT, DEV_PKI_DIR};
use crate::Failure;

/// The processor's name at the registry in the development setup.
const PROCESSOR: &str = "payroll-bureau";
/// The transfer recipient of the development setup: `dsrctl submit --kind transfer
/// --recipient example-recipient` is accepted.
const RECIPIENT: &str = "example-recipient";

fn registry_config(dir: &Path, port: u16, processor_port: u16) -> dsrelay_registry::Config {
    let identity = |role: &str, name: &str, r: Role| IdentityRole {
        identity: dev_identity(role, name),
        role: r,
        name: name.into(),
    };
    dsrelay_registry::Config {
        service: ServiceSettings::new(
            format!("127.0.0.1:{port}"),
            format!("sqlite://{}/registry.db", dir.display()),
            DevPki {
                dir: dir.join("pki"),
            }
            .files("registry"),
        ),
        identities: vec![
            identity("partner", "crm", Role::Partner),
            identity("partner", "webform", Role::Partner),
            identity("operator", "ops", Role::Operator),
        ],
        processors: vec![ProcessorConfig {
            name: PROCESSOR.into(),
            endpoint: format!("https://localhost:{processor_port}"),
            identity: dev_identity("processor", PROCESSOR),
            categories: vec!["contact".into(), "invoicing".into(), "marketing".into()],
            // Checks the deletion certificates the processor signs with its key below.
            public_key: Some(
                DevPki {
                    dir: dir.join("pki"),
                }
                .signing_public_key("processor")
                .display()
                .to_string(),
            ),
            previous_public_keys: Vec::new(),
            revoked_public_keys: Vec::new(),
        }],
        recipients: vec![RecipientConfig {
            name: RECIPIENT.into(),
            endpoint: format!("https://localhost:{}", recipient_port(processor_port)),
            identity: dev_identity("recipient", "example"),
            description: "an example: the processor sends transfers here, where \
                          dsrelay-example-recipient listens with the recipient.toml dsrctl dev \
                          up wrote beside this file; while nothing listens, transfers wait and \
                          are retried until their due date"
                .into(),
            // Checks the receipts the recipient signs with the key its recipient.toml names.
            public_key: Some(
                DevPki {
                    dir: dir.join("pki"),
                }
                .signing_public_key("recipient")
                .display()
                .to_string(),
            ),
            previous_public_keys: Vec::new(),
            revoked_public_keys: Vec::new(),
        }],
        delivery: Default::default(),
        reconcile: Default::default(),
        watch: Default::default(),
        submit_quota: Default::default(),
        packages: Default::default(),
        identity_hash_key: random_key(),
        forget_after_days: 30,
        forget_sweep_interval_ms: 60_000,
        package_dir: dir.join("registry-packages"),
        package_ttl_days: 30,
        package_sweep_interval_ms: 60_000,
        contracts: Default::default(),
        // Signed with the registry's key from the development PKI, into a file beside the
        // database.
        audit: AuditConfig {
            checkpoint_key: Some(
                DevPki {
                    dir: dir.join("pki"),
                }
                .signing_key("registry"),
            ),
            checkpoint_file: Some(dir.join("registry-audit-checkpoints.jsonl")),
            ..AuditConfig::default()
        },
    }
}

/// What the mail-marketing subprocessor is, as ListSubprocessors and `dsrctl chain` show it.
const MAIL_MARKETING_DESCRIPTION: &str = "a stand-in for a mail-marketing service (EU-US Data \
     Privacy Framework): it reaches no system, holds no data and answers every task NOT_FOUND";

fn processor_config(dir: &Path, port: u16, registry_port: u16) -> dsrelay_processor::Config {
    dsrelay_processor::Config {
        service: ServiceSettings::new(
            format!("127.0.0.1:{port}"),
            format!("sqlite://{}/processor.db", dir.display()),
            DevPki {
                dir: dir.join("pki"),
            }
            .files("processor"),
        ),
        controllers: vec![ControllerConfig {
            name: "controller".into(),
            identity: dev_identity("registry", "controller"),
            registry_endpoint: format!("https://localhost:{registry_port}"),
        }],
        operators: vec![dev_identity("operator", "ops")],
        data_dir: dir.join("processor-data"),
        subprocessors: vec![
            SubprocessorConfig {
                name: "accounting".into(),
                categories: vec!["contact".into(), "invoicing".into()],
                country: "FI".into(),
                transfer_mechanism: TransferMechanismConfig::None,
                description: "accounting outsourcing".into(),
                connector: ConnectorConfig::Sql(sample_config(&format!(
                    "sqlite://{}/accounting.db",
                    dir.display()
                ))),
            },
            SubprocessorConfig {
                name: "mail-marketing".into(),
                categories: vec!["marketing".into()],
                country: "US".into(),
                transfer_mechanism: TransferMechanismConfig::AdequacyDecision,
                description: MAIL_MARKETING_DESCRIPTION.into(),
                // A partner reads its outcomes: it says it holds nothing, never that it did
                // work no system did (COMPLETED, and for an erasure a signed certificate).
                connector: ConnectorConfig::Noop(NoopConfig {
                    answer: NoopAnswer::NotFound,
                    ..Default::default()
                }),
            },
        ],
        tasks: Default::default(),
        acks: Default::default(),
        uploads: Default::default(),
        contracts: Default::default(),
        signing_key: Some(
            DevPki {
                dir: dir.join("pki"),
            }
            .signing_key("processor"),
        ),
        identity_hash_key: random_key(),
        forget_after_days: 30,
        forget_sweep_interval_ms: 60_000,
        // Signed with the processor's key from the development PKI (the one that signs its
        // deletion certificates), into a file beside the database.
        audit: dsrelay_processor::config::AuditConfig {
            checkpoint_key: Some(
                DevPki {
                    dir: dir.join("pki"),
                }
                .signing_key("processor"),
            ),
            checkpoint_file: Some(dir.join("processor-audit-checkpoints.jsonl")),
            ..Default::default()
        },
    }
}

/// A fresh random key for the keyed identity hashes (256 bits of the system's randomness,
/// as hex), written once into the folder's configuration: each development setup has its
/// own, and none is a constant anyone can read in the source.
fn random_key() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The ports of a new folder's files when `dev up` is given none.
const DEFAULT_REGISTRY_PORT: u16 = 50051;
const DEFAULT_PROCESSOR_PORT: u16 = 50061;

/// How far above the processor's port the example recipient listens (50081 by default).
const RECIPIENT_PORT_OFFSET: u16 = 20;

/// The example recipient's port for a processor on `processor_port`: it moves with the
/// processor, so that a pair started on other ports beside another does not send its
/// transfers to the other's recipient. [`RECIPIENT_PORT_OFFSET`] above it, or as far below
/// when that would pass 65535; 0 for 0, whose port is known only once bound
/// ([`move_endpoints`] then moves it).
fn recipient_port(processor_port: u16) -> u16 {
    match processor_port {
        0 => 0,
        p => (p.checked_add(RECIPIENT_PORT_OFFSET)).unwrap_or(p - RECIPIENT_PORT_OFFSET),
    }
}

/// The port of a listen address such as `127.0.0.1:50051`.
fn port_of(listen: &str) -> Option<u16> {
    listen.rsplit_once(':')?.1.parse().ok()
}

/// `listen` with its port replaced by `port`.
fn with_port(listen: &str, port: u16) -> String {
    let host = listen
        .rsplit_once(':')
        .map_or("127.0.0.1", |(host, _)| host);
    format!("{host}:{port}")
}

/// Points `endpoint` at `https://localhost:{to}` when it is the one `dev up` wrote for a
/// service on port `from` (`https://localhost:` and it); an endpoint edited to point
/// elsewhere stays, and so does every endpoint when `from` is unknown.
fn move_endpoint(endpoint: &mut String, from: Option<u16>, to: u16) {
    if from.is_some_and(|p| *endpoint == format!("https://localhost:{p}")) {
        *endpoint = format!("https://localhost:{to}");
    }
}

/// Applies the ports given on the command line to each service's listen address in the
/// configurations read from the folder, which may have been written with other ports by an
/// earlier start. The endpoints follow once the services are bound ([`move_endpoints`]).
fn apply_listen_ports(
    args: &DevUpArgs,
    registry: &mut dsrelay_registry::Config,
    processor: &mut dsrelay_processor::Config,
) {
    if let Some(port) = args.registry_port {
        registry.service.listen = with_port(&registry.service.listen, port);
    }
    if let Some(port) = args.processor_port {
        processor.service.listen = with_port(&processor.service.listen, port);
    }
}

/// Points each service's endpoint for the other, and the registry's for the example
/// recipient (which moves with the processor, [`recipient_port`]), from the ports of the
/// folder's files (`files`: the registry's, the processor's) to those the services are
/// bound to (`bound`): a port given on the command line, or the system's pick for 0, known
/// only once bound. Only an endpoint `dev up` wrote moves ([`move_endpoint`]).
fn move_endpoints(
    files: [Option<u16>; 2],
    bound: [u16; 2],
    registry: &mut dsrelay_registry::Config,
    processor: &mut dsrelay_processor::Config,
) {
    let ([registry_file, processor_file], [registry_bound, processor_bound]) = (files, bound);
    for c in &mut processor.controllers {
        move_endpoint(&mut c.registry_endpoint, registry_file, registry_bound);
    }
    for p in &mut registry.processors {
        move_endpoint(&mut p.endpoint, processor_file, processor_bound);
    }
    for r in registry
        .recipients
        .iter_mut()
        .filter(|r| r.name == RECIPIENT)
    {
        move_endpoint(
            &mut r.endpoint,
            processor_file.map(recipient_port),
            recipient_port(processor_bound),
        );
    }
}

/// The `listen` the example recipient needs to be reached at `endpoint` (the registry's), when
/// the folder's recipient.toml (`file`, its text) listens on another port: after a start
/// with another `--processor-port` than the one that wrote the files. `None` when they agree,
/// or when either is not one `dev up` wrote (an endpoint on another host, a file without a
/// listen address), which its editor keeps in agreement.
fn recipient_listen_override(file: &str, endpoint: &str) -> Option<String> {
    let port = endpoint
        .strip_prefix("https://localhost:")?
        .parse::<u16>()
        .ok()?;
    let value: toml::Value = toml::from_str(file).ok()?;
    let listen = value.get("listen")?.as_str()?;
    (port_of(listen)? != port).then(|| with_port(listen, port))
}

/// The example recipient's file for a processor on `processor_port`: example.toml with its
/// listen port moved to [`recipient_port`] and the development PKI's signing key for its
/// receipts ([`RECIPIENT_SIGNING`]).
fn recipient_file(processor_port: u16) -> String {
    RECIPIENT_FILE
        .replacen(
            &format!(
                "listen = \"127.0.0.1:{}\"",
                recipient_port(DEFAULT_PROCESSOR_PORT)
            ),
            &format!("listen = \"127.0.0.1:{}\"", recipient_port(processor_port)),
            1,
        )
        .replacen(
            RECIPIENT_SIGNING_AFTER,
            &format!("{RECIPIENT_SIGNING_AFTER}{RECIPIENT_SIGNING}"),
            1,
        )
}

/// The line of example.toml after which [`RECIPIENT_SIGNING`] goes: the last top-level key
/// before its `[tls]` table.
const RECIPIENT_SIGNING_AFTER: &str = "chunk_delay_ms = 0\n";

/// The recipient's `signing_key`, set by `dev up` only: the registry's `[[recipients]]` entry
/// it writes has the public key beside it, and refuses receipts that key does not verify.
const RECIPIENT_SIGNING: &str = "# The development PKI's key for its receipts; the registry's \
     [[recipients]] entry in registry.toml\n# has its public key \
     (pki/recipient-signing.pub.pem) and takes only receipts it signed.\n\
     signing_key = \"pki/recipient-signing.key\"\n";

fn write_if_missing<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let text = toml::to_string(value).context("encoding a configuration")?;
    write_text_if_missing(path, &text)
}

fn write_text_if_missing(path: &Path, text: &str) -> Result<()> {
    if !path.exists() {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The example recipient's file, which names this folder's PKI relative to itself.
const RECIPIENT_FILE: &str = include_str!("../../../../services/example-recipient/example.toml");

/// dsrctl's settings for this folder's pair as the operator; paths relative to the file, as
/// `dsrctl --config` reads them. No endpoint: a start's `--registry-port` may change it.
fn dsrctl_file() -> String {
    let identity = dev_identity("registry", "controller");
    format!(
        "# dsrctl --config FILE: the operator of this folder's development PKI. Written by \
         `dsrctl dev up`.\n\
         ca = \"pki/ca.pem\"\ncert = \"pki/operator.pem\"\nkey = \"pki/operator.key\"\n\
         server_identity = \"{identity}\"\n\
         # Checked once `dsrctl pki revoke` wrote it, as ./{DEV_PKI_DIR} checks its own.\n\
         crl_if_present = \"pki/crl.pem\"\n"
    )
}

/// `cargo run` of dsrctl, for the printed commands.
const CARGO_DSRCTL: &str = "cargo run -q -p dsrctl --";
/// The example recipient's binary, as cargo builds it.
const RECIPIENT_BIN: &str = "dsrelay-example-recipient";
/// `cargo run` of the example recipient.
const CARGO_RECIPIENT: &str = "cargo run -q -p dsrelay-example-recipient --";

/// How the printed commands start dsrctl and the example recipient, each as shell words
/// the arguments follow.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Programs {
    dsrctl: String,
    recipient: String,
}

impl Programs {
    /// The programs for a dsrctl running from `exe` (canonical; `None`: unknown), the
    /// commands being run from `cwd` with `path` as PATH. A dsrctl cargo built under the
    /// target folder of a workspace `cwd` is in: `cargo run` (of the recipient too), which
    /// builds what is missing. Else this very binary: by its name when PATH finds it so,
    /// else by its path; and the recipient beside it, the same way, or `cargo run` when
    /// there is none.
    fn new(exe: Option<&Path>, cwd: &Path, path: Option<&OsStr>) -> Self {
        let cargo = Self {
            dsrctl: CARGO_DSRCTL.into(),
            recipient: CARGO_RECIPIENT.into(),
        };
        let Some(exe) = exe else {
            return Self {
                dsrctl: "dsrctl".into(),
                ..cargo
            };
        };
        let cwd = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_path_buf());
        let in_workspace = cwd
            .ancestors()
            .any(|dir| dir.join("Cargo.toml").is_file() && exe.starts_with(dir.join("target")));
        if in_workspace {
            return cargo;
        }
        let beside = exe.with_file_name(RECIPIENT_BIN);
        Self {
            dsrctl: named_or_path(exe, "dsrctl", path),
            recipient: if beside.is_file() {
                named_or_path(&beside, RECIPIENT_BIN, path)
            } else {
                cargo.recipient
            },
        }
    }
}

/// How commands printed for this process start dsrctl ([`Programs::new`] of this process's
/// binary, folder and PATH).
pub(crate) fn this_dsrctl(cwd: &Path) -> String {
    let exe = std::env::current_exe().and_then(std::fs::canonicalize).ok();
    let path = std::env::var_os("PATH");
    Programs::new(exe.as_deref(), cwd, path.as_deref()).dsrctl
}

/// `name` when PATH (`path`) finds `exe` by it, else `exe`'s path, as one shell word.
fn named_or_path(exe: &Path, name: &str, path: Option<&OsStr>) -> String {
    let on_path = path.is_some_and(|path| {
        std::env::split_paths(path)
            .find(|dir| dir.join(name).is_file())
            .and_then(|dir| std::fs::canonicalize(dir.join(name)).ok())
            .is_some_and(|found| found == exe)
    });
    if on_path {
        name.to_string()
    } else {
        shell_word(&exe.display().to_string())
    }
}

/// What the configuration the services run with names, as the text `up` prints says it:
/// registry.toml and processor.toml may have been edited since `dev up` wrote them.
#[derive(Debug)]
struct Configured {
    /// The registry's partners, by name.
    partners: Vec<String>,
    /// The registry's operators, by name.
    operators: Vec<String>,
    /// The processor's subprocessors, by name, the one on the sample database saying so.
    subprocessors: Vec<String>,
    /// Where the registry sends transfers to [`RECIPIENT`]; `None` when registry.toml lists
    /// no recipient of that name, and a transfer to it is refused.
    recipient: Option<String>,
}

impl Configured {
    /// What `registry` and `processor`, run from the folder `dir`, name.
    fn of(
        dir: &Path,
        registry: &dsrelay_registry::Config,
        processor: &dsrelay_processor::Config,
    ) -> Self {
        let named = |role: Role| {
            (registry.identities.iter())
                .filter(|i| i.role == role)
                .map(|i| i.name.clone())
                .collect()
        };
        let sample = format!("sqlite://{}/accounting.db", dir.display());
        let subprocessors = (processor.subprocessors.iter())
            .map(|s| match &s.connector {
                ConnectorConfig::Sql(sql) if sql.url == sample => {
                    format!(
                        "{} (sample database {}/accounting.db)",
                        s.name,
                        dir.display()
                    )
                }
                _ => s.name.clone(),
            })
            .collect();
        Self {
            partners: named(Role::Partner),
            operators: named(Role::Operator),
            subprocessors,
            recipient: (registry.recipients.iter())
                .find(|r| r.name == RECIPIENT)
                .map(|r| r.endpoint.clone()),
        }
    }
}

/// `names` after `one` or `many` by their count, listed as in a sentence ("a", "a and b",
/// "a, b and c"); `none` when there are none.
fn listed(one: &str, many: &str, none: &str, names: &[String]) -> String {
    match names {
        [] => none.to_string(),
        [name] => format!("{one} {name}"),
        [init @ .., last] => format!("{many} {} and {last}", init.join(", ")),
    }
}

/// What `up` prints once both services listen: commands that work as printed from `cwd`.
/// dsrctl finds the development PKI only in `./.dsrelay/pki` and calls
/// `https://127.0.0.1:50051` unless told otherwise, so each command carries `--config` (the
/// folder's `dsrctl.toml`) when `dir` is elsewhere and `--endpoint` when the registry's port
/// is another; the processor's operator commands (`tasks`, `contracts scheduled`) call
/// `https://127.0.0.1:50061` unless given `--processor`, so they carry it when the
/// processor's port is another. The example recipient's command sets its listen address
/// (`recipient_listen`) when the folder's recipient.toml has another port than the registry
/// sends to. Each command starts as `programs` say. What the services serve (partners,
/// subprocessors, the example recipient) is what `configured` names; with no example
/// recipient in registry.toml no transfer is offered to try.
fn try_text(
    programs: &Programs,
    dir: &Path,
    cwd: &Path,
    registry: &str,
    processor: &str,
    configured: &Configured,
    recipient_listen: Option<&str>,
) -> String {
    let d = dir.display();
    let recipient_env = recipient_listen.map_or_else(String::new, |listen| {
        format!("DSRELAY_RECIPIENT__LISTEN={} ", shell_word(listen))
    });
    // A path in a printed command, as one shell word.
    let path = |name: &str| shell_word(&dir.join(name).display().to_string());
    let finds_pki = std::fs::canonicalize(cwd.join(DEV_PKI_DIR)).ok() == Some(dir.join("pki"));
    let default_port = port_of(DEFAULT_ENDPOINT);
    let mut flags = String::new();
    if !finds_pki {
        flags.push_str(&format!(" --config {}", path("dsrctl.toml")));
    }
    // The processor's commands need no registry endpoint: they call only the processor.
    let mut processor_flags = flags.clone();
    if port_of(registry) != default_port {
        flags.push_str(&format!(" --endpoint {registry}"));
    }
    if port_of(processor) != Some(DEFAULT_PROCESSOR_PORT) {
        processor_flags.push_str(&format!(" --processor {}", shell_word(processor)));
    }
    let whose = if finds_pki {
        format!("dsrctl finds the operator's certificate in ./{DEV_PKI_DIR}")
    } else {
        format!("--config names the operator's certificate in {d}/pki")
    };
    let dsrctl = &programs.dsrctl;
    let transfers = match &configured.recipient {
        Some(endpoint) => format!(
            "Transfers to {RECIPIENT} ({endpoint}) wait until it runs:\n\
             \x20 {recipient_env}{} --config {}\n\
             \x20 {dsrctl} submit --kind transfer --recipient {RECIPIENT} \
             --email maija.meikalainen@example.fi{flags}\n",
            programs.recipient,
            path("recipient.toml"),
        ),
        None => format!(
            "No transfer to try: registry.toml has no [[recipients]] entry named {RECIPIENT}.\n"
        ),
    };
    format!(
        "dsrelay is running on the embedded default (SQLite, development certificates) in {d}\n\
         \x20 registry   {registry}   {}; {}\n\
         \x20 processor  {processor}   {PROCESSOR}: {}\n\
         \n\
         Try, in another terminal from this folder ({whose}):\n\
         \x20 {dsrctl} submit --kind erasure --email maija.meikalainen@example.fi{flags}\n\
         \x20 {dsrctl} watch <request id>{flags}\n\
         \x20 {dsrctl} get <request id>{flags}\n\
         \x20 {dsrctl} list --overdue{flags}\n\
         As a partner: add --cert {} --key {}\n\
         At the processor, as its operator:\n\
         \x20 {dsrctl} tasks list{processor_flags}\n\
         \x20 {dsrctl} contracts scheduled{processor_flags}\n\
         {transfers}\
         Stop with Ctrl-C.",
        listed("partner:", "partners:", "no partners", &configured.partners),
        listed(
            "operator:",
            "operators:",
            "no operators",
            &configured.operators
        ),
        listed(
            "subprocessor",
            "subprocessors",
            "no subprocessors",
            &configured.subprocessors
        ),
        path("pki/partner-crm.pem"),
        path("pki/partner-crm.key"),
    )
}

/// Connection flags given to `dev up`: it runs the services, so none of them applies.
fn refuse_connection_flags(args: &DevUpArgs) -> Result<(), Failure> {
    match args.connection.given().first() {
        Some(flag) => Err(Failure::Usage(format!(
            "dev up takes no {flag}: it runs the services (ports: --registry-port, \
             --processor-port; certificates: the development PKI in --dir); connection flags \
             are for the commands that call them"
        ))),
        None => Ok(()),
    }
}

/// Has both services check the development CA's revocation list once `dsrctl pki revoke`
/// wrote it: the files `dev up` writes name none, as a service refuses to start without a
/// list it names.
fn check_revocation_list(
    dir: &Path,
    registry: &mut dsrelay_registry::Config,
    processor: &mut dsrelay_processor::Config,
) {
    let crl = DevPki {
        dir: dir.join("pki"),
    }
    .crl();
    if !crl.exists() {
        return;
    }
    for tls in [&mut registry.service.tls, &mut processor.service.tls] {
        if !tls.crls.contains(&crl) {
            tls.crls.push(crl.clone());
        }
    }
}

/// Prepares the folder and runs both services until Ctrl-C.
pub(crate) async fn up(
    args: &DevUpArgs,
    env: &Environment,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    refuse_connection_flags(args)?;
    // It prints no result, only notes for a human (and the services' logs) on stderr.
    if io.format != OutputFormat::Table {
        return Err(Failure::Usage(
            "dev up takes no --output: it prints no result to format, only what to try next".into(),
        ));
    }
    let telemetry = dsrelay_runtime::telemetry::init(false, "dsrelay-dev");
    let dir = env.cwd().join(&args.dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating {}", dir.display()))
        .map_err(Failure::Setup)?;
    let dir = dir.canonicalize().map_err(|e| Failure::Setup(e.into()))?;
    let prepare = async {
        DevPki::ensure(&dir.join("pki"))?;
        create_sample_accounting_db(&format!("sqlite://{}/accounting.db", dir.display())).await?;
        let registry_file = dir.join("registry.toml");
        let processor_file = dir.join("processor.toml");
        let registry_port = args.registry_port.unwrap_or(DEFAULT_REGISTRY_PORT);
        let processor_port = args.processor_port.unwrap_or(DEFAULT_PROCESSOR_PORT);
        write_if_missing(
            &registry_file,
            &registry_config(&dir, registry_port, processor_port),
        )?;
        write_if_missing(
            &processor_file,
            &processor_config(&dir, processor_port, registry_port),
        )?;
        write_text_if_missing(&dir.join("dsrctl.toml"), &dsrctl_file())?;
        let mut registry = dsrelay_registry::Config::load(Some(&registry_file))?;
        let mut processor = dsrelay_processor::Config::load(Some(&processor_file))?;
        let file_ports = [
            port_of(&registry.service.listen),
            port_of(&processor.service.listen),
        ];
        apply_listen_ports(args, &mut registry, &mut processor);
        check_revocation_list(&dir, &mut registry, &mut processor);
        anyhow::Ok((registry, processor, file_ports))
    };
    let (mut registry, mut processor, file_ports) = prepare.await.map_err(Failure::Setup)?;
    let registry_listener = tokio::net::TcpListener::bind(&registry.service.listen)
        .await
        .with_context(|| format!("binding the registry to {}", registry.service.listen))
        .map_err(Failure::Setup)?;
    let processor_listener = tokio::net::TcpListener::bind(&processor.service.listen)
        .await
        .with_context(|| format!("binding the processor to {}", processor.service.listen))
        .map_err(Failure::Setup)?;
    // Admin ports (`admin_listen` in the files) are bound here too, so a port in use is
    // reported before anything starts.
    let mut admin = Vec::new();
    for (name, addr) in [
        ("registry", registry.service.admin_listen.clone()),
        ("processor", processor.service.admin_listen.clone()),
    ] {
        let listener = dsrelay_runtime::metrics::bind(addr.as_deref())
            .await
            .with_context(|| format!("the {name}'s admin port"))
            .map_err(Failure::Setup)?;
        admin.push(listener);
    }
    let processor_admin = admin.pop().flatten();
    let registry_admin = admin.pop().flatten();
    // The ports as bound, which the folder's files (or the command line) decided, known
    // only now for port 0. The recipient's file is written now too, so that a new folder's
    // agrees with the registry's endpoint for it.
    let bound = |listener: &tokio::net::TcpListener| {
        listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| Failure::Setup(e.into()))
    };
    let (bound_registry_port, bound_processor_port) =
        (bound(&registry_listener)?, bound(&processor_listener)?);
    let registry_endpoint = format!("https://localhost:{bound_registry_port}");
    let processor_endpoint = format!("https://localhost:{bound_processor_port}");
    move_endpoints(
        file_ports,
        [bound_registry_port, bound_processor_port],
        &mut registry,
        &mut processor,
    );
    let recipient_path = dir.join("recipient.toml");
    write_text_if_missing(&recipient_path, &recipient_file(bound_processor_port))
        .map_err(Failure::Setup)?;
    let recipient_text = std::fs::read_to_string(&recipient_path)
        .with_context(|| format!("reading {}", recipient_path.display()))
        .map_err(Failure::Setup)?;
    let configured = Configured::of(&dir, &registry, &processor);
    let recipient_listen = (configured.recipient.as_deref())
        .and_then(|endpoint| recipient_listen_override(&recipient_text, endpoint));
    let registry_app = dsrelay_registry::App::build(registry)
        .await
        .map_err(Failure::Setup)?;
    let processor_app = dsrelay_processor::App::build(processor)
        .await
        .map_err(Failure::Setup)?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let processor_task = tokio::spawn(processor_app.run_with_admin(
        processor_listener,
        processor_admin,
        stopped(stop_rx.clone()),
    ));
    let registry_task = tokio::spawn(registry_app.run_with_admin(
        registry_listener,
        registry_admin,
        stopped(stop_rx),
    ));

    let exe = std::env::current_exe().and_then(std::fs::canonicalize).ok();
    let path = std::env::var_os("PATH");
    let programs = Programs::new(exe.as_deref(), env.cwd(), path.as_deref());
    let text = try_text(
        &programs,
        &dir,
        env.cwd(),
        &registry_endpoint,
        &processor_endpoint,
        &configured,
        recipient_listen.as_deref(),
    );
    writeln!(io.err, "{text}")?;
    // Either service failing ends the session too, rather than leaving half a pair running.
    let mut registry_task = registry_task;
    let mut processor_task = processor_task;
    let mut registry_result = None;
    let mut processor_result = None;
    tokio::select! {
        _ = dsrelay_runtime::shutdown_signal() => {}
        r = &mut registry_task => registry_result = Some(r),
        p = &mut processor_task => processor_result = Some(p),
    }
    let _ = stop_tx.send(true);
    let registry_result = match registry_result {
        Some(r) => r,
        None => registry_task.await,
    };
    let processor_result = match processor_result {
        Some(p) => p,
        None => processor_task.await,
    };
    telemetry.shutdown().await;
    for (name, result) in [
        ("registry", registry_result),
        ("processor", processor_result),
    ] {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Failure::Setup(e.context(format!("the {name} failed")))),
            Err(e) => {
                return Err(Failure::Setup(anyhow::anyhow!(
                    "the {name} task failed: {e}"
                )))
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The programs of a dsrctl cargo built in the workspace the commands run in.
    fn cargo() -> Programs {
        Programs {
            dsrctl: CARGO_DSRCTL.into(),
            recipient: CARGO_RECIPIENT.into(),
        }
    }

    /// A folder with a space stays one word in each printed command.
    #[test]
    fn printed_paths_are_shell_words() {
        let dir = Path::new("/tmp/my dev");
        let text = try_text(
            &cargo(),
            dir,
            Path::new("/"),
            "https://localhost:1",
            "p",
            &configured(dir, "r"),
            None,
        );
        for path in ["dsrctl.toml", "pki/partner-crm.pem", "recipient.toml"] {
            let quoted = format!(" '/tmp/my dev/{path}'");
            assert!(text.contains(&quoted), "{quoted} in {text}");
        }
        assert_eq!(shell_word("/tmp/a.toml"), "/tmp/a.toml");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }

    /// The printed commands start as this dsrctl was started: cargo's in the workspace they
    /// run in, else this binary by the name PATH finds it by, else by its path.
    #[test]
    fn printed_commands_start_this_dsrctl() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let ws = root.join("a ws");
        std::fs::create_dir_all(ws.join("target/debug")).unwrap();
        std::fs::create_dir_all(ws.join("clients")).unwrap();
        std::fs::write(ws.join("Cargo.toml"), "").unwrap();
        let exe = ws.join("target/debug/dsrctl");
        std::fs::write(&exe, "").unwrap();
        // In the workspace, or a folder of it.
        for cwd in [ws.clone(), ws.join("clients")] {
            assert_eq!(Programs::new(Some(&exe), &cwd, None), cargo(), "{cwd:?}");
        }
        // Elsewhere: its path, as one shell word; no recipient beside it, cargo's.
        let away = root.join("away");
        std::fs::create_dir(&away).unwrap();
        let quoted = format!("'{}'", exe.display());
        let programs = Programs::new(Some(&exe), &away, None);
        assert_eq!(programs.dsrctl, quoted);
        assert_eq!(programs.recipient, CARGO_RECIPIENT);
        let recipient = ws.join("target/debug").join(RECIPIENT_BIN);
        std::fs::write(&recipient, "").unwrap();
        let programs = Programs::new(Some(&exe), &away, None);
        assert_eq!(programs.recipient, format!("'{}'", recipient.display()));
        // Installed where PATH finds it by its name, and only then.
        let bin = root.join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("dsrctl"), "").unwrap();
        let path = std::env::join_paths([root.join("none"), bin.clone()]).unwrap();
        let installed = Programs::new(Some(&bin.join("dsrctl")), &away, Some(&path));
        assert_eq!(installed.dsrctl, "dsrctl");
        assert_eq!(installed.recipient, CARGO_RECIPIENT);
        assert_eq!(Programs::new(Some(&exe), &away, Some(&path)).dsrctl, quoted);
    }

    /// Both services check the PKI's revocation list once `dsrctl pki revoke` wrote it, and
    /// name it once however often started.
    #[test]
    fn both_services_check_the_revocation_list_once_it_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir(dir.join("pki")).unwrap();
        let mut registry = registry_config(dir, 50051, 50061);
        let mut processor = processor_config(dir, 50061, 50051);
        check_revocation_list(dir, &mut registry, &mut processor);
        assert!(registry.service.tls.crls.is_empty());
        assert!(processor.service.tls.crls.is_empty());
        std::fs::write(dir.join("pki/crl.pem"), "").unwrap();
        check_revocation_list(dir, &mut registry, &mut processor);
        check_revocation_list(dir, &mut registry, &mut processor);
        let crl = dir.join("pki/crl.pem");
        for tls in [&registry.service.tls, &processor.service.tls] {
            assert_eq!(tls.crls, std::slice::from_ref(&crl));
        }
    }

    /// Its dsrctl file checks the revocation list once `dsrctl pki revoke` wrote it, as the
    /// default ./.dsrelay/pki does, without being edited.
    #[test]
    fn the_dsrctl_file_checks_the_revocation_list_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        let file = dir.path().join("dsrctl.toml");
        std::fs::write(&file, dsrctl_file()).unwrap();
        let args = crate::cli::ConnectionArgs {
            config: Some(file),
            ..Default::default()
        };
        let env = Environment::new(std::iter::empty::<(&str, &str)>(), "/");
        let settings = crate::settings::resolve(&args, &env).unwrap();
        assert!(settings.tls.crls.is_empty());
        std::fs::write(pki.join("crl.pem"), "").unwrap();
        let settings = crate::settings::resolve(&args, &env).unwrap();
        assert_eq!(settings.tls.crls, [pki.join("crl.pem")]);
    }

    /// What the files `dev up` writes into `dir` name, the registry sending transfers to the
    /// example recipient at `recipient`.
    fn configured(dir: &Path, recipient: &str) -> Configured {
        let mut registry = registry_config(dir, 50051, 50061);
        registry.recipients[0].endpoint = recipient.into();
        Configured::of(dir, &registry, &processor_config(dir, 50061, 50051))
    }

    /// The text says what the files loaded configure, edited as they may be: a third
    /// subprocessor, a partner fewer; with the example recipient taken out of registry.toml it
    /// offers no transfer, which the registry would refuse. Before, it named the subprocessors
    /// and partners `dev up` writes whatever the files said, and printed the transfer command.
    #[test]
    fn the_text_says_what_the_files_configure() {
        let dir = Path::new("/tmp/dsrelay-dev");
        let text = |registry: &dsrelay_registry::Config, processor: &dsrelay_processor::Config| {
            try_text(
                &cargo(),
                dir,
                Path::new("/"),
                "https://localhost:50051",
                "https://localhost:50061",
                &Configured::of(dir, registry, processor),
                None,
            )
        };
        let mut registry = registry_config(dir, 50051, 50061);
        let mut processor = processor_config(dir, 50061, 50051);
        let written = text(&registry, &processor);
        let sample = "accounting (sample database /tmp/dsrelay-dev/accounting.db)";
        assert!(
            written.contains("   partners: crm and webform; operator: ops\n"),
            "{written}"
        );
        assert!(
            written.contains(&format!(
                "   {PROCESSOR}: subprocessors {sample} and mail-marketing\n"
            )),
            "{written}"
        );
        let transfer = "submit --kind transfer --recipient example-recipient";
        assert!(written.contains(transfer), "{written}");

        let mut archive = processor.subprocessors[1].clone();
        archive.name = "crm-archive".into();
        processor.subprocessors.push(archive);
        registry.identities.retain(|i| i.name != "webform");
        registry.recipients.clear();
        let edited = text(&registry, &processor);
        assert!(
            edited.contains("   partner: crm; operator: ops\n"),
            "{edited}"
        );
        assert!(
            edited.contains(&format!(
                "   {PROCESSOR}: subprocessors {sample}, mail-marketing and crm-archive\n"
            )),
            "{edited}"
        );
        assert!(!edited.contains("--kind transfer"), "{edited}");
        assert!(!edited.contains("recipient.toml"), "{edited}");
        assert!(
            edited.contains(
                "\nNo transfer to try: registry.toml has no [[recipients]] entry named \
                 example-recipient.\nStop with Ctrl-C."
            ),
            "{edited}"
        );
    }

    /// The dsrctl commands it prints, as the words dsrctl gets (the placeholder filled in).
    fn printed_commands(text: &str) -> Vec<Vec<String>> {
        let prefix = "cargo run -q -p dsrctl -- ";
        (text.lines())
            .filter_map(|l| l.trim_start().strip_prefix(prefix))
            .map(|c| {
                let c = c.replace("<request id>", "r-1");
                std::iter::once("dsrctl")
                    .chain(c.split_whitespace())
                    .map(String::from)
                    .collect()
            })
            .collect()
    }

    /// With ports other than the defaults, every printed command parses, those that call
    /// the registry name its port, and those that call the processor name its own.
    #[test]
    fn printed_commands_reach_both_services_on_other_ports() {
        use clap::Parser;
        let text = try_text(
            &cargo(),
            Path::new("/tmp/dsrelay-dev"),
            Path::new("/"),
            "https://localhost:6000",
            "https://localhost:6001",
            &configured(Path::new("/tmp/dsrelay-dev"), "https://localhost:50081"),
            None,
        );
        let commands = printed_commands(&text);
        let processor_side = |c: &crate::cli::Command| {
            use crate::cli::{Command, ContractsCommand};
            matches!(
                c,
                Command::Tasks(_) | Command::Contracts(ContractsCommand::Scheduled { .. })
            )
        };
        let mut seen = (0, 0);
        for words in &commands {
            let cli =
                crate::cli::Cli::try_parse_from(words).unwrap_or_else(|e| panic!("{words:?}: {e}"));
            assert_eq!(
                cli.connection.config.as_deref(),
                Some(Path::new("/tmp/dsrelay-dev/dsrctl.toml")),
                "{words:?}"
            );
            if processor_side(&cli.command) {
                seen.1 += 1;
                assert!(
                    (words.windows(2)).any(|w| w == ["--processor", "https://localhost:6001"]),
                    "{words:?}"
                );
            } else {
                seen.0 += 1;
                let endpoint = cli.connection.endpoint.as_deref();
                assert_eq!(endpoint, Some("https://localhost:6000"), "{words:?}");
            }
        }
        assert!(seen.0 > 0 && seen.1 > 0, "{text}");
        let tasks = commands.iter().any(|c| c[1..3] == ["tasks", "list"]);
        let scheduled = commands
            .iter()
            .any(|c| c[1..3] == ["contracts", "scheduled"]);
        assert!(tasks && scheduled, "{text}");
    }

    /// On the default ports the processor's commands need no --processor.
    #[test]
    fn on_the_default_ports_the_processor_commands_carry_no_endpoint() {
        let text = try_text(
            &cargo(),
            Path::new("/tmp/dsrelay-dev"),
            Path::new("/"),
            "https://localhost:50051",
            "https://localhost:50061",
            &configured(Path::new("/tmp/dsrelay-dev"), "https://localhost:50081"),
            None,
        );
        assert!(text.contains("tasks list --config"), "{text}");
        assert!(!text.contains("--processor"), "{text}");
        assert!(!text.contains("--endpoint"), "{text}");
    }

    #[test]
    fn the_registry_file_it_writes_validates_and_names_the_recipient() {
        let dir = Path::new("/tmp/dsrelay-dev");
        let text = toml::to_string(&registry_config(dir, 50051, 50061)).unwrap();
        let config: dsrelay_registry::Config = toml::from_str(&text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.known_recipients(), [RECIPIENT].into());
    }

    fn args(registry_port: Option<u16>, processor_port: Option<u16>) -> DevUpArgs {
        DevUpArgs {
            dir: ".dsrelay".into(),
            registry_port,
            processor_port,
            connection: Default::default(),
        }
    }

    /// What `up` does to the files' configurations for `args`, the services being bound to
    /// `bound` (the registry's, the processor's port).
    fn start(
        args: &DevUpArgs,
        bound: [u16; 2],
        registry: &mut dsrelay_registry::Config,
        processor: &mut dsrelay_processor::Config,
    ) {
        let files = [
            port_of(&registry.service.listen),
            port_of(&processor.service.listen),
        ];
        apply_listen_ports(args, registry, processor);
        move_endpoints(files, bound, registry, processor);
    }

    #[test]
    fn ports_given_on_a_later_start_replace_those_of_the_files() {
        let dir = Path::new("/tmp/dsrelay-dev");
        // The files of an earlier start with the default ports.
        let mut registry = registry_config(dir, 50051, 50061);
        let mut processor = processor_config(dir, 50061, 50051);
        let args = args(Some(6000), Some(6001));
        start(&args, [6000, 6001], &mut registry, &mut processor);
        assert_eq!(registry.service.listen, "127.0.0.1:6000");
        assert_eq!(processor.service.listen, "127.0.0.1:6001");
        assert_eq!(registry.processors[0].endpoint, "https://localhost:6001");
        assert_eq!(
            processor.controllers[0].registry_endpoint,
            "https://localhost:6000"
        );
        assert_eq!(registry.recipients[0].endpoint, "https://localhost:6021");
    }

    /// Port 0: the files say 0, and each endpoint moves to where the system bound the service,
    /// so that the pair reaches itself.
    #[test]
    fn on_port_0_the_endpoints_follow_the_ports_bound() {
        let dir = Path::new("/tmp/dsrelay-dev");
        let mut registry = registry_config(dir, 0, 0);
        let mut processor = processor_config(dir, 0, 0);
        start(
            &args(Some(0), Some(0)),
            [41000, 41001],
            &mut registry,
            &mut processor,
        );
        assert_eq!(registry.service.listen, "127.0.0.1:0");
        assert_eq!(registry.processors[0].endpoint, "https://localhost:41001");
        assert_eq!(
            processor.controllers[0].registry_endpoint,
            "https://localhost:41000"
        );
        assert_eq!(registry.recipients[0].endpoint, "https://localhost:41021");
        // A folder written for port 0, started later without ports: the same.
        let mut registry = registry_config(dir, 0, 0);
        let mut processor = processor_config(dir, 0, 0);
        start(
            &args(None, None),
            [41000, 41001],
            &mut registry,
            &mut processor,
        );
        assert_eq!(registry.processors[0].endpoint, "https://localhost:41001");
    }

    #[test]
    fn without_ports_the_files_decide_and_edited_endpoints_stay() {
        let dir = Path::new("/tmp/dsrelay-dev");
        let mut registry = registry_config(dir, 7000, 7001);
        let mut processor = processor_config(dir, 7001, 7000);
        start(
            &args(None, None),
            [7000, 7001],
            &mut registry,
            &mut processor,
        );
        assert_eq!(registry.service.listen, "127.0.0.1:7000");
        assert_eq!(processor.service.listen, "127.0.0.1:7001");
        assert_eq!(registry.processors[0].endpoint, "https://localhost:7001");
        assert_eq!(registry.recipients[0].endpoint, "https://localhost:7021");
        // An endpoint edited to point elsewhere is left alone when the port changes.
        processor.controllers[0].registry_endpoint = "https://controller.example:443".into();
        registry.recipients[0].endpoint = "https://recipient.example:443".into();
        start(
            &args(Some(6000), Some(6001)),
            [6000, 6001],
            &mut registry,
            &mut processor,
        );
        assert_eq!(registry.service.listen, "127.0.0.1:6000");
        assert_eq!(registry.processors[0].endpoint, "https://localhost:6001");
        assert_eq!(
            processor.controllers[0].registry_endpoint,
            "https://controller.example:443"
        );
        assert_eq!(
            registry.recipients[0].endpoint,
            "https://recipient.example:443"
        );
    }

    /// The port the example recipient listens on in the file `recipient_file` wrote.
    fn listen_port(file: &str) -> u16 {
        let value: toml::Value = toml::from_str(file).unwrap();
        port_of(value["listen"].as_str().unwrap()).unwrap()
    }

    /// A new folder's registry file and recipient file put the example recipient on the same
    /// port, which moves with the processor's: 50081 for the default, 20 above another.
    #[test]
    fn the_recipient_files_agree_and_move_with_the_processor_port() {
        let dir = Path::new("/tmp/dsrelay-dev");
        for (processor, recipient) in [(50061, 50081), (6001, 6021), (65530, 65510)] {
            let registry = registry_config(dir, 6000, processor);
            assert_eq!(
                registry.recipients[0].endpoint,
                format!("https://localhost:{recipient}")
            );
            assert_eq!(listen_port(&recipient_file(processor)), recipient);
        }
        // The default is example.toml with the signing key only.
        assert_eq!(
            recipient_file(DEFAULT_PROCESSOR_PORT),
            RECIPIENT_FILE.replacen(
                RECIPIENT_SIGNING_AFTER,
                &format!("{RECIPIENT_SIGNING_AFTER}{RECIPIENT_SIGNING}"),
                1
            )
        );
    }

    /// The recipient signs its receipts with the development PKI's key, and the registry
    /// entry for it checks them with the public key beside it.
    #[test]
    fn the_recipient_signs_with_the_key_the_registry_checks() {
        let file = recipient_file(DEFAULT_PROCESSOR_PORT);
        assert!(file.contains(RECIPIENT_SIGNING), "{file}");
        let value: toml::Value = toml::from_str(&file).unwrap();
        assert_eq!(
            value["signing_key"].as_str(),
            Some("pki/recipient-signing.key")
        );
        let dir = Path::new("/tmp/dsrelay-dev");
        let registry = registry_config(dir, 50051, 50061);
        let pki = DevPki {
            dir: dir.join("pki"),
        };
        assert_eq!(
            registry.recipients[0].public_key,
            Some(pki.signing_public_key("recipient").display().to_string())
        );
        // recipient.toml lies in `dir`, and its paths are taken from there.
        assert_eq!(
            dir.join(value["signing_key"].as_str().unwrap()),
            pki.signing_key("recipient")
        );
    }

    /// When the folder's recipient.toml listens elsewhere than the registry sends (a later
    /// start on another processor port), the printed command sets the listen address.
    #[test]
    fn the_printed_recipient_command_listens_where_the_registry_sends() {
        let file = recipient_file(6001);
        assert_eq!(
            recipient_listen_override(&file, "https://localhost:7021").as_deref(),
            Some("127.0.0.1:7021")
        );
        assert_eq!(
            recipient_listen_override(&file, "https://localhost:6021"),
            None
        );
        assert_eq!(
            recipient_listen_override(&file, "https://r.example:6021"),
            None
        );
        let text = try_text(
            &cargo(),
            Path::new("/tmp/dsrelay-dev"),
            Path::new("/"),
            "https://localhost:7000",
            "https://localhost:7001",
            &configured(Path::new("/tmp/dsrelay-dev"), "https://localhost:7021"),
            Some("127.0.0.1:7021"),
        );
        let line = "  DSRELAY_RECIPIENT__LISTEN=127.0.0.1:7021 cargo run -q -p \
                    dsrelay-example-recipient -- --config /tmp/dsrelay-dev/recipient.toml";
        assert!(text.lines().any(|l| l == line), "{text}");
        assert!(
            text.contains("example-recipient (https://localhost:7021)"),
            "{text}"
        );
    }

    /// The mail-marketing stand-in, in the file dev up writes, answers NOT_FOUND (holds
    /// nothing) and says it is a stand-in, rather than confirming work no system did.
    #[test]
    fn the_mail_marketing_stand_in_says_it_holds_nothing() {
        let dir = Path::new("/tmp/dsrelay-dev");
        let text = toml::to_string(&processor_config(dir, 50061, 50051)).unwrap();
        let config: dsrelay_processor::Config = toml::from_str(&text).unwrap();
        let mail = (config.subprocessors.iter())
            .find(|s| s.name == "mail-marketing")
            .unwrap();
        match &mail.connector {
            ConnectorConfig::Noop(noop) => assert_eq!(noop.answer, NoopAnswer::NotFound),
            other => panic!("{other:?}"),
        }
        assert!(
            mail.description.starts_with("a stand-in"),
            "{}",
            mail.description
        );
        assert!(
            mail.description.contains("NOT_FOUND"),
            "{}",
            mail.description
        );
    }
}
