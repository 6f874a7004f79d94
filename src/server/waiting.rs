//! The I/O runtime's side: connections that would make a serving thread wait. A packet (or a small body)
//! that has not fully arrived is read here and the request queued for the serving threads; a response the
//! socket did not take at once is written from here; an unread body is drained here. Connections turned
//! away before the app (malformed packets, pings, plain HTTP, over-long bodies) are answered here too.
//!
//! Every way a connection can go wrong before the app is logged here, once. No pyo3 here.

use std::fmt;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use oxwsgi_proto::body::BodyFraming;
use oxwsgi_proto::{parse_header, ProtocolError, HEADER_LEN, MODIFIER_PING, MODIFIER_WSGI};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tracing::{trace, warn};

use super::conn::{sendfile, Conn, TokioStream};
use super::front::{Arrival, Front};
use super::request::{frame, Body, Framing, FramingError, BUFFERED_BODY_MAX};
use super::responder::{advance, End, Part, Record, DRAIN_READ_SIZE, MAX_DRAIN_BYTES, MAX_IOVECS};
use crate::metrics::model::ProtocolErrorKind;

/// Read-ahead for a connection that arrives here before its request: nginx's packets for ordinary requests
/// are 1-3 KiB, so one read takes the header, the vars and a small body together.
const READ_AHEAD: usize = 8 * 1024;

const PLAIN_HTTP_REPLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 108\r\n\r\nThis socket speaks the uwsgi protocol: point nginx at it with uwsgi_pass, or serve HTTP with --http-socket.\n";
const BAD_REQUEST_REPLY: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nBad Request\n";
const TOO_LARGE_REPLY: &[u8] = b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain\r\nContent-Length: 25\r\n\r\nRequest Entity Too Large\n";

/// A connected stream the runtime serves, and how to abort it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Makes the coming close an error for nginx rather than the end of a complete response.
    fn abort(&self);
    /// `sendfile(2)` once the socket is writable.
    async fn sendfile(&self, file: &std::fs::File, offset: &mut u64, count: usize) -> io::Result<usize>;
    fn into_conn(self) -> io::Result<Conn>;
}

impl Stream for TcpStream {
    fn abort(&self) {
        // A zero linger makes close() send RST: see `Conn::abort`.
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }

    async fn sendfile(&self, file: &std::fs::File, offset: &mut u64, count: usize) -> io::Result<usize> {
        use std::os::fd::AsFd;
        self.async_io(tokio::io::Interest::WRITABLE, || sendfile(self.as_fd(), file.as_fd(), offset, count))
            .await
    }

    fn into_conn(self) -> io::Result<Conn> {
        Conn::from_tokio(TokioStream::Tcp(self))
    }
}

impl Stream for UnixStream {
    fn abort(&self) {
        // AF_UNIX has no reset; with Content-Length nginx detects the short body, without it it cannot.
    }

    async fn sendfile(&self, file: &std::fs::File, offset: &mut u64, count: usize) -> io::Result<usize> {
        use std::os::fd::AsFd;
        self.async_io(tokio::io::Interest::WRITABLE, || sendfile(self.as_fd(), file.as_fd(), offset, count))
            .await
    }

    fn into_conn(self) -> io::Result<Conn> {
        Conn::from_tokio(TokioStream::Unix(self))
    }
}

/// Runs `$body` with `$stream` bound to the connection as a tokio stream of its own type, or `$failed`
/// with the error if the connection cannot be registered with the runtime.
macro_rules! with_stream {
    ($conn:expr, |$stream:ident| $body:expr, |$err:ident| $failed:expr) => {
        match $conn.into_tokio() {
            Ok(TokioStream::Tcp($stream)) => $body,
            Ok(TokioStream::Unix($stream)) => $body,
            Err($err) => $failed,
        }
    };
}

/// What came in before the body.
enum Incoming {
    /// Connected and closed without a byte (port probes, health checks).
    Nothing,
    Ping,
    Request(Framing),
}

/// Why a connection was turned away before its request reached the app.
#[derive(Debug)]
enum Refused {
    Io(io::Error),
    Timeout { received: usize },
    Truncated { received: usize },
    Protocol(ProtocolError),
    Modifier(u8),
    PlainHttp,
    BadRequest(&'static str),
    BodyTooLarge { length: u64, limit: u64 },
}

impl From<FramingError> for Refused {
    fn from(err: FramingError) -> Self {
        match err {
            FramingError::Protocol(err) => Self::Protocol(err),
            FramingError::BadRequest(why) => Self::BadRequest(why),
            FramingError::BodyTooLarge { length, limit } => Self::BodyTooLarge { length, limit },
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(err) => write!(f, "read error: {err}"),
            Self::Timeout { received } => {
                write!(f, "timed out waiting for the request after {received} bytes")
            }
            Self::Truncated { received } => {
                write!(f, "connection closed after {received} bytes of a request")
            }
            Self::Protocol(err) => write!(f, "invalid uwsgi packet: {err}"),
            Self::Modifier(m) => write!(f, "unsupported uwsgi modifier1 {m} (only 0 = WSGI and 100 = ping)"),
            Self::PlainHttp => {
                f.write_str("plain HTTP sent to the uwsgi socket (use uwsgi_pass, not proxy_pass)")
            }
            Self::BadRequest(why) => write!(f, "bad request: {why}"),
            Self::BodyTooLarge { length, limit } => {
                write!(f, "CONTENT_LENGTH {length} is over --limit-post {limit}")
            }
        }
    }
}

impl Refused {
    /// How the metrics count it.
    fn kind(&self) -> ProtocolErrorKind {
        match self {
            Self::Io(_) => ProtocolErrorKind::ReadError,
            Self::Timeout { .. } => ProtocolErrorKind::Timeout,
            Self::Truncated { .. } => ProtocolErrorKind::Truncated,
            Self::Protocol(error) => ProtocolErrorKind::from(*error),
            Self::Modifier(_) => ProtocolErrorKind::UnsupportedModifier,
            Self::PlainHttp => ProtocolErrorKind::PlainHttp,
            Self::BadRequest(_) => ProtocolErrorKind::BadRequest,
            Self::BodyTooLarge { .. } => ProtocolErrorKind::BodyTooLarge,
        }
    }

    /// The answer nginx gets, if any; a packet that cannot be framed gets none.
    fn reply(&self) -> Option<&'static [u8]> {
        match self {
            Self::PlainHttp => Some(PLAIN_HTTP_REPLY),
            Self::BadRequest(_) => Some(BAD_REQUEST_REPLY),
            Self::BodyTooLarge { .. } => Some(TOO_LARGE_REPLY),
            _ => None,
        }
    }
}

/// A connection a serving thread accepted before its request (or its small body) had fully arrived:
/// waits for it here, then queues the request for the serving threads. `buf` holds what was read so far.
pub(super) async fn read_then_queue(arrival: Arrival, buf: BytesMut, front: Arc<Front>) {
    let Arrival { conn, listener, accepted_at, in_flight } = arrival;
    // The gateway's abort flag does not survive the trip through the runtime's stream types: it is kept here.
    let aborted = conn.abort_flag();
    with_stream!(
        conn,
        |stream| {
            let arrival = Arrival { conn: aborted, listener, accepted_at, in_flight };
            read_request_then_queue(stream, buf, arrival, &front).await;
        },
        |err| warn!("refused a connection: cannot register it with the I/O runtime: {err}")
    );
    front.arrival_done();
}

async fn read_request_then_queue<S: Stream>(
    mut stream: S,
    mut buf: BytesMut,
    arrival: Arrival<Option<Arc<AtomicBool>>>,
    front: &Arc<Front>,
) {
    let config = &front.config;
    // Room for what usually comes in one read: tokio would otherwise read into whatever is left (64 bytes
    // at a time for an empty buffer), and a refused packet would be answered with its tail still unread,
    // which resets the connection.
    buf.reserve(READ_AHEAD);
    let framing = match read_request(&mut stream, &mut buf, front).await {
        Ok(Incoming::Nothing) => return,
        Ok(Incoming::Ping) => {
            let _ = write_all(
                &mut stream,
                vec![Bytes::copy_from_slice(&oxwsgi_proto::pong())],
                config.socket_timeout,
            )
            .await;
            return;
        }
        Ok(Incoming::Request(framing)) => framing,
        Err((refused, unread)) => {
            front.refused(refused.kind(), &refused);
            if let Some(reply) = refused.reply() {
                if write_all(&mut stream, vec![Bytes::from_static(reply)], config.socket_timeout)
                    .await
                    .is_ok()
                {
                    drain(&mut stream, unread, config.socket_timeout).await;
                }
            }
            return;
        }
    };
    let mut body = BodyFraming::new(framing.content_length);
    body.take(buf.len() - framing.packet_len);
    let mut failure = None;
    if !body.is_complete() && body.remaining() <= BUFFERED_BODY_MAX {
        // Small enough to hold: read it all now, so no Python thread waits for it.
        buf.reserve(body.read_size(usize::MAX)); // room for the rest of the body, no more
                                                 // At most 64 KiB, all within one timeout: the floor a body read on a Python thread is held to.
        let deadline = Instant::now() + config.socket_timeout;
        while !body.is_complete() {
            let left = deadline.saturating_duration_since(Instant::now());
            failure = match read_more(&mut stream, &mut buf, left).await {
                Ok(0) => Some((
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed before the whole body arrived",
                )),
                Ok(read) => {
                    body.take(read);
                    continue;
                }
                Err(Refused::Timeout { .. }) => {
                    Some((io::ErrorKind::TimedOut, "timed out waiting for the request body"))
                }
                Err(_) => Some((io::ErrorKind::Other, "error reading the request body")),
            };
            break;
        }
    }
    let conn = match stream.into_conn() {
        Ok(conn) => conn.with_abort_flag(arrival.conn),
        Err(err) => return warn!("cannot take a connection back from the I/O runtime: {err}"),
    };
    let arrival = Arrival {
        conn,
        listener: arrival.listener,
        accepted_at: arrival.accepted_at,
        in_flight: arrival.in_flight,
    };
    let request = front.request(arrival, &mut buf, framing, |received, unread, conn| match failure {
        Some((kind, why)) => Body::failed(received, unread, kind, why),
        None if unread == 0 => Body::complete(received),
        None => Body::streaming(received, unread, Arc::clone(conn), config.socket_timeout),
    });
    front.queue_request(request);
}

/// Reads up to the end of the vars block. `Err` carries how many body bytes are still unread, to drain
/// after a reply.
async fn read_request<S: Stream>(
    reader: &mut S,
    buf: &mut BytesMut,
    front: &Front,
) -> Result<Incoming, (Refused, u64)> {
    let config = &front.config;
    let refuse = |refused| (refused, 0);
    // The whole packet within one timeout, not one timeout per arrival: nginx writes it at once, and a
    // peer trickling a byte at a time would otherwise keep a task and a descriptor as long as it likes.
    let deadline = Instant::now() + config.socket_timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let header = loop {
        if let Some(header) = parse_header(buf).map_err(|e| refuse(Refused::Protocol(e)))? {
            break header;
        }
        if read_more(reader, buf, left()).await.map_err(refuse)? == 0 {
            return if buf.is_empty() {
                Ok(Incoming::Nothing)
            } else {
                Err(refuse(Refused::Truncated { received: buf.len() }))
            };
        }
    };
    match header.modifier1 {
        MODIFIER_WSGI => {}
        MODIFIER_PING if header.datasize == 0 => return Ok(Incoming::Ping),
        first if first.is_ascii_uppercase() => {
            // Every HTTP method starts with an uppercase letter, which no request modifier is.
            while buf.len() < 8 && read_more(reader, buf, left()).await.is_ok_and(|n| n > 0) {}
            let refused = if oxwsgi_proto::looks_like_http(buf) {
                Refused::PlainHttp
            } else {
                Refused::Modifier(first)
            };
            return Err(refuse(refused));
        }
        other => return Err(refuse(Refused::Modifier(other))),
    }
    loop {
        match frame(buf, &config.limits, config.limit_post) {
            Ok(Some(framing)) => return Ok(Incoming::Request(framing)),
            Ok(None) => {}
            Err(FramingError::BodyTooLarge { length, limit }) => {
                let mut body = BodyFraming::new(length);
                body.take(buf.len() - (HEADER_LEN + usize::from(header.datasize)));
                return Err((Refused::BodyTooLarge { length, limit }, body.remaining()));
            }
            Err(err) => return Err(refuse(err.into())),
        }
        buf.reserve(HEADER_LEN + usize::from(header.datasize) - buf.len());
        if read_more(reader, buf, left()).await.map_err(refuse)? == 0 {
            return Err(refuse(Refused::Truncated { received: buf.len() }));
        }
    }
}

/// Traces how much of a request that did not come in one piece has arrived, each time more does (off
/// unless `OXWSGI_LOG` asks for `oxwsgi::server::arrival=trace`): tests use it to know that the server
/// read each piece they sent on its own.
pub(super) fn arriving(received: usize) {
    trace!(target: "oxwsgi::server::arrival", received, "request arriving");
}

async fn read_more<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    wait: Duration,
) -> Result<usize, Refused> {
    match timeout(wait, reader.read_buf(buf)).await {
        Ok(Ok(n)) => {
            if n > 0 {
                arriving(buf.len());
            }
            Ok(n)
        }
        Ok(Err(err)) => Err(Refused::Io(err)),
        Err(_) => Err(Refused::Timeout { received: buf.len() }),
    }
}

/// A response the socket did not take at once: writes `first`, then what follows through `parts` until
/// its end marker, then drains the unread body and closes. A channel closed without the marker aborts the
/// connection (the app failed after bytes were sent).
pub(super) async fn write_rest(
    conn: Conn,
    first: Part,
    parts: mpsc::Receiver<Part>,
    record: Record,
    front: Arc<Front>,
) {
    let wait = front.config.socket_timeout;
    let aborted = conn.abort_flag();
    with_stream!(
        conn,
        |stream| {
            let (end, record) = write_parts(stream, first, parts, record, wait).await;
            if let (End::Aborted | End::WriteFailed(_), Some(aborted)) = (&end, aborted) {
                aborted.store(true, Ordering::Release);
            }
            record.done(&front, &end);
        },
        |err| record.done(&front, &End::WriteFailed(err))
    );
}

async fn write_parts<S: Stream>(
    mut stream: S,
    first: Part,
    mut parts: mpsc::Receiver<Part>,
    mut record: Record,
    wait: Duration,
) -> (End, Record) {
    let mut next = Some(first);
    loop {
        let part = if let Some(part) = next.take() {
            part
        } else if let Some(part) = parts.recv().await {
            record.count(&part);
            part
        } else {
            stream.abort();
            return (End::Aborted, record);
        };
        let written = match part {
            Part::Bytes(bytes) => write_all(&mut stream, bytes, wait).await,
            Part::File { head, file, offset, len } => match write_all(&mut stream, vec![head], wait).await {
                Ok(()) => send_file(&stream, &file, offset, len, wait).await,
                Err(err) => Err(err),
            },
            Part::End { unread } => {
                drain(&mut stream, unread, wait).await;
                return (End::Complete, record);
            }
        };
        if let Err(err) = written {
            // Cut short: a reset, never a close that looks like the end of the response.
            stream.abort();
            return (End::WriteFailed(err), record);
        }
    }
}

async fn send_file<S: Stream>(
    stream: &S,
    file: &std::fs::File,
    mut offset: u64,
    len: u64,
    wait: Duration,
) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let count = usize::try_from(end - offset).unwrap_or(usize::MAX);
        let sent = timeout(wait, stream.sendfile(file, &mut offset, count))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out writing the response"))??;
        if sent == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while being sent"));
        }
    }
    Ok(())
}

/// Reads and discards what is left of an unread request body, then closes.
pub(super) async fn drain_then_close(conn: Conn, unread: u64, wait: Duration) {
    with_stream!(
        conn,
        |stream| {
            let mut stream = stream;
            drain(&mut stream, unread, wait).await;
        },
        |err| warn!(
            "cannot drain a request body: cannot register the connection with the I/O runtime: {err}"
        )
    );
}

/// Reads and discards up to `unread` bytes (at most [`MAX_DRAIN_BYTES`], each read within `wait`).
async fn drain<R: AsyncRead + Unpin>(reader: &mut R, unread: u64, wait: Duration) {
    let mut limited = (&mut *reader).take(unread.min(MAX_DRAIN_BYTES));
    let mut scratch = vec![0u8; DRAIN_READ_SIZE.min(usize::try_from(unread).unwrap_or(usize::MAX))];
    while let Ok(Ok(read)) = timeout(wait, limited.read(&mut scratch)).await {
        if read == 0 {
            return;
        }
    }
}

/// Writes every part, vectored, each write within `wait`.
async fn write_all<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut parts: Vec<Bytes>,
    wait: Duration,
) -> io::Result<()> {
    parts.retain(|p| !p.is_empty());
    while !parts.is_empty() {
        let slices: Vec<IoSlice<'_>> = parts.iter().take(MAX_IOVECS).map(|p| IoSlice::new(p)).collect();
        let written = timeout(wait, writer.write_vectored(&slices))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out writing the response"))??;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        advance(&mut parts, written);
    }
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The canned replies must declare exactly the body they carry, or nginx reports an upstream error.
    #[test]
    fn canned_replies_declare_their_length() {
        for reply in [PLAIN_HTTP_REPLY, BAD_REQUEST_REPLY, TOO_LARGE_REPLY] {
            let text = std::str::from_utf8(reply).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let declared = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap();
            assert_eq!(declared.parse::<usize>().unwrap(), body.len(), "{head}");
        }
    }
}
