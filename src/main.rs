//! The `oxwsgi` command: parse options, load the app, bind, serve until SIGINT/SIGTERM.

use std::fmt::Display;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use oxwsgi::config::{Cli, Config};
use oxwsgi::{server, wsgi};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match Config::try_from(Cli::parse()) {
        Ok(config) => config,
        Err(err) => return fail(err),
    };
    init_logging();
    let app = match wsgi::load(&config.app) {
        Ok(app) => app,
        Err(err) => return fail(err),
    };
    let pool = match wsgi::start(app, config.pool) {
        Ok(pool) => Arc::new(pool),
        Err(err) => return fail(err),
    };
    let mut sockets = Vec::with_capacity(config.sockets.len());
    for spec in &config.sockets {
        match server::bind(spec, &config.server) {
            Ok(socket) => sockets.push(socket),
            Err(err) => return fail(format!("cannot listen on {spec}: {err}")),
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(format!("cannot start the I/O runtime: {err}")),
    };
    if let Err(err) = runtime.block_on(server::run(sockets, config.server, pool, shutdown_signal())) {
        return fail(err);
    }
    ExitCode::SUCCESS
}

fn fail(err: impl Display) -> ExitCode {
    eprintln!("oxwsgi: error: {err}");
    ExitCode::FAILURE
}

/// `OXWSGI_LOG` takes tracing's filter syntax (e.g. `debug`, `info,oxwsgi::access=off`).
fn init_logging() {
    let filter = EnvFilter::try_from_env("OXWSGI_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}
