//! The `dsrctl` binary: parses the command line and hands over to [`dsrctl::run`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    dsrctl::run(dsrctl::Cli::parse())
}
