//! The `/metrics` document: what the master read from the cells and knows itself, turned into Prometheus
//! metric families and encoded by the `prometheus` crate's text encoder. Pure: no I/O here.

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram as HistogramValue, LabelPair, Metric, MetricFamily, MetricType,
};
use prometheus::{Encoder, TextEncoder};

use super::layout::{Counters, Histogram};
use super::model::ProtocolErrorKind;

/// Every metric's name starts with this.
const PREFIX: &str = "oxwsgi_";

/// Why a worker process was replaced (the `reason` label of `worker_restarts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestartReason {
    /// It died without being asked to (a crash, a signal, `os._exit` in the app).
    Crash,
    MaxRequests,
    Rss,
    Lifetime,
    Harakiri,
    Reload,
}

impl RestartReason {
    pub const ALL: [Self; 6] =
        [Self::Crash, Self::MaxRequests, Self::Rss, Self::Lifetime, Self::Harakiri, Self::Reload];

    pub fn label(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::MaxRequests => "max_requests",
            Self::Rss => "rss",
            Self::Lifetime => "lifetime",
            Self::Harakiri => "harakiri",
            Self::Reload => "reload",
        }
    }
}

/// The `state` label of `workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Started, loading the app: not accepting yet.
    Starting,
    Ready,
    /// Told to stop: finishing its requests (or killed, after harakiri).
    Retiring,
}

impl WorkerState {
    pub const ALL: [Self; 3] = [Self::Starting, Self::Ready, Self::Retiring];

    pub fn label(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Retiring => "retiring",
        }
    }
}

/// A listening socket's accept queue, as the kernel reports it.
pub struct SocketQueue {
    pub name: String,
    /// `None` when the kernel could not be asked (logged once by whoever read it).
    pub queued: Option<u64>,
    pub max: Option<u64>,
}

/// Everything one scrape reports.
pub struct Scrape<'a> {
    pub counters: &'a Counters<u64>,
    pub in_flight: u64,
    pub threads: u64,
    pub busy_threads: u64,
    pub sockets: &'a [SocketQueue],
    /// Workers per state, in [`WorkerState::ALL`] order.
    pub workers: [u64; 3],
    /// Restarts per reason, in [`RestartReason::ALL`] order.
    pub restarts: [u64; 6],
    pub harakiri: u64,
    /// (worker number, resident bytes) of each live worker.
    pub rss: &'a [(usize, u64)],
    pub version: &'a str,
    pub python_version: &'a str,
}

/// The text exposition format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Encodes `scrape` in the text format. A family with no series yet (no request answered, no socket whose
/// queue the kernel reports) is left out, as the text format has no way to say "none".
pub fn render(scrape: &Scrape<'_>) -> Result<String, prometheus::Error> {
    let families: Vec<MetricFamily> =
        families(scrape).into_iter().filter(|family| !family.get_metric().is_empty()).collect();
    let mut out = Vec::with_capacity(16 * 1024);
    TextEncoder::new().encode(&families, &mut out)?;
    String::from_utf8(out).map_err(|err| prometheus::Error::Msg(err.to_string()))
}

fn families(scrape: &Scrape<'_>) -> Vec<MetricFamily> {
    let mut families = request_families(scrape.counters, scrape.in_flight);
    families.extend(process_families(scrape));
    families
}

/// What the workers count about requests.
fn request_families(c: &Counters<u64>, in_flight: u64) -> Vec<MetricFamily> {
    let requests = c.response_counts().map(|(method, status, n)| {
        counter(&[("method", method.label()), ("status", &status.to_string())], n)
    });
    let protocol_errors = ProtocolErrorKind::ALL
        .iter()
        .map(|&kind| counter(&[("kind", kind.label())], c.protocol_errors[kind as usize]));
    vec![
        family(
            "requests_total",
            "Requests answered by the app, by response status and request method.",
            MetricType::COUNTER,
            requests.collect(),
        ),
        family(
            "request_duration_seconds",
            "Time from accepting the connection to the last byte of the response written.",
            MetricType::HISTOGRAM,
            vec![histogram(&c.request_duration)],
        ),
        family(
            "request_queue_seconds",
            "Time from accepting the connection to a Python thread taking the request: waiting for capacity.",
            MetricType::HISTOGRAM,
            vec![histogram(&c.queue_wait)],
        ),
        family(
            "app_duration_seconds",
            "Time in the app: the call, iterating the response and close(), on the Python thread.",
            MetricType::HISTOGRAM,
            vec![histogram(&c.app_duration)],
        ),
        family(
            "requests_in_flight",
            "Connections accepted and not yet answered, waiting for a thread or running.",
            MetricType::GAUGE,
            vec![gauge(&[], sample(in_flight))],
        ),
        family(
            "request_body_bytes_total",
            "Request body bytes (CONTENT_LENGTH) of the requests answered.",
            MetricType::COUNTER,
            vec![counter(&[], c.request_body_bytes)],
        ),
        family(
            "response_bytes_total",
            "Response bytes (head and body) written to nginx.",
            MetricType::COUNTER,
            vec![counter(&[], c.response_bytes)],
        ),
        family(
            "app_exceptions_total",
            "Requests whose app raised an exception or broke PEP 3333 (answered 500, or cut).",
            MetricType::COUNTER,
            vec![counter(&[], c.app_exceptions)],
        ),
        family(
            "protocol_errors_total",
            "Connections turned away before the app: malformed or unsupported packets, timeouts, oversize bodies.",
            MetricType::COUNTER,
            protocol_errors.collect(),
        ),
        family(
            "write_errors_total",
            "Responses whose write to nginx failed (the client went away, or the write timed out).",
            MetricType::COUNTER,
            vec![counter(&[], c.write_errors)],
        ),
    ]
}

/// What only the master knows: threads and workers, sockets, restarts, memory, the build.
fn process_families(scrape: &Scrape<'_>) -> Vec<MetricFamily> {
    let idle = scrape.threads.saturating_sub(scrape.busy_threads);
    let restarts =
        RestartReason::ALL.iter().zip(scrape.restarts).map(|(r, n)| counter(&[("reason", r.label())], n));
    let workers =
        WorkerState::ALL.iter().zip(scrape.workers).map(|(s, n)| gauge(&[("state", s.label())], sample(n)));
    let socket_gauge = |pick: fn(&SocketQueue) -> Option<u64>| -> Vec<Metric> {
        scrape
            .sockets
            .iter()
            .filter_map(|s| pick(s).map(|n| gauge(&[("socket", &s.name)], sample(n))))
            .collect()
    };
    let rss =
        scrape.rss.iter().map(|&(worker, bytes)| gauge(&[("worker", &worker.to_string())], sample(bytes)));
    vec![
        family(
            "python_threads",
            "Python threads of the live workers, running a request (busy) or waiting for one (idle).",
            MetricType::GAUGE,
            vec![
                gauge(&[("state", "busy")], sample(scrape.busy_threads)),
                gauge(&[("state", "idle")], sample(idle)),
            ],
        ),
        family(
            "listen_queue_length",
            "Connections waiting in the socket's accept queue (from the kernel).",
            MetricType::GAUGE,
            socket_gauge(|s| s.queued),
        ),
        family(
            "listen_queue_max",
            "Size of the socket's accept queue (the effective --listen backlog, from the kernel).",
            MetricType::GAUGE,
            socket_gauge(|s| s.max),
        ),
        family("workers", "Worker processes by state.", MetricType::GAUGE, workers.collect()),
        family(
            "worker_restarts_total",
            "Worker processes replaced, by reason.",
            MetricType::COUNTER,
            restarts.collect(),
        ),
        family(
            "harakiri_total",
            "Workers killed because a request outlived --harakiri.",
            MetricType::COUNTER,
            vec![counter(&[], scrape.harakiri)],
        ),
        family(
            "worker_rss_bytes",
            "Resident memory of each worker process.",
            MetricType::GAUGE,
            rss.collect(),
        ),
        family(
            "build_info",
            "Always 1; the labels say which oxwsgi and which Python serve.",
            MetricType::GAUGE,
            vec![gauge(&[("version", scrape.version), ("python_version", scrape.python_version)], 1.0)],
        ),
    ]
}

/// A count as a Prometheus sample (a float).
#[allow(clippy::cast_precision_loss)] // exact below 2^53: more requests than any server will see
fn sample(count: u64) -> f64 {
    count as f64
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(format!("{PREFIX}{name}"));
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    *family.mut_metric() = metrics;
    family
}

fn labelled(labels: &[(&str, &str)]) -> Metric {
    let mut metric = Metric::default();
    metric.set_label(
        labels
            .iter()
            .map(|&(name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.to_owned());
                pair.set_value(value.to_owned());
                pair
            })
            .collect(),
    );
    metric
}

fn counter(labels: &[(&str, &str)], value: u64) -> Metric {
    let mut metric = labelled(labels);
    let mut counter = Counter::default();
    counter.set_value(sample(value));
    metric.set_counter(counter);
    metric
}

fn gauge(labels: &[(&str, &str)], value: f64) -> Metric {
    let mut metric = labelled(labels);
    let mut gauge = Gauge::default();
    gauge.set_value(value);
    metric.set_gauge(gauge);
    metric
}

fn histogram(values: &Histogram<u64>) -> Metric {
    let mut metric = labelled(&[]);
    let mut histogram = HistogramValue::default();
    histogram.set_sample_count(values.count());
    histogram.set_sample_sum(values.sum_seconds());
    histogram.set_bucket(
        values
            .cumulative()
            .map(|(bound, count)| {
                let mut bucket = Bucket::default();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(count);
                bucket
            })
            .collect(),
    );
    metric.set_histogram(histogram);
    metric
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::metrics::layout::{WorkerCell, FIRST_STATUS};
    use crate::metrics::model::Method;
    use crate::metrics::words;

    fn sample() -> Box<Counters<u64>> {
        let live = words::zeroed::<WorkerCell<AtomicU64>>();
        live.counters.requests[Method::Get as usize][usize::from(200 - FIRST_STATUS)]
            .store(7, Ordering::Relaxed);
        live.counters.requests[Method::Post as usize][usize::from(500 - FIRST_STATUS)]
            .store(1, Ordering::Relaxed);
        live.counters.request_duration.observe(Duration::from_millis(2));
        live.counters.request_duration.observe(Duration::from_secs(120));
        let mut counters = words::zeroed::<Counters<u64>>();
        words::add_into(&mut *counters, &live.counters);
        counters
    }

    fn text() -> String {
        let counters = sample();
        let sockets = [SocketQueue { name: "/run/app.sock".into(), queued: Some(3), max: Some(1024) }];
        render(&Scrape {
            counters: &counters,
            in_flight: 2,
            threads: 8,
            busy_threads: 3,
            sockets: &sockets,
            workers: [0, 2, 1],
            restarts: [1, 0, 0, 0, 0, 2],
            harakiri: 0,
            rss: &[(1, 1000), (2, 2000)],
            version: "0.1.0",
            python_version: "3.11",
        })
        .unwrap()
    }

    #[test]
    fn renders_every_metric_with_its_labels() {
        let text = text();
        for line in [
            "# TYPE oxwsgi_requests_total counter",
            r#"oxwsgi_requests_total{method="GET",status="200"} 7"#,
            r#"oxwsgi_requests_total{method="POST",status="500"} 1"#,
            "# TYPE oxwsgi_request_duration_seconds histogram",
            r#"oxwsgi_request_duration_seconds_bucket{le="0.0025"} 1"#,
            r#"oxwsgi_request_duration_seconds_bucket{le="60"} 1"#,
            r#"oxwsgi_request_duration_seconds_bucket{le="+Inf"} 2"#,
            "oxwsgi_request_duration_seconds_count 2",
            "oxwsgi_request_queue_seconds_count 0",
            "oxwsgi_requests_in_flight 2",
            r#"oxwsgi_python_threads{state="busy"} 3"#,
            r#"oxwsgi_python_threads{state="idle"} 5"#,
            r#"oxwsgi_listen_queue_length{socket="/run/app.sock"} 3"#,
            r#"oxwsgi_listen_queue_max{socket="/run/app.sock"} 1024"#,
            r#"oxwsgi_workers{state="retiring"} 1"#,
            r#"oxwsgi_worker_restarts_total{reason="crash"} 1"#,
            r#"oxwsgi_worker_restarts_total{reason="harakiri"} 0"#,
            r#"oxwsgi_worker_restarts_total{reason="reload"} 2"#,
            "oxwsgi_harakiri_total 0",
            "oxwsgi_app_exceptions_total 0",
            r#"oxwsgi_protocol_errors_total{kind="plain_http"} 0"#,
            r#"oxwsgi_worker_rss_bytes{worker="2"} 2000"#,
            r#"oxwsgi_build_info{version="0.1.0",python_version="3.11"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn the_histogram_sum_is_in_seconds() {
        let text = text();
        let sum = text.lines().find_map(|l| l.strip_prefix("oxwsgi_request_duration_seconds_sum ")).unwrap();
        assert!((sum.parse::<f64>().unwrap() - 120.002).abs() < 1e-9, "{sum}");
    }
}
