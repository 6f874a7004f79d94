//! Where the log goes and what its lines look like: stderr, or the `--logto` file put in stderr's place
//! (so Python's own writes to `sys.stderr` land there too), reopened on SIGUSR1; lines as text or as one
//! JSON object each (`--log-format`). Every process sets this up for itself — the master and each worker —
//! so each reopens the file on its own signal. No pyo3 here.

use std::ffi::{CStr, CString};
use std::io::{self, IsTerminal};
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Owner read-write, group read: log shippers often run in the file's group; others may not read it
/// (request lines carry URLs and addresses).
const LOG_FILE_MODE: libc::c_uint = 0o640;

/// The signal that reopens `--logto`, as nginx and gunicorn use it for their logs.
pub const REOPEN_SIGNAL: Signal = Signal::SIGUSR1;

/// The `--logto` path, for the signal handler (which may not allocate). Set once, before the handler is
/// installed.
static LOGTO: OnceLock<CString> = OnceLock::new();

/// Why the log cannot be set up, by kind.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--logto {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("cannot handle {REOPEN_SIGNAL}: {0}")]
    Signal(nix::Error),
}

/// Sends the log where `config` says and installs the subscriber. Called once per process, before any
/// thread starts and before Python.
pub fn init(config: &LogConfig) -> Result<(), LogError> {
    // The handler first: from here SIGUSR1 never kills this process. (A worker inherits it ignored from
    // its master until this line, so a signal forwarded while it starts is not fatal either.)
    let handler = SigAction::new(SigHandler::Handler(on_reopen_signal), SaFlags::SA_RESTART, SigSet::empty());
    // SAFETY: the handler only reads a `OnceLock` set before any signal can need it and calls
    // async-signal-safe functions (open, dup2, close), saving and restoring errno.
    unsafe { sigaction(REOPEN_SIGNAL, &handler) }.map_err(LogError::Signal)?;
    if let Some(path) = &config.file {
        let open_error = |source| LogError::Open { path: path.display().to_string(), source };
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| open_error(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let c_path = LOGTO.get_or_init(|| c_path);
        redirect_stderr(c_path).map_err(open_error)?;
    }
    let filter = EnvFilter::try_from_env("OXWSGI_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(io::stderr);
    match config.format {
        LogFormat::Text => builder.with_ansi(io::stderr().is_terminal()).init(),
        // The event's fields at the top level, beside `timestamp` (RFC 3339, UTC), `level` and `target`.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    Ok(())
}

/// Reopens `--logto` (the master on its SIGUSR1). `Ok(false)` without `--logto`.
pub fn reopen() -> io::Result<bool> {
    match LOGTO.get() {
        Some(path) => redirect_stderr(path).map(|()| true),
        None => Ok(false),
    }
}

/// Opens `path` for appending and puts it at descriptor 2. Only async-signal-safe calls: the signal handler
/// uses it. Lines written meanwhile go to one file or the other, never half to each (a write to descriptor
/// 2 finds either the old file or the new one).
fn redirect_stderr(path: &CStr) -> io::Result<()> {
    let flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC;
    // SAFETY: `path` is a valid C string; open returns a new descriptor or -1.
    let fd = unsafe { libc::open(path.as_ptr(), flags, LOG_FILE_MODE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are open; dup2 replaces 2 atomically (and clears close-on-exec on it).
    let moved = unsafe { libc::dup2(fd, libc::STDERR_FILENO) };
    let result = if moved < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: `fd` is ours and no longer needed (2 is its copy).
    unsafe { libc::close(fd) };
    result
}

extern "C" fn on_reopen_signal(_: libc::c_int) {
    // SAFETY: errno is thread-local; the interrupted code must find it as it left it.
    let errno = unsafe { *libc::__errno_location() };
    if let Some(path) = LOGTO.get() {
        // Nowhere to report a failure from a handler: the master reopens the same path on the same signal
        // and logs why it could not.
        let _ = redirect_stderr(path);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}
