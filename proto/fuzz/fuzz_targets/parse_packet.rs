//! Fuzz target: `parse_packet` on arbitrary bytes, with the default limits and with small ones
//! (so the `TooManyVars` and `DataSizeTooLarge` paths are reached, not just the happy path).
//! It must never panic, and a parsed packet must stay inside the input it came from.

#![no_main]

use libfuzzer_sys::fuzz_target;
use oxwsgi_proto::{parse_packet, Limits, HEADER_LEN};

/// Tight limits, so short inputs reach the limit errors too.
const SMALL: Limits = Limits {
    max_datasize: 64,
    max_vars: 3,
};

fuzz_target!(|input: &[u8]| {
    for limits in [Limits::default(), SMALL] {
        if let Ok(Some((packet, consumed))) = parse_packet(input, &limits) {
            assert!(consumed <= input.len());
            assert_eq!(consumed, HEADER_LEN + usize::from(packet.header.datasize));
            assert!(packet.header.datasize <= limits.max_datasize);
            assert!(packet.vars.len() <= limits.max_vars);
            // Iteration re-walks the validated block: it must yield exactly `len()` records.
            assert_eq!(packet.vars.iter().count(), packet.vars.len());
        }
    }
});
