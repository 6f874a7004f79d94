//! The master process: binds every socket once, starts the worker processes by re-executing this binary
//! with the listening sockets inherited, replaces workers that die, and stops them on a signal.
//!
//! The master never starts Python, and never forks without exec (neither Python nor tokio survives a fork):
//! each worker is a fresh `exec` of `oxwsgi` with the same options, told by environment variables that it is worker N and which
//! descriptors hold its sockets. No pyo3 here.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::server::{self, BoundSocket};

/// Set in a worker's environment: its number, from 1 (apps may read it too).
pub const WORKER_ID_ENV: &str = "OXWSGI_WORKER_ID";
/// Set in a worker's environment: how many listening sockets it inherits, at descriptors 3, 4, ...
const LISTEN_FDS_ENV: &str = "OXWSGI_LISTEN_FDS";
/// Set in a worker's environment: the descriptor on which it reports that it accepts.
const READY_FD_ENV: &str = "OXWSGI_READY_FD";
/// The first descriptor a worker inherits a socket at, after stdin, stdout and stderr.
const FIRST_INHERITED_FD: RawFd = 3;
/// Where the master keeps the descriptors it hands down, above anything a worker's fixed numbers
/// (3, 4, ...) could overwrite while they are being moved into place.
const HANDOFF_FD_BASE: RawFd = 1000;
/// First delay before replacing a worker that died soon after starting; doubles up to the maximum, so a
/// worker crashing at every request does not spin the machine.
const RESPAWN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESPAWN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that served this long was healthy: the next one that dies is replaced at once.
const HEALTHY_LIFETIME: Duration = Duration::from_secs(10);
/// After the graceful timeout, workers get this long for their own clean-up before SIGKILL.
const KILL_AFTER_GRACE: Duration = Duration::from_secs(15);

/// What a worker inherited from its master.
#[derive(Debug, Clone, Copy)]
pub struct Inherited {
    pub worker_id: usize,
    listen_fds: usize,
    ready_fd: RawFd,
}

impl Inherited {
    /// `Some` in a worker started by a master.
    pub fn from_env() -> Option<Self> {
        let number = |name| std::env::var(name).ok()?.parse().ok();
        Some(Self {
            worker_id: number(WORKER_ID_ENV)?,
            listen_fds: number(LISTEN_FDS_ENV)?,
            ready_fd: number(READY_FD_ENV).and_then(|fd: usize| RawFd::try_from(fd).ok())?,
        })
    }

    /// The listening sockets, in the order of the `--socket` options.
    pub fn sockets(&self, config: &Config) -> io::Result<Vec<BoundSocket>> {
        if self.listen_fds != config.sockets.len() {
            let message = format!(
                "inherited {} sockets for {} --socket options",
                self.listen_fds,
                config.sockets.len()
            );
            return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
        }
        (FIRST_INHERITED_FD..)
            .zip(&config.sockets)
            // SAFETY: the master placed exactly these listening sockets at these descriptors, and this
            // process opened nothing there before reading them.
            .map(|(fd, spec)| unsafe { BoundSocket::inherited(fd, spec.clone()) })
            .collect()
    }

    /// Tells the master this worker accepts on every socket.
    pub fn report_ready(&self) {
        // SAFETY: the master put our end of the readiness socket at this descriptor; nothing else uses it.
        let mut channel = unsafe { UnixStream::from_raw_fd(self.ready_fd) };
        if let Err(err) = channel.write_all(b"R") {
            warn!("cannot tell the master this worker is ready: {err}");
        }
    }
}

/// Why the master stopped on its own.
#[derive(Debug)]
pub struct MasterError(String);

impl fmt::Display for MasterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MasterError {}

/// Binds, starts the workers and supervises them until a stop signal.
pub fn run(config: &Config) -> Result<(), MasterError> {
    let mut sockets = Vec::with_capacity(config.sockets.len());
    for spec in &config.sockets {
        let socket = server::bind(spec, &config.server)
            .map_err(|err| MasterError(format!("cannot listen on {spec}: {err}")))?;
        sockets.push(socket);
    }
    let socket_files: Vec<PathBuf> = config
        .sockets
        .iter()
        .filter_map(|spec| match spec {
            crate::config::SocketSpec::Unix(path) => Some(path.clone()),
            crate::config::SocketSpec::Tcp(_) => None,
        })
        .collect();
    let handoff = sockets
        .iter()
        .map(|socket| dup_high(socket.as_raw_fd()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|err| MasterError(format!("cannot prepare the sockets for the workers: {err}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| MasterError(format!("cannot start the master's runtime: {err}")))?;
    let result = runtime.block_on(Supervisor::new(config, handoff).supervise());
    if config.server.vacuum {
        server::remove_socket_files(&socket_files);
    }
    drop(sockets);
    result
}

/// What the workers' tasks tell the supervisor.
enum Event {
    Ready {
        id: usize,
        pid: u32,
    },
    Exited {
        id: usize,
        pid: u32,
        status: io::Result<ExitStatus>,
        was_ready: bool,
        lifetime: Duration,
    },
    /// A replacement's back-off delay is over.
    Respawn {
        id: usize,
    },
}

struct Supervisor<'a> {
    config: &'a Config,
    /// The listening sockets, at descriptors above [`HANDOFF_FD_BASE`].
    handoff: Vec<OwnedFd>,
    /// Live workers: id to pid.
    workers: HashMap<usize, u32>,
    events: mpsc::UnboundedSender<Event>,
    inbox: mpsc::UnboundedReceiver<Event>,
    backoff: Duration,
}

impl<'a> Supervisor<'a> {
    fn new(config: &'a Config, handoff: Vec<OwnedFd>) -> Self {
        let (events, inbox) = mpsc::unbounded_channel();
        Self { config, handoff, workers: HashMap::new(), events, inbox, backoff: RESPAWN_BACKOFF_MIN }
    }

    async fn supervise(mut self) -> Result<(), MasterError> {
        let signal_error = |err: io::Error| MasterError(format!("cannot install signal handlers: {err}"));
        let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
        let mut quit = signal(SignalKind::quit()).map_err(signal_error)?;
        let count = self.config.processes.workers.get();
        for id in 1..=count {
            self.spawn(id)?;
        }
        let mut ready = 0;
        let stop = loop {
            tokio::select! {
                event = self.inbox.recv() => match event.expect("the supervisor holds a sender") {
                    Event::Ready { id, pid } => {
                        info!("worker {id} (pid {pid}) ready");
                        ready += 1;
                        if ready == count {
                            info!("master ready: {count} workers");
                        }
                    }
                    Event::Exited { id, pid, status, was_ready, lifetime } => {
                        self.workers.remove(&id);
                        let how = describe_exit(&status);
                        if !was_ready {
                            error!("worker {id} (pid {pid}) could not start: it {how}");
                            self.stop_all(libc::SIGTERM);
                            self.wait_all(self.config.server.graceful_timeout).await;
                            return Err(MasterError(format!(
                                "worker {id} could not start (it {how}); the app fails to load, see the worker's error above"
                            )));
                        }
                        warn!("worker {id} (pid {pid}) {how}; starting a new one");
                        self.respawn_later(id, lifetime);
                    }
                    Event::Respawn { id } => {
                        if let Err(err) = self.spawn(id) {
                            error!("{err}");
                        }
                    }
                },
                _ = terminate.recv() => break "SIGTERM",
                _ = interrupt.recv() => break "SIGINT",
                _ = quit.recv() => {
                    info!("SIGQUIT received: stopping the workers now");
                    self.stop_all(libc::SIGKILL);
                    self.wait_all(KILL_AFTER_GRACE).await;
                    return Ok(());
                }
            }
        };
        let grace = self.config.server.graceful_timeout;
        info!("{stop} received: workers finish their requests (up to {grace:?}), then the master exits");
        self.stop_all(libc::SIGTERM);
        tokio::select! {
            () = self.wait_all(grace + KILL_AFTER_GRACE) => {}
            () = next_signal(&mut terminate, &mut interrupt) => {
                warn!("stop signal received again: stopping the workers now");
                self.stop_all(libc::SIGKILL);
                self.wait_all(KILL_AFTER_GRACE).await;
            }
        }
        Ok(())
    }

    /// Starts worker `id`, with a task reporting when it is ready and when it exits.
    fn spawn(&mut self, id: usize) -> Result<(), MasterError> {
        let fail = |err: io::Error| MasterError(format!("cannot start worker {id}: {err}"));
        let (master_end, worker_end) = UnixStream::pair().map_err(fail)?;
        let worker_end = dup_high(worker_end.as_raw_fd()).map_err(fail)?;
        let sources: Vec<RawFd> = self.handoff.iter().map(AsRawFd::as_raw_fd).collect();
        let ready_source = worker_end.as_raw_fd();
        let ready_target = FIRST_INHERITED_FD + RawFd::try_from(sources.len()).unwrap_or(RawFd::MAX);
        let executable = std::env::current_exe().map_err(fail)?;
        let mut command = std::process::Command::new(executable);
        command
            .args(std::env::args_os().skip(1))
            .env(WORKER_ID_ENV, id.to_string())
            .env(LISTEN_FDS_ENV, sources.len().to_string())
            .env(READY_FD_ENV, ready_target.to_string());
        // SAFETY: between fork and exec the closure only calls dup2 and prctl, which are async-signal-safe,
        // and touches no memory but its own copies of the descriptor numbers.
        unsafe {
            command.pre_exec(move || {
                for (target, &source) in (FIRST_INHERITED_FD..).zip(&sources) {
                    if libc::dup2(source, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::dup2(ready_source, ready_target) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // A worker must not outlive its master (killed with SIGKILL, say): it stops gracefully.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(io::Error::last_os_error());
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
        let mut child = tokio::process::Command::from(command).kill_on_drop(false).spawn().map_err(fail)?;
        drop(worker_end);
        let pid = child.id().unwrap_or_default();
        let started = Instant::now();
        self.workers.insert(id, pid);
        info!("worker {id} started (pid {pid})");
        master_end.set_nonblocking(true).map_err(fail)?;
        let mut readiness = tokio::net::UnixStream::from_std(master_end).map_err(fail)?;
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut byte = [0u8; 1];
            let was_ready = tokio::select! {
                read = readiness.read(&mut byte) => matches!(read, Ok(1)),
                _ = child.wait() => false,
            };
            if was_ready {
                let _ = events.send(Event::Ready { id, pid });
            }
            let status = child.wait().await;
            let _ = events.send(Event::Exited { id, pid, status, was_ready, lifetime: started.elapsed() });
        });
        Ok(())
    }

    /// Replaces worker `id` — at once if it had been healthy, after a growing delay if it keeps dying young.
    fn respawn_later(&mut self, id: usize, lifetime: Duration) {
        let delay = if lifetime >= HEALTHY_LIFETIME {
            self.backoff = RESPAWN_BACKOFF_MIN;
            Duration::ZERO
        } else {
            let delay = self.backoff;
            self.backoff = (self.backoff * 2).min(RESPAWN_BACKOFF_MAX);
            delay
        };
        if delay.is_zero() {
            if let Err(err) = self.spawn(id) {
                error!("{err}");
            }
            return;
        }
        info!("worker {id} died {lifetime:?} after starting; replacing it in {delay:?}");
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::Respawn { id });
        });
    }

    fn stop_all(&self, signal: libc::c_int) {
        for &pid in self.workers.values() {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) with a pid of our own child and a valid signal number.
                unsafe { libc::kill(pid, signal) };
            }
        }
    }

    /// Waits until every worker exited, or `limit` passed (then SIGKILLs the rest and waits for them).
    async fn wait_all(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, self.inbox.recv()).await {
                Ok(Some(Event::Exited { id, pid, status, .. })) => {
                    if self.workers.get(&id) == Some(&pid) {
                        self.workers.remove(&id);
                        info!("worker {id} (pid {pid}) {}", describe_exit(&status));
                    }
                }
                Ok(Some(Event::Ready { .. } | Event::Respawn { .. })) => {}
                Ok(None) | Err(_) => {
                    warn!("{} workers still running after {limit:?}: killing them", self.workers.len());
                    self.stop_all(libc::SIGKILL);
                    self.workers.clear();
                    return;
                }
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
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => format!("ended ({status})"),
        },
        Err(err) => format!("could not be waited for ({err})"),
    }
}

/// A close-on-exec duplicate of `fd` at or above [`HANDOFF_FD_BASE`].
fn dup_high(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own returns a new descriptor or -1.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, HANDOFF_FD_BASE) };
    if duplicate < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `duplicate` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(duplicate) })
}
