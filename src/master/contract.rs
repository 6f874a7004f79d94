//! The master↔worker contract: what a master hands a worker it starts — the listening sockets at fixed
//! descriptors, a control socket, the metrics region, its validated config — and how the worker names and
//! takes them ([`Inherited`]), and what the worker says back on the control socket ([`Control`]). Both sides
//! of every environment variable and descriptor number are here.

use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use tracing::{error, warn};

use crate::config::{Config, RecycleConfig};
use crate::metrics::{Recorder, Region};
use crate::server::{self, BoundSocket, Protocol};

/// Set in a worker's environment: its number, from 1 (apps may read it too).
pub const WORKER_ID_ENV: &str = "OXWSGI_WORKER_ID";

/// The master's pid, so a worker knows the other variables were meant for it (their parent set them).
pub(super) const MASTER_PID_ENV: &str = "OXWSGI_MASTER_PID";

/// The master's validated config, as JSON: a worker never parses the command line again, so it cannot
/// disagree with its master about an option (nor fail on one the master accepted).
pub(super) const CONFIG_ENV: &str = "OXWSGI_CONFIG";

/// Set in a worker's environment: how many listening sockets it inherits, at descriptors 3, 4, ...
pub(super) const LISTEN_FDS_ENV: &str = "OXWSGI_LISTEN_FDS";

/// Set in a worker's environment: what each inherited socket speaks, in order (`uwsgi,http`).
pub(super) const LISTEN_PROTOCOLS_ENV: &str = "OXWSGI_LISTEN_PROTOCOLS";

/// Set in a worker's environment: the descriptor of its control socket to the master.
pub(super) const READY_FD_ENV: &str = "OXWSGI_READY_FD";

/// Set in a worker's environment when the master serves metrics: the descriptor of the shared metrics
/// region, and which cell of it the worker counts in.
pub(super) const METRICS_FD_ENV: &str = "OXWSGI_METRICS_FD";

pub(super) const METRICS_CELL_ENV: &str = "OXWSGI_METRICS_CELL";

/// The first descriptor a worker inherits a socket at, after stdin, stdout and stderr.
pub(super) const FIRST_INHERITED_FD: RawFd = 3;

/// What a worker inherited from its master. The descriptors are owned from the moment the variables
/// naming them are read, so each has exactly one owner; [`Inherited::into_handoff`] hands them on.
#[derive(Debug)]
pub struct Inherited {
    pub worker_id: usize,
    /// The master's config.
    pub config: Config,
    listeners: Vec<OwnedFd>,
    /// What each listener speaks (`uwsgi` when the variable names none).
    protocols: Vec<Protocol>,
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
        let protocols = std::env::var(LISTEN_PROTOCOLS_ENV).unwrap_or_default();
        let protocols: Vec<Protocol> = protocols.split(',').map(Protocol::from_name).collect();
        let control = fd(READY_FD_ENV);
        let metrics = fd(METRICS_FD_ENV).zip(number(METRICS_CELL_ENV));
        let config = std::env::var(CONFIG_ENV).ok();
        for name in [
            MASTER_PID_ENV,
            CONFIG_ENV,
            LISTEN_FDS_ENV,
            LISTEN_PROTOCOLS_ENV,
            READY_FD_ENV,
            METRICS_FD_ENV,
            METRICS_CELL_ENV,
        ] {
            // SAFETY: called at start-up, before any other thread exists.
            unsafe { std::env::remove_var(name) };
        }
        let (Some(master), Some(worker_id), Some(listen_fds), Some(control)) =
            (master, worker_id, listen_fds, control)
        else {
            return Ok(None);
        };
        let parent = usize::try_from(nix::unistd::getppid().as_raw()).ok();
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
        Ok(Some(Self { worker_id, config, listeners: listeners.collect(), protocols, control, metrics }))
    }

    /// Puts the descriptors to use. Fails if a listening socket is not one.
    pub fn into_handoff(self) -> io::Result<Handoff> {
        let protocols = self.protocols.into_iter().chain(std::iter::repeat(Protocol::Uwsgi));
        let sockets = self
            .listeners
            .into_iter()
            .zip(protocols)
            .map(|(fd, protocol)| server::adopt(fd).map(|socket| socket.speaking(protocol)))
            .collect::<io::Result<_>>()?;
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
pub(super) const KNUTH_MULTIPLIER: u64 = 2_654_435_761;

/// What a worker tells its master, one byte each.
pub(super) const SAYS_READY: u8 = b'R';

pub(super) const SAYS_MAX_REQUESTS: u8 = b'M';

pub(super) const SAYS_HARAKIRI: u8 = b'H';

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
    /// [`HARAKIRI_GRACE`](super::lifecycle::HARAKIRI_GRACE), time enough to log where the request is stuck.
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

/// The lowest descriptor a handed-down copy may use: above 3..3+sockets, the control socket and the
/// metrics region.
pub(super) fn handoff_floor(sockets: usize) -> RawFd {
    FIRST_INHERITED_FD + RawFd::try_from(sockets).unwrap_or(RawFd::MAX - 8) + 2
}

/// A close-on-exec duplicate of `fd` at or above `floor`.
pub(super) fn dup_above(fd: RawFd, floor: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own returns a new descriptor or -1.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, floor) };
    if duplicate < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `duplicate` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(duplicate) })
}
