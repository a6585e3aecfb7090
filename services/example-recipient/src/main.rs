//! `dsrelay-example-recipient`: runs the example transfer recipient from a configuration file
//! and environment overrides.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dsrelay_example_recipient::{App, Config};

/// An example transfer recipient for dsrelay: writes what it receives to a folder.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); `DSRELAY_RECIPIENT__*` variables override it.
    #[arg(long, short, env = "DSRELAY_RECIPIENT_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    dsrelay_runtime::host::main(
        "dsrelay-example-recipient",
        args.config.as_deref(),
        Config::load,
        |config| async move { App::build(config) },
        |app, listener, shutdown| app.run(listener, shutdown),
    )
}
