//! A load generator that speaks the uwsgi protocol straight to a server's socket, one request per
//! connection as nginx does: connect, send the packet and the body, read the whole response, close.
//! It replaces nginx + wrk in the "direct mode" benchmark, where nginx's own cost would hide the
//! server's. The packet is the one nginx 1.22 with Debian's `uwsgi_params` sends (the vars of
//! `proto/fixtures/get_query.bin`, in that order), encoded once per run.
//!
//! It runs on one thread (a current-thread tokio runtime): the machine has two cores and the server
//! under test needs one, so the generator must stay cheap. `--idle N` also holds N silent
//! connections open, replacing each one the server closes, to measure a server among idle clients.
//!
//! Run: `cargo build --release --example uwsgi_load`, then for example
//! `target/release/examples/uwsgi_load --target unix:/tmp/app.sock --connections 16 --duration 10 --json`.
//! With `--json`, stdout holds exactly one JSON object (see `Report::to_json`) and the human summary
//! goes to stderr. Exit status: 0 when it ran, even with errors (the caller judges them); 2 on bad
//! arguments or when not a single connection could be made.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::{NonZeroU64, NonZeroUsize};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use serde_json::{json, Value};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;
use tokio::task::LocalSet;

/// Default `--connections`: what the nginx benchmark runs with (`wrk -c16`), so the two modes compare.
const DEFAULT_CONNECTIONS: &str = "16";
/// Default `--duration`: the nginx benchmark's measured run.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// Default `--timeout` in seconds: far beyond any healthy request, short enough that a stuck server
/// shows up as errors within one run.
const DEFAULT_TIMEOUT_SECS: &str = "10";
/// Default `--warmup` in seconds: none, so that `--requests N` sends exactly N requests.
const DEFAULT_WARMUP_SECS: &str = "0";
/// One read buffer per request task, reused for every response. A response head must fit in it;
/// body bytes are counted and overwritten.
const READ_BUFFER: usize = 64 * 1024;
/// What each idle connection reads into: the server is not expected to send anything, and whatever
/// it sends before closing is discarded.
const IDLE_READ_BUFFER: usize = 256;
/// Descriptors needed beyond one per connection: stdio, the runtime's epoll and wake-up descriptors,
/// and slack for a connection closing while its replacement opens.
const SPARE_DESCRIPTORS: u64 = 32;
/// A request task waits this long after a failed connect before the next one. nginx would fail just
/// as fast, but a generator spinning on an absent or full socket would take the server's core.
const CONNECT_ERROR_PAUSE: Duration = Duration::from_millis(1);
/// The same pause for an idle connection that could not be (re)opened.
const IDLE_CONNECT_ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How often the start of the load checks whether every idle connection has been tried once.
const IDLE_OPEN_POLL: Duration = Duration::from_millis(1);
/// How often the number of open idle connections is sampled for `open_min` and `open_avg`.
const IDLE_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// The body is this pattern repeated: printable, so a server log or an echo shows it plainly.
const BODY_PATTERN: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// `REMOTE_PORT`: nginx sends the client's port; any ephemeral port looks the same to a server.
const REMOTE_PORT: &str = "54321";
/// Exit status for bad arguments (as clap uses) and for a target nobody listens on.
const EXIT_UNUSABLE: u8 = 2;

/// Sends uwsgi requests to a server, one per connection, and reports throughput and latency.
#[derive(Parser)]
#[command(name = "uwsgi_load")]
struct Cli {
    /// The server's socket: `unix:PATH`, a path containing '/', or HOST:PORT.
    #[arg(long)]
    target: String,
    /// Concurrent requests in flight; each finished request's connection is closed and a new one opened.
    #[arg(long, value_name = "N", default_value = DEFAULT_CONNECTIONS)]
    connections: NonZeroUsize,
    /// Measure for SECS seconds (default 10).
    #[arg(long, value_name = "SECS", value_parser = parse_positive_seconds, conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Stop after N finished requests instead of after a time (no time limit).
    #[arg(long, value_name = "N")]
    requests: Option<NonZeroU64>,
    /// Run the same load for SECS before measuring, not counted.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, default_value = DEFAULT_WARMUP_SECS)]
    warmup: Duration,
    /// The request's method (`REQUEST_METHOD`).
    #[arg(long, value_name = "M", default_value = "GET")]
    method: String,
    /// `REQUEST_URI`, e.g. "/args?name=bench&page=1"; `PATH_INFO` and `QUERY_STRING` are split at '?'.
    #[arg(long, value_name = "P", default_value = "/")]
    path: String,
    /// Send a request body of N bytes (`CONTENT_TYPE` application/octet-stream).
    #[arg(long, value_name = "N", default_value_t = 0)]
    body_bytes: usize,
    /// Also keep N silent connections open, replacing each one the server closes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    idle: usize,
    /// A request not complete within SECS counts as a timeout error.
    #[arg(long, value_name = "SECS", value_parser = parse_positive_seconds, default_value = DEFAULT_TIMEOUT_SECS)]
    timeout: Duration,
    /// Print exactly one JSON object on stdout at the end; human text goes to stderr.
    #[arg(long)]
    json: bool,
}

/// A duration in (possibly fractional) seconds, zero allowed.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text.parse().map_err(|_| format!("not a number of seconds: {text:?}"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("not a usable number of seconds: {text:?}"))
}

/// A duration in seconds that must be more than zero.
fn parse_positive_seconds(text: &str) -> Result<Duration, String> {
    let duration = parse_seconds(text)?;
    if duration.is_zero() {
        return Err("must be more than 0".to_owned());
    }
    Ok(duration)
}

/// Where the server listens, resolved once so that no request pays for a lookup.
enum Target {
    Unix(SockAddr),
    Tcp(SocketAddr),
}

impl Target {
    /// `unix:PATH` or anything containing '/' is a Unix socket (as oxwsgi's `--socket` reads it);
    /// the rest is HOST:PORT.
    fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:").or(text.contains('/').then_some(text)) {
            return SockAddr::unix(path)
                .map(Self::Unix)
                .map_err(|e| format!("bad socket path {path:?}: {e}"));
        }
        let mut addrs = text.to_socket_addrs().map_err(|e| format!("cannot resolve {text:?}: {e}"))?;
        addrs.next().map(Self::Tcp).ok_or_else(|| format!("{text:?} resolves to no address"))
    }

    /// Opens a connection. A Unix connect is done here without a wait: it succeeds at once, or
    /// fails at once (EAGAIN when the backlog is full: what nginx sees, and answers with a 502).
    async fn connect(&self) -> io::Result<Connected> {
        match self {
            Self::Unix(addr) => {
                let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
                socket.connect(addr)?;
                Ok(Connected::Unix(socket))
            }
            Self::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await?;
                // A body larger than one segment must not wait on Nagle for its tail.
                stream.set_nodelay(true)?;
                Ok(Connected::Tcp(stream))
            }
        }
    }
}

/// A connection just opened. The Unix one is not yet known to the runtime, so the request can be
/// written at once, as nginx writes right after its connect: the runtime would first wait for an
/// event loop turn to report a new socket writable, one more wake-up per request than nginx has.
enum Connected {
    Unix(Socket),
    Tcp(TcpStream),
}

impl Connected {
    /// Writes what the socket takes now, without waiting; returns how many bytes went out.
    fn send_now(&self, bytes: &[u8]) -> io::Result<usize> {
        let Self::Unix(socket) = self else { return Ok(0) };
        // `Write` is implemented for `&Socket`: a send needs no exclusive access.
        let mut socket: &Socket = socket;
        let mut sent = 0;
        while sent < bytes.len() {
            match socket.write(&bytes[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    /// Hands the connection to the runtime, for everything that has to wait.
    fn into_stream(self) -> io::Result<Stream> {
        match self {
            Self::Unix(socket) => UnixStream::from_std(socket.into()).map(Stream::Unix),
            Self::Tcp(stream) => Ok(Stream::Tcp(stream)),
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// What the request sends, built once per run: the packet, then the body.
struct RequestBytes {
    bytes: Vec<u8>,
    /// HEAD answers carry no body even when they declare a Content-Length.
    is_head: bool,
}

/// Builds the packet nginx 1.22 sends through Debian's `uwsgi_params` for this request, in nginx's
/// order (`proto/fixtures/get_query.bin`, `post_form.bin`), followed by the body.
fn build_request(cli: &Cli) -> Result<RequestBytes, String> {
    let (path_info, query) = cli.path.split_once('?').unwrap_or((&cli.path, ""));
    let length = cli.body_bytes.to_string();
    let (content_type, content_length) =
        if cli.body_bytes == 0 { ("", "") } else { ("application/octet-stream", length.as_str()) };
    let mut vars: Vec<(&str, &str)> = vec![
        ("QUERY_STRING", query),
        ("REQUEST_METHOD", &cli.method),
        ("CONTENT_TYPE", content_type),
        ("CONTENT_LENGTH", content_length),
        ("REQUEST_URI", &cli.path),
        ("PATH_INFO", path_info),
        ("DOCUMENT_ROOT", "/usr/share/nginx/html"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REQUEST_SCHEME", "http"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", REMOTE_PORT),
        ("SERVER_PORT", "80"),
        ("SERVER_NAME", "localhost"),
        ("HTTP_HOST", "localhost"),
        ("HTTP_USER_AGENT", "uwsgi_load"),
        ("HTTP_ACCEPT", "*/*"),
    ];
    if cli.body_bytes > 0 {
        // A client that sends a body sends these headers, and nginx passes them on as well
        // (`post_form.bin`): a server pays for dropping the duplicates.
        vars.extend([("HTTP_CONTENT_TYPE", content_type), ("HTTP_CONTENT_LENGTH", content_length)]);
    }
    let vars: Vec<(&[u8], &[u8])> = vars.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
    let mut bytes = oxwsgi_proto::encode_packet(oxwsgi_proto::MODIFIER_WSGI, 0, &vars)
        .map_err(|e| format!("the request does not fit a uwsgi packet: {e}"))?;
    bytes.extend(BODY_PATTERN.iter().cycle().take(cli.body_bytes));
    Ok(RequestBytes { bytes, is_head: cli.method.eq_ignore_ascii_case("HEAD") })
}

/// Why a request did not complete; the order is the order of `errors` in the report.
#[derive(Clone, Copy)]
enum Failure {
    Connect,
    Write,
    Read,
    Timeout,
    Malformed,
}

/// The keys of `errors` in the report, indexed by `Failure as usize`.
const FAILURE_NAMES: [&str; 5] = ["connect", "write", "read", "timeout", "malformed"];

/// A complete response: its status and how many bytes it took on the wire.
struct Response {
    status: u16,
    bytes: u64,
}

/// One request on a fresh connection: connect, send, read the response; the connection is closed
/// when the stream drops.
async fn one_request(
    shared: &Shared,
    target: &Target,
    request: &RequestBytes,
    buf: &mut [u8],
) -> Result<Response, Failure> {
    let connected = target.connect().await.map_err(|e| {
        shared.connect_failed(&e);
        Failure::Connect
    })?;
    shared.ever_connected.set(true);
    let sent = connected.send_now(&request.bytes).map_err(|_| Failure::Write)?;
    let unsent = &request.bytes[sent..];
    // Failing to register a socket with the runtime (out of memory) is not the server's doing,
    // but it leaves the connection unusable like a failed connect.
    match connected.into_stream().map_err(|_| Failure::Connect)? {
        Stream::Unix(stream) => exchange(stream, unsent, buf, request.is_head).await,
        Stream::Tcp(stream) => exchange(stream, unsent, buf, request.is_head).await,
    }
}

/// Sends what is left of the request and reads the response.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    unsent: &[u8],
    buf: &mut [u8],
    is_head: bool,
) -> Result<Response, Failure> {
    if !unsent.is_empty() {
        stream.write_all(unsent).await.map_err(|_| Failure::Write)?;
    }
    read_response(&mut stream, buf, is_head).await
}

/// A response head, once its blank line is in.
struct Head {
    status: u16,
    /// Bytes of the head, blank line included: the body starts here.
    len: usize,
    content_length: Option<u64>,
}

// response = status-line *(header CRLF) CRLF body
// status-line = "HTTP/1." DIGIT SP 3DIGIT [SP reason] CRLF
/// Parses the head at the start of `input`: `Ok(None)` until its blank line is in, `Err` if the
/// status line or a Content-Length is not what HTTP/1.1 allows.
fn parse_head(input: &[u8]) -> Result<Option<Head>, Failure> {
    let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let mut lines = input[..end].split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let status_line = lines.next().ok_or(Failure::Malformed)?;
    let status = match status_line {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', _, b' ', code @ ..] if code.len() >= 3 => {
            parse_status(&code[..3]).filter(|_| code.len() == 3 || code[3] == b' ')
        }
        _ => None,
    }
    .ok_or(Failure::Malformed)?;
    let mut content_length = None;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { return Err(Failure::Malformed) };
        if line[..colon].eq_ignore_ascii_case(b"content-length") {
            let value = std::str::from_utf8(&line[colon + 1..]).map_err(|_| Failure::Malformed)?;
            content_length = Some(value.trim().parse().map_err(|_| Failure::Malformed)?);
        }
    }
    Ok(Some(Head { status, len: end + 4, content_length }))
}

/// Three ASCII digits as a status code from 100 to 999.
fn parse_status(code: &[u8]) -> Option<u16> {
    let mut status = 0u16;
    for &digit in code {
        if !digit.is_ascii_digit() {
            return None;
        }
        status = status * 10 + u16::from(digit - b'0');
    }
    (status >= 100).then_some(status)
}

/// Reads a whole response: complete once Content-Length body bytes are in (without waiting for the
/// close), else at EOF. More bytes than declared are malformed too: the server broke its framing.
async fn read_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    is_head: bool,
) -> Result<Response, Failure> {
    let mut filled = 0;
    let head = loop {
        if filled == buf.len() {
            return Err(Failure::Malformed);
        }
        let n = stream.read(&mut buf[filled..]).await.map_err(|_| Failure::Read)?;
        if n == 0 {
            return Err(Failure::Malformed);
        }
        filled += n;
        if let Some(head) = parse_head(&buf[..filled])? {
            break head;
        }
    };
    // RFC 9112 6.3: these answers end with their head, whatever Content-Length says.
    let bodiless = is_head || head.status < 200 || head.status == 204 || head.status == 304;
    let expected = if bodiless { Some(0) } else { head.content_length };
    let mut body = (filled - head.len) as u64;
    loop {
        if let Some(expected) = expected {
            if body > expected {
                return Err(Failure::Malformed);
            }
            if body == expected {
                break;
            }
        }
        let n = stream.read(buf).await.map_err(|_| Failure::Read)?;
        if n == 0 {
            if expected.is_some() {
                return Err(Failure::Malformed);
            }
            break;
        }
        body += n as u64;
    }
    Ok(Response { status: head.status, bytes: head.len as u64 + body })
}

/// Warmup, then the measured window, then stop: a request is counted if it finishes in the window.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measure,
    Stop,
}

/// What the measured window saw.
#[derive(Default)]
struct Counts {
    requests: u64,
    status: BTreeMap<u16, u64>,
    errors: [u64; FAILURE_NAMES.len()],
    latencies_us: Vec<u32>,
    bytes_received: u64,
    /// Requests finished in the window, complete or not; `--requests` stops at this many.
    finished: u64,
    idle_replaced: u64,
    idle_samples: Vec<usize>,
}

/// Everything the tasks share; one thread, so plain cells.
struct Shared {
    phase: Cell<Phase>,
    started: Cell<Instant>,
    ended: Cell<Instant>,
    /// `--requests`: how many requests may finish in the window.
    limit: Option<u64>,
    in_flight: Cell<u64>,
    counts: RefCell<Counts>,
    /// Set by the first successful connect; a failed connect before it means nobody listens.
    ever_connected: Cell<bool>,
    /// Why the target is unreachable: the connect error that came before any success.
    unreachable: RefCell<Option<io::Error>>,
    /// Wakes `main` when `--requests` is reached or the target is unreachable.
    done: Notify,
    idle_open: Cell<usize>,
    /// Idle connects that failed, over the whole run (not request errors: they show in `open_min`,
    /// and in the text summary).
    idle_connect_errors: Cell<u64>,
}

impl Shared {
    fn stop(&self) {
        self.ended.set(Instant::now());
        self.phase.set(Phase::Stop);
        self.done.notify_one();
    }

    fn connect_failed(&self, error: &io::Error) {
        if !self.ever_connected.get() && self.unreachable.borrow().is_none() {
            *self.unreachable.borrow_mut() = Some(io::Error::new(error.kind(), error.to_string()));
            self.stop();
        }
    }

    /// With `--requests`, no more start than can still finish inside the limit.
    fn may_start(&self) -> bool {
        match (self.phase.get(), self.limit) {
            (Phase::Stop, _) => false,
            (Phase::Warmup, _) | (Phase::Measure, None) => true,
            (Phase::Measure, Some(limit)) => self.counts.borrow().finished + self.in_flight.get() < limit,
        }
    }

    fn record(&self, outcome: Result<Response, Failure>, latency: Duration) {
        if self.phase.get() != Phase::Measure {
            return;
        }
        let mut counts = self.counts.borrow_mut();
        match outcome {
            Ok(response) => {
                counts.requests += 1;
                *counts.status.entry(response.status).or_default() += 1;
                counts.bytes_received += response.bytes;
                counts.latencies_us.push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
            }
            Err(failure) => counts.errors[failure as usize] += 1,
        }
        counts.finished += 1;
        if self.limit.is_some_and(|limit| counts.finished >= limit) {
            drop(counts);
            self.stop();
        }
    }
}

/// One of the `--connections` request loops: a new connection per request, one buffer for all.
async fn request_loop(shared: Rc<Shared>, target: Rc<Target>, request: Rc<RequestBytes>, timeout: Duration) {
    let mut buf = vec![0; READ_BUFFER];
    while shared.may_start() {
        shared.in_flight.set(shared.in_flight.get() + 1);
        let start = Instant::now();
        let outcome = tokio::time::timeout(timeout, one_request(&shared, &target, &request, &mut buf))
            .await
            .unwrap_or(Err(Failure::Timeout));
        let latency = start.elapsed();
        shared.in_flight.set(shared.in_flight.get() - 1);
        let refused = matches!(outcome, Err(Failure::Connect));
        shared.record(outcome, latency);
        if refused {
            tokio::time::sleep(CONNECT_ERROR_PAUSE).await;
        }
    }
}

/// One `--idle` connection: open it, send nothing, and when the server closes it, open another.
/// `opened_once` counts the first attempt, so the load starts only once every idle slot tried.
async fn idle_loop(shared: Rc<Shared>, target: Rc<Target>, opened_once: Rc<Cell<usize>>, timeout: Duration) {
    let mut buf = [0; IDLE_READ_BUFFER];
    let mut first = true;
    loop {
        let stream = tokio::time::timeout(timeout, target.connect())
            .await
            .unwrap_or_else(|elapsed| Err(elapsed.into()));
        if first {
            opened_once.set(opened_once.get() + 1);
            first = false;
        }
        let mut stream = match stream.and_then(Connected::into_stream) {
            Ok(stream) => stream,
            Err(e) => {
                shared.idle_connect_errors.set(shared.idle_connect_errors.get() + 1);
                shared.connect_failed(&e);
                tokio::time::sleep(IDLE_CONNECT_ERROR_PAUSE).await;
                continue;
            }
        };
        shared.ever_connected.set(true);
        shared.idle_open.set(shared.idle_open.get() + 1);
        // Whatever the server says before closing (a 408, say) is read and dropped.
        loop {
            let read = match &mut stream {
                Stream::Unix(s) => s.read(&mut buf).await,
                Stream::Tcp(s) => s.read(&mut buf).await,
            };
            if !matches!(read, Ok(n) if n > 0) {
                break;
            }
        }
        shared.idle_open.set(shared.idle_open.get() - 1);
        if shared.phase.get() == Phase::Measure {
            shared.counts.borrow_mut().idle_replaced += 1;
        }
    }
}

async fn idle_sampler(shared: Rc<Shared>) {
    let mut tick = tokio::time::interval(IDLE_SAMPLE_INTERVAL);
    loop {
        tick.tick().await;
        if shared.phase.get() == Phase::Measure {
            shared.counts.borrow_mut().idle_samples.push(shared.idle_open.get());
        }
    }
}

/// Raises the soft descriptor limit to the hard one and checks that the run fits under it.
fn raise_fd_limit(needed: u64) -> Result<(), String> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(format!("cannot read the descriptor limit: {}", io::Error::last_os_error()));
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            limit = raised;
        }
    }
    if limit.rlim_cur < needed {
        return Err(format!(
            "this run needs about {needed} file descriptors but the limit is {} (raise it with `ulimit -n`)",
            limit.rlim_cur
        ));
    }
    Ok(())
}

/// The result of a run, as printed.
struct Report {
    seconds: f64,
    counts: Counts,
    idle_target: usize,
    idle_connect_errors: u64,
}

impl Report {
    /// `percent` of the latencies are at most this, in milliseconds (nearest rank); 0 with none.
    fn percentile_ms(sorted_us: &[u32], percent: usize) -> f64 {
        let rank = (sorted_us.len() * percent).div_ceil(100).max(1);
        sorted_us.get(rank - 1).map_or(0.0, |&us| f64::from(us) / 1000.0)
    }

    #[allow(clippy::cast_precision_loss)] // exact below 2^52 requests: no run comes near
    fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.counts.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn non_2xx(&self) -> u64 {
        self.counts.status.iter().filter(|(status, _)| !(200..300).contains(*status)).map(|(_, n)| n).sum()
    }

    fn latencies(&self) -> [(&'static str, f64); 4] {
        let sorted = &self.counts.latencies_us;
        [
            ("p50", Self::percentile_ms(sorted, 50)),
            ("p90", Self::percentile_ms(sorted, 90)),
            ("p99", Self::percentile_ms(sorted, 99)),
            ("max", Self::percentile_ms(sorted, 100)),
        ]
    }

    #[allow(clippy::cast_precision_loss)] // exact below 2^52: a few thousand samples of a few thousand
    fn idle(&self) -> Option<(usize, f64, u64)> {
        if self.idle_target == 0 {
            return None;
        }
        let samples = &self.counts.idle_samples;
        let min = samples.iter().copied().min().unwrap_or(0);
        let avg = if samples.is_empty() {
            0.0
        } else {
            samples.iter().sum::<usize>() as f64 / samples.len() as f64
        };
        Some((min, avg, self.counts.idle_replaced))
    }

    fn to_json(&self) -> Value {
        let status: serde_json::Map<String, Value> =
            self.counts.status.iter().map(|(code, n)| (code.to_string(), json!(n))).collect();
        let errors: serde_json::Map<String, Value> = FAILURE_NAMES
            .iter()
            .zip(self.counts.errors)
            .map(|(name, n)| ((*name).to_owned(), json!(n)))
            .collect();
        let latency: serde_json::Map<String, Value> =
            self.latencies().iter().map(|(name, ms)| ((*name).to_owned(), json!(round3(*ms)))).collect();
        let mut report = json!({
            "requests": self.counts.requests,
            "seconds": round6(self.seconds),
            "rps": round3(self.rps()),
            "status": status,
            "non_2xx": self.non_2xx(),
            "errors": errors,
            "latency_ms": latency,
            "bytes_received": self.counts.bytes_received,
        });
        if let Some((min, avg, replaced)) = self.idle() {
            report["idle"] = json!({"target": self.idle_target, "open_min": min, "open_avg": round3(avg), "replaced": replaced});
        }
        report
    }

    fn to_text(&self) -> String {
        let status: Vec<String> = self.counts.status.iter().map(|(code, n)| format!("{code}: {n}")).collect();
        let errors: Vec<String> = FAILURE_NAMES
            .iter()
            .zip(self.counts.errors)
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let latency: Vec<String> =
            self.latencies().iter().map(|(name, ms)| format!("{name} {ms:.3}")).collect();
        let idle = self.idle().map_or(String::new(), |(min, avg, replaced)| {
            format!(
                "idle: {} wanted, open min {min} avg {avg:.1}, {replaced} closed by the server and replaced, \
                 {} failed connects over the whole run\n",
                self.idle_target, self.idle_connect_errors
            )
        });
        format!(
            "{} requests in {:.2} s = {:.1} req/s\nstatus {}; errors: {}\nlatency ms: {}; {} bytes received\n{idle}",
            self.counts.requests,
            self.seconds,
            self.rps(),
            if status.is_empty() { "none".to_owned() } else { status.join(", ") },
            if errors.is_empty() { "none".to_owned() } else { errors.join(", ") },
            latency.join(", "),
            self.counts.bytes_received,
        )
    }
}

/// Milliseconds and rates to the microsecond or the thousandth: finer is noise.
fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Seconds to the microsecond, so a short `--requests` run still has a usable `seconds`.
fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Runs the warmup and the measured window; `Err` when the target cannot be reached at all.
async fn run(cli: &Cli, target: Target, request: RequestBytes) -> Result<Report, String> {
    let now = Instant::now();
    let shared = Rc::new(Shared {
        phase: Cell::new(Phase::Warmup),
        started: Cell::new(now),
        ended: Cell::new(now),
        limit: cli.requests.map(NonZeroU64::get),
        in_flight: Cell::new(0),
        counts: RefCell::default(),
        ever_connected: Cell::new(false),
        unreachable: RefCell::new(None),
        done: Notify::new(),
        idle_open: Cell::new(0),
        idle_connect_errors: Cell::new(0),
    });
    let target = Rc::new(target);
    let request = Rc::new(request);

    if cli.idle > 0 {
        let opened_once = Rc::new(Cell::new(0));
        for _ in 0..cli.idle {
            tokio::task::spawn_local(idle_loop(
                shared.clone(),
                target.clone(),
                opened_once.clone(),
                cli.timeout,
            ));
        }
        tokio::task::spawn_local(idle_sampler(shared.clone()));
        // The load starts among the idle connections, not while they are still being opened.
        while opened_once.get() < cli.idle && shared.unreachable.borrow().is_none() {
            tokio::time::sleep(IDLE_OPEN_POLL).await;
        }
    }
    for _ in 0..cli.connections.get() {
        tokio::task::spawn_local(request_loop(shared.clone(), target.clone(), request.clone(), cli.timeout));
    }

    if !cli.warmup.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(cli.warmup) => {}
            () = shared.done.notified() => {}
        }
    }
    if shared.unreachable.borrow().is_none() {
        shared.started.set(Instant::now());
        shared.phase.set(Phase::Measure);
        if cli.requests.is_some() {
            shared.done.notified().await;
        } else {
            let duration = cli.duration.unwrap_or(DEFAULT_DURATION);
            tokio::select! {
                () = tokio::time::sleep(duration) => shared.stop(),
                () = shared.done.notified() => {}
            }
        }
    }
    if let Some(error) = shared.unreachable.take() {
        return Err(format!("no connection could be made to {}: {error}", cli.target));
    }
    if !shared.ever_connected.get() {
        return Err(format!("no connection could be made to {}", cli.target));
    }
    let mut counts = shared.counts.take();
    if cli.idle > 0 {
        // A window shorter than one sample interval still gets a sample.
        counts.idle_samples.push(shared.idle_open.get());
    }
    counts.latencies_us.sort_unstable();
    Ok(Report {
        seconds: shared.ended.get().duration_since(shared.started.get()).as_secs_f64(),
        counts,
        idle_target: cli.idle,
        idle_connect_errors: shared.idle_connect_errors.get(),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let unusable = |message: String| {
        eprintln!("uwsgi_load: error: {message}");
        ExitCode::from(EXIT_UNUSABLE)
    };
    let (target, request) = match (Target::parse(&cli.target), build_request(&cli)) {
        (Ok(target), Ok(request)) => (target, request),
        (Err(message), _) | (_, Err(message)) => {
            Cli::command().error(clap::error::ErrorKind::ValueValidation, message).exit()
        }
    };
    let needed = (cli.connections.get() + cli.idle) as u64 + SPARE_DESCRIPTORS;
    if let Err(message) = raise_fd_limit(needed) {
        return unusable(message);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return unusable(format!("cannot start the runtime: {e}")),
    };
    // Dropping the LocalSet after the run cancels what is still in flight and closes its sockets.
    let report = match LocalSet::new().block_on(&runtime, run(&cli, target, request)) {
        Ok(report) => report,
        Err(message) => return unusable(message),
    };
    if cli.json {
        eprint!("{}", report.to_text());
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    ExitCode::SUCCESS
}
