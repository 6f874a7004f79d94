//! `--http-socket`: plain HTTP/1.1 for development without nginx and for health probes, served by an
//! in-process gateway in the I/O runtime. It does what nginx does in front of the uwsgi socket: reads the
//! request head (`oxwsgi_proto::http`), de-chunks a chunked body, builds the uwsgi packet nginx would send,
//! and hands the serving threads one end of a socket pair as if it were a connection from nginx. The
//! request then takes exactly the path of any other — environ, app, response writing, harakiri, metrics,
//! access log — and the gateway frames the raw response for a connection that stays open: the app's
//! `Content-Length`, or chunked, or (HTTP/1.0) until close.
//!
//! The cost is a hand-off between threads and a copy of each byte per request: acceptable for probes and
//! development, which is what this socket is for (bench/README.md has its numbers). No pyo3 here.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use oxwsgi_proto::http::{
    chunk_prefix, parse_request, parse_response_head, with_headers, ChunkedDecoder, HttpError, Peer, Request,
    RequestBody, LAST_CHUNK,
};
use oxwsgi_proto::HEADER_LEN;
use socket2::Socket;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tracing::warn;

use super::conn::{bridge, Kind};
use super::front::{Arrival, Front, MAX_ACCEPT_BACKOFF, MIN_ACCEPT_BACKOFF};
use super::log_budget::{left_out, LogBudget};
use super::responder::MAX_DRAIN_BYTES;
use crate::metrics::model::ProtocolErrorKind;

/// Read-ahead for a request head: most are well under 1 KiB, browsers' up to a few.
const READ_AHEAD: usize = 8 * 1024;
/// A chunked request body is read whole before the app starts, so the app gets its `CONTENT_LENGTH`, as
/// nginx gives it (nginx buffers such bodies too): at most this much, or `--limit-post` if lower. Larger
/// uploads can use `Content-Length`, which streams.
pub const CHUNKED_BODY_MAX: u64 = 16 * 1024 * 1024;
/// Bytes a peer must send per `--socket-timeout` while a request head or a chunked body arrives (the floor
/// the uwsgi socket holds bodies to), so a trickling peer cannot hold a task and a descriptor for ever.
const BYTES_PER_TIMEOUT: usize = 64 * 1024;
/// Longest response head the gateway reads back from the serving side (the app's headers; nginx's
/// `uwsgi_buffer_size` default is 4 KiB, so 64 KiB is generous).
const RESPONSE_HEAD_MAX: usize = 64 * 1024;
/// Size of each read of a response body from the serving side, and of a request body from the client.
const RELAY_READ_SIZE: usize = 64 * 1024;
/// Request body bytes written into the socket pair before the request is queued, with the packet: one
/// read by the serving thread then takes the packet and a small body together.
const BODY_WITH_PACKET: usize = 64 * 1024;
/// Connections one worker serves on one HTTP or TLS listener at once; more are turned away at once (503
/// over HTTP). Each holds a task, three or four descriptors and, over HTTP, up to [`CHUNKED_BODY_MAX`] of
/// body; a TLS peer can hold one a whole timeout before it authenticates. The bound keeps a flood of
/// clients from taking the descriptors and memory the uwsgi socket needs.
pub(super) const MAX_CONNECTIONS: usize = 1024;
/// "Over the connection limit" lines logged per second, at most.
pub(super) const BUSY_LOGGED_PER_SECOND: u64 = 1;
/// A head shorter than this is parsed again after every read; a longer one only once its end may be in, so
/// a head sent a byte at a time costs one parse, not one per byte.
const PARSE_EVERY_READ_BELOW: usize = 1024;

/// After a refusal, how long and how much of what the client still sends is read and dropped before the
/// close (see [`refuse`]): enough for a body in flight on a local network, bounded so a refused client
/// cannot keep the task.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1024 * 1024;
const LINGER_READ_SIZE: usize = 16 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\nService Unavailable\n";

/// Accepts on HTTP listener `index` until the graceful stop, each connection served by a task of its own.
pub(super) async fn accept(front: Arc<Front>, index: usize) {
    let listener = match Listener::new(front.listener(index).kind, &front.listener(index).socket) {
        Ok(listener) => listener,
        Err(err) => {
            return warn!("cannot accept on {}: {err}", front.listener(index).spec);
        }
    };
    let mut backoff = MIN_ACCEPT_BACKOFF;
    // Counted while it runs, so the graceful stop waits for what it takes from the queue on the way out.
    let _accepting = super::tls::Accepting::new(&front);
    let mut stopping = false;
    let limit = Limit {
        permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        busy: LogBudget::new(BUSY_LOGGED_PER_SECOND),
    };
    loop {
        let next =
            super::tls::next_accepted(&front, &mut stopping, || listener.accept(&front, index, &limit));
        let Some(accepted) = next.await else { return };
        match accepted {
            Ok(()) => backoff = MIN_ACCEPT_BACKOFF,
            Err(_) if stopping => return,
            Err(err) => {
                front.accept_errors.report(&err, backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn new(kind: Kind, socket: &Socket) -> io::Result<Self> {
        let socket = socket.try_clone()?;
        Ok(match kind {
            Kind::Tcp => Self::Tcp(TcpListener::from_std(socket.into())?),
            Kind::Unix => Self::Unix(UnixListener::from_std(socket.into())?),
        })
    }

    /// Accepts one connection and starts serving it, or answers 503 past [`MAX_CONNECTIONS`].
    async fn accept(&self, front: &Arc<Front>, index: usize, limit: &Limit) -> io::Result<()> {
        match self {
            Self::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                start(stream, Remote::of(peer), front, index, limit);
            }
            Self::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                start(stream, Remote { addr: String::new(), port: String::new() }, front, index, limit);
            }
        }
        Ok(())
    }
}

/// How many connections one listener serves at once, and the log budget for those turned away.
struct Limit {
    permits: Arc<Semaphore>,
    busy: LogBudget,
}

fn start<S>(stream: S, remote: Remote, front: &Arc<Front>, index: usize, limit: &Limit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = Arc::clone(&limit.permits).try_acquire_owned() else {
        if let Some(unlogged) = limit.busy.admit() {
            warn!(
                "HTTP: {MAX_CONNECTIONS} connections already open on {}: answered 503{}",
                front.listener(index).spec,
                left_out(unlogged, "more")
            );
        }
        let wait = front.config.socket_timeout;
        front.spawn(async move {
            let mut stream = stream;
            let _ = write_all(&mut stream, BUSY, wait).await;
        });
        return;
    };
    // Counted from the accept: a graceful stop waits for the request it brings, or for it to leave.
    front.arrival_started();
    front.spawn(serve(stream, remote, Arc::clone(front), index, permit));
}

/// The client's address, as `REMOTE_ADDR` and `REMOTE_PORT` give it (empty over a Unix socket).
struct Remote {
    addr: String,
    port: String,
}

impl Remote {
    fn of(peer: SocketAddr) -> Self {
        Self { addr: peer.ip().to_canonical().to_string(), port: peer.port().to_string() }
    }
}

/// Counts a request the I/O runtime is reading for the graceful stop ([`Front::arrival_started`]) until it
/// is queued or given up.
struct Arriving<'a>(Option<&'a Front>);

impl Arriving<'_> {
    fn done(&mut self) {
        if let Some(front) = self.0.take() {
            front.arrival_done();
        }
    }
}

impl Drop for Arriving<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

/// Why a request was answered by the gateway itself, and the connection closed.
enum Refusal {
    Http(HttpError),
    Chunked(oxwsgi_proto::http::ChunkedError),
    TooLarge {
        length: u64,
        limit: u64,
    },
    /// The packet nginx would send for it does not fit `--buffer-size` or the vars limit.
    PacketTooLarge,
    /// The head or a chunked body did not arrive in time.
    Timeout,
    /// The socket pair to the serving threads could not be made or filled (descriptors or buffers short).
    Unavailable(io::Error),
    Truncated,
    Read(io::Error),
}

impl Refusal {
    fn kind(&self) -> ProtocolErrorKind {
        match self {
            Self::Http(_) | Self::Chunked(_) | Self::PacketTooLarge => ProtocolErrorKind::BadRequest,
            Self::TooLarge { .. } => ProtocolErrorKind::BodyTooLarge,
            Self::Timeout => ProtocolErrorKind::Timeout,
            Self::Truncated => ProtocolErrorKind::Truncated,
            // Neither is the client's fault, but both are I/O that failed before the app.
            Self::Read(_) | Self::Unavailable(_) => ProtocolErrorKind::ReadError,
        }
    }

    /// The status and reason phrase of the answer; `None` when nobody is there to read one.
    fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            Self::Http(err) => Some(match err.status() {
                431 => (431, "Request Header Fields Too Large"),
                501 => (501, "Not Implemented"),
                _ => (400, "Bad Request"),
            }),
            Self::Chunked(_) => Some((400, "Bad Request")),
            Self::PacketTooLarge => Some((431, "Request Header Fields Too Large")),
            Self::TooLarge { .. } => Some((413, "Content Too Large")),
            Self::Timeout => Some((408, "Request Timeout")),
            Self::Unavailable(_) => Some((503, "Service Unavailable")),
            Self::Truncated | Self::Read(_) => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http(err) => write!(f, "{err}"),
            Self::Chunked(err) => write!(f, "bad chunked body: {err}"),
            Self::TooLarge { length, limit } => write!(f, "a body of {length} bytes is over {limit}"),
            Self::PacketTooLarge => {
                f.write_str("the request's vars do not fit --buffer-size (or the vars limit)")
            }
            Self::Timeout => f.write_str("timed out waiting for the request"),
            Self::Unavailable(err) => write!(f, "cannot hand the request to the serving threads: {err}"),
            Self::Truncated => f.write_str("connection closed in the middle of a request"),
            Self::Read(err) => write!(f, "read error: {err}"),
        }
    }
}

/// What the client's side of the connection is: its two halves, and the bytes read ahead.
struct Client<R, W> {
    reader: R,
    writer: W,
    buf: BytesMut,
    wait: Duration,
}

/// Serves one HTTP connection: request after request while both sides keep it open.
async fn serve<S>(stream: S, remote: Remote, front: Arc<Front>, index: usize, _permit: OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let wait = front.config.socket_timeout;
    let mut client = Client { reader, writer, buf: BytesMut::with_capacity(READ_AHEAD), wait };
    let server_port = front.listener(index).info.server_port.clone();
    let peer = Peer { remote_addr: &remote.addr, remote_port: &remote.port, server_port: &server_port };
    // The accept counted the first request.
    let mut arriving = Arriving(Some(&front));
    loop {
        let request = match read_head(&mut client, &peer, &front).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(refusal) => return refuse(&mut client, &front, &refusal).await,
        };
        let served = exchange(&mut client, &request, &front, index, &mut arriving).await;
        match served {
            Ok(true) if !front.is_stopping() => {
                front.arrival_started();
                arriving = Arriving(Some(&front));
            }
            Ok(_) => return,
            Err(refusal) => return refuse(&mut client, &front, &refusal).await,
        }
    }
}

/// Logs and counts `refusal` (within the refusals' budget) and answers it, if anyone is there to read.
async fn refuse<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    client: &mut Client<R, W>,
    front: &Front,
    refusal: &Refusal,
) {
    front.refused(refusal.kind(), &format_args!("HTTP: {refusal}"));
    if let Some((status, reason)) = refusal.status() {
        // The reason is the server's own words (never the request's bytes): safe to show.
        let body = format!("{reason}: {refusal}\n");
        let answer = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = timeout(client.wait, client.writer.write_all(answer.as_bytes())).await;
    }
    let _ = timeout(client.wait, client.writer.shutdown()).await;
    // Closing with unread bytes (a body still coming) would reset the connection, and the client could
    // lose the answer: read and drop what keeps coming for a moment, as nginx's lingering close does.
    let mut scratch = vec![0u8; LINGER_READ_SIZE];
    let linger = async {
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            match client.reader.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(read) => dropped += read,
            }
        }
    };
    let _ = timeout(LINGER_TIME, linger).await;
}

/// Reads the next request head: `None` if the connection closed or stayed idle between requests (or the
/// server is stopping), which ends it without a word.
async fn read_head<R: AsyncRead + Unpin, W>(
    client: &mut Client<R, W>,
    peer: &Peer<'_>,
    front: &Front,
) -> Result<Option<Request>, Refusal> {
    let mut deadline = Deadline::new(client.wait);
    // Bytes already looked at for the head's end: a head that comes a byte at a time is parsed once it is
    // all there, not once per byte.
    let mut scanned = 0;
    loop {
        if may_end_head(&client.buf, scanned) {
            if let Some(request) = parse_request(&client.buf, peer).map_err(Refusal::Http)? {
                client.buf.advance(request.head_len);
                return Ok(Some(request));
            }
        }
        scanned = client.buf.len();
        client.buf.reserve(READ_AHEAD);
        let idle = client.buf.is_empty();
        let read = tokio::select! {
            // A request already sent is read first, even once the stop has begun: it is served.
            biased;
            read = timeout(deadline.left(), client.reader.read_buf(&mut client.buf)) => read,
            // Between requests the connection is idle: a graceful stop closes it at once.
            () = front.stop_requested(), if idle => return Ok(None),
        };
        match read {
            // Closed, or quiet for a whole timeout, between requests: the end of a kept-alive connection.
            Ok(Ok(0)) | Err(_) if idle => return Ok(None),
            Ok(Ok(0)) => return Err(Refusal::Truncated),
            Ok(Ok(read)) => {
                if idle {
                    // The head's own time starts with its first byte, not with the idle wait before it.
                    deadline = Deadline::new(client.wait);
                }
                deadline.received(read);
            }
            Ok(Err(err)) if idle => {
                tracing::debug!("HTTP connection closed between requests: {err}");
                return Ok(None);
            }
            Ok(Err(err)) => return Err(Refusal::Read(err)),
            Err(_) => return Err(Refusal::Timeout),
        }
    }
}

/// Whether `buf` is worth parsing: while it is short, always (so garbage is refused at once, and parsing
/// is cheap); past [`PARSE_EVERY_READ_BELOW`], only once it may hold a whole head (an empty line after the
/// request line) or is long enough to be refused. `scanned` bytes were looked at before.
fn may_end_head(buf: &[u8], scanned: usize) -> bool {
    let from = scanned.saturating_sub(3);
    (!buf.is_empty() && buf.len() < PARSE_EVERY_READ_BELOW)
        || buf.len() >= oxwsgi_proto::http::MAX_REQUEST_HEAD
        || buf[from..].windows(2).any(|pair| pair == b"\n\n")
        || buf[from..].windows(3).any(|triple| triple == b"\n\r\n")
}

/// One request: its body read (chunked) or forwarded as it comes (`Content-Length`), the serving threads
/// given the packet, the response relayed. `Ok(true)` if the connection can carry another request.
async fn exchange<R, W>(
    client: &mut Client<R, W>,
    request: &Request,
    front: &Front,
    index: usize,
    arriving: &mut Arriving<'_>,
) -> Result<bool, Refusal>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let accepted_at = Instant::now();
    front.request_started();
    let limit = front.config.limit_post;
    if let RequestBody::Length(length) = request.body {
        // Before `100 Continue`: a client told to go ahead would send a body only to be refused.
        if let Some(limit) = limit.filter(|&limit| length > limit) {
            return Err(Refusal::TooLarge { length, limit });
        }
    }
    if request.expect_continue && needs_more_body(request, client.buf.len()) {
        write(client, CONTINUE).await.map_err(Refusal::Read)?;
    }
    let (content_length, mut body) = match request.body {
        RequestBody::None => (None, Vec::new()),
        RequestBody::Length(length) => {
            let ready = usize::try_from(length).unwrap_or(usize::MAX).min(client.buf.len());
            (Some(length), client.buf.split_to(ready).to_vec())
        }
        RequestBody::Chunked => {
            let limit = limit.map_or(CHUNKED_BODY_MAX, |limit| limit.min(CHUNKED_BODY_MAX));
            let body = read_chunked(client, limit).await?;
            (Some(body.len() as u64), body)
        }
    };
    let mut packet = request.packet(content_length).map_err(|_| Refusal::PacketTooLarge)?;
    let limits = &front.config.limits;
    if packet.len() - HEADER_LEN > usize::from(limits.max_datasize)
        || request.vars().count() + 1 > limits.max_vars
    {
        return Err(Refusal::PacketTooLarge);
    }
    // The packet and the start of the body go in before the request is queued, so the serving thread
    // that takes it finds them there; a socket pair's buffer holds both.
    let first = body.len().min(BODY_WITH_PACKET);
    packet.extend_from_slice(&body[..first]);
    body.drain(..first);
    let aborted = Arc::new(AtomicBool::new(false));
    let (served, mut gateway) = bridge(Arc::clone(&aborted)).map_err(Refusal::Unavailable)?;
    // Nobody reads the pair before the request is queued: the write must fit its buffer (a socket pair's
    // default holds 208 KiB), or it is given up rather than waited on for ever.
    match timeout(client.wait, gateway.write_all(&packet)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(Refusal::Unavailable(err)),
        Err(_) => {
            let full = io::Error::new(io::ErrorKind::WouldBlock, "the socket pair's buffer is too small");
            return Err(Refusal::Unavailable(full));
        }
    }
    drop(packet);
    front.queue_connection(Arrival {
        conn: served,
        listener: index,
        accepted_at,
        in_flight: front.metrics.in_flight(),
    });
    arriving.done();

    let (from_app, to_app) = gateway.split();
    // What the client has still to send of a body of declared length (the rest came with the head).
    let still_to_come = match request.body {
        RequestBody::Length(length) => length - (first + body.len()) as u64,
        RequestBody::None | RequestBody::Chunked => 0,
    };
    let wait = client.wait;
    let forward = forward_body(to_app, body, &mut client.reader, still_to_come, wait);
    let relay = relay_response(from_app, &mut client.writer, request, &aborted, wait, front);
    let (forwarded, relayed) = tokio::join!(forward, relay);
    Ok(relayed && forwarded)
}

/// Whether the body has not all arrived with the head (so a client that sent `Expect: 100-continue` waits
/// for the answer before sending it).
fn needs_more_body(request: &Request, buffered: usize) -> bool {
    match request.body {
        RequestBody::None => false,
        RequestBody::Length(length) => length > buffered as u64,
        RequestBody::Chunked => true,
    }
}

/// Reads and decodes a whole chunked body of at most `limit` bytes.
async fn read_chunked<R: AsyncRead + Unpin, W>(
    client: &mut Client<R, W>,
    limit: u64,
) -> Result<Vec<u8>, Refusal> {
    let mut decoder = ChunkedDecoder::default();
    let mut body = Vec::new();
    let mut deadline = Deadline::new(client.wait);
    loop {
        let used = decoder.decode(&client.buf, &mut body).map_err(Refusal::Chunked)?;
        client.buf.advance(used);
        if body.len() as u64 > limit {
            return Err(Refusal::TooLarge { length: body.len() as u64, limit });
        }
        if decoder.is_done() {
            return Ok(body);
        }
        client.buf.reserve(RELAY_READ_SIZE);
        match timeout(deadline.left(), client.reader.read_buf(&mut client.buf)).await {
            Ok(Ok(0)) => return Err(Refusal::Truncated),
            Ok(Ok(read)) => deadline.received(read),
            Ok(Err(err)) => return Err(Refusal::Read(err)),
            Err(_) => return Err(Refusal::Timeout),
        }
    }
}

/// Writes the rest of the request body to the serving side: `ready` (read already), then `still_to_come`
/// bytes from the client as they arrive. If the serving side stops reading (the app answered without the
/// body and the drain gave up), the rest is read and dropped, so the connection stays framed. `false` if
/// the client's body did not all arrive: the connection cannot carry another request.
async fn forward_body<A, R>(
    mut to_app: A,
    ready: Vec<u8>,
    client: &mut R,
    still_to_come: u64,
    wait: Duration,
) -> bool
where
    A: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    // Writes to the app wait as long as the app takes to read (its time is bounded by harakiri, as behind
    // nginx, which buffers the body); they fail only when the serving side closed the pair.
    let mut app_reads = ready.is_empty() || to_app.write_all(&ready).await.is_ok();
    drop(ready);
    let mut left = still_to_come;
    let mut scratch = vec![0u8; RELAY_READ_SIZE.min(usize::try_from(left).unwrap_or(usize::MAX))];
    let mut dropped = 0;
    let mut deadline = Deadline::new(wait);
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(scratch.len());
        // One timeout per 64 KiB from the client, as for the head: a body dripped a byte at a time does
        // not hold the connection for ever.
        let read = match timeout(deadline.left(), client.read(&mut scratch[..want])).await {
            Ok(Ok(read)) if read > 0 => read,
            // The client left or stalled mid-body: the serving side sees the body end early.
            _ => {
                let _ = to_app.shutdown().await;
                return false;
            }
        };
        deadline.received(read);
        left -= read as u64;
        if app_reads {
            app_reads = to_app.write_all(&scratch[..read]).await.is_ok();
        } else {
            dropped += read as u64;
            if dropped > MAX_DRAIN_BYTES {
                return false;
            }
        }
    }
    true
}

/// How the response body reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes (the app's `Content-Length`; 0 when the response has no body).
    Length(u64),
    /// No length known: chunked, for an HTTP/1.1 client.
    Chunked,
    /// No length known, HTTP/1.0: the body ends when the connection closes.
    UntilClose,
}

/// Relays the serving side's response to the client, framed for a connection that may stay open. `true`
/// if it was complete and the connection can carry another request.
async fn relay_response<A, W>(
    mut from_app: A,
    client: &mut W,
    request: &Request,
    aborted: &AtomicBool,
    wait: Duration,
    front: &Front,
) -> bool
where
    A: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_AHEAD);
    let head = loop {
        match parse_response_head(&buf) {
            Ok(Some(head)) => break head,
            Ok(None) if buf.len() < RESPONSE_HEAD_MAX => {}
            _ => {
                warn!("HTTP: the response head could not be read back (over {RESPONSE_HEAD_MAX} bytes or 100 headers); answered 502");
                let _ = write_all(client, BAD_GATEWAY, wait).await;
                return false;
            }
        }
        // The app's own time is bounded by harakiri, not here: wait as long as the serving side does.
        buf.reserve(READ_AHEAD);
        match from_app.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                // The serving side closed without a response: it refused the packet or its worker died.
                let _ = write_all(client, BAD_GATEWAY, wait).await;
                return false;
            }
            Ok(_) => {}
        }
    };
    let framing = match head.content_length {
        _ if !head.has_body(request.head_only) => Framing::Length(0),
        Some(length) => Framing::Length(length),
        None if request.http11 => Framing::Chunked,
        None => Framing::UntilClose,
    };
    // Sampled once the app has answered: a stop that began while it ran closes the connection after it.
    let keep_alive = request.keep_alive && framing != Framing::UntilClose && !front.is_stopping();
    let mut extra = String::new();
    if framing == Framing::Chunked {
        extra.push_str("Transfer-Encoding: chunked\r\n");
    }
    if !keep_alive {
        extra.push_str("Connection: close\r\n");
    } else if !request.http11 {
        extra.push_str("Connection: keep-alive\r\n");
    }
    let head_bytes = with_headers(&buf[..head.head_len], extra.as_bytes());
    buf.advance(head.head_len);
    if write_all(client, &head_bytes, wait).await.is_err() {
        return false;
    }
    let complete = match framing {
        Framing::Length(length) => relay_length(&mut from_app, client, buf, length, wait).await,
        Framing::Chunked | Framing::UntilClose => {
            relay_until_end(&mut from_app, client, buf, framing == Framing::Chunked, wait).await
                && !aborted.load(Ordering::Acquire)
        }
    };
    if framing == Framing::Chunked && complete && write_all(client, LAST_CHUNK, wait).await.is_err() {
        return false;
    }
    complete && keep_alive
}

const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 12\r\nConnection: close\r\n\r\nBad Gateway\n";

/// Relays exactly `length` body bytes (`first` already read). `false` if the serving side ended early
/// (the app failed mid-response) or the client went away.
async fn relay_length<A, W>(
    from_app: &mut A,
    client: &mut W,
    mut first: BytesMut,
    length: u64,
    wait: Duration,
) -> bool
where
    A: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut left = length;
    first.truncate(usize::try_from(left).unwrap_or(usize::MAX));
    if !first.is_empty() {
        if write_all(client, &first, wait).await.is_err() {
            return false;
        }
        left -= first.len() as u64;
    }
    let mut scratch = vec![0u8; RELAY_READ_SIZE.min(usize::try_from(left).unwrap_or(usize::MAX))];
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(scratch.len());
        let read = match from_app.read(&mut scratch[..want]).await {
            Ok(read) if read > 0 => read,
            _ => return false,
        };
        if write_all(client, &scratch[..read], wait).await.is_err() {
            return false;
        }
        left -= read as u64;
    }
    true
}

/// Relays the body until the serving side closes, chunk-encoded if `chunked`. `false` if the client went
/// away.
async fn relay_until_end<A, W>(
    from_app: &mut A,
    client: &mut W,
    first: BytesMut,
    chunked: bool,
    wait: Duration,
) -> bool
where
    A: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let send = |data: &[u8]| {
        let mut out = Vec::with_capacity(data.len() + 12);
        if chunked {
            out.extend_from_slice(chunk_prefix(data.len()).as_bytes());
        }
        out.extend_from_slice(data);
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        out
    };
    if !first.is_empty() && write_all(client, &send(&first), wait).await.is_err() {
        return false;
    }
    let mut scratch = vec![0u8; RELAY_READ_SIZE];
    loop {
        match from_app.read(&mut scratch).await {
            Ok(0) => return true,
            Ok(read) => {
                if write_all(client, &send(&scratch[..read]), wait).await.is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

async fn write<R, W: AsyncWrite + Unpin>(client: &mut Client<R, W>, bytes: &[u8]) -> io::Result<()> {
    write_all(&mut client.writer, bytes, client.wait).await
}

/// Writes all of `bytes` to the client, each write within `wait`.
async fn write_all<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8], wait: Duration) -> io::Result<()> {
    timeout(wait, writer.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out writing the response"))?
}

/// The time a peer has left to send what it is sending: one `--socket-timeout`, renewed for every
/// [`BYTES_PER_TIMEOUT`] that arrive.
struct Deadline {
    wait: Duration,
    at: Instant,
    since_renewal: usize,
}

impl Deadline {
    fn new(wait: Duration) -> Self {
        Self { wait, at: Instant::now() + wait, since_renewal: 0 }
    }

    fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    fn received(&mut self, bytes: usize) {
        self.since_renewal += bytes;
        if self.since_renewal >= BYTES_PER_TIMEOUT {
            self.since_renewal = 0;
            self.at = Instant::now() + self.wait;
        }
    }
}
