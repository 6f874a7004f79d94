//! Fuzz target: a packet that arrives in two pieces, split at an arbitrary point, must parse as it does
//! whole. A prefix that ends before the packet does asks for more (`Ok(None)`), or, when the packet can
//! never become valid, fails with the same error the whole input gives: reading more never turns an error
//! into a request or one request into another. The input is the cut point (a little-endian u16, modulo the
//! length) and the bytes (`oxwsgi_proto_fuzz::split_point`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use oxwsgi_proto::{parse_packet, Limits};
use oxwsgi_proto_fuzz::split_point;

/// Tight limits, so short inputs reach the limit errors too.
const SMALL: Limits = Limits { max_datasize: 64, max_vars: 3 };

fuzz_target!(|input: &[u8]| {
    let (split, bytes) = split_point(input);
    let at = usize::from(split) % (bytes.len() + 1);
    for limits in [Limits::default(), SMALL] {
        let whole = parse_packet(bytes, &limits);
        let prefix = parse_packet(&bytes[..at], &limits);
        match (&whole, &prefix) {
            // The prefix holds the whole packet: the same packet.
            (Ok(Some((_, consumed))), Ok(Some(_))) => {
                assert!(*consumed <= at);
                assert_eq!(prefix, whole);
            }
            // The packet ends past the cut: read more.
            (Ok(Some((_, consumed))), _) => {
                assert!(at < *consumed);
                assert_eq!(prefix, Ok(None));
            }
            // Not enough for the whole input either: nor for a part of it.
            (Ok(None), _) => assert_eq!(prefix, Ok(None)),
            // An error shows as soon as it can: before that, read more; after, the same error.
            (Err(error), Err(early)) => assert_eq!(early, error),
            (Err(_), Ok(None)) => {}
            (Err(_), Ok(Some(_))) => panic!("a prefix parsed where the whole input fails"),
        }
    }
});
