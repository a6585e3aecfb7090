//! One module per subcommand; [`dispatch`] picks one.

use std::io::Write;

use dsrelay_sdk::RegistryClient;

use crate::cli::{
    AuditCommand, CertificateCommand, Cli, Command, ContractsCommand, DevCommand, OutputFormat,
    PkiCommand, ReceiptCommand,
};
use crate::settings::{self, Environment};
use crate::Failure;
use dsrelay_sdk::ConnectionSettings;

mod audit;
mod certificate;
mod chain;
mod contracts;
mod deliveries;
mod dev;
mod download;
mod hint;
mod list;
mod pki;
mod receipt;
mod request;
mod submit;
mod tasks;
mod trace;
mod watch;

pub(crate) use hint::Hint;

/// Makes the commands this run's messages suggest start dsrctl as `dev up`'s printed commands
/// do, by name only where PATH finds this binary so (see [`hint::name_program`]).
pub(crate) fn name_hint_program(cwd: &std::path::Path) {
    hint::name_program(dev::this_dsrctl(cwd));
}

/// Where a command writes, and in which format.
pub(crate) struct Io<'a> {
    /// Results.
    pub(crate) out: &'a mut dyn Write,
    /// Notes for a human (never results), so `--output json` stays parseable.
    pub(crate) err: &'a mut dyn Write,
    /// The format of results.
    pub(crate) format: OutputFormat,
}

/// A registry client and the endpoint it calls, for error messages.
pub(crate) struct Registry {
    pub(crate) client: RegistryClient,
    pub(crate) endpoint: String,
    /// For the commands messages suggest: they must reach this registry too.
    pub(crate) hint: Hint,
}

impl Registry {
    /// Resolves the settings and prepares the client; nothing is sent yet.
    fn connect(cli: &Cli, env: &Environment) -> Result<Self, Failure> {
        let settings = settings::resolve(&cli.connection, env).map_err(Failure::Setup)?;
        let client = RegistryClient::connect(&settings).map_err(Failure::Setup)?;
        Ok(Self {
            client,
            endpoint: settings.endpoint,
            hint: Hint::new(&cli.connection),
        })
    }

    /// Wraps a failed call's status. One the SDK made because the registry's answers cannot
    /// be right is not the registry's error answer, whatever its code says.
    pub(crate) fn failed(&self, status: tonic::Status) -> Failure {
        if dsrelay_sdk::is_bad_answer(&status) {
            return Failure::BadAnswer(format!(
                "{} (the registry at {})",
                status.message(),
                self.endpoint
            ));
        }
        Failure::Rpc {
            status,
            endpoint: self.endpoint.clone(),
            server: "registry",
        }
    }
}

/// The exit status `code` of a command whose printed result carries it, once `printed`:
/// a reader that went away (`dsrctl audit verify | true`) makes the print moot, but must
/// not turn a failure into success, as a broken pipe otherwise does.
pub(crate) fn verdict(printed: std::io::Result<()>, code: u8) -> Result<u8, Failure> {
    match printed {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::Output(err)),
        _ => Ok(code),
    }
}

/// Runs the subcommand; returns the exit status.
pub(crate) async fn dispatch(cli: &Cli, env: &Environment, io: &mut Io<'_>) -> Result<u8, Failure> {
    match &cli.command {
        // Needs no registry, so must not fail on missing connection settings.
        Command::Pki(PkiCommand::Init(args)) => pki::init(args, env, io),
        Command::Pki(PkiCommand::Revoke(args)) => pki::revoke(args, env, io),
        Command::Dev(DevCommand::Up(args)) => dev::up(args, env, io).await,
        // Offline: needs no registry.
        Command::Certificate(CertificateCommand::Verify(args)) => {
            certificate::verify(args, cli.connection.key.as_deref(), io)
        }
        Command::Certificate(CertificateCommand::Get(args)) => {
            certificate::get(&Registry::connect(cli, env)?, args, io).await
        }
        Command::Certificate(CertificateCommand::List(args)) => {
            certificate::list(&Registry::connect(cli, env)?, args, io).await
        }
        // Offline: needs no registry.
        Command::Receipt(ReceiptCommand::Verify(args)) => {
            receipt::verify(args, cli.connection.key.as_deref(), io)
        }
        Command::Receipt(ReceiptCommand::Get(args)) => {
            receipt::get(&Registry::connect(cli, env)?, args, io).await
        }
        Command::Chain(args) => chain::run(&Registry::connect(cli, env)?, args, io).await,
        Command::Trace(args) => trace::run(&Registry::connect(cli, env)?, args, io).await,
        Command::Audit(AuditCommand::Verify(args)) => {
            audit::verify(&mut audit::Trail::connect(cli, env, &args.trail)?, args, io).await
        }
        Command::Audit(AuditCommand::Checkpoints(args)) => {
            let trail = &mut audit::Trail::connect(cli, env, &args.trail)?;
            audit::checkpoints(trail, args, io).await
        }
        Command::Audit(AuditCommand::List(args)) => {
            audit::list(&mut audit::Trail::connect(cli, env, &args.trail)?, args, io).await
        }
        Command::Tasks(cmd) => {
            // Only the TLS files: the registry's identity is not needed to reach a processor.
            let settings: ConnectionSettings =
                settings::resolve_for_processor(&cli.connection, env).map_err(Failure::Setup)?;
            tasks::run(cmd, &settings, io).await
        }
        Command::Contracts(cmd @ ContractsCommand::Scheduled { .. }) => {
            // Only the TLS files: the registry's identity is not needed to reach a processor.
            let settings: ConnectionSettings =
                settings::resolve_for_processor(&cli.connection, env).map_err(Failure::Setup)?;
            contracts::scheduled(cmd, &settings, io).await
        }
        Command::Contracts(cmd) => contracts::run(&Registry::connect(cli, env)?, cmd, io).await,
        Command::Submit(args) => {
            let prepared = submit::prepare(args)?;
            submit::run(&Registry::connect(cli, env)?, prepared, io).await
        }
        Command::Package(args) => download::package(&Registry::connect(cli, env)?, args, io).await,
        Command::Download(args) => {
            // Checked before connecting: a destination that would mix with other files is
            // refused without asking anything of the registry.
            let target = download::Target::check(args)?;
            download::run(&Registry::connect(cli, env)?, args, target, io).await
        }
        Command::Get(args) => request::get(&Registry::connect(cli, env)?, args, io).await,
        Command::List(args) => list::run(&Registry::connect(cli, env)?, args, io).await,
        Command::Watch(args) => watch::run(&Registry::connect(cli, env)?, args, io).await,
        Command::Cancel(args) => request::cancel(&Registry::connect(cli, env)?, args, io).await,
        Command::Extend(args) => request::extend(&Registry::connect(cli, env)?, args, io).await,
        Command::Deliveries(cmd) => deliveries::run(&Registry::connect(cli, env)?, cmd, io).await,
    }
}
