//! `start_response`, `write()`, and driving the iterable the app returns, per PEP 3333.
//!
//! Owns the response state of one request ([`Sink`]): the head the app declared, what was sent, how many
//! body bytes went out against a declared `Content-Length`, and the [`Responder`] that writes them. The head
//! goes out with the first non-empty chunk (or at the end), a list/tuple result goes out in one vectored
//! write with a derived `Content-Length`, a `wsgi.file_wrapper` over a regular file with `sendfile(2)`, and
//! anything else streams chunk by chunk. Every write happens with the interpreter released.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::MutexExt;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use super::streams::{FileWrapper, Input};
use crate::server::{ClientGone, Front, Responder};
use oxwsgi_proto::response::{Correction, Head, INTERNAL_ERROR};
use tracing::warn;

/// Chunks up to this size are copied; larger ones are written straight from the Python `bytes` object,
/// which is kept alive until the write is done. Below it a copy is cheaper than the deferred reference drop.
const COPY_CHUNKS_UP_TO: usize = 4096;

/// A complete response up to this size, to a connection whose request body was all read, is written and
/// the connection closed without releasing the interpreter: the socket takes it at once (a fresh
/// connection's buffer holds far more), and a few microseconds of system calls cost less than handing the
/// interpreter to another thread and waiting to take it back, which is what releasing it costs under load.
const WRITE_HOLDING_INTERPRETER_MAX: usize = 16 * 1024;

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
    /// The request's `wsgi.input`: once the response is complete and the body all read, the connection
    /// is closed at once, in the same release of the interpreter as the last write.
    input: Py<Input>,
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
    /// The head, and after it `inline` bytes of body (a small body, to go out in the same buffer).
    head: Vec<u8>,
    inline: usize,
    body: Vec<Bytes>,
}

/// One step of a streamed response: the head (empty once sent) and how many bytes of the chunk go out.
type ChunkWrite = (Vec<u8>, usize);

/// The whole body of a list or tuple response.
enum Whole<'py> {
    /// All `bytes` items, `total` bytes together, small enough to copy into the buffer after the head: one
    /// buffer, one write, no other allocation.
    Small {
        items: Bound<'py, PyAny>,
        total: usize,
    },
    Chunks(Vec<Bytes>),
}

impl Sink {
    pub(super) fn new(responder: Responder, head_only: bool, input: Py<Input>) -> Arc<Mutex<Self>> {
        let sink = Self {
            responder: Some(responder),
            sent: Sent::Nothing,
            head: None,
            head_only,
            body_bytes: 0,
            client_gone: false,
            input,
        };
        Arc::new(Mutex::new(sink))
    }

    pub(super) fn client_gone(&self) -> bool {
        self.client_gone
    }

    fn no_body(&self, head: &Head) -> bool {
        self.head_only || head.forbids_body()
    }

    /// Cuts `chunk` to what a declared Content-Length still allows.
    /// How much of a chunk of `len` bytes a declared Content-Length still allows.
    fn within_length(&mut self, len: usize) -> (usize, Flow) {
        let Some(declared) = self.head.as_ref().and_then(Head::content_length) else {
            self.body_bytes += len as u64;
            return (len, Flow::More);
        };
        let left = declared.saturating_sub(self.body_bytes);
        if len as u64 >= left {
            self.body_bytes = declared;
            return (usize::try_from(left).unwrap_or(usize::MAX), Flow::Enough);
        }
        self.body_bytes += len as u64;
        (len, Flow::More)
    }

    /// The head, finished with `body_len` as its derived `Content-Length` and `room` to spare, now sent.
    fn take_head(&mut self, body_len: Option<u64>, room: usize) -> Result<Vec<u8>, Failure> {
        let head = self.head.as_ref().ok_or_else(missing_start_response)?;
        if let Some(responder) = &mut self.responder {
            responder.set_status(head.status());
        }
        Ok(head.encode(body_len, room))
    }

    /// Takes one non-empty chunk: what to write for it, and whether the app should go on.
    /// Takes one non-empty chunk of `len` bytes: what to write (the head, if it is time, and how many of
    /// the chunk's bytes), and whether the app should go on.
    fn take_chunk(&mut self, len: usize) -> Result<(Option<ChunkWrite>, Flow), Failure> {
        match self.sent {
            Sent::Complete => Ok((None, Flow::Enough)),
            Sent::Streaming => {
                let (take, flow) = self.within_length(len);
                Ok(((take > 0).then(|| (Vec::new(), take)), flow))
            }
            Sent::Nothing => {
                let no_body = self.no_body(self.head.as_ref().ok_or_else(missing_start_response)?);
                if no_body {
                    let head = self.take_head(None, 0)?;
                    self.sent = Sent::Complete;
                    return Ok((Some((head, 0)), Flow::Enough));
                }
                let (take, flow) = self.within_length(len);
                let head = self.take_head(None, 0)?;
                self.sent = Sent::Streaming;
                Ok((Some((head, take)), flow))
            }
        }
    }

    /// The iterable is exhausted. `whole` holds the whole body when the result was a list or tuple.
    /// Returns what is left to write.
    fn finish(&mut self, whole: Option<Whole<'_>>) -> Result<Option<Outgoing>, Failure> {
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
        let head = self.head.as_ref().ok_or_else(missing_start_response)?;
        let no_body = self.no_body(head);
        let produced = match &whole {
            Some(Whole::Small { total, .. }) => *total as u64,
            Some(Whole::Chunks(chunks)) => chunks.iter().map(|c| c.len() as u64).sum(),
            None => 0,
        };
        let total = match head.content_length() {
            Some(declared) if produced < declared && !no_body => {
                return Err(Failure::Wsgi(format!(
                    "the app declared Content-Length {declared} but produced {produced} bytes"
                )));
            }
            Some(declared) => produced.min(declared),
            None => produced,
        };
        // A HEAD answered without a body says nothing about the GET body's length: derive none.
        let derived = (!(self.head_only && total == 0)).then_some(total);
        let sent = if no_body { 0 } else { usize::try_from(total).unwrap_or(usize::MAX) };
        let inline = if matches!(whole, Some(Whole::Small { .. })) { sent } else { 0 };
        let mut head = self.take_head(derived, inline)?;
        self.sent = Sent::Complete;
        let body = match whole {
            Some(Whole::Small { items, .. }) => {
                append_up_to(&mut head, &items, sent)?;
                Vec::new()
            }
            Some(Whole::Chunks(mut chunks)) => {
                truncate_body(&mut chunks, sent as u64);
                chunks
            }
            None => Vec::new(),
        };
        Ok(Some(Outgoing { head, inline, body }))
    }

    /// Writes `write`, with the interpreter released (the sink stays locked: others wait released too).
    fn write(&mut self, py: Python<'_>, write: Outgoing) -> Result<(), Failure> {
        let Some(responder) = self.responder.as_mut() else { return Err(Failure::ClientGone) };
        let Outgoing { head, inline, body } = write;
        match py.detach(|| responder.send_last(&head, inline, &body)) {
            Ok(()) => Ok(()),
            Err(ClientGone) => Err(self.gone()),
        }
    }

    /// Writes `head` and `chunk` of a response that goes on (or, once complete, the head alone).
    fn write_more(&mut self, py: Python<'_>, head: &[u8], chunk: &[u8]) -> Result<(), Failure> {
        let complete = self.sent == Sent::Complete;
        let Some(responder) = self.responder.as_mut() else { return Err(Failure::ClientGone) };
        let sent = py.detach(|| {
            if complete {
                responder.send_last(head, 0, &[])
            } else {
                responder.send_more(head, chunk)
            }
        });
        sent.map_err(|ClientGone| self.gone())
    }

    /// The response is complete: writes what is left of it and, if the app read the whole request body,
    /// closes the connection in the same release of the interpreter (before the iterable's `close()` runs
    /// the app's teardown: nginx need not wait for it).
    fn write_last(&mut self, py: Python<'_>, last: Option<Outgoing>) -> Result<(), Failure> {
        if self.input.get().on_socket(py) > 0 {
            // The rest of the body is drained once the request ends (the app may still read it).
            return last.map_or(Ok(()), |last| self.write(py, last));
        }
        let Some(mut responder) = self.responder.take() else { return Err(Failure::ClientGone) };
        let size =
            last.as_ref().map_or(0, |last| last.head.len() + last.body.iter().map(Bytes::len).sum::<usize>());
        let sent = if size <= WRITE_HOLDING_INTERPRETER_MAX {
            // Written without releasing the interpreter: it never waits (see `send_last_now`).
            let sent = last
                .as_ref()
                .map_or(Ok(()), |last| responder.send_last_now(&last.head, last.inline, &last.body));
            responder.finish(0);
            sent
        } else {
            py.detach(|| {
                let sent = last
                    .as_ref()
                    .map_or(Ok(()), |last| responder.send_last(&last.head, last.inline, &last.body));
                responder.finish(0);
                sent
            })
        };
        // The app's buffers are let go here, with the interpreter held.
        drop(last);
        sent.map_err(|ClientGone| self.gone())
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
                let _ = responder.send_last(INTERNAL_ERROR, 0, &[]);
                responder.finish(unread);
            }),
            Sent::Streaming => py.detach(|| responder.abort()),
        }
        self.sent = Sent::Complete;
    }
}

/// A 500 for a request that failed before anything was sent, then the end of the connection. Writes:
/// call it with the interpreter released.
pub(super) fn answer_internal_error(mut responder: Responder) {
    responder.set_status(500);
    // If nginx is gone there is no one to tell; the responder records the failed write.
    let _ = responder.send_last(INTERNAL_ERROR, 0, &[]);
    responder.finish(0);
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
/// Sends one chunk (the head with the first), straight from the app's `bytes` object, with the interpreter
/// released: the object is immutable and the caller holds it, so nothing is copied.
fn emit(py: Python<'_>, sink: &Mutex<Sink>, chunk: &[u8]) -> Result<Flow, Failure> {
    if chunk.is_empty() {
        return Ok(Flow::More);
    }
    let mut sink = lock(py, sink);
    let (write, flow) = sink.take_chunk(chunk.len())?;
    if let Some((head, take)) = write {
        sink.write_more(py, &head, &chunk[..take])?;
    }
    Ok(flow)
}

fn finish(py: Python<'_>, sink: &Mutex<Sink>, whole: Option<Whole<'_>>) -> Result<(), Failure> {
    let mut sink = lock(py, sink);
    let last = sink.finish(whole)?;
    sink.write_last(py, last)
}

/// A `wsgi.file_wrapper` over a regular file, before anything was sent: the head with the file's length
/// (or the declared one), then the file with `sendfile(2)`. `Ok(false)` if this does not apply.
fn send_file(py: Python<'_>, sink: &Mutex<Sink>, wrapper: &FileWrapper) -> Result<bool, Failure> {
    // Asked before the sink is locked: it runs the file-like's own Python (`fileno()`, `tell()`).
    let Some((file, offset, available)) = wrapper.regular_file(py) else { return Ok(false) };
    let mut sink = lock(py, sink);
    if sink.sent != Sent::Nothing {
        return Ok(false);
    }
    let head = sink.head.as_ref().ok_or_else(missing_start_response)?;
    let declared = head.content_length();
    let length = declared.map_or(available, |declared| declared.min(available));
    let no_body = sink.no_body(head);
    let derived = sink.take_head(Some(length), 0)?;
    sink.sent = Sent::Complete;
    sink.body_bytes = length;
    let Some(responder) = sink.responder.as_mut() else { return Err(Failure::ClientGone) };
    let sent = py.detach(|| {
        if no_body {
            responder.send_last(&derived, 0, &[])
        } else {
            responder.send_file(&derived, file, offset, length)
        }
    });
    if sent.is_err() {
        return Err(sink.gone());
    }
    if let Some(declared) = declared.filter(|&declared| declared > available && !no_body) {
        sink.sent = Sent::Streaming; // aborted when the request ends
        return Err(Failure::Wsgi(format!(
            "the app declared Content-Length {declared} but the file has {available} bytes from its position"
        )));
    }
    sink.write_last(py, None)?;
    Ok(true)
}

/// A body chunk from the app: `bytes` only (PEP 3333).
fn bytes_of<'a, 'py>(value: &'a Bound<'py, PyAny>) -> Result<&'a Bound<'py, PyBytes>, Failure> {
    value.cast::<PyBytes>().map_err(|_| {
        let kind = value.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string());
        Failure::Wsgi(format!("the app produced a {kind} body chunk; WSGI bodies must be bytes"))
    })
}

/// Appends the `bytes` items of a list or tuple to `buf`, up to `limit` bytes in all.
fn append_up_to(buf: &mut Vec<u8>, items: &Bound<'_, PyAny>, mut limit: usize) -> Result<(), Failure> {
    for item in items.try_iter()? {
        let item = item?;
        let data = bytes_of(&item)?.as_bytes();
        let take = data.len().min(limit);
        buf.extend_from_slice(&data[..take]);
        limit -= take;
    }
    Ok(())
}

/// A body chunk from the app as `Bytes`: large ones shared with the Python object rather than copied.
fn chunk_from(value: &Bound<'_, PyAny>, front: &Arc<Front>) -> Result<Bytes, Failure> {
    let bytes = bytes_of(value)?;
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
        // SAFETY: PyGILState_Check only reads whether this thread holds the interpreter.
        let attached = unsafe { pyo3::ffi::PyGILState_Check() } == 1;
        drop(self.object.take());
        if !attached {
            // Deferred by pyo3 until some thread takes the interpreter: make one do it soon.
            self.front.collect_soon();
        }
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
pub(super) fn drive(
    py: Python<'_>,
    iterable: &Bound<'_, PyAny>,
    sink: &Mutex<Sink>,
    front: &Arc<Front>,
) -> Result<(), Failure> {
    if let Ok(wrapper) = iterable.cast_exact::<FileWrapper>() {
        if send_file(py, sink, wrapper.get())? {
            return Ok(());
        }
    }
    let is_sequence = iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>();
    if is_sequence && lock(py, sink).sent == Sent::Nothing {
        let mut total = 0;
        for item in iterable.try_iter()? {
            total += bytes_of(&item?)?.as_bytes().len();
        }
        if total <= COPY_CHUNKS_UP_TO {
            return finish(py, sink, Some(Whole::Small { items: iterable.clone(), total }));
        }
        let mut chunks = Vec::with_capacity(iterable.len().unwrap_or(0));
        for item in iterable.try_iter()? {
            chunks.push(chunk_from(&item?, front)?);
        }
        return finish(py, sink, Some(Whole::Chunks(chunks)));
    }
    for item in iterable.try_iter()? {
        let item = item?;
        if emit(py, sink, bytes_of(&item)?.as_bytes())? == Flow::Enough {
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
        let status = native(status, "status")?;
        let headers = headers.cast::<PyList>().map_err(|_| {
            PyTypeError::new_err("start_response() headers must be a list of (name, value) tuples")
        })?;
        // The strings are held here while the head borrows their bytes.
        let mut fields = Vec::with_capacity(headers.len());
        for item in headers.iter() {
            let pair =
                item.cast::<PyTuple>().ok().filter(|t| t.len() == 2).ok_or_else(|| {
                    PyTypeError::new_err("each header must be a (name, value) tuple of str")
                })?;
            fields.push((
                native(&pair.get_item(0)?, "header name")?,
                native(&pair.get_item(1)?, "header value")?,
            ));
        }
        let head =
            Head::new(latin1(&status), fields.iter().map(|(name, value)| (latin1(name), latin1(value))))
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
        warn_corrections(&head);
        lock(headers.py(), &self.sink).head = Some(head);
        Ok(Write { sink: Arc::clone(&self.sink) })
    }
}

/// Logs each correction the head check made, the first time this worker makes it: an app that sends
/// `Connection: close` sends it on every response, and one line tells its author as much as a million.
fn warn_corrections(head: &Head) {
    static WARNED: [AtomicBool; Correction::ALL.len()] =
        [const { AtomicBool::new(false) }; Correction::ALL.len()];
    for (correction, warned) in Correction::ALL.into_iter().zip(&WARNED) {
        if head.corrected(correction) && !warned.swap(true, Ordering::Relaxed) {
            warn!("{correction} (said once per worker)");
        }
    }
}

/// A native string (PEP 3333): a `str` whose characters all fit in latin-1.
fn native<'py>(value: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyString>> {
    let text = value
        .cast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("start_response() {what} must be a str")))?;
    if latin1_bytes(text).is_none() {
        let text = text.to_cow().unwrap_or_default();
        return Err(PyValueError::new_err(format!("start_response() {what} {text:?} is not latin-1")));
    }
    Ok(text.clone())
}

/// The latin-1 bytes of a string [`native`] accepted.
fn latin1<'a>(text: &'a Bound<'_, PyString>) -> &'a [u8] {
    latin1_bytes(text).unwrap_or_default()
}

/// A `str`'s own bytes when every character fits in latin-1: the interpreter then stores it one byte per character
/// (it always picks the narrowest width), so these are its latin-1 encoding, read without a copy.
fn latin1_bytes<'a>(text: &'a Bound<'_, PyString>) -> Option<&'a [u8]> {
    let ptr = text.as_ptr();
    // SAFETY: `ptr` is a live str, borrowed for 'a through `text`. PyUnicode_READY makes a (pre-3.12)
    // legacy string canonical first; then a 1-byte kind means DATA points at GET_LENGTH latin-1 bytes,
    // which an immutable str never changes.
    unsafe {
        if ffi::PyUnicode_READY(ptr) != 0 {
            ffi::PyErr_Clear();
            return None;
        }
        if ffi::PyUnicode_KIND(ptr) != ffi::PyUnicode_1BYTE_KIND {
            return None;
        }
        let len = usize::try_from(ffi::PyUnicode_GET_LENGTH(ptr)).ok()?;
        Some(std::slice::from_raw_parts(ffi::PyUnicode_DATA(ptr).cast::<u8>(), len))
    }
}

/// The `write()` callable returned by `start_response` (PEP 3333's imperative API).
#[pyclass(frozen, module = "oxwsgi")]
pub(super) struct Write {
    sink: Arc<Mutex<Sink>>,
}

#[pymethods]
impl Write {
    fn __call__(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let chunk = bytes_of(data).map_err(|_| PyTypeError::new_err("write() takes bytes"))?;
        match emit(py, &self.sink, chunk.as_bytes()) {
            Ok(_) => Ok(()),
            Err(Failure::Python(err)) => Err(err),
            Err(Failure::Wsgi(reason)) => Err(PyRuntimeError::new_err(reason)),
            Err(Failure::ClientGone) => {
                Err(PyOSError::new_err("write error: the client closed the connection"))
            }
        }
    }
}
