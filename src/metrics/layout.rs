//! What one worker counts, laid out as plain 64-bit words so it can live in shared memory: written with
//! atomics by the worker, read (and summed over workers) by the master.
//!
//! Every type here is declared with `word_struct!`: `#[repr(C)]` and made only
//! of its word type `W` (checked at compile time), so a snapshot is a word-by-word copy and folding a dead
//! worker into the totals is a word-by-word sum, with no field that could be forgotten. All-zero bytes are a
//! valid, empty value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::model::{Method, ProtocolErrorKind};
use super::words::word_struct;

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

word_struct! {
    /// A fixed-bucket latency histogram.
    pub struct Histogram<W> {
        /// Per bucket, not cumulative (cumulated when exported): one increment per observation.
        pub buckets: [W; BUCKETS],
        pub sum_nanos: W,
    }
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

word_struct! {
    /// Counts that only grow: summed over live workers plus every worker that ever died.
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

/// Bytes of the request line each thread keeps while it runs a request (as 64-bit words): the method and
/// the start of the URI name a request in the master's report of a worker that died during it; a longer
/// line is cut there. 256 bytes hold almost every real path, and cost 64 KiB per worker cell.
pub const RUNNING_LINE_BYTES: usize = 256;
const RUNNING_LINE_WORDS: usize = RUNNING_LINE_BYTES / 8;

word_struct! {
    /// One Python thread, as the uWSGI stats show it.
    pub struct ThreadCell<W> {
        pub requests: W,
        /// 1 while it runs a request.
        pub busy: W,
        /// How many bytes of `running_line` hold the request it runs (or ran last): written when it
        /// starts one, so the master can name it if the worker dies during it.
        pub running_len: W,
        /// `METHOD URI`, cut to [`RUNNING_LINE_BYTES`], packed little-endian into words.
        pub running_line: [W; RUNNING_LINE_WORDS],
    }
}

impl ThreadCell<AtomicU64> {
    /// Keeps `parts`, joined by a space, as the request this thread runs.
    fn set_running(&self, parts: [&[u8]; 2]) {
        let mut line = [0u8; RUNNING_LINE_BYTES];
        let mut len = 0;
        for (i, part) in parts.into_iter().enumerate() {
            if i > 0 && len < RUNNING_LINE_BYTES {
                line[len] = b' ';
                len += 1;
            }
            let take = part.len().min(RUNNING_LINE_BYTES - len);
            line[len..len + take].copy_from_slice(&part[..take]);
            len += take;
        }
        for (word, bytes) in self.running_line.iter().zip(line[..len.next_multiple_of(8)].chunks_exact(8)) {
            word.store(u64::from_le_bytes(bytes.try_into().expect("chunks of 8")), Ordering::Relaxed);
        }
        self.running_len.store(len as u64, Ordering::Release);
    }

    /// Marks the thread busy with the request `parts` names.
    pub fn start(&self, parts: [&[u8]; 2]) {
        self.set_running(parts);
        self.busy.store(1, Ordering::Relaxed);
    }
}

impl ThreadCell<u64> {
    /// The request a busy thread runs, as text (a cut line ends in `...`); `None` when idle.
    pub fn running(&self) -> Option<String> {
        if self.busy == 0 {
            return None;
        }
        let len = usize::try_from(self.running_len).map_or(RUNNING_LINE_BYTES, |n| n.min(RUNNING_LINE_BYTES));
        let bytes: Vec<u8> = self.running_line.iter().flat_map(|word| word.to_le_bytes()).take(len).collect();
        let mut line = String::from_utf8_lossy(&bytes).into_owned();
        if len == RUNNING_LINE_BYTES {
            line.push_str("...");
        }
        Some(line)
    }
}

word_struct! {
    /// What is true of a live worker right now: dropped, not summed, when it dies.
    pub struct Gauges<W> {
        /// Connections accepted and not yet answered (waiting for a thread, or running).
        pub in_flight: W,
        pub threads: W,
        pub busy_threads: W,
        pub thread_cells: [ThreadCell<W>; TRACKED_THREADS],
    }
}

word_struct! {
    /// One worker's slot in the shared region.
    pub struct WorkerCell<W> {
        pub counters: Counters<W>,
        pub gauges: Gauges<W>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::words::{add_into, reset, zeroed};

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

    /// The line a live thread cell keeps, as the master reads it from a copy.
    fn running_after(parts: [&[u8]; 2]) -> Option<String> {
        let live = zeroed::<ThreadCell<AtomicU64>>();
        live.start(parts);
        let mut copy = zeroed::<ThreadCell<u64>>();
        add_into(&mut *copy, &*live);
        copy.running()
    }

    #[test]
    fn a_busy_thread_names_its_request() {
        assert_eq!(running_after([b"GET", b"/crash?x=1"]).as_deref(), Some("GET /crash?x=1"));
        assert_eq!(running_after([b"", b""]).as_deref(), Some(" "));
        let long = vec![b'a'; 1000];
        let cut = running_after([b"POST", &long]).unwrap();
        assert_eq!(cut.len(), RUNNING_LINE_BYTES + 3, "{cut}");
        assert!(cut.starts_with("POST aaa") && cut.ends_with("a..."), "{cut}");
        let exact = vec![b'b'; RUNNING_LINE_BYTES - 4];
        assert!(running_after([b"GET", &exact]).unwrap().ends_with("b..."), "a full line may have been cut");
        assert_eq!(zeroed::<ThreadCell<u64>>().running(), None, "an idle thread runs nothing");
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
