//! `tenantryctl`: parses the command line, runs the command, and turns any failure into one
//! `error: ...` line and exit code 1 (clap exits with 2 on usage errors).

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = tenantryctl::cli::Cli::parse();
    // Only `main` reads the environment beyond clap: to find the default session file.
    let xdg_config_home = std::env::var_os("XDG_CONFIG_HOME").map(Into::into);
    let home = std::env::var_os("HOME").map(Into::into);
    match tenantryctl::run(cli, xdg_config_home, home).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
