//! Fuzz target: a request body of an arbitrary declared length (`CONTENT_LENGTH`) arriving in arbitrary
//! pieces (`oxwsgi_proto_fuzz::BodyInput`), counted by `body::BodyFraming` as the server counts it. It must
//! never panic, and:
//!
//! - the body never exceeds the declared length, and the pieces are exactly the body, then the excess;
//! - the body is complete exactly once the declared length has arrived, and stays complete;
//! - where the bytes were cut never changes the outcome (the pieces, the whole, one byte at a time);
//! - reads sized by `read_size` never take a byte past the body's end: what is left on the "socket" is the
//!   excess, untouched.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oxwsgi_proto::body::BodyFraming;
use oxwsgi_proto_fuzz::BodyInput;

/// What the pieces came to: the body, the excess, and the state of the count at the end.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    body: Vec<u8>,
    excess: Vec<u8>,
    framing: BodyFraming,
}

fuzz_target!(|input: &[u8]| {
    let BodyInput { declared, pieces } = BodyInput::decode(input);
    let all = pieces.concat();
    let total = all.len() as u64;

    let outcome = feed(declared, pieces.iter().copied());
    let body_len = declared.min(total);
    assert_eq!(outcome.body.len() as u64, body_len, "the body is the declared length, or all that came");
    assert_eq!([&outcome.body[..], &outcome.excess[..]].concat(), all, "body, then excess: nothing lost");
    assert_eq!(outcome.framing.received(), body_len);
    assert_eq!(outcome.framing.received() + outcome.framing.remaining(), declared);
    assert_eq!(outcome.framing.is_complete(), total >= declared);

    assert_eq!(feed(declared, [&all[..]]), outcome, "the whole at once");
    assert_eq!(feed(declared, all.chunks(1)), outcome, "one byte at a time");
    check_reads(declared, &pieces, &all, &outcome);
});

/// Splits each piece as it comes, checking the count at every step.
fn feed<'a>(declared: u64, pieces: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut framing = BodyFraming::new(declared);
    let (mut body, mut excess) = (Vec::new(), Vec::new());
    for piece in pieces {
        let was_complete = framing.is_complete();
        let (part, rest) = framing.split(piece);
        assert_eq!(part.len() + rest.len(), piece.len());
        assert!(framing.received() <= declared);
        if was_complete {
            assert!(part.is_empty(), "nothing is body once the body is complete");
        }
        if !rest.is_empty() {
            assert!(framing.is_complete(), "excess only past the declared end");
        }
        body.extend_from_slice(part);
        excess.extend_from_slice(rest);
        assert_eq!(framing.received(), body.len() as u64);
        assert_eq!(framing.is_complete(), body.len() as u64 == declared);
    }
    Outcome { body, excess, framing }
}

/// The server's way: reads into buffers the size of the pieces (at least 1 byte), each asking for at most
/// `read_size`, from a socket holding every byte that came.
fn check_reads(declared: u64, pieces: &[&[u8]], all: &[u8], outcome: &Outcome) {
    let mut framing = BodyFraming::new(declared);
    let mut socket = all;
    let mut read = Vec::new();
    for room in pieces.iter().map(|piece| piece.len().max(1)).cycle().take(all.len() + 1) {
        let want = framing.read_size(room);
        assert!(want <= room);
        assert_eq!(want == 0, framing.is_complete() || room == 0);
        let got = want.min(socket.len());
        if got == 0 {
            break;
        }
        assert_eq!(framing.take(got), got, "a read sized by read_size is all body");
        read.extend_from_slice(&socket[..got]);
        socket = &socket[got..];
    }
    assert_eq!(read, outcome.body);
    assert_eq!(socket, &outcome.excess[..], "what the reads left is the excess");
    assert_eq!(framing, outcome.framing);
}
