//! The `oxwsgi` command: parse options, load the app, bind, serve until SIGINT/SIGTERM.

use std::fmt::Display;
use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use oxwsgi::config::{Cli, Config};
use oxwsgi::{master, server, wsgi};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// After the connections are done, how long the Python threads get to finish what follows the response —
/// the iterables' `close()`, where Flask and Django run their teardown hooks — before the process exits.
const POOL_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let mut config = match Config::try_from(Cli::parse()) {
        Ok(config) => config,
        Err(err) => return fail(err),
    };
    init_logging();
    let inherited = master::Inherited::from_env();
    if inherited.is_none() && config.processes.master {
        return match master::run(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(err),
        };
    }
    if let Some(inherited) = &inherited {
        // The master bound the sockets and removes their files; it also replaces this worker when asked.
        config.server.vacuum = false;
        config.server.max_requests = inherited.max_requests(&config.processes.recycle);
    }
    serve(&config, inherited)
}

/// One serving process: on its own, or as a worker of a master (`inherited`).
fn serve(config: &Config, inherited: Option<master::Inherited>) -> ExitCode {
    let app = match wsgi::load(&config.app) {
        Ok(app) => app,
        Err(err) => return fail(err),
    };
    let control = inherited.map(|inherited| Arc::new(inherited.control()));
    let on_harakiri: Box<dyn FnOnce() + Send> = match control.clone() {
        Some(control) => Box::new(move || control.harakiri()),
        None => Box::new(|| tracing::error!("no master to replace this process: it stops")),
    };
    let pool = match wsgi::start(app, config.pool, on_harakiri) {
        Ok(pool) => Arc::new(pool),
        Err(err) => return fail(err),
    };
    let sockets = match inherited.map_or_else(|| bind_all(config), |inherited| inherited.sockets(config)) {
        Ok(sockets) => sockets,
        Err(err) => return fail(err),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(format!("cannot start the I/O runtime: {err}")),
    };
    let handler = Arc::clone(&pool);
    let ready = || control.as_ref().map_or((), |control| control.ready());
    let retire = {
        let control = control.clone();
        move || control.map_or((), |control| control.max_requests_reached())
    };
    let served = runtime.block_on(async {
        server::run(sockets, config.server, handler, shutdown_signal(), ready, retire).await
    });
    if let Err(err) = served {
        return fail(err);
    }
    if !pool.shutdown(POOL_SHUTDOWN_GRACE) {
        tracing::warn!(
            "Python threads still busy after {POOL_SHUTDOWN_GRACE:?}; exiting without atexit handlers"
        );
    }
    ExitCode::SUCCESS
}

/// Binds every `--socket`, for a process without a master.
fn bind_all(config: &Config) -> std::io::Result<Vec<server::BoundSocket>> {
    let bind = |spec| {
        server::bind(spec, &config.server)
            .map_err(|err| std::io::Error::new(err.kind(), format!("cannot listen on {spec}: {err}")))
    };
    config.sockets.iter().map(bind).collect()
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

/// Installs the handlers now (inside the runtime) and resolves on the first SIGTERM or SIGINT. A second one
/// stops at once, as with gunicorn and uWSGI, for an operator who does not want to wait for the drain.
fn shutdown_signal() -> impl Future<Output = ()> {
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut terminate), Ok(mut interrupt)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return std::future::pending().await;
        };
        tracing::info!("{} received", next_signal(&mut terminate, &mut interrupt).await);
        tokio::spawn(async move {
            let signal = next_signal(&mut terminate, &mut interrupt).await;
            tracing::warn!("{signal} received again: stopping now, without waiting for in-flight requests");
            std::process::exit(1);
        });
    }
}

async fn next_signal(terminate: &mut Signal, interrupt: &mut Signal) -> &'static str {
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}
