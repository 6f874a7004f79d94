//! Plain HTTP/1.x for a server's `--http-socket`: a request head turned into the vars nginx would send for
//! it (so the app sees the same environ through either socket), the chunked request body decoded, and the
//! server's own response head read back, so the server can frame it for a connection that stays open.
//!
//! The parsing itself is `httparse`'s; this module owns the rules around it — which requests are refused
//! and with which status, how the path is normalised (as nginx's `$document_uri`), how the body is framed
//! (`Content-Length` or `chunked`, never both), whether the connection stays open. Pure: no I/O.

use std::fmt;

use crate::{encode_packet, parse_decimal, ProtocolError, MODIFIER_WSGI};

/// Headers one request may carry. nginx sends one var per header, and the vars block allows
/// [`crate::DEFAULT_MAX_VARS`]; 100 is what `httparse`-based servers commonly allow and far above what
/// browsers send (a dozen or two).
pub const MAX_HEADERS: usize = 100;
/// Longest request head (request line and headers) accepted: the vars it becomes must fit a uwsgi vars
/// block (64 KiB), as nginx's must; nginx itself allows 4 × 8 KiB of headers by default.
pub const MAX_REQUEST_HEAD: usize = 32 * 1024;
/// Longest chunk-size line (size and extensions) or trailer line of a chunked body: enough for any real
/// extension, bounded so a peer cannot make the server buffer an endless line.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Trailer bytes accepted after the last chunk (they are read and dropped: WSGI has no place for them).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No `Content-Length` and no `Transfer-Encoding`: no body.
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head: the vars for the app, and what the server needs to read the body and answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(clippy::struct_excessive_bools, reason = "four independent facts of one request head, not a state")]
pub struct Request {
    /// Bytes of the head, blank line included: the body (or the next request) starts there.
    pub head_len: usize,
    pub body: RequestBody,
    /// `HEAD`: the response has no body, whatever its head says.
    pub head_only: bool,
    /// `HTTP/1.1` (or later `1.x`); `false` for `HTTP/1.0`.
    pub http11: bool,
    /// The client asked to keep the connection open (the HTTP/1.1 default, or 1.0's `keep-alive`).
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a `100 Continue` before sending the body.
    pub expect_continue: bool,
    /// Every var but `CONTENT_LENGTH`, which [`Request::packet`] adds once the body's length is known.
    vars: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What the server knows of the connection, for the vars nginx takes from it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    pub remote_addr: &'a str,
    pub remote_port: &'a str,
    /// The port the listening socket is on; empty for a Unix socket.
    pub server_port: &'a str,
}

/// Why a request head is refused; each maps to the status nginx would answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// Not HTTP/1.x syntax (`httparse`'s reason).
    Malformed(&'static str),
    /// The head is longer than [`MAX_REQUEST_HEAD`], or has more than [`MAX_HEADERS`] headers.
    HeadTooLarge,
    /// A target that is neither `/path` nor `http://host/path`, a bad `%` escape, or `..` above the root.
    BadTarget(&'static str),
    /// HTTP/1.1 without `Host` (RFC 9112 §3.2).
    NoHost,
    /// More than one `Host` (RFC 9112 §3.2: the server must refuse it).
    ManyHosts,
    /// A `Content-Length` that is not a plain decimal, or two that differ.
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1: the classic request smuggling).
    LengthAndChunked,
    /// A transfer coding other than `chunked` alone.
    UnsupportedTransferEncoding,
}

impl HttpError {
    /// The status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge => 431,
            Self::UnsupportedTransferEncoding => 501,
            _ => 400,
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed HTTP request: {why}"),
            Self::HeadTooLarge => {
                write!(f, "request head over {MAX_REQUEST_HEAD} bytes or {MAX_HEADERS} headers")
            }
            Self::BadTarget(why) => write!(f, "bad request target: {why}"),
            Self::NoHost => f.write_str("HTTP/1.1 request without a Host header"),
            Self::ManyHosts => f.write_str("more than one Host header"),
            Self::BadContentLength => f.write_str("invalid or conflicting Content-Length"),
            Self::LengthAndChunked => f.write_str("both Content-Length and Transfer-Encoding"),
            Self::UnsupportedTransferEncoding => {
                f.write_str("unsupported Transfer-Encoding (only chunked is understood)")
            }
        }
    }
}

impl std::error::Error for HttpError {}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete (and shorter than
/// [`MAX_REQUEST_HEAD`]).
pub fn parse_request(buf: &[u8], peer: &Peer<'_>) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_HEAD => {
            return Err(HttpError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(err) => return Err(HttpError::Malformed(error_text(err))),
    };
    if head_len > MAX_REQUEST_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version) else {
        unreachable!("a complete parse has a method, a target and a version");
    };
    let http11 = minor >= 1;
    let (origin, path, query) = split_target(target)?;
    let path_info = normalize_path(path)?;

    let mut content_length = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    let (mut has_host, mut close, mut keep_alive_asked, mut expect_continue) = (false, false, false, false);
    let mut vars: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(16 + request.headers.len());
    let push = |vars: &mut Vec<_>, key: &[u8], value: &[u8]| vars.push((key.to_vec(), value.to_vec()));
    push(&mut vars, b"REQUEST_METHOD", method.as_bytes());
    // As nginx's `$request_uri`: the path and query, without the scheme and host of an absolute form.
    let request_uri = if origin.starts_with('/') { origin.to_owned() } else { format!("/{origin}") };
    push(&mut vars, b"REQUEST_URI", request_uri.as_bytes());
    push(&mut vars, b"PATH_INFO", &path_info);
    push(&mut vars, b"QUERY_STRING", query.as_bytes());
    push(&mut vars, b"SERVER_PROTOCOL", if http11 { b"HTTP/1.1" } else { b"HTTP/1.0" });
    push(&mut vars, b"REQUEST_SCHEME", b"http");
    push(&mut vars, b"REMOTE_ADDR", peer.remote_addr.as_bytes());
    push(&mut vars, b"REMOTE_PORT", peer.remote_port.as_bytes());
    if !peer.server_port.is_empty() {
        push(&mut vars, b"SERVER_PORT", peer.server_port.as_bytes());
    }
    // Sent even when empty, as nginx's `uwsgi_params` does.
    let content_type = request.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-type"));
    push(&mut vars, b"CONTENT_TYPE", content_type.map_or(&b""[..], |h| h.value));
    for header in request.headers.iter() {
        let name = header.name;
        let value = header.value;
        if name.eq_ignore_ascii_case("content-length") {
            let length = parse_decimal(value).ok_or(HttpError::BadContentLength)?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err(HttpError::BadContentLength);
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding.is_some() {
                return Err(HttpError::UnsupportedTransferEncoding);
            }
            transfer_encoding = Some(value);
        } else if name.eq_ignore_ascii_case("host") {
            if std::mem::replace(&mut has_host, true) {
                return Err(HttpError::ManyHosts);
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
        // As nginx by default (`underscores_in_headers off`): `X_User` must not pass for `X-User`.
        if name.contains('_') {
            continue;
        }
        let mut key = Vec::with_capacity(5 + name.len());
        key.extend_from_slice(b"HTTP_");
        key.extend(name.bytes().map(|b| if b == b'-' { b'_' } else { b.to_ascii_uppercase() }));
        vars.push((key, value.to_vec()));
    }
    if http11 && !has_host {
        return Err(HttpError::NoHost);
    }
    let body = match (transfer_encoding, content_length) {
        (Some(_), Some(_)) => return Err(HttpError::LengthAndChunked),
        (Some(coding), None) if coding.trim_ascii().eq_ignore_ascii_case(b"chunked") => RequestBody::Chunked,
        (Some(_), None) => return Err(HttpError::UnsupportedTransferEncoding),
        (None, Some(length)) => RequestBody::Length(length),
        (None, None) => RequestBody::None,
    };
    Ok(Some(Request {
        head_len,
        body,
        head_only: method == "HEAD",
        http11,
        keep_alive: if http11 { !close } else { keep_alive_asked && !close },
        expect_continue: http11 && expect_continue && body != RequestBody::None,
        vars,
    }))
}

impl Request {
    /// The uwsgi packet nginx would send for this request, with `CONTENT_LENGTH` (empty without a body,
    /// as nginx sends it; the decoded length of a chunked body).
    pub fn packet(&self, content_length: Option<u64>) -> Result<Vec<u8>, ProtocolError> {
        let length = content_length.map(|n| n.to_string()).unwrap_or_default();
        let mut vars: Vec<(&[u8], &[u8])> = Vec::with_capacity(self.vars.len() + 1);
        vars.push((b"CONTENT_LENGTH", length.as_bytes()));
        vars.extend(self.vars.iter().map(|(k, v)| (&k[..], &v[..])));
        encode_packet(MODIFIER_WSGI, 0, &vars)
    }

    /// The vars, `CONTENT_LENGTH` aside, in order.
    pub fn vars(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.vars.iter().map(|(k, v)| (&k[..], &v[..]))
    }
}

fn error_text(err: httparse::Error) -> &'static str {
    match err {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in the request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "not HTTP/1.0 or HTTP/1.1",
    }
}

/// `(origin form, path, query)` of an origin-form target (`/p?q`) or an absolute-form one (`http://host/p?q`, which
/// clients send to proxies); anything else (`*`, an authority) has no path for an app.
fn split_target(target: &str) -> Result<(&str, &str, &str), HttpError> {
    let origin = if target.starts_with('/') {
        target
    } else {
        let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
        let rest = if lower.starts_with("http://") {
            &target[7..]
        } else if lower.starts_with("https://") {
            &target[8..]
        } else {
            return Err(HttpError::BadTarget("expected /path or http://host/path"));
        };
        rest.find(['/', '?']).map_or("", |at| &rest[at..])
    };
    let (path, query) = origin.split_once('?').unwrap_or((origin, ""));
    // `http://host?q` has an empty path: it means the root.
    Ok((origin, if path.is_empty() { "/" } else { path }, query))
}

/// `PATH_INFO` as nginx's `$document_uri` gives it: percent-decoded, `.` and `..` segments resolved,
/// repeated slashes merged. A bad escape, a decoded NUL, or `..` above the root is refused (nginx answers
/// those with 400 too).
pub fn normalize_path(path: &str) -> Result<Vec<u8>, HttpError> {
    let raw = path.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut at = 0;
    while at < raw.len() {
        if raw[at] == b'%' {
            let hex = |b: u8| char::from(b).to_digit(16);
            let byte = match (raw.get(at + 1).copied().and_then(hex), raw.get(at + 2).copied().and_then(hex))
            {
                (Some(high), Some(low)) => u8::try_from(high * 16 + low).unwrap_or_default(),
                _ => return Err(HttpError::BadTarget("a % not followed by two hex digits")),
            };
            if byte == 0 {
                return Err(HttpError::BadTarget("an encoded NUL in the path"));
            }
            decoded.push(byte);
            at += 3;
        } else {
            decoded.push(raw[at]);
            at += 1;
        }
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut parts = decoded.split(|&b| b == b'/').skip(1).peekable();
    let mut trailing_slash = false;
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            b"" | b"." => trailing_slash = last,
            b".." => {
                if segments.pop().is_none() {
                    return Err(HttpError::BadTarget("a .. segment above the root"));
                }
                trailing_slash = last;
            }
            _ => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut path = Vec::with_capacity(decoded.len());
    for segment in &segments {
        path.push(b'/');
        path.extend_from_slice(segment);
    }
    if trailing_slash || segments.is_empty() {
        path.push(b'/');
    }
    Ok(path)
}

/// Why a chunked body cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    /// A chunk size that is not hex, or does not fit a `u64`.
    BadSize,
    /// A chunk-size or trailer line longer than [`MAX_CHUNK_LINE`], or trailers over [`MAX_TRAILERS`].
    LineTooLong,
    /// A line not ended by CRLF, or chunk data not followed by one.
    BadLineEnd,
    /// A bare LF or another control byte in a chunk extension or a trailer.
    ControlCharacter,
}

impl fmt::Display for ChunkedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadSize => "invalid chunk size",
            Self::LineTooLong => "chunk line or trailers too long",
            Self::BadLineEnd => "chunk not ended by CRLF",
            Self::ControlCharacter => "a control character in a chunk extension or trailer",
        })
    }
}

impl std::error::Error for ChunkedError {}

/// Where a [`ChunkedDecoder`] is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line: the size so far, which part of the line, the line's length.
    Size {
        size: u64,
        digits: usize,
        part: SizeLine,
        line: usize,
    },
    /// The size line's CR was seen.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one; `line` is the current line's length.
    Trailer {
        line: usize,
        total: usize,
    },
    TrailerLf {
        line: usize,
        total: usize,
    },
    Done,
}

/// The parts of a chunk-size line: `1*HEXDIG *(SP / HTAB) [";" extension]` (RFC 9112 §7.1.1's BWS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeLine {
    Digits,
    /// Spaces after the size: only more of them, `;` or the line's end may follow (`5 6` is no size).
    Space,
    Extension,
}

/// Bytes a chunk extension or a trailer line may hold: visible characters, space, tab and obs-text. A bare
/// LF or another control byte is refused: a proxy in front that took it for a line end would see other
/// requests in the body than this server does (request smuggling).
fn allowed_in_line(byte: u8) -> bool {
    byte == b'\t' || (byte >= 0x20 && byte != 0x7f)
}

/// Decodes a `Transfer-Encoding: chunked` body fed in pieces of any size (strict: CRLF line ends, no
/// chunk size past `u64`). Trailers are read and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedDecoder {
    state: Chunk,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self { state: Chunk::Size { size: 0, digits: 0, part: SizeLine::Digits, line: 0 } }
    }
}

impl ChunkedDecoder {
    /// The last chunk and the trailers are in: bytes after them belong to the next request.
    pub fn is_done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Decodes from `input`, appending body bytes to `out`; returns how many bytes of `input` it used.
    /// Stops at the end of the body (see [`ChunkedDecoder::is_done`]), leaving what follows unused.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkedError> {
        let mut at = 0;
        while at < input.len() {
            let byte = input[at];
            self.state = match self.state {
                Chunk::Size { size, digits, part, line } => {
                    if line >= MAX_CHUNK_LINE {
                        return Err(ChunkedError::LineTooLong);
                    }
                    let line = line + 1;
                    match (part, byte) {
                        (_, b'\r') if digits > 0 => Chunk::SizeLf { size },
                        (SizeLine::Extension, _) if allowed_in_line(byte) => {
                            Chunk::Size { size, digits, part, line }
                        }
                        (SizeLine::Extension, _) => return Err(ChunkedError::ControlCharacter),
                        (SizeLine::Digits | SizeLine::Space, b';') if digits > 0 => {
                            Chunk::Size { size, digits, part: SizeLine::Extension, line }
                        }
                        (SizeLine::Digits | SizeLine::Space, b' ' | b'\t') if digits > 0 => {
                            Chunk::Size { size, digits, part: SizeLine::Space, line }
                        }
                        (SizeLine::Digits, _) => {
                            let digit = char::from(byte).to_digit(16).ok_or(ChunkedError::BadSize)?;
                            let size = size
                                .checked_mul(16)
                                .and_then(|s| s.checked_add(u64::from(digit)))
                                .ok_or(ChunkedError::BadSize)?;
                            Chunk::Size { size, digits: digits + 1, part, line }
                        }
                        (SizeLine::Space, _) => return Err(ChunkedError::BadSize),
                    }
                }
                Chunk::SizeLf { size } => match byte {
                    b'\n' if size == 0 => Chunk::Trailer { line: 0, total: 0 },
                    b'\n' => Chunk::Data { left: size },
                    _ => return Err(ChunkedError::BadLineEnd),
                },
                Chunk::Data { left } => {
                    let take =
                        usize::try_from(left).map_or(input.len() - at, |left| left.min(input.len() - at));
                    out.extend_from_slice(&input[at..at + take]);
                    at += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { Chunk::DataCr } else { Chunk::Data { left } };
                    continue;
                }
                Chunk::DataCr if byte == b'\r' => Chunk::DataLf,
                Chunk::DataLf if byte == b'\n' => {
                    Chunk::Size { size: 0, digits: 0, part: SizeLine::Digits, line: 0 }
                }
                Chunk::DataCr | Chunk::DataLf => return Err(ChunkedError::BadLineEnd),
                Chunk::Trailer { line, total } => {
                    if line >= MAX_CHUNK_LINE || total >= MAX_TRAILERS {
                        return Err(ChunkedError::LineTooLong);
                    }
                    if byte == b'\r' {
                        Chunk::TrailerLf { line, total }
                    } else if allowed_in_line(byte) {
                        Chunk::Trailer { line: line + 1, total: total + 1 }
                    } else {
                        return Err(ChunkedError::ControlCharacter);
                    }
                }
                Chunk::TrailerLf { line, total } => match byte {
                    b'\n' if line == 0 => {
                        self.state = Chunk::Done;
                        return Ok(at + 1);
                    }
                    b'\n' => Chunk::Trailer { line: 0, total: total + 2 },
                    _ => return Err(ChunkedError::BadLineEnd),
                },
                Chunk::Done => return Ok(at),
            };
            at += 1;
        }
        Ok(at)
    }
}

/// The start of one chunk of `len` bytes (`len` must not be 0: that is the end marker).
pub fn chunk_prefix(len: usize) -> String {
    format!("{len:x}\r\n")
}

/// After the last chunk: the zero-size chunk, no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// What a server needs of a response head it wrote itself, to frame it for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head, blank line included.
    pub head_len: usize,
    pub content_length: Option<u64>,
}

impl ResponseHead {
    /// Whether a body follows the head: never for `HEAD`, 1xx, 204 and 304 (RFC 9112 §6.3).
    pub fn has_body(&self, head_only: bool) -> bool {
        !head_only && !matches!(self.status, 100..=199 | 204 | 304)
    }
}

/// Reads the response head at the start of `buf`: `Ok(None)` while incomplete.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(err) => return Err(HttpError::Malformed(error_text(err))),
    };
    let content_length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| parse_decimal(h.value).ok_or(HttpError::BadContentLength))
        .transpose()?;
    Ok(Some(ResponseHead { status: response.code.unwrap_or_default(), head_len, content_length }))
}

/// `head` (a whole response head, ending in a blank line) with `extra` header lines (each ending in
/// CRLF) added at its end.
pub fn with_headers(head: &[u8], extra: &[u8]) -> Vec<u8> {
    let end = head.len().saturating_sub(2);
    let mut out = Vec::with_capacity(head.len() + extra.len());
    out.extend_from_slice(&head[..end]);
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: Peer<'static> = Peer { remote_addr: "10.1.2.3", remote_port: "50000", server_port: "8000" };

    fn parse(text: &str) -> Result<Option<Request>, HttpError> {
        parse_request(text.as_bytes(), &PEER)
    }

    fn var<'a>(request: &'a Request, key: &str) -> Option<&'a str> {
        request.vars().find(|(k, _)| *k == key.as_bytes()).map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn a_request_becomes_the_vars_nginx_sends() {
        let text = "GET /a%20b/./c//d?x=1&y=%20 HTTP/1.1\r\nHost: example.com:8000\r\nUser-Agent: t\r\n\
                    Content-Type: text/plain\r\nX-Forwarded-For: 1.1.1.1\r\nX_Sneaky: 1\r\n\r\nrest";
        let request = parse(text).unwrap().unwrap();
        assert_eq!(request.head_len, text.len() - 4);
        assert_eq!(var(&request, "REQUEST_METHOD"), Some("GET"));
        assert_eq!(var(&request, "REQUEST_URI"), Some("/a%20b/./c//d?x=1&y=%20"));
        assert_eq!(var(&request, "PATH_INFO"), Some("/a b/c/d"));
        assert_eq!(var(&request, "QUERY_STRING"), Some("x=1&y=%20"));
        assert_eq!(var(&request, "SERVER_PROTOCOL"), Some("HTTP/1.1"));
        assert_eq!(var(&request, "REMOTE_ADDR"), Some("10.1.2.3"));
        assert_eq!(var(&request, "REMOTE_PORT"), Some("50000"));
        assert_eq!(var(&request, "SERVER_PORT"), Some("8000"));
        assert_eq!(var(&request, "SERVER_NAME"), None, "left to the environ's Host fallback");
        assert_eq!(var(&request, "CONTENT_TYPE"), Some("text/plain"));
        assert_eq!(var(&request, "HTTP_HOST"), Some("example.com:8000"));
        assert_eq!(var(&request, "HTTP_USER_AGENT"), Some("t"));
        assert_eq!(var(&request, "HTTP_X_FORWARDED_FOR"), Some("1.1.1.1"));
        assert_eq!(var(&request, "HTTP_X_SNEAKY"), None, "underscored names dropped, as nginx does");
        assert_eq!(request.body, RequestBody::None);
        assert!(request.keep_alive && request.http11 && !request.head_only && !request.expect_continue);
        let packet = request.packet(None).unwrap();
        let (parsed, _) = crate::parse_packet(&packet, &crate::Limits::default()).unwrap().unwrap();
        assert_eq!(parsed.vars.get(b"CONTENT_LENGTH"), Some(&b""[..]));
        assert_eq!(parsed.vars.get(b"PATH_INFO"), Some(&b"/a b/c/d"[..]));
    }

    #[test]
    fn incomplete_heads_wait_and_oversized_ones_are_refused() {
        let text = "GET / HTTP/1.1\r\nHost: h\r\n\r\n";
        for cut in 0..text.len() {
            assert_eq!(parse(&text[..cut]), Ok(None), "cut at {cut}");
        }
        let long = format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}", "a".repeat(MAX_REQUEST_HEAD));
        assert_eq!(parse(&long), Err(HttpError::HeadTooLarge));
        let many = "X-Many: 1\r\n".repeat(MAX_HEADERS + 1);
        assert_eq!(parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err(HttpError::HeadTooLarge));
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
    }

    #[test]
    fn body_framing_is_length_or_chunked_never_both() {
        let ok = |text: &str| parse(text).unwrap().unwrap();
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n").body,
            RequestBody::Length(5)
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").body,
            RequestBody::Length(5),
            "a repeated equal length is one length"
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n").body,
            RequestBody::Chunked
        );
        let refused = [
            ("Content-Length: 5\r\nContent-Length: 6", HttpError::BadContentLength),
            ("Content-Length: -1", HttpError::BadContentLength),
            ("Content-Length: 1e3", HttpError::BadContentLength),
            ("Content-Length: 5\r\nTransfer-Encoding: chunked", HttpError::LengthAndChunked),
            ("Transfer-Encoding: gzip, chunked", HttpError::UnsupportedTransferEncoding),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                HttpError::UnsupportedTransferEncoding,
            ),
        ];
        for (headers, error) in refused {
            assert_eq!(
                parse(&format!("POST / HTTP/1.1\r\nHost: h\r\n{headers}\r\n\r\n")),
                Err(error.clone())
            );
        }
        assert_eq!(HttpError::UnsupportedTransferEncoding.status(), 501);
    }

    #[test]
    fn content_type_is_sent_even_when_empty() {
        let request = parse("GET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().unwrap();
        assert_eq!(var(&request, "CONTENT_TYPE"), Some(""));
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        let keep = |text: &str| parse(text).unwrap().unwrap().keep_alive;
        assert!(keep("GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.0\r\n\r\n"), "no Host needed in 1.0");
        assert!(keep("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!keep("GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade, close\r\n\r\n"));
        assert_eq!(parse("GET / HTTP/1.1\r\n\r\n"), Err(HttpError::NoHost));
        let expect = parse("PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n");
        assert!(expect.unwrap().unwrap().expect_continue);
        let head = parse("HEAD / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().unwrap();
        assert!(head.head_only);
    }

    #[test]
    fn targets_and_paths_normalise_like_nginx() {
        let path = |p: &str| normalize_path(p).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(path("/").unwrap(), "/");
        assert_eq!(path("/a/b/../c").unwrap(), "/a/c");
        assert_eq!(path("/a/b/..").unwrap(), "/a/");
        assert_eq!(path("/a/./").unwrap(), "/a/");
        assert_eq!(path("//a///b").unwrap(), "/a/b");
        assert_eq!(path("/%2e%2e/x").unwrap_err(), HttpError::BadTarget("a .. segment above the root"));
        assert!(path("/..").is_err());
        assert!(path("/a%2").is_err());
        assert!(path("/a%zz").is_err());
        assert!(path("/a%00b").is_err());
        assert_eq!(path("/caf%C3%A9").unwrap().as_bytes(), "/café".as_bytes());
        let request = parse("GET http://Example.com?q=1 HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().unwrap();
        assert_eq!((var(&request, "PATH_INFO"), var(&request, "QUERY_STRING")), (Some("/"), Some("q=1")));
        assert_eq!(
            var(&request, "REQUEST_URI"),
            Some("/?q=1"),
            "as nginx's $request_uri: no scheme, no host"
        );
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), Err(HttpError::ManyHosts));
        let request = parse("GET HTTP://h/x/y HTTP/1.1\r\nHost: h\r\n\r\n").unwrap().unwrap();
        assert_eq!((var(&request, "PATH_INFO"), var(&request, "REQUEST_URI")), (Some("/x/y"), Some("/x/y")));
        assert!(matches!(parse("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"), Err(HttpError::BadTarget(_))));
        assert!(matches!(parse("GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n"), Err(HttpError::BadTarget(_))));
        assert!(matches!(parse("GET / HTTP/2.0\r\n\r\n"), Err(HttpError::Malformed(_))));
        assert!(matches!(parse("G\0T / HTTP/1.1\r\n\r\n"), Err(HttpError::Malformed(_))));
    }

    fn decode_all(input: &[u8], piece: usize) -> Result<(Vec<u8>, usize, bool), ChunkedError> {
        let mut decoder = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut used = 0;
        for part in input.chunks(piece) {
            let n = decoder.decode(part, &mut out)?;
            used += n;
            if decoder.is_done() {
                break;
            }
            assert_eq!(n, part.len(), "everything before the end is used");
        }
        Ok((out, used, decoder.is_done()))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_pieces() {
        let body = b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next";
        for piece in 1..body.len() {
            let (out, used, done) = decode_all(body, piece).unwrap();
            assert_eq!(out, b"hello world", "piece {piece}");
            assert!(done);
            assert_eq!(&body[used..], b"GET /next", "piece {piece}: the next request is left");
        }
        let (out, _, done) = decode_all(b"A\r\n0123456789\r\n0\r\n\r\n", 64).unwrap();
        assert_eq!((out.len(), done), (10, true));
        let (_, _, done) = decode_all(b"5\r\nhel", 64).unwrap();
        assert!(!done, "waits for the rest");
    }

    #[test]
    fn malformed_chunks_are_errors() {
        assert_eq!(decode_all(b"x\r\n", 64).unwrap_err(), ChunkedError::BadSize);
        assert_eq!(decode_all(b"\r\n", 64).unwrap_err(), ChunkedError::BadSize, "no digits");
        assert_eq!(decode_all(b"11111111111111111\r\n", 64).unwrap_err(), ChunkedError::BadSize);
        assert_eq!(decode_all(b"5\nhello", 64).unwrap_err(), ChunkedError::BadSize, "bare LF");
        assert_eq!(decode_all(b"5\r\nhelloX", 64).unwrap_err(), ChunkedError::BadLineEnd);
        let long = format!("5;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(decode_all(long.as_bytes(), 64).unwrap_err(), ChunkedError::LineTooLong);
        assert_eq!(decode_all(b"5 6\r\n", 64).unwrap_err(), ChunkedError::BadSize, "two sizes");
        assert_eq!(decode_all(b"5 ;e\r\nhello\r\n0\r\n\r\n", 64).unwrap().0, b"hello", "space before ;");
        for smuggled in
            [&b"0;e\n\r\n\r\n"[..], b"0;e\0\r\n\r\n", b"0\r\nX: y\nGET /x\r\n\r\n", b"0\r\nX: \x7f\r\n\r\n"]
        {
            assert_eq!(decode_all(smuggled, 64).unwrap_err(), ChunkedError::ControlCharacter, "{smuggled:?}");
        }
        let trailers = format!("0\r\n{}", "X: y\r\n".repeat(MAX_TRAILERS / 4));
        assert_eq!(decode_all(trailers.as_bytes(), 64).unwrap_err(), ChunkedError::LineTooLong);
    }

    #[test]
    fn response_heads_are_read_back_and_extended() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
        let parsed = parse_response_head(head).unwrap().unwrap();
        assert_eq!(parsed, ResponseHead { status: 200, head_len: head.len() - 5, content_length: Some(5) });
        assert!(parsed.has_body(false) && !parsed.has_body(true));
        assert_eq!(parse_response_head(&head[..20]), Ok(None));
        let extended = with_headers(&head[..parsed.head_len], b"Connection: close\r\n");
        assert!(extended.ends_with(b"Content-Length: 5\r\nConnection: close\r\n\r\n"));
        let no_content = parse_response_head(b"HTTP/1.1 304 Not Modified\r\n\r\n").unwrap().unwrap();
        assert!(!no_content.has_body(false));
        assert_eq!(chunk_prefix(255), "ff\r\n");
    }
}
