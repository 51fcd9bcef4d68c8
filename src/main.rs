use std::process::ExitCode;

use clap::Parser;
use fencegate::cli::Cli;

/// mimalloc instead of glibc's allocator: the data plane allocates and frees a few small buffers
/// per request, and every resident resource is a few small allocations; mimalloc is faster at the
/// first and has no per-allocation header for the second (see bench/results/run.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    Cli::parse().run()
}
