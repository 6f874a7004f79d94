//! What the two design prototypes share, so that they differ only in how a request travels between
//! threads: the command line, binding and forking, framing the uwsgi packet, and the Python side (a fresh
//! environ per request, `start_response`, iterating the response). Both include it with
//! `#[path = "common.rs"] mod common;`.
//!
//! The Python side is deliberately minimal but does what any real server must per request: every var
//! becomes a latin-1 `str`, `wsgi.input` is an `io.BytesIO`, chunks must be `bytes`, `close()` is called.
//! There is no `write()` callable and no streaming: the whole response is collected, then written.

use std::error::Error;
use std::ffi::CString;
use std::fs::Permissions;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use oxwsgi_proto::{parse_packet, Limits, Vars, MODIFIER_WSGI};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyModule, PyString, PyTuple};
use socket2::{Domain, SockAddr, Socket, Type};

/// Listen backlog, as the real server's `--listen` default: connections wait here while every thread is busy.
const LISTEN_BACKLOG: i32 = 1024;

/// Largest request body accepted. The body is buffered whole for `io.BytesIO`, so it must be bounded; the
/// benchmark sends none.
const MAX_BODY: usize = 1024 * 1024;

/// How long a connection may stay silent while its request is read, or stalled while its response is
/// written: the real server's `--socket-timeout` default (and uWSGI's).
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(4);

/// Pause after an accept error such as `EMFILE`, which would otherwise repeat at once, in a busy loop.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// What nginx gets when the app raised or broke WSGI (the traceback goes to stderr).
const INTERNAL_ERROR_HEAD: &[u8] =
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 22\r\n\r\n";
const INTERNAL_ERROR_BODY: &[u8] = b"Internal Server Error\n";

#[derive(Parser)]
pub struct Cli {
    /// Unix socket path, or HOST:PORT for TCP.
    #[arg(long)]
    pub socket: String,
    /// Python file whose `application` attribute is the WSGI app.
    #[arg(long)]
    pub wsgi_file: PathBuf,
    /// Python threads per process.
    #[arg(long, default_value = "1")]
    pub threads: NonZeroUsize,
    /// Worker processes, forked after binding and before Python or tokio start.
    #[arg(long, default_value = "1")]
    pub processes: NonZeroUsize,
}

pub type BoxError = Box<dyn Error>;

/// What the listening socket is, so a design can wrap it in the matching tokio type.
#[derive(Clone, Copy)]
pub enum Kind {
    Unix,
    Tcp,
}

/// The bound, non-blocking listening socket (both designs accept until `EAGAIN`).
pub struct Listener {
    pub fd: OwnedFd,
    pub kind: Kind,
}

/// Parses the command line, binds, and runs `worker` in this process or, with `--processes N`, in N forked
/// children.
pub fn main(worker: fn(&Cli, &Listener) -> Result<(), BoxError>) -> ExitCode {
    let cli = Cli::parse();
    let result = match bind(&cli.socket) {
        Err(err) => Err(format!("cannot listen on {}: {err}", cli.socket).into()),
        Ok(listener) => {
            let kind = match listener.kind {
                Kind::Unix => "Unix",
                Kind::Tcp => "TCP",
            };
            let (processes, threads) = (cli.processes, cli.threads);
            eprintln!(
                "listening on {kind} socket {}: {processes} process(es) of {threads} thread(s)",
                cli.socket
            );
            if processes.get() == 1 {
                worker(&cli, &listener)
            } else {
                supervise(&cli, &listener, worker)
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn bind(socket: &str) -> io::Result<Listener> {
    let (sock, kind) = if let Ok(addr) = socket.parse::<SocketAddr>() {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        sock.set_reuse_address(true)?; // a restart must not wait for TIME_WAIT
        sock.bind(&addr.into())?;
        (sock, Kind::Tcp)
    } else {
        match std::fs::remove_file(socket) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        sock.bind(&SockAddr::unix(socket)?)?;
        // nginx's workers may run as another user, and must be able to connect.
        std::fs::set_permissions(socket, Permissions::from_mode(0o666))?;
        (sock, Kind::Unix)
    };
    sock.listen(LISTEN_BACKLOG)?;
    sock.set_nonblocking(true)?;
    Ok(Listener { fd: sock.into(), kind })
}

/// Forks the workers and waits; SIGINT or SIGTERM is passed on to them as SIGTERM.
fn supervise(
    cli: &Cli,
    listener: &Listener,
    worker: fn(&Cli, &Listener) -> Result<(), BoxError>,
) -> Result<(), BoxError> {
    // SAFETY: the sigset_t values are initialised by sigemptyset before any other use, and the signal
    // numbers are valid. The signals are blocked before forking so that none is lost before sigwait; each
    // child restores the old mask.
    let (waited, old) = unsafe {
        let mut waited = std::mem::zeroed::<libc::sigset_t>();
        let mut old = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&raw mut waited);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD] {
            libc::sigaddset(&raw mut waited, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const waited, &raw mut old);
        (waited, old)
    };
    let mut children = Vec::new();
    for _ in 0..cli.processes.get() {
        // SAFETY: this process has one thread and has started neither Python nor tokio, so the child gets a
        // consistent copy of everything.
        match unsafe { libc::fork() } {
            -1 => {
                terminate(&children);
                return Err(io::Error::last_os_error().into());
            }
            0 => {
                // SAFETY: `old` is the mask saved above.
                unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &raw const old, std::ptr::null_mut()) };
                let code = match worker(cli, listener) {
                    Ok(()) => 0,
                    Err(err) => {
                        eprintln!("error: {err}");
                        1
                    }
                };
                std::process::exit(code);
            }
            pid => children.push(pid),
        }
    }
    while !children.is_empty() {
        let mut signal = 0;
        // SAFETY: `waited` is an initialised set, and `signal` a valid place for the result.
        unsafe { libc::sigwait(&raw const waited, &raw mut signal) };
        if signal != libc::SIGCHLD {
            terminate(&children);
            continue;
        }
        let mut status = 0;
        // SAFETY: `status` is a valid place for the exit status; WNOHANG never blocks.
        while let pid @ 1.. = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) } {
            children.retain(|&child| child != pid);
        }
    }
    Ok(())
}

fn terminate(children: &[libc::pid_t]) {
    for &child in children {
        // SAFETY: `child` is a child of ours that has not been reaped, so its pid cannot have been reused.
        unsafe { libc::kill(child, libc::SIGTERM) };
    }
}

/// Runs the file as a module and returns its `application`.
pub fn load_app(py: Python<'_>, path: &Path) -> Result<Py<PyAny>, BoxError> {
    let code = CString::new(std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?)?;
    let file_name = CString::new(path.to_string_lossy().into_owned())?;
    let module_name = CString::new(path.file_stem().unwrap_or_default().to_string_lossy().into_owned())?;
    let loaded = PyModule::from_code(py, &code, &file_name, &module_name)
        .and_then(|module| module.getattr("application"))
        .map_err(|err| {
            err.display(py);
            format!("cannot load the app from {}", path.display())
        })?;
    Ok(loaded.unbind())
}

/// Where a read buffer stands.
pub enum Frame<'a> {
    /// The packet, or the body after it, has not fully arrived.
    Incomplete,
    Request {
        vars: Vars<'a>,
        body: &'a [u8],
    },
    /// Malformed, not a WSGI request (modifier1 0), or a body over [`MAX_BODY`]: close the connection.
    Bad,
}

/// The request at the start of `buf`: the packet, then `CONTENT_LENGTH` bytes of body.
pub fn frame(buf: &[u8]) -> Frame<'_> {
    let (packet, consumed) = match parse_packet(buf, &Limits::default()) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return Frame::Incomplete,
        Err(_) => return Frame::Bad,
    };
    if packet.header.modifier1 != MODIFIER_WSGI {
        return Frame::Bad;
    }
    let length = match packet.vars.get(b"CONTENT_LENGTH") {
        None | Some(b"") => 0,
        Some(digits) => match parse_length(digits) {
            Some(length) => length,
            None => return Frame::Bad,
        },
    };
    match buf.get(consumed..consumed + length) {
        Some(body) => Frame::Request { vars: packet.vars, body },
        None => Frame::Incomplete,
    }
}

/// A decimal `CONTENT_LENGTH` up to [`MAX_BODY`]; digits only, so nothing overflows.
fn parse_length(digits: &[u8]) -> Option<usize> {
    let mut length = 0usize;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        length = length * 10 + usize::from(digit - b'0');
        if length > MAX_BODY {
            return None;
        }
    }
    Some(length)
}

/// A complete response: the head (status line, headers, blank line) and the body.
pub struct Response {
    pub head: Vec<u8>,
    pub body: Vec<u8>,
}

/// One thread's handle on the app and what every environ shares.
pub struct Wsgi {
    app: Py<PyAny>,
    bytes_io: Py<PyAny>,
    /// `wsgi.*` entries that are the same for every request; each environ starts as a copy.
    constants: Py<PyDict>,
    input_key: Py<PyString>,
}

impl Wsgi {
    pub fn new(py: Python<'_>, app: &Py<PyAny>, cli: &Cli) -> PyResult<Self> {
        let constants = PyDict::new(py);
        constants.set_item("wsgi.version", (1, 0))?;
        constants.set_item("wsgi.url_scheme", "http")?;
        constants.set_item("wsgi.errors", py.import("sys")?.getattr("stderr")?)?;
        constants.set_item("wsgi.multithread", cli.threads.get() > 1)?;
        constants.set_item("wsgi.multiprocess", cli.processes.get() > 1)?;
        constants.set_item("wsgi.run_once", false)?;
        Ok(Self {
            app: app.clone_ref(py),
            bytes_io: py.import("io")?.getattr("BytesIO")?.unbind(),
            constants: constants.unbind(),
            input_key: PyString::intern(py, "wsgi.input").unbind(),
        })
    }

    /// Runs the app for one request; a failure is printed with its traceback and answered with a 500.
    pub fn call(&self, py: Python<'_>, vars: Vars<'_>, body: &[u8]) -> Response {
        self.try_call(py, vars, body).unwrap_or_else(|err| {
            err.display(py);
            Response { head: INTERNAL_ERROR_HEAD.to_vec(), body: INTERNAL_ERROR_BODY.to_vec() }
        })
    }

    fn try_call(&self, py: Python<'_>, vars: Vars<'_>, body: &[u8]) -> PyResult<Response> {
        let environ = self.constants.bind(py).copy()?;
        for (key, value) in vars {
            environ.set_item(latin1(py, key)?, latin1(py, value)?)?;
        }
        environ
            .set_item(self.input_key.bind(py), self.bytes_io.bind(py).call1((PyBytes::new(py, body),))?)?;
        let start_response = Bound::new(py, StartResponse { head: None })?;
        let iterable = self.app.bind(py).call1((environ, &start_response))?;
        let collected = collect(&iterable);
        let closed = close(&iterable);
        let body = collected?;
        closed?;
        let head = start_response.borrow_mut().head.take();
        let head = head.ok_or_else(|| PyRuntimeError::new_err("the app did not call start_response"))?;
        Ok(head.finish(body))
    }
}

/// The app's iterable, all of it; every chunk must be `bytes`.
fn collect(iterable: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let mut body = Vec::new();
    for chunk in iterable.try_iter()? {
        body.extend_from_slice(chunk?.cast::<PyBytes>()?.as_bytes());
    }
    Ok(body)
}

/// PEP 3333: the iterable's `close()`, if it has one, is called however the iteration ended.
fn close(iterable: &Bound<'_, PyAny>) -> PyResult<()> {
    // Lists and tuples (the common hello-world answer) have none; skipping the lookup spares raising and
    // clearing an AttributeError.
    if iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>() {
        return Ok(());
    }
    let name = pyo3::intern!(iterable.py(), "close");
    if iterable.hasattr(name)? {
        iterable.call_method0(name)?;
    }
    Ok(())
}

/// A `str` with the code points of `bytes`, as PEP 3333 wants for environ values.
fn latin1<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyString>> {
    // A var is at most a u16 datasize long, so its length fits a Py_ssize_t.
    let len = pyo3::ffi::Py_ssize_t::try_from(bytes.len()).unwrap_or(pyo3::ffi::Py_ssize_t::MAX);
    // SAFETY: the pointer and length describe `bytes`; the result is a new reference to a str, or NULL
    // with an exception set, which `from_owned_ptr_or_err` turns into the error.
    unsafe {
        let text = pyo3::ffi::PyUnicode_DecodeLatin1(bytes.as_ptr().cast(), len, std::ptr::null());
        Ok(Bound::from_owned_ptr_or_err(py, text)?.cast_into_unchecked())
    }
}

/// The status line and headers, as `start_response` recorded them.
struct Head {
    bytes: Vec<u8>,
    has_length: bool,
}

impl Head {
    fn finish(mut self, body: Vec<u8>) -> Response {
        if !self.has_length {
            self.bytes.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        self.bytes.extend_from_slice(b"\r\n");
        Response { head: self.bytes, body }
    }
}

/// The `start_response` callable of one request. Nothing is sent before the app returns, so a second call
/// with `exc_info` may always replace the head. No `write()` callable is returned.
#[pyclass]
struct StartResponse {
    head: Option<Head>,
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None))]
    fn __call__(
        &mut self,
        status: &Bound<'_, PyString>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if self.head.is_some() && exc_info.is_none_or(PyAnyMethods::is_none) {
            return Err(PyRuntimeError::new_err("start_response called twice without exc_info"));
        }
        let mut bytes = b"HTTP/1.1 ".to_vec();
        push_latin1(&mut bytes, status)?;
        bytes.extend_from_slice(b"\r\n");
        let mut has_length = false;
        for header in headers.try_iter()? {
            let (name, value) = header?.extract::<(Bound<'_, PyString>, Bound<'_, PyString>)>()?;
            has_length |= name.to_cow()?.eq_ignore_ascii_case("content-length");
            push_latin1(&mut bytes, &name)?;
            bytes.extend_from_slice(b": ");
            push_latin1(&mut bytes, &value)?;
            bytes.extend_from_slice(b"\r\n");
        }
        self.head = Some(Head { bytes, has_length });
        Ok(())
    }
}

/// Appends `text` as latin-1. A CR or LF is refused: it would let the app inject header lines.
fn push_latin1(out: &mut Vec<u8>, text: &Bound<'_, PyString>) -> PyResult<()> {
    let text = text.to_cow()?;
    for c in text.chars() {
        match u8::try_from(c) {
            Ok(b'\r' | b'\n') => return Err(PyValueError::new_err("CR or LF in a status or header")),
            Ok(byte) => out.push(byte),
            Err(_) => {
                return Err(PyValueError::new_err(format!("{c:?} in a status or header is not latin-1")))
            }
        }
    }
    Ok(())
}
