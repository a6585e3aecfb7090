//! `dsrelay-example-adapter`: runs the example newsletter adapter from a configuration file and
//! environment overrides.

use std::path::PathBuf;

use clap::Parser;
use dsrelay_example_adapter::{App, Config};
use dsrelay_runtime::config::EXIT_USAGE;

/// An example subprocessor adapter (a newsletter service) for dsrelay.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); `DSRELAY_ADAPTER__*` variables override it.
    #[arg(long, short, env = "DSRELAY_ADAPTER_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let telemetry = dsrelay_runtime::telemetry::init(config.log_json, "dsrelay-example-adapter");
    let result = run(config).await;
    telemetry.shutdown().await;
    if let Err(e) = result {
        tracing::error!(error = format!("{e:#}"), "adapter failed");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = dsrelay_runtime::listen::bind(&config.listen).await?;
    let app = App::build(config).await?;
    app.run(listener, dsrelay_runtime::shutdown_signal()).await
}
