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
    /// Bill the seeded subscriber Erik Lindqvist an invoice and a VAT One-Stop Shop record
    /// at start (unless he has billing records or is gone), so that erasing him shows data
    /// kept in stages. For trying the adapter out: the seed itself bills nobody.
    #[arg(long)]
    demo_billing: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    dsrelay_runtime::host::main(
        "dsrelay-example-adapter",
        args.config.as_deref(),
        Config::load,
        |config| async move {
            let app = App::build(config).await?;
            if args.demo_billing {
                let added = app
                    .store()
                    .bill_seeded_subscriber(dsrelay_runtime::store::now_ms())
                    .await?;
                tracing::info!(added, "billing records of the seeded paid subscriber");
            }
            Ok(app)
        },
        |app, listener, shutdown| app.run(listener, shutdown),
    )
}
