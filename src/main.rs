//! `amb`: the command-line entry point. It parses arguments, sets up logging, and hands over
//! to the engine; all logic lives in the `crates/` libraries.

mod cli;
mod reconfigure;

use std::process::ExitCode;

/// Keeps glibc's malloc from handing freed relay and HTTP/2 frame buffers back to the kernel
/// only to fault them in again: 12–15% of a TLS receiver's samples were page faults. With
/// freed memory kept up to 8 MiB per arena and buffers below 1 MiB taken from the heap, amb-tls
/// bulk throughput went from ~7 to ~10 Gb/s with idle memory per connection unchanged (see
/// BENCHMARKS.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; it is called first in main, before any
    // other thread exists, and a rejected value leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let (args, matches) = cli::parse();
    let log = cli::init_tracing(args.log_format);
    let ran = cli::run(args, &matches);
    // Every queued log line out before the final error.
    drop(log);
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("amb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
