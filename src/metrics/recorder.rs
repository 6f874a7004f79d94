//! A worker's side of the metrics: the [`Recorder`] the request path counts through (relaxed atomic adds
//! into the worker's own cell — no system call, lock or message per request), and the guard that keeps a
//! connection counted in flight.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::layout::{FIRST_STATUS, TRACKED_THREADS};
use super::model::{Method, ProtocolErrorKind};
use super::region::{LiveCell, Region};

/// A worker's handle on its cell; does nothing without one (no `--metrics` or `--stats`, or no master).
/// Copied freely: the cell lives as long as the process.
#[derive(Clone, Copy, Default)]
pub struct Recorder(Option<&'static LiveCell>);

impl Recorder {
    pub const fn disabled() -> Self {
        Self(None)
    }

    /// Counts into `cell` of `region` for the rest of the process's life.
    pub fn new(region: Region, cell: usize) -> io::Result<Self> {
        if region.cell(cell).is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "metrics cell out of range"));
        }
        // The worker counts until it exits: the mapping is never unmapped.
        let region: &'static Region = Box::leak(Box::new(region));
        Ok(Self(region.cell(cell)))
    }

    /// A recorder on a cell the caller keeps alive (tests of the region).
    #[cfg(test)]
    pub(super) fn of_cell(cell: Option<&'static LiveCell>) -> Self {
        Self(cell)
    }

    pub fn is_enabled(self) -> bool {
        self.0.is_some()
    }

    /// Counts a connection in flight until the guard drops.
    pub fn in_flight(self) -> InFlight {
        if let Some(cell) = self.0 {
            cell.gauges.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        InFlight(self.0)
    }

    pub fn protocol_error(self, kind: ProtocolErrorKind) {
        if let Some(cell) = self.0 {
            cell.counters.protocol_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A request the app answered, once its response is written (or failed to be).
    pub fn request_done(self, done: &RequestDone) {
        let Some(cell) = self.0 else { return };
        let counters = &cell.counters;
        let status = done.status.checked_sub(FIRST_STATUS).map(usize::from);
        if let Some(count) = status.and_then(|status| counters.requests[done.method as usize].get(status)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        counters.request_duration.observe(done.duration);
        counters.request_body_bytes.fetch_add(done.body_bytes, Ordering::Relaxed);
        counters.response_bytes.fetch_add(done.response_bytes, Ordering::Relaxed);
        if done.write_failed {
            counters.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The worker's pool has `threads` Python threads.
    pub fn threads(self, threads: usize) {
        if let Some(cell) = self.0 {
            cell.gauges.threads.store(threads as u64, Ordering::Relaxed);
        }
    }

    /// Python thread `thread` takes the request `line` (method and URI) that waited `queued` since it was
    /// accepted.
    pub fn app_started(self, thread: usize, queued: Duration, line: [&[u8]; 2]) {
        let Some(cell) = self.0 else { return };
        cell.counters.queue_wait.observe(queued);
        cell.gauges.busy_threads.fetch_add(1, Ordering::Relaxed);
        if let Some(thread) = cell.gauges.thread_cells.get(thread) {
            thread.start(line);
        }
    }

    /// Python thread `thread` is done with its request, after `ran` in the app; `raised` if the app failed.
    pub fn app_finished(self, thread: usize, ran: Duration, raised: bool) {
        let Some(cell) = self.0 else { return };
        cell.counters.app_duration.observe(ran);
        if raised {
            cell.counters.app_exceptions.fetch_add(1, Ordering::Relaxed);
        }
        cell.gauges.busy_threads.fetch_sub(1, Ordering::Relaxed);
        if let Some(thread) = cell.gauges.thread_cells.get(thread) {
            thread.busy.store(0, Ordering::Relaxed);
            thread.requests.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A finished request, as counted.
pub struct RequestDone {
    pub method: Method,
    pub status: u16,
    /// Accepted → response written.
    pub duration: Duration,
    pub body_bytes: u64,
    pub response_bytes: u64,
    pub write_failed: bool,
}

/// Keeps one connection counted in flight.
pub struct InFlight(Option<&'static LiveCell>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(cell) = self.0 {
            cell.gauges.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

const _: () = assert!(TRACKED_THREADS > 0);
