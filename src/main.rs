//! The `oxwsgi` command; everything it does is [`oxwsgi::cli::run`].

use std::process::ExitCode;

fn main() -> ExitCode {
    oxwsgi::cli::run(std::env::args_os())
}
