//! The master process: binds every socket once, starts the worker processes by re-executing this binary
//! with the listening sockets inherited, replaces workers that die, and stops them on a signal.
//!
//! The master never starts Python, and never forks without exec (neither Python nor tokio survives a fork):
//! each worker is a fresh `exec` of `oxwsgi` with the same options, told by environment variables that it is worker N and which
//! descriptors hold its sockets. No pyo3 here.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{Config, RecycleConfig, SocketSpec};
use crate::metrics::books::{self, Books, SocketInfo, WorkerInfo};
use crate::metrics::endpoint::{self, Query, StatsListener};
use crate::metrics::exposition::{RestartReason, WorkerState};
use crate::metrics::listen_queue::listen_queue;
use crate::metrics::region::CELLS_PER_WORKER;
use crate::metrics::{Recorder, Region};
use crate::server::{self, BoundSocket};

/// Set in a worker's environment: its number, from 1 (apps may read it too).
pub const WORKER_ID_ENV: &str = "OXWSGI_WORKER_ID";
/// The master's pid, so a worker knows the other variables were meant for it (their parent set them).
const MASTER_PID_ENV: &str = "OXWSGI_MASTER_PID";
/// The master's validated config, as JSON: a worker never parses the command line again, so it cannot
/// disagree with its master about an option (nor fail on one the master accepted).
const CONFIG_ENV: &str = "OXWSGI_CONFIG";
/// Set in a worker's environment: how many listening sockets it inherits, at descriptors 3, 4, ...
const LISTEN_FDS_ENV: &str = "OXWSGI_LISTEN_FDS";
/// Set in a worker's environment: the descriptor of its control socket to the master.
const READY_FD_ENV: &str = "OXWSGI_READY_FD";
/// Set in a worker's environment when the master serves metrics: the descriptor of the shared metrics
/// region, and which cell of it the worker counts in.
const METRICS_FD_ENV: &str = "OXWSGI_METRICS_FD";
const METRICS_CELL_ENV: &str = "OXWSGI_METRICS_CELL";
/// The first descriptor a worker inherits a socket at, after stdin, stdout and stderr.
const FIRST_INHERITED_FD: RawFd = 3;
/// `/proc/self/exe`: the binary this process runs, even once the file was replaced or removed.
const RUNNING_EXECUTABLE: &str = "/proc/self/exe";
/// First delay before replacing a worker that died soon after starting; doubles up to the maximum, so a
/// worker crashing at every request does not spin the machine.
const RESPAWN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESPAWN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that served this long was healthy: the next one that dies is replaced at once.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(10);
/// Between a worker's harakiri report and its SIGKILL: the worker logs the stuck request's stack meanwhile.
const HARAKIRI_GRACE: Duration = Duration::from_millis(500);
/// After the graceful timeout, workers get this long for their own clean-up before SIGKILL.
const KILL_AFTER_GRACE: Duration = Duration::from_secs(15);

/// What a worker inherited from its master. The descriptors are owned from the moment the variables
/// naming them are read, so each has exactly one owner; [`Inherited::into_handoff`] hands them on.
#[derive(Debug)]
pub struct Inherited {
    pub worker_id: usize,
    /// The master's config.
    pub config: Config,
    listeners: Vec<OwnedFd>,
    control: OwnedFd,
    /// The metrics region's descriptor and this worker's cell in it.
    metrics: Option<(OwnedFd, usize)>,
}

/// A worker's inheritance, ready to use.
pub struct Handoff {
    /// The listening sockets, in the order the master holds them.
    pub sockets: Vec<BoundSocket>,
    /// The channel on which this worker reports to its master.
    pub control: Control,
    /// Where this worker counts its requests; disabled (and logged) if the region cannot be used.
    pub recorder: Recorder,
}

impl Inherited {
    /// `Some` in a worker started by a master; an error if the variables are there but name another
    /// process than this one's parent as the master (as systemd's `LISTEN_PID` names its process), so
    /// descriptors set up for another process are never taken. The descriptor variables are removed, so that
    /// programs the app starts do not take the descriptors for theirs (the worker id stays: apps may read
    /// it).
    pub fn from_env() -> Result<Option<Self>, HandoffError> {
        let number = |name| std::env::var(name).ok()?.parse::<usize>().ok();
        let fd = |name| {
            number(name).and_then(|fd| RawFd::try_from(fd).ok()).filter(|&fd| fd >= FIRST_INHERITED_FD)
        };
        let master = number(MASTER_PID_ENV);
        let worker_id = number(WORKER_ID_ENV);
        let listen_fds = number(LISTEN_FDS_ENV);
        let control = fd(READY_FD_ENV);
        let metrics = fd(METRICS_FD_ENV).zip(number(METRICS_CELL_ENV));
        let config = std::env::var(CONFIG_ENV).ok();
        for name in
            [MASTER_PID_ENV, CONFIG_ENV, LISTEN_FDS_ENV, READY_FD_ENV, METRICS_FD_ENV, METRICS_CELL_ENV]
        {
            // SAFETY: called at start-up, before any other thread exists.
            unsafe { std::env::remove_var(name) };
        }
        let (Some(master), Some(worker_id), Some(listen_fds), Some(control)) =
            (master, worker_id, listen_fds, control)
        else {
            return Ok(None);
        };
        // SAFETY: getppid has no preconditions.
        let parent = usize::try_from(unsafe { libc::getppid() }).ok();
        if parent != Some(master) {
            return Err(HandoffError::ForAnotherProcess { master });
        }
        let config = config.ok_or(HandoffError::NoConfig)?;
        let config: Config = serde_json::from_str(&config).map_err(HandoffError::Config)?;
        let end = RawFd::try_from(listen_fds)
            .ok()
            .and_then(|count| FIRST_INHERITED_FD.checked_add(count))
            .ok_or(HandoffError::TooManySockets(listen_fds))?;
        // Our parent, the master, placed these descriptors for this process alone — the listening sockets
        // at 3.., the control socket and the metrics region after them — and this process opened nothing
        // there before reading them; each is taken once, here.
        let listeners = (FIRST_INHERITED_FD..end)
            // SAFETY: a listening socket the master placed for us (above).
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: our end of the control socket, placed by the master (above).
        let control = unsafe { OwnedFd::from_raw_fd(control) };
        // SAFETY: the metrics region, placed by the master (above).
        let metrics = metrics.map(|(fd, cell)| (unsafe { OwnedFd::from_raw_fd(fd) }, cell));
        Ok(Some(Self { worker_id, config, listeners: listeners.collect(), control, metrics }))
    }

    /// Puts the descriptors to use. Fails if a listening socket is not one.
    pub fn into_handoff(self) -> io::Result<Handoff> {
        let sockets = self.listeners.into_iter().map(server::adopt).collect::<io::Result<_>>()?;
        let control = UnixStream::from(self.control);
        // Close-on-exec, so the app's subprocesses do not inherit it.
        socket2::SockRef::from(&control).set_cloexec(true)?;
        let recorder = match self.metrics {
            None => Recorder::disabled(),
            Some((fd, cell)) => Region::inherit(fd).and_then(|region| Recorder::new(region, cell)).unwrap_or_else(|err| {
                error!("cannot use the metrics region from the master: {err}; this worker's requests go uncounted");
                Recorder::disabled()
            }),
        };
        Ok(Handoff { sockets, control: Control(std::sync::Mutex::new(control)), recorder })
    }

    /// `--max-requests` plus this worker's share of the jitter, so workers started together do not all
    /// retire together.
    pub fn max_requests(&self, recycle: &RecycleConfig) -> Option<u64> {
        let max = recycle.max_requests?.get();
        let spread =
            u64::from(std::process::id()).wrapping_mul(KNUTH_MULTIPLIER) % (recycle.max_requests_jitter + 1);
        Some(max + spread)
    }
}

/// Spreads consecutive pids over the jitter range (Knuth's multiplicative hash).
const KNUTH_MULTIPLIER: u64 = 2_654_435_761;

/// What a worker tells its master, one byte each.
const SAYS_READY: u8 = b'R';
const SAYS_MAX_REQUESTS: u8 = b'M';
const SAYS_HARAKIRI: u8 = b'H';

/// A worker's side of the control socket.
pub struct Control(std::sync::Mutex<UnixStream>);

impl Control {
    fn say(&self, message: u8, what: &str) {
        let mut channel = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = channel.write_all(&[message]) {
            warn!("cannot tell the master {what}: {err}");
        }
    }

    /// Every socket accepts.
    pub fn ready(&self) {
        self.say(SAYS_READY, "this worker is ready");
    }

    /// A request outlived `--harakiri`: the master starts a replacement at once and kills this worker after
    /// [`HARAKIRI_GRACE`], time enough to log where the request is stuck.
    pub fn harakiri(&self) {
        self.say(SAYS_HARAKIRI, "about the harakiri");
    }

    /// `--max-requests` reached: the master starts a replacement, then stops this worker gracefully.
    pub fn max_requests_reached(&self) {
        self.say(SAYS_MAX_REQUESTS, "to replace this worker");
    }
}

/// Why a worker cannot take what its master handed down, by kind.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(
        "{LISTEN_FDS_ENV} and the other worker variables were set for a worker of process {master}, not of \
         this process's parent: unset them"
    )]
    ForAnotherProcess { master: usize },
    #[error("{CONFIG_ENV} is missing: the master passes its config")]
    NoConfig,
    #[error("{CONFIG_ENV} is not a config this version can read: {0}")]
    Config(serde_json::Error),
    #[error("{LISTEN_FDS_ENV} {0} is out of range")]
    TooManySockets(usize),
}

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
    #[error("cannot listen on {option} {address}: {source}")]
    Endpoint { option: &'static str, address: String, source: io::Error },
    #[error("cannot start worker {slot}: {source}")]
    Spawn { slot: usize, source: io::Error },
    /// A worker of the first generation exited before it was ready: the app does not load.
    #[error("worker {slot} could not start (it {how}); the app fails to load, see the worker's error above")]
    FirstStart { slot: usize, how: String },
}

/// Starts the workers on `sockets` (bound, or passed by systemd) and supervises them until a stop signal.
/// `on_ready` runs once every worker of the first generation accepts.
pub fn run(config: &Config, sockets: Vec<BoundSocket>, on_ready: impl FnOnce()) -> Result<(), MasterError> {
    let socket_files: Vec<PathBuf> = sockets.iter().filter_map(BoundSocket::socket_file).collect();
    // As given, the way uWSGI names them in its stats: a Unix socket by its path alone.
    let socket_names: Vec<String> = sockets
        .iter()
        .map(|socket| match &socket.spec {
            SocketSpec::Unix(path) => path.display().to_string(),
            SocketSpec::Tcp(addr) => addr.to_string(),
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
    let books = if config.metrics.enabled() {
        let cells = config.processes.workers.get().saturating_mul(CELLS_PER_WORKER);
        let region = Region::create(cells).map_err(MasterError::MetricsRegion)?;
        let handed_down = dup_above(region.fd().as_raw_fd(), floor)
            .map_err(|source| MasterError::Handoff { what: "metrics", source })?;
        Some((Books::new(region), handed_down))
    } else {
        None
    };
    let config_json = serde_json::to_string(config).map_err(MasterError::Config)?;
    let supervisor = Supervisor::new(config, config_json, handoff, socket_files.clone(), socket_names, books);
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

/// Why a healthy worker is replaced (its replacement accepts before it stops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retirement {
    Reload,
    MaxRequests,
    Rss,
    Lifetime,
}

impl From<Retirement> for RestartReason {
    fn from(retirement: Retirement) -> Self {
        match retirement {
            Retirement::Reload => Self::Reload,
            Retirement::MaxRequests => Self::MaxRequests,
            Retirement::Rss => Self::Rss,
            Retirement::Lifetime => Self::Lifetime,
        }
    }
}

impl fmt::Display for Retirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Reload => "reload (SIGHUP)",
            Self::MaxRequests => "--max-requests reached",
            Self::Rss => "--reload-on-rss exceeded",
            Self::Lifetime => "--max-worker-lifetime reached",
        })
    }
}

/// One worker process, by pid.
struct Worker {
    /// Which of the `--processes` places it fills (1..=N), also its `OXWSGI_WORKER_ID`.
    slot: usize,
    started: Instant,
    /// The same moment on the wall clock, for the stats' `last_spawn`.
    spawned_at: SystemTime,
    ready: bool,
    /// A replacement is starting (its pid): this one stops once that one is ready.
    replaced_by: Option<WorkerPid>,
    /// Told to stop: its exit is expected.
    retiring: bool,
    /// Due for replacement (for this reason) but its last replacement failed to start: tried again, from
    /// `retry_at` on, with the back-off, so a broken app on disk is not re-imported every second.
    pending: Option<(Retirement, Instant)>,
    /// Why it is being replaced, counted once it exits.
    retirement: Option<RestartReason>,
    /// Its metrics cell.
    cell: Option<usize>,
}

impl Worker {
    fn state(&self) -> WorkerState {
        if self.retiring {
            WorkerState::Retiring
        } else if self.ready {
            WorkerState::Ready
        } else {
            WorkerState::Starting
        }
    }
}

/// How often the master checks memory, lifetimes and the listen queues.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A queue that stays full is logged again after this long, not every check.
const LISTEN_QUEUE_WARN_EVERY: Duration = Duration::from_secs(10);
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
    /// The listening sockets, at descriptors above those the workers receive them at.
    handoff: Vec<OwnedFd>,
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
    /// Workers that were starting when a SIGHUP came: replaced once they are ready.
    reload_when_ready: std::collections::HashSet<WorkerPid>,
    /// Every worker of the first generation reported ready: from then on a worker that fails to start is
    /// retried (or, for a replacement, abandoned), not fatal.
    started: bool,
    /// With `--metrics` or `--stats`: the cells and the master's own counts, and a copy of the region's
    /// descriptor above the handed-down numbers.
    books: Option<(Books, OwnedFd)>,
    queries: mpsc::Receiver<Query>,
    /// Kept so the query channel never closes, whichever endpoints run.
    query_sender: mpsc::Sender<Query>,
}

impl<'a> Supervisor<'a> {
    fn new(
        config: &'a Config,
        config_json: String,
        handoff: Vec<OwnedFd>,
        socket_files: Vec<PathBuf>,
        socket_names: Vec<String>,
        books: Option<(Books, OwnedFd)>,
    ) -> Self {
        let (events, inbox) = mpsc::channel(EVENT_QUEUE);
        let (query_sender, queries) = mpsc::channel(QUERY_QUEUE);
        let backoff = RESPAWN_BACKOFF_MIN;
        Self {
            config,
            config_json,
            handoff,
            socket_files,
            listen_queue_warned: vec![None; socket_names.len()],
            socket_names,
            books,
            queries,
            query_sender,
            workers: HashMap::new(),
            harakiri_count: 0,
            reload_when_ready: std::collections::HashSet::new(),
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
                _ = hangup.recv() => self.reload(),
                Some(query) = self.queries.recv() => self.answer(query),
                _ = checks.tick() => {
                    self.check_limits();
                    self.check_listen_queues();
                }
                _ = terminate.recv() => break "SIGTERM",
                _ = interrupt.recv() => break "SIGINT",
                _ = quit.recv() => {
                    info!("SIGQUIT received: stopping the workers now");
                    self.signal_all(libc::SIGKILL);
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
        self.signal_all(libc::SIGTERM);
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
            self.signal_all(libc::SIGKILL);
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
                    send_signal(pid, libc::SIGKILL);
                }
            }
            Event::Exited { pid, status } => return self.on_exit(pid, &status).await,
            Event::Respawn { slot } => self.spawn_or_retry(slot),
        }
        Ok(())
    }

    fn on_ready(&mut self, pid: WorkerPid) {
        let Some(worker) = self.workers.get_mut(&pid) else { return };
        worker.ready = true;
        info!("worker {} (pid {pid}) ready", worker.slot);
        // The replacement accepts: now the worker it replaces stops accepting and finishes its requests.
        let replaced = self.workers.iter().find(|(_, w)| w.replaced_by == Some(pid)).map(|(&old, _)| old);
        if let Some(old) = replaced {
            self.stop_worker(old);
        }
        if self.reload_when_ready.remove(&pid) {
            self.retire(pid, Retirement::Reload);
        }
        let ready_slots: std::collections::HashSet<usize> =
            self.workers.values().filter(|w| w.ready && !w.retiring).map(|w| w.slot).collect();
        if !self.started && ready_slots.len() == self.config.processes.workers.get() {
            self.started = true;
            info!("master ready: {} workers", self.config.processes.workers);
        }
    }

    /// Starts a replacement for `pid`; `pid` stops once the replacement accepts (never before, so no
    /// request finds nobody accepting).
    fn retire(&mut self, pid: WorkerPid, reason: Retirement) {
        let Some(worker) = self.workers.get(&pid) else { return };
        let backing_off = worker.pending.is_some_and(|(_, retry_at)| Instant::now() < retry_at);
        if worker.retiring || worker.replaced_by.is_some() || !worker.ready || backing_off {
            return;
        }
        let slot = worker.slot;
        info!("replacing worker {slot} (pid {pid}): {reason}");
        match self.spawn(slot) {
            Ok(new) => {
                if let Some(worker) = self.workers.get_mut(&pid) {
                    worker.replaced_by = Some(new);
                    worker.retirement = Some(reason.into());
                    // A failed reload is not retried on its own: the operator fixes the code and sends
                    // SIGHUP again. Recycling is retried.
                    worker.pending = (reason != Retirement::Reload).then(|| (reason, Instant::now()));
                }
            }
            Err(err) => error!("{err}; worker {slot} (pid {pid}) keeps running"),
        }
    }

    /// A request outlived `--harakiri` in worker `pid`: it is killed after [`HARAKIRI_GRACE`], and its
    /// replacement starts now (the stuck worker serves nothing meanwhile).
    fn harakiri(&mut self, pid: WorkerPid) {
        let Some(worker) = self.workers.get_mut(&pid) else { return };
        self.harakiri_count += 1;
        let slot = worker.slot;
        worker.retirement = Some(RestartReason::Harakiri);
        if let Some((books, _)) = &mut self.books {
            books.harakiri(slot);
        }
        // A worker already on its way out (reload, recycling) has its successor: none is needed.
        let successor_exists = worker.retiring || worker.replaced_by.is_some();
        worker.retiring = true;
        worker.replaced_by = None;
        error!(
            "harakiri #{} on worker {slot} (pid {pid}): killing it in {HARAKIRI_GRACE:?}",
            self.harakiri_count
        );
        // Through the supervisor, which kills it only if it has not been reaped (its pid could be reused).
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HARAKIRI_GRACE).await;
            let _ = events.send(Event::Kill { pid }).await;
        });
        if !successor_exists {
            self.spawn_or_retry(slot);
        }
    }

    /// Starts a worker for `slot`; if that fails (fork limits, ...), tries again after the back-off rather
    /// than leaving the slot empty.
    fn spawn_or_retry(&mut self, slot: usize) {
        if let Err(err) = self.spawn(slot) {
            error!("{err}");
            self.respawn_later(slot, Duration::ZERO);
        }
    }

    fn reload(&mut self) {
        let current: Vec<WorkerPid> = self
            .workers
            .iter()
            .filter(|(_, w)| w.ready && !w.retiring && w.replaced_by.is_none())
            .map(|(&pid, _)| pid)
            .collect();
        // Workers still starting (a replacement, a respawn) may have imported the code before this SIGHUP:
        // they are replaced too, as soon as they are ready.
        let starting: Vec<WorkerPid> =
            self.workers.iter().filter(|(_, w)| !w.ready).map(|(&pid, _)| pid).collect();
        info!(
            "SIGHUP received: replacing {} workers with ones that load the app anew",
            current.len() + starting.len()
        );
        self.reload_when_ready.extend(starting);
        for pid in current {
            self.retire(pid, Retirement::Reload);
        }
    }

    /// Warns when a socket's accept queue is full: every worker is busy, and nginx's new connections wait
    /// or are refused (502). uWSGI logs the same condition each cycle; operators grep for it.
    fn check_listen_queues(&mut self) {
        for (index, (name, socket)) in self.socket_names.iter().zip(&self.handoff).enumerate() {
            // Read errors are reported by the metrics, which need the number; here only a full queue matters.
            let Ok(depth) = listen_queue(socket.as_fd()) else { continue };
            if depth.max == 0 || depth.queued < depth.max {
                continue;
            }
            if let Some((books, _)) = &mut self.books {
                books.listen_queue_full();
            }
            let warned = &mut self.listen_queue_warned[index];
            if warned.is_none_or(|at| at.elapsed() >= LISTEN_QUEUE_WARN_EVERY) {
                warn!(
                    "listen queue of socket {name} full ({}/{}): every worker is busy; add --processes or \
                     --threads, or find what makes requests slow",
                    depth.queued, depth.max
                );
                *warned = Some(Instant::now());
            }
        }
    }

    fn check_limits(&mut self) {
        let recycle = self.config.processes.recycle;
        let due: Vec<(WorkerPid, Retirement)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.ready && !w.retiring && w.replaced_by.is_none())
            .filter_map(|(&pid, w)| {
                // A retirement whose replacement failed (--max-requests is asked for only once).
                if let Some((reason, _)) = w.pending {
                    return Some((pid, reason));
                }
                if recycle.max_worker_lifetime.is_some_and(|limit| w.started.elapsed() >= limit) {
                    return Some((pid, Retirement::Lifetime));
                }
                let rss = recycle.reload_on_rss.and_then(|limit| {
                    books::memory(pid.get()).map(|m| m.resident).filter(|&rss| rss > limit)
                });
                rss.map(|_| (pid, Retirement::Rss))
            })
            .collect();
        for (pid, reason) in due {
            self.retire(pid, reason);
        }
    }

    async fn on_exit(&mut self, pid: WorkerPid, status: &io::Result<ExitStatus>) -> Result<(), MasterError> {
        self.reload_when_ready.remove(&pid);
        let Some(worker) = self.forget(pid) else { return Ok(()) };
        let (slot, how) = (worker.slot, describe_exit(status));
        if worker.retiring {
            info!("worker {slot} (pid {pid}) retired: it {how}");
            if let Some(reason) = worker.retirement {
                self.count_restart(reason);
            }
            return Ok(());
        }
        if !worker.ready {
            error!("worker {slot} (pid {pid}) could not start: it {how}");
            let replaced = self.workers.values_mut().find(|w| w.replaced_by == Some(pid));
            if let Some(old) = replaced {
                // A broken reload keeps the old code serving; recycling is tried again after the back-off.
                old.replaced_by = None;
                let retry_at = Instant::now() + self.backoff;
                old.pending = old.pending.map(|(reason, _)| (reason, retry_at));
                self.backoff = (self.backoff * 2).min(RESPAWN_BACKOFF_MAX);
                warn!("worker {slot} keeps running the code it loaded before");
                return Ok(());
            }
            if self.started {
                self.count_restart(RestartReason::Crash);
                self.respawn_later(slot, worker.started.elapsed());
                return Ok(());
            }
            self.signal_all(libc::SIGTERM);
            self.wait_all(self.config.server.graceful_timeout).await;
            return Err(MasterError::FirstStart { slot, how });
        }
        warn!("worker {slot} (pid {pid}) {how}; starting a new one");
        self.count_restart(RestartReason::Crash);
        if let Some(replacement) = worker.replaced_by {
            // Its replacement is already starting: that one takes the place.
            info!("worker {slot}'s replacement (pid {replacement}) takes its place");
            return Ok(());
        }
        self.respawn_later(slot, worker.started.elapsed());
        Ok(())
    }

    /// Removes an exited worker; its metrics cell joins the totals.
    fn forget(&mut self, pid: WorkerPid) -> Option<Worker> {
        let worker = self.workers.remove(&pid)?;
        if let Some((books, _)) = &mut self.books {
            books.exited(worker.cell);
        }
        Some(worker)
    }

    fn count_restart(&mut self, reason: RestartReason) {
        if let Some((books, _)) = &mut self.books {
            books.restarted(reason);
        }
    }

    /// Binds `--metrics` and `--stats` and serves them, before any worker starts, so a port already in use
    /// stops the master with one clear line.
    fn start_endpoints(&mut self) -> Result<(), MasterError> {
        let metrics = &self.config.metrics;
        if let Some(addr) = metrics.prometheus {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|source| MasterError::Endpoint {
                    option: "--metrics",
                    address: addr.to_string(),
                    source,
                })?;
            info!("metrics at http://{addr}/metrics");
            tokio::spawn(endpoint::serve_metrics(listener, self.query_sender.clone()));
        }
        if let Some(spec) = &metrics.stats {
            let listener = StatsListener::bind(spec).map_err(|source| MasterError::Endpoint {
                option: "--stats",
                address: spec.to_string(),
                source,
            })?;
            info!("uWSGI stats on {spec}");
            tokio::spawn(endpoint::serve_stats(listener, metrics.stats_http, self.query_sender.clone()));
        }
        Ok(())
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

    fn stop_worker(&mut self, pid: WorkerPid) {
        if let Some(worker) = self.workers.get_mut(&pid) {
            worker.retiring = true;
            worker.replaced_by = None;
            send_signal(pid, libc::SIGTERM);
        }
    }

    /// Starts a worker for `slot`, with a task relaying what it says and when it exits. Returns its pid.
    fn spawn(&mut self, slot: usize) -> Result<WorkerPid, MasterError> {
        let fail = |source: io::Error| MasterError::Spawn { slot, source };
        let (master_end, worker_end) = UnixStream::pair().map_err(fail)?;
        let worker_end =
            dup_above(worker_end.as_raw_fd(), handoff_floor(self.handoff.len())).map_err(fail)?;
        let sources: Vec<RawFd> = self.handoff.iter().map(AsRawFd::as_raw_fd).collect();
        let control_source = worker_end.as_raw_fd();
        let control_target = FIRST_INHERITED_FD + RawFd::try_from(sources.len()).unwrap_or(RawFd::MAX - 1);
        let metrics_target = control_target + 1;
        let cell = self.books.as_mut().and_then(|(books, _)| books.spawned(slot));
        let metrics_source = self.books.as_ref().map(|(_, fd)| fd.as_raw_fd()).filter(|_| cell.is_some());
        // The running binary itself, even if a package upgrade replaced the file on disk since: a worker
        // must run the master's code. argv[0] stays what the master was started as, for `ps`.
        let mut command = std::process::Command::new(RUNNING_EXECUTABLE);
        command
            .arg0(std::env::args_os().next().unwrap_or_else(|| "oxwsgi".into()))
            .args(std::env::args_os().skip(1))
            .env(MASTER_PID_ENV, std::process::id().to_string())
            .env(CONFIG_ENV, &self.config_json)
            .env(WORKER_ID_ENV, slot.to_string())
            .env(LISTEN_FDS_ENV, sources.len().to_string())
            .env(READY_FD_ENV, control_target.to_string())
            .env_remove(METRICS_FD_ENV)
            .env_remove(METRICS_CELL_ENV)
            // Only the master talks to systemd.
            .env_remove("NOTIFY_SOCKET")
            // Workers are not in the terminal's foreground group: a read of stdin would stop them.
            .stdin(std::process::Stdio::null());
        if let Some(cell) = cell {
            command.env(METRICS_FD_ENV, metrics_target.to_string()).env(METRICS_CELL_ENV, cell.to_string());
        }
        // SAFETY: getpid has no preconditions.
        let master_pid = unsafe { libc::getpid() };
        // SAFETY: between fork and exec the closure only calls dup2, prctl and setpgid, which are
        // async-signal-safe, and touches no memory but its own copies of the descriptor numbers.
        unsafe {
            command.pre_exec(move || {
                for (target, &source) in (FIRST_INHERITED_FD..).zip(&sources) {
                    if libc::dup2(source, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::dup2(control_source, control_target) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(source) = metrics_source {
                    if libc::dup2(source, metrics_target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // A worker must not outlive its master (killed with SIGKILL, say): it stops gracefully.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The master may have died before the line above took effect.
                if libc::getppid() != master_pid {
                    return Err(io::Error::from(io::ErrorKind::BrokenPipe));
                }
                // Out of the terminal's process group: Ctrl-C reaches the master alone, which stops the
                // workers gracefully (a worker seeing both Ctrl-C and the master's SIGTERM would take the
                // second signal as "stop now").
                if libc::setpgid(0, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = tokio::process::Command::from(command).kill_on_drop(false).spawn();
        let child = match child {
            Ok(child) => child,
            Err(err) => {
                if let Some((books, _)) = &mut self.books {
                    books.exited(cell);
                }
                return Err(fail(err));
            }
        };
        drop(worker_end);
        let Some(pid) = WorkerPid::of(&child) else {
            if let Some((books, _)) = &mut self.books {
                books.exited(cell);
            }
            return Err(fail(io::Error::other("the worker exited before its pid was read")));
        };
        let worker = Worker {
            slot,
            started: Instant::now(),
            spawned_at: SystemTime::now(),
            ready: false,
            replaced_by: None,
            retiring: false,
            pending: None,
            retirement: None,
            cell,
        };
        self.workers.insert(pid, worker);
        info!("worker {slot} started (pid {pid})");
        master_end.set_nonblocking(true).map_err(fail)?;
        let control = tokio::net::UnixStream::from_std(master_end).map_err(fail)?;
        tokio::spawn(watch_worker(pid, child, control, self.events.clone()));
        Ok(pid)
    }

    /// Replaces the worker of `slot` — at once if it had been healthy, after a growing delay if it keeps
    /// dying young.
    fn respawn_later(&mut self, slot: usize, lifetime: Duration) {
        let delay = if lifetime >= HEALTHY_LIFETIME {
            self.backoff = RESPAWN_BACKOFF_MIN;
            Duration::ZERO
        } else {
            let delay = self.backoff;
            self.backoff = (self.backoff * 2).min(RESPAWN_BACKOFF_MAX);
            delay
        };
        if !delay.is_zero() {
            info!("worker {slot} died {lifetime:?} after starting; replacing it in {delay:?}");
        }
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::Respawn { slot }).await;
        });
    }

    fn signal_all(&self, signal: libc::c_int) {
        for &pid in self.workers.keys() {
            send_signal(pid, signal);
        }
    }

    /// Waits until every worker exited, or `limit` passed (then SIGKILLs the rest).
    async fn wait_all(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(Event::Exited { pid, status })) => {
                    if let Some(worker) = self.forget(pid) {
                        info!("worker {} (pid {pid}) {}", worker.slot, describe_exit(&status));
                    }
                }
                Ok(Some(Event::Kill { pid })) if self.workers.contains_key(&pid) => {
                    send_signal(pid, libc::SIGKILL);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    warn!("{} workers still running after {limit:?}: killing them", self.workers.len());
                    self.signal_all(libc::SIGKILL);
                    self.workers.clear();
                    return;
                }
            }
        }
    }
}

/// Passes on what worker `pid` says on its control socket, then its exit.
async fn watch_worker(
    pid: WorkerPid,
    mut child: tokio::process::Child,
    mut control: tokio::net::UnixStream,
    events: mpsc::Sender<Event>,
) {
    let mut message = [0u8; 1];
    // Each message means a state the worker reached; one saying it again changes nothing.
    let mut said = Vec::with_capacity(3);
    let status = loop {
        tokio::select! {
            read = control.read(&mut message) => match read {
                Ok(1) if said.contains(&message[0]) => {}
                Ok(1) => {
                    let event = match message[0] {
                        SAYS_READY => Event::Ready { pid },
                        SAYS_MAX_REQUESTS => Event::Retire { pid, reason: Retirement::MaxRequests },
                        SAYS_HARAKIRI => Event::Harakiri { pid },
                        _ => continue,
                    };
                    said.push(message[0]);
                    let _ = events.send(event).await;
                }
                // The worker closed its end (it is exiting): only its exit status is left to wait for.
                _ => break child.wait().await,
            },
            status = child.wait() => break status,
        }
    };
    let _ = events.send(Event::Exited { pid, status }).await;
}

fn send_signal(pid: WorkerPid, signal: libc::c_int) {
    // SAFETY: kill(2) with the pid of one of our children (positive: never a process group) and a valid
    // signal number.
    unsafe { libc::kill(pid.0.get(), signal) };
}

/// A worker's process id. Always positive: `kill(2)` takes 0 for the master's own process group and -1 for
/// every process it may signal, so a pid that is not a real child's cannot be made into one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WorkerPid(std::num::NonZeroI32);

impl WorkerPid {
    /// The pid of a child just spawned; `None` if it has already been reaped (it has none any more).
    fn of(child: &tokio::process::Child) -> Option<Self> {
        let pid = libc::pid_t::try_from(child.id()?).ok().filter(|&pid| pid > 0)?;
        std::num::NonZeroI32::new(pid).map(Self)
    }

    pub(crate) fn get(self) -> u32 {
        self.0.get().unsigned_abs()
    }
}

impl fmt::Display for WorkerPid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
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
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => format!("ended ({status})"),
        },
        Err(err) => format!("could not be waited for ({err})"),
    }
}

/// The lowest descriptor a handed-down copy may use: above 3..3+sockets, the control socket and the
/// metrics region.
fn handoff_floor(sockets: usize) -> RawFd {
    FIRST_INHERITED_FD + RawFd::try_from(sockets).unwrap_or(RawFd::MAX - 8) + 2
}

/// A close-on-exec duplicate of `fd` at or above `floor`.
fn dup_above(fd: RawFd, floor: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own returns a new descriptor or -1.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
    if duplicate < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `duplicate` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(duplicate) })
}
