//! One connection from nginx: read the uwsgi packet, hand the request to the [`Handler`], stream the
//! request body to it, write the reply, drain what is left of the body, close.
//!
//! Everything that can go wrong with a connection is logged here, once. No pyo3 here.

use std::fmt;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use oxwsgi_proto::{parse_header, parse_packet, ProtocolError, HEADER_LEN, MODIFIER_PING, MODIFIER_WSGI};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit};
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::config::ServerConfig;
use crate::exchange::{Body, Handler, ListenerInfo, Reply, Request, RequestLine, StreamItem};
use crate::metrics::layout::{Method, ProtocolErrorKind};
use crate::metrics::{Recorder, RequestDone};
use crate::response::parse_decimal;

/// First read buffer: nginx's packets for ordinary browser requests are 1-3 KiB, so one allocation and
/// usually one read take the header, the vars and a small body together.
const READ_BUFFER_INITIAL: usize = 8 * 1024;
/// Size of each request-body read handed to the app.
const BODY_CHUNK: usize = 64 * 1024;
/// Body chunks read ahead of the app: keeps uploads flowing without buffering a large body in memory.
const BODY_CHANNEL_CHUNKS: usize = 4;
/// Unread request body drained after the response, so closing does not reset the connection and make nginx
/// lose the response (flask-jwt-extended#253). Past this, closing with a reset is the cheaper evil.
const MAX_DRAIN_BYTES: u64 = 64 * 1024 * 1024;
/// `writev` accepts at most `IOV_MAX` (1024 on Linux) buffers per call.
const MAX_IOVECS: usize = 1024;

const PLAIN_HTTP_REPLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 95\r\n\r\nThis socket speaks the uwsgi protocol; point nginx at it with uwsgi_pass, not proxy_pass/HTTP.\n";
const BAD_REQUEST_REPLY: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nBad Request\n";
const TOO_LARGE_REPLY: &[u8] = b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain\r\nContent-Length: 25\r\n\r\nRequest Entity Too Large\n";

/// A connected stream oxwsgi can serve, and how to abort it.
pub(super) trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ends the connection so that nginx sees an error rather than a complete response.
    fn abort(self);
}

impl Stream for TcpStream {
    fn abort(self) {
        // A zero linger makes close() send RST: nginx then reports the upstream error and never passes a
        // truncated body off as complete.
        let _ = socket2::SockRef::from(&self).set_linger(Some(Duration::ZERO));
    }
}

impl Stream for UnixStream {
    fn abort(self) {
        // AF_UNIX has no reset; with Content-Length nginx detects the short body, without it it cannot.
    }
}

/// What every connection on one listener shares.
pub(super) struct Context {
    pub config: ServerConfig,
    pub handler: Arc<dyn Handler>,
    pub listener: Arc<ListenerInfo>,
    pub metrics: Recorder,
}

/// What came in before the body.
enum Incoming {
    /// Connected and closed without a byte (port probes, health checks).
    Nothing,
    Ping,
    Request {
        packet_len: usize,
        content_length: u64,
        method: Method,
    },
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

pub(super) async fn serve<S: Stream>(stream: S, context: Arc<Context>, permit: OwnedSemaphorePermit) {
    let accepted_at = Instant::now();
    let _in_flight = context.metrics.in_flight();
    let config = &context.config;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(READ_BUFFER_INITIAL);
    let (packet_len, content_length, method) = match read_request(&mut reader, &mut buf, config).await {
        Ok(Incoming::Nothing) => return,
        Ok(Incoming::Ping) => {
            let _ = write_all(&mut writer, &[&oxwsgi_proto::pong()], config.socket_timeout).await;
            return;
        }
        Ok(Incoming::Request { packet_len, content_length, method }) => (packet_len, content_length, method),
        Err((refused, unread)) => {
            warn!("refused a connection: {refused}");
            context.metrics.protocol_error(refused.kind());
            if let Some(reply) = refused.reply() {
                if write_all(&mut writer, &[reply], config.socket_timeout).await.is_ok() {
                    drain(&mut reader, unread, config.socket_timeout).await;
                }
            }
            return;
        }
    };

    let head_only = method == Method::Head;
    let vars = buf.split_to(packet_len).freeze().slice(HEADER_LEN..);
    let in_buffer = usize::try_from(content_length).unwrap_or(usize::MAX).min(buf.len());
    let received = buf.split_to(in_buffer).freeze();
    let unread = content_length - received.len() as u64;
    let (body_sender, rest) = if unread > 0 {
        let (tx, rx) = mpsc::channel(BODY_CHANNEL_CHUNKS);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let line = RequestLine(vars.clone());
    let request = Request {
        vars,
        body: Body { content_length, received, rest },
        head_only,
        listener: Arc::clone(&context.listener),
        accepted_at,
    };
    let Ok(reply) = context.handler.submit(request, permit) else {
        debug!(request = %line, "shutting down: request not started");
        return;
    };

    let response_done = Notify::new();
    let pump = pump_body(&mut reader, unread, body_sender, &response_done, config.socket_timeout);
    let respond = async {
        let outcome = respond(&mut writer, reply, config.socket_timeout).await;
        response_done.notify_one();
        outcome
    };
    let ((), outcome) = tokio::join!(pump, respond);
    context.metrics.request_done(&RequestDone {
        method,
        status: outcome.status,
        duration: accepted_at.elapsed(),
        body_bytes: content_length,
        response_bytes: outcome.head_bytes + outcome.body_bytes,
        write_failed: matches!(outcome.end, End::WriteFailed(_)),
    });

    match &outcome.end {
        End::Complete => {}
        End::Aborted => {
            warn!(request = %line, status = outcome.status, "response aborted after {} body bytes", outcome.body_bytes);
            reader.unsplit(writer).abort();
        }
        End::WriteFailed(err) if head_only || matches!(outcome.status, 204 | 304) => {
            debug!(request = %line, "nginx closed the connection after the head: {err}");
        }
        End::WriteFailed(err) => info!(request = %line, "client gone while writing the response: {err}"),
    }
    if config.access_log {
        let millis = accepted_at.elapsed().as_secs_f64() * 1000.0;
        info!(target: "oxwsgi::access", "{line} => {} ({} bytes) in {millis:.1} ms", outcome.status, outcome.body_bytes);
    }
}

/// Reads up to the end of the vars block. `Err` carries how many body bytes are still unread, to drain
/// after a reply.
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    config: &ServerConfig,
) -> Result<Incoming, (Refused, u64)> {
    let refuse = |refused| (refused, 0);
    let header = loop {
        if let Some(header) = parse_header(buf).map_err(|e| refuse(Refused::Protocol(e)))? {
            break header;
        }
        if read_more(reader, buf, config.socket_timeout).await.map_err(refuse)? == 0 {
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
            while buf.len() < 8 && read_more(reader, buf, config.socket_timeout).await.is_ok_and(|n| n > 0) {}
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
        if let Some((packet, packet_len)) =
            parse_packet(buf, &config.limits).map_err(|e| refuse(Refused::Protocol(e)))?
        {
            let vars = packet.vars;
            let method =
                vars.get(b"REQUEST_METHOD").ok_or(refuse(Refused::BadRequest("no REQUEST_METHOD")))?;
            let content_length = match vars.get(b"CONTENT_LENGTH") {
                None | Some(b"") => 0,
                Some(value) => parse_decimal(value)
                    .ok_or(refuse(Refused::BadRequest("CONTENT_LENGTH is not a number")))?,
            };
            if let Some(limit) = config.limit_post.filter(|&limit| content_length > limit) {
                let unread = content_length.saturating_sub((buf.len() - packet_len) as u64);
                return Err((Refused::BodyTooLarge { length: content_length, limit }, unread));
            }
            return Ok(Incoming::Request { packet_len, content_length, method: Method::from_bytes(method) });
        }
        buf.reserve(HEADER_LEN + usize::from(header.datasize) - buf.len());
        if read_more(reader, buf, config.socket_timeout).await.map_err(refuse)? == 0 {
            return Err(refuse(Refused::Truncated { received: buf.len() }));
        }
    }
}

async fn read_more<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    wait: Duration,
) -> Result<usize, Refused> {
    match timeout(wait, reader.read_buf(buf)).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(err)) => Err(Refused::Io(err)),
        Err(_) => Err(Refused::Timeout { received: buf.len() }),
    }
}

/// Feeds the request body to the app as it arrives, never reading past `CONTENT_LENGTH`. Once the response
/// is written (or the app drops the body), the rest is read and discarded so that closing does not reset
/// the connection.
async fn pump_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut unread: u64,
    sender: Option<mpsc::Sender<io::Result<Bytes>>>,
    response_done: &Notify,
    wait: Duration,
) {
    let Some(sender) = sender else { return };
    let mut feeding = Some(sender);
    while unread > 0 {
        let want = usize::try_from(unread).unwrap_or(usize::MAX).min(BODY_CHUNK);
        let mut chunk = BytesMut::with_capacity(want);
        let read = timeout(wait, (&mut *reader).take(want as u64).read_buf(&mut chunk)).await;
        let error = match read {
            Ok(Ok(0)) => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the whole body arrived",
            ),
            Ok(Ok(n)) => {
                unread -= n as u64;
                if let Some(tx) = &feeding {
                    tokio::select! {
                        biased;
                        sent = tx.send(Ok(chunk.freeze())) => if sent.is_err() { feeding = None },
                        () = response_done.notified() => feeding = None,
                    }
                    if feeding.is_none() {
                        break;
                    }
                }
                continue;
            }
            Ok(Err(err)) => err,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for the request body"),
        };
        // Never wait here: an app that stopped reading may hold the body for ever. If the channel is full,
        // dropping the sender still ends the body for the app, with an error.
        if let Some(tx) = feeding {
            let _ = tx.try_send(Err(error));
        }
        return;
    }
    // The app is done with the body (it dropped it, or its response is written): discard the rest.
    drain(reader, unread, wait).await;
}

/// Reads and discards up to `unread` bytes (at most [`MAX_DRAIN_BYTES`], each read within `wait`).
async fn drain<R: AsyncRead + Unpin>(reader: &mut R, unread: u64, wait: Duration) {
    let mut sink = tokio::io::sink();
    let mut limited = (&mut *reader).take(unread.min(MAX_DRAIN_BYTES));
    let mut scratch = vec![0u8; BODY_CHUNK];
    loop {
        match timeout(wait, limited.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => {
                let _ = sink.write_all(&scratch[..n]).await;
            }
            _ => return,
        }
    }
}

/// How the response ended.
enum End {
    Complete,
    /// The app failed after bytes were sent.
    Aborted,
    WriteFailed(io::Error),
}

struct Outcome {
    status: u16,
    /// Written, or attempted.
    head_bytes: u64,
    body_bytes: u64,
    end: End,
}

async fn respond<W: AsyncWrite + Unpin>(
    writer: &mut W,
    reply: oneshot::Receiver<Reply>,
    wait: Duration,
) -> Outcome {
    // A reply dropped unsent means the request died inside the pool: answer as for an app error.
    let reply = reply.await.unwrap_or_else(|_| Reply::internal_error());
    match reply {
        Reply::Full { status, head, body } => {
            let mut parts: Vec<&[u8]> = Vec::with_capacity(body.len() + 1);
            parts.push(&head);
            parts.extend(body.iter().map(|c| &c[..]));
            let body_bytes = body.iter().map(|c| c.len() as u64).sum();
            let end = match write_all(writer, &parts, wait).await {
                Ok(()) => End::Complete,
                Err(err) => End::WriteFailed(err),
            };
            Outcome { status, head_bytes: head.len() as u64, body_bytes, end }
        }
        Reply::Stream { status, head, first, mut rest } => {
            let mut outcome = Outcome {
                status,
                head_bytes: head.len() as u64,
                body_bytes: first.len() as u64,
                end: End::Complete,
            };
            if let Err(err) = write_all(writer, &[&head, &first], wait).await {
                outcome.end = End::WriteFailed(err);
                return outcome;
            }
            loop {
                match rest.recv().await {
                    Some(StreamItem::Chunk(chunk)) => {
                        if let Err(err) = write_all(writer, &[&chunk], wait).await {
                            outcome.end = End::WriteFailed(err);
                            return outcome;
                        }
                        outcome.body_bytes += chunk.len() as u64;
                    }
                    Some(StreamItem::End) => return outcome,
                    None => {
                        outcome.end = End::Aborted;
                        return outcome;
                    }
                }
            }
        }
    }
}

/// Writes every part, vectored, each write within `wait`.
async fn write_all<W: AsyncWrite + Unpin>(writer: &mut W, parts: &[&[u8]], wait: Duration) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> =
        parts.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let batch = &slices[..slices.len().min(MAX_IOVECS)];
        let written = timeout(wait, writer.write_vectored(batch))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out writing the response"))??;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
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
