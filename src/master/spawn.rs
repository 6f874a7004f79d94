//! Starting workers: the command (this very binary re-executed, or the Python interpreter that runs the
//! installed package), what happens between fork and exec, the
//! task that relays what a worker says and its exit, and signalling a worker by a pid that is surely its.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::{error, info};

use super::contract::{
    dup_above, handoff_floor, CONFIG_ENV, FIRST_INHERITED_FD, LISTEN_FDS_ENV, LISTEN_PROTOCOLS_ENV,
    MASTER_PID_ENV, METRICS_CELL_ENV, METRICS_FD_ENV, READY_FD_ENV, SAYS_HARAKIRI, SAYS_MAX_REQUESTS,
    SAYS_READY, WORKER_ID_ENV,
};
use super::lifecycle::{
    Phase, Retirement, Worker, HEALTHY_LIFETIME, RESPAWN_BACKOFF_MAX, RESPAWN_BACKOFF_MIN,
};
use super::{Event, MasterError, Supervisor};

/// `/proc/self/exe`: the binary this process runs, even once the file was replaced or removed.
pub(super) const RUNNING_EXECUTABLE: &str = "/proc/self/exe";

/// How the master starts a worker: the program, its `argv[0]`, its arguments. A worker takes its config
/// from the master ([`CONFIG_ENV`]), so the arguments only tell `ps` what it runs.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    program: PathBuf,
    /// `None`: the program's path.
    arg0: Option<OsString>,
    args: Vec<OsString>,
}

impl WorkerCommand {
    /// The running binary re-executed, even if a package upgrade replaced the file on disk since: a worker
    /// must run the master's code. `argv` is the master's command line (program name first); argv[0] stays
    /// what the master was started as, for `ps`.
    pub fn this_binary(argv: &[OsString]) -> Self {
        Self {
            program: RUNNING_EXECUTABLE.into(),
            arg0: Some(argv.first().cloned().unwrap_or_else(|| "oxwsgi".into())),
            args: argv.iter().skip(1).cloned().collect(),
        }
    }

    /// `interpreter leading... argv[1..]`, e.g. `/srv/venv/bin/python -m oxwsgi --socket ...`: how the
    /// installed Python package starts its workers. The interpreter is started by its own path, which stays
    /// its argv[0]: a virtualenv's `python` is a link to the base interpreter and finds the virtualenv's
    /// packages from the path it was started as, which `/proc/self/exe` would resolve away.
    pub fn interpreter(interpreter: PathBuf, leading: &[OsString], argv: &[OsString]) -> Self {
        let args = leading.iter().chain(argv.iter().skip(1)).cloned().collect();
        Self { program: interpreter, arg0: None, args }
    }
}

impl Supervisor<'_> {
    /// Starts a worker for `slot`, with a task relaying what it says and when it exits. Returns its pid.
    pub(super) fn spawn(&mut self, slot: usize) -> Result<WorkerPid, MasterError> {
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
        let mut command = std::process::Command::new(&self.worker_command.program);
        if let Some(arg0) = &self.worker_command.arg0 {
            command.arg0(arg0);
        }
        command
            .args(&self.worker_command.args)
            .env(MASTER_PID_ENV, std::process::id().to_string())
            .env(CONFIG_ENV, &self.config_json)
            .env(WORKER_ID_ENV, slot.to_string())
            .env(LISTEN_FDS_ENV, sources.len().to_string())
            .env(LISTEN_PROTOCOLS_ENV, &self.socket_protocols)
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
        let master_pid = nix::unistd::getpid().as_raw();
        // SAFETY: between fork and exec the closure only calls dup2, prctl, setpgid and signal, which are
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
                // SIGUSR1 (reopen the log), forwarded while the worker starts, must not kill it before it
                // installs its handler: an ignored signal stays ignored across exec (a handler would not).
                if libc::signal(libc::SIGUSR1, libc::SIG_IGN) == libc::SIG_ERR {
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
            phase: Phase::STARTING,
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

    /// Starts a worker for `slot`; if that fails (fork limits, ...), tries again after the back-off rather
    /// than leaving the slot empty.
    pub(super) fn spawn_or_retry(&mut self, slot: usize) {
        if let Err(err) = self.spawn(slot) {
            error!("{err}");
            self.respawn_later(slot, Duration::ZERO);
        }
    }

    /// Replaces the worker of `slot` — at once if it had been healthy, after a growing delay if it keeps
    /// dying young.
    pub(super) fn respawn_later(&mut self, slot: usize, lifetime: Duration) {
        let (delay, backoff) = respawn_delay(self.backoff, lifetime);
        self.backoff = backoff;
        if !delay.is_zero() {
            info!("worker {slot} died {lifetime:?} after starting; replacing it in {delay:?}");
        }
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(Event::Respawn { slot }).await;
        });
    }
}

/// How long to wait before replacing a worker that died after `lifetime`, and the back-off for the next
/// one: at once after a healthy life (and the back-off starts over), else the current back-off, doubled
/// for next time up to [`RESPAWN_BACKOFF_MAX`], so an app that crashes at start is not re-imported in a
/// tight loop.
pub(super) fn respawn_delay(backoff: Duration, lifetime: Duration) -> (Duration, Duration) {
    if lifetime >= HEALTHY_LIFETIME {
        (Duration::ZERO, RESPAWN_BACKOFF_MIN)
    } else {
        (backoff, (backoff * 2).min(RESPAWN_BACKOFF_MAX))
    }
}

/// Passes on what worker `pid` says on its control socket, then its exit.
pub(super) async fn watch_worker(
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

/// Signals worker `pid`. A worker that has just exited (and is not reaped yet) makes it fail harmlessly.
pub(super) fn send_signal(pid: WorkerPid, signal: Signal) {
    // The pid is positive, so never a process group (`WorkerPid`).
    let _ = nix::sys::signal::kill(Pid::from_raw(pid.0.get()), signal);
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

#[cfg(test)]
impl WorkerPid {
    /// A pid for tests of the lifecycle, which never signal it.
    pub(super) fn fake(pid: i32) -> Self {
        Self(std::num::NonZeroI32::new(pid).expect("a positive test pid"))
    }
}

impl fmt::Display for WorkerPid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respawns_back_off_while_workers_die_young_and_start_over_after_a_healthy_one() {
        let young = HEALTHY_LIFETIME / 2;
        let mut backoff = RESPAWN_BACKOFF_MIN;
        let mut delays = Vec::new();
        for _ in 0..8 {
            let (delay, next) = respawn_delay(backoff, young);
            delays.push(delay);
            backoff = next;
        }
        assert_eq!(delays[0], RESPAWN_BACKOFF_MIN);
        assert!(
            delays.windows(2).all(|pair| pair[1] == (pair[0] * 2).min(RESPAWN_BACKOFF_MAX)),
            "{delays:?}"
        );
        assert_eq!(delays.last(), Some(&RESPAWN_BACKOFF_MAX), "capped");
        assert_eq!(respawn_delay(backoff, HEALTHY_LIFETIME), (Duration::ZERO, RESPAWN_BACKOFF_MIN));
    }
}
