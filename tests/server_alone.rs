//! The server on its own, without Python: a handler thread written here takes requests from the serving
//! front and answers them, as the WSGI pool does, so the framing, the body, draining, refusals and pings
//! are tested fast and apart from the interpreter. (The same behaviours through the real binary and real
//! apps are in `tests/server.rs`.)

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use oxwsgi::config::{ServerConfig, SocketSpec};
use oxwsgi::metrics::Recorder;
use oxwsgi::server::{self, Front, Job, Request};
use oxwsgi_proto::Limits;
use support::{temp_dir, RequestBuilder};

/// Client reads give up after this long, so a server that hangs fails the test instead of blocking it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// A front on a Unix socket in a temporary directory, its I/O runtime on one thread and one handler
/// thread; stopped (and checked to stop) when dropped.
struct Alone {
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Alone {
    fn start() -> Self {
        let path = temp_dir().join("alone.sock");
        let config = ServerConfig {
            limits: Limits::default(),
            limit_post: Some(4 * 1024 * 1024),
            socket_timeout: Duration::from_secs(2),
            listen_backlog: 64,
            chmod_socket: None,
            chown_socket: None,
            access_log: false,
            access_log_format: oxwsgi::config::LogFormat::Text,
            worker_id: None,
            graceful_timeout: Duration::from_secs(5),
            vacuum: true,
            max_requests: None,
        };
        let socket =
            server::bind(&SocketSpec::Unix(path.clone()), server::Protocol::Uwsgi, &config).expect("bind");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let front = Front::new(
            vec![socket],
            config,
            &[],
            Recorder::disabled(),
            runtime.handle().clone(),
            Box::new(|| {}),
        )
        .expect("the front");
        let mut acceptor = front.acceptor().expect("an acceptor");
        let handler = thread::spawn(move || {
            while let Some(job) = acceptor.next_job() {
                if let Job::Request(request) = job {
                    answer(request);
                }
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let io = thread::spawn(move || {
            let front: Arc<Front> = front;
            runtime
                .block_on(server::run(&front, async { drop(stopped.await) }, || {}))
                .expect("the server runs");
        });
        Self { path, stop: Some(stop), threads: vec![handler, io] }
    }

    /// Sends `bytes` and reads until the server closes the connection.
    fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let mut conn = self.connect();
        conn.write_all(bytes).unwrap();
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply).expect("the server closes after its reply");
        reply
    }

    fn connect(&self) -> UnixStream {
        let conn = UnixStream::connect(&self.path).expect("connect");
        conn.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        conn
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let joined = thread.join();
            assert!(joined.is_ok() || thread::panicking(), "a server thread panicked");
        }
    }
}

/// The handler: `/echo` answers the method, path and every body byte it reads; `/ignore` answers without
/// reading the body (which the server must then drain before closing).
fn answer(mut request: Request) {
    let path = request.head.vars().find(|(key, _)| *key == b"PATH_INFO").map(|(_, value)| value.to_vec());
    let mut out = format!("{} ", request.head.line).into_bytes();
    if path.as_deref() == Some(b"/echo") {
        loop {
            match request.body.fill() {
                Ok(true) => {
                    let buffered = request.body.buffered();
                    out.extend_from_slice(buffered);
                    buffered.clear();
                }
                Ok(false) => break,
                Err(err) => {
                    out.extend_from_slice(format!("body failed: {err}").as_bytes());
                    break;
                }
            }
        }
    }
    let unread = request.body.end();
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", out.len());
    request.responder.set_status(200);
    if request.responder.send_last(head.as_bytes(), 0, &[Bytes::from(out)]).is_ok() {
        request.responder.finish(unread);
    }
}

fn body_of(reply: &[u8]) -> &[u8] {
    let at = reply.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP head") + 4;
    &reply[at..]
}

#[test]
fn a_request_is_answered_and_its_body_read() {
    let alone = Alone::start();
    let reply = alone.exchange(&RequestBuilder::get("/echo").encode());
    assert!(reply.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&reply));
    assert_eq!(body_of(&reply), b"GET /echo ");
    let body: Vec<u8> = (0..200_000u32).map(|i| b"abcdefghij"[(i % 10) as usize]).collect();
    let reply = alone.exchange(&RequestBuilder::post("/echo", &body).encode());
    assert_eq!(&body_of(&reply)[..b"POST /echo ".len()], b"POST /echo ");
    assert_eq!(&body_of(&reply)[b"POST /echo ".len()..], &body[..], "every body byte, in order");
}

#[test]
fn a_request_in_pieces_is_put_together() {
    let alone = Alone::start();
    let request = RequestBuilder::post("/echo", b"pieces of a body").encode();
    let mut conn = alone.connect();
    for piece in request.chunks(7) {
        conn.write_all(piece).unwrap();
        conn.flush().unwrap();
    }
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).unwrap();
    assert_eq!(body_of(&reply), b"POST /echo pieces of a body");
}

#[test]
fn an_unread_body_is_drained_so_the_answer_arrives_whole() {
    let alone = Alone::start();
    let body = vec![b'x'; 1024 * 1024];
    let reply = alone.exchange(&RequestBuilder::post("/ignore", &body).encode());
    assert_eq!(body_of(&reply), b"POST /ignore ");
}

#[test]
fn refusals_and_pings_leave_the_server_serving() {
    let alone = Alone::start();
    // Plain HTTP: 400 with the fix.
    let reply = alone.exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(reply.starts_with(b"HTTP/1.1 400 "), "{}", String::from_utf8_lossy(&reply));
    // A record with an empty key: closed without a reply.
    let mut empty_key = vec![0, 0, 0, 0];
    empty_key.extend_from_slice(b"\x0e\x00REQUEST_METHOD\x03\x00GET\x00\x00\x01\x00x");
    let datasize = u16::try_from(empty_key.len() - 4).unwrap();
    empty_key[1..3].copy_from_slice(&datasize.to_le_bytes());
    assert!(alone.exchange(&empty_key).is_empty());
    // A body over --limit-post: 413 (the body never comes: our side closes, so the drain ends at once).
    let over = RequestBuilder::post("/echo", b"").set("CONTENT_LENGTH", b"5000000");
    let mut conn = alone.connect();
    conn.write_all(&over.packet()).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply).unwrap();
    assert!(reply.starts_with(b"HTTP/1.1 413 "), "{}", String::from_utf8_lossy(&reply));
    // A ping: the pong.
    assert_eq!(alone.exchange(&[100, 0, 0, 0]), [100, 0, 0, 1]);
    // And the next request is served.
    assert_eq!(body_of(&alone.exchange(&RequestBuilder::get("/echo").encode())), b"GET /echo ");
}
