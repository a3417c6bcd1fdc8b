//! `amb`: the command-line entry point. It parses arguments, sets up logging, and hands over
//! to the engine; all logic lives in the `crates/` libraries.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// With `--features mimalloc`: freed pages stay with the process for reuse, where glibc returns
/// large relay buffers to the kernel and pays page faults to get them back.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
