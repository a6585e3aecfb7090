//! `dsrelay-example-adapter`: runs the example newsletter adapter from a configuration file and
//! environment overrides.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dsrelay_example_adapter::{App, Config};

/// An example subprocessor adapter (a newsletter service) for dsrelay.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); `DSRELAY_ADAPTER__*` variables override it.
    #[arg(long, short, env = "DSRELAY_ADAPTER_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    dsrelay_runtime::host::main(
        "dsrelay-example-adapter",
        args.config.as_deref(),
        Config::load,
        |config, listener, shutdown| async move {
            App::build(config).await?.run(listener, shutdown).await
        },
    )
}
