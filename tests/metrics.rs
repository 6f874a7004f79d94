//! `--metrics` and `--stats` on the real binary: what the workers count reaches the master's `/metrics`,
//! counters survive a worker's death, restarts are counted by reason, and the stats document has uWSGI's
//! shape. (Real Prometheus, promtool, the dashboard and uwsgitop are in `tests/e2e/test_prometheus.py`.)

// The samples compared are counts: whole numbers, exact in an f64.
#![allow(clippy::float_cmp)]

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;

use support::{
    app_path, free_port, run_to_exit, temp_dir, RequestBuilder, Server, POLL_INTERVAL, POLL_TRIES,
};

/// One scrape: `name{labels}` exactly as exposed → value.
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn value(&self, series: &str) -> f64 {
        *self.0.get(series).unwrap_or_else(|| panic!("no series {series} in:\n{:#?}", self.0.keys()))
    }

    /// The sum over every series of `name` (any labels).
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, value)| value)
            .sum()
    }
}

struct Metered {
    server: Server,
    metrics_port: u16,
}

impl Metered {
    fn start(args: &[&str]) -> Self {
        let metrics_port = free_port();
        let metrics = format!("127.0.0.1:{metrics_port}");
        let server = Server::builder()
            .app(app_path("workers_app.py"))
            .args(&["--metrics", &metrics])
            .args(args)
            .start();
        server.wait_log("master ready");
        Self { server, metrics_port }
    }

    fn http_get(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port)).expect("connect to --metrics");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    fn scrape(&self) -> Scrape {
        let response = self.http_get("/metrics");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}\n{}", self.server.log());
        let series = body
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("series value");
                (series.to_owned(), value.parse().expect("a number"))
            })
            .collect();
        Scrape(series)
    }

    /// Scrapes until `done` holds (workers report asynchronously: a request is counted once written).
    fn scrape_until(&self, what: &str, mut done: impl FnMut(&Scrape) -> bool) -> Scrape {
        for _ in 0..POLL_TRIES {
            let scrape = self.scrape();
            if done(&scrape) {
                return scrape;
            }
            thread::sleep(POLL_INTERVAL);
        }
        panic!("never saw {what}; last scrape:\n{:#?}\nlog:\n{}", self.scrape().0, self.server.log());
    }
}

fn ok(server: &Server, path: &str) {
    let response = server.get(path);
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
}

#[test]
fn counts_every_request_across_workers() {
    let metered = Metered::start(&["--processes", "3", "--threads", "2"]);
    for _ in 0..60 {
        ok(&metered.server, "/");
    }
    let post = RequestBuilder::post("/", b"0123456789");
    assert_eq!(metered.server.send(&post).status_line, "HTTP/1.1 200 OK");
    // A request is counted when its response is written, its app time and its thread's state just after
    // (on the Python thread, once the app's iterable is closed): wait for all of them to settle.
    let scrape = metered.scrape_until("61 requests and their app times", |s| {
        s.sum("oxwsgi_requests_total") >= 61.0
            && s.value("oxwsgi_app_duration_seconds_count") >= 61.0
            && s.value(r#"oxwsgi_python_threads{state="busy"}"#) == 0.0
            && s.value("oxwsgi_requests_in_flight") == 0.0
    });
    assert_eq!(scrape.value(r#"oxwsgi_requests_total{method="GET",status="200"}"#), 60.0);
    assert_eq!(scrape.value(r#"oxwsgi_requests_total{method="POST",status="200"}"#), 1.0);
    // Every request sent, and only those, is in each latency histogram.
    for histogram in ["request_duration_seconds", "request_queue_seconds", "app_duration_seconds"] {
        assert_eq!(scrape.value(&format!("oxwsgi_{histogram}_count")), 61.0, "{histogram}");
        assert_eq!(scrape.value(&format!(r#"oxwsgi_{histogram}_bucket{{le="+Inf"}}"#)), 61.0, "{histogram}");
    }
    assert_eq!(scrape.value("oxwsgi_request_body_bytes_total"), 10.0);
    assert!(scrape.value("oxwsgi_response_bytes_total") > 61.0 * 40.0, "head and body bytes");
    assert_eq!(scrape.value(r#"oxwsgi_workers{state="ready"}"#), 3.0);
    assert_eq!(scrape.value(r#"oxwsgi_python_threads{state="idle"}"#), 6.0);
    assert_eq!(scrape.value(r#"oxwsgi_python_threads{state="busy"}"#), 0.0);
    assert_eq!(scrape.value("oxwsgi_requests_in_flight"), 0.0);
    for worker in 1..=3 {
        assert!(scrape.value(&format!(r#"oxwsgi_worker_rss_bytes{{worker="{worker}"}}"#)) > 1e6);
    }
    for reason in ["crash", "max_requests", "rss", "lifetime", "harakiri", "reload"] {
        let series = format!(r#"oxwsgi_worker_restarts_total{{reason="{reason}"}}"#);
        assert_eq!(scrape.value(&series), 0.0, "{reason}");
    }
    assert_eq!(scrape.value("oxwsgi_harakiri_total"), 0.0);
    assert_eq!(scrape.value("oxwsgi_app_exceptions_total"), 0.0);
    let build = scrape.0.keys().find(|s| s.starts_with("oxwsgi_build_info{")).expect("build info");
    assert!(build.contains(&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))), "{build}");
}

#[test]
fn a_killed_workers_counts_are_kept_and_its_restart_counted() {
    let metered = Metered::start(&["--processes", "2"]);
    for _ in 0..40 {
        ok(&metered.server, "/");
    }
    let before = metered.scrape_until("40 requests", |s| s.sum("oxwsgi_requests_total") >= 40.0);
    let victim = served_pid(&metered.server);
    let status = std::process::Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap();
    assert!(status.success());
    // Requests keep coming while the worker dies and is replaced: the total never goes down.
    let mut last = before.sum("oxwsgi_requests_total");
    let mut sent = 41.0; // and the one that found the victim
    let after = metered.scrape_until("the crash counted and a replacement ready", |scrape| {
        let total = scrape.sum("oxwsgi_requests_total");
        assert!(total >= last, "requests_total went back from {last} to {total}");
        last = total;
        if answered(&metered.server) {
            sent += 1.0;
        }
        scrape.value(r#"oxwsgi_worker_restarts_total{reason="crash"}"#) == 1.0
            && scrape.value(r#"oxwsgi_workers{state="ready"}"#) == 2.0
    });
    let settled =
        metered.scrape_until("every answered request counted", |s| s.sum("oxwsgi_requests_total") >= sent);
    assert_eq!(settled.sum("oxwsgi_requests_total"), sent, "each answered request counted once");
    assert_eq!(settled.value("oxwsgi_request_duration_seconds_count"), sent);
    assert_eq!(after.value(r#"oxwsgi_worker_restarts_total{reason="reload"}"#), 0.0);
}

/// Sends a request, telling whether it was answered 200 — or lost, as one taken by a worker as it is killed.
fn answered(server: &Server) -> bool {
    let mut conn = server.connect();
    if conn.write_all(&RequestBuilder::get("/").encode()).is_err() {
        return false;
    }
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).is_ok() && reply.starts_with(b"HTTP/1.1 200 OK")
}

/// The pid of the worker that answers a request.
fn served_pid(server: &Server) -> u32 {
    let text = server.get("/").body_text();
    let pid = text.split_whitespace().find_map(|field| field.strip_prefix("pid=")).expect("a pid field");
    pid.parse().expect("a numeric pid")
}

#[test]
fn queue_wait_rises_when_the_threads_are_saturated() {
    let metered = Metered::start(&["--threads", "1"]);
    ok(&metered.server, "/");
    let idle =
        metered.scrape_until("the first request", |s| s.value("oxwsgi_request_queue_seconds_count") == 1.0);
    assert_eq!(
        idle.value(r#"oxwsgi_request_queue_seconds_bucket{le="0.1"}"#),
        1.0,
        "no wait with a free thread"
    );
    // Three requests at once for one thread: the second and third wait for the ones before them.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let mut conn = metered.server.connect();
            conn.write_all(&RequestBuilder::get("/sleep?ms=300").encode()).unwrap();
            conn
        })
        .collect();
    let saturated = metered
        .scrape_until("the three slow requests", |s| s.value("oxwsgi_request_queue_seconds_count") == 4.0);
    drop(slow);
    let waited = saturated.value("oxwsgi_request_queue_seconds_count")
        - saturated.value(r#"oxwsgi_request_queue_seconds_bucket{le="0.25"}"#);
    assert!(
        waited >= 1.0,
        "a request queued behind a 300 ms one must wait over 250 ms\n{}",
        metered.server.log()
    );
    assert!(saturated.value("oxwsgi_request_queue_seconds_sum") >= 0.25);
}

#[test]
fn restarts_are_counted_by_reason() {
    let metered = Metered::start(&["--max-requests", "5"]);
    for _ in 0..8 {
        ok(&metered.server, "/");
    }
    metered.scrape_until("a max_requests restart", |s| {
        s.value(r#"oxwsgi_worker_restarts_total{reason="max_requests"}"#) >= 1.0
    });
    metered.server.signal("HUP");
    metered.scrape_until("a reload restart", |s| {
        s.value(r#"oxwsgi_worker_restarts_total{reason="reload"}"#) == 1.0
    });
}

#[test]
fn harakiri_is_counted() {
    let metered = Metered::start(&["--harakiri", "1"]);
    let mut stuck = metered.server.connect();
    stuck.write_all(&RequestBuilder::get("/sleep?ms=5000").encode()).unwrap();
    let scrape = metered.scrape_until("the harakiri", |s| {
        s.value(r#"oxwsgi_worker_restarts_total{reason="harakiri"}"#) == 1.0
    });
    assert_eq!(scrape.value("oxwsgi_harakiri_total"), 1.0);
}

#[test]
fn protocol_errors_and_app_exceptions_are_counted() {
    let metered = Metered::start(&["--buffer-size", "4096"]);
    let reply = metered.server.exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(reply.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&reply));
    // A vars block over --buffer-size: the header alone says so.
    let oversize = [0u8, 0xff, 0xff, 0];
    assert!(metered.server.exchange(&oversize).is_empty(), "closed without a reply");
    let response = metered.server.get("/raise");
    assert_eq!(response.status_line, "HTTP/1.1 500 Internal Server Error");
    let scrape = metered.scrape_until("all counted", |s| {
        s.value("oxwsgi_app_exceptions_total") == 1.0
            && s.value(r#"oxwsgi_protocol_errors_total{kind="datasize_too_large"}"#) == 1.0
    });
    assert_eq!(scrape.value(r#"oxwsgi_protocol_errors_total{kind="plain_http"}"#), 1.0);
    assert_eq!(scrape.value(r#"oxwsgi_protocol_errors_total{kind="empty_key"}"#), 0.0);
    assert_eq!(scrape.value(r#"oxwsgi_requests_total{method="GET",status="500"}"#), 1.0);
}

#[test]
fn reports_the_listen_queue_from_the_kernel() {
    let metered = Metered::start(&["--listen", "77"]);
    let socket = match &metered.server.addr {
        support::Addr::Unix(path) => path.display().to_string(),
        support::Addr::Tcp(addr) => addr.to_string(),
    };
    let length = format!(r#"oxwsgi_listen_queue_length{{socket="{socket}"}}"#);
    // The start-up checks' connections may still be queued for a moment on a busy machine.
    let scrape = metered.scrape_until("an idle, empty listen queue", |s| s.value(&length) == 0.0);
    assert_eq!(scrape.value(&format!(r#"oxwsgi_listen_queue_max{{socket="{socket}"}}"#)), 77.0);
}

#[test]
fn other_paths_and_methods_are_refused() {
    let metered = Metered::start(&[]);
    assert!(metered.http_get("/").starts_with("HTTP/1.1 404 "));
    let mut stream = TcpStream::connect(("127.0.0.1", metered.metrics_port)).unwrap();
    stream.write_all(b"DELETE /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
}

/// The master's clients of one endpoint served at once (`MAX_CLIENTS` in src/metrics/endpoint.rs).
const ENDPOINT_CLIENTS: usize = 16;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the master's descriptors").count()
}

#[test]
fn a_flood_of_silent_metrics_clients_costs_a_bounded_number_of_descriptors() {
    let metered = Metered::start(&[]);
    let master = metered.server.pid();
    let before = open_fds(master);
    let silent: Vec<TcpStream> =
        (0..100).map(|_| TcpStream::connect(("127.0.0.1", metered.metrics_port)).unwrap()).collect();
    let held = || open_fds(master).saturating_sub(before);
    let mut tries = 0;
    while held() < ENDPOINT_CLIENTS {
        tries += 1;
        assert!(tries < POLL_TRIES, "the master never took {ENDPOINT_CLIENTS} clients: {} held", held());
        thread::sleep(POLL_INTERVAL);
    }
    // Uncapped, the accept loop would take all 100 within a few milliseconds.
    for _ in 0..25 {
        let held = held();
        assert!(held <= ENDPOINT_CLIENTS + 2, "{held} descriptors held for silent clients");
        thread::sleep(POLL_INTERVAL);
    }
    drop(silent);
    // The silent clients gone, their places are free again at once.
    assert!(metered.scrape().value(r#"oxwsgi_workers{state="ready"}"#) >= 1.0);
}

#[test]
fn a_live_stats_socket_is_not_stolen() {
    let dir = temp_dir();
    let stats_path = dir.join("stats.sock");
    // Another program's live socket at the path --stats names.
    let live = std::os::unix::net::UnixListener::bind(&stats_path).unwrap();
    let output = run_to_exit(&[
        "--processes",
        "1",
        "--socket",
        &dir.join("serve.sock").display().to_string(),
        "--wsgi-file",
        &app_path("hello.py").display().to_string(),
        "--stats",
        &stats_path.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|line| line.starts_with("oxwsgi: error: ")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("--stats"), "{stderr}");
    // The live socket is still there and still reaches its owner.
    let _client = std::os::unix::net::UnixStream::connect(&stats_path).expect("the live socket was kept");
    live.accept().expect("its owner still accepts on it");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stats_have_uwsgis_shape() {
    let stats_path = temp_dir().join("stats.sock");
    let stats = stats_path.display().to_string();
    let server = Server::builder()
        .app(app_path("workers_app.py"))
        .args(&["--processes", "2", "--stats", &stats])
        .start();
    server.wait_log("master ready");
    for _ in 0..10 {
        ok(&server, "/");
    }
    let mut doc = stats_document(&stats_path);
    for _ in 0..POLL_TRIES {
        if doc["workers"].as_array().map_or(0, Vec::len) >= 2 && requests_in(&doc) >= 10 {
            break;
        }
        thread::sleep(POLL_INTERVAL);
        doc = stats_document(&stats_path);
    }
    // uWSGI's shape, as uwsgitop and the exporters read it.
    assert!(doc["version"].is_string(), "{doc}");
    assert_eq!(doc["listen_queue"], 0, "{doc}");
    assert!(doc["sockets"][0]["name"].is_string(), "{doc}");
    let workers = doc["workers"].as_array().expect("workers");
    let ids: Vec<_> = workers.iter().map(|worker| worker["id"].as_u64()).collect();
    assert_eq!(ids, [Some(1), Some(2)], "{doc}");
    assert!(workers.iter().all(|worker| worker["pid"].as_u64().is_some_and(|pid| pid > 0)), "{doc}");
    assert_eq!(requests_in(&doc), 10, "{doc}");
}

/// The `--stats` document, parsed.
fn stats_document(path: &std::path::Path) -> serde_json::Value {
    let mut text = String::new();
    std::os::unix::net::UnixStream::connect(path)
        .expect("connect to --stats")
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("the stats are not JSON ({err}): {text}"))
}

/// The workers' `requests` in a stats document.
fn requests_in(doc: &serde_json::Value) -> u64 {
    doc["workers"].as_array().map_or(0, |workers| workers.iter().filter_map(|w| w["requests"].as_u64()).sum())
}

#[test]
fn a_full_listen_queue_is_logged_and_counted() {
    let stats_path = temp_dir().join("stats.sock");
    let stats = stats_path.display().to_string();
    let server = Server::builder()
        .app(app_path("workers_app.py"))
        .args(&["--listen", "2", "--threads", "1", "--stats", &stats])
        .start();
    server.wait_log("master ready");
    // One thread takes the connection it runs; three more fill a backlog of two (Linux queues one
    // connection past a Unix socket's backlog).
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let mut conn = server.connect();
            conn.write_all(&RequestBuilder::get("/sleep?ms=3000").encode()).unwrap();
            conn
        })
        .collect();
    let log = server.wait_log("listen queue of socket");
    let queued = log.split("full (").nth(1).and_then(|rest| {
        rest.strip_prefix("2/2)").map(|_| 2).or_else(|| rest.strip_prefix("3/2)").map(|_| 3))
    });
    assert!(queued.is_some(), "a full queue of the backlog's size, 2: {log}");
    let doc = stats_document(&stats_path);
    let errors = doc["listen_queue_errors"].as_u64().expect("listen_queue_errors in the stats");
    assert!(errors >= 1, "{doc}");
    drop(waiting);
}
