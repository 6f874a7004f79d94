//! Harakiri: a watchdog thread that notices a request running past `--harakiri`, has the worker replaced
//! (through the hook the master gave), and logs where the stuck request is in the app's Python code.
//!
//! Each pool thread publishes what it runs in a [`Slot`]; the watchdog only reads them. The hook is called
//! before the stack is dumped, because dumping needs the interpreter, which a request stuck in C code may
//! hold for ever: the master kills the worker after a short grace whatever happens here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use tracing::error;

use super::traceback;
use crate::server::RequestLine;

/// How often the watchdog looks: a request is caught at most this long after its deadline.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// What one pool thread is running.
pub(super) struct Slot {
    /// Milliseconds since `epoch` plus one when the current request started; 0 when idle.
    started: AtomicU64,
    /// The thread's Python identity (`threading.get_ident()`), to find its stack.
    python_ident: AtomicU64,
    line: Mutex<Option<RequestLine>>,
}

/// The pool threads' slots and the clock they share.
pub(super) struct Board {
    epoch: Instant,
    slots: Vec<Slot>,
}

impl Board {
    pub(super) fn new(threads: usize) -> Arc<Self> {
        let slot =
            || Slot { started: AtomicU64::new(0), python_ident: AtomicU64::new(0), line: Mutex::new(None) };
        Arc::new(Self { epoch: Instant::now(), slots: (0..threads).map(|_| slot()).collect() })
    }

    pub(super) fn register_thread(&self, index: usize, py: Python<'_>) {
        let ident =
            py.import("threading").and_then(|t| t.call_method0("get_ident")).and_then(|i| i.extract());
        self.slots[index].python_ident.store(ident.unwrap_or(0), Ordering::Relaxed);
    }

    pub(super) fn start(&self, index: usize, line: &RequestLine) {
        let slot = &self.slots[index];
        *slot.line.lock().unwrap_or_else(PoisonError::into_inner) = Some(line.clone());
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        slot.started.store(now + 1, Ordering::Release);
    }

    pub(super) fn finish(&self, index: usize) {
        let slot = &self.slots[index];
        slot.started.store(0, Ordering::Release);
        // Lets go of the request's packet, so the serving thread's read buffer can be reused.
        slot.line.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    /// The slot whose request has run longer than `limit`, if any, with how long it has run.
    fn overdue(&self, limit: Duration) -> Option<(&Slot, Duration)> {
        let now = self.epoch.elapsed();
        self.slots.iter().find_map(|slot| {
            let started = slot.started.load(Ordering::Acquire);
            let running = now.saturating_sub(Duration::from_millis(started.checked_sub(1)?));
            (running > limit).then_some((slot, running))
        })
    }
}

/// Starts the watchdog. `on_harakiri` is called once, when a request outlives `limit`.
pub(super) fn watch(
    board: Arc<Board>,
    limit: Duration,
    on_harakiri: Box<dyn FnOnce() + Send>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("oxwsgi-harakiri".into()).spawn(move || {
        let (slot, running) = loop {
            std::thread::sleep(WATCH_INTERVAL);
            if let Some(found) = board.overdue(limit) {
                break found;
            }
        };
        let line = slot.line.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let line = line.map_or_else(|| "a request".to_owned(), |line| line.to_string());
        error!("HARAKIRI: {line} has run {running:.1?}, over --harakiri {limit:?}; this worker is replaced");
        on_harakiri();
        let ident = slot.python_ident.load(Ordering::Relaxed);
        Python::attach(|py| match python_stack(py, ident) {
            Ok(stack) => error!("HARAKIRI: where {line} is stuck (most recent call last):\n{stack}"),
            Err(err) => error!("HARAKIRI: cannot read the stuck thread's stack:\n{}", traceback(py, &err)),
        });
    })?;
    Ok(())
}

/// The Python stack of thread `ident`, formatted like a traceback.
fn python_stack(py: Python<'_>, ident: u64) -> PyResult<String> {
    let frames = py.import("sys")?.call_method0("_current_frames")?;
    let frames = frames.cast::<PyDict>()?;
    let Some(frame) = frames.get_item(ident)? else {
        return Ok(String::from("(the thread has no Python frame: it is in the server, not the app)"));
    };
    let lines = py.import("traceback")?.call_method1("format_stack", (frame,))?;
    Ok(lines.extract::<Vec<String>>()?.concat().trim_end().to_owned())
}
