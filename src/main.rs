//! `amb`: the command-line entry point. It parses arguments, sets up logging, and hands over
//! to the engine; all logic lives in the `crates/` libraries.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    cli::init_tracing(args.log_format);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
