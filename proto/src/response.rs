//! The HTTP response head oxwsgi writes to nginx: validation of what the app passed to `start_response`
//! and its encoding as raw `HTTP/1.1` bytes.
//!
//! Pure: no tokio, no pyo3. The WSGI layer hands in latin-1 bytes; everything nginx would reject with a 502
//! (or that would let an app inject headers) is refused here, with a reason the log can show.

use std::fmt;

use crate::parse_decimal;

/// Headers that describe one hop, not the response, and would change how nginx frames or treats it: PEP 3333
/// makes them a fatal error from an app, and a `Transfer-Encoding: chunked` passed through is the classic
/// double-chunked body behind nginx.
const HOP_BY_HOP: [&str; 7] = [
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

/// Hop-by-hop headers that only say what the app would like done with the connection: harmless, since
/// oxwsgi ends every response by closing its connection to nginx, and sent by apps that work under uWSGI
/// and gunicorn. Dropped rather than refused.
const CONNECTION_HEADERS: [&str; 2] = ["connection", "keep-alive"];

/// Room for a response head without growing: a status line and a few headers.
const HEAD_CAPACITY: usize = 256;

/// The head sent when the app fails before producing one.
pub const INTERNAL_ERROR: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 22\r\n\r\nInternal Server Error\n";

/// A validated status line and header block, ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    status: u16,
    /// `HTTP/1.1 ...\r\n` and every header line, without the final blank line, so a derived
    /// `Content-Length` can still be appended.
    bytes: Vec<u8>,
    content_length: Option<u64>,
    dropped_connection_header: bool,
    added_reason_phrase: bool,
}

/// What the check corrected instead of refusing, because apps that do it work under uWSGI and gunicorn.
/// The server says so in a warning (once per worker is enough: an app that does it does it every time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correction {
    /// A `Connection` or `Keep-Alive` header was left out.
    DroppedConnectionHeader,
    /// A status without a reason phrase (`"200"`) was given the standard one.
    AddedReasonPhrase,
}

impl Correction {
    pub const ALL: [Correction; 2] = [Correction::DroppedConnectionHeader, Correction::AddedReasonPhrase];
}

impl fmt::Display for Correction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DroppedConnectionHeader => {
                "the app sent a `Connection` or `Keep-Alive` response header: left out, since the connection \
                 to nginx always closes after one response (PEP 3333 forbids hop-by-hop headers)"
            }
            Self::AddedReasonPhrase => {
                "the app sent a status without a reason phrase (\"200\" instead of \"200 OK\"): sent with \
                 the standard phrase (PEP 3333 asks for both)"
            }
        })
    }
}

/// Why a status or header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    Status(String),
    HeaderName(String),
    HeaderValue { name: String, reason: &'static str },
    HopByHop(String),
    StatusHeader,
    ContentLength(String),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => {
                write!(f, "invalid status {status:?}: expected a 3-digit code >= 200, a space and a reason")
            }
            Self::HeaderName(name) => write!(f, "invalid header name {name:?}: not an HTTP token"),
            Self::HeaderValue { name, reason } => write!(f, "invalid value for header {name:?}: {reason}"),
            Self::HopByHop(name) => {
                write!(f, "hop-by-hop header {name:?} is not allowed from a WSGI app (PEP 3333)")
            }
            Self::StatusHeader => {
                f.write_str("a `Status` header is not allowed; the status goes to start_response")
            }
            Self::ContentLength(value) => write!(f, "invalid or repeated Content-Length {value:?}"),
        }
    }
}

impl std::error::Error for HeadError {}

impl Head {
    /// Validates `status` (e.g. `b"200 OK"`) and `headers` (latin-1 bytes, as the app gave them).
    pub fn new<'a>(
        status: &[u8],
        headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, HeadError> {
        let (code, reason) = parse_status(status).ok_or_else(|| HeadError::Status(latin1_lossy(status)))?;
        let mut bytes = Vec::with_capacity(HEAD_CAPACITY);
        bytes.extend_from_slice(b"HTTP/1.1 ");
        bytes.extend_from_slice(&status[..3]);
        bytes.push(b' ');
        let added_reason_phrase = reason.is_empty();
        if added_reason_phrase {
            bytes.extend_from_slice(standard_reason(code).as_bytes());
        } else {
            bytes.extend_from_slice(reason);
        }
        bytes.extend_from_slice(b"\r\n");
        let mut content_length = None;
        let mut dropped_connection_header = false;
        for (name, value) in headers {
            check_header(name, value)?;
            if CONNECTION_HEADERS.iter().any(|hop| name.eq_ignore_ascii_case(hop.as_bytes())) {
                dropped_connection_header = true;
                continue;
            }
            if name.eq_ignore_ascii_case(b"content-length") {
                let parsed = parse_decimal(value).filter(|_| content_length.is_none());
                content_length = Some(parsed.ok_or_else(|| HeadError::ContentLength(latin1_lossy(value)))?);
            }
            bytes.extend_from_slice(name);
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value);
            bytes.extend_from_slice(b"\r\n");
        }
        Ok(Self { status: code, bytes, content_length, dropped_connection_header, added_reason_phrase })
    }

    /// Whether the check made this correction to what the app passed.
    pub fn corrected(&self, correction: Correction) -> bool {
        match correction {
            Correction::DroppedConnectionHeader => self.dropped_connection_header,
            Correction::AddedReasonPhrase => self.added_reason_phrase,
        }
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The Content-Length the app declared.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// 204 and 304 responses have no body, whatever the app yields.
    pub fn forbids_body(&self) -> bool {
        matches!(self.status, 204 | 304)
    }

    /// The finished head. `body_len` is the whole body's length when the server knows it; it becomes a
    /// `Content-Length` header unless the app declared one or the status forbids a body.
    pub fn finish(&self, body_len: Option<u64>) -> Vec<u8> {
        self.encode(body_len, 0)
    }

    /// [`Head::finish`] into a buffer with `room` bytes to spare, for a small body to follow in the same
    /// write.
    pub fn encode(&self, body_len: Option<u64>, room: usize) -> Vec<u8> {
        /// `Content-Length: ` + 20 digits + CRLF + the blank line.
        const DERIVED_LENGTH_ROOM: usize = 40;
        let mut bytes = Vec::with_capacity(self.bytes.len() + DERIVED_LENGTH_ROOM + room);
        bytes.extend_from_slice(&self.bytes);
        if let (None, Some(len), false) = (self.content_length, body_len, self.forbids_body()) {
            bytes.extend_from_slice(b"Content-Length: ");
            push_decimal(&mut bytes, len);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        bytes
    }
}

/// `NNN reason`: three digits, no informational (1xx) status — nginx takes any 1xx from a uwsgi upstream as
/// the final response — then a space and a reason without control characters, or nothing (`"200"`,
/// `"200 "`: the reason comes back empty). Returns the code and the reason.
fn parse_status(status: &[u8]) -> Option<(u16, &[u8])> {
    let (code, rest) = status.split_at_checked(3)?;
    let reason = if rest.is_empty() { rest } else { rest.strip_prefix(b" ")? };
    if !code.iter().all(u8::is_ascii_digit) || reason.iter().any(|&b| is_control(b)) {
        return None;
    }
    let code = code.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    (200..=999).contains(&code).then_some((code, reason))
}

/// The reason phrase RFC 9110 (and RFC 6585 for 428-431, 511) gives a status; empty for a code it does not
/// name, which RFC 9112's status line allows.
fn standard_reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        305 => "Use Proxy",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        511 => "Network Authentication Required",
        _ => "",
    }
}

fn check_header(name: &[u8], value: &[u8]) -> Result<(), HeadError> {
    if name.is_empty() || !name.iter().all(|&b| is_token_byte(b)) {
        return Err(HeadError::HeaderName(latin1_lossy(name)));
    }
    if name.eq_ignore_ascii_case(b"status") {
        return Err(HeadError::StatusHeader);
    }
    if HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop.as_bytes())) {
        return Err(HeadError::HopByHop(latin1_lossy(name)));
    }
    if value.iter().any(|&b| b != b'\t' && is_control(b)) {
        let name = latin1_lossy(name);
        return Err(HeadError::HeaderValue {
            name,
            reason: "contains a control character (CR, LF, NUL, ...)",
        });
    }
    Ok(())
}

fn is_control(byte: u8) -> bool {
    byte < 0x20 || byte == 0x7f
}

/// RFC 9110 `tchar`, looked up in a table: every byte of every header name passes through here.
fn is_token_byte(byte: u8) -> bool {
    TOKEN_BYTES[usize::from(byte)]
}

const TOKEN_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        #[expect(clippy::cast_possible_truncation, reason = "the loop stops below 256")]
        let b = byte as u8;
        table[byte] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        byte += 1;
    }
    table
};

/// Appends `value` in decimal, without the allocation `to_string` makes.
fn push_decimal(bytes: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20]; // u64::MAX has 20 digits
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    bytes.extend_from_slice(&digits[start..]);
}

fn latin1_lossy(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: &str, headers: &[(&str, &str)]) -> Result<Head, HeadError> {
        Head::new(status.as_bytes(), headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn encodes_status_line_headers_and_derived_length() {
        let h = head("200 OK", &[("Content-Type", "text/plain")]).unwrap();
        assert_eq!(h.status(), 200);
        assert_eq!(
            h.finish(Some(5)),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n".to_vec()
        );
        let h = head("404 Not Found", &[("Content-Length", "3")]).unwrap();
        assert_eq!(h.content_length(), Some(3));
        assert_eq!(h.finish(Some(99)), b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\n".to_vec());
        let h = head("204 No Content", &[]).unwrap();
        assert!(h.forbids_body());
        assert_eq!(h.finish(Some(0)), b"HTTP/1.1 204 No Content\r\n\r\n".to_vec());
        assert_eq!(head("200 OK", &[]).unwrap().finish(None), b"HTTP/1.1 200 OK\r\n\r\n".to_vec());
    }

    #[test]
    fn rejects_bad_status() {
        for bad in [
            "200OK",
            "20 OK",
            "2000 OK",
            "abc OK",
            "100 Continue",
            "101 Switching Protocols",
            "200 O\rK",
            "200 OK\n",
            "099 X",
        ] {
            assert!(matches!(head(bad, &[]), Err(HeadError::Status(_))), "{bad:?} accepted");
        }
        assert!(head("599 Custom Reason", &[]).is_ok());
    }

    #[test]
    fn rejects_injection_and_hop_by_hop() {
        assert!(matches!(
            head("200 OK", &[("X-A", "a\r\nSet-Cookie: x")]),
            Err(HeadError::HeaderValue { .. })
        ));
        assert!(matches!(head("200 OK", &[("X-A", "a\0")]), Err(HeadError::HeaderValue { .. })));
        assert!(matches!(head("200 OK", &[("X A", "v")]), Err(HeadError::HeaderName(_))));
        assert!(matches!(head("200 OK", &[("X:A", "v")]), Err(HeadError::HeaderName(_))));
        assert!(matches!(head("200 OK", &[("", "v")]), Err(HeadError::HeaderName(_))));
        assert!(matches!(head("200 OK", &[("Transfer-Encoding", "chunked")]), Err(HeadError::HopByHop(_))));
        for name in ["TE", "Trailer", "Upgrade", "Proxy-Authenticate", "proxy-authorization"] {
            assert!(matches!(head("200 OK", &[(name, "x")]), Err(HeadError::HopByHop(_))), "{name}");
        }
        assert!(matches!(head("200 OK", &[("Status", "404 Not Found")]), Err(HeadError::StatusHeader)));
        assert!(head("200 OK", &[("X-Tab", "a\tb"), ("X-Latin", "caf\u{e9}")]).is_ok());
    }

    #[test]
    fn connection_headers_are_dropped_and_said() {
        let h =
            head("200 OK", &[("Connection", "close"), ("X-A", "1"), ("keep-alive", "timeout=5")]).unwrap();
        assert!(h.corrected(Correction::DroppedConnectionHeader));
        assert!(!h.corrected(Correction::AddedReasonPhrase));
        assert_eq!(h.finish(Some(0)), b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n".to_vec());
        let h = head("200 OK", &[("X-A", "1")]).unwrap();
        assert!(Correction::ALL.iter().all(|&c| !h.corrected(c)));
        // A dropped header is still checked: no injection through it.
        assert!(matches!(head("200 OK", &[("Connection", "a\r\nX: y")]), Err(HeadError::HeaderValue { .. })));
    }

    #[test]
    fn a_status_without_reason_gets_the_standard_one() {
        for (status, line) in [
            ("200", "HTTP/1.1 200 OK"),
            ("404 ", "HTTP/1.1 404 Not Found"),
            ("503", "HTTP/1.1 503 Service Unavailable"),
            ("299", "HTTP/1.1 299 "),
        ] {
            let h = head(status, &[]).unwrap();
            assert!(h.corrected(Correction::AddedReasonPhrase), "{status:?}");
            assert_eq!(h.finish(None), format!("{line}\r\n\r\n").into_bytes(), "{status:?}");
        }
        assert!(!head("200 Fine", &[]).unwrap().corrected(Correction::AddedReasonPhrase));
    }

    #[test]
    fn token_bytes_are_exactly_rfc_9110_tchar() {
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        for byte in 0..=255u8 {
            assert_eq!(is_token_byte(byte), tchar(byte), "byte {byte:#04x}");
        }
    }

    #[test]
    fn content_length_must_be_one_decimal() {
        assert!(matches!(head("200 OK", &[("Content-Length", "-1")]), Err(HeadError::ContentLength(_))));
        assert!(matches!(head("200 OK", &[("Content-Length", "0x10")]), Err(HeadError::ContentLength(_))));
        assert!(matches!(
            head("200 OK", &[("Content-Length", "1"), ("content-length", "1")]),
            Err(HeadError::ContentLength(_))
        ));
    }

    #[test]
    fn derived_lengths_are_written_in_decimal() {
        for len in [0, 7, 10, 1_048_576, u64::MAX] {
            let head = head("200 OK", &[]).unwrap().finish(Some(len));
            let expected = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
            assert_eq!(String::from_utf8(head).unwrap(), expected);
        }
    }

    #[test]
    fn internal_error_is_consistent() {
        let body_start = INTERNAL_ERROR.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(INTERNAL_ERROR.len() - body_start, 22);
    }
}
