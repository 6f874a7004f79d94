//! The 4-byte uwsgi packet header and the modifier values we act on. It owns only the fixed
//! layout; limits on `datasize` need the server's configuration and are applied by
//! [`crate::parse_packet`].

use crate::ProtocolError;

/// Every uwsgi packet starts with exactly this many header bytes; there is no variable part.
pub const HEADER_LEN: usize = 4;

/// modifier1 of a WSGI request (vars block, then the body). The only value nginx sends by default.
pub const MODIFIER_WSGI: u8 = 0;
/// modifier1 of a health check: ping with modifier2 0, answered by the same header with modifier2 1.
pub const MODIFIER_PING: u8 = 100;
/// modifier2 of the answer to a ping (modifier1 [`MODIFIER_PING`]).
pub const MODIFIER2_PONG: u8 = 1;

/// The packet header: which handler the packet is for and how long its vars block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Packet type; [`MODIFIER_WSGI`] for requests, [`MODIFIER_PING`] for health checks.
    pub modifier1: u8,
    /// Length of the vars block that follows the header (not of the request body).
    pub datasize: u16,
    /// Sub-type or flag; 0 on ordinary requests.
    pub modifier2: u8,
}

impl Header {
    /// The wire form; `datasize` is little-endian on every host.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let [low, high] = self.datasize.to_le_bytes();
        [self.modifier1, low, high, self.modifier2]
    }
}

/// The reply to a ping: modifier1 100, datasize 0 (no warning message), modifier2 1.
pub fn pong() -> [u8; HEADER_LEN] {
    Header { modifier1: MODIFIER_PING, datasize: 0, modifier2: MODIFIER2_PONG }.encode()
}

// header = modifier1:u8 datasize:u16le modifier2:u8
//
// A fixed 4-byte layout: once four bytes are in, every value is a well-formed header, so the
// only outcomes are "need more bytes" and a header. The `Result` keeps the signature uniform
// with the other parsers.
/// Parses the header at the start of `input`; `Ok(None)` if fewer than 4 bytes.
pub fn parse_header(input: &[u8]) -> Result<Option<Header>, ProtocolError> {
    let Some(&[modifier1, low, high, modifier2]) = input.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    Ok(Some(Header { modifier1, datasize: u16::from_le_bytes([low, high]), modifier2 }))
}

#[cfg(test)]
mod tests {
    use super::{parse_header, pong, Header, HEADER_LEN};

    #[test]
    fn datasize_is_little_endian() {
        // The reference example: REQUEST_METHOD=GET, PATH_INFO=/ is a 35-byte (0x23) block.
        let header = parse_header(&[0x00, 0x23, 0x00, 0x00]).unwrap().unwrap();
        assert_eq!(header, Header { modifier1: 0, datasize: 35, modifier2: 0 });

        let header = parse_header(&[7, 0x34, 0x12, 9]).unwrap().unwrap();
        assert_eq!(header, Header { modifier1: 7, datasize: 0x1234, modifier2: 9 });
        assert_eq!(header.encode(), [7, 0x34, 0x12, 9]);
    }

    #[test]
    fn encode_then_parse_round_trips() {
        for datasize in [0, 1, 0xff, 0x100, 21573, u16::MAX] {
            let header = Header { modifier1: 30, datasize, modifier2: 200 };
            assert_eq!(parse_header(&header.encode()), Ok(Some(header)));
        }
    }

    #[test]
    fn fewer_than_four_bytes_is_incomplete_and_extra_bytes_are_ignored() {
        let bytes = [0, 0x23, 0, 0, 0x0e, 0];
        for len in 0..HEADER_LEN {
            assert_eq!(parse_header(&bytes[..len]), Ok(None), "prefix of {len} bytes");
        }
        assert_eq!(parse_header(&bytes).unwrap().unwrap().datasize, 35);
    }

    #[test]
    fn pong_is_ping_header_with_modifier2_one() {
        assert_eq!(pong(), [100, 0, 0, 1]);
    }
}
