//! The pool of Python threads: each attaches to the interpreter once, waits for jobs with the interpreter
//! released, runs the app for one request, and sends its [`Reply`] back to the connection.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tracing::{debug, error};

use super::environ::EnvironTemplate;
use super::harakiri::{self, Board};
use super::response::{drive, Failure, Sink, StartResponse};
use super::{traceback, App};
use crate::config::PoolConfig;
use crate::exchange::{Handler, Rejected, Reply, Request, RequestLine};
use crate::metrics::Recorder;

/// How often shutdown checks whether the threads have finished.
const JOIN_POLL: Duration = Duration::from_millis(10);

enum Task {
    Run(Job),
    /// Re-attach once, so Python objects released by the I/O side are freed now rather than at the next
    /// request (pyo3 frees objects dropped off-interpreter when a thread re-attaches).
    Collect,
}

struct Job {
    request: Request,
    reply: oneshot::Sender<Reply>,
    /// Released when the app is done, letting the accept loop take the next connection.
    _permit: OwnedSemaphorePermit,
}

/// The pool's queue, shared with the response buffers that need a thread to free them.
///
/// A mutex and a condition variable rather than a channel: an idle thread sleeps at once instead of
/// spinning and yielding first, which on a 2-core machine took CPU from the I/O thread and nginx. Measured
/// with wrk through nginx, hello world, one thread, alternating runs: about 22k requests/s with a crossbeam
/// channel, 29k with this; no change for a Flask app.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    collect_pending: AtomicBool,
}

struct QueueState {
    tasks: VecDeque<Task>,
    /// No more tasks are taken; the queued ones still run.
    closed: bool,
}

impl Queue {
    fn new() -> Self {
        let state = QueueState { tasks: VecDeque::new(), closed: false };
        Self { state: Mutex::new(state), ready: Condvar::new(), collect_pending: AtomicBool::new(false) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, task: Task) -> Result<(), Rejected> {
        let mut state = self.lock();
        if state.closed {
            return Err(Rejected);
        }
        state.tasks.push_back(task);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// The next task, waiting for one; `None` once closed and empty.
    fn recv(&self) -> Option<Task> {
        let mut state = self.lock();
        loop {
            if let Some(task) = state.tasks.pop_front() {
                return Some(task);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Asks one thread to free what the I/O side released; at most one such request is queued at a time.
    pub(super) fn collect_soon(&self) {
        if !self.collect_pending.swap(true, Ordering::AcqRel) {
            let _ = self.send(Task::Collect);
        }
    }
}

/// N Python threads running one app.
pub struct Pool {
    queue: Arc<Queue>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    capacity: usize,
}

impl Pool {
    pub(super) fn start(
        app: App,
        config: PoolConfig,
        on_harakiri: Box<dyn FnOnce() + Send>,
        metrics: Recorder,
    ) -> PyResult<Self> {
        let threads = config.threads.get();
        metrics.threads(threads);
        let app = Arc::new(app.callable);
        let board = Board::new(threads);
        if let Some(limit) = config.harakiri {
            harakiri::watch(Arc::clone(&board), limit, on_harakiri).map_err(|e| {
                pyo3::exceptions::PyOSError::new_err(format!("cannot start the harakiri watchdog: {e}"))
            })?;
        }
        let queue = Arc::new(Queue::new());
        let handles = (0..threads)
            .map(|index| {
                let (app, queue) = (Arc::clone(&app), Arc::clone(&queue));
                let board = Arc::clone(&board);
                let thread = PoolThread { index, app, queue, board, metrics };
                std::thread::Builder::new()
                    .name(format!("oxwsgi-py-{index}"))
                    .spawn(move || Python::attach(|py| serve_jobs(py, &thread, config)))
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot start Python threads: {e}")))?;
        Ok(Self { queue, threads: Mutex::new(handles), capacity: threads })
    }

    /// Takes no more requests, lets the threads finish the ones they run (including the iterables'
    /// `close()`, where frameworks run their teardown hooks) for up to `grace`, then runs the app's `atexit`
    /// handlers if every thread finished. Returns whether they did.
    pub fn shutdown(&self, grace: Duration) -> bool {
        self.queue.close();
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

impl Handler for Pool {
    fn submit(
        &self,
        request: Request,
        permit: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Reply>, Rejected> {
        let (reply, receiver) = oneshot::channel();
        self.queue.send(Task::Run(Job { request, reply, _permit: permit }))?;
        Ok(receiver)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

/// What one pool thread works with.
struct PoolThread {
    index: usize,
    app: Arc<Py<PyAny>>,
    queue: Arc<Queue>,
    board: Arc<Board>,
    metrics: Recorder,
}

fn serve_jobs(py: Python<'_>, thread: &PoolThread, config: PoolConfig) {
    thread.board.register_thread(thread.index, py);
    // Per thread, so `wsgi.errors` lines from different threads never interleave.
    let environ = match EnvironTemplate::new(py, config.threads.get() > 1, config.multiprocess) {
        Ok(environ) => environ,
        Err(err) => {
            error!("cannot prepare the WSGI environ template; this thread stops:\n{}", traceback(py, &err));
            return;
        }
    };
    while let Some(task) = py.detach(|| thread.queue.recv()) {
        match task {
            Task::Run(job) => {
                // A bug of ours must cost one request, not a thread of the pool.
                thread.board.start(thread.index, &job.request.vars);
                let started = Instant::now();
                thread
                    .metrics
                    .app_started(thread.index, started.saturating_duration_since(job.request.accepted_at));
                let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    run(py, &thread.app, &environ, &thread.queue, job)
                }));
                thread.board.finish(thread.index);
                let raised = ran.as_ref().map_or(true, |outcome| *outcome == Outcome::AppFailed);
                thread.metrics.app_finished(thread.index, started.elapsed(), raised);
                if ran.is_err() {
                    error!("internal error while running a request; the thread continues");
                }
            }
            Task::Collect => {
                thread.queue.collect_pending.store(false, Ordering::Release);
                // Objects released after this thread re-attached are freed by the next re-attach.
                py.detach(|| ());
            }
        }
    }
}

/// Answers with a 500 (or aborts the stream) if the request ends without a response, however it ends —
/// including a panic — even if the app keeps a reference to `start_response`.
struct Unanswered(Arc<Mutex<Sink>>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).fail();
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

/// One request: environ, app call, iteration, `close()` — always — and the reply.
fn run(py: Python<'_>, app: &Py<PyAny>, environ: &EnvironTemplate, queue: &Arc<Queue>, job: Job) -> Outcome {
    let Job { request, reply, _permit } = job;
    let line = RequestLine(request.vars.clone());
    let sink = Sink::new(reply, request.head_only, Arc::clone(queue));
    let _unanswered = Unanswered(Arc::clone(&sink));
    let result = (|| -> Result<(), Failure> {
        let environ = environ.build(py, request)?;
        let start_response = Bound::new(py, StartResponse::new(Arc::clone(&sink)))?;
        let iterable = app.bind(py).call1((environ, start_response))?;
        let driven = drive(py, &iterable, &sink);
        let closed = close(&iterable);
        match (driven, closed) {
            (Err(failure), Err(err)) => {
                error!(request = %line, "the iterable's close() raised too:\n{}", traceback(py, &err));
                Err(failure)
            }
            (driven, closed) => driven.and(closed.map_err(Failure::Python)),
        }
    })();
    let client_gone = sink.lock().unwrap_or_else(PoisonError::into_inner).client_gone();
    let Err(failure) = result else { return Outcome::Served };
    match failure {
        // The connection logs the disconnect; what it makes the app raise is not an app error.
        _ if client_gone => debug!(request = %line, "the app stopped: the client closed the connection"),
        Failure::ClientGone => {}
        Failure::Python(err) => {
            error!(request = %line, "app raised an exception:\n{}", traceback(py, &err));
            return Outcome::AppFailed;
        }
        Failure::Wsgi(reason) => {
            error!(request = %line, "WSGI violation: {reason}");
            return Outcome::AppFailed;
        }
    }
    Outcome::Served
}

/// PEP 3333: the iterable's `close()` is called however the request ended.
fn close(iterable: &Bound<'_, PyAny>) -> PyResult<()> {
    match iterable.getattr(pyo3::intern!(iterable.py(), "close")) {
        Ok(close) => close.call0().map(drop),
        Err(err) if err.is_instance_of::<pyo3::exceptions::PyAttributeError>(iterable.py()) => Ok(()),
        Err(err) => Err(err),
    }
}
