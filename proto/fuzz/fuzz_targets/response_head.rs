//! Fuzz target: the response head check on an arbitrary status and header list (any bytes: CR, LF, NUL,
//! non-latin-1, hop-by-hop names, repeated Content-Length, hundreds of headers) and body length, read as
//! `oxwsgi_proto_fuzz::HeadInput` fields. It must
//! never panic, and a head it accepts must be one nginx parses as the app meant: one status line and one
//! line per header it keeps, no stray CR or LF, no hop-by-hop or `Status` header (`Connection` and
//! `Keep-Alive` are left out, the others refused), at most one Content-Length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oxwsgi_proto::response::Head;
use oxwsgi_proto_fuzz::HeadInput;

/// Names that never reach nginx from an app (hop-by-hop per RFC 9110, and CGI's `Status`).
const REFUSED: [&[u8]; 10] = [
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"trailers",
    b"transfer-encoding",
    b"upgrade",
    b"status",
];

fuzz_target!(|input: &[u8]| {
    let HeadInput { status, body_len, headers } = HeadInput::decode(input);
    let Ok(head) = Head::new(status, headers.iter().copied()) else { return };
    assert!((200..=999).contains(&head.status()));
    let bytes = head.finish(body_len);
    let text = bytes.strip_suffix(b"\r\n\r\n").expect("a head ends with a blank line");
    let lines: Vec<&[u8]> =
        text.split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line)).collect();
    assert!(lines.iter().all(|line| !line.contains(&b'\r') && !line.contains(&b'\n') && !line.contains(&0)));
    assert!(lines[0].starts_with(b"HTTP/1.1 "));
    let derived = usize::from(head.content_length().is_none() && body_len.is_some() && !head.forbids_body());
    let dropped = headers
        .iter()
        .filter(|(name, _)| {
            name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive")
        })
        .count();
    assert_eq!(lines.len(), 1 + headers.len() - dropped + derived, "one line per kept header");
    let mut lengths = 0;
    for line in &lines[1..] {
        let colon = line.iter().position(|&b| b == b':').expect("name: value");
        let name = line[..colon].to_ascii_lowercase();
        assert!(!name.is_empty());
        assert!(!REFUSED.contains(&&name[..]), "{:?}", String::from_utf8_lossy(&name));
        if name == b"content-length" {
            lengths += 1;
        }
    }
    assert!(lengths <= 1, "one Content-Length at most");
});
