//! Pure parser and encoder for the uwsgi binary protocol, as nginx's `uwsgi_pass` speaks it.
//!
//! A request is a 4-byte [`Header`] (modifier1, little-endian `datasize`, modifier2), a vars block
//! of `datasize` bytes ([`Vars`]), then the body, unframed, `CONTENT_LENGTH` bytes long.
//! [`parse_packet`] takes a buffer that starts at the header and answers one of three things:
//! `Ok(None)` (read more), `Ok(Some((packet, consumed)))` (the body starts at `consumed`), or a
//! [`ProtocolError`] (the packet can never become valid: reply 400 or close).
//!
//! This crate does no I/O and imports no runtime, no Python and no logging; the compiler keeps it
//! that way. The uwsgi parser allocates nothing: [`Vars`] borrows the caller's buffer.
//!
//! # Layout
//! - `header`: the 4-byte header, modifier constants, [`pong`].
//! - `vars`: the key/value record grammar and the borrowed [`Vars`] view.
//! - `error`: [`ProtocolError`].
//! - `body`: the request body's framing: `CONTENT_LENGTH`, and counting the body as it arrives.
//! - `environ`: what the WSGI environ makes of the vars (left-out vars, repeats, `wsgi.url_scheme`, the
//!   `SERVER_NAME` / `SERVER_PORT` / `SCRIPT_NAME` defaults), for a server to turn into its own objects.
//! - `http`: `--http-socket`'s HTTP/1.x: a request head to the vars nginx would send, chunked bodies, a
//!   response head read back for framing.
//! - `response`: what goes back — the HTTP response head a server writes, validated and encoded (uwsgi
//!   answers are raw HTTP).
//! - this file: [`Limits`], [`parse_packet`] (and [`parse_packet_each`]), [`encode_packet`],
//!   [`looks_like_http`], [`parse_decimal`] (for `CONTENT_LENGTH`).

pub mod body;
pub mod environ;
pub mod error;
pub mod header;
pub mod http;
pub mod response;
pub mod vars;

pub use error::ProtocolError;
pub use header::{parse_header, pong, Header, HEADER_LEN, MODIFIER2_PONG, MODIFIER_PING, MODIFIER_WSGI};
pub use vars::{parse_vars, parse_vars_each, Vars, VarsIter};

/// A `CONTENT_LENGTH` value (or an HTTP `Content-Length`): a plain non-negative decimal, with no sign,
/// no spaces and no hex, that fits a `u64`.
pub fn parse_decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    text.iter().try_fold(0u64, |acc, d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// Default for [`Limits::max_datasize`]: the largest block nginx will ever send. nginx itself
/// refuses to build a bigger packet (`uwsgi request is too big`, answered 500), so this accepts
/// everything nginx produces, at a worst case of 64 KiB buffered per connection. uWSGI's own
/// default of 4096 is a well-known source of 502s with large cookies.
pub const DEFAULT_MAX_DATASIZE: u16 = u16::MAX;

/// Default for [`Limits::max_vars`]. nginx sends up to 15 vars from `uwsgi_params` (14 over
/// plain HTTP) plus one per client header, so a request with 80+ headers must parse (uWSGI's
/// default cap, 128 pairs, is close to that). 512 leaves room for any real client while bounding
/// the per-var work the server does (one environ entry each); `max_datasize` alone would allow
/// about 13 000 vars, since the smallest record is 5 bytes.
pub const DEFAULT_MAX_VARS: usize = 512;

/// What the server accepts from the wire. Both limits are checked before the bytes they bound
/// are buffered or walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest vars block accepted (the `--buffer-size` option).
    pub max_datasize: u16,
    /// Largest number of vars records accepted, duplicates included.
    pub max_vars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_datasize: DEFAULT_MAX_DATASIZE, max_vars: DEFAULT_MAX_VARS }
    }
}

/// A parsed packet: the header and its validated vars block, borrowing the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub header: Header,
    pub vars: Vars<'a>,
}

// packet = header vars     ; header: see `parse_header`, vars: exactly header.datasize bytes
//
// The body is not part of the packet: it follows at `consumed` and is framed by CONTENT_LENGTH.
/// Parses the header and vars block at the start of `input`.
///
/// Returns `Ok(None)` while more bytes are needed, and on success the packet with the number of
/// bytes consumed (`4 + datasize`); bytes after that are the start of the request body. A
/// `datasize` over `limits.max_datasize` is an error as soon as the header is in, without waiting
/// for the block. A WSGI request (modifier1 0) with an empty block is [`ProtocolError::EmptyPacket`].
/// The block is always validated as vars, whatever modifier1 says; a caller that handles other
/// packet types (e.g. a ping, datasize 0) can dispatch on [`parse_header`] first.
///
/// With the default limits, an HTTP request line sent to the uwsgi socket decodes to a header
/// whose datasize is in range (`"GET "` is 21573), so this would wait for bytes that never come:
/// check [`looks_like_http`] first.
pub fn parse_packet<'a>(
    input: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Packet<'a>, usize)>, ProtocolError> {
    parse_packet_each(input, limits, |_, _| ())
}

/// [`parse_packet`], handing each var to `visit` as it is validated (see [`parse_vars_each`]): one walk
/// of the block for a caller that needs every var. `visit` is called only once the whole block is in.
pub fn parse_packet_each<'a>(
    input: &'a [u8],
    limits: &Limits,
    visit: impl FnMut(&'a [u8], &'a [u8]),
) -> Result<Option<(Packet<'a>, usize)>, ProtocolError> {
    let Some(header) = parse_header(input)? else {
        return Ok(None);
    };
    if header.datasize > limits.max_datasize {
        return Err(ProtocolError::DataSizeTooLarge { size: header.datasize, limit: limits.max_datasize });
    }
    if header.modifier1 == MODIFIER_WSGI && header.datasize == 0 {
        return Err(ProtocolError::EmptyPacket);
    }
    let consumed = HEADER_LEN + usize::from(header.datasize);
    let Some(block) = input.get(HEADER_LEN..consumed) else {
        return Ok(None);
    };
    let vars = parse_vars_each(block, limits.max_vars, visit)?;
    Ok(Some((Packet { header, vars }, consumed)))
}

/// Encodes a header and vars block, for tests and clients (a load generator, a ping command).
///
/// Fails with [`ProtocolError::EmptyKey`] if a key is empty and [`ProtocolError::FieldTooLong`] if
/// a key, a value or the whole block does not fit its u16 length. It does not apply [`Limits`] and
/// will encode an empty WSGI request, so tests can produce what a server must reject.
pub fn encode_packet(
    modifier1: u8,
    modifier2: u8,
    vars: &[(&[u8], &[u8])],
) -> Result<Vec<u8>, ProtocolError> {
    // The header goes in last, once datasize is known.
    let mut packet = vec![0; HEADER_LEN];
    for &(key, value) in vars {
        let offset = packet.len() - HEADER_LEN;
        if key.is_empty() {
            return Err(ProtocolError::EmptyKey { offset });
        }
        // Checked before growing the buffer, so it never holds more than a maximal packet.
        if offset + 2 + key.len() + 2 + value.len() > usize::from(u16::MAX) {
            return Err(ProtocolError::FieldTooLong);
        }
        push_field(&mut packet, key)?;
        push_field(&mut packet, value)?;
    }
    let datasize = u16::try_from(packet.len() - HEADER_LEN).map_err(|_| ProtocolError::FieldTooLong)?;
    let header = Header { modifier1, datasize, modifier2 };
    packet[..HEADER_LEN].copy_from_slice(&header.encode());
    Ok(packet)
}

/// Appends `field` with its u16le length prefix.
fn push_field(packet: &mut Vec<u8>, field: &[u8]) -> Result<(), ProtocolError> {
    let len = u16::try_from(field.len()).map_err(|_| ProtocolError::FieldTooLong)?;
    packet.extend_from_slice(&len.to_le_bytes());
    packet.extend_from_slice(field);
    Ok(())
}

/// HTTP methods whose request line we recognise, each with its trailing space. The longest
/// (`"OPTIONS "`, `"CONNECT "`) is 8 bytes, which is all [`looks_like_http`] ever reads.
const HTTP_METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// True if `input` starts with an HTTP request line (`GET `, `POST `, ... method and a space):
/// someone pointed an HTTP client or `proxy_pass` at the uwsgi socket, and deserves a readable
/// 400 rather than a silent close.
///
/// Reads at most 8 bytes. Returns false while too few bytes are in to decide: `"GET "` needs 4,
/// `"OPTIONS "` 8. HTTP clients send the request line in their first write, so by the time the
/// 4-byte header is in, the whole method normally is too. No real uwsgi packet matches: nginx sends
/// modifier1 0, and the bytes of a method name are not a modifier1 anything sends.
pub fn looks_like_http(input: &[u8]) -> bool {
    HTTP_METHODS.iter().any(|method| input.starts_with(method))
}

#[cfg(test)]
mod tests {
    use super::{
        encode_packet, looks_like_http, parse_decimal, parse_packet, Header, Limits, ProtocolError,
        HEADER_LEN,
    };

    #[test]
    fn decimals_are_plain_and_fit_u64() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"-1"), None);
        assert_eq!(parse_decimal(b" 1"), None);
        assert_eq!(parse_decimal(b"0x10"), None);
    }

    const SMALL: Limits = Limits { max_datasize: 64, max_vars: 4 };

    #[test]
    fn encode_then_parse_round_trips() {
        let vars: [(&[u8], &[u8]); 4] = [
            (b"REQUEST_METHOD", b"POST"),
            (b"CONTENT_LENGTH", b""),
            (b"PATH_INFO", "/caf\u{e9}".as_bytes()),
            (b"HTTP_X_BIN", b"\x00\xff\r\n"),
        ];
        let mut bytes = encode_packet(0, 0, &vars).unwrap();
        let packet_len = bytes.len();
        bytes.extend_from_slice(b"body bytes");

        let (packet, consumed) = parse_packet(&bytes, &Limits::default()).unwrap().unwrap();
        assert_eq!(consumed, packet_len);
        assert_eq!(
            packet.header,
            Header { modifier1: 0, datasize: u16::try_from(packet_len - HEADER_LEN).unwrap(), modifier2: 0 }
        );
        assert_eq!(packet.vars.iter().collect::<Vec<_>>(), vars);
        assert_eq!(&bytes[consumed..], b"body bytes");
    }

    #[test]
    fn encode_matches_the_reference_example_bytes() {
        let bytes = encode_packet(0, 0, &[(b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/")]).unwrap();
        assert_eq!(bytes, b"\x00\x23\x00\x00\x0e\x00REQUEST_METHOD\x03\x00GET\x09\x00PATH_INFO\x01\x00/");
    }

    #[test]
    fn encode_rejects_empty_keys_and_oversized_fields() {
        let empty_key = encode_packet(0, 0, &[(b"A", b"1"), (b"", b"x")]);
        assert_eq!(empty_key, Err(ProtocolError::EmptyKey { offset: 6 }));

        let too_long = vec![b'a'; usize::from(u16::MAX) + 1];
        assert_eq!(encode_packet(0, 0, &[(&too_long, b"")]), Err(ProtocolError::FieldTooLong));
        assert_eq!(encode_packet(0, 0, &[(b"K", &too_long)]), Err(ProtocolError::FieldTooLong));

        // Each value fits its u16, but the block does not: 2 x (2 + 1 + 2 + 40000) > 65535.
        let big = vec![b'v'; 40_000];
        assert_eq!(encode_packet(0, 0, &[(b"A", &big), (b"B", &big)]), Err(ProtocolError::FieldTooLong));

        // The largest block that fits: 2 + 1 + 2 + 65530 = 65535 bytes.
        let largest = vec![b'v'; 65_530];
        let bytes = encode_packet(0, 0, &[(b"K", &largest)]).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 65_535);
        assert!(parse_packet(&bytes, &Limits::default()).unwrap().is_some());
    }

    #[test]
    fn incomplete_header_or_block_is_none() {
        let bytes = encode_packet(0, 0, &[(b"A", b"1")]).unwrap();
        for len in 0..bytes.len() {
            assert_eq!(parse_packet(&bytes[..len], &SMALL), Ok(None), "prefix of {len} bytes");
        }
        assert!(parse_packet(&bytes, &SMALL).unwrap().is_some());
    }

    #[test]
    fn oversized_datasize_fails_as_soon_as_the_header_is_in() {
        let header = Header { modifier1: 0, datasize: 65, modifier2: 0 }.encode();
        let expected = Err(ProtocolError::DataSizeTooLarge { size: 65, limit: 64 });
        assert_eq!(parse_packet(&header[..3], &SMALL), Ok(None));
        assert_eq!(parse_packet(&header, &SMALL), expected);
        // At the limit itself, the parser waits for the block instead.
        let at_limit = Header { modifier1: 0, datasize: 64, modifier2: 0 }.encode();
        assert_eq!(parse_packet(&at_limit, &SMALL), Ok(None));
    }

    #[test]
    fn empty_packet_is_an_error_only_for_wsgi_requests() {
        assert_eq!(parse_packet(&[0, 0, 0, 0], &SMALL), Err(ProtocolError::EmptyPacket));

        // A ping has datasize 0 too, and is a complete, valid packet.
        let (ping, consumed) = parse_packet(&[100, 0, 0, 0, 0xaa], &SMALL).unwrap().unwrap();
        assert_eq!(ping.header, Header { modifier1: 100, datasize: 0, modifier2: 0 });
        assert!(ping.vars.is_empty());
        assert_eq!(consumed, HEADER_LEN);
    }

    #[test]
    fn vars_errors_surface_through_parse_packet() {
        let five_vars: Vec<(&[u8], &[u8])> =
            vec![(b"A", b""), (b"B", b""), (b"C", b""), (b"D", b""), (b"E", b"")];
        let bytes = encode_packet(0, 0, &five_vars).unwrap();
        assert_eq!(parse_packet(&bytes, &SMALL), Err(ProtocolError::TooManyVars { limit: 4 }));

        // Header says 3 bytes of vars; the block holds a key length of 5 and 1 key byte.
        let truncated = [0, 3, 0, 0, 5, 0, b'K'];
        assert_eq!(parse_packet(&truncated, &SMALL), Err(ProtocolError::TruncatedRecord { offset: 0 }));

        let empty_key = [0, 4, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_packet(&empty_key, &SMALL), Err(ProtocolError::EmptyKey { offset: 0 }));
    }

    #[test]
    fn http_request_lines_are_recognised() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /form HTTP/1.1\r\n",
            b"PUT /x HTTP/1.1\r\n",
            b"HEAD / HTTP/1.0\r\n",
            b"DELETE /item/1 HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"PATCH /item/1 HTTP/1.1\r\n",
            b"CONNECT host:443 HTTP/1.1\r\n",
            b"TRACE / HTTP/1.1\r\n",
        ] {
            assert!(looks_like_http(line), "{}", String::from_utf8_lossy(line));
        }
        // Exactly the method and its space is enough; one byte less is not yet a decision.
        assert!(looks_like_http(b"GET "));
        assert!(looks_like_http(b"OPTIONS "));
        assert!(!looks_like_http(b"OPTIONS"));
        assert!(!looks_like_http(b"GET"));
        assert!(!looks_like_http(b""));
    }

    #[test]
    fn near_misses_and_uwsgi_packets_are_not_http() {
        for input in
            [&b"GETX / HTTP/1.1"[..], b"get / HTTP/1.1", b"GET\t/", b" GET /", b"\x16\x03\x01\x02\x00"]
        {
            assert!(!looks_like_http(input), "{}", String::from_utf8_lossy(input));
        }
        let request = encode_packet(0, 0, &[(b"REQUEST_METHOD", b"GET")]).unwrap();
        assert!(!looks_like_http(&request));
        assert!(!looks_like_http(&[100, 0, 0, 0]));
    }
}
