//! Properties of the parser and the encoder over generated input: every packet the encoder makes parses
//! back to the same vars; a packet cut anywhere asks for more and never fails or yields a request; any
//! bytes at all are answered without a panic; the body after a packet is never taken as part of it.

use oxwsgi_proto::{encode_packet, parse_packet, Limits, HEADER_LEN};
use proptest::prelude::*;

/// As generous as the wire allows, so the properties test the grammar, not the limits.
const WIDE: Limits = Limits { max_datasize: u16::MAX, max_vars: 4096 };

/// Up to 24 vars, non-empty keys up to 48 bytes, values up to 300 bytes, any bytes in both: well under
/// the 65535-byte block a packet can carry.
fn vars() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    prop::collection::vec(
        (prop::collection::vec(any::<u8>(), 1..48), prop::collection::vec(any::<u8>(), 0..300)),
        1..24,
    )
}

fn encode(vars: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&[u8], &[u8])> = vars.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    encode_packet(0, 0, &refs).expect("within a packet's size")
}

proptest! {
    #[test]
    fn an_encoded_packet_parses_back_to_its_vars(vars in vars(), body in prop::collection::vec(any::<u8>(), 0..64)) {
        let packet = encode(&vars);
        let mut wire = packet.clone();
        wire.extend_from_slice(&body);
        let (parsed, consumed) = parse_packet(&wire, &WIDE).unwrap().expect("a whole packet");
        prop_assert_eq!(consumed, packet.len(), "the body is not part of the packet");
        prop_assert_eq!(usize::from(parsed.header.datasize), packet.len() - HEADER_LEN);
        let got: Vec<(Vec<u8>, Vec<u8>)> = parsed.vars.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        prop_assert_eq!(got, vars);
    }

    #[test]
    fn a_packet_cut_anywhere_asks_for_more(vars in vars(), cut in any::<prop::sample::Index>()) {
        let packet = encode(&vars);
        let at = cut.index(packet.len());
        prop_assert_eq!(parse_packet(&packet[..at], &WIDE), Ok(None), "cut at {} of {}", at, packet.len());
    }

    #[test]
    fn any_bytes_get_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let limits = Limits::default();
        if let Ok(Some((packet, consumed))) = parse_packet(&bytes, &limits) {
            prop_assert!(consumed <= bytes.len());
            prop_assert!(packet.header.datasize <= limits.max_datasize);
        }
    }
}
