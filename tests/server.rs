//! The real `oxwsgi` binary, driven with raw uwsgi bytes: protocol handling, the WSGI environ, PEP 3333
//! response rules, startup failures and shutdown.
//!
//! Every test starts its own server (a Unix socket in a temp dir, a few on TCP) running
//! `tests/apps/pep3333_app.py`, whose routes each exercise one behaviour and report what the app saw as
//! `key: ascii(value)` lines. No test asserts a duration; eventual conditions are bounded polls.

mod support;

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::thread;
use std::time::Duration;

use support::{app_path, find, run_to_exit, temp_dir, Addr, Report, RequestBuilder, Response, Server};

/// The 500 answer for an app that failed before sending anything (`INTERNAL_ERROR` in `proto/src/response.rs`).
const INTERNAL_ERROR: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 22\r\n\r\nInternal Server Error\n";
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nBad Request\n";

/// `ascii(s)` in Python for the str whose code points are `bytes` (latin-1), i.e. what the app reports for
/// an environ value that arrived as those bytes.
fn py_str(bytes: &[u8]) -> String {
    py_repr(bytes, "")
}

/// `ascii(b)` in Python for a bytes object.
fn py_bytes(bytes: &[u8]) -> String {
    py_repr(bytes, "b")
}

fn py_repr(bytes: &[u8], prefix: &str) -> String {
    let quote = if bytes.contains(&b'\'') && !bytes.contains(&b'"') { '"' } else { '\'' };
    let mut out = format!("{prefix}{quote}");
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b if char::from(b) == quote => {
                out.push('\\');
                out.push(quote);
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push(quote);
    out
}

/// The connection must end without a single byte of reply (EOF, or a reset on some kernels).
fn assert_closed_without_reply(server: &Server, bytes: &[u8], what: &str) {
    let mut conn = server.connect();
    conn.write_all(bytes).expect("send");
    let got = match conn.read_to_end_result() {
        Ok(got) | Err((_, got)) => got,
    };
    assert!(got.is_empty(), "{what}: expected no reply, got {:?}", String::from_utf8_lossy(&got));
}

/// The server still answers a normal request.
fn assert_still_serving(server: &Server) {
    let report = server.report("/peak");
    assert!(report.has("peak"), "{report:?}");
}

// --- protocol --------------------------------------------------------------------------------------

#[test]
fn ping_gets_exactly_the_pong_header() {
    let server = Server::start(&[]);
    assert_eq!(server.exchange(&[100, 0, 0, 0]), [0x64, 0x00, 0x00, 0x01]);
    assert_still_serving(&server);
    // A ping is not a request: no access log line for it, and no error.
    assert!(!server.log().contains("refused"), "{}", server.log());
}

#[test]
fn ping_over_tcp() {
    let server = Server::builder().tcp().start();
    assert_eq!(server.exchange(&[100, 0, 0, 0]), [0x64, 0x00, 0x00, 0x01]);
    assert_still_serving(&server);
}

#[test]
fn unknown_modifier_is_closed_without_reply_and_logged() {
    let server = Server::start(&[]);
    assert_closed_without_reply(&server, &[22, 5, 0, 0, b'h', b'e', b'l', b'l', b'o'], "modifier1 22");
    server.wait_log("modifier1 22");
    // A TLS ClientHello on the uwsgi socket looks like modifier1 22 too.
    assert_closed_without_reply(&server, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01], "TLS ClientHello");
    // modifier1 30 (the deprecated SCRIPT_NAME-stripping variant) is not served either.
    let mut modifier30 = RequestBuilder::get("/peak").packet();
    modifier30[0] = 30;
    assert_closed_without_reply(&server, &modifier30, "modifier1 30");
    assert_still_serving(&server);
}

#[test]
fn plain_http_gets_a_400_that_points_at_uwsgi_pass() {
    let server = Server::start(&[]);
    for request in [
        &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
        b"POST /form HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ] {
        let raw = server.exchange(request);
        let response = Response::parse(raw).expect("an HTTP response");
        assert_eq!(response.status_line, "HTTP/1.1 400 Bad Request", "{response:?}");
        assert!(response.body_text().contains("uwsgi_pass"), "{response:?}");
        let declared: usize = response.header("Content-Length").expect("Content-Length").parse().unwrap();
        assert_eq!(declared, response.body.len(), "{response:?}");
    }
    assert_still_serving(&server);
}

#[test]
fn plain_http_over_tcp_gets_the_400_too() {
    let server = Server::builder().tcp().start();
    let raw = server.exchange(b"GET /health HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl\r\n\r\n");
    let response = Response::parse(raw).expect("an HTTP response");
    assert_eq!(response.status_line, "HTTP/1.1 400 Bad Request");
    assert!(response.body_text().contains("uwsgi_pass"), "{response:?}");
}

#[test]
fn malformed_vars_are_closed_without_reply() {
    let server = Server::start(&[]);
    // A valid record, then one with an empty key.
    let mut empty_key = vec![0, 0, 0, 0];
    empty_key.extend_from_slice(b"\x0e\x00REQUEST_METHOD\x03\x00GET\x00\x00\x01\x00x");
    let datasize = u16::try_from(empty_key.len() - 4).unwrap();
    empty_key[1..3].copy_from_slice(&datasize.to_le_bytes());
    assert_closed_without_reply(&server, &empty_key, "empty key");
    assert_still_serving(&server);

    // The block says 3 bytes; its record announces a 5-byte key.
    assert_closed_without_reply(&server, &[0, 3, 0, 0, 5, 0, b'K'], "truncated key");
    // A value that runs past the end of the block.
    assert_closed_without_reply(&server, &[0, 6, 0, 0, 1, 0, b'K', 9, 0, b'v'], "truncated value");
    // Two bytes left where a value length is expected: one.
    assert_closed_without_reply(&server, &[0, 4, 0, 0, 1, 0, b'K', 3], "truncated value length");
    // modifier1 0 with an empty block.
    assert_closed_without_reply(&server, &[0, 0, 0, 0], "empty WSGI packet");
    let log = server.wait_log("invalid uwsgi packet");
    assert!(log.matches("refused a connection").count() >= 5, "{log}");
    assert_still_serving(&server);
}

/// A peer sending bad packets as fast as it can gets a few log lines a second, not one per connection,
/// and the lines that do go out say how many were left out.
#[test]
fn a_flood_of_refusals_is_logged_within_a_budget() {
    /// Far more than the server logs in a second (10).
    const FLOOD: usize = 200;
    let server = Server::start(&[]);
    let empty_wsgi_packet = [0, 0, 0, 0];
    for _ in 0..FLOOD {
        assert_closed_without_reply(&server, &empty_wsgi_packet, "empty WSGI packet");
    }
    // One more bad packet at a time until a line says how many were left out (the budget is renewed
    // every second).
    let mut log = server.log();
    for _ in 0..support::POLL_TRIES {
        if log.contains("more refusals not logged since the last such line") {
            break;
        }
        thread::sleep(support::POLL_INTERVAL);
        assert_closed_without_reply(&server, &empty_wsgi_packet, "empty WSGI packet");
        log = server.log();
    }
    assert!(log.contains("more refusals not logged since the last such line"), "{log}");
    let logged = log.matches("refused a connection").count();
    assert!(logged < FLOOD / 2, "{logged} lines for {FLOOD} refusals:\n{log}");
    assert_still_serving(&server);
}

#[test]
fn datasize_over_buffer_size_is_refused_at_the_limit_accepted() {
    let server = Server::start(&["--buffer-size", "100"]);
    // REQUEST_METHOD=GET (2 + 14 + 2 + 3 = 21 bytes) + PATH_INFO=/peak (18) + PAD=... (2 + 3 + 2 + n).
    let packet = |pad: usize| {
        let padding = vec![b'p'; pad];
        oxwsgi_proto::encode_packet(
            0,
            0,
            &[(b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/peak"), (b"PAD", &padding)],
        )
        .unwrap()
    };
    let at_limit = packet(54);
    assert_eq!(at_limit.len(), 4 + 100);
    let response = Response::parse(server.exchange(&at_limit)).expect("an HTTP response");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");

    let over = packet(55);
    assert_closed_without_reply(&server, &over, "datasize 101 with --buffer-size 100");
    // The header alone is enough to refuse: the server must not wait for a block it will never take.
    let mut conn = server.connect();
    conn.write_all(&[0, 0xff, 0x7f, 0]).unwrap();
    let got = match conn.read_to_end_result() {
        Ok(got) | Err((_, got)) => got,
    };
    assert!(got.is_empty());
    server.wait_log("refused a connection");
    let response = Response::parse(server.exchange(&at_limit)).expect("still serving");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
}

#[test]
fn eof_mid_packet_is_closed_and_the_next_request_works() {
    let server = Server::start(&[]);
    let packet = RequestBuilder::get("/peak").packet();
    for cut in [2, 4, 10, packet.len() - 1] {
        let mut conn = server.connect();
        conn.write_all(&packet[..cut]).unwrap();
        conn.shutdown_write();
        let got = match conn.read_to_end_result() {
            Ok(got) | Err((_, got)) => got,
        };
        assert!(got.is_empty(), "cut at {cut}: {:?}", String::from_utf8_lossy(&got));
    }
    server.wait_log("connection closed after");
    assert_still_serving(&server);
}

#[test]
fn silent_client_times_out_without_reply() {
    let server = Server::start(&["--socket-timeout", "1", "--threads", "2"]);
    let packet = RequestBuilder::get("/peak").packet();
    let mut conn = server.connect();
    conn.write_all(&packet[..10]).unwrap();
    // The server gives up on its own: EOF without reply while our side is still open.
    let got = match conn.read_to_end_result() {
        Ok(got) | Err((_, got)) => got,
    };
    assert!(got.is_empty());
    server.wait_log("timed out");
    assert_still_serving(&server);
}

/// A packet trickled a byte at a time, each byte well inside the timeout, is still cut off: the whole
/// packet must arrive within one --socket-timeout, or a peer keeps its connection as long as it likes.
#[test]
fn a_trickled_packet_is_cut_off_after_one_socket_timeout() {
    /// Far inside the 1 s timeout: a timeout per arrival would never fire.
    const BYTE_EVERY: Duration = Duration::from_millis(200);
    let server = Server::start(&["--socket-timeout", "1"]);
    let packet = RequestBuilder::get("/peak").packet();
    let mut conn = server.connect();
    let mut sent = 0;
    for byte in &packet {
        if conn.write_all(std::slice::from_ref(byte)).and_then(|()| conn.flush()).is_err() {
            break; // the server closed the connection
        }
        sent += 1;
        thread::sleep(BYTE_EVERY);
    }
    assert!(sent < packet.len(), "all {sent} bytes went in: the trickle was never cut off");
    server.wait_log("timed out waiting for the request after");
    assert_still_serving(&server);
}

/// A server that traces how much of a request has arrived, each time more does.
fn tracing_arrivals() -> Server {
    Server::builder().env("OXWSGI_LOG", "info,oxwsgi::server::arrival=trace").start()
}

/// Writes `piece` and waits until the server has read everything up to `total` bytes: each piece is read
/// on its own, however the kernel would have merged the writes.
fn write_and_wait_read(server: &Server, conn: &mut support::Conn, piece: &[u8], total: usize) {
    conn.write_all(piece).unwrap();
    conn.flush().unwrap();
    server.wait_log(&format!("request arriving received={total}\n"));
}

#[test]
fn packet_split_across_writes_is_reassembled() {
    let server = tracing_arrivals();
    let request = RequestBuilder::post("/echo", b"split body bytes").encode();
    let mut conn = server.connect();
    let cuts = [0, 1, 3, 20, request.len() - 4];
    for piece in cuts.windows(2) {
        write_and_wait_read(&server, &mut conn, &request[piece[0]..piece[1]], piece[1]);
    }
    conn.write_all(&request[request.len() - 4..]).unwrap();
    let response = Response::parse(conn.read_to_end_result().expect("a response")).expect("HTTP");
    assert_eq!(response.body, b"split body bytes");
}

#[test]
fn content_length_that_is_not_a_decimal_gets_400() {
    let server = Server::start(&[]);
    for bad in [&b"12abc"[..], b"-1", b"0x10", b" 5", b"5 "] {
        let request = RequestBuilder::post("/echo", b"hello").set("CONTENT_LENGTH", bad);
        assert_eq!(server.exchange(&request.encode()), BAD_REQUEST, "CONTENT_LENGTH {bad:?}");
    }
    assert_still_serving(&server);
}

#[test]
fn limit_post_answers_413_above_the_limit_only() {
    let server = Server::start(&["--limit-post", "10"]);
    let response = server.send(&RequestBuilder::post("/echo", &[b'x'; 20]));
    assert_eq!(response.status_line, "HTTP/1.1 413 Request Entity Too Large", "{response:?}");
    let declared: usize = response.header("Content-Length").unwrap().parse().unwrap();
    assert_eq!(declared, response.body.len());
    server.wait_log("--limit-post 10");

    let response = server.send(&RequestBuilder::post("/echo", &[b'y'; 10]));
    assert_eq!(response.status_line, "HTTP/1.1 200 OK");
    assert_eq!(response.body, [b'y'; 10]);
}

#[test]
fn limit_post_413_over_tcp_arrives_whole() {
    // The refused body is drained before closing, so the 413 is not lost to a reset.
    let server = Server::builder().tcp().args(&["--limit-post", "1000"]).start();
    let response = server.send(&RequestBuilder::post("/echo", &vec![b'z'; 300_000]));
    assert_eq!(response.status_line, "HTTP/1.1 413 Request Entity Too Large", "{response:?}");
}

// --- environ ---------------------------------------------------------------------------------------

#[test]
fn environ_holds_every_var_as_a_latin1_str() {
    let server = Server::start(&[]);
    let request = RequestBuilder::get("/environ?a=1&b=%20")
        .set("PATH_INFO", b"/environ")
        .set("REQUEST_URI", b"/environ?a=1&b=%20")
        .add("HTTP_USER_AGENT", b"test-agent/1.0")
        .add("HTTP_X_BINARY", b"\xff\xfe\x01 tab\there")
        .add("HTTP_X_UTF8", "caf\u{e9}".as_bytes())
        .add("HTTP_ACCEPT", b"*/*")
        .add("SOME_NGINX_PARAM", b"custom value")
        .add("HTTP_CONTENT_TYPE", b"text/plain")
        .add("HTTP_CONTENT_LENGTH", b"0");
    let response = server.send(&request);
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    let report = Report::parse(&response.body);
    for (key, value) in request.vars() {
        let key = String::from_utf8(key).unwrap();
        if key.starts_with("HTTP_CONTENT_") {
            continue;
        }
        assert_eq!(report.get(&key), py_str(&value), "environ[{key:?}]");
    }
    assert_eq!(report.get("HTTP_X_UTF8"), "'caf\\xc3\\xa9'");
    assert_eq!(report.get("QUERY_STRING"), "'a=1&b=%20'");
    assert!(!report.has("HTTP_CONTENT_TYPE"), "{report:#?}");
    assert!(!report.has("HTTP_CONTENT_LENGTH"), "{report:#?}");
    assert_eq!(report.get("_non_str"), "[]");
    assert_eq!(report.get("_key_types"), "['str']");
}

#[test]
fn path_info_bytes_arrive_latin1_decoded() {
    let server = Server::start(&[]);
    // nginx percent-decodes the path: "/caf%C3%A9" arrives as the raw UTF-8 bytes, and PEP 3333 wants
    // them as the str of those byte values: '/cafÃ©'.
    let request = RequestBuilder::get("/environ/caf%C3%A9").set("PATH_INFO", b"/environ/caf\xc3\xa9");
    let report = report_of(&server, &request);
    assert_eq!(report.get("PATH_INFO"), "'/environ/caf\\xc3\\xa9'");
    assert_eq!(report.get("REQUEST_URI"), "'/environ/caf%C3%A9'");
}

#[test]
fn wsgi_keys_have_the_pep3333_values() {
    let server = Server::start(&[]);
    let report = report_of(&server, &RequestBuilder::get("/environ"));
    assert_eq!(report.get("wsgi.version"), "(1, 0)");
    assert_eq!(report.get("wsgi.url_scheme"), "'http'");
    assert_eq!(report.get("wsgi.multithread"), "False");
    assert_eq!(report.get("wsgi.multiprocess"), "False");
    assert_eq!(report.get("wsgi.run_once"), "False");
    for key in ["wsgi.input", "wsgi.errors", "wsgi.file_wrapper"] {
        assert!(report.get(key).starts_with("'<"), "{key}: {}", report.get(key));
    }
    assert!(report.get("oxwsgi.version").starts_with("'0."), "{}", report.get("oxwsgi.version"));
    // Not a de-chunked body: absent (Werkzeug would otherwise read without a size).
    assert!(!report.has("wsgi.input_terminated"), "{report:#?}");
}

#[test]
fn input_terminated_only_for_bodies_nginx_dechunked() {
    let server = Server::start(&[]);
    let request = RequestBuilder::post("/environ", b"abc").add("HTTP_TRANSFER_ENCODING", b"chunked");
    let report = report_of(&server, &request);
    assert_eq!(report.get("wsgi.input_terminated"), "True");
    let report = report_of(&server, &RequestBuilder::post("/environ", b"abc"));
    assert!(!report.has("wsgi.input_terminated"), "{report:#?}");
}

#[test]
fn multithread_reflects_threads() {
    let server = Server::start(&["--threads", "3"]);
    let report = report_of(&server, &RequestBuilder::get("/environ"));
    assert_eq!(report.get("wsgi.multithread"), "True");
}

#[test]
fn repeated_headers_are_joined_like_nginx_1_23() {
    let server = Server::start(&[]);
    let request = RequestBuilder::get("/environ")
        .add("HTTP_COOKIE", b"a=1")
        .add("HTTP_X_DUP", b"one")
        .add("HTTP_COOKIE", b"b=2")
        .add("HTTP_X_DUP", b"two")
        .add("HTTP_X_DUP", b"three")
        .add("NGINX_PARAM", b"first")
        .add("NGINX_PARAM", b"last");
    let report = report_of(&server, &request);
    assert_eq!(report.get("HTTP_COOKIE"), "'a=1; b=2'");
    assert_eq!(report.get("HTTP_X_DUP"), "'one, two, three'");
    assert_eq!(report.get("NGINX_PARAM"), "'last'");
}

#[test]
fn repeated_headers_with_equal_values_are_joined_too() {
    // Python hands out one shared str for a one-character or empty value, and the server reuses the str of
    // a common header's value: a repeat with the same value must still be joined, not taken for the first.
    let server = Server::start(&[]);
    let request = RequestBuilder::get("/environ")
        .add("HTTP_COOKIE", b"a=1")
        .add("HTTP_COOKIE", b"a=1")
        .add("HTTP_X_ONE", b"x")
        .add("HTTP_X_ONE", b"x")
        .add("HTTP_X_EMPTY", b"")
        .add("HTTP_X_EMPTY", b"");
    let report = report_of(&server, &request);
    assert_eq!(report.get("HTTP_COOKIE"), "'a=1; a=1'");
    assert_eq!(report.get("HTTP_X_ONE"), "'x, x'");
    assert_eq!(report.get("HTTP_X_EMPTY"), "', '");
}

#[test]
fn vars_cannot_replace_the_servers_own_entries() {
    let server = Server::start(&[]);
    let request = RequestBuilder::get("/environ")
        .add("wsgi.errors", b"not a stream")
        .add("wsgi.input_terminated", b"1")
        .add("oxwsgi.version", b"0");
    let report = report_of(&server, &request);
    assert!(report.get("wsgi.errors").starts_with("'<"), "{}", report.get("wsgi.errors"));
    assert!(!report.has("wsgi.input_terminated"), "{report:#?}");
    assert!(report.get("oxwsgi.version").starts_with("'0."), "{}", report.get("oxwsgi.version"));
}

#[test]
fn script_name_and_server_name_defaults() {
    let server = Server::start(&[]);
    let request =
        RequestBuilder::get("/environ").set("SERVER_NAME", b"").set("HTTP_HOST", b"example.org:8080");
    let report = report_of(&server, &request);
    assert_eq!(report.get("SCRIPT_NAME"), "''");
    assert_eq!(report.get("SERVER_NAME"), "'example.org'");
    assert_eq!(report.get("SERVER_PORT"), "'80'", "nginx's SERVER_PORT is kept");

    let request = RequestBuilder::get("/environ").set("SCRIPT_NAME", b"/mount");
    assert_eq!(report_of(&server, &request).get("SCRIPT_NAME"), "'/mount'");

    // Neither SERVER_NAME nor HTTP_HOST: a Unix socket has no address, so "localhost".
    let request = RequestBuilder::get("/environ").remove("SERVER_NAME").remove("HTTP_HOST");
    let report = report_of(&server, &request);
    assert_eq!(report.get("SERVER_NAME"), "'localhost'");
}

#[test]
fn server_name_and_port_fall_back_to_the_tcp_listener() {
    let server = Server::builder().tcp().start();
    let Addr::Tcp(addr) = server.addr.clone() else { unreachable!() };
    let request =
        RequestBuilder::get("/environ").remove("SERVER_NAME").remove("HTTP_HOST").remove("SERVER_PORT");
    let report = report_of(&server, &request);
    assert_eq!(report.get("SERVER_NAME"), "'127.0.0.1'");
    assert_eq!(report.get("SERVER_PORT"), py_str(addr.port().to_string().as_bytes()));
}

#[test]
fn url_scheme_comes_from_nginx_vars_never_from_client_headers() {
    let server = Server::start(&[]);
    let scheme = |request: RequestBuilder| report_of(&server, &request).get("wsgi.url_scheme").to_owned();
    let get = || RequestBuilder::get("/environ");
    assert_eq!(scheme(get().add("HTTP_X_FORWARDED_PROTO", b"https")), "'http'");
    assert_eq!(scheme(get().add("HTTP_X_FORWARDED_PROTO", b"javascript")), "'http'");
    assert_eq!(scheme(get().add("HTTPS", b"on")), "'https'");
    assert_eq!(scheme(get().add("HTTPS", b"1")), "'https'");
    assert_eq!(scheme(get().add("HTTPS", b"off")), "'http'");
    assert_eq!(scheme(get().set("REQUEST_SCHEME", b"https")), "'https'");
    assert_eq!(scheme(get().add("UWSGI_SCHEME", b"https")), "'https'");
    assert_eq!(scheme(get().add("UWSGI_SCHEME", b"javascript")), "'http'");
    // A client header called "HTTPS" arrives as HTTP_HTTPS and must not count.
    assert_eq!(scheme(get().add("HTTP_HTTPS", b"on")), "'http'");
}

#[test]
fn every_request_gets_a_fresh_environ() {
    let server = Server::start(&[]);
    let first = server.report("/environ-fresh");
    assert_eq!(first.get("same_object"), "False");
    assert_eq!(first.get("marker_seen"), "False");
    // The first request stored its environ after adding a key and changing PATH_INFO.
    let second = server.report("/environ-fresh");
    assert_eq!(second.get("same_object"), "False");
    assert_eq!(second.get("marker_seen"), "False");
    assert_eq!(second.get("path_info"), "'/environ-fresh'");
}

#[test]
fn wsgi_errors_lines_reach_the_log() {
    let server = Server::start(&[]);
    let response = server.get("/errors");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK");
    let log = server.wait_log("errors-flush-marker");
    assert!(log.contains("errors-write-marker"), "{log}");
    assert!(log.contains("errors-writelines-marker"), "{log}");
}

#[test]
fn a_long_wsgi_errors_line_is_logged_in_bounded_pieces() {
    let server = Server::start(&[]);
    assert_eq!(server.get("/long-error-line").status_line, "HTTP/1.1 200 OK");
    let log = server.wait_log("long-error-tail-marker");
    let pieces: Vec<&str> = log.lines().filter(|line| line.contains('Q')).collect();
    let logged: usize = pieces.iter().map(|line| line.matches('Q').count()).sum();
    assert_eq!(logged, 100 * 1024, "every character reaches the log");
    assert!(pieces.len() >= 100 * 1024 / (16 * 1024), "logged in pieces: {}", pieces.len());
    assert!(pieces.iter().all(|line| line.len() < 16 * 1024 + 200), "no piece over the limit");
}

// --- wsgi.input ------------------------------------------------------------------------------------

#[test]
fn small_body_is_echoed() {
    let server = Server::start(&[]);
    let response = server.send(&RequestBuilder::post("/echo", b"hello body"));
    assert_eq!(
        response.raw,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 10\r\n\r\nhello body"
    );
    // No body at all: CONTENT_LENGTH "" as nginx sends it.
    let response = server.send(&RequestBuilder::get("/echo"));
    assert_eq!(response.header("Content-Length"), Some("0"));
    assert!(response.body.is_empty());
}

fn large_body() -> Vec<u8> {
    (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect()
}

#[test]
fn large_body_is_echoed_intact() {
    let server = Server::start(&[]);
    let body = large_body();
    let response = server.send(&RequestBuilder::post("/echo", &body));
    assert_eq!(response.header("Content-Length"), Some("3145728"));
    assert!(response.body == body, "3 MiB echo differs (got {} bytes)", response.body.len());
}

#[test]
fn large_body_is_echoed_intact_over_tcp() {
    let server = Server::builder().tcp().start();
    let body = large_body();
    let response = server.send(&RequestBuilder::post("/echo", &body));
    assert!(response.body == body, "3 MiB echo differs (got {} bytes)", response.body.len());
}

#[test]
fn input_read_with_a_size() {
    let server = Server::start(&[]);
    let report = report_of(&server, &RequestBuilder::post("/read-sized", b"abcdefgh"));
    assert_eq!(report.get("zero"), py_bytes(b""));
    assert_eq!(
        report.get("pieces"),
        format!("[{}, {}, {}]", py_bytes(b"abc"), py_bytes(b"def"), py_bytes(b"gh"))
    );
    assert_eq!(report.get("after"), "b''");
}

#[test]
fn input_readline_readlines_and_iteration() {
    let server = Server::start(&[]);
    let body = b"line1\nline2 is longer\nx\ny\nz\nlast";
    let report = report_of(&server, &RequestBuilder::post("/readline", body));
    assert_eq!(report.get("1_readline"), "b'line1\\n'");
    assert_eq!(report.get("2_readline_4"), "b'line'", "readline(size) must stop at size");
    assert_eq!(report.get("3_readline"), "b'2 is longer\\n'");
    assert_eq!(report.get("4_readlines_hint_1"), "[b'x\\n']", "readlines(hint) stops once hint bytes are in");
    assert_eq!(report.get("5_iteration"), "[b'y\\n', b'z\\n', b'last']");
    assert_eq!(report.get("6_readline_at_end"), "b''");
    assert_eq!(report.get("7_readlines_at_end"), "[]");
}

#[test]
fn input_lines_are_bounded_and_lose_nothing() {
    let server = Server::start(&[]);
    // 200 KiB without a newline, then a short line: read by lines, the long one comes in 64 KiB pieces.
    let mut body = vec![b'a'; 200 * 1024];
    body.extend_from_slice(b"\nend\n");
    let report = report_of(&server, &RequestBuilder::post("/long-lines", &body));
    assert_eq!(report.get("first"), "65536", "readline() stops at the line limit");
    assert_eq!(report.get("second"), "65536", "readline(-1) too");
    assert_eq!(report.get("rest"), "[65536, 8193, 4]", "iteration returns the rest in pieces, then the line");
    assert_eq!(report.get("joined"), body.len().to_string(), "the pieces are the whole body");
    assert_eq!(report.get("last"), "b'end\\n'");
}

#[test]
fn input_stops_at_content_length() {
    let server = tracing_arrivals();
    let report = report_of(&server, &RequestBuilder::post("/read-past?n=100", b"hello"));
    assert_eq!(report.get("first"), "b'hello'");
    assert_eq!(report.get("second"), "b''");
    assert_eq!(report.get("third"), "b''");
    // A body that arrives after the packet, in a later write, is waited for.
    let request = RequestBuilder::post("/read-past?n=5", b"later");
    let mut conn = server.connect();
    let packet = request.packet();
    write_and_wait_read(&server, &mut conn, &packet, packet.len());
    conn.write_all(b"later").unwrap();
    let response = Response::parse(conn.read_to_end_result().expect("response")).expect("HTTP");
    assert_eq!(Report::parse(&response.body).get("first"), "b'later'");
}

#[test]
fn body_ending_early_is_an_error_for_the_app() {
    let server = Server::start(&[]);
    // CONTENT_LENGTH says 100, only 5 bytes come, then EOF: read() must not hang or return short data
    // as if it were the whole body.
    let request = RequestBuilder::post("/echo", b"short").set("CONTENT_LENGTH", b"100");
    let mut conn = server.connect();
    conn.write_all(&request.encode()).unwrap();
    conn.shutdown_write();
    let got = match conn.read_to_end_result() {
        Ok(got) | Err((_, got)) => got,
    };
    assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 500 "), "{:?}", String::from_utf8_lossy(&got));
    // The client's doing, not the app's: one line, no traceback logged as an app error.
    let log = server.wait_log("the client closed the connection before sending the whole body");
    assert!(!log.contains("app raised an exception"), "{log}");
    assert_still_serving(&server);
}

#[test]
fn bytes_past_content_length_never_reach_the_next_connection() {
    let server = Server::start(&["--threads", "1"]);
    // A GET (no body) followed, in the same write, by a whole second request for another route: it is
    // not a body, and must not be taken for the start of the next connection's request.
    let mut smuggled = RequestBuilder::get("/peak?first").encode();
    smuggled.extend_from_slice(&RequestBuilder::get("/environ?smuggled").encode());
    let response = Response::parse(server.exchange(&smuggled)).expect("HTTP");
    assert!(response.body_text().contains("peak: "), "{response:?}");
    for _ in 0..3 {
        let response = server.get("/peak?second");
        assert!(
            response.body_text().contains("peak: "),
            "each connection answers its own request: {response:?}"
        );
    }
    assert!(!server.log().contains("smuggled"), "{}", server.log());
}

#[test]
fn unread_body_is_drained_so_the_response_arrives_whole() {
    for server in [Server::builder().tcp().start(), Server::start(&[])] {
        let body = vec![b'u'; 1024 * 1024];
        let response = server.send(&RequestBuilder::post("/ignore-body", &body));
        assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
        let report = Report::parse(&response.body);
        assert_eq!(report.get("content_length"), "'1048576'");
        assert_eq!(response.header("Content-Length").unwrap(), response.body.len().to_string());
    }
}

#[test]
fn read_of_a_huge_content_length_does_not_kill_the_server() {
    let mut server = Server::start(&[]);
    // The app calls wsgi.input.read(int(CONTENT_LENGTH)) with ten trillion: reserving that up front aborted
    // the process. The request itself may end with a 500 or a closed connection; the server must live on.
    let request =
        RequestBuilder::post("/read-content-length", b"tiny").set("CONTENT_LENGTH", b"10000000000000");
    let mut conn = server.connect();
    conn.write_all(&request.encode()).unwrap();
    conn.shutdown_write();
    let got = match conn.read_to_end_result() {
        Ok(got) | Err((_, got)) => got,
    };
    drop(conn);
    if let Some(status) = server.try_exit() {
        panic!(
            "oxwsgi died ({status}) after answering {:?}; log:\n{}",
            String::from_utf8_lossy(&got),
            server.log()
        );
    }
    let response = server.get("/peak");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    assert!(server.try_exit().is_none(), "log:\n{}", server.log());
}

#[test]
fn body_stalling_after_the_response_is_given_up_even_if_the_app_keeps_it() {
    // The app answers at once, ignores the body and keeps its environ (so wsgi.input stays alive). The body
    // then stalls: once --socket-timeout passes, the server must close the connection; it used to wait for
    // ever to hand the timeout to an app that never reads.
    let server = Server::start(&["--socket-timeout", "1"]);
    let request = RequestBuilder::post("/ignore-body-keep-environ", b"")
        .set("CONTENT_LENGTH", (10 * 1024 * 1024).to_string().as_bytes());
    let mut conn = server.connect();
    conn.write_all(&request.packet()).unwrap();
    let response = read_response_with_length(&mut conn);
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    assert_eq!(Report::parse(&response.body).get("content_length"), "'10485760'");
    // 256 KiB of the 10 MiB, then nothing, with our side still open: however the server reads it, it is
    // left waiting for more.
    conn.write_all(&vec![b'b'; 256 * 1024]).unwrap();
    conn.flush().unwrap();
    match conn.read_to_end_result() {
        Ok(rest) => {
            assert!(rest.is_empty(), "bytes after the response: {:?}", String::from_utf8_lossy(&rest));
        }
        Err((err, _)) => panic!("the server kept the connection open ({err}); log:\n{}", server.log()),
    }
    assert_still_serving(&server);
}

// --- responses -------------------------------------------------------------------------------------

#[test]
fn list_response_gets_a_derived_content_length() {
    let server = Server::start(&[]);
    let response = server.get("/content-length-over?kind=list");
    assert_eq!(
        response.raw,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n01234"
    );
    let response = server.get("/exc-info-before");
    assert_eq!(response.header("Content-Length"), Some("8"));
    let response = server.get("/no-such-route");
    assert_eq!(
        response.raw,
        b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\r\nno such test route\n"
    );
}

#[test]
fn generator_response_streams_without_content_length() {
    let server = Server::start(&[]);
    let response = server.get("/lazy-start");
    assert_eq!(
        response.raw,
        b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nX-Lazy: yes\r\n\r\nlazy body"
    );
}

#[test]
fn write_callable_sends_in_order_without_content_length() {
    let server = Server::start(&[]);
    let response = server.get("/write");
    assert_eq!(response.raw, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\none two");
    let response = server.get("/write-then-iter");
    assert_eq!(response.raw, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst,second,third");
}

#[test]
fn exc_info_before_the_head_replaces_status_and_headers() {
    let server = Server::start(&[]);
    let response = server.get("/exc-info-before");
    assert_eq!(
        response.raw,
        b"HTTP/1.1 500 Oops\r\nContent-Type: text/plain\r\nX-Second: 1\r\nContent-Length: 8\r\n\r\nreplaced"
    );
}

#[test]
fn exc_info_after_the_head_reraises_the_original_exception() {
    let server = Server::start(&[]);
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/exc-info-after?key=ea").encode()).unwrap();
    let got = match conn.read_to_end_result() {
        Ok(got) | Err((_, got)) => got,
    };
    let response = Response::parse(got).expect("the head was sent before the failure");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK");
    assert_eq!(response.header("Content-Length"), Some("100"));
    assert_eq!(response.body, b"chunk1", "the response must stop short of the declared length");
    let result = server.wait_result("ea", |r| r.has("same"));
    assert_eq!(result.get("type"), "'ValueError'");
    assert_eq!(result.get("same"), "True", "start_response must re-raise exc_info's own exception");
    let log = server.wait_log("response aborted");
    assert!(log.contains("ValueError: original"), "{log}");
}

#[test]
fn start_response_twice_without_exc_info_is_an_error() {
    let server = Server::start(&[]);
    assert_eq!(server.exchange(&RequestBuilder::get("/twice?key=tw").encode()), INTERNAL_ERROR);
    assert_eq!(server.report("/last-result?key=tw").get("type"), "'RuntimeError'");
    server.wait_log("RuntimeError");
}

#[test]
fn exception_before_start_response_is_a_500_with_a_traceback() {
    let server = Server::start(&[]);
    assert_eq!(server.exchange(&RequestBuilder::get("/raise-before").encode()), INTERNAL_ERROR);
    let log = server.wait_log("raise-before-marker");
    assert!(log.contains("Traceback (most recent call last)"), "{log}");
    assert!(log.contains("ValueError: raise-before-marker"), "{log}");
    assert_still_serving(&server);
}

#[test]
fn exception_in_the_iterable_before_any_body_is_a_500() {
    let server = Server::start(&[]);
    assert_eq!(server.exchange(&RequestBuilder::get("/raise-in-iter-before-body").encode()), INTERNAL_ERROR);
    server.wait_log("raise-in-iter-marker");
}

#[test]
fn exception_after_body_bytes_aborts_a_unix_response_short_of_content_length() {
    let server = Server::start(&[]);
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/raise-after-body?cl=100").encode()).unwrap();
    let got = match conn.read_to_end_result() {
        Ok(got) | Err((_, got)) => got,
    };
    let response = Response::parse(got).expect("the head went out with the first chunk");
    assert_eq!(response.header("Content-Length"), Some("100"));
    assert_eq!(response.body, b"partial");
    let log = server.wait_log("response aborted");
    assert!(log.contains("raise-after-body-marker"), "{log}");
    assert_still_serving(&server);
}

#[test]
fn exception_after_body_bytes_resets_a_tcp_connection() {
    let server = Server::builder().tcp().start();
    // No Content-Length: only the reset tells nginx the response is broken.
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/raise-after-body").encode()).unwrap();
    match conn.read_to_end_result() {
        Err((err, got)) => {
            assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
            assert!(find(&got, b"Internal Server Error").is_none(), "{:?}", String::from_utf8_lossy(&got));
        }
        Ok(got) => panic!(
            "the connection ended with a clean EOF, which looks like a complete response: {:?}",
            String::from_utf8_lossy(&got)
        ),
    }
    server.wait_log("response aborted");
}

#[test]
fn failed_stream_read_slowly_over_tcp_is_reset_never_closed_cleanly() {
    // 60 chunks of 128 KiB, then the generator raises. The client reads slowly through a small receive
    // window, so the server's chunk queue is full when the failure comes; the abort used to be lost there and
    // the connection closed cleanly, which without Content-Length looks like a complete response. The old
    // failure depended on timing, hence several runs.
    let server = Server::builder().tcp().start();
    let produced = 60 * 128 * 1024;
    for run in 1..=3 {
        let mut conn = server.connect_tcp_small_rcvbuf(4096);
        conn.write_all(&RequestBuilder::get(&format!("/big-stream-then-raise?run={run}")).encode()).unwrap();
        let mut got = 0usize;
        let mut buf = [0u8; 16 * 1024];
        let end = loop {
            match conn.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => got += n,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => break Some(err),
            }
            thread::sleep(Duration::from_millis(1));
        };
        match end {
            Some(err) => {
                assert_eq!(err.kind(), ErrorKind::ConnectionReset, "run {run}: {err} after {got} bytes");
            }
            None => panic!(
                "run {run}: clean EOF after {got} bytes, which looks like a complete response (the app \
                 produced {produced} body bytes, then raised); log:\n{}",
                server.log()
            ),
        }
        wait_log_count(&server, "response aborted", run);
    }
    let log = server.log();
    assert!(log.contains("big-stream-failure"), "{log}");
    assert_still_serving(&server);
}

#[test]
fn str_body_chunk_is_a_500() {
    let server = Server::start(&[]);
    assert_eq!(server.exchange(&RequestBuilder::get("/str-chunk").encode()), INTERNAL_ERROR);
    server.wait_log("body chunk");
}

#[test]
fn invalid_status_is_a_500() {
    let server = Server::start(&[]);
    for case in 0..6 {
        let raw = server.exchange(&RequestBuilder::get(&format!("/bad-status?case={case}")).encode());
        assert_eq!(raw, INTERNAL_ERROR, "bad status case {case}: {:?}", String::from_utf8_lossy(&raw));
    }
    assert_still_serving(&server);
}

#[test]
fn invalid_or_hop_by_hop_headers_are_a_500() {
    let server = Server::start(&[]);
    for case in 0..13 {
        let raw = server.exchange(&RequestBuilder::get(&format!("/bad-header?case={case}")).encode());
        assert_eq!(raw, INTERNAL_ERROR, "bad header case {case}: {:?}", String::from_utf8_lossy(&raw));
    }
    let log = server.log();
    assert!(log.contains("hop-by-hop"), "{log}");
    assert_still_serving(&server);
}

/// `Connection`/`Keep-Alive` from the app and a status without a reason work under uWSGI and gunicorn:
/// served, corrected, and said once per worker however often the app does it.
#[test]
fn connection_headers_and_bare_status_are_corrected_with_one_warning() {
    let server = Server::start(&[]);
    let expected = [
        ("connection", "HTTP/1.1 200 OK\r\nX-Kept: yes\r\nContent-Length: 6\r\n\r\nserved"),
        ("reason", "HTTP/1.1 404 Not Found\r\nX-Kept: yes\r\nContent-Length: 6\r\n\r\nserved"),
    ];
    for _ in 0..3 {
        for (case, raw) in expected {
            let response = server.get(&format!("/corrected?case={case}"));
            assert_eq!(String::from_utf8_lossy(&response.raw), raw);
        }
    }
    let log = server.wait_log("standard phrase");
    assert_eq!(log.matches("`Connection` or `Keep-Alive` response header").count(), 1, "{log}");
    assert_eq!(log.matches("standard phrase").count(), 1, "{log}");
    assert!(!log.contains("WSGI violation"), "{log}");
}

#[test]
fn body_beyond_declared_content_length_is_cut() {
    let server = Server::start(&[]);
    let response = server.get("/content-length-over?key=clo");
    assert_eq!(
        response.raw,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n01234"
    );
    let result = server.wait_result("clo", |r| r.has("closed"));
    assert!(!result.has("resumed"), "iteration must stop once Content-Length is reached: {result:?}");
}

#[test]
fn list_shorter_than_declared_content_length_is_a_500() {
    let server = Server::start(&[]);
    assert_eq!(server.exchange(&RequestBuilder::get("/content-length-short-list").encode()), INTERNAL_ERROR);
    server.wait_log("Content-Length 10");
}

#[test]
fn short_list_with_a_kept_start_response_still_gets_its_500() {
    // The app keeps start_response (and so the server's response state) alive after the request: the 500 for
    // its short body must not wait for that state to be dropped.
    let server = Server::start(&[]);
    let raw = server.exchange(&RequestBuilder::get("/content-length-short-kept").encode());
    assert_eq!(raw, INTERNAL_ERROR, "{:?}", String::from_utf8_lossy(&raw));
    server.wait_log("Content-Length 10");
    assert_still_serving(&server);
}

#[test]
fn close_is_called_after_success() {
    let server = Server::start(&[]);
    let response = server.get("/close-tracking?key=ok&mode=ok");
    assert_eq!(response.raw, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc");
    let result = server.wait_result("ok", |r| r.get("closed") == "True");
    assert_eq!(result.get("close_calls"), "1");
    assert_eq!(result.get("finished"), "True");
}

#[test]
fn close_is_called_after_an_exception_in_iteration() {
    let server = Server::start(&[]);
    let raw = server.exchange(&RequestBuilder::get("/close-tracking?key=rf&mode=raise-first").encode());
    assert_eq!(raw, INTERNAL_ERROR);
    let result = server.wait_result("rf", |r| r.get("closed") == "True");
    assert_eq!(result.get("close_calls"), "1");

    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/close-tracking?key=rl&mode=raise-later").encode()).unwrap();
    let _ = conn.read_to_end_result();
    let result = server.wait_result("rl", |r| r.get("closed") == "True");
    assert_eq!(result.get("close_calls"), "1");
    assert_eq!(result.get("produced"), "1");
    server.wait_log("tracked-iterable-failure");
}

#[test]
fn close_is_called_when_the_client_disconnects_mid_stream() {
    let server = Server::start(&["--threads", "2"]);
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/close-tracking?key=gone&mode=slow").encode()).unwrap();
    let head = conn.read_head();
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"), "{:?}", String::from_utf8_lossy(&head));
    drop(conn);
    let result = server.wait_result("gone", |r| r.get("closed") == "True");
    assert_eq!(result.get("finished"), "False", "the server must stop the app once the client is gone");
    assert_eq!(result.get("close_calls"), "1");
}

#[test]
fn close_is_called_when_a_tcp_client_disconnects_mid_stream() {
    let server = Server::builder().tcp().args(&["--threads", "2"]).start();
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/close-tracking?key=gone&mode=slow").encode()).unwrap();
    conn.read_head();
    drop(conn);
    let result = server.wait_result("gone", |r| r.get("closed") == "True");
    assert_eq!(result.get("finished"), "False");
}

#[test]
fn file_wrapper_starts_at_the_file_position_and_stops_at_content_length() {
    let server = Server::start(&[]);
    let response = server.get("/file-wrapper?key=fw");
    assert_eq!(
        response.raw,
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 8\r\n\r\n56789abc"
    );
    let result = server.wait_result("fw", |r| r.get("file_closed") == "True");
    assert_eq!(result.get("wrapper_type"), "'FileWrapper'");
}

/// The bytes `/file-send` and `/read-chunks` tests use: `i % 251`, so a shifted or cut body shows.
fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| u8::try_from(i % 251).unwrap()).collect()
}

#[test]
fn file_wrapper_over_a_real_file_is_sent_without_python_reading_it() {
    let server = Server::start(&[]);
    // The file's read() raises: only sendfile(2), from the file to the socket, can serve it.
    let response = server.get("/file-send?kind=no-read&size=300000&key=nr");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{}", server.log());
    assert_eq!(response.header("Content-Length"), Some("300000"), "the length comes from the file");
    assert!(response.body == pattern(300_000), "the file's bytes, all of them, in order");
    server.wait_result("nr", |r| r.get("file_closed") == "True");
}

#[test]
fn file_wrapper_starts_where_the_app_left_the_file_not_where_its_buffer_did() {
    let server = Server::start(&[]);
    // read(10) on a buffered file moves the descriptor 8 KiB on; the body must start at byte 10.
    let response = server.get("/file-send?size=20000&skip=10&key=skip");
    assert_eq!(response.header("Content-Length"), Some("19990"));
    assert!(response.body == pattern(20_000)[10..], "the body starts at tell(), not at the fd offset");
    let result = server.wait_result("skip", |r| r.get("file_closed") == "True");
    assert_eq!(result.get("skipped"), py_bytes(&pattern(10)));
}

#[test]
fn file_wrapper_honours_a_declared_content_length_and_head() {
    let server = Server::start(&[]);
    let response = server.get("/file-send?size=5000&cl=100");
    assert_eq!(response.header("Content-Length"), Some("100"));
    assert!(response.body == pattern(100));
    // HEAD: the head with the file's length, no body.
    let response = server.send(&RequestBuilder::new("HEAD", "/file-send?size=5000&key=head"));
    assert_eq!(response.header("Content-Length"), Some("5000"));
    assert!(response.body.is_empty(), "{response:?}");
    server.wait_result("head", |r| r.get("file_closed") == "True");
    // Declared longer than the file: the response cannot be completed, and is not passed off as complete.
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/file-send?size=50&cl=100").encode()).unwrap();
    let got = match conn.read_to_end_result() {
        Ok(got) | Err((_, got)) => got,
    };
    let response = Response::parse(got).expect("the head went out");
    assert_eq!(response.header("Content-Length"), Some("100"));
    assert!(response.body.len() < 100, "{response:?}");
    server.wait_log("but the file has 50 bytes");
}

#[test]
fn file_wrapper_without_a_file_descriptor_is_read_in_blksize_blocks() {
    let server = Server::start(&[]);
    let response = server.get("/file-send?kind=bytesio&size=1000&blksize=7&key=bio");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK");
    assert!(response.body == pattern(1000));
    server.wait_result("bio", |r| r.get("file_closed") == "True");
}

#[test]
fn a_file_for_a_slow_reader_leaves_the_only_thread_free() {
    let server = Server::builder().tcp().args(&["--threads", "1"]).start();
    let size = 8 * 1024 * 1024;
    let mut slow = server.connect_tcp_small_rcvbuf(4096);
    slow.write_all(&RequestBuilder::get(&format!("/file-send?kind=no-read&size={size}")).encode()).unwrap();
    let mut got = slow.read_head();
    // The file does not fit in the socket buffers: its rest waits for this client, and the one Python
    // thread must not wait with it.
    let other = server.get("/peak");
    assert_eq!(other.status_line, "HTTP/1.1 200 OK", "another request while the file is pending");
    let head_len = find(&got, b"\r\n\r\n").unwrap() + 4;
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < head_len + size {
        let n = slow.read(&mut buf).expect("read the file");
        assert!(n > 0, "EOF after {} of {size} body bytes; log:\n{}", got.len() - head_len, server.log());
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got[head_len..] == pattern(size)[..], "the file arrives whole and in order");
}

#[test]
fn head_requests_get_the_head_only() {
    let server = Server::start(&[]);
    let response = server.send(&RequestBuilder::new("HEAD", "/head?key=hl"));
    assert_eq!(response.raw, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n");
    assert_eq!(server.report("/last-result?key=hl").get("method"), "'HEAD'");

    let response = server.send(&RequestBuilder::new("HEAD", "/head?key=hs&kind=stream"));
    assert_eq!(response.raw, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n");
    let result = server.wait_result("hs", |r| r.get("closed") == "True");
    assert_eq!(result.get("close_calls"), "1");

    // The same routes with GET do send their bodies.
    assert_eq!(server.get("/head?key=g").body, b"list body");
    assert_eq!(server.get("/head?key=g2&kind=stream").body, b"stream body");
}

#[test]
fn head_answered_with_an_empty_body_gets_no_content_length() {
    // Werkzeug answers HEAD with an empty iterable and no Content-Length when the GET body is streamed:
    // `Content-Length: 0` would be a lie about the GET body.
    let server = Server::start(&[]);
    for kind in ["generator", "list"] {
        let response = server.send(&RequestBuilder::new("HEAD", &format!("/head-like-flask?kind={kind}")));
        assert_eq!(response.header("Content-Length"), None, "HEAD, {kind}: {response:?}");
        assert_eq!(response.raw, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", "{response:?}");
    }
    let response = server.get("/head-like-flask");
    assert_eq!(response.raw, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nstreamed body");
}

#[test]
fn a_large_response_is_freed_without_another_request() {
    let server = Server::start(&[]);
    let size: usize = 300 * 1024 * 1024;
    let limit_kib = 150 * 1024;
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get(&format!("/big-list?bytes={size}")).encode()).unwrap();
    let head = conn.read_head();
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"), "{:?}", String::from_utf8_lossy(&head));
    let head_len = find(&head, b"\r\n\r\n").unwrap() + 4;
    // The server holds the whole body while sending it.
    let peak = vm_rss_kib(server.pid());
    assert!(peak > limit_kib, "VmRSS {peak} KiB while sending a {size}-byte body");
    let mut got = head.len() - head_len;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => panic!("reading the body failed after {got} bytes: {err}"),
        }
    }
    assert_eq!(got, size);
    drop(conn);
    // No other request: the buffer must be freed on its own.
    let mut rss = vm_rss_kib(server.pid());
    for _ in 0..support::POLL_TRIES {
        if rss < limit_kib {
            return;
        }
        thread::sleep(support::POLL_INTERVAL);
        rss = vm_rss_kib(server.pid());
    }
    panic!("VmRSS still {rss} KiB after the {size}-byte response was sent; log:\n{}", server.log());
}

#[test]
fn no_content_and_not_modified_send_no_body() {
    let server = Server::start(&[]);
    let response = server.get("/no-content?kind=list");
    assert_eq!(response.raw, b"HTTP/1.1 204 No Content\r\nX-Kind: list\r\n\r\n");
    let response = server.get("/no-content?kind=stream&key=nc");
    assert_eq!(response.raw, b"HTTP/1.1 204 No Content\r\nX-Kind: stream\r\n\r\n");
    server.wait_result("nc", |r| r.get("closed") == "True");
    let response = server.get("/no-content?kind=list&status=304+Not+Modified");
    assert_eq!(response.raw, b"HTTP/1.1 304 Not Modified\r\nX-Kind: list\r\n\r\n");
}

// --- memory ---------------------------------------------------------------------------------------

/// A large body, read or produced in 64 KiB pieces, must not grow the worker by more than this: it is never
/// held whole.
const BOUNDED_GROWTH: u64 = 16 * 1024 * 1024;

/// How much the resident memory of `pid` peaks above where it was, while `run` runs.
fn rss_growth(pid: u32, run: impl FnOnce()) -> u64 {
    let status = |field: &str| -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the server's status");
        let line = text.lines().find(|l| l.starts_with(field)).expect("a VmRSS/VmHWM line");
        line.split_whitespace().nth(1).and_then(|kib| kib.parse::<u64>().ok()).expect("kB") * 1024
    };
    // Resets the peak (VmHWM) to the present resident size.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the server's peak RSS");
    let before = status("VmRSS:");
    run();
    status("VmHWM:").saturating_sub(before)
}

#[test]
fn a_100_mib_upload_read_in_64_kib_pieces_keeps_the_worker_small() {
    let server = Server::start(&[]);
    let size = 100 * 1024 * 1024;
    let request = RequestBuilder::post("/read-chunks?size=65536", &pattern(size));
    server.get("/peak"); // the first request's one-time allocations are not the body's
    let mut report = None;
    let growth = rss_growth(server.pid(), || report = Some(Report::parse(&server.send(&request).body)));
    assert_eq!(report.unwrap().get("total"), size.to_string());
    assert!(growth < BOUNDED_GROWTH, "the worker grew by {growth} bytes reading a {size}-byte body");
}

#[test]
fn a_100_mib_streamed_response_keeps_the_worker_small() {
    let server = Server::start(&[]);
    let size: usize = 100 * 1024 * 1024;
    server.get("/peak");
    let mut received = 0;
    let growth = rss_growth(server.pid(), || {
        let mut conn = server.connect();
        conn.write_all(&RequestBuilder::get(&format!("/stream-bytes?total={size}")).encode()).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = conn.read(&mut buf).expect("read the stream");
            if n == 0 {
                break;
            }
            received += n;
        }
    });
    assert!(received > size, "the head and {size} body bytes (got {received})");
    assert!(growth < BOUNDED_GROWTH, "the worker grew by {growth} bytes streaming {size} bytes");
}

// --- idle connections ------------------------------------------------------------------------------

/// Raises this process's open-file soft limit to `wanted` (the server it starts inherits it).
fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit fill and read a valid rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    assert!(
        limit.rlim_max >= wanted,
        "this test needs {wanted} open files; the hard limit is {}",
        limit.rlim_max
    );
    limit.rlim_cur = limit.rlim_cur.max(wanted);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) }, 0, "raise the soft limit");
}

#[test]
fn good_requests_are_answered_while_1500_connections_sit_silent() {
    const IDLE: usize = 1500;
    raise_fd_limit(IDLE as u64 + 256);
    // One thread, and idle connections that outlast the test: none of them may hold it.
    let server = Server::start(&["--threads", "1", "--socket-timeout", "60"]);
    let idle: Vec<_> = (0..IDLE).map(|_| server.connect()).collect();
    for _ in 0..20 {
        assert_eq!(server.get("/peak").status_line, "HTTP/1.1 200 OK", "log:\n{}", server.log());
    }
    // The silent ones are still open, waiting for their requests: send one and it is served too.
    let mut last = idle.into_iter().last().unwrap();
    last.write_all(&RequestBuilder::get("/peak").encode()).unwrap();
    let response = Response::parse(last.read_to_end_result().expect("a response")).expect("HTTP");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK");
}

// --- concurrency -----------------------------------------------------------------------------------

#[test]
fn threads_run_requests_concurrently() {
    let server = Server::start(&["--threads", "4"]);
    let threads: Vec<String> = thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| server.report("/sleep?ms=5000&until=4").get("thread").to_owned()))
            .collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    });
    assert_eq!(server.report("/peak").get("peak"), "4", "four requests must be inside the app at once");
    let mut distinct = threads.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{threads:?}");
}

#[test]
fn one_thread_serves_one_request_at_a_time() {
    let server = Server::start(&[]);
    thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| server.report("/sleep?ms=50&until=2"));
        }
    });
    assert_eq!(server.report("/peak").get("peak"), "1");
}

// --- startup and shutdown --------------------------------------------------------------------------

fn socket_in(dir: &std::path::Path) -> String {
    dir.join("s.sock").display().to_string()
}

#[test]
fn missing_module_fails_startup_with_one_error_line() {
    let dir = temp_dir();
    let socket = socket_in(&dir);
    let output = run_to_exit(&["--socket", &socket, "--module", "does_not_exist"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("oxwsgi: error: "), "{stderr}");
    assert!(stderr.contains("does_not_exist"), "{stderr}");
    assert!(!std::path::Path::new(&socket).exists(), "no socket may be bound before the app loads");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn import_error_in_the_app_prints_the_traceback_and_fails() {
    let dir = temp_dir();
    let socket = socket_in(&dir);
    let app = app_path("raw_import_error.py").display().to_string();
    let output = run_to_exit(&["--socket", &socket, "--wsgi-file", &app]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Traceback (most recent call last)"), "{stderr}");
    assert!(stderr.contains("ModuleNotFoundError"), "{stderr}");
    assert!(stderr.contains("oxwsgi_test_module_that_does_not_exist"), "{stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("oxwsgi: error: ")).collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(!std::path::Path::new(&socket).exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_or_uncallable_callable_fails_startup() {
    let dir = temp_dir();
    let socket = socket_in(&dir);
    let app = support::pep3333_app().display().to_string();
    for (name, mention) in [("no_such_callable", "no_such_callable"), ("RESULTS", "not callable")] {
        let output = run_to_exit(&["--socket", &socket, "--wsgi-file", &app, "--callable", name]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        let error =
            stderr.lines().find(|l| l.starts_with("oxwsgi: error: ")).unwrap_or_else(|| panic!("{stderr}"));
        assert!(error.contains(mention), "{error}");
    }
    let output = run_to_exit(&["--socket", &socket, "--wsgi-file", "/nonexistent/app.py"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("oxwsgi: error: "));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn buffer_size_over_65535_is_one_error_line() {
    let app = support::pep3333_app().display().to_string();
    let output = run_to_exit(&["--socket", "127.0.0.1:1", "--wsgi-file", &app, "--buffer-size", "70000"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("oxwsgi: error: "), "{stderr}");
    assert!(lines[0].contains("65535"), "{stderr}");
}

#[test]
fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let server = Server::start(&[]);
    let Addr::Unix(path) = server.addr.clone() else { unreachable!() };
    let app = support::pep3333_app().display().to_string();
    let output = run_to_exit(&["--socket", &path.display().to_string(), "--wsgi-file", &app]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("oxwsgi: error: "), "{stderr}");
    assert_still_serving(&server);

    let dir = temp_dir();
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = Server::builder().args(&["--socket", &stale.display().to_string()]).start();
    // Readiness was checked on the server's first socket; the second one is bound just after it.
    let mut conn = (0..support::POLL_TRIES)
        .find_map(|_| {
            let conn = std::os::unix::net::UnixStream::connect(&stale).ok();
            if conn.is_none() {
                std::thread::sleep(support::POLL_INTERVAL);
            }
            conn
        })
        .expect("the stale path was rebound");
    conn.write_all(&[100, 0, 0, 0]).unwrap();
    let mut pong = Vec::new();
    std::io::Read::read_to_end(&mut conn, &mut pong).unwrap();
    assert_eq!(pong, [0x64, 0, 0, 1]);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_exits_zero_and_removes_the_socket_file() {
    let mut server = Server::start(&[]);
    assert_still_serving(&server);
    let Addr::Unix(path) = server.addr.clone() else { unreachable!() };
    assert!(path.exists());
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(!path.exists(), "the socket file must be removed at exit");
}

#[test]
fn sigterm_finishes_the_request_in_flight() {
    let mut server = Server::start(&["--threads", "2"]);
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/sleep?ms=400").encode()).unwrap();
    // Wait until the request is inside the app.
    let mut inside = false;
    for _ in 0..support::POLL_TRIES {
        if server.report("/peak").get("active") == "1" {
            inside = true;
            break;
        }
        thread::sleep(support::POLL_INTERVAL);
    }
    assert!(inside, "the /sleep request never started");
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    let response = Response::parse(conn.read_to_end_result().expect("the in-flight response")).expect("HTTP");
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    assert!(response.body_text().contains("thread: "), "{response:?}");
}

#[test]
fn sigterm_lets_a_slow_close_finish_before_exit() {
    let mut server = Server::start(&[]);
    let marker = server.dir.join("close-marker");
    let response = server.get(&format!("/slow-close?ms=500&marker={}", marker.display()));
    assert_eq!(response.body, b"body before a slow close", "{response:?}");
    // The response is out; the Python thread is now in close(), sleeping before it writes the marker.
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(marker.exists(), "close() was cut short by the exit; log:\n{}", server.log());
}

#[test]
fn sigterm_runs_the_apps_atexit_handlers() {
    let dir = temp_dir();
    let marker = dir.join("atexit-marker");
    let mut server = Server::builder().env("PEP3333_ATEXIT_MARKER", &marker.display().to_string()).start();
    assert_still_serving(&server);
    assert!(!marker.exists(), "atexit ran before the exit");
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(marker.exists(), "the app's atexit handler did not run; log:\n{}", server.log());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn second_sigterm_stops_at_once_with_exit_code_1() {
    let mut server = Server::start(&["--threads", "2"]);
    let mut conn = server.connect();
    conn.write_all(&RequestBuilder::get("/sleep?ms=30000").encode()).unwrap();
    wait_until_inside_the_app(&server);
    server.signal("TERM");
    // The first one is handled (the server now waits for the 30 s request) before the second is sent.
    server.wait_log("SIGTERM received");
    server.signal("TERM");
    let status = server.wait_exit(500);
    assert_eq!(status.code(), Some(1), "log:\n{}", server.log());
    drop(conn);
}

#[test]
fn access_log_has_one_line_per_request_unless_disabled() {
    let server = Server::start(&[]);
    let response = server.get("/peak?x=1");
    // The body's size, whether it went out in the head's buffer (small) or after it (large).
    server.wait_log(&format!("GET /peak?x=1 => 200 ({} bytes)", response.body.len()));
    server.get("/file-send?size=300000");
    server.wait_log("GET /file-send?size=300000 => 200 (300000 bytes)");
    let quiet = Server::start(&["--disable-logging"]);
    quiet.get("/peak?x=2");
    quiet.get("/raise-before");
    quiet.wait_log("raise-before-marker");
    assert!(!quiet.log().contains("/peak?x=2"), "{}", quiet.log());
}

/// Sends `request` and parses the app's report (the answer must be a 200).
fn report_of(server: &Server, request: &RequestBuilder) -> Report {
    let response = server.send(request);
    assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
    Report::parse(&response.body)
}

/// Reads one response whose head declares `Content-Length`, without waiting for the connection to close.
fn read_response_with_length(conn: &mut support::Conn) -> Response {
    let mut raw = conn.read_head();
    let head_len = find(&raw, b"\r\n\r\n").unwrap() + 4;
    let head = Response::parse(raw[..head_len].to_vec()).expect("an HTTP head");
    let length: usize = head.header("Content-Length").expect("Content-Length").parse().unwrap();
    let mut buf = [0u8; 4096];
    while raw.len() < head_len + length {
        let n = conn.read(&mut buf).expect("read the response body");
        assert!(n > 0, "EOF inside the body: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
    Response::parse(raw).expect("an HTTP response")
}

/// Polls the log until `needle` occurs at least `count` times.
fn wait_log_count(server: &Server, needle: &str, count: usize) {
    for _ in 0..support::POLL_TRIES {
        if server.log().matches(needle).count() >= count {
            return;
        }
        thread::sleep(support::POLL_INTERVAL);
    }
    panic!("the log never had {count} x {needle:?}; log:\n{}", server.log());
}

/// Polls /peak until one request is inside the app (the server needs a second thread to answer).
fn wait_until_inside_the_app(server: &Server) {
    for _ in 0..support::POLL_TRIES {
        if server.report("/peak").get("active") == "1" {
            return;
        }
        thread::sleep(support::POLL_INTERVAL);
    }
    panic!("the request never got inside the app; log:\n{}", server.log());
}

/// The resident set size of process `pid`, from /proc.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("a VmRSS line");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmRSS in kB")
}

#[test]
fn the_graceful_timeout_bounds_a_stop_even_when_every_thread_is_busy() {
    let mut server = Server::builder()
        .app(app_path("workers_app.py"))
        .args(&["--threads", "1", "--graceful-timeout", "1"])
        .start();
    let started = temp_dir().join("started");
    // Two 60 s requests hold both connections the one thread takes; the first says when it is running.
    let mut busy: Vec<_> =
        [format!("/sleep?ms=60000&started={}", started.display()), "/sleep?ms=60000".into()]
            .iter()
            .map(|path| {
                let mut conn = server.connect();
                conn.write_all(&RequestBuilder::get(path).encode()).unwrap();
                conn
            })
            .collect();
    for _ in 0..support::POLL_TRIES {
        if started.exists() {
            break;
        }
        thread::sleep(support::POLL_INTERVAL);
    }
    assert!(started.exists(), "the request never reached the app");
    server.signal("TERM");
    // Well before the requests would end: the graceful timeout (1 s) plus the 10 s the Python threads get.
    let status = server.wait_exit(support::POLL_TRIES * 6);
    assert!(status.success(), "{status}");
    busy.clear();
}

#[test]
fn a_tcp_socket_other_hosts_can_reach_is_warned_about_and_loopback_is_not() {
    let exposed = format!("0.0.0.0:{}", support::free_port());
    let server = Server::builder().args(&["--socket", &exposed]).start();
    let log = server.wait_log("has no authentication");
    assert!(log.contains(&format!("--socket {exposed} can be reached from other hosts")), "{log}");
    assert_still_serving(&server);
    let loopback = Server::builder().tcp().start();
    assert_still_serving(&loopback);
    assert!(!loopback.log().contains("has no authentication"), "{}", loopback.log());
}
