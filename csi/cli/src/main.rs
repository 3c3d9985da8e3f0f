//! `zebu`: the Zebu command line. See [`zebu_cli`].

use std::process::ExitCode;

use clap::Parser;
use zebu_cli::{self as cli, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zebu: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zebu: {e:#}");
            ExitCode::FAILURE
        }
    }
}
