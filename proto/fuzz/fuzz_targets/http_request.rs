//! Fuzz target: bytes from an HTTP client, as `--http-socket` reads them (`http::parse_request`), then the
//! rest decoded as a chunked body (`http::ChunkedDecoder`). It must never panic, and:
//!
//! - a head that parses fits the input, and the packet built from it is a valid uwsgi packet (or too big
//!   to encode, which the server answers 431) whose `PATH_INFO` is normalised: it starts with `/`, and has
//!   no `.`/`..` segment and no empty one but the last;
//! - the chunked decoder gives the same body, stops at the same byte and fails the same way whether the
//!   bytes come at once or one at a time, and never uses a byte past the end of the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oxwsgi_proto::http::{parse_request, ChunkedDecoder, ChunkedError, Peer};
use oxwsgi_proto::{parse_packet, Limits, ProtocolError};

const PEER: Peer<'static> = Peer { remote_addr: "192.0.2.1", remote_port: "40000", server_port: "8000" };

/// What decoding came to: the body, the bytes used, whether it ended, or the error.
type Decoded = Result<(Vec<u8>, usize, bool), ChunkedError>;

fuzz_target!(|input: &[u8]| {
    let rest = match parse_request(input, &PEER) {
        Ok(Some(request)) => {
            assert!(request.head_len <= input.len());
            match request.packet(Some(7)) {
                Ok(packet) => {
                    let limits = Limits { max_datasize: u16::MAX, max_vars: usize::MAX };
                    let (parsed, consumed) = parse_packet(&packet, &limits).unwrap().expect("a whole packet");
                    assert_eq!(consumed, packet.len());
                    assert_eq!(parsed.vars.get(b"CONTENT_LENGTH"), Some(&b"7"[..]));
                    let path = parsed.vars.get(b"PATH_INFO").expect("PATH_INFO");
                    assert!(path.starts_with(b"/"));
                    let segments: Vec<&[u8]> = path[1..].split(|&b| b == b'/').collect();
                    for (at, segment) in segments.iter().enumerate() {
                        assert!(*segment != b"." && *segment != b"..", "{path:?}");
                        assert!(!segment.is_empty() || at == segments.len() - 1, "{path:?}");
                    }
                }
                Err(error) => assert_eq!(error, ProtocolError::FieldTooLong),
            }
            &input[request.head_len..]
        }
        Ok(None) | Err(_) => input,
    };
    let whole = decode(std::iter::once(rest));
    assert_eq!(decode(rest.chunks(1)), whole, "one byte at a time");
    if let Ok((_, used, done)) = &whole {
        assert!(*used <= rest.len());
        assert!(*done || *used == rest.len(), "an unfinished body uses every byte it was given");
    }
});

fn decode<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> Decoded {
    let mut decoder = ChunkedDecoder::default();
    let mut body = Vec::new();
    let mut used = 0;
    for piece in pieces {
        let n = decoder.decode(piece, &mut body)?;
        assert!(n <= piece.len());
        used += n;
        if decoder.is_done() {
            break;
        }
        assert_eq!(n, piece.len());
    }
    Ok((body, used, decoder.is_done()))
}
