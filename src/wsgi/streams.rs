//! The stream objects a WSGI app finds in its environ: `wsgi.input` (the request body, read from the
//! socket as the app asks), `wsgi.errors` (into the server log) and `wsgi.file_wrapper`.

use std::sync::Mutex;

use bytes::Buf;
use pyo3::exceptions::PyOSError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::{PyBytes, PyList, PyString};

use crate::server::Body;

/// How much a large `read(n)` reserves beyond the bytes already received.
const READ_RESERVE_AHEAD: usize = 1024 * 1024;
/// Reads up to this size, when nothing is buffered, go from the socket straight into the `bytes` object
/// the app gets; larger ones (a `read()` of a huge declared length) grow with what arrives instead.
const DIRECT_READ_MAX: usize = 1024 * 1024;
/// The longest line `readline()` without a size, `readlines()` and iteration return: a longer one comes in
/// pieces of this size, so an app reading lines never makes the server hold a whole body that has no
/// newline (a 100 MB upload). 64 KiB is the standard library's own line limit for form data (`cgi`).
const MAX_LINE: usize = 64 * 1024;
/// The longest `wsgi.errors` line kept before it is logged: a longer one is logged in pieces, so an app
/// that never writes a newline cannot grow the partial line without bound.
const MAX_ERROR_LINE: usize = 16 * 1024;

/// `wsgi.input`: the request body. Ends at `CONTENT_LENGTH`, never reads past it, and waits for the socket
/// with the interpreter released. Usable until the request ends, even if the app keeps it longer.
#[pyclass(frozen, module = "oxwsgi")]
pub(super) struct Input {
    body: Mutex<Body>,
}

impl Input {
    pub(super) fn new(body: Body) -> Self {
        Self { body: Mutex::new(body) }
    }

    /// Body bytes still on the socket.
    pub(super) fn on_socket(&self, py: Python<'_>) -> u64 {
        self.lock(py).on_socket()
    }

    /// The client went away before sending the whole body (see [`Body::peer_closed`]).
    pub(super) fn peer_closed(&self, py: Python<'_>) -> bool {
        self.lock(py).peer_closed()
    }

    /// The request is over: returns the body bytes still on the socket (to drain), and makes later reads fail.
    pub(super) fn end(&self, py: Python<'_>) -> u64 {
        self.lock(py).end()
    }

    fn lock(&self, py: Python<'_>) -> std::sync::MutexGuard<'_, Body> {
        // Waits with the interpreter released: another thread may hold the body while it waits for the socket.
        self.body.lock_py_attached(py).unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// `want` bytes (all still on the socket, `want` no more than are still to come) read straight into a new
/// `bytes` object: the body is copied once, from the socket to what the app gets.
fn read_into_new_bytes<'py>(py: Python<'py>, body: &mut Body, want: usize) -> PyResult<Bound<'py, PyBytes>> {
    let len = ffi::Py_ssize_t::try_from(want).map_err(|_| PyOSError::new_err("read size out of range"))?;
    // SAFETY: a new bytes object of `len` uninitialised bytes (or NULL with an exception set); it is filled
    // below before anything else sees it, and dropped on any error.
    let bytes: Bound<'py, PyBytes> = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyBytes_FromStringAndSize(std::ptr::null(), len))?
            .cast_into_unchecked()
    };
    // SAFETY: the object's buffer holds `len` bytes (uninitialised, and seen as such until the reads fill
    // them all), and only this function has the object so far.
    let buf = unsafe {
        let start = ffi::PyBytes_AsString(bytes.as_ptr()).cast::<std::mem::MaybeUninit<u8>>();
        std::slice::from_raw_parts_mut(start, want)
    };
    let mut filled = 0;
    while filled < want {
        let read = py.detach(|| body.read_from_socket(&mut buf[filled..]));
        match read {
            Ok(0) => return Err(PyOSError::new_err("error reading the request body: it ended early")),
            Ok(read) => filled += read,
            Err(err) => return Err(PyOSError::new_err(format!("error reading the request body: {err}"))),
        }
    }
    Ok(bytes)
}

/// Makes the buffered bytes non-empty unless the body is exhausted; `false` at its end.
fn fill(py: Python<'_>, body: &mut Body) -> PyResult<bool> {
    if !body.buffered().is_empty() {
        return Ok(true);
    }
    py.detach(|| body.fill())
        .map_err(|err| PyOSError::new_err(format!("error reading the request body: {err}")))
}

fn read_exact_or_eof(py: Python<'_>, body: &mut Body, want: usize) -> PyResult<Vec<u8>> {
    // `want` may come from a CONTENT_LENGTH no client will ever send: grow with what arrives instead.
    let mut out = Vec::with_capacity(want.min(body.buffered().len() + READ_RESERVE_AHEAD));
    while out.len() < want && fill(py, body)? {
        let current = body.buffered();
        let take = (want - out.len()).min(current.len());
        out.extend_from_slice(&current[..take]);
        current.advance(take);
    }
    Ok(out)
}

fn read_line(py: Python<'_>, body: &mut Body, limit: usize) -> PyResult<Vec<u8>> {
    let mut line = Vec::new();
    while line.len() < limit && fill(py, body)? {
        let current = body.buffered();
        let window = &current[..current.len().min(limit - line.len())];
        let (take, done) = match window.iter().position(|&b| b == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (window.len(), false),
        };
        line.extend_from_slice(&current[..take]);
        current.advance(take);
        if done {
            break;
        }
    }
    Ok(line)
}

/// A size argument: negative or None means "all".
fn limit(size: Option<isize>, available: u64) -> usize {
    let all = usize::try_from(available).unwrap_or(usize::MAX);
    size.and_then(|s| usize::try_from(s).ok()).map_or(all, |s| s.min(all))
}

#[pymethods]
impl Input {
    #[pyo3(signature = (size = None, /))]
    fn read<'py>(&self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let mut body = self.lock(py);
        let want = limit(size, body.available());
        let current = body.buffered();
        if want <= current.len() {
            let bytes = PyBytes::new(py, &current[..want]);
            current.advance(want);
            return Ok(bytes);
        }
        if current.is_empty() && want <= DIRECT_READ_MAX {
            return read_into_new_bytes(py, &mut body, want);
        }
        let data = read_exact_or_eof(py, &mut body, want)?;
        Ok(PyBytes::new(py, &data))
    }

    #[pyo3(signature = (size = None, /))]
    fn readline<'py>(&self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let mut body = self.lock(py);
        let limit = match size {
            Some(size) if size >= 0 => limit(Some(size), body.available()),
            _ => MAX_LINE,
        };
        let line = read_line(py, &mut body, limit)?;
        Ok(PyBytes::new(py, &line))
    }

    #[pyo3(signature = (hint = None, /))]
    fn readlines<'py>(&self, py: Python<'py>, hint: Option<isize>) -> PyResult<Bound<'py, PyList>> {
        let hint = hint.and_then(|h| usize::try_from(h).ok()).filter(|&h| h > 0);
        let mut body = self.lock(py);
        let lines = PyList::empty(py);
        let mut total = 0;
        loop {
            let line = read_line(py, &mut body, MAX_LINE)?;
            if line.is_empty() {
                break;
            }
            total += line.len();
            lines.append(PyBytes::new(py, &line))?;
            if hint.is_some_and(|h| total >= h) {
                break;
            }
        }
        Ok(lines)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = read_line(py, &mut self.lock(py), MAX_LINE)?;
        Ok((!line.is_empty()).then(|| PyBytes::new(py, &line)))
    }

    /// Apps must not close `wsgi.input` (PEP 3333); the server owns it, so this does nothing.
    #[allow(clippy::unused_self)] // a Python method needs its receiver
    fn close(&self) {}
}

/// `wsgi.errors`: a text stream whose lines go to the server log.
#[pyclass(frozen, module = "oxwsgi")]
pub(super) struct ErrorStream {
    partial: Mutex<String>,
}

impl ErrorStream {
    pub(super) fn new() -> Self {
        Self { partial: Mutex::new(String::new()) }
    }
}

#[pymethods]
impl ErrorStream {
    fn write(&self, text: &Bound<'_, PyString>) -> PyResult<usize> {
        let text = text.to_cow()?;
        let mut partial = self.partial.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        partial.push_str(&text);
        while let Some(newline) = partial.find('\n') {
            let line: String = partial.drain(..=newline).collect();
            tracing::warn!(target: "wsgi.errors", "{}", line.trim_end());
        }
        while partial.len() >= MAX_ERROR_LINE {
            let mut cut = MAX_ERROR_LINE;
            while !partial.is_char_boundary(cut) {
                cut -= 1;
            }
            let piece: String = partial.drain(..cut).collect();
            tracing::warn!(target: "wsgi.errors", "{piece}");
        }
        Ok(text.chars().count())
    }

    fn writelines(&self, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            self.write(line?.cast::<PyString>()?)?;
        }
        Ok(())
    }

    fn flush(&self) {
        let mut partial = self.partial.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !partial.is_empty() {
            tracing::warn!(target: "wsgi.errors", "{}", partial.trim_end());
            partial.clear();
        }
    }
}

/// `wsgi.file_wrapper`: iterates a file-like object in `blksize` reads from its current position; its
/// `close()` closes the file. The server's `Content-Length` handling stops it at the declared length.
#[pyclass(frozen, module = "oxwsgi")]
pub(super) struct FileWrapper {
    filelike: Py<PyAny>,
    blksize: usize,
}

impl FileWrapper {
    /// The file to send with `sendfile(2)`: a regular file behind `fileno()`, from the file-like's current
    /// position (`tell()`, which counts what its buffer read ahead), with its length from there. The file is
    /// a descriptor of the server's own (a `dup`), so the app closing its file object meanwhile — from
    /// another thread, while the interpreter is released for the send — cannot pull it away. `None` for
    /// anything else (a pipe, `io.BytesIO`, an object without `fileno`), which is read in `blksize` blocks.
    pub(super) fn regular_file(&self, py: Python<'_>) -> Option<(std::fs::File, u64, u64)> {
        let filelike = self.filelike.bind(py);
        if filelike.hasattr("encoding").unwrap_or(true) {
            return None; // a text file: its tell() is no byte offset, and WSGI bodies are bytes anyway
        }
        let fd: std::os::fd::RawFd = filelike.call_method0("fileno").ok()?.extract().ok()?;
        let position: u64 = match filelike.call_method0("tell") {
            Ok(position) => position.extract().ok()?,
            Err(_) => return None,
        };
        // SAFETY: fstat fills the struct it is given; `fd` is the file-like's open descriptor.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd, &raw mut stat) } < 0 || (stat.st_mode & libc::S_IFMT) != libc::S_IFREG {
            return None;
        }
        let size = u64::try_from(stat.st_size).ok()?;
        // SAFETY: `fd` is open: the file-like holds it, and no Python code runs while this holds the
        // interpreter. The duplicate is ours.
        let file = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok()?;
        Some((file.into(), position, size.saturating_sub(position)))
    }
}

/// PEP 3333 leaves the default block size to the server; 8 KiB is what wsgiref uses.
const FILE_WRAPPER_BLOCK_SIZE: usize = 8192;

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, blksize = FILE_WRAPPER_BLOCK_SIZE))]
    fn new(filelike: Py<PyAny>, blksize: usize) -> Self {
        Self { filelike, blksize: blksize.max(1) }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let data = self.filelike.bind(py).call_method1("read", (self.blksize,))?;
        Ok((data.len()? > 0).then_some(data))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let filelike = self.filelike.bind(py);
        if filelike.hasattr("close")? {
            filelike.call_method0("close")?;
        }
        Ok(())
    }
}
