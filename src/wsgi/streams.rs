//! The stream objects a WSGI app finds in its environ: `wsgi.input` (the request body, read from the
//! socket as the app asks), `wsgi.errors` (into the server log) and `wsgi.file_wrapper`.

use std::sync::Mutex;

use bytes::{Buf, Bytes};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString};
use tokio::sync::mpsc;

use crate::exchange::Body;

/// How much a large `read(n)` reserves beyond the bytes already received.
const READ_RESERVE_AHEAD: usize = 1024 * 1024;

/// `wsgi.input`: the request body. Ends at `CONTENT_LENGTH`, never reads past it, and waits for the socket
/// with the interpreter released.
#[pyclass(module = "oxwsgi")]
pub(super) struct Input {
    /// Received bytes not yet given to the app.
    current: Bytes,
    /// Bytes still to come through `rest`.
    pending: u64,
    rest: Option<mpsc::Receiver<std::io::Result<Bytes>>>,
}

impl Input {
    pub(super) fn new(body: Body) -> Self {
        let pending = body.content_length.saturating_sub(body.received.len() as u64);
        Self { current: body.received, pending, rest: body.rest }
    }

    fn available(&self) -> u64 {
        self.current.len() as u64 + self.pending
    }

    /// Makes `current` non-empty unless the body is exhausted; `false` at the end of the body.
    fn fill(&mut self, py: Python<'_>) -> PyResult<bool> {
        if !self.current.is_empty() {
            return Ok(true);
        }
        if self.pending == 0 {
            return Ok(false);
        }
        let rest = self.rest.as_mut().ok_or_else(body_ended)?;
        let next = match rest.try_recv() {
            Ok(next) => Some(next),
            Err(mpsc::error::TryRecvError::Empty) => py.detach(|| rest.blocking_recv()),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
        match next {
            Some(Ok(chunk)) => {
                self.pending = self.pending.saturating_sub(chunk.len() as u64);
                self.current = chunk;
                Ok(true)
            }
            Some(Err(err)) => {
                self.fail();
                Err(PyOSError::new_err(format!("error reading the request body: {err}")))
            }
            None => {
                self.fail();
                Err(body_ended())
            }
        }
    }

    /// After a read error the body is unusable: later reads fail the same way instead of hanging.
    fn fail(&mut self) {
        self.rest = None;
    }

    fn read_exact_or_eof(&mut self, py: Python<'_>, want: usize) -> PyResult<Vec<u8>> {
        // `want` may come from a CONTENT_LENGTH no client will ever send: grow with what arrives instead.
        let mut out = Vec::with_capacity(want.min(self.current.len() + READ_RESERVE_AHEAD));
        while out.len() < want && self.fill(py)? {
            let take = (want - out.len()).min(self.current.len());
            out.extend_from_slice(&self.current[..take]);
            self.current.advance(take);
        }
        Ok(out)
    }

    fn read_line(&mut self, py: Python<'_>, limit: usize) -> PyResult<Vec<u8>> {
        let mut line = Vec::new();
        while line.len() < limit && self.fill(py)? {
            let window = &self.current[..self.current.len().min(limit - line.len())];
            let (take, done) = match window.iter().position(|&b| b == b'\n') {
                Some(newline) => (newline + 1, true),
                None => (window.len(), false),
            };
            line.extend_from_slice(&self.current[..take]);
            self.current.advance(take);
            if done {
                break;
            }
        }
        Ok(line)
    }
}

fn body_ended() -> PyErr {
    PyOSError::new_err("the request body ended early: the client closed the connection")
}

/// A size argument: negative or None means "all".
fn limit(size: Option<isize>, available: u64) -> usize {
    let all = usize::try_from(available).unwrap_or(usize::MAX);
    size.and_then(|s| usize::try_from(s).ok()).map_or(all, |s| s.min(all))
}

#[pymethods]
impl Input {
    #[pyo3(signature = (size = None, /))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let want = limit(size, self.available());
        if want <= self.current.len() {
            let bytes = PyBytes::new(py, &self.current[..want]);
            self.current.advance(want);
            return Ok(bytes);
        }
        let data = self.read_exact_or_eof(py, want)?;
        Ok(PyBytes::new(py, &data))
    }

    #[pyo3(signature = (size = None, /))]
    fn readline<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let line = self.read_line(py, limit(size, self.available()))?;
        Ok(PyBytes::new(py, &line))
    }

    #[pyo3(signature = (hint = None, /))]
    fn readlines<'py>(&mut self, py: Python<'py>, hint: Option<isize>) -> PyResult<Bound<'py, PyList>> {
        let hint = hint.and_then(|h| usize::try_from(h).ok()).filter(|&h| h > 0);
        let lines = PyList::empty(py);
        let mut total = 0;
        loop {
            let line = self.read_line(py, usize::MAX)?;
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

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.read_line(py, usize::MAX)?;
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
#[pyclass(module = "oxwsgi")]
pub(super) struct FileWrapper {
    filelike: Py<PyAny>,
    blksize: usize,
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
