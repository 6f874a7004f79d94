//! `start_response`, `write()`, and driving the iterable the app returns, per PEP 3333.
//!
//! Owns the response state of one request ([`Sink`]): the head the app declared, what was sent, how many
//! body bytes went out against a declared `Content-Length`, and the [`Responder`] that writes them. The head
//! goes out with the first non-empty chunk (or at the end), a list/tuple result goes out in one vectored
//! write with a derived `Content-Length`, a `wsgi.file_wrapper` over a regular file with `sendfile(2)`, and
//! anything else streams chunk by chunk. Every write happens with the interpreter released.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use super::streams::FileWrapper;
use crate::response::{Head, INTERNAL_ERROR};
use crate::server::{ClientGone, Front, Responder};

/// Chunks up to this size are copied; larger ones are written straight from the Python `bytes` object,
/// which is kept alive until the write is done. Below it a copy is cheaper than the deferred reference drop.
const COPY_CHUNKS_UP_TO: usize = 4096;

/// What was sent of the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Nothing,
    /// The head and some of the body; more may follow.
    Streaming,
    /// The whole response.
    Complete,
}

/// The response state of one request, shared by `start_response`, `write()` and the iteration.
pub(super) struct Sink {
    /// Taken when the connection is finished.
    responder: Option<Responder>,
    sent: Sent,
    head: Option<Head>,
    head_only: bool,
    body_bytes: u64,
    /// nginx closed the connection: the errors this causes in the app are not the app's fault.
    client_gone: bool,
    /// Where large chunks ask for a Python thread to free them once written elsewhere.
    front: Arc<Front>,
}

/// Whether the app should keep producing body chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    More,
    Enough,
}

/// Why a request ended without a normal response.
pub(super) enum Failure {
    /// The app raised: logged with its traceback.
    Python(PyErr),
    /// The app broke a WSGI rule: logged with this reason.
    Wsgi(String),
    /// nginx closed the connection (client gone, timeout): nothing left to send to.
    ClientGone,
}

impl From<PyErr> for Failure {
    fn from(err: PyErr) -> Self {
        Failure::Python(err)
    }
}

/// Locks the sink; waits (if it must) with the interpreter released, since its holder may be writing to
/// the socket released too.
pub(super) fn lock<'a>(py: Python<'_>, sink: &'a Mutex<Sink>) -> MutexGuard<'a, Sink> {
    // A panic while holding the lock cannot leave the state half-updated in a way that matters more than
    // answering the request, so a poisoned lock is used as is.
    sink.lock_py_attached(py).unwrap_or_else(PoisonError::into_inner)
}

/// What one step of the response writes.
struct Outgoing {
    head: Bytes,
    body: Vec<Bytes>,
}

impl Sink {
    pub(super) fn new(responder: Responder, head_only: bool, front: Arc<Front>) -> Arc<Mutex<Self>> {
        let sink = Self {
            responder: Some(responder),
            sent: Sent::Nothing,
            head: None,
            head_only,
            body_bytes: 0,
            client_gone: false,
            front,
        };
        Arc::new(Mutex::new(sink))
    }

    pub(super) fn client_gone(&self) -> bool {
        self.client_gone
    }

    pub(super) fn complete(&self) -> bool {
        self.sent == Sent::Complete
    }

    fn no_body(&self, head: &Head) -> bool {
        self.head_only || head.forbids_body()
    }

    /// Cuts `chunk` to what a declared Content-Length still allows.
    fn within_length(&mut self, mut chunk: Bytes) -> (Bytes, Flow) {
        let Some(declared) = self.head.as_ref().and_then(Head::content_length) else {
            self.body_bytes += chunk.len() as u64;
            return (chunk, Flow::More);
        };
        let left = declared.saturating_sub(self.body_bytes);
        if chunk.len() as u64 >= left {
            chunk.truncate(usize::try_from(left).unwrap_or(usize::MAX));
            self.body_bytes = declared;
            return (chunk, Flow::Enough);
        }
        self.body_bytes += chunk.len() as u64;
        (chunk, Flow::More)
    }

    /// The head, finished with `body_len` as its derived `Content-Length`, now sent.
    fn take_head(&mut self, body_len: Option<u64>) -> Result<Bytes, Failure> {
        let head = self.head.clone().ok_or_else(missing_start_response)?;
        if let Some(responder) = &mut self.responder {
            responder.set_status(head.status());
        }
        Ok(head.finish(body_len).into())
    }

    /// Takes one non-empty chunk: what to write for it, and whether the app should go on.
    fn take_chunk(&mut self, chunk: Bytes) -> Result<(Option<Outgoing>, Flow), Failure> {
        match self.sent {
            Sent::Complete => Ok((None, Flow::Enough)),
            Sent::Streaming => {
                let (chunk, flow) = self.within_length(chunk);
                let write = (!chunk.is_empty()).then(|| Outgoing { head: Bytes::new(), body: vec![chunk] });
                Ok((write, flow))
            }
            Sent::Nothing => {
                let no_body = self.no_body(self.head.as_ref().ok_or_else(missing_start_response)?);
                if no_body {
                    let head = self.take_head(None)?;
                    self.sent = Sent::Complete;
                    return Ok((Some(Outgoing { head, body: Vec::new() }), Flow::Enough));
                }
                let (chunk, flow) = self.within_length(chunk);
                let head = self.take_head(None)?;
                self.sent = Sent::Streaming;
                Ok((Some(Outgoing { head, body: vec![chunk] }), flow))
            }
        }
    }

    /// The iterable is exhausted. `collected` holds the whole body when the result was a list or tuple.
    /// Returns what is left to write.
    fn finish(&mut self, collected: Option<Vec<Bytes>>) -> Result<Option<Outgoing>, Failure> {
        match self.sent {
            Sent::Complete => return Ok(None),
            Sent::Streaming => {
                let declared = self.head.as_ref().and_then(Head::content_length);
                if let Some(declared) = declared.filter(|&declared| self.body_bytes < declared) {
                    // Left streaming: the connection is aborted when the request ends.
                    return Err(Failure::Wsgi(format!(
                        "the app declared Content-Length {declared} but produced {} bytes",
                        self.body_bytes
                    )));
                }
                self.sent = Sent::Complete;
                return Ok(None);
            }
            Sent::Nothing => {}
        }
        let head = self.head.clone().ok_or_else(missing_start_response)?;
        let mut body = collected.unwrap_or_default();
        let mut total: u64 = body.iter().map(|c| c.len() as u64).sum();
        if let Some(declared) = head.content_length() {
            if total > declared {
                truncate_body(&mut body, declared);
                total = declared;
            } else if total < declared && !self.no_body(&head) {
                return Err(Failure::Wsgi(format!(
                    "the app declared Content-Length {declared} but produced {total} bytes"
                )));
            }
        }
        // A HEAD answered without a body says nothing about the GET body's length: derive none.
        let derived = (!(self.head_only && total == 0)).then_some(total);
        if self.no_body(&head) {
            body.clear();
        }
        let head = self.take_head(derived)?;
        self.sent = Sent::Complete;
        Ok(Some(Outgoing { head, body }))
    }

    /// Writes `write`, with the interpreter released (the sink stays locked: others wait released too).
    fn write(&mut self, py: Python<'_>, write: Outgoing) -> Result<(), Failure> {
        let Some(responder) = self.responder.as_mut() else { return Err(Failure::ClientGone) };
        let Outgoing { head, body } = write;
        match py.detach(|| responder.send(head, body)) {
            Ok(()) => Ok(()),
            Err(ClientGone) => Err(self.gone()),
        }
    }

    fn gone(&mut self) -> Failure {
        self.client_gone = true;
        Failure::ClientGone
    }

    /// The request is over: the connection is finished with what was sent — a complete response is closed
    /// after draining `unread` body bytes, nothing sent becomes a 500, a response cut short is aborted.
    /// Done once; later calls do nothing.
    pub(super) fn end(&mut self, py: Python<'_>, unread: u64) {
        let Some(mut responder) = self.responder.take() else { return };
        match self.sent {
            Sent::Complete => py.detach(|| responder.finish(unread)),
            Sent::Nothing => py.detach(|| {
                responder.set_status(500);
                // If nginx is gone there is no one to tell; the responder records the failed write.
                let _ = responder.send(Bytes::from_static(INTERNAL_ERROR), Vec::new());
                responder.finish(unread);
            }),
            Sent::Streaming => py.detach(|| responder.abort()),
        }
        self.sent = Sent::Complete;
    }
}

fn truncate_body(body: &mut Vec<Bytes>, limit: u64) {
    let mut left = limit;
    for chunk in body.iter_mut() {
        let keep = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
        chunk.truncate(keep);
        left -= keep as u64;
    }
    body.retain(|c| !c.is_empty());
}

fn missing_start_response() -> Failure {
    Failure::Wsgi("the app produced body bytes (or returned) without calling start_response()".into())
}

/// Sends one chunk (the head with the first), with the interpreter released.
fn emit(py: Python<'_>, sink: &Mutex<Sink>, chunk: Bytes) -> Result<Flow, Failure> {
    if chunk.is_empty() {
        return Ok(Flow::More);
    }
    let mut sink = lock(py, sink);
    let (write, flow) = sink.take_chunk(chunk)?;
    if let Some(write) = write {
        sink.write(py, write)?;
    }
    Ok(flow)
}

fn finish(py: Python<'_>, sink: &Mutex<Sink>, collected: Option<Vec<Bytes>>) -> Result<(), Failure> {
    let mut sink = lock(py, sink);
    match sink.finish(collected)? {
        Some(write) => sink.write(py, write),
        None => Ok(()),
    }
}

/// A `wsgi.file_wrapper` over a regular file, before anything was sent: the head with the file's length
/// (or the declared one), then the file with `sendfile(2)`. `Ok(false)` if this does not apply.
fn send_file(py: Python<'_>, sink: &Mutex<Sink>, wrapper: &FileWrapper) -> Result<bool, Failure> {
    let mut sink = lock(py, sink);
    if sink.sent != Sent::Nothing {
        return Ok(false);
    }
    let Some((fd, offset, available)) = wrapper.regular_file(py) else { return Ok(false) };
    let head = sink.head.clone().ok_or_else(missing_start_response)?;
    let length = head.content_length().map_or(available, |declared| declared.min(available));
    let no_body = sink.no_body(&head);
    let derived = sink.take_head(Some(length))?;
    sink.sent = Sent::Complete;
    sink.body_bytes = length;
    let Some(responder) = sink.responder.as_mut() else { return Err(Failure::ClientGone) };
    // SAFETY: the file-like object, which owns `fd`, is kept alive by `wrapper` (borrowed by the caller)
    // for the whole call, and nothing closes it meanwhile: the app gets no control back until we return.
    let file = unsafe { BorrowedFd::borrow_raw(fd) };
    let sent = py.detach(|| {
        if no_body {
            responder.send(derived, Vec::new())
        } else {
            responder.send_file(derived, file, offset, length)
        }
    });
    if sent.is_err() {
        return Err(sink.gone());
    }
    if let Some(declared) = head.content_length().filter(|&declared| declared > available && !no_body) {
        sink.sent = Sent::Streaming; // aborted when the request ends
        return Err(Failure::Wsgi(format!(
            "the app declared Content-Length {declared} but the file has {available} bytes from its position"
        )));
    }
    Ok(true)
}

/// A body chunk from the app: `bytes` only (PEP 3333), large ones shared rather than copied.
fn chunk_from(value: &Bound<'_, PyAny>, front: &Arc<Front>) -> Result<Bytes, Failure> {
    let bytes = value.cast::<PyBytes>().map_err(|_| {
        let kind = value.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string());
        Failure::Wsgi(format!("the app produced a {kind} body chunk; WSGI bodies must be bytes"))
    })?;
    let data = bytes.as_bytes();
    if data.len() <= COPY_CHUNKS_UP_TO {
        return Ok(Bytes::copy_from_slice(data));
    }
    let object = Some(bytes.clone().unbind());
    Ok(Bytes::from_owner(SharedPyBytes {
        ptr: data.as_ptr(),
        len: data.len(),
        object,
        front: Arc::clone(front),
    }))
}

/// A Python `bytes` object lent to the writer. Its buffer is immutable and lives as long as the object, which
/// this owns. Dropped on the I/O runtime's thread, the reference goes to pyo3's deferred pool, and a serving
/// thread is asked to take the interpreter soon so the memory is freed now, not at the next request.
struct SharedPyBytes {
    ptr: *const u8,
    len: usize,
    object: Option<Py<PyBytes>>,
    front: Arc<Front>,
}

impl Drop for SharedPyBytes {
    fn drop(&mut self) {
        drop(self.object.take());
        self.front.collect_soon();
    }
}

// SAFETY: the pointer targets the immutable buffer of a `bytes` object kept alive by `object`; reading it
// needs no interpreter lock, and no one can mutate it.
unsafe impl Send for SharedPyBytes {}
// SAFETY: as above; shared reads of immutable memory.
unsafe impl Sync for SharedPyBytes {}

impl AsRef<[u8]> for SharedPyBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr`/`len` were taken from the live `bytes` object this struct owns.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Runs the iterable the app returned to its end (or until the response is complete), writing as it goes.
pub(super) fn drive(py: Python<'_>, iterable: &Bound<'_, PyAny>, sink: &Mutex<Sink>) -> Result<(), Failure> {
    let front = Arc::clone(&lock(py, sink).front);
    if let Ok(wrapper) = iterable.cast_exact::<FileWrapper>() {
        if send_file(py, sink, wrapper.get())? {
            return Ok(());
        }
    }
    let is_sequence = iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>();
    if is_sequence && lock(py, sink).sent == Sent::Nothing {
        let chunks =
            iterable.try_iter()?.map(|item| chunk_from(&item?, &front)).collect::<Result<Vec<_>, _>>()?;
        return finish(py, sink, Some(chunks));
    }
    for item in iterable.try_iter()? {
        if emit(py, sink, chunk_from(&item?, &front)?)? == Flow::Enough {
            break;
        }
    }
    finish(py, sink, None)
}

/// The `start_response` callable given to the app.
#[pyclass(frozen, module = "oxwsgi")]
pub(super) struct StartResponse {
    sink: Arc<Mutex<Sink>>,
}

impl StartResponse {
    pub(super) fn new(sink: Arc<Mutex<Sink>>) -> Self {
        Self { sink }
    }
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None, /))]
    fn __call__(
        &self,
        status: &Bound<'_, PyAny>,
        headers: &Bound<'_, PyAny>,
        exc_info: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Write> {
        let exc_info = exc_info.filter(|e| !e.is_none());
        // Read under the lock, act after it: the exc_info calls below run Python code.
        let (started, nothing_sent) = {
            let sink = lock(status.py(), &self.sink);
            (sink.head.is_some(), sink.sent == Sent::Nothing)
        };
        if started && exc_info.is_none() {
            return Err(PyRuntimeError::new_err(
                "start_response() called a second time without exc_info (PEP 3333)",
            ));
        }
        if let (Some(exc_info), false) = (exc_info, nothing_sent) {
            // The head is on the wire: PEP 3333 says re-raise the app's own exception.
            let value = exc_info.get_item(1)?;
            let value = value.call_method1("with_traceback", (exc_info.get_item(2)?,))?;
            return Err(PyErr::from_value(value));
        }
        let status = latin1(status, "status")?;
        let headers = headers.cast::<PyList>().map_err(|_| {
            PyTypeError::new_err("start_response() headers must be a list of (name, value) tuples")
        })?;
        let mut pairs = Vec::with_capacity(headers.len());
        for item in headers.iter() {
            let pair =
                item.cast::<PyTuple>().ok().filter(|t| t.len() == 2).ok_or_else(|| {
                    PyTypeError::new_err("each header must be a (name, value) tuple of str")
                })?;
            pairs.push((
                latin1(&pair.get_item(0)?, "header name")?,
                latin1(&pair.get_item(1)?, "header value")?,
            ));
        }
        let head = Head::new(&status, pairs.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        lock(headers.py(), &self.sink).head = Some(head);
        Ok(Write { sink: Arc::clone(&self.sink) })
    }
}

/// A native string (PEP 3333): a `str` whose characters all fit in latin-1, as its latin-1 bytes.
fn latin1(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    let text = value
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("start_response() {what} must be a str")))?
        .to_cow()?;
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| PyValueError::new_err(format!("start_response() {what} {text:?} is not latin-1")))
}

/// The `write()` callable returned by `start_response` (PEP 3333's imperative API).
#[pyclass(frozen, module = "oxwsgi")]
pub(super) struct Write {
    sink: Arc<Mutex<Sink>>,
}

#[pymethods]
impl Write {
    fn __call__(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let front = Arc::clone(&lock(py, &self.sink).front);
        let chunk = chunk_from(data, &front).map_err(|_| PyTypeError::new_err("write() takes bytes"))?;
        match emit(py, &self.sink, chunk) {
            Ok(_) => Ok(()),
            Err(Failure::Python(err)) => Err(err),
            Err(Failure::Wsgi(reason)) => Err(PyRuntimeError::new_err(reason)),
            Err(Failure::ClientGone) => {
                Err(PyOSError::new_err("write error: the client closed the connection"))
            }
        }
    }
}
