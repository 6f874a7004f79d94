//! The pool of Python threads: each attaches to the interpreter once, waits for jobs with the interpreter
//! released, runs the app for one request, and sends its [`Reply`] back to the connection.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pyo3::prelude::*;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tracing::{error, info};

use super::environ::EnvironTemplate;
use super::response::{drive, Failure, Sink, StartResponse};
use super::{traceback, App};
use crate::config::PoolConfig;
use crate::exchange::{Handler, Rejected, Reply, Request};

struct Job {
    request: Request,
    reply: oneshot::Sender<Reply>,
    /// Released when the app is done, letting the accept loop take the next connection.
    _permit: OwnedSemaphorePermit,
}

/// What every pool thread shares.
struct Shared {
    app: Py<PyAny>,
    environ: EnvironTemplate,
}

/// N Python threads running one app.
pub struct Pool {
    jobs: Mutex<Option<crossbeam_channel::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    capacity: usize,
}

impl Pool {
    pub(super) fn start(app: App, config: PoolConfig) -> PyResult<Self> {
        let threads = config.threads.get();
        let shared = Python::attach(|py| -> PyResult<Shared> {
            Ok(Shared { app: app.callable, environ: EnvironTemplate::new(py, threads > 1)? })
        })?;
        let shared = Arc::new(shared);
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let handles = (0..threads)
            .map(|index| {
                let shared = Arc::clone(&shared);
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("oxwsgi-py-{index}"))
                    .spawn(move || Python::attach(|py| serve_jobs(py, &shared, &queue)))
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("cannot start Python threads: {e}")))?;
        Ok(Self { jobs: Mutex::new(Some(jobs)), threads: Mutex::new(handles), capacity: threads })
    }

    /// Lets the threads finish the queued requests, then joins them.
    pub fn shutdown(&self) {
        drop(self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
        let handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for handle in handles {
            let _ = handle.join();
        }
    }
}

impl Handler for Pool {
    fn submit(
        &self,
        request: Request,
        permit: OwnedSemaphorePermit,
    ) -> Result<oneshot::Receiver<Reply>, Rejected> {
        let (reply, receiver) = oneshot::channel();
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let jobs = jobs.as_ref().ok_or(Rejected)?;
        jobs.send(Job { request, reply, _permit: permit }).map_err(|_| Rejected)?;
        Ok(receiver)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

fn serve_jobs(py: Python<'_>, shared: &Shared, queue: &crossbeam_channel::Receiver<Job>) {
    while let Ok(job) = py.detach(|| queue.recv()) {
        // A bug of ours must cost one request, not a thread of the pool.
        if std::panic::catch_unwind(AssertUnwindSafe(|| run(py, shared, job))).is_err() {
            error!("internal error while running a request; the thread continues");
        }
    }
}

/// One request: environ, app call, iteration, `close()` — always — and the reply.
fn run(py: Python<'_>, shared: &Shared, job: Job) {
    let Job { request, reply, _permit } = job;
    let target = RequestLabel(request.vars.clone());
    let sink = Sink::new(reply, request.head_only);
    let result = (|| -> Result<(), Failure> {
        let environ = shared.environ.build(py, request)?;
        let start_response = Bound::new(py, StartResponse::new(Arc::clone(&sink)))?;
        let iterable = shared.app.bind(py).call1((environ, start_response))?;
        let driven = drive(py, &iterable, &sink);
        let closed = close(&iterable);
        driven?;
        closed.map_err(Failure::Python)
    })();
    match result {
        Ok(()) => {}
        Err(Failure::Python(err)) => {
            error!(request = %target, "app raised an exception:\n{}", traceback(py, &err));
            sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).fail();
        }
        Err(Failure::Wsgi(reason)) => {
            error!(request = %target, "WSGI violation: {reason}");
            sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).fail();
        }
        Err(Failure::ClientGone) => {
            info!(request = %target, "client closed the connection before the response ended");
        }
    }
}

/// PEP 3333: the iterable's `close()` is called however the request ended.
fn close(iterable: &Bound<'_, PyAny>) -> PyResult<()> {
    match iterable.getattr(pyo3::intern!(iterable.py(), "close")) {
        Ok(close) => close.call0().map(drop),
        Err(err) if err.is_instance_of::<pyo3::exceptions::PyAttributeError>(iterable.py()) => Ok(()),
        Err(err) => Err(err),
    }
}

/// `METHOD /uri` for log lines, read from the vars block only when a line is written.
struct RequestLabel(bytes::Bytes);

impl std::fmt::Display for RequestLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Ok(vars) = oxwsgi_proto::parse_vars(&self.0, usize::MAX) else {
            return f.write_str("?");
        };
        let text = |key: &[u8]| String::from_utf8_lossy(vars.get(key).unwrap_or_default()).into_owned();
        let uri = vars.get(b"REQUEST_URI").or_else(|| vars.get(b"PATH_INFO")).unwrap_or_default();
        write!(f, "{} {}", text(b"REQUEST_METHOD"), String::from_utf8_lossy(uri))
    }
}
