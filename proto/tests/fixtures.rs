//! The parser against packets captured from real nginx 1.22.1 (`proto/fixtures/capture.py`), each
//! fed whole and then cut at every offset, as a server reading from a socket would see it.

use oxwsgi_proto::{looks_like_http, parse_packet, Limits, Packet, ProtocolError, Vars, HEADER_LEN};

const GET_QUERY: &[u8] = include_bytes!("../fixtures/get_query.bin");
const POST_FORM: &[u8] = include_bytes!("../fixtures/post_form.bin");
const CHUNKED_UPLOAD: &[u8] = include_bytes!("../fixtures/chunked_upload.bin");
const HEADER_16K: &[u8] = include_bytes!("../fixtures/header_16k.bin");
const HEADERS_80: &[u8] = include_bytes!("../fixtures/headers_80.bin");
const UNICODE_PATH: &[u8] = include_bytes!("../fixtures/unicode_path.bin");
const HEAD: &[u8] = include_bytes!("../fixtures/head.bin");
const DUPLICATE_HEADERS: &[u8] = include_bytes!("../fixtures/duplicate_headers.bin");

const ALL: [(&str, &[u8]); 8] = [
    ("get_query", GET_QUERY),
    ("post_form", POST_FORM),
    ("chunked_upload", CHUNKED_UPLOAD),
    ("header_16k", HEADER_16K),
    ("headers_80", HEADERS_80),
    ("unicode_path", UNICODE_PATH),
    ("head", HEAD),
    ("duplicate_headers", DUPLICATE_HEADERS),
];

/// uWSGI's default `--buffer-size`, to show which real requests it would refuse.
const UWSGI_DEFAULT_BUFFER_SIZE: u16 = 4096;

/// Parses a whole fixture with the default limits and checks what holds for every nginx packet.
/// Returns the packet and the body (the bytes after `consumed`).
fn parse_fixture(bytes: &[u8]) -> (Packet<'_>, &[u8]) {
    let (packet, consumed) = parse_packet(bytes, &Limits::default()).unwrap().unwrap();
    assert_eq!(consumed, HEADER_LEN + usize::from(packet.header.datasize));
    assert_eq!((packet.header.modifier1, packet.header.modifier2), (0, 0));
    assert_eq!(packet.vars.as_bytes(), &bytes[HEADER_LEN..consumed]);
    (packet, &bytes[consumed..])
}

fn var<'a>(vars: &Vars<'a>, key: &str) -> &'a [u8] {
    vars.get(key.as_bytes()).unwrap_or_else(|| panic!("{key} missing"))
}

/// `CONTENT_LENGTH` as a number; nginx sends `""` when there is no body.
fn content_length(vars: &Vars<'_>) -> usize {
    match var(vars, "CONTENT_LENGTH") {
        b"" => 0,
        digits => std::str::from_utf8(digits).unwrap().parse().unwrap(),
    }
}

#[test]
fn every_fixture_frames_its_body_by_content_length() {
    for (name, bytes) in ALL {
        let (packet, body) = parse_fixture(bytes);
        assert_eq!(body.len(), content_length(&packet.vars), "{name}");
        assert_eq!(var(&packet.vars, "SERVER_PROTOCOL"), b"HTTP/1.1", "{name}");
        assert!(!looks_like_http(bytes), "{name}");
    }
}

#[test]
fn every_prefix_is_incomplete_until_the_packet_is_in() {
    for (name, bytes) in ALL {
        let whole = parse_packet(bytes, &Limits::default()).unwrap().unwrap();
        let consumed = whole.1;
        for len in 0..=bytes.len() {
            let result = parse_packet(&bytes[..len], &Limits::default());
            if len < consumed {
                assert_eq!(result, Ok(None), "{name}: prefix of {len} bytes");
            } else {
                assert_eq!(result, Ok(Some(whole)), "{name}: prefix of {len} bytes");
            }
        }
    }
}

#[test]
fn get_query() {
    let (packet, body) = parse_fixture(GET_QUERY);
    let vars = packet.vars;
    assert_eq!(var(&vars, "REQUEST_METHOD"), b"GET");
    assert_eq!(var(&vars, "QUERY_STRING"), b"q=rust&page=2");
    assert_eq!(var(&vars, "PATH_INFO"), b"/search");
    assert_eq!(var(&vars, "REQUEST_URI"), b"/search?q=rust&page=2");
    assert_eq!(var(&vars, "HTTP_USER_AGENT"), b"oxwsgi-capture/1");
    assert_eq!(var(&vars, "HTTP_ACCEPT"), b"text/html");
    // Sent although empty, so "present but empty" is the normal no-body case.
    assert_eq!(var(&vars, "CONTENT_LENGTH"), b"");
    assert_eq!(var(&vars, "CONTENT_TYPE"), b"");
    // `HTTPS` is `if_not_empty` in uwsgi_params: absent over plain HTTP.
    assert_eq!(vars.get(b"HTTPS"), None);
    assert!(body.is_empty());
}

#[test]
fn get_query_starts_with_the_uwsgi_params_in_config_order() {
    let (packet, _) = parse_fixture(GET_QUERY);
    let keys: Vec<&[u8]> = packet.vars.iter().map(|(key, _)| key).collect();
    let params: [&[u8]; 14] = [
        b"QUERY_STRING",
        b"REQUEST_METHOD",
        b"CONTENT_TYPE",
        b"CONTENT_LENGTH",
        b"REQUEST_URI",
        b"PATH_INFO",
        b"DOCUMENT_ROOT",
        b"SERVER_PROTOCOL",
        b"REQUEST_SCHEME",
        b"REMOTE_ADDR",
        b"REMOTE_PORT",
        b"SERVER_PORT",
        b"SERVER_NAME",
        b"HTTP_HOST", // Debian's addition to uwsgi_params; it suppresses the client's own Host.
    ];
    assert_eq!(keys[..params.len()], params);
    assert_eq!(keys.iter().filter(|key| **key == b"HTTP_HOST").count(), 1);
}

#[test]
fn post_form() {
    let (packet, body) = parse_fixture(POST_FORM);
    let vars = packet.vars;
    assert_eq!(var(&vars, "REQUEST_METHOD"), b"POST");
    assert_eq!(var(&vars, "CONTENT_TYPE"), b"application/x-www-form-urlencoded");
    assert_eq!(var(&vars, "CONTENT_LENGTH"), b"17");
    assert_eq!(body, b"name=ox&lang=rust");
    // nginx passes the body headers twice: as CGI vars and again as HTTP_* copies.
    assert_eq!(var(&vars, "HTTP_CONTENT_LENGTH"), b"17");
    assert_eq!(var(&vars, "HTTP_CONTENT_TYPE"), b"application/x-www-form-urlencoded");
}

#[test]
fn chunked_upload_arrives_de_chunked_with_a_content_length() {
    let (packet, body) = parse_fixture(CHUNKED_UPLOAD);
    let vars = packet.vars;
    assert_eq!(var(&vars, "REQUEST_METHOD"), b"POST");
    assert_eq!(var(&vars, "PATH_INFO"), b"/upload");
    assert_eq!(body, b"first chunk;second, longer chunk of the upload;third.");
    assert_eq!(content_length(&vars), body.len());
    // The client's header is still passed, though nginx already removed the chunk framing.
    assert_eq!(var(&vars, "HTTP_TRANSFER_ENCODING"), b"chunked");
    assert_eq!(vars.get(b"HTTP_CONTENT_LENGTH"), None);
}

#[test]
fn header_16k() {
    let (packet, _) = parse_fixture(HEADER_16K);
    let big = var(&packet.vars, "HTTP_X_BIG");
    assert_eq!(big.len(), 16384);
    assert!(big.iter().all(|&b| b == b'a'));
    assert!(packet.header.datasize > 16384);
}

#[test]
fn header_16k_is_refused_with_uwsgi_default_buffer_size_as_soon_as_the_header_is_in() {
    let limits = Limits { max_datasize: UWSGI_DEFAULT_BUFFER_SIZE, ..Limits::default() };
    let datasize = u16::from_le_bytes([HEADER_16K[1], HEADER_16K[2]]);
    let expected = Err(ProtocolError::DataSizeTooLarge { size: datasize, limit: UWSGI_DEFAULT_BUFFER_SIZE });
    assert_eq!(parse_packet(&HEADER_16K[..HEADER_LEN], &limits), expected);
    assert_eq!(parse_packet(HEADER_16K, &limits), expected);
}

#[test]
fn headers_80() {
    let (packet, _) = parse_fixture(HEADERS_80);
    let vars = packet.vars;
    let x_h: Vec<_> = vars.iter().filter(|(key, _)| key.starts_with(b"HTTP_X_H_")).collect();
    assert_eq!(x_h.len(), 80);
    for (n, (key, value)) in (1..=80).zip(x_h) {
        assert_eq!(key, format!("HTTP_X_H_{n}").as_bytes());
        assert_eq!(value, format!("value-{n}").as_bytes());
    }
    assert!(vars.len() > 80);
}

#[test]
fn headers_80_respects_max_vars_exactly() {
    let (packet, _) = parse_fixture(HEADERS_80);
    let count = packet.vars.len();
    let exact = Limits { max_vars: count, ..Limits::default() };
    assert!(parse_packet(HEADERS_80, &exact).unwrap().is_some());
    let one_short = Limits { max_vars: count - 1, ..Limits::default() };
    assert_eq!(parse_packet(HEADERS_80, &one_short), Err(ProtocolError::TooManyVars { limit: count - 1 }));
}

#[test]
fn unicode_path_is_percent_decoded_to_raw_utf8() {
    let (packet, _) = parse_fixture(UNICODE_PATH);
    let vars = packet.vars;
    assert_eq!(var(&vars, "PATH_INFO"), "/café/✓".as_bytes());
    // The query string and the request URI stay exactly as the client sent them.
    assert_eq!(var(&vars, "QUERY_STRING"), b"x=%C3%A9");
    assert_eq!(var(&vars, "REQUEST_URI"), b"/caf%C3%A9/%E2%9C%93?x=%C3%A9");
}

#[test]
fn head() {
    let (packet, body) = parse_fixture(HEAD);
    assert_eq!(var(&packet.vars, "REQUEST_METHOD"), b"HEAD");
    assert_eq!(var(&packet.vars, "PATH_INFO"), b"/");
    assert!(body.is_empty());
}

#[test]
fn duplicate_headers_arrive_as_repeated_records_and_the_last_wins() {
    let (packet, _) = parse_fixture(DUPLICATE_HEADERS);
    let vars = packet.vars;
    let cookies: Vec<&[u8]> = vars.iter().filter(|(key, _)| *key == b"HTTP_COOKIE").map(|(_, v)| v).collect();
    assert_eq!(cookies, [&b"a=1"[..], b"b=2"]);
    assert_eq!(var(&vars, "HTTP_COOKIE"), b"b=2");
    assert_eq!(var(&vars, "HTTP_X_DUP"), b"second");
}
