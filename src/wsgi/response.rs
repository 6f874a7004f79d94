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
pub(super) struct Sink {
    reply: Option<oneshot::Sender<Reply>>,
    head: Option<Head>,
    state: State,
    head_only: bool,
    sent: u64,
}

enum State {
    /// Nothing written yet: the head can still be replaced (with `exc_info`) or become a 500.
    Pending,
    Streaming(mpsc::Sender<StreamItem>),
    /// The response is complete (or needs no body); further chunks are dropped.
    Done,
}

/// A chunk to send on the stream once the sink's lock is released.
type Pending = (mpsc::Sender<StreamItem>, Bytes);

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
    pub(super) fn new(reply: oneshot::Sender<Reply>, head_only: bool) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            reply: Some(reply),
            head: None,
            state: State::Pending,
            head_only,
            sent: 0,
        }))
    }

    fn is_pending(&self) -> bool {
        matches!(self.state, State::Pending)
    }

    fn send_reply(&mut self, reply: Reply) -> Result<(), Failure> {
        let sender = self.reply.take().ok_or(Failure::ClientGone)?;
        sender.send(reply).map_err(|_| Failure::ClientGone)
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

    /// Decides what to do with one non-empty chunk; returns the channel to send it on when it must be
    /// sent after the lock is released (sending may wait for the socket).
    fn take_chunk(&mut self, chunk: Bytes) -> Result<(Option<Pending>, Flow), Failure> {
        match &self.state {
            State::Done => Ok((None, Flow::Enough)),
            State::Streaming(tx) => {
                let tx = tx.clone();
                let (chunk, flow) = self.within_length(chunk);
                Ok((Some((tx, chunk)), flow))
            }
            State::Pending => {
                let head = self.head.clone().ok_or_else(missing_start_response)?;
                if self.no_body(&head) {
                    self.state = State::Done;
                    let reply = Reply::Full {
                        status: head.status(),
                        head: head.finish(None).into(),
                        body: Vec::new(),
                    };
                    self.send_reply(reply)?;
                    return Ok((None, Flow::Enough));
                }
                let (chunk, flow) = self.within_length(chunk);
                let (tx, rx) = mpsc::channel(STREAM_CHANNEL_CHUNKS);
                self.state = State::Streaming(tx);
                let status = head.status();
                self.send_reply(Reply::Stream {
                    status,
                    head: head.finish(None).into(),
                    first: chunk,
                    rest: rx,
                })?;
                if flow == Flow::Enough {
                    self.state = State::Done;
                }
                Ok((None, flow))
            }
        }
    }

    /// The iterable is exhausted. `collected` holds the whole body when the result was a list or tuple.
    fn finish(&mut self, collected: Option<Vec<Bytes>>) -> Result<(), Failure> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Done => Ok(()),
            State::Streaming(tx) => {
                let short = self
                    .head
                    .as_ref()
                    .and_then(Head::content_length)
                    .filter(|&declared| self.sent < declared);
                if let (Some(declared), false) = (short, self.head_only) {
                    let _ = tx.try_send(StreamItem::Abort);
                    return Err(Failure::Wsgi(format!(
                        "the app declared Content-Length {declared} but produced {} bytes",
                        self.sent
                    )));
                }
                Ok(())
            }
            State::Pending => {
                let head = self.head.take().ok_or_else(missing_start_response)?;
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
                if self.no_body(&head) {
                    body.clear();
                }
                let reply =
                    Reply::Full { status: head.status(), head: head.finish(Some(total)).into(), body };
                self.send_reply(reply)
            }
        }
    }

    /// The request failed: a 500 if nothing was sent yet, otherwise the connection is aborted.
    pub(super) fn fail(&mut self) {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Pending => {
                let _ = self.send_reply(Reply::internal_error());
            }
            State::Streaming(tx) => {
                let _ = tx.try_send(StreamItem::Abort);
            }
            State::Done => {}
        }
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

/// Sends one chunk: a `try_send` first, and only when the channel is full a wait with the interpreter
/// released, so other Python threads run while the socket drains.
fn emit(py: Python<'_>, sink: &Mutex<Sink>, chunk: Bytes) -> Result<Flow, Failure> {
    if chunk.is_empty() {
        return Ok(Flow::More);
    }
    let (send, flow) = lock(sink).take_chunk(chunk)?;
    if let Some((tx, chunk)) = send {
        if !chunk.is_empty() {
            send_item(py, &tx, StreamItem::Chunk(chunk))?;
        }
        if flow == Flow::Enough {
            lock(sink).state = State::Done;
        }
    }
    Ok(flow)
}

fn send_item(py: Python<'_>, tx: &mpsc::Sender<StreamItem>, item: StreamItem) -> Result<(), Failure> {
    match tx.try_send(item) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(Failure::ClientGone),
        Err(mpsc::error::TrySendError::Full(item)) => {
            py.detach(|| tx.blocking_send(item)).map_err(|_| Failure::ClientGone)
        }
    }
}

/// A body chunk from the app: `bytes` only (PEP 3333), large ones shared rather than copied.
pub(super) fn chunk_from(value: &Bound<'_, PyAny>) -> Result<Bytes, Failure> {
    let bytes = value.cast::<PyBytes>().map_err(|_| {
        let kind = value.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string());
        Failure::Wsgi(format!("the app produced a {kind} body chunk; WSGI bodies must be bytes"))
    })?;
    let data = bytes.as_bytes();
    if data.len() <= COPY_CHUNKS_UP_TO {
        return Ok(Bytes::copy_from_slice(data));
    }
    Ok(Bytes::from_owner(SharedPyBytes {
        ptr: data.as_ptr(),
        len: data.len(),
        _object: bytes.clone().unbind(),
    }))
}

/// A Python `bytes` object lent to the writer. Its buffer is immutable and lives as long as the object, which
/// this owns; dropping it without the interpreter queues the decref for the next Python thread that
/// re-attaches (pyo3's deferred reference pool).
struct SharedPyBytes {
    ptr: *const u8,
    len: usize,
    _object: Py<PyBytes>,
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
    if is_sequence && lock(sink).is_pending() {
        let chunks = iterable.try_iter()?.map(|item| chunk_from(&item?)).collect::<Result<Vec<_>, _>>()?;
        return lock(sink).finish(Some(chunks));
    }
    for item in iterable.try_iter()? {
        if emit(py, sink, chunk_from(&item?)?)? == Flow::Enough {
            break;
        }
    }
    lock(sink).finish(None)
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
        {
            let sink = lock(&self.sink);
            if sink.head.is_some() && exc_info.is_none() {
                return Err(PyRuntimeError::new_err(
                    "start_response() called a second time without exc_info (PEP 3333)",
                ));
            }
            if let (Some(exc_info), false) = (exc_info, sink.is_pending()) {
                // The head is on the wire: PEP 3333 says re-raise the app's own exception.
                let value = exc_info.get_item(1)?;
                let value = value.call_method1("with_traceback", (exc_info.get_item(2)?,))?;
                return Err(PyErr::from_value(value));
            }
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
        let chunk = chunk_from(data).map_err(|_| PyTypeError::new_err("write() takes bytes"))?;
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
