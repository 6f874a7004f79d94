//! What one worker counts, laid out as plain 64-bit words so it can live in shared memory: written with
//! atomics by the worker, read (and summed over workers) by the master.
//!
//! Every type here is `#[repr(C)]` and made only of its word type `W` — `AtomicU64` in shared memory, `u64` in
//! a snapshot — so a snapshot is a word-by-word copy and folding a dead worker into the totals is a
//! word-by-word sum, with no field that could be forgotten. All-zero bytes are a valid, empty value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::model::{Method, ProtocolErrorKind};

/// Upper bounds of the latency histograms' buckets, in seconds (Prometheus `le`), plus the implicit +Inf.
/// From half a millisecond (a cached view behind nginx) to a minute (nginx's default `uwsgi_read_timeout`,
/// past which nobody waits for the answer): about three buckets per decade, so p50/p90/p99 stay within a
/// bucket's width of the truth across the range web apps live in.
pub const LATENCY_BUCKETS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// The same bounds in nanoseconds, for the hot path (no float math per request).
const LATENCY_BOUNDS_NANOS: [u64; 16] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
];
/// One count per bound, and one for everything slower.
pub const BUCKETS: usize = LATENCY_BUCKETS.len() + 1;

/// Response statuses are counted exactly from 200 to 999: the server refuses 1xx and anything that is not
/// three digits, so this covers every status an app can send, with a bounded label set.
pub const FIRST_STATUS: u16 = 200;
const STATUSES: usize = 800;

/// A fixed-bucket latency histogram.
#[repr(C)]
pub struct Histogram<W> {
    /// Per bucket, not cumulative (cumulated when exported): one increment per observation.
    pub buckets: [W; BUCKETS],
    pub sum_nanos: W,
}

impl Histogram<AtomicU64> {
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_NANOS.iter().position(|&bound| nanos <= bound).unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl Histogram<u64> {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    pub fn sum_seconds(&self) -> f64 {
        Duration::from_nanos(self.sum_nanos).as_secs_f64()
    }

    /// (upper bound, observations at or below it) for each finite bound, as Prometheus wants them.
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        LATENCY_BUCKETS
            .iter()
            .zip(self.buckets.iter().scan(0, |total, &n| {
                *total += n;
                Some(*total)
            }))
            .map(|(&bound, count)| (bound, count))
    }
}

/// Counts that only grow: summed over live workers plus every worker that ever died.
#[repr(C)]
pub struct Counters<W> {
    /// `[method][status - FIRST_STATUS]`: responses the app's requests got.
    pub requests: [[W; STATUSES]; Method::ALL.len()],
    /// Accepted → response written.
    pub request_duration: Histogram<W>,
    /// Accepted → a Python thread takes the request: time spent waiting for capacity.
    pub queue_wait: Histogram<W>,
    /// The app call, its iteration and `close()`, on the Python thread.
    pub app_duration: Histogram<W>,
    pub request_body_bytes: W,
    /// Head and body bytes written to nginx.
    pub response_bytes: W,
    /// The app raised (or broke PEP 3333) and the request got a 500 or was cut.
    pub app_exceptions: W,
    pub protocol_errors: [W; ProtocolErrorKind::ALL.len()],
    /// Writes of the response that failed (nginx or the client went away, or a write timed out).
    pub write_errors: W,
}

impl Counters<u64> {
    /// The count for one method and status, 0 for a status outside the counted range.
    pub fn responses(&self, method: Method, status: u16) -> u64 {
        status_index(status).map_or(0, |index| self.requests[method as usize][index])
    }

    /// Every (method, status) with a non-zero count.
    pub fn response_counts(&self) -> impl Iterator<Item = (Method, u16, u64)> + '_ {
        Method::ALL.into_iter().flat_map(move |method| {
            self.requests[method as usize].iter().enumerate().filter(|(_, &n)| n > 0).map(move |(i, &n)| {
                (method, FIRST_STATUS + u16::try_from(i).expect("fewer than 65536 statuses"), n)
            })
        })
    }

    pub fn total_requests(&self) -> u64 {
        self.requests.iter().flatten().sum()
    }
}

fn status_index(status: u16) -> Option<usize> {
    let index = usize::from(status.checked_sub(FIRST_STATUS)?);
    (index < STATUSES).then_some(index)
}

/// The most Python threads of one worker tracked one by one (for the uWSGI stats' `cores`); threads past it
/// still count in every other metric.
pub const TRACKED_THREADS: usize = 256;

/// One Python thread, as the uWSGI stats show it.
#[repr(C)]
pub struct ThreadCell<W> {
    pub requests: W,
    /// 1 while it runs a request.
    pub busy: W,
}

/// What is true of a live worker right now: dropped, not summed, when it dies.
#[repr(C)]
pub struct Gauges<W> {
    /// Connections accepted and not yet answered (waiting for a thread, or running).
    pub in_flight: W,
    pub threads: W,
    pub busy_threads: W,
    pub thread_cells: [ThreadCell<W>; TRACKED_THREADS],
}

/// One worker's slot in the shared region.
#[repr(C)]
pub struct WorkerCell<W> {
    pub counters: Counters<W>,
    pub gauges: Gauges<W>,
}

/// A word of a metrics struct: `u64` in a snapshot, `AtomicU64` in shared memory (same size and alignment).
pub trait Word: sealed::Sealed {}
impl Word for u64 {}
impl Word for AtomicU64 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u64 {}
    impl Sealed for std::sync::atomic::AtomicU64 {}
}

/// A struct that is nothing but words: `#[repr(C)]`, every field a `W` or an array or struct of them.
///
/// # Safety
/// Implement only for such types: then there is no padding, all-zero bytes are a valid value, and the value
/// can be viewed as a slice of `u64` or `AtomicU64`.
pub unsafe trait Words {}
// SAFETY: each is `#[repr(C)]` and made only of `W` (or arrays and structs of this list).
unsafe impl<W: Word> Words for Histogram<W> {}
// SAFETY: as above.
unsafe impl<W: Word> Words for Counters<W> {}
// SAFETY: as above.
unsafe impl<W: Word> Words for ThreadCell<W> {}
// SAFETY: as above.
unsafe impl<W: Word> Words for Gauges<W> {}
// SAFETY: as above.
unsafe impl<W: Word> Words for WorkerCell<W> {}

fn words<T: Words, W: Word>(value: &T) -> &[W] {
    // SAFETY: `T: Words` is words only, `W` is one of the two word types (same size and alignment as u64).
    unsafe {
        std::slice::from_raw_parts(
            std::ptr::from_ref(value).cast::<W>(),
            std::mem::size_of::<T>() / std::mem::size_of::<W>(),
        )
    }
}

fn words_mut<T: Words>(value: &mut T) -> &mut [u64] {
    // SAFETY: as in `words`; the borrow is exclusive.
    unsafe {
        std::slice::from_raw_parts_mut(
            std::ptr::from_mut(value).cast::<u64>(),
            std::mem::size_of::<T>() / std::mem::size_of::<u64>(),
        )
    }
}

/// A zeroed value on the heap (these are tens of kilobytes: too big for comfort on a stack).
pub fn zeroed<T: Words>() -> Box<T> {
    let layout = std::alloc::Layout::new::<T>();
    // SAFETY: `T: Words` is never zero-sized (it holds at least one word).
    let memory = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if memory.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: allocated with `T`'s layout by the global allocator, as `Box` expects, and all-zero bytes are a
    // valid `T: Words`.
    unsafe { Box::from_raw(memory) }
}

/// Adds `live`, read atomically word by word, into `total` (the same struct with plain words).
pub fn add_into<Total: Words, Live: Words>(total: &mut Total, live: &Live) {
    assert_eq!(std::mem::size_of::<Total>(), std::mem::size_of::<Live>(), "the same layout");
    let live: &[AtomicU64] = words(live);
    for (total, live) in words_mut(total).iter_mut().zip(live) {
        *total = total.wrapping_add(live.load(Ordering::Relaxed));
    }
}

/// Stores zero in every word.
pub fn reset<T: Words>(live: &T) {
    for word in words::<T, AtomicU64>(live) {
        word.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_agree() {
        for (seconds, nanos) in LATENCY_BUCKETS.iter().zip(LATENCY_BOUNDS_NANOS) {
            assert_eq!(Duration::from_secs_f64(*seconds), Duration::from_nanos(nanos));
        }
        assert!(LATENCY_BOUNDS_NANOS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let live = zeroed::<Histogram<AtomicU64>>();
        live.observe(Duration::from_micros(500)); // on a bound: that bucket (le is inclusive)
        live.observe(Duration::from_micros(501));
        live.observe(Duration::from_secs(3600));
        let mut total = zeroed::<Histogram<u64>>();
        add_into(&mut *total, &*live);
        assert_eq!(total.count(), 3);
        let cumulative: Vec<_> = total.cumulative().collect();
        assert_eq!(cumulative[0], (0.0005, 1));
        assert_eq!(cumulative[1], (0.001, 2));
        assert_eq!(cumulative.last(), Some(&(60.0, 2)), "an hour is only in +Inf");
        assert!((total.sum_seconds() - 3_600.001_001).abs() < 1e-9);
    }

    #[test]
    fn counters_fold_and_reset() {
        let live = zeroed::<WorkerCell<AtomicU64>>();
        live.counters.requests[Method::Post as usize][404 - usize::from(FIRST_STATUS)]
            .fetch_add(2, Ordering::Relaxed);
        live.gauges.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut total = zeroed::<Counters<u64>>();
        add_into(&mut *total, &live.counters);
        add_into(&mut *total, &live.counters);
        assert_eq!(total.responses(Method::Post, 404), 4);
        assert_eq!(total.total_requests(), 4);
        assert_eq!(total.response_counts().collect::<Vec<_>>(), [(Method::Post, 404, 4)]);
        assert_eq!(total.responses(Method::Get, 999), 0);
        assert_eq!(total.responses(Method::Get, 1000), 0);
        reset(&*live);
        assert_eq!(live.gauges.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(live.counters.requests[Method::Post as usize][204].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn parser_errors_keep_the_parsers_names() {
        use oxwsgi_proto::ProtocolError as Parser;
        for error in [
            Parser::DataSizeTooLarge { size: 2, limit: 1 },
            Parser::EmptyPacket,
            Parser::EmptyKey { offset: 0 },
            Parser::TruncatedRecord { offset: 0 },
            Parser::TooManyVars { limit: 1 },
        ] {
            assert_eq!(ProtocolErrorKind::from(error).label(), error.kind_label());
        }
        let labels: std::collections::HashSet<_> = ProtocolErrorKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), ProtocolErrorKind::ALL.len(), "distinct labels");
    }

    #[test]
    fn methods_outside_the_list_are_other() {
        assert_eq!(Method::from_bytes(b"PROPFIND"), Method::Other);
        assert_eq!(Method::from_bytes(b"get"), Method::Other, "methods are case-sensitive");
        assert_eq!(Method::from_bytes(b"PATCH").label(), "PATCH");
    }
}
