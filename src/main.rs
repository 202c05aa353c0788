use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = taskd::cli::Cli::parse();
    taskd::cli::run(cli)
}
