//! The `oxwsgi` command: parse options, take the sockets, then either supervise worker processes (the
//! master) or load the app and serve until SIGINT/SIGTERM. In the library, so that every way of starting
//! oxwsgi (the binary, and anything else that hands it a command line) runs the same code.

use std::ffi::OsString;
use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, Config, SocketSpec};
use crate::metrics::Recorder;
use crate::server::{BoundSocket, Front, Protocol};
use crate::{deploy, logging, master, server, wsgi};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// After the connections are done, how long the Python threads get to finish what follows the response —
/// the iterables' `close()`, where Flask and Django run their teardown hooks — before the process exits.
const POOL_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the command with `args` (the program name first, as `std::env::args_os` gives them) until it
/// stops; returns the process's exit status. A master starts its workers by re-executing this binary.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let workers = master::WorkerCommand::this_binary(&args);
    run_with(args, workers)
}

/// [`run`], with a master starting its workers with `workers` (the Python package: its interpreter).
pub fn run_with(args: Vec<OsString>, workers: master::WorkerCommand) -> ExitCode {
    if crate::ping::asked(&args) {
        return crate::ping::run(&args);
    }
    let inherited = match master::Inherited::from_env() {
        Ok(inherited) => inherited,
        Err(err) => return fail(err),
    };
    // A worker takes its master's config; only a process started by hand reads the command line (and the
    // ini file it names).
    let mut unknown_options = None;
    let config = match &inherited {
        Some(inherited) => Ok(inherited.config.clone()),
        None => config::ini::load(args).map(|(config, warning)| {
            unknown_options = warning;
            config
        }),
    };
    let mut config = match config {
        Ok(config) => config,
        Err(err) => return fail(err),
    };
    if let Err(err) = logging::init(&config.log) {
        return fail(err);
    }
    if let Some(inherited) = inherited {
        // The master bound the sockets and removes their files; it also replaces this worker when asked.
        config.server.vacuum = false;
        config.server.worker_id = Some(inherited.worker_id);
        config.server.max_requests = inherited.max_requests(&config.processes.recycle);
        return match inherited.into_handoff() {
            Ok(handoff) => serve(&config, handoff.sockets, Some((handoff.control, handoff.recorder))),
            Err(err) => fail(format!("cannot use the sockets from the master: {err}")),
        };
    }
    // Before the app is imported, and in the master before any worker starts: the workers inherit it.
    for (key, value) in &config.env {
        // SAFETY: no other thread exists yet (neither runtime nor Python has started).
        unsafe { std::env::set_var(key, value) };
    }
    if let Some(warning) = unknown_options {
        tracing::warn!("{warning}");
    }
    // Certificates that cannot be used stop the start here, in one line, before any socket or worker.
    for files in &config.tls {
        if let Err(err) = server::tls::load(files) {
            return fail(format!("--ssl-socket: {err}"));
        }
    }
    let sockets = match take_sockets(&mut config) {
        Ok(sockets) => sockets,
        Err(err) => return fail(err),
    };
    warn_about_exposed_sockets(&sockets);
    warn_about_tls_without_client_ca(&config);
    // Only the process that bound the sockets writes the pidfile and drops privileges (workers inherit both).
    let _pidfile = match config.pidfile.as_deref().map(deploy::Pidfile::create).transpose() {
        Ok(pidfile) => pidfile,
        Err(err) => return fail(format!("cannot write --pidfile: {err}")),
    };
    if let Err(err) = deploy::drop_privileges(config.run_as) {
        return fail(format!("cannot switch to --uid/--gid: {err}"));
    }
    if config.processes.master {
        return match master::run(&config, sockets, workers, || deploy::notify("READY=1")) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(err),
        };
    }
    serve(&config, sockets, None)
}

/// Why a process that is not a worker has no sockets to serve on, by kind.
#[derive(Debug, thiserror::Error)]
enum SocketsError {
    #[error("cannot use the sockets passed by systemd: {0}")]
    Systemd(std::io::Error),
    #[error(
        "no socket to listen on: give --socket ADDR, --http-socket ADDR or --ssl-socket ... (or start under \
         systemd socket activation)"
    )]
    NoSocket,
    #[error("{0}")]
    Tls(String),
    #[error("cannot listen on {spec}: {source}")]
    Bind { spec: SocketSpec, source: std::io::Error },
}

/// The listening sockets of a process that is not a worker: from systemd (socket activation), or bound here.
fn take_sockets(config: &mut Config) -> Result<Vec<BoundSocket>, SocketsError> {
    match server::systemd_sockets() {
        Ok(Some(sockets)) => {
            // systemd owns these sockets and their files.
            config.server.vacuum = false;
            tracing::info!("using {} sockets passed by systemd", sockets.len());
            return tls_among_activated(sockets, config);
        }
        Ok(None) => {}
        Err(err) => return Err(SocketsError::Systemd(err)),
    }
    if config.sockets.is_empty() && config.http_sockets.is_empty() && config.ssl_sockets.is_empty() {
        return Err(SocketsError::NoSocket);
    }
    deploy::check_backlog(config.server.listen_backlog);
    let uwsgi = config.sockets.iter().map(|spec| (spec, Protocol::Uwsgi));
    let http = config.http_sockets.iter().map(|spec| (spec, Protocol::Http));
    let tls = config.ssl_sockets.iter().map(|spec| (spec, Protocol::Tls));
    uwsgi
        .chain(http)
        .chain(tls)
        .map(|(spec, protocol)| {
            server::bind(spec, protocol, &config.server)
                .map_err(|source| SocketsError::Bind { spec: spec.clone(), source })
        })
        .collect()
}

/// Under socket activation, every `--ssl-socket ADDR` must be one of systemd's sockets, which then speaks
/// TLS whatever its name, and a socket named `tls` must be one of them: a TLS setting that names no socket
/// would otherwise leave its port serving plain uwsgi. The files are put in the sockets' order, in which
/// the serving side pairs them.
fn tls_among_activated(
    mut sockets: Vec<BoundSocket>,
    config: &mut Config,
) -> Result<Vec<BoundSocket>, SocketsError> {
    let mut files = Vec::new();
    for socket in &mut sockets {
        match config.ssl_sockets.iter().position(|spec| *spec == socket.spec) {
            Some(at) => {
                socket.protocol = Protocol::Tls;
                files.push(config.tls[at].clone());
            }
            None if socket.protocol == Protocol::Tls => {
                return Err(SocketsError::Tls(format!(
                    "systemd named {} \"tls\", but no --ssl-socket gives that address its certificate",
                    socket.spec
                )));
            }
            None => {}
        }
    }
    if let Some(missing) = config.ssl_sockets.iter().find(|spec| !sockets.iter().any(|s| s.spec == **spec)) {
        return Err(SocketsError::Tls(format!(
            "--ssl-socket {missing} is not among the sockets systemd passed; add it to the socket unit"
        )));
    }
    config.tls = files;
    Ok(sockets)
}

/// The uwsgi protocol has no authentication: whoever can connect sets `REMOTE_ADDR`, `HTTPS` and every
/// header. A TCP socket that other hosts may reach is allowed (nginx on another machine needs one) but said
/// out loud, once, at start.
fn warn_about_exposed_sockets(sockets: &[BoundSocket]) {
    for socket in sockets.iter().filter(|socket| socket.protocol == Protocol::Uwsgi) {
        if let SocketSpec::Tcp(addr) = &socket.spec {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    "--socket {addr} can be reached from other hosts, and the uwsgi protocol has no \
                     authentication: whoever connects sets REMOTE_ADDR, HTTPS and every header. Listen on \
                     127.0.0.1 or a Unix socket when nginx is on this machine; otherwise allow only nginx's \
                     address to this port (firewall, private network)"
                );
            }
        }
    }
}

/// TLS keeps the traffic private, but without a client CA anyone who reaches the port can still send
/// requests with any `REMOTE_ADDR` and headers: said once, at start.
fn warn_about_tls_without_client_ca(config: &Config) {
    for (spec, files) in config.ssl_sockets.iter().zip(&config.tls) {
        if files.client_ca.is_none() {
            tracing::warn!(
                "--ssl-socket {spec} has no client CA: any peer that reaches it can send requests; give \
                 ADDR,CERT,KEY,CA so only your nginx (with uwsgi_ssl_certificate) gets past the handshake"
            );
        }
    }
}

/// One serving process: on its own, or as a worker of a master (with its control channel and recorder).
fn serve(
    config: &Config,
    sockets: Vec<BoundSocket>,
    worker: Option<(master::Control, Recorder)>,
) -> ExitCode {
    let socket_files: Vec<_> = sockets.iter().filter_map(BoundSocket::socket_file).collect();
    let stop = |err: &dyn Display| {
        // The app never accepted on these sockets: leave no file behind for nginx to queue on.
        if config.server.vacuum {
            crate::socket_file::remove_socket_files(&socket_files);
        }
        fail(err)
    };
    match deploy::raise_open_files_limit() {
        Ok(limit) => tracing::debug!("up to {limit} open files"),
        Err(err) => tracing::warn!("cannot raise the open-files limit: {err}"),
    }
    let app = match wsgi::load(&config.app) {
        Ok(app) => app,
        Err(err) => return stop(&err),
    };
    let (control, recorder) = match worker {
        Some((control, recorder)) => (Some(Arc::new(control)), recorder),
        None => (None, Recorder::disabled()),
    };
    let on_harakiri: Box<dyn FnOnce() + Send> = match control.clone() {
        Some(control) => Box::new(move || control.harakiri()),
        None => Box::new(|| tracing::error!("no master to replace this process: it keeps running")),
    };
    let retire: Box<dyn FnOnce() + Send> = {
        let control = control.clone();
        Box::new(move || control.map_or((), |control| control.max_requests_reached()))
    };
    // The I/O runtime runs on this thread (`block_on` below); the serving threads hand it what waits.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return stop(&format!("cannot start the I/O runtime: {err}")),
    };
    let front =
        match Front::new(sockets, config.server, &config.tls, recorder, runtime.handle().clone(), retire) {
            Ok(front) => front,
            Err(err) => return stop(&format!("cannot use the listening sockets: {err}")),
        };
    let pool = match wsgi::start(app, config.pool, on_harakiri, recorder, &front) {
        Ok(pool) => pool,
        Err(err) => return stop(&err),
    };
    let ready = || match &control {
        Some(control) => control.ready(),
        None => deploy::notify("READY=1"),
    };
    let served = runtime.block_on(async { server::run(&front, shutdown_signal(), ready).await });
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

fn fail(err: impl Display) -> ExitCode {
    eprintln!("oxwsgi: error: {err}");
    ExitCode::FAILURE
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
        deploy::notify("STOPPING=1");
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
