//! `start_response`, `write()`, and driving the iterable the app returns, per PEP 3333.
//!
//! Owns the response state of one request ([`Sink`]): the head the app declared, whether it was sent,
//! how many body bytes went out against a declared `Content-Length`, and the channel to the connection.
//! The head goes out with the first non-empty chunk (or at the end), a list/tuple result goes out as one
//! [`Reply::Full`] with a derived `Content-Length`, and anything else streams chunk by chunk.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use tokio::sync::{mpsc, oneshot};

use super::pool::Queue;
use crate::exchange::{Reply, StreamItem};
use crate::response::Head;

/// Chunks queued between the Python thread and the socket before `write()`/iteration waits: enough to keep
/// the socket busy while the app produces the next chunk, small enough that a slow client back-pressures a
/// streaming app instead of buffering its whole output in memory.
const STREAM_CHANNEL_CHUNKS: usize = 8;

/// Chunks up to this size are copied; larger ones are written straight from the Python `bytes` object,
/// which is kept alive until the write is done. Below it a copy is cheaper than the deferred reference drop.
const COPY_CHUNKS_UP_TO: usize = 4096;

/// The response state of one request, shared by `start_response`, `write()` and the iteration.
///
/// What was sent is read off the two channels: while `reply` is there nothing went out (the head can still
/// be replaced with `exc_info`, or become a 500); while `stream` is there the body is streaming; with
/// neither, the response is complete and further chunks are dropped.
pub(super) struct Sink {
    reply: Option<oneshot::Sender<Reply>>,
    stream: Option<mpsc::Sender<StreamItem>>,
    head: Option<Head>,
    head_only: bool,
    sent: u64,
    /// nginx closed the connection: the errors this causes in the app are not the app's fault.
    client_gone: bool,
    /// Where large chunks ask for a Python thread to free them once written.
    queue: Arc<Queue>,
}

/// A send to make once the sink's lock is released (it may wait for the socket).
type Deferred = (mpsc::Sender<StreamItem>, StreamItem);

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

fn lock(sink: &Mutex<Sink>) -> MutexGuard<'_, Sink> {
    // A panic while holding the lock cannot leave the state half-updated in a way that matters more than
    // answering the request, so a poisoned lock is used as is.
    sink.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sink {
    pub(super) fn new(reply: oneshot::Sender<Reply>, head_only: bool, queue: Arc<Queue>) -> Arc<Mutex<Self>> {
        let sink = Self {
            reply: Some(reply),
            stream: None,
            head: None,
            head_only,
            sent: 0,
            client_gone: false,
            queue,
        };
        Arc::new(Mutex::new(sink))
    }

    fn nothing_sent(&self) -> bool {
        self.reply.is_some()
    }

    pub(super) fn client_gone(&self) -> bool {
        self.client_gone
    }

    fn send_reply(&mut self, reply: Reply) -> Result<(), Failure> {
        let sender = self.reply.take().ok_or(Failure::ClientGone)?;
        sender.send(reply).map_err(|_| self.gone())
    }

    fn gone(&mut self) -> Failure {
        self.client_gone = true;
        self.stream = None;
        Failure::ClientGone
    }

    fn no_body(&self, head: &Head) -> bool {
        self.head_only || head.forbids_body()
    }

    /// Cuts `chunk` to what a declared Content-Length still allows.
    fn within_length(&mut self, mut chunk: Bytes) -> (Bytes, Flow) {
        let Some(declared) = self.head.as_ref().and_then(Head::content_length) else {
            self.sent += chunk.len() as u64;
            return (chunk, Flow::More);
        };
        let left = declared.saturating_sub(self.sent);
        if chunk.len() as u64 >= left {
            chunk.truncate(usize::try_from(left).unwrap_or(usize::MAX));
            self.sent = declared;
            return (chunk, Flow::Enough);
        }
        self.sent += chunk.len() as u64;
        (chunk, Flow::More)
    }

    /// Takes one non-empty chunk: the first one sends the head with it; later ones are returned to be sent
    /// on the stream after the lock is released.
    fn take_chunk(&mut self, chunk: Bytes) -> Result<(Option<Deferred>, Flow), Failure> {
        if let Some(stream) = self.stream.clone() {
            let (chunk, flow) = self.within_length(chunk);
            let send = (!chunk.is_empty()).then_some((stream, StreamItem::Chunk(chunk)));
            return Ok((send, flow));
        }
        if !self.nothing_sent() {
            return Ok((None, Flow::Enough));
        }
        let head = self.head.clone().ok_or_else(missing_start_response)?;
        if self.no_body(&head) {
            let reply =
                Reply::Full { status: head.status(), head: head.finish(None).into(), body: Vec::new() };
            self.send_reply(reply)?;
            return Ok((None, Flow::Enough));
        }
        let (chunk, flow) = self.within_length(chunk);
        let (stream, rest) = mpsc::channel(STREAM_CHANNEL_CHUNKS);
        let status = head.status();
        self.send_reply(Reply::Stream { status, head: head.finish(None).into(), first: chunk, rest })?;
        self.stream = Some(stream);
        Ok((None, flow))
    }

    /// The iterable is exhausted. `collected` holds the whole body when the result was a list or tuple.
    /// Returns the end-of-stream marker to send once the lock is released.
    fn finish(&mut self, collected: Option<Vec<Bytes>>) -> Result<Option<Deferred>, Failure> {
        if let Some(stream) = self.stream.take() {
            let declared = self.head.as_ref().and_then(Head::content_length);
            if let Some(declared) = declared.filter(|&declared| self.sent < declared) {
                // Dropping the stream without its end marker aborts the connection.
                return Err(Failure::Wsgi(format!(
                    "the app declared Content-Length {declared} but produced {} bytes",
                    self.sent
                )));
            }
            return Ok(Some((stream, StreamItem::End)));
        }
        if !self.nothing_sent() {
            return Ok(None);
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
        let reply = Reply::Full { status: head.status(), head: head.finish(derived).into(), body };
        self.send_reply(reply)?;
        Ok(None)
    }

    /// The request failed: a 500 if nothing was sent yet; otherwise the stream is dropped without its end
    /// marker, which aborts the connection.
    pub(super) fn fail(&mut self) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Reply::internal_error());
        }
        self.stream = None;
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

/// Sends one chunk: with the lock released, a `try_send` first, and only when the channel is full a wait
/// with the interpreter released, so other Python threads run while the socket drains.
fn emit(py: Python<'_>, sink: &Mutex<Sink>, chunk: Bytes) -> Result<Flow, Failure> {
    if chunk.is_empty() {
        return Ok(Flow::More);
    }
    let (send, flow) = lock(sink).take_chunk(chunk)?;
    if let Some(send) = send {
        deliver(py, sink, send)?;
    }
    Ok(flow)
}

fn finish(py: Python<'_>, sink: &Mutex<Sink>, collected: Option<Vec<Bytes>>) -> Result<(), Failure> {
    let end = lock(sink).finish(collected)?;
    match end {
        Some(end) => deliver(py, sink, end),
        None => Ok(()),
    }
}

fn deliver(py: Python<'_>, sink: &Mutex<Sink>, (stream, item): Deferred) -> Result<(), Failure> {
    let sent = match stream.try_send(item) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        Err(mpsc::error::TrySendError::Full(item)) => py.detach(|| stream.blocking_send(item)).map_err(drop),
    };
    sent.map_err(|()| lock(sink).gone())
}

/// A body chunk from the app: `bytes` only (PEP 3333), large ones shared rather than copied.
fn chunk_from(value: &Bound<'_, PyAny>, queue: &Arc<Queue>) -> Result<Bytes, Failure> {
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
        queue: Arc::clone(queue),
    }))
}

/// A Python `bytes` object lent to the writer. Its buffer is immutable and lives as long as the object, which
/// this owns. Dropped on the I/O side, the reference goes to pyo3's deferred pool, and a pool thread is asked
/// to re-attach soon so the memory is freed now, not at the next request.
struct SharedPyBytes {
    ptr: *const u8,
    len: usize,
    object: Option<Py<PyBytes>>,
    queue: Arc<Queue>,
}

impl Drop for SharedPyBytes {
    fn drop(&mut self) {
        drop(self.object.take());
        self.queue.collect_soon();
    }
}

// SAFETY: the pointer targets the immutable buffer of a `bytes` object kept alive by `_object`; reading it
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

/// Runs the iterable the app returned to its end (or until the response is complete), then reports it.
pub(super) fn drive(py: Python<'_>, iterable: &Bound<'_, PyAny>, sink: &Mutex<Sink>) -> Result<(), Failure> {
    let is_sequence = iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>();
    let queue = Arc::clone(&lock(sink).queue);
    if is_sequence && lock(sink).nothing_sent() {
        let chunks =
            iterable.try_iter()?.map(|item| chunk_from(&item?, &queue)).collect::<Result<Vec<_>, _>>()?;
        return finish(py, sink, Some(chunks));
    }
    for item in iterable.try_iter()? {
        if emit(py, sink, chunk_from(&item?, &queue)?)? == Flow::Enough {
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
            let sink = lock(&self.sink);
            (sink.head.is_some(), sink.nothing_sent())
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
        lock(&self.sink).head = Some(head);
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
        let queue = Arc::clone(&lock(&self.sink).queue);
        let chunk = chunk_from(data, &queue).map_err(|_| PyTypeError::new_err("write() takes bytes"))?;
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
