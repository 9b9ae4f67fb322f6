//! The `wattn` command: a thin layer over the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = wattn::cli::Cli::parse();
    match wattn::cli::dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wattn: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
