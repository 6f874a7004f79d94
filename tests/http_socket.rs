//! `--http-socket`: plain HTTP/1.1 from a client straight to oxwsgi, spoken byte by byte here so every
//! framing rule is checked as the client sees it — keep-alive and pipelining, `Content-Length`, chunked and
//! `100-continue` request bodies, chunked and close-delimited responses, `HEAD`, what is refused and with
//! which status, an aborted response, workers under a master, the graceful stop. (A real client library
//! and curl drive it through a Flask app in `tests/e2e/test_http_socket.py`.)

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use support::{free_port, pep3333_app, Report, Server, POLL_INTERVAL, POLL_TRIES};

/// Each read gives up after this long, so a hanging server fails the test instead of blocking it.
const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// A server with a uwsgi Unix socket (which the harness waits on) and an HTTP TCP socket.
fn start(extra: &[&str]) -> (Server, String) {
    let http = format!("127.0.0.1:{}", free_port());
    let server = Server::builder().args(&["--http-socket", &http]).args(extra).start();
    wait_accepting(&http);
    (server, http)
}

fn wait_accepting(addr: &str) {
    for _ in 0..POLL_TRIES {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    panic!("nothing accepts on {addr}");
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// One client connection, reading responses off it one at a time.
struct Client {
    stream: Stream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body came chunked, and the last chunk arrived.
    chunked: bool,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn report(&self) -> Report {
        Report::parse(&self.body)
    }
}

impl Client {
    fn tcp(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Self { stream: Stream::Tcp(stream), buf: Vec::new() }
    }

    fn unix(path: &PathBuf) -> Self {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Self { stream: Stream::Unix(stream), buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        match &mut self.stream {
            Stream::Tcp(s) => s.write_all(bytes),
            Stream::Unix(s) => s.write_all(bytes),
        }
        .expect("send");
    }

    /// Reads more; 0 at the end of the stream (or a reset).
    fn fill(&mut self) -> usize {
        let mut chunk = vec![0u8; 65536];
        let read = match &mut self.stream {
            Stream::Tcp(s) => s.read(&mut chunk),
            Stream::Unix(s) => s.read(&mut chunk),
        };
        let read = match read {
            Ok(read) => read,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(err) => panic!("read: {err}"),
        };
        self.buf.extend_from_slice(&chunk[..read]);
        read
    }

    /// Takes `n` bytes off the buffer, reading as needed; `None` if the connection ends first.
    fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill() == 0 {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    fn line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.drain(..at + 2).collect::<Vec<_>>();
                return Some(String::from_utf8(line[..at].to_vec()).unwrap());
            }
            if self.fill() == 0 {
                return None;
            }
        }
    }

    /// The next response, framed as HTTP/1.1 says (`head_only` for the answer to a HEAD); `None` if the
    /// connection closed before its head.
    fn response(&mut self, head_only: bool) -> Option<Response> {
        let status_line = self.line()?;
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
        let mut headers = Vec::new();
        loop {
            let line = self.line().expect("a complete head");
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(": ").expect("a header line");
            headers.push((name.to_owned(), value.to_owned()));
        }
        let mut response = Response { status, headers, body: Vec::new(), chunked: false };
        if head_only || matches!(status, 100..=199 | 204 | 304) {
            return Some(response);
        }
        if let Some(length) = response.header("content-length") {
            response.body = self.take(length.parse().unwrap()).expect("the declared body");
        } else if response.header("transfer-encoding") == Some("chunked") {
            loop {
                let Some(size) = self.line() else { return Some(response) };
                let size = usize::from_str_radix(&size, 16).expect("a chunk size");
                if size == 0 {
                    assert_eq!(self.line().as_deref(), Some(""), "no trailers, then the end");
                    response.chunked = true;
                    break;
                }
                let Some(data) = self.take(size + 2) else { return Some(response) };
                assert!(data.ends_with(b"\r\n"));
                response.body.extend_from_slice(&data[..size]);
            }
        } else {
            while self.fill() > 0 {}
            response.body = std::mem::take(&mut self.buf);
        }
        Some(response)
    }

    /// Whether the server closed the connection (nothing more arrives).
    fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill() == 0
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: example.test\r\n\r\n").into_bytes()
}

#[test]
fn an_http_request_sees_the_environ_nginx_would_send() {
    let (server, http) = start(&[]);
    let mut client = Client::tcp(&http);
    client.send(b"GET /environ/./a%20b//c?x=1&y=%20 HTTP/1.1\r\nHost: example.test:8080\r\nX-Request-Id: r1\r\nX_Sneaky: 1\r\n\r\n");
    let response = client.response(false).unwrap();
    assert_eq!(response.status, 200);
    let environ = response.report();
    let expect = [
        ("REQUEST_METHOD", "'GET'"),
        ("REQUEST_URI", "'/environ/./a%20b//c?x=1&y=%20'"),
        ("PATH_INFO", "'/environ/a b/c'"),
        ("QUERY_STRING", "'x=1&y=%20'"),
        ("SERVER_PROTOCOL", "'HTTP/1.1'"),
        ("SERVER_NAME", "'example.test'"),
        ("REMOTE_ADDR", "'127.0.0.1'"),
        ("HTTP_HOST", "'example.test:8080'"),
        ("HTTP_X_REQUEST_ID", "'r1'"),
        ("CONTENT_LENGTH", "''"),
        ("wsgi.url_scheme", "'http'"),
    ];
    for (key, value) in expect {
        assert_eq!(environ.0.get(key).map(String::as_str), Some(value), "{key} in {environ:?}");
    }
    assert_eq!(environ.0.get("SERVER_PORT"), Some(&format!("'{}'", http.rsplit(':').next().unwrap())));
    assert!(!environ.0.contains_key("HTTP_X_SNEAKY"), "underscored headers are dropped, as nginx does");
    // The same request through the uwsgi socket is served as ever.
    assert_eq!(server.get("/environ").status_line, "HTTP/1.1 200 OK");
    server.wait_log("GET /environ/./a%20b//c?x=1&y=%20 => 200");
}

#[test]
fn one_connection_carries_many_requests_pipelined_or_not() {
    let (_server, http) = start(&[]);
    let mut client = Client::tcp(&http);
    for _ in 0..3 {
        client.send(&get("/environ"));
        let response = client.response(false).unwrap();
        assert_eq!((response.status, response.header("connection")), (200, None));
    }
    // Three requests in one write, a body in the middle one: answered in order.
    client.send(
        b"GET /environ?n=1 HTTP/1.1\r\nHost: h\r\n\r\nPOST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n\
          helloGET /environ?n=3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(client.response(false).unwrap().report().0["QUERY_STRING"], "'n=1'");
    assert_eq!(client.response(false).unwrap().body, b"hello");
    let last = client.response(false).unwrap();
    assert_eq!(
        (last.report().0["QUERY_STRING"].as_str(), last.header("connection")),
        ("'n=3'", Some("close"))
    );
    assert!(client.closed(), "the server closes after `Connection: close`");

    // HTTP/1.0 closes unless asked to keep the connection.
    let mut old = Client::tcp(&http);
    old.send(b"GET /environ HTTP/1.0\r\n\r\n");
    assert_eq!(old.response(false).unwrap().header("connection"), Some("close"));
    assert!(old.closed());
    let mut kept = Client::tcp(&http);
    kept.send(b"GET /environ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(kept.response(false).unwrap().header("connection"), Some("keep-alive"));
    kept.send(b"GET /environ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(kept.response(false).unwrap().status, 200);
}

#[test]
fn request_bodies_by_length_chunked_and_after_100_continue() {
    let (_server, http) = start(&[]);
    let mut client = Client::tcp(&http);
    // A body larger than any buffer on the way, after the client waited for `100 Continue`.
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    client.send(
        format!(
            "PUT /echo HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let interim = client.response(false).unwrap();
    assert_eq!(interim.status, 100, "the server asks for the body before the client sends it");
    client.send(&body);
    let echoed = client.response(false).unwrap();
    assert_eq!((echoed.status, echoed.body.len()), (200, body.len()));
    assert!(echoed.body == body, "the body arrives intact");

    // A chunked body (with an extension and a trailer): the app reads it with the decoded CONTENT_LENGTH.
    client.send(b"POST /read-content-length HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    client.send(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n");
    let report = client.response(false).unwrap().report();
    assert_eq!(report.0["length"], "11", "{report:?}");
    client.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(client.response(false).unwrap().body, b"abc", "the same connection goes on");

    // An app that reads only after the socket timeout: the gateway waits for it, as nginx's buffering would.
    let slow = Server::builder().args(&["--socket-timeout", "1"]);
    let http_slow = format!("127.0.0.1:{}", free_port());
    let slow = slow.args(&["--http-socket", &http_slow]).start();
    wait_accepting(&http_slow);
    let mut slow_client = Client::tcp(&http_slow);
    let chunks: Vec<u8> = (0..16)
        .flat_map(|_| {
            let mut chunk = b"10000\r\n".to_vec();
            chunk.extend(std::iter::repeat_n(b'z', 0x10000));
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .collect();
    slow_client
        .send(b"POST /sleep-then-read?ms=2500 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    slow_client.send(&chunks);
    slow_client.send(b"0\r\n\r\n");
    assert_eq!(slow_client.response(false).unwrap().report().0["length"], (16 * 0x10000).to_string());
    drop(slow);

    // The app ignores a body: the connection stays framed all the same.
    client.send(b"POST /ignore-body HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n");
    client.send(&vec![b'x'; 100_000]);
    assert_eq!(client.response(false).unwrap().status, 200);
    client.send(&get("/environ"));
    assert_eq!(client.response(false).unwrap().status, 200);
}

#[test]
fn responses_are_framed_for_a_connection_that_stays_open() {
    let (server, http) = start(&[]);
    let mut client = Client::tcp(&http);
    // No Content-Length from the app: chunked to an HTTP/1.1 client.
    client.send(&get("/stream-bytes?total=200000&chunk=50000"));
    let streamed = client.response(false).unwrap();
    assert_eq!(streamed.header("transfer-encoding"), Some("chunked"));
    assert!(streamed.chunked && streamed.body.len() == 200_000);
    // A list: the derived Content-Length.
    client.send(&get("/head"));
    let listed = client.response(false).unwrap();
    assert_eq!((listed.header("content-length"), &listed.body[..]), (Some("9"), &b"list body"[..]));
    // HEAD, 204 and 304: no body, whatever the app produced.
    client.send(b"HEAD /head?kind=stream&key=h1 HTTP/1.1\r\nHost: h\r\n\r\n");
    let head = client.response(true).unwrap();
    assert_eq!((head.status, head.header("content-length")), (200, None));
    for path in ["/no-content", "/no-content?status=304%20Not%20Modified"] {
        client.send(&get(path));
        assert!(matches!(client.response(false).unwrap().status, 204 | 304));
    }
    client.send(&get("/environ"));
    assert_eq!(client.response(false).unwrap().status, 200, "nothing was left on the connection");
    // To HTTP/1.0, an unknown length ends with the connection.
    let mut old = Client::tcp(&http);
    old.send(b"GET /stream-bytes?total=100000&chunk=10000 HTTP/1.0\r\n\r\n");
    let until_close = old.response(false).unwrap();
    assert_eq!((until_close.header("connection"), until_close.body.len()), (Some("close"), 100_000));

    // The app fails mid-stream: the chunked body never gets its last chunk, and the connection closes.
    let mut aborted = Client::tcp(&http);
    aborted.send(&get("/big-stream-then-raise"));
    let cut = aborted.response(false).unwrap();
    assert_eq!(cut.status, 200);
    assert!(!cut.chunked, "an aborted response must not look complete");
    server.wait_log("big-stream-failure");
    // The same after a body that came after its head (so the request waited for it in the I/O runtime).
    let mut aborted = Client::tcp(&http);
    aborted.send(b"POST /big-stream-then-raise HTTP/1.1\r\nHost: h\r\nContent-Length: 10000\r\n\r\n");
    std::thread::sleep(Duration::from_millis(50));
    aborted.send(&[b'b'; 10000]);
    let cut = aborted.response(false).unwrap();
    assert!(
        cut.status == 200 && !cut.chunked,
        "an aborted response after a late body must not look complete"
    );
}

#[test]
fn what_cannot_be_served_gets_a_clear_status_and_the_server_goes_on() {
    let (server, http) = start(&["--limit-post", "1000", "--socket-timeout", "1"]);
    let cases: [(&[u8], u16, &str); 9] = [
        (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET /../etc HTTP/1.1\r\nHost: h\r\n\r\n", 400, "above the root"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "without a Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host"),
        (
            b"POST /echo HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
            413,
            "over 1000",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "both",
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "only chunked"),
        (b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 1001\r\n\r\n", 413, "over 1000"),
        (
            b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX",
            400,
            "bad chunked",
        ),
    ];
    for (request, status, why) in cases {
        let mut client = Client::tcp(&http);
        client.send(request);
        let answer = client.response(false).unwrap_or_else(|| panic!("no answer to {why}"));
        assert_eq!(answer.status, status, "{why}");
        assert_eq!(answer.header("connection"), Some("close"));
        assert!(String::from_utf8_lossy(&answer.body).contains(why), "{why}: {:?}", answer.body);
        assert!(client.closed());
        server.wait_log(why);
    }
    // A refused body already on its way: the server reads and drops it, so the answer is not lost to a reset.
    let mut client = Client::tcp(&http);
    client.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 600000\r\n\r\n");
    client.send(&vec![b'x'; 600_000]);
    assert_eq!(client.response(false).unwrap().status, 413);
    // A chunked body over --limit-post.
    let mut client = Client::tcp(&http);
    client.send(b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n");
    client.send(&[b'x'; 1001]);
    assert_eq!(client.response(false).unwrap().status, 413);
    // A head over the limit, and one that never ends.
    let mut client = Client::tcp(&http);
    client.send(format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n", "b".repeat(40_000)).as_bytes());
    assert_eq!(client.response(false).unwrap().status, 431);
    let mut client = Client::tcp(&http);
    client.send(b"GET / HTTP/1.1\r\nHost: h\r\n");
    assert_eq!(client.response(false).unwrap().status, 408);
    server.wait_log("timed out waiting for the request");
    // Every refusal was counted and logged; serving goes on.
    let mut client = Client::tcp(&http);
    client.send(&get("/environ"));
    assert_eq!(client.response(false).unwrap().status, 200);
}

#[test]
fn workers_under_a_master_serve_a_unix_http_socket_and_stop_gracefully() {
    let dir = support::temp_dir();
    let http = dir.join("http.sock");
    let http_arg = http.display().to_string();
    let mut server =
        Server::builder().args(&["--http-socket", &http_arg, "--processes", "2", "--threads", "2"]).start();
    for _ in 0..POLL_TRIES {
        if UnixStream::connect(&http).is_ok() {
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    // Each request on a connection of its own: whichever worker takes it knows the socket speaks HTTP.
    for _ in 0..20 {
        let mut client = Client::unix(&http);
        client.send(&get("/environ"));
        let response = client.response(false).unwrap();
        assert_eq!(response.status, 200);
        let environ = response.report();
        assert_eq!(environ.0["REMOTE_ADDR"], "''", "a Unix socket has no client address");
        assert_eq!(environ.0["SERVER_NAME"], "'example.test'");
    }
    // The uwsgi socket still speaks uwsgi next to it.
    assert_eq!(server.get("/environ").status_line, "HTTP/1.1 200 OK");
    // At the graceful stop, a request the app is running is answered (and its connection closed after it),
    // and an idle kept-alive connection is closed at once; then the server exits.
    let mut idle = Client::unix(&http);
    idle.send(&get("/environ"));
    assert_eq!(idle.response(false).unwrap().status, 200);
    let mut busy = Client::unix(&http);
    busy.send(&get("/sleep?ms=3000"));
    for _ in 0..POLL_TRIES {
        let mut probe = Client::unix(&http);
        probe.send(&get("/peak"));
        if probe.response(false).unwrap().report().0["active"] == "1" {
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    server.signal("TERM");
    assert!(idle.closed(), "the idle connection is closed at the stop");
    let last = busy.response(false).expect("the running request is answered");
    assert_eq!((last.status, last.header("connection")), (200, Some("close")));
    assert!(busy.closed());
    assert!(server.wait_exit(POLL_TRIES).success());
    assert!(!http.exists(), "the HTTP socket file is removed too");
}

#[test]
fn an_ini_file_names_the_http_socket() {
    let dir = support::temp_dir();
    let http = format!("127.0.0.1:{}", free_port());
    let ini = dir.join("app.ini");
    let uwsgi = dir.join("s.sock");
    std::fs::write(
        &ini,
        format!(
            "[uwsgi]\nsocket = {}\nhttp-socket = {http}\nwsgi-file = {}\n",
            uwsgi.display(),
            pep3333_app().display()
        ),
    )
    .unwrap();
    let mut child = support::oxwsgi_command()
        .arg(&ini)
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .unwrap();
    wait_accepting(&http);
    let mut client = Client::tcp(&http);
    client.send(&get("/environ"));
    assert_eq!(client.response(false).unwrap().status, 200);
    let log = std::fs::read_to_string(dir.join("log")).unwrap();
    assert!(!log.contains("http-socket"), "not reported as unknown: {log}");
    assert!(log.contains(&format!("http://{http}/")), "the log says where to point a browser: {log}");
    // SAFETY: the pid is our own child's, not yet waited for, so it names no other process.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_socket_systemd_names_http_speaks_http() {
    let dir = support::temp_dir();
    let socket = dir.join("activated.sock");
    let launcher = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/socket_activate.py");
    for extra in [&[][..], &["--processes", "2"][..]] {
        let _ = std::fs::remove_file(&socket);
        let mut child = std::process::Command::new("python3")
            .arg(&launcher)
            .arg(&socket)
            .arg(env!("CARGO_BIN_EXE_oxwsgi"))
            .args(["--wsgi-file", pep3333_app().to_str().unwrap()])
            .args(extra)
            .env("SOCKET_ACTIVATE_NAME", "http")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..POLL_TRIES {
            if socket.exists() {
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        // The socket is bound before the server starts: the request waits in its queue until it serves.
        let mut client = Client::unix(&socket);
        client.send(&get("/environ"));
        let response = client.response(false).expect("an HTTP answer");
        assert_eq!((response.status, response.report().0["SERVER_PROTOCOL"].as_str()), (200, "'HTTP/1.1'"));
        // SAFETY: the pid is our own child's, not yet waited for, so it names no other process.
        unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
        assert!(child.wait().unwrap().success(), "{extra:?}");
    }
}
