//! A request as the thread that runs the app receives it: the packet, parsed once ([`RequestHead`], with
//! every var's place recorded so nothing walks the block again), and the [`Body`] (the bytes that came with
//! the packet, and the socket for the rest). Also the framing both the serving threads and the I/O runtime
//! apply to the first bytes of a connection. No pyo3 here.

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use oxwsgi_proto::body::{parse_content_length, BodyFraming};
use oxwsgi_proto::{parse_packet_each, Limits, ProtocolError, HEADER_LEN, MODIFIER_WSGI};

use super::conn::{BodyTooSlow, Conn};
use crate::metrics::model::Method;

/// Bodies up to this size are read into memory by the I/O runtime before the app starts, when they did not
/// come whole with the packet, so a slow or stalled peer never holds a Python thread for them. Nearly every
/// form and JSON POST is below it; larger bodies (uploads) are read by the app as it asks, in bounded
/// memory, straight from the socket.
pub const BUFFERED_BODY_MAX: u64 = 64 * 1024;
/// Size of each read of a large body from the socket.
pub const BODY_READ_SIZE: usize = 64 * 1024;

/// `SERVER_NAME` / `SERVER_PORT` fallbacks for the socket a request came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    pub server_name: String,
    pub server_port: String,
}

/// How the first bytes of a connection frame a WSGI request, with every var's place in the block.
#[derive(Debug)]
pub struct Framing {
    /// Header and vars block.
    pub packet_len: usize,
    pub content_length: u64,
    pub method: Method,
    vars: Vec<VarSpan>,
    method_span: Span,
    uri: Span,
    /// For the JSON access log.
    remote_addr: Option<Span>,
    request_id: Option<Span>,
}

/// Why a packet cannot be served, before its body.
#[derive(Debug)]
pub enum FramingError {
    Protocol(ProtocolError),
    BadRequest(&'static str),
    BodyTooLarge { length: u64, limit: u64 },
}

/// Vars a request usually has; the index is allocated for this many at once.
const EXPECTED_VARS: usize = 32;

/// Where a key or value sits in the vars block: offset and length (the block is at most 65535 bytes).
type Span = (u16, u16);

/// Where one var sits in the vars block.
#[derive(Debug, Clone, Copy)]
struct VarSpan {
    key: Span,
    value: Span,
}

/// Frames the WSGI request at the start of `buf` (header modifier1 must be 0): `Ok(None)` until the whole
/// vars block is in. Checks what the app relies on: a method, a decimal `CONTENT_LENGTH`, `--limit-post`.
///
/// The block is walked once: validated, indexed, and the vars the server itself reads picked out on the
/// way, so nothing walks it again (the environ and the log line read the index).
pub fn frame(buf: &[u8], limits: &Limits, limit_post: Option<u64>) -> Result<Option<Framing>, FramingError> {
    let block_start = buf.as_ptr() as usize + HEADER_LEN;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "a vars block is at most 65535 bytes (a u16 datasize)"
    )]
    let span = |part: &[u8]| ((part.as_ptr() as usize - block_start) as u16, part.len() as u16);
    let mut vars = Vec::new();
    let (mut method, mut content_length, mut request_uri, mut path_info) = (None, None, None, None);
    let (mut remote_addr, mut request_id) = (None, None);
    let visit = |key: &[u8], value| {
        if vars.capacity() == 0 {
            vars.reserve(EXPECTED_VARS);
        }
        vars.push(VarSpan { key: span(key), value: span(value) });
        // Assigned at each occurrence: the last one wins, as in `Vars::get` and uWSGI.
        match key {
            b"REQUEST_METHOD" => method = Some(value),
            b"CONTENT_LENGTH" => content_length = Some(value),
            b"REQUEST_URI" => request_uri = Some(value),
            b"PATH_INFO" => path_info = Some(value),
            b"REMOTE_ADDR" => remote_addr = Some(value),
            // nginx's `$request_id`, as `uwsgi_param HTTP_X_REQUEST_ID $request_id;` passes it (the app
            // sees it as the X-Request-ID header), or the header itself from a proxy in front.
            b"HTTP_X_REQUEST_ID" => request_id = Some(value),
            _ => {}
        }
    };
    let Some((packet, packet_len)) = parse_packet_each(buf, limits, visit).map_err(FramingError::Protocol)?
    else {
        return Ok(None);
    };
    debug_assert_eq!(packet.header.modifier1, MODIFIER_WSGI);
    let method_value = method.ok_or(FramingError::BadRequest("no REQUEST_METHOD"))?;
    let content_length = parse_content_length(content_length)
        .ok_or(FramingError::BadRequest("CONTENT_LENGTH is not a number"))?;
    if let Some(limit) = limit_post.filter(|&limit| content_length > limit) {
        return Err(FramingError::BodyTooLarge { length: content_length, limit });
    }
    Ok(Some(Framing {
        packet_len,
        content_length,
        method: Method::from_bytes(method_value),
        vars,
        method_span: span(method_value),
        uri: request_uri.or(path_info).map_or((0, 0), span),
        remote_addr: remote_addr.map(span),
        request_id: request_id.map(span),
    }))
}

/// The parsed packet of one request.
#[derive(Debug)]
pub struct RequestHead {
    /// The vars block, exactly as received.
    block: Bytes,
    vars: Vec<VarSpan>,
    pub method: Method,
    pub content_length: u64,
    pub line: RequestLine,
    pub listener: Arc<ListenerInfo>,
    pub accepted_at: Instant,
}

impl RequestHead {
    /// Takes the packet [`frame`] accepted off the front of `buf`.
    pub(super) fn take(
        buf: &mut BytesMut,
        framing: Framing,
        listener: Arc<ListenerInfo>,
        accepted_at: Instant,
    ) -> Self {
        let block = buf.split_to(framing.packet_len).freeze().slice(HEADER_LEN..);
        let line = RequestLine {
            block: block.clone(),
            method: framing.method_span,
            uri: framing.uri,
            remote_addr: framing.remote_addr,
            request_id: framing.request_id,
        };
        Self {
            block,
            vars: framing.vars,
            method: framing.method,
            content_length: framing.content_length,
            line,
            listener,
            accepted_at,
        }
    }

    /// The vars as `(key, value)`, in wire order, duplicates included.
    pub fn vars(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.vars.iter().map(|v| (slice(&self.block, v.key), slice(&self.block, v.value)))
    }

    /// How many vars the packet holds, duplicates included.
    pub fn var_count(&self) -> usize {
        self.vars.len()
    }

    /// A HEAD request: the app runs, but no body bytes are written.
    pub fn head_only(&self) -> bool {
        self.method == Method::Head
    }
}

fn slice(block: &[u8], (start, len): Span) -> &[u8] {
    &block[usize::from(start)..][..usize::from(len)]
}

/// `METHOD /uri` of a request, for log lines, with what the JSON access log adds (`REMOTE_ADDR`, the
/// request id); cheap to clone (it shares the packet).
#[derive(Debug, Clone)]
pub struct RequestLine {
    block: Bytes,
    method: Span,
    uri: Span,
    remote_addr: Option<Span>,
    request_id: Option<Span>,
}

impl RequestLine {
    /// The method and the URI, as they came.
    pub fn parts(&self) -> [&[u8]; 2] {
        [slice(&self.block, self.method), slice(&self.block, self.uri)]
    }

    /// `REMOTE_ADDR`, if nginx passed it.
    pub fn remote_addr(&self) -> Option<&[u8]> {
        self.remote_addr.map(|span| slice(&self.block, span))
    }

    /// The request id (`HTTP_X_REQUEST_ID`), if nginx passed one.
    pub fn request_id(&self) -> Option<&[u8]> {
        self.request_id.map(|span| slice(&self.block, span))
    }

    /// The same line in a buffer of its own: a record that outlives the request (a response the I/O
    /// runtime finishes) must not keep the serving thread's read buffer, which the packet is part of.
    #[must_use]
    pub fn detached(&self) -> Self {
        let method = slice(&self.block, self.method);
        let uri = slice(&self.block, self.uri);
        let remote_addr = self.remote_addr().unwrap_or_default();
        let request_id = self.request_id().unwrap_or_default();
        let block = Bytes::from([method, uri, remote_addr, request_id].concat());
        // Each part comes from the vars block, and so does their sum: at most 65535 bytes.
        let span_after = |start: u16, part: &[u8]| {
            let Ok(len) = u16::try_from(part.len()) else {
                unreachable!("every part comes from a vars block of at most 65535 bytes")
            };
            (start, len)
        };
        let method_span = span_after(0, method);
        let uri = span_after(method_span.1, uri);
        let remote = span_after(uri.0 + uri.1, remote_addr);
        let id = span_after(remote.0 + remote.1, request_id);
        Self {
            block,
            method: method_span,
            uri,
            remote_addr: self.remote_addr.map(|_| remote),
            request_id: self.request_id.map(|_| id),
        }
    }
}

impl fmt::Display for RequestLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = String::from_utf8_lossy(slice(&self.block, self.method));
        let uri = String::from_utf8_lossy(slice(&self.block, self.uri));
        write!(f, "{method} {uri}")
    }
}

/// The request body: `CONTENT_LENGTH` bytes, the first of which came with the packet; the rest, if any,
/// are read from the socket as the app asks.
#[derive(Debug)]
pub struct Body {
    /// Received, not yet given to the app.
    current: Bytes,
    /// The part of the body still to come: reads never ask for more, and it is complete when all came.
    unread: BodyFraming,
    source: Source,
}

#[derive(Debug)]
enum Source {
    /// Nothing more to read.
    Complete,
    /// The rest comes from this connection, each wait bounded by the timeout.
    Socket(Arc<Conn>, Duration),
    /// The body cannot be completed: reads past `current` fail with this.
    Failed(io::ErrorKind, &'static str),
}

impl Body {
    /// A body that is all in memory.
    pub(super) fn complete(received: Bytes) -> Self {
        Self { current: received, unread: BodyFraming::new(0), source: Source::Complete }
    }

    /// A body of which `unread` bytes are still on `conn`.
    pub(super) fn streaming(received: Bytes, unread: u64, conn: Arc<Conn>, timeout: Duration) -> Self {
        Self { current: received, unread: BodyFraming::new(unread), source: Source::Socket(conn, timeout) }
    }

    /// A body that stopped arriving after `received` (`unread` bytes never came).
    pub(super) fn failed(received: Bytes, unread: u64, error: io::ErrorKind, why: &'static str) -> Self {
        Self { current: received, unread: BodyFraming::new(unread), source: Source::Failed(error, why) }
    }

    /// Bytes still on the socket: what must be drained if the app does not read them.
    pub fn on_socket(&self) -> u64 {
        if matches!(self.source, Source::Socket(..)) {
            self.unread.remaining()
        } else {
            0
        }
    }

    /// Bytes left for the app: in memory and still to come.
    pub fn available(&self) -> u64 {
        self.current.len() as u64 + self.unread.remaining()
    }

    /// The received bytes not yet taken.
    pub fn buffered(&mut self) -> &mut Bytes {
        &mut self.current
    }

    /// Makes the buffered bytes non-empty unless the body is exhausted; `Ok(false)` at its end. May wait for
    /// the socket (call it with the interpreter released).
    pub fn fill(&mut self) -> io::Result<bool> {
        if !self.current.is_empty() {
            return Ok(true);
        }
        if self.unread.is_complete() {
            return Ok(false);
        }
        let want = self.unread.read_size(BODY_READ_SIZE);
        let mut chunk = BytesMut::with_capacity(want);
        let read = self.read_from_socket(&mut chunk.spare_capacity_mut()[..want])?;
        // SAFETY: the read initialised the first `read` bytes of the spare capacity.
        unsafe { chunk.set_len(read) };
        self.current = chunk.freeze();
        Ok(true)
    }

    /// Reads body bytes straight from the socket into `buf` (at most what is still unread), waiting for
    /// them: the app's own buffer, when nothing is buffered, so they are copied once. `buf` may be
    /// uninitialised; the first `Ok(n)` bytes are initialised by the read. `Ok(0)` only for an empty `buf`
    /// or at the end of the body. Call it with the interpreter released.
    pub fn read_from_socket(&mut self, buf: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        let (conn, timeout) = match &self.source {
            Source::Socket(conn, timeout) => (conn, *timeout),
            Source::Failed(kind, why) => return Err(io::Error::new(*kind, *why)),
            Source::Complete => return Ok(0),
        };
        let want = self.unread.read_size(buf.len());
        if want == 0 {
            return Ok(0);
        }
        match conn.read_body(&mut buf[..want], timeout) {
            Ok(0) => Err(self
                .fail(io::ErrorKind::UnexpectedEof, "the connection closed before the whole body arrived")),
            Ok(read) => {
                // All of it is body: the read asked for no more than the body's rest.
                self.unread.take(read);
                if self.unread.is_complete() {
                    // Let go of the connection: the response side closes it as soon as it is done.
                    self.source = Source::Complete;
                }
                Ok(read)
            }
            Err(err) if err.kind() == io::ErrorKind::TimedOut => {
                let too_slow = err.get_ref().and_then(|inner| inner.downcast_ref::<BodyTooSlow>());
                let why = if too_slow.is_some() {
                    BodyTooSlow::MESSAGE
                } else {
                    "timed out waiting for the request body"
                };
                Err(self.fail(io::ErrorKind::TimedOut, why))
            }
            Err(err) => {
                self.source = Source::Failed(err.kind(), "error reading the request body");
                Err(err)
            }
        }
    }

    /// The peer closed or reset the connection before the whole body came: through nginx, the client went
    /// away mid-upload (with `uwsgi_request_buffering off`), so what the app raises is no fault of its own.
    pub fn peer_closed(&self) -> bool {
        matches!(
            self.source,
            Source::Failed(
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe,
                _
            )
        )
    }

    /// After a failure the body is unusable: later reads fail the same way instead of waiting again.
    fn fail(&mut self, kind: io::ErrorKind, why: &'static str) -> io::Error {
        self.source = Source::Failed(kind, why);
        io::Error::new(kind, why)
    }

    /// The request is over: no more reads (the app may keep `wsgi.input`, but not the connection). Returns
    /// how many body bytes are still on the socket, to drain before closing it.
    pub fn end(&mut self) -> u64 {
        let on_socket = self.on_socket();
        self.current = Bytes::new();
        self.unread = BodyFraming::new(0);
        self.source =
            Source::Failed(io::ErrorKind::Other, "the request is over: wsgi.input cannot be read after it");
        on_socket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(vars: &[(&[u8], &[u8])]) -> BytesMut {
        BytesMut::from(&oxwsgi_proto::encode_packet(0, 0, vars).unwrap()[..])
    }

    fn head(buf: &mut BytesMut) -> RequestHead {
        let framing = frame(buf, &Limits::default(), None).unwrap().unwrap();
        let listener = Arc::new(ListenerInfo { server_name: "localhost".into(), server_port: String::new() });
        RequestHead::take(buf, framing, listener, Instant::now())
    }

    #[test]
    fn one_walk_indexes_every_var_and_picks_out_what_the_server_reads() {
        let mut buf = packet(&[
            (b"REQUEST_METHOD", b"POST"),
            (b"CONTENT_LENGTH", b"5"),
            (b"PATH_INFO", b"/p"),
            (b"HTTP_COOKIE", b"a=1"),
            (b"REQUEST_URI", b"/p?q=1"),
            (b"HTTP_COOKIE", b"b=2"),
        ]);
        buf.extend_from_slice(b"hello");
        let head = head(&mut buf);
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.content_length, 5);
        assert_eq!(head.var_count(), 6);
        let vars: Vec<_> = head.vars().collect();
        assert_eq!(vars[3], (&b"HTTP_COOKIE"[..], &b"a=1"[..]));
        assert_eq!(vars[5], (&b"HTTP_COOKIE"[..], &b"b=2"[..]), "duplicates kept, in wire order");
        assert_eq!(head.line.to_string(), "POST /p?q=1", "REQUEST_URI before PATH_INFO");
        assert_eq!(&buf[..], b"hello", "the packet is taken off the front; the body stays");
    }

    #[test]
    fn a_detached_line_reads_the_same_from_its_own_buffer() {
        let mut buf = packet(&[(b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/only/path")]);
        let line = head(&mut buf).line;
        let detached = line.detached();
        assert_eq!(detached.to_string(), "GET /only/path");
        assert_eq!(detached.block.len(), "GET/only/path".len(), "only the method and the URI");
        assert_eq!((detached.remote_addr(), detached.request_id()), (None, None));
    }

    #[test]
    fn a_line_keeps_the_remote_address_and_the_request_id_when_detached() {
        let mut buf = packet(&[
            (b"REQUEST_METHOD", b"GET"),
            (b"REMOTE_ADDR", b"10.0.0.7"),
            (b"PATH_INFO", b"/p"),
            (b"HTTP_X_REQUEST_ID", b"f00d"),
        ]);
        let line = head(&mut buf).line;
        for line in [line.clone(), line.detached()] {
            assert_eq!(line.to_string(), "GET /p");
            assert_eq!(line.remote_addr(), Some(&b"10.0.0.7"[..]));
            assert_eq!(line.request_id(), Some(&b"f00d"[..]));
        }
    }

    #[test]
    fn framing_refuses_what_the_app_cannot_take() {
        let limits = Limits::default();
        let no_method = packet(&[(b"PATH_INFO", b"/")]);
        assert!(matches!(frame(&no_method, &limits, None), Err(FramingError::BadRequest(_))));
        let bad_length = packet(&[(b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", b"12abc")]);
        assert!(matches!(frame(&bad_length, &limits, None), Err(FramingError::BadRequest(_))));
        let big = packet(&[(b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", b"101")]);
        assert!(matches!(
            frame(&big, &limits, Some(100)),
            Err(FramingError::BodyTooLarge { length: 101, limit: 100 })
        ));
        let whole = packet(&[(b"REQUEST_METHOD", b"GET")]);
        for cut in 0..whole.len() {
            assert!(frame(&whole[..cut], &limits, None).unwrap().is_none(), "incomplete at {cut}");
        }
    }
}
