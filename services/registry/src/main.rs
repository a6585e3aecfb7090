//! `dsrelay-registry`: runs the registry from a configuration file and environment overrides.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dsrelay_registry::{App, Config};

/// The controller-side registry of dsrelay.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); `DSRELAY_REGISTRY__*` variables override it.
    #[arg(long, short, env = "DSRELAY_REGISTRY_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    dsrelay_runtime::host::main(
        "dsrelay-registry",
        args.config.as_deref(),
        Config::load,
        App::build,
        |app, listener, shutdown| app.run(listener, shutdown),
    )
}
