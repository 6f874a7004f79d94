//! The request body's framing. nginx sends the body right after the packet, unframed, exactly
//! `CONTENT_LENGTH` bytes, and never closes its side of the connection after it: the declared length is the
//! only end there is. This module owns reading `CONTENT_LENGTH` ([`parse_content_length`]) and counting the
//! body as it arrives in pieces of any size ([`BodyFraming`]): how much of each piece is body, when the body
//! is complete, how much a read may ask for. A server's sockets, buffers and timeouts stay in the server.

use crate::parse_decimal;

// content-length = "" | 1*DIGIT        ; absent or empty: no body
//
/// The body length `CONTENT_LENGTH` declares: `Some(0)` when the var is absent or empty (nginx sends `""`
/// for a request without a body), the number for a plain decimal that fits a `u64`, `None` for anything
/// else (a sign, spaces, hex, `12abc`), which a server refuses rather than guess at as uWSGI does.
pub fn parse_content_length(value: Option<&[u8]>) -> Option<u64> {
    match value {
        None | Some(b"") => Some(0),
        Some(text) => parse_decimal(text),
    }
}

/// A body of a declared length, counted as it arrives: bytes past the declared length are never the body's
/// (they are excess: whatever a peer sent too much), and the body is complete exactly when the declared
/// length has arrived, however the bytes were cut into pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyFraming {
    declared: u64,
    received: u64,
}

impl BodyFraming {
    /// A body of `declared` bytes, none of them in yet.
    pub const fn new(declared: u64) -> Self {
        Self { declared, received: 0 }
    }

    /// The length the request declared.
    pub const fn declared(&self) -> u64 {
        self.declared
    }

    /// Body bytes counted so far (never more than declared).
    pub const fn received(&self) -> u64 {
        self.received
    }

    /// Body bytes still to come.
    pub const fn remaining(&self) -> u64 {
        self.declared - self.received
    }

    /// The whole declared length has arrived.
    pub const fn is_complete(&self) -> bool {
        self.received == self.declared
    }

    /// Counts `arrived` bytes that followed what came before: returns how many of them are body. The rest
    /// (all of them, once the body is complete) are excess.
    pub fn take(&mut self, arrived: usize) -> usize {
        let body = usize::try_from(self.remaining()).map_or(arrived, |remaining| remaining.min(arrived));
        // `body` is at most `remaining()`, so this never passes `declared`.
        self.received += body as u64;
        body
    }

    /// [`BodyFraming::take`] on the bytes themselves: `(body, excess)`, in that order, together `piece`.
    pub fn split<'a>(&mut self, piece: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        let body = self.take(piece.len());
        piece.split_at(body)
    }

    /// The most a read into a buffer of `room` bytes may ask for, so it never takes bytes past the body's
    /// end (they may be another message's, or a peer's excess to be discarded): 0 once it is complete.
    pub fn read_size(&self, room: usize) -> usize {
        usize::try_from(self.remaining()).map_or(room, |remaining| remaining.min(room))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_empty_or_plain_decimal() {
        assert_eq!(parse_content_length(None), Some(0));
        assert_eq!(parse_content_length(Some(b"")), Some(0));
        assert_eq!(parse_content_length(Some(b"0")), Some(0));
        assert_eq!(parse_content_length(Some(b"53")), Some(53));
        assert_eq!(parse_content_length(Some(b"18446744073709551615")), Some(u64::MAX));
        for refused in [&b"12abc"[..], b" 1", b"+1", b"-1", b"0x10", b"18446744073709551616", b"1 "] {
            assert_eq!(parse_content_length(Some(refused)), None, "{}", String::from_utf8_lossy(refused));
        }
    }

    #[test]
    fn pieces_count_up_to_the_declared_length_and_no_further() {
        let mut body = BodyFraming::new(10);
        assert_eq!(body.split(b"hello"), (&b"hello"[..], &b""[..]));
        assert!(!body.is_complete());
        assert_eq!(body.remaining(), 5);
        assert_eq!(body.read_size(64), 5);
        assert_eq!(body.read_size(3), 3);
        assert_eq!(body.split(b" worldEXTRA"), (&b" worl"[..], &b"dEXTRA"[..]));
        assert!(body.is_complete());
        assert_eq!((body.received(), body.declared()), (10, 10));
        assert_eq!(body.split(b"more"), (&b""[..], &b"more"[..]), "complete: all excess");
        assert_eq!(body.read_size(64), 0);
    }

    #[test]
    fn an_empty_body_is_complete_at_once() {
        let mut body = BodyFraming::new(0);
        assert!(body.is_complete());
        assert_eq!(body.take(7), 0);
        assert_eq!(body.read_size(7), 0);
    }

    #[test]
    fn lengths_beyond_memory_never_overflow() {
        let mut body = BodyFraming::new(u64::MAX);
        assert_eq!(body.take(1 << 20), 1 << 20);
        assert_eq!(body.remaining(), u64::MAX - (1 << 20));
        let left = usize::try_from(body.remaining()).unwrap_or(usize::MAX);
        assert_eq!(body.read_size(usize::MAX), left);
        assert!(!body.is_complete());
    }
}
