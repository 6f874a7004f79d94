//! Helpers for the integration tests: run the real `oxwsgi` binary on a Unix socket (or a TCP port) with a
//! test app, speak raw uwsgi to it, and read its log.
//!
//! Each [`Server`] lives in its own temporary directory (socket file and captured stderr), and is stopped
//! with SIGTERM when dropped. Nothing here asserts wall-clock durations: every wait is a bounded retry.

#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

/// Tries, 20 ms apart, before a server that does not accept connections counts as failed to start.
const READY_TRIES: usize = 500;
/// Each client read or write gives up after this long, so a hanging server fails a test instead of
/// blocking it forever.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between polls of an eventual condition (a log line, a recorded result).
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Polls before an eventual condition counts as never happening.
pub const POLL_TRIES: usize = 250;

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// The test app most tests run.
pub fn pep3333_app() -> PathBuf {
    app_path("pep3333_app.py")
}

pub fn app_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps").join(name)
}

/// A fresh, empty directory under the system temp dir, unique to this process and call.
pub fn temp_dir() -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("oxwsgi-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// A port that was free a moment ago (bind port 0, read it, close).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// The oxwsgi command, with the environment every test wants: no `__pycache__` written into tests/apps.
pub fn oxwsgi_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_oxwsgi"));
    command.env("PYTHONDONTWRITEBYTECODE", "1").env_remove("OXWSGI_LOG").stdin(Stdio::null());
    command
}

/// Runs oxwsgi to completion (for startup failures); gives up and kills it if it is still running after
/// the bounded wait.
pub fn run_to_exit(args: &[&str]) -> Output {
    let mut child = oxwsgi_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn oxwsgi");
    for _ in 0..POLL_TRIES {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("collect output");
        }
        thread::sleep(POLL_INTERVAL);
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("collect output");
    panic!(
        "oxwsgi {args:?} was expected to exit but kept running; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[derive(Debug, Clone)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// How to start a server.
pub struct Builder {
    app: PathBuf,
    /// Load the app with `--module NAME` instead of `--wsgi-file app`.
    module: Option<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    tcp: bool,
}

impl Builder {
    pub fn app(mut self, app: PathBuf) -> Self {
        self.app = app;
        self
    }

    pub fn module(mut self, module: &str) -> Self {
        self.module = Some(module.to_owned());
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|&a| a.to_owned()));
        self
    }

    /// An environment variable for the server process (and so for the app).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Listen on 127.0.0.1 (a port found free just before) instead of a Unix socket.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    pub fn start(self) -> Server {
        let dir = temp_dir();
        let log_path = dir.join("stderr.log");
        let addr = if self.tcp {
            Addr::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port())))
        } else {
            Addr::Unix(dir.join("s.sock"))
        };
        let socket_arg = match &addr {
            Addr::Unix(path) => path.display().to_string(),
            Addr::Tcp(addr) => addr.to_string(),
        };
        let log = File::create(&log_path).expect("create the log file");
        let app_args: [&std::ffi::OsStr; 2] = match &self.module {
            Some(module) => ["--module".as_ref(), module.as_ref()],
            None => ["--wsgi-file".as_ref(), self.app.as_os_str()],
        };
        let child = oxwsgi_command()
            .arg("--socket")
            .arg(&socket_arg)
            .args(app_args)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn oxwsgi");
        let mut server = Server { child: Some(child), addr, dir, log_path };
        server.wait_ready();
        server
    }
}

/// A running oxwsgi process; SIGTERM (then SIGKILL) on drop.
pub struct Server {
    child: Option<Child>,
    pub addr: Addr,
    pub dir: PathBuf,
    log_path: PathBuf,
}

impl Server {
    pub fn builder() -> Builder {
        Builder { app: pep3333_app(), module: None, args: Vec::new(), envs: Vec::new(), tcp: false }
    }

    /// The test app on a Unix socket, with extra options.
    pub fn start(args: &[&str]) -> Server {
        Self::builder().args(args).start()
    }

    fn wait_ready(&mut self) {
        for _ in 0..READY_TRIES {
            let connected = match &self.addr {
                Addr::Unix(path) => UnixStream::connect(path).is_ok(),
                Addr::Tcp(addr) => TcpStream::connect(addr).is_ok(),
            };
            if connected {
                return;
            }
            let child = self.child.as_mut().expect("child present until drop");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("oxwsgi exited during startup ({status}); log:\n{}", self.log());
            }
            thread::sleep(POLL_INTERVAL);
        }
        panic!("oxwsgi did not accept connections on {:?}; log:\n{}", self.addr, self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child present until drop").id()
    }

    pub fn connect(&self) -> Conn {
        let conn = match &self.addr {
            Addr::Unix(path) => Conn::Unix(UnixStream::connect(path).expect("connect to the Unix socket")),
            Addr::Tcp(addr) => Conn::Tcp(TcpStream::connect(addr).expect("connect to the TCP socket")),
        };
        conn.set_timeouts(IO_TIMEOUT);
        conn
    }

    /// A TCP connection whose receive buffer is set to `rcvbuf` bytes before connecting (so the window the
    /// server sees is small from the start), for a client that reads slowly.
    pub fn connect_tcp_small_rcvbuf(&self, rcvbuf: usize) -> Conn {
        let Addr::Tcp(addr) = &self.addr else { panic!("connect_tcp_small_rcvbuf needs a TCP server") };
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        socket.connect(&(*addr).into()).expect("connect to the TCP socket");
        let conn = Conn::Tcp(socket.into());
        conn.set_timeouts(IO_TIMEOUT);
        conn
    }

    /// Sends `bytes`, then reads until the server closes. Panics on an I/O error (use [`Conn`] directly
    /// to see one).
    pub fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let mut conn = self.connect();
        conn.write_all(bytes).expect("send the request");
        conn.read_to_end_result().unwrap_or_else(|(err, got)| {
            panic!("reading the response failed after {} bytes: {err}; log:\n{}", got.len(), self.log())
        })
    }

    /// Sends the request and parses the response.
    pub fn send(&self, request: &RequestBuilder) -> Response {
        let raw = self.exchange(&request.encode());
        Response::parse(raw).unwrap_or_else(|raw| {
            panic!("not an HTTP response: {:?}; log:\n{}", String::from_utf8_lossy(&raw), self.log())
        })
    }

    /// `GET path?query`, parsed.
    pub fn get(&self, path_and_query: &str) -> Response {
        self.send(&RequestBuilder::get(path_and_query))
    }

    /// The app's report for `GET path?query`, which must answer 200.
    pub fn report(&self, path_and_query: &str) -> Report {
        let response = self.get(path_and_query);
        assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{path_and_query}: {response:?}");
        Report::parse(&response.body)
    }

    /// Polls /last-result?key=KEY until `done` holds for the report, or panics with the last one.
    pub fn wait_result(&self, key: &str, done: impl Fn(&Report) -> bool) -> Report {
        let mut last = None;
        for _ in 0..POLL_TRIES {
            let report = self.report(&format!("/last-result?key={key}"));
            if done(&report) {
                return report;
            }
            last = Some(report);
            thread::sleep(POLL_INTERVAL);
        }
        panic!("/last-result?key={key} never got there; last: {last:?}; log:\n{}", self.log());
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls the log until it contains `needle`; returns the whole log.
    pub fn wait_log(&self, needle: &str) -> String {
        for _ in 0..POLL_TRIES {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            thread::sleep(POLL_INTERVAL);
        }
        panic!("the log never contained {needle:?}; log:\n{}", self.log());
    }

    /// Sends `signal` (a `kill` name: "TERM", "INT", ...) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {} failed", self.pid());
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().expect("child present until drop").try_wait().expect("try_wait")
    }

    /// Waits (bounded, `tries` polls) for the process to exit on its own; SIGKILL and panic if it does not.
    pub fn wait_exit(&mut self, tries: usize) -> ExitStatus {
        for _ in 0..tries {
            if let Some(status) = self.try_exit() {
                self.child = None;
                return status;
            }
            thread::sleep(POLL_INTERVAL);
        }
        let mut child = self.child.take().expect("child present until drop");
        let _ = child.kill();
        let _ = child.wait();
        panic!("oxwsgi was expected to exit but kept running; log:\n{}", self.log());
    }

    /// Sends SIGTERM and waits (bounded) for the exit; SIGKILL if it does not come.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("terminate once");
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        for _ in 0..POLL_TRIES {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            thread::sleep(POLL_INTERVAL);
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("oxwsgi did not exit after SIGTERM; log:\n{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let mut exited = false;
            for _ in 0..100 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    exited = true;
                    break;
                }
                thread::sleep(POLL_INTERVAL);
            }
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client connection, Unix or TCP.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_timeouts(&self, timeout: Duration) {
        let _ = match self {
            Conn::Unix(s) => s.set_read_timeout(Some(timeout)).and(s.set_write_timeout(Some(timeout))),
            Conn::Tcp(s) => s.set_read_timeout(Some(timeout)).and(s.set_write_timeout(Some(timeout))),
        };
    }

    /// Reads until EOF. On an error, returns it with the bytes read before it.
    pub fn read_to_end_result(&mut self) -> Result<Vec<u8>, (io::Error, Vec<u8>)> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err((err, got)),
            }
        }
    }

    /// Reads until the response head (`\r\n\r\n`) is in; returns everything read.
    pub fn read_head(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while find(&got, b"\r\n\r\n").is_none() {
            let n = self.read(&mut buf).expect("read the response head");
            assert!(n > 0, "EOF before the end of the head: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Half-closes the write side (the server sees EOF).
    pub fn shutdown_write(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A uwsgi request as nginx's stock `uwsgi_params` builds it (same vars, same order), with overrides.
#[derive(Debug, Clone)]
pub struct RequestBuilder {
    vars: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    content_length_set: bool,
}

impl RequestBuilder {
    /// `path_and_query` is split at the first `?` into `PATH_INFO` and `QUERY_STRING`.
    pub fn new(method: &str, path_and_query: &str) -> Self {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let defaults: [(&str, &str); 14] = [
            ("QUERY_STRING", query),
            ("REQUEST_METHOD", method),
            ("CONTENT_TYPE", ""),
            ("CONTENT_LENGTH", ""),
            ("REQUEST_URI", path_and_query),
            ("PATH_INFO", path),
            ("DOCUMENT_ROOT", "/usr/share/nginx/html"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_SCHEME", "http"),
            ("REMOTE_ADDR", "127.0.0.1"),
            ("REMOTE_PORT", "54321"),
            ("SERVER_PORT", "80"),
            ("SERVER_NAME", "test.example"),
            ("HTTP_HOST", "test.example"),
        ];
        let vars = defaults.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
        Self { vars, body: Vec::new(), content_length_set: false }
    }

    pub fn get(path_and_query: &str) -> Self {
        Self::new("GET", path_and_query)
    }

    pub fn post(path_and_query: &str, body: &[u8]) -> Self {
        Self::new("POST", path_and_query).body(body)
    }

    /// The body; `CONTENT_LENGTH` follows it unless set explicitly.
    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// Replaces the first var named `key` (raw bytes), or appends it.
    pub fn set(mut self, key: &str, value: &[u8]) -> Self {
        if key == "CONTENT_LENGTH" {
            self.content_length_set = true;
        }
        match self.vars.iter_mut().find(|(k, _)| k == key.as_bytes()) {
            Some(slot) => slot.1 = value.to_vec(),
            None => self.vars.push((key.as_bytes().to_vec(), value.to_vec())),
        }
        self
    }

    /// Appends a var, even if one with the same name is already there (a repeated header).
    pub fn add(mut self, key: &str, value: &[u8]) -> Self {
        self.vars.push((key.as_bytes().to_vec(), value.to_vec()));
        self
    }

    pub fn remove(mut self, key: &str) -> Self {
        self.vars.retain(|(k, _)| k != key.as_bytes());
        self
    }

    pub fn vars(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut vars = self.vars.clone();
        if !self.content_length_set && !self.body.is_empty() {
            if let Some(slot) = vars.iter_mut().find(|(k, _)| k == b"CONTENT_LENGTH") {
                slot.1 = self.body.len().to_string().into_bytes();
            }
        }
        vars
    }

    /// The packet (header + vars) without the body.
    pub fn packet(&self) -> Vec<u8> {
        let vars = self.vars();
        let refs: Vec<(&[u8], &[u8])> = vars.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        oxwsgi_proto::encode_packet(0, 0, &refs).expect("the test request encodes")
    }

    /// Packet and body, as nginx writes them.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.packet();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// A parsed HTTP response as oxwsgi writes it.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    pub raw: Vec<u8>,
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// Splits `raw` at the blank line; `Err(raw)` if there is none or the head is not latin-1 text.
    pub fn parse(raw: Vec<u8>) -> Result<Self, Vec<u8>> {
        let Some(end) = find(&raw, b"\r\n\r\n") else { return Err(raw) };
        let head: String = raw[..end].iter().map(|&b| char::from(b)).collect();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        for line in lines {
            let Some((name, value)) = line.split_once(": ") else { return Err(raw) };
            headers.push((name.to_owned(), value.to_owned()));
        }
        let body = raw[end + 4..].to_vec();
        Ok(Self { raw, status_line, headers, body })
    }

    /// The value of the only header named `name` (case-insensitive); panics if it is repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut found = self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "header {name} repeated in {self:?}");
        first
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.raw[..self.raw.len().min(2048)];
        write!(
            f,
            "Response({:?}{})",
            String::from_utf8_lossy(shown),
            if shown.len() < self.raw.len() { "..." } else { "" }
        )
    }
}

/// The test app's `key: ascii(value)` lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report(pub std::collections::BTreeMap<String, String>);

impl Report {
    pub fn parse(body: &[u8]) -> Self {
        let text = std::str::from_utf8(body).expect("reports are ASCII");
        let entries = text
            .lines()
            .map(|line| {
                let (key, value) =
                    line.split_once(": ").unwrap_or_else(|| panic!("not a report line: {line:?}"));
                (key.to_owned(), value.to_owned())
            })
            .collect();
        Self(entries)
    }

    /// The entry for `key`, which must exist.
    pub fn get(&self, key: &str) -> &str {
        self.0.get(key).unwrap_or_else(|| panic!("no {key:?} in {self:#?}"))
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}
