//! `dsrctl`: the command-line client for dsrelay partners and operators.
//!
//! `main` only parses the command line; [`run`] does the rest, and [`execute`] is the same
//! with the environment and output streams passed in, for tests.
//!
//! # Layout
//! - [`cli`]: the clap definitions: global connection flags and the [`cli::Command`] tree.
//! - [`settings`]: connection settings from flags, environment, config file and defaults.
//! - [`table`]: the aligned plain-text table used by the text output.
//! - `unpack`: writing a downloaded package to a folder or a zip while checking every
//!   file's path, size and SHA-256 against the manifest.
//! - `output`: serde views of the proto messages and their text and JSON rendering.
//! - `commands`: one module per subcommand, and `dispatch` choosing among them.
//!
//! Exit status: 0 on success; 1 for configuration and connection problems, when `watch`
//! sees the request end other than COMPLETED, when `audit verify` finds the trail broken
//! or, asked to check signed checkpoints, finds any that does not verify or none at all,
//! when `download` finds a file that does not match the manifest or cannot write it (or a
//! folder holding the download finished that no longer matches its manifest), when
//! `contracts confirm --package` finds a file of the folder (its manifest.json included)
//! missing or not as its manifest lists it, when `certificate verify` finds a certificate
//! that does not verify (or `certificate get` one the registry rejected), when `receipt
//! verify` finds a transfer receipt unsigned or not verifying (or `receipt get` a task with
//! no signed receipt), and when a server answers something that cannot be right (a listing
//! whose pages do not advance); each of these verdicts holds even when whatever reads the
//! output has gone (`dsrctl audit verify | true`), which otherwise ends a command with 0,
//! but `watch` with 1;
//! 2 for usage errors (clap's own included) and error answers from the registry.

use std::io::Write;
use std::process::ExitCode;

pub mod cli;
mod commands;
mod output;
pub mod settings;
pub mod table;
mod unpack;

pub use cli::Cli;
pub use settings::Environment;

use dsrelay_sdk::status::refused_certificate_hint;
use dsrelay_sdk::{closed_by_peer, code_name, is_connection_error, is_explained, timed_out};

/// Exit status of a command that ran but whose outcome was not the hoped-for one (`watch`
/// of a request that FAILED, `audit verify` of a broken trail), and of configuration and
/// connection problems.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of usage errors and error answers from the registry; clap uses it too.
pub const EXIT_USAGE_OR_RPC: u8 = 2;

/// Why a command could not do its work.
#[derive(Debug)]
pub enum Failure {
    /// Arguments that parse but do not fit together.
    Usage(String),
    /// Bad configuration, unreadable files, a PKI that cannot be written.
    Setup(anyhow::Error),
    /// A call failed: an error answer from the registry, or no connection to it.
    Rpc {
        /// The status of the call.
        status: tonic::Status,
        /// The endpoint called, for the message when it could not be reached.
        endpoint: String,
        /// What is there: "registry" or "processor".
        server: &'static str,
    },
    /// Writing the output failed.
    Output(std::io::Error),
    /// A downloaded package could not be written, the registry sent one that cannot be
    /// unpacked (an unsafe path, chunks out of manifest order), or a folder given as a
    /// downloaded package does not hold the files its manifest lists.
    Package(anyhow::Error),
    /// A deletion certificate that does not verify, was rejected by the registry, or
    /// cannot be read or written.
    Certificate(anyhow::Error),
    /// A transfer receipt that is unsigned or does not verify, a task with no signed
    /// receipt to fetch, or a receipt file that cannot be read or written.
    Receipt(anyhow::Error),
    /// A server answered something that cannot be right, such as a listing whose next page
    /// does not start past the one before.
    BadAnswer(String),
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Self {
        Self::Output(err)
    }
}

impl Failure {
    /// The exit status this failure ends the process with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE_OR_RPC,
            // A call past its own deadline got no answer, error or other: as a connection
            // problem, 1.
            Self::Rpc { status, .. } if !is_connection_error(status) && !timed_out(status) => {
                EXIT_USAGE_OR_RPC
            }
            Self::Rpc { .. }
            | Self::Setup(_)
            | Self::Output(_)
            | Self::Package(_)
            | Self::Certificate(_)
            | Self::Receipt(_)
            | Self::BadAnswer(_) => EXIT_FAILURE,
        }
    }

    /// The one-line message for stderr, without the trailing newline.
    pub fn message(&self) -> String {
        let text = match self {
            Self::Usage(msg) => format!("error: {msg}"),
            Self::Setup(err) => format!("error: {err:#}"),
            Self::Rpc {
                status,
                endpoint,
                server,
            } if timed_out(status) => format!(
                "error: {}: the {server} at {endpoint} did not answer within the call's \
                 deadline: it may be busy or waiting on its database, which its log says; a \
                 call that changes something may still take effect, so repeat it rather than \
                 start anew (a submit with the same --idempotency-key)",
                code_name(status.code())
            ),
            Self::Rpc {
                status,
                endpoint,
                server,
            } if is_connection_error(status) => {
                // tonic's own message ("transport error") says little; the causes say why.
                // The SDK's explanation of a refused certificate gives way to the hint below,
                // which names dsrctl's flag; tonic's message is then the first cause.
                let refused = endpoint.starts_with("https://") && closed_by_peer(status);
                let mut causes = Vec::new();
                if !(refused && is_explained(status)) {
                    causes.push(status.message().to_string());
                }
                let mut source = std::error::Error::source(status);
                while let Some(err) = source {
                    let text = err.to_string();
                    if !causes.contains(&text) {
                        causes.push(text);
                    }
                    source = err.source();
                }
                let mut text = format!(
                    "error: {}: cannot reach the {server} at {endpoint}: {}",
                    code_name(status.code()),
                    causes.join(": ")
                );
                if refused {
                    text.push_str("; ");
                    text.push_str(&refused_certificate_hint(
                        server,
                        "the certificate (--cert)",
                    ));
                }
                text
            }
            Self::Rpc { status, .. } => {
                format!("error: {}: {}", code_name(status.code()), status.message())
            }
            Self::Output(err) => format!("error: writing the output: {err}"),
            Self::Package(err) | Self::Certificate(err) | Self::Receipt(err) => {
                format!("error: {err:#}")
            }
            Self::BadAnswer(msg) => format!("error: {msg}"),
        };
        table::clean(&text)
    }
}

/// Runs `cli` in this process's environment, printing to stdout and stderr; the exit status
/// follows the crate documentation.
pub fn run(cli: Cli) -> ExitCode {
    let mut stderr = std::io::stderr();
    let env = match Environment::from_process() {
        Ok(env) => env,
        Err(err) => return report(&Failure::Setup(err), &mut stderr),
    };
    commands::name_hint_program(env.cwd());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return report(&Failure::Setup(err.into()), &mut stderr),
    };
    // Not locked for the whole run: under `dev up` the services log to standard output from
    // threads of their own (SQLite's connection workers, the blocking pool), and a lock this
    // thread held would stop each of them, with what it was doing, at its first line.
    let mut stdout = std::io::stdout();
    let result = runtime.block_on(execute(&cli, &env, &mut stdout, &mut std::io::stderr()));
    match result {
        Ok(code) => ExitCode::from(code),
        // The reader went away (`dsrctl list | head`): not worth a message. Only `watch`
        // reports it, since it never learned how the request ended; the commands whose
        // output carries a failure verdict return that verdict themselves.
        Err(Failure::Output(err)) if err.kind() == std::io::ErrorKind::BrokenPipe => {
            if matches!(cli.command, cli::Command::Watch(_)) {
                ExitCode::from(EXIT_FAILURE)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(failure) => report(&failure, &mut stderr),
    }
}

fn report(failure: &Failure, stderr: &mut dyn Write) -> ExitCode {
    // Nothing sensible is left to do if stderr is gone too.
    let _ = writeln!(stderr, "{}", failure.message());
    ExitCode::from(failure.exit_code())
}

/// Runs `cli` with `env`, writing results to `out` and notes to `err`; returns the exit
/// status on completion.
pub async fn execute(
    cli: &Cli,
    env: &Environment,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, Failure> {
    let mut io = commands::Io {
        out,
        err,
        format: cli.output,
    };
    commands::dispatch(cli, env, &mut io).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(status: tonic::Status) -> Failure {
        Failure::Rpc {
            status,
            endpoint: "https://127.0.0.1:50051".into(),
            server: "registry",
        }
    }

    #[test]
    fn exit_codes_and_messages() {
        let f = rpc(tonic::Status::not_found("request r-1 not found"));
        assert_eq!(f.exit_code(), 2);
        assert_eq!(f.message(), "error: NOT_FOUND: request r-1 not found");
        let f = Failure::Setup(anyhow::anyhow!("bad").context("reading x"));
        assert_eq!(f.exit_code(), 1);
        assert_eq!(f.message(), "error: reading x: bad");
        assert_eq!(Failure::Usage("no".into()).exit_code(), 2);
    }

    /// A client certificate of another development CA: the SDK explains the closed
    /// connection, and dsrctl's message gives its own advice, naming its flag, once.
    #[tokio::test]
    async fn a_refused_certificate_is_explained_once_naming_the_flag() {
        use dsrelay_runtime::pki::{dev_identity, DevCa, DevPki};
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server =
            dsrelay_runtime::server::builder(pki.files("registry").server_config().unwrap())
                .unwrap()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        let server = tokio::spawn(server);
        let rogue = DevCa::generate("dsrelay development CA").unwrap();
        let leaf = rogue
            .issue("dsrelay rogue party", &dev_identity("partner", "crm"))
            .unwrap();
        std::fs::write(dir.path().join("rogue.pem"), leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("rogue.key"), leaf.key_pem).unwrap();
        let endpoint = format!("https://localhost:{port}");
        let client = dsrelay_sdk::RegistryClient::connect(&dsrelay_sdk::ConnectionSettings {
            endpoint: endpoint.clone(),
            tls: dsrelay_runtime::tls::TlsFiles::new(
                pki.ca(),
                dir.path().join("rogue.pem"),
                dir.path().join("rogue.key"),
            ),
            server_identity: dev_identity("registry", "controller"),
        })
        .unwrap();
        let status = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            client.list(Default::default()),
        )
        .await
        .expect("the refusal is prompt")
        .unwrap_err();
        server.abort();
        let failure = Failure::Rpc {
            status,
            endpoint: endpoint.clone(),
            server: "registry",
        };
        let message = failure.message();
        assert_eq!(failure.exit_code(), EXIT_FAILURE, "{message}");
        assert!(
            message.starts_with(&format!(
                "error: UNAVAILABLE: cannot reach the registry at {endpoint}: "
            )),
            "{message}"
        );
        assert_eq!(
            message.matches("refuses this client's certificate").count(),
            1,
            "{message}"
        );
        assert!(message.contains("the certificate (--cert)"), "{message}");
        assert!(!message.contains("tls.cert"), "{message}");
    }

    /// A registry that takes the connection and the call but does not answer in time (one
    /// waiting on its database): the message says so, not that the registry cannot be
    /// reached or that it refused this client's certificate.
    #[tokio::test]
    async fn a_call_past_its_deadline_is_not_blamed_on_the_certificate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::handshake(socket).await.unwrap();
            let mut held = Vec::new();
            while let Some(Ok(call)) = connection.accept().await {
                held.push(call);
            }
        });
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        let client = dsrelay_sdk::RegistryClient::from_channel(channel)
            .with_timeout(Some(std::time::Duration::from_millis(300)));
        let status = client.get("r-1").await.unwrap_err();
        silent.abort();
        let failure = rpc(status);
        assert_eq!(failure.exit_code(), EXIT_FAILURE);
        let message = failure.message();
        assert!(
            message.contains("did not answer within the call's deadline"),
            "{message}"
        );
        assert!(!message.contains("certificate"), "{message}");
        assert!(!message.contains("cannot reach"), "{message}");
    }
}
