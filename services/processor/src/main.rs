//! `dsrelay-processor`: runs the processor from a configuration file and environment overrides.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dsrelay_processor::{App, Config};

/// The processor-side service of dsrelay.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); `DSRELAY_PROCESSOR__*` variables override it.
    #[arg(long, short, env = "DSRELAY_PROCESSOR_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    dsrelay_runtime::host::main(
        "dsrelay-processor",
        args.config.as_deref(),
        Config::load,
        App::build,
        |app, listener, shutdown| app.run(listener, shutdown),
    )
}
