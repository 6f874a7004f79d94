//! The master process: binds every socket once, starts the worker processes by re-executing this binary
//! (or, installed as a Python package, the same interpreter with `-m oxwsgi`) with the listening sockets
//! inherited, replaces workers that die, and stops them on a signal.
//!
//! The master never loads the app, and never forks without exec (neither Python nor tokio survives a fork):
//! each worker is a fresh `exec` of `oxwsgi`, told by environment variables that it is worker N, which
//! descriptors hold its sockets and what the master's config is. No pyo3 here.
//!
//! - `contract`: what a master hands a worker and what the worker says back.
//! - `spawn`: starting a worker and relaying what it says and its exit.
//! - `lifecycle`: starting → ready → retiring → exited, and the replacements.
//! - `checks`: recycling limits and full listen queues, every second.
//! - here: [`run`], the supervisor's state and its loop, the endpoints' answers.

mod checks;
mod contract;
mod lifecycle;
mod spawn;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal as WorkerSignal;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use checks::{TouchReload, CHECK_INTERVAL};
use contract::{dup_above, handoff_floor};
pub use contract::{Control, Handoff, HandoffError, Inherited, WORKER_ID_ENV};
use lifecycle::{Retirement, Worker, KILL_AFTER_GRACE, RESPAWN_BACKOFF_MIN};
pub use spawn::WorkerCommand;
use spawn::{send_signal, WorkerPid};

use crate::config::{Config, SocketSpec};
use crate::metrics::books::{Books, SocketInfo, WorkerInfo};
use crate::metrics::endpoint::{self, Query};
use crate::metrics::region::CELLS_PER_WORKER;
use crate::metrics::Region;
use crate::server::{BoundSocket, Protocol};

/// Why the master stopped on its own, by kind.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// Setting up what the workers inherit (the sockets' copies, the metrics region's).
    #[error("cannot prepare the {what} for the workers: {source}")]
    Handoff { what: &'static str, source: io::Error },
    #[error("cannot start the master's runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot create the shared memory for metrics: {0}")]
    MetricsRegion(io::Error),
    #[error("cannot pass the config to the workers: {0}")]
    Config(serde_json::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    /// `--metrics` or `--stats` cannot listen.
    #[error(transparent)]
    Endpoint(#[from] endpoint::BindFailed),
    #[error("cannot start worker {slot}: {source}")]
    Spawn { slot: usize, source: io::Error },
    /// A worker of the first generation exited before it was ready: the app does not load.
    #[error("worker {slot} could not start (it {how}); the app fails to load, see the worker's error above")]
    FirstStart { slot: usize, how: String },
}

/// Starts the workers on `sockets` (bound, or passed by systemd) and supervises them until a stop signal.
/// Workers are started with `workers`. `on_ready` runs once every worker of the first generation accepts.
pub fn run(
    config: &Config,
    sockets: Vec<BoundSocket>,
    workers: WorkerCommand,
    on_ready: impl FnOnce(),
) -> Result<(), MasterError> {
    let socket_files: Vec<PathBuf> = sockets.iter().filter_map(BoundSocket::socket_file).collect();
    // As given, the way uWSGI names them in its stats: a Unix socket by its path alone.
    let socket_names: Vec<(String, Protocol)> = sockets
        .iter()
        .map(|socket| {
            let name = match &socket.spec {
                SocketSpec::Unix(path) => path.display().to_string(),
                SocketSpec::Tcp(addr) => addr.to_string(),
            };
            (name, socket.protocol)
        })
        .collect();
    // The copies handed down sit above the numbers the workers receive them at (3, 4, ..., and the control
    // socket), so moving them into place never overwrites one.
    let floor = handoff_floor(sockets.len());
    let handoff = sockets
        .iter()
        .map(|socket| dup_above(socket.as_raw_fd(), floor))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|source| MasterError::Handoff { what: "sockets", source })?;
    // From here the master holds only the copies it hands down, and drops them when it stops.
    drop(sockets);
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(MasterError::Runtime)?;
    // Always, not only for `--metrics` and `--stats`: the cells also tell the master which requests a
    // worker was running when it died, whatever killed it.
    let cells = config.processes.workers.get().saturating_mul(CELLS_PER_WORKER);
    let region = Region::create(cells).map_err(MasterError::MetricsRegion)?;
    let handed_down = dup_above(region.fd().as_raw_fd(), floor)
        .map_err(|source| MasterError::Handoff { what: "metrics", source })?;
    let books = Some((Books::new(region), handed_down));
    let config_json = serde_json::to_string(config).map_err(MasterError::Config)?;
    let supervisor =
        Supervisor::new(config, config_json, workers, handoff, socket_files.clone(), socket_names, books);
    let result = runtime.block_on(supervisor.supervise(on_ready));
    if config.server.vacuum {
        crate::socket_file::remove_socket_files(&socket_files);
    }
    result
}

/// What the workers' tasks tell the supervisor.
enum Event {
    Ready {
        pid: WorkerPid,
    },
    Retire {
        pid: WorkerPid,
        reason: Retirement,
    },
    Harakiri {
        pid: WorkerPid,
    },
    /// The harakiri grace is over.
    Kill {
        pid: WorkerPid,
    },
    Exited {
        pid: WorkerPid,
        status: io::Result<ExitStatus>,
    },
    /// A replacement's back-off delay is over.
    Respawn {
        slot: usize,
    },
}

/// Scrapes waiting for the supervisor: it answers each in well under a millisecond, so a handful covers
/// several Prometheus servers and a uwsgitop at once.
const QUERY_QUEUE: usize = 16;

/// Events waiting for the supervisor. A worker's control messages are each passed on once, so a worker
/// causes a few events in its life; the bound is for one that misbehaves (its reader then waits).
const EVENT_QUEUE: usize = 64;

struct Supervisor<'a> {
    config: &'a Config,
    /// `config` as the workers get it ([`CONFIG_ENV`]).
    config_json: String,
    worker_command: WorkerCommand,
    /// The listening sockets, at descriptors above those the workers receive them at.
    handoff: Vec<OwnedFd>,
    /// What each socket speaks, in `handoff` order, as the workers get it ([`LISTEN_PROTOCOLS_ENV`]).
    socket_protocols: String,
    socket_files: Vec<PathBuf>,
    /// The sockets' names, in `handoff` order.
    socket_names: Vec<String>,
    /// When each socket's full queue was last logged.
    listen_queue_warned: Vec<Option<Instant>>,
    workers: HashMap<WorkerPid, Worker>,
    events: mpsc::Sender<Event>,
    inbox: mpsc::Receiver<Event>,
    backoff: Duration,
    /// Harakiri kills so far (logged with each; the metrics issue exports it).
    harakiri_count: u64,
    /// Every worker of the first generation reported ready: from then on a worker that fails to start is
    /// retried (or, for a replacement, abandoned), not fatal.
    started: bool,
    /// The workers' cells and the master's own counts, and a copy of the region's descriptor above the
    /// handed-down numbers (absent only in tests of the lifecycle).
    books: Option<(Books, OwnedFd)>,
    queries: mpsc::Receiver<Query>,
    /// Kept so the query channel never closes, whichever endpoints run.
    query_sender: mpsc::Sender<Query>,
    touch_reload: TouchReload,
}

impl<'a> Supervisor<'a> {
    fn new(
        config: &'a Config,
        config_json: String,
        worker_command: WorkerCommand,
        handoff: Vec<OwnedFd>,
        socket_files: Vec<PathBuf>,
        socket_names: Vec<(String, Protocol)>,
        books: Option<(Books, OwnedFd)>,
    ) -> Self {
        let socket_protocols = socket_names.iter().map(|(_, protocol)| protocol.name()).collect::<Vec<_>>();
        let socket_names: Vec<String> = socket_names.into_iter().map(|(name, _)| name).collect();
        let (events, inbox) = mpsc::channel(EVENT_QUEUE);
        let (query_sender, queries) = mpsc::channel(QUERY_QUEUE);
        let backoff = RESPAWN_BACKOFF_MIN;
        Self {
            config,
            config_json,
            worker_command,
            handoff,
            socket_protocols: socket_protocols.join(","),
            socket_files,
            listen_queue_warned: vec![None; socket_names.len()],
            socket_names,
            books,
            queries,
            query_sender,
            touch_reload: TouchReload::new(&config.touch_reload),
            workers: HashMap::new(),
            harakiri_count: 0,
            events,
            inbox,
            backoff,
            started: false,
        }
    }

    async fn supervise(mut self, on_ready: impl FnOnce()) -> Result<(), MasterError> {
        let mut on_ready = Some(on_ready);
        let signal_error = MasterError::Signals;
        let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
        let mut quit = signal(SignalKind::quit()).map_err(signal_error)?;
        let mut hangup = signal(SignalKind::hangup()).map_err(signal_error)?;
        let mut reopen =
            signal(SignalKind::from_raw(crate::logging::REOPEN_SIGNAL as i32)).map_err(signal_error)?;
        let mut checks = tokio::time::interval(CHECK_INTERVAL);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.start_endpoints()?;
        for slot in 1..=self.config.processes.workers.get() {
            self.spawn(slot)?;
        }
        let stop = loop {
            tokio::select! {
                event = self.inbox.recv() => {
                    self.handle(event.expect("the supervisor holds a sender")).await?;
                    if self.started {
                        if let Some(on_ready) = on_ready.take() {
                            on_ready();
                        }
                    }
                }
                _ = hangup.recv() => self.reload("SIGHUP received"),
                _ = reopen.recv() => self.reopen_log(),
                Some(query) = self.queries.recv() => self.answer(query),
                _ = checks.tick() => {
                    self.check_limits();
                    self.check_listen_queues();
                    self.check_touch_reload();
                }
                _ = terminate.recv() => break "SIGTERM",
                _ = interrupt.recv() => break "SIGINT",
                _ = quit.recv() => {
                    info!("SIGQUIT received: stopping the workers now");
                    self.stop_all(WorkerSignal::SIGKILL);
                    self.wait_all(KILL_AFTER_GRACE).await;
                    return Ok(());
                }
            }
        };
        let grace = self.config.server.graceful_timeout;
        info!("{stop} received: workers finish their requests (up to {grace:?}), then the master exits");
        crate::deploy::notify("STOPPING=1");
        // First the socket files, so nothing new queues while the workers drain the queues.
        if self.config.server.vacuum {
            crate::socket_file::remove_socket_files(&self.socket_files);
        }
        self.stop_all(WorkerSignal::SIGTERM);
        // The sockets close once the last worker stops accepting: a late client is refused at once (and
        // nginx tries another backend) instead of waiting in a backlog nobody reads, then being reset.
        self.handoff.clear();
        let hurry = tokio::select! {
            () = self.wait_all(grace + KILL_AFTER_GRACE) => false,
            () = next_signal(&mut terminate, &mut interrupt) => true,
            _ = quit.recv() => true,
        };
        if hurry {
            warn!("stop signal received again: stopping the workers now");
            self.signal_all(WorkerSignal::SIGKILL);
            self.wait_all(KILL_AFTER_GRACE).await;
        }
        Ok(())
    }

    async fn handle(&mut self, event: Event) -> Result<(), MasterError> {
        match event {
            Event::Ready { pid } => self.on_ready(pid),
            Event::Retire { pid, reason } => self.retire(pid, reason),
            Event::Harakiri { pid } => self.harakiri(pid),
            Event::Kill { pid } => {
                if self.workers.contains_key(&pid) {
                    send_signal(pid, WorkerSignal::SIGKILL);
                }
            }
            Event::Exited { pid, status } => return self.on_exit(pid, &status).await,
            Event::Respawn { slot } => self.spawn_or_retry(slot),
        }
        Ok(())
    }

    /// Binds `--metrics` and `--stats` and serves them, before any worker starts, so a port already in use
    /// stops the master with one clear line.
    fn start_endpoints(&mut self) -> Result<(), MasterError> {
        Ok(endpoint::start(&self.config.metrics, &self.query_sender)?)
    }

    /// Answers an endpoint with the document it asked for.
    fn answer(&mut self, query: Query) {
        let Some((books, _)) = &mut self.books else { return };
        let workers: Vec<WorkerInfo> = self
            .workers
            .iter()
            .map(|(&pid, w)| WorkerInfo {
                id: w.slot,
                pid: pid.get(),
                state: w.state(),
                spawned_at: w.spawned_at,
                cell: w.cell,
            })
            .collect();
        let sockets: Vec<SocketInfo<'_>> = self
            .socket_names
            .iter()
            .zip(&self.handoff)
            .map(|(name, fd)| SocketInfo { name: name.clone(), fd: fd.as_fd() })
            .collect();
        // A client that gave up has dropped its end: nothing to do.
        match query {
            Query::Metrics(answer) => {
                let document = books.metrics(&workers, &sockets);
                let _ =
                    answer.send(document.inspect_err(|err| error!("cannot encode the metrics: {err}")).ok());
            }
            Query::Stats(answer) => {
                let _ = answer.send(books.stats(&workers, &sockets));
            }
        }
    }
}

impl Supervisor<'_> {
    /// SIGUSR1: the master reopens `--logto`, and so does each worker on the same signal.
    fn reopen_log(&mut self) {
        match crate::logging::reopen() {
            Ok(true) => {
                info!("SIGUSR1 received: --logto reopened; each worker reopens it too");
                for &pid in self.workers.keys() {
                    send_signal(pid, WorkerSignal::SIGUSR1);
                }
            }
            Ok(false) => info!("SIGUSR1 received: no --logto to reopen"),
            Err(err) => {
                error!("SIGUSR1 received: cannot reopen --logto: {err}; still writing to the old file");
            }
        }
    }
}

async fn next_signal(terminate: &mut Signal, interrupt: &mut Signal) {
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}

fn describe_exit(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => match WorkerSignal::try_from(signal) {
                Ok(name) => format!("was killed by signal {signal} ({name})"),
                Err(_) => format!("was killed by signal {signal}"),
            },
            (None, None) => format!("ended ({status})"),
        },
        Err(err) => format!("could not be waited for ({err})"),
    }
}
