use clap::Parser;

/// mimalloc rather than the system allocator: the proxy's request path spends a measurable share
/// of its user time in glibc malloc/free (perf), and mimalloc's per-thread heaps suit the
/// thread-per-core layout. See README "Benchmarks".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = taskd::cli::Cli::parse();
    taskd::cli::run(cli)
}
