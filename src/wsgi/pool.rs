//! The pool of Python threads. Each one attaches to the interpreter once and serves requests start to
//! finish: with the interpreter released it takes the next request from its [`Acceptor`] (accepting and
//! reading the connection itself), runs the app, and writes the response (released again). A request
//! crosses no thread unless it has to wait on its peer.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use tracing::{debug, error, info};

use super::environ::EnvironTemplate;
use super::harakiri::{self, Board};
use super::response::{answer_internal_error, drive, lock, Failure, Sink, StartResponse};
use super::streams::Input;
use super::{traceback, App};
use crate::config::PoolConfig;
use crate::metrics::Recorder;
use crate::server::{Front, Job, Request};

/// How often shutdown checks whether the threads have finished.
const JOIN_POLL: Duration = Duration::from_millis(10);

/// N Python threads running one app.
pub struct Pool {
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Why the pool could not start, by kind. A Python error is already formatted (its traceback) here: no
/// `PyErr` leaves this module.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the harakiri watchdog: {0}")]
    Watchdog(std::io::Error),
    #[error("cannot prepare the WSGI environ:\n{traceback}")]
    Environ { traceback: String },
    #[error("cannot start Python threads: {0}")]
    Threads(std::io::Error),
}

impl Pool {
    pub(super) fn start(
        app: App,
        config: PoolConfig,
        on_harakiri: Box<dyn FnOnce() + Send>,
        metrics: Recorder,
        front: &Arc<Front>,
    ) -> Result<Self, StartError> {
        let threads = config.threads.get();
        metrics.threads(threads);
        let app = Arc::new(app.callable);
        // Without --harakiri there is nothing to watch, and no request pays for publishing itself.
        let board = match config.harakiri {
            Some(limit) => {
                let board = Board::new(threads);
                harakiri::watch(Arc::clone(&board), limit, on_harakiri).map_err(StartError::Watchdog)?;
                Some(board)
            }
            None => None,
        };
        // Built before any thread starts, so a failure is the worker's start error (the master sees it)
        // and never a thread that quietly stops serving. Per thread, so `wsgi.errors` lines from different
        // threads never interleave.
        let environs = Python::attach(|py| {
            (0..threads)
                .map(|_| EnvironTemplate::new(py, threads > 1, config.multiprocess))
                .collect::<PyResult<Vec<_>>>()
                .map_err(|err| StartError::Environ { traceback: traceback(py, &err) })
        })?;
        let handles = environs
            .into_iter()
            .enumerate()
            .map(|(index, environ)| {
                let acceptor = front.acceptor()?;
                let thread = PoolThread { index, app: Arc::clone(&app), board: board.clone(), metrics };
                let front = Arc::clone(front);
                std::thread::Builder::new().name(format!("oxwsgi-py-{index}")).spawn(move || {
                    Python::attach(|py| serve_requests(py, &thread, environ, acceptor, &front));
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(StartError::Threads)?;
        Ok(Self { threads: Mutex::new(handles) })
    }

    /// Lets the threads finish the requests they run (including the iterables' `close()`, where frameworks
    /// run their teardown hooks) for up to `grace`, then runs the app's `atexit` handlers if every thread
    /// finished. Returns whether they did. The threads leave their loop once the server is drained.
    pub fn shutdown(&self, grace: Duration) -> bool {
        let handles = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let deadline = Instant::now() + grace;
        while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(JOIN_POLL);
        }
        let finished = handles.iter().all(JoinHandle::is_finished);
        if finished {
            super::run_exit_hooks();
        }
        finished
    }
}

/// What one pool thread works with.
struct PoolThread {
    index: usize,
    app: Arc<Py<PyAny>>,
    board: Option<Arc<Board>>,
    metrics: Recorder,
}

fn serve_requests(
    py: Python<'_>,
    thread: &PoolThread,
    mut environ: EnvironTemplate,
    mut acceptor: crate::server::Acceptor,
    front: &Arc<Front>,
) {
    if let Some(board) = &thread.board {
        board.register_thread(thread.index, py);
    }
    // Returning from `detach` re-attaches, which also frees what the I/O runtime released (`Job::Collect`).
    while let Some(job) = py.detach(|| acceptor.next_job()) {
        let Job::Request(request) = job else { continue };
        let index = thread.index;
        if let Some(board) = &thread.board {
            board.start(index, &request.head.line);
        }
        // The clock is read only for what is counted.
        let started = thread.metrics.is_enabled().then(Instant::now);
        if let Some(started) = started {
            let queued = started.saturating_duration_since(request.head.accepted_at);
            thread.metrics.app_started(index, queued, request.head.line.parts());
        }
        // A bug of ours must cost one request, not a thread of the pool.
        let ran =
            std::panic::catch_unwind(AssertUnwindSafe(|| run(py, &thread.app, &mut environ, front, request)));
        if let Some(board) = &thread.board {
            board.finish(index);
        }
        let raised = ran.as_ref().map_or(true, |outcome| *outcome == Outcome::AppFailed);
        if let Some(started) = started {
            thread.metrics.app_finished(index, started.elapsed(), raised);
        }
        if ran.is_err() {
            error!("internal error while running a request; the thread continues");
        }
    }
}

/// Ends the request however it ends — including a panic, or an app that keeps `start_response` or
/// `wsgi.input` — : the body can no longer be read, and the connection is finished (a 500 if nothing was
/// sent, an abort if the response was cut short).
struct EndRequest<'py> {
    sink: Arc<Mutex<Sink>>,
    input: Bound<'py, Input>,
}

impl EndRequest<'_> {
    fn end(&self) {
        let py = self.input.py();
        let unread = self.input.get().end(py);
        lock(py, &self.sink).end(py, unread);
    }
}

impl Drop for EndRequest<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// How a request ended, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Answered, or cut short by the client going away.
    Served,
    /// The app raised or broke PEP 3333: it got a 500, or its response was cut.
    AppFailed,
}

/// One request: environ, app call, iteration and writes, `close()` — always — and the end of the
/// connection.
fn run(
    py: Python<'_>,
    app: &Py<PyAny>,
    environ: &mut EnvironTemplate,
    front: &Arc<Front>,
    request: Request,
) -> Outcome {
    let Request { head, body, responder } = request;
    let line = head.line.clone();
    let input = match Bound::new(py, Input::new(body)) {
        Ok(input) => input,
        Err(err) => {
            error!(request = %line, "cannot create wsgi.input:\n{}", traceback(py, &err));
            py.detach(|| answer_internal_error(responder));
            return Outcome::AppFailed;
        }
    };
    let sink = Sink::new(responder, head.head_only(), input.clone().unbind());
    let ending = EndRequest { sink: Arc::clone(&sink), input: input.clone() };
    let result = (|| -> Result<(), Failure> {
        let environ = environ.build(py, &head, &input)?;
        let start_response = Bound::new(py, StartResponse::new(Arc::clone(&sink)))?;
        let iterable = app.bind(py).call1((environ, start_response))?;
        // The connection is closed with the last write when the body was all read (see `Sink`).
        let driven = drive(py, &iterable, &sink, front);
        let closed = close(&iterable);
        match (driven, closed) {
            (Err(failure), Err(err)) => {
                error!(request = %line, "the iterable's close() raised too:\n{}", traceback(py, &err));
                Err(failure)
            }
            (driven, closed) => driven.and(closed.map_err(Failure::Python)),
        }
    })();
    let client_gone = lock(py, &sink).client_gone();
    // The failure is logged before the connection ends, so its consequence (a 500, an abort) follows it
    // in the log.
    let outcome = match result {
        Ok(()) | Err(Failure::ClientGone) => Outcome::Served,
        // The connection logs the disconnect; what it makes the app raise is not an app error.
        Err(_) if client_gone => {
            debug!(request = %line, "the app stopped: the client closed the connection");
            Outcome::Served
        }
        // What the app raised reading a body the client never finished sending is no app error either
        // (asked only of a failed request: it takes the body's lock).
        Err(_) if input.get().peer_closed(py) => {
            info!(request = %line, "the app stopped: the client closed the connection before sending the whole body");
            Outcome::Served
        }
        Err(Failure::Python(err)) => {
            error!(request = %line, "app raised an exception:\n{}", traceback(py, &err));
            Outcome::AppFailed
        }
        Err(Failure::Wsgi(reason)) => {
            error!(request = %line, "WSGI violation: {reason}");
            Outcome::AppFailed
        }
    };
    drop(ending);
    outcome
}

/// PEP 3333: the iterable's `close()` is called however the request ended.
fn close(iterable: &Bound<'_, PyAny>) -> PyResult<()> {
    // A plain list or tuple has none; looking would raise (and build) an AttributeError per request.
    if iterable.is_exact_instance_of::<PyList>() || iterable.is_exact_instance_of::<PyTuple>() {
        return Ok(());
    }
    match iterable.getattr(pyo3::intern!(iterable.py(), "close")) {
        Ok(close) => close.call0().map(drop),
        Err(err) if err.is_instance_of::<pyo3::exceptions::PyAttributeError>(iterable.py()) => Ok(()),
        Err(err) => Err(err),
    }
}
